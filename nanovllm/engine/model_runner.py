import gc
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from nanovllm.config import Config
from nanovllm.engine.compile_ahead import compile_ahead, hash_triton_install_in_background
from nanovllm.engine.cuda_graph import CUDAGraphs
from nanovllm.engine.decode_inputs import DecodeInputs
from nanovllm.engine.sequence import Sequence
from nanovllm.engine.step_batch import StepBatch
from nanovllm.kernels.paged_attention_torch import FP8
from nanovllm.layers.attention import Attention, set_kv_scales
from nanovllm.layers.attention_backends import select_attention_backend
from nanovllm.layers.sampler import Sampler, SamplingTensors, logprob_dicts, prepare_sampling
from nanovllm.models import MODELS
from nanovllm.utils.context import Context, reset_context, set_context
from nanovllm.utils.gguf_loader import gguf_weights
from nanovllm.utils.loader import dummy_weights, load_model, safetensors_weights
from nanovllm.utils.parallel import tp_size
from nanovllm.utils.tensors import to_device


@dataclass(frozen=True, slots=True)
class StepPlan:
    """How one step runs, decided once (`ModelRunner.plan`): eagerly (graph_size 0), or by replaying the decode
    graph of `graph_size` rows (padded); with `graph_samples` that graph's own draw is the step's answer."""
    graph_size: int = 0
    graph_samples: bool = False


EAGER = StepPlan()
CALIBRATION_TOKENS = 1024      # what the fp8 scales are measured on (a varied-id prefill, no cache)
# A prefill whose rows (one a token) attend to at most this many keys in all runs as a decode graph: the host's ~10
# launches a layer of an eager prefill cost far more than its GPU work until the rows' attention reads take over.
# A sequence's last row reads what a decode of it would, so only the rows before it count (a decode counts none).
PREFILL_ROWS_MAX_KEYS = 2**18


