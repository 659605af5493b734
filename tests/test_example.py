"""The README's first command: `python example.py` works on a fresh machine with no model downloaded."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_example_runs_on_a_demo_checkpoint_without_a_model(tmp_path):
    env = dict(os.environ, HOME=str(tmp_path), CUDA_VISIBLE_DEVICES="", PYTHONPATH=ROOT)
    result = subprocess.run([sys.executable, "example.py"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "RANDOM weights" in result.stdout                         # it says plainly what it is running
    assert result.stdout.count("Completion: ") == 2
    assert "<|im_start|>user\\nintroduce yourself<|im_end|>" in result.stdout   # the chat template was applied
    assert os.path.isfile(tmp_path / ".cache" / "nanovllm" / "demo-qwen3" / "config.json")
