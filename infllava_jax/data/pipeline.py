"""LLaVA data -> grain pipeline of static-shape numpy batches (docs/model.md sections 2, 6, 7).

    source (LLaVA JSON/JSONL list, or ArrayRecord dir)       MapDataset, random access
      -> shuffle(seed) -> repeat(num_epochs)                  ONE global stream, reshuffled each epoch
      [-> PackedRows (packing=True)                           several conversations a row: packing.py]
      -> this process's rows                                  [p*b, (p+1)*b) of every block of P*b
      -> from global micro-batch `start` on                   resume = the step's position
      -> map(record -> example | bad)                         tokenise, truncate, decode images
      -> to_iter_dataset(threads) [-> mp_prefetch(workers)]
      -> LlavaBatches: count bad samples, collate to a length bucket

The data order is a function of the position alone (levanter's `iter_from_step`): the global
sample stream (shuffled once, globally, from `seed`) does not depend on the number of processes
P; it is cut into blocks of G = P*b positions (b = batch_size, per process) and process p reads
positions [p*b, (p+1)*b) of every block, so global micro-batch k (the P local batches of the k-th
`next()`, in process order) is exactly positions [k*G, (k+1)*G) of the stream, whatever P is.
A bad sample keeps its slot: its row is empty (one attended pad token, nothing supervised, no
image; `index` -1), so it shifts nothing. With packing the positions are packed rows (a fixed
plan of the stream, packing.py); a bad sample leaves a hole in its row. Resuming at micro-batch
k on any mesh or process count is `make_dataset(..., start=k)`; only the counters (good /
truncated / bad samples by reason) come from the checkpoint. Each process maps, tokenises and
decodes only its own rows. A finite stream (num_epochs) drops `len % P` positions and splits its
last, partial block equally.

The iterator also has grain's get_state/set_state (exact resume of one iterator, with or
without prefetch threads or worker processes). Pass every local batch through
`batching.agree_across_processes` (one length bucket for the global batch). The JSON path
parses the whole file in every process (only its rows are tokenised and decoded) and pickles
the record list into each worker process; for LLaVA-665k-sized data prefer threads or the
ArrayRecord path.
"""
from __future__ import annotations

import logging
import os
import sys

import grain
import numpy as np

from infllava_jax.data.batching import collate
from infllava_jax.data.config import DataConfig  # noqa: F401 (also imported from here)
from infllava_jax.data.examples import BAD_REASONS, JsonRecordProcessor, example
from infllava_jax.data.llava_json import DataFileError, read_llava_json  # noqa: F401 (also imported from here)
from infllava_jax.data.packing import PackedProcessor, PackedRows, collate_packed
from infllava_jax.errors import InputError
from infllava_jax.splice import IGNORE_INDEX

log = logging.getLogger(__name__)
_LOGGED_BAD = 20  # log the first few bad samples with their detail, then only count


# ----------------------------------------------------------------------------- sources

class _Indexed:
    """source[i] -> (i, source[i]): the record index rides along through shuffling."""

    def __init__(self, source):
        self.source = source

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        return i, self.source[i]


def open_source(cfg: DataConfig, tokenizer, features=None):
    """-> (random-access records, map function record -> example | bad). `features`: a
    training/feature_bank.FeatureBank whose features replace the images' pixels."""
    if os.path.isdir(cfg.data_path):
        if features is not None:
            raise NotImplementedError(f"{cfg.data_path}: a feature bank reads LLaVA JSON/JSONL (not the ArrayRecord "
                                      "build, whose records hold encoded images)")
        from infllava_jax.data.arrayrecord import open_array_record  # tfds only on this path
        return open_array_record(cfg.data_path, cfg.spec)
    return read_llava_json(cfg.data_path), JsonRecordProcessor(
        tokenizer, cfg.spec, cfg.image_folder, cfg.image_cache_mb, allow_outside_paths=cfg.allow_outside_paths,
        max_image_pixels=cfg.max_image_pixels, features=features, token_cache_mb=cfg.token_cache_mb)


