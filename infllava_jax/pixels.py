"""Pixels: the released LLaVA/CLIP preprocessing (host, numpy/PIL) and PyTorch-exact resizes (JAX).

Preprocessing mirrors what the released code ran: transformers 4.37's `CLIPImageProcessor`,
which is the PIL/numpy processor (the torch "fast" processor did not exist yet). In
transformers v5 that code path is `CLIPImageProcessorPil`; plain `CLIPImageProcessor` there
is the torchvision backend (tensor resize, not PIL's), so it is not what we match.

Resizes work on channels-last arrays (..., H, W, C) with any leading batch dims. They are a
separable pair of small dense matrices, W_h (out_h, in_h) and W_w (out_w, in_w), built in
numpy from static shapes with PyTorch's own fp32 index/weight arithmetic and applied with
two einsums (precision HIGHEST, no gathers), so they run well on TPU/GPU; a matrix that only
selects (odd-factor bicubic downsampling: 1008 -> 336, 252 -> 84) is a strided slice instead.
The weights are bit-identical to those of `torch.nn.functional.interpolate(...,
align_corners=False)` on the CPU build; outputs differ only by summation order (~1e-6 on
normalised pixels).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MEAN_COLOR = tuple(int(m * 255) for m in CLIP_MEAN)  # (122, 116, 104), as LLaVA computes it

_F32 = np.float32


# ----------------------------------------------------------------------------- resize matrices

# PyTorch's kernels are compiled with FMA contraction, so `a * b + c` there is rounded once.
# Emulate it (the f32 product is exact in f64): plain fp32 gets src one ulp off, which at
# src ~ 300 moves the cubic weights by ~2e-5 (336 -> 1008 then errs by 1e-4).
def _fma(a, b, c) -> np.ndarray:
    return (np.float64(a) * np.asarray(b, np.float64) + np.float64(c)).astype(_F32)


def _source_index(in_size: int, out_size: int) -> np.ndarray:
    """torch area_pixel_compute_source_index: fp32 scale = in / out (sizes given), fma'd."""
    scale = _F32(in_size) / _F32(out_size)
    return _fma(scale, np.arange(out_size, dtype=_F32) + _F32(0.5), _F32(-0.5))


@functools.lru_cache(maxsize=64)
def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) fp32 matrix of torch's upsample_bicubic2d (a=-0.75, edge-clamped taps)."""
    a = _F32(-0.75)
    src = _source_index(in_size, out_size)  # cubic: no clamp at 0
    idx = np.minimum(np.floor(src).astype(np.int64), in_size - 1)  # guard_index_and_lambda
    t = np.clip(src - idx.astype(_F32), _F32(0), _F32(1))

    # which steps the torch 2.x CPU build fuses was found empirically (weights then match exactly)
    def conv1(x):  # |x| <= 1: ((a+2)x - (a+3)) x x + 1
        return _fma(a + 2, x, -(a + 3)) * x * x + 1

    def conv2(x):  # 1 < |x| < 2: ((a x - 5a) x + 8a) x - 4a
        return _fma(_fma(a, x, -5 * a), x, 8 * a) * x - 4 * a

    one = _F32(1)
    coeffs = (conv2(t + one), conv1(t), conv1(one - t), conv2(one - t + one))
    m = np.zeros((out_size, in_size), _F32)
    rows = np.arange(out_size)
    for k, w in enumerate(coeffs):  # taps idx-1 .. idx+2, clamped to the edge (weights add up)
        np.add.at(m, (rows, np.clip(idx - 1 + k, 0, in_size - 1)), w.astype(_F32))
    m.flags.writeable = False  # cached: shared between callers
    return m


@functools.lru_cache(maxsize=64)
def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) fp32 matrix of torch's upsample_bilinear2d (align_corners=False, no antialias)."""
    if in_size == out_size:  # torch's identity shortcut
        m = np.eye(in_size, dtype=_F32)
        m.flags.writeable = False
        return m
    src = np.maximum(_source_index(in_size, out_size), _F32(0))  # linear: clamp at 0
    idx = src.astype(np.int64)  # truncation (src >= 0)
    lam1 = np.clip(src - idx.astype(_F32), _F32(0), _F32(1))
    lam0 = _F32(1) - lam1
    nxt = np.where(idx < in_size - 1, idx + 1, idx)
    m = np.zeros((out_size, in_size), _F32)
    rows = np.arange(out_size)
    np.add.at(m, (rows, idx), lam0)
    np.add.at(m, (rows, nxt), lam1)
    m.flags.writeable = False
    return m


def _selection(m: np.ndarray) -> slice | None:
    """The slice that `m` applies, when `m` is a strided selection (every row a single 1.0, the
    rest 0: bicubic downsampling by an odd integer factor samples each cell's centre)."""
    out = m.shape[0]
    cols = np.argmax(m, axis=1)
    if not (np.all(m[np.arange(out), cols] == 1) and np.count_nonzero(m) == out):
        return None
    step = int(cols[1] - cols[0]) if out > 1 else 1
    if step < 1 or np.any(cols != cols[0] + step * np.arange(out)):
        return None
    return slice(int(cols[0]), int(cols[0]) + step * (out - 1) + 1, step)


