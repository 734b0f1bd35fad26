"""The whole model: InfLlava vs the PyTorch reference of the released forward (convert/torch_reference.py),
LLaVA-1.5 vs transformers' LlavaForConditionalGeneration, fast == full path, multi-image splice,
paper variant, checkpoint round trips (also onto a mesh), and full-size parameter counts.

Tiny random models, CPU fp32 (conftest: highest matmul precision). Parity is measured on the
valid (unpadded) positions of long prompts (600+ tokens after splicing) as
max |ours - ref| / max |ref| <= 1e-4 and per-token KL(ref || ours) < 1e-6.
"""
from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from torch import nn

from convert.mapping import llava_hf_to_params, released_to_params
from convert.torch_reference import InfLlavaTorch, randomize_
from infllava_jax import presets, sharding
from infllava_jax.api import InfLlava
from infllava_jax.params import abstract_params
from infllava_jax.checkpoint import CONFIG_FILE
from infllava_jax.config import InfLlavaConfig
from infllava_jax.dem import key_map as dem_key_map
from infllava_jax.model import InfLlavaModel
from infllava_jax.pixels import preprocess
from infllava_jax.splice import IMAGE_TOKEN_INDEX as IMG
from tests.torch_ref import SpatialEmbed
from tests.tiers import slow

REL_TOL, KL_TOL = 1e-4, 1e-6
PAD = 0


# ----------------------------------------------------------------------------- helpers

def hf_configs(cfg: InfLlavaConfig, attn: str = "eager"):
    vision = {k: v for k, v in cfg.vision.to_hf().items() if k != "model_type"}
    return (transformers.CLIPVisionConfig(**vision, attn_implementation=attn),
            transformers.LlamaConfig(**cfg.llm.to_hf(), attn_implementation=attn))


@functools.lru_cache(maxsize=None)
def reference(cfg: InfLlavaConfig, seed: int = 0):
    """(torch reference with random weights, our params converted from its released state dict)."""
    ref = randomize_(InfLlavaTorch.from_config(cfg, device="cpu"), seed)
    return ref, released_to_params(ref.released_state_dict(), cfg)


def tiny_grid(nH: int, nW: int, variant: str = "released") -> InfLlavaConfig:
    cfg = presets.tiny(grid=nH, variant=variant)
    return cfg.replace(dem=dataclasses.replace(cfg.dem, nH=nH, nW=nW))


def make_batch(rng, L: int, rows, hi: int):
    """rows: (left pad, right pad, sentinel offsets within the row's tokens). Text ids in [1, hi)."""
    ids = np.full((len(rows), L), PAD, np.int64)
    mask = np.zeros((len(rows), L), np.int64)
    for b, (left, right, sentinels) in enumerate(rows):
        n = L - left - right
        row = rng.integers(1, hi, n)
        row[list(sentinels)] = IMG
        ids[b, left:left + n], mask[b, left:left + n] = row, 1
    return ids, mask


def images(kind: str, cfg: InfLlavaConfig, mode: str, seed: int = 0):
    """(3, h, w) CLIP-normalised: a real skimage picture or noise; h x w = the high-resolution
    input (mode "highres") or one s x s sub-image (mode "lowres", upsampled by the model)."""
    import skimage.data
    H, W = cfg.image_size if mode == "highres" else (cfg.sub_image_size,) * 2
    if kind == "noise":
        x = np.random.default_rng(seed).standard_normal((H, W, 3)).astype(np.float32)
    else:
        img = {"astronaut": skimage.data.astronaut, "coffee": skimage.data.coffee}[kind]()
        x = preprocess(img, size=max(H, W), mode="pad")
        top, left = (x.shape[0] - H) // 2, (x.shape[1] - W) // 2
        x = x[top:top + H, left:left + W]
    return np.ascontiguousarray(np.moveaxis(x, -1, 0))


