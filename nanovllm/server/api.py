"""The HTTP side: FastAPI routes as vLLM serves them, on the asyncio thread.

A handler reads the body (413 over the size limit), validates it (400 naming the field, 404 for another model),
tokenizes the prompt (after a cheap check of its length in characters), makes the Sequences, and only then submits
them to the engine loop. Streams are server-sent events; a client that goes away has its sequences aborted (the
stream's generator is closed, or the disconnect is seen while waiting for a whole answer)."""
import asyncio
import dataclasses
import hmac
import json
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from nanovllm.engine.llm_engine import LLMEngine
from nanovllm.engine.sequence import Sequence
from nanovllm.server.engine_loop import Delta, EngineDead, EngineLoop
from nanovllm.server.protocol import (APIError, ChatCompletionRequest, CompletionRequest, check_unsupported,
                                      parse_request, request_field, sampling_params)


class OpenAIServer:
    """What the routes need: the engine's tokenizer and limits (read only), the engine loop, the server's options."""

    def __init__(self, engine: LLMEngine, loop: EngineLoop, model_names: list[str], api_key: str | None = None,
                 max_request_bytes: int = 16 << 20):
        self.engine, self.loop, self.model_names = engine, loop, model_names
        self.api_key, self.max_request_bytes = api_key, max_request_bytes
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        self.created = int(time.time())
        # No token is longer than this many characters, so a text needs at least len(text) / max_token_chars
        # tokens: a prompt too long by that bound is refused without being tokenized.
        vocab = self.tokenizer.get_vocab() if self.tokenizer is not None else {}
        self.max_token_chars = max(map(len, vocab), default=1)

    # ---- guards -------------------------------------------------------------------------------------------

    async def authorize(self, request: Request):
        """--api-key: every route but /health needs `Authorization: Bearer KEY` (vLLM's flag, OpenAI's header)."""
        if self.api_key is not None and not hmac.compare_digest(
                request.headers.get("authorization", "").encode(), f"Bearer {self.api_key}".encode()):
            raise APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    async def _read(self, request: Request, cls):
        """The body, at most max_request_bytes (413 past it, before reading it when Content-Length says so), as
        a validated request for the served model."""
        too_large = APIError(413, f"the request body is larger than the server's limit of "
                                  f"{self.max_request_bytes} bytes", code="request_too_large")
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_request_bytes:
            raise too_large
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.max_request_bytes:
                raise too_large
        req = parse_request(cls, bytes(body))
        if req.model is not None and req.model not in self.model_names:
            raise APIError(404, f"the model {req.model!r} does not exist; this server serves "
                                f"{', '.join(map(repr, self.model_names))}", "model", "model_not_found")
        check_unsupported(req)
        if self.loop.dead is not None:
            raise APIError(503, self.loop.dead, type="server_error")
        return req

    def _check_chars(self, num_chars: int, param: str):
        if num_chars > self.max_model_len * self.max_token_chars:
            raise APIError(400, f"the prompt has {num_chars} characters, so more than max_model_len="
                                f"{self.max_model_len} tokens (no token is longer than {self.max_token_chars} "
                                f"characters)", param)

    # ---- requests to sequences ----------------------------------------------------------------------------

    def _sequences(self, req, prompts: list[list[int]], requested: int | None, logprobs: int | None,
                   param: str) -> list[list[Sequence]]:
        """Each prompt's n samples (choice i * n + j), validated by the engine: nothing is queued yet. `requested`
        is max_tokens (None: all that fits; more than fits is refused, as vLLM does)."""
        sp = sampling_params(req, self.max_model_len if requested is None else requested, logprobs)
        requests = []
        for ids in prompts:
            if len(ids) >= self.max_model_len:
                raise APIError(400, f"the prompt has {len(ids)} tokens, and max_model_len={self.max_model_len} "
                                    f"leaves no room for a completion", param)
            room = self.max_model_len - len(ids)
            if requested is not None and requested > room:
                raise APIError(400, f"max_tokens={requested} with the prompt's {len(ids)} tokens is more than "
                                    f"max_model_len={self.max_model_len}; ask for at most {room}",
                               request_field(req, "max_tokens"))
            try:
                seq = self.engine._make_sequence(ids, sp if requested is not None else
                                                 dataclasses.replace(sp, max_tokens=room), stream=req.stream)
            except ValueError as e:
                name = str(e).split(" ", 1)[0]
                raise APIError(400, str(e), request_field(req, name) if name in ("stop", "stop_token_ids",
                                                                              "logprobs") else param) from None
            requests.append(seq.fork() if req.n > 1 else [seq])     # the n samples share the prompt's blocks
        return requests

    def _encode(self, text: str, param: str, **kwargs) -> list[int]:
        if self.tokenizer is None:
            raise APIError(400, "this model has no tokenizer: send the prompt as token ids", param)
        return self.tokenizer.encode(text, **kwargs)

    async def completions(self, request: Request):
        req: CompletionRequest = await self._read(request, CompletionRequest)
        prompts = req.prompt if isinstance(req.prompt, list) and req.prompt and not isinstance(req.prompt[0], int) \
            else [req.prompt]
        if not prompts or any(not p for p in prompts):
            raise APIError(400, "prompt must not be empty", "prompt")
        for p in prompts:
            if isinstance(p, str):
                self._check_chars(len(p), "prompt")
            elif len(p) > self.max_model_len:
                raise APIError(400, f"the prompt has {len(p)} tokens, more than max_model_len="
                                    f"{self.max_model_len}", "prompt")
        ids = [self._encode(p, "prompt") if isinstance(p, str) else p for p in prompts]
        requests = self._sequences(req, ids, req.max_tokens, req.logprobs, "prompt")
        return await self._respond(request, req, requests, "text_completion")

    async def chat_completions(self, request: Request):
        req: ChatCompletionRequest = await self._read(request, ChatCompletionRequest)
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise APIError(400, "this model has no chat template: use /v1/completions", "messages")
        if not req.messages:
            raise APIError(400, "messages must not be empty", "messages")
        conversation = [{"role": m.role, "content": m.content if isinstance(m.content, str) else
                         "\n".join(part.text for part in m.content or [])} for m in req.messages]
        self._check_chars(sum(len(m["content"]) for m in conversation), "messages")
        try:
            text = self.tokenizer.apply_chat_template(conversation, tokenize=False,
                                                      add_generation_prompt=req.add_generation_prompt,
                                                      **(req.chat_template_kwargs or {}))
        except Exception as e:      # the template refused the conversation (roles out of order, ...)
            raise APIError(400, f"the chat template refused the messages: {e}", "messages") from None
        ids = self._encode(text, "messages", add_special_tokens=False)   # the template wrote the special tokens
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        max_tokens = req.max_tokens if req.max_completion_tokens is None else req.max_completion_tokens
        requests = self._sequences(req, [ids], max_tokens, logprobs, "messages")
        return await self._respond(request, req, requests, "chat.completion")

    # ---- responses ----------------------------------------------------------------------------------------

    async def _respond(self, request: Request, req, requests: list[list[Sequence]], kind: str):
        """Submit the requests to the engine loop (a stream when its response starts, so that a client gone before
        then leaves nothing running) and answer with what they get."""
        fmt = _Format(self, kind, req, [seq for samples in requests for seq in samples])
        if req.stream:
            return StreamingResponse(self._stream(requests, fmt), media_type="text/event-stream")
        return await self._whole(request, requests, fmt)

    async def _stream(self, requests: list[list[Sequence]], fmt: "_Format"):
        sink, seqs = self.loop.submit(requests, stream=True), fmt.seqs
        num_left = len(seqs)
        try:
            if fmt.chat:
                yield fmt.first_chunks()
            while num_left:
                item = await sink.get()
                while not isinstance(item, EngineDead) and not sink.empty():
                    more = sink.get_nowait()        # the client is behind: one chunk per choice for all of it
                    item = more if isinstance(more, EngineDead) else item + more
                if isinstance(item, EngineDead):
                    error = APIError(500, str(item), type="server_error").body()
                    yield f"data: {json.dumps(error)}\n\ndata: [DONE]\n\n"
                    return
                num_left -= sum(d.finish_reason is not None for d in item)
                if events := fmt.chunks(item):
                    yield events
            yield fmt.usage_chunk() + "data: [DONE]\n\n"
        finally:        # the client went away (the generator is closed or cancelled), or we are done
            if num_left:
                self.loop.abort(seqs)

    async def _whole(self, request: Request, requests: list[list[Sequence]], fmt: "_Format"):
        sink, seqs = self.loop.submit(requests, stream=False), fmt.seqs
        deltas: list[Delta] = []
        disconnect = asyncio.ensure_future(_disconnected(request))
        try:
            while len(deltas) < len(seqs):
                get = asyncio.ensure_future(sink.get())
                await asyncio.wait((get, disconnect), return_when=asyncio.FIRST_COMPLETED)
                if not get.done():
                    get.cancel()
                    return Response(status_code=499)    # nobody to answer: the finally aborts
                if isinstance(item := get.result(), EngineDead):
                    raise APIError(500, str(item), type="server_error")
                deltas += item
        finally:
            disconnect.cancel()
            if len(deltas) < len(seqs):
                self.loop.abort(seqs)
        return JSONResponse(fmt.whole(deltas))

    # ---- other routes -------------------------------------------------------------------------------------

    async def models(self):
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": self.created, "owned_by": "nanovllm",
             "root": self.engine.config.model, "max_model_len": self.max_model_len} for name in self.model_names]}

    async def health(self):
        if self.loop.dead is not None:
            raise APIError(503, self.loop.dead, type="server_error")
        return Response(status_code=200)

    async def metrics(self):
        """Prometheus text: what the engine holds now, and what the server has done."""
        scheduler, loop = self.loop.scheduler, self.loop
        blocks = scheduler.block_manager
        num_blocks, num_free = len(blocks.blocks), blocks.num_free_blocks
        values = [("num_requests_running", "gauge", len(scheduler.running)),
                  ("num_requests_waiting", "gauge", len(scheduler.waiting)),
                  ("num_requests_tracked", "gauge", loop.num_tracked),
                  ("kv_cache_blocks", "gauge", num_blocks), ("kv_cache_free_blocks", "gauge", num_free),
                  ("kv_cache_usage_perc", "gauge", 1 - num_free / num_blocks if num_blocks else 0.0),
                  ("request_success_total", "counter", loop.num_finished),
                  ("request_abort_total", "counter", loop.num_aborted),
                  ("prompt_tokens_total", "counter", loop.num_prompt_tokens),
                  ("generation_tokens_total", "counter", loop.num_generation_tokens),
                  ("engine_dead", "gauge", int(loop.dead is not None))]
        return PlainTextResponse("".join(f"# TYPE nanovllm:{name} {kind}\nnanovllm:{name} {value}\n"
                                         for name, kind, value in values))


