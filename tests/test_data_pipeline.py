"""grain pipeline: batches, pixels, bucketing, truncation, sharding, bad samples, exact resume."""
import dataclasses
import json
import os

import grain
import jax
import numpy as np
import pytest
from PIL import Image

from infllava_jax.data.batching import agree_across_processes, ids_length, pad_batch, pick_bucket
from infllava_jax.data.examples import BAD_REASONS, bad, example
from infllava_jax.data.pipeline import DataConfig, LlavaBatchIterator, TooManyBadSamples, make_dataset
from infllava_jax.pixels import preprocess
from infllava_jax.splice import IGNORE_INDEX, IMAGE_TOKEN_INDEX, splice_attention_mask, splice_layout
from tests.test_data_common import (CLEAN, IMAGE_SIZE, MAX_LEN, T, assert_batches_equal,  # noqa: F401
                                    bad_json_records, config, data_root, take, tok)
from tests.tiers import slow


def batches(cfg, tok, p=0, P=1):
    return make_dataset(cfg, tok, process_index=p, process_count=P)


def one_epoch(cfg, tok, p=0, P=1):
    return list(batches(dataclasses.replace(cfg, num_epochs=1, drop_remainder=False), tok, p, P))


def test_batch_contents(data_root, tok):
    out = one_epoch(config(data_root), tok)
    assert sorted(np.concatenate([b["index"] for b in out]).tolist()) == list(range(len(CLEAN)))
    for b in out:
        B, L = b["input_ids"].shape
        assert b["pixel_values"].shape == (B, IMAGE_SIZE, IMAGE_SIZE, 3) and b["pixel_values"].dtype == np.float32
        assert all(b[k].dtype == np.int32 for k in ("input_ids", "labels", "attention_mask", "num_supervised_tokens"))
        for r in range(B):
            rec = CLEAN[b["index"][r]]
            n = b["attention_mask"][r].sum()
            assert (b["attention_mask"][r, :n] == 1).all() and (b["attention_mask"][r, n:] == 0).all()
            assert (b["input_ids"][r, n:] == tok.pad_token_id).all() and (b["labels"][r, n:] == IGNORE_INDEX).all()
            assert b["num_supervised_tokens"][r] == (b["labels"][r] != IGNORE_INDEX).sum() > 0
            assert b["has_image"][r] == ("image" in rec) == (b["input_ids"][r] == IMAGE_TOKEN_INDEX).any()
            if b["has_image"][r]:  # exactly the released preprocessing (pad mode) at the training size
                path = rec["image"][0] if isinstance(rec["image"], list) else rec["image"]
                ref = preprocess(Image.open(os.path.join(data_root, path)), IMAGE_SIZE, "pad")
                np.testing.assert_array_equal(b["pixel_values"][r], ref)
            else:  # text-only: a zero image and no sentinel, so nothing is spliced
                assert (b["pixel_values"][r] == 0).all()


def test_square_mode_and_plain_template(data_root, tok):
    recs = [r for r in CLEAN if "image" in r and len(r["conversations"]) == 2 and r["id"] != "long"]
    recs = [{**r, "image": r["image"][0] if isinstance(r["image"], list) else r["image"]} for r in recs]
    json.dump(recs, open(os.path.join(data_root, "plain.json"), "w"))
    out = one_epoch(config(data_root, name="plain.json", template="plain", image_mode="square"), tok)
    assert sum(len(b["index"]) for b in out) == len(recs) == 4
    for b in out:
        for r in range(len(b["index"])):
            rec = recs[b["index"][r]]
            assert b["input_ids"][r, 1] == IMAGE_TOKEN_INDEX
            lab = b["labels"][r]
            assert tok.decode(lab[lab != IGNORE_INDEX]) == rec["conversations"][1]["value"] + "\n"
            ref = preprocess(Image.open(os.path.join(data_root, rec["image"])), IMAGE_SIZE, "square")
            np.testing.assert_array_equal(b["pixel_values"][r], ref)


@jax.jit
def _spliced_mask(input_ids, attention_mask):
    return splice_attention_mask(attention_mask, splice_layout(input_ids, T, 1))


