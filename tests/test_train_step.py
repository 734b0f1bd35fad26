"""The sharded train step: same loss and gradients on every mesh as on one device; parameters
really split; frozen parts get no optimizer state; the chunked loss equals the plain one."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infllava_jax import params as params_lib, presets
from infllava_jax.model import InfLlavaModel
from infllava_jax.sharding import batch_sharding, make_mesh
from infllava_jax.splice import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from infllava_jax.training import step as step_lib
from infllava_jax.training.loss import cross_entropy_sum, shift_labels
from tests.tiers import slow

CFG = presets.tiny()


def _batch(A=2, b=8, L=20, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, CFG.llm.vocab_size, (A, b, L)).astype(np.int32)
    ids[..., 3] = IMAGE_TOKEN_INDEX
    labels = np.where(np.arange(L) > 8, ids, IGNORE_INDEX).astype(np.int32)
    mask = np.ones_like(ids)
    mask[:, ::2, -4:] = 0                                  # right padding on every other row
    labels[mask == 0] = IGNORE_INDEX
    H, W = CFG.image_size
    px = rng.normal(size=(A, b, H, W, 3)).astype(np.float32)
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "pixel_values": px}


def _place(tree, shardings):
    return jax.tree.map(lambda x, s: jax.device_put(x, s), tree, shardings)


@pytest.fixture(scope="module")
def reference():
    params = jax.device_get(params_lib.init_params(CFG, seed=1))
    tx, _ = step_lib.make_optimizer(1e-3, 10)
    state = step_lib.init_state(params, step_lib.trainable_parts("stage2"), tx)
    batch = _batch()
    grads_fn = step_lib.make_grad_fn(CFG, loss_chunk=16)
    loss, count, grads = jax.jit(grads_fn)(jax.device_put(state, jax.devices()[0]), batch)
    return params, batch, (float(loss), int(count), jax.device_get(grads))


@pytest.mark.parametrize("shape", [(2, 2, 2), *slow(((8, 1, 1),), ((2, 4, 1),))])
def test_mesh_matches_single_device(reference, shape):
    check_mesh(reference, shape, CFG)


@pytest.mark.slow
def test_splash_attention_in_the_sharded_step(reference):
    """Every attention through splash (Pallas interpret mode) inside the scanned, rematerialised
    layers and the accumulation scan, shard_map'ed over a 2 x 2 x 2 mesh: the xla reference's
    loss and gradients."""
    check_mesh(reference, (2, 2, 2), CFG.with_runtime(attention_impl="splash"))


def check_mesh(reference, shape, cfg):
    params, batch, (loss1, count1, grads1) = reference
    mesh = make_mesh(dict(zip(("data", "fsdp", "tensor"), shape)))
    p_sh = params_lib.param_shardings(cfg, mesh)
    tx, _ = step_lib.make_optimizer(1e-3, 10)
    state = step_lib.init_state(_place(params, p_sh), step_lib.trainable_parts("stage2"), tx)
    b_sh = {k: batch_sharding(mesh, v.ndim, batch_axis=1) for k, v in batch.items()}
    grads_fn = step_lib.make_grad_fn(cfg, loss_chunk=16)
    with jax.set_mesh(mesh):
        loss, count, grads = jax.jit(grads_fn)(state, _place(batch, b_sh))
    assert int(count) == count1
    np.testing.assert_allclose(float(loss), loss1, rtol=1e-5)
    top = max(np.abs(g).max() for g in jax.tree.leaves(grads1))
    for (path, g), g1 in zip(jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(grads1)):
        # (the key-projection bias has an exactly-zero gradient: softmax ignores it; floor the scale)
        scale = max(np.abs(g1).max(), 1e-3 * top)
        err = np.abs(np.asarray(g) - g1).max() / scale
        assert err < 1e-4, f"{jax.tree_util.keystr(path)}: relative gradient error {err:.2e}"
    # each large parameter is really split across devices
    emb = state["params"]["language_model"]["model"]["embed_tokens"]["embedding"]
    assert emb.addressable_shards[0].data.size * min(8, shape[1] * shape[2]) == emb.size
    q = state["params"]["language_model"]["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert q.addressable_shards[0].data.size < q.size or shape[1] * shape[2] == 1


@pytest.mark.slow
def test_frozen_parts_have_no_optimizer_state_and_step_updates_only_trainable():
    params = params_lib.init_params(CFG, seed=2)
    tx, schedule = step_lib.make_optimizer(1e-2, 10, warmup_ratio=0.0)
    state = step_lib.init_state(params, step_lib.trainable_parts("stage1"), tx)
    assert set(state["params"]) == {"spatial_embed", "mm_projector"}
    assert set(state["frozen"]) == {"vision_tower", "language_model"}
    n_train = sum(x.size for x in jax.tree.leaves(state["params"]))
    n_opt = sum(x.size for x in jax.tree.leaves(state["opt_state"]))
    assert n_opt == 2 * n_train + 2   # Adam mu and nu (+ counts): nothing for frozen parts
    step = jax.jit(step_lib.make_train_step(CFG, tx, schedule, loss_chunk=16))
    new, metrics = step(state, _batch(A=1, b=2))
    assert float(metrics["lr"]) == 0.0          # warmup starts from 0, as HF's scheduler
    new, metrics = step(new, _batch(A=1, b=2))
    assert not bool(metrics["skipped"]) and int(new["step"]) == 2 and float(metrics["lr"]) > 0
    changed = jax.tree_util.tree_map_with_path(lambda p, a, b: (jax.tree_util.keystr(p), bool(jnp.any(a != b))),
                                               new["params"], state["params"])
    unchanged = [k for k, c in jax.tree.leaves(changed, is_leaf=lambda x: isinstance(x, tuple)) if not c]
    # the DEM key bias has a zero gradient (softmax is shift-invariant), so Adam leaves it alone
    assert unchanged in ([], ["['spatial_embed']['attention']['k_proj']['bias']"]), unchanged
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), new["frozen"], state["frozen"]))


@pytest.mark.slow
def test_batch_without_supervised_tokens_is_skipped_not_trained():
    params = params_lib.init_params(CFG, seed=3)
    tx, schedule = step_lib.make_optimizer(1e-2, 10, warmup_ratio=0.0)
    state = step_lib.init_state(params, step_lib.trainable_parts("stage2"), tx)
    batch = _batch(A=1, b=2)
    batch["labels"][:] = IGNORE_INDEX
    new, metrics = jax.jit(step_lib.make_train_step(CFG, tx, schedule))(state, batch)
    assert bool(metrics["skipped"]) and int(metrics["tokens"]) == 0
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), new["params"], state["params"]))


@pytest.mark.slow
def test_chunked_loss_equals_full_logits_loss():
    params = params_lib.init_params(CFG, seed=4)
    b = jax.tree.map(lambda x: x[0], _batch(A=1, b=2, L=37))
    model = InfLlavaModel(CFG)
    logits = model.apply({"params": params}, b["input_ids"], b["pixel_values"], b["attention_mask"])
    x = model.apply({"params": params}, b["input_ids"], b["pixel_values"], b["attention_mask"], b["labels"],
                    method=InfLlavaModel.embed_inputs)
    t = shift_labels(x["labels"])
    valid = t != IGNORE_INDEX
    ref = -jnp.sum(jnp.where(valid, jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.where(valid, t, 0)[..., None],
                                                         -1)[..., 0], 0.0))
    hidden = model.apply({"params": params}, b["input_ids"], b["pixel_values"], b["attention_mask"],
                         return_hidden=True)
    for chunk in (7, 16, 1000):
        s, c = cross_entropy_sum(hidden, step_lib.head_kernel(params, CFG), t, chunk)
        assert int(c) == int(valid.sum())
        np.testing.assert_allclose(float(s), float(ref), rtol=1e-5)


def test_loss_at_the_supervised_positions_only_is_the_same_loss_and_gradients():
    """loss_positions: the head at the first K supervised positions of a row; a batch with a row of
    more than K falls back to every position, so the sum is always the same."""
    from infllava_jax.training.loss import first_supervised_nll
    rng = np.random.default_rng(0)
    B, L, D, V = 4, 24, 8, 32
    hidden, head = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((B, L, D), (D, V)))
    t = np.where(rng.random((B, L)) < 0.2, rng.integers(0, V, (B, L)), IGNORE_INDEX).astype(np.int32)
    t[0, -6:] = [1, 2, 3, 4, 5, IGNORE_INDEX]              # row 0: the most, at the end
    most = int((t != IGNORE_INDEX).sum(1).max())
    full = jax.value_and_grad(lambda h, k, t: cross_entropy_sum(h, k, t)[0], argnums=(0, 1))
    (ref, ref_g), count = full(hidden, head, t), int((t != IGNORE_INDEX).sum())
    for K in (most, most + 3, most - 2):                   # fits, fits with room, a row too many (fallback)
        f = jax.jit(lambda h, k, t: cross_entropy_sum(h, k, t, positions=K))
        s, c = f(hidden, head, t)
        assert int(c) == count
        np.testing.assert_allclose(float(s), float(ref), rtol=1e-6)
        g = jax.grad(lambda h, k: f(h, k, t)[0], argnums=(0, 1))(hidden, head)
        for a, b in zip(g, ref_g):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    s, c = first_supervised_nll(hidden, t, head, most)     # the gathered path alone: the same sum
    np.testing.assert_allclose(float(s), float(ref), rtol=1e-6)
    assert int(c) == count
    s, c = first_supervised_nll(hidden, t, head, most - 2)  # ... and what the fallback guards against
    assert int(c) < count and float(s) < float(ref)


def test_stage_names_extra_trainable_parts():
    from infllava_jax.training.step import split_params, trainable_parts
    params = {k: {"w": k} for k in ("vision_tower", "spatial_embed", "mm_projector", "language_model")}
    train, frozen = split_params(params, trainable_parts("stage1", ("vision_tower", "language_model")))
    assert sorted(train) == ["language_model", "mm_projector", "spatial_embed", "vision_tower"] and not frozen
    assert trainable_parts("stage2", ("language_model",)) == ("spatial_embed", "mm_projector", "language_model")
    train, frozen = split_params(params, trainable_parts("stage1"))
    assert sorted(frozen) == ["language_model", "vision_tower"]
    with pytest.raises(ValueError, match="stage1\\+dem"):
        trainable_parts("stage1", ("dem",))


@pytest.mark.slow
def test_lr_mult_scales_one_parts_updates():
    """optimizer.lr_mult: the DEM's update is exactly 3x the plain one's, every other part's the
    same; the override reaches it from the command line, and a part name that is not one is refused."""
    from infllava_jax import overrides
    from infllava_jax.training import defaults
    params = params_lib.init_params(CFG, seed=5)
    parts = step_lib.trainable_parts("stage2")
    cfg = overrides.apply(defaults.base_config(), {"optimizer.lr_mult.spatial_embed": "3"})
    defaults.check(cfg)
    mult = dict(cfg.optimizer.lr_mult)
    assert mult["spatial_embed"] == 3.0 and mult["mm_projector"] == 1.0
    with pytest.raises(overrides.ConfigError, match="dem"):
        overrides.apply(defaults.base_config(), {"optimizer.lr_mult.dem": "3"})
    with pytest.raises(overrides.ConfigError, match="lr_mult.spatial_embed"):
        defaults.check(overrides.apply(defaults.base_config(), {"optimizer.lr_mult.spatial_embed": "-1"}))
    train, _ = step_lib.split_params(params, parts)
    grads = jax.tree.map(lambda x: jnp.asarray(np.random.default_rng(x.size).normal(size=x.shape), x.dtype), train)
    upd = {}
    for name, m in (("plain", None), ("x3", mult)):
        tx, _ = step_lib.make_optimizer(1e-2, 10, warmup_ratio=0.0, lr_mult=m)
        opt = tx.init(train)
        _, opt = tx.update(grads, opt, train)     # lr 0: the warmup's first step
        upd[name], _ = tx.update(grads, opt, train)
    for part in parts:
        want = 3.0 if part == "spatial_embed" else 1.0
        ref = jax.tree.leaves(upd["plain"][part])
        assert sum(float(jnp.abs(r).sum()) for r in ref) > 0, part
        for got, r in zip(jax.tree.leaves(upd["x3"][part]), ref):
            np.testing.assert_allclose(np.asarray(got), want * np.asarray(r), rtol=1e-6)
