"""The OpenAI chat-completions wire format: requests, responses, stream chunks and errors.

Only what genpi serves is modelled; a request field the server does not support is refused by
name (:func:`unsupported`) instead of being ignored, so a client never gets a silently different
answer than it asked for.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from genpi.errors import unpaired_surrogate

MODES = ("adapter", "prompt")
MAX_STOPS = 4  # as OpenAI's API
MAX_STOP_CHARS = 64  # the stop check's tables grow with vocabulary x stop length (~200 kB a character)
MODE_HEADER = "x-genpi-mode"


class APIError(Exception):
    """An error the client sees as ``{"error": {"message", "type", "param", "code"}}`` with ``status``."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _check_text(text: str) -> None:
    """A validation error for text no tokenizer can encode (an unpaired surrogate, sent as \\ud800)."""
    if (at := unpaired_surrogate(text)) is not None:
        raise PydanticCustomError("text", f"holds an unpaired surrogate (\\u{ord(text[at]):04x}) at character {at}")


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, value: Any) -> Any:
        """One clear error for content that is neither text nor a list of text parts."""
        if isinstance(value, list):
            for k, part in enumerate(value):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                if kind != "text":
                    raise PydanticCustomError(
                        "content_part", f"part {k} is of type {kind!r}; this server reads text parts only"
                    )
        elif not isinstance(value, str):
            raise PydanticCustomError("content", "should be a string or a list of text parts")
        return value

    @field_validator("content")
    @classmethod
    def _unicode(cls, value: str | list[TextPart]) -> str | list[TextPart]:
        for text in [value] if isinstance(value, str) else [p.text for p in value]:
            _check_text(text)
        return value

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """``POST /v1/chat/completions``. Fields the server does not know are kept (``extra``) and
    checked by :func:`unsupported`, so a client gets a 400 naming them rather than an answer
    that ignored them."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    messages: list[ChatMessage]
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1)
    user: str | None = None

    @field_validator("temperature", "top_p", "n", "stream", mode="before")
    @classmethod
    def _null_is_default(cls, value: Any, info: ValidationInfo) -> Any:
        """``null`` means the default, as in OpenAI's API."""
        return cls.model_fields[info.field_name].default if value is None else value

    @field_validator("stop")
    @classmethod
    def _few_short_stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > MAX_STOPS:
            raise PydanticCustomError("stop", f"at most {MAX_STOPS} stop sequences, got {len(stops)}")
        for stop in stops:
            if len(stop) > MAX_STOP_CHARS:
                raise PydanticCustomError("stop", f"a stop sequence has at most {MAX_STOP_CHARS} characters")
            _check_text(stop)
        return value

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return tuple(s for s in stops if s)


# Fields the OpenAI API defines whose effect genpi does not give; a request using them gets a 400.
_UNSUPPORTED = (
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "response_format",
    "logit_bias",
    "logprobs",
    "top_logprobs",
    "audio",
    "modalities",
    "prediction",
    "parallel_tool_calls",
)
# Fields accepted and ignored because their neutral value is all a client can mean by them here.
_NEUTRAL = {
    "frequency_penalty": 0,
    "presence_penalty": 0,
    "store": False,
    "metadata": None,
    "service_tier": None,
    "reasoning_effort": None,
}


def unsupported(request: ChatCompletionRequest) -> APIError | None:
    """A 400 naming the first request field this server does not support, or None."""
    if request.n != 1:
        return APIError(
            400, "n > 1 is not supported: ask once per reply (or vary seed)", param="n", code="unsupported_parameter"
        )
    extra = request.model_extra or {}
    for name in _UNSUPPORTED:
        if extra.get(name) not in (None, False, [], {}):
            return APIError(400, f"'{name}' is not supported by this server", param=name, code="unsupported_parameter")
    for name, value in extra.items():
        if name in _UNSUPPORTED or (name in _NEUTRAL and value in (_NEUTRAL[name], None)):
            continue
        return APIError(400, f"unsupported parameter '{name}'", param=name, code="unsupported_parameter")
    if request.stream_options is not None and not request.stream:
        return APIError(400, "stream_options needs stream: true", param="stream_options")
    return None


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    """Token counts; ``prompt_tokens_saved`` (genpi) is the prompt's length that the adapter made
    unnecessary to send or compute (0 in prompt mode, where the prompt is read)."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)
    prompt_tokens_saved: int = 0


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str


class ChatCompletion(BaseModel):
    """A whole reply. ``genpi_mode`` says what answered: the adapter, or the base model reading the
    prompt; ``system_fingerprint`` names exactly which (``name@version``, or ``prompt:name@hash``)."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[Choice]
    usage: Usage
    genpi_mode: str


class Delta(BaseModel):
    role: str | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    genpi_mode: str


class ModelCard(BaseModel):
    """One servable prompt in ``GET /v1/models``: OpenAI's fields, then genpi's."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "genpi"
    version: str | None = None  # the published adapter version ``id`` means now (None: no adapter)
    base_model: str
    mode: str  # adapter | prompt | unavailable
    retention: dict[str, float | None] = Field(default_factory=dict)
    gap_closed: dict[str, float | None] = Field(default_factory=dict)
    parity: str = ""  # passed | unchecked (...) | failed: why
    rejected: dict[str, str] = Field(default_factory=dict)  # version -> why it is not served


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())
