from collections.abc import Iterator
from dataclasses import dataclass
from time import perf_counter

from tqdm.auto import tqdm

from nanovllm.engine.llm_engine import LLMEngine
from nanovllm.engine.sequence import Sequence
from nanovllm.sampling_params import SamplingParams


@dataclass(slots=True)
class StreamOutput:
    """What one request got since its last StreamOutput in `LLM.stream`: `index` is its position in the prompts;
    `new_text` and `new_token_ids` are only what is new (new_text may be empty while an incomplete character or a
    possible stop string is held back); `finish_reason` is set once `finished`. `sample_index` tells the n samples
    of one prompt apart (SamplingParams.n; vLLM's CompletionOutput.index), each streamed and finished on its own."""
    index: int
    new_text: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None
    sample_index: int = 0


class LLM(LLMEngine):
    """`LLM(model_dir, **config).generate(prompts, sampling_params)`, plus `chat` and `stream`. Each call runs the
    engine until its own requests are done (other calls' requests advance alongside), and aborts them on any error."""

    def generate(self, prompts: list[str] | list[list[int]],
                 sampling_params: SamplingParams | list[SamplingParams] = SamplingParams(),
                 use_tqdm: bool = True) -> list[dict]:
        """Complete every prompt; returns one dict per prompt, in input order, with "text", "token_ids" (the
        completion's), "prompt_token_ids", "finish_reason" ("stop" or "length"), "num_cached_tokens" (prompt tokens
        served by the prefix cache) and, when asked for, "logprobs" (see SamplingParams.logprobs). With n > 1 it also
        has "outputs": the n completions, each such a dict, the first being the one at the top level (vLLM's
        RequestOutput.outputs). All requests are validated before any runs; Ctrl-C aborts them too."""
        requests = self._make_requests(prompts, sampling_params, stream=False)
        seqs = self._queue_samples(requests)
        try:
            self._run_until_done(seqs, use_tqdm)
        finally:
            self._abort(seqs)
        return [_output(samples[0]) if len(samples) == 1 else
                {**_output(samples[0]), "outputs": [_output(seq) for seq in samples]} for samples in requests]

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | list[SamplingParams] = SamplingParams(),
             use_tqdm: bool = True, chat_template_kwargs: dict | None = None) -> list[dict]:
        """Answer one conversation (a list of {"role", "content"} dicts) or a list of them through the tokenizer's chat
        template; returns what `generate` does. `chat_template_kwargs` go to the template (Qwen3: enable_thinking)."""
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
        """Like `generate`, but yields, as the engine steps, one StreamOutput per request that got tokens, with only
        what is new; the pieces concatenate to `generate`'s text and token ids. Requests are validated here and
        queued when iteration starts. Closing the stream (break, an exception, `close()`) aborts its unfinished
        requests; a stream kept while other calls run keeps its requests, which advance with those calls."""
        return self._stream(self._make_requests(prompts, sampling_params, stream=True))

    def _queue_samples(self, requests: list[list[Sequence]]) -> list[Sequence]:
        """Queue each request's first sample (it carries the others to the scheduler); returns every sample."""
        self._queue([samples[0] for samples in requests])
        return [seq for samples in requests for seq in samples]

    def _stream(self, requests: list[list[Sequence]]) -> Iterator[StreamOutput]:
        seqs = self._queue_samples(requests)
        where = [(i, j) for i, samples in enumerate(requests) for j in range(len(samples))]
        num_sent = [0] * len(seqs)      # completion tokens already yielded, per sequence
        pending = list(range(len(seqs)))
        try:
            while pending:
                ready = [i for i in pending if seqs[i].is_finished or seqs[i].num_completion_tokens > num_sent[i]]
                if not ready:
                    self._step()
                for i in ready:
                    seq = seqs[i]
                    finished, num_tokens = seq.is_finished, seq.num_completion_tokens
                    text = seq.detokenizer.new_text(finished) if seq.detokenizer is not None else ""
                    new_ids = seq.token_ids[seq.num_prompt_tokens + num_sent[i]:seq.num_prompt_tokens + num_tokens]
                    num_sent[i] = num_tokens
                    if finished:
                        pending.remove(i)
                    yield StreamOutput(where[i][0], text, new_ids, finished, seq.finish_reason if finished else None,
                                       where[i][1])
        finally:
            self._abort(seqs)

    def _run_until_done(self, seqs: list[Sequence], use_tqdm: bool):
        left = [seq for seq in seqs if not seq.is_finished]
        throughput = {"decode": "0tok/s", "prefill": "0tok/s"}
        with tqdm(total=len(seqs), initial=len(seqs) - len(left), desc="Generating", dynamic_ncols=True,
                  disable=not use_tqdm) as bar:
            while left:
                start = perf_counter()
                _, num_prefill_tokens, num_decode_tokens = self._step()
                rate = f"{(num_prefill_tokens or num_decode_tokens) / (perf_counter() - start):.0f}tok/s"
                throughput["prefill" if num_prefill_tokens else "decode"] = rate
                # Counted on the requests, not on this step's output: another thread's step may finish them.
                unfinished = [seq for seq in left if not seq.is_finished]
                bar.set_postfix(throughput, refresh=False)
                bar.update(len(left) - len(unfinished))
                left = unfinished


def _output(seq: Sequence) -> dict:
    out = {"text": seq.detokenizer.text if seq.detokenizer is not None else "",
           "token_ids": seq.completion_token_ids,
           "prompt_token_ids": seq.prompt_token_ids,
           "finish_reason": seq.finish_reason,
           "num_cached_tokens": max(seq.num_cached_tokens, 0),
           "metrics": {"arrival_time": seq.arrival_time, "first_token_time": seq.first_token_time,
                       "finished_time": seq.finished_time}}
    if seq.logprobs is not None:
        out["logprobs"] = seq.logprobs
    return out
