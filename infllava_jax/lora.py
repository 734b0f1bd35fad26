"""LoRA on the language model (Hu et al. 2021, arXiv 2106.09685), in PEFT's conventions.

A target projection (kernel W [in, out], ours) gains two trainable matrices

    y = x W + b + (alpha / r) * dropout(x) A B        A [in, r], B [r, out]          (eq. 3)

A is drawn as PEFT draws lora_A (kaiming-uniform, a=sqrt(5): U(-1/sqrt(in), 1/sqrt(in))), B = 0,
so step 0 is the base model exactly. A carries the base's input axis name and B its output
axis name (plus `lora_rank`, replicated), so both shard like W. PEFT stores the transposes:
lora_A.weight = A^T [r, in], lora_B.weight = B^T [out, r], and merges W^T + (alpha/r) B^T A^T,
which is our W + (alpha/r) A B.

Parameter paths: `.../q_proj/{kernel, lora_A, lora_B}` (the base leaves keep their names, so a
LoRA config changes no existing path). Training keeps W frozen in the compute dtype (no fp32
master, no optimizer state); `merge` folds the adapters back into W for every other tool.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import qwix
from flax.traverse_util import flatten_dict, unflatten_dict

from infllava_jax import keymap, quant

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTERS = ("lora_A", "lora_B")
RANK_AXIS = "lora_rank"
EXPORTS = ("merged", "adapters")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = PROJECTIONS

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        unknown = sorted(set(self.targets) - set(PROJECTIONS))
        if self.rank < 1 or not self.targets or unknown or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora: rank={self.rank} (>= 1), targets={self.targets} (some of {PROJECTIONS}), "
                             f"dropout={self.dropout} (in [0, 1))")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


def from_settings(settings: Mapping[str, Any] | None) -> LoraConfig | None:
    """The training config's `lora` block -> LoraConfig, or None when rank is 0 (LoRA off)."""
    if not settings or not int(settings.get("rank", 0)):
        return None
    export = settings.get("export", "merged")
    if export not in EXPORTS:
        raise ValueError(f"lora.export={export!r}; expected one of {EXPORTS}")
    return LoraConfig(rank=int(settings["rank"]), alpha=float(settings.get("alpha", 16.0)),
                      dropout=float(settings.get("dropout", 0.0)),
                      targets=tuple(settings.get("targets", PROJECTIONS)))


def base_quant(settings: Mapping[str, Any] | None) -> str | None:
    """The `lora` block's `quant` (QLoRA: the frozen base quantized, quant.py), or None."""
    spec = (settings or {}).get("quant") or None
    if spec is not None and not int(settings.get("rank", 0)):
        raise ValueError(f"lora.quant={spec!r} quantizes the frozen base of LoRA: it needs lora.rank > 0")
    return spec