def _separable(x: jax.Array, wh: np.ndarray, ww: np.ndarray) -> jax.Array:
    """y[..., o, p, c] = sum_hw wh[o, h] ww[p, w] x[..., h, w, c], in fp32 (or wider), HIGHEST.
    A selection matrix is applied as a strided slice: the same values (x * 1 + 0s), no matmul."""
    x = jnp.asarray(x)
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    xf = x.astype(dtype)
    sh, sw = _selection(wh), _selection(ww)
    if sh is not None:
        xf, wh = xf[..., sh, :, :], None
    if sw is not None:
        xf, ww = xf[..., sw, :], None
    hp = jax.lax.Precision.HIGHEST
    apply_h = lambda z: z if wh is None else jnp.einsum("oh,...hwc->...owc", jnp.asarray(wh, dtype), z, precision=hp)
    apply_w = lambda z: z if ww is None else jnp.einsum("pw,...hwc->...hpc", jnp.asarray(ww, dtype), z, precision=hp)
    ih, iw = xf.shape[-3:-1]
    oh, ow = ih if wh is None else wh.shape[0], iw if ww is None else ww.shape[0]
    # contract first along the axis that makes the intermediate cheaper
    if oh * ih * iw + oh * ow * iw <= ih * ow * iw + oh * ih * ow:
        y = apply_w(apply_h(xf))
    else:
        y = apply_h(apply_w(xf))
    return y.astype(x.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else y


def resize_bicubic(x: jax.Array, out_h: int, out_w: int) -> jax.Array:
    """Resize (..., H, W, C) like torch interpolate(mode="bicubic", align_corners=False).

    No antialias; scale = in/out. Computed in fp32; float inputs keep their dtype.
    """
    h, w = x.shape[-3], x.shape[-2]
    return _separable(x, bicubic_matrix(h, out_h), bicubic_matrix(w, out_w))


# ----------------------------------------------------------------------------- host preprocessing

def expand2square(img: Image.Image, background=MEAN_COLOR) -> Image.Image:
    """Pad to a square canvas of `background`, image centred (LLaVA's expand2square)."""
    w, h = img.size
    if w == h:
        return img
    size = max(w, h)
    out = Image.new(img.mode, (size, size), tuple(background))
    out.paste(img, ((size - w) // 2, 0) if h > w else (0, (size - h) // 2))
    return out


def preprocess(img, size: int = 336, mode: str = "pad") -> np.ndarray:
    """Released LLaVA/CLIP pipeline -> float32 (size, size, 3) normalised, channels-last.

    mode="pad":    expand2square with MEAN_COLOR, then the CLIP processor (stage 2 / inference).
    mode="square": the CLIP processor alone: shortest edge -> size, centre crop (stage 1).
    CLIP processor = PIL bicubic resize of the shortest edge to `size`, centre crop size x size,
    * 1/255 (float64, then fp32), (x - mean) / std in fp32 -- as transformers 4.37 did.
    `preprocess = normalise(resized_bytes(...))`; the server sends the bytes and normalises on
    the device (`normalise` is the same table lookup in numpy and in jax: the same bits).
    """
    return normalise(resized_bytes(img, size, mode))


def resized_bytes(img, size: int = 336, mode: str = "pad") -> np.ndarray:
    """`preprocess` up to the normalisation: (size, size, 3) uint8."""
    if mode not in ("pad", "square"):
        raise ValueError(f"mode must be 'pad' or 'square', got {mode!r}")
    if not isinstance(img, Image.Image):
        img = Image.fromarray(np.asarray(img, dtype=np.uint8))
    if img.mode != "RGB":
        img = img.convert("RGB")  # do_convert_rgb (4.37: plain convert; LLaVA loads with .convert("RGB"))
    if mode == "pad":
        img = expand2square(img, MEAN_COLOR)
    w, h = img.size
    short, long = min(w, h), max(w, h)
    new_long = int(size * long / short)  # same float expression as transformers
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    img = img.resize((new_w, new_h), resample=Image.BICUBIC)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return np.asarray(img)[top:top + size, left:left + size]


def normalise(x):
    """uint8 (..., 3) -> float32 rescaled and normalised as `preprocess` documents: a lookup in
    a (3 x 256) table (the same bits as computing it per pixel, 5x faster). numpy in, numpy out;
    a jax array in (inside a program), jax out."""
    flat = normalisation_table().reshape(-1)
    offset = np.array([0, 256, 512], np.uint16)           # channel c: entries 256c ..
    if isinstance(x, np.ndarray):
        return np.take(flat, x + offset)
    return jnp.take(jnp.asarray(flat), x.astype(jnp.int32) + offset.astype(np.int32))


@functools.cache
def normalisation_table() -> np.ndarray:
    """(3, 256) float32, read-only: each byte value of each channel rescaled and normalised."""
    v = (np.arange(256, dtype=np.float64)[:, None] * (1 / 255)).astype(np.float32)
    t = np.ascontiguousarray(((v - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)).T)
    t.flags.writeable = False   # cached: shared between callers
    return t
