"""DCM, dual-perspective cropping (docs/model.md section 3): local crops, strided crops and their inverses.

Channels-last arrays (..., H, W, C) with H = nH*sH, W = nW*sW (sH = sW = 336 for pixels,
24 for CLIP token maps); any leading batch axes; any nH x nW grid. Crop k = r*nW + c.

    local crop (r, c)     = img[r*sH:(r+1)*sH, c*sW:(c+1)*sW]      (paper eq. 13)
    strided crop (p, q)   = img[p::nH, q::nW]                       (paper eq. 17)

Every function is a reshape + transpose (no gathers, no loops over crops), so it works on
jax and numpy arrays alike and costs nothing under jit. The inverses are shared by images
and feature maps:

    mosaic(local_crops(x))      == x     F_loc[r*g + y, c*g + x] = feat_loc[r, c][y, x]
    interleave(strided_crops(x)) == x    F_glo[y*nH + p, x*nW + q] = feat_glo[p, q][y, x]
"""
from __future__ import annotations

import einops


def _check_divisible(shape, nH: int, nW: int, what: str) -> None:
    if len(shape) < 3:
        raise ValueError(f"{what}: expected (..., H, W, C), got shape {tuple(shape)}")
    if nH < 1 or nW < 1:
        raise ValueError(f"{what}: grid {nH}x{nW} must be positive")
    H, W = shape[-3], shape[-2]
    if H % nH or W % nW:
        raise ValueError(f"{what}: image {H}x{W} is not divisible by the {nH}x{nW} grid")


def _check_crops(shape, nH: int, nW: int, what: str) -> None:
    if len(shape) < 4 or shape[-4] != nH * nW:
        raise ValueError(f"{what}: expected (..., {nH}*{nW}={nH * nW}, h, w, C) for a {nH}x{nW} grid, "
                         f"got shape {tuple(shape)}")


def local_crops(img, nH: int, nW: int):
    """(..., nH*s, nW*s, C) -> (..., nH*nW, s, s, C): contiguous tiles, row-major (r*nW + c)."""
    _check_divisible(img.shape, nH, nW, "local_crops")
    return einops.rearrange(img, "... (r y) (c x) d -> ... (r c) y x d", r=nH, c=nW)


def strided_crops(img, nH: int, nW: int):
    """(..., s*nH, s*nW, C) -> (..., nH*nW, s, s, C): crop (p, q) = img[p::nH, q::nW], order p*nW + q."""
    _check_divisible(img.shape, nH, nW, "strided_crops")
    return einops.rearrange(img, "... (y p) (x q) d -> ... (p q) y x d", p=nH, q=nW)


def mosaic(feats, nH: int, nW: int):
    """Inverse of `local_crops`: (..., nH*nW, g, g, D) -> (..., nH*g, nW*g, D)."""
    _check_crops(feats.shape, nH, nW, "mosaic")
    return einops.rearrange(feats, "... (r c) y x d -> ... (r y) (c x) d", r=nH, c=nW)


def interleave(feats, nH: int, nW: int):
    """Inverse of `strided_crops`: (..., nH*nW, g, g, D) -> (..., g*nH, g*nW, D)."""
    _check_crops(feats.shape, nH, nW, "interleave")
    return einops.rearrange(feats, "... (p q) y x d -> ... (y p) (x q) d", p=nH, q=nW)
