"""Named model configs: the released INF-LLaVA, the paper variant at any resolution, LLaVA-1.5, a
1.5 B benchmark model, tiny."""
from __future__ import annotations

from infllava_jax.config import InfLlavaConfig
from infllava_jax.dem import DEMConfig
from infllava_jax.llama import LlamaConfig, llama3_8b
from infllava_jax.vision import CLIPVisionConfig

LLAMA3_PAD_ID = 128256  # the `<pad>` row the released training appended (vocabulary 128257)


def inf_llava_8b(**dem_overrides) -> InfLlavaConfig:
    """Released INF-LLaVA (WeihuangLin/INF-LLaVA-sft): 1008 px, 3x3 grid, released DEM."""
    return InfLlavaConfig(vision=CLIPVisionConfig.clip_vit_l14_336(),
                          llm=llama3_8b(vocab_size=LLAMA3_PAD_ID + 1),
                          dem=DEMConfig(**dem_overrides), pad_token_id=LLAMA3_PAD_ID)


def inf_llava_paper(height: int = 1008, width: int | None = None, **dem_overrides) -> InfLlavaConfig:
    """Paper variant: a floor(H/336) x floor(W/336) grid (336..1680 px, non-square too)."""
    width = height if width is None else width
    nH, nW = height // 336, width // 336
    if min(nH, nW) < 1:
        raise ValueError(f"paper variant needs at least 336 px per side, got {height}x{width}")
    return inf_llava_8b(variant="paper", nH=nH, nW=nW, **dem_overrides)


def inf_llava_1b() -> InfLlavaConfig:
    """The released structure (CLIP ViT-L/14-336, 3x3 grid, released DEM) on a Llama-3.2-1B-shaped
    decoder (16 layers, 2048 wide, tied embeddings): 1.5 B parameters, for benchmarks (no weights)."""
    llm = llama3_8b(vocab_size=LLAMA3_PAD_ID + 1, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                    num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True)
    return InfLlavaConfig(vision=CLIPVisionConfig.clip_vit_l14_336(), llm=llm, dem=DEMConfig(),
                          pad_token_id=LLAMA3_PAD_ID)


def llava15_7b() -> InfLlavaConfig:
    """LLaVA-1.5-7B (Vicuna-7B, 336 px, no DCM/DEM)."""
    llm = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-5,
                      rope_theta=10000.0, max_position_embeddings=4096, tie_word_embeddings=False)
    return InfLlavaConfig(vision=CLIPVisionConfig.clip_vit_l14_336(), llm=llm, dem=None, pad_token_id=0)


def tiny(grid: int | None = 3, variant: str = "released", vocab_size: int = 512, views: str = "both",
         **runtime) -> InfLlavaConfig:
    """A few-MB model of the same structure (84 px sub-images, 6x6 tokens) for tests and demos.

    grid=None gives the LLaVA-1.5 path; views="local" | "strided" the DCM ablations; `runtime` (dtype, scan_layers, remat_policy, ...) goes to
    the vision tower and the language model."""
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                              num_attention_heads=4, image_size=84, patch_size=14, **runtime)
    llm = LlamaConfig(vocab_size=vocab_size, hidden_size=96, intermediate_size=192, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                      rope_theta=500000.0, max_position_embeddings=4096, tie_word_embeddings=False,
                      initializer_range=96 ** -0.5, **runtime)   # 1/sqrt(d): 0.02 stalls a 96-wide model
    dem = None if grid is None else DEMConfig(variant=variant, hidden=64, num_heads=4, head_dim=16,
                                              ffn_hidden=16, ffn_out=32, nH=grid, nW=grid, g=6, views=views)
    return InfLlavaConfig(vision=vision, llm=llm, dem=dem, pad_token_id=0)
