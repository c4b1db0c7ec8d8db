"""The OpenAI-compatible HTTP API: ``/v1/chat/completions``, ``/v1/models``, ``/health``.

The ingress deployment (no CPU of its own) authenticates, validates, resolves ``model`` through
the catalog, renders the conversation (prompt mode puts the prompt first), checks it fits the
context, and streams the model replica's events back as OpenAI responses. A client's mistake is a
4xx in OpenAI's error shape, never a 5xx (the stock client retries those); an error after a
stream started is a ``data: {"error": ...}`` event, then ``data: [DONE]``.
"""

import asyncio
import hmac
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from ray import serve
from starlette.exceptions import HTTPException
from transformers import AutoTokenizer

from genpi.chat import context_length, request_ids
from genpi.config import config_from_dict
from genpi.engines.base import SamplingParams, leaves_no_room
from genpi.models import resolve_model
from genpi.prompt.spec import PromptSpec
from genpi.serve import fallback
from genpi.serve.catalog import Catalog, Target
from genpi.serve.metrics import RequestMetrics
from genpi.serve.protocol import (
    MODE_HEADER,
    APIError,
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    Delta,
    ModelCard,
    ModelList,
    PromptTokensDetails,
    Usage,
    completion_id,
    now,
    unsupported,
)
from genpi.store import store_for

log = logging.getLogger(__name__)

API_KEY_ENV = "GENPI_API_KEY"
_REJECTED_RETRIES = 3  # versions refused in a row before the request gives up

api = FastAPI(title="genpi", docs_url=None, redoc_url=None)


