"""Stage 0 of the miniature study: pretrain the tiny vision tower, the tiny model's "CLIP".

The released recipe starts from a pretrained CLIP and never trains it (docs/model.md section 7); the tiny
model has no such tower, so this trains one, once, on the synthetic train split only, and every
row of the study then uses it frozen. Objective: dense supervision from the generator's ground
truth (study/targets.py). Every ViT patch of every kind of view the study's rows feed the
tower (the whole scene at 84 px, local and strided crops of the 252 px and 168 px scene, the
bicubic low-resolution view) gets linear heads on the features the model uses (hidden_states[-2],
RMS-normalised) that predict what covers the patch (object and colour) and where it lies in the
scene (x, y in sixths); in the views that show a detail pixel for pixel (the local crops) they
also predict which detail the patch holds (digit, dot count, corner mark). A detail's class is
not asked of the other views, whose pixels cannot show it (a 1 px stroke at 84 px, or every third
pixel of a strided crop): asked there too, the tower stays at chance on them and learns the
legible views far more slowly (measured: 47% instead of 100% on the digit after 600 steps).
Features are kept at an RMS of about 1 (a LayerNorm's scale, so the DEM's `(S + LN(...)) / 2`
weighs both halves alike) and the heads carry an L2 penalty, so what the tower knows is large in
its features, not in its heads.

    python -m infllava_jax.study.stage0 DATA OUT [--steps N]   (the study calls `run`)

Run alone, it takes the study's recipe and 8 fake devices, so it trains the study's tower.

Writes OUT/metrics.jsonl (loss per head, rate), OUT/final (our checkpoint: the plain tiny model of
`presets.tiny(grid=None)`, its vision tower pretrained, its projector and LLM at their seed-`seed`
initialisation; `train.py --config.init_vision_tower=OUT/final` takes the tower from it) and
OUT/result.json (per family, the heads' accuracy on held-out train images).
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image

from infllava_jax import checkpoint, params as params_lib, presets, sharding
from infllava_jax.study import scenes
from infllava_jax.study import targets as st
from infllava_jax.data.images import normalize, resize_uint8, to_rgb
from infllava_jax.vision import CLIPVisionTransformer

log = logging.getLogger("infllava_jax")
NAMES = list(st.HEADS)
DETAIL_WEIGHT = 2.0     # the detail heads' weight in the loss
# The x and y heads' weight: every patch of a visual token shares its x and y, so the position code
# survives the token's mean pooling at full size while a detail in one patch of nine shrinks ninefold;
# at 1/2 the detail stays readable under it and the rows still find where things lie (docs/study.md,
# "What decides the routing").
POSITION_WEIGHT = 0.5
HEAD_L2 = 1e-3          # L2 penalty on the heads: what the tower knows must be large in its features


def load_split(data_dir, records: list[dict]) -> tuple[dict, np.ndarray]:
    """Images at every size of `st.SIZES` (uint8, resized as the data pipeline does) and targets."""
    def one(r):
        with Image.open(Path(data_dir) / r["image"]) as im:
            im = to_rgb(im)        # as the data pipeline converts (images.load_resized)
            return [resize_uint8(im, s, "square") for s in st.SIZES], st.targets(r)

    with ThreadPoolExecutor(4) as pool:
        out = list(pool.map(one, records))
    images = {s: np.stack([o[0][k] for o in out]) for k, s in enumerate(st.SIZES)}
    return images, np.stack([o[1] for o in out])


def init_heads(key, width: int) -> dict:
    keys = jax.random.split(key, len(NAMES))
    return {n: {"kernel": 0.02 * jax.random.normal(k, (width, c)), "bias": jnp.zeros((c,))}
            for (n, c), k in zip(st.HEADS.items(), keys)}


def logits_fn(vision_config, params, images, view_index=None):
    """images {size: (B, s, s, 3) normalised} -> ({head: (B, V, T, classes)}, features' RMS (B, V, T, 1)),
    for every view of `st.views` or the (B, V) `view_index` (st.sample_views); the heads read the
    RMS-normalised features."""
    v = st.views(images)
    if view_index is not None:
        v = jnp.take_along_axis(v, view_index[:, :, None, None, None], axis=1)
    B, V = v.shape[:2]
    f = CLIPVisionTransformer(vision_config).apply({"params": params["vision_tower"]}, v.reshape(B * V, *v.shape[2:]),
                                                   method=CLIPVisionTransformer.features)   # hidden_states[-2]
    f = f.reshape(B, V, *f.shape[1:])
    rms = jnp.sqrt(jnp.mean(jnp.square(f), axis=-1, keepdims=True) + 1e-6)
    out = {n: (f / rms) @ params["heads"][n]["kernel"] + params["heads"][n]["bias"] for n in NAMES}
    return out, rms


def loss_fn(vision_config, params, images, view_index, targets):
    """Sum over heads of the mean cross-entropy (the detail heads weigh DETAIL_WEIGHT, x and y
    POSITION_WEIGHT). Every view learns object, x and y; the detail heads (digit, count, mark)
    learn in the views that show a detail pixel for pixel (st.LEGIBLE), each family averaging its
    patches that hold an item and those that do not separately (half weight each): the few patches
    that hold a detail weigh as much as the many that do not."""
    fam = st.view_families(sampled=True)
    legible = [f for f in st.FAMILIES if f in st.LEGIBLE]
    onehot = jnp.asarray([[f == g for g in legible] for f in np.array(list(st.FAMILIES))[fam]], jnp.float32)
    logits, rms = logits_fn(vision_config, params, images, view_index)
    out, total = {}, 0.0
    for k, n in enumerate(NAMES):
        t = targets[..., k].astype(jnp.int32)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits[n], jnp.maximum(t, 0))  # (B, V, T)
        if n in st.SPARSE:                                                              # t = -1: unknown
            pos, neg = (t > 0).astype(jnp.float32), (t == 0).astype(jnp.float32)
            per = lambda w: jnp.einsum("bvt,vf->f", ce * w, onehot) / jnp.maximum(
                jnp.einsum("bvt,vf->f", w, onehot), 1)
            ce_n = 0.5 * (per(pos) + per(neg)).mean()
        else:
            ce_n = ce.mean()
        out[n] = ce_n
        total = total + (DETAIL_WEIGHT if n in st.SPARSE else POSITION_WEIGHT if n in ("x", "y") else 1.0) * ce_n
    out["rms"] = jnp.mean(rms)
    total = total + 0.1 * jnp.mean(jnp.square(jnp.log(rms)))       # features of RMS ~1, as a LayerNorm's
    total = total + HEAD_L2 * sum(jnp.sum(jnp.square(params["heads"][n]["kernel"])) for n in NAMES)
    return total, out


def accuracy(vision_config, params, images: dict, targets: np.ndarray, batch: int = 16) -> dict:
    """Per family and head: accuracy over all patches (object, x, y) or over the patches that hold
    the item (digit, count, mark)."""
    fwd = jax.jit(lambda p, x: {n: l.argmax(-1) for n, l in logits_fn(vision_config, p, x)[0].items()})
    preds = []
    for b in range(0, len(targets), batch):
        x = {s: normalize(v[b:b + batch]) for s, v in images.items()}
        p = fwd(params, x)
        preds.append(np.stack([np.asarray(p[n]) for n in NAMES], -1))
    pred = np.concatenate(preds)
    bounds = np.cumsum([0, *st.FAMILIES.values()])
    out = {}
    for f, (a, b) in zip(st.FAMILIES, zip(bounds[:-1], bounds[1:])):
        t, p = targets[:, a:b], pred[:, a:b]
        for k, n in enumerate(NAMES):
            m = t[..., k] > 0 if n in st.SPARSE else np.ones(t[..., k].shape, bool)
            out[f"{f}/{n}"] = round(float((p[..., k] == t[..., k])[m].mean()), 4) if m.any() else None
    return out


def make_step(vision_config, tx):
    def step(params, opt_state, images, view_index, targets):
        (loss, parts), g = jax.value_and_grad(
            lambda p: loss_fn(vision_config, p, images, view_index, targets), has_aux=True)(params)
        updates, opt_state = tx.update(g, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, parts
    return jax.jit(step)


def batches(rng: np.random.Generator, n: int, batch: int):
    """Image indices, `batch` at a time, each epoch in a new order."""
    while True:
        order = rng.permutation(n)
        for b in range(0, n - batch + 1, batch):
            yield np.sort(order[b:b + batch])


def run(data_dir, out_dir, *, steps: int = 600, batch: int = 16, lr: float = 2e-3, holdout: int | None = None,
        seed: int = 0, log_every: int = 50, vocab_size: int = 512) -> dict:
    """Train the tower on the train split of `data_dir` (its last `holdout` images held out for the
    accuracies; default: a tenth, at most 200), data-parallel over every device; write OUT (module docstring) and return
    result.json's content."""
    out, t0 = Path(out_dir), time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    records = scenes.read_scenes(data_dir, "train")
    holdout = min(200, len(records) // 10 or 1) if holdout is None else holdout
    if len(records) <= holdout:
        raise ValueError(f"{data_dir}: {len(records)} train images; stage 0 holds out {holdout}")
    images, targets = load_split(data_dir, records)
    n = len(records) - holdout
    log.info("stage 0: %d train + %d held-out images, %d views x %d patches each, loaded in %.1f s",
             n, holdout, targets.shape[1], targets.shape[2], time.perf_counter() - t0)
    config = presets.tiny(grid=None, vocab_size=vocab_size)
    mesh = sharding.make_mesh({"data": jax.device_count()})
    batch = max(mesh.size, min(batch, n) // mesh.size * mesh.size)   # whole rows per device
    on_mesh = lambda x: jax.device_put(x, sharding.batch_sharding(mesh, x.ndim))
    model_params = jax.device_get(params_lib.init_params(config, seed))
    params = jax.device_put({"vision_tower": model_params["vision_tower"],
                             "heads": init_heads(jax.random.key(seed + 1), config.vision.hidden_size)},
                            sharding.replicated(mesh))
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 20), steps, lr / 20)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=1e-4))
    step, opt_state = make_step(config.vision, tx), tx.init(params)
    rng = np.random.default_rng(seed)
    meter = _Meter(out / "metrics.jsonl", steps, log_every, schedule)
    for i, idx in zip(range(steps), batches(rng, n, batch)):
        view_index = st.sample_views(rng, batch)
        t = np.take_along_axis(targets[idx], view_index[:, :, None, None], axis=1)
        params, opt_state, loss, parts = step(params, opt_state, {s: on_mesh(normalize(v[idx])) for s, v in
                                                                  images.items()},
                                              on_mesh(view_index.astype(np.int32)), on_mesh(t))
        meter.update(i + 1, loss, parts, batch * view_index.shape[1])
    params = jax.device_get(params)
    acc = accuracy(config.vision, params, {s: v[n:] for s, v in images.items()}, targets[n:])
    checkpoint.save_checkpoint(out / "final", config, {**model_params, "vision_tower": params["vision_tower"]})
    result = {"steps": steps, "devices": mesh.size, "batch_images": batch, "views_per_step": batch * len(st.view_families(sampled=True)), "lr": lr, "seed": seed,
              "n_train": n, "holdout": holdout, "final_loss": meter.last_loss, "holdout_accuracy": acc,
              "seconds": round(time.perf_counter() - t0, 1)}
    (out / "result.json").write_text(json.dumps(result, indent=1))
    return result


