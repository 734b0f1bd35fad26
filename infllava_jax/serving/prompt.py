"""Request messages + images -> what the generator takes, for a loaded checkpoint.

`prepare` is the one place that decides it: the checkpoint's own template, tokenizer, stop ids
and image preprocessing (`InfLlava.usage`, conversation.py; "<image>\\n" + question as the chat
and the benchmarks build it). One user message per request: its text parts joined by newlines,
its images in order (placed in front of the text, or where the text spells "<image>" tags).
Earlier turns and system messages are refused rather than dropped: the templates here encode
one question with the checkpoint's fixed system prompt (or none: `Usage.system_prompt`).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from infllava_jax.errors import InputError
from infllava_jax.serving.schema import APIError, Message


@dataclasses.dataclass
class Prepared:
    ids: np.ndarray                 # (L,) int32, -200 where each image goes
    images: list[np.ndarray]        # (S, S, 3) uint8 (pixels.resized_bytes; the program normalises), one per -200
    stop_ids: tuple[int, ...]


def prepare(model, messages: list[Message], load_image: Callable[[str, str], object], max_images: int) -> Prepared:
    """`load_image(url, param)` -> PIL image (images.load_image_url with the server's limits)."""
    from infllava_jax.inputs import encode_row, image_size
    from infllava_jax.pixels import resized_bytes
    if len(messages) != 1 or messages[0].role != "user":
        roles = [m.role for m in messages]
        raise APIError(400, f"messages: this server answers one user message (got roles {roles}); the "
                            f"checkpoint's template has a fixed system prompt", param="messages",
                       code="unsupported_messages")
    content = messages[0].content
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else [p.model_dump() for p in content]
    texts, urls = [], []
    for i, p in enumerate(parts):
        param = f"messages.0.content.{i}"
        if p["type"] == "text" and p.get("text") is not None:
            texts.append(p["text"])
        elif p["type"] == "image_url" and p.get("image_url"):
            urls.append((p["image_url"]["url"], param + ".image_url.url"))
        else:
            raise APIError(400, f"{param}: a {p['type']} part needs its '{p['type']}' field", param=param)
    if len(urls) > max_images:
        raise APIError(400, f"messages: {len(urls)} images, more than this server's limit of {max_images}",
                       param="messages", code="too_many_images")
    usage, size = model.usage, image_size(model.config, model.usage.pixels)
    images = [resized_bytes(load_image(url, param), size, usage.image_mode) for url, param in urls]
    try:
        ids = encode_row(model.tokenizer, usage, "\n".join(texts), len(images))
    except InputError as e:
        raise APIError(400, f"messages: {e}", param="messages") from None
    return Prepared(np.asarray(ids, np.int32), images, tuple(model.stop_ids))
