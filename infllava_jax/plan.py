"""Memory and FLOPs plan of a train step before renting hardware: AOT-compiles the real step
from shapes only, on fake CPU devices laid out as the target mesh.

    python -m infllava_jax.plan --config configs/stage2_8b.py --mesh fsdp=8 [--micro-batch 4]
    python -m infllava_jax.plan --config configs/stage2_8b.py --config.lora.rank=128 --mesh fsdp=1 \
        --micro-batch 1                              # LoRA: bf16 frozen base, adapters + DEM + projector train
    python -m infllava_jax.plan --config configs/stage2_8b.py --mesh fsdp=1 --fit 24   # search (fit.py)

Prints per-device memory (arguments, outputs, temporaries, peak) from XLA's memory analysis,
FLOPs per step (analytic and XLA's count), and the step time implied at a given MFU on H100 and
TPU v5p. The last line is a JSON object of those figures. Nothing is allocated: a full-size
model needs only compile-time memory here.
"""
from __future__ import annotations

import json
import math
import os
import time

GiB = 2 ** 30
TARGETS = {"H100": 989e12, "TPU v5p": 459e12}
HOISTING_PASSES = ("while-loop-invariant-code-motion", "while-loop-expensive-invariant-code-motion")


def load_config(spec: str):
    """`configs/<name>.py[:args]` -> its ConfigDict (overrides.load_config; run from the
    repository root, where the config files import `configs`)."""
    from infllava_jax import overrides
    return overrides.load_config(spec)


def apply_sets(cfg, sets):
    """cfg with `key.sub=value` overrides, as `--config.key.sub=value` sets them (overrides.apply)."""
    from infllava_jax import overrides
    return overrides.apply(cfg, dict(kv.partition("=")[::2] for kv in sets))


def train_step_setup(cfg, mesh_shape: dict[str, int], micro_batch_per_device: int) -> dict:
    """The stage's jitted train step on a mesh of `mesh_shape` (jax.devices()), with the abstract
    state and batch it is compiled for: what `plan` analyses and benchmarks/accelerator_check.py runs."""
    import jax
    import jax.numpy as jnp

    from infllava_jax import sharding
    from infllava_jax.data.tokenizer import load_tokenizer
    from infllava_jax.training import partition, step as step_lib
    from infllava_jax.training.loop import model_config, trainable_parts

    mesh = sharding.make_mesh(mesh_shape)
    mc = model_config(cfg, len(load_tokenizer(cfg.tokenizer or None)))
    data_parallel = sharding.data_parallel_size(mesh)
    micro_global = micro_batch_per_device * data_parallel
    accum = max(1, cfg.global_batch // micro_global)
    if accum * micro_global != cfg.global_batch:
        print(f"note: {micro_batch_per_device} x {data_parallel} data-parallel devices x {accum} steps = "
              f"{accum * micro_global} sequences per step, not the config's global batch {cfg.global_batch}")
    seq = cfg.data.max_len
    L = seq - mc.tokens_per_image + 1                           # ids per row; spliced length = seq
    H, W = mc.image_size
    ids = jax.ShapeDtypeStruct((accum, micro_global, L), jnp.int32)
    batch = {"input_ids": ids, "labels": ids, "attention_mask": ids,
             "pixel_values": jax.ShapeDtypeStruct((accum, micro_global, H, W, 3), jnp.float32)}
    tx, schedule = step_lib.make_optimizer(cfg.optimizer.lr, cfg.total_steps)
    parts = trainable_parts(cfg, mc)
    abstract_state, state_sh = partition.state_shardings(mc, parts, tx, mesh)
    batch_sh = partition.batch_shardings(batch, mesh)
    step = jax.jit(step_lib.make_train_step(mc, tx, schedule, cfg.loss_chunk,
                                            loss_positions=cfg.get("loss_positions", 0)),
                   in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None), donate_argnums=0)
    return {"mesh": mesh, "mc": mc, "parts": parts, "tx": tx, "step": step, "state": abstract_state, "state_shardings": state_sh,
            "batch": batch, "batch_shardings": batch_sh, "accum": accum, "sequences": accum * micro_global, "seq": seq}


