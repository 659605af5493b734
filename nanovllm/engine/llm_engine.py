import atexit
from collections.abc import Iterator, Sequence as SequenceABC
from contextlib import nullcontext
from dataclasses import dataclass, fields
from time import perf_counter

from tqdm.auto import tqdm

from nanovllm.config import Config
from nanovllm.engine.detokenizer import Detokenizer
from nanovllm.engine.model_runner import ModelRunner
from nanovllm.engine.scheduler import Scheduler
from nanovllm.engine.sequence import Sequence
from nanovllm.engine.workers import WorkerPool
from nanovllm.sampling_params import SamplingParams
from nanovllm.utils.loader import load_tokenizer


@dataclass(slots=True)
class StreamOutput:
    """What one request got in one step of `LLM.stream`: `index` is its position in the prompts; `new_text`
    and `new_token_ids` are only what is new since its last StreamOutput (new_text may be empty while an
    incomplete character or a possible stop string is held back); `finish_reason` is set once `finished`."""
    index: int
    new_text: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None


class LLMEngine:
    """Owns the tokenizer, the scheduler and the model runner, and drives them one step at a time."""

    def __init__(self, model: str, **kwargs):
        names = {f.name for f in fields(Config) if f.init}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"unexpected keyword argument(s) {', '.join(map(repr, unknown))}; "
                            f"valid ones: {', '.join(sorted(names - {'model'}))}")
        config = Config(model, **kwargs)
        Sequence.block_size = config.kvcache_block_size
        self.config = config
        self.tokenizer = load_tokenizer(config.model)
        # Ranks 1..N-1 start loading in their own processes while rank 0 loads here.
        self.workers = WorkerPool(config) if config.tensor_parallel_size > 1 else None
        with self.workers.guard() if self.workers is not None else nullcontext():   # a failure stops the workers
            self.model_runner = ModelRunner(config, self.workers)   # may lower config.max_model_len to fit the cache
        if self.workers is not None:    # ahead of multiprocessing's own handler, which would wait for the workers
            atexit.register(self.exit)
        eos = config.hf_config.eos_token_ids
        if not eos and self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos = (self.tokenizer.eos_token_id,)
        self.scheduler = Scheduler(config, eos)

    # ---- requests -------------------------------------------------------------------------------------

    def _make_sequence(self, prompt: str | list[int], sampling_params: SamplingParams,
                       stream: bool = False) -> Sequence:
        """Validate one request and turn it into a Sequence; raises ValueError before anything is queued."""
        if not isinstance(sampling_params, SamplingParams):
            raise ValueError(f"sampling_params must be a SamplingParams, got {type(sampling_params).__name__}")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"text prompts need a tokenizer, and {self.config.model!r} has none; "
                                 f"pass token ids (a list of ints) instead")
            token_ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, SequenceABC) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            token_ids = list(prompt)
        else:
            raise ValueError("a prompt must be a string or a list of token ids (ints)")
        if not token_ids:
            raise ValueError("empty prompt: a prompt needs at least one token")
        vocab = self.config.hf_config.vocab_size
        bad = [t for t in token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {vocab})")
        if len(token_ids) > self.config.max_model_len:
            raise ValueError(f"prompt has {len(token_ids)} tokens, more than max_model_len={self.config.max_model_len}")
        self._check_against_model(sampling_params)
        seq = Sequence(token_ids, sampling_params, self.scheduler.eos_token_ids)
        if self.tokenizer is not None:
            every_step = stream or bool(sampling_params.stop)
            seq.detokenizer = Detokenizer(self.tokenizer, sampling_params, every_step)
        return seq

    def _check_against_model(self, sp: SamplingParams):
        """The limits of SamplingParams that depend on the model: token ids in the vocabulary, a tokenizer for text."""
        vocab = self.config.hf_config.vocab_size
        bad = [t for t in sp.stop_token_ids if t >= vocab]
        if bad:
            raise ValueError(f"stop_token_ids must lie in the vocabulary [0, {vocab}), got {bad[0]}")
        if sp.logprobs is not None and sp.logprobs > vocab:
            raise ValueError(f"logprobs must be None or an integer in [0, {vocab}] (the vocabulary size), "
                             f"got {sp.logprobs}")
        if sp.stop and self.tokenizer is None:
            raise ValueError(f"stop strings need a tokenizer, and {self.config.model!r} has none; "
                             f"use stop_token_ids instead")

    def add_request(self, prompt: str | list[int], sampling_params: SamplingParams) -> int:
        """Queue one request; returns its sequence id (the key of its output from `step`)."""
        seq = self._make_sequence(prompt, sampling_params)
        self.scheduler.add(seq)
        return seq.seq_id

    def _step(self) -> tuple[list[Sequence], int]:
        """Run one scheduled step. Returns the sequences that got a token, and the tokens processed
        (+prefill, -decode)."""
        seqs, is_prefill = self.scheduler.schedule()
        if not seqs:
            raise RuntimeError("the scheduler found nothing to run while requests are pending; this is a bug")
        token_ids, logprobs = self.model_runner.call("run", seqs, is_prefill)
        advanced = self.scheduler.postprocess(seqs, token_ids, logprobs)
        for seq in advanced:
            # Without streaming or stop strings, text is decoded once, at the end (no per-step cost).
            if seq.detokenizer is not None and (seq.detokenizer.every_step or seq.finish_reason is not None):
                self._update_text(seq)
        num_tokens = sum(seq.num_scheduled_tokens for seq in seqs) if is_prefill else -len(seqs)
        return advanced, num_tokens

    def _update_text(self, seq: Sequence):
        """Detokenize what `seq` got; a stop string in the text finishes it ("stop", its blocks freed)."""
        token_ids = seq.completion_token_ids
        if seq.finish_reason == "stop" and not seq.sampling_params.include_stop_str_in_output:
            token_ids = token_ids[:-1]      # it ended on a stop token: leave that token's text out, as vLLM
        stop = seq.detokenizer.update(token_ids, final=seq.is_finished,
                                      check_stop=seq.num_completion_tokens >= seq.min_tokens)
        if stop is not None:
            self.scheduler.finish(seq, "stop")      # also over "length": the stop string came first

    def step(self) -> tuple[list[tuple[int, list[int]]], int]:
        """Run one scheduled step. Returns (finished (seq_id, completion ids), tokens processed: +prefill, -decode)."""
        advanced, num_tokens = self._step()
        return [(seq.seq_id, seq.completion_token_ids) for seq in advanced if seq.is_finished], num_tokens

    def is_finished(self) -> bool:
        return self.scheduler.is_finished()

    def exit(self):
        """Free the CUDA graphs, stop the tensor-parallel worker processes and free their shared memory.
        Idempotent; with tensor parallelism it also runs at interpreter exit. The engine cannot run afterwards."""
        atexit.unregister(self.exit)
        self.model_runner.exit()

    # ---- batch API ------------------------------------------------------------------------------------

    def _make_sequences(self, prompts: list[str] | list[list[int]],
                        sampling_params: SamplingParams | list[SamplingParams], stream: bool) -> list[Sequence]:
        """Validate every request of a call before any is queued."""
        if isinstance(prompts, (str, bytes)):
            raise ValueError("prompts must be a list; wrap a single prompt as [prompt]")
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        elif len(sampling_params) != len(prompts):
            raise ValueError(f"got {len(sampling_params)} sampling_params for {len(prompts)} prompts; "
                             f"pass one, or one per prompt")
        return [self._make_sequence(p, sp, stream) for p, sp in zip(prompts, sampling_params)]

    def _abort_unfinished(self, seqs: list[Sequence]):
        for seq in seqs:
            if not seq.is_finished:
                self.scheduler.abort(seq)

    def generate(self, prompts: list[str] | list[list[int]],
                 sampling_params: SamplingParams | list[SamplingParams] = SamplingParams(),
                 use_tqdm: bool = True) -> list[dict]:
        """Complete every prompt; returns one dict per prompt, in input order, with "text", "token_ids"
        (the completion's), "prompt_token_ids", "finish_reason" ("stop": eos, a stop token or a stop string;
        "length": max_tokens or max_model_len), "num_cached_tokens" (prompt tokens served by the prefix cache)
        and, when asked for, "logprobs" (one {token_id: logprob} dict
        per generated token, see SamplingParams.logprobs).

        All requests are validated before any runs. If anything raises mid-way (Ctrl-C included), the
        requests of this call are aborted and their blocks freed, so the engine stays usable.
        """
        seqs = self._make_sequences(prompts, sampling_params, stream=False)
        for seq in seqs:
            self.scheduler.add(seq)
        try:
            self._run_until_done(len(seqs), use_tqdm)
        finally:
            self._abort_unfinished(seqs)
        return [self._output(seq) for seq in seqs]

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | list[SamplingParams] = SamplingParams(),
             use_tqdm: bool = True, chat_template_kwargs: dict | None = None) -> list[dict]:
        """Answer one conversation (a list of {"role", "content"} dicts) or a list of them, through the
        tokenizer's chat template with the generation prompt; returns what `generate` returns.
        `chat_template_kwargs` go to the template (for Qwen3, {"enable_thinking": False})."""
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"chat needs a tokenizer with a chat template, and {self.config.model!r} has none")
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a conversation (a list of {'role', 'content'} dicts) or a list of them")
        conversations = [messages] if isinstance(messages[0], dict) else messages
        prompts = []
        for conversation in conversations:
            if not (isinstance(conversation, list) and conversation
                    and all(isinstance(m, dict) and {"role", "content"} <= m.keys() for m in conversation)):
                raise ValueError("each conversation must be a non-empty list of {'role', 'content'} dicts")
            text = self.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True,
                                                      **(chat_template_kwargs or {}))
            # The template writes the special tokens itself: add none when encoding.
            prompts.append(self.tokenizer.encode(text, add_special_tokens=False))
        return self.generate(prompts, sampling_params, use_tqdm)

    def stream(self, prompts: list[str] | list[list[int]],
               sampling_params: SamplingParams | list[SamplingParams] = SamplingParams()) -> Iterator[StreamOutput]:
        """Like `generate`, but yields after each engine step one StreamOutput per request that got a token,
        with only what is new since its last one. The pieces of text concatenate to `generate`'s "text".

        Requests are validated here, before the first step; they are queued when iteration starts. Leaving
        the loop early (break, an exception) aborts the requests still running and frees their blocks.
        """
        seqs = self._make_sequences(prompts, sampling_params, stream=True)
        return self._stream(seqs)

    def _stream(self, seqs: list[Sequence]) -> Iterator[StreamOutput]:
        index = {seq.seq_id: i for i, seq in enumerate(seqs)}
        for seq in seqs:
            self.scheduler.add(seq)
        try:
            while not all(seq.is_finished for seq in seqs):
                advanced, _ = self._step()
                for seq in advanced:
                    if seq.seq_id in index:     # the engine may also be running requests of other calls
                        text = seq.detokenizer.new_text(seq.is_finished) if seq.detokenizer is not None else ""
                        yield StreamOutput(index[seq.seq_id], text, [seq.last_token], seq.is_finished,
                                           seq.finish_reason)
        finally:
            self._abort_unfinished(seqs)

    def _run_until_done(self, total: int, use_tqdm: bool):
        bar = tqdm(total=total, desc="Generating", dynamic_ncols=True, disable=not use_tqdm)
        prefill_tps = decode_tps = 0.0
        try:
            while not self.is_finished():
                start = perf_counter()
                advanced, num_tokens = self._step()
                elapsed = perf_counter() - start
                if num_tokens > 0:
                    prefill_tps = num_tokens / elapsed
                else:
                    decode_tps = -num_tokens / elapsed
                bar.set_postfix(prefill=f"{prefill_tps:.0f}tok/s", decode=f"{decode_tps:.0f}tok/s", refresh=False)
                if use_tqdm:
                    bar.update(sum(seq.is_finished for seq in advanced))
        finally:
            bar.close()

    def _output(self, seq: Sequence) -> dict:
        out = {"text": seq.detokenizer.text if seq.detokenizer is not None else "",
               "token_ids": seq.completion_token_ids,
               "prompt_token_ids": seq.prompt_token_ids,
               "finish_reason": seq.finish_reason,
               "num_cached_tokens": seq.num_cached_tokens}
        if seq.logprobs is not None:
            out["logprobs"] = seq.logprobs
        return out

