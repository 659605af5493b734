import warnings

import numpy as np
import torch
import torch.distributed as dist

from nanovllm.config import Config
from nanovllm.engine.sequence import Sequence
from nanovllm.engine.workers import WorkerPool
from nanovllm.layers.attention import (Attention, kv_cache_torch_dtype, load_attention_backend,
                                       resolve_attention_backend, set_kv_scales)
from nanovllm.layers.sampler import Sampler, SamplingTensors, logprob_dicts, seed_key
from nanovllm.models.qwen3 import Qwen3ForCausalLM
from nanovllm.utils.context import get_context, reset_context, set_context
from nanovllm.utils.loader import dummy_weights, load_model, safetensors_weights
from nanovllm.utils.parallel import tp_rank, tp_size


class ModelRunner:
    """Turns a scheduled batch into tensors, runs the model over the paged KV cache and samples.

    It owns the model, the KV cache and the CUDA graphs; it knows nothing of queues or requests.
    With tensor parallelism every rank runs one, each holding its shard of the weights and its own KV heads;
    rank 0 drives the others through `call` (see engine/workers.py) and is the only one that samples.
    """

    def __init__(self, config: Config, workers: WorkerPool | None = None):
        self.config = config
        hf = config.hf_config
        self.rank = tp_rank()
        self.workers = workers      # on rank 0 of a tensor-parallel engine: the processes running ranks 1..N-1
        self.block_size = config.kvcache_block_size
        self.device = torch.device(config.device)     # on CUDA the current device, which is cuda:rank
        self.enforce_eager = config.enforce_eager or config.device != "cuda"
        self.attention_backend = resolve_attention_backend(config.attention_backend, config.device,
                                                           config.kv_cache_dtype)
        self.kv_dtype = kv_cache_torch_dtype(config.kv_cache_dtype, hf.dtype, self.attention_backend)
        backend = load_attention_backend(self.attention_backend)
        backend.check_block_size(self.block_size)
        if self.attention_backend == "torch":
            self.enforce_eager = True       # the portable path syncs with the host, so it is not captured

        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(hf.dtype)
        try:
            with torch.device(self.device):
                self.model = Qwen3ForCausalLM(hf)
            weights = (dummy_weights(hf, self.device) if config.load_format == "dummy"
                       else safetensors_weights(config.model))
            load_model(self.model, weights, config.model)
        finally:
            torch.set_default_dtype(default_dtype)
        self.attention_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        for layer in self.attention_layers:
            layer.backend = backend
        self.sampler = Sampler()
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        if workers is not None:
            workers.cuda_graphs = self.graphs   # a dead worker's abort must drop them (see WorkerPool._abort_nccl)
        if self.device.type == "cuda":
            try:
                self.warmup_model()
            except torch.cuda.OutOfMemoryError as e:
                raise RuntimeError(
                    f"CUDA ran out of memory in the warm-up forward over max_num_batched_tokens="
                    f"{config.max_num_batched_tokens} tokens; lower max_num_batched_tokens (or max_num_seqs), "
                    f"or free GPU memory / lower gpu_memory_utilization if another process shares the GPU") from e
        elif self.kv_dtype == torch.float8_e4m3fn:   # no memory warm-up on CPU: a short one measures K/V
            self.warmup_forward(min(config.max_num_batched_tokens, 1024))
        set_kv_scales(self.attention_layers)
        self.allocate_kv_cache()
        if self.device.type == "cuda":
            self.warmup_kernels()
        if not self.enforce_eager:
            self.capture_cudagraph()

    def exit(self):
        """Free this rank's CUDA graphs, then (on rank 0) stop the workers, which do the same. The graphs go first:
        NCCL will not destroy a communicator while a graph that captured its collectives exists (it waits forever).
        After a worker died a replay may still be stuck on it: CUDA frees such a graph once it finishes, but
        waiting for the GPU could take forever, so only a healthy engine synchronizes."""
        self.graphs.clear()
        if self.device.type == "cuda" and (self.workers is None or self.workers.failure is None):
            torch.cuda.synchronize()
        if self.workers is not None:
            self.workers.close()

    def call(self, name: str, *args):
        """Run method `name` on every rank and return rank 0's result (the ranks meet in the model's collectives)."""
        if self.workers is None:
            return getattr(self, name)(*args)
        with self.workers.guard():
            self.workers.send(name, args)
            return getattr(self, name)(*args)

    # ---- start-up -------------------------------------------------------------------------------------

    @torch.inference_mode()
    def warmup_model(self):
        """Run the largest prefill and sampling batch once, so the cache is sized after peak activation memory."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        cfg = self.config
        hidden = self.warmup_forward(cfg.max_num_batched_tokens)
        rows = hidden[:1].expand(cfg.max_num_seqs, -1)
        logits = self.model.compute_logits(rows)
        if self.rank == 0:      # the other ranks get no logits
            temperatures = torch.ones(cfg.max_num_seqs, device=self.device)
            self.sampler(logits, temperatures)
            # The filtering path (a sort, seeded noise, logprobs) needs more memory: count its peak too.
            rows = torch.arange(cfg.max_num_seqs, device=self.device)
            self.sampler(logits, temperatures, SamplingTensors(
                top_ks=torch.full_like(rows, 50), top_ps=torch.full_like(temperatures, 0.9),
                min_ps=torch.full_like(temperatures, 0.1), seed_rows=rows, seed_keys=torch.stack([rows, rows], 1),
                banned_rows=rows, banned_ids=torch.zeros_like(rows), num_logprobs=min(20, logits.size(-1))))
        del hidden, logits
        torch.cuda.synchronize()

    @torch.inference_mode()
    def warmup_forward(self, num_tokens: int) -> torch.Tensor:
        """A prefill of num_tokens varied token ids with no KV cache; Attention layers measure K/V for fp8 scales."""
        cfg = self.config
        seq_lens = [min(cfg.max_model_len, num_tokens - i) for i in range(0, num_tokens, cfg.max_model_len)]
        cu = torch.tensor(np.cumsum([0] + seq_lens), dtype=torch.int32, device=self.device)
        set_context(is_prefill=True, cu_seqlens_q=cu, max_seqlen_q=max(seq_lens))
        input_ids = torch.arange(num_tokens, device=self.device) % cfg.hf_config.vocab_size
        positions = torch.cat([torch.arange(n, device=self.device) for n in seq_lens])
        hidden = self.model(input_ids, positions)
        reset_context()
        return hidden

    @torch.inference_mode()
    def warmup_kernels(self):
        """One real prefill and eager decode through the attention backend and the compiled layers, so their
        JIT compilation happens at start-up instead of stalling the first requests (seconds on a GPU).

        The cache holds nothing yet, so any blocks will do; the sampled tokens are thrown away."""
        capacity = self.config.num_kvcache_blocks * self.block_size
        seq = Sequence(list(range(min(capacity - 1, 2 * self.block_size + 1))))
        # Blocks counted with the runner's block size: a worker process never set Sequence.block_size.
        seq.block_table = list(range(-(-len(seq) // self.block_size)))
        seq.num_scheduled_tokens = len(seq)
        self.run([seq], True)
        seq.num_computed_tokens = len(seq)
        seq.append_token(0)
        seq.block_table = list(range(-(-len(seq) // self.block_size)))
        seq.num_scheduled_tokens = 1
        self.run([seq], False)

    def allocate_kv_cache(self):
        cfg, hf = self.config, self.config.hf_config
        kv_heads = self.attention_layers[0].num_kv_heads
        block_bytes = 2 * hf.num_hidden_layers * self.block_size * kv_heads * hf.head_dim * self.kv_dtype.itemsize
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
        cfg.num_kvcache_blocks = num_blocks
        capacity = num_blocks * self.block_size
        if capacity < cfg.max_model_len:
            warnings.warn(f"the KV cache holds {capacity} tokens ({num_blocks} blocks of {self.block_size}), "
                          f"fewer than max_model_len={cfg.max_model_len}; lowering max_model_len to {capacity}")
            cfg.max_model_len = capacity
        self.kv_cache = torch.empty(2, hf.num_hidden_layers, num_blocks, self.block_size, kv_heads, hf.head_dim,
                                    dtype=self.kv_dtype, device=self.device)
        for i, layer in enumerate(self.attention_layers):
            layer.k_cache, layer.v_cache = self.kv_cache[0, i], self.kv_cache[1, i]

    def _min_over_ranks(self, n: int) -> int:
        """Ranks may have different free memory, but rank 0's scheduler hands out block ids for all of them."""
        if tp_size() == 1:
            return n
        t = torch.tensor([n], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())

    # ---- per step -------------------------------------------------------------------------------------

    def _to_device(self, data, dtype) -> torch.Tensor:
        """Host list or array -> device tensor; through pinned memory on CUDA so the copy is asynchronous."""
        tensor = torch.from_numpy(data).to(dtype) if isinstance(data, np.ndarray) else torch.tensor(data, dtype=dtype)
        if self.device.type == "cuda":
            tensor = tensor.pin_memory()
        return tensor.to(self.device, non_blocking=True)

    def _block_tables(self, seqs: list[Sequence]) -> torch.Tensor:
        width = max(len(seq.block_table) for seq in seqs)
        return self._to_device([seq.block_table + [-1] * (width - len(seq.block_table)) for seq in seqs],
                               torch.int32)

    def prepare_prefill(self, seqs: list[Sequence]):
        input_ids, positions, slot_mapping, cu_seqlens_q, context_lens = [], [], [], [0], []
        for seq in seqs:
            start = seq.num_computed_tokens
            end = start + seq.num_scheduled_tokens
            input_ids.extend(seq.scheduled_token_ids)
            pos = np.arange(start, end)
            positions.append(pos)
            slot_mapping.append(np.asarray(seq.block_table)[pos // self.block_size] * self.block_size
                                + pos % self.block_size)
            cu_seqlens_q.append(cu_seqlens_q[-1] + end - start)
            context_lens.append(end)
        set_context(is_prefill=True,
                    cu_seqlens_q=self._to_device(cu_seqlens_q, torch.int32),
                    max_seqlen_q=max(s.num_scheduled_tokens for s in seqs),
                    max_seqlen_k=max(context_lens),
                    slot_mapping=self._to_device(np.concatenate(slot_mapping), torch.int64),
                    context_lens=self._to_device(context_lens, torch.int32),
                    block_tables=self._block_tables(seqs),
                    has_cached_prefix=any(s.num_computed_tokens > 0 for s in seqs))
        return (self._to_device(input_ids, torch.int64),
                self._to_device(np.concatenate(positions), torch.int64))

    def prepare_decode(self, seqs: list[Sequence]):
        input_ids = [seq.last_token for seq in seqs]
        positions = [len(seq) - 1 for seq in seqs]
        slot_mapping = [seq.block_table[p // self.block_size] * self.block_size + p % self.block_size
                        for seq, p in zip(seqs, positions)]
        set_context(is_prefill=False,
                    slot_mapping=self._to_device(slot_mapping, torch.int64),
                    context_lens=self._to_device([len(seq) for seq in seqs], torch.int32),
                    block_tables=self._block_tables(seqs))
        return self._to_device(input_ids, torch.int64), self._to_device(positions, torch.int64)

    @torch.inference_mode()
    def run_model(self, input_ids: torch.Tensor, positions: torch.Tensor, is_prefill: bool) -> torch.Tensor:
        batch = input_ids.size(0)
        if is_prefill or not self.graphs or batch > self.graph_batch_sizes[-1]:
            return self.model.compute_logits(self.model(input_ids, positions))
        graph_bs = next(bs for bs in self.graph_batch_sizes if bs >= batch)
        ctx, g = get_context(), self.graph_vars
        g["input_ids"][:batch] = input_ids
        g["positions"][:batch] = positions
        g["slot_mapping"].fill_(-1)
        g["slot_mapping"][:batch] = ctx.slot_mapping
        g["context_lens"].zero_()
        g["context_lens"][:batch] = ctx.context_lens
        g["block_tables"][:batch, :ctx.block_tables.size(1)] = ctx.block_tables
        self.graphs[graph_bs].replay()
        return self.model.compute_logits(g["outputs"][:batch])

    def prepare_sample(self, seqs: list[Sequence]) -> tuple[torch.Tensor, SamplingTensors | None]:
        """Per-row sampling inputs: the temperatures, and SamplingTensors only when some row needs more."""
        temperatures = self._to_device([seq.temperature for seq in seqs], torch.float32)
        if all(seq.plain_sampling for seq in seqs):
            return temperatures, None
        params = [seq.sampling_params for seq in seqs]
        vocab = self.config.hf_config.vocab_size
        # Filters and seeds only matter where a row samples; greedy rows get the neutral values.
        top_ks = [p.top_k if p.top_k > 0 and p.temperature > 0 else vocab for p in params]
        top_ps = [p.top_p if p.temperature > 0 else 1.0 for p in params]
        min_ps = [p.min_p if p.temperature > 0 else 0.0 for p in params]
        seeded = [i for i, p in enumerate(params) if p.seed is not None and p.temperature > 0]
        banned = [(i, t) for i, seq in enumerate(seqs) if seq.num_completion_tokens < seq.min_tokens
                  for t in seq.stop_token_ids]
        extras = SamplingTensors(num_logprobs=max((p.logprobs for p in params if p.logprobs is not None), default=-1))
        if any(k < vocab for k in top_ks) or any(p < 1 for p in top_ps):
            extras.top_ks = self._to_device(top_ks, torch.int64)
            extras.top_ps = self._to_device(top_ps, torch.float32)
        if any(min_ps):
            extras.min_ps = self._to_device(min_ps, torch.float32)
        if seeded:
            extras.seed_rows = self._to_device(seeded, torch.int64)
            keys = [seed_key(params[i].seed, seqs[i].num_completion_tokens) for i in seeded]
            extras.seed_keys = self._to_device(keys, torch.int64)
        if banned:
            extras.banned_rows = self._to_device([i for i, _ in banned], torch.int64)
            extras.banned_ids = self._to_device([t for _, t in banned], torch.int64)
        return temperatures, extras

    def run(self, seqs: list[Sequence], is_prefill: bool) -> tuple[list[int], list[dict[int, float] | None] | None]:
        """Run one scheduled step. Returns one sampled token id per sequence, and per sequence its
        {token_id: logprob} dict (None where not asked for), or None when no sequence asked for logprobs.
        Only rank 0 samples (the lm head gathers the logits there): the other ranks return None."""
        input_ids, positions = self.prepare_prefill(seqs) if is_prefill else self.prepare_decode(seqs)
        temperatures, extras = self.prepare_sample(seqs) if self.rank == 0 else (None, None)
        try:
            logits = self.run_model(input_ids, positions, is_prefill)
            if logits is None:
                return None
            token_ids, logprobs = self.sampler(logits, temperatures, extras)
            token_ids = token_ids.tolist()
            if logprobs is None:
                return token_ids, None
            return token_ids, logprob_dicts(token_ids, logprobs, [seq.sampling_params.logprobs for seq in seqs])
        finally:
            reset_context()

    def prefill_logits(self, seqs: list[Sequence]) -> torch.Tensor | None:
        """The next-token logits of a scheduled prefill, unsampled (None on ranks other than 0): for checks that
        greedy token ids would hide, such as bfloat16 tensor parallel against one GPU."""
        input_ids, positions = self.prepare_prefill(seqs)
        try:
            return self.run_model(input_ids, positions, True)
        finally:
            reset_context()

    # ---- CUDA graphs ----------------------------------------------------------------------------------

    @torch.inference_mode()
    def capture_cudagraph(self):
        """Capture one decode graph per batch size on a ladder; a step replays the smallest that fits, padded."""
        cfg, hf = self.config, self.config.hf_config
        max_bs = min(cfg.max_num_seqs, 512)
        max_blocks = (cfg.max_model_len + self.block_size - 1) // self.block_size
        self.graph_batch_sizes = [bs for bs in (1, 2, 4, 8) if bs < max_bs] + list(range(16, max_bs, 16)) + [max_bs]
        g = self.graph_vars = dict(
            input_ids=torch.zeros(max_bs, dtype=torch.int64, device=self.device),
            positions=torch.zeros(max_bs, dtype=torch.int64, device=self.device),
            slot_mapping=torch.full((max_bs,), -1, dtype=torch.int64, device=self.device),
            context_lens=torch.zeros(max_bs, dtype=torch.int32, device=self.device),
            block_tables=torch.zeros(max_bs, max_blocks, dtype=torch.int32, device=self.device),
            outputs=torch.zeros(max_bs, hf.hidden_size, device=self.device, dtype=hf.dtype),
        )
        pool = None
        for bs in reversed(self.graph_batch_sizes):
            graph = torch.cuda.CUDAGraph()
            set_context(is_prefill=False, slot_mapping=g["slot_mapping"][:bs], context_lens=g["context_lens"][:bs],
                        block_tables=g["block_tables"][:bs])
            g["outputs"][:bs] = self.model(g["input_ids"][:bs], g["positions"][:bs])    # warm-up, compiles
            with torch.cuda.graph(graph, pool):
                g["outputs"][:bs] = self.model(g["input_ids"][:bs], g["positions"][:bs])
            pool = graph.pool()
            self.graphs[bs] = graph
            torch.cuda.synchronize()
            reset_context()
