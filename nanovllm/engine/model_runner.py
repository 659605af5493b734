import gc
import warnings

import numpy as np
import torch
import torch.distributed as dist

from nanovllm.config import Config
from nanovllm.engine.cuda_graph import CUDAGraphs
from nanovllm.engine.decode_inputs import DecodeInputs
from nanovllm.engine.sequence import Sequence
from nanovllm.layers.attention import (Attention, kv_cache_torch_dtype, load_attention_backend,
                                       resolve_attention_backend, set_kv_scales)
from nanovllm.layers.sampler import Sampler, SamplingTensors, logprob_dicts, prepare_sampling
from nanovllm.models.qwen3 import Qwen3ForCausalLM
from nanovllm.utils.context import reset_context, set_context
from nanovllm.utils.loader import dummy_weights, load_model, safetensors_weights
from nanovllm.utils.parallel import tp_rank, tp_size
from nanovllm.utils.tensors import to_device


class ModelRunner:
    """Turns a scheduled batch into tensors, runs the model over the paged KV cache and samples.

    It owns the model, the KV cache and the CUDA graphs; it knows nothing of queues, requests or processes.
    With tensor parallelism every rank runs one, each holding its shard of the weights and its own KV heads;
    only rank 0 samples. After start-up, `num_kvcache_blocks` and `max_model_len` say what the cache holds.
    """

    def __init__(self, config: Config, eos_token_ids: frozenset[int] = frozenset()):
        self.config = config
        hf = config.hf_config
        self.rank = tp_rank()
        self.eos_token_ids = eos_token_ids      # masked while a request is under min_tokens
        self.block_size = config.kvcache_block_size
        self.device = torch.device(config.device)     # on CUDA the current device, which is cuda:rank
        self.attention_backend = resolve_attention_backend(config.attention_backend, config.device,
                                                           config.kv_cache_dtype)
        self.kv_dtype = kv_cache_torch_dtype(config.kv_cache_dtype, hf.dtype, self.attention_backend)
        backend = load_attention_backend(self.attention_backend)
        backend.check_block_size(self.block_size)

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
        # The last step's sampled ids, left on the device: with overlap scheduling the next decode step reads its
        # input ids from here before the host has seen them (other ranks get them by broadcast).
        self.last_sampled: torch.Tensor | None = None
        self.last_rows: dict[int, int] = {}     # seq_id -> its row in last_sampled
        self.share_sampled = config.overlap_scheduling and tp_size() > 1
        self.graphs: CUDAGraphs | None = None
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
        self.num_kvcache_blocks = self.allocate_kv_cache()
        self.max_model_len = min(config.max_model_len, self.num_kvcache_blocks * self.block_size)
        if self.max_model_len < config.max_model_len:
            warnings.warn(f"the KV cache holds {self.max_model_len} tokens ({self.num_kvcache_blocks} blocks of "
                          f"{self.block_size}), fewer than max_model_len={config.max_model_len}; "
                          f"lowering max_model_len to {self.max_model_len}")
        if self.device.type == "cuda":
            self.warmup_kernels()
        # The portable torch backend syncs with the host, so it is never captured.
        if config.device == "cuda" and not config.enforce_eager and self.attention_backend != "torch":
            inputs = DecodeInputs.empty(min(config.max_num_seqs, 512), -(-self.max_model_len // self.block_size),
                                        self.device)
            # One GPU: the graphs sample too, into a buffer that any step's rows index (a prefill has up to
            # max_num_seqs), and from which the next replay takes its pending input ids.
            sampled = (torch.zeros(config.max_num_seqs, dtype=torch.int64, device=self.device) if tp_size() == 1
                       else None)
            self.graphs = CUDAGraphs(self.model, inputs, hf.hidden_size, hf.dtype, sampled, hf.vocab_size)
            self.graphs.capture()
            # Two pinned host copies of the graphs' inputs, used in turn: the one filled now was last copied two
            # steps ago (an event says when that copy is done), so filling never races a queued copy.
            self._staging = [(DecodeInputs.empty(inputs.rows, inputs.width, torch.device("cpu"), True),
                              torch.cuda.Event()) for _ in range(2)]

    def exit(self, synchronize: bool = True):
        """Free the CUDA graphs (NCCL will not destroy a communicator while a graph that captured its
        collectives exists), then wait for the GPU unless told not to (a replay stuck on a dead peer)."""
        if self.graphs is not None:
            self.graphs.clear()
        if synchronize and self.device.type == "cuda":
            torch.cuda.synchronize()

    # ---- start-up -------------------------------------------------------------------------------------

    @torch.inference_mode()
    def warmup_model(self):
        """Run the largest prefill and sampling batch once, so the cache is sized after peak activation memory."""
        # An engine dropped just before (`del llm`) may still be waiting for the cycle collector: free its KV cache
        # before measuring what is left, or this engine would size its own from the memory that one still holds.
        gc.collect()
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
        """One real prefill and eager decode through the attention backend and the Triton layers, so their
        JIT compilation happens at start-up instead of stalling the first requests (seconds on a GPU).

        The cache holds nothing yet, so any blocks will do; the sampled tokens are thrown away."""
        vocab = self.config.hf_config.vocab_size
        seq = Sequence([i % vocab for i in range(min(self.max_model_len - 1, 2 * self.block_size + 1))])
        seq.block_table = list(range(-(-len(seq) // self.block_size)))
        seq.num_scheduled_tokens = len(seq)
        self.run([seq], True)
        seq.num_computed_tokens = len(seq)
        seq.append_token(0)     # booked: the decode below reads it from the host
        seq.block_table = list(range(-(-len(seq) // self.block_size)))
        seq.num_scheduled_tokens = 1
        self.run([seq], False)

    def allocate_kv_cache(self) -> int:
        """Allocate the cache from what memory is left (or the configured block count); returns the block count."""
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
        self.kv_cache = torch.empty(2, hf.num_hidden_layers, num_blocks, self.block_size, kv_heads, hf.head_dim,
                                    dtype=self.kv_dtype, device=self.device)
        for i, layer in enumerate(self.attention_layers):
            layer.k_cache, layer.v_cache = self.kv_cache[0, i], self.kv_cache[1, i]
        return num_blocks

    def _min_over_ranks(self, n: int) -> int:
        """Ranks may have different free memory, but rank 0's scheduler hands out block ids for all of them."""
        if tp_size() == 1:
            return n
        t = torch.tensor([n], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())

    # ---- per step -------------------------------------------------------------------------------------

    def _to_device(self, data, dtype) -> torch.Tensor:
        return to_device(data, dtype, self.device)

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
        """One host array, one copy: straight into the CUDA graphs' static inputs when a graph will run the step."""
        n = len(seqs)
        graphs = self.graphs if self.graphs is not None and self.graphs.can_run(n) else None
        pending = [seq.input_is_pending for seq in seqs]
        if graphs is not None:
            inputs = graphs.inputs
            self._staging.reverse()
            host, copied = self._staging[0]
            copied.synchronize()
        else:
            inputs = DecodeInputs.empty(n, max(len(seq.block_table) for seq in seqs), self.device)
            host = DecodeInputs.empty(n, inputs.width, torch.device("cpu"), self.device.type == "cuda")
        self._fill_decode_inputs(host, seqs, pending, graphs.padded_size(n) if graphs else n)
        inputs.buffer.copy_(host.buffer, non_blocking=True)
        if graphs is not None:
            copied.record()
        if any(pending):
            # Rows whose last token the host has not seen take it from the previous step's samples on the GPU:
            # the graphs that sample read them from their own buffer (copied there if another path sampled them).
            if graphs is not None and graphs.sampled is not None:
                if self.last_sampled.data_ptr() != graphs.sampled.data_ptr():
                    graphs.sampled[:len(self.last_sampled)].copy_(self.last_sampled)
            else:
                rows = inputs.sample_rows[:n]
                inputs.input_ids[:n] = (self.last_sampled[rows] if all(pending) else torch.where(
                    rows >= 0, self.last_sampled[rows.clamp(min=0)], inputs.input_ids[:n]))
        set_context(is_prefill=False, slot_mapping=inputs.slot_mapping[:n], context_lens=inputs.context_lens[:n],
                    block_tables=inputs.block_tables[:n])
        return inputs.input_ids[:n], inputs.positions[:n]

    def _fill_decode_inputs(self, host: DecodeInputs, seqs: list[Sequence], pending: list[bool], padded: int):
        """Rows n..padded are graph padding: token 0 at position 0, writing to slot -1, attending to nothing."""
        n, bs = len(seqs), self.block_size
        ids, sample_rows, positions, slots, context_lens = (t.numpy() for t in (
            host.input_ids, host.sample_rows, host.positions, host.slot_mapping, host.context_lens))
        lens = np.fromiter(map(len, seqs), np.int64, n)
        context_lens[:n], positions[:n] = lens, lens - 1
        sample_rows[:n] = [self.last_rows[seq.seq_id] if p else -1 for seq, p in zip(seqs, pending)]
        ids[:n] = [0 if p else seq.last_token for seq, p in zip(seqs, pending)]
        # Read only where a graph samples (rank 0): the other ranks' sequences come without sampling parameters.
        host.temperatures.numpy()[:n] = [seq.sampling_params.temperature for seq in seqs] if self.rank == 0 else 0.0
        width = max(len(seq.block_table) for seq in seqs)
        tables = host.block_tables.numpy()
        tables[:n, :width] = [seq.block_table + [-1] * (width - len(seq.block_table)) for seq in seqs]
        slots[:n] = tables[np.arange(n), positions[:n] // bs] * bs + positions[:n] % bs
        ids[n:padded], sample_rows[n:padded], positions[n:padded] = 0, -1, 0
        slots[n:padded], context_lens[n:padded], host.temperatures.numpy()[n:padded] = -1, 0, 0.0

    @torch.inference_mode()
    def run_model(self, input_ids: torch.Tensor, positions: torch.Tensor, is_prefill: bool) -> torch.Tensor:
        """The logits of a prepared step (None on ranks other than 0); a graph that samples leaves its ids in
        graphs.sampled."""
        if is_prefill or self.graphs is None or not self.graphs.can_run(input_ids.size(0)):
            return self.model.compute_logits(self.model(input_ids, positions))
        out = self.graphs.replay(input_ids.size(0))     # inputs from prepare_decode
        return out if self.graphs.sampled is not None else self.model.compute_logits(out)

    def run(self, seqs: list[Sequence], is_prefill: bool) -> "SampledTokens | None":
        """Launch one scheduled step: the forward and the sampling are queued on the GPU and the sampled ids are
        copied back without waiting; `result()` of what is returned waits for them. Only rank 0 samples (the lm
        head gathers the logits there): the other ranks return None."""
        input_ids, positions = self.prepare_prefill(seqs) if is_prefill else self.prepare_decode(seqs)
        params = [seq.sampling_params for seq in seqs] if self.rank == 0 else None
        graph_sampled = (not is_prefill and self.graphs is not None and self.graphs.sampled is not None
                         and self.graphs.can_run(len(seqs)))
        try:
            logits = self.run_model(input_ids, positions, is_prefill)
            token_ids = logprobs = None
            if graph_sampled and not any(p.needs_sampler_extras for p in params):
                token_ids = self.graphs.sampled[:len(seqs)]     # the graph's draw is the answer
            elif logits is not None:
                # Each row samples output token number len(seq) - prompt: a pending, unbooked one counts.
                temperatures, extras = prepare_sampling(params, [len(seq) - seq.num_prompt_tokens for seq in seqs],
                                                        self.eos_token_ids, self.config.hf_config.vocab_size,
                                                        self.device)
                token_ids, logprobs = self.sampler(logits, temperatures, extras)
            if self.share_sampled:      # every rank embeds these ids in the next step
                if token_ids is None:
                    token_ids = torch.empty(len(seqs), dtype=torch.int64, device=self.device)
                dist.broadcast(token_ids, src=0)
            self.last_sampled, self.last_rows = token_ids, {seq.seq_id: i for i, seq in enumerate(seqs)}
            if logits is None:
                return None
            return SampledTokens(token_ids, logprobs, [p.logprobs for p in params])
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
        if self._nums is None:
            return token_ids, None
        return token_ids, logprob_dicts(token_ids, tuple(self._host[1:]), self._nums)
