"""Weight-only quantization (infllava_jax/quant.py, qwix) per setting: unquantized, int8, int4.

1. Weight memory of the 8B model (released INF-LLaVA, bf16 parameters) from shapes (eval_shape:
   nothing allocated), the language model and the rest.
2. Greedy generation speed on this machine (a random ~0.1 B decoder behind the tiny vision
   path), tokens/s and the ratio against the unquantized model measured in the same run.
3. With --ckpt and --data (a trained checkpoint and its scenes directory, e.g. the study's
   dcm_dem_1008 stage2/final and its data directory): the hires_synth test-split accuracy per
   setting (and per question type), and the mean per-token KL(unquantized || quantized) of the
   next-token distributions at the reference answer's tokens, teacher-forced.

    python -m benchmarks.quant
    python -m benchmarks.quant --skip-8b --skip-speed --ckpt RUN/stage2/final --data STUDY/data
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


def _answer_logprobs(models: list[InfLlava], data: str, limit: int):
    """Per test question: each model's log-softmax at the positions that predict the reference
    answer's tokens and its end of turn, teacher-forced (prompt + answer, as training formats them)."""
    from infllava_jax import conversation
    from infllava_jax.data import template
    from infllava_jax.evaluation import prompting
    from infllava_jax.evaluation.datasets import open_image
    from infllava_jax.evaluation.runner import pixel_size
    from infllava_jax.pixels import preprocess
    ref = models[0]
    rows = [json.loads(x) for x in open(f"{data}/test.jsonl").read().splitlines()[:limit or None]]
    tok = prompting.get_tokenizer("", None, ref.config.llm.vocab_size, ref.usage)
    for r in rows:
        img = preprocess(open_image(r["image"], data, r["image"]), pixel_size(ref.config, "native"), ref.usage.image_mode)
        prompt = prompting.encode(tok, r["question"], 1, usage=ref.usage)
        answer = template.tokenize(r["answer"] + conversation.answer_end(ref.usage.template), tok)
        ids = np.asarray([list(prompt) + answer])
        px = np.moveaxis(np.asarray(img, np.float32), -1, 0)[None]
        yield r["type"], [jax.nn.log_softmax(m(ids, px)[0, -len(answer) - 1:-1].astype(np.float32)) for m in models]


def kl_per_token(ckpt: str, data: str, limit: int, settings) -> dict:
    """setting -> (mean KL(unquantized || quantized) per answer token, at the first answer token,
    share of answer tokens whose argmax differs)."""
    models = [InfLlava.from_pretrained(ckpt)] + [InfLlava.from_pretrained(ckpt, quant=s) for s in settings]
    per_token = {s: [] for s in settings}
    first = {s: [] for s in settings}
    flips = {s: [] for s in settings}
    for _, (la, *lqs) in _answer_logprobs(models, data, limit):
        for s, lq in zip(settings, lqs):
            kl = np.asarray(jnp.sum(jnp.exp(la) * (la - lq), axis=-1))
            per_token[s].extend(kl.tolist())
            first[s].append(float(kl[0]))
            flips[s].extend((np.argmax(la, -1) != np.argmax(lq, -1)).tolist())
    return {s: (float(np.mean(per_token[s])), float(np.mean(first[s])), float(np.mean(flips[s]))) for s in settings}


def accuracy(ckpt: str, data: str, limit: int) -> list[tuple]:
    """(setting, tile, accuracy, per-type accuracies, KL per token, KL at the first answer token,
    argmax flips): eval's hires_synth sweep at res 1008 with native pixels, as the study scores it."""
    from infllava_jax.evaluation import config as eval_cfg, sweep
    cfg = InfLlava.from_pretrained(ckpt).config.llm
    widths = (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads * cfg.head_dim)
    kls = kl_per_token(ckpt, data, limit, [s for s in SETTINGS if s])
    rows = []
    for s in SETTINGS:
        ecfg = eval_cfg.get_config(f"tasks=hires_synth,res=1008,pixels=native,double_bos=false,batch_size=32,"
                                   f"progress=false,limit={limit},quant={s or ''}")
        with tempfile.TemporaryDirectory() as out:
            summary = sweep.run(ecfg, ckpt=ckpt, data=data, out=out, log=lambda *a: None)
        m = summary["results"]["hires_synth"]["1008"]["metrics"]
        types = {k[len("accuracy_"):]: v for k, v in m.items() if k.startswith("accuracy_")}
        tile = quant.tile_size(s, widths) if s else None
        rows.append((s or "as saved", tile, m["accuracy"], types, *(kls[s] if s else (0.0, 0.0, 0.0))))
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
        rows = accuracy(a.ckpt, a.data, a.limit)
        print(f"\n{a.ckpt}: hires_synth test split ({a.limit or 'all'} questions), accuracy %, and "
              "KL(unquantized || quantized) of the next-token distributions at the reference answer's tokens")
        print("setting   tile  accuracy  vs saved  " + "  ".join(f"{t:>6s}" for t in rows[0][3])
              + "  KL/token  KL first  argmax flips")
        for s, tile, acc, types, kl, kl0, flip in rows:
            print(f"{s:8s}  {str(tile or '-'):4s}  {100 * acc:8.2f}  {100 * (acc - rows[0][2]):+8.2f}  "
                  + "  ".join(f"{100 * v:6.1f}" for v in types.values())
                  + f"  {kl:8.2e}  {kl0:8.2e}  {100 * flip:10.2f}%")

if __name__ == "__main__":
    main()
