"""The HTTP API: OpenAI-style `/v1/chat/completions` and `/v1/images/generations`, and `/health`.

Every bad request gets HTTP 400 (413 for a body over MAX_BODY_BYTES) with
`{"error": {"message": ..., "type": "invalid_request_error"}}` naming the problem; an unexpected
failure gets 500 in the same shape and the server keeps serving.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import re
import time
import uuid
from typing import Annotated, Any, AsyncIterator, Callable, Coroutine, Literal

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..eval.clause_judge import RANK_CHOICES
from ..pipeline import ChatStream
from .worker import ImageSettings, ModelWorker

log = logging.getLogger(__name__)

MAX_IMAGE_BYTES = 8 * 2**20  # per uploaded image, after base64 decoding
MAX_IMAGE_PIXELS = 4096 * 4096  # per uploaded image, checked from its header before decoding
MAX_IMAGES_PER_REQUEST = 8
MAX_NEW_TOKENS = 4096
MAX_IMAGES_PER_PROMPT = 8
MAX_CANDIDATES = 8  # images drawn per image returned
MAX_CFG_WEIGHT = 50.0
MAX_TEMPERATURE = 2.0
MAX_SEED = 2**63 - 1
# A whole request body: room for the most images at the largest size, base64-encoded, plus text.
MAX_BODY_BYTES = MAX_IMAGES_PER_REQUEST * MAX_IMAGE_BYTES * 4 // 3 + 2**20
_DATA_URL = re.compile(r"data:image/[\w.+-]+;base64,(.*)", re.DOTALL)


class BadRequest(Exception):
    """A client error, answered with HTTP 400 and this message."""


class _Strict(BaseModel):
    # Unknown keys are errors, and no type coercion: "n": "2" is as wrong as "n": 2.5.
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageURL(_Strict):
    url: str


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: list[Annotated[TextPart | ImagePart, Field(discriminator="type")]]

    @field_validator("content", mode="before")
    @classmethod
    def _parts(cls, content: object) -> object:
        """A plain string is one text part (one schema, so errors name one problem, not a union's two)."""
        if isinstance(content, str):
            return [{"type": "text", "text": content}]
        if not isinstance(content, list):
            raise ValueError("content must be a string or a list of text and image_url parts")
        return content


class ChatRequest(_Strict):
    messages: list[ChatMessage] = Field(min_length=1)
    model: str | None = None  # accepted for OpenAI clients; this server has one model
    max_tokens: int = Field(512, ge=1, le=MAX_NEW_TOKENS)
    temperature: float = Field(0.0, ge=0, le=MAX_TEMPERATURE, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stream: bool = False


class ImageRequest(_Strict):
    prompt: str
    model: str | None = None  # accepted for OpenAI clients; this server has one model
    n: int = Field(1, ge=1, le=MAX_IMAGES_PER_PROMPT)
    cfg: float | None = Field(None, ge=0, le=MAX_CFG_WEIGHT, allow_inf_nan=False)  # None: the model's default
    temperature: float | None = Field(None, ge=0, le=MAX_TEMPERATURE, allow_inf_nan=False)  # None: the model's default
    top_k: int | None = Field(None, ge=1)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    candidates: int = Field(1, ge=1, le=MAX_CANDIDATES)  # draw this many per image, keep the best by rank_by
    rank_by: Literal[RANK_CHOICES] = "likelihood"
    response_format: Literal["b64_json"] = "b64_json"

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, prompt: str) -> str:
        if not prompt.strip():
            raise ValueError("prompt is empty")
        return prompt


def decode_image(url: str, where: str) -> Image.Image:
    """A base64 data URL -> RGB image, within the byte and pixel limits."""
    match = _DATA_URL.fullmatch(url)
    if not match:
        raise BadRequest(f"{where}: image_url must be a base64 data URL (data:image/png;base64,...)")
    payload = match.group(1)
    if len(payload) * 3 // 4 > MAX_IMAGE_BYTES + 2:  # checked before decoding anything
        raise BadRequest(f"{where}: image is larger than the limit of {MAX_IMAGE_BYTES} bytes")
    try:
        data = base64.b64decode(payload, validate=True)
    except binascii.Error:
        raise BadRequest(f"{where}: image_url is not valid base64") from None
    if len(data) > MAX_IMAGE_BYTES:
        raise BadRequest(f"{where}: image is {len(data)} bytes, the limit is {MAX_IMAGE_BYTES}")
    try:
        image = Image.open(io.BytesIO(data))  # reads the header only
        if image.width * image.height > MAX_IMAGE_PIXELS:
            raise BadRequest(
                f"{where}: image is {image.width}x{image.height} pixels, the limit is {MAX_IMAGE_PIXELS} pixels"
            )
        return image.convert("RGB")
    except UnidentifiedImageError:
        raise BadRequest(f"{where}: not an image in a format that can be read") from None
    except (OSError, SyntaxError, Image.DecompressionBombError) as error:
        raise BadRequest(f"{where}: cannot decode the image ({error})") from None


def conversation(messages: list[ChatMessage]) -> tuple[str, list[Image.Image], list[dict]]:
    """OpenAI messages -> (the last user message, its images, the earlier turns as Janus history, which
    starts with the system message when there is one)."""
    turns, image_count = [], 0
    first = int(messages[0].role == "system")
    for i, message in enumerate(messages):
        expected = "system" if i < first else ("user", "assistant")[(i - first) % 2]
        if message.role != expected:
            raise BadRequest(
                f"messages[{i}] has role '{message.role}', expected '{expected}': after an optional first "
                "system message, messages alternate user and assistant, starting and ending with user"
            )
        text = "\n".join(part.text for part in message.content if isinstance(part, TextPart))
        urls = [part.image_url.url for part in message.content if isinstance(part, ImagePart)]
        if not text.strip():
            raise BadRequest(f"messages[{i}] has no text")
        if urls and message.role != "user":
            raise BadRequest(f"messages[{i}]: only user messages may carry images")
        image_count += len(urls)
        if image_count > MAX_IMAGES_PER_REQUEST:  # before decoding any more of them
            raise BadRequest(f"too many images: the limit is {MAX_IMAGES_PER_REQUEST} per request")
        images = [decode_image(url, f"messages[{i}] image {j}") for j, url in enumerate(urls)]
        turns.append({"role": message.role, "content": text, "images": images})
    if turns[-1]["role"] != "user":
        raise BadRequest("the last message must be the user's")
    last = turns.pop()
    return last["content"], last["images"], turns


def png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _client_error(message: str, status: int = 400, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error"}}, status_code=status, headers=headers)


def _validation_message(error: RequestValidationError) -> str:
    """Pydantic's errors as one line: 'messages[0].role: Input should be ...; n: ...'."""
    lines = []
    for e in error.errors():
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e["loc"] if p != "body").lstrip(".") or "body"
        message = e["msg"].removeprefix("Value error, ")  # our validators' own messages
        lines.append(f"unknown field '{where}'" if e["type"] == "extra_forbidden" else f"{where}: {message}")
    return "; ".join(lines)


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


class _LimitBody:
    """ASGI middleware: a body of more than `limit` bytes sent to the API gets HTTP 413 before it is
    all held in memory. A declared Content-Length is checked before reading; otherwise (chunked
    uploads) the bytes are counted as they arrive. Either way the rest is read and dropped before
    the 413 goes out."""

    def __init__(self, app: Callable, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._too_large(scope, receive, send, more=True)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.limit:
                return await self._too_large(scope, receive, send, more)
        body = {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        async def replay() -> dict:
            nonlocal body
            if body is None:
                return await receive()  # afterwards: disconnect notices, for streaming answers
            message, body = body, None
            return message

        await self.app(scope, replay, send)

    async def _too_large(self, scope: dict, receive: Callable, send: Callable, more: bool) -> None:
        # Read and drop what the client is still sending (up to twice `limit` bytes) before
        # answering: closing a socket that holds unread bytes resets the connection, and the
        # client can lose the 413 it was sent. A client that sends more than that may lose it.
        dropped = 0
        while more and dropped <= 2 * self.limit:
            message = await receive()
            if message["type"] != "http.request":  # the client left
                return
            dropped += len(message.get("body", b""))
            more = message.get("more_body", False)
        message = f"request body is larger than the limit of {self.limit} bytes"
        await _client_error(message, 413, {"connection": "close"})(scope, receive, send)


def add_api(app: FastAPI, worker: ModelWorker, model_name: str) -> None:
    """Add the API routes, the JSON error handlers and the request-body limit to `app`."""
    app.add_middleware(_LimitBody, limit=MAX_BODY_BYTES)

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, error: BadRequest) -> JSONResponse:
        return _client_error(str(error))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        return _client_error(_validation_message(error))

    router = APIRouter(route_class=_AnswerInternalErrors)

    @router.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model_name, "queued": worker.queued}

    @router.post("/v1/images/generations")
    async def images(request: ImageRequest) -> dict:
        settings = ImageSettings(request.cfg, request.temperature, request.top_k, request.top_p, request.candidates, request.rank_by)
        try:
            pictures = await worker.generate_images(request.prompt, request.n, settings, request.seed)
        except ValueError as error:  # the pipeline's own checks, e.g. a prompt too long for the model
            raise BadRequest(str(error)) from None
        return {"created": int(time.time()), "data": [{"b64_json": png_base64(p)} for p in pictures]}

    @router.post("/v1/chat/completions")
    async def chat_completions(request: ChatRequest):
        message, pictures, history = conversation(request.messages)
        options = dict(max_new_tokens=request.max_tokens, temperature=request.temperature, top_p=request.top_p, seed=request.seed)
        ended: list[ChatStream] = []  # the worker's on_finish fills it after the last piece
        pieces = worker.chat(message, pictures, history, on_finish=ended.append, **options)
        try:  # the first piece, before any byte is sent, so that bad input still gets a 400
            first = await anext(pieces, "")
        except ValueError as error:
            raise BadRequest(str(error)) from None
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}
        if request.stream:
            return StreamingResponse(_stream(head, first, pieces, ended), media_type="text/event-stream")
        text = first + "".join([piece async for piece in pieces])
        answer = ended[0]
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": answer.finish_reason}
        usage = {
            "prompt_tokens": answer.prompt_tokens,
            "completion_tokens": answer.completion_tokens,
            "total_tokens": answer.prompt_tokens + answer.completion_tokens,
        }
        return {**head, "object": "chat.completion", "choices": [choice], "usage": usage}

    app.include_router(router)