def spliced_mask(ids, mask, T: int, L_out: int):
    """Attention mask after splicing: each sentinel becomes T positions of its mask value."""
    out = np.zeros((ids.shape[0], L_out), np.int64)
    for b in range(ids.shape[0]):
        m = np.repeat(mask[b], np.where(ids[b] == IMG, T, 1))
        out[b, :len(m)] = m
    return out


def ref_forward(ref, ids, pixels, mask, padding_side="right"):
    with torch.no_grad():
        logits, m = ref(torch.from_numpy(ids), torch.from_numpy(pixels), torch.from_numpy(mask),
                        padding_side=padding_side)
    return logits.numpy(), m.numpy()


def _log_softmax64(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def parity(ours, our_mask, ref, ref_mask):
    """Compare the valid positions row by row (both sides may pad differently).
    Returns (max rel error, max per-token KL(ref || ours), max |ref logit|)."""
    a = np.concatenate([ours[b][our_mask[b] == 1] for b in range(len(ours))])
    r = np.concatenate([ref[b][ref_mask[b] == 1] for b in range(len(ref))])
    assert a.shape == r.shape, (a.shape, r.shape)
    lp, lq = _log_softmax64(r), _log_softmax64(a)
    kl = np.sum(np.exp(lp) * (lp - lq), axis=-1)
    return float(np.abs(a - r).max() / np.abs(r).max()), float(kl.max()), float(np.abs(r).max())


def check_parity(name, ours, our_mask, ref, ref_mask, rel_tol=REL_TOL, kl_tol=KL_TOL):
    err, kl, peak = parity(ours, our_mask, ref, ref_mask)
    print(f"{name}: {int(our_mask.sum())} valid tokens, rel err {err:.2e}, max KL {kl:.2e}, "
          f"max|logit| {peak:.1f}")
    assert peak > 5.0, "logits too flat for the KL bound to mean anything"
    assert err <= rel_tol, (name, err)
    assert kl < kl_tol, (name, kl)


@functools.lru_cache(maxsize=None)
def _jit_method(cfg: InfLlavaConfig, method: str):
    fn = getattr(InfLlavaModel, method)
    return jax.jit(lambda p, *a: InfLlavaModel(cfg).apply({"params": p}, *a, method=fn))


def nhwc(x):
    return jnp.asarray(np.moveaxis(np.asarray(x), -3, -1))


# ----------------------------------------------------------------------------- the reference itself

def test_reference_state_dict_has_the_released_key_layout():
    cfg = presets.tiny()
    ref, _ = reference(cfg)
    keys = set(ref.state_dict())
    dem = {"model.spatial_embed." + r.key for r in dem_key_map()}
    proj = {f"model.mm_projector.{i}.{w}" for i in (0, 2) for w in ("weight", "bias")}
    vision = {k for k in keys if k.startswith("model.vision_tower.vision_tower.vision_model.")}
    llama = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} | {
        f"model.layers.{i}.{n}.weight" for i in range(cfg.llm.num_hidden_layers)
        for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm",
                  "post_attention_layernorm")}
    assert keys == dem | proj | vision | llama
    assert "model.vision_tower.vision_tower.vision_model.embeddings.patch_embedding.weight" in vision
    assert len(vision) == 5 + 16 * cfg.vision.num_hidden_layers + 2


# ----------------------------------------------------------------------------- end-to-end parity

