"""Published model configs shipped with the package, so benchmarks run with random weights and no download."""
import os

_HERE = os.path.dirname(__file__)
# name -> directory holding the model's published config.json (bench.py --dummy --model-config NAME)
MODEL_CONFIGS = {name: os.path.join(_HERE, name) for name in ("qwen3-0.6b", "llama-3.2-1b", "smollm2-135m")}
QWEN3_0_6B = MODEL_CONFIGS["qwen3-0.6b"]
