"""Token ids into the model (infllava_jax/token_ids.py): -200 for every model, a converted
LlavaForConditionalGeneration's own image token id once per image or in HF's expanded form, and
a clear error naming the row and position for anything else."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from convert import importer
from infllava_jax import presets
from infllava_jax.api import InfLlava
from infllava_jax.errors import InputError
from infllava_jax.splice import IMAGE_TOKEN_INDEX as IMG
from infllava_jax.token_ids import prepare_ids
from tests.test_model import IMAGE_TOKEN_ID, hf_llava, images

CFG = presets.tiny(grid=None).replace(image_token_index=IMAGE_TOKEN_ID)
T = CFG.tokens_per_image


def test_single_and_expanded_forms_become_one_sentinel():
    ids = np.array([[5, IMAGE_TOKEN_ID, 6, 7], [IMG, 8, 9, 10]])
    out, mask = prepare_ids(ids, None, CFG, 1)
    assert out.tolist() == [[5, IMG, 6, 7], [IMG, 8, 9, 10]] and mask is None
    expanded = np.array([[5] + [IMAGE_TOKEN_ID] * T + [6], [7, 8] + [IMAGE_TOKEN_ID] * T])
    out, _ = prepare_ids(expanded, None, CFG, 1)
    assert out.tolist() == [[5, IMG, 6], [7, 8, IMG]]
    two = np.array([[1] + [IMAGE_TOKEN_ID] * (2 * T) + [2]])   # two adjacent images, expanded
    assert prepare_ids(two, None, CFG, 2)[0].tolist() == [[1, IMG, IMG, 2]]


def test_rows_that_collapse_differently_are_padded_again_on_their_side():
    ids = np.array([[0, 0, 3] + [IMAGE_TOKEN_ID] * T + [4], [0, 0] + [5] * (T - 1) + [IMAGE_TOKEN_ID, 6, 7]])
    mask = (np.arange(ids.shape[1]) >= 2)[None].repeat(2, 0).astype(np.int32)   # left padding
    out, m = prepare_ids(ids, mask, CFG, 1)
    assert out.shape == ids.shape                     # the longer row (single form) sets the length
    assert out[0, -3:].tolist() == [3, IMG, 4] and m[0].sum() == 3 and m[0, :-3].sum() == 0
    assert out[1].tolist() == np.where(ids[1] == IMAGE_TOKEN_ID, IMG, ids[1]).tolist() and (m[1] == mask[1]).all()


@pytest.mark.parametrize("ids, images, where", [
    ([[1, 2, 512, 3]], 1, "row 0, position 2: id 512"),            # = vocab
    ([[1, 2, 3], [4, -1, IMG]], 1, "row 1, position 1: id -1"),
    ([[1, -100, IMG]], 1, "row 0, position 1: id -100"),
    ([[IMG, 1, IMG]], 1, "row 0, position 2: more image sentinels than images"),
    ([[IMAGE_TOKEN_ID, 1, IMG]], 1, "row 0, position 2: more image sentinels than images"),
    ([[1] + [IMAGE_TOKEN_ID] * 3 + [2]], 1, "row 0, position 1: 3 image tokens"),
    ([[1] + [IMAGE_TOKEN_ID] * (T + 1)], 2, f"row 0, position 1: {T + 1} image tokens"),
])
def test_wrong_ids_name_row_and_position(ids, images, where):
    with pytest.raises(InputError, match=where):
        prepare_ids(np.array(ids), None, CFG, images)


def test_padding_is_not_checked():
    ids, mask = np.array([[-1, -1, 5, IMG]]), np.array([[0, 0, 1, 1]])
    assert prepare_ids(ids, mask, CFG, 1)[0].tolist() == [[0, 0, 5, IMG]]


def test_a_model_without_an_hf_token_takes_only_the_sentinel():
    cfg = presets.tiny()
    assert prepare_ids(np.array([[3, IMG, 4]]), None, cfg, 1)[0].tolist() == [[3, IMG, 4]]
    with pytest.raises(InputError, match="position 1: id -5"):
        prepare_ids(np.array([[3, -5, IMG]]), None, cfg, 1)


@pytest.fixture(scope="module")
def converted_llava15(tmp_path_factory):
    """The issue's case: a LLaVA-1.5 converted from the HF layout (its image token id inside the vocab)."""
    cfg, hf = hf_llava()
    d = tmp_path_factory.mktemp("llava_hf") / "hf"
    hf.save_pretrained(d)
    model = importer.load(d)
    assert model.config.image_token_index == IMAGE_TOKEN_ID
    return model, hf


def test_llava15_from_hf_every_form_gives_the_transformers_logits(converted_llava15):
    model, hf = converted_llava15
    rng = np.random.default_rng(0)
    text = rng.integers(1, IMAGE_TOKEN_ID, (2, 20))
    px = np.stack([images("astronaut", model.config, "lowres"), images("coffee", model.config, "lowres")])
    readme = text.copy()
    readme[:, 4] = IMG                                                  # the README: one -200 per image
    single = np.where(readme == IMG, IMAGE_TOKEN_ID, readme)            # HF tokenizer: one id per image
    expanded = np.stack([np.concatenate([[t] * T if t == IMAGE_TOKEN_ID else [t] for t in r]) for r in single])
    outs = [model(ids, px) for ids in (readme, single, expanded)]
    with torch.no_grad():
        ref = hf(input_ids=torch.from_numpy(expanded), pixel_values=torch.from_numpy(px)).logits.numpy()
    assert outs[0].shape == ref.shape == (2, 20 - 1 + T, model.config.llm.vocab_size)
    for out in outs:
        np.testing.assert_allclose(out, ref, atol=1e-4 * np.abs(ref).max())
    np.testing.assert_array_equal(outs[0], outs[1])
    gen = [model.generate(ids, px, max_new_tokens=3, stop_ids=()) for ids in (readme, expanded)]
    assert [g.tolist() for g in gen[0]] == [g.tolist() for g in gen[1]]


def test_inf_llava_sentinel_and_hf_id_agree():
    cfg = presets.tiny().replace(image_token_index=300)
    model = InfLlava.init(cfg, seed=1)
    ids = np.array([[1, 2, IMG, 3, 4]])
    px = images("astronaut", cfg, "lowres")[None]
    a = model(ids, px)
    b = model(np.where(ids == IMG, 300, ids), px)
    c = model(np.array([[1, 2] + [300] * T + [3, 4]]), px)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
    with pytest.raises(InputError, match="row 0, position 3: id 9999"):
        model(np.array([[1, 2, IMG, 9999]]), px)
