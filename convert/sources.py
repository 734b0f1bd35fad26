"""PyTorch checkpoints read lazily: a state dict is a `dict[str, Tensor]` whose values read one
tensor, or one slice of one, on demand.

- safetensors: the header is parsed here (8-byte length + JSON, a documented format) and a read
  is one `pread` of the requested rows. Not a long-lived mmap on purpose: pages of a mapped
  file that were touched count in the process' RSS until unmapped, so streaming a 5 GB shard
  through a mapping would show ~5 GB resident. A read copies only the bytes asked for.
- PyTorch pickles (`pytorch_model*.bin`, `mm_projector.bin`): `torch.load(weights_only=True,
  mmap=True)` only, never a full unpickler. A file that needs more is refused
  (`UnsafeCheckpointError`). torch is imported only for these files.
- virtual tensors: `GrownRows` (vocabulary growth: rows appended, set to the mean row) and
  `InitTensor` (fresh PyTorch-default initialisation), used to build stage-1/2 starting points.
"""
from __future__ import annotations

import json
import os
import pickle
import warnings
import zlib
from pathlib import Path
from typing import Mapping, Sequence

import ml_dtypes
import numpy as np

from convert.errors import ConversionError, MissingKeysError, UnexpectedKeysError, UnsafeCheckpointError, listing

SAFETENSORS_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
SAFETENSORS_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
SAFETENSORS_INDEX, BIN_INDEX = "model.safetensors.index.json", "pytorch_model.bin.index.json"


def ranges(index, shape: Sequence[int]) -> list[tuple[int, int]]:
    """A tuple of unit-step slices (or None = everything) -> [(start, stop)] per axis."""
    if index is None:
        return [(0, n) for n in shape]
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    out = []
    for s, n in zip(index, shape):
        start, stop, step = s.indices(n)
        if step != 1:
            raise ValueError(f"strided read {s} is not supported")
        out.append((start, max(start, stop)))
    return out


class Tensor:
    """One tensor of a checkpoint, not yet read. `read(index)` returns a numpy array (possibly a
    view into a buffer the caller must not keep) of the region `index` (unit-step slices)."""
    shape: tuple[int, ...]
    dtype: np.dtype
    where: str = ""      # file it lives in, for messages

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def read(self, index=None) -> np.ndarray:
        raise NotImplementedError


class SafetensorsTensor(Tensor):
    def __init__(self, path: Path, offset: int, shape, dtype: np.dtype):
        self.path, self.offset, self.shape, self.dtype = path, offset, tuple(shape), dtype
        self.where = str(path)

    def read(self, index=None) -> np.ndarray:
        if not self.shape:
            return np.fromfile(self.path, self.dtype, 1, offset=self.offset).reshape(())
        r = ranges(index, self.shape)
        (a, b), rest = r[0], r[1:]
        row = int(np.prod(self.shape[1:], dtype=np.int64))
        out = np.fromfile(self.path, self.dtype, (b - a) * row, offset=self.offset + a * row * self.dtype.itemsize)
        out = out.reshape((b - a,) + self.shape[1:])
        if any((s, e) != (0, n) for (s, e), n in zip(rest, self.shape[1:])):
            out = out[(slice(None),) + tuple(slice(s, e) for s, e in rest)]
        return out


def _torch_to_numpy(t) -> np.ndarray:
    """torch tensor -> numpy view, bitwise (bf16 and fp8 have no numpy dtype in torch)."""
    import torch
    special = {torch.bfloat16: (torch.int16, ml_dtypes.bfloat16),
               torch.float8_e4m3fn: (torch.uint8, ml_dtypes.float8_e4m3fn),
               torch.float8_e5m2: (torch.uint8, ml_dtypes.float8_e5m2)}
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.dtype in special:
        as_int, np_dtype = special[t.dtype]
        return t.view(as_int).numpy().view(np_dtype)
    return t.numpy()


class ArrayTensor(Tensor):
    """An in-memory array (numpy, jax or torch) seen as a Tensor."""

    def __init__(self, value, where: str = "state dict"):
        if hasattr(value, "detach"):   # torch
            value = _torch_to_numpy(value)
        elif not hasattr(value, "shape"):
            value = np.asarray(value)
        self.value, self.where = value, where
        self.shape, self.dtype = tuple(value.shape), np.dtype(value.dtype)

    def read(self, index=None) -> np.ndarray:
        if index is None:
            return np.asarray(self.value)
        return np.asarray(self.value[tuple(slice(a, b) for a, b in ranges(index, self.shape))])


