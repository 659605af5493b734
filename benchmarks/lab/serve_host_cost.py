"""The server's host cost alone: the real engine loop, scheduler, detokenizer and HTTP server around a fake executor
that "runs" each step for as long as an H200 would (a fixed time plus a time per token) and samples random ids, after
TORCH_CALLS small torch calls (the GPU path's host-side calls, each of which releases the GIL). With no GPU and no
model, what the server loses against LLM.generate here is what Python costs per streamed token, and the GIL.

    python benchmarks/byte_tokenizer.py nanovllm/configs/qwen3-0.6b /tmp/qwen3-0.6b-tok
    PYTHONPATH=. python benchmarks/lab/serve_host_cost.py /tmp/qwen3-0.6b-tok [--num-prompts 256]
"""
import argparse
import os
import subprocess
import sys
import time
import urllib.request

import numpy as np
import torch

STEP_US, DECODE_US_PER_SEQ, PREFILL_US_PER_TOKEN = 2000, 25, 2
TORCH_CALLS = int(os.environ.get("TORCH_CALLS", "100"))    # a step's host-side torch calls: each releases the GIL


class FakeOutput:
    def __init__(self, token_ids, done_at):
        self.token_ids, self.done_at = token_ids, done_at

    def result(self):
        time.sleep(max(0.0, self.done_at - time.perf_counter()))
        return self.token_ids, None


class FakeRunner:
    def __init__(self, config):
        self.num_kvcache_blocks, self.max_model_len = 4096, config.max_model_len
        self.rng, self.busy_until = np.random.default_rng(0), 0.0


class FakeExecutor:
    """Steps take the GPU's time one after another, as launches queue on a stream."""

    def __init__(self, config, eos_token_ids):
        self.runner = FakeRunner(config)

    def run(self, batch):
        r = self.runner
        x = torch.zeros(1)
        for _ in range(TORCH_CALLS):
            x.add_(1)
        rows = batch.num_seqs
        us = STEP_US + (PREFILL_US_PER_TOKEN * len(batch.input_ids) if batch.is_prefill else DECODE_US_PER_SEQ * rows)
        r.busy_until = max(time.perf_counter(), r.busy_until) + us * 1e-6
        return FakeOutput(r.rng.integers(0, 151643, rows).tolist(), r.busy_until)

    def exit(self):
        pass


def patch():
    import nanovllm.engine.llm_engine as engine
    engine.Executor = FakeExecutor


def offline(model: str, num_prompts: int):
    patch()
    from bench import make_workload
    from nanovllm import LLM
    llm = LLM(model, max_model_len=4096)
    prompts, params = make_workload(num_prompts)
    t = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    t = time.perf_counter() - t
    tokens = sum(len(o["token_ids"]) for o in outputs)
    print(f"offline LLM.generate: {tokens} tokens in {t:.2f}s, {tokens / t:.0f} tok/s")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--port", type=int, default=8123)
    p.add_argument("--switch-interval", type=float, default=0.005, help="the server's sys.setswitchinterval")
    args = p.parse_args()
    offline(args.model, args.num_prompts)
    launch = (f"import sys; sys.setswitchinterval({args.switch_interval}); sys.path.insert(0, 'benchmarks/lab'); "
              "import serve_host_cost; serve_host_cost.patch(); from nanovllm.serve import main; sys.exit(main(sys.argv[1:]))")
    server = subprocess.Popen([sys.executable, "-c", launch, args.model, "--port", str(args.port), "--max-model-len",
                               "4096", "--disable-uvicorn-access-log", "--uvicorn-log-level", "warning"])
    try:
        for _ in range(200):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{args.port}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.2)
        for stream in ([], ["--stream"]):
            cpu = cpu_seconds(server.pid)
            subprocess.run([sys.executable, "benchmarks/serve_bench.py", "--base-url", f"http://127.0.0.1:{args.port}",
                            "--num-prompts", str(args.num_prompts), *stream], check=False)
            print(f"server CPU time: {cpu_seconds(server.pid) - cpu:.2f}s")
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
