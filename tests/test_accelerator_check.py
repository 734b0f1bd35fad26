"""benchmarks/accelerator_check.py stays runnable: its --cpu-smoke mode, and the keys of its JSON line."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow   # the accelerator check's CPU smoke run with --remat and --quant (~5 min)

ROOT = Path(__file__).resolve().parents[1]


def test_cpu_smoke_runs_and_reports_every_check():
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}          # one CPU device
    p = subprocess.run([sys.executable, "-m", "benchmarks.accelerator_check", "--cpu-smoke", "--remat", "none,full",
                        "--quant", "int8"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert {"backend", "device_kind", "devices", "parity", "attention", "train_step", "memory"} <= set(r)
    assert r["backend"] == "cpu" and r["mode"] == "cpu-smoke"
    assert r["parity"]["fp32_max_rel_err"] == 0.0 and r["parity"]["tokens"] >= 512     # CPU against CPU
    assert 0.0 <= r["parity"]["bf16_kl_mean"] <= r["parity"]["bf16_kl_max"] < 1e-2
    assert set(r["attention"]) == {"xla", "chunked", "jax", "cudnn", "splash", "auto"}
    assert "skipped" in r["attention"]["cudnn"]
    for impl in ("xla", "chunked", "jax", "splash", "auto"):
        a = r["attention"][impl]
        assert a["out_rel_err"] < 2e-2 and a["grad_rel_err"] < 2e-2 and a["ms"] > 0, (impl, a)
    t = r["train_step"]
    assert t["step_s"] > 0 and t["tokens_per_s"] > 0 and 0 < t["mfu"] < 1 and t["seq_len"] == 256
    assert r["memory"]["plan_peak_gib"] > 0 and r["memory"]["plan_error"] is None
    # --remat: the step once per policy, next to the plan's peak; --quant: the int8 model's KL against bf16
    assert set(r["remat"]) == {"none", "full"}
    for policy in ("none", "full"):
        assert 0 < r["remat"][policy]["mfu"] < 1 and r["remat"][policy]["plan_peak_gib"] > 0, r["remat"][policy]
    assert r["quant"]["quant"] == "int8" and 0 <= r["quant"]["kl_mean"] <= r["quant"]["kl_max"] < 1e-1
    assert r["quant"]["tokens"] > 0
