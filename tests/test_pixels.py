"""Pixels: PyTorch-exact bicubic/bilinear resizes and the released CLIP/LLaVA preprocessing."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from skimage import data as skdata

from infllava_jax.pixels import (
    CLIP_MEAN,
    CLIP_STD,
    MEAN_COLOR,
    _separable,
    bicubic_matrix,
    bilinear_matrix,
    expand2square,
    normalise,
    preprocess,
    resize_bicubic,
    resized_bytes,
)


def resize_bilinear(x, out_h: int, out_w: int):
    """Resize (..., H, W, C) like torch interpolate(mode="bilinear", align_corners=False, antialias=False)
    with the bilinear matrices the DEM pools with."""
    h, w = x.shape[-3], x.shape[-2]
    return _separable(x, bilinear_matrix(h, out_h), bilinear_matrix(w, out_w))


def to_pixels_nchw(x):
    """(..., H, W, C) -> (..., C, H, W) (PyTorch layout); numpy or jax arrays."""
    return x.swapaxes(-1, -3).swapaxes(-1, -2)


def from_nchw(x):
    """(..., C, H, W) -> (..., H, W, C)."""
    return x.swapaxes(-3, -1).swapaxes(-3, -2)


def torch_resize(x, out_h, out_w, mode):
    t = torch.from_numpy(np.ascontiguousarray(to_pixels_nchw(x)))
    y = F.interpolate(t, size=(out_h, out_w), mode=mode, align_corners=False)
    return from_nchw(y.numpy())


def torch_matrix(n, out, mode):
    """The (out, n) matrix torch applies along H, read off by resizing the identity."""
    eye = torch.eye(n).reshape(n, 1, n, 1)
    return F.interpolate(eye, size=(out, 1), mode=mode, align_corners=False)[:, 0, :, 0].T.numpy()


def normal(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# ----------------------------------------------------------------------------- resizes

RESIZE_CASES = [
    (336, 336, 1008, 1008),  # inference: 336 loader -> 1008 encoder
    (1008, 1008, 336, 336),
    (100, 60, 37, 211),  # non-square, mixed up/down
    (60, 100, 211, 37),
    (37, 211, 100, 60),
    (5, 7, 5, 7),  # identity
    (2, 3, 9, 1),  # tiny: every tap edge-clamped
]


@pytest.mark.parametrize("h,w,oh,ow", RESIZE_CASES)
def test_bicubic_matches_torch(h, w, oh, ow):
    x = normal((2, h, w, 3))
    err = np.abs(np.asarray(resize_bicubic(x, oh, ow)) - torch_resize(x, oh, ow, "bicubic")).max()
    assert err <= 1e-5, err


@pytest.mark.parametrize(
    "h,w,oh,ow",
    [
        (1008, 1008, 504, 504), (1008, 1008, 336, 336), (1008, 1008, 252, 252),  # / 2, 3, 4
        (96, 72, 48, 36), (96, 72, 32, 24), (96, 72, 24, 18),  # non-square / 2, 3, 4
        (24, 24, 48, 48), (100, 60, 37, 211), (5, 7, 5, 7), (1, 4, 3, 1),
    ],
)
def test_bilinear_matches_torch(h, w, oh, ow):
    x = normal((2, h, w, 3), seed=1)
    err = np.abs(np.asarray(resize_bilinear(x, oh, ow)) - torch_resize(x, oh, ow, "bilinear")).max()
    assert err <= 1e-5, err


def test_bicubic_on_real_image_336_to_1008():
    x = preprocess(Image.fromarray(skdata.coffee()), 336, "pad")
    err = np.abs(np.asarray(resize_bicubic(x, 1008, 1008)) - torch_resize(x[None], 1008, 1008, "bicubic")[0]).max()
    assert err <= 1e-5, err


@pytest.mark.parametrize("n,out", [(336, 1008), (1008, 336), (60, 211), (22, 825), (1411, 97), (3, 2)])
@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
def test_weights_match_torch(mode, n, out):
    # Exact (0.0) on the torch 2.x x86 CPU build; plain fp32 without FMA emulation is 2e-5 off.
    ours = (bicubic_matrix if mode == "bicubic" else bilinear_matrix)(n, out)
    assert np.abs(ours - torch_matrix(n, out, mode)).max() <= 2.5e-7


def test_batch_dims_jit_and_dtype():
    x = normal((2, 3, 20, 14, 4), seed=2)
    y = jax.jit(resize_bicubic, static_argnums=(1, 2))(x, 9, 31)
    assert y.shape == (2, 3, 9, 31, 4) and y.dtype == jnp.float32
    ref = torch_resize(x.reshape(6, 20, 14, 4), 9, 31, "bicubic").reshape(y.shape)
    assert np.abs(np.asarray(y) - ref).max() <= 1e-5
    single = resize_bicubic(x[0, 0], 9, 31)  # no batch dims
    assert np.abs(np.asarray(single) - ref[0, 0]).max() <= 1e-5
    yb = resize_bilinear(jnp.asarray(x[0], jnp.bfloat16), 10, 7)
    assert yb.dtype == jnp.bfloat16 and yb.shape == (3, 10, 7, 4)


def test_downsample_1008_to_336_is_every_third_pixel():
    x = normal((1008, 1008, 3), seed=3)
    np.testing.assert_array_equal(np.asarray(resize_bicubic(x, 336, 336)), x[1::3, 1::3])
    np.testing.assert_array_equal(torch_resize(x[None], 336, 336, "bicubic")[0], x[1::3, 1::3])


@pytest.mark.parametrize("n", [1, 3, 5, 7])
def test_odd_factor_samples_cell_centre(n):
    sh, sw = 16, 12
    x = normal((2, n * sh, n * sw, 3), seed=n)
    c = (n - 1) // 2
    np.testing.assert_array_equal(np.asarray(resize_bicubic(x, sh, sw)), x[:, c::n, c::n])


def test_selection_is_sliced_and_other_resizes_multiply():
    """An odd-factor downsample runs as a slice (no dot in the program), with the bits of the
    dense product; an upsample or an even factor still multiplies."""
    x = normal((2, 252, 252, 3), seed=5)
    dense = np.asarray(jnp.einsum("oh,pw,bhwc->bopc", bicubic_matrix(252, 84), bicubic_matrix(252, 84), x,
                                  precision=jax.lax.Precision.HIGHEST))
    np.testing.assert_array_equal(np.asarray(resize_bicubic(x, 84, 84)), dense)
    dots = lambda *shape: jax.jit(resize_bicubic, static_argnums=(1, 2)).lower(*shape).as_text().count("dot_general")
    assert dots(x, 84, 84) == 0
    assert dots(x, 126, 126) == 2 and dots(x[:, :84, :84], 252, 252) == 2
    assert dots(x, 84, 126) == 1           # one axis selects, the other is even (252 -> 126)


def test_even_factor_does_not_sample_a_pixel():
    x = normal((64, 64, 3), seed=4)
    y = np.asarray(resize_bicubic(x, 32, 32))
    assert min(np.abs(y - x[0::2, 0::2]).max(), np.abs(y - x[1::2, 1::2]).max()) > 0.1


def test_layout_round_trip():
    x = normal((2, 5, 7, 3))
    assert to_pixels_nchw(x).shape == (2, 3, 5, 7)
    np.testing.assert_array_equal(to_pixels_nchw(x), np.transpose(x, (0, 3, 1, 2)))
    np.testing.assert_array_equal(from_nchw(to_pixels_nchw(x)), x)


# ----------------------------------------------------------------------------- preprocessing

def clip_processor(size):
    """CLIPImageProcessor as configured for openai/clip-vit-large-patch14-336, built offline.

    The released code (transformers 4.37) ran the PIL/numpy processor. In v5 that is
    `CLIPImageProcessorPil`; `CLIPImageProcessor` is the torchvision backend there.
    """
    import transformers

    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    proc = cls(
        do_resize=True, size={"shortest_edge": size}, resample=3, do_center_crop=True,
        crop_size={"height": size, "width": size}, do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), do_convert_rgb=True,
    )
    assert getattr(proc, "backend", "pil") == "pil"
    return proc


IMAGES = ["astronaut", "coffee", "chelsea", "rocket", "retina"]  # 512^2, 400x600, 300x451, 427x640, 1411^2


@pytest.fixture(scope="module")
def processors():
    return {s: clip_processor(s) for s in (336, 1008)}


@pytest.mark.parametrize("mode", ["pad", "square"])
@pytest.mark.parametrize("size", [336, 1008])
@pytest.mark.parametrize("name", IMAGES)
def test_preprocess_matches_clip_processor(processors, name, size, mode):
    img = Image.fromarray(getattr(skdata, name)())
    ref_in = expand2square(img, tuple(int(m * 255) for m in CLIP_MEAN)) if mode == "pad" else img
    ref = processors[size](ref_in, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    ours = preprocess(img, size, mode)
    assert ours.shape == (size, size, 3) and ours.dtype == np.float32
    err = np.abs(ours - ref).max()
    assert err <= 1e-6, err


def test_expand2square_and_mean_colour():
    assert MEAN_COLOR == (122, 116, 104)
    img = Image.fromarray(skdata.coffee())  # 600 wide x 400 high: 100-row bands above and below
    sq = np.asarray(expand2square(img))
    assert sq.shape == (600, 600, 3)
    np.testing.assert_array_equal(sq[100:500], skdata.coffee())
    assert (sq[:100] == MEAN_COLOR).all() and (sq[500:] == MEAN_COLOR).all()
    tall = np.asarray(expand2square(Image.fromarray(skdata.coffee()[:, :301])))  # 301 wide x 400
    np.testing.assert_array_equal(tall[:, 49:350], skdata.coffee()[:, :301])
    assert (tall[:, :49] == MEAN_COLOR).all() and (tall[:, 350:] == MEAN_COLOR).all()
    # after preprocessing the padding normalises to ~0 (exactly the normalised mean colour)
    x = preprocess(img, 336, "pad")
    band = (np.asarray(MEAN_COLOR, np.float64) / 255 - CLIP_MEAN) / CLIP_STD
    assert np.abs(band).max() < 0.02
    np.testing.assert_allclose(x[:50], np.broadcast_to(band, x[:50].shape), atol=1e-6)
    np.testing.assert_allclose(x[-50:], np.broadcast_to(band, x[-50:].shape), atol=1e-6)


def test_square_image_modes_agree():
    img = Image.fromarray(skdata.astronaut())
    np.testing.assert_array_equal(preprocess(img, 336, "pad"), preprocess(img, 336, "square"))
    with pytest.raises(ValueError):
        preprocess(img, 336, "crop")


def test_preprocess_normalises_every_byte_as_the_formula():
    """The byte -> float table gives the bits of rescale (float64, then fp32) and normalise (fp32)."""
    img = np.stack(np.meshgrid(np.arange(256), np.arange(3), indexing="ij"), -1)[..., 0]   # (256, 3)
    img = np.stack([np.roll(img[:, 0], 85 * c) for c in range(3)], -1).astype(np.uint8)      # every byte, every channel
    img = np.tile(img[:, None], (1, 256, 1))                                                  # 256 x 256, rows constant
    ours = preprocess(img, 256, "square")       # no resize (same size): the bytes reach the table as they are
    x = (img.astype(np.float64) * (1 / 255)).astype(np.float32)
    want = (x - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)
    assert ours.dtype == np.float32 and np.array_equal(ours, want)


def test_normalise_on_the_device_gives_the_host_bits():
    """The server sends `resized_bytes` and normalises inside the program: the same floats."""
    img = Image.fromarray(skdata.astronaut())
    b = resized_bytes(img, 84, "pad")
    assert b.dtype == np.uint8 and b.shape == (84, 84, 3)
    host = preprocess(img, 84, "pad")
    device = jax.jit(normalise)(jnp.asarray(b))
    assert device.dtype == jnp.float32 and np.array_equal(np.asarray(device), host)
