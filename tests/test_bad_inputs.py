"""Hostile inputs with a known answer (issue 16): decompression bombs, every PIL image mode, image
paths that leave the image folder, and the one-line errors of train.py and eval.py."""
from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import eval as eval_cli
from infllava_jax.data.examples import JsonRecordProcessor, SampleSpec
from infllava_jax.data.pipeline import DataConfig, make_dataset
from infllava_jax.data.tokenizer import build_tiny_tokenizer

REPO = Path(__file__).resolve().parent.parent
QUESTION = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A cat."}]


def png_header_only(w: int, h: int) -> bytes:
    """A valid PNG signature + IHDR claiming w x h RGB, a tiny IDAT, IEND (a decompression bomb's header)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_inputs")
    img = root / "img"
    img.mkdir()
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(img / "good.png")
    (img / "bomb.png").write_bytes(png_header_only(40_000, 40_000))
    (img / "big.png").write_bytes(png_header_only(10_000, 10_000))   # under PIL's own limit, over ours
    Image.fromarray(rgb).convert("CMYK").save(img / "cmyk.jpg")
    Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE).save(img / "palette.png", transparency=0)
    Image.fromarray((np.arange(40 * 56).reshape(40, 56) * 29).astype(np.uint16)).save(img / "grey16.png")
    Image.fromarray(rgb).convert("LA").save(img / "la.png")
    Image.fromarray(np.concatenate([rgb, rgb[..., :1]], -1)).save(img / "rgba.png")
    Image.fromarray(rgb).convert("1").save(img / "bits.png")
    Image.fromarray(rgb).save(root / "outside.png")
    return root


def process(root, image, **kw):
    spec = SampleSpec(image_size=84, tokens_per_image=36, max_len=256)
    proc = JsonRecordProcessor(build_tiny_tokenizer(), spec, str(root / "img"), **kw)
    return proc((0, {"id": "x", "image": image, "conversations": QUESTION}))


def test_decompression_bomb_is_refused_before_decoding(root):
    t = time.perf_counter()
    out = process(root, "bomb.png")
    assert out["bad"] == "too_many_pixels" and "1600000000 pixels" in out["detail"]
    out = process(root, "big.png")
    assert out["bad"] == "too_many_pixels" and "10000 x 10000" in out["detail"]
    assert time.perf_counter() - t < 2                   # 1.6 G and 100 M pixels were never decoded
    assert process(root, "good.png", max_image_pixels=100)["bad"] == "too_many_pixels"
    assert "bad" not in process(root, "good.png", max_image_pixels=40 * 56)


@pytest.mark.parametrize("name", ["cmyk.jpg", "palette.png", "grey16.png", "la.png", "rgba.png", "bits.png"])
def test_every_image_mode_is_converted_not_rejected(root, name):
    out = process(root, name)
    assert "bad" not in out, out
    assert out["pixels"].shape == (84, 84, 3) and np.isfinite(out["pixels"]).all()
    if name == "grey16.png":   # 16-bit keeps its range (PIL's own convert would clip it to white)
        assert len(np.unique(out["pixels"])) > 20


@pytest.mark.parametrize("path", ["../outside.png", "./../outside.png", "ABS"])
def test_paths_outside_the_image_folder_are_refused_unless_allowed(root, path):
    path = str(root / "outside.png") if path == "ABS" else path
    assert process(root, path)["bad"] == "outside_folder"
    assert "bad" not in process(root, path, allow_outside_paths=True)


def test_the_pipeline_counts_new_reasons(root, tmp_path):
    recs = [{"id": str(i), "image": im, "conversations": QUESTION}
            for i, im in enumerate(["good.png", "bomb.png", "../outside.png", "good.png"])]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(recs))
    cfg = DataConfig(data_path=str(path), image_folder=str(root / "img"), image_size=84, tokens_per_image=36,
                     max_len=256, batch_size=4, num_epochs=1, shuffle=False, max_bad_fraction=1.0, num_threads=0)
    it = iter(make_dataset(cfg, build_tiny_tokenizer(), process_index=0, process_count=1))
    next(it)
    stats = it.stats()
    assert stats["good"] == 2 and stats["bad"]["too_many_pixels"] == 1 and stats["bad"]["outside_folder"] == 1


@pytest.mark.slow   # a train.py subprocess
def test_train_py_prints_one_line_for_a_broken_data_file(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"id": "a", "conversations": QUESTION}) + "\n{not json\n")
    r = subprocess.run([sys.executable, "train.py", "--config", "configs/tiny.py", "--workdir", str(tmp_path / "w"),
                        f"--config.data.path={data}", "--config.data.synthetic=False"],
                       cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, "JAX_PLATFORMS": "cpu"})
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert last.startswith("train.py: error: ") and f"{data}:2:" in last


def test_eval_sweep_prints_one_line_for_a_missing_checkpoint(tmp_path, capsys):
    code = eval_cli.main(["--config", "configs/eval.py:tasks=pope,res=336", "--ckpt", str(tmp_path / "nope"),
                          "--data", str(tmp_path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("eval.py: error: ") and "nope" in err


def test_eval_images_are_capped_and_converted(root):
    from infllava_jax.evaluation.datasets import DataError, open_image
    with pytest.raises(DataError, match="too many|TooManyPixels"):
        open_image((root / "img" / "bomb.png").read_bytes(), where="pope.jsonl:3")
    assert open_image(str(root / "img" / "grey16.png")).mode == "RGB"
    with pytest.raises(DataError, match="pope.jsonl:3"):
        open_image(io.BytesIO(b"not an image").getvalue(), where="pope.jsonl:3")
