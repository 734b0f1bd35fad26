"""The composition: pixels -> crops (DCM) -> vision tower -> DEM -> projector -> splice -> Llama.

Parameter tree (top level): `vision_tower`, `spatial_embed` (DEM; absent for LLaVA-1.5),
`mm_projector`, `language_model`. Pixels are channels-last (B, H, W, 3), CLIP-normalised.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from infllava_jax import crops
from infllava_jax.config import InfLlavaConfig
from infllava_jax.dem import DEM
from infllava_jax.llama import LlamaForCausalLM
from infllava_jax.pixels import resize_bicubic
from infllava_jax.projector import Projector
from infllava_jax.splice import (IMAGE_TOKEN_INDEX, splice_attention_mask, splice_embeddings, splice_labels,
                                 splice_layout)
from infllava_jax.vision import CLIPVisionTransformer


class InfLlavaModel(nn.Module):
    config: InfLlavaConfig

    def setup(self):
        c = self.config
        self.vision_tower = CLIPVisionTransformer(c.vision)
        self.spatial_embed = None if c.dem is None else DEM(c.dem)
        self.mm_projector = Projector(c.llm.hidden_size, dtype=c.llm.dtype, param_dtype=c.llm.param_dtype)
        self.language_model = LlamaForCausalLM(c.llm)

    def _features(self, views):
        """(B, V, s, s, 3) sub-images -> (B, V, T, D): one batched ViT call, hidden_states[-2]."""
        B, V, s = views.shape[:3]
        f = self.vision_tower.features(views.reshape(B * V, s, s, 3), self.config.select_layer)
        return f.reshape(B, V, *f.shape[1:])

    def views(self, pixel_values):
        """(B, H, W, 3) -> (B, V, s, s, 3): the sub-images the vision tower sees (DCM, docs/model.md §2-4)."""
        c = self.config
        s, (H, W) = c.sub_image_size, c.image_size
        if c.dem is None:
            _check_pixels(pixel_values, (s, s))
            return pixel_values[:, None]
        if pixel_values.shape[1:3] == (s, s) and (H, W) != (s, s):
            # released inference path: the loader feeds s x s, encode_images upsamples (docs/model.md §2)
            pixel_values = resize_bicubic(pixel_values, H, W)
        _check_pixels(pixel_values, (H, W))
        d = c.dem
        if d.views != "both":   # DCM ablation: one view's crops
            view = crops.local_crops if d.views == "local" else crops.strided_crops
            return view(pixel_values, d.nH, d.nW)
        local = crops.local_crops(pixel_values, d.nH, d.nW)                        # (B, N, s, s, 3)
        low = resize_bicubic(pixel_values, s, s)[:, None]                           # (B, 1, s, s, 3)
        if d.use_fast_path:   # only the sub-images that reach the output (docs/model.md §4, fast path)
            if d.low_is_centre_strided_crop:  # odd grid: low-res view = centre strided crop
                return jnp.concatenate([local, low], axis=1)
            sampled = crops.strided_crops(pixel_values, d.nH, d.nW)[:, list(d.fast_path_crop_indices)]
            return jnp.concatenate([local, sampled, low], axis=1)
        return jnp.concatenate([local, crops.strided_crops(pixel_values, d.nH, d.nW), low], axis=1)

    def tower_features(self, pixel_values):
        """(B, H, W, 3) -> (B, V, T, D): the vision tower's features of `views` (what a frozen
        tower gives every time: training/feature_bank.py keeps them)."""
        return self._features(self.views(pixel_values))

    def fuse(self, f):
        """(B, V, T, D) features of `views` -> (B, T', D_vit) visual tokens (DEM, docs/model.md §4-5)."""
        d = self.config.dem
        if d is None:
            return f[:, 0]
        if d.views != "both":   # DCM ablation: pooled, no DEM
            return self.spatial_embed.single_view(f)
        N = d.num_crops
        if d.use_fast_path:
            if d.low_is_centre_strided_crop:
                return self.spatial_embed.fast(f[:, :N], f[:, -1], f[:, -1])
            P = len(d.fast_path_crop_indices)
            return self.spatial_embed.fast(f[:, :N], f[:, N:N + P], f[:, -1])
        return self.spatial_embed(f[:, :N], f[:, N:2 * N], f[:, -1])

    def vision_tokens(self, pixel_values):
        """(B, H, W, 3) -> (B, T, D_vit): visual tokens before the projector."""
        return self.fuse(self.tower_features(pixel_values))

    def encode_images(self, pixel_values, features: bool = False):
        """(B, H, W, 3) -> (B, T, D_llm): visual tokens in the LLM's embedding space. features=True:
        the input is already `tower_features` (B, V, T, D) (a frozen tower's, feature_bank.py)."""
        return self.mm_projector(self.fuse(pixel_values) if features else self.vision_tokens(pixel_values))

    def embed_inputs(self, input_ids, pixel_values, attention_mask=None, labels=None, segment_ids=None,
                     features: bool = False):
        """Splice: ids (B, L) with up to K sentinels (-200, every model) per row, pixels (B, K, H, W, 3) or (B, H, W, 3)
        -> dict(inputs_embeds (B, L + K(T-1), D), attention_mask, labels). A packed batch
        (data/packing.py) passes its spliced segment ids (B, L_out): the output has L_out positions
        and the attention mask is segment_ids > 0. features=True: `pixel_values` holds each image's
        `tower_features` (B, K, V, T, D) instead."""
        c = self.config
        if pixel_values.ndim == 4:
            pixel_values = pixel_values[:, None]
        B, K = pixel_values.shape[:2]
        images = self.encode_images(pixel_values.reshape(B * K, *pixel_values.shape[2:]), features)
        images = images.reshape(B, K, *images.shape[1:])
        text = self.language_model.embed(jnp.where(input_ids == IMAGE_TOKEN_INDEX, 0, input_ids))
        out_len = None if segment_ids is None else segment_ids.shape[1]
        layout = splice_layout(input_ids, c.tokens_per_image, K, out_len=out_len)
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        mask = splice_attention_mask(attention_mask, layout) if segment_ids is None else (segment_ids > 0)
        out = dict(inputs_embeds=splice_embeddings(text, images, layout), attention_mask=mask.astype(jnp.int32))
        if labels is not None:
            out["labels"] = splice_labels(labels, layout)
        return out

    def __call__(self, input_ids, pixel_values, attention_mask=None, *, segment_ids=None, positions=None,
                 return_hidden: bool = False, features: bool = False):
        """Logits (B, L + K(T-1), V) in fp32 (or final hidden states with return_hidden). Packed
        rows: `segment_ids` and `positions` (B, L_out) in spliced positions (data/packing.py):
        attention stays inside a segment, RoPE positions restart at each segment."""
        x = self.embed_inputs(input_ids, pixel_values, attention_mask, segment_ids=segment_ids, features=features)
        out, _ = self.language_model(inputs_embeds=x["inputs_embeds"], attention_mask=x["attention_mask"],
                                     positions=positions, segment_ids=segment_ids, return_hidden=return_hidden)
        return out


def _check_pixels(pixel_values, hw):
    if tuple(pixel_values.shape[1:]) != (*hw, 3):
        raise ValueError(f"pixel_values has shape {tuple(pixel_values.shape)}; expected (B, {hw[0]}, {hw[1]}, 3) "
                         "channels-last for this config")
