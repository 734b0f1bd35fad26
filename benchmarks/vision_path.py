"""The released vision path: exact fast path vs full computation vs the PyTorch reference,
and the memory of DEM's windowed attention vs the paper's naive whole-map cross-attention.

    python -m benchmarks.vision_path      (from the repository root)

1. FLOPs (XLA `cost_analysis()` of the compiled `InfLlavaModel.encode_images`) of the fast path
   and of the full computation, at a small config (below). The ViT layers are unrolled here
   (`scan_layers=False`): XLA's cost analysis counts a while-loop body once, so a scanned
   tower would be under-counted by its depth.
2. CPU wall time (warm, median of ROUNDS runs; JAX fast, JAX full and the PyTorch reference
   `convert/torch_reference.py` interleaved round by round; each run waits until other
   processes leave the CPUs >= 90% idle, and the output counts the runs where they did not)
   of the same function on the same 1008 px image with the same weights. JAX runs at
   the default matmul precision (not "highest"; on CPU fp32 dots are fp32 either way);
   PyTorch: torch.no_grad, torch.set_num_threads(2), CLIP with HF's default SDPA attention.
3. Compile-only memory (`memory_analysis().temp_size_in_bytes`) of one DEM application at the
   real width D=1024 (8 heads x 128, g=24) for 672..1680 px, from abstract inputs
   (jax.ShapeDtypeStruct: nothing big is allocated): the windowed DEM (full computation),
   its fast path, and a naive DEM whose two cross-attentions are dense over the whole
   (n*g)^2 map (every global position attends to every local position and vice versa).

The last line of the output is a JSON object.
"""
from __future__ import annotations

import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

from convert.mapping import released_to_params
from convert.torch_reference import InfLlavaTorch, randomize_
from infllava_jax.config import InfLlavaConfig
from infllava_jax.crops import interleave, mosaic
from infllava_jax.dem import DEM, DEMConfig
from infllava_jax.llama import LlamaConfig
from infllava_jax.model import InfLlavaModel
from infllava_jax.pixels import preprocess
from infllava_jax.vision import CLIPVisionConfig

ROUNDS = 7
THREADS = 2
MIN_IDLE, IDLE_TIMEOUT = 0.9, 30.0   # before each timed run: wait for >= 90% idle CPUs (<= 30 s)
SIZES = (672, 1008, 1344, 1680)
MiB = 2 ** 20

# Small config of the released structure: 336 px sub-images (24x24 tokens), 3x3 grid (1008 px),
# CLIP width 256 / 4 layers (features after layer 3), DEM 8 heads x 32, fusion 64 -> 128.
VISION = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
              image_size=336, patch_size=14)
LLM = dict(vocab_size=256, hidden_size=512, intermediate_size=1024, num_hidden_layers=1,
           num_attention_heads=4, num_key_value_heads=4)   # only its width matters (projector)
DEM_SMALL = dict(hidden=256, num_heads=8, head_dim=32, ffn_hidden=64, ffn_out=128)


def small_config(fast: bool) -> InfLlavaConfig:
    return InfLlavaConfig(vision=CLIPVisionConfig(**VISION, scan_layers=False), llm=LlamaConfig(**LLM),
                          dem=DEMConfig(**DEM_SMALL, fast_path=None if fast else False))


def flops(compiled) -> float:
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    return float(ca["flops"])


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def cpu_idle(interval: float = 0.5) -> float:
    """Fraction of all CPUs idle over `interval` seconds (1.0 where /proc/stat is missing)."""
    def read():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return v[3] + v[4], sum(v)               # idle + iowait, total
    try:
        i0, t0 = read()
        time.sleep(interval)
        i1, t1 = read()
    except OSError:
        return 1.0
    return (i1 - i0) / max(1, t1 - t0)


def wait_idle(min_idle: float = MIN_IDLE, timeout: float = IDLE_TIMEOUT) -> float:
    """Wait (up to `timeout` s) until other processes leave the CPUs idle; returns the idle
    fraction seen last. Other jobs on a shared 2-CPU machine distort wall times, PyTorch's
    OpenMP regions (which wait for every thread at each barrier) far more than XLA's pool."""
    t = time.time()
    while True:
        idle = cpu_idle()
        if idle >= min_idle or time.time() - t > timeout:
            return idle


# ----------------------------------------------------------------------------- 1 + 2: FLOPs, time