@pytest.mark.parametrize("mode", ["highres", "lowres"])
def test_logits_match_torch_reference_long_prompts(mode):
    """Released tiny model (3x3 grid, fast path): InfLlava vs the torch reference, batch 2 with
    left and right padding, one real picture per row, 600+ tokens per row after splicing."""
    cfg = presets.tiny()
    T = cfg.tokens_per_image
    ref, params = reference(cfg)
    rng = np.random.default_rng(1)
    ids, mask = make_batch(rng, 640, [(13, 0, [30]), (0, 40, [3])], cfg.llm.vocab_size)
    pixels = np.stack([images("astronaut", cfg, mode), images("coffee", cfg, mode)])
    ours = InfLlava(cfg, params)(ids, pixels, mask)
    assert ours.shape == (2, 640 - 1 + T, cfg.llm.vocab_size) and ours.dtype == np.float32
    our_mask = spliced_mask(ids, mask, T, ours.shape[1])
    assert our_mask.sum(1).min() >= 600
    r, r_mask = ref_forward(ref, ids, pixels, mask, padding_side="left" if mode == "highres" else "right")
    check_parity(f"released tiny {mode}", ours, our_mask, r, r_mask)


def _vit_batch_sizes(jaxpr, patch: int):
    """Batch sizes of every patch embedding in a (nested) jaxpr: vision.PatchEmbedding's reshape of
    (B, H, W, C) pixels into (B, H/p, p, W/p, p, C) patches of the tower's patch size p."""
    out = []
    for eqn in jaxpr.eqns:
        shape = eqn.outvars[0].aval.shape if eqn.outvars else ()
        if eqn.primitive.name == "reshape" and len(shape) == 6 and shape[2] == shape[4] == patch:
            out.append(shape[0])
        for v in eqn.params.values():
            for sub in (v if isinstance(v, (tuple, list)) else (v,)):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    out += _vit_batch_sizes(sub, patch)
    return out


def test_fast_path_equals_full_path_at_model_level():
    cfg = presets.tiny()
    full = cfg.replace(dem=dataclasses.replace(cfg.dem, fast_path=False))
    assert cfg.dem.use_fast_path and not full.dem.use_fast_path
    _, params = reference(cfg)
    rng = np.random.default_rng(2)
    ids, mask = make_batch(rng, 300, [(0, 0, [10]), (25, 0, [40])], cfg.llm.vocab_size)
    pixels = np.stack([images("astronaut", cfg, "highres"), images("noise", cfg, "highres")])
    a = InfLlava(cfg, params)(ids, pixels, mask)
    b = InfLlava(full, params)(ids, pixels, mask)
    valid = spliced_mask(ids, mask, cfg.tokens_per_image, a.shape[1]) == 1
    err = float(np.abs(a - b)[valid].max() / np.abs(b[valid]).max())
    print(f"fast vs full, model logits: rel err {err:.2e}")
    assert err <= 1e-5
    # and the visual tokens themselves
    x = nhwc(pixels)
    ta = np.asarray(_jit_method(cfg, "vision_tokens")(params, x))
    tb = np.asarray(_jit_method(full, "vision_tokens")(params, x))
    assert float(np.abs(ta - tb).max() / np.abs(tb).max()) <= 1e-5

    # the fast path really encodes only N + 1 sub-images (3x3: 10 of 19)
    N = cfg.dem.num_crops
    assert (cfg.dem.vit_passes(), cfg.dem.vit_passes(fast=False)) == (N + 1, 2 * N + 1) == (10, 19)
    for c, passes in ((cfg, N + 1), (full, 2 * N + 1)):
        jaxpr = jax.make_jaxpr(lambda p, x: InfLlavaModel(c).apply(
            {"params": p}, x, method=InfLlavaModel.vision_tokens))(params, x)
        sizes = _vit_batch_sizes(jaxpr.jaxpr, c.vision.patch_size)
        assert sizes == [2 * passes], sizes


