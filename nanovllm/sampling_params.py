import math
from dataclasses import dataclass

from nanovllm.model_config import check_field

SAMPLING_EPS = 1e-5     # vLLM's: a temperature below it is greedy (1 / T would overflow the logits to inf, then NaN)
MAX_N = 16384           # vLLM's default VLLM_MAX_N_SEQUENCES


@dataclass(slots=True)
class SamplingParams:
    """How to pick each generated token and when to stop, with vLLM's names and meanings.

    n: how many completions of the prompt to sample (vLLM's parallel sampling); they share the prompt's KV blocks.
        Sample i > 0 uses seed + i, as vLLM's do. Greedy (argmax) requests take n = 1 only.
    temperature: 0 (or below 1e-5, vLLM's epsilon) is greedy (argmax, no filters); else sample from
        softmax(logits / temperature), filtered in this order by min_p, top_k and top_p.
    presence_penalty, frequency_penalty: OpenAI's, in [-2, 2]: subtract the penalty once from the logit of each
        token the completion holds so far (presence), or once per occurrence (frequency); 0 turns them off.
    repetition_penalty: vLLM's and transformers', > 0: the logit of each token of the prompt or the completion so
        far is divided by it when positive and multiplied when not; 1 turns it off. Penalties apply before the
        temperature and the filters, greedy requests included.
    min_p: drop tokens less probable than min_p times the most probable one; 0 turns it off.
    top_k: keep the k most probable tokens; 0 or -1 turns it off.
    top_p: keep the most probable tokens until their probability reaches top_p, the token that crosses it
        included; 1.0 turns it off.
    seed: makes this request's draws depend only on (seed, position), whatever else is in the batch.
    max_tokens: stop ("length") after this many generated tokens. min_tokens: before this many, eos and
        stop_token_ids cannot be generated and stop strings are not looked for. ignore_eos: generate past eos.
    stop, stop_token_ids: strings and token ids that end generation ("stop"); the text is cut before the stop
        string unless include_stop_str_in_output, which keeps it (or the stop token's text).
    logprobs: None, or k >= 0: per generated token, {token_id: logprob} for the sampled token and the k most
        probable ones. skip_special_tokens: leave special tokens out of the text."""
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
    # After the fields above, so that positional arguments keep their meaning.
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0

    def __post_init__(self):
        check_field("temperature", self.temperature, (int, float), lambda v: 0 <= v < math.inf, ">= 0 (0 means greedy)")
        if self.temperature < SAMPLING_EPS:
            self.temperature = 0.0      # greedy everywhere, as vLLM: no path divides by a vanishing temperature
        check_field("n", self.n, int, lambda v: 1 <= v <= MAX_N and (v == 1 or self.temperature > 0),
                    f"an integer in [1, {MAX_N}], and 1 when greedy (temperature < {SAMPLING_EPS})")
        for name in ("presence_penalty", "frequency_penalty"):
            check_field(name, getattr(self, name), (int, float), lambda v: -2 <= v <= 2, "in [-2, 2] (0 turns it off)")
        check_field("repetition_penalty", self.repetition_penalty, (int, float), lambda v: 0 < v < math.inf,
                    "> 0 and finite (1 turns it off)")
        check_field("top_p", self.top_p, (int, float), lambda v: 0 < v <= 1, "in (0, 1] (1 turns it off)")
        check_field("min_p", self.min_p, (int, float), lambda v: 0 <= v <= 1, "in [0, 1] (0 turns it off)")
        check_field("top_k", self.top_k, int, lambda v: v >= -1, "-1, 0 (off) or an integer >= 1")
        check_field("seed", self.seed, (int, type(None)), None, "None or an integer")
        check_field("max_tokens", self.max_tokens, int, lambda v: v >= 1, "an integer >= 1")
        check_field("min_tokens", self.min_tokens, int, lambda v: 0 <= v <= self.max_tokens,
                    f"an integer in [0, max_tokens={self.max_tokens}]")
        check_field("logprobs", self.logprobs, (int, type(None)), lambda v: v is None or v >= 0,
                    "None or an integer >= 0")
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            check_field(name, getattr(self, name), bool, None, "True or False")
        # None is none and a bare string is one stop string; anything else must already be a list (0 is no list).
        stop = [self.stop] if isinstance(self.stop, str) else [] if self.stop is None else self.stop
        check_field("stop", stop, (list, tuple), lambda v: all(isinstance(s, str) and s for s in v),
                    "a string or a list of non-empty strings")
        ids = [] if self.stop_token_ids is None else self.stop_token_ids
        check_field("stop_token_ids", ids, (list, tuple),
                    lambda v: all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in v),
                    "a list of token ids (integers >= 0)")
        self.stop, self.stop_token_ids = list(stop), list(ids)

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    @property
    def needs_sampler_extras(self) -> bool:
        """Whether sampling needs more than the temperature: the Sampler's SamplingTensors."""
        filters = self.top_k > 0 or self.top_p < 1 or self.min_p > 0 or self.seed is not None
        return ((self.temperature > 0 and filters) or self.logprobs is not None or self.min_tokens > 0
                or self.has_penalties)
