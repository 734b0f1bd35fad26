"""Multimodal sequence packing (issue 15): the row plan, segment-aware attention / positions /
labels, packed loss and gradients equal to the unpacked ones for every attention impl, and the
packed pipeline (every sample once, bad samples counted, exact resume)."""
import dataclasses
import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infllava_jax import attention, params as params_lib, presets
from infllava_jax.data.batching import collate
from infllava_jax.data.examples import JsonRecordProcessor
from infllava_jax.data.packing import collate_packed, plan_rows
from infllava_jax.data.pipeline import make_dataset, read_llava_json
from infllava_jax.llama import segment_positions
from infllava_jax.splice import IGNORE_INDEX
from infllava_jax.training import step as step_lib
from infllava_jax.training.loss import shift_labels
from tests.test_data_common import (CLEAN, IMAGE_SIZE, MAX_LEN, T, config, data_root, take,  # noqa: F401
                                    tok)
from tests.test_multi_image import MULTI, _write
from tests.tiers import slow

CFG = presets.tiny()


def test_plan_rows_places_every_sample_once_within_max_len():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 300, 500)
    rows = plan_rows(lengths, 300, open_rows=8)
    assert sorted(i for r in rows for i in r) == list(range(500))
    assert all(sum(lengths[r]) <= 300 for r in rows)
    assert all(r == sorted(r) for r in rows)                        # stream order inside a row
    assert len(rows) < 0.6 * 500 and rows == plan_rows(lengths, 300, open_rows=8)
    fill = {o: lengths.sum() / (300 * len(plan_rows(lengths, 300, open_rows=o))) for o in (1, 8, 64)}
    assert fill[1] < fill[8] < fill[64] and fill[64] > 0.9, fill   # next fit 0.74, first fit over 64 rows 0.92


def test_plan_rows_groups_rows_by_image_count():
    """With image counts, each window of open_rows rows is sorted by its rows' images (the same rows)."""
    rng = np.random.default_rng(2)
    lengths, images = rng.integers(20, 120, 400), rng.integers(0, 3, 400)
    plain, grouped = plan_rows(lengths, 300), plan_rows(lengths, 300, images=images)
    assert sorted(map(tuple, grouped)) == sorted(map(tuple, plain))
    counts = [int(images[r].sum()) for r in grouped]
    for w in range(0, len(grouped), 64):
        assert counts[w:w + 64] == sorted(counts[w:w + 64])
    assert counts != sorted(counts) or len(grouped) <= 64


def test_segment_positions_and_labels_never_cross_a_boundary():
    seg = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0]])
    np.testing.assert_array_equal(segment_positions(seg), [[0, 1, 2, 0, 1, 0, 0, 1]])
    labels = jnp.array([[10, 11, 12, 20, 21, 30, -100, -100]])
    np.testing.assert_array_equal(shift_labels(labels, seg), [[11, 12, -100, 21, -100, -100, -100, -100]])
    np.testing.assert_array_equal(shift_labels(labels)[0, :3], [11, 12, 20])     # unpacked: unchanged


@pytest.mark.parametrize("impl", ["xla", "chunked", *slow("splash")])
def test_segment_attention_equals_separate_rows(impl, monkeypatch):
    """Packed attention == each segment attended alone (causal); padding segment 0 ignored."""
    monkeypatch.setattr(attention, "QUERY_CHUNK", 16)                 # several chunks of 16 queries
    rng = np.random.default_rng(1)
    lens = [13, 30, 7]
    S = 64
    q, k, v = (jnp.asarray(rng.normal(size=(1, S, n, 16)), jnp.float32) for n in (4, 2, 2))
    seg = np.zeros((1, S), np.int32)
    seg[0, :sum(lens)] = np.repeat([1, 2, 3], lens)
    out = attention.dot_product_attention(q, k, v, causal=True, segment_ids=jnp.asarray(seg), impl=impl)
    at = 0
    for n in lens:
        sl = slice(at, at + n)
        ref = attention.dot_product_attention(q[:, sl], k[:, sl], v[:, sl], causal=True, impl="xla")
        np.testing.assert_allclose(out[:, sl], ref, rtol=1e-5, atol=1e-6)
        at += n


