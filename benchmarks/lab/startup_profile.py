"""LLM() start-up, cold then warm, by phase: each start-up in a fresh process, the cold one with an empty Triton cache
(a temporary TRITON_CACHE_DIR), the warm one with the cache the cold one filled; with compiling ahead off and on
(NANOVLLM_COMPILE_AHEAD=0 / 1) unless --ahead picks one; --old DIR adds another tree's nano-vllm (a "before", e.g.
`mkdir .old && git archive <commit> | tar -x -C .old`). One line of seconds per start-up.

    PYTHONPATH=. python benchmarks/lab/startup_profile.py [--model-config qwen3-0.6b | --model DIR] [--ahead 1]
        [--old .old]
    ... --child [--profile 30 [--sort tottime]]    one start-up in this process (what the parent runs), with
        cProfile's top 30 (every thread's, on Python 3.12+); it also prints each phase's and the tokenizer thread's span
    ... --child --import-transformers-first | --tokenizer-after _load_model    where the tokenizer thread's import
        of transformers lands: done before LLM(), or held until a stage of start-up has returned

Phases: import torch; import nanovllm; load (build the model, read or fake the weights); warmup (the memory warm-up
that sizes the cache, with its compile-ahead); kv (allocating the cache); ahead (compiling the warm-up's and the
graphs' kernels ahead); kernels (the kernel warm-up); capture (the CUDA graphs); other (the rest of LLM(): config,
tokenizer, scheduler). The first process also pays for reading torch's libraries from disk (its import times).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

PHASES = ("load", "warmup", "kv", "ahead", "kernels", "capture")


def child(args):
    t0 = time.perf_counter()
    import torch  # noqa: F401
    t1 = time.perf_counter()
    from nanovllm import LLM
    t2 = time.perf_counter()
    from nanovllm.engine import cuda_graph, llm_engine, model_runner
    if args.import_transformers_first:      # the main thread's own start-up, without the tokenizer thread's import
        start = time.perf_counter()
        import transformers
        transformers.PreTrainedTokenizerFast
        print(f"import transformers before LLM(): {time.perf_counter() - start:.2f} s", file=sys.stderr)
    if args.tokenizer_after:        # hold the tokenizer's thread until that ModelRunner stage has returned
        import threading
        stage_done, stage, load = threading.Event(), getattr(model_runner.ModelRunner, args.tokenizer_after), \
            llm_engine.load_tokenizer

        def stage_then_release(*a, **k):
            try:
                return stage(*a, **k)
            finally:
                stage_done.set()

        def load_when_released(*a, **k):
            stage_done.wait()
            return load(*a, **k)
        setattr(model_runner.ModelRunner, args.tokenizer_after, stage_then_release)
        llm_engine.load_tokenizer = load_when_released
    times, depth = dict.fromkeys(PHASES, 0.0), [0]
    spans = {}      # phase -> [first start, last end], seconds from the start of LLM()

    def timed(fn, phase):       # a phase's time counts only outside the others (the warm-up nests a compile-ahead)
        def wrapper(*a, **k):
            start, depth[0] = time.perf_counter(), depth[0] + 1
            try:
                return fn(*a, **k)
            finally:
                depth[0] -= 1
                if depth[0] == 0:
                    times[phase] += time.perf_counter() - start
                    spans.setdefault(phase, [start - t, 0.0])[1] = time.perf_counter() - t
        return wrapper

    def tokenizer_span(load):      # on its own thread, overlapping the phases: its span, not a phase
        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return load(*a, **k)
            finally:
                spans["tokenizer"] = [start - t, time.perf_counter() - t]
        return wrapper
    llm_engine.load_tokenizer = tokenizer_span(llm_engine.load_tokenizer)
    runner = model_runner.ModelRunner
    for method, phase in (("_load_model", "load"), ("_calibrate", "warmup"), ("_allocate_kv_cache", "kv"),
                          ("warmup_kernels", "kernels")):
        setattr(runner, method, timed(getattr(runner, method), phase))
    cuda_graph.CUDAGraphs.capture = timed(cuda_graph.CUDAGraphs.capture, "capture")
    if hasattr(model_runner, "compile_ahead"):      # (not in an --old tree)
        model_runner.compile_ahead = timed(model_runner.compile_ahead, "ahead")

    if args.profile:
        import cProfile
        profiler = cProfile.Profile()
        profiler.enable()
    t = time.perf_counter()     # (read by the wrappers above when they run)
    if args.model:
        llm = LLM(args.model, max_model_len=4096)
    else:
        from nanovllm.configs import MODEL_CONFIGS
        llm = LLM(MODEL_CONFIGS[args.model_config], load_format="dummy", max_model_len=4096)
    total = time.perf_counter() - t
    if args.profile:
        import pstats
        profiler.disable()
        pstats.Stats(profiler, stream=sys.stderr).sort_stats(args.sort).print_stats(args.profile)
    llm.exit()
    print("spans (s from LLM()'s start): " + ", ".join(f"{name} {a:.2f}-{b:.2f}" for name, (a, b) in spans.items()),
          file=sys.stderr)
    print(json.dumps({"torch": t1 - t0, "nanovllm": t2 - t1, **times, "other": total - sum(times.values()),
                      "LLM()": total}))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model-config", default="qwen3-0.6b", help="a shipped config, run on random weights")
    p.add_argument("--model", help="a checkpoint directory instead (its real weights)")
    p.add_argument("--ahead", nargs="+", default=["0", "1"], help="NANOVLLM_COMPILE_AHEAD values to run")
    p.add_argument("--old", help="also the nano-vllm of this directory (rows 'old')")
    p.add_argument("--child", action="store_true")
    p.add_argument("--profile", type=int, default=0, help="with --child: print cProfile's top N to stderr")
    p.add_argument("--sort", default="cumulative", help="with --profile: cProfile's sort key (tottime...)")
    p.add_argument("--import-transformers-first", action="store_true",
                   help="with --child: import transformers before LLM() (its time printed apart)")
    p.add_argument("--tokenizer-after", choices=["_load_model", "_calibrate"],
                   help="with --child: start loading the tokenizer only once this start-up stage has returned")
    args = p.parse_args()
    if args.child:
        return child(args)
    columns = ("torch", "nanovllm", *PHASES, "other", "LLM()")
    print(f"{'ahead':>5} {'cache':>5} " + " ".join(f"{c:>8}" for c in columns))
    forwarded = ["--model", args.model] if args.model else ["--model-config", args.model_config]
    runs = [(ahead, {"NANOVLLM_COMPILE_AHEAD": ahead}) for ahead in args.ahead]
    if args.old:
        runs.insert(0, ("old", {"PYTHONPATH": os.path.abspath(args.old)}))
    for ahead, settings in runs:
        cache = tempfile.mkdtemp(prefix="triton-cache-")
        for state in ("cold", "warm"):
            env = dict(os.environ, TRITON_CACHE_DIR=cache, **settings)
            out = subprocess.run([sys.executable, __file__, "--child", *forwarded], env=env, capture_output=True,
                                 text=True)
            if out.returncode != 0:
                print(out.stderr[-3000:])
                sys.exit(f"the {state} start-up with {settings} failed")
            for line in out.stderr.splitlines():       # a fallback to compiling at first launch must show
                if "ahead failed" in line:
                    print(line.strip())
            seconds = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{ahead:>5} {state:>5} " + " ".join(f"{seconds[c]:8.2f}" for c in columns), flush=True)


if __name__ == "__main__":
    main()
