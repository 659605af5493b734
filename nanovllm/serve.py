"""Serve a model over OpenAI's HTTP API, as `vllm serve` does:

    python -m nanovllm.serve MODEL [--host 127.0.0.1] [--port 8000] [--served-model-name NAME] [--api-key KEY]
                             [LLM options: --max-model-len, --dtype, --tensor-parallel-size, ...]
    nanovllm serve MODEL ...        # the same, through the console script

One process: the main thread loads the engine and then runs the engine loop (nanovllm/server/engine_loop.py), the
only caller of the engine; uvicorn serves the FastAPI app (nanovllm/server/api.py) on a second thread. SIGINT or
SIGTERM stops accepting connections, lets the requests in flight finish (a second SIGINT stops waiting for them),
frees the engine and exits 0 (1 when the engine had died: /health answered 503 meanwhile)."""
import argparse
import signal
import sys
import threading

# Server options, then LLM options as vLLM spells them (flag -> Config field).
_LLM_OPTIONS = {
    "--max-model-len": ("max_model_len", int), "--dtype": ("dtype", str),
    "--kv-cache-dtype": ("kv_cache_dtype", str), "--tensor-parallel-size": ("tensor_parallel_size", int),
    "--max-num-seqs": ("max_num_seqs", int), "--max-num-batched-tokens": ("max_num_batched_tokens", int),
    "--gpu-memory-utilization": ("gpu_memory_utilization", float), "--device": ("device", str),
    "--block-size": ("kvcache_block_size", int), "--num-gpu-blocks-override": ("num_kvcache_blocks", int),
    "--load-format": ("load_format", str), "--attention-backend": ("attention_backend", str),
    "--cpu-kvcache-space-gib": ("cpu_kvcache_space_gib", float),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="nanovllm serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="the checkpoint's directory or .gguf file")
    p.add_argument("--host", default="127.0.0.1", help="the address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", nargs="+", help="the model names requests may use (default: MODEL)")
    p.add_argument("--api-key", help="answer 401 unless the request has 'Authorization: Bearer KEY' (not /health)")
    p.add_argument("--max-request-bytes", type=int, default=16 << 20,
                   help="answer 413 to a request body larger than this (default 16 MiB)")
    p.add_argument("--uvicorn-log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug", "trace"])
    p.add_argument("--disable-uvicorn-access-log", action="store_true")
    llm = p.add_argument_group("engine options (LLM(...) keywords, with vLLM's flags)")
    for flag, (field, kind) in _LLM_OPTIONS.items():
        llm.add_argument(flag, dest=field, type=kind, help=f"LLM({field}=...)")
    llm.add_argument("-tp", dest="tensor_parallel_size", type=int, help=argparse.SUPPRESS)
    llm.add_argument("--enforce-eager", action="store_true", default=None, help="no CUDA graphs")
    llm.add_argument("--async-scheduling", dest="overlap_scheduling", action=argparse.BooleanOptionalAction,
                     help="overlap scheduling (on unless --no-async-scheduling)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import uvicorn

    from nanovllm import LLM
    from nanovllm.server.api import OpenAIServer, build_app
    from nanovllm.server.engine_loop import EngineLoop

    fields = [field for field, _ in _LLM_OPTIONS.values()] + ["enforce_eager", "overlap_scheduling"]
    options = {f: getattr(args, f) for f in fields if getattr(args, f) is not None}
    try:
        llm = LLM(args.model, **options)
    except (ValueError, TypeError) as e:
        print(f"nanovllm serve: error: {e}", file=sys.stderr)
        return 2
    try:
        loop = EngineLoop(llm)
        server = OpenAIServer(llm, loop, args.served_model_name or [args.model], args.api_key, args.max_request_bytes)
        http = uvicorn.Server(uvicorn.Config(build_app(server), host=args.host, port=args.port,
                                             log_level=args.uvicorn_log_level,
                                             access_log=not args.disable_uvicorn_access_log))

        def stop(signum, frame):    # uvicorn's own handlers are only installed on the main thread: do its part
            http.force_exit = http.should_exit and signum == signal.SIGINT
            http.should_exit = True
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGTERM, stop)
        thread = threading.Thread(target=http.run, name="nanovllm-http", daemon=True)
        thread.start()
        # Until uvicorn has closed its sockets and every connection (the requests in flight) has ended.
        loop.run(stop=lambda: not thread.is_alive())
    finally:
        llm.exit()
    # 1 when uvicorn could not bind (it said why) or the engine died (the loop printed why).
    return 0 if http.started and loop.dead is None else 1


def cli():
    """The `nanovllm` console script: `nanovllm serve MODEL ...`."""
    if len(sys.argv) < 2 or sys.argv[1] != "serve":
        print("usage: nanovllm serve MODEL [options]   (nanovllm serve --help for the options)", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[2:]))


if __name__ == "__main__":
    sys.exit(main())
