"""Train-step speed on CPU: our jitted step against the same step in PyTorch, same batch.

    python -m benchmarks.train_step [--steps 10]

For the tiny and a small config (stage 2: DEM + projector + LLM trained, vision tower frozen):
step time, tokens/s, XLA's compiled FLOPs against the analytic count (training/flops.py), and a
PyTorch reference step (transformers CLIP + Llama, the DEM written from docs/model.md in
convert/torch_reference.py, torch.optim.AdamW) on the same weights and batch. Matmuls run at
default precision on both sides; the two steps alternate (median of --steps each). Then the f32
GEMM rate of both on the small step's products and on 1024^3, timed in alternation; JAX's 1024^3
rate is the matmul rate the steps' achieved FLOP/s are compared with. The last line is a JSON
object; `speedup_vs_torch` is the smaller of the two configs'.
"""
from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
import torch

from convert.torch_reference import InfLlavaTorch
from benchmarks.timing import gemm_rates, gemm_table, interleaved
from infllava_jax.training.defaults import base_config
from infllava_jax import params as params_lib, presets
from infllava_jax.dem import DEMConfig
from infllava_jax.llama import LlamaConfig
from infllava_jax.splice import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from infllava_jax.training import flops, step as step_lib
from infllava_jax.vision import CLIPVisionConfig


def small():
    """A few-hundred-MFLOP-per-token model: CLIP 256 wide x 4 layers, Llama 512 wide x 4 layers."""
    v = CLIPVisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                         image_size=112, patch_size=14)
    llm = LlamaConfig(vocab_size=4096, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=2, rope_theta=500000.0, rms_norm_eps=1e-5,
                      max_position_embeddings=4096, tie_word_embeddings=False)
    dem = DEMConfig(hidden=256, num_heads=4, head_dim=64, ffn_hidden=64, ffn_out=128, nH=3, nW=3, g=8)
    return presets.tiny().replace(vision=v, llm=llm, dem=dem)


def batch(cfg, B, L, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, cfg.llm.vocab_size, (B, L)).astype(np.int32)
    ids[:, 4] = IMAGE_TOKEN_INDEX
    labels = np.where(np.arange(L) > L // 2, ids, IGNORE_INDEX).astype(np.int32)
    H, W = cfg.image_size
    return {"input_ids": ids, "labels": labels, "attention_mask": np.ones_like(ids),
            "pixel_values": rng.normal(size=(B, H, W, 3)).astype(np.float32)}


def torch_reference(cfg, params):
    from convert import engine, formats
    tensors = engine.to_torch(formats.released_rows(cfg), jax.device_get(params))   # released key names
    ref = InfLlavaTorch.from_config(cfg).load_released(tensors).train()
    for p in ref.model.vision_tower.parameters():
        p.requires_grad_(False)
    trainable = [p for n, p in ref.named_parameters() if not n.startswith("model.vision_tower.")]
    opt = torch.optim.AdamW(trainable, lr=1e-5, weight_decay=0.0)
    T = cfg.tokens_per_image

    def step(b):
        ids = torch.from_numpy(b["input_ids"]).long()
        px = torch.from_numpy(np.moveaxis(b["pixel_values"], -1, 1).copy())
        img = ref.encode_images(px)                                   # (B, T, D)
        emb = ref.model.embed_tokens
        i = int((ids[0] == IMAGE_TOKEN_INDEX).nonzero()[0])
        x = torch.cat([emb(ids[:, :i]), img, emb(ids[:, i + 1:])], dim=1)
        lab = torch.from_numpy(b["labels"]).long()
        lab = torch.cat([lab[:, :i], torch.full((lab.shape[0], T), IGNORE_INDEX), lab[:, i + 1:]], dim=1)
        loss = ref.llm(inputs_embeds=x, labels=lab).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()

    return step


def run(name, cfg, B, L, steps):
    params = params_lib.init_params(cfg, seed=0)
    tx, schedule = step_lib.make_optimizer(1e-5, 100, max_grad_norm=None)
    state = step_lib.init_state(jax.tree.map(jnp.copy, params), step_lib.trainable_parts("stage2"), tx)
    b = batch(cfg, B, L)
    jb = jax.tree.map(lambda x: jnp.asarray(x)[None], b)        # one accumulation step
    step = jax.jit(step_lib.make_train_step(cfg, tx, schedule, loss_chunk=base_config().loss_chunk),
                   donate_argnums=0)                             # as the Trainer runs it
    compiled = step.lower(state, jb).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    holder = {"s": state}

    def ours():
        holder["s"], m = compiled(holder["s"], jb)
        jax.block_until_ready(m)

    torch_step = torch_reference(cfg, params)
    t_ours, t_torch = interleaved([ours, lambda: torch_step(b)], steps)
    seq = L + cfg.tokens_per_image - 1
    analytic = flops.train_step_flops(cfg, B, seq, step_lib.trainable_parts("stage2"))
    return {"config": name, "batch": B, "seq_len": seq, "step_s": t_ours, "tokens_per_s": B * seq / t_ours,
            "torch_step_s": t_torch, "speedup_vs_torch": t_torch / t_ours,
            "flops_xla": float(cost.get("flops", 0.0)), "flops_analytic": analytic}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    c = small()
    rows = [run("tiny", presets.tiny(), 4, 128, args.steps), run("small", c, 2, 192, args.steps)]
    tokens = rows[1]["batch"] * rows[1]["seq_len"]       # the small step's LLM and vision tower products
    vit_tokens = rows[1]["batch"] * c.dem.vit_passes() * (c.tokens_per_image + 1)   # 2 x 19 passes x 65
    gemms = gemm_rates([(tokens, 512, 1536), (tokens, 1536, 512), (tokens, 512, 4096), (vit_tokens, 256, 1024),
                        (1024, 1024, 1024)])
    rate = gemms[-1]["jax_flops_per_s"]                  # this CPU's JAX f32 matmul rate: the 1024^3 row
    for r in rows:
        r["achieved_flops_per_s"] = r["flops_analytic"] / r["step_s"]
    print(f"{'config':<8}{'batch':>6}{'seq':>6}{'ours s/step':>13}{'torch s/step':>14}{'speedup':>9}"
          f"{'tok/s':>9}{'XLA/analytic FLOPs':>20}")
    for r in rows:
        print(f"{r['config']:<8}{r['batch']:>6}{r['seq_len']:>6}{r['step_s']:>13.3f}{r['torch_step_s']:>14.3f}"
              f"{r['speedup_vs_torch']:>8.2f}x{r['tokens_per_s']:>9.0f}{r['flops_xla'] / r['flops_analytic']:>20.2f}")
    print("(XLA's cost analysis counts the body of a scanned layer loop once, so its FLOPs undercount "
          "models with several layers; the analytic count is the one MFU uses)")
    print(f"JAX f32 matmul rate on this CPU (1024^3): {rate / 1e9:.0f} GFLOP/s; achieved by the steps (analytic "
          "FLOPs / step time): " + ", ".join(f"{r['config']} {r['achieved_flops_per_s'] / 1e9:.0f} GFLOP/s "
                                             f"({r['achieved_flops_per_s'] / rate:.0%})" for r in rows))
    print(gemm_table(gemms))
    print(json.dumps({"rows": rows, "speedup_vs_torch": min(r["speedup_vs_torch"] for r in rows),
                      "matmul_flops_per_s": rate, "gemm": gemms,
                      "achieved_flops_per_s": {r["config"]: r["achieved_flops_per_s"] for r in rows}}))


if __name__ == "__main__":
    main()