class ModelRunner:
    """Turns a StepBatch into tensors, runs the model over the paged KV cache and samples.

    It owns the model, the KV cache and the CUDA graphs; it knows nothing of queues, requests or processes.
    With tensor parallelism every rank runs one, each holding its shard of the weights and its own KV heads;
    only rank 0 samples. After start-up, `num_kvcache_blocks` and `max_model_len` say what the cache holds."""

    def __init__(self, config: Config, eos_token_ids: frozenset[int] = frozenset()):
        self.config = config
        self.eos_token_ids = eos_token_ids      # masked while a request is under min_tokens
        self.block_size = config.kvcache_block_size
        self.device = torch.device(config.device)     # on CUDA the current device, which is cuda:rank
        self.attention_backend = select_attention_backend(config.attention_backend, config.device, self.block_size,
                                                          config.kv_cache_dtype)
        self.kv_dtype = FP8 if config.kv_cache_dtype == "fp8" else config.model_config.dtype
        self.sampler = Sampler()
        # The last step's sampled ids, left on the device: with overlap scheduling the next decode step reads its
        # input ids from here before the host has seen them (other ranks get them by broadcast).
        self.last_sampled: torch.Tensor | None = None
        self.broadcast_sampled_ids = config.overlap_scheduling and tp_size() > 1
        self.graphs: CUDAGraphs | None = None
        if self.device.type == "cuda":
            # An engine dropped just before (`del llm`, or one waiting for the cycle collector) leaves its KV cache in
            # PyTorch's allocator cache. Give it back to the driver before this engine allocates anything: a tensor
            # of ours placed inside that cached memory would keep all of it from ever being returned, and this
            # engine would size its cache as if the dropped one still held it.
            gc.collect()
            torch.cuda.empty_cache()
        hash_triton_install_in_background(self.device)
        self.model = self._load_model()
        self.attention_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        self._calibrate()
        self.num_kvcache_blocks = self._allocate_kv_cache()
        self.max_model_len = min(config.max_model_len, self.num_kvcache_blocks * self.block_size)
        if self.max_model_len < config.max_model_len:
            warnings.warn(f"the KV cache holds {self.max_model_len} tokens ({self.num_kvcache_blocks} blocks of "
                          f"{self.block_size}), fewer than max_model_len={config.max_model_len}; "
                          f"lowering max_model_len to {self.max_model_len}")
        if self.device.type == "cuda":
            if not config.enforce_eager and self.attention_backend.supports_cuda_graphs:
                self.graphs = self._cuda_graphs()
            # Compile what the warm-up and every graph size launch, in parallel; the eager run of every size this
            # takes (through two layers, which launch every layer's kernels) also stands for capture's warm-up runs.
            with first_two_layers_only(self.model):
                discovered = compile_ahead(self.device, self.warmup_kernels,
                                           *([self.graphs.run_eagerly] if self.graphs is not None else []))
            self.warmup_kernels()
            if self.graphs is not None:     # (every rank captures alike: their forwards meet in collectives)
                self.graphs.capture(warmed_up=bool(self._min_over_ranks(int(discovered))))

    def exit(self, synchronize: bool = True):
        """Free the CUDA graphs (NCCL will not destroy a communicator while a graph that captured its
        collectives exists), then wait for the GPU unless told not to (a replay stuck on a dead peer)."""
        if self.graphs is not None:
            self.graphs.clear()
        if synchronize and self.device.type == "cuda":
            torch.cuda.synchronize()

    # ---- start-up, in order: load, calibrate, size the cache, warm up, capture ------------------------------

    def _load_model(self) -> torch.nn.Module:
        config, model_config = self.config, self.config.model_config
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(model_config.dtype)
        try:
            with torch.device(self.device):
                model = MODELS[model_config.architecture](model_config)
            if config.load_format == "dummy":
                weights = dummy_weights(model_config, self.device)
            elif model_config.gguf_file is not None:
                weights = gguf_weights(model_config.gguf_file, model_config.dtype)
            else:
                weights = safetensors_weights(config.model)
            load_model(model, weights, config.model)
        finally:
            torch.set_default_dtype(default_dtype)
        return model

    def _calibrate(self):
        """On CUDA, measure peak activation memory (`warmup_model`). With an fp8 cache, the scales come from K and V
        of one forward of CALIBRATION_TOKENS tokens, so that a model gets the same scales under any batch budget."""
        if self.device.type == "cuda":
            try:
                # The discovery pass allocates all that the real one would: its peak memory sizes the cache as well
                # (the fp8 calibration's kernels are discovered first, as warmup_model resets the peak).
                calibration = [lambda: self.warmup_forward(CALIBRATION_TOKENS)] if self.kv_dtype == FP8 else []
                if not self._min_over_ranks(int(compile_ahead(self.device, *calibration, self.warmup_model))):
                    self.warmup_model()     # (on every rank or none, as its forward meets theirs in collectives)
            except torch.cuda.OutOfMemoryError as e:
                raise RuntimeError(
                    f"CUDA ran out of memory in the warm-up forward over max_num_batched_tokens="
                    f"{self.config.max_num_batched_tokens} tokens; lower max_num_batched_tokens (or max_num_seqs), "
                    f"or free GPU memory / lower gpu_memory_utilization if another process shares the GPU") from e
        if self.kv_dtype == FP8:
            for layer in self.attention_layers:     # (the memory warm-up's amax is an inference tensor)
                layer.kv_amax = torch.zeros_like(layer.kv_amax)
            self.warmup_forward(CALIBRATION_TOKENS)
        set_kv_scales(self.attention_layers)

    def _cuda_graphs(self) -> CUDAGraphs:
        config, model_config = self.config, self.config.model_config
        inputs = DecodeInputs.empty(min(config.max_num_seqs, 512), -(-self.max_model_len // self.block_size),
                                    self.device)
        # Two pinned host copies of the graphs' inputs, used in turn: the one filled now was last copied two
        # steps ago (an event says when that copy is done), so filling never races a queued copy.
        self._staging = [(DecodeInputs.empty(inputs.rows, inputs.width, torch.device("cpu"), True),
                          torch.cuda.Event()) for _ in range(2)]
        # One GPU: the graphs sample too, into a buffer that any step's rows index (a prefill has up to
        # max_num_seqs), and from which the next replay takes its pending input ids.
        sampled = torch.zeros(config.max_num_seqs, dtype=torch.int64, device=self.device) if tp_size() == 1 else None
        return CUDAGraphs(self.model, inputs, self.attention_backend, model_config.hidden_size, model_config.dtype,
                          sampled, model_config.vocab_size)

    @torch.inference_mode()
    def warmup_model(self):
        """Run the largest prefill and sampling batch once, so the cache is sized after peak activation memory."""
        torch.cuda.empty_cache()    # (what loading the weights left cached is not ours to count)
        torch.cuda.reset_peak_memory_stats()
        cfg = self.config
        hidden = self.warmup_forward(cfg.max_num_batched_tokens)
        rows = hidden[:1].expand(cfg.max_num_seqs, -1)
        logits = self.model.compute_logits(rows)
        if logits is not None:      # rank 0: the other ranks get no logits
            temperatures = torch.ones(cfg.max_num_seqs, device=self.device)
            self.sampler(logits, temperatures)
            # The filtering path (a sort, seeded noise, penalties, logprobs) needs more memory: count its peak too.
            rows = torch.arange(cfg.max_num_seqs, device=self.device)
            self.sampler(logits, temperatures, SamplingTensors(
                top_ks=torch.full_like(rows, 50), top_ps=torch.full_like(temperatures, 0.9),
                min_ps=torch.full_like(temperatures, 0.1), seed_rows=rows, seed_keys=torch.stack([rows, rows], 1),
                banned_rows=rows, banned_ids=torch.zeros_like(rows), penalty_rows=rows,
                penalties=torch.ones(len(rows), 3, device=self.device),
                token_counts=torch.zeros(2, *logits.shape, device=self.device), num_logprobs=min(20, logits.size(-1))))
        del hidden, logits
        torch.cuda.synchronize()

    @torch.inference_mode()
    def warmup_forward(self, num_tokens: int) -> torch.Tensor:
        """A prefill of num_tokens varied token ids with no KV cache; Attention layers measure K/V for fp8 scales."""
        cfg = self.config
        seq_lens = [min(cfg.max_model_len, num_tokens - i) for i in range(0, num_tokens, cfg.max_model_len)]
        cu = torch.tensor(np.cumsum([0] + seq_lens), dtype=torch.int32, device=self.device)
        set_context(Context(is_prefill=True, cu_seqlens_q=cu, max_seqlen_q=max(seq_lens)))
        input_ids = torch.arange(num_tokens, device=self.device) % cfg.model_config.vocab_size
        positions = torch.cat([torch.arange(n, device=self.device) for n in seq_lens])
        hidden = self.model(input_ids, positions)
        reset_context()
        return hidden

    @torch.inference_mode()
    def warmup_kernels(self):
        """One real prefill and eager decode through the attention backend and the Triton layers, so that their JIT
        compilation happens at start-up, not in the first requests (seconds on a GPU); any cache blocks will do."""
        vocab = self.config.model_config.vocab_size
        seq = Sequence([i % vocab for i in range(min(self.max_model_len - 1, 2 * self.block_size + 1))])
        for is_prefill in (True, False):
            seq.block_table = list(range(-(-len(seq) // self.block_size)))
            seq.num_scheduled_tokens = seq.num_uncomputed_tokens
            self.run(StepBatch.build([seq], is_prefill, self.block_size))
            seq.num_computed_tokens = len(seq)
            seq.append_token(0)     # booked: the decode reads it from the host

    def _allocate_kv_cache(self) -> int:
        """Allocate the cache from what memory is left (or the configured block count); returns the block count."""
        cfg, model_config = self.config, self.config.model_config
        kv_heads, layers = self.attention_layers[0].num_kv_heads, model_config.num_hidden_layers
        block_bytes = 2 * layers * self.block_size * kv_heads * model_config.head_dim * self.kv_dtype.itemsize
        if cfg.num_kvcache_blocks > 0:
            num_blocks = cfg.num_kvcache_blocks
        elif self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info()
            stats = torch.cuda.memory_stats()
            # Leave room for the warm-up's peak activations on top of what is allocated now.
            peak_extra = stats["allocated_bytes.all.peak"] - stats["allocated_bytes.all.current"]
            budget = total * cfg.gpu_memory_utilization - (total - free) - peak_extra
            num_blocks = self._min_over_ranks(int(budget // block_bytes))
            if num_blocks < 1:
                raise ValueError(
                    f"no GPU memory is left for the KV cache: one block needs {block_bytes / 2**20:.1f} MiB but "
                    f"{budget / 2**20:.0f} MiB remain under gpu_memory_utilization={cfg.gpu_memory_utilization}; "
                    f"raise gpu_memory_utilization or lower max_num_batched_tokens")
        else:
            num_blocks = int(cfg.cpu_kvcache_space_gib * 2**30 // block_bytes)
            if num_blocks < 1:
                raise ValueError(
                    f"cpu_kvcache_space_gib={cfg.cpu_kvcache_space_gib} holds no KV block "
                    f"({block_bytes / 2**20:.1f} MiB each); raise cpu_kvcache_space_gib or lower kvcache_block_size")
        self.kv_cache = torch.empty(2, layers, num_blocks, self.block_size, kv_heads, model_config.head_dim,
                                    dtype=self.kv_dtype, device=self.device)
        for i, layer in enumerate(self.attention_layers):
            layer.set_cache(self.kv_cache[0, i], self.kv_cache[1, i])
        return num_blocks

    def _min_over_ranks(self, n: int) -> int:
        """Ranks may have different free memory, but rank 0's scheduler hands out block ids for all of them."""
        if tp_size() == 1:
            return n
        t = torch.tensor([n], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())

    # ---- per step -------------------------------------------------------------------------------------

    def plan(self, batch: StepBatch) -> StepPlan:
        """Eager without graphs or past the largest graph; else the graph that fits (see StepPlan). A prefill
        replays a decode graph as one row a token (StepBatch.as_token_rows) up to PREFILL_ROWS_MAX_KEYS."""
        rows = len(batch.input_ids)     # a decode's are its sequences
        if (self.graphs is None or not self.graphs.can_run(rows) or batch.is_prefill
                and int((batch.positions + 1).sum() - batch.context_lens.sum()) > PREFILL_ROWS_MAX_KEYS):
            return EAGER
        samples = (self.graphs.sampled is not None and batch.sampling is not None
                   and not any(p.needs_sampler_extras for p in batch.sampling.params))
        return StepPlan(self.graphs.padded_size(rows), samples)

    def _to_device(self, data, dtype) -> torch.Tensor:
        return to_device(data, dtype, self.device)

    def prepare_prefill(self, batch: StepBatch) -> tuple[torch.Tensor, torch.Tensor]:
        query_lens = np.diff(batch.cu_seqlens_q)
        # Lengths and tables in int64, as the decode graphs take them: Triton compiles a kernel per pointer type,
        # and the decode kernel a mixed step launches for its decodes must be one that start-up compiled.
        set_context(Context(is_prefill=True, cu_seqlens_q=self._to_device(batch.cu_seqlens_q, torch.int32),
                            max_seqlen_q=int(query_lens.max()), max_seqlen_k=int(batch.context_lens.max()),
                            slot_mapping=self._to_device(batch.slot_mapping, torch.int64),
                            context_lens=self._to_device(batch.context_lens, torch.int64),
                            block_tables=self._to_device(batch.block_tables, torch.int64),
                            has_cached_prefix=bool((batch.context_lens > query_lens).any()),
                            num_decode_seqs=int(np.cumprod(query_lens == 1).sum()),     # the leading one-token ones
                            backend=self.attention_backend))
        input_ids = self._to_device(batch.input_ids, torch.int64)
        if (batch.sample_rows >= 0).any():
            input_ids = self._with_pending_ids(input_ids, self._to_device(batch.sample_rows, torch.int64))
        return input_ids, self._to_device(batch.positions, torch.int64)

    def _with_pending_ids(self, input_ids: torch.Tensor, sample_rows: torch.Tensor) -> torch.Tensor:
        """input_ids with each token the host has not seen (sample_rows r >= 0) taken from the last step's samples."""
        return torch.where(sample_rows >= 0, self.last_sampled[sample_rows.clamp(min=0)], input_ids)

    def prepare_decode(self, batch: StepBatch, plan: StepPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """One host array, one copy: straight into the CUDA graphs' static inputs when a graph runs the step."""
        n = batch.num_seqs
        if plan.graph_size:
            inputs = self.graphs.inputs
            self._staging.reverse()
            host, copied = self._staging[0]
            copied.synchronize()
        else:
            inputs = DecodeInputs.empty(n, batch.block_tables.shape[1], self.device)
            host = DecodeInputs.empty(n, inputs.width, torch.device("cpu"), self.device.type == "cuda")
        _fill_decode_inputs(host, batch, plan.graph_size or n)
        inputs.buffer.copy_(host.buffer, non_blocking=True)
        if plan.graph_size:
            copied.record()
        if (batch.sample_rows >= 0).any():
            # Rows whose last token the host has not seen take it from the previous step's samples on the GPU:
            # the graphs that sample read them from their own buffer (copied there if another path sampled them);
            # any other step gathers them into input_ids, where the full sampler's penalties count them too.
            if plan.graph_size and self.graphs.sampled is not None:
                if self.last_sampled.data_ptr() != self.graphs.sampled.data_ptr():
                    self.graphs.sampled[:len(self.last_sampled)].copy_(self.last_sampled)
            if not plan.graph_samples:
                rows = inputs.sample_rows[:n]
                inputs.input_ids[:n] = (self.last_sampled[rows] if (batch.sample_rows >= 0).all()
                                        else self._with_pending_ids(inputs.input_ids[:n], rows))
        if not plan.graph_size:     # a graph replays the metadata it captured
            set_context(Context(is_prefill=False, slot_mapping=inputs.slot_mapping[:n],
                                context_lens=inputs.context_lens[:n], block_tables=inputs.block_tables[:n],
                                backend=self.attention_backend))
        return inputs.input_ids[:n], inputs.positions[:n]

    @torch.inference_mode()
    def run_model(self, input_ids: torch.Tensor, positions: torch.Tensor, plan: StepPlan) -> torch.Tensor:
        """A prepared step's logits, None on ranks other than 0 (a sampling graph also draws into graphs.sampled)."""
        if not plan.graph_size:
            return self.model.compute_logits(self.model(input_ids, positions))
        out = self.graphs.replay(input_ids.size(0))     # inputs from prepare_decode
        return out if self.graphs.sampled is not None else self.model.compute_logits(out)

    def run(self, batch: StepBatch) -> "SampledTokens | None":
        """Launch one step without waiting for the GPU (see SampledTokens). Only rank 0 samples (the lm head gathers
        the logits there, and only its batch carries `sampling`): the other ranks return None."""
        plan = self.plan(batch)
        rows = batch.as_token_rows() if batch.is_prefill and plan.graph_size else batch
        input_ids, positions = self.prepare_prefill(batch) if rows.is_prefill else self.prepare_decode(rows, plan)
        # Each sequence's last token: its row of a prefill run as token rows is sampled, and penalties count it.
        last_rows = self._to_device(batch.cu_seqlens_q[1:] - 1, torch.int64) if batch.is_prefill else slice(None)
        sampled_rows = slice(None) if rows is batch else last_rows
        try:
            logits = self.run_model(input_ids, positions, plan)
            token_ids = logprobs = None
            if plan.graph_samples:
                token_ids = self.graphs.sampled[:rows.num_seqs][sampled_rows]
            elif logits is not None:
                logits = logits[sampled_rows]
                sampling = batch.sampling
                temperatures, extras = prepare_sampling(sampling.params, sampling.output_lens, self.eos_token_ids,
                                                        self.config.model_config.vocab_size, self.device,
                                                        sampling.seqs, input_ids[last_rows])
                token_ids, logprobs = self.sampler(logits, temperatures, extras)
            if self.broadcast_sampled_ids:      # every rank embeds these ids in the next step
                if token_ids is None:
                    token_ids = torch.empty(batch.num_seqs, dtype=torch.int64, device=self.device)
                dist.broadcast(token_ids, src=0)
            self.last_sampled = token_ids
            if logits is None:
                return None
            return SampledTokens(token_ids, logprobs, [p.logprobs for p in batch.sampling.params])
        finally:
            reset_context()

    def prefill_logits(self, batch: StepBatch) -> torch.Tensor | None:
        """The next-token logits of a prefill batch, unsampled (None on ranks other than 0): for checks that greedy
        token ids would hide, such as bfloat16 tensor parallel against one GPU."""
        input_ids, positions = self.prepare_prefill(batch)
        try:
            return self.run_model(input_ids, positions, EAGER)
        finally:
            reset_context()


@contextmanager
def first_two_layers_only(model: torch.nn.Module):
    """The model with its first two decoder layers only, for a discovery pass: the first gets no residual, and the
    second launches the kernels of every later one, shapes and all; the other layers' Python is start-up saved."""
    layers = model.model.layers
    model.model.layers = layers[:2]
    try:
        yield
    finally:
        model.model.layers = layers


def _fill_decode_inputs(host: DecodeInputs, batch: StepBatch, padded: int):
    n, rows, width = batch.num_seqs, host.rows, batch.block_tables.shape[1]
    buffer = host.buffer.numpy()    # one numpy view: a decode step's host time is on the critical path at batch 1
    fields = buffer[:DecodeInputs.NUM_FIELDS * rows].reshape(DecodeInputs.NUM_FIELDS, rows)
    for i, values in enumerate((batch.input_ids, batch.sample_rows, batch.positions, batch.slot_mapping,
                                batch.context_lens)):
        fields[i, :n] = values
    # Rows n..padded are graph padding: token 0 at position 0, writing to slot -1, attending to nothing.
    fields[:, n:padded] = 0
    fields[1, n:padded] = fields[3, n:padded] = -1
    fields[5].view(np.float64)[:n] = ([p.temperature for p in batch.sampling.params] if batch.sampling is not None
                                      else 0.0)
    buffer[DecodeInputs.NUM_FIELDS * rows:].reshape(rows, host.width)[:n, :width] = batch.block_tables


class SampledTokens:
    """One step's sampled ids (and logprobs), on their way to the host: the copy is queued behind the step, so
    launching costs no wait; `result()` waits for it and returns (token ids, logprob dicts or None)."""

    def __init__(self, token_ids: torch.Tensor, logprobs: tuple[torch.Tensor, ...] | None, nums: list[int | None]):
        # A non-blocking copy to the CPU lands in pinned memory, so it is truly asynchronous.
        self._host = [t.to("cpu", non_blocking=True) for t in (token_ids, *(logprobs or ()))]
        self._nums = nums if logprobs is not None else None
        self._done = torch.cuda.Event() if token_ids.is_cuda else None
        if self._done is not None:
            self._done.record()

    def result(self) -> tuple[list[int], list[dict[int, float] | None] | None]:
        if self._done is not None:
            self._done.synchronize()
        token_ids = self._host[0].tolist()
        return token_ids, None if self._nums is None else logprob_dicts(token_ids, tuple(self._host[1:]), self._nums)
