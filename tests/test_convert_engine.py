"""The conversion engine, readers and writers on small synthetic tables (no model needed)."""
from __future__ import annotations

import json
import math

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from flax.traverse_util import unflatten_dict

from convert import engine
from convert.errors import ConversionError, MissingKeysError, ShapeMismatchError, UnexpectedKeysError
from convert.sources import ArrayTensor, GrownRows, InitTensor, open_safetensors, open_torch_pickle, open_weights
from convert.writers import write_safetensors
from infllava_jax import checkpoint, presets
from infllava_jax.keymap import Row, stack

BF16 = np.dtype(ml_dtypes.bfloat16)
RNG = np.random.default_rng(0)

# one row per kind: plain, transposed, conv, per-layer stacked (transposed) and per-layer unstacked
ROWS = [Row("emb/embedding", "emb.weight"),
        Row("head/kernel", "head.weight", "transpose"),
        Row("patch/kernel", "patch.weight", "conv"),
        *stack([("fc/kernel", "fc.weight", "transpose"), ("norm/scale", "norm.weight", "none")], 3,
               scanned=True, path="layers", key="layers"),
        *stack([("fc/kernel", "fc.weight", "transpose")], 2, scanned=False, path="blocks", key="blocks")]
TORCH = {"emb.weight": (10, 4), "head.weight": (10, 4), "patch.weight": (5, 3, 2, 2),
         **{f"layers.{i}.fc.weight": (6, 4) for i in range(3)}, **{f"layers.{i}.norm.weight": (4,) for i in range(3)},
         **{f"blocks.{i}.fc.weight": (7, 6) for i in range(2)}}
ABSTRACT = unflatten_dict({
    "emb/embedding": jax.ShapeDtypeStruct((10, 4), np.float32), "head/kernel": jax.ShapeDtypeStruct((4, 10), np.float32),
    "patch/kernel": jax.ShapeDtypeStruct((2, 2, 3, 5), np.float32),
    "layers/fc/kernel": jax.ShapeDtypeStruct((3, 4, 6), np.float32), "layers/norm/scale": jax.ShapeDtypeStruct((3, 4), np.float32),
    "blocks_0/fc/kernel": jax.ShapeDtypeStruct((6, 7), np.float32), "blocks_1/fc/kernel": jax.ShapeDtypeStruct((6, 7), np.float32)}, sep="/")


def state(dtype=np.float32):
    return {k: RNG.standard_normal(s).astype(dtype) for k, s in TORCH.items()}


def test_leaves_read_any_region_and_export_inverts():
    sd = state()
    plan = engine.import_plan(ROWS, {k: ArrayTensor(v) for k, v in sd.items()}, ABSTRACT)
    full = {p: leaf.read() for p, leaf in plan.items()}
    np.testing.assert_array_equal(full["head/kernel"], sd["head.weight"].T)
    np.testing.assert_array_equal(full["patch/kernel"], sd["patch.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(full["layers/fc/kernel"], np.stack([sd[f"layers.{i}.fc.weight"].T for i in range(3)]))
    np.testing.assert_array_equal(full["blocks_1/fc/kernel"], sd["blocks.1.fc.weight"].T)
    for p, leaf in plan.items():   # any region = the same slice of the whole
        for _ in range(5):
            idx = tuple(slice(a, a + RNG.integers(1, n - a + 1)) for n in leaf.shape for a in [RNG.integers(0, n)])
            np.testing.assert_array_equal(leaf.read(idx), full[p][idx], err_msg=p)
    back = engine.to_torch(ROWS, unflatten_dict(full, sep="/"))
    assert sorted(back) == sorted(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k], err_msg=k)


def test_dtype_cast_and_bf16_round_trip():
    sd = state(BF16)
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, np.float32), ABSTRACT)
    params = engine.to_numpy(engine.import_plan(ROWS, {k: ArrayTensor(v) for k, v in sd.items()}, abstract))
    assert params["head"]["kernel"].dtype == np.float32
    back = engine.to_torch(ROWS, params, dtype=BF16)
    for k in sd:
        assert back[k].dtype == BF16 and back[k].tobytes() == sd[k].tobytes(), k


