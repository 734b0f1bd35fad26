"""Images and prompts -> the model's inputs (`InfLlava.prepare`), as an HF processor would.

Each row is one prompt and its images (file paths, PIL images or (H, W, 3) uint8 arrays).
Images are preprocessed as the checkpoint records (conversation.Usage: pixel mode -> size,
image mode; pixels.preprocess); the prompt is the checkpoint's template around "<image>\\n" +
question (one "<image>" per image; a prompt that already spells its "<image>" tags keeps them),
tokenised with its doubled BOS or not. Rows are left-padded (generation's convention; the
model's positions follow the mask, so the forward pass gives the same logits either way).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from infllava_jax import conversation
from infllava_jax.config import InfLlavaConfig
from infllava_jax.data.template import IMAGE_TOKEN
from infllava_jax.errors import InputError
from infllava_jax.splice import IMAGE_TOKEN_INDEX


def image_size(config: InfLlavaConfig, pixels: str) -> int:
    """Side of the preprocessed image: `released` the sub-image size s (the model upsamples
    bicubically to n*s, the released inference path), `native` n*s directly."""
    if pixels == "released":
        return config.sub_image_size
    if pixels == "native":
        return config.image_size[0]
    raise InputError(f"pixels={pixels!r}: expected 'released' or 'native'")


def load_image(image):
    """A path, PIL image or array -> something pixels.preprocess takes."""
    if isinstance(image, (str, os.PathLike)):
        from infllava_jax.evaluation.datasets import open_image
        return open_image(str(image), where=str(Path(image)))
    if hasattr(image, "convert") or isinstance(image, np.ndarray):
        return image
    raise InputError(f"an image must be a file path, a PIL image or an (H, W, 3) array, not {type(image).__name__}")


def _rows(images, prompts) -> list[tuple[list, str]]:
    """(images of the row, prompt) pairs: one prompt and one image (or a list of images per
    prompt); a single prompt with several rows of images is used for each."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if images is None or not isinstance(images, (list, tuple)):
        images = [images]
    per_row = [[] if im is None else list(im) if isinstance(im, (list, tuple)) else [im] for im in images]
    if len(prompts) == 1 and len(per_row) > 1:
        prompts = prompts * len(per_row)
    if len(per_row) == 1 and len(prompts) > 1:
        per_row = per_row * len(prompts)
    if len(per_row) != len(prompts):
        raise InputError(f"{len(per_row)} image rows for {len(prompts)} prompts: give one image (or list of images) "
                         f"per prompt")
    return list(zip(per_row, prompts))


def encode_row(tokenizer, usage: conversation.Usage, text: str, num_images: int) -> np.ndarray:
    tagged = IMAGE_TOKEN in text
    ids = conversation.encode_prompt(tokenizer, text, 0 if tagged else num_images, usage)
    if int(np.sum(ids == IMAGE_TOKEN_INDEX)) != num_images:
        raise InputError(f"prompt {text[:60]!r} has {text.count(IMAGE_TOKEN)} {IMAGE_TOKEN} tags for {num_images} "
                         f"image(s)")
    return ids


def prepare(config: InfLlavaConfig, usage: conversation.Usage, tokenizer, images, prompts, *,
            pad_id: int = 0, padding_side: str = "left") -> dict[str, np.ndarray]:
    """{input_ids (B, L) int32, attention_mask (B, L) int32, pixel_values (B, 3, S, S) float32
    (or (B, K, 3, S, S) when a row has several images)}: what InfLlava.__call__ / generate take."""
    from infllava_jax.pixels import preprocess
    if padding_side not in ("left", "right"):
        raise InputError(f"padding_side={padding_side!r}: expected 'left' or 'right'")
    size = image_size(config, usage.pixels)
    rows = _rows(images, prompts)
    pix = [[preprocess(load_image(im), size, usage.image_mode) for im in ims] for ims, _ in rows]
    ids = [encode_row(tokenizer, usage, text, len(ims)) for ims, text in rows]
    if any(not p for p in pix):
        raise InputError("every prompt needs at least one image (the model has no text-only path)")
    B, L, K = len(rows), max(len(r) for r in ids), max(len(p) for p in pix)
    input_ids = np.full((B, L), pad_id, np.int32)
    mask = np.zeros((B, L), np.int32)
    for i, r in enumerate(ids):
        sl = slice(L - len(r), L) if padding_side == "left" else slice(0, len(r))
        input_ids[i, sl], mask[i, sl] = r, 1
    pixel_values = np.zeros((B, K, 3, size, size), np.float32)
    for i, p in enumerate(pix):
        for k, img in enumerate(p):
            pixel_values[i, k] = np.moveaxis(img, -1, 0)
    return {"input_ids": input_ids, "attention_mask": mask,
            "pixel_values": pixel_values[:, 0] if K == 1 else pixel_values}
