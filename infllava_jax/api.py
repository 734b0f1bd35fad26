"""`InfLlava`: the public entry point (numpy in, numpy out) and our checkpoint format.

A checkpoint directory holds `config.json` (InfLlavaConfig) and `params/` (an Orbax checkpoint
of the plain parameter tree, HF-like names). `from_pretrained` restores each array straight
onto its target sharding: the model never exists twice in memory. `save_checkpoint` also takes
`StreamedArray` leaves (what `python -m convert` writes), written piece by piece, so a
checkpoint larger than RAM can be produced.
"""
from __future__ import annotations

import abc
import functools
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from infllava_jax import sharding as sharding_lib
from infllava_jax.config import InfLlavaConfig
from infllava_jax.generate import LLAMA3_STOP_IDS, generate_core
from infllava_jax.model import InfLlavaModel

CONFIG_FILE, PARAMS_DIR = "config.json", "params"


def _dummy_inputs(config: InfLlavaConfig):
    H, W = config.image_size
    ids = jnp.array([[config.image_token_index, 1]], jnp.int32)
    return ids, jnp.zeros((1, H, W, 3), jnp.float32)


@functools.lru_cache(maxsize=8)
def boxed_abstract_params(config: InfLlavaConfig):
    """Parameter shapes boxed with their logical axis names (nn.LogicallyPartitioned)."""
    return jax.eval_shape(lambda: InfLlavaModel(config).init(jax.random.key(0), *_dummy_inputs(config)))["params"]


def abstract_params(config: InfLlavaConfig):
    """(tree of ShapeDtypeStruct, tree of logical PartitionSpecs) without allocating anything."""
    boxed = boxed_abstract_params(config)
    return nn.unbox(boxed), nn.get_partition_spec(boxed)


def rebox(config: InfLlavaConfig, params):
    """Plain params -> boxed with logical names, so that inside `apply` (under
    nn.logical_axis_rules and a mesh) every module constrains its weights to their sharding,
    per layer inside scans: weights are gathered layer by layer and their gradients
    reduce-scattered, never materialised whole."""
    is_box = lambda x: isinstance(x, nn.Partitioned)
    return jax.tree.map(lambda b, x: b.replace_boxed(x), boxed_abstract_params(config), params, is_leaf=is_box)


def param_shardings(config: InfLlavaConfig, mesh=None):
    """NamedShardings from the logical-axis rules table (all on one device when mesh is None)."""
    mesh = sharding_lib.make_mesh({"fsdp": 1}, jax.devices()[:1]) if mesh is None else mesh
    shapes, specs = abstract_params(config)
    return sharding_lib.logical_to_shardings(specs, mesh, shapes)


def init_params(config: InfLlavaConfig, seed: int = 0, mesh=None):
    """Random parameters, created directly in their sharding."""
    shardings = param_shardings(config, mesh)
    init = lambda key: nn.unbox(InfLlavaModel(config).init(key, *_dummy_inputs(config)))["params"]
    return jax.jit(init, out_shardings=shardings)(jax.random.key(seed))


@functools.partial(jax.jit, static_argnums=0)
def _forward(config, params, input_ids, pixel_values, attention_mask):
    return InfLlavaModel(config).apply({"params": params}, input_ids, pixel_values, attention_mask)


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens"))
def _generate(config, params, input_ids, pixel_values, attention_mask, stop_ids, *, max_new_tokens):
    x = InfLlavaModel(config).apply({"params": params}, input_ids, pixel_values, attention_mask,
                                    method=InfLlavaModel.embed_inputs)
    return generate_core(config.llm, params["language_model"], x["inputs_embeds"], x["attention_mask"],
                         max_new_tokens=max_new_tokens, stop_ids=stop_ids,
                         pad_id=config.pad_token_id or 0)


def _to_channels_last(pixel_values) -> jax.Array:
    """(B, 3, H, W) or (B, K, 3, H, W) numpy, as PyTorch code passes it -> channels-last."""
    x = np.asarray(pixel_values, np.float32)
    if x.ndim not in (4, 5) or x.shape[-3] != 3:
        raise ValueError(f"pixel_values has shape {x.shape}; expected (B, 3, H, W) or (B, K, 3, H, W)")
    return jnp.asarray(np.moveaxis(x, -3, -1))


