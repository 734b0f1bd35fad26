"""One check of a fresh GPU or TPU host (at most ~8 minutes), reduced to a CPU smoke test for CI.

    python -m benchmarks.accelerator_check               # on the accelerator host
    python -m benchmarks.accelerator_check --cpu-smoke   # the same four checks, small, on CPU (< 3 min)

1. parity: the tiny model (random weights) on the device against the same on the CPU: fp32
   logits (max relative error, matmuls at "highest"), and the device's bf16 model with attention
   "auto" against the CPU's fp32 logits, as per-token KL over a 520-id prompt (555 tokens).
2. attention: every impl against "xla" on the device (bf16, causal, GQA, a padded row): output
   and gradient error, forward + backward time. cudnn runs on GPUs only; splash is a TPU kernel
   (Pallas interpret mode elsewhere, so only the smoke run times it off TPU).
3. train step: stage 2 of `presets.inf_llava_1b()` (1.5 B parameters) at 2048 tokens, bf16, full
   remat, attention "auto", 4 sequences per device: step time, tokens/s, MFU (analytic FLOPs over
   flops.PEAK_FLOPS[device_kind]). Smoke: the tiny model at 256 tokens.
4. memory: the peak bytes in use per device (`memory_stats()`; none on CPU) next to what
   `python -m infllava_jax.plan` predicts for the same step (a subprocess on fake CPU devices,
   started first so it runs alongside).
5. with --remat none,minimal,full: the train step of 3. once per remat policy (layers.py), MFU
   and peak memory per policy next to the plan's prediction for it.
6. with --quant int8 (or int4): the tiny model's weight-only quantized logits (quant.py, qwix) on
   the device against its unquantized bf16 logits, per-token KL.
Prints a table; the last line is a JSON object.

    python -m benchmarks.accelerator_check --remat none,minimal,full --quant int8
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.timing import timed
from infllava_jax import attention, params as params_lib, presets
from infllava_jax.api import InfLlava
from infllava_jax.plan import apply_sets, load_config, train_step_setup
from infllava_jax.splice import IMAGE_TOKEN_INDEX
from infllava_jax.training import flops, step as step_lib

ROOT = Path(__file__).resolve().parents[1]
GiB = 2 ** 30
MODES = {
    "full": {"attention": (2, 2048, 16, 4, 128), "config": "configs/stage2_8b.py", "micro": 4, "steps": 5,
             "sets": ["model.preset=inf_llava_1b", "data.max_len=2048"]},
    "smoke": {"attention": (2, 256, 4, 2, 64), "config": "configs/tiny.py", "micro": 2, "steps": 3,
              "sets": ["data.max_len=256", "runtime.dtype=bfloat16", "runtime.remat_policy=full",
                       "runtime.attention_impl=auto"]},
}
PROMPT_IDS = 520


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def parity() -> dict:
    """fp32 device vs CPU (max relative error); bf16 + "auto" on the device vs fp32 on the CPU (KL)."""
    cfg, cpu, dev = presets.tiny(), jax.devices("cpu")[0], jax.devices()[0]
    params = params_lib.init_params(cfg, 0)
    rng = np.random.default_rng(0)
    ids = rng.integers(1, cfg.llm.vocab_size, (1, PROMPT_IDS)).astype(np.int32)
    ids[0, 5] = IMAGE_TOKEN_INDEX
    pixels = rng.normal(size=(1, 3, *cfg.image_size)).astype(np.float32)

    def logits(c, device):
        with jax.default_device(device), jax.default_matmul_precision("highest"):
            return np.asarray(InfLlava(c, jax.device_put(params, device))(ids, pixels), np.float64)[0]

    ref = logits(cfg, cpu)
    bf16 = logits(cfg.with_runtime(dtype="bfloat16", attention_impl="auto"), dev)
    log_p = ref - np.logaddexp.reduce(ref, axis=-1, keepdims=True)
    log_q = bf16 - np.logaddexp.reduce(bf16, axis=-1, keepdims=True)
    kl = np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)
    return {"fp32_max_rel_err": rel_err(logits(cfg, dev), ref), "bf16_kl_mean": float(kl.mean()),
            "bf16_kl_max": float(kl.max()), "tokens": int(ref.shape[0])}


def attention_impls(shape, smoke: bool) -> dict:
    """Each impl against "xla" on the device: output and gradient max relative error, ms per fwd+bwd."""
    B, T, N, K, H = shape
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(B, T, n, H)), jnp.bfloat16) for n in (N, K, K))
    pad = jnp.asarray(np.arange(T)[None, :] < np.array([T, T - T // 8])[:B, None])   # row 2 right-padded
    real = np.asarray(pad)

    def fwd_bwd(impl):
        def loss(q, k, v):
            out = attention.dot_product_attention(q, k, v, causal=True, kv_mask=pad, impl=impl)
            return jnp.sum(jnp.where(pad[..., None, None], out.astype(jnp.float32), 0) ** 2), out
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))

    (_, o_ref), g_ref = fwd_bwd("xla")(q, k, v)
    rows, backend = {}, jax.default_backend()
    for impl in attention.IMPLS:
        if (impl == "cudnn" and backend != "gpu") or (impl == "splash" and backend != "tpu" and not smoke):
            rows[impl] = {"skipped": f"not a {backend} kernel"}
            continue
        try:
            f = fwd_bwd(impl)
            (_, o), g = f(q, k, v)
            ms = 1e3 * timed(lambda: jax.block_until_ready(f(q, k, v)), 3 if smoke else 10)
            rows[impl] = {"runs": attention.resolve(impl, q), "out_rel_err": rel_err(np.asarray(o, np.float32)[real],
                          np.asarray(o_ref, np.float32)[real]),
                          "grad_rel_err": max(rel_err(a.astype(jnp.float32), b.astype(jnp.float32))
                                              for a, b in zip(g, g_ref)), "ms": ms}
        except Exception as e:                      # reported, never hidden
            rows[impl] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    return rows


def random_batch(s) -> dict:
    A, b, L = s["batch"]["input_ids"].shape
    rng = np.random.default_rng(0)
    ids = rng.integers(1, s["mc"].llm.vocab_size - 1, (A, b, L)).astype(np.int32)
    ids[:, :, 1] = IMAGE_TOKEN_INDEX
    host = {"input_ids": ids, "labels": ids, "attention_mask": np.ones_like(ids),
            "pixel_values": rng.normal(size=s["batch"]["pixel_values"].shape).astype(np.float32)}
    return {k: jax.device_put(v, s["batch_shardings"][k]) for k, v in host.items()}


def train_step(mode: dict) -> dict:
    """Compile and time the stage-2 step on every device; peak memory from memory_stats()."""
    n = jax.device_count()
    cfg = apply_sets(load_config(str(ROOT / mode["config"])), [*mode["sets"], f"global_batch={mode['micro'] * n}"])
    s = train_step_setup(cfg, {"fsdp": n}, mode["micro"])
    with jax.set_mesh(s["mesh"]):
        params = params_lib.init_params(s["mc"], 0, s["mesh"])
        state = jax.jit(lambda p: step_lib.init_state(p, s["parts"], s["tx"], s["mc"]), out_shardings=s["state_shardings"])(params)
        del params
        batch = random_batch(s)
        t = time.perf_counter()
        compiled = s["step"].lower(state, batch).compile()
        compile_s = time.perf_counter() - t
        state, m = compiled(state, batch)                       # warm-up
        jax.block_until_ready(m)
        t = time.perf_counter()
        for _ in range(mode["steps"]):
            state, m = compiled(state, batch)
        loss = float(jax.device_get(m["loss"]))
        step_s = (time.perf_counter() - t) / mode["steps"]
    peak, note = flops.peak_flops()
    step_flops = flops.train_step_flops(s["mc"], s["sequences"], s["seq"], s["parts"])
    stats = [d.memory_stats() or {} for d in jax.local_devices()]
    used = max((st.get("peak_bytes_in_use", 0) for st in stats), default=0)
    n_params = sum(x.size for x in jax.tree.leaves((state["params"], state["frozen"])))
    return {"config": cfg.model.preset, "params": int(n_params), "devices": n, "sequences": s["sequences"],
            "seq_len": s["seq"], "attention": attention.resolve(s["mc"].llm.attention_impl, jnp.zeros(
                (1, 1, 1, s["mc"].llm.head_dim), s["mc"].llm.dtype)), "compile_s": compile_s, "step_s": step_s,
            "tokens_per_s": s["sequences"] * s["seq"] / step_s, "mfu": step_flops / step_s / peak,
            "peak_flops": peak, "peak_flops_from": note, "loss": loss,
            "peak_gib_used_per_device": used / GiB if used else None}


def start_plan(mode: dict) -> subprocess.Popen:
    n, micro = jax.device_count(), mode["micro"]
    cmd = [sys.executable, "-m", "infllava_jax.plan", "--config", mode["config"], "--mesh", f"fsdp={n}",
           "--micro-batch", str(micro), *[f"--config.{kv}" for kv in [*mode["sets"], f"global_batch={micro * n}"]]]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def plan_result(p: subprocess.Popen) -> dict:
    out, err = p.communicate()
    if p.returncode:
        return {"error": err[-500:]}
    return json.loads(out.strip().splitlines()[-1])


def table(r: dict) -> str:
    p = r["parity"]
    lines = [f"backend {r['backend']} ({r['device_kind']}, {r['devices']} devices), mode {r['mode']}, "
             f"jax {r['jax']}, {r['seconds']:.0f} s",
             f"parity  failed: {p['error']}" if "error" in p else
             f"parity  fp32 max rel err {p['fp32_max_rel_err']:.2e}   bf16 KL mean "
             f"{p['bf16_kl_mean']:.2e} max {p['bf16_kl_max']:.2e} ({p['tokens']} tokens)",
             f"{'attention':<10}{'runs':>9}{'out err':>10}{'grad err':>10}{'ms':>9}"]
    if "traceback" in r["attention"]:                  # the section failed as a whole (section())
        lines.append(f"attention failed: {r['attention']['error']}")
    else:
        for impl, a in r["attention"].items():
            if "ms" in a:
                lines.append(f"{impl:<10}{a['runs']:>9}{a['out_rel_err']:>10.2e}{a['grad_rel_err']:>10.2e}{a['ms']:>9.2f}")
            else:
                lines.append(f"{impl:<10}  {a.get('skipped') or a.get('error')}")
    t, m = r["train_step"], r["memory"]
    if "error" in t:
        lines.append(f"train step failed: {t['error']}")
    else:
        lines.append(f"train step {t['config']} ({t['params'] / 1e6:,.2f} M params), {t['sequences']} x {t['seq_len']} "
                     f"tokens, attention {t['attention']}: {t['step_s']:.3f} s, {t['tokens_per_s']:.0f} tok/s, "
                     f"MFU {100 * t['mfu']:.1f}% (compile {t['compile_s']:.0f} s)")
    used = "n/a (no memory_stats)" if m["peak_gib_used"] is None else f"{m['peak_gib_used']:.2f} GiB"
    planned = m["plan_error"] or f"{m['plan_peak_gib']:.2f} GiB"
    lines.append(f"peak memory per device: used {used}; infllava_jax.plan (CPU compiler, chunked attention) {planned}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="the reduced run on CPU (CI)")
    ap.add_argument("--remat", default="", help="comma-separated remat policies: the train step once per policy")
    ap.add_argument("--quant", default="", help='"int8" | "int4": the quantized tiny model against bf16 (KL)')
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    mode = MODES["smoke" if args.cpu_smoke else "full"]
    plan_proc = start_plan(mode)
    r = {"backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
         "devices": jax.device_count(), "mode": "cpu-smoke" if args.cpu_smoke else "full", "jax": jax.__version__}
    r["parity"] = section(parity)
    r["attention"] = section(attention_impls, mode["attention"], args.cpu_smoke)
    r["train_step"] = section(train_step, mode)
    planned = plan_result(plan_proc)
    r["memory"] = {"peak_gib_used": r["train_step"].get("peak_gib_used_per_device"),
                   "plan_peak_gib": planned.get("peak_gib_per_device"), "plan_error": planned.get("error")}
    if args.remat:
        r["remat"] = section(remat_policies, mode, args.remat.split(","))
    if args.quant:
        r["quant"] = section(quantized, args.quant)
        print(f"quant {args.quant}: KL vs bf16 mean {r['quant'].get('kl_mean')} max {r['quant'].get('kl_max')}")
    r["seconds"] = time.perf_counter() - t0
    print(table(r))
    print(json.dumps(r))
    return r


def remat_policies(mode: dict, policies: list[str]) -> dict:
    """The train step per remat policy, with the plan's peak for the same setting."""
    out = {}
    for p in policies:
        m = {**mode, "sets": [*[s for s in mode["sets"] if not s.startswith("runtime.remat_policy=")],
                              f"runtime.remat_policy={p}"]}
        proc = start_plan(m)
        step = section(train_step, m)
        out[p] = {**step, "plan_peak_gib": plan_result(proc).get("peak_gib_per_device")}
        if "mfu" in step:
            print(f"remat {p:<14} MFU {100 * step['mfu']:.1f}%  step {step['step_s']:.3f} s  peak used "
                  f"{step['peak_gib_used_per_device']}  planned {out[p]['plan_peak_gib']}", flush=True)
    return out


