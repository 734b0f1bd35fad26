"""PyTorch reference of the released INF-LLaVA forward, written from SPEC.md (sections 1-4, 6, 8).

Deliberately plain PyTorch: crops are slices, resizes are `F.interpolate`, the splice is a
Python loop per row (LLaVA's `prepare_inputs_labels_for_multimodal`), and the DEM is the full
computation of `tests.torch_ref.SpatialEmbed`. Nothing here imports the JAX code.

`InfLlavaRef.state_dict()` has exactly the released key names (SPEC section 8):

    model.vision_tower.vision_tower.vision_model.*      HF CLIPVisionModel
    model.mm_projector.{0,2}.{weight,bias}              Linear, GELU, Linear
    model.spatial_embed.*                               tests.torch_ref.SpatialEmbed
    model.embed_tokens / model.layers.* / model.norm    HF LlamaModel
    lm_head.weight

As in the released `LlavaLlamaForCausalLM`, the multimodal modules live inside the Llama
`model` (so they sit next to `model.layers`); the LlamaForCausalLM that runs the decoder is
held unregistered, its own `model` and `lm_head` being the registered ones.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from torch import nn

from tests.torch_ref import SpatialEmbed

IMAGE_TOKEN_INDEX = -200


class CLIPVisionTower(nn.Module):
    """LLaVA's wrapper: `self.vision_tower` is the HF CLIPVisionModel, whose modules sit under
    `vision_model.` (transformers 4.x). transformers v5 flattened CLIPVisionModel, so there the
    `vision_model` level is re-created with a holder module (same names, same computation)."""

    def __init__(self, config: transformers.CLIPVisionConfig, select_layer: int = -2):
        super().__init__()
        clip = transformers.CLIPVisionModel(config)
        if hasattr(clip, "vision_model"):       # transformers 4.x: keys already vision_model.*
            self.vision_tower = clip
        else:                                   # transformers 5.x: keys embeddings.*, encoder.*
            self.vision_tower = nn.Module()
            self.vision_tower.vision_model = clip
        self.select_layer = select_layer

    @property
    def clip(self) -> transformers.CLIPVisionModel:
        vt = self.vision_tower
        return vt if isinstance(vt, transformers.CLIPVisionModel) else vt.vision_model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, s, s) -> hidden_states[select_layer] without CLS, (B, (s/p)^2, D)."""
        out = self.clip(pixel_values=pixels, output_hidden_states=True)
        return out.hidden_states[self.select_layer][:, 1:]


