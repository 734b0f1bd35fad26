"""PyTorch reference of the released INF-LLaVA forward, written from docs/model.md (sections 1-4, 6, 8):
the `python -m convert ... --verify` model and the tests' reference. Imports only constants
from infllava_jax, none of its model code.

Plain PyTorch on purpose: crops are slices, resizes `F.interpolate` (bicubic/bilinear,
align_corners=False), the DEM is the full computation with a loop over windows, the splice is
a Python loop per row (LLaVA's `prepare_inputs_labels_for_multimodal`). CLIP and Llama are
transformers' own modules, as in the released code (its LlavaLlamaForCausalLM subclasses
LlamaForCausalLM; its vision tower is CLIPVisionModel).

`InfLlavaTorch.state_dict()` has exactly the released key names (docs/model.md section 8):

    model.vision_tower.vision_tower.vision_model.*      HF CLIPVisionModel
    model.mm_projector.{0,2}.{weight,bias}              Linear, GELU, Linear
    model.spatial_embed.*                               SpatialEmbed (DEM)
    model.embed_tokens / model.layers.* / model.norm    HF LlamaModel
    lm_head.weight

As in the released model the multimodal modules live inside the Llama `model`; the
LlamaForCausalLM that runs the decoder is held unregistered. Built on the meta device,
`load_released(tensors)` allocates the model once and fills it tensor by tensor from a state dict
whose values are numpy arrays or objects with `.read()` (convert.sources), so the model is in
memory once (an 8B model in bf16: ~16 GB).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from torch import nn

from infllava_jax.splice import IMAGE_TOKEN_INDEX

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class MultiHeadedAttention(nn.Module):
    """LN(linears[3](softmax(Q K^T / sqrt(d_k)) V) + query); Q, K, V = linears[0..2](.)."""

    def __init__(self, d_model: int, heads: int, d_k: int, eps: float = 1e-5):
        super().__init__()
        self.heads, self.d_k = heads, d_k
        self.linears = nn.ModuleList([nn.Linear(d_model, heads * d_k) for _ in range(3)]
                                     + [nn.Linear(heads * d_k, d_model)])
        self.ln = nn.LayerNorm(d_model, eps=eps)

    def forward(self, query, key_value):
        B = query.shape[0]
        q, k, v = (lin(x).view(B, -1, self.heads, self.d_k).transpose(1, 2)
                   for lin, x in zip(self.linears[:3], (query, key_value, key_value)))
        probs = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(self.d_k), dim=-1)
        x = (probs @ v).transpose(1, 2).reshape(B, -1, self.heads * self.d_k)
        return self.ln(self.linears[3](x) + query)


class SpatialEmbed(nn.Module):
    """DEM (docs/model.md section 4): one shared MHA, ffn_crop / ffn_stride, ln_fuse."""

    def __init__(self, d_model: int, heads: int, d_k: int, ffn_hidden: int, ffn_out: int, eps: float = 1e-5):
        super().__init__()
        self.attention = MultiHeadedAttention(d_model, heads, d_k, eps)
        self.ffn_crop = nn.Sequential(nn.Linear(d_model, ffn_hidden), nn.GELU(), nn.Linear(ffn_hidden, ffn_out))
        self.ffn_stride = nn.Sequential(nn.Linear(d_model, ffn_hidden), nn.GELU(), nn.Linear(ffn_hidden, ffn_out))
        self.ln_fuse = nn.LayerNorm(d_model, eps=eps)

    def forward(self, local, strided, low, nH: int, nW: int, variant: str = "released"):
        """local, strided (B, nH*nW, g*g, D) in crop order r*nW+c / p*nW+q; low (B, g*g, D)."""
        B, N, L, D = local.shape
        g = math.isqrt(L)
        H, W = nH * g, nW * g
        F_loc, F_glo = local.new_zeros(B, H, W, D), local.new_zeros(B, H, W, D)
        for r in range(nH):
            for c in range(nW):
                F_loc[:, r * g:(r + 1) * g, c * g:(c + 1) * g] = local[:, r * nW + c].view(B, g, g, D)
                F_glo[:, r::nH, c::nW] = strided[:, r * nW + c].view(B, g, g, D)
        A, Bm = torch.zeros_like(F_loc), torch.zeros_like(F_loc)
        for r in range(nH):
            for c in range(nW):
                blk = F_glo[:, r * g:(r + 1) * g, c * g:(c + 1) * g].reshape(B, L, D)   # global as query
                A[:, r * g:(r + 1) * g, c * g:(c + 1) * g] = self.attention(blk, local[:, r * nW + c]).view(B, g, g, D)
                ph = F_loc[:, r::nH, c::nW].reshape(B, L, D)                               # local as query
                Bm[:, r::nH, c::nW] = self.attention(ph, strided[:, r * nW + c]).view(B, g, g, D)
        Fmap = self.ln_fuse(torch.cat([self.ffn_crop(Bm), self.ffn_stride(A)], dim=-1) + A + Bm)
        chw = Fmap.permute(0, 3, 1, 2)
        if variant == "released":
            pooled = F.interpolate(chw.float(), size=(g, g), mode="bilinear", align_corners=False).to(chw.dtype)
        else:
            pooled = F.avg_pool2d(chw, kernel_size=(nH, nW))
        pooled = pooled.permute(0, 2, 3, 1).reshape(B, L, D)
        return (low + pooled) / 2 if variant == "released" else low + pooled


def _to_torch(value) -> torch.Tensor:
    a = value.read() if hasattr(value, "read") else value
    if isinstance(a, torch.Tensor):
        return a
    a = np.asarray(a)
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(a))


class CLIPVisionTower(nn.Module):
    """LLaVA's wrapper: `self.vision_tower` is the HF CLIPVisionModel, whose modules sit under
    `vision_model.` (transformers 4.x). transformers v5 flattened CLIPVisionModel, so there the
    `vision_model` level is re-created with a holder module (same names, same computation)."""

    def __init__(self, config, select_layer: int = -2):
        super().__init__()
        clip = transformers.CLIPVisionModel(config)
        if hasattr(clip, "vision_model"):       # transformers 4.x: keys already vision_model.*
            self.vision_tower = clip
        else:                                   # transformers 5.x: keys embeddings.*, encoder.*
            self.vision_tower = nn.Module()
            self.vision_tower.vision_model = clip
        self.select_layer = select_layer

    @property
    def clip(self):
        """The HF CLIPVisionModel."""
        vt = self.vision_tower
        return vt if isinstance(vt, transformers.PreTrainedModel) else vt.vision_model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, s, s) -> hidden_states[select_layer] without CLS, (B, (s/p)^2, D)."""
        return self.clip(pixel_values=pixels, output_hidden_states=True).hidden_states[self.select_layer][:, 1:]


