"""A tiny random checkpoint and small synthetic benchmark files, for the demo and the tests.

POPE is written as an lmms-lab-style parquet shard (images embedded as {"bytes", "path"}
structs); ScienceQA-IMG as jsonl with image files; MMMU as jsonl with two referenced images.
Nothing here is real data: it exercises the file formats, prompts, batching and scoring.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image


def _image(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    base = rng.integers(0, 256, size=(1, 1, 3))
    noise = rng.integers(-40, 40, size=(h, w, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def random_params(config, seed: int = 0):
    """Random parameters for `config` drawn on the host (no jit of the initialiser, which takes
    longer to compile than the tests take to run): normal(0, 0.02) weights, unit norm scales,
    zero biases. Placed on the first device."""
    import jax
    from infllava_jax.params import abstract_params
    shapes = abstract_params(config)
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = str(path[-1])
        if "scale" in name:
            a = np.ones(leaf.shape, np.float32)
        elif "bias" in name:
            a = np.zeros(leaf.shape, np.float32)
        else:
            a = rng.normal(0.0, 0.02, leaf.shape).astype(np.float32)
        return jax.device_put(a.astype(leaf.dtype), jax.devices()[0])
    return jax.tree_util.tree_map_with_path(draw, shapes)


def tiny_model(seed: int = 0, grid: int = 3):
    """A random `presets.tiny()` model (84-px sub-images, vocabulary 512) with the built-in tiny
    tokenizer (recorded in its usage.json when saved)."""
    from infllava_jax import presets
    from infllava_jax.api import InfLlava
    config = presets.tiny(grid=grid)
    return InfLlava(config, random_params(config, seed), tokenizer="tiny")


def make_tiny_checkpoint(path, seed: int = 0, grid: int = 3):
    """Save `tiny_model(seed, grid)` to `path` (InfLlava.save_pretrained)."""
    model = tiny_model(seed, grid)
    model.save_pretrained(path)
    return model


def write_pope(root, n: int = 6, seed: int = 0) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq
    rng = np.random.default_rng(seed)
    cats = ("adversarial", "popular", "random")
    rows = [dict(question_id=str(100 + i), question=f"Is there a {w} in the image?",
                 answer=("yes", "no")[i % 2], image_source=f"img{i}", category=cats[i % 3],
                 image=dict(bytes=_png(_image(rng, 40 + 7 * i, 50)), path=f"img{i}.png"))
            for i, w in zip(range(n), ["cat", "dog", "car", "tree", "cup", "bird"] * (n // 6 + 1))]
    out = Path(root) / "pope" / "data" / "test-00000-of-00001.parquet"
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), out)
    return out


def write_scienceqa(root, n: int = 5, seed: int = 1) -> Path:
    rng = np.random.default_rng(seed)
    d = Path(root) / "scienceqa_img"
    (d / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        name = f"sqa{i}.png"
        _image(rng, 60, 30 + 9 * i).save(d / "images" / name)
        k = 2 + i % 3
        rows.append(dict(question=f"Which color is shown in picture {i}?",
                         choices=["red", "green", "blue", "white"][:k], answer=i % k,
                         hint="" if i % 2 else "The picture is a square.", image=name,
                         subject="natural science"))
    out = d / "test.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def write_mmmu(root, n: int = 3, seed: int = 2) -> Path:
    rng = np.random.default_rng(seed)
    d = Path(root) / "mmmu"
    d.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        for k in (1, 2):
            _image(rng, 32, 32).save(d / f"m{i}_{k}.png")
        rows.append(dict(id=f"validation_Art_{i + 1}", question=f"Compare <image 1> with <image 2>. Which is brighter? ({i})",
                         options=str(["left", "right", "same"]), answer="ABC"[i % 3],
                         question_type="multiple-choice", image_1=f"m{i}_1.png", image_2=f"m{i}_2.png"))
    out = d / "validation.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


WRITERS = {"pope": write_pope, "scienceqa_img": write_scienceqa, "mmmu": write_mmmu}


def make_data(root, tasks=("pope", "scienceqa_img"), n: int | None = None) -> Path:
    root = Path(root)
    for t in tasks:
        WRITERS[t](root, **({} if n is None else {"n": n}))
    return root
