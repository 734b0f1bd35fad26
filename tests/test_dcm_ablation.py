"""The DCM ablations of the miniature study (DEMConfig.views): one view's crops, average-pooled."""
import jax
import numpy as np
import pytest

from infllava_jax import dem, presets
from infllava_jax.dem import DEMConfig
from infllava_jax.model import InfLlavaModel
from tests.tiers import slow

jax.config.update("jax_default_matmul_precision", "highest")


def _explicit(model, params, pixels, views, n, s, g):
    """Pooled tokens from per-crop ViT calls and an explicit (n*g)^2 map filled by index loops."""
    feats = lambda img: np.asarray(model.apply({"params": params}, img[None], model.config.select_layer,
                                               method=lambda m, x, l: m.vision_tower.features(x, l)))[0]
    D = model.config.vision.hidden_size
    F = np.zeros((n * g, n * g, D))
    for a in range(n):
        for b in range(n):
            if views == "local":    # local crop (a, b) covers pixels [a*s:(a+1)*s, b*s:(b+1)*s]
                f = feats(pixels[a * s:(a + 1) * s, b * s:(b + 1) * s]).reshape(g, g, D)
                F[a * g:(a + 1) * g, b * g:(b + 1) * g] = f
            else:                   # strided crop (a, b) = pixels [a::n, b::n], token (i, j) at (n*i + a, n*j + b)
                f = feats(pixels[a::n, b::n]).reshape(g, g, D)
                F[a::n, b::n] = f
    return F.reshape(g, n, g, n, D).mean(axis=(1, 3)).reshape(g * g, D)


@pytest.mark.parametrize("views,n", slow(("strided", 2), ("local", 2), ("local", 3), ("strided", 3)))
def test_single_view_equals_explicit_pooling(views, n):
    cfg = presets.tiny(grid=n, views=views)
    model = InfLlavaModel(cfg)
    s, g = cfg.sub_image_size, cfg.dem.g
    pixels = np.random.default_rng(n).normal(size=(1, n * s, n * s, 3)).astype(np.float32)
    params = model.init(jax.random.key(0), np.zeros((1, 4), np.int32), pixels)["params"]
    assert "spatial_embed" not in params        # no DEM: nothing to train or convert
    got = np.asarray(model.apply({"params": params}, pixels, method=InfLlavaModel.vision_tokens))[0]
    ref = _explicit(model, params, pixels[0], views, n, s, g)
    assert got.shape == (g * g, cfg.vision.hidden_size)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_views_config():
    assert DEMConfig(views="local").vit_passes() == 9 and DEMConfig(views="strided", nH=2, nW=2).vit_passes() == 4
    assert not DEMConfig(views="local").use_fast_path
    assert dem.key_map(DEMConfig(views="strided")) == [] and dem.key_map(DEMConfig()) != []
    with pytest.raises(ValueError, match="views"):
        DEMConfig(views="global")
    with pytest.raises(ValueError, match="views='local' runs no DEM"):
        DEMConfig(views="local", fast_path=True)
