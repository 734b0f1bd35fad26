"""One LLaVA record -> one training example, or a counted bad sample (never an exception).

An example is a dict of numpy values: input_ids, labels (int32, unspliced), pixels (float32
(S, S, 3) CLIP-normalised, or None for a text-only sample), has_image, index (the record's position in the
source), truncated. A bad sample is {"bad": reason, "index": i, "detail": str}; pipeline.py counts and drops
it. LLaVA JSON records: SPEC section 7; template and loss mask: section 6; pixels: section 2.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np

from infllava_jax.data.images import CACHE, MAX_IMAGE_PIXELS, MODES, TooManyPixels, load_resized, normalize
from infllava_jax.data.template import TEMPLATES, TemplateError, encode_conversation
from infllava_jax.splice import IGNORE_INDEX, IMAGE_TOKEN_INDEX

BAD_REASONS = ("bad_fields", "bad_roles", "no_answer", "image_token_mismatch",
               "missing_image", "bad_image", "too_long", "too_many_pixels", "outside_folder")


@dataclasses.dataclass(frozen=True)
class ImagePolicy:
    """How a record's image file is found and opened (DataConfig's allow_outside_paths, max_image_pixels)."""
    folder: str = ""
    allow_outside_paths: bool = False   # True: absolute paths and ".." may leave `folder`
    max_image_pixels: int = MAX_IMAGE_PIXELS
    cache_bytes: int = 0                # >0: images.CACHE keeps decoded images up to this

    def path(self, rel: str) -> str:
        """folder/rel; TemplateError("outside_folder") if rel is absolute or climbs out with "..".
        (Symbolic links inside the folder are followed: where they lead is the user's choice.)"""
        if not self.allow_outside_paths:
            norm = os.path.normpath(rel)
            if os.path.isabs(rel) or norm == ".." or norm.startswith(".." + os.sep):
                raise TemplateError("outside_folder", f"image path {rel!r} leaves the image folder "
                                                      f"(data.allow_outside_paths=True allows it)")
        return os.path.join(self.folder, rel)

    def load(self, rel: str, size: int, mode: str) -> np.ndarray:
        """uint8 (size, size, 3); TemplateError with the bad-sample reason if the image cannot be used."""
        path = self.path(rel)
        try:
            return (CACHE.load(path, size, mode, self.cache_bytes, self.max_image_pixels) if self.cache_bytes
                    else load_resized(path, size, mode, self.max_image_pixels))
        except FileNotFoundError as e:
            raise TemplateError("missing_image", str(e)) from None
        except TooManyPixels as e:
            raise TemplateError("too_many_pixels", str(e)) from None
        except Exception as e:  # noqa: BLE001 - unreadable, truncated, not an image: all one reason
            raise TemplateError("bad_image", f"{path}: {type(e).__name__}: {e}") from None


@dataclasses.dataclass(frozen=True)
class SampleSpec:
    """What one example must look like for the model (per-sample part of DataConfig)."""
    template: str = "llama3"         # "plain" for stage 1
    image_size: int = 1008           # the model's high-res input (processor size 336 x 3)
    image_mode: str = "pad"          # "square" for stage 1 (SPEC 2)
    tokens_per_image: int = 576      # T: one `<image>` id becomes T positions after splicing
    max_len: int = 2048              # after splicing (SPEC 6)
    double_bos: bool = False         # True: the released doubled BOS

    def __post_init__(self):
        if self.template not in TEMPLATES:
            raise ValueError(f"template must be one of {TEMPLATES}, got {self.template!r}")
        if self.image_mode not in MODES:
            raise ValueError(f"image_mode must be one of {MODES}, got {self.image_mode!r}")
        if self.ids_budget < 2:
            raise ValueError(f"max_len={self.max_len} leaves no room beside {self.tokens_per_image} image tokens")

    @property
    def ids_budget(self) -> int:
        """Max ids per row: every row has one image slot, so L - 1 + T <= max_len (text-only too)."""
        return self.max_len - (self.tokens_per_image - 1)


def bad(reason: str, index: int, detail: str = "") -> dict:
    assert reason in BAD_REASONS, reason
    return {"bad": reason, "index": int(index), "detail": detail}


def truncate(ids: np.ndarray, labels: np.ndarray, budget: int):
    """Keep the first `budget` ids (right truncation, as the released collator). Raises
    TemplateError("too_long") when the image sentinel or every supervised token is cut."""
    if len(ids) > budget:
        if (ids[budget:] == IMAGE_TOKEN_INDEX).any():
            raise TemplateError("too_long", "the image sentinel lies beyond the length budget")
        ids, labels = ids[:budget], labels[:budget]
    if not (labels != IGNORE_INDEX).any():
        raise TemplateError("too_long", "no supervised token left after truncation")
    return ids, labels


def image_path(record: dict, image_folder: str) -> str | None:
    """The record's image file, or None (text-only). LLaVA-1.5 JSON: one relative path."""
    img = record.get("image")
    if img is None:
        return None
    if isinstance(img, list) and len(img) == 1:  # some LLaVA-style files wrap it in a list
        img = img[0]
    if not isinstance(img, str) or not img:
        raise TemplateError("bad_fields", f"'image' must be one path, got {str(img)[:80]!r}")
    return os.path.join(image_folder, img)


def tokenize_record(record, tokenizer, template: str, double_bos: bool):
    """-> (input_ids, labels, relative image path or None), untruncated. Raises TemplateError."""
    if not isinstance(record, dict):
        raise TemplateError("bad_fields", "record is not a JSON object")
    path = image_path(record, "")
    try:
        ids, labels = encode_conversation(record.get("conversations"), tokenizer, has_image=path is not None,
                                          template=template, double_bos=double_bos)
    except TemplateError:
        raise
    except (TypeError, ValueError, AttributeError, KeyError) as e:   # a field shape nobody foresaw
        raise TemplateError("bad_fields", f"{type(e).__name__}: {e}") from None
    return ids, labels, path


class JsonRecordProcessor:
    """grain map function: (index, LLaVA record) -> example or bad. Picklable (mp workers)."""

    def __init__(self, tokenizer, spec: SampleSpec, image_folder: str, image_cache_mb: int = 0,
                 allow_outside_paths: bool = False, max_image_pixels: int = MAX_IMAGE_PIXELS):
        self.tokenizer, self.spec = tokenizer, spec
        self.images = ImagePolicy(image_folder, allow_outside_paths, max_image_pixels, image_cache_mb << 20)

    def __call__(self, item) -> dict:
        index, record = item
        try:
            ids, labels, rel = tokenize_record(record, self.tokenizer, self.spec.template,
                                               self.spec.double_bos)
            n = len(ids)
            ids, labels = truncate(ids, labels, self.spec.ids_budget)  # cheap checks before decoding
            pixels = None if rel is None else normalize(self.images.load(rel, self.spec.image_size,
                                                                         self.spec.image_mode))
        except TemplateError as e:
            return bad(e.reason, index, str(e))
        return example(ids, labels, pixels, index, truncated=n > len(ids))


def example(ids, labels, pixels, index, truncated: bool = False) -> dict:
    return {"input_ids": np.asarray(ids, np.int32), "labels": np.asarray(labels, np.int32),
            "pixels": pixels, "has_image": pixels is not None, "index": int(index),
            "truncated": bool(truncated)}
