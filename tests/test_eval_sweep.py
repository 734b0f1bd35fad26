"""A tiny end-to-end sweep through the real CLI: random tiny checkpoint, synthetic local data
(POPE parquet with embedded images, ScienceQA jsonl with image files), 2 tasks x 2 resolutions."""
import json
from pathlib import Path

import pytest

import eval as eval_cli
from configs.eval import get_config
from infllava_jax.evaluation import demo_fixtures

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    demo_fixtures.make_tiny_checkpoint(tmp / "ckpt", seed=1)
    demo_fixtures.make_data(tmp / "data", n=None)
    out = tmp / "out"
    code = eval_cli.main(["--config", f"{ROOT}/configs/eval.py:tasks=pope+scienceqa_img,res=336+672,max_new_tokens=4",
                          "--config.batch_size=8", "--config.progress=False", "--config.length_buckets=(256,)",
                          "--ckpt", str(tmp / "ckpt"), "--data", str(tmp / "data"), "--out", str(out)])
    assert code == 0
    return tmp, out


def test_output_files(sweep):
    tmp, out = sweep
    for t, n in (("pope", 6), ("scienceqa_img", 5)):
        for r in (336, 672):
            lines = (out / "predictions" / f"{t}_res{r}.jsonl").read_text().splitlines()
            assert len(lines) == n
            row = json.loads(lines[0])
            assert set(row) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
            assert row["metadata"]["grid"] == [r // 336] * 2
    pope0 = json.loads((out / "predictions" / "pope_res336.jsonl").read_text().splitlines()[0])
    assert pope0["question_id"] == "100"
    assert pope0["prompt"] == "Is there a cat in the image?\nAnswer the question using a single word or phrase."
    sqa = json.loads((out / "predictions" / "scienceqa_img_res336.jsonl").read_text().splitlines()[1])
    assert sqa["question_id"] == 1  # row index
    md = (out / "results.md").read_text()
    assert "| pope | accuracy |" in md and "| scienceqa_img | accuracy |" in md and "| 336 | 672 |" in md
    png = (out / "scores.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000


def test_results_and_compile_bound(sweep):
    tmp, out = sweep
    res = json.loads((out / "results.json").read_text())
    # 2 grids x 1 new-token bucket (both capped at 4) x 1 length bucket x 1 image bucket
    assert 1 <= res["compiled_programs"] <= res["program_bound"] == 2 * 1 * 1 * 4
    assert res["compiled_programs"] == 2   # one program per grid, shared by both tasks
    assert res["examples"] == 2 * (6 + 5) and res["examples_per_s"] > 0
    m = res["results"]["pope"]["336"]["metrics"]
    assert set(m) >= {"accuracy", "precision", "recall", "f1", "yes_ratio"} and m["n"] == 6
    assert res["results"]["scienceqa_img"]["672"]["grid"] == [2, 2]
    assert res["config"]["tasks"] == ["pope", "scienceqa_img"] or res["config"]["tasks"] == ("pope", "scienceqa_img")


def test_sweep_predictions_rescore_identically(sweep, capsys):
    """The stored answer file scores the same through `eval.py score`."""
    tmp, out = sweep
    res = json.loads((out / "results.json").read_text())
    code = eval_cli.main(["score", "--task", "pope", "--data", str(tmp / "data" / "pope"),
                          "--predictions", str(out / "predictions" / "pope_res672.jsonl")])
    m = json.loads(capsys.readouterr().out)
    assert code == 0 and m["accuracy"] == res["results"]["pope"]["672"]["metrics"]["accuracy"]


def test_config_parsing():
    c = get_config("tasks=pope+gqa,res=336+1008,batch_size=16,pixels=native,progress=false")
    assert c.tasks == ("pope", "gqa") and c.res == (336, 1008) and c.batch_size == 16
    assert c.pixels == "native" and c.progress is False
    with pytest.raises(ValueError, match="unknown argument 'resolution'.*did you mean res"):
        get_config("resolution=336")


def test_missing_flags_exit(capsys):
    with pytest.raises(SystemExit) as e:
        eval_cli.main(["--config", f"{ROOT}/configs/eval.py:tasks=pope", "--data", "x", "--out", "y"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "--ckpt" in err[0]