@pytest.mark.parametrize("nH,nW,mode", [(2, 3, "highres"), *slow((2, 2, "lowres"), (2, 3, "lowres"))])
def test_paper_variant_matches_torch_reference(nH, nW, mode):
    """Paper variant (average pooling + addition) on a square and a non-square grid, both
    pixel modes (s x s is bicubic-upsampled to nH*s x nW*s)."""
    cfg = tiny_grid(nH, nW, "paper")
    assert not cfg.dem.use_fast_path and cfg.image_size == (nH * 84, nW * 84)
    T = cfg.tokens_per_image
    ref, params = reference(cfg, seed=nH * 10 + nW)
    rng = np.random.default_rng(3)
    ids, mask = make_batch(rng, 300, [(0, 17, [50]), (9, 0, [0])], cfg.llm.vocab_size)
    pixels = np.stack([images("astronaut", cfg, mode), images("noise", cfg, mode, seed=4)])
    ours = InfLlava(cfg, params)(ids, pixels, mask)
    assert ours.shape == (2, 300 - 1 + T, cfg.llm.vocab_size)
    r, r_mask = ref_forward(ref, ids, pixels, mask)
    check_parity(f"paper {nH}x{nW} {mode}", ours, spliced_mask(ids, mask, T, ours.shape[1]), r, r_mask)


def test_multi_image_rows_splice_and_match_torch_reference():
    """Two sentinels in row 0, one in row 1 (its second image is unused and its tail is padding):
    every image's T tokens land at its sentinel's offset, text around them is unchanged."""
    cfg = presets.tiny()
    T, K = cfg.tokens_per_image, 2
    ref, params = reference(cfg)
    rng = np.random.default_rng(5)
    L = 320
    ids, mask = make_batch(rng, L, [(7, 0, [10, 150]), (0, 20, [3])], cfg.llm.vocab_size)
    pixels = np.stack([np.stack([images("astronaut", cfg, "highres"), images("coffee", cfg, "highres")]),
                       np.stack([images("noise", cfg, "highres", 6), images("noise", cfg, "highres", 7)])])
    assert pixels.shape == (2, K, 3, 252, 252)

    ours = InfLlava(cfg, params)(ids, pixels, mask)
    assert ours.shape == (2, L + K * (T - 1), cfg.llm.vocab_size)
    our_mask = spliced_mask(ids, mask, T, ours.shape[1])
    r, r_mask = ref_forward(ref, ids, pixels, mask)
    check_parity("multi-image rows", ours, our_mask, r, r_mask)

    x = nhwc(pixels)
    out = _jit_method(cfg, "embed_inputs")(params, jnp.asarray(ids), x, jnp.asarray(mask))
    emb, m = np.asarray(out["inputs_embeds"]), np.asarray(out["attention_mask"])
    np.testing.assert_array_equal(m, our_mask)
    imgs = np.asarray(_jit_method(cfg, "encode_images")(params, x.reshape(2 * K, *x.shape[2:])))
    imgs = imgs.reshape(2, K, T, -1)
    table = np.asarray(params["language_model"]["model"]["embed_tokens"]["embedding"])
    for b in range(2):
        out_pos = 0
        for j, tok in enumerate(ids[b]):
            if tok == IMG:
                k = int((ids[b, :j] == IMG).sum())
                assert out_pos == j + k * (T - 1)
                np.testing.assert_array_equal(emb[b, out_pos:out_pos + T], imgs[b, k])
                out_pos += T
            else:
                np.testing.assert_array_equal(emb[b, out_pos], table[tok])
                out_pos += 1
        assert not m[b, out_pos:].any()      # row 1: the unused image's (T - 1) tail slots
    assert m[1, -(T - 1):].sum() == 0


# ----------------------------------------------------------------------------- LLaVA-1.5 path

IMAGE_TOKEN_ID = 511   # HF's image token, inside the tiny vocabulary


@functools.lru_cache(maxsize=None)
def hf_llava():
    cfg = presets.tiny(grid=None)
    vision, text = hf_configs(cfg)
    lc = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN_ID,
                                  vision_feature_layer=-2, vision_feature_select_strategy="default",
                                  projector_hidden_act="gelu", attn_implementation="eager")
    torch.manual_seed(0)
    model = randomize_(transformers.LlavaForConditionalGeneration(lc), seed=7)
    return cfg, model


