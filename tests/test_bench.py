"""bench.py, whose runs give the throughput figures in the docs."""
import os
import re
import subprocess
import sys

import pytest

from tests.tiny_checkpoint import build_tiny_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("shared_prefix", [0, 600])
def test_repeated_runs_do_the_same_work(tmp_path, shared_prefix):
    """--repeat runs the workload again in one process. No run may take its prompts from the prefix cache that the
    runs before it filled (a second run used to compute a quarter of its prompt tokens and so looked faster); a
    shared prefix is still shared within each run."""
    model = build_tiny_checkpoint(str(tmp_path / "qwen3-10k"), vocab_size=10240, max_position_embeddings=4096)
    env = dict(os.environ, PYTHONPATH=ROOT, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "bench.py", "--model", model, "--num-seqs", "3", "--repeat", "2",
                          "--skip-batch1", "--shared-prefix", str(shared_prefix)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    runs = re.findall(r"prefill computed (\d+) of (\d+) prompt tokens \((\d+) from the prefix cache\)", out.stdout)
    assert len(runs) == 2, out.stdout
    assert runs[0] == runs[1], out.stdout
    computed, total, cached = map(int, runs[1])
    assert computed + cached == total and (cached > 0) == (shared_prefix > 0), out.stdout
    assert len(set(re.findall(r"Total: (\d+)tok", out.stdout))) == 1, out.stdout
