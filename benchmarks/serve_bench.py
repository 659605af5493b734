"""Serving benchmark: bench.py's workload sent to a running server, as vLLM's benchmark_serving does.

    python -m nanovllm.serve nanovllm/configs/qwen3-0.6b --load-format dummy &     # random Qwen3-0.6B weights
    PYTHONPATH=. python benchmarks/serve_bench.py                      # all 256 requests at once, whole answers
    PYTHONPATH=. python benchmarks/serve_bench.py --stream --request-rate 16    # Poisson arrivals, 16 req/s

Each request is a /v1/completions call with bench.py's token-id prompt, max_tokens, temperature 0.6 and ignore_eos
(prompt and output lengths uniform in 100..1024, seed 0), so "Throughput" compares with bench.py's offline figure
on the same model. Reports request throughput, output tokens/s, and, when streaming, TTFT (time to first token),
TPOT (time per output token after the first, per request) and ITL (the gaps between a stream's chunks), median and
p99, in ms. A chunk holds what one engine step produced for the request, or more when the client fell behind.

The client is a plain asyncio HTTP/1.1 one (one connection per request), so that its own cost per chunk stays small
beside the server's."""
import argparse
import asyncio
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from random import Random
from urllib.parse import urlsplit

from bench import make_workload


@dataclass
class Result:
    ok: bool = False
    error: str = ""
    prompt_len: int = 0
    output_len: int = 0
    start: float = 0.0
    ttft: float = 0.0
    latency: float = 0.0
    chunk_times: list[float] = field(default_factory=list)


async def _http(host: str, port: int, path: str, payload: dict | None, api_key: str | None, on_body) -> int:
    """POST JSON (GET without a payload) over a fresh connection; calls on_body(bytes) for each piece of the
    body as it arrives (chunked or not). Returns the HTTP status."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        body = b"" if payload is None else json.dumps(payload).encode()
        auth = f"Authorization: Bearer {api_key}\r\n" if api_key else ""
        writer.write(f"{'GET' if payload is None else 'POST'} {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n{auth}"
                     f"Connection: close\r\n\r\n".encode() + body)
        status = int((await reader.readline()).split()[1])
        headers = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        if headers.get("transfer-encoding") == "chunked":
            while size := int((await reader.readline()).split(b";")[0], 16):
                on_body((await reader.readexactly(size + 2))[:-2])
            await reader.readline()
        elif "content-length" in headers:
            on_body(await reader.readexactly(int(headers["content-length"])))
        else:
            on_body(await reader.read())
        return status
    finally:
        writer.close()


async def one_request(args, host: str, port: int, prompt: list[int], max_tokens: int) -> Result:
    payload = {"model": args.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.6,
               "ignore_eos": True, "stream": args.stream}
    if args.stream:
        payload["stream_options"] = {"include_usage": True}
    result, pieces, pending = Result(prompt_len=len(prompt), start=time.perf_counter()), [], [b""]

    def on_body(data: bytes):
        if not args.stream:
            pieces.append(data)
            return
        now = time.perf_counter()
        events = (pending[0] + data).split(b"\n\n")
        pending[0] = events.pop()
        for event in events:
            if event == b"data: [DONE]":
                continue
            if b'"choices": []' in event:   # the usage chunk
                pieces.append(event)
            else:
                result.chunk_times.append(now)

    try:
        status = await _http(host, port, "/v1/completions", payload, args.api_key, on_body)
    except (OSError, ValueError, asyncio.IncompleteReadError) as e:
        result.error = f"{type(e).__name__}: {e}"
        return result
    result.latency = time.perf_counter() - result.start
    body = b"".join(pieces)
    if status != 200 or not body:
        result.error = f"HTTP {status}: {body[:200]!r}"
        return result
    usage = json.loads(body.removeprefix(b"data: "))["usage"]
    result.output_len, result.ok = usage["completion_tokens"], True
    result.ttft = (result.chunk_times[0] - result.start) if result.chunk_times else result.latency
    return result


def _ms(values: list[float]) -> str:
    if not values:
        return "n/a"
    p99 = statistics.quantiles(values, n=100, method="inclusive")[98] if len(values) > 1 else values[0]
    return f"median {statistics.median(values) * 1e3:.2f} ms, p99 {p99 * 1e3:.2f} ms"


async def run(args) -> tuple[list[Result], float]:
    """Send the workload; returns the results and the time from the first request to the last answer."""
    url = urlsplit(args.base_url)
    host, port = url.hostname, url.port or 80
    if args.model is None:
        got = []
        status = await _http(host, port, "/v1/models", None, args.api_key, got.append)
        if status != 200:
            raise SystemExit(f"GET /v1/models answered {status}: {b''.join(got)[:200]!r}")
        args.model = json.loads(b"".join(got))["data"][0]["id"]
    prompts, params = make_workload(args.num_prompts, args.seed)
    rng = Random(args.seed)
    start, tasks = time.perf_counter(), []
    for prompt, sp in zip(prompts, params):
        tasks.append(asyncio.create_task(one_request(args, host, port, prompt, sp.max_tokens)))
        if args.request_rate != float("inf"):
            await asyncio.sleep(rng.expovariate(args.request_rate))     # Poisson arrivals
    results = await asyncio.gather(*tasks)
    return results, time.perf_counter() - start


def report(args, results: list[Result], duration: float):
    ok = [r for r in results if r.ok]
    for r in results:
        if not r.ok:
            print(f"failed: {r.error}", file=sys.stderr)
    output_tokens = sum(r.output_len for r in ok)
    print(f"Requests: {len(ok)} of {len(results)} completed, request rate {args.request_rate}, "
          f"{'streaming' if args.stream else 'whole answers'}")
    print(f"Duration: {duration:.2f}s; Throughput: {len(ok) / duration:.2f} req/s, "
          f"{output_tokens / duration:.2f} output tok/s, "
          f"{(output_tokens + sum(r.prompt_len for r in ok)) / duration:.2f} total tok/s")
    print(f"E2E latency: {_ms([r.latency for r in ok])}")
    if args.stream:
        print(f"TTFT: {_ms([r.ttft for r in ok])}")
        print(f"TPOT: {_ms([(r.latency - r.ttft) / (r.output_len - 1) for r in ok if r.output_len > 1])}")
        print(f"ITL: {_ms([b - a for r in ok for a, b in zip(r.chunk_times, r.chunk_times[1:])])}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", help="the served model name (default: the server's only one)")
    p.add_argument("--api-key")
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--request-rate", type=float, default=float("inf"),
                   help="requests per second, Poisson arrivals (default inf: all at once)")
    p.add_argument("--stream", action="store_true", help="stream every answer (else whole answers)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    results, duration = asyncio.run(run(args))
    report(args, results, duration)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
