"""Task prompts (as lmms-eval's task files build them), data loading, ids, images, judge inputs."""
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from infllava_jax.evaluation import prompting
from infllava_jax.evaluation.datasets import DataError, open_image
from infllava_jax.evaluation.sweep import write_judge_inputs
from infllava_jax.evaluation.tasks import get_task

SHORT = "\nAnswer the question using a single word or phrase."
LETTER = "\nAnswer with the option's letter from the given choices directly."


def test_prompts():
    assert get_task("pope").text({"question": " Is there a cat? "}) == "Is there a cat?" + SHORT
    sqa = {"question": "Which?", "choices": ["a", "b"], "hint": "Look."}
    assert get_task("scienceqa_img").text(sqa) == "Context: Look.\nWhich?\nA. a\nB. b" + LETTER
    assert get_task("scienceqa_img").text(dict(sqa, hint="")) == "Which?\nA. a\nB. b" + LETTER
    seed = {"question": "Q?", "choice_a": "1", "choice_b": "2", "choice_c": "3", "choice_d": "4"}
    assert get_task("seed").text(seed) == "Q?\nA. 1\nB. 2\nC. 3\nD. 4" + LETTER
    assert get_task("textvqa").text({"question": "what is THE brand?"}) == "What is the brand?" + SHORT
    assert get_task("ok_vqa").text({"question": "why?"}) == (
        "why?\nWhen the provided information is insufficient, respond with 'Unanswerable'." + SHORT)
    assert get_task("ai2d").text({"question": "Q", "options": ["x", "y", "z"]}) == "Q\nA. x\nB. y\nC. z" + LETTER
    assert get_task("gqa").text({"question": "Q"}) == "Q" + SHORT
    assert get_task("docvqa").text({"question": "Q"}) == "Q" + SHORT
    assert get_task("mmmu").text({"question": "Q <image 1>", "question_type": "open"}) == "Q <image 1>\n" + SHORT
    assert get_task("mmvet").text({"question": "Q"}).startswith("Please think step by step")
    assert get_task("mmbench").name == "mmbench_en" and get_task("MMMU_val").name == "mmmu"
    with pytest.raises(KeyError, match="unknown task"):
        get_task("vqav2")


def test_user_text_image_tokens():
    assert prompting.user_text("Q", 1) == "<image>\nQ"
    assert prompting.user_text("Q", 2) == "<image> <image>\nQ"
    assert prompting.user_text("Q", 0) == "Q"


def _png(color, size=(8, 6)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def test_seed_keeps_image_rows_and_streams_image_lists(tmp_path):
    rows = [dict(question_id=str(i), question="q", answer="A", data_type=("image", "video")[i % 2],
                 image=[dict(bytes=_png((i, 0, 0)), path=None)], **{f"choice_{c}": c for c in "abcd"})
            for i in range(5)]
    d = tmp_path / "seedbench" / "data"
    d.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows[:3]), d / "test-00000-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(rows[3:]), d / "test-00001-of-00002.parquet")
    task = get_task("seedbench")
    loaded = task.load(tmp_path)
    assert [r["_qid"] for r in loaded] == ["0", "2", "4"] and "image" not in loaded[0]
    imgs = list(task.iter_images(loaded))
    assert [open_image(v[0]).getpixel((0, 0))[0] for v in imgs] == [0, 2, 4]


def test_gqa_image_table(tmp_path):
    root = tmp_path / "GQA"
    (root / "testdev_balanced_instructions").mkdir(parents=True)
    (root / "testdev_balanced_images").mkdir()
    pq.write_table(pa.Table.from_pylist([dict(id="q1", imageId="n7", question="q", answer="a"),
                                         dict(id="q2", imageId="n9", question="q", answer="b")]),
                   root / "testdev_balanced_instructions" / "testdev-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist([dict(id="n7", image=dict(bytes=_png((7, 7, 7)), path=None)),
                                         dict(id="n9", image=dict(bytes=_png((9, 9, 9)), path=None))]),
                   root / "testdev_balanced_images" / "testdev-00000-of-00001.parquet")
    task = get_task("gqa")
    rows = task.load(tmp_path)
    assert [r["_qid"] for r in rows] == ["q1", "q2"]
    assert [open_image(v[0]).getpixel((0, 0)) for v in task.iter_images(rows)] == [(7, 7, 7), (9, 9, 9)]


def test_jsonl_images_as_paths_and_base64(tmp_path):
    import base64
    d = tmp_path / "ai2d"
    (d / "images").mkdir(parents=True)
    Image.new("RGB", (5, 5), (1, 2, 3)).save(d / "images" / "a.png")
    b64 = "data:image/png;base64," + base64.b64encode(_png((4, 5, 6))).decode()
    (d / "test.jsonl").write_text(json.dumps(dict(question="q", options=["x"], answer="0", image="a.png")) + "\n"
                                  + json.dumps(dict(question="q", options=["x"], answer="0", image=b64)) + "\n")
    task = get_task("ai2d")
    rows = task.load(tmp_path)
    assert [r["_qid"] for r in rows] == ["0", "1"]        # row index ids
    got = [open_image(v[0], r["_base_dir"]).getpixel((0, 0)) for r, v in zip(rows, task.iter_images(rows))]
    assert got == [(1, 2, 3), (4, 5, 6)]
    with pytest.raises(DataError, match="not found"):
        open_image("missing.png", str(d), "ai2d row 3")


def test_duplicate_ids_rejected(tmp_path):
    (tmp_path / "pope.jsonl").write_text("".join(json.dumps(dict(question_id="1", question="q", answer="yes")) + "\n"
                                                 for _ in range(2)))
    with pytest.raises(DataError, match="duplicate"):
        get_task("pope").load(tmp_path)


def test_judge_inputs(tmp_path):
    task = get_task("mmvet")
    rows = [dict(question_id="v1_0", question="q0", answer="ref", capability=["ocr"]),
            dict(question_id="5", question="q1", answer="ref1", capability=["rec"])]
    answers = [dict(question_id=r["question_id"], text=f"ans{i}") for i, r in enumerate(rows)]
    write_judge_inputs(task, rows, answers, tmp_path / "mmvet_res1008")
    assert json.loads((tmp_path / "mmvet_res1008.json").read_text()) == {"v1_0": "ans0", "v1_5": "ans1"}
    recs = [json.loads(x) for x in (tmp_path / "mmvet_res1008.jsonl").read_text().splitlines()]
    assert recs[1] == dict(question_id="5", category=["rec"], question="q1", context=None, reference="ref1",
                           answer="ans1")
