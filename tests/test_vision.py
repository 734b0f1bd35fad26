"""CLIP vision tower: parity with transformers (every hidden state), layouts, remat, features, names."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from convert import engine, formats
from infllava_jax import vision
from infllava_jax.layers import stack_layer_params, unstack_layer_params
from infllava_jax.vision import CLIPVisionConfig, CLIPVisionTransformer, clip_vit_l14_336, init_params
from tests.partitioning import assert_all_partitioned
from tests.tiers import slow


def select_features(config: CLIPVisionConfig, params, pixel_values, select_layer: int = -2):
    """Functional form of `CLIPVisionTransformer.features` (params: the `params` collection)."""
    return CLIPVisionTransformer(config).apply({"params": params}, pixel_values, select_layer=select_layer,
                                               method=CLIPVisionTransformer.features)

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            image_size=56, patch_size=14)


def params_from_hf(sd, cfg, prefix=None, strict=True):
    """vision.key_map applied by the one conversion engine (prefix None: found from the anchor key);
    CLIPModel's text half and the position_ids buffer are not converted by design."""
    prefix = formats.find_prefix(sd, vision.ANCHOR_KEY, "vision tower") if prefix is None else prefix
    ignore = [prefix + k for k in vision.IGNORED_KEYS] + list(formats.CLIP_TEXT_KEYS)
    return engine.from_torch(vision.key_map(cfg), sd, vision.abstract_params(cfg), prefix=prefix, strict=strict,
                             ignore=ignore)


def params_to_hf(params, cfg):
    return engine.to_torch(vision.key_map(cfg), params)


CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


def rel_err(a, ref):
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    assert a.shape == ref.shape, (a.shape, ref.shape)
    return np.abs(a - ref).max() / np.abs(ref).max()


def pixels(size):
    """Batch of 2 NHWC images: random normal, and skimage's astronaut resized + CLIP-normalised."""
    import skimage.data
    import skimage.transform
    img = skimage.transform.resize(skimage.data.astronaut(), (size, size), anti_aliasing=True)  # [0, 1]
    real = (img.astype(np.float32) - CLIP_MEAN) / CLIP_STD
    rand = np.random.RandomState(0).randn(size, size, 3).astype(np.float32)
    return np.stack([rand, real])


def hf_model(act="quick_gelu", cls=transformers.CLIPVisionModel, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.CLIPVisionConfig(**TINY, hidden_act=act, attn_implementation="eager")
    if cls is transformers.CLIPModel:
        text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                    vocab_size=99, max_position_embeddings=16)
        cfg = transformers.CLIPConfig(text_config=text, vision_config=cfg.to_dict(), projection_dim=16,
                                      attn_implementation="eager")
    model = cls(cfg).eval()
    # HF initialises LayerNorms to (1, 0): randomise them so a scale/bias mix-up is caught.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model, {k: v.detach().numpy() for k, v in model.state_dict().items()}


def hf_forward(model, x):
    with torch.no_grad():
        return model(pixel_values=torch.from_numpy(x).permute(0, 3, 1, 2), output_hidden_states=True)


@pytest.fixture(scope="module", params=["quick_gelu", "gelu"])
def ref(request):
    model, sd = hf_model(request.param)
    x = pixels(TINY["image_size"])
    return request.param, model, sd, x, hf_forward(model, x)


@pytest.mark.parametrize("scan", [True, False])
def test_parity_every_hidden_state(ref, scan):
    act, model, sd, x, o = ref
    cfg = CLIPVisionConfig.from_hf(model.config.to_dict(), scan_layers=scan)
    assert cfg.hidden_act == act
    out = jax.jit(lambda p, x: CLIPVisionTransformer(cfg).apply({"params": p}, x, output_hidden_states=True))(
        params_from_hf(sd, cfg), x)
    assert len(out["hidden_states"]) == len(o.hidden_states) == TINY["num_hidden_layers"] + 1
    for i, (a, b) in enumerate(zip(out["hidden_states"], o.hidden_states)):
        assert rel_err(a, b.numpy()) < 1e-5, f"hidden_states[{i}]"
        # each image of the batch separately (the real one has a different scale)
        assert rel_err(a[1], b[1].numpy()) < 1e-5, f"hidden_states[{i}] astronaut"
    assert rel_err(out["last_hidden_state"], o.last_hidden_state.numpy()) < 1e-5
    assert rel_err(out["pooler_output"], o.pooler_output.numpy()) < 1e-5