def _packed(cfg: DataConfig, ds, records, processor):
    """The stream as packed rows, and the map function of a row (packing.py)."""
    if not isinstance(processor, JsonRecordProcessor):
        raise NotImplementedError(f"{cfg.data_path}: packing plans rows from the records' lengths; it reads "
                                  "LLaVA JSON/JSONL (not the ArrayRecord build)")
    lengths, images = np.array([processor.plan_size(r) for r in records], np.int64).reshape(-1, 2).T
    return PackedRows(ds, len(records), lengths, cfg.max_len, cfg.num_epochs, images), PackedProcessor(processor)


class ProcessRows(grain.MapDataset):
    """Process p's rows of the global stream: positions [p*b, (p+1)*b) of every block of P*b.

    Infinite parents (repeat(None)) are cut into full blocks only; a finite parent of length n
    keeps n - n % P positions and splits its last, partial block equally among the processes."""

    def __init__(self, parent: grain.MapDataset, process_index: int, process_count: int, rows: int):
        super().__init__(parent)
        if not (0 <= process_index < process_count) or rows < 1:
            raise ValueError(f"process {process_index} of {process_count}, {rows} rows per batch")
        self.p, self.P, self.b = process_index, process_count, rows
        n = len(parent)
        self.infinite = n >= sys.maxsize
        if self.infinite:
            self._length = sys.maxsize
        else:
            n -= n % self.P
            self._full, rest = divmod(n, self.P * self.b)       # full blocks, then the last one
            self._tail = rest // self.P
            self._length = self._full * self.b + self._tail

    def __len__(self) -> int:
        return self._length

    def global_index(self, i: int) -> int:
        """Stream position of this process's i-th row."""
        blk, j = divmod(i, self.b)
        if self.infinite or blk < self._full:
            return (blk * self.P + self.p) * self.b + j
        return self._full * self.P * self.b + self.p * self._tail + (i - self._full * self.b)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return self._parent[self.global_index(index)]

    def __str__(self) -> str:
        return f"ProcessRows(process {self.p} of {self.P}, {self.b} rows of each block of {self.P * self.b})"


def make_dataset(cfg: DataConfig, tokenizer, *, start: int = 0, process_index: int | None = None,
                 process_count: int | None = None, features=None) -> "LlavaBatches":
    """The batched grain IterDataset of this process, from global micro-batch `start` on.
    `iter()` it; the iterator has `stats()` / `set_stats()` and grain's get_state/set_state.
    `features` (training/feature_bank.FeatureBank): batches carry each image's frozen tower
    features (V, T, D) in `pixel_values` instead of its pixels."""
    if process_index is None or process_count is None:
        import jax
        process_index, process_count = jax.process_index(), jax.process_count()
    records, processor = open_source(cfg, tokenizer, features)
    ds = grain.MapDataset.source(_Indexed(records))
    if cfg.shuffle:
        ds = ds.shuffle(seed=cfg.seed)
    if cfg.num_epochs != 1 and len(ds):
        ds = ds.repeat(cfg.num_epochs)
    if cfg.packing:
        ds, processor = _packed(cfg, ds, records, processor)
    rows = ProcessRows(ds, process_index, process_count, cfg.batch_size)
    if len(rows) == 0:
        raise DataFileError(f"{cfg.data_path}: no records for process {process_index} of {process_count}")
    ds = (rows[start * cfg.batch_size:] if start else rows).map(processor)
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.num_threads,
                                              prefetch_buffer_size=cfg.prefetch_buffer))
    if cfg.num_workers > 0:
        from absl import flags  # grain reads absl flags in mp_prefetch; scripts without absl.app
        if not flags.FLAGS.is_parsed():  # never parse them: use the defaults
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers))
    shape = (cfg.image_size, cfg.image_size, 3) if features is None else features.shape
    return LlavaBatches(it, cfg, pad_id=tokenizer.pad_token_id, start=start, image_shape=shape)


# ----------------------------------------------------------------------------- batches

class LlavaBatches(grain.IterDataset):
    """Counts bad samples (an empty row keeps each one's slot), then collates `batch_size`
    rows (batching.py)."""

    def __init__(self, parent: grain.IterDataset, cfg: DataConfig, pad_id: int, start: int,
                 image_shape: tuple[int, ...]):
        super().__init__(parent)
        self.cfg, self.pad_id, self.start, self.image_shape = cfg, int(pad_id), start, image_shape

    def __iter__(self) -> "LlavaBatchIterator":
        return LlavaBatchIterator(self._parent.__iter__(), self.cfg, self.pad_id, self.start, self.image_shape)

    def __str__(self):
        return f"LlavaBatches(batch_size={self.cfg.batch_size}, buckets={self.cfg.bucket_lengths})"