def test_llava15_matches_transformers_llava(tmp_path):
    cfg, hf = hf_llava()
    T = cfg.tokens_per_image
    assert hf.config.text_config.tie_word_embeddings is False

    # all three key layouts convert to the same params
    in_memory = {k: v.detach().numpy() for k, v in hf.state_dict().items()}   # v5: model.language_model.*
    assert "model.vision_tower.embeddings.patch_embedding.weight" in in_memory
    hf.save_pretrained(tmp_path)                                               # v5 file layout
    from safetensors.numpy import load_file
    saved = load_file(os.path.join(tmp_path, "model.safetensors"))
    assert "language_model.lm_head.weight" in saved and "vision_tower.embeddings.class_embedding" in saved
    old = {("vision_tower.vision_model." + k[len("vision_tower."):] if k.startswith("vision_tower.") else k): v
           for k, v in saved.items()}                                        # llava-hf (transformers 4.x)
    params = llava_hf_to_params(in_memory, cfg)
    for sd in (saved, old):
        jax.tree.map(np.testing.assert_array_equal, llava_hf_to_params(sd, cfg), params)

    rng = np.random.default_rng(8)
    ids, mask = make_batch(rng, 300, [(0, 0, [20]), (31, 0, [5])], IMAGE_TOKEN_ID)
    pixels = np.stack([images("astronaut", cfg, "lowres"), images("coffee", cfg, "lowres")])
    ours = InfLlava(cfg, params)(ids, pixels, mask)
    assert ours.shape == (2, 300 - 1 + T, cfg.llm.vocab_size)
    our_mask = spliced_mask(ids, mask, T, ours.shape[1])

    hf_ids = np.stack([np.concatenate([[IMAGE_TOKEN_ID] * T if t == IMG else [t] for t in row]) for row in ids])
    assert hf_ids.shape == ours.shape[:2]
    positions = np.maximum(np.cumsum(our_mask, 1) - 1, 0)
    with torch.no_grad():
        r = hf(input_ids=torch.from_numpy(hf_ids), pixel_values=torch.from_numpy(pixels),
               attention_mask=torch.from_numpy(our_mask), position_ids=torch.from_numpy(positions)).logits.numpy()
    check_parity("llava-1.5 vs LlavaForConditionalGeneration", ours, our_mask, r, our_mask)


# ----------------------------------------------------------------------------- checkpoints

@functools.lru_cache(maxsize=None)
def _ckpt_inputs():
    cfg = presets.tiny()
    ids, mask = make_batch(np.random.default_rng(9), 120, [(0, 0, [4]), (11, 0, [30])], cfg.llm.vocab_size)
    pixels = np.stack([images("astronaut", cfg, "lowres"), images("noise", cfg, "lowres", 10)])
    return cfg, ids, pixels, mask


def _leaf(params):
    return params["language_model"]["model"]["embed_tokens"]["embedding"]


