"""Published model configs shipped with the package, so benchmarks run with random weights and no download."""
import os

QWEN3_0_6B = os.path.join(os.path.dirname(__file__), "qwen3-0.6b")