def test_cudnn_falls_back_for_segments_and_logs_once(caplog):
    q = jnp.zeros((1, 8, 4, 16), jnp.bfloat16)
    attention._LOGGED.clear()
    with caplog.at_level(logging.INFO, logger="infllava_jax"):
        assert attention.resolve("cudnn", q, segments=True) == "chunked"
        assert attention.resolve("cudnn", q, segments=True) == "chunked"
    assert [r.getMessage() for r in caplog.records].count(
        "attention cudnn -> chunked on cpu (segment ids of packed rows (cuDNN takes no segments))") == 1


# ----------------------------------------------------------------------------- exactness

def _examples(root, tok):
    """Good examples: the 3-, 1- and 0-image multi-image records and three of clean.json."""
    proc = JsonRecordProcessor(tok, config(root).spec, root)
    recs = MULTI + [CLEAN[1], CLEAN[2], CLEAN[8]]       # two-turn image, text-only, truncated long one
    return [proc((i, r)) for i, r in enumerate(recs)]


@pytest.fixture(scope="module")
def batches(data_root, tok):
    ex = _examples(data_root, tok)
    assert all("bad" not in e for e in ex)
    unpacked = collate(ex, buckets=(MAX_LEN,), tokens_per_image=T, image_shape=(IMAGE_SIZE, IMAGE_SIZE, 3), pad_id=tok.pad_token_id)
    widths = [len(e["input_ids"]) + e["num_images"] * (T - 1) for e in ex]
    rows = [[ex[i] for i in r] for r in plan_rows(widths, MAX_LEN)]
    packed = collate_packed(rows, max_len=MAX_LEN, tokens_per_image=T, image_shape=(IMAGE_SIZE, IMAGE_SIZE, 3),
                            pad_id=tok.pad_token_id)
    assert len(rows) < len(ex) and max(len(r) for r in rows) >= 2
    return unpacked, packed


def _grads(cfg, batch, params):
    keys = ("input_ids", "labels", "attention_mask", "pixel_values", "segment_ids")
    b = {k: jnp.asarray(batch[k])[None] for k in keys if k in batch}         # one accumulation step
    tx, _ = step_lib.make_optimizer(1e-3, 10)
    state = step_lib.init_state(params, step_lib.trainable_parts("stage2"), tx)
    loss, count, grads = jax.jit(step_lib.make_grad_fn(cfg, loss_chunk=64))(state, b)
    return float(loss), int(count), jax.device_get(grads)


@pytest.fixture(scope="module")
def unpacked_reference(batches):
    params = jax.device_get(params_lib.init_params(CFG, seed=1))
    return params, _grads(CFG, batches[0], params)


@pytest.mark.parametrize("impl", slow("chunked", "xla", "splash"))
def test_packed_loss_and_grads_equal_unpacked(batches, unpacked_reference, impl, monkeypatch):
    """The same conversations packed (fewer rows, several segments and images each) and unpacked:
    the token-mean loss, the token count and every gradient agree to rtol 1e-5."""
    monkeypatch.setattr(attention, "QUERY_CHUNK", 64)
    params, (loss1, count1, grads1) = unpacked_reference
    loss, count, grads = _grads(CFG.with_runtime(attention_impl=impl), batches[1], params)
    assert count == count1 > 0
    np.testing.assert_allclose(loss, loss1, rtol=1e-5)
    top = max(np.abs(g).max() for g in jax.tree.leaves(grads1))
    for (path, g), g1 in zip(jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(grads1)):
        scale = max(np.abs(g1).max(), 1e-3 * top)       # (exactly-zero key-bias gradients: floor the scale)
        err = np.abs(np.asarray(g) - g1).max() / scale
        assert err < 1e-5, f"{jax.tree_util.keystr(path)}: relative gradient error {err:.2e}"


# ----------------------------------------------------------------------------- the pipeline

def _rows(batch):
    return [tuple(int(i) for i in r if i >= 0) for r in batch["index"]]


