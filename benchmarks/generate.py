"""Generation speed: our jitted prefill + while_loop decode against transformers' `generate`, and
the number of programs a 3-task x 3-resolution evaluation sweep compiles.

Same weights (a tiny random HF Llama, `presets.tiny().llm`, converted with
the project's converter, `convert.engine` + `llama.key_map`), same prompts, same machine, greedy, no early stop (no EOS).
Prefill = one forward over the prompt (full logits, as HF computes them); decode tokens/s =
B * (N - 1) / (t(N new tokens) - t(1 new token)), the same formula for both, compilation excluded
(each of ours is compiled and warmed up first; transformers runs first, so
JAX's thread pool is idle while it is timed), best of --repeats. Also checks that both produce the same tokens.

    python -m benchmarks.generate [--batch 4 --prompt 256 --new 64 --repeats 3 --no-sweep]

Last line: JSON.
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def _params_from_hf(sd, cfg, llama):
    """HF Llama state dict -> our parameters with the project's converter."""
    if hasattr(llama, "params_from_hf"):
        return llama.params_from_hf(sd, cfg)
    from convert import engine
    return engine.from_torch(llama.key_map(cfg), sd, llama.abstract_params(cfg),
                             ignore=list(llama.ignored_keys(cfg)))


def bench_generation(batch: int, prompt: int, new: int, repeats: int) -> dict:
    import torch
    import transformers

    from infllava_jax.generate import generate_core
    from infllava_jax import presets
    from infllava_jax import llama
    from infllava_jax.llama import LlamaForCausalLM

    cfg = presets.tiny().llm
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg.to_hf())).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    params = jax.device_put(_params_from_hf({k: v.detach().numpy() for k, v in hf.state_dict().items()}, cfg, llama))
    ids = np.random.default_rng(0).integers(10, cfg.vocab_size, (batch, prompt)).astype(np.int32)
    t_ids = torch.from_numpy(ids.astype(np.int64))

    # -- transformers
    with torch.inference_mode():
        hf(t_ids)
        hf_prefill = _best(lambda: hf(t_ids), repeats)
        gen = lambda n: hf.generate(t_ids, attention_mask=torch.ones_like(t_ids), max_new_tokens=n,
                                    do_sample=False, num_beams=1)
        hf_tokens = gen(new)[:, prompt:].numpy()
        hf_n, hf_1 = _best(lambda: gen(new), repeats), _best(lambda: gen(1), repeats)

    # -- ours
    fwd = jax.jit(lambda p, x: LlamaForCausalLM(cfg).apply({"params": p}, x)[0])
    jax.block_until_ready(fwd(params, ids))
    ours_prefill = _best(lambda: jax.block_until_ready(fwd(params, ids)), repeats)

    @functools.partial(jax.jit, static_argnums=1)
    def decode_ids(p, n):   # the program's decode loop on the text embeddings of `ids`
        emb = LlamaForCausalLM(cfg).apply({"params": p}, ids, method=LlamaForCausalLM.embed)
        return generate_core(cfg, p, emb, jnp.ones(ids.shape, jnp.int32), max_new_tokens=n, stop_ids=(-1,))

    def run(n):
        return jax.block_until_ready(decode_ids(params, n))

    t = time.perf_counter()
    ours_tokens = np.asarray(run(new)[0])
    run(1)
    ours_compile_and_first = time.perf_counter() - t
    ours_n, ours_1 = _best(lambda: run(new), repeats), _best(lambda: run(1), repeats)

    decode = lambda tn, t1: batch * (new - 1) / max(tn - t1, 1e-9)
    return dict(
        batch=batch, prompt_tokens=prompt, new_tokens=new, torch_threads=torch.get_num_threads(),
        ours_prefill_tok_s=round(batch * prompt / ours_prefill, 1),
        hf_prefill_tok_s=round(batch * prompt / hf_prefill, 1),
        ours_decode_tok_s=round(decode(ours_n, ours_1), 1), hf_decode_tok_s=round(decode(hf_n, hf_1), 1),
        ours_generate_s=round(ours_n, 4), hf_generate_s=round(hf_n, 4),
        ours_compile_s=round(ours_compile_and_first, 2),
        same_tokens=float(np.mean(ours_tokens == hf_tokens)))


def bench_sweep_compiles() -> dict:
    from configs.eval import get_config
    from infllava_jax.evaluation import demo_fixtures, sweep
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        demo_fixtures.make_tiny_checkpoint(tmp / "ckpt")
        demo_fixtures.make_data(tmp / "data", tasks=("pope", "scienceqa_img", "mmmu"))
        cfg = get_config("tasks=pope+scienceqa_img+mmmu,res=336+672+1008,batch_size=4,max_new_tokens=8,"
                         "tokenizer=tiny,progress=false")
        t = time.perf_counter()
        s = sweep.run(cfg, ckpt=str(tmp / "ckpt"), data=str(tmp / "data"), out=str(tmp / "out"),
                      log=lambda *_: None)
        return dict(sweep_tasks=3, sweep_resolutions=3, sweep_pairs=9,
                    sweep_compiled_programs=s["compiled_programs"], sweep_program_bound=s["program_bound"],
                    sweep_compile_s=s["compile_seconds"], sweep_wall_s=round(time.perf_counter() - t, 1),
                    sweep_examples=s["examples"], sweep_examples_per_s=s["examples_per_s"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-sweep", action="store_true")
    a = p.parse_args(argv)
    out = dict(backend=jax.default_backend(), devices=jax.device_count())
    out.update(bench_generation(a.batch, a.prompt, a.new, a.repeats))
    print(f"prefill tokens/s  ours {out['ours_prefill_tok_s']:>10}   transformers {out['hf_prefill_tok_s']:>10}")
    print(f"decode  tokens/s  ours {out['ours_decode_tok_s']:>10}   transformers {out['hf_decode_tok_s']:>10}")
    print(f"same greedy tokens: {100 * out['same_tokens']:.1f}%")
    if not a.no_sweep:
        out.update(bench_sweep_compiles())
        print(f"3 tasks x 3 resolutions: {out['sweep_compiled_programs']} compiled programs "
              f"(bound {out['sweep_program_bound']}), {out['sweep_compile_s']} s compiling")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