def test_clipmodel_state_dict_and_config():
    """Full CLIPModel: `vision_model.` prefix detected, text keys ignored, config read from vision_config."""
    model, sd = hf_model(cls=transformers.CLIPModel)
    cfg = CLIPVisionConfig.from_hf(model.config.to_dict())
    assert cfg == CLIPVisionConfig(**TINY)
    x = pixels(TINY["image_size"])
    o = hf_forward(model.vision_model, x)
    out = CLIPVisionTransformer(cfg).apply({"params": params_from_hf(sd, cfg)}, x)
    assert rel_err(out["last_hidden_state"], o.last_hidden_state.numpy()) < 1e-5
    assert rel_err(out["pooler_output"], o.pooler_output.numpy()) < 1e-5
    # the same weights under the llava / released-INF-LLaVA prefixes
    for prefix in ("vision_tower.vision_model.", "model.vision_tower.vision_tower.vision_model."):
        sd2 = {prefix + k[len("vision_model."):]: v for k, v in sd.items() if k.startswith("vision_model.")}
        sd2["model.layers.0.mlp.up_proj.weight"] = np.zeros((2, 2), np.float32)
        p2 = params_from_hf(sd2, cfg)
        jax.tree.map(np.testing.assert_array_equal, p2, params_from_hf(sd, cfg))


def test_config_roundtrip_and_hashable():
    cfg = clip_vit_l14_336(dtype="bfloat16")
    assert hash(cfg) == hash(clip_vit_l14_336(dtype="bfloat16"))
    assert CLIPVisionConfig.from_hf(cfg.to_hf(), dtype="bfloat16") == cfg
    hf = transformers.CLIPVisionConfig(**cfg.to_hf()).to_dict()  # HF accepts it; HF's `dtype` is ignored
    assert CLIPVisionConfig.from_hf(hf) == cfg.replace(dtype="float32")
    assert (cfg.num_patches, cfg.num_positions) == (576, 577)
    with pytest.raises(ValueError, match="hidden_act"):
        CLIPVisionConfig(**TINY, hidden_act="relu")


def test_scanned_equals_unscanned():
    _, sd = hf_model()
    x = pixels(TINY["image_size"])
    cfg_s, cfg_u = CLIPVisionConfig(**TINY), CLIPVisionConfig(**TINY, scan_layers=False)
    p_s = params_from_hf(sd, cfg_s)
    p_u = unstack_layer_params(p_s)
    jax.tree.map(np.testing.assert_array_equal, p_u, params_from_hf(sd, cfg_u))
    jax.tree.map(np.testing.assert_array_equal, stack_layer_params(p_u), p_s)
    f = lambda c, p: CLIPVisionTransformer(c).apply({"params": p}, x, output_hidden_states=True)
    a, b = f(cfg_s, p_s), f(cfg_u, p_u)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert rel_err(u, v) <= 1e-6


@pytest.mark.parametrize("scan", [False, *slow(True)])
def test_remat_full_matches_none(scan):
    tiny = {**TINY, "num_hidden_layers": 2}  # compiling backward passes dominates this test
    cfgs = [CLIPVisionConfig(**tiny, scan_layers=scan, remat_policy=r) for r in ("none", "full")]
    params = init_params(cfgs[0], jax.random.PRNGKey(1))
    x = jnp.asarray(pixels(TINY["image_size"]))
    w = jax.random.normal(jax.random.PRNGKey(2), (2, 17, 64))

    def loss(p, c):
        out = CLIPVisionTransformer(c).apply({"params": p}, x)
        return jnp.sum(out["last_hidden_state"] * w) + jnp.sum(out["pooler_output"] * w[:, 0])

    (l0, g0), (l1, g1) = [jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, c) for c in cfgs]
    assert rel_err(l1, l0) <= 1e-6
    leaves0, leaves1 = jax.tree.leaves(g0), jax.tree.leaves(g1)
    assert len(leaves0) == len(leaves1) == 16 * (1 if scan else 2) + 7
    for a, b in zip(leaves1, leaves0):
        assert rel_err(a, b) <= 1e-6


