"""The frozen vision tower's features of every training image, computed once per run.

In both stages of the released recipe the vision tower is frozen (docs/model.md §7), so what it gives a
sample depends on the image alone: `InfLlavaModel.tower_features` (the DCM views through the tower,
hidden_states[-2]) is the same at every epoch. With `data.feature_bank=True` the trainer computes it
once for every image of the data file, in batches on the run's mesh, and the pipeline hands each
sample its image's features (V views, T tokens, D wide) in place of the pixels; the train step runs
DEM, projector and LLM only (`make_train_step(..., features=True)`). Same parameters, same
pixels, same function: the loss and gradients are the pixel path's (tests/test_feature_bank.py).

Costs: host memory N images x V x T x D x 4 bytes (the study's 1008 row: 4000 x 19 x 36 x 64 x 4 B
= 0.7 GB), so this is for small image sets read for many epochs (the miniature study), not for
665k images at 1008 px (19 x 576 x 1024 features each). Every process computes the whole bank
(and grain worker processes, data.num_workers > 0, would each get a pickled copy).
"""
from __future__ import annotations

import hashlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np
import flax.linen as nn

from infllava_jax import params as params_lib
from infllava_jax.data.examples import JsonRecordProcessor, image_paths
from infllava_jax.data.template import TemplateError
from infllava_jax.model import InfLlavaModel
from infllava_jax.sharding import LOGICAL_RULES, batch_sharding, data_parallel_size

log = logging.getLogger("infllava_jax")


class FeatureBank:
    """image path (as the records name it) -> float32 features (V, T, D); an image that could not
    be read raises the TemplateError its loading raised, so the pipeline counts it as before."""

    def __init__(self, features: np.ndarray, rows: dict[str, int], errors: dict[str, TemplateError]):
        self.features, self.rows, self.errors = features, rows, errors

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.features.shape[1:])

    def get(self, rel: str) -> np.ndarray:
        if rel in self.errors:
            raise self.errors[rel]
        if rel not in self.rows:
            raise KeyError(f"feature bank: no features for image {rel!r} (not in the data file it was built from)")
        return self.features[self.rows[rel]]


_LAST: dict = {}    # the last bank built in this process, by what it was built from (stage 2 after stage 1)


def build(config, params, records, processor: JsonRecordProcessor, mesh, batch: int = 64) -> FeatureBank:
    """Features of every distinct image of `records`, loaded as `processor` loads them (same
    size, mode, normalisation), through `config`'s tower with `params` cast as the train step
    casts them (training/step.compute_params). The process keeps the last bank: a run with the
    same tower weights, views and images (the study's stage 2 after its stage 1) reuses it, and a
    run of the local or strided crops alone slices them from a bank of all the views of its grid."""
    from infllava_jax.training.step import compute_params
    rels = list(dict.fromkeys(r for rec in records for r in _paths(rec)))
    tower = {"vision_tower": params_lib.rebox(config, compute_params(config, params))["vision_tower"]}
    key = (_fingerprint(tower), config.vision, config.image_size, config.select_layer, processor.spec.image_size,
           processor.spec.image_mode, processor.images, tuple(sorted(rels)), _layout(config.dem))
    if (bank := _from_last(key)) is not None:
        return bank
    model, t0 = InfLlavaModel(config), time.perf_counter()

    @jax.jit
    def encode(p, px):
        with nn.logical_axis_rules(LOGICAL_RULES):
            return model.apply({"params": p}, px, method=InfLlavaModel.tower_features)

    rows = data_parallel_size(mesh)
    batch = -(-batch // rows) * rows           # the batch splits over the mesh's batch axes
    chunks = [rels[i:i + batch] for i in range(0, len(rels), batch)]
    out, index, errors, last = [], {}, {}, t0

    def load(rel):
        try:
            return processor.image(rel)
        except TemplateError as e:
            return e

    with ThreadPoolExecutor(4) as pool:        # PIL decodes without the GIL
        pending = pool.map(load, chunks[0]) if chunks else None
        for j, chunk in enumerate(chunks):
            loaded = list(pending)
            if j + 1 < len(chunks):            # the next chunk loads while this one is encoded
                pending = pool.map(load, chunks[j + 1])
            pixels = []
            for rel, px in zip(chunk, loaded):
                if isinstance(px, TemplateError):
                    errors[rel] = px
                else:
                    index[rel] = len(index)
                    pixels.append(px)
            if pixels:
                px = np.zeros((batch, *pixels[0].shape), np.float32)
                px[:len(pixels)] = pixels
                out.append(np.asarray(encode(tower, jax.device_put(px, batch_sharding(mesh, px.ndim))))[:len(pixels)])
            done = sum(map(len, chunks[:j + 1]))
            if time.perf_counter() - last > 10 or done == len(rels):
                last = time.perf_counter()
                rate = done / (last - t0)
                log.info("feature bank: %d/%d images, %.0f images/s, ETA %.0f s", done, len(rels), rate,
                         (len(rels) - done) / rate)
    features = np.concatenate(out) if out else np.zeros((0, 1, 1, 1), np.float32)
    log.info("feature bank: %d images x %s features (%.0f MB) in %.1f s; %d unreadable", len(index),
             features.shape[1:], features.nbytes / 2**20, time.perf_counter() - t0, len(errors))
    _LAST.clear()
    _LAST[key] = FeatureBank(features, index, errors)
    return _LAST[key]


def _layout(dem) -> tuple:
    """What `tower_features` stacks for this DEM config (docs/model.md §2-4), as part of a bank's key."""
    if dem is None:
        return ("whole",)
    if dem.views != "both":
        return (dem.nH, dem.nW, dem.views)
    if dem.use_fast_path:
        return (dem.nH, dem.nW, "fast", dem.low_is_centre_strided_crop, dem.fast_path_crop_indices)
    return (dem.nH, dem.nW, "both")     # N local crops, N strided crops, the low-res view


def _from_last(key) -> FeatureBank | None:
    """The last bank if it was built from the same; the local (or strided) crops' bank sliced
    from it when it holds every crop of the same grid (the study's DCM + DEM row before its
    one-view rows); else None."""
    if key in _LAST:
        log.info("feature bank: reusing this process's last bank (same tower weights, views and images)")
        return _LAST[key]
    *same, layout = key
    if len(layout) != 3 or layout[2] not in ("local", "strided"):
        return None
    nH, nW, views = layout
    full = _LAST.get((*same, (nH, nW, "both")))
    if full is None:
        return None
    N = nH * nW
    start = 0 if views == "local" else N
    log.info("feature bank: the %s crops' features taken from this process's last bank (all views)", views)
    return FeatureBank(np.ascontiguousarray(full.features[:, start:start + N]), full.rows, full.errors)


def _fingerprint(tree) -> str:
    h = hashlib.sha256()
    for x in jax.tree.leaves(tree):
        h.update(np.asarray(jax.device_get(x)).tobytes())
    return h.hexdigest()


def _paths(record) -> list[str]:
    try:
        return image_paths(record, "") if isinstance(record, dict) else []
    except TemplateError:
        return []                  # a bad record: the pipeline counts it when it reaches it