def plan(cfg, mesh_shape: dict[str, int], micro_batch_per_device: int, mfu: float) -> dict:
    import jax

    from infllava_jax import attention, quant
    from infllava_jax.training import flops

    with quant.as_accelerator():                        # int4 packed, as the accelerator holds it
        s = train_step_setup(cfg, mesh_shape, micro_batch_per_device)
    mesh, mc, n_dev = s["mesh"], s["mc"], s["mesh"].devices.size
    t = time.perf_counter()
    with jax.set_mesh(mesh), attention.unblocked(), quant.as_accelerator():   # attention as the accelerator compiles it
        compiled = s["step"].lower(s["state"], s["batch"]).compile()
    compile_s = time.perf_counter() - t
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    args, outs = mem.argument_size_in_bytes, mem.output_size_in_bytes
    temp, alias = mem.temp_size_in_bytes, mem.alias_size_in_bytes
    peak = args + outs + temp - alias
    step_flops = flops.train_step_flops(mc, s["sequences"], s["seq"], s["parts"])
    n_params = sum(x.size for x in jax.tree.leaves(s["state"]["params"])) \
        + sum(x.size for x in jax.tree.leaves(s["state"]["frozen"]))
    return {
        "config": cfg.model.preset, "stage": cfg.stage, "mesh": dict(mesh.shape), "devices": n_dev,
        "params": int(n_params), "global_batch": s["sequences"], "micro_batch_per_device": micro_batch_per_device,
        "accumulation_steps": s["accum"], "seq_len": s["seq"], "remat_policy": mc.llm.remat_policy,
        "dtype": mc.llm.dtype, "argument_gib": args / GiB, "output_gib": outs / GiB, "temp_gib": temp / GiB,
        "alias_gib": alias / GiB, "peak_gib_per_device": peak / GiB,
        "flops_per_step_analytic": step_flops,
        "flops_per_device_xla": float(cost.get("flops", 0.0)) if cost else 0.0,
        "compile_s": compile_s, "mfu_assumed": mfu,
        **{f"step_s_{k.replace(' ', '_')}": step_flops / (n_dev * v * mfu) for k, v in TARGETS.items()},
    }


def state_gib(cfg, mesh_shape: dict[str, int]) -> float:
    """GiB per device of the train state alone (trained parameters, frozen base, optimizer
    moments), from shapes and shardings without compiling: a lower bound of the step's peak
    (an int4 value counts half a byte, as an accelerator holds it)."""
    import jax

    from infllava_jax import quant
    with quant.as_accelerator():
        s = train_step_setup(cfg, mesh_shape, 1)
    sizes = jax.tree.map(lambda x, sh: math.prod(sh.shard_shape(x.shape)) * jax.dtypes.itemsize_bits(x.dtype) // 8,
                         s["state"], s["state_shardings"])
    return sum(jax.tree.leaves(sizes)) / GiB