def _count_dots(jaxpr, mult=1):
    """dot_general equations in a jaxpr, counting a scan body `length` times."""
    n = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            n += mult
        m = mult * eqn.params.get("length", 1) if eqn.primitive.name == "scan" else mult
        for v in eqn.params.values():
            for sub in (v if isinstance(v, (tuple, list)) else [v]):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    n += _count_dots(sub.jaxpr, m)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    n += _count_dots(sub, m)
    return n


@pytest.mark.parametrize("scan", [True, False])
def test_features_runs_only_needed_layers(scan):
    model, sd = hf_model()
    x = pixels(TINY["image_size"])
    o = hf_forward(model, x)
    cfg = CLIPVisionConfig(**TINY, scan_layers=scan)
    L, p = cfg.num_hidden_layers, params_from_hf(sd, cfg)
    f = select_features(cfg, p, x)  # select_layer=-2
    assert f.shape == (2, cfg.num_patches, cfg.hidden_size)
    assert rel_err(f, o.hidden_states[-2][:, 1:].numpy()) < 1e-5
    for sel in (0, 1, -1, -L - 1):
        assert rel_err(select_features(cfg, p, x, sel), o.hidden_states[sel][:, 1:].numpy()) < 1e-5
    # 8 dot_generals per layer (q, k, v, out, fc1, fc2, 2 in attention) and the patch embedding's;
    # the last layer never runs
    full = jax.make_jaxpr(lambda p: CLIPVisionTransformer(cfg).apply({"params": p}, x))(p)
    feat = jax.make_jaxpr(lambda p: select_features(cfg, p, x))(p)
    assert _count_dots(full.jaxpr) == 8 * L + 1
    assert _count_dots(feat.jaxpr) == 8 * (L - 1) + 1
    # ... nor is it read: the last layer's params can be dropped from the tree
    if scan:
        p_cut = {**p, "encoder": {"layers": jax.tree.map(lambda a: a[:L - 1], p["encoder"]["layers"])}}
    else:
        p_cut = {**p, "encoder": {k: v for k, v in p["encoder"].items() if k != f"layers_{L - 1}"}}
    np.testing.assert_array_equal(select_features(cfg, p_cut, x), f)
    # the module form, a prefix run, and init through `features` (builds all layers)
    out = CLIPVisionTransformer(cfg).apply({"params": p}, x, num_layers=2, output_hidden_states=True)
    assert "pooler_output" not in out and len(out["hidden_states"]) == 3
    for a, b in zip(out["hidden_states"], o.hidden_states[:3]):
        assert rel_err(a, b.numpy()) < 1e-5
    m = CLIPVisionTransformer(cfg)
    shapes = jax.eval_shape(lambda: m.init(jax.random.PRNGKey(0), x, method=m.features))["params"]
    assert jax.tree.structure(nn.meta.unbox(shapes)) == jax.tree.structure(p)


def test_full_size_param_count():
    cfg = clip_vit_l14_336()
    shapes = jax.eval_shape(lambda: init_params(cfg))
    ours = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))
    with torch.device("meta"):
        hf = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**cfg.to_hf()))
    theirs = sum(p.numel() for p in hf.parameters())
    assert ours == theirs == 303_507_456
    assert shapes["encoder"]["layers"]["self_attn"]["q_proj"]["kernel"].shape == (24, 1024, 1024)
    assert shapes["embeddings"]["patch_embedding"]["kernel"].shape == (14, 14, 3, 1024)
    assert shapes["embeddings"]["position_embedding"]["embedding"].shape == (577, 1024)


