"""DEM, the dual-perspective enhancement module (docs/model.md sections 4-5), and its PyTorch key map.

Inputs per image (batch B leading), D = CLIP width, g = tokens per side, N = nH*nW:
    local   (B, N, g*g, D)   CLIP features of the local crops (crops.local_crops order r*nW + c)
    strided (B, N, g*g, D)   CLIP features of the strided crops (crops.strided_crops order p*nW + q)
    low     (B, g*g, D)      S, CLIP features of the low-resolution view
Output (B, g*g, D): the visual tokens before the projector.

Released variant (default; reproduces the released checkpoints), with one shared
    MHA(q, kv) = LN(W_o Attn(W_q q, W_k kv, W_v kv) + q)
    F_loc = mosaic(local), F_glo = interleave(strided)                        (nH*g, nW*g, D)
    A: block k of F_glo (contiguous g x g) attends to local crop k; mosaic back
    B: phase (p, q) of F_loc ([p::nH, q::nW]) attends to strided crop (p, q); interleave back
    F = ln_fuse(concat[ffn_crop(B), ffn_stride(A)] + A + B)
    v = (S + bilinear_resize(F -> g x g, align_corners=False, no antialias)) / 2
Paper variant: the same F, average pooling over every nH x nW cell, v = S + pooled.

Exact fast path (released only, `DEM.fast`): the bilinear "pooling" by an integer factor n
reads only the cell centre (odd n) or the central 2x2 of each cell (even n), so only the
queries at those positions reach the output. For a sampled position (nH*i + p, nW*j + q):
    A there = MHA(strided crop (p, q)[i, j], local crop k),   k = (i // (g/nH), j // (g/nW))
    B there = MHA(F_loc[nH*i + p, nW*j + q], strided crop (p, q))
so the fast path needs all N local crops but only the sampled strided crops
`DEMConfig.fast_path_phases` (odd n: the centre phase (n//2); even n: phases n/2-1 and n/2;
per axis, all combinations). For odd nH and nW the centre strided crop *is* the low-resolution
view (bicubic downsampling by an odd factor lands on pixels n*i + n//2, docs/model.md section 2), so
the model runs N + 1 ViT passes instead of 2N + 1 (n=3: 10 instead of 19) and calls
`fast(local, low, low)`. Even n needs the central 2x2 phases (4 strided crops, indices
`cfg.fast_path_crop_indices`) plus the separate low-res view: N + 5 passes (n=2: no saving).
Requires g divisible by nH and nW (else ValueError; use the full computation).
`DEMConfig.fast_path` (None = whenever supported) and `use_fast_path` tell the model which to run.

DCM ablations (`DEMConfig.views`, the miniature study's rows; not in the released code):
    views="local"    v = avgpool_{nH x nW}(F_loc)   only the N local crops, no DEM, no S
    views="strided"  v = avgpool_{nH x nW}(F_glo)   only the N strided crops, no DEM, no S
Both keep g*g tokens per image and have no DEM parameters (`DEM.single_view`).

Parameter names follow the released state dict (`model.spatial_embed.*`, docs/model.md section 8):
    attention.{q,k,v,o}_proj.{kernel,bias}  <- attention.linears.{0,1,2,3}.{weight^T,bias}
    attention.ln.{scale,bias}               <- attention.ln.{weight,bias}
    ffn_{crop,stride}.{fc1,fc2}             <- ffn_{crop,stride}.{0,2}  (Sequential: Linear, GELU, Linear)
    ln_fuse.{scale,bias}                    <- ln_fuse.{weight,bias}
`key_map` is that map as data (keymap.Row); convert/engine.py applies it in both directions.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from infllava_jax import attention as attention_lib
from infllava_jax import keymap, layers
from infllava_jax.pixels import bilinear_matrix
from infllava_jax.crops import interleave, local_crops, mosaic, strided_crops

VARIANTS = ("released", "paper")
VIEWS = ("both", "local", "strided")


def _pool_taps(n: int) -> tuple[tuple[int, float], ...]:
    """Within-cell (offset, weight) taps of a bilinear downsampling by the integer factor n."""
    w = bilinear_matrix(n, 1)[0]  # one output pixel over one cell = every cell (the map is periodic)
    return tuple((int(i), float(w[i])) for i in np.flatnonzero(w))


@dataclasses.dataclass(frozen=True)
class DEMConfig:
    """DEM hyper-parameters. Defaults = the released INF-LLaVA module (n=3, CLIP-L/336)."""
    variant: str = "released"   # "released" (bilinear pick + mean) | "paper" (avg pool + add)
    hidden: int = 1024          # D, the CLIP width
    num_heads: int = 8
    head_dim: int = 128         # attention width = num_heads * head_dim (released 1024)
    ffn_hidden: int = 64
    ffn_out: int = 512          # 2 * ffn_out must equal hidden (ffn_crop ++ ffn_stride)
    ln_eps: float = 1e-5
    nH: int = 3
    nW: int = 3
    g: int = 24                 # tokens per side of one sub-image (336 / 14)
    dtype: str = "float32"      # compute dtype
    param_dtype: str = "float32"
    attention_impl: str = "xla"
    fast_path: bool | None = None  # None: use it whenever supported (released variant)
    views: str = "both"         # "both" = DCM + DEM; "local" | "strided": one view, pooled (ablation)

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"DEMConfig.variant={self.variant!r}; expected one of {VARIANTS}")
        if 2 * self.ffn_out != self.hidden:
            raise ValueError(f"DEMConfig: 2 * ffn_out ({2 * self.ffn_out}) must equal hidden ({self.hidden})")
        if min(self.nH, self.nW, self.g, self.num_heads, self.head_dim) < 1:
            raise ValueError(f"DEMConfig: non-positive size in {self}")
        if self.views not in VIEWS:
            raise ValueError(f"DEMConfig.views={self.views!r}; expected one of {VIEWS}")
        if self.attention_impl not in attention_lib.IMPLS:
            raise ValueError(f"DEMConfig.attention_impl={self.attention_impl!r}; "
                             f"expected one of {attention_lib.IMPLS}")
        for f in ("dtype", "param_dtype"):
            try:
                jnp.dtype(getattr(self, f))
            except TypeError as e:
                raise ValueError(f"DEMConfig.{f}={getattr(self, f)!r} is not a dtype") from e
        if self.fast_path and self.fast_path_unsupported:
            raise ValueError(f"DEMConfig(fast_path=True): {self.fast_path_unsupported}")

    @property
    def num_crops(self) -> int:
        return self.nH * self.nW

    @property
    def width(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def fast_path_unsupported(self) -> str | None:
        """Why `DEM.fast` cannot run for this config, or None if it can."""
        if self.views != "both":
            return f"views={self.views!r} runs no DEM (DEM.single_view)"
        if self.variant != "released":
            return ("the fast path exists only for variant='released' (the paper variant "
                    "average-pools every position, so every query and strided crop matters)")
        if self.g % self.nH or self.g % self.nW:
            return (f"the fast path needs tokens per side g={self.g} divisible by the grid "
                    f"{self.nH}x{self.nW}; use the full computation")
        return None

    @property
    def use_fast_path(self) -> bool:
        return self.fast_path is not False and self.fast_path_unsupported is None

    @property
    def fast_path_phases(self) -> tuple[tuple[int, int], ...]:
        """Strided crops (p, q) that `DEM.fast` takes, in this order (stack them on axis 1)."""
        return tuple((p, q) for p, _ in _pool_taps(self.nH) for q, _ in _pool_taps(self.nW))

    @property
    def fast_path_crop_indices(self) -> tuple[int, ...]:
        """`fast_path_phases` as strided-crop indices p*nW + q (n=3: (4,))."""
        return tuple(p * self.nW + q for p, q in self.fast_path_phases)

    @property
    def fast_path_weights(self) -> tuple[float, ...]:
        """Bilinear weight of each of `fast_path_phases` (1.0 for odd x odd, 0.25 for even x even)."""
        return tuple(a * b for _, a in _pool_taps(self.nH) for _, b in _pool_taps(self.nW))

    @property
    def low_is_centre_strided_crop(self) -> bool:
        """True when the low-res view equals the one strided crop `fast` needs (odd nH and nW)."""
        return self.nH % 2 == 1 and self.nW % 2 == 1

    def vit_passes(self, fast: bool | None = None) -> int:
        """Sub-images the vision tower must encode per image (full: 2N + 1)."""
        fast = self.use_fast_path if fast is None else fast
        if self.views != "both":
            return self.num_crops
        if not fast:
            return 2 * self.num_crops + 1
        return self.num_crops + len(self.fast_path_phases) + (0 if self.low_is_centre_strided_crop else 1)


class DEMAttention(nn.Module):
    """MHA(q, kv) = LN(o_proj(Attn(q_proj q, k_proj kv, v_proj kv)) + q); no mask, no positions."""
    cfg: DEMConfig

    @nn.compact
    def __call__(self, q_in, kv_in):
        c = self.cfg
        dt, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        B, T, D = q_in.shape
        S = kv_in.shape[1]
        proj = lambda name: layers.dense(c.width, ("embed", "heads"), name=name, dtype=dt, param_dtype=pdt)
        # head split: feature index = head * head_dim + j (torch view(B, L, heads, head_dim))
        q = proj("q_proj")(q_in).reshape(B, T, c.num_heads, c.head_dim)
        k = proj("k_proj")(kv_in).reshape(B, S, c.num_heads, c.head_dim)
        v = proj("v_proj")(kv_in).reshape(B, S, c.num_heads, c.head_dim)
        o = attention_lib.dot_product_attention(q, k, v, scale=c.head_dim ** -0.5, impl=c.attention_impl)
        o = layers.dense(D, ("heads", "embed"), name="o_proj", dtype=dt, param_dtype=pdt)(
            o.reshape(B, T, c.width))
        return layers.layer_norm(c.ln_eps, name="ln", dtype=dt, param_dtype=pdt)(o + q_in)


class DEMFFN(nn.Module):
    """Linear(D -> ffn_hidden), exact GELU, Linear(ffn_hidden -> ffn_out) (torch Sequential 0, 1, 2)."""
    cfg: DEMConfig

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        dt, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
        x = layers.dense(c.ffn_hidden, ("embed", "mlp"), name="fc1", dtype=dt, param_dtype=pdt)(x)
        x = nn.gelu(x, approximate=False)
        return layers.dense(c.ffn_out, ("mlp", "embed"), name="fc2", dtype=dt, param_dtype=pdt)(x)


class DEM(nn.Module):
    """Dual-perspective enhancement. `__call__` = full computation, `fast` = exact fast path."""
    cfg: DEMConfig

    def setup(self):
        c = self.cfg
        self.attention = DEMAttention(c, name="attention")   # shared by A, B and all windows
        self.ffn_crop = DEMFFN(c, name="ffn_crop")           # applied to B (local as query)
        self.ffn_stride = DEMFFN(c, name="ffn_stride")       # applied to A (global as query)
        self.ln_fuse = layers.layer_norm(c.ln_eps, name="ln_fuse", dtype=jnp.dtype(c.dtype),
                                         param_dtype=jnp.dtype(c.param_dtype))

    # -- helpers --------------------------------------------------------------------------------
    def _check(self, name: str, x, shape: tuple[int, ...]):
        if tuple(x.shape) != shape:
            raise ValueError(f"DEM: {name} has shape {tuple(x.shape)}, expected {shape} "
                             f"(grid {self.cfg.nH}x{self.cfg.nW}, g={self.cfg.g}, D={self.cfg.hidden})")
        return x.astype(jnp.dtype(self.cfg.dtype))

    def _mha(self, q, kv):
        """Batched MHA over leading axes: q (..., T, D), kv (..., S, D) with equal leading axes."""
        lead = q.shape[:-2]
        out = self.attention(q.reshape(-1, *q.shape[-2:]), kv.reshape(-1, *kv.shape[-2:]))
        return out.reshape(*lead, *q.shape[-2:])

    def _fuse(self, A, B):
        return self.ln_fuse(jnp.concatenate([self.ffn_crop(B), self.ffn_stride(A)], axis=-1) + A + B)

    def _combine(self, S, pooled):
        return (S + pooled) / 2 if self.cfg.variant == "released" else S + pooled

    # -- full computation -----------------------------------------------------------------------
    def __call__(self, local, strided, low):
        c = self.cfg
        B, N, g, D = local.shape[0], c.num_crops, c.g, c.hidden
        local = self._check("local", local, (B, N, g * g, D)).reshape(B, N, g, g, D)
        strided = self._check("strided", strided, (B, N, g * g, D)).reshape(B, N, g, g, D)
        S = self._check("low", low, (B, g * g, D)).reshape(B, g, g, D)

        F_loc, F_glo = mosaic(local, c.nH, c.nW), interleave(strided, c.nH, c.nW)
        # A, global as query: block k of F_glo attends to local crop k
        q = local_crops(F_glo, c.nH, c.nW).reshape(B, N, g * g, D)
        A = mosaic(self._mha(q, local.reshape(B, N, g * g, D)).reshape(B, N, g, g, D), c.nH, c.nW)
        # B, local as query: phase (p, q) of F_loc attends to strided crop (p, q)
        q = strided_crops(F_loc, c.nH, c.nW).reshape(B, N, g * g, D)
        Bm = interleave(self._mha(q, strided.reshape(B, N, g * g, D)).reshape(B, N, g, g, D), c.nH, c.nW)
        F = self._fuse(A, Bm)
        self.sow("intermediates", "A", A)
        self.sow("intermediates", "B", Bm)
        self.sow("intermediates", "F", F)

        if c.variant == "released":   # bilinear resize (nH*g, nW*g) -> (g, g), separable weights
            wh = jnp.asarray(bilinear_matrix(c.nH * g, g), jnp.float32)
            ww = jnp.asarray(bilinear_matrix(c.nW * g, g), jnp.float32)
            hi = jax.lax.Precision.HIGHEST
            pooled = jnp.einsum("iy,byxd->bixd", wh, F.astype(jnp.float32), precision=hi)
            pooled = jnp.einsum("jx,bixd->bijd", ww, pooled, precision=hi)
        else:                         # average over each nH x nW cell
            pooled = F.astype(jnp.float32).reshape(B, g, c.nH, g, c.nW, D).mean(axis=(2, 4))
        out = self._combine(S, pooled.astype(F.dtype))
        return out.reshape(B, g * g, D)

    # -- DCM ablations: one view, no DEM ----------------------------------------------------------
    def single_view(self, crops_features):
        """views="local" | "strided": (B, N, g*g, D) features of that view's crops -> (B, g*g, D),
        the mosaic (local) or interleaved (strided) map average-pooled over every nH x nW cell."""
        c = self.cfg
        B, g, D = crops_features.shape[0], c.g, c.hidden
        x = self._check(c.views, crops_features, (B, c.num_crops, g * g, D)).reshape(B, c.num_crops, g, g, D)
        F = mosaic(x, c.nH, c.nW) if c.views == "local" else interleave(x, c.nH, c.nW)
        pooled = F.astype(jnp.float32).reshape(B, g, c.nH, g, c.nW, D).mean(axis=(2, 4))
        return pooled.astype(F.dtype).reshape(B, g * g, D)

    # -- exact fast path (released) -------------------------------------------------------------
    def fast(self, local, sampled, low):
        """Same output as `__call__` computing only the queries the pooling reads.

        local (B, N, g*g, D); sampled = the strided crops `cfg.fast_path_phases`, (B, P, g*g, D)
        in that order, or (B, g*g, D) when P == 1 (odd grids: the centre strided crop, which is
        the low-res view, so pass `low`); low (B, g*g, D).
        """
        c = self.cfg
        if c.fast_path_unsupported:
            raise ValueError(f"DEM.fast: {c.fast_path_unsupported}")
        phases, weights = c.fast_path_phases, c.fast_path_weights
        B, N, P, g, D = local.shape[0], c.num_crops, len(phases), c.g, c.hidden
        mh, mw = g // c.nH, g // c.nW
        if sampled.ndim == 3 and P == 1:
            sampled = sampled[:, None]
        local = self._check("local", local, (B, N, g * g, D))
        Sp = self._check(f"sampled (strided crops {phases})", sampled, (B, P, g * g, D)).reshape(B, P, g, g, D)
        S = self._check("low", low, (B, g * g, D)).reshape(B, g, g, D)

        # a: the global query at (nH*i + p, nW*j + q) is Sp[p, q][i, j]; it lies in block
        #    k = (i // mh, j // mw), i.e. in local_crops(Sp) window k; all phases share crop k's keys.
        q = local_crops(Sp, c.nH, c.nW)                                   # (B, P, N, mh, mw, D)
        q = jnp.swapaxes(q, 1, 2).reshape(B, N, P * mh * mw, D)
        a = self._mha(q, local).reshape(B, N, P, mh, mw, D)
        a = mosaic(jnp.swapaxes(a, 1, 2), c.nH, c.nW)                     # (B, P, g, g, D)
        # b: the local query at (nH*i + p, nW*j + q) is F_loc[p::nH, q::nW][i, j]; keys strided (p, q)
        F_loc = mosaic(local.reshape(B, N, g, g, D), c.nH, c.nW)
        q = jnp.stack([F_loc[:, p::c.nH, r::c.nW] for p, r in phases], axis=1)  # (B, P, g, g, D)
        b = self._mha(q.reshape(B, P, g * g, D), Sp.reshape(B, P, g * g, D)).reshape(B, P, g, g, D)
        F = self._fuse(a, b)                                              # F at the sampled positions
        self.sow("intermediates", "a", a)
        self.sow("intermediates", "b", b)
        pooled = F[:, 0] if P == 1 else sum(w * F[:, i] for i, w in enumerate(weights))
        out = self._combine(S, pooled.astype(F.dtype))
        return out.reshape(B, g * g, D)


# ---------------------------------------------------------------------------------------------
# PyTorch key map, relative to the released prefix `model.spatial_embed.` (applied by convert/).

def key_map(cfg: DEMConfig | None = None) -> list[keymap.Row]:
    """Table (keymap.Row) between DEM params and the released `SpatialEmbed` keys (the same for
    every DEMConfig: shapes come from the config, names do not); empty for the views ablations,
    which have no DEM parameters."""
    if cfg is not None and cfg.views != "both":
        return []
    entries = []
    for ours, theirs in zip(("q_proj", "k_proj", "v_proj", "o_proj"), range(4)):  # linears.0..3
        entries += keymap.linear(f"attention/{ours}", f"attention.linears.{theirs}")
    entries += keymap.norm("attention/ln", "attention.ln")
    for ffn in ("ffn_crop", "ffn_stride"):   # torch nn.Sequential(Linear, GELU, Linear)
        entries += keymap.linear(f"{ffn}/fc1", f"{ffn}.0") + keymap.linear(f"{ffn}/fc2", f"{ffn}.2")
    entries += keymap.norm("ln_fuse", "ln_fuse")
    return keymap.rows(entries)


def abstract_params(cfg: DEMConfig):
    """Param shapes/dtypes (ShapeDtypeStruct tree) without allocating."""
    N, L, D = cfg.num_crops, cfg.g * cfg.g, cfg.hidden
    x = jax.ShapeDtypeStruct((1, N, L, D), jnp.float32)
    low = jax.ShapeDtypeStruct((1, L, D), jnp.float32)
    return nn.meta.unbox(jax.eval_shape(DEM(cfg).init, jax.random.key(0), x, x, low)["params"])

