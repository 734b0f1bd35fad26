"""One LLaVA record -> one training example, or a counted bad sample (never an exception).

An example is a dict of numpy values: input_ids, labels (int32, unspliced), pixels (float32
CLIP-normalised: (S, S, 3) for one image, (k, S, S, 3) for k > 1 in `<image>` order, None for a
text-only sample; with a feature bank the frozen tower's features (V, T, D) per image instead), num_images, has_image, index (the record's position in the source), truncated. A bad sample is {"bad": reason, "index": i, "detail": str}; pipeline.py counts and drops
it. LLaVA JSON records: docs/model.md section 7; template and loss mask: section 6; pixels: section 2.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np

from infllava_jax.data.images import CACHE, MAX_IMAGE_PIXELS, MODES, TooManyPixels, load_resized, normalize
from infllava_jax.data.template import SYSTEM, TEMPLATES, TemplateError, encode_conversation
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
    image_mode: str = "pad"          # "square" for stage 1 (docs/model.md §2)
    tokens_per_image: int = 576      # T: one `<image>` id becomes T positions after splicing
    max_len: int = 2048              # after splicing (docs/model.md §6)
    double_bos: bool = False         # True: the released doubled BOS
    system_prompt: bool = True       # False: no system turn (template.py)

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
        return self.budget(1)

    def budget(self, num_images: int) -> int:
        """Max ids of a sample with `num_images` images: L + max(k, 1) (T - 1) <= max_len."""
        return self.max_len - max(num_images, 1) * (self.tokens_per_image - 1)


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


def image_paths(record: dict, image_folder: str) -> list[str]:
    """The record's image files ([] for text-only). LLaVA-1.5 JSON: one relative path; multi-image
    records: a list of paths, the k-th for the k-th `<image>` of the text."""
    img = record.get("image")
    if img is None:
        return []
    imgs = img if isinstance(img, list) else [img]
    if not imgs or not all(isinstance(i, str) and i for i in imgs):
        raise TemplateError("bad_fields", f"'image' must be a path or a list of paths, got {str(img)[:80]!r}")
    return [os.path.join(image_folder, i) for i in imgs]


def tokenize_record(record, tokenizer, template: str, double_bos: bool, system_prompt: bool = True):
    """-> (input_ids, labels, relative image paths), untruncated. Raises TemplateError."""
    if not isinstance(record, dict):
        raise TemplateError("bad_fields", "record is not a JSON object")
    paths = image_paths(record, "")
    try:
        ids, labels = encode_conversation(record.get("conversations"), tokenizer, num_images=len(paths),
                                          template=template, double_bos=double_bos,
                                          system=SYSTEM if system_prompt else None)
    except TemplateError:
        raise
    except (TypeError, ValueError, AttributeError, KeyError) as e:   # a field shape nobody foresaw
        raise TemplateError("bad_fields", f"{type(e).__name__}: {e}") from None
    return ids, labels, paths


class JsonRecordProcessor:
    """grain map function: (index, LLaVA record) -> example or bad. Picklable (mp workers)."""

    def __init__(self, tokenizer, spec: SampleSpec, image_folder: str, image_cache_mb: int = 0,
                 allow_outside_paths: bool = False, max_image_pixels: int = MAX_IMAGE_PIXELS, features=None,
                 token_cache_mb: int = 0):
        self.tokenizer, self.spec = tokenizer, spec
        self.images = ImagePolicy(image_folder, allow_outside_paths, max_image_pixels, image_cache_mb << 20)
        self.features = features    # training/feature_bank.FeatureBank: the frozen tower's features instead
        self._tokens, self._token_room = {}, token_cache_mb << 20   # record index -> tokens(record)

    def image(self, rel: str) -> np.ndarray:
        """One image's model input: float32 CLIP-normalised pixels (S, S, 3), or with a feature bank
        its frozen tower features (V, T, D). Raises TemplateError."""
        if self.features is not None:
            return self.features.get(rel)
        return normalize(self.images.load(rel, self.spec.image_size, self.spec.image_mode))

    def tokens(self, record):
        """-> (input_ids, labels, relative image paths, untruncated length), truncated to the
        budget of its image count. Raises TemplateError."""
        ids, labels, rels = tokenize_record(record, self.tokenizer, self.spec.template, self.spec.double_bos,
                                           self.spec.system_prompt)
        budget = self.spec.budget(len(rels))
        if budget < 2:
            raise TemplateError("too_long", f"{len(rels)} images of {self.spec.tokens_per_image} tokens "
                                            f"do not fit max_len={self.spec.max_len}")
        return (*truncate(ids, labels, budget), rels, len(ids))  # cheap checks before decoding

    def cached_tokens(self, index: int, record):
        """tokens(record), kept by record index while `token_cache_mb` has room: a record is
        tokenized once, not once per epoch (read-only arrays: shared by every later read)."""
        hit = self._tokens.get(index)
        if hit is None:
            hit = self.tokens(record)
            size = hit[0].nbytes + hit[1].nbytes
            if size <= self._token_room:
                hit[0].flags.writeable = hit[1].flags.writeable = False
                self._tokens[index], self._token_room = hit, self._token_room - size
        return hit

    def plan_size(self, record) -> tuple[int, int]:
        """(spliced length, number of images) of a record, what data/packing.py plans rows with;
        (1, 0) for a sample that will turn out bad (it keeps a one-position slot)."""
        try:
            ids, _, rels, _ = self.tokens(record)
        except TemplateError:
            return 1, 0
        return len(ids) + len(rels) * (self.spec.tokens_per_image - 1), len(rels)

    def __call__(self, item) -> dict:
        index, record = item
        try:
            ids, labels, rels, n = self.cached_tokens(index, record)
            images = [self.image(rel) for rel in rels]
        except TemplateError as e:
            return bad(e.reason, index, str(e))
        pixels = None if not images else images[0] if len(images) == 1 else np.stack(images)
        return example(ids, labels, pixels, index, truncated=n > len(ids))


def example(ids, labels, pixels, index, truncated: bool = False) -> dict:
    k = 0 if pixels is None else 1 if pixels.ndim == 3 else len(pixels)
    return {"input_ids": np.asarray(ids, np.int32), "labels": np.asarray(labels, np.int32),
            "pixels": pixels, "num_images": k, "has_image": k > 0, "index": int(index),
            "truncated": bool(truncated)}
