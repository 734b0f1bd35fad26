"""Llama-3 decoder (Meta-Llama-3-8B-Instruct layout) in Flax linen, numerically matching HF.

Parameter tree (HF module names, Flax leaf names; `layers` is scanned, leading axis = layer):

    model/embed_tokens/embedding                      [vocab, embed]          ("vocab", "embed")
    model/layers/input_layernorm/scale                [L, embed]              ("layers", "norm")
    model/layers/self_attn/{q,k,v,o}_proj/kernel      [L, embed, N*H] ...     q ("embed", "heads"),
                                                                              k/v ("embed", "kv_heads"),
                                                                              o ("heads", "embed")
    model/layers/post_attention_layernorm/scale       [L, embed]
    model/layers/mlp/{gate,up}_proj/kernel            [L, embed, mlp]         ("embed", "mlp")
    model/layers/mlp/down_proj/kernel                 [L, mlp, embed]         ("mlp", "embed")
    model/norm/scale                                  [embed]                 ("norm",)
    lm_head/kernel                                    [embed, vocab]          ("embed", "vocab")  (untied only)

With `scan_layers=False` the stack lives under `layers_0`, `layers_1`, ... (see
`layers.stack_layer_params` / `unstack_layer_params`). Kernels are flat ([in, out]), so a
PyTorch Linear weight converts with a plain transpose (`key_map`, applied by convert/).

KV cache (`init_cache`): a plain dict pytree, jit/scan friendly, static shapes:

    k, v   [num_layers, B, S_max, num_kv_heads, head_dim]   (cache dtype), when the layers are scanned;
    kv     [(k_i, v_i) per layer], each [B, S_max, num_kv_heads, head_dim], when they run one by one
           (unrolled or unscanned: a decode loop then updates each layer's arrays in place; a
           stacked cache would be sliced, updated and re-stacked, whole, every step)
    valid  [B, S_max] bool    key slot holds a real token (pad slots are never attended)
    index  int32 scalar       next slot to write (shared by the batch: slots are aligned)
    pos    [B] int32          next RoPE position of each row (= real tokens seen so far)

A call with a cache writes its T tokens at slots [index, index+T) and attends to every valid
slot <= the query's slot. Row positions default to `pos + cumsum(mask) - 1` (clipped at 0),
which is what HF `generate` uses for left padding; the caller must keep index + T <= S_max.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name   # the tags layers.REMAT_POLICIES save by name

from . import keymap, quant
from .attention import dot_product_attention
from .layers import dense, layer_stack, unroll_layers
from .lora import LoraConfig, LoraDense

ACT_AXES = ("act_batch", "act_length", "act_embed")


# ----------------------------------------------------------------------------- config

@dataclasses.dataclass(frozen=True)
class Llama3RopeScaling:
    """`rope_type="llama3"` frequency scaling of Llama-3.1 (hashable)."""
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def to_hf(self) -> dict:
        return {"rope_type": "llama3", "factor": float(self.factor),
                "low_freq_factor": float(self.low_freq_factor),
                "high_freq_factor": float(self.high_freq_factor),
                "original_max_position_embeddings": int(self.original_max_position_embeddings)}


def _rope_scaling_from_dict(d: Mapping | None) -> Llama3RopeScaling | None:
    if d is None:
        return None
    # (our own config.json stores the dataclass fields without a type: they are llama3's)
    rope_type = d.get("rope_type", d.get("type", "llama3" if "low_freq_factor" in d else "default"))
    if rope_type in (None, "default"):
        return None
    if rope_type != "llama3":
        raise NotImplementedError(f"rope_type={rope_type!r}: only 'default' and 'llama3' are supported")
    return Llama3RopeScaling(
        factor=float(d["factor"]), low_freq_factor=float(d["low_freq_factor"]),
        high_freq_factor=float(d["high_freq_factor"]),
        original_max_position_embeddings=int(d["original_max_position_embeddings"]))


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int | None = None  # default hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: Llama3RopeScaling | None = None  # a dict is accepted and converted
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    initializer_range: float = 0.02  # std of the random initialisation (HF's field; 0.02 suits d ~ 4096)
    # runtime
    dtype: str = "float32"        # activation / compute dtype
    param_dtype: str = "float32"
    scan_layers: bool = True
    layer_loop: str = "auto"      # stacked layers: "scan" | "unroll" | "auto" (unrolled on CPU), layers.unroll_layers
    remat_policy: str = "none"    # a key of layers.REMAT_POLICIES
    attention_impl: str = "xla"   # see attention.IMPLS
    lora: LoraConfig | None = None  # adapters on the target projections (lora.py); a dict is accepted
    quant: str | None = None      # weight-only quantized projections: "int8" | "int4" (quant.py)

    def __post_init__(self):
        if isinstance(self.lora, Mapping):
            object.__setattr__(self, "lora", LoraConfig(**self.lora))
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if isinstance(self.rope_scaling, Mapping):
            object.__setattr__(self, "rope_scaling", _rope_scaling_from_dict(self.rope_scaling))
        if self.quant is not None:
            quant.parse(self.quant)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"{self.num_attention_heads} heads not a multiple of "
                             f"{self.num_key_value_heads} kv heads")

    def replace(self, **kw) -> "LlamaConfig":
        return dataclasses.replace(self, **kw)

    @property
    def jnp_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def jnp_param_dtype(self):
        return jnp.dtype(self.param_dtype)

    @classmethod
    def from_hf(cls, d: Mapping[str, Any] | Any, **runtime) -> "LlamaConfig":
        """From an HF `LlamaConfig.to_dict()` / config.json (old `rope_theta`+`rope_scaling`
        fields or v5 `rope_parameters`). `runtime` overrides any field (dtype, scan_layers...)."""
        if not isinstance(d, Mapping):
            d = d.to_dict()
        if d.get("hidden_act", "silu") != "silu":
            raise NotImplementedError(f"hidden_act={d['hidden_act']!r}")
        if d.get("mlp_bias", False):
            raise NotImplementedError("mlp_bias=True")
        rp = d.get("rope_parameters")
        if isinstance(rp, Mapping) and rp and "rope_type" not in rp and "rope_theta" not in rp:
            raise NotImplementedError("per-layer-type rope_parameters")
        if rp:
            theta = rp.get("rope_theta", d.get("rope_theta", 10000.0))
            scaling = _rope_scaling_from_dict(rp)
        else:
            theta = d.get("rope_theta", 10000.0)
            scaling = _rope_scaling_from_dict(d.get("rope_scaling"))
        heads = int(d["num_attention_heads"])
        kw = dict(
            vocab_size=int(d["vocab_size"]), hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]),
            num_hidden_layers=int(d["num_hidden_layers"]), num_attention_heads=heads,
            num_key_value_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=int(d.get("head_dim") or d["hidden_size"] // heads),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)), rope_theta=float(theta),
            rope_scaling=scaling,
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", False)),
            initializer_range=float(d.get("initializer_range", 0.02)))
        kw.update(runtime)
        return cls(**kw)

    def to_hf(self, **extra) -> dict:
        """Kwargs/config.json fields for `transformers.LlamaConfig` (old-style rope fields, which
        both transformers 4.x and 5.x accept)."""
        d = dict(model_type="llama", architectures=["LlamaForCausalLM"],
                 vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                 intermediate_size=self.intermediate_size,
                 num_hidden_layers=self.num_hidden_layers,
                 num_attention_heads=self.num_attention_heads,
                 num_key_value_heads=self.num_key_value_heads, head_dim=self.head_dim,
                 hidden_act="silu", rms_norm_eps=self.rms_norm_eps, rope_theta=self.rope_theta,
                 rope_scaling=None if self.rope_scaling is None else self.rope_scaling.to_hf(),
                 max_position_embeddings=self.max_position_embeddings,
                 tie_word_embeddings=self.tie_word_embeddings,
                 attention_bias=self.attention_bias, mlp_bias=False,
                 initializer_range=self.initializer_range)
        d.update(extra)
        return d


def llama3_8b(**overrides) -> LlamaConfig:
    """Meta-Llama-3-8B-Instruct."""
    kw = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
              num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5,
              rope_theta=500000.0, rope_scaling=None, max_position_embeddings=8192,
              tie_word_embeddings=False)
    kw.update(overrides)
    return LlamaConfig(**kw)


# ----------------------------------------------------------------------------- RoPE

def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
    """inv_freq exactly as HF computes it (fp32), including llama3 scaling. Shape (head_dim/2,)."""
    dim = config.head_dim
    exps = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = (np.float32(1.0) / (np.float32(config.rope_theta) ** exps)).astype(np.float32)
    rs = config.rope_scaling
    if rs is None:
        return inv_freq
    factor, low, high = float(rs.factor), float(rs.low_freq_factor), float(rs.high_freq_factor)
    old = float(rs.original_max_position_embeddings)
    low_freq_wavelen = np.float32(old / low)
    high_freq_wavelen = np.float32(old / high)
    wavelen = (np.float32(2 * math.pi) / inv_freq).astype(np.float32)
    inv_l = np.where(wavelen > low_freq_wavelen, inv_freq / np.float32(factor), inv_freq).astype(np.float32)
    smooth = ((np.float32(old) / wavelen - np.float32(low)) / np.float32(high - low)).astype(np.float32)
    smoothed = ((np.float32(1) - smooth) * inv_l / np.float32(factor) + smooth * inv_l).astype(np.float32)
    medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(medium, smoothed, inv_l).astype(np.float32)


def rope_cos_sin(positions: jax.Array, config: LlamaConfig) -> tuple[jax.Array, jax.Array]:
    """fp32 cos/sin of shape (B, T, head_dim) in HF's rotate-half layout (freqs concatenated)."""
    inv_freq = jnp.asarray(rope_inv_freq(config))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """(B, T) segment ids of packed rows -> RoPE positions restarting at 0 where a segment starts."""
    t = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)[None]
    new = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
    return t - jax.lax.cummax(jnp.where(new, t, 0), axis=1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: (B, T, heads, H); rotation in fp32, result in x.dtype."""
    xf = x.astype(jnp.float32)
    h = x.shape[-1] // 2
    rot = jnp.concatenate([-xf[..., h:], xf[..., :h]], axis=-1)
    return (xf * cos[:, :, None] + rot * sin[:, :, None]).astype(x.dtype)


# ----------------------------------------------------------------------------- modules

class RMSNorm(nn.Module):
    """HF LlamaRMSNorm: fp32 variance, x * rsqrt(var + eps), cast back, times weight."""
    eps: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
                           (x.shape[-1],), self.param_dtype)
        xf = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(xf), axis=-1, keepdims=True)
        y = (xf * jax.lax.rsqrt(var + self.eps)).astype(self.dtype)
        return scale.astype(self.dtype) * y


def _dense(cfg: LlamaConfig, features: int, axes, name: str, use_bias: bool = False):
    if cfg.lora is not None and name in cfg.lora.targets:
        return LoraDense(features, axes, cfg.lora, use_bias=use_bias, dtype=cfg.jnp_dtype, name=name,
                         param_dtype=cfg.jnp_param_dtype, kernel_init=nn.initializers.normal(cfg.initializer_range))
    return dense(features, axes, name=name, use_bias=use_bias, dtype=cfg.jnp_dtype,
                 param_dtype=cfg.jnp_param_dtype, kernel_init=nn.initializers.normal(cfg.initializer_range))


class LlamaAttention(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x, kv, cos, sin, mask, index, segment_ids=None):
        cfg = self.config
        B, T, _ = x.shape
        N, K, H = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        bias = cfg.attention_bias
        q = checkpoint_name(_dense(cfg, N * H, ("embed", "heads"), "q_proj", bias)(x), "query_proj")
        k = checkpoint_name(_dense(cfg, K * H, ("embed", "kv_heads"), "k_proj", bias)(x), "key_proj")
        v = checkpoint_name(_dense(cfg, K * H, ("embed", "kv_heads"), "v_proj", bias)(x), "value_proj")
        q, k, v = q.reshape(B, T, N, H), k.reshape(B, T, K, H), v.reshape(B, T, K, H)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv is not None:  # write this chunk into the layer's cache, attend over all slots
            k_cache, v_cache = kv
            k = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, index, 0, 0))
            v = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, index, 0, 0))
            kv = (k, v)
        # no cache: causal, `mask` (B, T) marks padding keys (packed rows: causal inside each
        # segment); a cache: a general (B, T, S) mask
        masking = (dict(mask=mask) if kv is not None else dict(causal=True, kv_mask=mask) if segment_ids is None
                   else dict(causal=True, segment_ids=segment_ids))
        out = dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), impl=cfg.attention_impl, **masking)
        out = _dense(cfg, cfg.hidden_size, ("heads", "embed"), "o_proj", bias)(out.reshape(B, T, N * H))
        return checkpoint_name(out, "out_proj"), kv


class LlamaMLP(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        gate = checkpoint_name(_dense(cfg, cfg.intermediate_size, ("embed", "mlp"), "gate_proj")(x), "mlpwi_0")
        up = checkpoint_name(_dense(cfg, cfg.intermediate_size, ("embed", "mlp"), "up_proj")(x), "mlpwi_1")
        return checkpoint_name(_dense(cfg, cfg.hidden_size, ("mlp", "embed"), "down_proj")(nn.silu(gate) * up), "mlpwo")


class LlamaDecoderLayer(nn.Module):
    """Block with the layer_stack signature: (x, kv_i, (cos, sin, mask, index, segment_ids)) -> (x, kv_i)."""
    config: LlamaConfig

    @nn.compact
    def __call__(self, x, kv, bcast):
        cfg = self.config
        cos, sin, mask, index, segment_ids = bcast
        norm = lambda name: RMSNorm(cfg.rms_norm_eps, cfg.jnp_dtype, cfg.jnp_param_dtype, name=name)
        h, kv = LlamaAttention(cfg, name="self_attn")(norm("input_layernorm")(x), kv, cos, sin, mask, index,
                                                      segment_ids)
        x = x + h
        x = x + LlamaMLP(cfg, name="mlp")(norm("post_attention_layernorm")(x))
        x = nn.with_logical_constraint(x, ACT_AXES)
        return x, kv


def init_cache(config: LlamaConfig, batch: int, max_len: int, dtype: Any = None) -> dict:
    """Empty KV cache for `max_len` slots (see module docstring for the layout)."""
    dtype = config.jnp_dtype if dtype is None else jnp.dtype(dtype)
    shape = (batch, max_len, config.num_key_value_heads, config.head_dim)
    n = config.num_hidden_layers
    if config.scan_layers and not unroll_layers(config.layer_loop):
        kv = {"k": jnp.zeros((n, *shape), dtype), "v": jnp.zeros((n, *shape), dtype)}
    else:
        kv = {"kv": [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(n)]}
    return {**kv, "valid": jnp.zeros((batch, max_len), bool), "index": jnp.zeros((), jnp.int32),
            "pos": jnp.zeros((batch,), jnp.int32)}


class LlamaModel(nn.Module):
    """HF `LlamaModel`: embed_tokens, layers, norm. Returns final normed hidden states."""
    config: LlamaConfig

    def setup(self):
        cfg = self.config
        self.embed_tokens = nn.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=cfg.jnp_dtype, param_dtype=cfg.jnp_param_dtype,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(cfg.initializer_range), ("vocab", "embed")))
        self.layers = layer_stack(LlamaDecoderLayer, cfg.num_hidden_layers, scan=cfg.scan_layers,
                                  unroll=unroll_layers(cfg.layer_loop) and not self.is_initializing(),
                                  remat_policy=cfg.remat_policy, config=cfg)
        self.norm = RMSNorm(cfg.rms_norm_eps, cfg.jnp_dtype, cfg.jnp_param_dtype)

    def embed(self, input_ids):
        return self.embed_tokens(input_ids)

    def attend(self, hidden):
        """Tied head: hidden @ embedding.T."""
        return self.embed_tokens.attend(hidden)

    def __call__(self, inputs_embeds, attention_mask=None, positions=None, cache=None, segment_ids=None):
        """`segment_ids` (B, T) (packed rows, no cache): token t attends to s <= t of its own segment
        (0: padding); pass the positions then (restarting at each segment)."""
        B, T, _ = inputs_embeds.shape
        if segment_ids is not None and cache is not None:
            raise ValueError("segment_ids (packed training rows) cannot be used with a KV cache")
        x = nn.with_logical_constraint(inputs_embeds.astype(self.config.jnp_dtype), ACT_AXES)
        mask = jnp.ones((B, T), bool) if attention_mask is None else attention_mask.astype(bool)
        base = jnp.zeros((B,), jnp.int32) if cache is None else cache["pos"]
        if positions is None and segment_ids is not None:
            positions = segment_positions(segment_ids)
        if positions is None:
            positions = jnp.maximum(base[:, None] + jnp.cumsum(mask, axis=1, dtype=jnp.int32) - 1, 0)
        positions = positions.astype(jnp.int32)
        cos, sin = rope_cos_sin(positions, self.config)
        if cache is None:
            attn_mask, index, xs = mask, None, None     # causal + padding keys (attention.py)
        else:
            index = cache["index"]
            S = cache["valid"].shape[1]
            valid = jax.lax.dynamic_update_slice(cache["valid"], mask, (0, index))
            q_slot = index + jnp.arange(T, dtype=jnp.int32)
            attn_mask = (jnp.arange(S, dtype=jnp.int32)[None, :] <= q_slot[:, None])[None] & valid[:, None, :]
            xs = cache["kv"] if "kv" in cache else (cache["k"], cache["v"])
        x, kv = self.layers(x, xs, (cos, sin, attn_mask, index, segment_ids))
        x = self.norm(x)
        new_cache = None
        if cache is not None:
            seen = jnp.max(jnp.where(mask, positions + 1, 0), axis=1)
            kv = {"kv": kv} if "kv" in cache else {"k": kv[0], "v": kv[1]}
            new_cache = {**kv, "valid": valid, "index": index + T,
                         "pos": jnp.maximum(base, seen)}
        return x, new_cache


class LlamaForCausalLM(nn.Module):
    """HF `LlamaForCausalLM`.

    `__call__(input_ids=None, *, inputs_embeds=None, attention_mask=None, positions=None,
    cache=None, segment_ids=None, return_hidden=False) -> (out, new_cache)`: out = fp32 logits (B, T, vocab), or
    with `return_hidden=True` the final normed hidden states (B, T, D) (apply `logits` later,
    e.g. in chunks). new_cache is None when no cache was passed.
    `embed(input_ids)` -> (B, T, D) token embeddings; `logits(hidden)` -> fp32 logits.
    """
    config: LlamaConfig

    def setup(self):
        cfg = self.config
        widths = (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads * cfg.head_dim)
        self.model = quant.wrap(LlamaModel(cfg), cfg.quant, widths)
        if not cfg.tie_word_embeddings:   # (unnamed: setup names it)
            self.lm_head = quant.wrap(_dense(cfg, cfg.vocab_size, ("embed", "vocab"), None), cfg.quant, widths)

    def embed(self, input_ids):
        return self.model.embed(input_ids)

    def logits(self, hidden):
        if self.config.tie_word_embeddings:
            out = self.model.attend(hidden.astype(self.config.jnp_dtype))
        else:
            out = self.lm_head(hidden)
        return out.astype(jnp.float32)

    def __call__(self, input_ids=None, *, inputs_embeds=None, attention_mask=None, positions=None,
                 cache=None, segment_ids=None, return_hidden: bool = False):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids)
        hidden, new_cache = self.model(inputs_embeds, attention_mask, positions, cache, segment_ids)
        if return_hidden:
            return hidden, new_cache
        return self.logits(hidden), new_cache


def init_params(config: LlamaConfig, rng: jax.Array | None = None, *, boxed: bool = False):
    """Random params (boxed = with logical-axis metadata). Use jax.eval_shape for shapes only."""
    rng = jax.random.key(0) if rng is None else rng
    p = LlamaForCausalLM(config).init(rng, jnp.zeros((1, 1), jnp.int32))["params"]
    return p if boxed else nn.unbox(p)


# ----------------------------------------------------------------------------- conversion

def key_map(config: LlamaConfig) -> list[keymap.Row]:
    """Table (keymap.Row) between our params and HF `LlamaForCausalLM` keys, for `config`."""
    top = [keymap.Row("model/embed_tokens/embedding", "model.embed_tokens.weight"),
           keymap.Row("model/norm/scale", "model.norm.weight")]
    if not config.tie_word_embeddings:
        top.append(keymap.Row("lm_head/kernel", "lm_head.weight", "transpose"))
    bias = config.attention_bias
    layer = [*keymap.norm("input_layernorm", "input_layernorm", bias=False),
             *keymap.norm("post_attention_layernorm", "post_attention_layernorm", bias=False)]
    for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
        layer += keymap.linear(f"self_attn/{n}", f"self_attn.{n}", bias=bias)
    for n in ("gate_proj", "up_proj", "down_proj"):
        layer += keymap.linear(f"mlp/{n}", f"mlp.{n}", bias=False)
    return top + keymap.stack(layer, config.num_hidden_layers, scanned=config.scan_layers,
                              path="model/layers", key="model.layers")


# Buffers older transformers saved next to the parameters (not parameters).
IGNORED_KEYS = ("model.layers.*.self_attn.rotary_emb.inv_freq",)


def ignored_keys(config: LlamaConfig) -> tuple[str, ...]:
    """Keys a checkpoint may hold that are not converted: buffers, and with tied embeddings the
    `lm_head.weight` alias of embed_tokens that state_dict() lists."""
    return IGNORED_KEYS + (("lm_head.weight",) if config.tie_word_embeddings else ())


def abstract_params(config: LlamaConfig):
    """Param shapes/dtypes (ShapeDtypeStruct tree, the content of `{"params": ...}`)."""
    return jax.eval_shape(lambda: init_params(config))
