"""Benchmarks for INF-LLaVA checkpoints: jit-compiled sweeps over tasks and resolutions, exact scorers.

  python eval.py --config configs/eval.py:tasks=pope+scienceqa_img,res=336+672+1008 \\
      --ckpt DIR --data DIR --out DIR [--config.batch_size=16 ...]
      every (task, resolution) pair; writes predictions/, results.json, results.md, scores.png
  python eval.py score --task T --data FILE_OR_DIR --predictions FILE [--scorer NAME]
      scores any model's answer file (jsonl {"question_id", "text"}); prints one JSON object
  python eval.py demo [--out DIR]
      a tiny random model on synthetic local data: 2 tasks x 2 resolutions

Prompts, decoding and scorers follow docs/evaluation.md (lmms-eval, July 2024); see
infllava_jax/evaluation/. Data are local files only (lmms-lab parquet or jsonl); nothing is
downloaded.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path


def score_main(argv) -> int:
    from infllava_jax.evaluation import scorers, tasks
    from infllava_jax.evaluation.datasets import read_predictions
    from infllava_jax.errors import InputError

    p = argparse.ArgumentParser(prog="eval.py score", description="Score an answer file.")
    p.add_argument("--task", required=True, help=f"one of {', '.join(tasks.TASKS)}")
    p.add_argument("--data", required=True, help="the task's data: a parquet/jsonl file or a directory")
    p.add_argument("--predictions", required=True, help='jsonl rows {"question_id": ..., "text": ...}')
    p.add_argument("--scorer", default=None, help="a named alternative (default: lmms-eval's rule)")
    p.add_argument("--allow-missing", action="store_true",
                   help="score the rows that have a prediction (default: missing ids are an error)")
    a = p.parse_args(argv)
    try:
        task = tasks.get_task(a.task)
        name, _ = scorers.get_scorer(task.name, a.scorer)
        rows = task.load(a.data)
        preds = read_predictions(a.predictions)
    except (KeyError, InputError) as e:
        print(f"eval.py score: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 2
    missing = [r["_qid"] for r in rows if r["_qid"] not in preds]
    if missing and not a.allow_missing:
        print(f"eval.py score: {a.predictions}: no prediction for {len(missing)} of {len(rows)} question ids "
              f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}); --allow-missing scores the rest",
              file=sys.stderr)
        return 2
    metrics = scorers.score(task.name, [r for r in rows if r["_qid"] in preds], preds, name)
    metrics["missing"] = len(missing)
    if missing:
        print(f"eval.py score: {len(missing)} of {len(rows)} rows have no prediction (not scored: "
              f"the metrics are over the other {len(rows) - len(missing)})", file=sys.stderr)
    print(json.dumps(metrics))
    return 0


def _sweep_flags(argv):
    """--config configs/eval.py[:k=v,...] and --config.<field>=VALUE (infllava_jax/overrides.py, as in
    train.py and plan), --ckpt, --data, --out; every key and value checked before anything runs."""
    from infllava_jax import overrides
    from infllava_jax.evaluation.config import check

    p = overrides.ArgumentParser(prog="eval.py", add_help=False)
    for name, what in (("ckpt", "checkpoint directory (InfLlava.save_pretrained / python -m convert)"),
                       ("data", "data root: <task>.jsonl / <task>.parquet / <task>/ per task"),
                       ("out", "output directory")):
        p.add_argument(f"--{name}", required=True, help=what)
    try:
        spec, sets, rest = overrides.split_argv(list(argv))
        if spec is None:
            raise overrides.ConfigError("--config: missing; e.g. --config configs/eval.py:tasks=pope,res=336+1008")
        a = p.parse_args(rest)
        a.config = overrides.apply(overrides.load_config(spec), sets)
        check(a.config)
    except overrides.ConfigError as e:
        overrides.fail("eval.py", e)
    return a


def sweep_main(argv) -> int:
    fv = _sweep_flags(argv)
    if fv.config.distributed:
        import jax
        jax.distributed.initialize()  # every process runs the same sweep; process 0 writes
    from infllava_jax.errors import InputError, one_line
    from infllava_jax.evaluation import sweep
    try:
        sweep.run(fv.config, ckpt=fv.ckpt, data=fv.data, out=fv.out)
    except (InputError, KeyError) as e:   # bad checkpoint, data, image or task name: one line
        print(f"eval.py: error: {e.args[0] if isinstance(e, KeyError) else one_line(e, 1000)}", file=sys.stderr)
        return 2
    return 0


def demo_main(argv) -> int:
    p = argparse.ArgumentParser(prog="eval.py demo")
    p.add_argument("--out", default=None, help="output directory (default: a temporary one)")
    p.add_argument("--res", default="336+672")
    a = p.parse_args(argv)
    out = Path(a.out or tempfile.mkdtemp(prefix="infllava-eval-demo-"))
    from configs.eval import get_config
    from infllava_jax.evaluation import demo_fixtures, sweep
    ckpt = out / "tiny_ckpt"
    demo_fixtures.make_tiny_checkpoint(ckpt)
    data = demo_fixtures.make_data(out / "data")
    cfg = get_config(f"tasks=pope+scienceqa_img,res={a.res},batch_size=4,max_new_tokens=8,tokenizer=tiny")
    summary = sweep.run(cfg, ckpt=str(ckpt), data=str(data), out=str(out / "results"))
    print((out / "results" / "results.md").read_text())
    print(json.dumps({"out": str(out / "results"), "compiled_programs": summary["compiled_programs"],
                      "examples_per_s": summary["examples_per_s"]}))
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["score"]:
        return score_main(argv[1:])
    if argv[:1] == ["demo"]:
        return demo_main(argv[1:])
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    return sweep_main(argv)


if __name__ == "__main__":
    sys.exit(main())
