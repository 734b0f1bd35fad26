"""Autoregressive decoding for the Llama decoder: one jitted function (prefill + while_loop).

Core: `generate_from_embeds(config, params, inputs_embeds, attention_mask, ...)` takes prompt
embeddings (B, L, D) (e.g. text embeddings with image features spliced in) and a (B, L) mask
(1 = real token). Prompts should be left-padded (HF convention); right padding also works,
since pad slots are never attended and the first token is read from each row's last real slot.
`generate(...)` / `greedy_generate(...)` are thin wrappers taking token ids.

Each step picks a token (greedy argmax, or temperature + top-p sampling with a PRNG key);
once a row has emitted one of `stop_ids` it emits `pad_id`; the loop ends as soon as every row
has stopped or `max_new_tokens` tokens were produced. Returns (tokens (B, max_new_tokens) int32,
lengths (B,) int32 = tokens emitted per row including its stop token).

`generate_core` is the un-jitted function, usable inside a caller's own jit. Stop ids are a
traced array (changing their values does not recompile; changing their count does).
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from .llama import LlamaConfig, LlamaForCausalLM, init_cache

LLAMA3_STOP_IDS = (128009, 128001)  # <|eot_id|>, <|end_of_text|>


def _variables(params):
    return params if ("params" in params and "model" not in params) else {"params": params}


def top_p_filter(logits: jax.Array, top_p) -> jax.Array:
    """Mask (to -inf) every logit outside the smallest set whose probability mass >= top_p."""
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p  # always keeps the top token
    n_keep = jnp.maximum(jnp.sum(keep, axis=-1, keepdims=True), 1)
    threshold = jnp.take_along_axis(sorted_logits, n_keep - 1, axis=-1)
    return jnp.where(logits < threshold, -jnp.inf, logits)


def _pick(logits, key, do_sample, temperature, top_p):
    logits = logits.astype(jnp.float32)
    if not do_sample:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = top_p_filter(logits / temperature, top_p)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def generate_core(config: LlamaConfig, params, inputs_embeds: jax.Array, attention_mask: jax.Array,
                  *, max_new_tokens: int, stop_ids: Sequence[int] | jax.Array = LLAMA3_STOP_IDS,
                  pad_id: int = 0, do_sample: bool = False, rng: jax.Array | None = None, temperature=1.0, top_p=1.0,
                  cache_dtype: Any = None):
    """Un-jitted generation from prompt embeddings (see module docstring)."""
    model = LlamaForCausalLM(config)
    variables = _variables(params)
    B, L, _ = inputs_embeds.shape
    N = int(max_new_tokens)
    mask = jnp.asarray(attention_mask).astype(bool)
    stop = jnp.asarray(stop_ids, jnp.int32).reshape(-1)
    if do_sample and rng is None:
        raise ValueError("sampling needs a PRNG key (rng=...)")
    rng = jax.random.key(0) if rng is None else rng

    cache = init_cache(config, B, L + N, cache_dtype)
    hidden, cache = model.apply(variables, inputs_embeds=inputs_embeds, attention_mask=mask,
                                cache=cache, return_hidden=True)
    last = L - 1 - jnp.argmax(mask[:, ::-1], axis=1)  # last real slot of each row
    h_last = jnp.take_along_axis(hidden, last[:, None, None], axis=1)
    logits = model.apply(variables, h_last, method=LlamaForCausalLM.logits)[:, 0]

    def emit(i, logits, tokens, done, lengths):
        tok = _pick(logits, jax.random.fold_in(rng, i), do_sample, temperature, top_p)
        tok = jnp.where(done, jnp.int32(pad_id), tok)
        tokens = jax.lax.dynamic_update_slice(tokens, tok[:, None], (0, i))
        lengths = lengths + (~done).astype(jnp.int32)
        done = done | jnp.isin(tok, stop)
        return tok, tokens, done, lengths

    tokens = jnp.full((B, N), pad_id, jnp.int32)
    done = jnp.zeros((B,), bool)
    lengths = jnp.zeros((B,), jnp.int32)
    tok, tokens, done, lengths = emit(0, logits, tokens, done, lengths)

    def cond(state):
        i, _, done, _, _, _ = state
        return (i < N) & ~jnp.all(done)

    def body(state):
        i, tok, done, lengths, tokens, cache = state
        logits, cache = model.apply(variables, tok[:, None], attention_mask=jnp.ones((B, 1), bool),
                                    cache=cache)
        tok, tokens, done, lengths = emit(i, logits[:, 0], tokens, done, lengths)
        return i + 1, tok, done, lengths, tokens, cache

    state = (jnp.int32(1), tok, done, lengths, tokens, cache)
    _, _, _, lengths, tokens, _ = jax.lax.while_loop(cond, body, state)
    return tokens, lengths


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "pad_id", "do_sample",
                                             "cache_dtype"))
def _generate_jit(config, params, input_ids, inputs_embeds, attention_mask, stop_ids, rng, temperature,
                  top_p, *, max_new_tokens, pad_id, do_sample, cache_dtype):
    if inputs_embeds is None:
        inputs_embeds = LlamaForCausalLM(config).apply(_variables(params), input_ids,
                                                       method=LlamaForCausalLM.embed)
    return generate_core(config, params, inputs_embeds, attention_mask, max_new_tokens=max_new_tokens,
                         stop_ids=stop_ids, pad_id=pad_id, do_sample=do_sample, rng=rng,
                         temperature=temperature, top_p=top_p, cache_dtype=cache_dtype)


def _run(config, params, input_ids, inputs_embeds, attention_mask, *, max_new_tokens, stop_ids,
         pad_id, rng, temperature, top_p):
    do_sample = rng is not None and float(temperature) > 0
    x = input_ids if input_ids is not None else inputs_embeds
    if attention_mask is None:
        attention_mask = jnp.ones(x.shape[:2], jnp.int32)
    stop = jnp.asarray([int(s) for s in stop_ids], jnp.int32).reshape(-1)
    return _generate_jit(config, params, input_ids, inputs_embeds, jnp.asarray(attention_mask), stop,
                         rng if do_sample else None, jnp.float32(temperature if do_sample else 1.0),
                         jnp.float32(top_p), max_new_tokens=int(max_new_tokens), pad_id=int(pad_id),
                         do_sample=do_sample, cache_dtype=None)


def generate_from_embeds(config: LlamaConfig, params, inputs_embeds, attention_mask=None, *,
                         max_new_tokens: int, stop_ids: Sequence[int] = LLAMA3_STOP_IDS, pad_id: int = 0,
                         rng: jax.Array | None = None, temperature: float = 0.0, top_p: float = 1.0):
    """Jitted generation from prompt embeddings (B, L, D). Greedy unless rng is given and
    temperature > 0 (then temperature + top-p sampling). Returns (tokens, lengths)."""
    return _run(config, params, None, inputs_embeds, attention_mask, max_new_tokens=max_new_tokens,
                stop_ids=stop_ids, pad_id=pad_id, rng=rng, temperature=temperature, top_p=top_p)


def generate(config: LlamaConfig, params, input_ids, attention_mask=None, *, max_new_tokens: int,
             stop_ids: Sequence[int] = LLAMA3_STOP_IDS, pad_id: int = 0,
             rng: jax.Array | None = None, temperature: float = 0.0, top_p: float = 1.0):
    """Jitted generation from left-padded prompt ids (B, L). Returns (tokens, lengths)."""
    return _run(config, params, input_ids, None, attention_mask, max_new_tokens=max_new_tokens,
                stop_ids=stop_ids, pad_id=pad_id, rng=rng, temperature=temperature, top_p=top_p)


def greedy_generate(config: LlamaConfig, params, input_ids, attention_mask=None, *, max_new_tokens: int,
                    stop_ids: Sequence[int] = LLAMA3_STOP_IDS, pad_id: int = 0):
    """Greedy decoding from left-padded prompt ids (B, L). Returns (tokens, lengths)."""
    return generate(config, params, input_ids, attention_mask, max_new_tokens=max_new_tokens,
                    stop_ids=stop_ids, pad_id=pad_id)
