from dataclasses import dataclass


def _check_int(name: str, value, low: int, allowed: str):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def _check_range(name: str, value, ok: bool, allowed: str):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


@dataclass(slots=True)
class SamplingParams:
    """How to pick each generated token and when to stop, with vLLM's names and meanings.

    Filters apply in this order to softmax(logits / temperature): min_p, top_k, top_p; greedy ignores them.
    temperature: 0 means greedy (argmax); otherwise sample from softmax(logits / temperature).
    top_k: keep the k most probable tokens; 0 or -1 turns it off.
    top_p: keep the smallest set of most probable tokens whose probability reaches top_p, the token that
        crosses it included; 1.0 turns it off.
    min_p: drop tokens less probable than min_p times the most probable one; 0 turns it off.
    seed: makes this request's draws depend only on (seed, position), whatever else is in the batch.
    max_tokens: stop ("length") after this many generated tokens.
    min_tokens: eos and stop_token_ids cannot be generated, and stop strings are not looked for, before this many.
    ignore_eos: keep generating past eos.
    stop: strings that end generation ("stop"); the text is cut before the stop string.
    stop_token_ids: token ids that end generation ("stop"), like eos.
    include_stop_str_in_output: keep the stop string (or the stop token's text) at the end of the text.
    logprobs: None, or n >= 0: per generated token, a dict {token_id: logprob} with the sampled token and the n
        most probable ones.
    skip_special_tokens: leave special tokens out of the text.
    """
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int = 64
    min_tokens: int = 0
    ignore_eos: bool = False
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True

    def __post_init__(self):
        t, p, mp = self.temperature, self.top_p, self.min_p
        _check_range("temperature", t, t >= 0 and t != float("inf"), ">= 0 (0 means greedy)")
        _check_range("top_p", p, 0 < p <= 1, "in (0, 1] (1 turns it off)")
        _check_range("min_p", mp, 0 <= mp <= 1, "in [0, 1] (0 turns it off)")
        _check_int("top_k", self.top_k, -1, "-1, 0 (off) or an integer >= 1")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed must be None or an integer, got {self.seed!r}")
        _check_int("max_tokens", self.max_tokens, 1, "an integer >= 1")
        allowed = f"an integer in [0, max_tokens={self.max_tokens}]"
        _check_int("min_tokens", self.min_tokens, 0, allowed)
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens must be {allowed}, got {self.min_tokens}")
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, 0, "None or an integer >= 0")
        self.stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be a string or a list of non-empty strings, got {self.stop!r}")
        self.stop_token_ids = list(self.stop_token_ids or [])
        for token_id in self.stop_token_ids:
            _check_int("stop_token_ids", token_id, 0, "a list of token ids (integers >= 0)")

    @property
    def needs_sampler_extras(self) -> bool:
        """Whether sampling needs more than the temperature: a filter or seed (when sampling), logprobs, min_tokens."""
        sampled = self.temperature > 0
        filters = self.top_k > 0 or self.top_p < 1 or self.min_p > 0 or self.seed is not None
        return (sampled and filters) or self.logprobs is not None or self.min_tokens > 0
