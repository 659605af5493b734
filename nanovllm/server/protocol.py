"""The request bodies the server accepts, as OpenAI and vLLM spell them, and OpenAI's error object.

Types are checked strictly (a string is no number, true no integer); ranges are SamplingParams' own checks, so a
request is refused with the same words as `LLM.generate`. Fields this server does not know are ignored, as vLLM
does; fields it knows but cannot honour (a suffix, tools, logit_bias) are refused."""
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from nanovllm.sampling_params import SamplingParams

MAX_N = 128                 # OpenAI's limit on choices per request
MAX_LOGPROBS = 20           # vLLM's default max_logprobs


class APIError(Exception):
    """An error the client gets as OpenAI's error object, {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Request(_Strict):
    """The fields of both endpoints: the model, how many choices, streaming, and the sampling controls."""
    model: str | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    # vLLM's extra sampling parameters
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True


class CompletionRequest(_Request):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class TextPart(_Strict):
    type: str
    text: str | None = None


class ChatMessage(_Strict):
    role: str
    content: str | list[TextPart] | None = None


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None


def parse_request(cls: type[_Request], body: bytes) -> _Request:
    """Validate a JSON body as `cls`; APIError 400 naming the field otherwise."""
    try:
        return cls.model_validate_json(body, strict=True)
    except ValidationError as e:
        err = e.errors()[0]
        if err["type"] == "json_invalid":
            raise APIError(400, f"the request body is not valid JSON: {err['msg']}") from None
        if not err["loc"]:
            raise APIError(400, "the request body must be a JSON object") from None
        param = _param_path(err["loc"])
        if err["type"] == "missing":
            raise APIError(400, f"{param} is required", param) from None
        raise APIError(400, f"{param}: {err['msg']}, got {err.get('input')!r:.80}", param) from None


def _param_path(loc: tuple) -> str:
    """pydantic's location as a field path, `messages[0].content`, without the union members it tried."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif "[" not in part and part not in ("str", "int", "float", "bool", "dict"):
            path += f".{part}" if path else part
    return path


_SAMPLING_FIELDS = ("n", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids", "presence_penalty",
                    "frequency_penalty", "repetition_penalty", "ignore_eos", "min_tokens",
                    "include_stop_str_in_output", "skip_special_tokens")


def check_unsupported(req: _Request):
    """Refuse, before any work, what the request asks for and this server cannot do."""
    if req.n < 1 or req.n > MAX_N:
        raise APIError(400, f"n must be an integer in [1, {MAX_N}], got {req.n}", "n")
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "stream_options is only allowed when stream is true", "stream_options")
    if req.logit_bias:
        raise APIError(400, "logit_bias is not supported by this server", "logit_bias")
    unsupported = []
    if isinstance(req, CompletionRequest):
        unsupported = [("echo", req.echo), ("suffix", req.suffix),
                       ("best_of", req.best_of is not None and req.best_of != req.n)]
        if req.logprobs is not None and not 0 <= req.logprobs <= MAX_LOGPROBS:
            raise APIError(400, f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {req.logprobs}",
                           "logprobs")
    elif isinstance(req, ChatCompletionRequest):
        fmt = (req.response_format or {}).get("type", "text")
        unsupported = [("tools", req.tools), ("tool_choice", req.tool_choice not in (None, "none", "auto")),
                       ("response_format", fmt != "text")]
        if req.top_logprobs is not None:
            if not req.logprobs:
                raise APIError(400, "top_logprobs needs logprobs to be true", "top_logprobs")
            if not 0 <= req.top_logprobs <= MAX_LOGPROBS:
                raise APIError(400, f"top_logprobs must be an integer in [0, {MAX_LOGPROBS}], "
                                    f"got {req.top_logprobs}", "top_logprobs")
        for i, message in enumerate(req.messages):
            for j, part in enumerate(message.content if isinstance(message.content, list) else []):
                if part.type != "text" or part.text is None:
                    raise APIError(400, f"only text content parts are supported, got type {part.type!r}",
                                   f"messages[{i}].content[{j}]")
    for name, used in unsupported:
        if used:
            raise APIError(400, f"{name} is not supported by this server", name)


def sampling_params(req: _Request, max_tokens: int, logprobs: int | None) -> SamplingParams:
    """The request's SamplingParams; APIError 400 naming the request's field when a value is out of range."""
    kwargs = {"max_tokens": max_tokens, "logprobs": logprobs}
    kwargs |= {name: value for name in _SAMPLING_FIELDS if (value := getattr(req, name)) is not None}
    try:
        return SamplingParams(**kwargs)
    except ValueError as e:
        name = str(e).split(" ", 1)[0]
        raise APIError(400, str(e), request_field(req, name)) from None


def request_field(req: _Request, name: str) -> str:
    """The request's name for SamplingParams' field `name`."""
    if isinstance(req, ChatCompletionRequest):
        if name == "max_tokens" and req.max_completion_tokens is not None:
            return "max_completion_tokens"
        if name == "logprobs":
            return "top_logprobs"
    return name
