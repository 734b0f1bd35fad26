"""DCM: crops equal the paper's index maps (eq. 13 local, eq. 17 strided); inverses are exact."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infllava_jax.crops import interleave, local_crops, mosaic, strided_crops

GRIDS = [(1, 1), (2, 2), (3, 3), (2, 3), (3, 1), (1, 4)]


def _image(nH, nW, s, lead=(), C=3, seed=0):
    return np.random.default_rng(seed).standard_normal((*lead, nH * s, nW * s, C)).astype(np.float32)


def _gather_local(img, nH, nW):
    """Eq. 13 as an explicit gather: crop k = r*nW + c, pixel (y, x) <- img[r*s + y, c*s + x]."""
    s = img.shape[-3] // nH
    k, y, x = np.meshgrid(np.arange(nH * nW), np.arange(s), np.arange(s), indexing="ij")
    r, c = k // nW, k % nW
    return img[..., r * s + y, c * s + x, :]


def _gather_strided(img, nH, nW):
    """Eq. 17 as an explicit gather: crop k = p*nW + q, pixel (y, x) <- img[y*nH + p, x*nW + q]."""
    s = img.shape[-3] // nH
    k, y, x = np.meshgrid(np.arange(nH * nW), np.arange(s), np.arange(s), indexing="ij")
    p, q = k // nW, k % nW
    return img[..., y * nH + p, x * nW + q, :]


@pytest.mark.parametrize("nH,nW", GRIDS)
@pytest.mark.parametrize("lead", [(), (2,)])
def test_crops_match_index_formulas(nH, nW, lead):
    img = _image(nH, nW, 5, lead)
    np.testing.assert_array_equal(local_crops(img, nH, nW), _gather_local(img, nH, nW))
    np.testing.assert_array_equal(strided_crops(img, nH, nW), _gather_strided(img, nH, nW))
    # and the slicing definitions of docs/model.md section 3
    s = 5
    for r in range(nH):
        for c in range(nW):
            np.testing.assert_array_equal(local_crops(img, nH, nW)[..., r * nW + c, :, :, :],
                                          img[..., r * s:(r + 1) * s, c * s:(c + 1) * s, :])
            np.testing.assert_array_equal(strided_crops(img, nH, nW)[..., r * nW + c, :, :, :],
                                          img[..., r::nH, c::nW, :])


@pytest.mark.parametrize("nH,nW", GRIDS)
def test_round_trips_exact(nH, nW):
    img = _image(nH, nW, 4, (2,))
    np.testing.assert_array_equal(mosaic(local_crops(img, nH, nW), nH, nW), img)
    np.testing.assert_array_equal(interleave(strided_crops(img, nH, nW), nH, nW), img)
    feats = np.random.default_rng(1).standard_normal((2, nH * nW, 6, 6, 5)).astype(np.float32)
    np.testing.assert_array_equal(local_crops(mosaic(feats, nH, nW), nH, nW), feats)
    np.testing.assert_array_equal(strided_crops(interleave(feats, nH, nW), nH, nW), feats)


@pytest.mark.parametrize("nH,nW", GRIDS)
def test_feature_map_formulas(nH, nW):
    """F_loc[r*g + y, c*g + x] = feat[r, c][y, x];  F_glo[y*nH + p, x*nW + q] = feat[p, q][y, x]."""
    g, D = 4, 2
    feats = np.random.default_rng(2).standard_normal((nH * nW, g, g, D)).astype(np.float32)
    F_loc, F_glo = np.asarray(mosaic(feats, nH, nW)), np.asarray(interleave(feats, nH, nW))
    assert F_loc.shape == F_glo.shape == (nH * g, nW * g, D)
    for r in range(nH):
        for c in range(nW):
            for y in range(g):
                for x in range(g):
                    np.testing.assert_array_equal(F_loc[r * g + y, c * g + x], feats[r * nW + c, y, x])
                    np.testing.assert_array_equal(F_glo[y * nH + r, x * nW + c], feats[r * nW + c, y, x])


def test_jax_arrays_under_jit_and_image_scale():
    """Real geometry: 1008x1008 pixels into 3x3 crops of 336, on jax arrays under jit."""
    img = jnp.asarray(_image(3, 3, 336, C=3))
    loc = jax.jit(lambda x: local_crops(x, 3, 3))(img)
    st = jax.jit(lambda x: strided_crops(x, 3, 3))(img)
    assert loc.shape == st.shape == (9, 336, 336, 3)
    np.testing.assert_array_equal(st[4], img[1::3, 1::3])   # the low-resolution view (docs/model.md §2)
    np.testing.assert_array_equal(loc[5], img[336:672, 672:1008])
    np.testing.assert_array_equal(jax.jit(lambda f: mosaic(f, 3, 3))(loc), img)
    np.testing.assert_array_equal(jax.jit(lambda f: interleave(f, 3, 3))(st), img)


def test_shape_errors():
    with pytest.raises(ValueError, match="not divisible"):
        local_crops(np.zeros((7, 6, 3)), 2, 2)
    with pytest.raises(ValueError, match="not divisible"):
        strided_crops(np.zeros((6, 7, 3)), 2, 2)
    with pytest.raises(ValueError, match="2x3"):
        mosaic(np.zeros((5, 4, 4, 3)), 2, 3)
    with pytest.raises(ValueError, match="2x3"):
        interleave(np.zeros((5, 4, 4, 3)), 2, 3)
