"""LoRA checkpoints as LLaVA-family users download them (PEFT adapter directory +
non_lora_trainables.bin) on top of an HF Llama and CLIP: `python -m convert` merges them, and the
PyTorch model with PEFT's adapters applied (unmerged, PEFT's own forward) equals ours (fp32:
max|d|/max|ref| <= 1e-4, per-token KL <= 1e-6, 320 tokens). Our export of a LoRA run
(`convert.lora_export.save_adapters`) loads in PEFT with the same parity. Bad adapter files name the key
and both shapes."""
from __future__ import annotations

import json

import jax
import numpy as np
import peft
import pytest
import torch
import transformers

from convert import engine, formats
from convert import lora as lora_files
from convert.__main__ import main as convert_main
from convert.export import released_config_json
from convert.lora_export import save_adapters
from convert.sources import open_weights
from convert.verify import compare
from infllava_jax import llama, lora, params as params_lib, presets
from infllava_jax.api import InfLlava
from infllava_jax.llama import LlamaForCausalLM
from tests.test_convert import KL_TOL, REL_TOL, clip_model_dir, llama_dir, random_state, to_torch_tensor, write_st

CFG = presets.tiny()
TOKENS = 320


def prompt(vocab: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, vocab, (1, TOKENS)).astype(np.int64)


def peft_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids)).logits.float().numpy()[0]


def our_lm_logits(llm_config, lm_params, ids) -> np.ndarray:
    out, _ = LlamaForCausalLM(llm_config).apply({"params": lm_params}, ids.astype(np.int32))
    return np.asarray(out)[0]


def assert_parity(ref, ours):
    m = compare(ref, ours)
    assert m["rel_err"] <= REL_TOL and m["kl_max"] <= KL_TOL, m
    return m


@pytest.fixture(scope="module")
def lora_checkpoint(tmp_path_factory):
    """An HF Llama + CLIP, and a LoRA directory trained on them: PEFT's save_pretrained of random
    (non-zero) adapters on all seven projections, random DEM + projector in non_lora_trainables.bin,
    config.json as our export writes it."""
    root = tmp_path_factory.mktemp("lora")
    clip = clip_model_dir(root / "clip", CFG)
    base = llama_dir(root / "llama", CFG)
    model = transformers.LlamaForCausalLM.from_pretrained(base).eval()
    pc = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(lora.PROJECTIONS),
                         init_lora_weights=False)
    pm = peft.get_peft_model(model, pc).eval()
    randomize_adapters_(pm, seed=5)
    d = root / "llava-lora"
    pm.save_pretrained(d)
    rows = [r for r in formats.released_rows(CFG, with_vision=False) if not r.path.startswith("language_model/")]
    others = random_state(rows, params_lib.abstract_params(CFG), seed=6)
    torch.save({lora_files.PEFT_PREFIX + k: to_torch_tensor(v) for k, v in others.items()}, d / lora_files.NON_LORA)
    (d / "config.json").write_text(json.dumps(released_config_json(CFG, "float32")))
    return {"clip": clip, "llama": base, "lora": d, "peft": pm, "others": others}


