"""LoRA on the language model (infllava_jax/lora.py): step 0 is the base model exactly, adapters
shard like their base, the base is frozen with no optimizer state, merging equals the unmerged
forward, and LoRA training (train loop) lowers the loss, keeps the base bit for bit, exports a
merged checkpoint and PEFT files, and resumes from a checkpoint."""
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from configs.tiny import get_config
from convert.lora_export import save_adapters
from infllava_jax import lora, params as params_lib, presets
from infllava_jax.api import InfLlava
from infllava_jax.sharding import make_mesh
from infllava_jax.training import step as step_lib
from infllava_jax.training.loop import Trainer
from tests.test_multihost import make_clean_dataset
from tests.test_train_step import _batch

CFG = presets.tiny()
LC = lora.LoraConfig(rank=4, alpha=8.0)
CFG_LORA = CFG.replace(llm=CFG.llm.replace(lora=LC))


def with_adapters(params, seed=1, b_scale=0.0):
    """params + fresh adapters; b_scale > 0 also draws B (as if trained)."""
    ad = jax.device_get(params_lib.init_adapters(CFG_LORA, seed))
    if b_scale:
        rng = np.random.default_rng(seed)
        ad = jax.tree_util.tree_map_with_path(
            lambda p, x: b_scale * rng.standard_normal(x.shape).astype(x.dtype) if p[-1].key == "lora_B" else x, ad)
    return lora.combine(jax.device_get(params), ad)


@pytest.mark.slow
def test_step0_is_the_base_model_exactly():
    base = params_lib.init_params(CFG, seed=0)
    params = with_adapters(base)
    ad = flatten_dict(lora.split(params, lora.is_adapter)[0])
    assert len(ad) == 2 * len(lora.PROJECTIONS)
    assert all(not np.any(v) for p, v in ad.items() if p[-1] == "lora_B")
    assert all(np.std(v) > 0 for p, v in ad.items() if p[-1] == "lora_A")
    b = jax.tree.map(lambda x: x[0], _batch(A=1, b=2, L=30))
    ref = InfLlava(CFG, base)
    ours = InfLlava(CFG_LORA, params)
    ids, px = b["input_ids"], np.moveaxis(b["pixel_values"], -1, 1)
    np.testing.assert_array_equal(ours(ids, px), ref(ids, px))


def test_adapters_shard_like_their_base():
    mesh = make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    sh = flatten_dict(params_lib.param_shardings(CFG_LORA, mesh))
    checked = 0
    for path, s in sh.items():
        if path[-1] == "kernel" and path[:-1] + ("lora_A",) in sh:
            w = tuple(s.spec)
            assert tuple(sh[path[:-1] + ("lora_A",)].spec) == (w[0], w[1], None), path      # (layers, in, r)
            assert tuple(sh[path[:-1] + ("lora_B",)].spec) == (w[0], None, w[2]), path      # (layers, r, out)
            checked += 1
    assert checked == 7
    q = sh[("language_model", "model", "layers", "self_attn", "q_proj", "lora_A")].spec
    assert tuple(q) == (None, "fsdp", None)


@pytest.mark.slow
def test_base_is_frozen_without_optimizer_state_and_adapters_train():
    params = with_adapters(params_lib.init_params(CFG, seed=2))
    tx, schedule = step_lib.make_optimizer(1e-2, 10, warmup_ratio=0.0)
    parts = step_lib.trainable_parts("stage2", with_lora=True)
    assert parts == ("spatial_embed", "mm_projector")
    state = step_lib.init_state(params, parts, tx, CFG_LORA)
    lm = flatten_dict(state["params"]["language_model"])
    assert lm and all(p[-1] in lora.ADAPTERS for p in lm)
    n_train = sum(x.size for x in jax.tree.leaves(state["params"]))
    assert sum(x.size for x in jax.tree.leaves(state["opt_state"])) == 2 * n_train + 2
    # no optimizer leaf has the shape of a base LLM matrix
    base_shapes = {x.shape for p, x in flatten_dict(state["frozen"]["language_model"]).items() if x.ndim >= 2}
    opt_shapes = {x.shape for x in jax.tree.leaves(state["opt_state"])}
    assert not base_shapes & opt_shapes
    step = jax.jit(step_lib.make_train_step(CFG_LORA, tx, schedule, loss_chunk=16))
    new = state
    for k in range(3):   # step 1: lr 0 (warmup); step 2: B moves (A's gradient is 0 while B = 0); step 3: A too
        new, m = step(new, _batch(A=1, b=2, seed=k))
        assert not bool(m["skipped"])
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), new["frozen"], state["frozen"]))
    old = flatten_dict(state["params"]["language_model"])
    still = [p for p, v in flatten_dict(new["params"]["language_model"]).items() if np.array_equal(v, old[p])]
    assert not still, still


