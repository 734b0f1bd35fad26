"""`python -m infllava_jax.plan --config ... --mesh fsdp=N --fit GIB[,GIB...]`: a setting of the run
that fits GIB per device, found by compiling candidates ahead of time (plan.plan, from shapes).
Several budgets share their compiles (one table and JSON line each).

Searched axes (each can be narrowed: --modes, --remat, --attention):
- the training mode: full fine-tuning of the config's stage, LoRA with the config's rank or 64,
  LoRA on an int8 or int4 base (QLoRA);
- the remat policy: none, minimal, full (layers.py);
- the attention implementation (attention.py): "xla" (the whole score matrix per layer) or
  "chunked" (blocks of 512 queries, each recomputed in the backward pass: the score matrix never
  exists whole). The fused kernels (cuDNN, splash: "auto" on a GPU/TPU) compile only on their
  devices; like "chunked" they never hold the whole score matrix;
- the micro-batch per device (1, 2, 4, ...).

Cheapest first, stopping early: a mode whose train state alone (parameters, frozen base,
optimizer moments, from shapes and shardings: no compile) exceeds the budget is skipped; else its
leanest setting (the last remat and attention listed, micro-batch 1) is compiled first, and if
that does not fit neither does anything else of the mode (memory only grows towards the front of
each list). Otherwise remat from the fastest; per remat the leanest attention first, then the
faster ones while they fit; the micro-batch doubled while it fits; the first remat that fits ends
the mode. The search stops at --top fitting settings or --max-compiles.
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
ATTENTIONS = ("xla", "chunked")                               # from the fastest to the leanest
ATTENTION_COST = {"xla": "", "chunked": "attention in query blocks recomputed in the backward pass"}
MODES = ("full", "lora", "qlora-int8", "qlora-int4")
DEFAULT_RANK = 64


def modes(cfg, keep=MODES) -> list[tuple[str, int, str, str]]:
    """(name, lora rank, base quant, what it gives up), from the one that gives up least; only the
    kinds in `keep` (MODES names)."""
    rank = int(cfg.lora.rank) or DEFAULT_RANK
    out = [] if int(cfg.lora.rank) or "full" not in keep else [("full", 0, "", "")]
    return out + [m for kind, m in (
        ("lora", (f"LoRA r={rank}", rank, "", "adapters only (frozen base)")),
        ("qlora-int8", (f"QLoRA int8 r={rank}", rank, "int8", "adapters on an int8 base")),
        ("qlora-int4", (f"QLoRA int4 r={rank}", rank, "int4", "adapters on an int4 base (tile 128)"))) if kind in keep]


def _variant(cfg, rank: int, base: str, remat: str, attention: str):
    c = cfg.copy_and_resolve_references()
    c.lora.rank, c.lora.quant, c.runtime.remat_policy = rank, base, remat
    c.runtime.attention_impl = attention
    return c


class Search:
    """`plan_fn`: plan.plan (cfg, mesh_shape, micro-batch, mfu) -> its dict; `state_fn`:
    plan.state_gib (cfg, mesh_shape) -> GiB per device of the train state."""

    def __init__(self, cfg, mesh_shape, budget_gib: float, mfu: float, max_micro: int, plan_fn, state_fn,
                 remats=REMATS, attentions=ATTENTIONS, log=print, plans=None):
        self.cfg, self.mesh_shape, self.budget, self.mfu, self.max_micro = cfg, mesh_shape, budget_gib, mfu, max_micro
        self.plan_fn, self.state_fn, self.remats, self.attentions = plan_fn, state_fn, remats, attentions
        self.log, self.compiles, self.tried, self.skipped, self.cache = log, 0, [], [], {}
        self.plans = {} if plans is None else plans     # shared by searches of several budgets: compiled once

    def compile(self, mode, remat: str, attention: str, mb: int) -> dict:
        key = (mode[0], remat, attention, mb)
        if key not in self.cache:
            self.cache[key] = self._compile(mode, remat, attention, mb)
        return self.cache[key]

    def _compile(self, mode, remat: str, attention: str, mb: int) -> dict:
        name, rank, base, gives = mode
        key = (name, remat, attention, mb)
        if key not in self.plans:
            self.plans[key] = self.plan_fn(_variant(self.cfg, rank, base, remat, attention), self.mesh_shape, mb, self.mfu)
            self.compiles += 1
        r = self.plans[key]
        step_s = r["step_s_H100"] * REMAT_FLOPS[remat]
        give = [g for g in (gives, REMAT_COST[remat], ATTENTION_COST[attention],
                            f"{r['accumulation_steps']} accumulation steps" if r["accumulation_steps"] > 1 else "") if g]
        row = {"mode": name, "lora_rank": rank, "base_quant": base or None, "remat_policy": remat,
               "attention_impl": attention, "micro_batch_per_device": mb, "accumulation_steps": r["accumulation_steps"],
               "peak_gib_per_device": r["peak_gib_per_device"], "fits": r["peak_gib_per_device"] <= self.budget,
               "step_s_H100": step_s, "gives_up": "; ".join(give) or "nothing", "compile_s": r["compile_s"]}
        self.tried.append(row)
        self.log(f"  {name:<20} remat {remat:<8} attention {attention:<8} micro-batch {mb:<3} peak "
                 f"{row['peak_gib_per_device']:7.2f} GiB {'fits' if row['fits'] else 'over'} "
                 f"(compiled in {r['compile_s']:.0f} s)")
        return row

    def _out_of_reach(self, mode) -> bool:
        """True when the mode cannot fit: its train state alone is over the budget (no compile),
        or its leanest setting compiles over it."""
        name, rank, base, _ = mode
        key = (name, "state")
        if key not in self.plans:
            self.plans[key] = self.state_fn(_variant(self.cfg, rank, base, self.remats[-1], self.attentions[-1]), self.mesh_shape)
        state = self.plans[key]
        if state > self.budget:
            self.skipped.append({"mode": name, "state_gib_per_device": state})
            self.log(f"  {name:<20} train state alone {state:.2f} GiB per device: over, skipped (no compile)")
            return True
        return not self.compile(mode, self.remats[-1], self.attentions[-1], 1)["fits"]

    def _best_of(self, mode, remat: str, max_compiles: int) -> dict | None:
        """The fastest attention that fits with `remat` (leanest first), its micro-batch doubled
        while it fits."""
        best = None
        for attention in reversed(self.attentions):
            if self.compiles >= max_compiles and (mode[0], remat, attention, 1) not in self.cache:
                break
            row = self.compile(mode, remat, attention, 1)
            if not row["fits"]:
                break
            best = row
        mb = 2
        while best and mb <= self.max_micro and self.compiles < max_compiles:
            row = self.compile(mode, remat, best["attention_impl"], mb)
            if not row["fits"]:
                break
            best, mb = row, mb * 2
        return best

    def run(self, modes_list, top: int, max_compiles: int) -> list[dict]:
        found = []
        for mode in modes_list:
            if self.compiles >= max_compiles or self._out_of_reach(mode):
                continue
            for remat in self.remats:
                best = self._best_of(mode, remat, max_compiles)
                if best:
                    found.append(best)
                    break       # this mode fits with the least remat that fits: no need for more
            if len(found) >= top:
                break
        return found


def main(cfg, mesh_shape, args, plan_fn, state_fn) -> int:
    """One search per budget of `args.fit` (GiB per device), sharing the compiled plans; a table and
    a JSON line per budget. Exit 0 when every budget found a setting."""
    plans, status = {}, 0
    for budget in args.fit:
        status = max(status, _main_one(cfg, mesh_shape, args, budget, plan_fn, state_fn, plans))
    return status


def _main_one(cfg, mesh_shape, args, budget: float, plan_fn, state_fn, plans) -> int:
    n = 1
    for v in mesh_shape.values():
        n *= v
    log = (lambda *a: None) if args.json else print
    log(f"--fit {budget:g} GiB per device on mesh {mesh_shape} ({n} devices); CPU-only f32 copies of bf16 "
        "weights not counted (XLA's loop-invariant hoisting off, as on GPU/TPU)")
    s = Search(cfg, mesh_shape, budget, args.mfu, args.max_micro, plan_fn, state_fn,
               tuple(args.remat), tuple(args.attention), log, plans)
    found = s.run(modes(cfg, tuple(args.modes)), args.top, args.max_compiles)
    result = {"budget_gib": budget, "mesh": mesh_shape, "devices": n, "mfu_assumed": args.mfu,
              "compiles": s.compiles, "best": found, "tried": s.tried, "skipped": s.skipped}
    if not args.json:
        print(f"\n{'best settings':<22}{'remat':<9}{'attention':<10}{'micro':>6}{'accum':>6}{'peak GiB':>10}"
              f"{'H100 step s':>13}  gives up")
        for r in found:
            print(f"{r['mode']:<22}{r['remat_policy']:<9}{r['attention_impl']:<10}{r['micro_batch_per_device']:>6}"
                  f"{r['accumulation_steps']:>6}{r['peak_gib_per_device']:>10.2f}{r['step_s_H100']:>13.2f}  {r['gives_up']}")
        if not found:
            print(f"nothing tried fits {budget:g} GiB per device ({s.compiles} compiles): more devices (--mesh)")
    print(json.dumps(result))
    return 0 if found else 1


def budgets(text: str) -> list[float]:
    """argparse type: GiB per device, one or a comma-separated list (e.g. 24,40,80)."""
    try:
        out = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        out = []
    if not out or min(out) <= 0:
        import argparse
        raise argparse.ArgumentTypeError(f"{text!r}: expected GiB per device, e.g. 24 or 24,40,80")
    return out


def choices(allowed: tuple[str, ...]):
    """argparse type: a comma-separated list of `allowed` names, kept in `allowed`'s order."""
    def parse(text: str) -> list[str]:
        names = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in names if t not in allowed]
        if bad or not names:
            import argparse
            raise argparse.ArgumentTypeError(f"{text!r}: expected a comma-separated list of {', '.join(allowed)}")
        return [a for a in allowed if a in names]
    return parse
