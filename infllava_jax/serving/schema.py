"""The request schema of `POST /v1/chat/completions` (a subset of OpenAI's) and its error body.

Unknown fields are refused (a client that sends `logprobs` learns we do not do them, instead of
silently getting something else). Every error leaves as OpenAI's
{"error": {"message", "type", "param", "code"}} with a 4xx status (5xx only for our own bugs).
"""
from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class APIError(Exception):
    """An error for the client: HTTP status, OpenAI error fields, extra headers (Retry-After)."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ImageURL(_Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None   # accepted, ignored: one resolution per model


class ContentPart(_Strict):
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None


class Message(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart]
    name: str | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatRequest(_Strict):
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)   # OpenAI's newer name for max_tokens
    temperature: float = Field(1.0, ge=0.0, le=2.0)          # OpenAI's default: sampling; 0 = greedy
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise APIError(400, "'stop' takes up to 4 non-empty strings", param="stop")
        return stops

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class BatchLine(ChatRequest):
    """One line of `python -m infllava_jax.predict`'s input: a request with an id."""
    id: str | int


def parse(raw: bytes, cls=ChatRequest):
    """Raw JSON -> a request; APIError 400 naming the first bad field."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise APIError(400, f"the body is not valid JSON ({e})", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the body must be a JSON object", code="invalid_json")
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        if err["type"] == "extra_forbidden":
            raise APIError(400, f"unknown field '{param}'", param=param, code="unknown_field") from None
        raise APIError(400, f"'{param}': {err['msg']}", param=param, code="invalid_value") from None
