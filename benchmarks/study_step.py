"""The study's stage-2 train step at several spliced lengths and loss positions: what
`recipe.BUCKET[2]` and `recipe.LOSS_POSITIONS[2]` cost.

    python -m benchmarks.study_step [--rows plain_336,dcm_dem_1008] [--lengths 168,136]
                                    [--loss-positions 0,16] [--steps 10]

On the study's fake 8-device CPU mesh (set here when XLA_FLAGS is unset), for each row and length:
the row's stage-2 train step exactly as the study compiles it (`study/recipe.py`: batch 32, all
devices data-parallel, the frozen tower's features in place of the pixels, DEM + projector + LLM
trained) on a random batch (about 5% of the text positions supervised), every (length, loss
positions) pair timed in alternation (median of --steps each, after one compiling call). The
table gives seconds per step, spliced tokens per second and each pair's time against the
first's. The last line is a JSON object.
"""
from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.timing import interleaved
from infllava_jax import params as params_lib, sharding
from infllava_jax.data.tokenizer import load_tokenizer
from infllava_jax.model import InfLlavaModel
from infllava_jax.study import recipe
from infllava_jax.training import partition, step as step_lib
from infllava_jax.training.loop import model_config, trainable_parts


def row_step(row: str, mesh, loss_positions: int = 0):
    """(jitted step, its initial state, a function length -> a random batch) for `row`'s stage 2."""
    cfg = recipe.get_config(f"row={row},stage=2")
    mc = model_config(cfg, len(load_tokenizer(None)))
    parts = trainable_parts(cfg, mc)
    tx, schedule = step_lib.make_optimizer(cfg.optimizer.lr, cfg.total_steps, lr_mult=dict(cfg.optimizer.lr_mult))
    _, state_sh = partition.state_shardings(mc, parts, tx, mesh)
    params = params_lib.init_params(mc, 0, mesh)
    state = jax.jit(lambda p: step_lib.init_state(p, parts, tx, mc), out_shardings=state_sh)(params)
    step = jax.jit(step_lib.make_train_step(mc, tx, schedule, max(recipe.BUCKET.values()), features=True,
                                            loss_positions=loss_positions),
                   in_shardings=(state_sh, None), out_shardings=(state_sh, None), donate_argnums=0)
    H, W = mc.image_size
    feats = jax.eval_shape(lambda p, x: InfLlavaModel(mc).apply({"params": p}, x, method=InfLlavaModel.tower_features),
                           params, jax.ShapeDtypeStruct((1, H, W, 3), jnp.float32)).shape[1:]
    rng, B = np.random.default_rng(0), cfg.global_batch

    def batch(length: int) -> dict:
        n = length - mc.tokens_per_image + 1                  # ids per row: one placeholder becomes the image tokens
        ids = rng.integers(1, 400, (1, B, n)).astype(np.int32)
        ids[..., 1] = mc.image_token_index
        labels = np.where(rng.random((1, B, n)) < 0.05, ids, -100).astype(np.int32)   # a few answer tokens
        labels[..., 1] = -100
        host = {"input_ids": ids, "labels": labels, "attention_mask": np.ones_like(ids),
                "pixel_values": rng.normal(size=(1, B, *feats)).astype(np.float32)}
        return {k: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim, 1)) for k, v in host.items()}

    return step, state, batch


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="plain_336,dcm_dem_1008")
    ap.add_argument("--lengths", default="168,136", help="spliced lengths")
    ap.add_argument("--loss-positions", default="0,16", help="0 = the loss at every position (training/loss.py)")
    ap.add_argument("--steps", type=int, default=10)
    a = ap.parse_args(argv)
    pairs = [(int(L), int(K)) for L in a.lengths.split(",") for K in a.loss_positions.split(",")]
    mesh = sharding.make_mesh(dict(recipe.get_config().mesh))
    print(f"{jax.device_count()} {jax.devices()[0].platform} devices; stage 2, batch {recipe.BATCH}; "
          f"median of {a.steps} steps per pair, pairs alternating")
    first = f"{pairs[0][0]}, {pairs[0][1] or 'all'}"
    print(f"| row | spliced length | loss positions | s/step | tokens/s | time vs {first} |\n|---|---|---|---|---|---|")
    out = {"pairs": [list(p) for p in pairs], "rows": {}}
    with jax.set_mesh(mesh):
        for row in a.rows.split(","):
            runs = {}
            for K in dict.fromkeys(K for _, K in pairs):
                step, state, batch = row_step(row, mesh, K)
                runs[K] = {"step": step, "state": state, "batches": {L: batch(L) for L, k in pairs if k == K}}

            def run(L, K):
                r = runs[K]
                r["state"], m = r["step"](r["state"], r["batches"][L])
                jax.block_until_ready(m["loss"])

            ts = interleaved([lambda p=p: run(*p) for p in pairs], a.steps)
            out["rows"][row] = {f"{L},{K}": t for (L, K), t in zip(pairs, ts)}
            for (L, K), t in zip(pairs, ts):
                print(f"| {row} | {L} | {K or 'all'} | {t:.3f} | {recipe.BATCH * L / t:,.0f} | {t / ts[0]:.2f}x |")
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