def test_buckets_truncation_and_splice(data_root, tok):
    buckets = (96, 160, MAX_LEN)  # spliced lengths -> 61, 125, 221 ids
    cfg = config(data_root, buckets=buckets, batch_size=2)
    out = one_epoch(cfg, tok)
    shapes = set()
    for b in out:
        lens = b["attention_mask"].sum(1)
        bucket = pick_bucket(int(lens.max()), buckets, T)
        assert b["input_ids"].shape[1] == ids_length(bucket, T)
        shapes.add(b["input_ids"].shape[1])
        # after splicing every row fits max_len: L - 1 + T for image rows
        mask = _spliced_mask(b["input_ids"], b["attention_mask"])
        assert mask.shape[1] == bucket <= MAX_LEN
        expect = lens + np.where(b["has_image"], T - 1, 0)
        np.testing.assert_array_equal(np.asarray(mask).sum(1), expect)
        assert (expect <= MAX_LEN).all()
    assert len(shapes) >= 2
    # the long record is cut to the budget and keeps a prefix of its answer
    long_row = [(b, r) for b in out for r in range(len(b["index"])) if CLEAN[b["index"][r]]["id"] == "long"]
    (b, r), = long_row
    assert b["attention_mask"][r].sum() == MAX_LEN - (T - 1) == b["input_ids"].shape[1]
    sup = b["labels"][r][b["labels"][r] != IGNORE_INDEX]
    assert CLEAN[b["index"][r]]["conversations"][1]["value"].startswith(tok.decode(sup))
    it = iter(batches(dataclasses.replace(cfg, num_epochs=1), tok))
    list(it)
    assert it.stats()["truncated"] == 1


def test_config_for_model(data_root):
    from infllava_jax.data.pipeline import DataConfig
    from infllava_jax.presets import tiny
    cfg = DataConfig.for_model(tiny(), "x.json", stage=1)
    assert (cfg.image_size, cfg.tokens_per_image, cfg.template, cfg.image_mode) == (IMAGE_SIZE, T, "plain", "square")
    cfg = DataConfig.for_model(tiny(), "x.json", max_len=MAX_LEN)
    assert (cfg.template, cfg.image_mode, cfg.bucket_lengths) == ("llama3", "pad", (128, 192, 256))
    with pytest.raises(ValueError):
        DataConfig(data_path="x", max_len=100, tokens_per_image=576)


def test_pad_batch_and_agree(data_root, tok):
    b = one_epoch(config(data_root), tok)[0]
    L = b["input_ids"].shape[1]
    p = pad_batch(b, L + 7, tok.pad_token_id)
    assert p["input_ids"].shape[1] == L + 7 and (p["labels"][:, L:] == IGNORE_INDEX).all()
    assert (p["attention_mask"][:, L:] == 0).all() and (p["input_ids"][:, L:] == tok.pad_token_id).all()
    assert agree_across_processes(b, tok.pad_token_id) is b  # one process: no-op
    with pytest.raises(ValueError):
        pad_batch(b, L - 1, 0)


def test_determinism_and_epochs(data_root, tok):
    cfg = config(data_root, num_epochs=2, drop_remainder=False)
    a, b = list(batches(cfg, tok)), list(batches(cfg, tok))
    assert_batches_equal(a, b)
    idx = np.concatenate([x["index"] for x in a])
    n = len(CLEAN)
    assert sorted(idx[:n]) == sorted(idx[n:]) == list(range(n))
    assert idx[:n].tolist() != idx[n:].tolist()  # reshuffled each epoch
    other = np.concatenate([x["index"] for x in batches(config(data_root, seed=1, num_epochs=2,
                                                               drop_remainder=False), tok)])
    assert other.tolist() != idx.tolist()


