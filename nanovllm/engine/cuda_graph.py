import gc
from contextlib import suppress

import torch
from torch import nn

from nanovllm.engine.decode_inputs import DecodeInputs
from nanovllm.utils.context import Context, reset_context, set_context


class CUDAGraphs:
    """Decode captured as CUDA graphs, one per batch size on a ladder; a step replays the smallest that fits, padded.
    The graphs read `inputs`, a static DecodeInputs that the runner fills (padding rows write and attend to nothing).

    With `sampled` (one GPU) a graph is the whole step: it takes the input id of each row whose last token the host
    has not seen from `sampled` (the previous step's ids, sample_rows), runs the model and the LM head into `outputs`,
    and samples the temperature-only path into `sampled`, so a step costs the host one launch; the logits stay for the
    sampler's other paths. Without (tensor parallelism: the LM head gathers to rank 0, which broadcasts the ids), a
    graph stops at the hidden states and the runner does the rest."""

    def __init__(self, model: nn.Module, inputs: DecodeInputs, backend, hidden_size: int, dtype: torch.dtype,
                 sampled: torch.Tensor | None = None, vocab_size: int = 0):
        self.model, self.inputs, self.backend, self.sampled = model, inputs, backend, sampled
        max_bs, device = inputs.rows, inputs.buffer.device
        # Each size costs start-up a discovery run and a capture, while padding a step costs little (padding rows
        # attend to nothing; the linear layers are about as fast for a few more rows): below 128 the powers of two
        # and their midpoints, then every 32.
        self.batch_sizes = ([bs for bs in (1, 2, 4, 8, 16, 24, 32, 48, 64, 96) if bs < max_bs]
                            + list(range(128, max_bs, 32)) + [max_bs])
        width = vocab_size if sampled is not None else hidden_size     # the logits, or the hidden states
        self.outputs = torch.zeros(max_bs, width, dtype=dtype, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}

    def _forward(self, bs: int):
        inputs = self.inputs
        # set_context runs the attention backend's per-step `prepare`, which each graph so captures too.
        set_context(Context(is_prefill=False, slot_mapping=inputs.slot_mapping[:bs],
                            context_lens=inputs.context_lens[:bs], block_tables=inputs.block_tables[:bs],
                            backend=self.backend))
        input_ids = inputs.input_ids[:bs]
        if self.sampled is None:
            self.outputs[:bs] = self.model(input_ids, inputs.positions[:bs])
            return
        from nanovllm.kernels.sampling import gumbel_sample    # imported here: Triton only runs on CUDA
        rows = inputs.sample_rows[:bs]
        input_ids = torch.where(rows >= 0, self.sampled[rows.clamp(min=0)], input_ids)
        hidden = self.model(input_ids, inputs.positions[:bs])
        logits = self.model.compute_logits(hidden, out=self.outputs[:bs])
        gumbel_sample(logits, inputs.temperatures[:bs], out=self.sampled[:bs])

    def _reset_inputs(self):
        self.inputs.buffer.zero_()
        self.inputs.slot_mapping.fill_(-1)

    @torch.inference_mode()
    def run_eagerly(self):
        """Run every batch size once, eagerly, as capture records it (compile_ahead discovers their kernels so)."""
        self._reset_inputs()
        try:
            for bs in reversed(self.batch_sizes):
                self._forward(bs)
        finally:
            reset_context()

    @torch.inference_mode()
    def capture(self, warmed_up: bool = False):
        """Capture every batch size, largest first so the smaller graphs reuse its memory pool. Capture must only
        record launches (no first-launch compiling or loading), so each size runs eagerly first, unless `warmed_up`:
        run_eagerly ran them all already, and only the largest runs once more, which warms the allocator.
        A failure raises, leaving the process able to capture again."""
        pool = None
        self._reset_inputs()
        # ~23 captures allocate many Python objects; a collection in between only costs time.
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            for bs in reversed(self.batch_sizes):
                if not warmed_up or pool is None:
                    self._forward(bs)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool):
                    self._forward(bs)
                pool = graph.pool()
                self.graphs[bs] = graph
                torch.cuda.synchronize()
        except Exception as e:
            self.graphs.clear()
            # After an error inside `torch.cuda.graph`, torch may leave the capture stream current and the CUDA RNG
            # believing it is still capturing (every later random op then raises). An empty capture resets the RNG.
            torch.cuda.set_stream(torch.cuda.default_stream())
            # If that fails too, nothing more can be done here: the caller needs to see the original error.
            with suppress(Exception), torch.cuda.graph(torch.cuda.CUDAGraph()):
                pass
            torch.cuda.synchronize()
            raise RuntimeError(f"CUDA graph capture failed ({type(e).__name__}: {e}); "
                               f"pass enforce_eager=True to run without CUDA graphs") from e
        finally:
            reset_context()
            if gc_was_enabled:
                gc.enable()

    def can_run(self, batch: int) -> bool:
        return bool(self.graphs) and batch <= self.batch_sizes[-1]

    def padded_size(self, batch: int) -> int:
        return next(bs for bs in self.batch_sizes if bs >= batch)

    def replay(self, batch: int) -> torch.Tensor:
        """Run the step for the `batch` rows the runner wrote into `inputs`: returns their rows of `outputs`."""
        self.graphs[self.padded_size(batch)].replay()
        return self.outputs[:batch]

    def clear(self):
        self.graphs.clear()

