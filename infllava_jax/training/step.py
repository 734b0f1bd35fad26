"""The train step: frozen parts, AdamW on the trainable parts only, gradient accumulation.

State = {"step", "params" (trainable subtrees, fp32 master), "frozen" (never differentiated, no
optimizer state), "opt_state"}. Which top-level parts train is a tuple of names: the stage's
(docs/model.md section 7: stage 1 trains DEM + projector, stage 2 also the LLM, the vision tower never)
plus any the config adds (`also_train`, e.g. the miniature study's random tiny model). With LoRA
on the language model (lora.py) its base is frozen (kept in the compute dtype: no fp32 master,
no optimizer state) and only its adapters (`lora_A`, `lora_B` leaves) train with the parts.
The loss is the token-mean next-token cross-entropy over the whole global batch (all
micro-batches), computed by `loss.cross_entropy_sum` without full fp32 logits.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import qwix

from infllava_jax import lora, params as params_lib, quant
from infllava_jax.sharding import LOGICAL_RULES
from infllava_jax.config import InfLlavaConfig
from infllava_jax.model import InfLlavaModel
from infllava_jax.splice import splice_labels, splice_layout
from infllava_jax.training.loss import cross_entropy_sum, shift_labels

PARTS = ("vision_tower", "spatial_embed", "mm_projector", "language_model")
TRAINABLE = {
    "stage1": ("spatial_embed", "mm_projector"),
    "stage2": ("spatial_embed", "mm_projector", "language_model"),
}


def trainable_parts(stage: str, also: Sequence[str] = (), with_lora: bool = False) -> tuple[str, ...]:
    """Top-level parts that train: those of `stage` ("stage1" | "stage2") and then `also`; with
    LoRA the language model is not one of them (its adapters train instead)."""
    if stage not in TRAINABLE or set(also) - set(PARTS):
        raise ValueError(f"{'+'.join((stage, *also))}: expected one of {sorted(TRAINABLE)} and parts "
                         f"of {PARTS}")
    if with_lora and "language_model" in also:
        raise ValueError("also_train names language_model, but LoRA keeps its base frozen (lora.rank=0 to train it)")
    parts = TRAINABLE[stage] + tuple(p for p in also if p not in TRAINABLE[stage])
    return tuple(p for p in parts if not (with_lora and p == "language_model"))


def split_params(params: dict, parts: Sequence[str]) -> tuple[dict, dict]:
    """(trainable, frozen): the top-level subtrees `parts` and every LoRA adapter train."""
    return lora.split(params, lambda path: path[0] in parts or lora.is_adapter(path))


def make_optimizer(lr: float, total_steps: int, warmup_ratio: float = 0.03, weight_decay: float = 0.0,
                   b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, max_grad_norm: float | None = 1.0,
                   lr_mult: dict[str, float] | None = None):
    """AdamW with linear warmup (3%) then cosine decay to 0, as the released scripts. -> (tx, schedule)
    lr_mult {part: factor}: that top-level part's updates (weight decay included) scaled by factor,
    i.e. its learning rate is lr x factor; a part that does not train is simply not there."""
    warmup = max(1, int(round(warmup_ratio * total_steps)))
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(total_steps, warmup + 1), 0.0)
    tx = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
    if lr_mult and any(f != 1 for f in lr_mult.values()):
        tx = optax.chain(tx, scale_parts(dict(lr_mult)))
    if max_grad_norm:
        tx = optax.chain(optax.clip_by_global_norm(max_grad_norm), tx)
    return tx, schedule


def scale_parts(factors: dict[str, float]) -> optax.GradientTransformation:
    """Multiplies the updates of each top-level part named in `factors` (the others unchanged)."""
    def update(updates, state, params=None):
        return {k: jax.tree.map(lambda u, f=factors.get(k, 1.0): u * f, v) for k, v in updates.items()}, state
    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def init_state(params: dict, parts: Sequence[str], tx: optax.GradientTransformation,
               config: InfLlavaConfig | None = None) -> dict:
    """With LoRA in `config`, the frozen language model's matrices are stored in the compute
    dtype (every forward casts them to it anyway: the same numbers, half the bytes in bf16)."""
    train, frozen = split_params(params, parts)
    if config is not None and config.llm.lora is not None and "language_model" in frozen:
        frozen = {**frozen, "language_model": compute_params(config, frozen["language_model"])}
    return {"step": jnp.zeros((), jnp.int32), "params": train, "frozen": frozen, "opt_state": tx.init(train)}


def head_kernel(params: dict, config: InfLlavaConfig):
    lm = params["language_model"]
    if config.llm.tie_word_embeddings:
        return lm["model"]["embed_tokens"]["embedding"].T
    kernel = lm["lm_head"]["kernel"]     # the chunked loss multiplies by it itself: a quantized one dequantized
    return qwix.dequantize(kernel.array).astype(config.llm.dtype) if quant.is_quantized(kernel) else kernel


def compute_params(config: InfLlavaConfig, params):
    """Mixed precision: matrices cast to the compute dtype while still sharded (gathers move half
    the bytes); norms and biases stay fp32; gradients flow back to the fp32 master."""
    compute = jnp.dtype(config.llm.dtype)
    cast = lambda x: x if quant.is_quantized(x) else x.astype(compute) if x.ndim >= 2 else x   # QLoRA: int base kept
    return jax.tree.map(cast, params, is_leaf=quant.is_quantized)


def make_loss_fn(config: InfLlavaConfig, loss_chunk: int = 512, features: bool = False,
                 loss_positions: int = 0) -> Callable:
    """loss_sum(trainable, frozen, micro_batch) -> (sum of token NLL, supervised token count).
    features=True: micro_batch["pixel_values"] holds the frozen tower's features of each image
    (training/feature_bank.py); loss_positions: training/loss.py."""
    model = InfLlavaModel(config)

    def loss_sum(trainable, frozen, mb, rng=None):
        params = lora.combine(frozen, trainable)
        seg = mb.get("segment_ids")          # packed rows (data/packing.py), else None
        with nn.logical_axis_rules(LOGICAL_RULES):
            hidden = model.apply({"params": params_lib.rebox(config, compute_params(config, params))}, mb["input_ids"],
                                 mb["pixel_values"], mb["attention_mask"], segment_ids=seg, return_hidden=True,
                                 features=features, rngs=None if rng is None else {"dropout": rng})
        K = 1 if mb["pixel_values"].ndim == 4 else mb["pixel_values"].shape[1]
        layout = splice_layout(mb["input_ids"], config.tokens_per_image, K, out_len=None if seg is None else seg.shape[1])
        labels = splice_labels(mb["labels"], layout)
        return cross_entropy_sum(hidden, head_kernel(params, config), shift_labels(labels, seg), loss_chunk,
                                 loss_positions)

    return loss_sum


def make_grad_fn(config: InfLlavaConfig, loss_chunk: int = 512, features: bool = False,
                 loss_positions: int = 0) -> Callable:
    """grads(state, batch) -> (mean loss, token count, mean grads); batch leaves are (A, b, ...):
    A micro-batches accumulated in a scan, normalised by the total supervised token count."""
    vg = jax.value_and_grad(make_loss_fn(config, loss_chunk, features, loss_positions), has_aux=True)
    dropout = config.llm.lora is not None and config.llm.lora.dropout > 0

    def grads(state, batch):
        def one(mb, k):
            # LoRA dropout: a key per (step, micro-batch)
            rng = jax.random.fold_in(jax.random.fold_in(jax.random.key(0), state["step"]), k) if dropout else None
            (s, c), g = vg(state["params"], state["frozen"], mb, rng)
            return s, c, jax.tree.map(lambda x: x.astype(jnp.float32), g)

        A = jax.tree.leaves(batch)[0].shape[0]
        if A == 1:   # one micro-batch: no loop, no accumulators
            s, c, g = one(jax.tree.map(lambda x: x[0], batch), 0)
        else:
            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state["params"])
            (s, c, g), _ = jax.lax.scan(lambda carry, xs: (jax.tree.map(jnp.add, carry, one(*xs)), None),
                                        (jnp.float32(0), jnp.int32(0), zeros), (batch, jnp.arange(A)))
        denom = jnp.maximum(c, 1).astype(jnp.float32)
        return s / denom, c, jax.tree.map(lambda x: x / denom, g)

    return grads


def make_train_step(config: InfLlavaConfig, tx: optax.GradientTransformation, schedule: Callable,
                    loss_chunk: int = 512, features: bool = False, loss_positions: int = 0) -> Callable:
    """step(state, batch) -> (state, metrics). A batch with no supervised token, or a non-finite
    loss or gradient, leaves the state unchanged (but for the step counter) and is flagged in
    metrics["skipped"], never trained on silently."""
    grads_fn = make_grad_fn(config, loss_chunk, features, loss_positions)

    def step(state: dict[str, Any], batch):
        loss, count, grads = grads_fn(state, batch)
        grad_norm = optax.tree.norm(grads)
        ok = (count > 0) & jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def update(params, opt_state):
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        # a cond, not a select: no second copy of the parameters and optimizer state
        params, opt_state = jax.lax.cond(ok, update, lambda p, o: (p, o), state["params"], state["opt_state"])
        new_state = {"step": state["step"] + 1, "params": params, "frozen": state["frozen"],
                     "opt_state": opt_state}
        metrics = {"loss": loss, "grad_norm": grad_norm, "tokens": count, "lr": schedule(state["step"]),
                   "skipped": ~ok}
        return new_state, metrics

    return step
