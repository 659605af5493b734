import os
from collections.abc import Sequence as SequenceABC
from dataclasses import fields
from time import perf_counter

from tqdm.auto import tqdm

from nanovllm.config import Config
from nanovllm.engine.model_runner import ModelRunner
from nanovllm.engine.scheduler import Scheduler
from nanovllm.engine.sequence import Sequence
from nanovllm.sampling_params import SamplingParams

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def load_tokenizer(model_dir: str):
    """The checkpoint's transformers tokenizer, or None when the directory ships none (token-id prompts only)."""
    if not any(os.path.isfile(os.path.join(model_dir, name)) for name in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(model_dir)


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
        self.model_runner = ModelRunner(config)     # may lower config.max_model_len to what the cache holds
        eos = config.hf_config.eos_token_ids
        if not eos and self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos = (self.tokenizer.eos_token_id,)
        self.scheduler = Scheduler(config, eos)

    # ---- requests -------------------------------------------------------------------------------------

    def _make_sequence(self, prompt: str | list[int], sampling_params: SamplingParams) -> Sequence:
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
        return Sequence(token_ids, sampling_params, self.scheduler.eos_token_ids)

    def _check_against_model(self, sp: SamplingParams):
        """The limits of SamplingParams that depend on the model: token ids in the vocabulary."""
        vocab = self.config.hf_config.vocab_size
        bad = [t for t in sp.stop_token_ids if t >= vocab]
        if bad:
            raise ValueError(f"stop_token_ids must lie in the vocabulary [0, {vocab}), got {bad[0]}")
        if sp.logprobs is not None and sp.logprobs > vocab:
            raise ValueError(f"logprobs must be None or an integer in [0, {vocab}] (the vocabulary size), "
                             f"got {sp.logprobs}")

    def add_request(self, prompt: str | list[int], sampling_params: SamplingParams) -> int:
        """Queue one request; returns its sequence id (the key of its output from `step`)."""
        seq = self._make_sequence(prompt, sampling_params)
        self.scheduler.add(seq)
        return seq.seq_id

    def step(self) -> tuple[list[tuple[int, list[int]]], int]:
        """Run one scheduled step. Returns (finished (seq_id, completion ids), tokens processed: +prefill, -decode)."""
        seqs, is_prefill = self.scheduler.schedule()
        if not seqs:
            raise RuntimeError("the scheduler found nothing to run while requests are pending; this is a bug")
        token_ids, logprobs = self.model_runner.run(seqs, is_prefill)
        finished = [seq for seq in self.scheduler.postprocess(seqs, token_ids, logprobs) if seq.is_finished]
        num_tokens = sum(seq.num_scheduled_tokens for seq in seqs) if is_prefill else -len(seqs)
        return [(seq.seq_id, seq.completion_token_ids) for seq in finished], num_tokens

    def is_finished(self) -> bool:
        return self.scheduler.is_finished()

    # ---- batch API ------------------------------------------------------------------------------------

    def generate(self, prompts: list[str] | list[list[int]],
                 sampling_params: SamplingParams | list[SamplingParams] = SamplingParams(),
                 use_tqdm: bool = True) -> list[dict]:
        """Complete every prompt; returns one {"text", "token_ids"} dict per prompt, in input order.

        All requests are validated before any runs. If anything raises mid-way (Ctrl-C included), the
        requests of this call are aborted and their blocks freed, so the engine stays usable.
        """
        if isinstance(prompts, (str, bytes)):
            raise ValueError("prompts must be a list; wrap a single prompt as [prompt]")
        if not prompts:
            return []
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        elif len(sampling_params) != len(prompts):
            raise ValueError(f"got {len(sampling_params)} sampling_params for {len(prompts)} prompts; "
                             f"pass one, or one per prompt")
        seqs = [self._make_sequence(p, sp) for p, sp in zip(prompts, sampling_params)]
        for seq in seqs:
            self.scheduler.add(seq)
        try:
            self._run_until_done(len(seqs), use_tqdm)
        except BaseException:
            for seq in seqs:
                if not seq.is_finished:
                    self.scheduler.abort(seq)
            raise
        return [self._output(seq) for seq in seqs]

    def _run_until_done(self, total: int, use_tqdm: bool):
        bar = tqdm(total=total, desc="Generating", dynamic_ncols=True, disable=not use_tqdm)
        prefill_tps = decode_tps = 0.0
        try:
            while not self.is_finished():
                start = perf_counter()
                finished, num_tokens = self.step()
                elapsed = perf_counter() - start
                if num_tokens > 0:
                    prefill_tps = num_tokens / elapsed
                else:
                    decode_tps = -num_tokens / elapsed
                bar.set_postfix(prefill=f"{prefill_tps:.0f}tok/s", decode=f"{decode_tps:.0f}tok/s", refresh=False)
                bar.update(len(finished))
        finally:
            bar.close()

    def _output(self, seq: Sequence) -> dict:
        token_ids = seq.completion_token_ids
        text = self.tokenizer.decode(token_ids) if self.tokenizer is not None else ""
        out = {"text": text, "token_ids": token_ids, "prompt_token_ids": seq.prompt_token_ids,
               "finish_reason": seq.finish_reason}
        if seq.logprobs is not None:
            out["logprobs"] = seq.logprobs
        return out
