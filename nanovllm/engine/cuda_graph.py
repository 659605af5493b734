from contextlib import suppress

import torch
from torch import nn

from nanovllm.utils.context import Context, reset_context, set_context


class CUDAGraphs:
    """Decode captured as CUDA graphs, one per batch size on a ladder; a step replays the smallest that fits,
    padded. The graphs read their inputs from static buffers, which `replay` fills from the step's tensors."""

    def __init__(self, model: nn.Module, max_num_seqs: int, max_blocks: int, hidden_size: int,
                 dtype: torch.dtype, device: torch.device):
        self.model = model
        max_bs = min(max_num_seqs, 512)
        self.batch_sizes = [bs for bs in (1, 2, 4, 8) if bs < max_bs] + list(range(16, max_bs, 16)) + [max_bs]
        self.input_ids = torch.zeros(max_bs, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_bs, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((max_bs,), -1, dtype=torch.int64, device=device)
        self.context_lens = torch.zeros(max_bs, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(max_bs, max_blocks, dtype=torch.int32, device=device)
        self.outputs = torch.zeros(max_bs, hidden_size, dtype=dtype, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}

    def _forward(self, bs: int):
        self.outputs[:bs] = self.model(self.input_ids[:bs], self.positions[:bs])

    @torch.inference_mode()
    def capture(self):
        """Capture every batch size, largest first so the smaller graphs reuse its memory pool; each runs eagerly
        first, so that capture only records launches. A failure raises, leaving the process able to capture again."""
        pool = None
        try:
            for bs in reversed(self.batch_sizes):
                set_context(is_prefill=False, slot_mapping=self.slot_mapping[:bs],
                            context_lens=self.context_lens[:bs], block_tables=self.block_tables[:bs])
                self._forward(bs)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool):
                    self._forward(bs)
                pool = graph.pool()
                self.graphs[bs] = graph
                torch.cuda.synchronize()
        except Exception as e:
            self.graphs.clear()
            _recover_from_failed_capture()
            raise RuntimeError(f"CUDA graph capture failed ({type(e).__name__}: {e}); "
                               f"pass enforce_eager=True to run without CUDA graphs") from e
        finally:
            reset_context()

    def can_run(self, batch: int) -> bool:
        return bool(self.graphs) and batch <= self.batch_sizes[-1]

    def replay(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: Context) -> torch.Tensor:
        """The model's hidden states for a decode batch, through the smallest graph that holds it."""
        batch = input_ids.size(0)
        bs = next(bs for bs in self.batch_sizes if bs >= batch)
        self.input_ids[:batch] = input_ids
        self.positions[:batch] = positions
        self.slot_mapping.fill_(-1)     # padding rows write nowhere and attend to nothing
        self.slot_mapping[:batch] = ctx.slot_mapping
        self.context_lens.zero_()
        self.context_lens[:batch] = ctx.context_lens
        self.block_tables[:batch, :ctx.block_tables.size(1)] = ctx.block_tables
        self.graphs[bs].replay()
        return self.outputs[:batch]

    def clear(self):
        self.graphs.clear()


def _recover_from_failed_capture():
    """After an error inside `torch.cuda.graph`, torch may leave the capture stream current and the CUDA RNG
    believing it is still capturing (every later random op then raises). An empty capture resets the RNG."""
    torch.cuda.set_stream(torch.cuda.default_stream())
    with suppress(Exception):   # nothing more can be done here; the original error is what the caller needs to see
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            pass
    torch.cuda.synchronize()
