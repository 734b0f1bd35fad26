"""Our checkpoint format: a directory with `config.json` (InfLlavaConfig) and `params/` (an Orbax
checkpoint of the plain parameter tree, HF-like names).

`restore_params` puts each array straight onto its target sharding (the model never exists twice
in memory); `load_part` restores one top-level part (e.g. a vision tower) into another model.
`save_checkpoint` also takes `StreamedArray` leaves (what `python -m convert` writes), written
piece by piece, so a checkpoint larger than RAM can be produced. Every directory is written
atomically (`atomic_directory`): into a temporary sibling, then renamed.
"""
from __future__ import annotations

import abc
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from infllava_jax.config import InfLlavaConfig
from infllava_jax.errors import InputError, one_line

CONFIG_FILE, PARAMS_DIR = "config.json", "params"


class CheckpointError(InputError):
    """A checkpoint directory that is missing, incomplete or damaged (the message names it)."""


class MissingCheckpointError(CheckpointError, FileNotFoundError):
    """No config.json / params/ where a checkpoint should be (also a FileNotFoundError)."""


def load_config(path: str | os.PathLike) -> InfLlavaConfig:
    f = Path(path) / CONFIG_FILE
    if not f.is_file():
        raise MissingCheckpointError(f"{f}: missing; not a checkpoint written by save_pretrained / python -m convert")
    try:
        return InfLlavaConfig.from_json(f.read_text())
    except KeyError as e:
        raise CheckpointError(f"{f}: missing field {e}") from None
    except (ValueError, TypeError, AttributeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{f}: {one_line(e)}") from None


def _shapes(tree) -> dict[str, tuple]:
    return {jax.tree_util.keystr(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def restore_params(params_dir: Path, target, *, partial: bool = False):
    """Restore onto the shardings in `target` (a tree of ShapeDtypeStruct); a tree mismatch names
    the keys. `partial`: `target` may be a part of the saved tree (only that part is read)."""
    if not params_dir.is_dir():
        raise MissingCheckpointError(f"{params_dir}: missing parameter checkpoint")
    saved = _shapes(saved_metadata(params_dir))
    want = _shapes(target)
    missing, unexpected = sorted(set(want) - set(saved)), sorted(set(saved) - set(want))
    if missing or (unexpected and not partial):
        raise CheckpointError(f"{params_dir}: parameter tree does not match the config; missing "
                              f"{missing[:5]}, unexpected {unexpected[:5]}")
    for key, shape in want.items():
        if saved[key] != shape:
            raise CheckpointError(f"{params_dir}: parameter {key} has shape {saved[key]} in the checkpoint, "
                                  f"{shape} in config.json")
    if not partial:
        return read_orbax(params_dir, lambda c: c.restore(params_dir, target))
    args = ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                  partial_restore=True)
    return read_orbax(params_dir, lambda c: c.restore(params_dir, args=args), ocp.PyTreeCheckpointer)


def saved_metadata(params_dir: Path) -> dict:
    """{name: array metadata} of an Orbax parameter checkpoint; CheckpointError if unreadable."""
    meta = read_orbax(params_dir, lambda c: c.metadata(params_dir).item_metadata)
    if meta is None:   # orbax logged why and returned None: its reads failed all the same
        _FAILED_READS.add(str(params_dir))
        raise CheckpointError(f"{params_dir}: no readable parameter metadata (a half-written or damaged checkpoint)")
    return dict(meta)


def read_orbax(params_dir: Path, read: Callable, checkpointer=None):
    """read(c) with an Orbax checkpointer `c` (closed afterwards, so that no background thread
    outlives a failure), Orbax's and tensorstore's errors about a half-written or damaged
    checkpoint (pages of tensorstore spec, a bare Exception) as one CheckpointError line naming it.
    `checkpointer=None`: StandardCheckpointer; read() without arguments if `checkpointer` is False."""
    _quiet_orbax_leftovers()
    try:
        if checkpointer is False:
            return read()
        with (checkpointer or ocp.StandardCheckpointer)() as c:
            return read(c)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - orbax raises bare Exception for unreadable arrays
        _FAILED_READS.add(str(params_dir))
        if type(e) is Exception and isinstance(e.__cause__ or e.__context__, Exception):
            e = e.__cause__ or e.__context__   # orbax's wrapper: tensorstore's error says what is wrong
        raise CheckpointError(f"{params_dir}: incomplete or damaged checkpoint ({type(e).__name__}: "
                              f"{one_line(e, 200)})") from None


def load_part(path: str | os.PathLike, part: str, target):
    """The top-level `part` (e.g. "vision_tower") of the checkpoint at `path`, restored onto
    `target` (that part's ShapeDtypeStructs with shardings, in the model that receives it)."""
    return restore_params(Path(path) / PARAMS_DIR, {part: target}, partial=True)[part]


# ----------------------------------------------------------------------------- streamed writes

class StreamedArray(abc.ABC):
    """A parameter that `save_checkpoint` writes slice by slice and never holds whole: e.g. a
    tensor being converted from a PyTorch checkpoint (convert/engine.Leaf).

    `read(index)` returns the region `index` (a tuple of unit-step slices) as a numpy array of
    `dtype`; writes stream along `chunk_axis` in pieces of about STREAM_CHUNK_BYTES."""
    shape: tuple[int, ...]
    dtype: np.dtype
    chunk_axis: int = 0

    @abc.abstractmethod
    def read(self, index: tuple[slice, ...]) -> np.ndarray:
        ...

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


STREAM_CHUNK_BYTES = 64 << 20      # target size of one streamed piece (at least one row / layer)
STREAM_INFLIGHT_BYTES = 256 << 20  # pieces handed to tensorstore and not yet committed


def stream_chunks(a: StreamedArray, chunk_bytes: int | None = None) -> tuple[int, ...]:
    """Chunk shape of a streamed array: full extent except along chunk_axis."""
    chunk_bytes = STREAM_CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    shape = tuple(a.shape)
    if not shape:
        return shape
    ax = a.chunk_axis
    per = max(1, a.nbytes // max(1, shape[ax]))
    return shape[:ax] + (max(1, min(shape[ax], chunk_bytes // per)),) + shape[ax + 1:]


class _StreamedArrayHandler(ocp.type_handlers.NumpyHandler):
    """Orbax handler writing a StreamedArray piece by piece into the array orbax would have
    created for a numpy leaf (same tensorstore spec, chunked along chunk_axis); restores as a
    plain array. At most STREAM_INFLIGHT_BYTES of pieces are in flight."""

    def __init__(self, progress=None):
        super().__init__()
        self._progress = progress

    def typestr(self) -> str:
        return "np.ndarray"   # what it restores as

    async def serialize(self, values, infos, args=None):
        args = args or [ocp.type_handlers.SaveArgs()] * len(values)
        return [ocp.future.CommitFutureAwaitingContractedSignals(
            self._write_all(values, infos, args), name="streamed_array")]

    async def _write_all(self, values, infos, args):
        import tensorstore as ts
        pending: list = []   # (future, nbytes)
        for value, info, arg in zip(values, infos, args):
            await info.await_path_creation()
            chunk = stream_chunks(value)
            spec = ocp.type_handlers.get_json_tspec_write(
                info, use_ocdbt=info.is_ocdbt_checkpoint, global_shape=tuple(value.shape),
                local_shape=chunk, dtype=np.dtype(value.dtype), arg=arg,
                process_index=jax.process_index() if info.is_ocdbt_checkpoint else None)
            store = await ts.open(ts.Spec(spec), create=True, open=True, context=info.ts_context)
            if not value.shape:
                await store.write(value.read(()))
                continue
            ax, step = value.chunk_axis, chunk[value.chunk_axis]
            for start in range(0, value.shape[ax], step):
                index = (slice(None),) * ax + (slice(start, min(start + step, value.shape[ax])),)
                piece = value.read(index)   # a fresh array nobody else touches: no copy needed
                pending.append((store[index].write(piece, can_reference_source_data_indefinitely=True),
                                piece.nbytes))
                while sum(n for _, n in pending) > STREAM_INFLIGHT_BYTES:
                    await self._done(pending.pop(0))
        while pending:
            await self._done(pending.pop(0))

    async def _done(self, item):
        future, nbytes = item
        await future
        if self._progress is not None:
            self._progress(nbytes)


def _save_params(directory: Path, params, progress) -> None:
    if any(isinstance(x, StreamedArray) for x in jax.tree.leaves(params)):
        registry = ocp.type_handlers.create_type_handler_registry(
            (StreamedArray, _StreamedArrayHandler(progress)),
            *((t, ocp.type_handlers.get_type_handler(t)) for t in ocp.type_handlers.supported_types()))
        ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry))
        ckptr.save(directory, args=ocp.args.PyTreeSave(params))
    else:
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(directory, params)
        ckptr.wait_until_finished()


def save_checkpoint(path: str | os.PathLike, config: InfLlavaConfig, params, *, progress=None,
                    before_commit: Callable[[], None] | None = None,
                    extra_files: Callable[[Path], None] | None = None) -> None:
    """Write `config.json` + `params/` atomically (an existing checkpoint at `path` is replaced).

    Leaves may be arrays or `StreamedArray`s; a tree with StreamedArrays is written piece by
    piece (peak memory ~ STREAM_INFLIGHT_BYTES + one piece, whatever the model size);
    `progress(nbytes)` is called as pieces are committed. Every process takes part.
    `before_commit()` runs once everything is written; if it raises, `path` is left as it was.
    `extra_files(dir)` (process 0) adds files next to config.json (usage.json, tokenizer files)."""
    def fill(tmp: Path) -> None:
        _save_params(tmp / PARAMS_DIR, params, progress)
        if jax.process_index() == 0:
            (tmp / CONFIG_FILE).write_text(config.to_json())
            if extra_files is not None:
                extra_files(tmp)
        if before_commit is not None:
            before_commit()
    atomic_directory(path, fill, overwrite=True)


# ----------------------------------------------------------------------------- atomic directories

def atomic_directory(path: str | os.PathLike, fill: Callable[[Path], None], *, overwrite: bool = False) -> None:
    """Run fill(tmp) on a temporary sibling of `path`, then rename it to `path`, replacing an
    existing `path` only once the new one is complete: a reader sees the old directory or the
    new one, never half of one. With several processes every process fills one shared temporary
    directory and process 0 renames it."""
    from jax.experimental import multihost_utils

    path = Path(path).absolute()
    if path.exists() and not overwrite:
        raise FileExistsError(path)
    first, multi = jax.process_index() == 0, jax.process_count() > 1
    if multi:   # one shared name that every process can compute
        tmp = path.with_name(f".{path.name}.tmp-multiprocess")
        if first:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        multihost_utils.sync_global_devices(f"atomic_directory:{path}:start")
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        tmp.chmod(0o777 & ~_umask())     # mkdtemp's 0700 -> what mkdir gives: the user's umask
    try:
        fill(tmp)
        if multi:
            multihost_utils.sync_global_devices(f"atomic_directory:{path}:filled")
        if first:
            _commit(tmp, path)
        if multi:
            multihost_utils.sync_global_devices(f"atomic_directory:{path}:done")
    finally:
        if first:
            shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _commit(tmp: Path, path: Path) -> None:
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old)
    else:
        tmp.rename(path)


_FAILED_READS: set[str] = set()   # parameter directories whose read failed (and was reported)


def _quiet_orbax_leftovers() -> None:
    """When one of Orbax's reads fails, the others still in flight finish later on the event loop
    Orbax has closed: tensorstore's callbacks raise "Event loop is closed" (printed as unraisable
    tracebacks, some before the failure reaches us), and the asyncio tasks that failed too are
    logged as "Task exception was never retrieved" when collected, maybe in the middle of a later
    job. Both repeat an error reported in one line: drop those, from the first read on (only those:
    the latter only when they name a directory in _FAILED_READS)."""
    old = sys.unraisablehook
    if getattr(old, "drops_closed_loop", False):
        return

    def hook(u):
        if not (isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed"):
            old(u)
    hook.drops_closed_loop = True
    sys.unraisablehook = hook

    def keep(record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (str(record.msg).startswith("Task exception was never retrieved") and exc is not None
                    and any(d in str(exc) for d in _FAILED_READS))
    logging.getLogger("asyncio").addFilter(keep)