def quantized(spec: str) -> dict:
    """The tiny model in bf16 against the same weights quantized (`spec`), on the device: KL."""
    cfg = presets.tiny().with_runtime(dtype="bfloat16")
    params = params_lib.init_params(cfg, 0)
    qcfg, qparams = params_lib.quantize(cfg, params, spec)
    rng = np.random.default_rng(0)
    ids = rng.integers(1, cfg.llm.vocab_size, (1, 128)).astype(np.int32)
    ids[0, 5] = IMAGE_TOKEN_INDEX
    pixels = rng.normal(size=(1, 3, *cfg.image_size)).astype(np.float32)
    a = np.asarray(InfLlava(cfg, params)(ids, pixels), np.float64)[0]
    b = np.asarray(InfLlava(qcfg, qparams)(ids, pixels), np.float64)[0]
    log_p, log_q = (x - np.logaddexp.reduce(x, axis=-1, keepdims=True) for x in (a, b))
    kl = np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)
    return {"quant": spec, "kl_mean": float(kl.mean()), "kl_max": float(kl.max()), "tokens": int(kl.size)}


def section(fn, *args) -> dict:
    """One check's result, or {"error": ...} with the traceback's end (printed at once), so that
    one failing check on a fresh host still leaves the others' numbers."""
    try:
        return fn(*args)
    except Exception as e:                          # reported, never hidden
        tb = traceback.format_exc()
        print(f"{fn.__name__} failed:\n{tb}", file=sys.stderr, flush=True)
        return {"error": f"{type(e).__name__}: {str(e)[:300]}", "traceback": tb[-2000:]}


if __name__ == "__main__":
    main()
