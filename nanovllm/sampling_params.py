from dataclasses import dataclass


@dataclass(slots=True)
class SamplingParams:
    """How to pick each generated token and when to stop.

    temperature=0 means greedy (argmax); any positive value samples from softmax(logits / temperature).
    """
    temperature: float = 1.0
    max_tokens: int = 64
    ignore_eos: bool = False

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 means greedy), got {self.temperature}")
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
