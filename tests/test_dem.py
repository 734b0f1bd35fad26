"""DEM: JAX vs the PyTorch reference, exact fast path vs full computation, paper variant, names."""
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from convert import engine
from infllava_jax import dem
from infllava_jax.pixels import bilinear_matrix
from infllava_jax.dem import DEM, DEMConfig
from tests.partitioning import assert_all_partitioned
from tests.tiers import slow
from tests.torch_ref import random_spatial_embed

TOL = 1e-5  # max |x - ref| / max |ref|


def dem_params_from_torch(sd, cfg=DEMConfig(), prefix=""):
    """dem.key_map applied by the one conversion engine."""
    return engine.from_torch(dem.key_map(cfg), sd, dem.abstract_params(cfg), prefix=prefix)


def dem_params_to_torch(params, prefix=""):
    return engine.to_torch(dem.key_map(), params, prefix=prefix)


def rel(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(x - ref).max() / np.abs(ref).max())


def small(**kw):
    base = dict(hidden=64, num_heads=4, head_dim=16, ffn_hidden=8, ffn_out=32, g=6)
    return DEMConfig(**{**base, **kw})


def features(cfg, batch=1, seed=0):
    rng = np.random.default_rng(seed)
    N, L, D = cfg.num_crops, cfg.g * cfg.g, cfg.hidden
    local = rng.standard_normal((batch, N, L, D)).astype(np.float32)
    strided = rng.standard_normal((batch, N, L, D)).astype(np.float32)
    low = rng.standard_normal((batch, L, D)).astype(np.float32)
    return local, strided, low


def torch_model(cfg, seed=0):
    tm = random_spatial_embed(seed, cfg.hidden, cfg.num_heads, cfg.head_dim, cfg.ffn_hidden)
    return tm, dem_params_from_torch(tm.state_dict(), cfg)


@functools.lru_cache(maxsize=None)
def _apply(cfg, method="full", intermediates=False):
    m = DEM(cfg)
    fn = DEM.fast if method == "fast" else DEM.__call__

    def f(params, *args):
        if intermediates:
            return m.apply({"params": params}, *args, method=fn, mutable=["intermediates"])
        return m.apply({"params": params}, *args, method=fn)
    return jax.jit(f)


def full(cfg, params, *args, **kw):
    return _apply(cfg, "full", **kw)(params, *args)


def fast(cfg, params, *args):
    return _apply(cfg, "fast")(params, *args)


def sampled(cfg, strided):
    idx = [p * cfg.nW + q for p, q in cfg.fast_path_phases]
    assert tuple(idx) == cfg.fast_path_crop_indices
    return strided[:, idx]


def torch_run(tm, *arrays, **kw):
    with torch.no_grad():
        return tm(*map(torch.from_numpy, arrays), **kw).numpy()


# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_released_real_size_n3_against_torch():
    """D=1024, 8x128 heads, g=24, 3x3 grid: JAX full, JAX fast, torch closed form vs torch full."""
    cfg = DEMConfig()
    tm, params = torch_model(cfg, seed=1)
    local, strided, low = features(cfg, seed=1)
    strided[:, 4] = low   # strided crop (1, 1) is the low-resolution view (docs/model.md section 2)
    ref = torch_run(tm, local, strided, low)
    with torch.no_grad():
        closed = tm.closed_form(torch.from_numpy(local), torch.from_numpy(low), n=3).numpy()
    out = full(cfg, params, local, strided, low)
    out_fast = fast(cfg, params, local, low, low)   # 9 local crops + the low-res view only
    assert out.shape == out_fast.shape == (1, 576, 1024)
    errs = rel(out, ref), rel(out_fast, ref), rel(closed, ref), rel(out_fast, out)
    print("real-size n=3 rel errs (jax full, jax fast, torch closed form vs torch full; fast vs full):", errs)
    assert max(errs) <= TOL, errs


