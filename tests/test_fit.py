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


def _fit(*args, max_len=128):
    return subprocess.run([sys.executable, "-m", "infllava_jax.plan", "--config", str(ROOT / "configs" / "tiny.py"),
                           "--mesh", "fsdp=1", f"--config.data.max_len={max_len}", *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=1200)


def test_default_micro_batch_is_per_device_and_capped():
    cfg = load_config(str(ROOT / "configs" / "stage2_8b.py"))       # 32 sequences per process
    assert [default_micro_batch(cfg, n) for n in (1, 2, 8, 16, 64)] == [4, 4, 4, 2, 1]


def test_modes_from_least_given_up():
    cfg = load_config(str(ROOT / "configs" / "tiny.py"))
    assert [m[0] for m in fit.modes(cfg)] == ["full", "LoRA r=64", "QLoRA int8 r=64", "QLoRA int4 r=64"]
    cfg.lora.rank = 8
    assert [(m[1], m[2]) for m in fit.modes(cfg)] == [(8, ""), (8, "int8"), (8, "int4")]
    assert [(m[1], m[2]) for m in fit.modes(cfg, ("full", "qlora-int4"))] == [(8, "int4")]


class _FakePlans:
    """plan_fn / state_fn over a table of peaks: (mode name, remat, attention, micro-batch) -> GiB."""

    def __init__(self, peaks, states):
        self.peaks, self.states, self.calls = peaks, states, []

    def plan(self, cfg, mesh_shape, mb, mfu):
        name = "full" if not cfg.lora.rank else ("LoRA r=64" if not cfg.lora.quant else f"QLoRA {cfg.lora.quant} r=64")
        key = (name, cfg.runtime.remat_policy, cfg.runtime.attention_impl, mb)
        self.calls.append(key)
        return {"peak_gib_per_device": self.peaks[key], "step_s_H100": 1.0, "accumulation_steps": 8 // mb,
                "compile_s": 0.0}

    def state(self, cfg, mesh_shape):
        return self.states["full" if not cfg.lora.rank else "adapters"]


def test_search_skips_by_state_prunes_by_the_leanest_setting_and_picks_the_fastest_attention():
    cfg = load_config(str(ROOT / "configs" / "tiny.py"))
    peak = lambda m, r, a, mb: {"none": 30, "minimal": 20, "full": 10}[r] * (1.5 if a == "xla" else 1) * mb \
        * (1 if m == "QLoRA int4 r=64" else 2)
    peaks = {(m, r, a, mb): peak(m, r, a, mb) for m in ("LoRA r=64", "QLoRA int8 r=64", "QLoRA int4 r=64")
             for r in fit.REMATS for a in fit.ATTENTIONS for mb in (1, 2, 4)}
    fake = _FakePlans(peaks, {"full": 99.0, "adapters": 5.0})
    s = fit.Search(cfg, {"fsdp": 1}, 16.0, 0.4, 4, fake.plan, fake.state, log=lambda *a: None)
    found = s.run(fit.modes(cfg), top=1, max_compiles=20)
    assert s.skipped == [{"mode": "full", "state_gib_per_device": 99.0}]     # no compile for full fine-tuning
    # LoRA / QLoRA int8 (leanest 20 GiB): one compile each; QLoRA int4: leanest 10 fits, none 30 and
    # minimal 20 are over at their leanest attention, full + xla 15 fits, micro-batch 2 (30) does not
    assert fake.calls == [("LoRA r=64", "full", "chunked", 1), ("QLoRA int8 r=64", "full", "chunked", 1),
                          ("QLoRA int4 r=64", "full", "chunked", 1), ("QLoRA int4 r=64", "none", "chunked", 1),
                          ("QLoRA int4 r=64", "minimal", "chunked", 1), ("QLoRA int4 r=64", "full", "xla", 1),
                          ("QLoRA int4 r=64", "full", "xla", 2)]
    assert [(r["mode"], r["remat_policy"], r["attention_impl"], r["micro_batch_per_device"]) for r in found] == \
        [("QLoRA int4 r=64", "full", "xla", 1)]
    assert s.compiles == len(s.tried) == 7 and all(r["fits"] == (r["peak_gib_per_device"] <= 16) for r in s.tried)


@pytest.mark.slow   # four AOT compiles of the tiny step at 1024 tokens
def test_fit_searches_the_attention_implementation():
    """At 1024 tokens (two 512-query blocks) and without remat, "chunked" compiles below "xla"; with
    room for both the search reports "xla" (the faster), with a budget between them "chunked"."""
    args = ("--modes", "lora", "--remat", "none", "--max-micro", "1", "--json")
    r = _fit("--fit", "100", *args, max_len=1024)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    tried = {row["attention_impl"]: row["peak_gib_per_device"] for row in out["tried"]}
    assert list(tried) == ["chunked", "xla"] and tried["chunked"] < tried["xla"], tried
    assert out["best"][0]["attention_impl"] == "xla"
    r = _fit("--fit", f"{(tried['chunked'] + tried['xla']) / 2:.6f}", *args, max_len=1024)
    best = json.loads(r.stdout.strip().splitlines()[-1])["best"]
    assert [(b["attention_impl"], b["remat_policy"]) for b in best] == [("chunked", "none")], r.stdout[-2000:]


def test_fit_axis_lists_are_checked():
    r = _fit("--fit", "1", "--attention", "flash")
    assert r.returncode == 2 and "--attention" in r.stderr and "xla, chunked" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr


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


def test_several_budgets_share_their_compiles(capsys):
    """--fit 16,40: the second budget reuses the first one's compiles (one plan per setting)."""
    import argparse
    cfg = load_config(str(ROOT / "configs" / "tiny.py"))
    peaks = {(m, r, a, 1): {"none": 30, "minimal": 20, "full": 10}[r] for m in ("LoRA r=64",)
             for r in fit.REMATS for a in fit.ATTENTIONS}
    fake = _FakePlans(peaks, {"full": 99.0, "adapters": 5.0})
    args = argparse.Namespace(fit=[16.0, 40.0], json=True, mfu=0.4, max_micro=1, remat=list(fit.REMATS),
                              attention=["chunked"], modes=["full", "lora"], top=1, max_compiles=12)
    assert fit.main(cfg, {"fsdp": 1}, args, fake.plan, fake.state) == 0
    # 16: full remat (10) fits, none (30) and minimal (20) over; 40: none fits, all three already compiled
    assert fake.calls == [("LoRA r=64", r, "chunked", 1) for r in ("full", "none", "minimal")]
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert [(x["budget_gib"], x["compiles"], x["best"][0]["remat_policy"]) for x in lines] == \
        [(16.0, 3, "full"), (40.0, 0, "none")]