def test_plan_errors_name_keys_and_shapes():
    sd = state()
    t = lambda d: {k: ArrayTensor(v) for k, v in d.items()}
    with pytest.raises(MissingKeysError, match=r"layers\.2\.fc\.weight"):
        engine.import_plan(ROWS, t({k: v for k, v in sd.items() if k != "layers.2.fc.weight"}), ABSTRACT)
    with pytest.raises(ShapeMismatchError, match=r"head\.weight: shape \(4, 10\) in the checkpoint, expected \(10, 4\)"):
        engine.import_plan(ROWS, t({**sd, "head.weight": sd["head.weight"].T}), ABSTRACT)
    with pytest.raises(UnexpectedKeysError, match=r"layers\.3\.fc\.weight"):
        engine.import_plan(ROWS, t({**sd, "layers.3.fc.weight": sd["layers.0.fc.weight"]}), ABSTRACT)
    engine.import_plan(ROWS, t({**sd, "layers.3.fc.weight": sd["layers.0.fc.weight"]}), ABSTRACT, ignore=["layers.*"])
    with pytest.raises(ValueError, match="no row for.*emb/embedding"):   # a table must cover the model
        engine.import_plan(ROWS[1:], t(sd), ABSTRACT)
    with pytest.raises(ValueError, match="unknown parameters.*extra/kernel"):
        engine.import_plan(ROWS + [Row("extra/kernel", "x")], t(sd), ABSTRACT)
    with pytest.raises(ValueError, match="two rows"):
        engine.import_plan(ROWS + [Row("emb/embedding", "x")], t(sd), ABSTRACT)
    with pytest.raises(ValueError, match="transform"):
        Row("a", "b", "flip")
    with pytest.raises(ValueError, match="per-layer"):
        Row("a", "b.{i}")