class InfLlavaRef(nn.Module):
    """Released INF-LLaVA: CLIP -> DCM crops -> DEM -> mlp2x_gelu -> splice -> Llama.

    grid (nH, nW): sub-images per side (released: (3, 3)). variant "released" = bilinear
    "pooling" + mean with the low-res features; "paper" = average pooling + addition.
    """

    def __init__(self, vision_config: transformers.CLIPVisionConfig, text_config: transformers.LlamaConfig,
                 *, grid: tuple[int, int] = (3, 3), variant: str = "released", dem_heads: int = 8,
                 dem_head_dim: int = 128, dem_ffn_hidden: int = 64, select_layer: int = -2):
        super().__init__()
        if variant not in ("released", "paper"):
            raise ValueError(variant)
        lm = transformers.LlamaForCausalLM(text_config)
        self.model, self.lm_head = lm.model, lm.lm_head        # registered: released key names
        self._lm = [lm]                                       # in a list: not registered again
        Dv, Dl = vision_config.hidden_size, text_config.hidden_size
        self.model.vision_tower = CLIPVisionTower(vision_config, select_layer)
        self.model.mm_projector = nn.Sequential(nn.Linear(Dv, Dl), nn.GELU(), nn.Linear(Dl, Dl))
        self.model.spatial_embed = SpatialEmbed(Dv, dem_heads, dem_head_dim, dem_ffn_hidden)
        self.grid, self.variant = tuple(grid), variant
        self.sub_image_size = vision_config.image_size
        self.tokens_per_image = (vision_config.image_size // vision_config.patch_size) ** 2

    # ---------------------------------------------------------------------------------------
    def released_state_dict(self) -> dict[str, np.ndarray]:
        """state_dict() as numpy (fp32); the keys are the released ones."""
        return {k: v.detach().float().numpy() for k, v in self.state_dict().items()}

    def vision_features(self, views: torch.Tensor) -> torch.Tensor:
        return self.model.vision_tower(views)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, h, w) CLIP-normalised -> (B, T, D_llm). h x w is either nH*s x nW*s (used as
        is) or s x s (bicubic-upsampled first: the released inference loader feeds 336 px)."""
        s, (nH, nW) = self.sub_image_size, self.grid
        H, W = nH * s, nW * s
        if tuple(pixels.shape[-2:]) == (s, s) and (H, W) != (s, s):
            pixels = F.interpolate(pixels, size=(H, W), mode="bicubic", align_corners=False)
        assert tuple(pixels.shape[-2:]) == (H, W), pixels.shape
        B = pixels.shape[0]
        local = [pixels[:, :, r * s:(r + 1) * s, c * s:(c + 1) * s] for r in range(nH) for c in range(nW)]
        strided = [pixels[:, :, p::nH, q::nW] for p in range(nH) for q in range(nW)]
        low = F.interpolate(pixels, size=(s, s), mode="bicubic", align_corners=False)
        views = torch.cat(local + strided + [low])              # view-major: (V*B, 3, s, s)
        f = self.vision_features(views)
        f = f.view(len(local) + len(strided) + 1, B, *f.shape[1:]).transpose(0, 1)  # (B, V, T, D)
        N = nH * nW
        pooling, combine = ("bilinear", "mean") if self.variant == "released" else ("avg", "add")
        v = self.model.spatial_embed(f[:, :N], f[:, N:2 * N], f[:, 2 * N], nH=nH, nW=nW,
                                     pooling=pooling, combine=combine)
        return self.model.mm_projector(v)

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor,
                attention_mask: torch.Tensor | None = None, padding_side: str = "right"):
        """input_ids (B, L) with -200 sentinels; pixel_values (B, 3, h, w) or (B, K, 3, h, w):
        image k of row b replaces the k-th sentinel of row b. Pad tokens (mask 0) are dropped,
        each row is spliced, rows are re-padded (zeros) on `padding_side`.
        Returns (logits (B, L_out, V), attention_mask (B, L_out))."""
        B = input_ids.shape[0]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if pixel_values.dim() == 4:
            pixel_values = pixel_values[:, None]
        K = pixel_values.shape[1]
        images = self.encode_images(pixel_values.flatten(0, 1))
        images = images.view(B, K, *images.shape[1:])
        embed = self.model.embed_tokens
        rows = []
        for b in range(B):
            ids = input_ids[b][attention_mask[b].bool()]
            where = (ids == IMAGE_TOKEN_INDEX).nonzero().flatten().tolist()
            assert len(where) <= K, f"row {b} has {len(where)} images, pixel_values has {K}"
            pieces, start = [], 0
            for k, i in enumerate(where):
                pieces += [embed(ids[start:i]), images[b, k]]
                start = i + 1
            pieces.append(embed(ids[start:]))
            rows.append(torch.cat(pieces))
        L = max(len(r) for r in rows)
        x = rows[0].new_zeros(B, L, rows[0].shape[-1])
        mask = torch.zeros(B, L, dtype=torch.long)
        for b, r in enumerate(rows):
            sl = slice(0, len(r)) if padding_side == "right" else slice(L - len(r), L)
            x[b, sl], mask[b, sl] = r, 1
        # explicit positions: HF numbers positions 0..L-1 regardless of left padding
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        out = self._lm[0](inputs_embeds=x, attention_mask=mask, position_ids=positions)
        return out.logits, mask


# ---------------------------------------------------------------------------------------------
def randomize_(module: nn.Module, seed: int = 0, scale: float = 1.5) -> nn.Module:
    """Re-draw every parameter so that nothing is at its (1, 0) / tiny default and the logits
    are peaked: norms ~ U(0.5, 1.5), biases ~ N(0, 0.1), embeddings ~ N(0, 1), matrices
    ~ N(0, scale^2 / fan_in)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            is_norm = "norm" in name or ".ln." in name or "ln_fuse" in name  # LayerNorm / RMSNorm
            if is_norm and leaf == "weight":
                new = torch.rand(p.shape, generator=g) + 0.5
            elif leaf == "bias":
                new = 0.1 * torch.randn(p.shape, generator=g)
            elif "embed_tokens" in name or "class_embedding" in name:
                new = torch.randn(p.shape, generator=g)
            elif "position_embedding" in name:
                new = 0.5 * torch.randn(p.shape, generator=g)
            else:                       # Linear [out, in] / Conv [out, in, kh, kw]
                fan_in = math.prod(p.shape[1:])
                new = scale * fan_in ** -0.5 * torch.randn(p.shape, generator=g)
            p.copy_(new.to(p.dtype))
    return module.eval()
