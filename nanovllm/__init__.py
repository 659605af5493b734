"""nano-vllm: a small, fast, offline LLM inference engine."""
from nanovllm.llm import LLM, StreamOutput
from nanovllm.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "StreamOutput"]