class InfLlava:
    """An INF-LLaVA (or LLaVA-1.5) model: a config and a parameter tree.

        model = InfLlava.from_pretrained(ckpt_dir)
        logits = model(input_ids, pixel_values)     # numpy in, numpy out

    input_ids (B, L) int with one -200 per image; pixel_values (B, 3, H, W) CLIP-normalised
    float32, H = W = n*s (used directly) or s (bicubic-upsampled first, the released inference
    path). Returns float32 logits (B, L - 1 + tokens_per_image, V).
    """

    def __init__(self, config: InfLlavaConfig, params: Any):
        self.config, self.params = config, params

    @classmethod
    def init(cls, config: InfLlavaConfig, seed: int = 0, mesh=None) -> "InfLlava":
        return cls(config, init_params(config, seed, mesh))

    def __call__(self, input_ids, pixel_values, attention_mask=None) -> np.ndarray:
        ids = jnp.asarray(input_ids, jnp.int32)
        mask = None if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
        return np.asarray(_forward(self.config, self.params, ids, _to_channels_last(pixel_values), mask))

    def generate(self, input_ids, pixel_values, attention_mask=None, *, max_new_tokens: int = 64,
                 stop_ids: Sequence[int] = LLAMA3_STOP_IDS) -> list[np.ndarray]:
        """Greedy decoding; prompts left-padded. Returns one array of new tokens per row
        (stop token included)."""
        ids = jnp.asarray(input_ids, jnp.int32)
        mask = jnp.ones_like(ids) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
        tokens, lengths = _generate(self.config, self.params, ids, _to_channels_last(pixel_values), mask,
                                    jnp.asarray(stop_ids, jnp.int32), max_new_tokens=max_new_tokens)
        tokens, lengths = np.asarray(tokens), np.asarray(lengths)
        return [t[:n] for t, n in zip(tokens, lengths)]

    # -- checkpoint format ----------------------------------------------------------------------
    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write `config.json` + `params/` atomically: into a temporary sibling, then renamed."""
        save_checkpoint(path, self.config, self.params)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, mesh=None) -> "InfLlava":
        config = load_config(path)
        abstract, _ = abstract_params(config)
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              abstract, param_shardings(config, mesh))
        return cls(config, restore_params(Path(path) / PARAMS_DIR, target))


def load_vision_tower(path: str | os.PathLike, config: InfLlavaConfig, mesh=None):
    """The `vision_tower` of the checkpoint at `path`, restored onto the shardings it has in a model
    of `config` (e.g. the study's stage-0 tower into each row's stage 1). Towers must have the same
    architecture."""
    theirs = load_config(path)
    if theirs.vision.to_hf() != config.vision.to_hf():
        raise ValueError(f"{path}: its vision tower {theirs.vision.to_hf()} is not this model's "
                         f"{config.vision.to_hf()}")
    abstract, _ = abstract_params(theirs)
    target = {k: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), v) for k, v in abstract.items()}
    target["vision_tower"] = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                                          abstract["vision_tower"], param_shardings(config, mesh)["vision_tower"])
    return restore_params(Path(path) / PARAMS_DIR, target)["vision_tower"]


def load_config(path: str | os.PathLike) -> InfLlavaConfig:
    f = Path(path) / CONFIG_FILE
    if not f.is_file():
        raise FileNotFoundError(f"{f}: missing; not a checkpoint written by save_pretrained / python -m convert")
    try:
        return InfLlavaConfig.from_json(f.read_text())
    except (ValueError, TypeError, KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"{f}: {e}") from e


def restore_params(params_dir: Path, target):
    """Restore onto the shardings in `target` (a tree of ShapeDtypeStruct); a tree mismatch names
    the keys."""
    if not params_dir.is_dir():
        raise FileNotFoundError(f"{params_dir}: missing parameter checkpoint")
    ckptr = ocp.StandardCheckpointer()
    saved = ckptr.metadata(params_dir).item_metadata
    want = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(target)[0]}
    have = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(dict(saved))[0]}
    if want != have:
        raise ValueError(f"{params_dir}: parameter tree does not match the config; missing "
                         f"{sorted(want - have)[:5]}, unexpected {sorted(have - want)[:5]}")
    shapes = {jax.tree_util.keystr(p): tuple(m.shape) for p, m in jax.tree_util.tree_flatten_with_path(dict(saved))[0]}
    for p, t in jax.tree_util.tree_flatten_with_path(target)[0]:
        key = jax.tree_util.keystr(p)
        if shapes[key] != tuple(t.shape):
            raise ValueError(f"{params_dir}: parameter {key} has shape {shapes[key]} in the checkpoint, "
                             f"{tuple(t.shape)} in config.json")
    return ckptr.restore(params_dir, target)


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


def save_checkpoint(path: str | os.PathLike, config: InfLlavaConfig, params, *, progress=None) -> None:
    """Write `config.json` + `params/` atomically: into a temporary sibling, then renamed.

    Leaves may be arrays or `StreamedArray`s; a tree with StreamedArrays is written piece by
    piece (peak memory ~ STREAM_INFLIGHT_BYTES + one piece, whatever the model size);
    `progress(nbytes)` is called as pieces are committed. With several processes every process
    writes its shards into one temporary directory and process 0 adds config.json and renames."""
    from jax.experimental import multihost_utils

    path = Path(path).absolute()
    multi = jax.process_count() > 1
    if multi:   # one shared name that every process can compute
        tmp = path.with_name(f".{path.name}.tmp-multiprocess")
        if jax.process_index() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        multihost_utils.sync_global_devices(f"save_checkpoint:{path}:start")
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        if any(isinstance(x, StreamedArray) for x in jax.tree.leaves(params)):
            registry = ocp.type_handlers.create_type_handler_registry(
                (StreamedArray, _StreamedArrayHandler(progress)),
                *((t, ocp.type_handlers.get_type_handler(t)) for t in ocp.type_handlers.supported_types()))
            ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry))
            ckptr.save(tmp / PARAMS_DIR, args=ocp.args.PyTreeSave(params))
        else:
            ckptr = ocp.StandardCheckpointer()
            ckptr.save(tmp / PARAMS_DIR, params)
            ckptr.wait_until_finished()
        if multi:
            multihost_utils.sync_global_devices(f"save_checkpoint:{path}:params")
        if jax.process_index() == 0:
            (tmp / CONFIG_FILE).write_text(config.to_json())   # written last: marks a complete checkpoint
            commit_directory(tmp, path)
        if multi:
            multihost_utils.sync_global_devices(f"save_checkpoint:{path}:done")
    finally:
        if jax.process_index() == 0:
            shutil.rmtree(tmp, ignore_errors=True)


def commit_directory(tmp: Path, path: Path) -> None:
    """Rename the finished directory `tmp` to `path`, replacing an existing `path` only once the
    new one is complete: a reader sees the old checkpoint or the new one, never half of one."""
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old)
    else:
        tmp.rename(path)
