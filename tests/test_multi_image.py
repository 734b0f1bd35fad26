"""Multi-image samples (issue 15): LLaVA JSON `"image": [...]` with one `<image>` per image, through
loading, batching (K image slots per row; padding images never reach the LLM), the splice and
the model; bad image counts are skipped and counted."""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from infllava_jax import params as params_lib, presets
from infllava_jax.model import InfLlavaModel
from infllava_jax.pixels import preprocess
from infllava_jax.splice import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from tests.test_data_common import IMAGE_SIZE, MAX_LEN, T, config, data_root, tok  # noqa: F401

CFG = presets.tiny()
IMGS3 = ["img/astronaut.jpg", "img/coffee.png", "img/rocket.jpg"]


def _conv(*turns):
    return [{"from": "human" if k % 2 == 0 else "gpt", "value": v} for k, v in enumerate(turns)]


MULTI = [   # 3, 1 and 0 images in one batch (no shuffling)
    {"id": "three", "image": IMGS3,
     "conversations": _conv("<image>\n<image>\nWhich two are alike?", "None of them.",
                            "And this one? <image>", "A rocket.")},
    {"id": "one", "image": ["img/chelsea.jpg"], "conversations": _conv("What animal? <image>", "A cat.")},
    {"id": "text", "conversations": _conv("Say yes.", "Yes.")},
]
BAD_COUNTS = [  # (record, reason): the number of `<image>` tags must equal the number of images
    ({"id": "2img-1tag", "image": IMGS3[:2], "conversations": _conv("<image>\nWhat?", "x")}, "image_token_mismatch"),
    ({"id": "3img-0tag", "image": IMGS3, "conversations": _conv("What?", "x")}, "image_token_mismatch"),
    ({"id": "1img-3tag", "image": IMGS3[:1], "conversations": _conv("<image><image><image>", "x")},
     "image_token_mismatch"),
    ({"id": "8img", "image": IMGS3 * 2 + IMGS3[:2], "conversations": _conv("<image>" * 8, "x")}, "too_long"),
    ({"id": "empty-list", "image": [], "conversations": _conv("What?", "x")}, "bad_fields"),
]


def _write(root, name, recs):
    with open(os.path.join(root, name), "w") as f:
        json.dump(recs, f)
    return name


def _first_batch(root, tok, name, **kw):
    cfg = config(root, name=name, shuffle=False, num_epochs=1, drop_remainder=False, **kw)
    from infllava_jax.data.pipeline import make_dataset
    it = iter(make_dataset(cfg, tok, process_index=0, process_count=1))
    return next(it), it


def test_batch_with_0_1_and_3_images(data_root, tok):
    b, _ = _first_batch(data_root, tok, _write(data_root, "multi.json", MULTI))
    B, L = b["input_ids"].shape
    assert b["pixel_values"].shape == (3, 3, IMAGE_SIZE, IMAGE_SIZE, 3)
    np.testing.assert_array_equal(b["num_images"], [3, 1, 0])
    np.testing.assert_array_equal((b["input_ids"] == IMAGE_TOKEN_INDEX).sum(1), [3, 1, 0])
    assert L + 3 * (T - 1) <= MAX_LEN                 # three image slots beside the ids: one bucket
    for r, rec in enumerate(MULTI):
        paths = rec.get("image", [])
        for k in range(3):                             # the k-th image of the record in slot k ...
            want = (preprocess(Image.open(os.path.join(data_root, paths[k])), IMAGE_SIZE, "pad")
                    if k < len(paths) else np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), np.float32))  # ... padding: zeros
            np.testing.assert_array_equal(b["pixel_values"][r, k], want)
    # several tags stay where the text puts them: two in the first question, one in the second
    ids = b["input_ids"][0]
    assert tok.decode(ids[(ids >= 0) & (np.cumsum(ids == IMAGE_TOKEN_INDEX) == 2)]).startswith("\nWhich two")


