"""Weight-only quantized inference (quant.py, qwix): from_pretrained(quant=...), the quantized
checkpoint's round trip, the switches of eval, chat and the lmms-eval adapter, bad values."""
import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from infllava_jax import params as params_lib, quant
from infllava_jax.api import InfLlava
from infllava_jax.errors import InputError
from infllava_jax.evaluation import demo_fixtures
from tests.tiers import slow

ROOT = Path(__file__).resolve().parents[1]
IDS = np.array([[1, 2, -200, 5, 6, 7, 8], [3, -200, 9, 10, 11, 12, 13]])


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("quant") / "ckpt"
    demo_fixtures.make_tiny_checkpoint(path, seed=1)
    return path


def _pixels(config):
    return np.random.default_rng(0).standard_normal((2, 3, *config.image_size)).astype(np.float32)


def _kl(p_logits, q_logits):
    """Mean over tokens of KL(softmax p || softmax q)."""
    lp, lq = jax.nn.log_softmax(p_logits, -1), jax.nn.log_softmax(q_logits, -1)
    return float(np.mean(np.sum(np.exp(lp) * (lp - lq), -1)))


def _kernels(tree):
    return {p: v for p, v in flatten_dict(tree).items() if quant.is_quantized(v)}


@pytest.mark.parametrize("spec,dtype,tile,max_kl", [("int8", "int8", None, 1e-3), *slow(("int4", "int4", 32, 3e-2))])
def test_quantized_model_is_close_and_its_kernels_small(ckpt, spec, dtype, tile, max_kl):
    ref = InfLlava.from_pretrained(ckpt)
    q = InfLlava.from_pretrained(ckpt, quant=spec)
    assert q.config.llm.quant == spec and ref.config.llm.quant is None
    kernels = _kernels(q.params)
    assert len(kernels) == 8      # the seven projections (stacked layers) and lm_head
    for path, k in kernels.items():   # (int4 values held in int8 on CPU: quant.held)
        assert k.array.qtype == dtype and k.array.qvalue.dtype == np.dtype("int8") and path[-1] == "kernel"
        assert -8 <= int(k.array.qvalue.min()) and int(k.array.qvalue.max()) <= 7 or dtype == "int8"
        assert k.how.tiled_axes == ({} if tile is None else {0: tile})
    px = _pixels(ref.config)
    a, b = ref(IDS, px), q(IDS, px)
    kl = _kl(a, b)
    assert 0 < kl < max_kl, kl
    # the projections' bytes: 1 (int8) or 1/2 (int4) per weight plus the scales, against 4 (fp32)
    flat = flatten_dict(ref.params)
    before = sum(quant.weight_bytes(flat[p]) for p in kernels)
    like = flatten_dict(params_lib.abstract_params(q.config))     # as an accelerator holds them
    after = sum(quant.weight_bytes(like[p]) for p in kernels)
    assert after < before * {"int8": 0.27, "int4": 0.16}[spec], (after, before)


def test_quantized_checkpoint_reloads_without_quantizing(ckpt, tmp_path, monkeypatch):
    q = InfLlava.from_pretrained(ckpt, quant="int4")
    q.save_pretrained(tmp_path / "q4")
    assert json.loads((tmp_path / "q4" / "config.json").read_text())["llm"]["quant"] == "int4"
    monkeypatch.setattr(params_lib.quant, "quantize_tree", lambda *a: pytest.fail("quantized again"))
    again = InfLlava.from_pretrained(tmp_path / "q4")
    assert again.config == q.config
    for x, y in zip(jax.tree.leaves(q.params), jax.tree.leaves(again.params)):
        assert x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))
    px = _pixels(q.config)
    np.testing.assert_array_equal(q(IDS, px), again(IDS, px))
    with pytest.raises(InputError, match="quantized as 'int4' already"):
        InfLlava.from_pretrained(tmp_path / "q4", quant="int8")


def test_bad_quant_names_the_accepted_values(ckpt):
    with pytest.raises(InputError, match="quant='int3'; expected one of"):
        InfLlava.from_pretrained(ckpt, quant="int3")
    with pytest.raises(ValueError, match="quant='fp8'"):
        quant.parse("fp8")


def test_eval_config_accepts_the_switch():
    from infllava_jax.evaluation.config import check, get_config
    from infllava_jax.overrides import ConfigError
    c = get_config("tasks=pope,quant=int8")
    check(c)
    assert c.quant == "int8"
    with pytest.raises(ConfigError, match="quant"):
        check(get_config("tasks=pope,quant=int3"))


@pytest.mark.slow
def test_lmms_adapter_model_arg(ckpt):
    from infllava_jax.evaluation.lmms_adapter import Adapter
    ad = Adapter(str(ckpt), quant="int8", tokenizer="tiny", batch_size=1)
    assert ad.model.config.llm.quant == "int8" and _kernels(ad.model.params)


@pytest.mark.slow
def test_chat_cli_quant_switch(ckpt, tmp_path):
    from PIL import Image
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(image)
    run = lambda *a: subprocess.run([sys.executable, "-m", "infllava_jax.chat", "What?", "--ckpt", str(ckpt),
                                     "--image", str(image), "--tokenizer", "tiny", "--max-new-tokens", "2", *a],
                                    cwd=ROOT, capture_output=True, text=True, timeout=300)
    bad = run("--quant", "int3")
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0, bad.stderr
    assert "quant='int3'; expected one of ('int8', 'int4')" in bad.stderr and "Traceback" not in bad.stderr
    good = run("--quant", "int8")
    assert good.returncode == 0, good.stderr[-2000:]