def test_save_load_round_trip_single_device_and_mesh(tmp_path):
    cfg, ids, pixels, mask = _ckpt_inputs()
    _, params = reference(cfg)
    model = InfLlava(cfg, params)
    before = model(ids, pixels, mask)
    path = tmp_path / "ckpt"
    model.save_pretrained(path)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    loaded = InfLlava.from_pretrained(path)
    assert loaded.config == cfg
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, loaded.params), params)
    np.testing.assert_array_equal(loaded(ids, pixels, mask), before)

    mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
    sharded = InfLlava.from_pretrained(path, mesh=mesh)
    emb = _leaf(sharded.params)                              # (vocab, embed) -> (tensor, fsdp)
    assert len(emb.sharding.device_set) == 8
    assert emb.sharding.shard_shape(emb.shape) == (cfg.llm.vocab_size // 2, cfg.llm.hidden_size // 4)
    assert {s.data.shape for s in emb.addressable_shards} == {(256, 24)}
    gate = sharded.params["language_model"]["model"]["layers"]["mlp"]["gate_proj"]["kernel"]
    assert gate.sharding.shard_shape(gate.shape) == (2, 96 // 4, 192 // 2)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, sharded.params), params)
    out = sharded(ids, pixels, mask)
    valid = spliced_mask(ids, mask, cfg.tokens_per_image, out.shape[1]) == 1
    err = float(np.abs(out - before)[valid].max() / np.abs(before[valid]).max())
    print(f"sharded (fsdp 4 x tensor 2) vs single-device logits: rel err {err:.2e}")
    assert err <= 1e-5


def test_checkpoint_errors_and_atomic_overwrite(tmp_path, monkeypatch):
    cfg, ids, pixels, mask = _ckpt_inputs()
    _, params = reference(cfg)
    path = tmp_path / "ckpt"
    InfLlava(cfg, params).save_pretrained(path)

    # overwrite with different weights: the new ones are read back, nothing left behind
    params2 = jax.tree.map(lambda a: np.asarray(a) * 0.5, params)
    InfLlava(cfg, params2).save_pretrained(path)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    np.testing.assert_array_equal(np.asarray(_leaf(InfLlava.from_pretrained(path).params)), _leaf(params2))

    # a save that dies half-way (parameters written, config not yet) leaves the previous
    # checkpoint intact and no temporary directories
    def boom(self):
        raise RuntimeError("disk full")
    monkeypatch.setattr(InfLlavaConfig, "to_json", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        InfLlava(cfg, params).save_pretrained(path)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    np.testing.assert_array_equal(np.asarray(_leaf(InfLlava.from_pretrained(path).params)), _leaf(params2))

    # corrupted / inconsistent / missing config.json: errors name the file
    cfg_file = path / CONFIG_FILE
    good = cfg_file.read_text()
    cfg_file.write_text(good[: len(good) // 2])
    with pytest.raises(ValueError, match=CONFIG_FILE):
        InfLlava.from_pretrained(path)
    cfg_file.write_text(good.replace('"num_hidden_layers": 3', '"num_hidden_layerz": 3'))
    with pytest.raises(ValueError, match="num_hidden_layerz"):
        InfLlava.from_pretrained(path)
    cfg_file.write_text(good.replace('"vocab_size": 512', '"vocab_size": 640'))
    with pytest.raises(ValueError, match=r"\['language_model'\].* has shape \(\d+, \d+\) in the checkpoint, \(\d+, \d+\) in config.json"):
        InfLlava.from_pretrained(path)
    cfg_file.unlink()
    with pytest.raises(FileNotFoundError, match=CONFIG_FILE):
        InfLlava.from_pretrained(path)


# ----------------------------------------------------------------------------- full-size shapes

def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_full_size_parameter_count_matches_torch_meta_models():
    """presets.inf_llava_8b, shapes only: each component's parameter count equals that of the
    PyTorch modules the released checkpoint holds (built on the meta device, sizes from docs/model.md §1)."""
    abstract = abstract_params(presets.inf_llava_8b())
    with torch.device("meta"):
        clip = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
            hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
            image_size=336, patch_size=14))
        llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=128257, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
            num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False))
        dem = SpatialEmbed()
        proj = nn.Sequential(nn.Linear(1024, 4096), nn.GELU(), nn.Linear(4096, 4096))
    n = lambda m: sum(p.numel() for p in m.parameters())
    expected = {"vision_tower": n(clip), "spatial_embed": n(dem), "mm_projector": n(proj),
                "language_model": n(llama)}
    assert expected["mm_projector"] == 1024 * 4096 + 4096 + 4096 * 4096 + 4096
    assert expected["language_model"] == 8_030_261_248 + 2 * 4096    # Llama-3-8B + the <pad> row
    got = {k: _count(v) for k, v in abstract.items()}
    print("parameter counts:", got, "total", sum(got.values()))
    assert got == expected
    assert _count(abstract) == sum(expected.values())