class LoraDense(nn.Module):
    """nn.Dense (same `kernel` / `bias` leaves, same computation) plus the LoRA delta (eq. 3).
    Dropout on the adapter's input is active only when a "dropout" rng is given."""
    features: int
    axes: tuple[str, str]
    lora: LoraConfig
    use_bias: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Callable = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x):
        d_in, r = x.shape[-1], self.lora.rank
        kernel = self.param("kernel", nn.with_logical_partitioning(self.kernel_init, self.axes),
                            (d_in, self.features), self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), self.axes[-1:]),
                          (self.features,), self.param_dtype) if self.use_bias else None
        a = self.param("lora_A", nn.with_logical_partitioning(
            nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"), (self.axes[0], RANK_AXIS)), (d_in, r), jnp.float32)
        b = self.param("lora_B", nn.with_logical_partitioning(nn.initializers.zeros_init(), (RANK_AXIS, self.axes[1])),
                       (r, self.features), jnp.float32)
        lead, x = x.shape[:-1], x.reshape(-1, d_in)     # rows x in, as layers.Dense
        xc, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = jax.lax.dot_general(xc, kernel, (((1,), (0,)), ((), ())))   # a quantized base: quant.py
        if bias is not None:
            y += bias
        h = nn.Dropout(self.lora.dropout)(x, deterministic=not self.has_rng("dropout"))
        h, a, b = nn.dtypes.promote_dtype(h, a, b, dtype=self.dtype)
        # einsum, not @: a quantized base's qwix rule (quant.py) matches dot_general only, so the
        # adapters stay in their dtype
        delta = jnp.einsum("nr,ro->no", jnp.einsum("ni,ir->nr", h, a), b)
        return (y + delta * jnp.asarray(self.lora.scaling, y.dtype)).reshape(*lead, self.features)


# ----------------------------------------------------------------------------- trees

def is_adapter(path: tuple[str, ...]) -> bool:
    return path[-1] in ADAPTERS


def split(tree: dict, trains: Callable[[tuple[str, ...]], bool]) -> tuple[dict, dict]:
    """(leaves where trains(path), the rest) of a nested dict, both nested dicts."""
    flat = flatten_dict(tree)
    yes = {p: v for p, v in flat.items() if trains(p)}
    return unflatten_dict(yes), unflatten_dict({p: v for p, v in flat.items() if p not in yes})


def combine(*trees: dict) -> dict:
    """Inverse of `split`: the union of nested dicts with disjoint leaves."""
    flat = {}
    for t in trees:
        flat.update(flatten_dict(t))
    return unflatten_dict(flat)


def merged_config(config):
    """The same model without adapters (what `merge` returns the parameters of); a quantized base
    (QLoRA) merges into a plain model in the compute dtype."""
    if config.llm.quant is not None:
        return config.replace(llm=config.llm.replace(lora=None, quant=None, param_dtype=config.llm.dtype))
    return config.replace(llm=config.llm.replace(lora=None))


def merge(config, params: dict, like: dict) -> dict:
    """Params of `merged_config(config)`: W <- W + (alpha/r) A B, no adapters, every leaf in the
    plain config's dtype (`like`: its abstract params, `params.abstract_params(merged_config(config))`).
    What WORKDIR/final and every other tool read."""
    scaling = config.llm.lora.scaling
    flat = flatten_dict(params)
    out = {}
    for path, spec in flatten_dict(like).items():
        w = flat[path]
        if quant.is_quantized(w):    # QLoRA's base
            w = qwix.dequantize(w.array).astype(jnp.float32)
        if path[-1] == "kernel" and path[:-1] + ("lora_A",) in flat:
            a, b = flat[path[:-1] + ("lora_A",)], flat[path[:-1] + ("lora_B",)]
            w = w.astype(jnp.float32) + scaling * jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32))
        out[path] = w.astype(spec.dtype)
    return unflatten_dict(out)


# ----------------------------------------------------------------------------- PEFT names

def adapter_rows(llm_rows, lc: LoraConfig, prefix: str) -> list[keymap.Row]:
    """Rows of the adapters from the language model's rows (`llama.key_map`, in the key layout of
    the checkpoint, e.g. released `model.layers.{i}.self_attn.q_proj.weight`), keys behind PEFT's
    `prefix` (convert/lora.PEFT_PREFIX): `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`
    [r, in] <- our lora_A^T."""
    out = []
    for r in llm_rows:
        module = r.path.rsplit("/", 2)[-2] if r.path.endswith("/kernel") else None
        if module in lc.targets:
            base = prefix + r.key[: -len(".weight")]
            out += [dataclasses.replace(r, path=r.path[: -len("kernel")] + n, key=f"{base}.{n}.weight")
                    for n in ADAPTERS]
    return out


def peft_config(lc: LoraConfig, base_model: str = "") -> dict:
    """adapter_config.json of PEFT for these adapters (PEFT reads the fields it knows)."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
            "r": lc.rank, "lora_alpha": lc.alpha, "lora_dropout": lc.dropout,
            "target_modules": sorted(lc.targets), "bias": "none", "fan_in_fan_out": False,
            "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
            "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None}
