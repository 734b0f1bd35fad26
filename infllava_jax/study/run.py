"""The miniature INF-LLaVA study, the README's main job: why resolution and two perspectives matter.

    python -m infllava_jax.study [OUT] [--rows a,b] [--seeds N] [--scale F] [--probe] [--fresh] ...

On a fake 8-device mesh (XLA_FLAGS=--xla_force_host_platform_device_count=8, set here if unset):
  1. data: the synthetic high-resolution VQA set (study/scenes.py) in OUT/data;
  2. stage 0, once for every row: the tiny vision tower is pretrained on the train split
     (study/stage0.py), the tiny model's "CLIP", in OUT/vision;
  3. for every row of study/recipe.py (plain 84 px, local crops only, strided crops only, DCM + DEM
     at 672 and 1008) and seed: stage 1 on the captions and stage 2 on the VQA records with that
     tower frozen (the released recipe, docs/model.md section 7; the tiny LLM trains from stage 1 on), then
     the `hires_synth` eval task on test.jsonl at the row's resolution (exact match per type);
  4. OUT/results.md, OUT/results.json and OUT/study.png: accuracy per question type and row (mean
     and range over seeds) next to the answer prior, and the study's targets, checked.

A row whose OUT/runs/<row>[-seed<k>]/result.json matches the recipe is reused, as is a stage 0
with the same recipe; `--fresh` starts over.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

TYPES = ("digit", "count", "corner", "side")
DETAIL = ("digit", "count")
log = logging.getLogger("infllava_jax")


def _recipe(row: str, a, seed: int) -> dict:
    from infllava_jax.study import recipe as study_cfg
    grid, views, variant, res = study_cfg.ROWS[row]
    return {"row": row, "grid": grid, "views": views, "variant": variant, "res": res, "seed": seed, "n_train": a.n_train,
            "n_test": a.n_test, "stage0": _stage0_recipe(a), "batch": study_cfg.BATCH,
            "system_prompt": study_cfg.SYSTEM_PROMPT, **{f"stage{k}_bucket": v for k, v in study_cfg.BUCKET.items()},
            **{f"stage{k}_loss_positions": v for k, v in study_cfg.LOSS_POSITIONS.items()},
            **{f"stage{k}_lr": v for k, v in study_cfg.LR.items()}, "lr_mult": study_cfg.LR_MULT,
            **{f"stage{k}_steps": getattr(a, f"stage{k}_steps") or round(a.scale * study_cfg.STEPS[k])
               for k in (1, 2)}}


def _stage0_recipe(a) -> dict:
    from infllava_jax.study import recipe as study_cfg
    from infllava_jax.study import scenes
    return {"steps": a.stage0_steps or round(a.scale * study_cfg.STAGE0["steps"]), "n_train": a.n_train,
            "data_version": scenes.VERSION}       # a new data version: stage 0 and the rows run anew


def stage0(a, out: Path) -> dict:
    """The tiny tower, trained once (OUT/vision) or reused when its recipe is the same."""
    from infllava_jax.study import recipe as study_cfg
    from infllava_jax.study import stage0
    vdir, recipe = out / "vision", _stage0_recipe(a)
    done = vdir / "result.json"
    if done.is_file() and json.loads(done.read_text()).get("recipe") == recipe:
        log.info("stage 0: reusing %s", vdir)
        return json.loads(done.read_text())
    shutil.rmtree(vdir, ignore_errors=True)
    kw = {k: v for k, v in study_cfg.STAGE0.items() if k != "steps"}
    result = {**stage0.run(out / "data", vdir, steps=recipe["steps"], **kw), "recipe": recipe}
    done.write_text(json.dumps(result, indent=1))
    return result


def run_row(row: str, seed: int, a, out: Path) -> dict:
    """Stage 1 -> stage 2 -> eval of one row and seed; returns its result (also in result.json)."""
    from infllava_jax.training.loop import train
    from infllava_jax.study import recipe as study_cfg

    recipe, rdir = _recipe(row, a, seed), out / "runs" / (row if seed == 0 else f"{row}-seed{seed}")
    done = rdir / "result.json"
    if done.is_file():
        old = json.loads(done.read_text())
        if old.get("recipe") == recipe and (old.get("caption_probe") or not a.probe):
            log.info("%s (seed %d): reusing %s", row, seed, done)
            return old
    t0, data, stages, probe = time.perf_counter(), out / "data", {}, None
    for stage, records in ((1, "train_caption.json"), (2, "train_vqa.json")):
        cfg = study_cfg.get_config(f"row={row},stage={stage},steps={recipe[f'stage{stage}_steps']},seed={seed}")
        cfg.data.path, cfg.data.image_folder = str(data / records), str(data)
        if stage == 1:
            cfg.init_vision_tower = str(out / "vision" / "final")
        else:
            cfg.init_checkpoint = str(rdir / "stage1" / "final")
        log.info("%s (seed %d): stage %d, %d steps of %d on %s (trains %s)", row, seed, stage, cfg.total_steps,
                 cfg.global_batch, records, "+".join((cfg.stage, *cfg.also_train)))
        stages[stage] = train(cfg, rdir / f"stage{stage}")
        if stage == 1 and a.probe:
            probe = _probe(row, rdir / "stage1" / "final", data, a.n_test)
    metrics, eval_s = _evaluate(recipe["res"], rdir, data)
    result = {"recipe": recipe, "metrics": metrics, "caption_probe": probe, "train": stages,
              "eval_seconds": eval_s, "seconds": round(time.perf_counter() - t0, 1)}
    done.write_text(json.dumps(result, indent=1))
    return result


def _probe(row: str, ckpt: Path, data: Path, n: int) -> dict:
    """What the captions taught: the facts the model names (study/caption_probe.py)."""
    from infllava_jax import InfLlava
    from infllava_jax.data.tokenizer import load_tokenizer
    from infllava_jax.study import caption_probe
    m = InfLlava.from_pretrained(ckpt)
    probe = caption_probe.probe(m.config, m.params, load_tokenizer(None), data, n)
    log.info("%s: stage-1 caption probe (%% of test images): %s", row,
             ", ".join(f"{f} {100 * v:.1f}" for f, v in probe.items()))
    return probe


def _evaluate(res: int, rdir: Path, data: Path) -> tuple[dict, float]:
    from infllava_jax.evaluation import config as eval_cfg
    from infllava_jax.evaluation import sweep
    ecfg = eval_cfg.get_config(f"tasks=hires_synth,res={res},pixels=native,double_bos=false,"
                               "batch_size=32,progress=false")
    summary = sweep.run(ecfg, ckpt=str(rdir / "stage2" / "final"), data=str(data), out=str(rdir / "eval"),
                        log=log.info)
    return summary["results"]["hires_synth"][str(res)]["metrics"], summary["seconds"]


# ----------------------------------------------------------------------------- the table

def aggregate(runs: dict) -> dict:
    """{row: [result per seed]} -> {row: {"metrics": mean over seeds, "range": {key: [min, max]},
    "seeds": [metrics per seed], "seconds": total}}."""
    out = {}
    for row, rs in runs.items():
        keys = ["accuracy"] + [f"accuracy_{t}" for t in TYPES]
        vals = {k: [r["metrics"][k] for r in rs] for k in keys}
        out[row] = {"metrics": {k: sum(v) / len(v) for k, v in vals.items()},
                    "range": {k: [min(v), max(v)] for k, v in vals.items()},
                    "seeds": [r["metrics"] for r in rs], "seconds": round(sum(r["seconds"] for r in rs), 1),
                    "caption_probe": rs[0].get("caption_probe")}
    return out


def describe(row: str) -> str:
    from infllava_jax.study import recipe as study_cfg
    grid, views, variant, _ = study_cfg.ROWS[row]
    px = 84 * max(grid, 1)
    if not grid:
        return f"one {px} px view (LLaVA-1.5)"
    what = {"both": f"DCM + DEM ({variant})", "local": "local crops only", "strided": "strided crops only"}[views]
    return f"{what}, {grid}x{grid} grid, {px} px"


def _cell(r: dict, key: str) -> str:
    lo, hi = r["range"][key]
    mean = f"{100 * r['metrics'][key]:.1f}"
    return mean if len(r["seeds"]) == 1 else f"{mean} ({100 * lo:.0f}-{100 * hi:.0f})"


def table(results: dict, prior: dict) -> str:
    keys = ["accuracy"] + [f"accuracy_{t}" for t in TYPES]
    lines = ["| row | what the model sees | overall | " + " | ".join(TYPES) + " | train + eval s |",
             "|" + "---|" * (len(TYPES) + 4)]
    for row, r in results.items():
        lines.append(f"| {row} | {describe(row)} | " + " | ".join(_cell(r, k) for k in keys)
                     + f" | {r['seconds']:.0f} |")
    overall = sum(prior.values()) / len(prior)
    lines.append("| answer prior | the most frequent answer of each type | "
                 f"{100 * overall:.1f} | " + " | ".join(f"{100 * prior[t]:.1f}" for t in TYPES) + " | |")
    return "\n".join(lines)


def probe_table(results: dict) -> str:
    from infllava_jax.study.caption_probe import CHANCE, FACTS
    lines = ["| row | " + " | ".join(FACTS) + " |", "|" + "---|" * (len(FACTS) + 1)]
    for row, r in results.items():
        lines.append(f"| {row} | " + " | ".join(f"{100 * r['caption_probe'][f]:.1f}" for f in FACTS) + " |")
    lines.append("| chance | " + " | ".join(f"{100 * CHANCE[f]:.1f}" for f in FACTS) + " |")
    return "\n".join(lines)


def targets(results: dict) -> list[dict]:
    """The study's goals (issue 17), each measured: name, value, goal, met. Goals whose rows did
    not run are left out."""
    acc = {row: r["metrics"] for row, r in results.items()}
    detail = {row: sum(m[f"accuracy_{t}"] for t in DETAIL) / len(DETAIL) for row, m in acc.items()}
    out = []
    if acc:
        worst = min(acc, key=lambda row: acc[row]["accuracy_side"])
        out.append({"name": f"side >= 90% on every row (lowest: {worst})",
                    "value": acc[worst]["accuracy_side"], "goal": 0.90, "unit": "%"})
    if {"dcm_dem_1008", "plain_336"} <= set(acc):
        out.append({"name": "dcm_dem_1008 - plain_336 on the mean of digit and count",
                    "value": detail["dcm_dem_1008"] - detail["plain_336"], "goal": 0.25, "unit": "points"})
    if "dcm_dem_1008" in acc:
        out.append({"name": "dcm_dem_1008 overall", "value": acc["dcm_dem_1008"]["accuracy"], "goal": 0.60,
                    "unit": "%"})
    single = [row for row in ("local_only", "strided_only") if row in acc]
    if "dcm_dem_1008" in acc and single:
        best = max(single, key=lambda row: acc[row]["accuracy"])
        out.append({"name": f"dcm_dem_1008 - the better single view ({best}), overall",
                    "value": acc["dcm_dem_1008"]["accuracy"] - acc[best]["accuracy"], "goal": -0.03,
                    "unit": "points"})
    return [{**t, "met": t["value"] >= t["goal"] - 1e-9} for t in out]


def verdict(results: dict, prior: dict, margin: float = 0.03) -> str:
    """One honest paragraph, computed: does any row read the image, and which targets are met."""
    base = sum(prior.values()) / len(prior)
    gain = {row: r["metrics"]["accuracy"] - base for row, r in results.items()}
    if max(gain.values()) < margin:
        return (f"No row is {100 * margin:.0f} points above the answer prior: at this budget the models do not "
                "answer the questions from the images yet, so the table says nothing about resolution.")
    detail = {row: sum(r["metrics"][f"accuracy_{t}"] for t in DETAIL) / len(DETAIL) for row, r in results.items()}
    best = max(detail, key=detail.get)
    goals = targets(results)
    missed = [g for g in goals if not g["met"]]
    text = ("Above the prior: " + ", ".join(f"{row} {100 * g:+.1f}" for row, g in gain.items())
            + f" points. Digit and count best read by {best} ({100 * detail[best]:.1f}%). "
            + f"Targets met: {len(goals) - len(missed)} of {len(goals)}")
    if missed:
        text += "; missed: " + "; ".join(f"{g['name']}: {_fmt(g, 'value')} against {_fmt(g, 'goal')}"
                                          for g in missed)
    return text + "."


def _fmt(g: dict, key: str) -> str:
    return f"{100 * g[key]:+.1f} points" if g["unit"] == "points" else f"{100 * g[key]:.1f}%"


def targets_table(results: dict) -> str:
    lines = ["| target | measured | goal | met |", "|---|---|---|---|"]
    for g in targets(results):
        lines.append(f"| {g['name']} | {_fmt(g, 'value')} | {_fmt(g, 'goal')} | {'yes' if g['met'] else 'no'} |")
    return "\n".join(lines)


def per_seed(results: dict) -> list[list[dict]]:
    """The targets checked on each seed's own run (seed k of every row), not only on the mean."""
    n = min(len(r["seeds"]) for r in results.values())
    return [targets({row: {"metrics": r["seeds"][k]} for row, r in results.items()}) for k in range(n)]