class InfLlavaTorch(nn.Module):
    """Released INF-LLaVA: CLIP -> DCM crops -> DEM -> mlp2x_gelu -> splice -> Llama.

    vision / text: HF CLIPVisionConfig / LlamaConfig kwargs; dem: dict(num_heads, head_dim,
    ffn_hidden, ffn_out, nH, nW, variant, ln_eps) or None (LLaVA-1.5 path); dtypes of the vision
    tower, the language model (and projector), the DEM. device "meta": fill with load_released."""

    def __init__(self, vision: dict, text: dict, dem: dict | None, select_layer: int = -2,
                 dtypes: tuple[str, str, str] = ("float32", "float32", "float32"), *, device: str = "meta",
                 attn_implementation: str = "eager", image_token_index: int = IMAGE_TOKEN_INDEX):
        super().__init__()
        vision = {k: v for k, v in vision.items() if k != "model_type"}
        self.vdt, self.ldt, self.ddt = (TORCH_DTYPES[d] for d in dtypes)
        with torch.device(device):
            lm = transformers.LlamaForCausalLM(transformers.LlamaConfig(
                **text, attn_implementation=attn_implementation))
            self.model, self.lm_head = lm.model, lm.lm_head    # registered: released key names
            self._lm = [lm]                                   # in a list: not registered again
            self.model.vision_tower = CLIPVisionTower(transformers.CLIPVisionConfig(
                **vision, attn_implementation=attn_implementation), select_layer)
            Dv, Dl = vision["hidden_size"], text["hidden_size"]
            self.model.mm_projector = nn.Sequential(nn.Linear(Dv, Dl), nn.GELU(), nn.Linear(Dl, Dl))
            if dem is not None:
                self.model.spatial_embed = SpatialEmbed(Dv, dem["num_heads"], dem["head_dim"], dem["ffn_hidden"],
                                                        dem["ffn_out"], dem.get("ln_eps", 1e-5))
        self.dem, self.s, self.image_token_index = dem, vision["image_size"], image_token_index
        if device != "meta":
            self._cast()

    def _cast(self):
        self.to(self.ldt)
        self.model.vision_tower.to(self.vdt)
        if self.dem is not None:
            self.model.spatial_embed.to(self.ddt)

    @property
    def llm(self):
        """The HF LlamaForCausalLM that runs the decoder (its modules are registered above)."""
        return self._lm[0]

    @classmethod
    def from_config(cls, c, **kw) -> "InfLlavaTorch":
        """The reference of an InfLlavaConfig `c` (sizes, grid, variant, parameter dtypes)."""
        dem = None if c.dem is None else {k: getattr(c.dem, k) for k in
                                          ("num_heads", "head_dim", "ffn_hidden", "ffn_out", "nH", "nW", "variant",
                                           "ln_eps")}
        dtypes = (c.vision.param_dtype, c.llm.param_dtype, c.dem.param_dtype if c.dem else c.llm.param_dtype)
        return cls(c.vision.to_hf(), c.llm.to_hf(), dem, c.select_layer, dtypes,
                   image_token_index=c.image_token_index, **kw)

    def load_released(self, tensors: Mapping[str, Any]) -> "InfLlavaTorch":
        """Allocate (once) and copy every parameter from `tensors` (released key names)."""
        self.to_empty(device="cpu")
        self._cast()
        for name, p in self.named_parameters():
            if name not in tensors:
                raise KeyError(f"torch reference: no tensor {name!r}")
            t = _to_torch(tensors[name])
            if tuple(t.shape) != tuple(p.shape):
                raise ValueError(f"torch reference: {name} has shape {tuple(t.shape)}, module wants {tuple(p.shape)}")
            with torch.no_grad():
                p.copy_(t)
        self._fix_buffers()
        return self.eval()

    def _fix_buffers(self):
        """Buffers are not in state dicts; recompute them after to_empty()."""
        rope = self.model.rotary_emb
        self.model.rotary_emb = type(rope)(config=self.llm.config)
        clip = self.model.vision_tower.clip
        emb = getattr(clip, "vision_model", clip).embeddings
        emb.position_ids = torch.arange(emb.num_positions).expand((1, -1))
        left = [n for n, b in self.named_buffers() if b.is_meta]
        if left:
            raise RuntimeError(f"torch reference: uninitialised buffers {left}")

    def released_state_dict(self) -> dict[str, np.ndarray]:
        """state_dict() as numpy (fp32); the keys are the released ones."""
        return {k: v.detach().float().numpy() for k, v in self.state_dict().items()}

    # -------------------------------------------------------------------------------------
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, h, w) CLIP-normalised -> (B, T, D_llm). h x w is either nH*s x nW*s (used as
        is) or s x s (bicubic-upsampled first: the released inference loader feeds 336 px)."""
        s, tower = self.s, self.model.vision_tower
        if self.dem is None:
            return self.model.mm_projector(tower(pixels.to(self.vdt)).to(self.ldt))
        nH, nW = self.dem["nH"], self.dem["nW"]
        if tuple(pixels.shape[-2:]) == (s, s) and (nH, nW) != (1, 1):
            pixels = F.interpolate(pixels, size=(nH * s, nW * s), mode="bicubic", align_corners=False)
        B, N = pixels.shape[0], nH * nW
        local = [pixels[:, :, r * s:(r + 1) * s, c * s:(c + 1) * s] for r in range(nH) for c in range(nW)]
        strided = [pixels[:, :, p::nH, q::nW] for p in range(nH) for q in range(nW)]
        low = F.interpolate(pixels, size=(s, s), mode="bicubic", align_corners=False)
        f = tower(torch.cat(local + strided + [low]).to(self.vdt))             # view-major: (V*B, T, D)
        f = f.view(2 * N + 1, B, *f.shape[1:]).transpose(0, 1).to(self.ddt)   # (B, V, T, D)
        v = self.model.spatial_embed(f[:, :N], f[:, N:2 * N], f[:, 2 * N], nH, nW, self.dem.get("variant", "released"))
        return self.model.mm_projector(v.to(self.ldt))

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor,
                attention_mask: torch.Tensor | None = None, padding_side: str = "right"):
        """input_ids (B, L) with `image_token_index` sentinels; pixel_values (B, 3, h, w) or
        (B, K, 3, h, w): image k of row b replaces the k-th sentinel of row b. Pad tokens (mask 0)
        are dropped, each row is spliced, rows are re-padded (zeros) on `padding_side`.
        Returns (float32 logits (B, L_out, V), attention_mask (B, L_out))."""
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
            where = (ids == self.image_token_index).nonzero().flatten().tolist()
            assert len(where) <= K, f"row {b} has {len(where)} images, pixel_values has {K}"
            pieces, start = [], 0
            for k, i in enumerate(where):
                pieces += [embed(ids[start:i]), images[b, k].to(embed.weight.dtype)]
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
        out = self.llm(inputs_embeds=x, attention_mask=mask, position_ids=positions)
        return out.logits.float(), mask


def randomize_(module: nn.Module, seed: int = 0, scale: float = 1.5) -> nn.Module:
    """Re-draw every parameter so that nothing is at its (1, 0) / tiny default and the logits
    are peaked (parity checks on random models): norms ~ U(0.5, 1.5), biases ~ N(0, 0.1),
    embeddings ~ N(0, 1), matrices ~ N(0, scale^2 / fan_in)."""
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
