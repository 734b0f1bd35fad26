"""The miniature study (README main job) end to end at toy scale: data -> stage 0 -> stage 1 ->
stage 2 -> eval for two rows and two seeds on the fake 8-device mesh, the table / json / plot, the
targets, and reuse on a re-run."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from infllava_jax.study import recipe as study_cfg
from infllava_jax.study.caption_probe import CHANCE

ROOT = Path(__file__).resolve().parents[1]


def _run(out, *extra):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "infllava_jax.study", str(out), "--rows", "plain_336,dcm_dem_672",
           "--n-train", "16", "--n-test", "8", "--stage0-steps", "2", "--stage1-steps", "2", "--stage2-steps", "2",
           "--seeds", "2", "--probe", *extra]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout + p.stderr


@pytest.mark.slow   # the study's pipeline end to end, twice
def test_study_end_to_end_and_reuse(tmp_path):
    out = tmp_path / "study"
    log = _run(out)
    res = json.loads((out / "results.json").read_text())
    assert list(res["rows"]) == ["plain_336", "dcm_dem_672"] and res["seeds"] == 2
    for row, r in res["rows"].items():
        assert len(r["seeds"]) == 2 and all(m["n"] == 8 and m["missing"] == 0 for m in r["seeds"])
        for t in ("digit", "count", "corner", "side"):
            k = f"accuracy_{t}"
            vals = [m[k] for m in r["seeds"]]
            assert r["metrics"][k] == sum(vals) / 2 and r["range"][k] == [min(vals), max(vals)]
        assert set(r["caption_probe"]) == set(CHANCE) and all(0 <= v <= 1 for v in r["caption_probe"].values())
        for rdir in (out / "runs" / row, out / "runs" / f"{row}-seed1"):
            done = json.loads((rdir / "result.json").read_text())
            assert done["train"]["1"]["steps"] == 2 and done["train"]["2"]["steps"] == 2
            assert (rdir / "stage2" / "final" / "config.json").is_file()
    seeds = [json.loads((out / "runs" / r / "result.json").read_text())["recipe"]["seed"]
             for r in ("dcm_dem_672", "dcm_dem_672-seed1")]
    assert seeds == [0, 1]
    cfg = json.loads((out / "runs" / "dcm_dem_672" / "stage2" / "final" / "config.json").read_text())
    assert (cfg["dem"]["nH"], cfg["dem"]["nW"], cfg["dem"]["views"]) == (2, 2, "both")
    assert json.loads((out / "runs" / "plain_336" / "stage2" / "final" / "config.json").read_text())["dem"] is None
    usage = json.loads((out / "runs" / "plain_336" / "stage2" / "final" / "usage.json").read_text())
    assert usage["system_prompt"] is study_cfg.SYSTEM_PROMPT     # the eval prompts as stage 2 trained
    # stage 0: the tower every row starts from, trained once, in our checkpoint format
    assert (out / "vision" / "final" / "config.json").is_file() and (out / "vision" / "metrics.jsonl").is_file()
    assert set(res["stage0"]["holdout_accuracy"]) >= {"local252/digit", "whole84/x"}
    md = (out / "results.md").read_text()
    assert "| plain_336 | one 84 px view (LLaVA-1.5) |" in md and "| answer prior |" in md and "| chance |" in md
    assert "| side >= 90% on every row" in md and res["verdict"] in md
    assert (out / "study.png").stat().st_size > 10_000
    assert "[4/4] dcm_dem_672 (seed 1)" in log and "| dcm_dem_672 |" in log

    again = _run(out)                       # same recipe: stage 0 and every row reused, nothing retrained
    assert again.count("reusing") == 5 and ": stage 1, 2 steps" not in again and ": stage 1, 2 steps" in log


@pytest.mark.slow   # trains two stages
def test_stage0_tower_is_frozen_in_stages_1_and_2(tmp_path):
    """The released recipe (docs/model.md §7): the rows' vision tower is stage 0's, unchanged by stages 1-2."""
    import numpy as np
    from infllava_jax import InfLlava
    out = tmp_path / "study"
    _run(out, "--seeds", "1")
    tower = InfLlava.from_pretrained(out / "vision" / "final").params["vision_tower"]
    for row in ("plain_336", "dcm_dem_672"):
        for stage in (1, 2):
            got = InfLlava.from_pretrained(out / "runs" / row / f"stage{stage}" / "final").params["vision_tower"]
            for a, b in zip(jax_leaves(tower), jax_leaves(got)):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # stage 0 alone (docs/study.md) trains the same tower: the study's recipe on the study's 8 devices
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    p = subprocess.run([sys.executable, "-m", "infllava_jax.study.stage0", str(out / "data"), str(tmp_path / "alone"),
                        "--steps", "2"], cwd=ROOT, env={**env, "JAX_PLATFORMS": "cpu"},
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads((tmp_path / "alone" / "result.json").read_text())["devices"] == 8
    alone = InfLlava.from_pretrained(tmp_path / "alone" / "final").params["vision_tower"]
    for a, b in zip(jax_leaves(tower), jax_leaves(alone)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def jax_leaves(tree):
    import jax
    return jax.tree.leaves(tree)


def test_study_rows_and_configs():
    assert list(study_cfg.ROWS) == ["plain_336", "local_only", "strided_only", "dcm_dem_672", "dcm_dem_1008"]
    c1 = study_cfg.get_config("row=local_only,stage=1")
    assert (c1.model.grid, c1.model.views, c1.stage) == (3, "local", "stage1")
    assert c1.also_train == ("language_model",) and c1.data.buckets == (c1.data.max_len,)
    c2 = study_cfg.get_config("row=plain_336,stage=2,steps=7,seed=3")
    assert (c2.model.grid, c2.total_steps, c2.also_train, c2.seed) == (0, 7, (), 3)
    with pytest.raises(ValueError, match="row="):
        study_cfg.get_config("row=nope")
    # one recipe for every row: the DEM's learning rate x3 (rows without a DEM have no such part)
    for row in study_cfg.ROWS:
        for stage in (1, 2):
            o = study_cfg.get_config(f"row={row},stage={stage}").optimizer
            assert dict(o.lr_mult) == {"vision_tower": 1.0, "spatial_embed": 3.0, "mm_projector": 1.0,
                                       "language_model": 1.0} and o.lr == study_cfg.LR[stage]


def test_rows_run_in_the_order_that_shares_feature_banks():
    """Every view's rows first (dcm_dem_1008's bank holds local_only's and strided_only's crops)."""
    from infllava_jax.study.run import _job_order
    assert _job_order(list(study_cfg.ROWS)) == ["plain_336", "dcm_dem_672", "dcm_dem_1008", "local_only",
                                                "strided_only"]
    assert _job_order(["strided_only", "dcm_dem_1008"]) == ["dcm_dem_1008", "strided_only"]


def _row(prior, acc, **by_type):
    from infllava_jax.study.run import TYPES
    m = {f"accuracy_{t}": by_type.get(t, prior[t]) for t in TYPES}
    return {"metrics": {**m, "accuracy": acc}}


def test_verdict_and_targets():
    from infllava_jax.study.run import targets, verdict
    prior = {"digit": 0.17, "count": 0.2, "corner": 0.25, "side": 0.5}
    base = sum(prior.values()) / 4
    assert verdict({"a": _row(prior, base), "b": _row(prior, base + 0.02)}, prior).startswith("No row")
    rows = {"plain_336": _row(prior, base + 0.1, side=0.95),
            "local_only": _row(prior, 0.70, side=0.97, digit=0.9),
            "dcm_dem_1008": _row(prior, 0.66, side=0.92, digit=0.8, count=0.5)}
    goals = {g["name"].split(" (")[0]: g for g in targets(rows)}
    assert goals["side >= 90% on every row"]["met"] and goals["dcm_dem_1008 overall"]["met"]
    assert abs(goals["dcm_dem_1008 - plain_336 on the mean of digit and count"]["value"] - (0.65 - 0.185)) < 1e-9
    better = goals["dcm_dem_1008 - the better single view"]
    assert not better["met"] and abs(better["value"] + 0.04) < 1e-9
    v = verdict(rows, prior)
    assert "Targets met: 3 of 4" in v and "dcm_dem_1008 - the better single view (local_only), overall: -4.0" in v
    assert len(targets({"plain_336": rows["plain_336"]})) == 1     # goals of rows that did not run: left out



def _seeded(prior, *per_seed):
    """aggregate() of rows given as {row: _row(...)} per seed."""
    from infllava_jax.study.run import aggregate
    return aggregate({row: [{**s[row], "seconds": 1.0} for s in per_seed] for row in per_seed[0]})


def test_targets_are_checked_on_every_seed():
    """A seed that misses a target is named with what it missed, even when the mean meets it."""
    from infllava_jax.study.run import per_seed, seed_verdict, targets
    prior = {"digit": 0.17, "count": 0.2, "corner": 0.25, "side": 0.5}
    good = {"plain_336": _row(prior, 0.40, side=0.95), "local_only": _row(prior, 0.75, side=0.97, digit=0.9),
            "dcm_dem_1008": _row(prior, 0.85, side=0.99, digit=1.0, count=0.5)}
    weak = {**good, "dcm_dem_1008": _row(prior, 0.70, side=0.99, digit=0.5, count=0.5)}
    results = _seeded(prior, good, weak, good)
    assert all(g["met"] for g in targets(results))                       # the mean meets every target
    met = [sum(g["met"] for g in t) for t in per_seed(results)]
    assert met == [4, 3, 4]
    text = seed_verdict(results)
    assert "seed 1: 3 of 4 (missed: dcm_dem_1008 - the better single view (local_only), overall: -5.0 points" in text


def test_the_figure_draws_whiskers_only_for_several_seeds_and_no_legend_over_bars():
    from matplotlib.container import BarContainer
    from infllava_jax.study.run import figure
    prior = {"digit": 0.17, "count": 0.2, "corner": 0.25, "side": 0.5}
    rows = {r: _row(prior, 0.9, side=1.0, digit=1.0, corner=1.0)
            for r in ("plain_336", "local_only", "strided_only", "dcm_dem_672", "dcm_dem_1008")}
    for n in (1, 3):
        fig = figure(_seeded(prior, *[rows] * n), prior)
        ax = fig.axes[0]
        bars = [c for c in ax.containers if isinstance(c, BarContainer)]
        assert len(bars) == 5 and all((b.errorbar is not None) == (n > 1) for b in bars), n
        fig.canvas.draw()
        legend = ax.get_legend().get_window_extent()
        assert not any(legend.overlaps(p.get_window_extent()) for b in bars for p in b.patches), n


def test_caption_probe_fact_spans_decode_to_the_facts():
    from infllava_jax.study import scenes
    from infllava_jax.data.tokenizer import load_tokenizer
    from infllava_jax.study.caption_probe import _fact_values, _spans
    tok = load_tokenizer(None)
    for i in range(12):
        s = scenes.scene_record(scenes.scene(0, "test", i, 12), "")
        text, values = s["caption"], _fact_values(s)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        for fact, span in _spans(text, values, tok).items():
            assert span == list(range(span[0], span[-1] + 1))
            assert tok.decode([ids[k] for k in span]) == " " + values[fact], (fact, text)


@pytest.mark.slow   # writes the default training set (4000 images)
def test_each_stage_bucket_holds_its_longest_record_with_little_padding(tmp_path):
    from infllava_jax.data.examples import JsonRecordProcessor
    from infllava_jax.data.tokenizer import load_tokenizer
    from infllava_jax.study import scenes
    from infllava_jax.training.loop import data_config, model_config
    scenes.generate(tmp_path, n_train=4000, n_val=0, n_test=0)      # the study's default set
    tok = load_tokenizer(None)
    for stage, name in ((1, "train_caption.json"), (2, "train_vqa.json")):
        cfg = study_cfg.get_config(f"row=dcm_dem_1008,stage={stage}")
        cfg.data.path, cfg.data.image_folder = str(tmp_path / name), str(tmp_path)
        mc = model_config(cfg, len(tok))
        spec = data_config(cfg, mc, tmp_path, cfg.micro_batch).spec    # the recipe's template, system turn, ...
        assert spec.system_prompt is study_cfg.SYSTEM_PROMPT          # (the plain template of stage 1 has none)
        proc, longest, supervised = JsonRecordProcessor(tok, spec, str(tmp_path)), 0, 0
        for r in json.loads((tmp_path / name).read_text()):
            _, labels, rels, n = proc.tokens(r)                       # n: the untruncated length
            longest = max(longest, n + len(rels) * (mc.tokens_per_image - 1))
            supervised = max(supervised, int((labels[1:] != -100).sum()))     # shifted: the first predicts nothing
        # nothing truncated, and at most 8 tokens of padding on the longest record
        assert longest <= study_cfg.BUCKET[stage] <= longest + 8, (stage, longest)
        # the gathered loss holds every supervised position (never the whole-sequence fallback)
        assert study_cfg.LOSS_POSITIONS[stage] in (0, *range(supervised, supervised + 8)), (stage, supervised)


@pytest.mark.slow   # compiles two train steps (loss positions) at two lengths
def test_study_step_benchmark_times_each_length_and_loss_positions():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    p = subprocess.run([sys.executable, "-m", "benchmarks.study_step", "--rows", "plain_336", "--lengths", "48,56",
                        "--loss-positions", "0,8", "--steps", "1"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["pairs"] == [[48, 0], [48, 8], [56, 0], [56, 8]] and set(out["rows"]) == {"plain_336"}
    assert all(t > 0 for t in out["rows"]["plain_336"].values())
    assert "| plain_336 | 56 | 8 |" in p.stdout and "| plain_336 | 48 | all |" in p.stdout