def test_packed_pipeline_holds_every_sample_once(data_root, tok):
    name = _write(data_root, "clean_multi.json", CLEAN + MULTI)
    cfg = config(data_root, name=name, packing=True, num_epochs=1, drop_remainder=False)
    it = iter(make_dataset(cfg, tok, process_index=0, process_count=1))
    out = list(it)
    seen = [i for b in out for r in _rows(b) for i in r]
    assert sorted(seen) == list(range(len(CLEAN) + len(MULTI)))
    assert len([r for b in out for r in _rows(b)]) < len(seen)      # several conversations a row
    recs = read_llava_json(cfg.data_path)
    proc = JsonRecordProcessor(tok, cfg.spec, data_root)
    for b in out:
        assert b["input_ids"].shape == b["segment_ids"].shape == (len(b["index"]), MAX_LEN)
        for r, row in enumerate(_rows(b)):
            widths = np.bincount(b["segment_ids"][r], minlength=len(row) + 1)[1:]
            np.testing.assert_array_equal(widths, [proc.plan_size(recs[i])[0] for i in row])
            assert b["num_images"][r] == sum(len(recs[i].get("image", [])) if isinstance(recs[i].get("image"), list)
                                             else int("image" in recs[i]) for i in row)
    assert it.stats()["good"] == len(seen) and it.stats()["truncated"] == 1


def test_packed_bad_samples_counted_like_unpacked(data_root, tok):
    counts = []
    for packing in (False, True):
        cfg = config(data_root, name="bad.json", packing=packing, num_epochs=1, drop_remainder=False,
                     max_bad_fraction=1.0)
        it = iter(make_dataset(cfg, tok, process_index=0, process_count=1))
        list(it)
        counts.append(it.stats())
    assert counts[0] == counts[1] and counts[0]["bad_total"] > 0


@pytest.mark.parametrize("num_threads", [3, *slow(0)])
def test_packed_resume_exactly(data_root, tok, num_threads):
    """Iterator state (get_state/set_state) and the trainer's position resume (start=k) both give
    the uninterrupted run's packed batches."""
    cfg = config(data_root, name="bad.json", packing=True, batch_size=2, max_bad_fraction=1.0,
                 num_threads=num_threads)
    straight = take(iter(make_dataset(cfg, tok, process_index=0, process_count=1)), 9)   # > 1 epoch
    first = iter(make_dataset(cfg, tok, process_index=0, process_count=1))
    take(first, 4)
    state = json.loads(json.dumps(first.get_state()))
    resumed = iter(make_dataset(cfg, tok, process_index=0, process_count=1))
    resumed.set_state(state)
    at_step = iter(make_dataset(cfg, tok, start=4, process_index=0, process_count=1))
    for got in (take(resumed, 5), take(at_step, 5)):
        for x, y in zip(got, straight[4:]):
            assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)


@pytest.mark.slow   # elastic: two trainer runs
def test_trainer_resumes_packed_run_on_another_mesh(tmp_path):
    """train() with data.packing: a run resumed from its step-2 checkpoint on 2 devices instead of 4
    logs the uninterrupted run's losses (the packed rows are a function of the step)."""
    import shutil

    from configs import tiny
    from infllava_jax.training import loop
    from tests.test_multihost import make_clean_dataset

    data = make_clean_dataset(tmp_path / "data")
    cfg = tiny.get_config()
    cfg.data.synthetic, cfg.data.path, cfg.data.image_folder = False, str(data / "train.json"), str(data)
    cfg.data.packing, cfg.data.max_len = True, 256          # two of these conversations a row
    cfg.total_steps, cfg.log_every, cfg.checkpoint_every, cfg.global_batch, cfg.micro_batch = 4, 1, 2, 8, 4
    cfg.export_final, cfg.compilation_cache_dir, cfg.mesh = False, str(tmp_path / "xla"), {"fsdp": 4}
    loop.train(cfg, tmp_path / "ref")
    (tmp_path / "w" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "ref" / "checkpoints" / "2", tmp_path / "w" / "checkpoints" / "2")
    cfg.mesh = {"fsdp": 2}
    summary = loop.train(cfg, tmp_path / "w")
    assert summary["resumed_from"] == 2

    def losses(w):
        rows = [json.loads(x) for x in (w / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in rows}
    want, got = losses(tmp_path / "ref"), losses(tmp_path / "w")
    assert sorted(got) == [3, 4]
    np.testing.assert_allclose([got[3], got[4]], [want[3], want[4]], rtol=2e-6)
    assert summary["data"]["good"] > 4 * 8        # counters carried over: more conversations than the 32 rows