def randomize_adapters_(pm, seed: int):
    """lora_A, lora_B ~ N(0, 0.3^2 / fan_in): a delta of the size of a fine-tuning update."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * p.shape[1] ** -0.5 * torch.randn(p.shape, generator=g))


def test_peft_lora_checkpoint_converts_with_parity(lora_checkpoint, tmp_path, capsys):
    c = lora_checkpoint
    keys = open_weights(c["lora"] / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert keys["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"].shape == (CFG.llm.hidden_size, 4)
    dst = tmp_path / "ours"
    rc = convert_main([str(c["lora"]), str(dst), "--vision-tower", str(c["clip"]), "--llm", str(c["llama"]),
                       "--no-pad-token", "--no-progress", "--verify"])
    out = capsys.readouterr().out
    assert rc == 0 and "lora" in out and "14 projections merged" in out, out
    model = InfLlava.from_pretrained(dst)
    ids = prompt(CFG.llm.vocab_size)
    ref = peft_logits(c["peft"], ids)
    m = assert_parity(ref, our_lm_logits(model.config.llm, model.params["language_model"], ids))
    print(f"PEFT LoRA -> ours: rel err {m['rel_err']:.2e}, KL max {m['kl_max']:.2e} over {m['tokens']} tokens")
    with c["peft"].disable_adapter():       # the adapters matter: without them the logits differ
        assert compare(peft_logits(c["peft"], ids), ref)["kl_max"] > 1e-3
    # DEM and projector come from non_lora_trainables.bin, bit for bit
    rows = [r for r in formats.released_rows(model.config, with_vision=False) if not r.path.startswith("language_model/")]
    got = engine.to_torch(rows, {k: v for k, v in jax.device_get(model.params).items() if k in ("spatial_embed", "mm_projector")})
    assert sorted(got) == sorted(c["others"])
    for k in got:
        np.testing.assert_array_equal(got[k], c["others"][k], err_msg=k)


@pytest.mark.slow
def test_our_lora_export_loads_in_peft_with_parity(tmp_path):
    """save_adapters (what train.py writes with lora.export=adapters) -> PeftModel.from_pretrained on
    the base, equal to our unmerged forward; re-reading the directory gives lora.merge's weights."""
    lc = lora.LoraConfig(rank=4, alpha=8.0)
    cfg = CFG.replace(llm=CFG.llm.replace(lora=lc))
    base = jax.device_get(params_lib.init_params(CFG, seed=8))
    rng = np.random.default_rng(9)
    ad = jax.tree.map(lambda x: (0.3 / np.sqrt(x.shape[-2]) * rng.standard_normal(x.shape)).astype(np.float32),
                      jax.device_get(params_lib.init_adapters(cfg, 8)))
    params = lora.combine(base, ad)
    d = tmp_path / "final_lora"
    save_adapters(cfg, params, d, base="tiny")
    assert json.loads((d / "adapter_config.json").read_text())["r"] == 4
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CFG.llm.to_hf())).eval()
    sd = engine.to_torch(llama.key_map(CFG.llm), base["language_model"])
    hf.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})
    pm = peft.PeftModel.from_pretrained(hf, d).eval()
    ids = prompt(CFG.llm.vocab_size)
    m = assert_parity(peft_logits(pm, ids), our_lm_logits(cfg.llm, params["language_model"], ids))
    print(f"ours -> PEFT: rel err {m['rel_err']:.2e}, KL max {m['kl_max']:.2e} over {m['tokens']} tokens")
    # import of the same files merges to lora.merge (PyTorch layout)
    merged_ours = engine.to_torch(llama.key_map(CFG.llm), lora.merge(cfg, params, params_lib.abstract_params(lora.merged_config(cfg)))["language_model"])
    merged, trainables, _ = lora_files.read(d, {k: to_tensor(v) for k, v in sd.items()})
    for k, t in merged.items():
        np.testing.assert_allclose(t.read(), merged_ours[k], rtol=1e-5, atol=1e-6, err_msg=k)
    assert {k.split(".")[1] for k in trainables} == {"mm_projector", "spatial_embed"}


def to_tensor(a):
    from convert.sources import ArrayTensor
    return ArrayTensor(a)


def _broken(c, tmp_path, edit):
    d = tmp_path / "broken"
    d.mkdir()
    for f in c["lora"].iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    sd = {k: t.read().copy() for k, t in open_weights(c["lora"] / "adapter_model.safetensors").items()}
    edit(sd)
    (d / "adapter_model.safetensors").unlink()
    write_st(d, sd)
    (d / "model.safetensors").rename(d / "adapter_model.safetensors")
    return d


Q_A = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"


@pytest.mark.parametrize("edit, message", [
    (lambda sd: sd.pop(Q_A), f"missing {Q_A}"),
    (lambda sd: sd.update({Q_A: np.zeros((4, 97), np.float32)}), f"{Q_A} has shape (4, 97), expected (4, 96)"),
    (lambda sd: sd.update({"base_model.model.model.layers.1.self_attn.qkv_proj.lora_A.weight": np.zeros((4, 96), np.float32),
                           "base_model.model.model.layers.1.self_attn.qkv_proj.lora_B.weight": np.zeros((96, 4), np.float32)}),
     "adapts model.layers.1.self_attn.qkv_proj.weight, which the base model does not have"),
])
def test_bad_adapter_files_name_the_key_and_shapes(lora_checkpoint, tmp_path, capsys, edit, message):
    c = lora_checkpoint
    d = _broken(c, tmp_path, edit)
    rc = convert_main([str(d), str(tmp_path / "out"), "--vision-tower", str(c["clip"]), "--llm", str(c["llama"]),
                       "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()