def _internal_error(error: Exception) -> dict:
    log.error("internal error", exc_info=error)
    return {"error": {"message": f"internal error: {type(error).__name__}: {error}", "type": "server_error"}}


class _AnswerInternalErrors(APIRoute):
    """Unexpected exceptions become a 500 JSON answer here, in the route, rather than in Starlette's
    outermost middleware, which would also drop the client's keep-alive connection."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()

        async def handle_or_answer_500(request: Request) -> Response:
            try:
                return await handle(request)
            except (BadRequest, RequestValidationError):  # answered by the handlers in add_api
                raise
            except Exception as error:  # noqa: BLE001 - answered, logged, and the server keeps serving
                return JSONResponse(_internal_error(error), status_code=500)

        return handle_or_answer_500


async def _stream(head: dict, first: str, rest: AsyncIterator[str], ended: list[ChatStream]) -> AsyncIterator[str]:
    """OpenAI chat.completion.chunk events, then `data: [DONE]`; `ended` holds the exhausted stream
    once `rest` is."""

    def chunk(delta: dict, finish_reason: str | None = None) -> str:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
        return _sse({**head, "object": "chat.completion.chunk", "choices": [choice]})

    yield chunk({"role": "assistant", "content": ""})
    try:
        if first:
            yield chunk({"content": first})
        async for piece in rest:
            yield chunk({"content": piece})
        yield chunk({}, ended[0].finish_reason)
    except Exception as error:  # noqa: BLE001 - the status line is sent: report it in the stream
        yield _sse(_internal_error(error))
    yield _sse("[DONE]")
