"""`python -m infllava_jax.plan --fit GIB` (fit.py): the settings it reports fit the budget, the
ones it rejects do not, the modes come in the order of what they give up; the plan's default
micro-batch per device."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from infllava_jax import fit
from infllava_jax.plan import default_micro_batch, load_config

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}


def _fit(*args):
    return subprocess.run([sys.executable, "-m", "infllava_jax.plan", "--config", str(ROOT / "configs" / "tiny.py"),
                           "--mesh", "fsdp=1", "--config.data.max_len=128", *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=1200)


def test_default_micro_batch_is_per_device_and_capped():
    cfg = load_config(str(ROOT / "configs" / "stage2_8b.py"))       # 32 sequences per process
    assert [default_micro_batch(cfg, n) for n in (1, 2, 8, 16, 64)] == [4, 4, 4, 2, 1]


def test_modes_from_least_given_up():
    cfg = load_config(str(ROOT / "configs" / "tiny.py"))
    assert [m[0] for m in fit.modes(cfg)] == ["full", "LoRA r=64", "QLoRA int8 r=64", "QLoRA int4 r=64"]
    cfg.lora.rank = 8
    assert [(m[1], m[2]) for m in fit.modes(cfg)] == [(8, ""), (8, "int8"), (8, "int4")]


@pytest.mark.slow   # a few AOT compiles of the tiny step
def test_fit_reports_settings_under_the_budget_and_rejects_the_rest():
    r = _fit("--fit", "0.2", "--json", "--top", "1", "--max-compiles", "4", "--max-micro", "2")
    assert r.returncode in (0, 1), r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert 1 <= out["compiles"] <= 4 and len(out["tried"]) == out["compiles"]
    for row in out["tried"]:
        assert row["fits"] == (row["peak_gib_per_device"] <= 0.2), row
    for row in out["best"]:
        assert row["fits"] and row["step_s_H100"] > 0 and row["gives_up"]
    assert r.returncode == (0 if out["best"] else 1)
    # a budget nothing meets: exit 1, said in one line
    r = _fit("--fit", "0.0001", "--max-compiles", "1")
    assert r.returncode == 1 and "nothing tried fits" in r.stdout, r.stdout[-2000:]