def per_seed_table(results: dict) -> str:
    seeds = per_seed(results)
    lines = ["| target | " + " | ".join(f"seed {k}" for k in range(len(seeds))) + " | goal |",
             "|" + "---|" * (len(seeds) + 2)]
    for i, g in enumerate(targets(results)):
        cells = [f"{_fmt(s[i], 'value')} {'yes' if s[i]['met'] else '**no**'}" for s in seeds]
        lines.append(f"| {g['name'].split(' (')[0]} | " + " | ".join(cells) + f" | {_fmt(g, 'goal')} |")
    return "\n".join(lines)


def seed_verdict(results: dict) -> str:
    """Which seeds meet every target, and what each missing seed missed."""
    out = []
    for k, goals in enumerate(per_seed(results)):
        missed = [g for g in goals if not g["met"]]
        out.append(f"seed {k}: {len(goals) - len(missed)} of {len(goals)}"
                   + ("" if not missed else " (missed: " + "; ".join(
                       f"{g['name']}: {_fmt(g, 'value')} against {_fmt(g, 'goal')}" for g in missed) + ")"))
    return "Targets per seed: " + ", ".join(out) + "."


def figure(results: dict, prior: dict):
    """Accuracy per question type and row against the answer prior: bars are means over seeds,
    with min-max whiskers only when there is more than one seed; the legend sits below the axes."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = list(results)
    keys = ["accuracy"] + [f"accuracy_{t}" for t in TYPES]
    x, w = np.arange(len(keys)), 0.8 / max(len(rows), 1)
    fig, ax = plt.subplots(figsize=(9, 4.6))
    for i, row in enumerate(rows):
        r = results[row]
        mean = np.array([100 * r["metrics"][k] for k in keys])
        lo, hi = (np.array([100 * r["range"][k][j] for k in keys]) for j in (0, 1))
        err = np.clip([mean - lo, hi - mean], 0, None) if len(r["seeds"]) > 1 else None   # rounding
        ax.bar(x + i * w, mean, w, yerr=err, capsize=2, label=row)
    base = [100 * sum(prior.values()) / len(prior)] + [100 * prior[t] for t in TYPES]
    for j, b in enumerate(base):
        ax.hlines(b, x[j] - 0.05, x[j] + 0.85, colors="k", linestyles="dashed", label="answer prior" if j == 0 else None)
    ax.set_xticks(x + 0.4 - w / 2, ["overall", *TYPES])
    ax.set_ylabel("exact match (%)")
    ax.set_ylim(0, 105)
    seeds = len(next(iter(results.values()))["seeds"]) if results else 1
    ax.set_title("Miniature INF-LLaVA study: synthetic high-resolution VQA (test split)"
                 + (f", mean of {seeds} seeds (min-max)" if seeds > 1 else ""), fontsize=10)
    ax.legend(fontsize=8, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.1), frameon=False)
    fig.tight_layout()
    return fig


def plot(results: dict, prior: dict, path: Path) -> None:
    import matplotlib.pyplot as plt
    fig = figure(results, prior)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- main

def parse_args(argv=None):
    from infllava_jax.study import recipe as study_cfg
    ap = argparse.ArgumentParser(prog="python -m infllava_jax.study", description=__doc__.split("\n\n")[0])
    ap.add_argument("out", nargs="?", default="study_out")
    ap.add_argument("--rows", default=",".join(study_cfg.ROWS), help="comma-separated rows of study/recipe.py")
    ap.add_argument("--seeds", type=int, default=1, help="stages 1-2 of every row with seeds 0..N-1 (stage 0 shared)")
    ap.add_argument("--n-train", type=int, default=4000)
    ap.add_argument("--n-test", type=int, default=400)
    ap.add_argument("--scale", type=float, default=1.0, help="multiplies study/recipe.py's steps (longer runs)")
    ap.add_argument("--stage0-steps", type=int, default=0, help="0: study/recipe.py's")
    ap.add_argument("--stage1-steps", type=int, default=0, help="0: study/recipe.py's")
    ap.add_argument("--stage2-steps", type=int, default=0, help="0: study/recipe.py's")
    ap.add_argument("--probe", action="store_true", help="after stage 1, which facts each row names in a caption")
    ap.add_argument("--fresh", action="store_true", help="delete OUT first")
    a = ap.parse_args(argv)
    a.rows = [r for r in a.rows.split(",") if r]
    unknown = sorted(set(a.rows) - set(study_cfg.ROWS))
    if unknown:
        ap.error(f"unknown rows {unknown}; expected some of {list(study_cfg.ROWS)}")
    return a


def _setup_logging() -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    log.addHandler(handler)
    log.propagate = False
    log.setLevel(logging.INFO)


def main(argv=None) -> int:
    a = parse_args(argv)
    from infllava_jax.study import recipe as study_cfg
    study_cfg.use_study_devices()
    _setup_logging()
    import jax
    from infllava_jax.study import scenes

    out = Path(a.out).absolute()
    if a.fresh and out.exists():
        shutil.rmtree(out)
    t0 = time.perf_counter()
    log.info("study in %s: %d devices (%s), rows %s, seeds %d", out, jax.device_count(),
             jax.devices()[0].platform, a.rows, a.seeds)
    meta = scenes.generate(out / "data", n_train=a.n_train, n_val=0, n_test=a.n_test)
    log.info("data: %s (%d train images, %d test questions)", "reused" if meta["reused"] else
             f"written in {meta['seconds']} s", a.n_train, a.n_test)
    prior = meta["majority_baseline"]["test"]
    vision = stage0(a, out)
    log.info("stage 0: held-out accuracy %s", json.dumps(vision["holdout_accuracy"]))

    runs, jobs = {row: [] for row in a.rows}, [(s, row) for row in _job_order(a.rows) for s in range(a.seeds)]
    for i, (seed, row) in enumerate(jobs):
        runs[row].append(run_row(row, seed, a, out))
        m, elapsed = runs[row][-1]["metrics"], time.perf_counter() - t0
        log.info("[%d/%d] %s (seed %d): %.1f%% (%s) | elapsed %.0f s, ETA %.0f s", i + 1, len(jobs), row, seed,
                 100 * m["accuracy"], ", ".join(f"{t} {100 * m['accuracy_' + t]:.1f}" for t in TYPES),
                 elapsed, elapsed / (i + 1) * (len(jobs) - i - 1))
    report(out, aggregate(runs), prior, vision, a, time.perf_counter() - t0)
    return 0


def _job_order(rows: list[str]) -> list[str]:
    """The rows in the order that lets them share the feature bank (training/feature_bank.py): the
    seeds of one row in a row, the rows of every view before the one-view rows that slice it."""
    from infllava_jax.study import recipe as study_cfg
    return sorted(rows, key=lambda row: study_cfg.ROWS[row][1] != "both")


def report(out: Path, results: dict, prior: dict, vision: dict, a, total: float) -> None:
    """results.md / results.json / study.png, and the tables on stdout."""
    seeds = f"mean over {a.seeds} seeds (min-max); " if a.seeds > 1 else ""
    md = f"{table(results, prior)}\n\n{targets_table(results)}"
    if all(r.get("caption_probe") for r in results.values()):
        md += ("\n\nAfter stage 1, the facts each model names in the caption of a test image "
               f"(teacher-forced, % of images):\n\n{probe_table(results)}")
    text = verdict(results, prior)
    if a.seeds > 1:
        md += f"\n\nEach seed on its own:\n\n{per_seed_table(results)}"
        text += " " + seed_verdict(results)
    (out / "results.md").write_text(f"# Miniature INF-LLaVA study\n\nExact match (%) on {a.n_test} test "
                                    f"questions ({a.n_test // 4} per type), {seeds}total {total:.0f} s.\n\n"
                                    f"{md}\n\n{text}\n")
    (out / "results.json").write_text(json.dumps({
        "rows": results, "answer_prior": prior, "targets": targets(results), "verdict": text,
        "per_seed": [{"seed": k, "targets": t, "met": sum(g["met"] for g in t)} for k, t in enumerate(per_seed(results))],
        "stage0": {k: vision[k] for k in ("holdout_accuracy", "seconds", "steps")},
        "seeds": a.seeds, "seconds": round(total, 1)}, indent=1))
    plot(results, prior, out / "study.png")
    print(f"\n{md}\n\n{text}\n{out}/results.md, results.json, study.png; total {total / 60:.1f} min")


if __name__ == "__main__":
    raise SystemExit(main())
