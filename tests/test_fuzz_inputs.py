"""Fuzz: broken variants of every input format, generated from good fixtures with fixed seeds, and
the rule of issue 16 asserted for each (tests/fuzz.py): a clean one-line refusal or a skipped and
counted sample, never a traceback, never a hang, never a file left at the destination.

Formats: released safetensors checkpoints (`python -m convert`), our Orbax checkpoints
(`convert.export`, `InfLlava.from_pretrained`), LLaVA records, images and data files (the data
pipeline), prediction files (`eval.py score`) and token ids (`InfLlava.__call__`).
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import eval as eval_cli
from convert.__main__ import main as convert_main
from convert.export import main as export_main
from tests.fuzz import (bounded, flip, mutate_bytes, mutate_json, rule_violation, run_cli, truncate)

pytestmark = pytest.mark.slow   # hundreds of broken inputs

N_CONVERT, N_CKPT, N_IMAGES, N_RECORDS, N_FILES, N_PREDS, N_IDS = 48, 24, 40, 60, 16, 30, 40


# ----------------------------------------------------------------------------- converter

@pytest.fixture(scope="module")
def released(tmp_path_factory):
    from tests.test_convert import random_state, write_st
    from convert import formats
    from convert.export import released_config_json
    from infllava_jax import presets
    from infllava_jax.params import abstract_params
    cfg = presets.tiny()
    sd = random_state(formats.released_rows(cfg), abstract_params(cfg), seed=0)
    d = write_st(tmp_path_factory.mktemp("fuzz_src") / "released", sd, shard_bytes=700_000)
    (d / "config.json").write_text(json.dumps(released_config_json(cfg, "float32")))
    return d


def _header(f: Path):
    raw = f.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _write_header(f: Path, header, data: bytes):
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    f.write_bytes(len(h).to_bytes(8, "little") + h + data)


def _lie(header, rng):
    key = sorted(k for k in header if k != "__metadata__")[int(rng.integers(len(header) - 1))]
    info, kind = header[key], int(rng.integers(5))
    b, e = info["data_offsets"]
    info["data_offsets"] = ([b, e + (1 << 40)], [e, b], [-8, e - b - 8], [b, b])[kind] if kind < 4 else [b, e]
    if kind == 4:
        info["dtype"] = ("F99", "int4", "", "U128", 5)[int(rng.integers(5))]
    return header


def _shard_variant(src: Path, rng, kind: str) -> str:
    f = sorted(src.glob("*.safetensors"))[int(rng.integers(3))]
    raw = f.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    if kind == "shard truncated":
        f.write_bytes(truncate(raw, rng))
    elif kind == "shard header bytes flipped":
        f.write_bytes(flip(raw, rng, 0, 8 + n, n=int(rng.integers(1, 5))))
    elif kind == "shard header length lies":
        f.write_bytes(int(rng.choice([0, 1, n - 3, n + 5, len(raw), 1 << 62])).to_bytes(8, "little") + raw[8:])
    elif kind == "shard header field":
        header, data = _header(f)
        _write_header(f, mutate_json(header, rng)[1], data)
    else:   # offsets or dtype lie
        header, data = _header(f)
        _write_header(f, _lie(header, rng), data)
    return f.name


def _index_or_config_variant(src: Path, rng, kind: str) -> str:
    index, cfg = src / "model.safetensors.index.json", src / "config.json"
    if kind == "index field":
        index.write_text(json.dumps(mutate_json(json.loads(index.read_text()), rng)[1]))
    elif kind == "index wrong shard":
        d = json.loads(index.read_text())
        k = sorted(d["weight_map"])[int(rng.integers(len(d["weight_map"])))]
        others = sorted({v for v in d["weight_map"].values()} - {d["weight_map"][k]})
        d["weight_map"][k] = others[0] if rng.integers(2) else "model-00009-of-00009.safetensors"
        index.write_text(json.dumps(d))
    elif kind == "config truncated":
        cfg.write_bytes(truncate(cfg.read_bytes(), rng))
    else:
        what, d = mutate_json(json.loads(cfg.read_text()), rng)
        cfg.write_text(json.dumps(d))
        return what
    return kind


CONVERT_KINDS = ("shard truncated", "shard header bytes flipped", "shard header length lies", "shard header field",
                 "offsets or dtype lie", "index field", "index wrong shard", "config truncated", "config field")


@pytest.mark.parametrize("seed", range(N_CONVERT))
def test_convert_refuses_broken_sources_cleanly(released, tmp_path, seed):
    rng = np.random.default_rng(seed)
    kind = CONVERT_KINDS[seed % len(CONVERT_KINDS)]
    src = shutil.copytree(released, tmp_path / "src")
    what = (_shard_variant if kind.startswith(("shard", "offsets")) else _index_or_config_variant)(src, rng, kind)
    dst = tmp_path / "out" / "ckpt"
    code, err, exc, _ = run_cli(convert_main, [src, dst, "--no-progress"])
    assert rule_violation(code, err, exc, dst) is None, (kind, what, rule_violation(code, err, exc, dst))
    if kind in ("shard truncated", "index wrong shard"):
        assert code != 0, (kind, what)


def _poison(src: Path, value: float) -> str:
    f = sorted(src.glob("*.safetensors"))[0]
    header, data = _header(f)
    key = sorted(k for k in header if k != "__metadata__")[0]
    b, _ = header[key]["data_offsets"]
    data = bytearray(data)
    data[b:b + 4] = np.float32(value).tobytes()
    f.write_bytes(f.read_bytes()[:len(f.read_bytes()) - len(data)] + bytes(data))
    return key


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_convert_nonfinite_weights_refused_unless_allowed(released, tmp_path, value):
    src = shutil.copytree(released, tmp_path / "src")
    key = _poison(src, value)
    dst = tmp_path / "ckpt"
    code, err, exc, _ = run_cli(convert_main, [src, dst, "--no-progress"])
    assert rule_violation(code, err, exc, dst) is None and code != 0 and key in err, err
    code, err, exc, _ = run_cli(convert_main, [src, dst, "--no-progress", "--allow-nonfinite"])
    assert exc is None and code == 0 and key in err and dst.is_dir(), err


def test_convert_and_export_refuse_an_existing_destination(released, tmp_path):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    for main, src in ((convert_main, released), (export_main, tmp_path / "ckpt")):
        if main is export_main:
            assert convert_main([str(released), str(src), "--no-progress"]) == 0
        code, err, exc, _ = run_cli(main, [src, dst, "--no-progress"])
        assert exc is None and code == 2 and "--overwrite" in err and "Traceback" not in err
        assert (dst / "keep.txt").read_text() == "mine"


# ----------------------------------------------------------------------------- our checkpoints

@pytest.fixture(scope="module")
def ckpt(released, tmp_path_factory):
    out = tmp_path_factory.mktemp("fuzz_ckpt") / "ours"
    assert convert_main([str(released), str(out), "--no-progress"]) == 0
    return out


def _break_checkpoint(d: Path, rng) -> str:
    files = sorted(p for p in d.rglob("*") if p.is_file())
    f = files[int(rng.integers(len(files)))]
    if f.name == "config.json" and rng.integers(2):
        what, cfg = mutate_json(json.loads(f.read_text()), rng)
        f.write_text(json.dumps(cfg))
        return f"config.json: {what}"
    if rng.integers(4) == 0:
        f.unlink()
        return f"deleted {f.relative_to(d)}"
    kind, data = mutate_bytes(f.read_bytes(), rng)
    f.write_bytes(data)
    return f"{kind} {f.relative_to(d)}"


@pytest.mark.parametrize("seed", range(N_CKPT))
def test_broken_checkpoints_export_and_load_cleanly(ckpt, tmp_path, seed):
    from infllava_jax.api import InfLlava
    d = shutil.copytree(ckpt, tmp_path / "ckpt")
    what = _break_checkpoint(d, np.random.default_rng(seed))
    dst = tmp_path / "exported"
    code, err, exc, _ = run_cli(export_main, [d, dst, "--no-progress"])
    assert rule_violation(code, err, exc, dst) is None, (what, rule_violation(code, err, exc, dst))
    try:
        with bounded():
            InfLlava.from_pretrained(d)
    except (ValueError, OSError) as e:   # a clear one-line error that names the checkpoint
        assert str(d) in str(e) and "\n" not in str(e), (what, str(e))


def test_a_damaged_checkpoint_prints_one_line_even_at_exit(ckpt, tmp_path):
    """Orbax's reads still in flight when the first one fails finish later, on a closed event loop;
    what they raise must not reach stderr when the process exits (or when they are collected in the
    middle of a later job): the one line names the checkpoint, and that is all."""
    import subprocess
    import sys
    d = shutil.copytree(ckpt, tmp_path / "ckpt")
    for f in sorted((d / "params" / "d").iterdir()):   # every array's data: all reads fail
        f.write_bytes(flip(f.read_bytes(), np.random.default_rng(0), n=16))
    code = ("from infllava_jax.api import InfLlava\n"
            "try:\n    InfLlava.from_pretrained(%r)\nexcept ValueError as e:\n    print('refused:', e)\n" % str(d))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       cwd=Path(__file__).parents[1])
    assert r.returncode == 0 and f"refused: {d}" in r.stdout, (r.stdout, r.stderr[-2000:])
    assert "Traceback" not in r.stderr and "never retrieved" not in r.stderr, r.stderr[-2000:]


# ----------------------------------------------------------------------------- data pipeline

QUESTION = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A cat."}]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz_data")
    (root / "img").mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(root / "img" / "good.png")
    Image.fromarray(rng.integers(0, 256, (64, 40, 3), dtype=np.uint8)).save(root / "img" / "good.jpg", quality=90)
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / "outside.png")
    return root


def _processor(root, **kw):
    from infllava_jax.data.examples import JsonRecordProcessor, SampleSpec
    from infllava_jax.data.tokenizer import build_tiny_tokenizer
    spec = SampleSpec(image_size=84, tokens_per_image=36, max_len=256)
    return JsonRecordProcessor(build_tiny_tokenizer(), spec, str(root / "img"), **kw)


def _check_sample(out) -> None:
    from infllava_jax.data.examples import BAD_REASONS
    assert isinstance(out, dict)
    if "bad" in out:
        assert out["bad"] in BAD_REASONS and out["detail"], out
    else:
        assert out["input_ids"].dtype == np.int32 and (out["pixels"] is None or out["pixels"].shape == (84, 84, 3))


@pytest.mark.parametrize("seed", range(N_IMAGES))
def test_broken_image_files_are_skipped_and_counted(data_dir, tmp_path, seed):
    rng = np.random.default_rng(seed)
    name = ("good.png", "good.jpg")[seed % 2]
    kind, data = mutate_bytes((data_dir / "img" / name).read_bytes(), rng)
    root = tmp_path / "d"
    (root / "img").mkdir(parents=True)
    (root / "img" / name).write_bytes(data)
    t = time.perf_counter()
    with bounded():
        out = _processor(root)((seed, {"id": "x", "image": name, "conversations": QUESTION}))
    _check_sample(out)
    assert time.perf_counter() - t < 10
    if kind in ("zero", "garbage"):
        assert out.get("bad") == "bad_image", (kind, out)


@pytest.mark.parametrize("seed", range(N_RECORDS))
def test_broken_records_are_skipped_and_counted(data_dir, seed):
    good = {"id": "x", "image": "good.png", "conversations": QUESTION}
    what, rec = mutate_json(good, np.random.default_rng(seed))
    with bounded():
        out = _processor(data_dir)((seed, rec))
    _check_sample(out)


def _data_file_variant(path: Path, rng) -> str:
    if path.suffix == ".jsonl":
        lines = path.read_text().splitlines()
        i = int(rng.integers(len(lines)))
        lines[i] = lines[i][:int(rng.integers(0, len(lines[i])))] if rng.integers(2) else "{not json"
        path.write_text("\n".join(lines) + "\n")
        return f"line {i + 1} broken"
    kind, data = (("truncate", truncate(path.read_bytes(), rng)) if rng.integers(2) else
                  ("not a list", json.dumps({"data": json.loads(path.read_text())}).encode()))
    path.write_bytes(data)
    return kind


@pytest.mark.parametrize("seed", range(N_FILES))
def test_broken_data_files_name_the_file_and_line(data_dir, tmp_path, seed):
    from infllava_jax.data.pipeline import read_llava_json
    rng = np.random.default_rng(seed)
    recs = [{"id": str(i), "image": "good.png", "conversations": QUESTION} for i in range(5)]
    path = tmp_path / ("d.jsonl" if seed % 2 else "d.json")
    path.write_text("".join(json.dumps(r) + "\n" for r in recs) if seed % 2 else json.dumps(recs))
    what = _data_file_variant(path, rng)
    try:
        with bounded():
            read_llava_json(str(path))
    except ValueError as e:
        assert str(path) in str(e) and "\n" not in str(e), (what, str(e))
        if path.suffix == ".jsonl":
            assert f"{path}:{what.split()[1]}:" in str(e), (what, str(e))


# ----------------------------------------------------------------------------- eval predictions

@pytest.fixture(scope="module")
def pope(tmp_path_factory):
    from infllava_jax.evaluation import demo_fixtures
    root = tmp_path_factory.mktemp("fuzz_eval")
    demo_fixtures.make_data(root, tasks=("pope",))
    return root / "pope"


def _predictions_variant(lines: list[str], rng) -> tuple[str, list[str]]:
    i = int(rng.integers(len(lines)))
    kind = ("drop", "duplicate", "wrong type", "broken line", "not an object")[int(rng.integers(5))]
    if kind == "drop":
        return kind, lines[:i] + lines[i + 1:]
    if kind == "duplicate":
        return kind, lines + [lines[i]]
    if kind == "wrong type":
        return kind, lines[:i] + [json.dumps(mutate_json(json.loads(lines[i]), rng)[1])] + lines[i + 1:]
    if kind == "broken line":
        return kind, lines[:i] + [lines[i][:int(rng.integers(1, len(lines[i])))]] + lines[i + 1:]
    return kind, lines[:i] + ["[1, 2]"] + lines[i + 1:]


@pytest.mark.parametrize("seed", range(N_PREDS))
def test_broken_prediction_files_name_the_file_and_line(pope, tmp_path, seed):
    rng = np.random.default_rng(seed)
    good = [json.dumps({"question_id": str(100 + i), "text": ("yes", "no")[i % 2]}) for i in range(6)]
    kind, lines = _predictions_variant(good, rng)
    p = tmp_path / "preds.jsonl"
    p.write_text("\n".join(lines) + "\n")
    argv = ["score", "--task", "pope", "--data", pope, "--predictions", p]
    code, err, exc, _ = run_cli(eval_cli.main, argv)
    assert rule_violation(code, err, exc, prefix="eval.py score:") is None, (kind, err)
    if kind in ("drop", "duplicate", "broken line", "not an object"):
        assert code == 2 and str(p) in err, (kind, code, err)
    if kind == "drop":   # --allow-missing: a score over what is there, and the count missing
        code, err, exc, _ = run_cli(eval_cli.main, argv + ["--allow-missing"])
        assert exc is None and code == 0 and "1 of 6" in err, err


# ----------------------------------------------------------------------------- token ids

HF_IMAGE_ID = 319


@pytest.fixture(scope="module")
def llava15():
    from infllava_jax import presets
    from infllava_jax.api import InfLlava
    return InfLlava.init(presets.tiny(grid=None).replace(image_token_index=HF_IMAGE_ID), seed=0)


def _ids_variant(rng, vocab: int):
    """(ids (2, 12), whether the ids are valid for 1 image per row)."""
    ids = rng.integers(0, vocab, (2, 12))
    ids[ids == HF_IMAGE_ID] = 1
    for r in range(2):
        ids[r, int(rng.integers(12))] = (-200, HF_IMAGE_ID)[int(rng.integers(2))]
    kind = int(rng.integers(4))
    if kind == 1:     # an id out of range
        ids[int(rng.integers(2)), int(rng.integers(12))] = int(rng.choice([-1, -100, -201, vocab, vocab + 7, 1 << 30]))
    elif kind == 2:   # a second sentinel in a row
        row = ids[int(rng.integers(2))]
        free = np.flatnonzero((row != -200) & (row != HF_IMAGE_ID))
        row[free[int(rng.integers(len(free)))]] = (-200, HF_IMAGE_ID)[int(rng.integers(2))]
    bad = (((ids < 0) | (ids >= vocab)) & (ids != -200)).any() or \
        (((ids == -200) | (ids == HF_IMAGE_ID)).sum(1) > 1).any()
    return ids, not bad


@pytest.mark.parametrize("seed", range(N_IDS))
def test_token_ids_are_checked(llava15, seed):
    rng = np.random.default_rng(seed)
    ids, ok = _ids_variant(rng, llava15.config.llm.vocab_size)
    px = np.zeros((2, 3, 84, 84), np.float32)
    try:
        out = llava15(ids, px)
    except ValueError as e:
        assert not ok and "row" in str(e) and "position" in str(e), (ids.tolist(), str(e))
        return
    assert ok, f"no error for {ids.tolist()}"
    assert out.shape == (2, 12 - 1 + 36, llava15.config.llm.vocab_size)
