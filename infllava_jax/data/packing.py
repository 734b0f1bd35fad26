"""Multimodal sequence packing (issue 15): several conversations per row, each with its images.

    the shuffled global stream of samples (pipeline.py)
      -> PackedRows: the stream cut into rows of <= max_len *spliced* positions (a plan made from
         each sample's spliced length and image count, epoch by epoch, before any image is decoded)
      -> ProcessRows / map / batches as unpacked rows, one packed row per slot
      -> collate_packed: ids, labels, images concatenated per row; spliced segment ids

A packed row is a function of the stream alone, so the data order stays a function of the
position (global micro-batch k = packed rows [k*G, (k+1)*G)): exact and elastic resume work as
without packing. The model keeps segments apart (docs/model.md §6 splice, then): attention is causal
inside a segment (segment ids -> mask / splash SegmentIds), RoPE positions restart at each
segment (llama.segment_positions), and a segment's last token predicts nothing
(loss.shift_labels). Every row has `max_len` ids and `max_len` spliced positions, and
K image slots (the most images of a row, rounded up to a power of two within max_len // T:
few shapes); padding images are never spliced.
The plan needs every record's length: the JSON records are tokenised once per process when the
dataset is made (no image is decoded).
"""
from __future__ import annotations

import sys
import threading

import grain
import numpy as np

from infllava_jax.splice import IGNORE_INDEX

OPEN_ROWS = 64   # first fit over the last 64 rows still open (a deterministic, local packer)


def plan_rows(lengths, max_len: int, open_rows: int = OPEN_ROWS, images=None) -> list[list[int]]:
    """Offsets 0..n-1 (in stream order, lengths[i] spliced positions each) -> rows of offsets whose
    lengths sum to <= max_len: each sample goes to the first of the last `open_rows` rows with room,
    else starts a new row. Rows come out in the order they were opened; with `images` (per
    sample), each window of `open_rows` rows is then stably sorted by its rows' image counts, so
    that a batch's rows hold alike numbers of images and few image slots are padding (as LLaVA-1.5
    groups batches by modality)."""
    rows = _first_fit(lengths, max_len, open_rows)
    if images is None:
        return rows
    images = np.asarray(images)
    count = lambda r: int(images[r].sum())  # noqa: E731
    return [r for w in range(0, len(rows), open_rows) for r in sorted(rows[w:w + open_rows], key=count)]


def _first_fit(lengths, max_len: int, open_rows: int) -> list[list[int]]:
    rows, room, first_open = [], [], 0
    for i, n in enumerate(lengths):
        n = min(int(n), max_len)
        for r in range(first_open, len(rows)):
            if room[r] >= n:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(max_len - n)
            first_open = max(first_open, len(rows) - open_rows)
    return rows


class PackedRows(grain.MapDataset):
    """Packed row j of the stream -> [(record index, record), ...] (the parent's items).

    `parent`: the shuffled (and repeated) stream of (index, record), `epoch_len` samples an epoch;
    `lengths[index]`, `images[index]`: spliced length and image count of each record. Rows never
    cross an epoch; epochs are planned lazily, in order (thread-safe), so an infinite stream works."""

    def __init__(self, parent: grain.MapDataset, epoch_len: int, lengths, max_len: int, num_epochs: int | None,
                 images=None):
        super().__init__(parent)
        self.epoch_len, self.lengths, self.max_len = epoch_len, np.asarray(lengths), max_len
        self.images = None if images is None else np.asarray(images)
        self._epochs, self._ends, self._lock = [], [], threading.Lock()   # plans, cumulative row counts
        self._length = sys.maxsize if num_epochs is None else sum(
            len(self._plan(e)) for e in range(num_epochs))

    def _plan(self, e: int) -> list[list[int]]:
        with self._lock:
            while len(self._epochs) <= e:
                k = len(self._epochs)
                base = k * self.epoch_len
                order = [self._parent[base + i][0] for i in range(self.epoch_len)]
                images = None if self.images is None else self.images[order]
                rows = [[base + i for i in row] for row in plan_rows(self.lengths[order], self.max_len, images=images)]
                self._epochs.append(rows)
                self._ends.append((self._ends[-1] if self._ends else 0) + len(rows))
            return self._epochs[e]

    def __len__(self) -> int:
        return self._length

    def __getstate__(self):                 # worker processes (mp_prefetch) get their own lock
        return {**self.__dict__, "_lock": None}

    def __setstate__(self, state):
        self.__dict__.update(state, _lock=threading.Lock())

    def __getitem__(self, j):
        if isinstance(j, slice):
            return self.slice(j)
        e = 0
        while True:
            rows = self._plan(e)
            if j < self._ends[e]:
                return [self._parent[q] for q in rows[j - (self._ends[e] - len(rows))]]
            e += 1

    def __str__(self) -> str:
        return f"PackedRows(max_len={self.max_len})"


class PackedProcessor:
    """grain map function over a packed row: each (index, record) -> example or bad (examples.py)."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, row) -> list:
        return [self.processor(item) for item in row]


def rounded_slots(max_images: int, cap: int) -> int:
    """K for a batch whose fullest row has `max_images` images: a power of two (few shapes),
    at most max(cap, max_images)."""
    k = 1
    while k < max_images:
        k *= 2
    return max(max_images, min(k, cap))


def collate_packed(rows, *, max_len: int, tokens_per_image: int, image_shape: tuple[int, ...],
                   pad_id: int) -> dict:
    """Rows (lists of good examples) -> numpy batch: input_ids, labels, attention_mask (B, max_len)
    in ids, segment_ids (B, max_len) in spliced positions (1, 2, ... per conversation, 0 padding),
    pixel_values (B, K, *image_shape) (the row's images in order), index (B, most segments; -1 fill)."""
    B, T = len(rows), tokens_per_image
    K = rounded_slots(max((sum(e["num_images"] for e in row) for row in rows), default=1), max(1, max_len // T))
    ids = np.full((B, max_len), pad_id, np.int32)
    labels = np.full((B, max_len), IGNORE_INDEX, np.int32)
    seg, mask = np.zeros((B, max_len), np.int32), np.zeros((B, max_len), np.int32)
    pixels = np.zeros((B, K, *image_shape), np.float32)
    index = np.full((B, max(1, max(len(r) for r in rows))), -1, np.int32)
    for b, row in enumerate(rows):
        n = p = k = 0                                       # ids, spliced positions, images so far
        for s, e in enumerate(row):
            m, ki = len(e["input_ids"]), e["num_images"]
            width = m + ki * (T - 1)
            if p + width > max_len:
                raise ValueError(f"packed row {b}: {p} + {width} positions exceed max_len {max_len}")
            ids[b, n:n + m], labels[b, n:n + m], mask[b, n:n + m] = e["input_ids"], e["labels"], 1
            seg[b, p:p + width] = s + 1
            if ki:
                pixels[b, k:k + ki] = e["pixels"].reshape(ki, *image_shape)
            n, p, k, index[b, s] = n + m, p + width, k + ki, e["index"]
    return {"input_ids": ids, "labels": labels, "attention_mask": mask,
            "segment_ids": seg, "pixel_values": pixels, "index": index,
            "num_images": np.array([sum(e["num_images"] for e in r) for r in rows], np.int32),
            "num_segments": np.array([len(r) for r in rows], np.int32),
            "num_supervised_tokens": (labels != IGNORE_INDEX).sum(1).astype(np.int32)}
