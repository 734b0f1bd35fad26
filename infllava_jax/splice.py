"""Sequence assembly (docs/model.md section 6): each image sentinel (-200) becomes T visual embeddings.

Static shapes inside jit: a row of L ids holding K sentinels becomes L + K*(T-1) positions, or
`out_len` positions when given (packed rows, data/packing.py: each row's real positions fit).
The k-th sentinel of a row takes the row's k-th image; images no sentinel points to (padding
images) are never gathered.
Every output position is *gathered* from its source (a text token or an image token); the
layout comes from a cumsum of token widths, never from a data-dependent scatter.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

IMAGE_TOKEN_INDEX = -200
IGNORE_INDEX = -100


def splice_layout(input_ids, tokens_per_image: int, num_images: int,
                  image_token: int = IMAGE_TOKEN_INDEX, out_len: int | None = None):
    """Where each output position comes from. input_ids (B, L) -> dict of (B, L_out) arrays.

    text_src: index of the source id; image_src: index into the (K*T) image tokens of the row;
    is_image: position holds an image token; valid: inside the row (rows with fewer than
    `num_images` sentinels end early and their tail is marked invalid).
    """
    T = tokens_per_image
    out_len = input_ids.shape[1] + num_images * (T - 1) if out_len is None else out_len

    def row(ids):
        is_img = ids == image_token
        width = jnp.where(is_img, T, 1)
        end = jnp.cumsum(width)
        start = end - width                                    # output start of each input token
        j = jnp.arange(out_len)
        i = jnp.sum(start[None, :] <= j[:, None], axis=1) - 1  # last token starting at or before j
        ordinal = jnp.cumsum(is_img) - 1                       # which image a sentinel is
        return dict(text_src=i, image_src=ordinal[i] * T + (j - start[i]),
                    is_image=is_img[i] & (j < end[-1]), valid=j < end[-1])

    return jax.vmap(row)(input_ids)


def splice_embeddings(text_embeds, image_embeds, layout):
    """text_embeds (B, L, D), image_embeds (B, K, T, D) -> (B, L_out, D)."""
    B, K, T, D = image_embeds.shape
    txt = jnp.take_along_axis(text_embeds, layout["text_src"][..., None], axis=1)
    img_src = jnp.clip(layout["image_src"], 0, K * T - 1)
    img = jnp.take_along_axis(image_embeds.reshape(B, K * T, D), img_src[..., None], axis=1)
    return jnp.where(layout["is_image"][..., None], img.astype(txt.dtype), txt)


def splice_labels(labels, layout):
    """labels (B, L) -> (B, L_out); image positions and row tails are IGNORE_INDEX."""
    out = jnp.take_along_axis(labels, layout["text_src"], axis=1)
    return jnp.where(layout["is_image"] | ~layout["valid"], IGNORE_INDEX, out)


def splice_attention_mask(attention_mask, layout):
    """mask (B, L) -> (B, L_out); image tokens inherit their sentinel's mask, row tails are 0."""
    m = jnp.take_along_axis(attention_mask, layout["text_src"], axis=1)
    return jnp.where(layout["valid"], m, 0)
