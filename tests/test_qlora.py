"""QLoRA: LoRA adapters on a frozen int4 base (lora.quant, quant.py) through the LoRA code path:
the loss falls, the base stays int4 bit for bit, the merged model (compute dtype, no adapters,
no quantization) reloads and equals the adapter forward, PEFT export and exact resume work."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from convert.lora_export import save_adapters
from infllava_jax import lora, params as params_lib, presets, quant
from infllava_jax.api import InfLlava
from infllava_jax.training.loop import Trainer
from tests.test_lora import fixed_batch_steps, lora_run_config
from tests.test_multihost import make_clean_dataset

IDS = np.array([[1, 2, -200, 5, 6, 7, 8]])


def test_qlora_config_quantizes_the_frozen_base_only():
    cfg = presets.tiny()
    qcfg = cfg.replace(llm=cfg.llm.replace(lora=lora.LoraConfig(rank=4), quant="int4"))
    flat = flatten_dict(params_lib.abstract_params(qcfg))
    quantized = [p for p, v in flat.items() if quant.is_quantized(v)]
    assert len(quantized) == 8 and all(p[-1] == "kernel" for p in quantized)
    assert all(v.dtype == np.float32 for p, v in flat.items() if lora.is_adapter(p))
    assert lora.merged_config(qcfg).llm.quant is None and lora.merged_config(qcfg).llm.lora is None
    with pytest.raises(ValueError, match="lora.quant='int4'.*lora.rank > 0"):
        lora.base_quant({"rank": 0, "quant": "int4"})


@pytest.mark.slow   # a learning test
def test_int4_qlora_steps_lower_the_loss_and_the_merged_model_reloads(tmp_path):
    cfg = presets.tiny()
    qcfg = cfg.replace(llm=cfg.llm.replace(lora=lora.LoraConfig(rank=4, alpha=8.0), quant="int4"))
    params = params_lib.init_params(qcfg, seed=5)
    state, losses = fixed_batch_steps(qcfg, params)
    assert losses[-1] < 0.8 * losses[0], losses
    trained = lora.combine(state["frozen"], state["params"])
    merged_cfg = lora.merged_config(qcfg)
    merged = lora.merge(qcfg, trained, params_lib.abstract_params(merged_cfg))
    InfLlava(merged_cfg, merged, tokenizer="tiny").save_pretrained(tmp_path / "merged")
    back = InfLlava.from_pretrained(tmp_path / "merged")
    assert back.config == merged_cfg and back.config.llm.quant is None and back.config.llm.lora is None
    px = np.random.default_rng(0).standard_normal((1, 3, *qcfg.image_size)).astype(np.float32)
    a, b = InfLlava(qcfg, trained)(IDS, px), back(IDS, px)
    assert np.abs(a - b).max() < 1e-3 * np.abs(a).max()   # merged W = deq(W_int4) + s A B: the same model


# int4 on CPU: held in int8 arrays (quant.held; qtype int4), which the loop's AOT executables take
@pytest.mark.slow   # a train loop with checkpoints, export and a resumed run (~1 min each)
@pytest.mark.parametrize("base_quant", ["int8", "int4"])
def test_qlora_run_loss_falls_merged_model_reloads_and_resume_is_exact(tmp_path, base_quant):
    data = make_clean_dataset(tmp_path / "data")
    cfg = lora_run_config(data, steps=8)
    cfg.lora.quant, cfg.checkpoint_every = base_quant, 4
    cfg.optimizer.lr = 1e-2
    t = Trainer(cfg, tmp_path / "a", save_adapters=save_adapters)
    assert t.mc.llm.quant == base_quant
    before = jax.device_get(t.state)
    t.fit()
    after = jax.device_get(t.state)
    base = {p: v for p, v in flatten_dict(after["frozen"]["language_model"]).items() if quant.is_quantized(v)}
    assert len(base) == 8 and all(v.array.qvalue.dtype == np.dtype("int8") for v in base.values())
    assert all(str(v.array.qtype) == base_quant for v in base.values())
    assert jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(a, b), after["frozen"], before["frozen"]))
    losses = {r["step"]: r["loss"] for r in map(json.loads, (tmp_path / "a" / "metrics.jsonl").read_text().splitlines())}
    assert sorted(losses) == list(range(1, 9))
    assert np.mean([losses[7], losses[8]]) < np.mean([losses[1], losses[2]]), losses

    # WORKDIR/final: the merged model, no adapters, no quantization, in the compute dtype
    final = InfLlava.from_pretrained(tmp_path / "a" / "final")
    assert final.config == lora.merged_config(t.mc) and final.config.llm.quant is None
    assert all(x.dtype == np.dtype(t.mc.llm.dtype) for x in jax.tree.leaves(final.params["language_model"]))
    trained = InfLlava(t.mc, t.params())
    px = np.random.default_rng(0).standard_normal((1, 3, *final.config.image_size)).astype(np.float32)
    a, b = trained(IDS, px), final(IDS, px)
    assert np.abs(a - b).max() < 0.05 * np.abs(a).max()      # merged W = deq(W_int4) + s A B, unquantized
    assert (tmp_path / "a" / "final_lora" / "adapter_model.safetensors").exists()

    # resume: checkpoint 4 in a fresh workdir continues with the same losses
    shutil.copytree(tmp_path / "a" / "checkpoints" / "4", tmp_path / "b" / "checkpoints" / "4")
    t2 = Trainer(cfg, tmp_path / "b", save_adapters=save_adapters)
    assert t2.start == 4
    t2.fit()
    resumed = {r["step"]: r["loss"] for r in map(json.loads, (tmp_path / "b" / "metrics.jsonl").read_text().splitlines())}
    np.testing.assert_allclose([resumed[s] for s in (5, 6, 7, 8)], [losses[s] for s in (5, 6, 7, 8)], rtol=1e-6)


@pytest.mark.slow   # a train.py subprocess (~1 min)
def test_train_py_int4_qlora_on_the_tiny_preset(tmp_path):
    """The user's path: train.py with --config.lora.quant=int4 on the tiny config; the loss falls and
    WORKDIR/final is the merged model (no adapters, no quantization, compute dtype) that reloads."""
    root = Path(__file__).resolve().parents[1]
    data = make_clean_dataset(tmp_path / "data")
    cmd = [sys.executable, str(root / "train.py"), "--config", str(root / "configs" / "tiny.py"),
           "--workdir", str(tmp_path / "w"), "--config.data.synthetic=False",
           f"--config.data.path={data / 'train.json'}", f"--config.data.image_folder={data}",
           "--config.total_steps=12", "--config.log_every=1", "--config.checkpoint_every=12",
           "--config.data.max_len=160", "--config.optimizer.lr=0.01", "--config.lora.rank=4",
           "--config.lora.alpha=8", "--config.lora.quant=int4", "--config.lora.export=adapters"]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    losses = [json.loads(x)["loss"] for x in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 12 and np.mean(losses[-3:]) < np.mean(losses[:3]), losses
    final = InfLlava.from_pretrained(tmp_path / "w" / "final")
    assert final.config.llm.quant is None and final.config.llm.lora is None
    flat = flatten_dict(final.params["language_model"])
    assert not any("lora" in "/".join(map(str, p)) for p in flat)
    assert all(x.dtype == np.dtype(final.config.llm.dtype) for x in flat.values())
    px = np.random.default_rng(0).standard_normal((1, 3, *final.config.image_size)).astype(np.float32)
    assert np.isfinite(final(IDS, px)).all()
    assert (tmp_path / "w" / "final_lora" / "adapter_model.safetensors").exists()