def _error(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


@api.exception_handler(APIError)
async def _api_error(request: Request, e: APIError) -> JSONResponse:
    return _error(e)


@api.exception_handler(RequestValidationError)
async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
    return _error(_invalid_request(e.errors()))


@api.exception_handler(HTTPException)
async def _http(request: Request, e: HTTPException) -> JSONResponse:
    kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
    return _error(APIError(e.status_code, str(e.detail), type=kind))


@api.exception_handler(Exception)
async def _unexpected(request: Request, e: Exception) -> JSONResponse:
    log.exception("%s %s failed", request.method, request.url.path)
    return _error(APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error"))


def _invalid_request(errors: list[Any]) -> APIError:
    """A 400 naming one field that failed validation: the most specific (deepest) error, so a list
    in a ``str | list`` field is judged as a list."""
    if not errors:
        return APIError(400, "invalid request")
    error = max(errors, key=lambda e: len(e.get("loc", ())))
    param = _param(error.get("loc", ()))
    return APIError(400, f"{param or 'request'}: {error.get('msg', 'invalid')}", param=param)


_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict"}  # no request field is named so


def _param(loc: tuple | list) -> str | None:
    """``("body", "messages", 0, "content")`` → ``messages[0].content``; the tag pydantic puts after
    a field for each type of a union (``stop.str``, ``content.list[TextPart]``) is left out."""
    out = ""
    for part in loc:
        if part == "body" or (isinstance(part, str) and (part in _UNION_TAGS or "[" in part)):
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None


def _usage(done: dict[str, Any], saved: int) -> Usage:
    return Usage(
        prompt_tokens=done["prompt_tokens"],
        completion_tokens=done["completion_tokens"],
        total_tokens=done["prompt_tokens"] + done["completion_tokens"],
        prompt_tokens_details=PromptTokensDetails(cached_tokens=done.get("cached_tokens", 0)),
        prompt_tokens_saved=saved,
    )


def _finish(reason: str) -> str:
    return "length" if reason == "context" else reason


def _sse(payload: Any) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024)
@serve.ingress(api)
class OpenAIServer:
    """The API's ingress deployment; ``model`` is a handle to the model replicas."""

    def __init__(self, model: Any, settings: dict[str, Any]) -> None:
        self.cfg = config_from_dict(settings["config"])
        self.model = model
        target = self.cfg.models.target
        folder = resolve_model(target.name)
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        own = context_length(folder)
        self.max_context = min(target.max_context, own) if target.max_context else own
        specs = [PromptSpec.from_json(s) for s in settings["prompts"]]
        self.catalog = Catalog(store_for(self.cfg.store), specs, target.name, self.cfg.serve.refresh_s)
        self.api_key = self.cfg.serve.api_key or os.environ.get(API_KEY_ENV, "")
        self.saved: dict[str, int] = {}  # prompt_hash -> the prompt's tokens
        self.metrics = RequestMetrics()

    def _authorize(self, request: Request) -> None:
        if not self.api_key:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.api_key.encode()):
            raise APIError(
                401, "missing or wrong API key: send 'Authorization: Bearer <key>'", param=None, code="invalid_api_key"
            )

    async def _body(self, request: Request) -> Any:
        limit = self.cfg.serve.max_body_kib * 1024
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise APIError(413, f"request body over {self.cfg.serve.max_body_kib} KiB", code="request_too_large")
        body = b""
        async for part in request.stream():
            body += part
            if len(body) > limit:
                raise APIError(413, f"request body over {self.cfg.serve.max_body_kib} KiB", code="request_too_large")
        try:
            return json.loads(body)
        except ValueError as e:  # bad syntax, not UTF-8, a number too long to read
            raise APIError(400, f"request body is not valid JSON: {e}") from None
        except RecursionError:
            raise APIError(400, "request body is not valid JSON: nested too deeply") from None

    @api.get("/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/v1/models")
    async def models(self, request: Request) -> ModelList:
        self._authorize(request)
        return ModelList(data=await asyncio.to_thread(self.catalog.cards))  # store reads off the event loop

    @api.get("/v1/models/{model:path}")
    async def model_card(self, model: str, request: Request) -> ModelCard:
        """OpenAI's ``GET /v1/models/{model}`` (``client.models.retrieve``)."""
        self._authorize(request)
        return await asyncio.to_thread(self.catalog.card, model)

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request) -> Response:
        self._authorize(request)
        try:
            body = ChatCompletionRequest.model_validate(await self._body(request))
        except ValidationError as e:
            raise _invalid_request(e.errors()) from None
        if (refused := unsupported(body)) is not None:
            raise refused
        messages = self._messages(body)
        started = time.monotonic()
        for _ in range(_REJECTED_RETRIES):
            target = await asyncio.to_thread(self.catalog.resolve, body.model)
            conversation = fallback.prompt_conversation(target.spec, messages) if target.spec else messages
            n = len(request_ids(self.tokenizer, conversation))
            if leaves_no_room(n, self.max_context):
                raise APIError(
                    400,
                    f"the conversation is {n} tokens{' with the prompt' if target.spec else ''}; "
                    f"this model's context is {self.max_context}",
                    param="messages",
                    code="context_length_exceeded",
                )
            events = self._send(body, target, conversation)
            first = await events.__anext__()
            if "rejected" not in first:
                break
            self.catalog.reject(target.key, first["rejected"])
        else:
            raise APIError(
                503, f"{body.model}: every version tried was refused", type="server_error", code="model_rejected"
            )
        if "error" in first:
            self.metrics.finished(target.prompt, target.mode, 500, None, 0)
            raise APIError(500, first["error"], type="server_error")
        saved = self._saved(target)
        headers = {MODE_HEADER: target.mode}
        if body.stream:
            return StreamingResponse(
                self._stream(body, target, first, events, saved, started),
                media_type="text/event-stream",
                headers=headers,
            )
        done = first if "done" in first else None
        async for event in events:  # a non-streamed request gets no deltas: this is its one event
            done = event
        if done is None or "done" not in done:
            message = (done or {}).get("error", "no reply")
            self.metrics.finished(target.prompt, target.mode, 500, None, 0)
            raise APIError(500, message, type="server_error")
        result = done["done"]
        self._checked(target, result)
        usage = _usage(result, saved)
        self.metrics.finished(target.prompt, target.mode, 200, usage.model_dump(), time.monotonic() - started)
        reply = ChatCompletion(
            id=completion_id(),
            created=now(),
            model=body.model,
            system_fingerprint=target.key,
            genpi_mode=target.mode,
            choices=[
                Choice(message=AssistantMessage(content=result["text"]), finish_reason=_finish(result["finish_reason"]))
            ],
            usage=usage,
        )
        return JSONResponse(reply.model_dump(), headers=headers)

    def _messages(self, body: ChatCompletionRequest) -> list[dict[str, str]]:
        """The client's messages as chat messages (``developer`` is a system message); none may be empty."""
        if not body.messages:
            raise APIError(400, "messages must not be empty", param="messages")
        out = []
        for k, m in enumerate(body.messages):
            text = m.text()
            if not text.strip():
                raise APIError(400, f"messages[{k}] has no content", param=f"messages[{k}].content")
            out.append({"role": "system" if m.role == "developer" else m.role, "content": text})
        return out

    def _send(self, body: ChatCompletionRequest, target: Target, conversation: list[dict[str, str]]) -> AsyncIterator:
        sampled = not SamplingParams(temperature=body.temperature).greedy
        params = {
            "max_new_tokens": body.max_completion_tokens or body.max_tokens or self.cfg.serve.max_tokens,
            # greedy ignores the seed (and a temperature too small to divide by is greedy): leave them
            # out so such requests batch together; an unseeded sampled request gets seed 0 (the
            # same conversation, the same sample)
            "temperature": body.temperature if sampled else 0.0,
            "top_p": body.top_p,
            "seed": (body.seed or 0) if sampled else 0,
            "stop": list(body.stop_strings()),
        }
        description = (
            {"mode": "adapter", "adapter": target.adapter.to_json()}
            if target.adapter is not None
            else {"mode": "prompt", "spec": target.spec.to_json()}
        )
        handle = self.model.options(multiplexed_model_id=target.key, stream=True)
        return handle.generate.remote(
            {"target": description, "messages": conversation, "params": params, "stream": body.stream}
        ).__aiter__()

    def _saved(self, target: Target) -> int:
        """The prompt tokens an adapter saved this request (0 in prompt mode, or when the prompt's text is unknown)."""
        if target.adapter is None:
            return 0
        h = target.adapter.prompt_hash
        if h not in self.saved:
            spec = self.catalog.spec(target.prompt, h)
            self.saved[h] = fallback.prompt_tokens(self.tokenizer, spec) if spec else 0
        return self.saved[h]

    def _checked(self, target: Target, result: dict[str, Any]) -> None:
        if target.adapter is not None and result.get("parity"):
            self.catalog.parity[target.key] = result["parity"]

    async def _stream(
        self,
        body: ChatCompletionRequest,
        target: Target,
        first: dict[str, Any],
        events: AsyncIterator,
        saved: int,
        started: float,
    ) -> AsyncIterator[str]:
        cid, created, status, usage = completion_id(), now(), 200, None

        def chunk(delta: Delta, finish: str | None = None, usage: Usage | None = None, last: bool = False) -> str:
            choices = [] if last else [ChunkChoice(delta=delta, finish_reason=finish)]
            return _sse(
                ChatCompletionChunk(
                    id=cid,
                    created=created,
                    model=body.model,
                    system_fingerprint=target.key,
                    choices=choices,
                    usage=usage,
                    genpi_mode=target.mode,
                ).model_dump(exclude_none=True)
            )

        yield chunk(Delta(role="assistant", content=""))
        event: dict[str, Any] | None = first
        streamed = False
        try:
            while event is not None:
                if "delta" in event:
                    if not streamed:
                        streamed = True
                        self.metrics.first_token.observe(
                            time.monotonic() - started, tags={"prompt": target.prompt, "mode": target.mode}
                        )
                    yield chunk(Delta(content=event["delta"]))
                elif "done" in event:
                    result = event["done"]
                    self._checked(target, result)
                    usage = _usage(result, saved)
                    yield chunk(Delta(), finish=_finish(result["finish_reason"]))
                    if body.stream_options is not None and body.stream_options.include_usage:
                        yield chunk(Delta(), usage=usage, last=True)
                    break
                else:
                    status = 500
                    yield _sse(APIError(500, event.get("error", "generation failed"), type="server_error").body())
                    break
                event = await events.__anext__()
        except Exception as e:  # the replica died mid-stream: the client still gets an error and [DONE]
            log.exception("stream of %s failed", body.model)
            status = 500
            yield _sse(APIError(500, f"generation failed: {e}", type="server_error").body())
        yield _sse("[DONE]")
        self.metrics.finished(
            target.prompt, target.mode, status, usage.model_dump() if usage else None, time.monotonic() - started
        )
