"""An `image_url` of a request -> an RGB PIL image, refused early when it is too big.

Accepted: `data:image/...;base64,<data>` URLs (the OpenAI clients' way to send a local image),
and, only when the operator named a directory (--image-dir), file paths (`file://` or plain)
that resolve inside it (symlinks followed, then checked). Remote URLs are never fetched.
Limits: the encoded size (`max_bytes`, before decoding base64) and the pixel count
(`data.images.open_capped`: from the header, before any pixel is decoded).
"""
from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path

from PIL import Image

from infllava_jax.data.images import TooManyPixels, open_capped, to_rgb
from infllava_jax.serving.schema import APIError


def load_image_url(url: str, param: str, *, image_dir: Path | None, max_bytes: int, max_pixels: int) -> Image.Image:
    if url.startswith("data:"):
        return _decode(_data_url_bytes(url, param, max_bytes), param, max_pixels)
    if "://" in url and not url.startswith("file://"):
        raise APIError(400, f"{param}: remote image URLs are not fetched; send the image as a data URL "
                            f"(data:image/png;base64,...)", param=param, code="invalid_image_url")
    path = _allowed_path(url.removeprefix("file://"), param, image_dir)
    if path.stat().st_size > max_bytes:
        raise APIError(400, f"{param}: the image file is {path.stat().st_size} bytes, over the limit of {max_bytes}",
                       param=param, code="image_too_large")
    return _decode(path.read_bytes(), param, max_pixels)


def _data_url_bytes(url: str, param: str, max_bytes: int) -> bytes:
    head, comma, data = url.partition(",")
    if not comma or not head.endswith(";base64"):
        raise APIError(400, f"{param}: a data URL must look like data:image/png;base64,<data>", param=param,
                       code="invalid_image_url")
    if len(data) > (max_bytes * 4) // 3 + 4:   # refused before decoding
        raise APIError(400, f"{param}: the image is about {len(data) * 3 // 4} bytes, over the limit of {max_bytes}",
                       param=param, code="image_too_large")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"{param}: the data URL is not valid base64", param=param, code="invalid_image") from None


def _allowed_path(s: str, param: str, image_dir: Path | None) -> Path:
    if image_dir is None:
        raise APIError(400, f"{param}: local image paths are off on this server (the operator can allow a "
                            f"directory with --image-dir); send a data URL", param=param, code="invalid_image_url")
    root = image_dir.resolve()
    path = (root / s).resolve()   # an absolute s replaces root; '..' and symlinks are resolved here
    if not path.is_relative_to(root):
        raise APIError(400, f"{param}: {s!r} is outside the server's image directory", param=param,
                       code="image_path_not_allowed")
    if not path.is_file():
        raise APIError(400, f"{param}: no image file {s!r} in the server's image directory", param=param,
                       code="image_not_found")
    return path


def _decode(raw: bytes, param: str, max_pixels: int) -> Image.Image:
    try:
        img = open_capped(io.BytesIO(raw), max_pixels)
        img.load()
        return to_rgb(img)
    except TooManyPixels as e:
        msg = str(e).split(": ", 1)[-1]
        raise APIError(400, f"{param}: the image has too many pixels ({msg})", param=param,
                       code="image_too_large") from None
    except Exception as e:  # noqa: BLE001 - not an image, truncated, unsupported: one answer
        raise APIError(400, f"{param}: not a readable image ({type(e).__name__})", param=param,
                       code="invalid_image") from None
