"""python -m convert / convert.export / --verify on tiny random models in every supported format.

Sources are written the way users get them: released INF-LLaVA (sharded safetensors + index, or
sharded pytorch_model-*.bin + index, with or without CLIP weights), transformers' CLIPModel /
CLIPVisionModel / LlamaForCausalLM / LlavaForConditionalGeneration save_pretrained directories
(and the 4.x LLaVA key layout), a stage-1 mm_projector.bin. Parity: `convert.verify` (PyTorch
vs our converted checkpoint, astronaut photo + 300-token prompt): fp32 max|d|/max|ref| <= 1e-4
and per-token KL <= 1e-6. Round trips are bit-identical. CLI commands run in-process (main(argv));
only the malicious-pickle test runs a subprocess (exit code, stderr, no traceback).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from flax.traverse_util import flatten_dict

from convert import engine, formats, importer
from convert.__main__ import main as convert_main
from convert.export import main as export_main, open_checkpoint, released_config_json
from convert.sources import ArrayTensor, open_weights
from convert.verify import verify
from convert.writers import write_safetensors
from infllava_jax import presets, sharding
from infllava_jax.api import InfLlava
from infllava_jax.params import abstract_params

REPO = Path(__file__).resolve().parent.parent
REL_TOL, KL_TOL = 1e-4, 1e-6
BF16 = np.dtype(ml_dtypes.bfloat16)


# ----------------------------------------------------------------------------- sources

def random_state(rows, abstract, seed: int, dtype=np.float32) -> dict[str, np.ndarray]:
    """Torch-layout random tensors for every key of `rows` (shapes from our abstract tree):
    norms ~ U(0.5, 1.5), biases ~ N(0, 0.1), embeddings ~ N(0, 1), matrices ~ N(0, 1.5^2/fan_in)
    (peaked logits, nothing at its (1, 0) default)."""
    rng = np.random.default_rng(seed)
    specs = flatten_dict(abstract, sep="/")
    out = {}
    for r in rows:
        shape = r.torch_shape(specs[r.path].shape)
        for k in r.keys():
            if r.path.endswith("/scale"):
                a = rng.uniform(0.5, 1.5, shape)
            elif r.path.endswith("/bias"):
                a = 0.1 * rng.standard_normal(shape)
            elif "embed_tokens" in k or "class_embedding" in k:
                a = rng.standard_normal(shape)
            elif "position_embedding" in k:
                a = 0.5 * rng.standard_normal(shape)
            else:
                a = 1.5 * rng.standard_normal(shape) / math.sqrt(int(np.prod(shape[1:])))
            out[k] = a.astype(dtype)
    return out


def write_st(directory: Path, sd: dict, shard_bytes: int = 1 << 40) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    write_safetensors({k: ArrayTensor(v) for k, v in sd.items()}, directory, max_shard_bytes=shard_bytes)
    return directory


def to_torch_tensor(a: np.ndarray) -> torch.Tensor:
    if a.dtype == BF16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(a))


def write_bins(directory: Path, sd: dict, n_shards: int = 2) -> Path:
    """pytorch_model-0000i-of-0000n.bin + pytorch_model.bin.index.json (torch.save, zip format)."""
    directory.mkdir(parents=True, exist_ok=True)
    keys = sorted(sd)
    weight_map = {}
    for i in range(n_shards):
        name = f"pytorch_model-{i + 1:05d}-of-{n_shards:05d}.bin"
        part = {k: to_torch_tensor(sd[k]) for k in keys[i::n_shards]}
        torch.save(part, directory / name)
        weight_map.update({k: name for k in part})
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


def tiny_8_heads():
    """presets.tiny with the released DEM head count (8): the DEM is then readable from shapes alone."""
    cfg = presets.tiny()
    return cfg.replace(dem=dataclasses.replace(cfg.dem, num_heads=8, head_dim=8))


def real_released_config_json(cfg) -> dict:
    """config.json as the released checkpoints have it: no fields of ours."""
    d = released_config_json(cfg, "float32")
    del d[formats.VISION_CONFIG_FIELD], d[formats.DEM_CONFIG_FIELD]
    d["mm_vision_tower"] = formats.CLIP_L14_336
    return d


def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif "embed" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(1.5 * math.prod(p.shape[1:]) ** -0.5 * torch.randn(p.shape, generator=g))
    return module.eval()


def hf_vision_config(cfg):
    return {k: v for k, v in cfg.vision.to_hf().items() if k != "model_type"}


def clip_model_dir(path: Path, cfg, vision_sd: dict | None = None, vision_only: bool = False, seed: int = 3) -> Path:
    """transformers CLIPModel (with its text tower) or CLIPVisionModel, save_pretrained."""
    vc = transformers.CLIPVisionConfig(**hf_vision_config(cfg))
    if vision_only:
        m = transformers.CLIPVisionModel(vc)
    else:
        text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=99,
                    max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
        m = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vc.to_dict(), projection_dim=16))
    randomize_(m, seed)
    if vision_sd is not None:   # the weights of a released state dict (so both sides agree)
        tower = getattr(m, "vision_model", m)
        own = tower.state_dict()
        pre = formats.RELEASED_VISION_PREFIX
        new = {}
        for k in own:
            src = pre + (k[len("vision_model."):] if k.startswith("vision_model.") else k)
            new[k] = to_torch_tensor(vision_sd[src]) if src in vision_sd else own[k]
        tower.load_state_dict(new)
    m.save_pretrained(path)
    return path


def llama_dir(path: Path, cfg, seed: int = 4) -> Path:
    m = randomize_(transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg.llm.to_hf())), seed)
    m.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """Tiny released INF-LLaVA, fp32, 3 safetensors shards + index, CLIP weights inside,
    config.json with our extra fields (the DEM has 4 heads, which no shape shows)."""
    cfg = presets.tiny()
    sd = random_state(formats.released_rows(cfg), abstract_params(cfg), seed=0)
    d = write_st(tmp_path_factory.mktemp("src") / "released", sd, shard_bytes=700_000)
    (d / "config.json").write_text(json.dumps(released_config_json(cfg, "float32")))
    return cfg, sd, d


@pytest.fixture(scope="module")
def converted(released, tmp_path_factory):
    cfg, sd, src = released
    dst = tmp_path_factory.mktemp("ckpt") / "ours"
    source, stats = importer.convert(src, dst, progress=False, log=lambda *a: None)
    return source, dst


def assert_same_tensors(a_dir, b_dir, drop=()):
    a, b = open_weights(a_dir), open_weights(b_dir)
    a = {k: v for k, v in a.items() if not k.startswith(drop)} if drop else a
    assert sorted(a) == sorted(b)
    for k in a:
        assert (a[k].dtype, a[k].shape) == (b[k].dtype, b[k].shape), k
        assert a[k].read().tobytes() == b[k].read().tobytes(), k


def check(m, name):
    print(f"{name}: rel err {m['rel_err']:.2e}, KL max {m['kl_max']:.2e} mean {m['kl_mean']:.2e}, "
          f"argmax {100 * m['argmax_agree']:.0f}% ({m['tokens']} positions, {m['dtype']})")
    assert m["ok"], m


# ----------------------------------------------------------------------------- released

def test_released_sharded_safetensors_parity(released, converted):
    cfg, sd, src = released
    source, dst = converted
    assert sorted(p.name for p in src.iterdir())[-2:] == ["model-00003-of-00003.safetensors",
                                                           "model.safetensors.index.json"]
    assert source.kind == "released" and source.config == cfg
    assert InfLlava.from_pretrained(dst).config == cfg
    m = verify(source, dst, log=lambda *a: None)
    assert m["rel_err"] <= REL_TOL and m["kl_max"] <= KL_TOL
    check(m, "released fp32 (safetensors, 3 shards)")


def test_released_round_trip_is_bit_identical(released, converted, tmp_path):
    cfg, sd, src = released
    _, ckpt = converted
    out = tmp_path / "exported"
    assert export_main([str(ckpt), str(out), "--no-progress", "--max-shard-size", "0.0007"]) == 0
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("*.safetensors"))) == 3
    assert_same_tensors(src, out)
    import safetensors.torch   # PyTorch code loads it
    loaded = {}
    for f in out.glob("*.safetensors"):
        loaded.update(safetensors.torch.load_file(f))
    assert torch.equal(loaded["model.spatial_embed.attention.linears.0.weight"],
                       torch.from_numpy(sd["model.spatial_embed.attention.linears.0.weight"]))
    # the exported config.json alone re-imports to the same model
    again = importer.convert(out, tmp_path / "again", progress=False, log=lambda *a: None)[0]
    assert again.config == cfg
    # no LlavaForConditionalGeneration for a model with a DEM
    assert export_main([str(ckpt), str(tmp_path / "hf"), "--format", "hf", "--no-progress"]) == 2
    assert not (tmp_path / "hf").exists()


def test_released_bin_shards_with_clip_dir_cli_verify(tmp_path, capsys):
    """Released layout as pytorch_model-*.bin + index without CLIP weights, config.json exactly as
    released (nothing of ours: 8-head DEM from shapes), CLIPModel directory for the tower."""
    cfg = tiny_8_heads()
    sd = random_state(formats.released_rows(cfg), abstract_params(cfg), seed=1)
    vision_sd = {k: v for k, v in sd.items() if k.startswith(formats.RELEASED_VISION_PREFIX)}
    src = write_bins(tmp_path / "released_bin", {k: v for k, v in sd.items() if k not in vision_sd})
    (src / "config.json").write_text(json.dumps(real_released_config_json(cfg)))
    clip = clip_model_dir(tmp_path / "clip", cfg, vision_sd)
    dst = tmp_path / "ours"
    assert convert_main([str(src), str(dst), "--vision-tower", str(clip), "--verify", "--no-progress"]) == 0
    out = capsys.readouterr().out
    print(out)
    assert "-> OK" in out and "text tower" in out
    assert InfLlava.from_pretrained(dst).config == cfg
    # back to the released files (without the tower, as they were): the same tensors
    assert export_main([str(dst), str(tmp_path / "back"), "--no-vision-tower", "--no-progress"]) == 0
    assert_same_tensors(src, tmp_path / "back")


@pytest.mark.slow
def test_released_bf16_verify_and_round_trip(tmp_path):
    cfg = presets.tiny()
    sd = random_state(formats.released_rows(cfg), abstract_params(cfg), seed=2, dtype=BF16)
    src = write_st(tmp_path / "released_bf16", sd)
    (src / "config.json").write_text(json.dumps(released_config_json(cfg, "bfloat16")))
    source, _ = importer.convert(src, tmp_path / "ours", progress=False, log=lambda *a: None)
    assert {source.config.vision.param_dtype, source.config.llm.param_dtype, source.config.dem.param_dtype} == {"bfloat16"}
    check(verify(source, tmp_path / "ours", log=lambda *a: None), "released bf16")
    assert export_main([str(tmp_path / "ours"), str(tmp_path / "back"), "--no-progress"]) == 0
    assert_same_tensors(src, tmp_path / "back")
    # --dtype float32 widens exactly; exporting it back as bf16 gives the same bytes
    importer.convert(src, tmp_path / "f32", dtype="float32", progress=False, log=lambda *a: None)
    assert export_main([str(tmp_path / "f32"), str(tmp_path / "back16"), "--dtype", "bfloat16", "--no-progress"]) == 0
    assert_same_tensors(src, tmp_path / "back16")


def test_verify_fails_on_a_wrong_conversion(released, tmp_path, monkeypatch, capsys):
    """A table with the DEM's q and k swapped (same shapes, so no key or shape check can see it):
    --verify must catch it and exit 1."""
    real = formats.released_rows

    def swapped(config, **kw):
        q, k = "model.spatial_embed.attention.linears.0.weight", "model.spatial_embed.attention.linears.1.weight"
        return [dataclasses.replace(r, key={q: k, k: q}.get(r.key, r.key)) for r in real(config, **kw)]

    monkeypatch.setattr(formats, "released_rows", swapped)
    assert convert_main([str(released[2]), str(tmp_path / "bad"), "--verify", "--no-progress"]) == 1
    out = capsys.readouterr().out
    print(out)
    assert "FAILED" in out


@pytest.mark.slow
def test_original_llava15_released_layout(tmp_path):
    """liuhaotian/llava-v1.5-* files: the released layout without model.spatial_embed.*"""
    cfg = presets.tiny(grid=None)
    sd = random_state(formats.released_rows(cfg), abstract_params(cfg), seed=6)
    src = write_st(tmp_path / "llava15", sd)
    cj = released_config_json(cfg, "float32")
    (src / "config.json").write_text(json.dumps(cj))
    source, _ = importer.convert(src, tmp_path / "ours", progress=False, log=lambda *a: None)
    assert source.config.dem is None and source.config == cfg
    check(verify(source, tmp_path / "ours", log=lambda *a: None), "original LLaVA-1.5 layout")
    # ... but a config.json that describes a DEM needs its tensors
    (src / "config.json").write_text(json.dumps({**cj, formats.DEM_CONFIG_FIELD: {"num_heads": 4}}))
    assert convert_main([str(src), str(tmp_path / "o"), "--no-progress"]) == 2


def test_in_memory_load_places_each_shard(released, converted):
    cfg, sd, src = released
    mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
    model = importer.load(src, mesh=mesh)
    emb = model.params["language_model"]["model"]["embed_tokens"]["embedding"]
    assert emb.sharding.shard_shape(emb.shape) == (cfg.llm.vocab_size // 2, cfg.llm.hidden_size // 4)
    gate = model.params["language_model"]["model"]["layers"]["mlp"]["gate_proj"]["kernel"]
    assert gate.sharding.shard_shape(gate.shape) == (2, 96 // 4, 192 // 2)
    np.testing.assert_array_equal(np.asarray(gate)[1], sd["model.layers.1.mlp.gate_proj.weight"].T)
    ref = InfLlava.from_pretrained(converted[1]).params
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, model.params), jax.tree.map(np.asarray, ref))


# ----------------------------------------------------------------------------- LLaVA-1.5 (transformers)

@pytest.fixture(scope="module")
def llava_hf(tmp_path_factory):
    cfg = presets.tiny(grid=None)
    lc = transformers.LlavaConfig(vision_config=transformers.CLIPVisionConfig(**hf_vision_config(cfg)),
                                  text_config=transformers.LlamaConfig(**cfg.llm.to_hf()), image_token_index=cfg.llm.vocab_size - 1,
                                  vision_feature_layer=-2, vision_feature_select_strategy="default",
                                  projector_hidden_act="gelu")
    torch.manual_seed(0)
    model = randomize_(transformers.LlavaForConditionalGeneration(lc), seed=7)
    d = tmp_path_factory.mktemp("llava") / "v5"
    model.save_pretrained(d)
    return cfg, model, d


def test_llava_hf_v5_files_parity_and_hf_export(llava_hf, tmp_path):
    cfg, model, src = llava_hf
    source, _ = importer.convert(src, tmp_path / "ours", progress=False, log=lambda *a: None)
    assert source.kind == "llava-hf" and source.config.dem is None
    assert source.config.image_token_index == cfg.llm.vocab_size - 1
    check(verify(source, tmp_path / "ours", log=lambda *a: None), "llava-1.5 (transformers v5 files)")
    # the 4.x llava-hf layout (vision_tower.vision_model.*) converts to the same parameters
    v5 = open_weights(src)
    legacy = {("vision_tower.vision_model." + k[len("vision_tower."):] if k.startswith("vision_tower.") else k): v.read()
              for k, v in v5.items()}
    old = write_st(tmp_path / "legacy", legacy)
    (old / "config.json").write_text((src / "config.json").read_text())
    importer.convert(old, tmp_path / "ours_old", progress=False, log=lambda *a: None)
    a, b = open_checkpoint(tmp_path / "ours")[1], open_checkpoint(tmp_path / "ours_old")[1]
    for p in a:
        np.testing.assert_array_equal(a[p].read(), b[p].read(), err_msg=p)
    # back to transformers: loads, same weights
    assert export_main([str(tmp_path / "ours"), str(tmp_path / "hf"), "--format", "hf", "--no-progress"]) == 0
    back = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf")
    theirs, ours = model.state_dict(), back.state_dict()
    assert sorted(theirs) == sorted(ours)
    for k in theirs:
        assert torch.equal(theirs[k], ours[k]), k
    assert_same_tensors(old, tmp_path / "hf")   # the file layout of llava-hf downloads


# ----------------------------------------------------------------------------- stage starts

@pytest.fixture(scope="module")
def clip_and_llama(tmp_path_factory):
    cfg = presets.tiny()
    base = tmp_path_factory.mktemp("hf")
    return cfg, clip_model_dir(base / "clip_vision", cfg, vision_only=True), llama_dir(base / "llama", cfg)


def test_stage1_start_from_clip_and_llama(clip_and_llama, tmp_path, capsys):
    cfg, clip, llama = clip_and_llama
    # SRC may be either directory; the other comes with --llm / --vision-tower
    assert convert_main([str(clip), str(tmp_path / "a"), "--llm", str(llama), "--seed", "5", "--no-progress"]) == 0
    assert "freshly initialised" in capsys.readouterr().out
    source, _ = importer.convert(llama, tmp_path / "b", vision_tower=clip, seed=5, progress=False, log=lambda *a: None)
    assert source.kind == "stage1-start"
    c = source.config
    V = cfg.llm.vocab_size
    assert (c.llm.vocab_size, c.pad_token_id) == (V + 1, V) and c.dem.num_heads == 8
    p = InfLlava.from_pretrained(tmp_path / "b").params
    q = InfLlava.from_pretrained(tmp_path / "a").params
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, p), jax.tree.map(np.asarray, q))
    lw = open_weights(llama)
    emb, head = np.asarray(p["language_model"]["model"]["embed_tokens"]["embedding"]), \
        np.asarray(p["language_model"]["lm_head"]["kernel"])
    np.testing.assert_array_equal(emb[:V], lw["model.embed_tokens.weight"].read())
    np.testing.assert_allclose(emb[V], lw["model.embed_tokens.weight"].read().astype(np.float64).mean(0), rtol=1e-6)
    np.testing.assert_array_equal(head[:, :V], lw["lm_head.weight"].read().T)
    np.testing.assert_allclose(head[:, V], lw["lm_head.weight"].read().astype(np.float64).mean(0), rtol=1e-6)
    dem = p["spatial_embed"]
    np.testing.assert_array_equal(np.asarray(dem["ln_fuse"]["scale"]), 1)
    np.testing.assert_array_equal(np.asarray(dem["attention"]["ln"]["bias"]), 0)
    k = np.asarray(p["mm_projector"]["linear_1"]["kernel"])   # PyTorch default: U(+-1/sqrt(fan_in))
    assert 0.9 / math.sqrt(k.shape[0]) < np.abs(k).max() <= 1 / math.sqrt(k.shape[0])
    check(verify(source, tmp_path / "b", log=lambda *a: None), "stage-1 start")


def test_stage2_start_from_adapter(clip_and_llama, tmp_path):
    _, clip, llama = clip_and_llama
    cfg = tiny_8_heads()   # an adapter file says nothing about heads: the released 8 are assumed
    rows = [r for r in formats.released_rows(cfg) if r.path.startswith(("spatial_embed/", "mm_projector/"))]
    adapter = random_state(rows, abstract_params(cfg), seed=9)
    pretrain = tmp_path / "INF-LLaVA-pretrain"   # a *-pretrain directory: config.json + mm_projector.bin
    pretrain.mkdir()
    torch.save({k: to_torch_tensor(v) for k, v in adapter.items()}, pretrain / "mm_projector.bin")
    (pretrain / "config.json").write_text(json.dumps(real_released_config_json(cfg)))
    # the CLIP dir in the layout of transformers 4.x CLIPVisionModel files: vision_model.* + position_ids buffer
    old_clip = write_st(tmp_path / "clip_4x", {**{"vision_model." + k: t.read() for k, t in open_weights(clip).items()},
                                               "vision_model.embeddings.position_ids": np.arange(37)[None]})
    (old_clip / "config.json").write_text((clip / "config.json").read_text())
    for src in (pretrain / "mm_projector.bin", pretrain):
        source, _ = importer.convert(src, tmp_path / ("ours_" + src.name), vision_tower=old_clip, llm=llama, progress=False,
                                     log=lambda *a: None)
        assert source.kind == "stage2-start" and source.config.dem == cfg.dem
        p = InfLlava.from_pretrained(tmp_path / ("ours_" + src.name)).params
        np.testing.assert_array_equal(np.asarray(p["spatial_embed"]["attention"]["k_proj"]["kernel"]),
                                      adapter["model.spatial_embed.attention.linears.1.weight"].T)
        np.testing.assert_array_equal(np.asarray(p["mm_projector"]["linear_2"]["bias"]), adapter["model.mm_projector.2.bias"])
        assert p["language_model"]["model"]["embed_tokens"]["embedding"].shape[0] == cfg.llm.vocab_size + 1
        np.testing.assert_array_equal(np.asarray(p["vision_tower"]["embeddings"]["class_embedding"]),
                                      open_weights(clip)["embeddings.class_embedding"].read())


def test_verify_prompt_uses_a_tokenizer_when_there_is_one(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from convert.verify import QUESTION, prompt_ids
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([QUESTION] * 3, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>"]))
    tok.save(str(tmp_path / "tokenizer.json"))
    source = formats.Source("released", presets.tiny(), [], {})
    ids = prompt_ids(source, 300, (None, tmp_path))
    assert (ids == -200).sum() == 1 and 200 < ids.shape[1] and ids.max() < 512
    rand = prompt_ids(source, 300, (tmp_path / "nowhere",))
    assert rand.shape == (1, 300) and (rand == -200).sum() == 1


@pytest.mark.parametrize("family", ["llava15", "infllava"])
def test_verify_prompt_speaks_the_family_template(tmp_path, family):
    """--verify compares logits on QUESTION in the template the checkpoint will be used with."""
    from tokenizers import Tokenizer
    from convert.verify import prompt_ids
    from tests import fixtures
    make = fixtures.vicuna_tokenizer_dir if family == "llava15" else fixtures.llama3_tokenizer_dir
    n = make(tmp_path / "tok")
    config = presets.tiny(grid=None if family == "llava15" else 3, vocab_size=n)
    ids = prompt_ids(formats.Source(family, config, [], {}), 300, [tmp_path / "tok"])[0]
    tok = Tokenizer.from_file(str(tmp_path / "tok" / "tokenizer.json"))
    k = int(np.flatnonzero(ids == config.image_token_index)[0])
    text = tok.decode([int(i) for i in ids[k + 1:]], skip_special_tokens=False)
    if family == "llava15":
        assert ids[0] == tok.token_to_id("<s>") and "ASSISTANT:" in text and "<|start_header_id|>" not in text
    else:
        assert "<|start_header_id|>" in text and "ASSISTANT:" not in text


# ----------------------------------------------------------------------------- refusals

def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    src = tmp_path / "evil"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(real_released_config_json(presets.tiny())))
    with open(src / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.embed_tokens.weight": Evil()}, f)
    proc = subprocess.run([sys.executable, "-m", "convert", str(src), str(tmp_path / "out")], cwd=REPO,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    print(proc.stderr)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "refused" in lines[0] and "weights_only" in lines[0]
    assert "Traceback" not in proc.stderr
    assert not marker.exists() and not (tmp_path / "out").exists()
    # the zip format (torch.save) is refused the same way, in-process
    torch.save({"model.embed_tokens.weight": Evil()}, src / "pytorch_model.bin")
    from convert.errors import UnsafeCheckpointError
    with pytest.raises(UnsafeCheckpointError, match="refused"):
        open_weights(src / "pytorch_model.bin")
    assert not marker.exists()


def _released_with(tmp_path, name, edit):
    cfg = presets.tiny()
    sd = random_state(formats.released_rows(cfg), abstract_params(cfg), seed=0)
    edit(sd)
    d = write_st(tmp_path / name, sd)
    (d / "config.json").write_text(json.dumps(released_config_json(cfg, "float32")))
    return d


@pytest.mark.parametrize("name, edit, message", [
    ("missing", lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"),
     r"missing key\(s\).*model\.layers\.1\.mlp\.up_proj\.weight"),
    ("unexpected", lambda sd: sd.update({"model.layers.2.mlp.up_proj.weight": np.zeros((192, 96), np.float32)}),
     r"unexpected key\(s\).*model\.layers\.2\.mlp\.up_proj\.weight"),
    ("shape", lambda sd: sd.update({"model.layers.0.self_attn.k_proj.weight": np.zeros((64, 96), np.float32)}),
     r"model\.layers\.0\.self_attn\.k_proj\.weight: shape \(64, 96\) in the .*expected \(48, 96\)"),
])
def test_bad_keys_abort_with_names_and_shapes(tmp_path, capsys, name, edit, message):
    src = _released_with(tmp_path, name, edit)
    assert convert_main([str(src), str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()


def test_other_refusals(tmp_path, clip_and_llama, released, capsys):
    cfg, clip, llama = clip_and_llama
    for argv, message in (([str(clip), str(tmp_path / "o")], "incomplete model.*clip"),
                          ([str(llama), str(tmp_path / "o")], "incomplete model.*llama"),
                          ([str(llama), str(tmp_path / "o"), "--vision-tower", str(llama)], "is a llama checkpoint"),
                          ([str(released[2]), str(released[2])], "exists")):
        assert convert_main(argv + ["--no-progress"]) == 2
        err = capsys.readouterr().err
        assert re.search(message, err), err
    # an index that disagrees with its shards
    src = write_st(tmp_path / "bad_index", released[1], shard_bytes=700_000)
    (src / "config.json").write_text((released[2] / "config.json").read_text())
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"]["lm_head.weight"] = "model-00003-of-00003.safetensors"
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    assert convert_main([str(src), str(tmp_path / "o"), "--no-progress"]) == 2
    assert re.search(r"index lists tensors .*lm_head\.weight", capsys.readouterr().err)


def test_failed_conversion_leaves_nothing(tmp_path, released, monkeypatch):
    cfg, sd, src = released
    calls = {"n": 0}
    real = engine.Leaf.read

    def flaky(self, index=None):
        calls["n"] += 1
        if calls["n"] == 20:
            raise OSError("disk on fire")
        return real(self, index)

    monkeypatch.setattr(engine.Leaf, "read", flaky)
    out = tmp_path / "sub" / "ckpt"
    with pytest.raises(OSError, match="disk on fire"):
        importer.convert(src, out, progress=False, log=lambda *a: None)
    assert not out.exists() and os.listdir(out.parent) == []
