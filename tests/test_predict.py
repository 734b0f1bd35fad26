"""`python -m infllava_jax.predict` as a user runs it: bad lines skipped and listed by line
number, answers appended per batch, a rerun after a kill resumes and ends with the same file."""
import base64
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def _png(seed: int) -> str:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (32, 40, 3), dtype=np.uint8)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _line(id_, url, text="What is in the image?", **kw) -> str:
    msg = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]}]
    return json.dumps({"id": id_, "messages": msg, "max_tokens": 10, "temperature": 0, **kw})


def _predict(tmp, *args):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    cmd = [sys.executable, "-m", "infllava_jax.predict", "--ckpt", str(tmp / "tiny"), "--batch-size", "2",
           "--length-buckets", "128", "--image-buckets", "1", "--max-tokens-buckets", "16", *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    from infllava_jax import presets
    from infllava_jax.api import InfLlava
    tmp = tmp_path_factory.mktemp("predict")
    InfLlava.init(presets.tiny(), tokenizer="tiny").save_pretrained(tmp / "tiny")
    Image.fromarray(np.full((20, 30, 3), 90, np.uint8)).save(tmp / "local.png")
    lines = [_line("a", _png(1)),
             "{not json",                                                   # 2
             _line("b", _png(2), text="Describe the image."),
             _line("x", _png(9)).replace('"id": "x", ', ''),                # 4: no id
             _line(7, "local.png"),                                         # a path next to the input file
             _line("a", _png(3)),                                           # 6: repeated id
             _line("c", "data:image/png;base64,bm90IGFuIGltYWdl"),          # 7: not an image
             _line("d", _png(4), logprobs=True),                            # 8: unknown field
             "",
             _line("e", _png(5), text="How many dots are inside the circle?")]
    (tmp / "requests.jsonl").write_text("\n".join(lines) + "\n")
    return tmp


@pytest.mark.slow
def test_bad_lines_counted_and_resume_gives_the_same_file(tmp):
    full = tmp / "full.jsonl"
    r = _predict(tmp, "--input", tmp / "requests.jsonl", "--output", full)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(x) for x in full.read_text().splitlines()]
    assert [x["id"] for x in rows] == ["a", "b", 7, "e"]
    assert all(x["finish_reason"] in ("stop", "length") and 1 <= x["usage"]["completion_tokens"] <= 10 for x in rows)
    assert rows[0]["usage"]["prompt_tokens"] == 87 and len({x["text"] for x in rows}) > 1
    assert "4 answered, 0 already in" in r.stderr and "5 bad line(s) skipped" in r.stderr
    for n, what in ((2, "not valid JSON"), (4, "'id'"), (6, "repeated id 'a' (first on line 1)"),
                    (7, "not a readable image"), (8, "unknown field 'logprobs'")):
        assert f"requests.jsonl:{n}: " in r.stderr and what in r.stderr, (n, what, r.stderr)
    assert "req/s" in r.stderr or "s/req" in r.stderr   # tqdm's rate

    # a run killed after its first batch: two answers and half a line on disk
    part = tmp / "part.jsonl"
    first = full.read_text().splitlines(keepends=True)
    part.write_text("".join(first[:2]) + first[2][:15])
    r = _predict(tmp, "--input", tmp / "requests.jsonl", "--output", part)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "2 answered, 2 already in" in r.stderr
    assert part.read_text() == full.read_text()
    r = _predict(tmp, "--input", tmp / "requests.jsonl", "--output", part)   # nothing left: no model loaded
    assert r.returncode == 0 and "0 answered, 4 already in" in r.stderr and part.read_text() == full.read_text()


def test_bad_arguments_exit_2_and_create_nothing(tmp):
    out = tmp / "none" / "out.jsonl"
    r = _predict(tmp, "--input", tmp / "missing.jsonl", "--output", out)
    assert r.returncode == 2 and r.stderr.strip() == f"predict: error: --input {tmp / 'missing.jsonl'}: no such file"
    assert not out.parent.exists()
    (tmp / "junk.jsonl").write_text("hello\n")
    r = _predict(tmp, "--input", tmp / "requests.jsonl", "--output", tmp / "junk.jsonl")
    assert r.returncode == 2 and "junk.jsonl:1: not an answer line" in r.stderr and "Traceback" not in r.stderr


def test_quant_loads_a_quantized_engine_and_a_bad_one_exits_2(tmp):
    import argparse
    from infllava_jax.quant import is_quantized
    from infllava_jax.serve import add_model_args, load_engine
    p = argparse.ArgumentParser()
    add_model_args(p)
    engine = load_engine(p.parse_args(["--ckpt", str(tmp / "tiny"), "--quant", "int8"]), batch_sizes=(2,))
    assert engine.model.config.llm.quant == "int8"
    gen, = engine.generators.values()
    leaves = jax.tree.leaves(gen.params, is_leaf=is_quantized)
    assert any(is_quantized(x) for x in leaves)   # the programs run the int8 weights
    out = tmp / "q" / "out.jsonl"
    r = _predict(tmp, "--input", tmp / "requests.jsonl", "--output", out, "--quant", "int3")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("predict: error: --quant int3: quant='int3'; expected one of ('int8', 'int4')")
    assert not out.parent.exists()


@pytest.mark.slow
def test_quant_int8_answers(tmp):
    out = tmp / "int8.jsonl"
    r = _predict(tmp, "--input", tmp / "requests.jsonl", "--output", out, "--quant", "int8")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["id"] for x in rows] == ["a", "b", 7, "e"] and all(1 <= x["usage"]["completion_tokens"] <= 10 for x in rows)
