"""Batches with a few static shapes: right padding to a length bucket (docs/model.md section 6).

Buckets are *spliced* lengths (what the language model sees): a batch in bucket b holds
b - (T - 1) ids per row, since each row has exactly one image slot whose sentinel becomes T
positions. Text-only rows have no sentinel; `splice` marks their tail invalid. A batch whose
rows hold up to K > 1 images (multi-image samples) has K image slots per row, pixel_values
(B, K, S, S, 3) (a row's missing images are zeros that no sentinel points to: never spliced) and
b - K (T - 1) ids per row; when no bucket leaves room for its longest row beside K images
(a long text-only row next to a many-image row) the row gets the largest bucket's one-image ids
length, so it may splice to up to max_len + (K - 1)(T - 1) positions (the tail is padding).
Packed batches (several conversations per row) are packing.py's. A batch takes the
smallest bucket that fits its longest row (no reordering, so the iterator state stays a plain
position in the shuffled stream). In multi-process training call `agree_across_processes` on
each local batch so every process pads to the same bucket before forming the global array, and
`sum_over_processes` for the global data counters.
"""
from __future__ import annotations

import numpy as np

from infllava_jax.splice import IGNORE_INDEX


def default_buckets(max_len: int, tokens_per_image: int) -> tuple[int, ...]:
    """max_len/4, /2, 3/4 and max_len; the smaller ones only if they leave >= 32 ids beside the image."""
    cands = sorted({max_len // 4, max_len // 2, 3 * max_len // 4, max_len})
    return tuple(b for b in cands if b == max_len or ids_length(b, tokens_per_image) >= 32)


def ids_length(bucket: int, tokens_per_image: int, images: int = 1) -> int:
    return bucket - images * (tokens_per_image - 1)


def pick_bucket(n_ids: int, buckets, tokens_per_image: int, images: int = 1) -> int:
    for b in sorted(buckets):
        if ids_length(b, tokens_per_image, images) >= n_ids:
            return b
    raise ValueError(f"{n_ids} ids do not fit the largest bucket {max(buckets)} "
                     f"(with {images} x {tokens_per_image} image tokens)")


def batch_ids_length(n_ids: int, buckets, tokens_per_image: int, images: int = 1) -> int:
    """Ids per row of a batch whose longest row has n_ids ids and up to `images` images."""
    try:
        return ids_length(pick_bucket(n_ids, buckets, tokens_per_image, images), tokens_per_image, images)
    except ValueError:
        if images == 1:
            raise
        return max(n_ids, ids_length(max(buckets), tokens_per_image))


def stack_images(examples, image_shape: tuple[int, ...], K: int) -> np.ndarray:
    """(B, *image_shape) for K = 1, else (B, K, *image_shape); image_shape: (S, S, 3) pixels, or
    (V, T, D) frozen tower features (training/feature_bank.py). Missing images (text-only rows,
    rows with fewer than K) are zeros (released: a zero image too), which no sentinel points to."""
    pixel_values = np.zeros((len(examples), K, *image_shape), np.float32)
    for r, e in enumerate(examples):
        if e["has_image"]:
            px = e["pixels"].reshape(-1, *image_shape)
            pixel_values[r, :len(px)] = px
    return pixel_values[:, 0] if K == 1 else pixel_values


def collate(examples, *, buckets, tokens_per_image: int, image_shape: tuple[int, ...], pad_id: int) -> dict:
    """List of examples (examples.py) -> numpy batch dict (right padding)."""
    K = max(1, max(e.get("num_images", int(e["has_image"])) for e in examples))
    n = max(len(e["input_ids"]) for e in examples)
    L = batch_ids_length(n, buckets, tokens_per_image, K)
    B = len(examples)
    input_ids = np.full((B, L), pad_id, np.int32)
    labels = np.full((B, L), IGNORE_INDEX, np.int32)
    attention_mask = np.zeros((B, L), np.int32)
    for r, e in enumerate(examples):
        k = len(e["input_ids"])
        input_ids[r, :k], labels[r, :k], attention_mask[r, :k] = e["input_ids"], e["labels"], 1
    has_image = np.array([e["has_image"] for e in examples], bool)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "pixel_values": stack_images(examples, image_shape, K), "has_image": has_image,
            "num_images": np.array([e.get("num_images", int(e["has_image"])) for e in examples], np.int32),
            "num_supervised_tokens": (labels != IGNORE_INDEX).sum(1).astype(np.int32),
            "index": np.array([e["index"] for e in examples], np.int32)}


def image_slots(batch: dict) -> int:
    """K: images per row of a batch ((B, S, S, 3) pixels: 1)."""
    return 1 if batch["pixel_values"].ndim == 4 else batch["pixel_values"].shape[1]


def pad_batch(batch: dict, length: int, pad_id: int, images: int = 1) -> dict:
    """Right-pad the (B, L) fields of a batch to `length` ids (>= L), and its image slots to
    `images` (zero images no sentinel points to). A packed batch (packing.py: L = spliced length)
    pads its segment ids too (segment 0: padding)."""
    L = batch["input_ids"].shape[1]
    if length < L:
        raise ValueError(f"cannot pad a batch of {L} ids to {length}")
    out = dict(batch)
    K = image_slots(batch)
    if images > K:
        px = batch["pixel_values"].reshape(len(batch["input_ids"]), K, *batch["pixel_values"].shape[-3:])
        out["pixel_values"] = np.pad(px, ((0, 0), (0, images - K), (0, 0), (0, 0), (0, 0)))
    if length == L:
        return out
    fill = {"input_ids": pad_id, "labels": IGNORE_INDEX, "attention_mask": 0, "segment_ids": 0}
    for k, v in fill.items():
        if k in batch:
            out[k] = np.pad(batch[k], ((0, 0), (0, length - L)), constant_values=v)
    return out


def agree_across_processes(batch: dict, pad_id: int) -> dict:
    """Pad every process's local batch to the longest ids length and the most image slots among
    processes (one tiny all-gather per step). A no-op with one process."""
    import jax
    if jax.process_count() == 1:
        return batch
    from jax.experimental import multihost_utils
    sizes = multihost_utils.process_allgather(np.array([batch["input_ids"].shape[1], image_slots(batch)], np.int32))
    L, K = np.asarray(sizes).reshape(-1, 2).max(0)
    return pad_batch(batch, int(L), pad_id, int(K))


def sum_over_processes(stats: dict) -> dict:
    """The data counters (`LlavaBatchIterator.stats()`) summed over all processes (one tiny
    all-gather). A no-op with one process."""
    import jax
    if jax.process_count() == 1:
        return stats
    from jax.experimental import multihost_utils
    reasons = sorted(stats["bad"])
    mine = np.array([stats["good"], stats["truncated"], *(stats["bad"][r] for r in reasons)], np.int64)
    total = np.asarray(multihost_utils.process_allgather(mine)).sum(0).tolist()
    bad = dict(zip(reasons, total[2:]))
    return {"good": total[0], "truncated": total[1], "bad": bad, "bad_total": sum(bad.values())}