class TooManyBadSamples(InputError):
    pass


class LlavaBatchIterator(grain.DatasetIterator):

    def __init__(self, parent: grain.DatasetIterator, cfg: DataConfig, pad_id: int, start: int,
                 image_shape: tuple[int, ...]):
        super().__init__(parent)
        self.cfg, self.pad_id, self.image_shape = cfg, pad_id, image_shape   # per image: pixels or features
        self._buckets = cfg.bucket_lengths
        self._good = self._truncated = 0
        self._bad = {r: 0 for r in BAD_REASONS}
        self._position = start * cfg.batch_size   # this process's rows of the stream read so far

    def __next__(self) -> dict:
        rows = []
        while len(rows) < self.cfg.batch_size:
            try:
                e = next(self._parent)
            except StopIteration:
                if rows and not self.cfg.drop_remainder:
                    break
                raise
            self._position += 1
            if self.cfg.packing:     # a packed row: its bad samples are counted and left out
                rows.append([x for x in map(self._count, e) if x["index"] >= 0])
            else:
                rows.append(self._count(e))
        c = self.cfg
        if c.packing:
            return collate_packed(rows, max_len=c.max_len, tokens_per_image=c.tokens_per_image,
                                  image_shape=self.image_shape, pad_id=self.pad_id)
        return collate(rows, buckets=self._buckets, tokens_per_image=c.tokens_per_image,
                       image_shape=self.image_shape, pad_id=self.pad_id)

    def _count(self, e: dict) -> dict:
        """Count a sample (good, truncated, bad by reason); a bad one becomes an empty row."""
        if "bad" in e:
            self._count_bad(e)
            return example([self.pad_id], [IGNORE_INDEX], None, index=-1)   # keeps the slot, trains nothing
        self._good += 1
        self._truncated += e["truncated"]
        return e

    def _count_bad(self, e):
        self._bad[e["bad"]] += 1
        n_bad = sum(self._bad.values())
        if n_bad <= _LOGGED_BAD:
            log.warning("%s: skipping record %d (%s): %s", self.cfg.data_path, e["index"], e["bad"], e["detail"])
        self._check()

    def _check(self) -> None:
        """The bad-sample limit, checked at every bad sample from the first one on (docs/bad-input.md):
        more than max_bad_fraction of the samples read so far, and at least min_bad_samples."""
        n_bad = sum(self._bad.values())
        seen = n_bad + self._good
        if n_bad >= max(self.cfg.min_bad_samples, 1) and n_bad > self.cfg.max_bad_fraction * seen:
            counts = {k: v for k, v in self._bad.items() if v}
            raise TooManyBadSamples(
                f"{self.cfg.data_path}: {n_bad} of {seen} samples read so far are bad "
                f"({n_bad / seen:.1%} > data.max_bad_fraction={self.cfg.max_bad_fraction}, and at least "
                f"data.min_bad_samples={self.cfg.min_bad_samples}): {counts}")

    def stats(self) -> dict:
        """Counters to log: good samples, truncated ones, bad ones by reason (this process)."""
        return {"good": self._good, "truncated": self._truncated, "bad": dict(self._bad),
                "bad_total": sum(self._bad.values())}

    def set_stats(self, stats: dict) -> None:
        """Continue counting from `stats` (e.g. a checkpoint's totals)."""
        self._good, self._truncated = int(stats["good"]), int(stats["truncated"])
        self._bad = {r: int(stats["bad"].get(r, 0)) for r in BAD_REASONS}

    def get_state(self) -> dict:
        """grain's iterator state (restore it into an iterator made with the same `start`)."""
        return {"parent": self._parent.get_state(), "position": self._position, **self.stats()}

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["parent"])
        self._position = int(state["position"])
        self.set_stats(state)

    def __str__(self):
        return f"LlavaBatchIterator(batch_size={self.cfg.batch_size})"