def test_to_jax_places_shards():
    sd = state()
    mesh = jax.make_mesh((4, 2), ("a", "b"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    P, S = jax.sharding.PartitionSpec, jax.sharding.NamedSharding
    plan = engine.import_plan(ROWS, {k: ArrayTensor(v) for k, v in sd.items()}, ABSTRACT)
    arr = engine.to_jax(plan, S(mesh, P()))
    np.testing.assert_array_equal(np.asarray(arr["layers"]["fc"]["kernel"]), plan["layers/fc/kernel"].read())
    reads = []
    leaf = plan["head/kernel"]
    orig = leaf.read
    leaf.read = lambda index=None: reads.append(index) or orig(index)
    x = engine.to_jax({"head/kernel": leaf}, S(mesh, P("b", None)))["head"]["kernel"]
    assert x.sharding.shard_shape(x.shape) == (2, 10)
    assert len(reads) == 2 and all(r[0].stop - r[0].start == 2 for r in reads)   # each distinct shard read once
    np.testing.assert_array_equal(np.asarray(x), sd["head.weight"].T)


def test_safetensors_reader_and_writer_agree_with_the_library(tmp_path):
    import safetensors.torch
    tensors = {"a": torch.randn(7, 3), "b.c": torch.randn(4, 5).bfloat16(), "s": torch.tensor(3.0),
               "i": torch.arange(6, dtype=torch.int64).reshape(2, 3)}
    safetensors.torch.save_file(tensors, tmp_path / "lib.safetensors")
    ours = open_safetensors(tmp_path / "lib.safetensors")
    assert ours["b.c"].dtype == BF16 and ours["s"].shape == ()
    for k, v in tensors.items():
        want = v.view(torch.int16).numpy() if v.dtype == torch.bfloat16 else v.numpy()
        got = ours[k].read()
        np.testing.assert_array_equal(got.view(np.int16) if got.dtype == BF16 else got, want, err_msg=k)
    np.testing.assert_array_equal(ours["a"].read((slice(2, 5), slice(1, 3))), tensors["a"].numpy()[2:5, 1:3])
    (tmp_path / "out").mkdir()
    names = write_safetensors(ours, tmp_path / "out", max_shard_bytes=60)   # several shards + index
    assert len(names) > 1 and (tmp_path / "out" / "model.safetensors.index.json").is_file()
    back = {}
    for n in names:
        raw = (tmp_path / "out" / n).read_bytes()
        assert int.from_bytes(raw[:8], "little") % 8 == 0
        back.update(safetensors.torch.load_file(tmp_path / "out" / n))
    for k, v in tensors.items():
        assert torch.equal(back[k], v), k
    weight_map = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["weight_map"]
    assert sorted(weight_map) == sorted(tensors)
    assert sorted(open_weights(tmp_path / "out")) == sorted(tensors)
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 20)
    with pytest.raises(ConversionError, match="not a safetensors file"):
        open_safetensors(tmp_path / "junk.safetensors")


def test_torch_pickles(tmp_path):
    sd = {"w": torch.randn(3, 4).bfloat16(), "b": torch.randn(4)}
    torch.save(sd, tmp_path / "zip.bin")
    torch.save(sd, tmp_path / "legacy.bin", _use_new_zipfile_serialization=False)   # cannot be mmapped
    for f in ("zip.bin", "legacy.bin"):
        t = open_torch_pickle(tmp_path / f)
        assert t["w"].dtype == BF16
        np.testing.assert_array_equal(t["w"].read().view(np.int16), sd["w"].view(torch.int16).numpy())
        np.testing.assert_array_equal(t["b"].read((slice(1, 3),)), sd["b"].numpy()[1:3])
    torch.save({"w": torch.zeros(2), "step": 3}, tmp_path / "mixed.bin")
    with pytest.raises(ConversionError, match="'step' is a int, not a tensor"):
        open_torch_pickle(tmp_path / "mixed.bin")


def test_virtual_tensors():
    base = RNG.standard_normal((5, 3)).astype(np.float32)
    g = GrownRows(ArrayTensor(base), 2)
    assert g.shape == (7, 3)
    full = g.read()
    np.testing.assert_array_equal(full[:5], base)
    np.testing.assert_allclose(full[5], base.astype(np.float64).mean(0), rtol=1e-7)
    np.testing.assert_array_equal(full[6], full[5])
    np.testing.assert_array_equal(g.read((slice(4, 7), slice(1, 2))), full[4:7, 1:2])
    w = InitTensor("x.weight", (64, 16), "uniform", fan_in=16, seed=1)
    assert np.array_equal(w.read(), InitTensor("x.weight", (64, 16), "uniform", fan_in=16, seed=1).read())
    assert not np.array_equal(w.read(), InitTensor("y.weight", (64, 16), "uniform", fan_in=16, seed=1).read())
    assert 0.2 < np.abs(w.read()).max() <= 1 / math.sqrt(16)
    assert (InitTensor("n", (4,), "ones").read() == 1).all() and (InitTensor("n", (4,), "zeros").read() == 0).all()


class Counting(checkpoint.StreamedArray):
    def __init__(self, value, chunk_axis=0):
        self.value, self.shape, self.dtype, self.chunk_axis, self.reads = value, value.shape, value.dtype, chunk_axis, []

    def read(self, index):
        self.reads.append(index)
        return np.ascontiguousarray(self.value[index])


def test_streamed_save_writes_piece_by_piece(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "STREAM_CHUNK_BYTES", 64 << 10)
    monkeypatch.setattr(checkpoint, "STREAM_INFLIGHT_BYTES", 128 << 10)
    big = Counting(RNG.standard_normal((10, 64, 100)).astype(np.float32))   # 256 KB -> ten 25.6 KB layers
    wide = Counting(RNG.standard_normal((8, 6000)).astype(BF16), chunk_axis=1)   # 96 KB, streamed along axis 1
    tree = {"big": big, "wide": wide, "small": np.arange(5, dtype=np.int32)}
    done = []
    checkpoint.save_checkpoint(tmp_path / "ckpt", presets.tiny(), tree, progress=done.append)
    assert [r[0] for r in big.reads] == [slice(i, i + 2) for i in range(0, 10, 2)]   # 64 KB / 25.6 KB per layer
    assert [r[1] for r in wide.reads] == [slice(0, 4096), slice(4096, 6000)]       # 64 KB / 16 B per column
    assert sum(done) == big.value.nbytes + wide.value.nbytes
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), {"big": big.value, "wide": wide.value,
                                                                              "small": tree["small"]})
    out = checkpoint.restore_params(tmp_path / "ckpt" / checkpoint.PARAMS_DIR, target)
    np.testing.assert_array_equal(np.asarray(out["big"]), big.value)
    np.testing.assert_array_equal(np.asarray(out["wide"]).view(np.uint16), wide.value.view(np.uint16))
    np.testing.assert_array_equal(np.asarray(out["small"]), tree["small"])
