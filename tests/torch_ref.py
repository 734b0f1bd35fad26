"""PyTorch reference of the released DEM (`SpatialEmbed`), written from docs/model.md section 4.

Deliberately plain: the maps are built and cut with explicit slicing loops, the pooling is
`torch.nn.functional.interpolate(mode="bilinear", align_corners=False)`, and the closed form
(docs/model.md "exact fast path") is evaluated from its index formulas. Parameter names equal the
released state dict under `model.spatial_embed.` (docs/model.md section 8).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


from convert import torch_reference


class SpatialEmbed(torch_reference.SpatialEmbed):
    """The verify tool's module (same parameters and names), with the test-only extras: pooling
    and combination chosen separately, the intermediate maps, and the closed form."""

    def __init__(self, d_model: int = 1024, heads: int = 8, d_k: int = 128, ffn_hidden: int = 64,
                 eps: float = 1e-5):
        super().__init__(d_model, heads, d_k, ffn_hidden, d_model // 2, eps)

    def fuse(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        return self.ln_fuse(torch.cat([self.ffn_crop(B), self.ffn_stride(A)], dim=-1) + A + B)

    def forward(self, local, strided, low, nH: int = 3, nW: int = 3, pooling: str = "bilinear",
                combine: str = "mean", return_maps: bool = False):
        """local, strided: (B, nH*nW, g*g, D) in crop order r*nW + c / p*nW + q; low: (B, g*g, D).

        pooling "bilinear" + combine "mean" = released; "avg" + "add" = paper variant.
        """
        Bsz, N, L, D = local.shape
        g = math.isqrt(L)
        assert N == nH * nW and g * g == L
        loc = local.view(Bsz, N, g, g, D)
        glo = strided.view(Bsz, N, g, g, D)
        H, W = nH * g, nW * g
        F_loc = local.new_zeros(Bsz, H, W, D)
        F_glo = local.new_zeros(Bsz, H, W, D)
        for r in range(nH):
            for c in range(nW):
                F_loc[:, r * g:(r + 1) * g, c * g:(c + 1) * g] = loc[:, r * nW + c]
        for p in range(nH):
            for q in range(nW):
                F_glo[:, p::nH, q::nW] = glo[:, p * nW + q]

        A = torch.zeros_like(F_loc)   # global as query: block (r, c) of F_glo attends to local crop
        for r in range(nH):
            for c in range(nW):
                blk = F_glo[:, r * g:(r + 1) * g, c * g:(c + 1) * g].reshape(Bsz, L, D)
                out = self.attention(blk, local[:, r * nW + c])
                A[:, r * g:(r + 1) * g, c * g:(c + 1) * g] = out.view(Bsz, g, g, D)
        Bm = torch.zeros_like(F_loc)  # local as query: phase (p, q) of F_loc attends to strided crop
        for p in range(nH):
            for q in range(nW):
                ph = F_loc[:, p::nH, q::nW].reshape(Bsz, L, D)
                out = self.attention(ph, strided[:, p * nW + q])
                Bm[:, p::nH, q::nW] = out.view(Bsz, g, g, D)
        Fmap = self.fuse(A, Bm)

        chw = Fmap.permute(0, 3, 1, 2)
        if pooling == "bilinear":
            pooled = F.interpolate(chw, size=(g, g), mode="bilinear", align_corners=False)
        elif pooling == "avg":
            pooled = F.avg_pool2d(chw, kernel_size=(nH, nW))
        else:
            raise ValueError(pooling)
        pooled = pooled.permute(0, 2, 3, 1).reshape(Bsz, L, D)
        out = (low + pooled) / 2 if combine == "mean" else low + pooled
        if return_maps:
            return out, {"F_loc": F_loc, "F_glo": F_glo, "A": A, "B": Bm, "F": Fmap}
        return out

    def closed_form(self, local, low, n: int = 3):
        """docs/model.md "exact fast path" for an odd n x n grid, from its index formulas (m = g / n):
        token (i, j), crop k = (i // m, j // m), c = n // 2:
            a = MHA(S[i, j], C_k);  b = MHA(C_k[n(i % m) + c, n(j % m) + c], S)
            out = (S[i, j] + LN_fuse([ffn_crop(b); ffn_stride(a)] + a + b)) / 2
        """
        Bsz, N, L, D = local.shape
        g = math.isqrt(L)
        assert n % 2 == 1 and N == n * n and g % n == 0
        m, c = g // n, n // 2
        i, j = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
        k = (i // m) * n + (j // m)
        C = local.view(Bsz, N, g, g, D)
        bq = C[:, k, n * (i % m) + c, n * (j % m) + c]          # (B, g, g, D)
        b = self.attention(bq.reshape(Bsz, L, D), low)
        a = torch.empty_like(low)
        k = k.reshape(-1)
        for kk in range(N):                                      # tokens whose crop is kk
            idx = (k == kk).nonzero().squeeze(1)
            a[:, idx] = self.attention(low[:, idx], local[:, kk])
        return (low + self.fuse(a, b)) / 2


def random_spatial_embed(seed: int, d_model: int, heads: int, d_k: int, ffn_hidden: int) -> SpatialEmbed:
    """SpatialEmbed with random weights, including non-trivial LayerNorm affine parameters."""
    torch.manual_seed(seed)
    m = SpatialEmbed(d_model, heads, d_k, ffn_hidden)
    with torch.no_grad():
        for ln in (m.attention.ln, m.ln_fuse):
            ln.weight.uniform_(0.5, 1.5)
            ln.bias.normal_(0.0, 0.1)
    return m.eval()
