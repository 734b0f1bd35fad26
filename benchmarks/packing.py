"""Packing vs bucketed padding: useful (non-pad) tokens per second of the train step, same model
and same conversations, in one run (CPU, the tiny model).

    python -m benchmarks.packing [--samples 512] [--batch 8]

The conversations follow the composition of LLaVA-1.5's llava_v1_5_mix665k, scaled to the tiny
model: its T = 36 image tokens stand for CLIP-L/336's 576, so text lengths and max_len (2048) are
scaled by 36/576 as well (max_len 128). Bucketed: data/batching.collate with the default buckets
(a batch pads to the bucket of its longest row; one image slot per row). Packed: data/packing
(plan_rows + collate_packed, rows of max_len). Each mode first runs every batch once (compiling
each shape); then passes over all its batches alternate between the modes (`--rounds` each) and
the fastest pass of each counts (the CPU is shared: the slower passes measure the neighbours).
Useful tokens = spliced positions of real tokens. The last line is a JSON object with `speedup` (packed / bucketed useful tokens per s).

Packing saves language-model work only (both modes encode every real image). In the tiny preset
the vision tower is ~half the analytic FLOPs of a sample, in INF-LLaVA-8B's stage 2 ~10%
(training/flops.py; printed), so the run also times `tiny_wide_llm`: the same vision tower,
DEM, T and data with a wider, deeper Llama whose vision share is about the 8B model's. `speedup`
is that model's; `speedup_tiny` the preset's.
"""
from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np

from infllava_jax import params as params_lib, presets
from infllava_jax.data.batching import collate, default_buckets, image_slots
from infllava_jax.data.examples import example
from infllava_jax.data.packing import collate_packed, plan_rows
from infllava_jax.splice import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from infllava_jax.training import flops, step as step_lib

REAL_T, REAL_MAX_LEN = 576, 2048
# (source, samples, has image, median text tokens incl. the llama3 template, log-normal sigma).
# Sources and sample counts (thousands): the LLaVA-1.5 paper (Liu et al. 2023, "Improved Baselines
# with Visual Instruction Tuning", appendix table of the 665K instruction mix); ShareGPT is its
# text-only part. The text lengths and spreads are ESTIMATES (not published): short-answer VQA
# sets merge several QA pairs of one image into one conversation (as the paper describes), so a
# few turns of ~15 tokens plus the ~50-token system prompt; ShareGPT conversations are long.
MIX665K = (
    ("LLaVA-Instruct", 158, True, 260, 0.5),
    ("ShareGPT", 40, False, 1000, 0.7),
    ("VQAv2", 83, True, 150, 0.4),
    ("GQA", 72, True, 160, 0.4),
    ("OKVQA", 9, True, 80, 0.3),
    ("OCRVQA", 80, True, 140, 0.4),
    ("A-OKVQA", 66, True, 110, 0.3),
    ("TextCaps", 22, True, 90, 0.3),
    ("RefCOCO", 48, True, 220, 0.4),
    ("VG", 86, True, 220, 0.4),
)


