"""Image loading for training (docs/model.md section 2), split in two halves of `pixels.preprocess`:

- `load_resized`: file -> RGB -> pad/square -> PIL bicubic resize + centre crop -> uint8 (S, S, 3)
  (what the ArrayRecord builder stores);
- `normalize`: uint8 -> float32 CLIP-normalised, bit-identical to `pixels.preprocess`
  (`pixels.normalisation_table`: 256 entries per channel, the same float64 -> float32 steps).
The pipeline runs both per sample in its read threads/workers; batching only stacks.
"""
from __future__ import annotations

import os
import warnings

import numpy as np
from PIL import Image

from infllava_jax.pixels import normalisation_table, resized_bytes

MODES = ("pad", "square")
MAX_IMAGE_PIXELS = 1 << 26   # 67 Mpx (8192 x 8192): larger images are refused before decoding


def resize_uint8(img: Image.Image, size: int, mode: str = "pad") -> np.ndarray:
    """The geometric half of `pixels.preprocess` (`pixels.resized_bytes`) after `to_rgb`: RGB,
    expand2square (pad), shortest edge -> size with PIL bicubic, centre crop. uint8 (size, size, 3)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return np.ascontiguousarray(resized_bytes(to_rgb(img), size, mode))


def load_resized(path: str, size: int, mode: str = "pad", max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decode an image file fully (truncated files raise here, not later) -> uint8 (size, size, 3).
    Raises TooManyPixels, before decoding, for an image larger than `max_pixels`."""
    with open_capped(path, max_pixels) as img:
        img.load()
        return resize_uint8(to_rgb(img), size, mode)


class TooManyPixels(ValueError):
    """An image whose header claims more than the allowed pixels (a decompression bomb?)."""


def open_capped(src, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Image.open (reads the header only), refusing an image of more than `max_pixels` before any
    pixel is decoded; PIL's own bomb check (DecompressionBombError) counts as the same refusal."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)   # our cap decides
            img = Image.open(src)
    except Image.DecompressionBombError as e:
        raise TooManyPixels(f"{src}: {e}") from None
    w, h = img.size
    if w * h > max_pixels:
        img.close()
        raise TooManyPixels(f"{src}: {w} x {h} = {w * h} pixels > max_image_pixels={max_pixels}; not decoded")
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. 16-bit and 32-bit integer greyscale ("I;16*", "I") keep their top 8 bits
    (PIL's own convert clips them at 255: a white image), float ("F") is clipped to [0, 255];
    CMYK, palette, alpha (dropped, as CLIPImageProcessor's convert) go through PIL's convert."""
    if img.mode.startswith("I;16") or img.mode == "I":
        a = np.asarray(img).astype(np.int64) >> 8
        img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        img = Image.fromarray(np.clip(np.asarray(img), 0, 255).astype(np.uint8), "L")
    return img if img.mode == "RGB" else img.convert("RGB")


class ImageCache:
    """Decoded, resized images kept in memory up to a byte budget, shared by every reader of the
    process (a small data set read for many epochs, or by several runs in one process: the
    miniature study). Keyed by path, size, mode, the pixel cap and the file's mtime and size."""

    def __init__(self):
        self._images, self.nbytes = {}, 0

    def load(self, path: str, size: int, mode: str, budget_bytes: int,
             max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
        st = os.stat(path)
        key = (path, size, mode, max_pixels, st.st_mtime_ns, st.st_size)   # a smaller cap must refuse anew
        img = self._images.get(key)
        if img is None:
            img = load_resized(path, size, mode, max_pixels)
            if self.nbytes + img.nbytes <= budget_bytes:
                img.flags.writeable = False
                self._images[key] = img
                self.nbytes += img.nbytes
        return img


CACHE = ImageCache()


def normalize(pixels: np.ndarray) -> np.ndarray:
    """uint8 (..., 3) -> float32 (..., 3): (x/255 - mean) / std exactly as `pixels.preprocess`
    (~12 ms for 1008 x 1008: one table lookup per channel)."""
    if pixels.dtype != np.uint8 or pixels.shape[-1] != 3:
        raise TypeError(f"normalize expects uint8 (..., 3) pixels, got {pixels.dtype} {pixels.shape}")
    out, table = np.empty(pixels.shape, np.float32), normalisation_table()
    for c in range(3):
        np.take(table[c], pixels[..., c], out=out[..., c])
    return out