def test_a_frozen_bf16_base_is_stored_in_the_compute_dtype():
    cfg = CFG_LORA.with_runtime(dtype="bfloat16")
    params = with_adapters(params_lib.init_params(CFG, seed=2))
    tx, _ = step_lib.make_optimizer(1e-2, 10)
    state = jax.eval_shape(lambda p: step_lib.init_state(p, ("spatial_embed", "mm_projector"), tx, cfg), params)
    dtypes = {x.dtype for x in jax.tree.leaves(state["frozen"]["language_model"]) if x.ndim >= 2}
    assert dtypes == {jnp.dtype("bfloat16")}
    assert {x.dtype for x in jax.tree.leaves(state["params"])} == {jnp.dtype("float32")}


def test_merge_is_w_plus_scaled_ab_and_equals_the_adapter_forward():
    params = with_adapters(params_lib.init_params(CFG, seed=3), b_scale=0.05)
    merged = lora.merge(CFG_LORA, params, params_lib.abstract_params(lora.merged_config(CFG_LORA)))
    assert jax.tree.structure(merged) == jax.tree.structure(params_lib.abstract_params(CFG))
    layer = params["language_model"]["model"]["layers"]["mlp"]["down_proj"]
    want = np.asarray(layer["kernel"], np.float64) + LC.alpha / LC.rank * np.einsum(
        "lir,lro->lio", np.asarray(layer["lora_A"], np.float64), np.asarray(layer["lora_B"], np.float64))
    got = merged["language_model"]["model"]["layers"]["mlp"]["down_proj"]["kernel"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert np.abs(want - np.asarray(layer["kernel"])).max() > 1e-3     # the adapters matter
    b = jax.tree.map(lambda x: x[0], _batch(A=1, b=2, L=30))
    ids, px = b["input_ids"], np.moveaxis(b["pixel_values"], -1, 1)
    a, m = InfLlava(CFG_LORA, params)(ids, px), InfLlava(CFG, merged)(ids, px)
    assert np.abs(a - InfLlava(CFG, jax.device_get(params_lib.init_params(CFG, seed=3)))(ids, px)).max() > 1e-2
    np.testing.assert_allclose(m, a, rtol=0, atol=1e-4 * np.abs(a).max())


@pytest.mark.slow
def test_dropout_needs_an_rng_and_is_off_without_one():
    cfg = CFG.replace(llm=CFG.llm.replace(lora=lora.LoraConfig(rank=4, dropout=0.5)))
    params = with_adapters(params_lib.init_params(CFG, seed=4), b_scale=0.05)
    from infllava_jax.model import InfLlavaModel
    b = jax.tree.map(lambda x: x[0], _batch(A=1, b=1, L=12))
    run = lambda **kw: InfLlavaModel(cfg).apply({"params": params}, b["input_ids"], b["pixel_values"], **kw)
    plain = run()
    np.testing.assert_array_equal(plain, InfLlavaModel(CFG_LORA.replace(llm=cfg.llm)).apply(
        {"params": params}, b["input_ids"], b["pixel_values"]))
    dropped = run(rngs={"dropout": jax.random.key(0)})
    assert np.abs(dropped - plain).max() > 1e-4


def test_bad_lora_settings_are_refused():
    assert lora.from_settings({"rank": 0}) is None
    for bad in ({"rank": 4, "targets": ("qkv",)}, {"rank": 4, "dropout": 1.0}, {"rank": 4, "export": "both"}):
        with pytest.raises(ValueError):
            lora.from_settings(bad)
    with pytest.raises(ValueError, match="LoRA keeps its base frozen"):
        step_lib.trainable_parts("stage2", ("language_model",), with_lora=True)


# ----------------------------------------------------------------------------- the train loop

def lora_run_config(data, steps=6):
    c = get_config()
    c.data.synthetic, c.data.path, c.data.image_folder = False, str(data / "train.json"), str(data)
    c.data.max_len, c.data.num_threads = 160, 1
    c.total_steps, c.log_every, c.checkpoint_every = steps, 1, 3
    c.mesh = {"data": 1, "fsdp": 4, "tensor": 2}
    c.global_batch, c.micro_batch = 8, 4
    c.optimizer.lr, c.optimizer.max_grad_norm = 3e-3, 0.0
    c.lora.rank, c.lora.alpha, c.lora.export = 4, 8.0, "adapters"
    return c


@pytest.mark.slow
def test_lora_training_loop_export_and_resume(tmp_path):
    data = make_clean_dataset(tmp_path / "data")
    cfg = lora_run_config(data)
    t = Trainer(cfg, tmp_path / "a", save_adapters=save_adapters)
    before = jax.device_get(t.state)
    t.fit()
    after = jax.device_get(t.state)
    # the base (the whole frozen tree) is bit-identical; every adapter moved
    assert jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(a, b), after["frozen"], before["frozen"]))
    for p, v in flatten_dict(after["params"]["language_model"]).items():
        assert np.any(v != flatten_dict(before["params"]["language_model"])[p]), p
    losses = {r["step"]: r["loss"] for r in map(json.loads, (tmp_path / "a" / "metrics.jsonl").read_text().splitlines())}
    assert sorted(losses) == list(range(1, 7))

    # WORKDIR/final: merged, a plain checkpoint (no adapters) equal to lora.merge of the state
    final = InfLlava.from_pretrained(tmp_path / "a" / "final")
    assert final.config == lora.merged_config(t.mc) and final.config.llm.lora is None
    want = lora.merge(t.mc, t.params(), params_lib.abstract_params(lora.merged_config(t.mc)))
    for (p, x), y in zip(flatten_dict(final.params).items(), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(p))
    out = tmp_path / "a" / "final_lora"
    assert sorted(f.name for f in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "config.json",
                                                       "non_lora_trainables.bin"]

    # resume: a copy of checkpoint 3 in a fresh workdir continues with the same losses
    shutil.copytree(tmp_path / "a" / "checkpoints" / "3", tmp_path / "b" / "checkpoints" / "3")
    t2 = Trainer(cfg, tmp_path / "b", save_adapters=save_adapters)
    assert t2.start == 3
    t2.fit()
    resumed = {r["step"]: r["loss"] for r in map(json.loads, (tmp_path / "b" / "metrics.jsonl").read_text().splitlines())}
    np.testing.assert_allclose([resumed[s] for s in (4, 5, 6)], [losses[s] for s in (4, 5, 6)], rtol=1e-6)