@pytest.mark.parametrize("scan", [True, False])
def test_logical_names_complete(scan):
    cfg = CLIPVisionConfig(**TINY, scan_layers=scan)
    boxed = jax.eval_shape(lambda: init_params(cfg, boxed=True))
    assert_all_partitioned(boxed)
    names = jax.tree.leaves(nn.get_partition_spec(boxed), is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))
    assert all(n is not None for spec in names for n in spec)  # every axis is named
    spec = nn.get_partition_spec(boxed)
    layer = spec["encoder"]["layers"] if scan else spec["encoder"]["layers_0"]
    lead = ("layers",) if scan else ()
    assert tuple(layer["self_attn"]["q_proj"]["kernel"]) == lead + ("embed", "heads")
    assert tuple(layer["self_attn"]["q_proj"]["bias"]) == lead + ("heads",)
    assert tuple(layer["self_attn"]["out_proj"]["kernel"]) == lead + ("heads", "embed")
    assert tuple(layer["mlp"]["fc1"]["kernel"]) == lead + ("embed", "mlp")
    assert tuple(layer["mlp"]["fc2"]["kernel"]) == lead + ("mlp", "embed")
    assert tuple(layer["layer_norm1"]["scale"]) == lead + ("norm",)
    assert tuple(spec["embeddings"]["class_embedding"]) == ("embed",)
    assert tuple(spec["embeddings"]["position_embedding"]["embedding"]) == ("positions", "embed")
    assert tuple(spec["embeddings"]["patch_embedding"]["kernel"])[-1] == "embed"


def test_bad_state_dicts():
    _, sd = hf_model()
    cfg = CLIPVisionConfig(**TINY)
    key = "encoder.layers.2.self_attn.q_proj.weight"
    with pytest.raises(KeyError, match=key.replace(".", r"\.")):
        params_from_hf({k: v for k, v in sd.items() if k != key}, cfg)
    with pytest.raises(ValueError, match=r"encoder\.layers\.2\.self_attn\.q_proj\.weight.*\(64, 32\).*\(64, 64\)"):
        params_from_hf({**sd, key: sd[key][:, :32]}, cfg)
    with pytest.raises(ValueError, match=r"\(8, 64\).*\(17, 64\)"):
        params_from_hf({**sd, "embeddings.position_embedding.weight": np.zeros((8, 64), np.float32)}, cfg)
    with pytest.raises(KeyError, match="patch_embedding"):  # no tower at all
        params_from_hf({k: v for k, v in sd.items() if "patch_embedding" not in k}, cfg)
    # a 5-layer checkpoint into a 4-layer config: the extra layer is reported, not dropped
    extra = {**sd, "encoder.layers.4.mlp.fc1.bias": np.zeros(128, np.float32)}
    with pytest.raises(ValueError, match=r"encoder\.layers\.4\.mlp\.fc1\.bias"):
        params_from_hf(extra, cfg)
    params_from_hf(extra, cfg, strict=False)
    # non-vision keys and the position_ids buffer (saved by transformers < 4.31) are ignored
    params_from_hf({**sd, "embeddings.position_ids": np.arange(17)[None],
                    "text_model.embeddings.token_embedding.weight": np.zeros(3), "logit_scale": 1.0}, cfg)


def test_export_roundtrip():
    model, sd = hf_model()
    for scan in (True, False):
        cfg = CLIPVisionConfig(**TINY, scan_layers=scan)
        back = params_to_hf(params_from_hf(sd, cfg), cfg)
        assert set(back) == set(sd) - {"embeddings.position_ids"}
        for k, v in back.items():
            np.testing.assert_array_equal(v, sd[k], err_msg=k)


def test_attention_impl_and_bf16():
    _, sd = hf_model()
    x = pixels(TINY["image_size"])
    cfg = CLIPVisionConfig(**TINY)
    p = params_from_hf(sd, cfg)
    ref = select_features(cfg, p, x)
    assert rel_err(select_features(cfg.replace(attention_impl="jax"), p, x), ref) < 1e-5
    bf = select_features(cfg.replace(dtype="bfloat16"), p, x)
    assert bf.dtype == jnp.bfloat16 and rel_err(bf, ref) < 5e-2
