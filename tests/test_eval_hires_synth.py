"""The synthetic hi-res set (data/scenes.py) is an eval.py task: load, prompt, score per type."""
import json

from eval import main as eval_main
from infllava_jax.study import scenes
from infllava_jax.evaluation.tasks import get_task


def test_hires_synth_task_scores_exact_and_per_type(tmp_path, capsys):
    root = tmp_path / "synth"
    scenes.generate(root, n_train=8, n_val=4, n_test=8, image_size=252, seed=0)
    task = get_task("hires_synth")
    rows = task.load(root)
    assert len(rows) == 8 and all(r["_qid"] == r["question_id"] for r in rows)
    assert task.text(rows[0]).endswith("Answer the question using a single word or phrase.")
    images = list(task.iter_images(rows))
    assert all(len(v) == 1 and str(v[0]).endswith(".png") for v in images)
    # predictions: right for every row but the first, which is wrong; one row punctuated/cased
    preds = [{"question_id": r["question_id"], "text": r["answer"]} for r in rows]
    preds[0]["text"] = "wrong"
    preds[1]["text"] = preds[1]["text"].upper() + "."
    pf = tmp_path / "preds.jsonl"
    pf.write_text("\n".join(json.dumps(p) for p in preds))
    assert eval_main(["score", "--task", "hires_synth", "--data", str(root), "--predictions", str(pf)]) == 0
    m = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert abs(m["accuracy"] - 7 / 8) < 1e-9
    t0 = rows[0]["type"]
    n0 = sum(r["type"] == t0 for r in rows)
    assert abs(m[f"accuracy_{t0}"] - (n0 - 1) / n0) < 1e-9