async def _disconnected(request: Request):
    """Returns once the client has gone away (the body is read already, so what comes next is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _Format:
    """OpenAI's response objects for one request: whole, or as `chat.completion.chunk` / `text_completion` chunks."""

    def __init__(self, server: OpenAIServer, kind: str, req, seqs: list[Sequence]):
        self.tokenizer, self.kind, self.chat = server.tokenizer, kind, kind == "chat.completion"
        self.n, self.seqs = req.n, seqs
        self.include_usage = bool(req.stream_options and req.stream_options.include_usage)
        self.top_n = (req.top_logprobs or 0) if self.chat else req.logprobs
        self.text_offset = [0] * len(seqs)      # completions' logprobs: where each token's text starts
        self.num_completion_tokens = 0
        self.head = {"id": f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}",
                     "object": kind + (".chunk" if self.chat else ""), "created": int(time.time()),
                     "model": req.model or server.model_names[0]}
        # A chunk event is this head's JSON with the choices added: the head is written once, not once per token.
        self._event_head = f'data: {json.dumps(self.head)[:-1]}, "choices": '
        self._event_tail = ', "usage": null}\n\n' if self.include_usage else "}\n\n"

    def _usage(self) -> dict:
        prompt = sum(seq.num_prompt_tokens for seq in self.seqs[::self.n])   # each prompt once, whatever n
        return {"prompt_tokens": prompt, "completion_tokens": self.num_completion_tokens,
                "total_tokens": prompt + self.num_completion_tokens}

    def _choice(self, d: Delta, whole: bool) -> dict:
        logprobs = self._logprobs(d) if d.logprobs is not None else None
        if not self.chat:
            return {"index": d.index, "text": d.text, "logprobs": logprobs, "finish_reason": d.finish_reason}
        if whole:
            message = {"role": "assistant", "content": d.text}
            return {"index": d.index, "message": message, "logprobs": logprobs, "finish_reason": d.finish_reason}
        delta = {"content": d.text} if d.text else {}
        return {"index": d.index, "delta": delta, "logprobs": logprobs, "finish_reason": d.finish_reason}

    def _logprobs(self, d: Delta) -> dict:
        def token(token_id):
            return self.tokenizer.decode([token_id]) if self.tokenizer is not None else f"token_id:{token_id}"

        def top(lps):       # the top n by logprob: the dict holds them and the sampled token
            return sorted(lps.items(), key=lambda kv: -kv[1])[:self.top_n]
        entries = [(token(t), max(lps[t], -9999.0), lps) for t, lps in zip(d.token_ids, d.logprobs)]
        if self.chat:
            return {"content": [{"token": s, "logprob": lp, "bytes": list(s.encode()), "top_logprobs": [
                {"token": (ts := token(t)), "logprob": max(v, -9999.0), "bytes": list(ts.encode())}
                for t, v in top(lps)]} for s, lp, lps in entries]}
        offsets = []
        for s, _, _ in entries:
            offsets.append(self.text_offset[d.index])
            self.text_offset[d.index] += len(s)
        return {"tokens": [s for s, _, _ in entries], "token_logprobs": [lp for _, lp, _ in entries],
                "top_logprobs": [{token(t): max(v, -9999.0) for t, v in top(lps)} for _, _, lps in entries],
                "text_offset": offsets}

    def whole(self, deltas: list[Delta]) -> dict:
        self.num_completion_tokens += sum(len(d.token_ids) for d in deltas)
        choices = [self._choice(d, whole=True) for d in sorted(deltas, key=lambda d: d.index)]
        return self.head | {"object": self.kind, "choices": choices, "usage": self._usage()}

    def _event(self, choices: list[dict]) -> str:
        return self._event_head + json.dumps(choices) + self._event_tail

    def first_chunks(self) -> str:
        """Chat streams open each choice with the assistant's role, as OpenAI's do."""
        return "".join(self._event([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                     "finish_reason": None}]) for i in range(len(self.seqs)))

    def chunks(self, deltas: list[Delta]) -> str:
        """One chunk per choice that got tokens, even when their text is held back (or there is no tokenizer),
        as vLLM's: a choice's deltas are merged (several when the client is behind)."""
        merged: dict[int, Delta] = {}
        for d in deltas:
            self.num_completion_tokens += len(d.token_ids)
            if (m := merged.get(d.index)) is not None:
                d = Delta(d.index, m.text + d.text, m.token_ids + d.token_ids,
                          None if d.logprobs is None else m.logprobs + d.logprobs, d.finish_reason)
            merged[d.index] = d
        return "".join(self._event([self._choice(d, whole=False)]) for d in merged.values()
                       if d.token_ids or d.text or d.finish_reason is not None)

    def usage_chunk(self) -> str:
        if not self.include_usage:
            return ""
        return f"data: {json.dumps(self.head | {'choices': [], 'usage': self._usage()})}\n\n"


def build_app(server: OpenAIServer) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_app):
        server.loop.attach(asyncio.get_running_loop())
        yield

    app = FastAPI(title="nano-vllm", lifespan=lifespan)

    async def api_error(_request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)
    app.add_exception_handler(APIError, api_error)

    async def internal_error(_request, e: Exception):
        return JSONResponse(APIError(500, f"{type(e).__name__}: {e}", type="server_error").body(), status_code=500)
    app.add_exception_handler(Exception, internal_error)

    guarded = APIRouter(dependencies=[Depends(server.authorize)])
    guarded.add_api_route("/v1/completions", server.completions, methods=["POST"])
    guarded.add_api_route("/v1/chat/completions", server.chat_completions, methods=["POST"])
    guarded.add_api_route("/v1/models", server.models, methods=["GET"])
    guarded.add_api_route("/metrics", server.metrics, methods=["GET"])
    app.include_router(guarded)
    app.add_api_route("/health", server.health, methods=["GET"])
    return app