def conversations(n: int, T: int, max_len: int, vocab: int, seed: int = 0) -> list[dict]:
    """n examples (data/examples.py) drawn from MIX665K, text lengths scaled by T / 576."""
    rng = np.random.default_rng(seed)
    w = np.array([s[1] for s in MIX665K], float)
    out = []
    for i, src in enumerate(rng.choice(len(MIX665K), n, p=w / w.sum())):
        _, _, image, median, sigma = MIX665K[src]
        n_text = int(round(median * T / REAL_T * rng.lognormal(0.0, sigma)))
        n_text = int(np.clip(n_text, 4, max_len - (T - 1) - 1))           # the pipeline's one-image budget
        ids = rng.integers(1, vocab, n_text + image).astype(np.int32)
        if image:
            ids[min(3, n_text)] = IMAGE_TOKEN_INDEX                         # after the system prompt's start
        labels = np.where(np.arange(len(ids)) >= len(ids) // 2, ids, IGNORE_INDEX).astype(np.int32)
        px = rng.normal(size=(3 * 84, 3 * 84, 3)).astype(np.float32) if image else None
        out.append(example(ids, labels, px, i))
    return out


def bucketed_batches(ex, B, T, max_len, pad_id):
    buckets = default_buckets(max_len, T)
    return [collate(ex[i:i + B], buckets=buckets, tokens_per_image=T, image_shape=(252, 252, 3), pad_id=pad_id)
            for i in range(0, len(ex) - B + 1, B)]


def packed_batches(ex, B, T, max_len, pad_id):
    sizes = [len(e["input_ids"]) + e["num_images"] * (T - 1) for e in ex]
    rows = [[ex[i] for i in r] for r in plan_rows(sizes, max_len, images=[e["num_images"] for e in ex])]
    rows += [[]] * (-len(rows) % B)                                         # the last batch: empty rows
    return [collate_packed(rows[i:i + B], max_len=max_len, tokens_per_image=T, image_shape=(252, 252, 3), pad_id=pad_id)
            for i in range(0, len(rows), B)]


def useful_tokens(b, T) -> int:
    if "segment_ids" in b:
        return int((b["segment_ids"] > 0).sum())
    return int(b["attention_mask"].sum() + b["has_image"].sum() * (T - 1))


def passes(batches, state, step):
    """A function running the train step over every batch once (a pass), -> its seconds."""
    keys = ("input_ids", "labels", "attention_mask", "pixel_values", "segment_ids")
    dev = [{k: jnp.asarray(b[k])[None] for k in keys if k in b} for b in batches]
    holder = {"s": step(state, dev[0])[0]}   # a state as the step returns it: the next pass compiles all

    def one_pass():
        t = time.perf_counter()
        for b in dev:
            holder["s"], m = step(holder["s"], b)
        jax.block_until_ready(m)
        return time.perf_counter() - t

    return one_pass


def report(name, batches, seconds, T, first_pass_s):
    useful = sum(useful_tokens(b, T) for b in batches)
    computed = sum(b["segment_ids"].size if "segment_ids" in b else
                   b["input_ids"].shape[0] * (b["input_ids"].shape[1] + T - 1) for b in batches)
    shapes = sorted({(b["input_ids"].shape[1], image_slots(b)) for b in batches})
    return {"mode": name, "steps": len(batches), "rows": sum(len(b["input_ids"]) for b in batches),
            "useful_tokens": useful, "fill": useful / computed, "seconds": seconds,
            "useful_tokens_per_s": useful / seconds, "rows_per_s": sum(len(b["input_ids"]) for b in batches) / seconds,
            "image_slots": sum(len(b["pixel_values"]) * image_slots(b) for b in batches),
            "shapes": shapes, "first_pass_s": first_pass_s}


def tiny_wide_llm():
    """The tiny preset with a 256-wide, 4-layer Llama: vision ~10% of a sample's FLOPs, as the 8B's."""
    c = presets.tiny()
    return c.replace(llm=c.llm.replace(hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                       initializer_range=256 ** -0.5))


def vision_share(cfg, seq_len: int) -> float:
    """Analytic share of the vision tower in a stage-2 step (training/flops.py)."""
    parts = step_lib.trainable_parts("stage2")
    passes = 1 if cfg.dem is None else cfg.dem.vit_passes()
    return passes * flops._vit_flops(cfg) / flops.train_step_flops(cfg, 1, seq_len, parts)


def compare(name, cfg, ex, B, max_len, rounds):
    """Bucketed and packed runs of the same conversations on `cfg`."""
    T = cfg.tokens_per_image
    params = params_lib.init_params(cfg, seed=0)
    tx, schedule = step_lib.make_optimizer(1e-5, 1000, max_grad_norm=None)
    state = step_lib.init_state(params, step_lib.trainable_parts("stage2"), tx)
    step = jax.jit(step_lib.make_train_step(cfg, tx, schedule, loss_chunk=64))
    modes = {"bucketed": bucketed_batches(ex, B, T, max_len, 0), "packed": packed_batches(ex, B, T, max_len, 0)}
    run = {m: passes(b, state, step) for m, b in modes.items()}
    first = {m: run[m]() for m in modes}                                   # compiles every shape
    times = {m: [] for m in modes}
    for _ in range(rounds):                  # alternating passes; the fastest of each (shared CPUs)
        for m in modes:
            times[m].append(run[m]())
    rows = [report(m, modes[m], min(times[m]), T, first[m]) for m in modes]
    assert rows[0]["useful_tokens"] == rows[1]["useful_tokens"], "both modes must train the same tokens"
    mean_len = rows[0]["useful_tokens"] / len(ex)
    for r in rows:
        r["model"] = name
    return rows, rows[1]["useful_tokens_per_s"] / rows[0]["useful_tokens_per_s"], vision_share(cfg, mean_len)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    T = presets.tiny().tokens_per_image
    max_len = REAL_MAX_LEN * T // REAL_T                                   # 128
    ex = conversations(args.samples, T, max_len, presets.tiny().llm.vocab_size)
    print(f"{len(ex)} conversations ({sum(e['has_image'] for e in ex)} with an image), max_len {max_len}, "
          f"T {T}, batch {args.batch}; INF-LLaVA-8B stage 2: vision {vision_share(presets.inf_llava_8b(), 730):.0%} "
          "of a 730-position sample's FLOPs")
    print(f"{'model':<15}{'mode':<10}{'steps':>6}{'rows':>6}{'fill':>7}{'images':>7}{'seconds':>9}"
          f"{'useful tok/s':>14}{'rows/s':>8}  shapes (ids, K)")
    out, speedups = [], {}
    for name, cfg in (("tiny", presets.tiny()), ("tiny_wide_llm", tiny_wide_llm())):
        rows, speedups[name], share = compare(name, cfg, ex, args.batch, max_len, args.rounds)
        for r in rows:
            print(f"{name:<15}{r['mode']:<10}{r['steps']:>6}{r['rows']:>6}{r['fill']:>7.2f}{r['image_slots']:>7}"
                  f"{r['seconds']:>9.2f}"
                  f"{r['useful_tokens_per_s']:>14.0f}{r['rows_per_s']:>8.1f}  {r['shapes']}")
        print(f"{name}: vision {share:.0%} of a sample's FLOPs; packed / bucketed useful tokens per s: "
              f"{speedups[name]:.2f}x")
        out += rows
    print(json.dumps({"rows": out, "speedup_tiny": speedups["tiny"], "speedup": speedups["tiny_wide_llm"]}))


if __name__ == "__main__":
    main()