class _Meter:
    """metrics.jsonl and a progress line (rate, ETA) every `every` steps; the only host syncs."""

    def __init__(self, path: Path, steps: int, every: int, schedule):
        self.path, self.steps, self.every, self.schedule = path, steps, every, schedule
        self.path.write_text("")
        self.t, self.done, self.last_loss = time.perf_counter(), 0, None

    def update(self, step: int, loss, parts, views: int) -> None:
        if step % self.every and step != self.steps:
            return
        loss, parts = float(loss), {k: round(float(v), 4) for k, v in parts.items()}
        now = time.perf_counter()
        rate = (step - self.done) / (now - self.t)
        self.t, self.done, self.last_loss = now, step, loss
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "loss": loss, **parts, "lr": float(self.schedule(step - 1)),
                                "steps_per_s": round(rate, 2), "views_per_s": round(rate * views, 1)}) + "\n")
        log.info("stage 0: step %d/%d  loss %.3f (%s)  %.2f steps/s  ETA %.0f s", step, self.steps, loss,
                 " ".join(f"{k} {v:.2f}" for k, v in parts.items()), rate, (self.steps - step) / rate)


def main(argv=None) -> int:
    """The study's stage 0 alone: its recipe (study/recipe.py STAGE0) on its 8 fake devices, so the
    data-parallel mean rounds as in the study and the tower is the study's."""
    from infllava_jax.study import recipe as study_cfg
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data")
    ap.add_argument("out")
    for k in ("steps", "batch"):
        ap.add_argument(f"--{k}", type=int, default=study_cfg.STAGE0[k])
    ap.add_argument("--lr", type=float, default=study_cfg.STAGE0["lr"])
    a = ap.parse_args(argv)
    study_cfg.use_study_devices()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    r = run(a.data, a.out, steps=a.steps, batch=a.batch, lr=a.lr)
    print(json.dumps(r["holdout_accuracy"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
