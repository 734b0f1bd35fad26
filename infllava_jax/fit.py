"""`python -m infllava_jax.plan --config ... --mesh fsdp=N --fit GIB`: a setting of the run that
fits GIB per device, found by compiling candidates ahead of time (plan.plan, from shapes).

Searched: the training mode (full fine-tuning of the config's stage, LoRA with the config's rank
or 64, LoRA on an int8 or int4 base: QLoRA), the remat policy (none, minimal, full: layers.py)
and the micro-batch per device (1, 2, 4, ...). Not searched: the attention implementation (the
cuDNN / splash kernels compile only on their devices; the plan compiles the portable one).

Order: the modes from the one that gives up least; in each, remat from the fastest, and the
micro-batch doubled from 1 while it fits; the first remat that fits ends the mode. The search
stops at --top fitting settings or --max-compiles.
The step time is the plan's (analytic FLOPs, training/flops.py, at the assumed MFU on an H100)
times REMAT_FLOPS: full remat runs each layer's forward once more (a forward is about a third
of a step); XLA's own count is no help here (it counts a scanned layer once). The micro-batch
changes the number of accumulation steps, not the FLOPs.
"""
from __future__ import annotations

import json

REMATS = ("none", "minimal", "full")
REMAT_COST = {"none": "", "minimal": "recomputes attention", "full": "recomputes every layer's forward"}
REMAT_FLOPS = {"none": 1.0, "minimal": 1.0, "full": 4 / 3}   # "minimal" recomputes attention scores only
DEFAULT_RANK = 64


def modes(cfg) -> list[tuple[str, int, str, str]]:
    """(name, lora rank, base quant, what it gives up), from the one that gives up least."""
    rank = int(cfg.lora.rank) or DEFAULT_RANK
    out = [] if int(cfg.lora.rank) else [("full", 0, "", "")]
    return out + [(f"LoRA r={rank}", rank, "", "adapters only (frozen base)"),
                  (f"QLoRA int8 r={rank}", rank, "int8", "adapters on an int8 base"),
                  (f"QLoRA int4 r={rank}", rank, "int4", "adapters on an int4 base (tile 128)")]


def _variant(cfg, rank: int, base: str, remat: str):
    c = cfg.copy_and_resolve_references()
    c.lora.rank, c.lora.quant, c.runtime.remat_policy = rank, base, remat
    return c


class Search:
    """`plan_fn`: plan.plan (cfg, mesh_shape, micro-batch, mfu) -> its dict."""

    def __init__(self, cfg, mesh_shape, budget_gib: float, mfu: float, max_micro: int, plan_fn, log=print):
        self.cfg, self.mesh_shape, self.budget, self.mfu, self.max_micro = cfg, mesh_shape, budget_gib, mfu, max_micro
        self.plan_fn, self.log, self.compiles, self.tried = plan_fn, log, 0, []

    def compile(self, mode, remat: str, mb: int) -> dict:
        name, rank, base, gives = mode
        r = self.plan_fn(_variant(self.cfg, rank, base, remat), self.mesh_shape, mb, self.mfu)
        self.compiles += 1
        step_s = r["step_s_H100"] * REMAT_FLOPS[remat]
        give = [g for g in (gives, REMAT_COST[remat], f"{r['accumulation_steps']} accumulation steps"
                            if r["accumulation_steps"] > 1 else "") if g]
        row = {"mode": name, "lora_rank": rank, "base_quant": base or None, "remat_policy": remat,
               "micro_batch_per_device": mb, "accumulation_steps": r["accumulation_steps"],
               "peak_gib_per_device": r["peak_gib_per_device"], "fits": r["peak_gib_per_device"] <= self.budget,
               "step_s_H100": step_s, "gives_up": "; ".join(give) or "nothing", "compile_s": r["compile_s"]}
        self.tried.append(row)
        self.log(f"  {name:<20} remat {remat:<8} micro-batch {mb:<3} peak {row['peak_gib_per_device']:7.2f} GiB "
                 f"{'fits' if row['fits'] else 'over'} (compiled in {r['compile_s']:.0f} s)")
        return row

    def run(self, top: int, max_compiles: int) -> list[dict]:
        found = []
        for mode in modes(self.cfg):
            for remat in REMATS:
                best, mb = None, 1
                while mb <= self.max_micro and self.compiles < max_compiles:
                    row = self.compile(mode, remat, mb)
                    if not row["fits"]:
                        break
                    best, mb = row, mb * 2
                if best:
                    found.append(best)
                    break       # this mode fits with the least remat that fits: no need for more
                if self.compiles >= max_compiles:
                    return found
            if len(found) >= top:
                break
        return found


def main(cfg, mesh_shape, args, plan_fn) -> int:
    n = 1
    for v in mesh_shape.values():
        n *= v
    quiet = args.json
    log = (lambda *a: None) if quiet else print
    log(f"--fit {args.fit:g} GiB per device on mesh {mesh_shape} ({n} devices); CPU-only f32 copies of bf16 "
        "weights not counted (XLA's loop-invariant hoisting off, as on GPU/TPU); attention: the portable XLA "
        "implementation")
    s = Search(cfg, mesh_shape, args.fit, args.mfu, args.max_micro, plan_fn, log)
    found = s.run(args.top, args.max_compiles)
    result = {"budget_gib": args.fit, "mesh": mesh_shape, "devices": n, "mfu_assumed": args.mfu,
              "compiles": s.compiles, "best": found, "tried": s.tried}
    if not quiet:
        print(f"\n{'best settings':<22}{'remat':<9}{'micro':>6}{'accum':>6}{'peak GiB':>10}{'H100 step s':>13}  gives up")
        for r in found:
            print(f"{r['mode']:<22}{r['remat_policy']:<9}{r['micro_batch_per_device']:>6}{r['accumulation_steps']:>6}"
                  f"{r['peak_gib_per_device']:>10.2f}{r['step_s_H100']:>13.2f}  {r['gives_up']}")
        if not found:
            print(f"nothing tried fits {args.fit:g} GiB per device ({s.compiles} compiles): more devices (--mesh)")
    print(json.dumps(result))
    return 0 if found else 1
