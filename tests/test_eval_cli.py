"""`python eval.py score` in-process: any model's answer file, missing rows, malformed rows."""
import json

import pytest

import eval as eval_cli
from infllava_jax.evaluation import demo_fixtures


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    demo_fixtures.make_data(root, tasks=("pope", "scienceqa_img", "mmmu"))
    return root


def _run(capsys, *args):
    code = eval_cli.main(["score", *map(str, args)])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 else None), err


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_score_pope_parquet(data, tmp_path, capsys):
    # synthetic POPE: ids 100..105, answers alternate yes/no
    preds = [{"question_id": str(100 + i), "text": ("Yes", "no")[i % 2]} for i in range(6)]
    preds[1]["text"] = "yes"                     # one false positive
    code, m, _ = _run(capsys, "--task", "pope", "--data", data / "pope", "--predictions",
                      _write(tmp_path / "p.jsonl", preds))
    assert code == 0
    assert m["accuracy"] == pytest.approx(5 / 6)
    assert m["precision"] == pytest.approx(3 / 4) and m["recall"] == 1.0
    assert m["f1"] == pytest.approx(2 * 0.75 / 1.75)
    assert m["yes_ratio"] == 0.5 and m["missing"] == 0 and m["n"] == 6
    assert all(0.0 <= m[k] <= 1.0 for k in ("accuracy", "precision", "recall", "f1", "yes_ratio"))


def test_score_ids_as_numbers_and_missing(data, tmp_path, capsys):
    preds = [{"question_id": 100 + i, "text": ("yes", "no")[i % 2]} for i in range(4)]  # ints, 2 missing
    args = ("--task", "pope", "--data", data / "pope" / "data" / "test-00000-of-00001.parquet",
            "--predictions", _write(tmp_path / "p.jsonl", preds))
    code, _, err = _run(capsys, *args)
    assert code == 2 and "no prediction for 2 of 6 question ids (104, 105)" in err and "p.jsonl" in err
    code, m, err = _run(capsys, *args, "--allow-missing")   # a score over what is there + the count missing
    assert code == 0 and m["missing"] == 2 and m["n"] == 4 and m["accuracy"] == 1.0
    assert "2 of 6 rows have no prediction" in err


def test_duplicate_question_id_names_both_lines(data, tmp_path, capsys):
    preds = [{"question_id": str(100 + i), "text": "yes"} for i in range(6)] + [{"question_id": 102, "text": "no"}]
    p = _write(tmp_path / "p.jsonl", preds)
    code, _, err = _run(capsys, "--task", "pope", "--data", data / "pope", "--predictions", p)
    assert code == 2 and f"{p}:7: duplicate question_id '102' (first on line 3)" in err


def test_score_scienceqa_row_index_ids_and_named_scorer(data, tmp_path, capsys):
    rows = [json.loads(x) for x in (data / "scienceqa_img" / "test.jsonl").read_text().splitlines()]
    preds = [{"question_id": i, "text": "ABCD"[r["answer"]] + "."} for i, r in enumerate(rows)]
    p = _write(tmp_path / "p.jsonl", preds)
    assert _run(capsys, "--task", "scienceqa_img", "--data", data / "scienceqa_img", "--predictions", p)[1]["accuracy"] == 1.0
    code, m, _ = _run(capsys, "--task", "scienceqa_img", "--data", data / "scienceqa_img", "--predictions", p,
                      "--scorer", "lmms_eval_2024_07")
    assert m["accuracy"] == 0.0 and m["scorer"] == "lmms_eval_2024_07"


def test_score_data_root_and_mmmu(data, tmp_path, capsys):
    preds = [{"question_id": f"validation_Art_{i + 1}", "text": f"({'ABC'[i % 3]})"} for i in range(3)]
    code, m, _ = _run(capsys, "--task", "mmmu", "--data", data, "--predictions", _write(tmp_path / "p.jsonl", preds))
    assert code == 0 and m["accuracy"] == 1.0


def test_malformed_prediction_row_names_file_and_line(data, tmp_path, capsys):
    p = _write(tmp_path / "bad.jsonl", [{"question_id": "100", "text": "yes"}, "{not json", ])
    code, _, err = _run(capsys, "--task", "pope", "--data", data / "pope", "--predictions", p)
    assert code == 2 and f"{p}:2" in err
    p = _write(tmp_path / "bad2.jsonl", [{"question_id": "100", "text": "yes"}, {"qid": 1, "text": "x"}])
    code, _, err = _run(capsys, "--task", "pope", "--data", data / "pope", "--predictions", p)
    assert code == 2 and f"{p}:2" in err and "question_id" in err


def test_unknown_task_and_scorer(data, tmp_path, capsys):
    p = _write(tmp_path / "p.jsonl", [{"question_id": "100", "text": "yes"}])
    code, _, err = _run(capsys, "--task", "nope", "--data", data, "--predictions", p)
    assert code == 2 and "unknown task" in err
    code, _, err = _run(capsys, "--task", "pope", "--data", data, "--predictions", p, "--scorer", "gpt4")
    assert code == 2 and "no scorer" in err


def test_malformed_data_row_names_file_and_line(tmp_path, capsys):
    d = tmp_path / "gqa.jsonl"
    d.write_text('{"id": "1", "question": "q", "answer": "a"}\n{oops\n')
    p = _write(tmp_path / "p.jsonl", [{"question_id": "1", "text": "a"}])
    code, _, err = _run(capsys, "--task", "gqa", "--data", d, "--predictions", p)
    assert code == 2 and f"{d}:2" in err
