"""PyTorch reference of the released INF-LLaVA forward, written from SPEC.md (sections 1-4, 6, 8),
for `python -m convert ... --verify`. Imports nothing from infllava_jax's model code.

Plain PyTorch on purpose: crops are slices, resizes `F.interpolate` (bicubic/bilinear,
align_corners=False), the DEM is the full computation with a loop over windows, the splice
replaces the one -200 sentinel. CLIP and Llama are transformers' own modules, as in the
released code (its LlavaLlamaForCausalLM subclasses LlamaForCausalLM; its vision tower is
CLIPVisionModel).

`InfLlavaTorch.load_released(tensors)` takes a state dict with the released key names
(SPEC section 8) whose values are numpy arrays or objects with `.read()` (convert.sources):
modules are built on the meta device, allocated once, and filled tensor by tensor, so the
model is in memory once (an 8B model in bf16: ~16 GB).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

IMAGE_TOKEN_INDEX = -200
RELEASED_VISION_PREFIX = "model.vision_tower.vision_tower.vision_model."
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
    """DEM (SPEC section 4): one shared MHA, ffn_crop / ffn_stride, ln_fuse."""

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


def _fill(module: nn.Module, tensors: Mapping[str, Any], prefix: str, dtype: torch.dtype) -> None:
    """Allocate `module` (built on meta) once and copy `prefix + name` into every parameter.
    Parameter names must match exactly (both ways); transformers v5's flattened
    CLIPVisionModel has no `vision_model.` level, which is looked up either way."""
    module.to_empty(device="cpu")
    module.to(dtype)
    names = dict(module.named_parameters())
    for name, p in names.items():
        candidates = [prefix + name] + ([prefix + name[len("vision_model."):]] if name.startswith("vision_model.") else [])
        key = next((k for k in candidates if k in tensors), None)
        if key is None:
            raise KeyError(f"torch reference: no tensor {candidates[0]!r}")
        t = _to_torch(tensors[key])
        if tuple(t.shape) != tuple(p.shape):
            raise ValueError(f"torch reference: {key} has shape {tuple(t.shape)}, module wants {tuple(p.shape)}")
        with torch.no_grad():
            p.copy_(t)


class InfLlavaTorch(nn.Module):
    """Released INF-LLaVA: CLIP -> DCM crops -> DEM -> mlp2x_gelu -> splice -> Llama.

    vision / text: HF CLIPVisionConfig / LlamaConfig kwargs; dem: dict(num_heads, head_dim,
    ffn_hidden, ffn_out, nH, nW, variant, ln_eps) or None (LLaVA-1.5 path); dtypes per part."""

    def __init__(self, vision: dict, text: dict, dem: dict | None, select_layer: int = -2,
                 dtypes: tuple[str, str, str] = ("float32", "float32", "float32")):
        super().__init__()
        import transformers
        vision = {k: v for k, v in vision.items() if k != "model_type"}
        self.vdt, self.ldt, self.ddt = (TORCH_DTYPES[d] for d in dtypes)
        with torch.device("meta"):
            self.vision = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**vision, attn_implementation="eager"))
            self.llm = transformers.LlamaForCausalLM(transformers.LlamaConfig(**text, attn_implementation="eager"))
            Dv, Dl = vision["hidden_size"], text["hidden_size"]
            self.mm_projector = nn.Sequential(nn.Linear(Dv, Dl), nn.GELU(), nn.Linear(Dl, Dl))
            self.spatial_embed = None if dem is None else SpatialEmbed(
                Dv, dem["num_heads"], dem["head_dim"], dem["ffn_hidden"], dem["ffn_out"], dem.get("ln_eps", 1e-5))
        self.dem, self.select_layer = dem, select_layer
        self.s = vision["image_size"]

    def load_released(self, tensors: Mapping[str, Any]) -> "InfLlavaTorch":
        _fill(self.vision, tensors, RELEASED_VISION_PREFIX, self.vdt)
        _fill(self.mm_projector, tensors, "model.mm_projector.", self.ldt)
        if self.spatial_embed is not None:
            _fill(self.spatial_embed, tensors, "model.spatial_embed.", self.ddt)
        _fill(self.llm, tensors, "", self.ldt)
        self._fix_buffers()
        return self.eval()

    def _fix_buffers(self):
        """Buffers are not in state dicts; recompute them after to_empty()."""
        rope = self.llm.model.rotary_emb
        self.llm.model.rotary_emb = type(rope)(config=self.llm.config)
        emb = getattr(self.vision, "vision_model", self.vision).embeddings
        emb.position_ids = torch.arange(emb.num_positions).expand((1, -1))
        left = [n for n, b in self.named_buffers() if b.is_meta]
        if left:
            raise RuntimeError(f"torch reference: uninitialised buffers {left}")

    # -------------------------------------------------------------------------------------
    def features(self, views):
        out = self.vision(pixel_values=views.to(self.vdt), output_hidden_states=True)
        return out.hidden_states[self.select_layer][:, 1:]

    def encode_images(self, pixels):
        """(B, 3, h, w) float32, h = w = s (upsampled to n*s first, the released inference path)
        or n*s -> (B, T, D_llm)."""
        s = self.s
        if self.dem is None:
            v = self.features(pixels)
        else:
            nH, nW = self.dem["nH"], self.dem["nW"]
            if tuple(pixels.shape[-2:]) == (s, s) and (nH, nW) != (1, 1):
                pixels = F.interpolate(pixels, size=(nH * s, nW * s), mode="bicubic", align_corners=False)
            B = pixels.shape[0]
            local = [pixels[:, :, r * s:(r + 1) * s, c * s:(c + 1) * s] for r in range(nH) for c in range(nW)]
            strided = [pixels[:, :, p::nH, q::nW] for p in range(nH) for q in range(nW)]
            low = F.interpolate(pixels, size=(s, s), mode="bicubic", align_corners=False)
            f = self.features(torch.cat(local + strided + [low]))
            f = f.view(2 * nH * nW + 1, B, *f.shape[1:]).transpose(0, 1).to(self.ddt)
            N = nH * nW
            v = self.spatial_embed(f[:, :N], f[:, N:2 * N], f[:, 2 * N], nH, nW, self.dem.get("variant", "released"))
        return self.mm_projector(v.to(self.ldt))

    @torch.no_grad()
    def forward(self, input_ids, pixel_values, image_token_index: int = IMAGE_TOKEN_INDEX):
        """input_ids (1, L) with one `image_token_index`; pixel_values (1, 3, h, w).
        Returns float32 logits (1, L - 1 + T, V)."""
        ids = input_ids[0]
        where = (ids == image_token_index).nonzero().flatten().tolist()
        if len(where) != 1:
            raise ValueError(f"expected one image token, found {len(where)}")
        i = where[0]
        embed = self.llm.model.embed_tokens
        image = self.encode_images(pixel_values)[0]
        x = torch.cat([embed(ids[:i]), image.to(embed.weight.dtype), embed(ids[i + 1:])])[None]
        return self.llm(inputs_embeds=x).logits.float()
