"""tfds ArrayRecord builder: pre-processed once, read back by grain, same batches as from JSON."""
import dataclasses
import os
import sys

import pytest

from infllava_jax.data.arrayrecord import build_array_record
from infllava_jax.data.pipeline import make_dataset
from tests.test_data_common import (CLEAN, IMAGE_SIZE, assert_batches_equal, bad_json_records,  # noqa: F401
                                    config, data_root, take, tok)


@pytest.fixture(scope="module")
def built(data_root, tok):
    out = os.path.join(data_root, "array_record")
    clean = build_array_record(os.path.join(data_root, "clean.json"), data_root, tok, out, name="clean",
                               image_size=IMAGE_SIZE)
    bad = build_array_record(os.path.join(data_root, "bad.json"), data_root, tok, out, name="bad",
                             image_size=IMAGE_SIZE, max_bad_fraction=1.0)
    return clean, bad


def test_no_tensorflow(built):
    assert "tensorflow" not in sys.modules
    (path, counts), _ = built
    assert counts == {}
    names = sorted(os.listdir(path))
    assert "dataset_info.json" in names and "features.json" in names
    assert any(n.startswith("llava_array_record-train.array_record-") for n in names)


def test_same_batches_as_json(data_root, tok, built):
    (path, _), _ = built
    kw = dict(num_epochs=2, drop_remainder=False, buckets=(96, 160, 256))
    from_json = list(make_dataset(config(data_root, **kw), tok, process_index=0, process_count=1))
    from_ar = list(make_dataset(config(data_root, **{**kw, "data_path": path}), tok, process_index=0,
                                process_count=1))
    assert sum(len(b["index"]) for b in from_ar) == 2 * len(CLEAN)
    assert_batches_equal(from_ar, from_json)  # tokens, labels, pixels (PNG is lossless), shapes


def test_bad_records_dropped_at_build(data_root, tok, built):
    _, (path, counts) = built
    _, reasons, _ = bad_json_records()
    want = {r: list(reasons.values()).count(r) for r in set(reasons.values()) if r != "too_long"}
    assert counts == want  # too_long depends on max_len: stored untruncated, dropped when read
    it = iter(make_dataset(config(data_root, data_path=path, num_epochs=1, drop_remainder=False,
                                  max_bad_fraction=1.0), tok, process_index=0, process_count=1))
    n = sum(int((b["index"] >= 0).sum()) for b in it)   # the too_long record keeps an empty slot
    assert n == len(CLEAN) and it.stats()["bad"]["too_long"] == 1


def test_resume_from_array_record(data_root, tok, built):
    (path, _), _ = built
    cfg = config(data_root, data_path=path)
    want = take(iter(make_dataset(cfg, tok, process_index=1, process_count=2)), 6)
    first = iter(make_dataset(cfg, tok, process_index=1, process_count=2))
    got = take(first, 2)
    resumed = iter(make_dataset(cfg, tok, process_index=1, process_count=2))
    resumed.set_state(first.get_state())
    assert_batches_equal(got + take(resumed, 4), want)


def test_build_settings_must_match(data_root, tok, built):
    (path, _), _ = built
    with pytest.raises(ValueError, match="built with"):
        make_dataset(config(data_root, data_path=path, image_mode="square"), tok, process_index=0, process_count=1)


@pytest.mark.slow   # worker processes
def test_worker_processes(data_root, tok, built):
    """mp_prefetch workers decode; bad samples are dropped after them: same batches, exact resume."""
    (path, _), _ = built
    cfg = config(data_root, data_path=path)
    want = take(iter(make_dataset(cfg, tok, process_index=0, process_count=1)), 6)
    mp_cfg = dataclasses.replace(cfg, num_workers=1)
    its = [iter(make_dataset(mp_cfg, tok, process_index=0, process_count=1)) for _ in range(2)]
    try:
        got = take(its[0], 3)
        its[1].set_state(its[0].get_state())
        got += take(its[1], 3)
    finally:
        for it in its:
            it.close()
    assert_batches_equal(got, want)


def test_rebuild_reuses_or_refuses(data_root, tok, built):
    _, (path, counts) = built
    again = build_array_record(os.path.join(data_root, "bad.json"), data_root, tok,
                               os.path.join(data_root, "array_record"), name="bad", image_size=IMAGE_SIZE,
                               max_bad_fraction=1.0)
    assert again == (path, counts)
    with pytest.raises(ValueError, match="holds a build"):
        build_array_record(os.path.join(data_root, "clean.json"), data_root, tok,
                           os.path.join(data_root, "array_record"), name="bad", image_size=IMAGE_SIZE)


def test_a_build_is_read_only_with_its_own_system_turn(data_root, built):
    from infllava_jax.data.arrayrecord import open_array_record
    (path, _), _ = built
    spec = config(data_root, data_path=path).spec
    open_array_record(path, spec)                      # built with the system turn (the default)
    with pytest.raises(ValueError, match="'system_prompt': True.*'system_prompt': False"):
        open_array_record(path, dataclasses.replace(spec, system_prompt=False))
