"""Sharded safetensors written tensor by tensor (piece by piece), atomically.

Each shard's header is known before any data is read (names, dtypes, shapes come from the
plan), so a shard is written as: 8-byte header length, JSON header (space-padded to 8 bytes),
then every tensor's bytes in header order, read in pieces of at most PIECE_BYTES.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from convert.sources import SAFETENSORS_INDEX, SAFETENSORS_NAMES, Tensor

PIECE_BYTES = 256 << 20
DEFAULT_SHARD_BYTES = 5 * 10 ** 9   # transformers' default max_shard_size="5GB"


def natural_key(key: str):
    """model.layers.10.x after model.layers.9.x."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", key)]


def plan_shards(tensors: Mapping[str, Tensor], max_shard_bytes: int) -> list[list[str]]:
    shards, size = [[]], 0
    for k in sorted(tensors, key=natural_key):
        n = tensors[k].nbytes
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += n
    return shards


def _header(keys, tensors, metadata) -> bytes:
    header, offset = {}, 0
    for k in keys:
        t = tensors[k]
        dt = np.dtype(t.dtype)
        if dt not in SAFETENSORS_NAMES:
            raise ValueError(f"{k}: dtype {dt} has no safetensors name")
        header[k] = {"dtype": SAFETENSORS_NAMES[dt], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    if metadata:
        header["__metadata__"] = {str(a): str(b) for a, b in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)


def _pieces(t: Tensor):
    """Read regions of at most PIECE_BYTES along axis 0 (the whole tensor if small)."""
    if not t.shape or t.nbytes <= PIECE_BYTES:
        return [None]
    rows = max(1, PIECE_BYTES // max(1, t.nbytes // t.shape[0]))
    return [(slice(a, min(a + rows, t.shape[0])),) for a in range(0, t.shape[0], rows)]


def _read(t: Tensor, index) -> np.ndarray:
    return np.ascontiguousarray(t.read(index), dtype=t.dtype)


def _write_data(f, tensors: list[Tensor], progress: Callable[[int], None] | None) -> None:
    """Write the tensors' bytes in order; the next piece is read (in a thread) while the
    current one is written, so at most two pieces are in memory."""
    from concurrent.futures import ThreadPoolExecutor
    work = [(t, index) for t in tensors for index in _pieces(t)]
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(_read, *work[0]) if work else None
        for i in range(len(work)):
            a = pending.result()
            pending = pool.submit(_read, *work[i + 1]) if i + 1 < len(work) else None
            f.write(a.reshape(-1).view(np.uint8).data)
            if progress is not None:
                progress(a.nbytes)
            del a


def write_safetensors(tensors: Mapping[str, Tensor], directory: Path, *, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                      metadata: Mapping[str, str] | None = None, progress=None) -> list[str]:
    """Write `tensors` into `directory` (model.safetensors, or model-0000i-of-0000N.safetensors +
    model.safetensors.index.json). Returns the file names."""
    shards = plan_shards(tensors, max_shard_bytes)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for name, keys in zip(names, shards):
        head = _header(keys, tensors, metadata if metadata is not None else {"format": "pt"})
        with open(directory / name, "wb") as f:
            f.write(len(head).to_bytes(8, "little"))
            f.write(head)
            _write_data(f, [tensors[k] for k in keys], progress)
    if len(shards) > 1:
        index = {"metadata": {"total_size": int(sum(t.nbytes for t in tensors.values()))},
                 "weight_map": {k: name for name, keys in zip(names, shards) for k in keys}}
        (directory / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return names