@pytest.mark.parametrize("budget_mb", [64, 0])
def test_token_cache_tokenizes_each_record_once_and_changes_no_batch(data_root, tok, monkeypatch, budget_mb):
    from infllava_jax.data import examples
    calls, real = [], examples.tokenize_record
    monkeypatch.setattr(examples, "tokenize_record", lambda r, *a: calls.append(r["id"]) or real(r, *a))
    cfg = config(data_root, num_epochs=3, drop_remainder=False)
    plain = list(batches(cfg, tok))
    n = len(calls)
    cached = list(batches(dataclasses.replace(cfg, token_cache_mb=budget_mb), tok))
    assert_batches_equal(plain, cached)
    # three epochs: every record tokenized once with the cache (its budget is large enough), 3 times without
    assert len(calls) - n == (n // 3 if budget_mb else n) and len(set(calls[n:])) == n // 3


def test_process_shards(data_root, tok):
    cfg = config(data_root)
    shards = [np.concatenate([b["index"] for b in one_epoch(cfg, tok, p, 2)]) for p in range(2)]
    assert len(shards[0]) == len(shards[1]) == len(CLEAN) // 2
    assert not set(shards[0]) & set(shards[1])
    assert sorted(np.concatenate(shards).tolist()) == list(range(len(CLEAN)))
    three = [np.concatenate([b["index"] for b in one_epoch(cfg, tok, p, 5)]) for p in range(5)]
    assert {len(s) for s in three} == {len(CLEAN) // 5}  # equal shards: the remainder is dropped


def test_bad_samples_skipped_and_counted(data_root, tok):
    recs, reasons, clean_at = bad_json_records()
    it = iter(batches(config(data_root, name="bad.json", num_epochs=1, drop_remainder=False,
                             max_bad_fraction=1.0), tok))
    seen = np.concatenate([b["index"] for b in it])
    assert (seen == -1).sum() == len(reasons)         # a bad record keeps its slot, empty ...
    seen = seen[seen >= 0]
    assert sorted(seen.tolist()) == sorted(clean_at)  # every good record, once; no bad one
    stats = it.stats()
    want = {r: list(reasons.values()).count(r) for r in BAD_REASONS}
    assert stats["bad"] == want and stats["good"] == len(CLEAN) and stats["bad_total"] == len(reasons)
    assert all(want.values())  # every kind of bad sample is exercised


def test_too_many_bad_samples_raise(data_root, tok):
    cfg = config(data_root, name="bad.json", max_bad_fraction=0.2, min_bad_samples=1)
    with pytest.raises(TooManyBadSamples, match="bad.json"):
        for _ in batches(cfg, tok):
            pass


def _read_until_limit(pattern, **kw) -> tuple[int, str | None]:
    """Samples read (1 = bad) before the bad-sample limit fired, and its message (None: never)."""
    cfg = DataConfig("x.json", batch_size=1, image_size=28, tokens_per_image=4, max_len=64, **kw)
    src = [bad("bad_fields", i) if b else example([1, 2, 3], [1, 2, 3], None, i) for i, b in enumerate(pattern)]
    parent = iter(grain.MapDataset.source(src).to_iter_dataset(grain.ReadOptions(num_threads=0)))
    it = LlavaBatchIterator(parent, cfg, pad_id=0, start=0, image_shape=(28, 28, 3))
    for n in range(len(src)):
        try:
            next(it)
        except TooManyBadSamples as e:
            return n + 1, str(e)
    return len(src), None


def test_bad_sample_limit_counts_from_the_first_sample():
    """Fires at the bad sample that makes bad > max_bad_fraction x read and bad >= min_bad_samples."""
    assert _read_until_limit([0] * 9 + [1]) == (10, None)              # 1 in 10: a smoke run goes on
    n, msg = _read_until_limit(([0] * 19 + [1]) * 8)                   # 5%: the third bad one ends it
    assert n == 60 and "3 of 60" in msg and "max_bad_fraction=0.01" in msg and "min_bad_samples=3" in msg
    assert _read_until_limit([1, 1] + [0] * 8, min_bad_samples=2)[0] == 2
    assert _read_until_limit([1] * 10, max_bad_fraction=1.0) == (10, None)     # 1.0: never
    assert _read_until_limit([0] * 300 + [1] * 3)[1] is None           # 3 of 303 is under 1%
    assert _read_until_limit([0] * 290 + [1] * 3)[0] == 293             # 3 of 293 is over


@pytest.mark.parametrize("num_threads", [4, *slow(0)])
def test_resume_exactly(data_root, tok, num_threads):
    cfg = config(data_root, name="bad.json", num_epochs=None, max_bad_fraction=1.0, num_threads=num_threads)
    straight = iter(batches(cfg, tok))
    want = take(straight, 14)  # crosses epoch boundaries and bad samples
    first = iter(batches(cfg, tok))
    got = take(first, 5)
    state = json.loads(json.dumps(first.get_state()))  # a checkpoint stores it as JSON
    take(first, 3)  # the interrupted run went on a little before dying
    resumed = iter(batches(cfg, tok))
    resumed.set_state(state)
    got += take(resumed, 9)
    assert_batches_equal(got, want)
    assert resumed.stats() == straight.stats()