def speed():
    torch.set_num_threads(THREADS)
    cfg_fast, cfg_full = small_config(True), small_config(False)
    ref = randomize_(InfLlavaTorch.from_config(cfg_fast, device="cpu", attn_implementation="sdpa"), seed=0)
    params = jax.tree.map(jnp.asarray, released_to_params(ref.released_state_dict(), cfg_fast))

    import skimage.data
    img = preprocess(skimage.data.astronaut(), size=3 * 336)            # (1008, 1008, 3)
    x = jnp.asarray(img[None])
    xt = torch.from_numpy(np.ascontiguousarray(np.moveaxis(img, -1, 0))[None])

    def compiled(cfg):
        fn = jax.jit(lambda p, x: InfLlavaModel(cfg).apply({"params": p}, x, method=InfLlavaModel.encode_images))
        return fn.lower(params, x).compile()

    fast, full = compiled(cfg_fast), compiled(cfg_full)
    f_fast, f_full = flops(fast), flops(full)
    run = {"jax_fast": lambda: fast(params, x).block_until_ready(),
           "jax_full": lambda: full(params, x).block_until_ready()}

    def torch_run():
        with torch.no_grad():
            return ref.encode_images(xt)
    run["torch"] = torch_run

    out = {k: np.asarray(f()) if k != "torch" else f().numpy() for k, f in run.items()}   # warm-up
    rel = lambda a, b: float(np.abs(a - b).max() / np.abs(b).max())
    diffs = {"fast_vs_torch": rel(out["jax_fast"], out["torch"]),
             "full_vs_torch": rel(out["jax_full"], out["torch"]),
             "fast_vs_full": rel(out["jax_fast"], out["jax_full"])}
    times = {k: [] for k in run}
    busy = 0   # runs started while other processes kept the CPUs busy
    for _ in range(ROUNDS):   # interleaved, so that remaining background load hits all three
        for k, f in run.items():
            busy += wait_idle() < MIN_IDLE
            times[k].append(timed(f))
    return dict(cfg=cfg_fast, flops_fast=f_fast, flops_full=f_full, times=times, diffs=diffs, busy=busy)


# ----------------------------------------------------------------------------- 3: DEM memory

def naive_dem(m: DEM, local, strided, low):
    """DEM with both cross-attentions dense over the whole map (the paper's naive form)."""
    c = m.cfg
    B, N, L, D = local.shape
    g = c.g
    F_loc = mosaic(local.reshape(B, N, g, g, D), c.nH, c.nW).reshape(B, -1, D)
    F_glo = interleave(strided.reshape(B, N, g, g, D), c.nH, c.nW).reshape(B, -1, D)
    A = m.attention(F_glo, F_loc)            # every global position attends to the whole local map
    Bm = m.attention(F_loc, F_glo)
    F = m._fuse(A, Bm).reshape(B, c.nH * g, c.nW * g, D)
    pooled = jax.image.resize(F, (B, g, g, D), "bilinear", antialias=False)
    return ((low.reshape(B, g, g, D) + pooled) / 2).reshape(B, L, D)


def dem_memory(px: int) -> dict:
    n = px // 336
    cfg = DEMConfig(nH=n, nW=n)                            # released widths: D=1024, 8 x 128, g=24
    m = DEM(cfg)
    N, L, D = cfg.num_crops, cfg.g ** 2, cfg.hidden
    sds = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
    local, strided, low = sds(1, N, L, D), sds(1, N, L, D), sds(1, L, D)
    params = jax.eval_shape(lambda: m.init(jax.random.key(0), jnp.zeros(local.shape), jnp.zeros(strided.shape),
                                           jnp.zeros(low.shape)))["params"]

    def temp(fn, *args) -> float:
        c = jax.jit(lambda p, *a: m.apply({"params": p}, *a, method=fn)).lower(params, *args).compile()
        return c.memory_analysis().temp_size_in_bytes / MiB

    P = len(cfg.fast_path_phases)
    fast_sampled = sds(1, P, L, D)
    G = (n * cfg.g) ** 2
    return {"px": px, "grid": n, "map_tokens": G,
            "windowed_MiB": temp(DEM.__call__, local, strided, low),
            "fast_MiB": None if cfg.fast_path_unsupported else temp(DEM.fast, local, fast_sampled, low),
            "naive_MiB": temp(naive_dem, local, strided, low),
            # one direction's fp32 score matrix, heads x queries x keys
            "naive_scores_MiB": cfg.num_heads * G * G * 4 / MiB,
            "windowed_scores_MiB": cfg.num_heads * N * L * L * 4 / MiB}


# ----------------------------------------------------------------------------- main