def fixed_batch_steps(cfg, params, steps: int = 8):
    """`steps` stage-1 LoRA steps at lr 1e-2 on one fixed batch: (final state, losses)."""
    tx, schedule = step_lib.make_optimizer(1e-2, 30, warmup_ratio=0.0)
    state = step_lib.init_state(params, step_lib.trainable_parts("stage1", with_lora=True), tx, cfg)
    step = jax.jit(step_lib.make_train_step(cfg, tx, schedule, loss_chunk=16))
    batch = _batch(A=1, b=2, seed=7)
    losses = []
    for _ in range(steps):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    return state, losses


@pytest.mark.slow   # a learning test
def test_lora_steps_lower_the_loss_on_a_fixed_batch():
    _, losses = fixed_batch_steps(CFG_LORA, with_adapters(params_lib.init_params(CFG, seed=5)))
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.slow
def test_train_step_applies_lora_dropout_with_a_key_per_step():
    cfg = CFG.replace(llm=CFG.llm.replace(lora=lora.LoraConfig(rank=4, dropout=0.5)))
    params = with_adapters(params_lib.init_params(CFG, seed=6), b_scale=0.05)
    tx, _ = step_lib.make_optimizer(1e-2, 10)
    parts = step_lib.trainable_parts("stage2", with_lora=True)
    state = step_lib.init_state(params, parts, tx, cfg)
    batch = _batch(A=2, b=2, seed=3)
    loss = lambda c, st: float(jax.jit(step_lib.make_grad_fn(c, loss_chunk=16))(st, batch)[0])
    plain = loss(CFG_LORA, state)
    dropped = loss(cfg, state)
    assert abs(dropped - plain) > 1e-4 * abs(plain)
    assert loss(cfg, state) == dropped                                   # the key depends on the step only
    assert loss(cfg, {**state, "step": state["step"] + 1}) != dropped