def test_bad_image_counts_are_skipped_and_counted(data_root, tok):
    recs = [r for pair in zip(MULTI, [x for x, _ in BAD_COUNTS]) for r in pair] + [x for x, _ in BAD_COUNTS[3:]]
    name = _write(data_root, "multi_bad.json", recs)
    cfg = config(data_root, name=name, shuffle=False, num_epochs=1, drop_remainder=False, max_bad_fraction=1.0)
    from infllava_jax.data.pipeline import make_dataset
    it = iter(make_dataset(cfg, tok, process_index=0, process_count=1))
    seen = np.concatenate([b["index"] for b in it])
    assert sorted(seen[seen >= 0].tolist()) == [0, 2, 4]           # the good ones, each once
    want = {}
    for _, why in BAD_COUNTS:
        want[why] = want.get(why, 0) + 1
    stats = it.stats()
    assert {k: v for k, v in stats["bad"].items() if v} == want and stats["good"] == 3


# ----------------------------------------------------------------------------- the model

@jax.jit
def _forward(params, ids, px, mask):
    return InfLlavaModel(CFG).apply({"params": params}, ids, px, mask)


def _by_hand(params, ids, images):
    """Logits of one row (no padding) from embeddings spliced in Python: the k-th sentinel gets
    the k-th image, each image encoded alone through the single-image path."""
    m = InfLlavaModel(CFG)
    pieces = []
    for i in ids:
        if i == IMAGE_TOKEN_INDEX:
            img = images[len([p for p in pieces if p.shape[0] == T])]
            pieces.append(m.apply({"params": params}, jnp.asarray(img)[None], method=m.encode_images)[0])
        else:
            pieces.append(m.apply({"params": params}, jnp.asarray([[i]]),
                                  method=lambda mod, x: mod.language_model.embed(x))[0])
    x = jnp.concatenate(pieces)[None]
    out, _ = m.apply({"params": params}, x, method=lambda mod, e: mod.language_model(inputs_embeds=e))
    return np.asarray(out[0])


@pytest.mark.slow
def test_model_rows_equal_per_image_reference(data_root, tok):
    """The pipeline's batch of 3-, 1- and 0-image rows through the model: each row's logits equal
    the row built by hand from single-image encodings; the 1-image row equals the existing
    single-image path; padding images (zeros or noise) change nothing."""
    b, _ = _first_batch(data_root, tok, _write(data_root, "multi.json", MULTI))
    params = jax.device_get(params_lib.init_params(CFG, seed=3))
    ids, px, mask = (jnp.asarray(b[k]) for k in ("input_ids", "pixel_values", "attention_mask"))
    out = np.asarray(_forward(params, ids, px, mask))
    assert out.shape[1] == ids.shape[1] + 3 * (T - 1)
    for r in range(3):
        n, k = int(b["attention_mask"][r].sum()), int(b["num_images"][r])
        want = _by_hand(params, b["input_ids"][r, :n], b["pixel_values"][r, :k])
        got = out[r, :n + k * (T - 1)]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    single = np.asarray(_forward(params, ids[1:2], px[1:2, 0], mask[1:2]))   # (B, H, W, 3): the old path
    n1 = int(b["attention_mask"][1].sum()) + T - 1
    np.testing.assert_allclose(out[1, :n1], single[0, :n1], rtol=1e-5, atol=1e-5 * np.abs(single).max())
    noise = np.random.default_rng(0).normal(size=px.shape).astype(np.float32)
    used = (np.arange(3)[None, :] < b["num_images"][:, None])[..., None, None, None]
    noisy = np.asarray(_forward(params, ids, jnp.where(used, px, noise), mask))
    valid = np.arange(out.shape[1])[None] < (b["attention_mask"].sum(1) + b["num_images"] * (T - 1))[:, None]
    np.testing.assert_array_equal(noisy[valid], out[valid])
