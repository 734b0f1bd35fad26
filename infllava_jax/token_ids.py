"""Token ids into the model, checked on the host before anything is compiled.

-200 (`IMAGE_TOKEN_INDEX`) is the image sentinel of every model: one per image, where the image
goes (what the released code and our data pipeline write). A model converted from transformers'
LlavaForConditionalGeneration also accepts its own image token id (`config.image_token_index`,
e.g. 32000 for llava-hf/llava-1.5-7b-hf) in both forms its tokenizers and processors write it:
one per image, or HF's expanded form (`tokens_per_image` copies in a row per image, as HF
processors emit them). Both become one -200 per image; an expanded run of any other length is an
error. So is any other id outside [0, vocab) and a row with more sentinels than images; the
message names the row and the position. Positions with attention mask 0 are padding: their ids
are not checked (and become 0).

When expanded runs make rows shorter by different amounts, the rows are padded again (id 0, mask
0) on the side the input was padded on (left if any row's first position is masked, else right).
"""
from __future__ import annotations

import numpy as np

from infllava_jax.errors import InputError
from infllava_jax.splice import IMAGE_TOKEN_INDEX


def prepare_ids(input_ids, attention_mask, config, num_images: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(B, L) ids and mask (or None) -> (ids with one -200 per image, mask), checked (see above)."""
    ids = np.asarray(input_ids)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise InputError(f"input_ids must be a (batch, length) integer array, got {ids.dtype} {ids.shape}")
    mask = None if attention_mask is None else np.asarray(attention_mask)
    if mask is not None and mask.shape != ids.shape:
        raise InputError(f"attention_mask has shape {mask.shape}, input_ids {ids.shape}")
    rows = [check_row(ids[r], None if mask is None else mask[r], config, num_images, f"row {r}")
            for r in range(len(ids))]
    if all(len(i) == ids.shape[1] for i, _ in rows):
        return np.stack([i for i, _ in rows]).astype(np.int32), mask
    left = mask is not None and bool((mask[:, 0] == 0).any())
    L = max(len(i) for i, _ in rows)
    out, out_mask = np.zeros((len(rows), L), np.int32), np.zeros((len(rows), L), np.int32)
    for r, (i, m) in enumerate(rows):
        where = slice(L - len(i), L) if left else slice(0, len(i))
        out[r, where], out_mask[r, where] = i, np.ones(len(i)) if m is None else m
    return out, out_mask


def check_row(ids: np.ndarray, mask: np.ndarray | None, config, num_images: int, row: str):
    """One row -> (ids with one -200 per image, mask); InputError naming `row` and the position."""
    vocab, hf = config.llm.vocab_size, config.image_token_index
    ids = np.asarray(ids, np.int64)
    real = np.ones(len(ids), bool) if mask is None else np.asarray(mask) != 0
    is_hf = (ids == hf) & real if 0 <= hf else np.zeros(len(ids), bool)
    wrong = real & ~is_hf & (ids != IMAGE_TOKEN_INDEX) & ((ids < 0) | (ids >= vocab))
    if wrong.any():
        p = int(np.flatnonzero(wrong)[0])
        raise InputError(f"input_ids {row}, position {p}: id {int(ids[p])} is outside [0, {vocab}) and is not "
                         f"the image sentinel {IMAGE_TOKEN_INDEX}" + (f" or the image token {hf}" if hf >= 0 else ""))
    ids = np.where(real, ids, 0)
    keep = np.ones(len(ids), bool)
    for start, length in _runs(is_hf):
        images = _images_in_run(length, config.tokens_per_image, hf, row, start)
        ids[start:start + images] = IMAGE_TOKEN_INDEX
        keep[start + images:start + length] = False
    sentinels = np.flatnonzero(ids[keep] == IMAGE_TOKEN_INDEX)
    if len(sentinels) > num_images:
        p = int(np.flatnonzero(keep)[sentinels[num_images]])
        raise InputError(f"input_ids {row}, position {p}: more image sentinels than images (this is number "
                         f"{num_images + 1}; {num_images} image(s) per row given)")
    return ids[keep], None if mask is None else np.asarray(mask)[keep]


def _runs(flags: np.ndarray) -> list[tuple[int, int]]:
    """(start, length) of each run of True."""
    edges = np.diff(np.concatenate([[0], flags.astype(np.int8), [0]]))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    return [(int(s), int(e - s)) for s, e in zip(starts, ends)]


def _images_in_run(length: int, T: int, hf: int, row: str, start: int) -> int:
    if length == 1:
        return 1
    if length % T == 0:
        return length // T
    raise InputError(f"input_ids {row}, position {start}: {length} image tokens {hf} in a row; expected 1 per "
                     f"image, or {T} per image (HF's expanded form)")