@pytest.mark.parametrize("nH,nW,g", [(3, 3, 6), (2, 3, 6), *slow((2, 2, 4), (1, 1, 3), (3, 1, 3))])
def test_released_small_against_torch(nH, nW, g):
    cfg = small(nH=nH, nW=nW, g=g)
    tm, params = torch_model(cfg)
    local, strided, low = features(cfg, batch=2)
    ref = torch_run(tm, local, strided, low, nH=nH, nW=nW)
    out = full(cfg, params, local, strided, low)
    assert out.shape == (2, g * g, cfg.hidden)
    assert rel(out, ref) <= TOL, rel(out, ref)


def test_released_intermediates_against_torch():
    cfg = small(nH=2, nW=3, g=4)
    tm, params = torch_model(cfg)
    local, strided, low = features(cfg)
    with torch.no_grad():
        _, maps = tm(*map(torch.from_numpy, (local, strided, low)), nH=2, nW=3, return_maps=True)
    _, inter = full(cfg, params, local, strided, low, intermediates=True)
    for name in ("A", "B", "F"):
        got = inter["intermediates"][name][0]
        assert rel(got, maps[name].numpy()) <= TOL, name


@pytest.mark.parametrize("nH,nW,g", [
    (3, 3, 24),           # the released geometry (k = (i // 8, j // 8))
    (2, 2, 4),            # even: the central 2x2 phases
    *slow((1, 1, 4), (5, 5, 10), (3, 3, 9), (4, 4, 8),
          (3, 2, 6), (1, 3, 6)),  # mixed / non-square
])
def test_fast_path_equals_full(nH, nW, g):
    cfg = small(nH=nH, nW=nW, g=g)
    _, params = torch_model(cfg)
    local, strided, low = features(cfg, batch=2, seed=3)
    if cfg.low_is_centre_strided_crop:
        (p, q), = cfg.fast_path_phases
        assert (p, q) == (nH // 2, nW // 2)
        strided[:, p * nW + q] = low
    ref = full(cfg, params, local, strided, low)
    out = fast(cfg, params, local, sampled(cfg, strided), low)
    assert rel(out, ref) <= TOL, rel(out, ref)
    if cfg.low_is_centre_strided_crop and nH in (3, 5):   # the model passes the low-res view itself
        np.testing.assert_array_equal(fast(cfg, params, local, low, low), out)


def test_fast_path_phases_and_vit_passes():
    assert DEMConfig().fast_path_phases == ((1, 1),) and DEMConfig().fast_path_weights == (1.0,)
    assert DEMConfig().vit_passes() == 10 and DEMConfig().vit_passes(fast=False) == 19
    c4 = DEMConfig(nH=4, nW=4)
    assert c4.fast_path_phases == ((1, 1), (1, 2), (2, 1), (2, 2)) and c4.fast_path_weights == (0.25,) * 4
    assert c4.vit_passes() == 16 + 4 + 1
    assert DEMConfig(nH=2, nW=2).vit_passes() == 4 + 4 + 1  # n=2: every strided crop is sampled
    assert DEMConfig(nH=3, nW=2).fast_path_phases == ((1, 0), (1, 1))
    assert DEMConfig(nH=2, nW=3).fast_path_crop_indices == (1, 4)


def test_released_output_ignores_unsampled_strided_crops():
    """n=3: only strided crop (1, 1) reaches the output; the paper variant uses all of them."""
    for variant in ("released", "paper"):
        cfg = small(variant=variant)
        _, params = torch_model(cfg)
        local, strided, low = features(cfg)
        changed = strided.copy()
        changed[:, [0, 1, 2, 3, 5, 6, 7, 8]] += 1.0
        same = np.array_equal(full(cfg, params, local, strided, low), full(cfg, params, local, changed, low))
        assert same == (variant == "released")


def test_fast_path_unsupported_raises():
    with pytest.raises(ValueError, match="divisible"):
        DEMConfig(nH=5, nW=5, fast_path=True)   # g=24 is not a multiple of 5
    with pytest.raises(ValueError, match="released"):
        DEMConfig(variant="paper", fast_path=True)
    assert not DEMConfig(nH=5, nW=5).use_fast_path and not DEMConfig(variant="paper").use_fast_path
    assert DEMConfig().use_fast_path and not DEMConfig(fast_path=False).use_fast_path
    cfg = small(variant="paper")
    _, params = torch_model(cfg)
    local, _, low = features(cfg)
    with pytest.raises(ValueError, match="released"):
        DEM(cfg).apply({"params": params}, local, low, low, method=DEM.fast)


def test_shape_errors():
    cfg = small()
    _, params = torch_model(cfg)
    local, strided, low = features(cfg)
    with pytest.raises(ValueError, match="strided"):
        DEM(cfg).apply({"params": params}, local, strided[:, :4], low)
    with pytest.raises(ValueError, match="sampled"):
        DEM(cfg).apply({"params": params}, local, strided[:, :2], low, method=DEM.fast)


# ---------------------------------------------------------------------------------------------
def test_torch_closed_form_matches_torch_full_n5():
    cfg = small(nH=5, nW=5, g=10)
    tm, _ = torch_model(cfg)
    local, strided, low = features(cfg)
    strided[:, 12] = low
    ref = torch_run(tm, local, strided, low, nH=5, nW=5)
    with torch.no_grad():
        closed = tm.closed_form(torch.from_numpy(local), torch.from_numpy(low), n=5).numpy()
    assert rel(closed, ref) <= TOL


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_bilinear_pooling_samples(n):
    """The released 'pooling' reads the cell centre (odd n) or the mean of the central 2x2 (even n)."""
    g, D = 4, 3
    Fm = np.random.default_rng(0).standard_normal((n * g, n * g, D)).astype(np.float32)
    t = torch.nn.functional.interpolate(torch.from_numpy(Fm).permute(2, 0, 1)[None], size=(g, g),
                                        mode="bilinear", align_corners=False)[0].permute(1, 2, 0).numpy()
    w = bilinear_matrix(n * g, g)
    np.testing.assert_allclose(np.einsum("iy,jx,yxd->ijd", w, w, Fm), t, rtol=0, atol=1e-6)
    c = n // 2
    want = Fm[c::n, c::n] if n % 2 else Fm[c - 1::n, c - 1::n] / 4 + Fm[c::n, c - 1::n] / 4 \
        + Fm[c - 1::n, c::n] / 4 + Fm[c::n, c::n] / 4
    np.testing.assert_allclose(t, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("nH, nW", [(2, 3), *slow((3, 3))])
def test_paper_variant_against_torch_and_numpy(nH, nW):
    """Average pooling over each nH x nW cell, v = S + pooled; heads/width configurable."""
    cfg = small(variant="paper", nH=nH, nW=nW, g=4, num_heads=2, head_dim=8)   # width 16 != D 64
    tm, params = torch_model(cfg)
    local, strided, low = features(cfg, batch=2)
    ref = torch_run(tm, local, strided, low, nH=nH, nW=nW, pooling="avg", combine="add")
    out, inter = full(cfg, params, local, strided, low, intermediates=True)
    assert out.shape == (2, 16, cfg.hidden)
    assert rel(out, ref) <= TOL
    Fm = np.asarray(inter["intermediates"]["F"][0], np.float64)
    pooled = np.zeros((2, 4, 4, cfg.hidden))
    for i in range(4):
        for j in range(4):
            pooled[:, i, j] = Fm[:, i * nH:(i + 1) * nH, j * nW:(j + 1) * nW].mean(axis=(1, 2))
    np.testing.assert_allclose(out, low + pooled.reshape(2, 16, -1), rtol=0, atol=1e-5)


def test_bfloat16_compute_close_to_fp32():
    cfg = small()
    _, params = torch_model(cfg)
    args = features(cfg)
    ref = full(cfg, params, *args)
    out = full(dataclasses.replace(cfg, dtype="bfloat16"), params, *args)
    assert out.dtype == jnp.bfloat16 and rel(out, ref) < 3e-2


# ---------------------------------------------------------------------------------------------
def test_logical_axes_complete():
    cfg = small()
    boxed = jax.eval_shape(DEM(cfg).init, jax.random.key(0), *features(cfg))["params"]
    assert_all_partitioned(boxed)
    axes = nn.get_partition_spec(boxed)
    assert axes["attention"]["q_proj"]["kernel"] == jax.sharding.PartitionSpec("embed", "heads")
    assert axes["attention"]["o_proj"]["kernel"] == jax.sharding.PartitionSpec("heads", "embed")
    assert axes["ffn_crop"]["fc1"]["kernel"] == jax.sharding.PartitionSpec("embed", "mlp")
    assert axes["ffn_stride"]["fc2"]["kernel"] == jax.sharding.PartitionSpec("mlp", "embed")
    assert axes["ln_fuse"]["scale"] == jax.sharding.PartitionSpec("norm")


def test_converter_covers_every_param_and_round_trips():
    cfg = small(num_heads=2, head_dim=8)
    tm, params = torch_model(cfg)
    init = nn.meta.unbox(jax.eval_shape(DEM(cfg).init, jax.random.key(0), *features(cfg))["params"])
    assert jax.tree.structure(params) == jax.tree.structure(init)
    assert jax.tree.map(lambda x: x.shape, params) == jax.tree.map(lambda x: x.shape, init)
    sd = {k: v.numpy() for k, v in tm.state_dict().items()}
    assert sorted(sd) == sorted(r.key for r in dem.key_map(cfg))
    back = dem_params_to_torch(params, prefix="model.spatial_embed.")
    assert sorted(back) == sorted("model.spatial_embed." + k for k in sd)
    for k, v in sd.items():
        np.testing.assert_array_equal(back["model.spatial_embed." + k], v)
    # released prefix, bf16 tensors
    prefixed = {"model.spatial_embed." + k: v.bfloat16() for k, v in tm.state_dict().items()}
    prefixed["model.mm_projector.0.weight"] = torch.zeros(2, 2)   # other keys are left alone
    p16 = dem_params_from_torch(prefixed, cfg, prefix="model.spatial_embed.")
    assert rel(p16["attention"]["q_proj"]["kernel"], params["attention"]["q_proj"]["kernel"]) < 1e-2


def test_converter_errors():
    cfg = small()
    sd = dict(random_spatial_embed(0, 64, 4, 16, 8).state_dict())
    missing = {k: v for k, v in sd.items() if k != "ffn_stride.2.bias"}
    with pytest.raises(KeyError, match=r"ffn_stride\.2\.bias"):
        dem_params_from_torch(missing, cfg)
    bad = {**sd, "attention.linears.1.weight": torch.zeros(64, 32)}
    with pytest.raises(ValueError, match=r"attention\.linears\.1\.weight.*\(64, 32\).*\(64, 64\)"):
        dem_params_from_torch(bad, cfg)
    with pytest.raises(ValueError, match="unexpected.*attention.linears.4.weight"):
        dem_params_from_torch({**sd, "attention.linears.4.weight": torch.zeros(1)}, cfg)
    with pytest.raises(ValueError, match=r"attention\.linears\.0\.weight.*\(64, 64\).*\(1024, 64\)"):
        dem_params_from_torch(sd, DEMConfig(hidden=64, ffn_out=32, ffn_hidden=8))


def test_config_validation():
    with pytest.raises(ValueError, match="ffn_out"):
        DEMConfig(ffn_out=256)
    with pytest.raises(ValueError, match="variant"):
        DEMConfig(variant="nope")
    with pytest.raises(ValueError, match="dtype"):
        DEMConfig(dtype="float33")
