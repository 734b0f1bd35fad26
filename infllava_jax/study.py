"""The miniature INF-LLaVA study, the README's main job: why resolution and two perspectives matter.

    python -m infllava_jax.study [OUT] [--rows a,b] [--scale F] [--n-train N] [--stage1-steps N] ...

On a fake 8-device mesh (XLA_FLAGS=--xla_force_host_platform_device_count=8, set here if unset):
  1. data: the synthetic high-resolution VQA set (infllava_jax/data/synthetic.py) in OUT/data;
  2. for every row of configs/study.py (plain 84 px, local crops only, strided crops only,
     DCM + DEM at 672 and 1008): stage 1 on the captions, stage 2 on the VQA records
     (training/loop.py, in this process), then the `hires_synth` eval task on test.jsonl at the
     row's resolution (eval.py's sweep, exact match per question type). After stage 1 a
     caption probe (evaluation/caption_probe.py) measures which facts of the test scenes each
     model names: what the captions taught, before any question is asked;
  3. OUT/results.md, OUT/results.json and OUT/study.png: accuracy per question type and row,
     next to the answer prior (always saying a type's most frequent answer), the probe table,
     and a one-line verdict.

A row whose OUT/runs/<row>/result.json matches the recipe is reused; `--fresh` starts over.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

TYPES = ("digit", "count", "corner", "side")
log = logging.getLogger("infllava_jax")


def _recipe(row: str, a) -> dict:
    from configs import study as study_cfg
    grid, views, res = study_cfg.ROWS[row]
    return {"row": row, "grid": grid, "views": views, "res": res, "n_train": a.n_train, "n_test": a.n_test,
            "stage1_steps": a.stage1_steps or round(a.scale * study_cfg.STEPS[1]),
            "stage2_steps": a.stage2_steps or round(a.scale * study_cfg.STEPS[2])}


def run_row(row: str, a, out: Path, data: Path) -> dict:
    """Stage 1 -> stage 2 -> eval of one row; returns its result (also OUT/runs/<row>/result.json)."""
    from infllava_jax.training.loop import train
    from configs import eval as eval_cfg
    from configs import study as study_cfg
    from infllava_jax import InfLlava
    from infllava_jax.data.tokenizer import load_tokenizer
    from infllava_jax.evaluation import caption_probe, sweep

    recipe, rdir = _recipe(row, a), out / "runs" / row
    done = rdir / "result.json"
    if done.is_file():
        old = json.loads(done.read_text())
        if old.get("recipe") == recipe and "caption_probe" in old:
            log.info("%s: reusing %s", row, done)
            return old
    t0 = time.perf_counter()
    stages = {}
    for stage, records in ((1, "train_caption.json"), (2, "train_vqa.json")):
        cfg = study_cfg.get_config(f"row={row},stage={stage},steps={recipe[f'stage{stage}_steps']}")
        cfg.data.path, cfg.data.image_folder = str(data / records), str(data)
        if stage == 2:
            cfg.init_checkpoint = str(rdir / "stage1" / "final")
        log.info("%s: stage %d, %d steps of %d on %s (trains %s)", row, stage, cfg.total_steps,
                 cfg.global_batch, records, "+".join([cfg.stage, *cfg.also_train]))
        stages[stage] = train(cfg, rdir / f"stage{stage}")
        if stage == 1:   # what the captions taught: the facts the model names (caption_probe.py)
            m = InfLlava.from_pretrained(rdir / "stage1" / "final")
            probe = caption_probe.probe(m.config, m.params, load_tokenizer(None), data, a.n_test)
            log.info("%s: stage-1 caption probe (%% of test images): %s", row,
                     ", ".join(f"{f} {100 * v:.1f}" for f, v in probe.items()))
    ecfg = eval_cfg.get_config(f"tasks=hires_synth,res={recipe['res']},pixels=native,double_bos=false,"
                               "batch_size=32,progress=false")
    summary = sweep.run(ecfg, ckpt=str(rdir / "stage2" / "final"), data=str(data), out=str(rdir / "eval"),
                        log=log.info)
    metrics = summary["results"]["hires_synth"][str(recipe["res"])]["metrics"]
    result = {"recipe": recipe, "metrics": metrics, "caption_probe": probe, "train": stages,
              "eval_seconds": summary["seconds"],
              "seconds": round(time.perf_counter() - t0, 1)}
    done.write_text(json.dumps(result, indent=1))
    return result


def describe(row: str) -> str:
    from configs import study as study_cfg
    grid, views, res = study_cfg.ROWS[row]
    px = 84 * max(grid, 1)
    if not grid:
        return f"one {px} px view (LLaVA-1.5)"
    what = {"both": "DCM + DEM", "local": "local crops only", "strided": "strided crops only"}[views]
    return f"{what}, {grid}x{grid} grid, {px} px"


def table(results: dict, prior: dict) -> str:
    head = "| row | what the model sees | overall | " + " | ".join(TYPES) + " | train + eval s |"
    lines = [head, "|" + "---|" * (len(TYPES) + 4)]
    for row, r in results.items():
        m = r["metrics"]
        cells = [f"{100 * m['accuracy_' + t]:.1f}" for t in TYPES]
        lines.append(f"| {row} | {describe(row)} | {100 * m['accuracy']:.1f} | " + " | ".join(cells)
                     + f" | {r['seconds']:.0f} |")
    overall = sum(prior.values()) / len(prior)
    lines.append("| answer prior | the most frequent answer of each type | "
                 f"{100 * overall:.1f} | " + " | ".join(f"{100 * prior[t]:.1f}" for t in TYPES) + " | |")
    return "\n".join(lines)


def probe_table(results: dict) -> str:
    from infllava_jax.evaluation.caption_probe import CHANCE, FACTS
    lines = ["| row | " + " | ".join(FACTS) + " |", "|" + "---|" * (len(FACTS) + 1)]
    for row, r in results.items():
        lines.append(f"| {row} | " + " | ".join(f"{100 * r['caption_probe'][f]:.1f}" for f in FACTS) + " |")
    lines.append("| chance | " + " | ".join(f"{100 * CHANCE[f]:.1f}" for f in FACTS) + " |")
    return "\n".join(lines)


def verdict(results: dict, prior: dict, margin: float = 0.03) -> str:
    """One honest sentence: does any row read the image, and do the detail types gain from it?"""
    base = sum(prior.values()) / len(prior)
    gain = {row: r["metrics"]["accuracy"] - base for row, r in results.items()}
    if max(gain.values()) < margin:
        from infllava_jax.evaluation.caption_probe import CHANCE
        named = {f: max(r["caption_probe"][f] for r in results.values()) for f in CHANCE
                 if all("caption_probe" in r for r in results.values())}
        learned = [f"{f} (best {100 * v:.0f}%, chance {100 * CHANCE[f]:.0f}%)" for f, v in named.items()
                   if v > CHANCE[f] + 0.1]
        return (f"No row is {100 * margin:.0f} points above the answer prior: at this budget the models do not "
                "answer the questions from the images yet, so the table says nothing about resolution"
                + (f"; after stage 1 they name {', '.join(learned)}." if learned else
                   "; after stage 1 they name no fact above chance either."))
    detail = {row: sum(r["metrics"][f"accuracy_{t}"] for t in TYPES[:3]) / 3 for row, r in results.items()}
    best = max(detail, key=detail.get)
    return ("Above the prior: " + ", ".join(f"{row} {100 * g:+.1f}" for row, g in gain.items())
            + f" points. Detail types (digit, count, corner) best read by {best} ({100 * detail[best]:.1f}%).")


def plot(results: dict, prior: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = list(results)
    x, w = np.arange(len(TYPES) + 1), 0.8 / max(len(rows), 1)
    fig, ax = plt.subplots(figsize=(9, 4))
    for i, row in enumerate(rows):
        m = results[row]["metrics"]
        ax.bar(x + i * w, [100 * m["accuracy"]] + [100 * m["accuracy_" + t] for t in TYPES], w, label=row)
    base = [100 * sum(prior.values()) / len(prior)] + [100 * prior[t] for t in TYPES]
    for j, b in enumerate(base):
        ax.hlines(b, x[j] - 0.05, x[j] + 0.85, colors="k", linestyles="dashed", label="answer prior" if j == 0 else None)
    ax.set_xticks(x + 0.4 - w / 2, ["overall", *TYPES])
    ax.set_ylabel("exact match (%)")
    ax.set_title("Miniature INF-LLaVA study: synthetic high-resolution VQA (test split)")
    ax.legend(fontsize=8, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    from configs import study as study_cfg
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", nargs="?", default="study_out")
    ap.add_argument("--rows", default=",".join(study_cfg.ROWS), help="comma-separated rows of configs/study.py")
    ap.add_argument("--n-train", type=int, default=4000)
    ap.add_argument("--n-test", type=int, default=400)
    ap.add_argument("--scale", type=float, default=1.0, help="multiplies configs/study.py's steps (longer runs)")
    ap.add_argument("--stage1-steps", type=int, default=0, help="0: configs/study.py's")
    ap.add_argument("--stage2-steps", type=int, default=0, help="0: configs/study.py's")
    ap.add_argument("--fresh", action="store_true", help="delete OUT first")
    a = ap.parse_args(argv)
    rows = [r for r in a.rows.split(",") if r]
    unknown = sorted(set(rows) - set(study_cfg.ROWS))
    if unknown:
        ap.error(f"unknown rows {unknown}; expected some of {list(study_cfg.ROWS)}")

    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")   # before jax starts
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    log.addHandler(handler)
    log.propagate = False
    log.setLevel(logging.INFO)
    import jax
    from infllava_jax.data import synthetic

    out = Path(a.out).absolute()
    if a.fresh and out.exists():
        shutil.rmtree(out)
    t0 = time.perf_counter()
    log.info("study in %s: %d devices (%s), rows %s", out, jax.device_count(), jax.devices()[0].platform, rows)
    meta = synthetic.generate(out / "data", n_train=a.n_train, n_val=0, n_test=a.n_test)
    log.info("data: %s (%d train images, %d test questions)", "reused" if meta["reused"] else
             f"written in {meta['seconds']} s", a.n_train, a.n_test)
    prior = meta["majority_baseline"]["test"]

    results = {}
    for i, row in enumerate(rows):
        results[row] = run_row(row, a, out, out / "data")
        m = results[row]["metrics"]
        elapsed = time.perf_counter() - t0
        log.info("[%d/%d] %s: %.1f%% (%s) | elapsed %.0f s, ETA %.0f s", i + 1, len(rows), row,
                 100 * m["accuracy"], ", ".join(f"{t} {100 * m['accuracy_' + t]:.1f}" for t in TYPES),
                 elapsed, elapsed / (i + 1) * (len(rows) - i - 1))
    md = (f"{table(results, prior)}\n\nAfter stage 1, the facts each model names in the caption of a test image "
          f"(teacher-forced, % of images):\n\n{probe_table(results)}")
    total = time.perf_counter() - t0
    (out / "results.md").write_text(f"# Miniature INF-LLaVA study\n\nExact match (%) on {a.n_test} test "
                                    f"questions ({a.n_test // 4} per type); total {total:.0f} s.\n\n{md}\n\n"
                                    f"{verdict(results, prior)}\n")
    (out / "results.json").write_text(json.dumps({"rows": results, "answer_prior": prior,
                                                  "seconds": round(total, 1)}, indent=1))
    plot(results, prior, out / "study.png")
    print(f"\n{md}\n\n{verdict(results, prior)}\n{out}/results.md, results.json, study.png; "
          f"total {total / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
