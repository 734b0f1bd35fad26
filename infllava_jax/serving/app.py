"""The FastAPI application: `POST /v1/chat/completions` (plain or server-sent events),
`GET /v1/models`, `GET /health`; every error in OpenAI's error body."""
from __future__ import annotations

import asyncio
import json
import secrets
import time
from functools import partial
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from infllava_jax.evaluation.runner import Sampling
from infllava_jax.serving import images, schema
from infllava_jax.serving.engine import Engine, Job, Result
from infllava_jax.serving.prompt import prepare
from infllava_jax.serving.schema import APIError, ChatRequest
from infllava_jax.serving.text import TextStream


def create_app(engine: Engine, model_name: str, *, image_dir: Path | None = None, max_body_bytes: int = 32 << 20,
               max_image_bytes: int = 16 << 20, max_image_pixels: int = 1 << 24) -> FastAPI:
    app = FastAPI(title="infllava-jax", docs_url=None, redoc_url=None, openapi_url=None)
    load = partial(images.load_image_url, image_dir=image_dir, max_bytes=max_image_bytes, max_pixels=max_image_pixels)
    created = int(time.time())

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        return JSONResponse(APIError(e.status_code, str(e.detail), code=str(e.status_code)).body(),
                            status_code=e.status_code)

    @app.exception_handler(Exception)
    async def bug(request, e: Exception):   # ours, not the client's: logged with its traceback by uvicorn
        return JSONResponse(APIError(500, f"internal error: {type(e).__name__}", type="server_error",
                                     code="internal_error").body(), status_code=500)

    @app.get("/health")
    async def health():
        return {"status": "ok", "pending": engine.pending, "busy_s": round(engine.busy_s, 4),   # decoding
                "batches": {str(k): v for k, v in sorted(engine.batch_sizes.items())}}   # rows: batches run

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "infllava-jax"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        with engine.arriving_request():   # a batch being formed waits for this request
            req = schema.parse(await _body(request, max_body_bytes))
            if req.model is not None and req.model != model_name:
                raise APIError(404, f"model {req.model!r} is not served here (GET /v1/models: {model_name!r})",
                               param="model", code="model_not_found")
            req.model = model_name
            stops = req.stop_strings()
            prepared = await run_in_threadpool(prepare, engine.model, req.messages, load, engine.max_images)
            seed = secrets.randbits(31) if req.seed is None else req.seed
            sampling = Sampling(temperature=req.temperature, top_p=req.top_p, seed=seed)
            job = engine.make_job(prepared, req.token_limit(), sampling, stream=req.stream,
                                  notify=lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
            engine.submit(job)
        ids = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
        if req.stream:
            return StreamingResponse(_sse(engine, req, job, events, stops, ids), media_type="text/event-stream")
        try:
            result = await _wait_done(events)
        finally:
            job.cancelled = True   # done, or the client left while waiting: its row is dropped
        text, by_stop = TextStream.full(engine.model.tokenizer, stops, result.tokens)
        return _completion(req, ids, text, "stop" if by_stop else result.finish_reason, result)

    return app


async def _body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) past `limit` bytes before all of it is read."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body is {declared} bytes, over the limit of {limit}", code="body_too_large")
    chunks, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > limit:
            raise APIError(413, f"the request body is over the limit of {limit} bytes", code="body_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


async def _wait_done(events: asyncio.Queue) -> Result:
    while True:
        kind, value = await events.get()
        if kind == "done":
            return value
        if kind == "error":
            raise APIError(500, f"generation failed: {value}", type="server_error", code="internal_error")


def _usage(result: Result) -> dict:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": len(result.tokens),
            "total_tokens": result.prompt_tokens + len(result.tokens)}


def _completion(req: ChatRequest, ids, text: str, finish: str, result: Result) -> dict:
    return {"id": ids[0], "object": "chat.completion", "created": ids[1], "model": req.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                         "logprobs": None}],
            "usage": _usage(result)}


def _chunk(req: ChatRequest, ids, delta: dict, finish: str | None = None, usage: dict | None = None) -> str:
    body = {"id": ids[0], "object": "chat.completion.chunk", "created": ids[1], "model": req.model,
            "choices": [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
    if usage:
        body["usage"] = usage
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


async def _sse(engine: Engine, req: ChatRequest, job: Job, events: asyncio.Queue, stops, ids):
    """Server-sent events: a role chunk, content chunks as text is released, the finish chunk,
    (usage,) [DONE]. A client that leaves cancels the job (its row's tokens are dropped)."""
    text = TextStream(engine.model.tokenizer, stops)
    try:
        yield _chunk(req, ids, {"role": "assistant", "content": ""})
        while True:
            kind, value = await events.get()
            if kind == "token":
                piece = text.push(value)
                if piece:
                    yield _chunk(req, ids, {"content": piece})
            elif kind == "error":
                yield f"data: {json.dumps(APIError(500, f'generation failed: {value}', type='server_error').body())}\n\n"
                return
            else:
                piece = text.finish()
                if piece:
                    yield _chunk(req, ids, {"content": piece})
                yield _chunk(req, ids, {}, "stop" if text.stopped else value.finish_reason)
                if req.stream_options and req.stream_options.include_usage:
                    yield _chunk(req, ids, {}, usage=_usage(value))
                yield "data: [DONE]\n\n"
                return
    finally:
        job.cancelled = True
