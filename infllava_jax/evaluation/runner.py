"""Batched generation for evaluation: bucketed shapes, ahead-of-time compiled, data-parallel.

One program = prefill + one `lax.while_loop` decode with the KV cache (`generate.generate`),
exiting early once every row has emitted a stop token. Shapes are bucketed so that a sweep
compiles a bounded number of programs:

  batch       fixed (`batch_size`, rounded up to a multiple of the data-parallel size; a short
              last batch is filled with copies of its first row, whose outputs are dropped)
  prompt      left-padded to the smallest length bucket >= the longest prompt of the batch
  images      per row padded to the smallest image-count bucket (rows with fewer `<image>`
              sentinels simply leave the extra slots unused: `splice` marks them invalid)
  pixels      fixed per sweep point (the grid / resolution)
  new tokens  a static bucket per task (docs/evaluation.md)

so programs <= (grids) x (tasks' new-token buckets) x (length buckets used) x (image buckets
used). Every compiled program is kept (`Generator.compiles` counts them).

Left padding changes no output: pad slots are never attended, RoPE positions count only real
tokens, and every row reads its first token from its own last real slot, so a row's tokens are
the same in any batch (tested against batch size 1).

Data parallel and multi-host: the batch axis is sharded over the mesh axes (data, fsdp);
parameters follow the logical-axis rules (replicated on a pure data mesh). Each process builds
only the rows of its addressable shards (`jax.make_array_from_callback`); outputs are gathered
to every process (process 0 writes the files).
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from infllava_jax import sharding as sharding_lib
from infllava_jax.config import InfLlavaConfig
from infllava_jax.errors import InputError
from infllava_jax.generate import generate
from infllava_jax.splice import IMAGE_TOKEN_INDEX
from infllava_jax.token_ids import check_row

LENGTH_BUCKETS = (64, 128, 256, 512, 1024, 2048)
IMAGE_BUCKETS = (1, 2, 4, 8)
BASE_RES = 336  # sweep resolutions are given in CLIP-336 units: grid n = res / 336


def bucket(n: int, buckets: Sequence[int]) -> int:
    """Smallest bucket >= n (beyond the largest: the next multiple of the largest)."""
    for b in sorted(buckets):
        if n <= b:
            return int(b)
    top = max(buckets)
    return int(-(-n // top) * top)


def grid_config(config: InfLlavaConfig, res: int) -> InfLlavaConfig:
    """The model at sweep resolution `res`: grid n x n with n = res / 336, the released DEM
    operations at that grid (docs/model.md §4, "Other grids"); res = 336 is the 1 x 1 grid (one local crop
    = one strided crop = the low-resolution view, DEM still applied), not a DEM-free single view.
    A model without DEM (LLaVA-1.5) only has res = 336."""
    if res % BASE_RES or res < BASE_RES:
        raise ValueError(f"resolution {res} is not a multiple of {BASE_RES}")
    n = res // BASE_RES
    if config.dem is None:
        if n != 1:
            raise ValueError(f"a model without DEM (LLaVA-1.5) runs only at {BASE_RES}, not {res}")
        return config
    if (config.dem.nH, config.dem.nW) == (n, n):
        return config
    return config.replace(dem=dataclasses.replace(config.dem, nH=n, nW=n))


def pixel_size(config: InfLlavaConfig, mode: str) -> int:
    """Side of the preprocessed image fed to the model (inputs.image_size: `released` s, `native` n*s)."""
    from infllava_jax.inputs import image_size
    return image_size(config, mode)


def _host(x: jax.Array) -> np.ndarray:
    """All of a (possibly multi-host, batch-sharded) array on every process."""
    if x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


@dataclasses.dataclass
class Request:
    ids: np.ndarray            # (L,) int32, IMAGE_TOKEN_INDEX where each image goes
    images: list               # preprocessed images, (S, S, 3) channels-last, one per sentinel: float32
                               # (pixels.preprocess) or uint8 (pixels.resized_bytes, normalised on the device)


@dataclasses.dataclass
class Sampling:
    temperature: float = 0.0   # 0: greedy
    top_p: float = 1.0
    seed: int = 0


class Generator:
    """Generation for one set of parameters at any grid; see the module docstring."""

    def __init__(self, params, mesh=None, *, batch_size: int = 8, pad_id: int = 0,
                 stop_ids: Sequence[int] = (), length_buckets=LENGTH_BUCKETS,
                 image_buckets=IMAGE_BUCKETS):
        self.params = params
        self.mesh = mesh if mesh is not None else sharding_lib.make_mesh("data=-1")
        self.dp = sharding_lib.data_parallel_size(self.mesh)
        self.batch_size = int(-(-max(1, batch_size) // self.dp) * self.dp)
        self.pad_id, self.stop_ids = int(pad_id), tuple(int(s) for s in stop_ids)
        self.length_buckets, self.image_buckets = tuple(length_buckets), tuple(image_buckets)
        self._batch_sh = NamedSharding(self.mesh, PartitionSpec(sharding_lib.BATCH_AXES))
        self._repl = NamedSharding(self.mesh, PartitionSpec())
        self._compiled: dict = {}
        self.compile_seconds = 0.0
        self.batches = 0

    @property
    def compiles(self) -> int:
        """Programs compiled so far (one per distinct static configuration and shape bucket)."""
        return len(self._compiled)

    def programs(self) -> list[tuple]:
        return list(self._compiled)

    # -- host side ------------------------------------------------------------------------------
    def _global(self, shape, dtype, fill) -> jax.Array:
        """A batch-sharded global array; `fill(rows)` builds only the requested rows (each
        process only its addressable ones)."""
        def cb(index):
            rows = range(*index[0].indices(shape[0]))
            return np.ascontiguousarray(fill(rows), dtype)[(slice(None),) + tuple(index[1:])]
        return jax.make_array_from_callback(shape, self._batch_sh, cb)

    def _inputs(self, config: InfLlavaConfig, reqs: list[Request], image_size: int | None):
        """(ids, pixels, mask) of a full batch: prompts left-padded to a length bucket, images to
        an image-count bucket."""
        B = self.batch_size
        L = bucket(max(len(r.ids) for r in reqs), self.length_buckets)
        K = bucket(max(1, max(len(r.images) for r in reqs)), self.image_buckets)
        shapes = {np.shape(img) for r in reqs for img in r.images}
        if len(shapes) > 1:
            raise ValueError(f"images of one sweep point must share a shape, got {sorted(shapes)}")
        S = image_size or (next(iter(shapes))[0] if shapes else config.sub_image_size)
        for i, r in enumerate(reqs):
            r.ids = check_row(r.ids, None, config, len(r.images), f"of request {i}")[0]
            n_sent = int(np.sum(r.ids == IMAGE_TOKEN_INDEX))
            if n_sent != len(r.images):
                raise InputError(f"request {i}: its prompt has {n_sent} image sentinels but {len(r.images)} images")

        def ids_rows(rows):
            out = np.full((len(rows), L), self.pad_id, np.int32)
            for j, i in enumerate(rows):
                ids = np.asarray(reqs[i].ids, np.int32)
                out[j, L - len(ids):] = ids
            return out

        def mask_rows(rows):
            out = np.zeros((len(rows), L), np.int32)
            for j, i in enumerate(rows):
                out[j, L - len(reqs[i].ids):] = 1
            return out

        dtype = np.uint8 if all(np.asarray(img).dtype == np.uint8 for r in reqs for img in r.images) else np.float32

        def pix_rows(rows):
            out = np.zeros((len(rows), K, S, S, 3), dtype)
            for j, i in enumerate(rows):
                for k, img in enumerate(reqs[i].images):
                    out[j, k] = img
            return out

        return (self._global((B, L), np.int32, ids_rows), self._global((B, K, S, S, 3), dtype, pix_rows),
                self._global((B, L), np.int32, mask_rows))

    def generate(self, config: InfLlavaConfig, requests: Sequence[Request], *, max_new_tokens: int,
                 sampling: Sampling | None = None, image_size: int | None = None,
                 batch_index: int | None = None, on_token=None) -> list[np.ndarray]:
        """Tokens generated for each request (stop token included when reached). Sampling draws
        from key(seed) folded with `batch_index` (default: the number of batches run so far).
        `on_token(step, tokens)` gets each step's (batch_size,) tokens on the host (streaming; a
        static argument of the program: pass one long-lived object)."""
        if not requests:
            return []
        if len(requests) > self.batch_size:
            raise ValueError(f"{len(requests)} requests > batch size {self.batch_size}")
        reqs = list(requests) + [requests[0]] * (self.batch_size - len(requests))
        ids, pix, mask = self._inputs(config, reqs, image_size)
        s = sampling or Sampling()
        do_sample = s.temperature > 0
        put = functools.partial(jax.device_put, device=self._repl)
        stop = put(jnp.asarray(self.stop_ids or (-1,), jnp.int32))
        rng = put(jax.random.fold_in(jax.random.key(s.seed), self.batches if batch_index is None else batch_index))
        temp, top_p = put(jnp.float32(s.temperature if do_sample else 1.0)), put(jnp.float32(s.top_p))
        args = (self.params, ids, pix, mask, stop, rng if do_sample else None, temp, top_p)
        key = (config, int(max_new_tokens), do_sample, self.pad_id, ids.shape, pix.shape[:4], pix.dtype,
               len(self.stop_ids), on_token)
        exe = self._compiled.get(key)
        if exe is None:
            t = time.perf_counter()
            exe = generate.lower(config, *args, max_new_tokens=int(max_new_tokens), do_sample=do_sample,
                                 pad_id=self.pad_id, on_token=on_token).compile()
            self.compile_seconds += time.perf_counter() - t
            self._compiled[key] = exe
        tokens, lengths = exe(*args)
        self.batches += 1
        tokens, lengths = _host(tokens), _host(lengths)
        return [tokens[i, :lengths[i]] for i in range(len(requests))]
