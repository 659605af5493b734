from nanovllm.model_config import ARCHITECTURES
from nanovllm.models.qwen3 import Qwen3ForCausalLM

# Architecture -> model class: one decoder serves every supported architecture (its config switches q/k norm and
# the qkv bias); a different decoder would get its own file and its entries here.
MODELS = dict.fromkeys(ARCHITECTURES, Qwen3ForCausalLM)