def default_micro_batch(cfg, devices: int) -> int:
    """Per device: the config's per-process micro-batch over the devices, at most 4 (the 8B
    configs' 32 per process are 8 devices x 4: one device gets 4, not 32)."""
    return max(1, min(cfg.micro_batch // devices, 4))


def _config_and_args(ap, argv):
    """(the checked config, the other arguments): --config FILE[:args] and --config.<field>=VALUE as
    train.py reads them (overrides.py); a bad one is one line and exit 2."""
    import sys

    from infllava_jax import overrides
    from infllava_jax.training import defaults
    try:
        spec, sets, rest = overrides.split_argv(list(sys.argv[1:] if argv is None else argv))
        args = ap.parse_args(rest)
        if spec is None:
            raise overrides.ConfigError("--config: missing; e.g. --config configs/stage2_8b.py")
        cfg = overrides.apply(overrides.load_config(spec), sets)
        defaults.check(cfg, batches=False)     # --micro-batch is the plan's
    except overrides.ConfigError as e:
        overrides.fail(ap.prog, e)
    return cfg, args


def main(argv=None) -> int:
    from infllava_jax import fit
    from infllava_jax.overrides import ArgumentParser   # one-line errors, exit 2
    ap = ArgumentParser(prog="python -m infllava_jax.plan", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", help="configs/<name>.py[:args], then --config.<field>=VALUE for any field "
                    "(e.g. --config.runtime.remat_policy=dots; docs/configuration.md)")
    ap.add_argument("--mesh", default="fsdp=8", help="e.g. fsdp=8 or data=4,fsdp=8 (fake devices)")
    ap.add_argument("--micro-batch", type=int, default=None, help="sequences per device per micro-step")
    ap.add_argument("--mfu", type=float, default=0.4, help="assumed MFU for the implied step time")
    ap.add_argument("--no-hoist", action="store_true", help="the default (kept for old command lines)")
    ap.add_argument("--hoist", action="store_true",
                    help="keep XLA's while-loop invariant code motion (off by default): the CPU backend has no bf16 "
                         "dot, so it upcasts bf16 weights to f32 and hoists those copies out of the layer scan, all "
                         "layers at once; GPUs and TPUs multiply bf16 natively, so the plan leaves it off")
    ap.add_argument("--fit", type=fit.budgets, default=None, metavar="GIB",
                    help="search a setting that fits GIB per device, or each of GIB,GIB,... (infllava_jax/fit.py)")
    ap.add_argument("--top", type=int, default=3, help="--fit: stop after this many fitting settings")
    ap.add_argument("--max-compiles", type=int, default=12, help="--fit: at most this many AOT compiles")
    ap.add_argument("--max-micro", type=int, default=8, help="--fit: largest micro-batch per device tried")
    ap.add_argument("--json", action="store_true", help="--fit: only the JSON line")
    ap.add_argument("--modes", type=fit.choices(fit.MODES), default=list(fit.MODES),
                    help=f"--fit: training modes searched (default {','.join(fit.MODES)})")
    ap.add_argument("--remat", type=fit.choices(fit.REMATS), default=list(fit.REMATS),
                    help=f"--fit: remat policies searched (default {','.join(fit.REMATS)})")
    ap.add_argument("--attention", type=fit.choices(fit.ATTENTIONS), default=list(fit.ATTENTIONS),
                    help=f"--fit: attention implementations searched (default {','.join(fit.ATTENTIONS)})")
    cfg, args = _config_and_args(ap, argv)
    from infllava_jax import sharding
    try:
        mesh_shape = sharding.parse_mesh(args.mesh)
    except ValueError as e:
        ap.error(f"--mesh: {e}")
    if not mesh_shape or min(mesh_shape.values()) < 1:
        ap.error(f"--mesh {args.mesh}: the plan needs every axis's size (it fakes that many devices)")
    n = math.prod(mesh_shape.values())
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}"
    if not args.hoist or args.fit:
        os.environ["XLA_FLAGS"] += f" --xla_disable_hlo_passes={','.join(HOISTING_PASSES)}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if args.fit:
        return fit.main(cfg, mesh_shape, args, plan, state_gib)
    mb = args.micro_batch or default_micro_batch(cfg, n)
    r = plan(cfg, mesh_shape, mb, args.mfu)
    print(f"{r['config']} {r['stage']}: {r['params'] / 1e9:.2f} B params on mesh {r['mesh']} "
          f"({r['devices']} devices), micro-batch {mb}/device x {r['accumulation_steps']} accumulation steps, "
          f"{r['seq_len']} tokens, remat {r['remat_policy']}, {r['dtype']} compute (compiled in {r['compile_s']:.0f} s)")
    print("CPU-only f32 copies of bf16 weights: " + ("counted (--hoist)" if args.hoist else "not counted (as on GPU/TPU)"))
    print(f"{'per device':<22}{'GiB':>10}")
    for k in ("argument", "output", "temp", "alias"):
        print(f"  {k:<20}{r[k + '_gib']:>10.2f}")
    print(f"  {'peak':<20}{r['peak_gib_per_device']:>10.2f}")
    print(f"FLOPs per step: {r['flops_per_step_analytic']:.3e} analytic (global), "
          f"{r['flops_per_device_xla']:.3e} XLA count (per device)")
    for k in TARGETS:
        print(f"step time at MFU {args.mfu:.0%} on {k}: {r['step_s_' + k.replace(' ', '_')]:.2f} s")
    print(json.dumps(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
