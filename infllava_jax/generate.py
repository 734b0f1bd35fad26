"""Autoregressive decoding: prefill + one `lax.while_loop` over the KV cache, one program.

`generate` is the program every caller runs (InfLlava.generate, the eval runner, the lmms-eval
adapter, the chat): the multimodal prompt embeddings, then `generate_core`, the un-jitted loop of
the Llama decoder over prompt embeddings (B, L, D) and a (B, L) mask (1 = real token). Prompts
should be left-padded (HF convention); right padding also works, since pad slots are never
attended and the first token is read from each row's last real slot.

Each step picks a token (greedy argmax, or temperature + top-p sampling with a PRNG key);
once a row has emitted one of `stop_ids` it emits `pad_id`; the loop ends as soon as every row
has stopped or `max_new_tokens` tokens were produced. Returns (tokens (B, max_new_tokens) int32,
lengths (B,) int32 = tokens emitted per row including its stop token). `on_token(step, tokens)`,
if given, is called on the host with each step's (B,) tokens as they are picked (streaming).
Stop ids are a traced array (changing their values does not recompile; changing their count
does); which ids a checkpoint stops on is conversation.py's decision (none by default here).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax.experimental import io_callback

from .llama import LlamaConfig, LlamaForCausalLM, init_cache
from .model import InfLlavaModel
from .pixels import normalise

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
                  *, max_new_tokens: int, stop_ids: Sequence[int] | jax.Array = (),
                  pad_id: int = 0, do_sample: bool = False, rng: jax.Array | None = None, temperature=1.0, top_p=1.0,
                  cache_dtype: Any = None, on_token: Callable | None = None):
    """Un-jitted generation from prompt embeddings (see module docstring)."""
    model = LlamaForCausalLM(config)
    variables = {"params": params}
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
        if on_token is not None:
            io_callback(on_token, None, i, tok, ordered=True)
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


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "do_sample", "pad_id", "on_token"))
def generate(config, params, input_ids, pixel_values, attention_mask, stop_ids, rng=None, temperature=1.0,
             top_p=1.0, *, max_new_tokens: int, do_sample: bool = False, pad_id: int = 0, on_token=None):
    """The one generation program of the multimodal model: image features spliced into the prompt
    embeddings (`InfLlavaModel.embed_inputs`), then `generate_core`. `config` is an
    InfLlavaConfig, `params` the whole tree; input_ids (B, L) left-padded with one sentinel per
    image, pixel_values (B, H, W, 3) or (B, K, H, W, 3): normalised floats, or the uint8 bytes of
    `pixels.resized_bytes` (normalised here, the same bits). Returns (tokens, lengths)."""
    if pixel_values.dtype == jnp.uint8:
        pixel_values = normalise(pixel_values)
    x = InfLlavaModel(config).apply({"params": params}, input_ids, pixel_values, attention_mask,
                                    method=InfLlavaModel.embed_inputs)
    return generate_core(config.llm, params["language_model"], x["inputs_embeds"], x["attention_mask"],
                         max_new_tokens=max_new_tokens, stop_ids=stop_ids, pad_id=pad_id, do_sample=do_sample,
                         rng=rng, temperature=temperature, top_p=top_p, on_token=on_token)