class GrownRows(Tensor):
    """`base` with `extra` rows appended, each the mean of base's rows (computed in float64, then
    rounded to base's dtype): what the released training did to embed_tokens and lm_head when
    it added `<pad>` (LLaVA's smart_tokenizer_and_embedding_resize)."""

    def __init__(self, base: Tensor, extra: int = 1):
        self.base, self.extra, self.where = base, extra, base.where + f" (+{extra} mean row)"
        self.shape = (base.shape[0] + extra,) + tuple(base.shape[1:])
        self.dtype = base.dtype
        self._mean = None

    def mean_row(self) -> np.ndarray:
        if self._mean is None:
            n, rows = self.base.shape[0], max(1, (64 << 20) // max(1, self.base.nbytes // self.base.shape[0]))
            acc = np.zeros(self.base.shape[1:], np.float64)
            for a in range(0, n, rows):
                acc += self.base.read((slice(a, min(n, a + rows)),)).astype(np.float64).sum(0)
            self._mean = (acc / n).astype(self.dtype)
        return self._mean

    def read(self, index=None) -> np.ndarray:
        r = ranges(index, self.shape)
        (a, b), rest = r[0], tuple(slice(s, e) for s, e in r[1:])
        n = self.base.shape[0]
        parts = []
        if a < n:
            parts.append(self.base.read((slice(a, min(b, n)),) + rest))
        if b > n:
            m = self.mean_row()[rest]
            parts.append(np.broadcast_to(m, (b - max(a, n),) + m.shape))
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


class InitTensor(Tensor):
    """A freshly initialised torch parameter, as PyTorch's defaults draw it (deterministic in
    (seed, name)): Linear weight and bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (kaiming_uniform
    with a=sqrt(5)), LayerNorm weight 1, bias 0. kind: "uniform" | "ones" | "zeros"."""

    def __init__(self, name: str, shape, kind: str, fan_in: int = 1, seed: int = 0, dtype=np.float32):
        self.name, self.shape, self.kind, self.fan_in, self.seed = name, tuple(shape), kind, fan_in, seed
        self.dtype, self.where = np.dtype(dtype), f"fresh init ({kind})"

    def read(self, index=None) -> np.ndarray:
        if self.kind in ("ones", "zeros"):
            full = np.full(self.shape, 1.0 if self.kind == "ones" else 0.0, self.dtype)
        else:
            rng = np.random.default_rng([self.seed, zlib.crc32(self.name.encode())])
            bound = 1.0 / np.sqrt(self.fan_in)
            full = rng.uniform(-bound, bound, self.shape).astype(self.dtype)
        return full if index is None else full[tuple(slice(a, b) for a, b in ranges(index, self.shape))]


# ----------------------------------------------------------------------------- files

MAX_HEADER_BYTES = 100 << 20   # the safetensors library's own limit on the JSON header


def open_safetensors(path: str | os.PathLike) -> dict[str, Tensor]:
    """The tensors of a .safetensors file. Everything the header claims is checked against the
    file size before anything is read or allocated: a cut-short file or a lying header is a
    ConversionError naming the file (and the tensor)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or n + 8 > size or n > MAX_HEADER_BYTES:
            raise ConversionError(f"{path}: not a safetensors file or cut short (header length {n}, "
                                  f"file {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConversionError(f"{path}: not a safetensors file ({e})") from None
    if not isinstance(header, dict):
        raise ConversionError(f"{path}: not a safetensors file (its header is not a JSON object)")
    header.pop("__metadata__", None)
    return {key: _safetensors_entry(path, key, info, 8 + n, size) for key, info in header.items()}


def _safetensors_entry(path: Path, key: str, info, start: int, size: int) -> "SafetensorsTensor":
    try:
        dtype = SAFETENSORS_DTYPES[info["dtype"]]
        shape, (b, e) = tuple(int(x) for x in info["shape"]), info["data_offsets"]
        b, e = int(b), int(e)
    except (KeyError, TypeError, ValueError):
        raise ConversionError(f"{path}: tensor {key!r} has an unsupported dtype or a malformed entry "
                              f"{str(info)[:200]}") from None
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize if all(0 <= d < 1 << 40 for d in shape) else -1
    if nbytes < 0 or not 0 <= b <= e or e - b != nbytes or start + e > size:
        raise ConversionError(f"{path}: tensor {key!r} {str(info)[:200]} does not fit the file ({size} bytes): "
                              f"cut short or a damaged header")
    return SafetensorsTensor(path, start + b, shape, dtype)


def open_torch_pickle(path: str | os.PathLike) -> dict[str, Tensor]:
    """torch.load(weights_only=True), memory-mapped when the file is in the zip format."""
    import torch
    path = Path(path)
    try:
        with warnings.catch_warnings():   # torch warns about pickle protocols; we report errors ourselves
            warnings.simplefilter("ignore")
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:   # legacy (non-zip) serialisation cannot be memory-mapped
                if "mmap" not in str(e) and "zip" not in str(e):
                    raise
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        why = str(e).strip().splitlines()
        detail = next((l.strip() for l in why if "GLOBAL" in l or "Unsupported" in l), why[0] if why else "")
        raise UnsafeCheckpointError(
            f"{path}: refused: loading it needs more than torch.load(weights_only=True) allows "
            f"({detail[:200]}); only plain tensor checkpoints are read") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise ConversionError(f"{path}: cannot read as a PyTorch checkpoint: {str(e).splitlines()[0][:200]}") from None
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{path}: holds a {type(obj).__name__}, not a state dict (name -> tensor)")
    out = {}
    for k, v in obj.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise ConversionError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor")
        out[k] = ArrayTensor(v, where=str(path))
    return out


def open_file(path: str | os.PathLike) -> dict[str, Tensor]:
    path = Path(path)
    if path.suffix == ".safetensors":
        return open_safetensors(path)
    if path.suffix in (".bin", ".pt", ".pth"):
        return open_torch_pickle(path)
    raise ConversionError(f"{path}: unknown weight file type (expected .safetensors or .bin)")


def _merge(parts: list[tuple[Path, dict[str, Tensor]]]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for path, tensors in parts:
        for k, t in tensors.items():
            if k in out:
                raise ConversionError(f"tensor {k!r} is in both {out[k].where} and {path}")
            out[k] = t
    return out


def weight_files(directory: Path) -> tuple[list[Path], dict | None]:
    """The weight files of an HF-style directory (safetensors preferred) and its index, if any."""
    for index_name, pattern in ((SAFETENSORS_INDEX, "*.safetensors"), (BIN_INDEX, "pytorch_model*.bin")):
        index_file = directory / index_name
        if index_file.is_file():
            try:
                weight_map = json.loads(index_file.read_text())["weight_map"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
                raise ConversionError(f"{index_file}: not a weight index ({type(e).__name__}: {e})") from None
            if not (isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values())):
                raise ConversionError(f"{index_file}: weight_map must map tensor names to file names")
            files = sorted({directory / f for f in weight_map.values()})
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise ConversionError(f"{index_file} names shard(s) that do not exist: {listing(missing)}")
            return files, weight_map
        files = sorted(directory.glob(pattern))
        if files:
            return files, None
    raise ConversionError(f"{directory}: no weights (*.safetensors, pytorch_model*.bin, or an index)")


def open_weights(path: str | os.PathLike) -> dict[str, Tensor]:
    """All tensors of a weight file or of an HF-style directory (sharded or not, with or without
    an index; the index and the shards must agree exactly)."""
    path = Path(path)
    if not path.is_dir():
        if not path.exists():
            raise ConversionError(f"{path}: no such file or directory")
        return open_file(path)
    files, weight_map = weight_files(path)
    tensors = _merge([(f, open_file(f)) for f in files])
    if weight_map is not None:
        wrong = [k for k, f in weight_map.items() if k not in tensors or Path(tensors[k].where).name != f]
        if wrong:
            raise MissingKeysError(f"{path}: the index lists tensors its shards do not hold where it says: "
                                   f"{listing(wrong)}")
        unlisted = sorted(set(tensors) - set(weight_map))
        if unlisted:
            raise UnexpectedKeysError(f"{path}: shards hold tensors the index does not list: {listing(unlisted)}")
    return tensors