def main():
    print(f"jax {jax.__version__} ({jax.default_backend()}, {jax.device_count()} device(s)), "
          f"torch {torch.__version__} ({THREADS} threads), "
          f"jax_default_matmul_precision={jax.config.jax_default_matmul_precision!r} (default)")
    print(f"config: CLIP {VISION['hidden_size']} wide x {VISION['num_hidden_layers']} layers "
          f"(features = layer {VISION['num_hidden_layers'] - 1}), {VISION['image_size']} px sub-images "
          f"(24x24 tokens), 3x3 grid = 1008 px input, batch 1; DEM {DEM_SMALL['num_heads']}x"
          f"{DEM_SMALL['head_dim']} heads, fusion {DEM_SMALL['ffn_hidden']}->{DEM_SMALL['ffn_out']}; "
          f"projector 256->512; fp32; ViT layers unrolled")
    s = speed()
    d = s["cfg"].dem
    med = {k: statistics.median(v) for k, v in s["times"].items()}
    best = {k: min(v) for k, v in s["times"].items()}
    print()
    print(f"{'encode_images':<14} {'ViT passes':>10} {'GFLOPs':>9} {'median s':>9} {'min s':>8}")
    print(f"{'jax fast':<14} {d.vit_passes(True):>10} {s['flops_fast'] / 1e9:>9.2f} {med['jax_fast']:>9.3f} "
          f"{best['jax_fast']:>8.3f}")
    print(f"{'jax full':<14} {d.vit_passes(False):>10} {s['flops_full'] / 1e9:>9.2f} {med['jax_full']:>9.3f} "
          f"{best['jax_full']:>8.3f}")
    print(f"{'torch ref':<14} {d.vit_passes(False):>10} {'-':>9} {med['torch']:>9.3f} {best['torch']:>8.3f}")
    print("(the JAX tower stops after the selected layer; the reference, like the released code, runs HF "
          "CLIPVisionModel with output_hidden_states, i.e. all layers)")
    ratio = s["flops_fast"] / s["flops_full"]
    print(f"FLOPs fast/full {ratio:.3f} (ViT passes 10/19 = {10 / 19:.3f}); speed-up vs torch: fast "
          f"{med['torch'] / med['jax_fast']:.2f}x, full {med['torch'] / med['jax_full']:.2f}x (medians of "
          f"{ROUNDS}); max rel diff of the outputs: " +
          ", ".join(f"{k} {v:.1e}" for k, v in s["diffs"].items()))

    print()
    print("one DEM application at D=1024 (8 x 128 heads, g=24), compile-only temp memory (MiB):")
    print(f"{'px':>5} {'grid':>5} {'map tok':>8} {'windowed':>9} {'fast':>8} {'naive':>9} "
          f"{'naive scores':>13} {'window scores':>14}")
    mem = []
    for px in SIZES:
        r = dem_memory(px)
        mem.append(r)
        fast = "n/a" if r["fast_MiB"] is None else f"{r['fast_MiB']:.1f}"   # g=24 not divisible by 5
        print(f"{r['px']:>5} {r['grid']:>4}x {r['map_tokens']:>8} {r['windowed_MiB']:>9.1f} {fast:>8} "
              f"{r['naive_MiB']:>9.1f} {r['naive_scores_MiB']:>13.1f} {r['windowed_scores_MiB']:>14.1f}")
    n_runs = ROUNDS * len(s["times"])
    print(f"\n{s['busy']} of {n_runs} timed runs started while other processes used > {1 - MIN_IDLE:.0%} of "
          f"the {os.cpu_count()} CPUs (after waiting up to {IDLE_TIMEOUT:.0f} s)"
          + ("; WARNING: wall times are inflated by other jobs (PyTorch's most), the min column is "
             "the better estimate" if s["busy"] > n_runs // 5 else ""))
    result = {
        "config": {"vision": VISION, "dem": DEM_SMALL, "grid": [d.nH, d.nW], "input_px": 1008, "batch": 1,
                   "projector_out": LLM["hidden_size"], "dtype": "float32", "matmul_precision": "default",
                   "torch_threads": THREADS, "rounds": ROUNDS},
        "flops_fast": s["flops_fast"], "flops_full": s["flops_full"], "flops_fast_over_full": ratio,
        "vit_passes_fast": d.vit_passes(True), "vit_passes_full": d.vit_passes(False),
        "time_s": {k: {"median": med[k], "min": best[k]} for k in med},
        "speedup_vs_torch": med["torch"] / med["jax_fast"],
        "speedup_vs_torch_min": best["torch"] / best["jax_fast"],
        "speedup_full_vs_torch": med["torch"] / med["jax_full"],
        "speedup_fast_vs_full": med["jax_full"] / med["jax_fast"],
        "max_rel_diff": s["diffs"],
        "dem_memory_MiB": mem,
        "busy_runs": s["busy"], "timed_runs": n_runs,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
