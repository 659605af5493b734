import atexit
import threading
from collections import deque
from collections.abc import Callable, Sequence as SequenceABC
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields
from numbers import Integral
from typing import NamedTuple

from nanovllm.config import Config
from nanovllm.engine.detokenizer import Detokenizer
from nanovllm.engine.executor import Executor
from nanovllm.engine.scheduler import Scheduler
from nanovllm.engine.sequence import Sequence
from nanovllm.engine.step_batch import StepBatch
from nanovllm.layers.attention_backends import select_attention_backend
from nanovllm.sampling_params import SamplingParams
from nanovllm.utils.loader import load_tokenizer


class StepOutput(NamedTuple):
    """What `step()` returns (`_step`'s `finished` holds every sequence that got a token)."""
    finished: list
    num_prefill_tokens: int
    num_decode_tokens: int


def _eos_of(tokenizer) -> tuple[int, ...]:
    return (tokenizer.eos_token_id,) if tokenizer is not None and tokenizer.eos_token_id is not None else ()


class LLMEngine:
    """The core loop, as in nano-vllm: `add_request`, then `step` until `is_finished`. It owns the tokenizer, the
    scheduler and rank 0's executor (the model on every rank); requests are validated here, before any is queued.

    With `overlap_scheduling` a step launches the next batch on the GPU before it books the previous one's tokens:
    the host schedules, prepares and books while the GPU computes, and the sampled ids feed the next step on the
    GPU. A request that finishes may so run one step more, whose token is dropped."""

    def __init__(self, model: str, **kwargs):
        names = {f.name for f in fields(Config) if f.init}
        if unknown := sorted(set(kwargs) - names):
            raise TypeError(f"unexpected keyword argument(s) {', '.join(map(repr, unknown))}; "
                            f"valid ones: {', '.join(sorted(names - {'model'}))}")
        self.config = config = Config(model, **kwargs)
        # Refused here, before any worker starts; every rank's runner selects the same backend again.
        select_attention_backend(config.attention_backend, config.device, config.kvcache_block_size,
                                 config.kv_cache_dtype)
        # The tokenizer loads (importing transformers alone takes seconds) while the model loads and warms up,
        # unless the end-of-sequence ids must come from it.
        with ThreadPoolExecutor(1, thread_name_prefix="tokenizer") as pool:
            tokenizer = pool.submit(load_tokenizer, config.model, config.model_config.gguf_file)
            eos = config.model_config.eos_token_ids or _eos_of(tokenizer.result())
            self.executor = Executor(config, frozenset(eos))
            try:
                self.tokenizer = tokenizer.result()
            except BaseException:
                self.executor.exit()
                raise
        if config.tensor_parallel_size > 1:     # ahead of multiprocessing's own handler, which would wait for workers
            atexit.register(self.exit)
        runner = self.executor.runner
        self.scheduler = Scheduler(config, runner.num_kvcache_blocks, runner.max_model_len, eos)
        # Launched steps not booked yet: (sequences, token_indices from reserve_output_tokens, the runner's output).
        self._unbooked: deque[tuple[list[Sequence], list[int], object]] = deque()
        self._steps_ahead = 1 if config.overlap_scheduling else 0
        # The one owner of the step loop: callers in several threads take turns at whole steps (their requests are
        # batched together), and queue or abort requests only between steps.
        self._step_lock = threading.RLock()

    @property
    def max_model_len(self) -> int:
        """The longest sequence the engine runs: the configured one, or less when the KV cache holds fewer tokens."""
        return self.scheduler.max_model_len

    def add_request(self, prompt: str | list[int], sampling_params: SamplingParams) -> int:
        """Queue one request; returns its sequence id (the key of its output from `step`)."""
        seq = self._make_sequence(prompt, sampling_params)
        if seq.sampling_params.n != 1:      # step() reports one completion per id
            raise ValueError(f"add_request runs one sample, got n={seq.sampling_params.n}; use generate, chat or "
                             f"stream for n > 1, or add the prompt n times (with seeds seed, seed + 1, ...)")
        self._queue([seq])
        return seq.seq_id

    def step(self) -> StepOutput:
        """Run one scheduled step: returns the requests it finished, as (seq_id, completion token ids), and the
        prefill and decode tokens it launched (a prefill step's count includes the one token of its decodes)."""
        advanced, num_prefill_tokens, num_decode_tokens = self._step()
        return StepOutput([(seq.seq_id, seq.completion_token_ids) for seq in advanced if seq.is_finished],
                          num_prefill_tokens, num_decode_tokens)

    def is_finished(self) -> bool:
        return self.scheduler.is_finished()

    def exit(self):
        """Free the CUDA graphs, stop the tensor-parallel worker processes and free their shared memory.
        Idempotent; with tensor parallelism it also runs at interpreter exit. The engine cannot run afterwards."""
        atexit.unregister(self.exit)
        self.executor.exit()

    def _queue(self, seqs: list[Sequence]):
        with self._step_lock:
            for seq in seqs:
                self.scheduler.add(seq)

    def _abort(self, seqs: list[Sequence]):
        with self._step_lock:
            for seq in seqs:
                if not seq.is_finished:
                    self.scheduler.finish(seq, "abort")

    def _step(self, on_launched: Callable[[], None] | None = None) -> StepOutput:
        """One step: launch a batch, then book what is older than the overlap allows (see StepOutput). With nothing
        left to run (another thread's step finished this caller's requests) it does nothing. `on_launched` runs between
        the launch and the wait for the GPU: host work there overlaps the GPU instead of delaying the next launch."""
        with self._step_lock:
            advanced = self._book_results(self._steps_ahead)    # normally nothing: a step interrupted while waiting
            seqs, is_prefill = self.scheduler.schedule()
            if seqs:
                previous_step = self._unbooked[-1][0] if self._unbooked else []
                batch = StepBatch.build(seqs, is_prefill, self.config.kvcache_block_size, previous_step)
                output = self.executor.run(batch)
                self._unbooked.append((seqs, self.scheduler.reserve_output_tokens(seqs), output))
            elif not self._unbooked and not self.scheduler.is_finished():
                raise RuntimeError("the scheduler found nothing to run while requests are pending; this is a bug")
            if on_launched is not None:
                on_launched()
            # With nothing launched (every running request awaits its last token), book all that is in flight.
            advanced += self._book_results(self._steps_ahead if seqs else 0)
        num_prefill_tokens = sum(seq.num_scheduled_tokens for seq in seqs) if is_prefill else 0
        return StepOutput(advanced, num_prefill_tokens, 0 if is_prefill else len(seqs))

    def _book_results(self, keep: int) -> list[Sequence]:
        """Wait for the oldest launched steps' sampled tokens and book them, until `keep` steps remain in flight;
        a step leaves the queue only once booked. Returns the sequences that got a token."""
        advanced = []
        while len(self._unbooked) > keep:
            seqs, token_indices, output = self._unbooked[0]
            token_ids, logprobs = output.result()       # waits for that step on the GPU
            self._unbooked.popleft()
            advanced += self.scheduler.postprocess(seqs, token_indices, token_ids, logprobs)
        return advanced

    # ---- validation -----------------------------------------------------------------------------------

    def _make_sequence(self, prompt: str | list[int], sp: SamplingParams, stream: bool = False) -> Sequence:
        """Validate one request and turn it into a Sequence; raises ValueError before anything is queued."""
        if not isinstance(sp, SamplingParams):
            raise ValueError(f"sampling_params must be a SamplingParams (or a list of them, one per prompt), "
                             f"got {type(sp).__name__}")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"text prompts need a tokenizer, and {self.config.model!r} has none; "
                                 f"pass token ids (a list of ints) instead")
            token_ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, SequenceABC) and not isinstance(prompt, (bytes, bytearray)):
            # Plain ints are recognised in C (an offline batch's prompts are 10^5 tokens: the per-token ABC check of
            # numbers.Integral delayed the first step by tens of milliseconds); numpy integers still pass.
            plain = set(map(type, prompt)) <= {int}
            if not plain and (bad := [t for t in prompt if not isinstance(t, Integral) or isinstance(t, bool)]):
                raise ValueError(f"a prompt must be a string or a list of token ids (ints), got a "
                                 f"{type(bad[0]).__name__} among its ids")
            token_ids = list(prompt) if plain else list(map(int, prompt))
        else:
            raise ValueError(f"a prompt must be a string or a list of token ids (ints), got {type(prompt).__name__}")
        if not token_ids:
            raise ValueError("empty prompt: a prompt needs at least one token")
        vocab = self.config.model_config.vocab_size
        if not 0 <= (low := min(token_ids)) <= (high := max(token_ids)) < vocab:
            raise ValueError(f"token id {low if low < 0 else high} is outside the vocabulary [0, {vocab})")
        if len(token_ids) > self.max_model_len:
            raise ValueError(f"prompt has {len(token_ids)} tokens, more than max_model_len={self.max_model_len}")
        # The limits of SamplingParams that depend on the model: token ids in the vocabulary, a tokenizer for text.
        if bad := [t for t in sp.stop_token_ids if t >= vocab]:
            raise ValueError(f"stop_token_ids must lie in the vocabulary [0, {vocab}), got {bad[0]}")
        if sp.logprobs is not None and sp.logprobs > vocab:
            raise ValueError(f"logprobs must be None or an integer in [0, {vocab}] (the vocabulary size), "
                             f"got {sp.logprobs}")
        if sp.stop and self.tokenizer is None:
            raise ValueError(f"stop strings need a tokenizer, and {self.config.model!r} has none; "
                             f"use stop_token_ids instead")
        seq = Sequence(token_ids, sp)
        if self.tokenizer is not None:
            seq.detokenizer = Detokenizer(self.tokenizer, sp, every_step=stream or bool(sp.stop))
        return seq

    def _make_requests(self, prompts: list[str] | list[list[int]],
                       sampling_params: SamplingParams | list[SamplingParams], stream: bool) -> list[list[Sequence]]:
        """Validate every request of a call before any is queued; returns each prompt's n samples (Sequence.fork)."""
        if not isinstance(prompts, (list, tuple)):
            hint = "wrap a single prompt as [prompt]" if isinstance(prompts, (str, bytes)) else "pass list(prompts)"
            raise ValueError(f"prompts must be a list of prompts, got {type(prompts).__name__}; {hint}")
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        elif not isinstance(sampling_params, (list, tuple)):
            raise ValueError(f"sampling_params must be a SamplingParams or a list of them, one per prompt, "
                             f"got {type(sampling_params).__name__}")
        elif len(sampling_params) != len(prompts):
            raise ValueError(f"got {len(sampling_params)} sampling_params for {len(prompts)} prompts; "
                             f"pass one, or one per prompt")
        seqs = [self._make_sequence(p, sp, stream) for p, sp in zip(prompts, sampling_params)]
        return [seq.fork() for seq in seqs]
