"""Weight-only quantization (infllava_jax/quant.py, qwix) per setting: unquantized, int8, int4.

1. Weight memory of the 8B model (released INF-LLaVA, bf16 parameters) from shapes (eval_shape:
   nothing allocated), the language model and the rest.
2. Greedy generation speed on this machine (a random ~0.1 B decoder behind the tiny vision
   path), tokens/s and the ratio against the unquantized model measured in the same run.
3. With --ckpt and --data (a trained checkpoint and its scenes directory, e.g. the tiny config's
   WORKDIR/final and WORKDIR/synthetic_data): the hires_synth test-split accuracy per setting, and
   the mean per-token KL(unquantized || quantized) of the answer-position logits.

    python -m benchmarks.quant
    python -m benchmarks.quant --skip-8b --ckpt W/final --data W/synthetic_data --limit 100
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from infllava_jax import presets, quant
from infllava_jax.api import InfLlava
from infllava_jax.params import abstract_params, init_params, quantize

SETTINGS = (None, "int8", "int4")
GIB = 2 ** 30


def memory_8b() -> list[tuple]:
    base = presets.inf_llava_8b()
    base = base.replace(llm=base.llm.replace(param_dtype="bfloat16"),
                        vision=base.vision.replace(param_dtype="bfloat16"))
    rows = []
    for s in SETTINGS:
        shapes = abstract_params(base.replace(llm=base.llm.replace(quant=s)))
        lm = quant.weight_bytes(shapes["language_model"])
        rest = quant.weight_bytes({k: v for k, v in shapes.items() if k != "language_model"})
        rows.append((s or "bf16", quant.tile_size(s, (4096, 14336)) if s else None, lm / GIB, rest / GIB))
    return rows


def speed(new_tokens: int, repeats: int) -> list[tuple]:
    cfg = presets.tiny(vocab_size=8192)
    cfg = cfg.replace(llm=cfg.llm.replace(hidden_size=768, intermediate_size=2048, num_hidden_layers=8,
                                          num_attention_heads=12, num_key_value_heads=4, head_dim=64))
    params = init_params(cfg)
    ids = np.array([[1, -200] + list(range(2, 30))])
    px = np.random.default_rng(0).standard_normal((1, 3, *cfg.image_size)).astype(np.float32)
    rows = []
    for s in SETTINGS:
        c, p = (cfg, params) if s is None else quantize(cfg, params, s)
        m = InfLlava(c, p)
        m.generate(ids, px, max_new_tokens=new_tokens, stop_ids=())        # compile
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            m.generate(ids, px, max_new_tokens=new_tokens, stop_ids=())
            times.append(time.perf_counter() - t)
        rows.append((s or "fp32", new_tokens / float(np.median(times)), quant.weight_bytes(p["language_model"])))
    return rows


def _kl(ref: InfLlava, q: InfLlava, data: str, limit: int) -> float:
    """Mean over answer positions of KL(softmax ref || softmax q), teacher-forced on the test
    questions (prompt + reference answer, as eval formats them)."""
    from infllava_jax.evaluation import prompting
    from infllava_jax.evaluation.datasets import open_image
    from infllava_jax.evaluation.runner import pixel_size
    from infllava_jax.pixels import preprocess
    rows = [json.loads(x) for x in open(f"{data}/test.jsonl").read().splitlines()[:limit]]
    tok = prompting.get_tokenizer("", None, ref.config.llm.vocab_size, ref.usage)
    kls = []
    for r in rows:
        img = preprocess(open_image(r["image"], data, r["image"]), pixel_size(ref.config, "native"), ref.usage.image_mode)
        ids = prompting.encode(tok, r["question"], 1, usage=ref.usage)
        px = np.moveaxis(np.asarray(img, np.float32), -1, 0)[None]
        a, b = ref(np.asarray([ids]), px)[0, -1], q(np.asarray([ids]), px)[0, -1]
        la, lb = jax.nn.log_softmax(a), jax.nn.log_softmax(b)
        kls.append(float(jnp.sum(jnp.exp(la) * (la - lb))))
    return float(np.mean(kls))


def accuracy(ckpt: str, data: str, limit: int) -> list[tuple]:
    from infllava_jax.evaluation import config as eval_cfg, sweep
    ref = InfLlava.from_pretrained(ckpt)
    rows = []
    for s in SETTINGS:
        ecfg = eval_cfg.get_config(f"tasks=hires_synth,res=1008,pixels=native,double_bos=false,batch_size=32,"
                                   f"progress=false,limit={limit},quant={s or ''}")
        with tempfile.TemporaryDirectory() as out:
            summary = sweep.run(ecfg, ckpt=ckpt, data=data, out=out, log=lambda *a: None)
        acc = summary["results"]["hires_synth"]["1008"]["metrics"]["accuracy"]
        kl = 0.0 if s is None else _kl(ref, InfLlava.from_pretrained(ckpt, quant=s), data, limit)
        rows.append((s or "as saved", acc, kl))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--skip-8b", action="store_true")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--ckpt", default="")
    p.add_argument("--data", default="")
    p.add_argument("--limit", type=int, default=0, help="first N test questions (0 = all)")
    a = p.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}")
    if not a.skip_8b:
        print("\n8B weight memory from shapes (GiB)\nsetting  tile  language model  rest  total")
        for s, tile, lm, rest in memory_8b():
            print(f"{s:7s}  {str(tile or '-'):4s}  {lm:14.2f}  {rest:4.2f}  {lm + rest:5.2f}")
    if not a.skip_speed:
        rows = speed(a.new_tokens, a.repeats)
        print(f"\ngreedy generation, batch 1, {a.new_tokens} new tokens, median of {a.repeats}"
              "\nsetting  tokens/s  vs fp32  decoder weights (MiB)")
        for s, tps, nbytes in rows:
            print(f"{s:7s}  {tps:8.1f}  {tps / rows[0][1]:6.2f}x  {nbytes / 2 ** 20:8.1f}")
    if a.ckpt:
        print(f"\n{a.ckpt}: hires_synth test accuracy and KL(unquantized || quantized) at the answer position")
        for s, acc, kl in accuracy(a.ckpt, a.data, a.limit):
            print(f"{s:8s}  accuracy {100 * acc:5.1f}  KL {kl:.2e}")


if __name__ == "__main__":
    main()
