"""Evaluation generation with the multimodal model: batched (left-padded, bucketed, data-parallel)
outputs equal batch-size-1 outputs, and equal the public InfLlava.generate."""
import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from infllava_jax import presets
from infllava_jax.evaluation import demo_fixtures, prompting
from infllava_jax.evaluation.runner import Generator, Request, Sampling, bucket, grid_config
from infllava_jax.pixels import preprocess
from infllava_jax.sharding import make_mesh
from infllava_jax import conversation
from infllava_jax.data.tokenizer import build_tiny_tokenizer


def stop_ids(tok):
    return conversation.stop_ids(conversation.Usage(), tok)   # llama3's <|eot_id|>, <|end_of_text|>


N_NEW = 6


@pytest.fixture(scope="module")
def setup():
    model = demo_fixtures.tiny_model(seed=3, grid=2)
    config = model.config
    tok = build_tiny_tokenizer(config.llm.vocab_size)
    rng = np.random.default_rng(0)
    s = config.sub_image_size

    def img():
        return preprocess(rng.integers(0, 256, (30 + rng.integers(0, 60), 70, 3)).astype(np.uint8), s)

    texts = ["What is in the image?", "Describe the picture in detail, please. What color is the cat?",
             "Yes or no?", "Compare the two images. Which one shows a rocket on the launch pad?",
             "How many people are there?"]
    n_imgs = [1, 1, 1, 2, 1]
    reqs = [Request(prompting.encode(tok, t, k), [img() for _ in range(k)]) for t, k in zip(texts, n_imgs)]
    assert len({len(r.ids) for r in reqs}) == len(reqs)  # all prompt lengths differ
    return config, model, tok, reqs


def _gen(params, mesh, batch_size, tok, **kw):
    return Generator(params, mesh, batch_size=batch_size, pad_id=0, stop_ids=stop_ids(tok),
                     length_buckets=(128,), image_buckets=(2,), **kw)


def _one_dev():
    return make_mesh({"data": 1}, jax.devices()[:1])


@pytest.fixture(scope="module")
def singles(setup):
    config, model, tok, reqs = setup
    g1 = _gen(model.params, _one_dev(), 1, tok)
    out = [g1.generate(config, [r], max_new_tokens=N_NEW)[0] for r in reqs]
    assert g1.compiles == 1  # every row in the same (length, image) bucket
    return out


def test_batched_equals_batch_size_one(setup, singles):
    config, model, tok, reqs = setup
    g4 = _gen(model.params, _one_dev(), 4, tok)
    batched = g4.generate(config, reqs[:4], max_new_tokens=N_NEW) + g4.generate(config, reqs[4:], max_new_tokens=N_NEW)
    assert g4.compiles == 1  # the short last batch is padded to the same shape
    for i, (a, b) in enumerate(zip(singles, batched)):
        np.testing.assert_array_equal(a, b, err_msg=f"row {i}")
    assert len({tuple(t) for t in singles}) > 1  # not trivially equal: rows differ


def test_data_parallel_mesh_equals_batch_size_one(setup, singles):
    config, model, tok, reqs = setup
    n = jax.device_count()
    assert n == 8, "conftest fakes 8 CPU devices"
    mesh = make_mesh({"data": n})
    params = jax.device_put(model.params, NamedSharding(mesh, PartitionSpec()))
    g = _gen(params, mesh, 3, tok)
    assert g.batch_size == 8  # rounded up to the data-parallel size
    out = g.generate(config, reqs, max_new_tokens=N_NEW)
    for i, (a, b) in enumerate(zip(out, singles)):
        np.testing.assert_array_equal(a, b, err_msg=f"row {i}")


def test_matches_public_generate(setup, singles):
    config, model, tok, reqs = setup
    r = reqs[0]
    want = model.generate(r.ids[None], np.moveaxis(np.stack(r.images), -1, -3), max_new_tokens=N_NEW,
                          stop_ids=stop_ids(tok))[0]
    np.testing.assert_array_equal(singles[0], want)


def test_sampling_is_seeded(setup, singles):
    config, model, tok, reqs = setup
    s = Sampling(temperature=5.0, top_p=1.0, seed=7)
    g = _gen(model.params, _one_dev(), 4, tok)
    a = g.generate(config, reqs[:4], max_new_tokens=N_NEW, sampling=s, batch_index=0)
    b = g.generate(config, reqs[:4], max_new_tokens=N_NEW, sampling=s, batch_index=0)
    c = g.generate(config, reqs[:4], max_new_tokens=N_NEW, sampling=s, batch_index=1)
    assert g.compiles == 1
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert any(not np.array_equal(x, y) for x, y in zip(a, c))
    assert any(not np.array_equal(x, y) for x, y in zip(a, singles[:4]))


def test_buckets_and_grids():
    assert bucket(1, (64, 128)) == 64 and bucket(65, (64, 128)) == 128 and bucket(300, (64, 128)) == 384
    c = presets.tiny(grid=3)
    assert grid_config(c, 336).grid == (1, 1) and grid_config(c, 672).grid == (2, 2)
    assert grid_config(c, 1008) is c
    with pytest.raises(ValueError, match="multiple of 336"):
        grid_config(c, 500)
    with pytest.raises(ValueError, match="without DEM"):
        grid_config(presets.tiny(grid=None), 672)


def test_sentinel_count_checked(setup):
    config, model, tok, reqs = setup
    bad = Request(reqs[0].ids, [])
    with pytest.raises(ValueError, match="sentinels"):
        _gen(model.params, _one_dev(), 1, tok).generate(config, [bad], max_new_tokens=2)
