from dataclasses import replace
from enum import Enum, auto
from itertools import count
from time import perf_counter

from nanovllm.engine.detokenizer import Detokenizer
from nanovllm.sampling_params import SamplingParams

_seq_ids = count()      # process-wide, so that requests of two engines never share an id


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    """One request: its tokens (prompt then completion), its KV blocks and how far it has been computed.

    With overlap scheduling the last token may still be on the GPU, sampled but not booked: `len(seq)` counts it (it
    needs a KV slot and the next step feeds it to the model), `token_ids` holds the booked tokens only."""

    def __init__(self, token_ids: list[int], sampling_params: SamplingParams = SamplingParams()):
        self.seq_id = next(_seq_ids)
        self.status = SequenceStatus.WAITING
        self.token_ids = list(token_ids)   # the booked tokens
        self.num_tokens = self.num_prompt_tokens = len(token_ids)     # booked + sampled on the GPU, not booked
        self.num_cached_tokens = -1     # prompt tokens served by the prefix cache, set at the first allocation
        self.num_computed_tokens = 0    # tokens whose KV is in the cache (cached or computed)
        self.num_scheduled_tokens = 0   # tokens the current step runs through the model (set by the scheduler)
        self.block_table: list[int] = []
        self.sampling_params = sampling_params
        self.finish_reason: str | None = None       # "stop" or "length" (or "abort") once finished
        self.logprobs: list[dict[int, float]] | None = [] if sampling_params.logprobs is not None else None
        self.detokenizer = None     # set by the engine when the request has a tokenizer
        self.held_samples: list[Sequence] = []      # the prompt's other samples (n > 1) until queued: see fork
        # On time.perf_counter's clock: when the request was made, got its first token, finished.
        self.arrival_time, self.first_token_time, self.finished_time = perf_counter(), None, None

    def __len__(self):
        return self.num_tokens

    @property
    def is_finished(self):
        return self.status == SequenceStatus.FINISHED

    @property
    def last_token(self) -> int:
        return self.token_ids[-1]

    @property
    def num_completion_tokens(self):
        """Completion tokens booked so far (those the host has seen)."""
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self):
        return self.token_ids[:self.num_prompt_tokens]

    @property
    def completion_token_ids(self):
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_uncomputed_tokens(self):
        """Tokens still to run through the model: the whole rest of the prompt in prefill, 1 in decode."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def scheduled_token_ids(self) -> list[int]:
        return self.token_ids[self.num_computed_tokens:self.num_computed_tokens + self.num_scheduled_tokens]

    def fork(self) -> list["Sequence"]:
        """The request's n samples (SamplingParams.n): this sequence, which carries the n - 1 others (`held_samples`)
        to the scheduler (see Scheduler.add), each with its own detokenizer and seed (seed + i for sample i)."""
        sp = self.sampling_params
        for i in range(1, sp.n):
            sample = Sequence(self.prompt_token_ids, sp if sp.seed is None else replace(sp, seed=sp.seed + i))
            if self.detokenizer is not None:
                sample.detokenizer = Detokenizer(self.detokenizer.tokenizer, sample.sampling_params,
                                                 self.detokenizer.every_step)
            self.held_samples.append(sample)
        return [self, *self.held_samples]

    def append_token(self, token_id: int):
        """Book a token: it takes the place the scheduler reserved for it at launch, or extends the sequence."""
        self.token_ids.append(token_id)
        self.num_tokens = max(self.num_tokens, len(self.token_ids))
