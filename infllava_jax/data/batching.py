"""Batches with a few static shapes: right padding to a length bucket (SPEC section 6).

Buckets are *spliced* lengths (what the language model sees): a batch in bucket b holds
b - (T - 1) ids per row, since each row has exactly one image slot whose sentinel becomes T
positions. Text-only rows have no sentinel; `splice` marks their tail invalid. A batch takes the
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


def ids_length(bucket: int, tokens_per_image: int) -> int:
    return bucket - (tokens_per_image - 1)


def pick_bucket(n_ids: int, buckets, tokens_per_image: int) -> int:
    for b in sorted(buckets):
        if ids_length(b, tokens_per_image) >= n_ids:
            return b
    raise ValueError(f"{n_ids} ids do not fit the largest bucket {max(buckets)} "
                     f"(with {tokens_per_image} image tokens)")


def collate(examples, *, buckets, tokens_per_image: int, image_size: int, pad_id: int) -> dict:
    """List of examples (examples.py) -> numpy batch dict (right padding)."""
    n = max(len(e["input_ids"]) for e in examples)
    L = ids_length(pick_bucket(n, buckets, tokens_per_image), tokens_per_image)
    B = len(examples)
    input_ids = np.full((B, L), pad_id, np.int32)
    labels = np.full((B, L), IGNORE_INDEX, np.int32)
    attention_mask = np.zeros((B, L), np.int32)
    pixel_values = np.zeros((B, image_size, image_size, 3), np.float32)  # text-only rows stay zero
    for r, e in enumerate(examples):  # (released: a zero image too); they have no sentinel: never spliced
        k = len(e["input_ids"])
        input_ids[r, :k], labels[r, :k], attention_mask[r, :k] = e["input_ids"], e["labels"], 1
        if e["has_image"]:
            pixel_values[r] = e["pixels"]
    has_image = np.array([e["has_image"] for e in examples], bool)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "pixel_values": pixel_values, "has_image": has_image,
            "num_supervised_tokens": (labels != IGNORE_INDEX).sum(1).astype(np.int32),
            "index": np.array([e["index"] for e in examples], np.int32)}


def pad_batch(batch: dict, length: int, pad_id: int) -> dict:
    """Right-pad the (B, L) fields of a batch to `length` ids (>= L)."""
    L = batch["input_ids"].shape[1]
    if length < L:
        raise ValueError(f"cannot pad a batch of {L} ids to {length}")
    if length == L:
        return batch
    fill = {"input_ids": pad_id, "labels": IGNORE_INDEX, "attention_mask": 0}
    out = dict(batch)
    for k, v in fill.items():
        out[k] = np.pad(batch[k], ((0, 0), (0, length - L)), constant_values=v)
    return out


def agree_across_processes(batch: dict, pad_id: int) -> dict:
    """Pad every process's local batch to the longest ids length among processes (one tiny
    all-gather per step). A no-op with one process."""
    import jax
    if jax.process_count() == 1:
        return batch
    from jax.experimental import multihost_utils
    lengths = multihost_utils.process_allgather(np.int32(batch["input_ids"].shape[1]))
    return pad_batch(batch, int(np.max(lengths)), pad_id)


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
