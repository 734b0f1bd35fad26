"""The released vision path: exact fast path vs full computation vs the PyTorch reference,
and the memory of DEM's windowed attention vs the paper's naive whole-map cross-attention.

    python -m benchmarks.vision_path      (from the repository root)

1. FLOPs (XLA `cost_analysis()` of the compiled `InfLlavaModel.encode_images`) of the fast path
   and of the full computation, at a small config (below). The ViT layers are unrolled here
   (`scan_layers=False`): XLA's cost analysis counts a while-loop body once, so a scanned
   tower would be under-counted by its depth.
2. CPU wall time (warm, median of ROUNDS runs; every row interleaved round by round; each run
   waits until other processes leave the CPUs >= 90% idle, and the output counts the runs where
   they did not) of the same function on the same 1008 px image with the same weights:
   `encode_images` (JAX fast path, JAX full computation, the PyTorch reference
   `convert/torch_reference.py` as the released code runs it, and `torch_pruned`: plain PyTorch
   doing the fast path's work, 10 ViT passes stopped at the selected layer and the DEM at the
   pooled positions only, i.e. equal work to JAX fast), and the full forward (vision + splice +
   Llama logits for a PROMPT-token prompt around the image): JAX fast against the pruned and the
   released PyTorch forward. JAX runs at the default matmul precision (on CPU fp32 dots are
   fp32 either way); PyTorch: torch.no_grad, torch.set_num_threads(2), HF's SDPA attention.
3. Compile-only memory (`memory_analysis().temp_size_in_bytes`) of one DEM application at the
   real width D=1024 (8 heads x 128, g=24) for 672..1680 px, from abstract inputs
   (jax.ShapeDtypeStruct: nothing big is allocated): the windowed DEM (full computation),
   its fast path, and a naive DEM whose two cross-attentions are dense over the whole
   (n*g)^2 map (every global position attends to every local position and vice versa).
   XLA:CPU runs each attention (scores, exp, product with v) as one YNNPACK fusion whose working
   memory it does not count, so the compiled temp memory of the naive DEM leaves out its score
   matrices: the `scores` columns give their size (fp32, one direction), what a GPU/TPU
   without a fused kernel would hold.
4. The f32 GEMM rate of JAX and of PyTorch on the products this forward is made of (ViT
   projections and MLP at 10 x 577 tokens, the Llama's MLP), timed in alternation: where JAX's
   products are slower, a speed-up at equal work has to come from everything else.

The last line of the output is a JSON object.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.timing import gemm_rates, gemm_table
from convert.mapping import released_to_params
from convert.torch_reference import InfLlavaTorch, randomize_
from infllava_jax import attention
from infllava_jax.config import InfLlavaConfig
from infllava_jax.crops import interleave, mosaic
from infllava_jax.dem import DEM, DEMConfig
from infllava_jax.llama import LlamaConfig
from infllava_jax.model import InfLlavaModel
from infllava_jax.pixels import preprocess
from infllava_jax.splice import IMAGE_TOKEN_INDEX
from infllava_jax.vision import CLIPVisionConfig

ROUNDS = 7
THREADS = 2
MIN_IDLE, IDLE_TIMEOUT = 0.9, 30.0   # before each timed run: wait for >= 90% idle CPUs (<= 30 s)
SIZES = (672, 1008, 1344, 1680)
MiB = 2 ** 20

# Small config of the released structure: 336 px sub-images (24x24 tokens), 3x3 grid (1008 px),
# CLIP width 256 / 6 layers (features after layer 5), DEM 8 heads x 32, fusion 64 -> 128,
# Llama 512 wide x 6 layers (GQA 8 / 2 heads), a PROMPT-token prompt around the 576 image tokens.
VISION = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=4,
              image_size=336, patch_size=14)
LLM = dict(vocab_size=4096, hidden_size=512, intermediate_size=1536, num_hidden_layers=6,
           num_attention_heads=8, num_key_value_heads=2)
PROMPT = 64
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

def torch_pruned(ref: InfLlavaTorch, pixels: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch doing the work of JAX's fast path (odd grid, released DEM): the N local crops
    and the low-res view through the tower's first L-1 layers (hidden_states[-2]), then the DEM
    only at the positions the bilinear pooling reads (DEM.fast, docs/model.md section 4), the projector."""
    nH, nW, s = ref.dem["nH"], ref.dem["nW"], ref.s
    assert nH % 2 and nW % 2 and ref.model.vision_tower.select_layer == -2, "odd grids, hidden_states[-2]"
    clip, dem = ref.model.vision_tower.clip, ref.model.spatial_embed
    B, N = pixels.shape[0], nH * nW
    local = [pixels[:, :, r * s:(r + 1) * s, c * s:(c + 1) * s] for r in range(nH) for c in range(nW)]
    low = F.interpolate(pixels, size=(s, s), mode="bicubic", align_corners=False)  # = centre strided crop
    x = clip.pre_layrnorm(clip.embeddings(torch.cat(local + [low])))
    for layer in clip.encoder.layers[:-1]:
        x = layer(x, None)
        x = x[0] if isinstance(x, tuple) else x
    f = x[:, 1:].reshape(N + 1, B, -1, x.shape[-1]).transpose(0, 1)          # (B, N+1, g*g, D)
    loc, S = f[:, :N], f[:, N]
    g = math.isqrt(S.shape[1])
    mh, mw, D = g // nH, g // nW, S.shape[-1]
    Sg = S.reshape(B, g, g, D)
    # A at the sampled positions: the low-res map's window k attends to local crop k
    A = torch.empty_like(Sg)
    for r in range(nH):
        for c in range(nW):
            q = Sg[:, r * mh:(r + 1) * mh, c * mw:(c + 1) * mw].reshape(B, mh * mw, D)
            A[:, r * mh:(r + 1) * mh, c * mw:(c + 1) * mw] = dem.attention(q, loc[:, r * nW + c]).view(B, mh, mw, D)
    # B at the sampled positions: the local map's centre phase attends to the low-res view
    F_loc = loc.reshape(B, nH, nW, g, g, D).permute(0, 1, 3, 2, 4, 5).reshape(B, nH * g, nW * g, D)
    Bm = dem.attention(F_loc[:, nH // 2::nH, nW // 2::nW].reshape(B, g * g, D), S).view(B, g, g, D)
    Fm = dem.ln_fuse(torch.cat([dem.ffn_crop(Bm), dem.ffn_stride(A)], dim=-1) + A + Bm)
    return ref.model.mm_projector(((S + Fm.reshape(B, g * g, D)) / 2))


def speed():
    torch.set_num_threads(THREADS)
    cfg_fast, cfg_full = small_config(True), small_config(False)
    ref = randomize_(InfLlavaTorch.from_config(cfg_fast, device="cpu", attn_implementation="sdpa"), seed=0).eval()
    params = jax.tree.map(jnp.asarray, released_to_params(ref.released_state_dict(), cfg_fast))

    import skimage.data
    img = preprocess(skimage.data.astronaut(), size=3 * 336)            # (1008, 1008, 3)
    x = jnp.asarray(img[None])
    xt = torch.from_numpy(np.ascontiguousarray(np.moveaxis(img, -1, 0))[None])
    ids = np.random.default_rng(0).integers(1, LLM["vocab_size"], (1, PROMPT)).astype(np.int32)
    ids[0, 8] = IMAGE_TOKEN_INDEX
    ids_j, ids_t = jnp.asarray(ids), torch.from_numpy(ids).long()

    def compiled(cfg, method=InfLlavaModel.encode_images, *args):
        fn = jax.jit(lambda p, *a: InfLlavaModel(cfg).apply({"params": p}, *a, method=method))
        return fn.lower(params, *args).compile()

    fast, full = compiled(cfg_fast, InfLlavaModel.encode_images, x), compiled(cfg_full, InfLlavaModel.encode_images, x)
    fwd = compiled(cfg_fast, InfLlavaModel.__call__, ids_j, x)
    # FLOPs from the same programs with attention in one block: XLA's cost analysis counts the
    # body of the CPU head-block loop (attention._cpu_blocks) once
    with attention.unblocked():
        f_fast, f_full = (flops(compiled(c, InfLlavaModel.encode_images, x)) for c in (cfg_fast, cfg_full))
        f_fwd = flops(compiled(cfg_fast, InfLlavaModel.__call__, ids_j, x))
    pruned_ref = copy.copy(ref)                    # the same modules, the pruned encode_images
    pruned_ref.encode_images = lambda px: torch_pruned(ref, px)
    no_grad = lambda f: lambda: torch.no_grad()(f)()
    run = {"jax_fast": lambda: fast(params, x).block_until_ready(),
           "jax_full": lambda: full(params, x).block_until_ready(),
           "torch": no_grad(lambda: ref.encode_images(xt)),
           "torch_pruned": no_grad(lambda: torch_pruned(ref, xt)),
           "jax_forward": lambda: fwd(params, ids_j, x).block_until_ready(),
           "torch_forward_pruned": no_grad(lambda: pruned_ref(ids_t, xt)[0]),
           "torch_forward": no_grad(lambda: ref(ids_t, xt)[0])}

    out = {k: np.asarray(f()) if k.startswith("jax") else f().numpy() for k, f in run.items()}   # warm-up
    rel = lambda a, b: float(np.abs(a - b).max() / np.abs(b).max())
    diffs = {"fast_vs_torch": rel(out["jax_fast"], out["torch"]),
             "full_vs_torch": rel(out["jax_full"], out["torch"]),
             "fast_vs_full": rel(out["jax_fast"], out["jax_full"]),
             "torch_pruned_vs_torch": rel(out["torch_pruned"], out["torch"]),
             "forward_vs_torch": rel(out["jax_forward"], out["torch_forward"]),
             "forward_vs_torch_pruned": rel(out["jax_forward"], out["torch_forward_pruned"])}
    bad = {k: v for k, v in diffs.items() if not v < 1e-3}
    if bad:   # a speed comparison of different computations means nothing
        raise SystemExit(f"outputs differ: {bad}")
    times = {k: [] for k in run}
    busy = 0   # runs started while other processes kept the CPUs busy
    for _ in range(ROUNDS):   # interleaved, so that remaining background load hits every row
        for k, f in run.items():
            busy += wait_idle() < MIN_IDLE
            times[k].append(timed(f))
    return dict(cfg=cfg_fast, flops_fast=f_fast, flops_full=f_full, flops_forward=f_fwd, times=times,
                diffs=diffs, busy=busy)


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

    def temp(fn, *args) -> float:          # compiled as on GPU/TPU: attention in one block
        with attention.unblocked():
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
    argparse.ArgumentParser(prog="python -m benchmarks.vision_path", description=__doc__.split("\n\n")[0],
                            formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()   # --help, no flags
    print(f"jax {jax.__version__} ({jax.default_backend()}, {jax.device_count()} device(s)), "
          f"torch {torch.__version__} ({THREADS} threads), "
          f"jax_default_matmul_precision={jax.config.jax_default_matmul_precision!r} (default)")
    print(f"config: CLIP {VISION['hidden_size']} wide x {VISION['num_hidden_layers']} layers "
          f"(features = layer {VISION['num_hidden_layers'] - 1}), {VISION['image_size']} px sub-images "
          f"(24x24 tokens), 3x3 grid = 1008 px input, batch 1; DEM {DEM_SMALL['num_heads']}x"
          f"{DEM_SMALL['head_dim']} heads, fusion {DEM_SMALL['ffn_hidden']}->{DEM_SMALL['ffn_out']}; "
          f"projector 256->512; Llama {LLM['hidden_size']} wide x {LLM['num_hidden_layers']} layers, {PROMPT}-token "
          f"prompt; fp32; ViT layers unrolled")
    s = speed()
    d = s["cfg"].dem
    med = {k: statistics.median(v) for k, v in s["times"].items()}
    best = {k: min(v) for k, v in s["times"].items()}
    print()
    print(f"{'encode_images':<22} {'ViT passes':>10} {'GFLOPs':>9} {'median s':>9} {'min s':>8}")
    rows = [("jax fast", "jax_fast", d.vit_passes(True), f"{s['flops_fast'] / 1e9:.2f}"),
            ("jax full", "jax_full", d.vit_passes(False), f"{s['flops_full'] / 1e9:.2f}"),
            ("torch pruned", "torch_pruned", d.vit_passes(True), "-"),
            ("torch ref (released)", "torch", d.vit_passes(False), "-")]
    for name, k, passes, gf in rows:
        print(f"{name:<22} {passes:>10} {gf:>9} {med[k]:>9.3f} {best[k]:>8.3f}")
    print(f"{'full forward':<22} {'':>10} {'':>9} {'median s':>9} {'min s':>8}")
    for name, k in (("jax fast", "jax_forward"), ("torch pruned", "torch_forward_pruned"),
                    ("torch ref (released)", "torch_forward")):
        print(f"{name:<22} {'':>10} {'':>9} {med[k]:>9.3f} {best[k]:>8.3f}")
    print("(torch pruned does JAX fast's work: 10 ViT passes through the first L-1 layers, the DEM at "
          "the pooled positions; the released reference runs 19 passes through all layers)")
    ratio = s["flops_fast"] / s["flops_full"]
    eq = {"encode_images": med["torch_pruned"] / med["jax_fast"],
          "forward": med["torch_forward_pruned"] / med["jax_forward"]}
    print(f"FLOPs fast/full {ratio:.3f} (ViT passes 10/19 = {10 / 19:.3f}); speed-up at equal work: "
          f"encode_images {eq['encode_images']:.2f}x, full forward {eq['forward']:.2f}x; vs the released "
          f"reference: encode_images {med['torch'] / med['jax_fast']:.2f}x, full forward "
          f"{med['torch_forward'] / med['jax_forward']:.2f}x (medians of {ROUNDS}); max rel diff of the outputs: "
          + ", ".join(f"{k} {v:.1e}" for k, v in s["diffs"].items()))

    print()
    print("one DEM application at D=1024 (8 x 128 heads, g=24), compile-only temp memory (MiB; XLA:CPU does not "
          "count the fused attention's scores, see the scores columns):")
    print(f"{'px':>5} {'grid':>5} {'map tok':>8} {'windowed':>9} {'fast':>8} {'naive':>9} "
          f"{'naive scores':>13} {'window scores':>14}")
    mem = []
    for px in SIZES:
        r = dem_memory(px)
        mem.append(r)
        fast = "n/a" if r["fast_MiB"] is None else f"{r['fast_MiB']:.1f}"   # g=24 not divisible by 5
        print(f"{r['px']:>5} {r['grid']:>4}x {r['map_tokens']:>8} {r['windowed_MiB']:>9.1f} {fast:>8} "
              f"{r['naive_MiB']:>9.1f} {r['naive_scores_MiB']:>13.1f} {r['windowed_scores_MiB']:>14.1f}")
    V, T, W = d.vit_passes(True), (VISION["image_size"] // VISION["patch_size"]) ** 2 + 1, VISION["hidden_size"]
    gemms = gemm_rates([(V * T, W, W), (V * T, W, VISION["intermediate_size"]), (V * T, VISION["intermediate_size"], W),
                        (PROMPT + 575, LLM["hidden_size"], LLM["intermediate_size"])])
    print("\nthe products this forward is made of, JAX against PyTorch:")
    print(gemm_table(gemms))
    n_runs = ROUNDS * len(s["times"])
    print(f"\n{s['busy']} of {n_runs} timed runs started while other processes used > {1 - MIN_IDLE:.0%} of "
          f"the {os.cpu_count()} CPUs (after waiting up to {IDLE_TIMEOUT:.0f} s)"
          + ("; WARNING: wall times are inflated by other jobs (PyTorch's most), the min column is "
             "the better estimate" if s["busy"] > n_runs // 5 else ""))
    result = {
        "config": {"vision": VISION, "llm": LLM, "dem": DEM_SMALL, "grid": [d.nH, d.nW], "input_px": 1008,
                   "batch": 1, "prompt_tokens": PROMPT, "dtype": "float32", "matmul_precision": "default",
                   "torch_threads": THREADS, "rounds": ROUNDS},
        "flops_fast": s["flops_fast"], "flops_full": s["flops_full"], "flops_fast_over_full": ratio,
        "vit_passes_fast": d.vit_passes(True), "vit_passes_full": d.vit_passes(False),
        "time_s": {k: {"median": med[k], "min": best[k]} for k in med},
        "speedup_vs_torch": {"encode_images": eq["encode_images"], "forward": eq["forward"]},   # equal work
        "speedup_vs_torch_min": {"encode_images": best["torch_pruned"] / best["jax_fast"],
                                 "forward": best["torch_forward_pruned"] / best["jax_forward"]},
        "speedup_vs_released_torch": {"encode_images": med["torch"] / med["jax_fast"],
                                      "forward": med["torch_forward"] / med["jax_forward"]},
        "speedup_full_vs_torch": med["torch"] / med["jax_full"],
        "speedup_fast_vs_full": med["jax_full"] / med["jax_fast"],
        "max_rel_diff": s["diffs"], "gemm": gemms, "flops_forward": s["flops_forward"],
        "dem_memory_MiB": mem,
        "busy_runs": s["busy"], "timed_runs": n_runs,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
