"""CLIP vision tower (docs/model.md section 1): ViT-L/14-336 as Flax Linen modules.

Module names follow Hugging Face `CLIPVisionModel` (`embeddings`, `pre_layrnorm` [sic],
`encoder.layers`, `self_attn.q_proj`, `layer_norm1`, `mlp.fc1`, `post_layernorm`), so
the PyTorch conversion is a key map (`key_map`) plus transposes. Pixels are NHWC. INF-LLaVA uses
`hidden_states[-2]` without CLS (`features`), which never runs the last encoder layer.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from infllava_jax import keymap
from infllava_jax.attention import dot_product_attention
from infllava_jax.layers import LAYERS, dense, layer_norm, layer_stack, unroll_layers

ACT = ("act_batch", "act_length", "act_embed")  # activation constraint at block boundaries
CONV_AXES = ("patch_height", "patch_width", "channels", "embed")
ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # exact (erf)
}
_ARCH_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "image_size", "patch_size", "num_channels", "layer_norm_eps", "hidden_act")


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    image_size: int
    patch_size: int
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    # runtime (not part of the checkpoint)
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    scan_layers: bool = True
    layer_loop: str = "auto"      # stacked layers: "scan" | "unroll" | "auto" (unrolled on CPU)
    remat_policy: str = "none"
    attention_impl: str = "xla"

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act={self.hidden_act!r}; expected one of {sorted(ACTIVATIONS)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")

    @property
    def grid(self) -> int:  # patches per side
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid ** 2

    @property
    def num_positions(self) -> int:  # patches + CLS
        return self.num_patches + 1

    def replace(self, **kw) -> "CLIPVisionConfig":
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_hf(cls, d: Mapping[str, Any], **runtime) -> "CLIPVisionConfig":
        """From an HF CLIPVisionConfig dict or a CLIPModel dict (uses its `vision_config`).

        Only architecture fields are read (HF's `dtype` is the torch weight dtype, not ours);
        runtime fields (dtype, scan_layers, ...) come from `runtime`.
        """
        d = d.get("vision_config", d)
        kw = {k: d[k] for k in _ARCH_FIELDS if k in d}
        for k in ("image_size", "patch_size"):  # HF allows [h, w]; we need squares
            if isinstance(kw.get(k), (list, tuple)):
                h, w = kw[k]
                if h != w:
                    raise ValueError(f"{k}={kw[k]}: only square sizes are supported")
                kw[k] = h
        return cls(**kw, **runtime)

    def to_hf(self) -> dict:
        """HF CLIPVisionConfig dict (architecture fields only)."""
        return {"model_type": "clip_vision_model", **{k: getattr(self, k) for k in _ARCH_FIELDS}}

    @classmethod
    def clip_vit_l14_336(cls, **runtime) -> "CLIPVisionConfig":
        """openai/clip-vit-large-patch14-336, INF-LLaVA's tower."""
        return cls(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                   num_attention_heads=16, image_size=336, patch_size=14, **runtime)


clip_vit_l14_336 = CLIPVisionConfig.clip_vit_l14_336


def _kw(c: CLIPVisionConfig) -> dict:
    return dict(dtype=jnp.dtype(c.dtype), param_dtype=jnp.dtype(c.param_dtype))


class PatchEmbedding(nn.Module):
    """HF's Conv2d(3, D, kernel=stride=p, no bias) as one GEMM: (B, H, W, C) -> (B, (H/p)(W/p), D),
    patches row-major as HF's flatten(2). The kernel keeps nn.Conv's (p, p, C, D) shape; a strided
    convolution is 3x slower on XLA:CPU than the same products over reshaped patches."""
    features: int
    patch: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        B, H, W, C = x.shape
        p, D = self.patch, self.features
        kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.lecun_normal(), CONV_AXES),
                            (p, p, C, D), self.param_dtype)
        patches = x.astype(self.dtype).reshape(B, H // p, p, W // p, p, C).transpose(0, 1, 3, 2, 4, 5)
        y = patches.reshape(-1, p * p * C) @ kernel.astype(self.dtype).reshape(p * p * C, D)
        return y.reshape(B, (H // p) * (W // p), D)


class CLIPVisionEmbeddings(nn.Module):
    config: CLIPVisionConfig

    @nn.compact
    def __call__(self, pixel_values):  # (B, H, W, C) -> (B, 1 + P, D)
        c, D = self.config, self.config.hidden_size
        want = (c.image_size, c.image_size, c.num_channels)
        if tuple(pixel_values.shape[1:]) != want:
            raise ValueError(f"pixel_values shape {pixel_values.shape}; expected (B, *{want}) NHWC")
        kw = _kw(c)
        x = PatchEmbedding(D, c.patch_size, name="patch_embedding", **kw)(pixel_values)
        cls = self.param("class_embedding", nn.with_logical_partitioning(
            nn.initializers.normal(D ** -0.5), ("embed",)), (D,), kw["param_dtype"])
        cls = jnp.broadcast_to(cls.astype(x.dtype), (x.shape[0], 1, D))
        pos = nn.Embed(c.num_positions, D, name="position_embedding", **kw, embedding_init=
                       nn.with_logical_partitioning(nn.initializers.normal(0.02), ("positions", "embed")))
        return jnp.concatenate([cls, x], axis=1) + pos(jnp.arange(c.num_positions))


class CLIPAttention(nn.Module):
    config: CLIPVisionConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        B, T, D = x.shape
        N = c.num_attention_heads
        q, k, v = (dense(D, ("embed", "heads"), name=f"{n}_proj", **_kw(c))(x).reshape(B, T, N, D // N)
                   for n in "qkv")
        o = dot_product_attention(q, k, v, impl=c.attention_impl)  # scale head_dim**-0.5, no mask
        return dense(D, ("heads", "embed"), name="out_proj", **_kw(c))(o.reshape(B, T, D))


class CLIPMLP(nn.Module):
    config: CLIPVisionConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        x = dense(c.intermediate_size, ("embed", "mlp"), name="fc1", **_kw(c))(x)
        x = ACTIVATIONS[c.hidden_act](x)
        return dense(c.hidden_size, ("mlp", "embed"), name="fc2", **_kw(c))(x)


class CLIPEncoderLayer(nn.Module):
    """Pre-LN block; `layer_stack` calling convention `(carry, xs, bcast) -> (carry, ys)`."""
    config: CLIPVisionConfig
    return_hidden: bool = False  # ys = this layer's output (for hidden_states)

    @nn.compact
    def __call__(self, x, _xs=None, _bcast=None):
        c = self.config
        x = x + CLIPAttention(c, name="self_attn")(layer_norm(c.layer_norm_eps, name="layer_norm1", **_kw(c))(x))
        x = x + CLIPMLP(c, name="mlp")(layer_norm(c.layer_norm_eps, name="layer_norm2", **_kw(c))(x))
        x = nn.with_logical_constraint(x, ACT)
        return x, (x if self.return_hidden else None)


class CLIPEncoder(nn.Module):
    config: CLIPVisionConfig
    num_layers: int  # how many layers to build and run (the first ones)
    return_hidden: bool = False

    @nn.compact
    def __call__(self, x):
        c = self.config
        stack = layer_stack(CLIPEncoderLayer, self.num_layers, scan=c.scan_layers, name=LAYERS,
                            unroll=unroll_layers(c.layer_loop) and not self.is_initializing(), remat_policy=c.remat_policy, config=c, return_hidden=self.return_hidden)
        return stack(x, None, None)  # (last, per-layer outputs stacked or None)


def _first_layers(k: int, variables):
    """Slice the scanned `layers` params to the first k layers (running a prefix of the stack)."""
    return {col: {name: (jax.tree.map(lambda a: a[:k], v) if name == LAYERS else v) for name, v in tree.items()}
            for col, tree in variables.items()}


class CLIPVisionTransformer(nn.Module):
    """HF CLIPVisionModel. Returns a dict: last_hidden_state, pooler_output (only when all
    layers run), hidden_states (tuple of num_layers + 1; [0] = pre_layrnorm output)."""
    config: CLIPVisionConfig

    @nn.compact
    def __call__(self, pixel_values, *, output_hidden_states: bool = False, num_layers: int | None = None):
        c = self.config
        L = c.num_hidden_layers
        k = L if num_layers is None else num_layers
        if not 0 <= k <= L:
            raise ValueError(f"num_layers={num_layers}; the tower has {L} layers")
        init = self.is_initializing()  # init always builds (and runs) every layer
        x = CLIPVisionEmbeddings(c, name="embeddings")(pixel_values)
        x = layer_norm(c.layer_norm_eps, name="pre_layrnorm", **_kw(c))(x)
        x = nn.with_logical_constraint(x, ACT)

        need_ys = output_hidden_states or (init and k < L)
        if k == L or init:
            last, ys = CLIPEncoder(c, L, need_ys, name="encoder")(x)
        elif k > 0:
            enc = CLIPEncoder
            if c.scan_layers:  # stored params have L layers: hand the scan only the first k
                enc = nn.map_variables(CLIPEncoder, "params", trans_in_fn=lambda v: _first_layers(k, v))
            last, ys = enc(c, k, need_ys, name="encoder")(x)
        else:
            last, ys = x, None
        hidden = (x,) + tuple(ys[i] for i in range(k)) if need_ys else None
        if init and k < L:  # init ran every layer; return what was asked for
            last = hidden[k]
        out = {"last_hidden_state": last}
        if k == L or init:  # (init creates post_layernorm even for a prefix run)
            pooled = layer_norm(c.layer_norm_eps, name="post_layernorm", **_kw(c))(last[:, 0])
            if k == L:
                out["pooler_output"] = pooled
        if output_hidden_states:
            out["hidden_states"] = hidden
        return out

    def features(self, pixel_values, select_layer: int = -2):
        """hidden_states[select_layer] without CLS: (B, grid**2, D); runs only the layers needed."""
        L = self.config.num_hidden_layers
        if not -(L + 1) <= select_layer <= L:
            raise ValueError(f"select_layer={select_layer} out of range for {L} layers")
        return self(pixel_values, num_layers=select_layer % (L + 1))["last_hidden_state"][:, 1:]


def init_params(config: CLIPVisionConfig, rng: jax.Array | None = None, *, boxed: bool = False):
    """Random params (boxed = with logical-axis metadata). Use jax.eval_shape for shapes only."""
    rng = jax.random.PRNGKey(0) if rng is None else rng
    x = jnp.zeros((1, config.image_size, config.image_size, config.num_channels), jnp.float32)
    p = CLIPVisionTransformer(config).init(rng, x)["params"]
    return p if boxed else nn.meta.unbox(p)


# ---------------------------------------------------------------------------------------------
# PyTorch key map (HF CLIPVisionModel names, relative to the tower: `embeddings.*`, `encoder.*`;
# CLIPModel / LLaVA checkpoints put a prefix before them). Applied by convert/engine.py.

def key_map(config: CLIPVisionConfig) -> list[keymap.Row]:
    """Table (keymap.Row) between our tower params and HF CLIPVisionModel keys, for `config`."""
    top = keymap.rows([
        ("embeddings/class_embedding", "embeddings.class_embedding", "none"),
        ("embeddings/patch_embedding/kernel", "embeddings.patch_embedding.weight", "conv"),
        ("embeddings/position_embedding/embedding", "embeddings.position_embedding.weight", "none"),
        *keymap.norm("pre_layrnorm", "pre_layrnorm"),
        *keymap.norm("post_layernorm", "post_layernorm"),
    ])
    layer = [*keymap.linear("self_attn/q_proj", "self_attn.q_proj"),
             *keymap.linear("self_attn/k_proj", "self_attn.k_proj"),
             *keymap.linear("self_attn/v_proj", "self_attn.v_proj"),
             *keymap.linear("self_attn/out_proj", "self_attn.out_proj"),
             *keymap.linear("mlp/fc1", "mlp.fc1"), *keymap.linear("mlp/fc2", "mlp.fc2"),
             *keymap.norm("layer_norm1", "layer_norm1"), *keymap.norm("layer_norm2", "layer_norm2")]
    return top + keymap.stack(layer, config.num_hidden_layers, scanned=config.scan_layers,
                              path=f"encoder/{LAYERS}", key="encoder.layers")


# Tensors HF checkpoints may hold that are not parameters (transformers < 4.31 saved this buffer).
IGNORED_KEYS = ("embeddings.position_ids",)
# The first key of every HF CLIP vision tower; what precedes it is the tower's prefix.
ANCHOR_KEY = "embeddings.patch_embedding.weight"


def abstract_params(config: CLIPVisionConfig):
    """Param shapes/dtypes (ShapeDtypeStruct tree) without allocating."""
    return jax.eval_shape(lambda: init_params(config))
