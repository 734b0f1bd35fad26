"""data.feature_bank: training on the frozen tower's precomputed features is training on pixels."""
import json

import jax
import numpy as np
import pytest

from configs import tiny
from infllava_jax import params as params_lib
from infllava_jax.data.pipeline import open_source
from infllava_jax.training import feature_bank, loop
from tests.test_multihost import make_clean_dataset
from tests.tiers import slow

STEPS = 3


def _train(data, workdir, bank: bool, variant: str, also_train=()):
    cfg = tiny.get_config(f"stage=2,variant={variant},steps={STEPS}")
    cfg.mesh = {"data": 4, "fsdp": 1, "tensor": 1}
    cfg.data.synthetic, cfg.data.path, cfg.data.image_folder = False, str(data / "train.json"), str(data)
    cfg.data.max_len, cfg.log_every, cfg.checkpoint_every, cfg.export_final = 160, 1, 100, False
    cfg.data.feature_bank, cfg.also_train = bank, also_train
    t = loop.Trainer(cfg, workdir)
    summary = t.fit()
    losses = [json.loads(x)["loss"] for x in (workdir / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    return t, summary, losses


@pytest.mark.parametrize("variant", slow("released", "paper"))   # the fast path; every view + the paper's pooling
def test_bank_trains_exactly_as_pixels(tmp_path, variant):
    """Same losses, same parameters after 3 steps, same bad-sample counts (a record whose image is
    missing is counted, not crashed on, in both)."""
    data = make_clean_dataset(tmp_path / "data")
    recs = json.loads((data / "train.json").read_text())
    recs[5]["image"] = "gone.png"
    (data / "train.json").write_text(json.dumps(recs))
    ref, ref_sum, ref_losses = _train(data, tmp_path / "pixels", False, variant)
    got, got_sum, got_losses = _train(data, tmp_path / "bank", True, variant)
    assert got.bank is not None and ref.bank is None
    assert got.bank.shape == (got.mc.dem.num_crops + (1 if variant == "released" else got.mc.dem.num_crops + 1),
                              got.mc.tokens_per_image, got.mc.vision.hidden_size)
    assert len(got_losses) == STEPS
    np.testing.assert_allclose(got_losses, ref_losses, rtol=1e-5)
    assert got_sum["data"] == ref_sum["data"] and ref_sum["data"]["bad"]["missing_image"] >= 1
    # Adam moves every parameter by ~lr (3e-4) per step whatever its gradient's size, so near-zero
    # gradients may round either way: parameters agree to 1e-5, a tenth of one step's move
    for a, b in zip(jax.tree.leaves(got.params()), jax.tree.leaves(ref.params())):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    # the trained tower is the initial one, so a next run on the same images (a stage 2) reuses the bank
    records, processor = open_source(loop.data_config(got.cfg, got.mc, got.workdir, 4), got.tok)
    assert feature_bank.build(got.mc, got.params(), records, processor, got.mesh) is got.bank
    if variant == "paper":   # every view: the local / strided crops' banks are slices of it (the study)
        check_one_view_banks_are_slices(got, records, processor)


def check_one_view_banks_are_slices(got, records, processor):
    import dataclasses
    full, N = dict(feature_bank._LAST), got.mc.dem.num_crops
    for views, start in (("local", 0), ("strided", N)):
        mc = dataclasses.replace(got.mc, dem=dataclasses.replace(got.mc.dem, views=views))
        params = {**params_lib.init_params(mc, seed=0), "vision_tower": got.params()["vision_tower"]}
        sliced = feature_bank.build(mc, params, records, processor, got.mesh)
        np.testing.assert_array_equal(sliced.features, got.bank.features[:, start:start + N])
        feature_bank._LAST.clear()          # now computed from the pixels of that view alone
        fresh = feature_bank.build(mc, params, records, processor, got.mesh)
        feature_bank._LAST.clear()
        feature_bank._LAST.update(full)
        assert fresh is not sliced and fresh.rows == sliced.rows and fresh.shape == sliced.shape == (N, *got.bank.shape[1:])
        np.testing.assert_allclose(sliced.features, fresh.features, rtol=1e-5, atol=1e-5)


def test_bank_needs_a_frozen_tower(tmp_path):
    data = make_clean_dataset(tmp_path / "data")
    with pytest.raises(ValueError, match="feature_bank=True needs a frozen vision tower"):
        _train(data, tmp_path / "w", True, "released", also_train=("vision_tower",))
