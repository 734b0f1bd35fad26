"""The miniature study (README main job) end to end at toy scale: data -> stage 1 -> stage 2 ->
eval for two rows on the fake 8-device mesh, the table / json / plot, and reuse on a re-run."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from configs import study as study_cfg
from infllava_jax.evaluation.caption_probe import CHANCE

ROOT = Path(__file__).resolve().parents[1]


def _run(out, *extra):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "infllava_jax.study", str(out), "--rows", "plain_336,dcm_dem_672",
           "--n-train", "16", "--n-test", "8", "--stage1-steps", "2", "--stage2-steps", "2", *extra]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout + p.stderr


def test_study_end_to_end_and_reuse(tmp_path):
    out = tmp_path / "study"
    log = _run(out)
    res = json.loads((out / "results.json").read_text())
    assert list(res["rows"]) == ["plain_336", "dcm_dem_672"]
    for row, r in res["rows"].items():
        m = r["metrics"]
        assert m["n"] == 8 and m["missing"] == 0
        assert all(0 <= m[f"accuracy_{t}"] <= 1 for t in ("digit", "count", "corner", "side"))
        assert r["train"]["1"]["steps"] == 2 and r["train"]["2"]["steps"] == 2
        assert set(r["caption_probe"]) == set(CHANCE) and all(0 <= v <= 1 for v in r["caption_probe"].values())
        assert (out / "runs" / row / "stage2" / "final" / "config.json").is_file()
    cfg = json.loads((out / "runs" / "dcm_dem_672" / "stage2" / "final" / "config.json").read_text())
    assert (cfg["dem"]["nH"], cfg["dem"]["nW"], cfg["dem"]["views"]) == (2, 2, "both")
    assert json.loads((out / "runs" / "plain_336" / "stage2" / "final" / "config.json").read_text())["dem"] is None
    md = (out / "results.md").read_text()
    assert "| plain_336 | one 84 px view (LLaVA-1.5) |" in md and "| answer prior |" in md and "| chance |" in md
    assert (out / "study.png").stat().st_size > 10_000
    assert "[2/2] dcm_dem_672" in log and "| dcm_dem_672 |" in log

    again = _run(out)                       # same recipe: both rows reused, nothing retrained
    assert again.count("reusing") == 2 and ": stage 1, 2 steps" not in again and ": stage 1, 2 steps" in log


def test_study_rows_and_configs():
    assert list(study_cfg.ROWS) == ["plain_336", "local_only", "strided_only", "dcm_dem_672", "dcm_dem_1008"]
    c1 = study_cfg.get_config("row=local_only,stage=1")
    assert (c1.model.grid, c1.model.views, c1.stage) == (3, "local", "stage1")
    assert c1.also_train == ("vision_tower", "language_model") and c1.data.buckets == (c1.data.max_len,)
    c2 = study_cfg.get_config("row=plain_336,stage=2,steps=7")
    assert (c2.model.grid, c2.total_steps, c2.also_train) == (0, 7, ("vision_tower",))
    with pytest.raises(ValueError, match="row="):
        study_cfg.get_config("row=nope")


def test_verdict_says_when_no_row_reads_the_images():
    from infllava_jax.study import TYPES, verdict
    prior = {"digit": 0.17, "count": 0.2, "corner": 0.25, "side": 0.5}
    at_prior = {t: prior[t] for t in TYPES}

    def row(acc, **by_type):
        m = {f"accuracy_{t}": by_type.get(t, at_prior[t]) for t in TYPES}
        return {"metrics": {**m, "accuracy": acc}}

    base = sum(prior.values()) / 4
    assert verdict({"a": row(base), "b": row(base + 0.02)}, prior).startswith("No row")
    probe = {"box colour": 0.9, "circle colour": 0.3, "side": 0.5, "digit": 0.2, "count": 0.2, "corner": 0.25}
    v = verdict({"a": {**row(base), "caption_probe": probe}}, prior)
    assert "they name box colour (best 90%, chance 20%)." in v and "circle" not in v
    v = verdict({"plain_336": row(base + 0.1, side=0.9), "dcm_dem_1008": row(base + 0.2, digit=0.8)}, prior)
    assert "dcm_dem_1008 +20.0" in v and "best read by dcm_dem_1008" in v


def test_caption_probe_fact_spans_decode_to_the_facts():
    from infllava_jax.data import synthetic
    from infllava_jax.data.tokenizer import load_tokenizer
    from infllava_jax.evaluation.caption_probe import _fact_values, _spans
    tok = load_tokenizer(None)
    for i in range(12):
        s = synthetic.scene(0, "test", i, 12)
        text, values = synthetic.caption(s), _fact_values(s)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        for fact, span in _spans(text, values, tok).items():
            assert span == list(range(span[0], span[-1] + 1))
            assert tok.decode([ids[k] for k in span]) == " " + values[fact], (fact, text)
