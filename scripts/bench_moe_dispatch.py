#!/usr/bin/env python3
"""CPU benchmark of `MoEBlock`'s sparse top-k dispatch.

For every (dtype, tokens) it times, under `torch.inference_mode`, interleaved round-robin
(warmup runs first, then the median of the timed runs, `time.perf_counter`):

- ``moe``   : `MoEBlock` forward, 8 gated SwiGLU experts (distinct random weights), top-2, renormalised.
- ``dense`` : one dense SwiGLU FFN of the expert's size on all tokens (reference point).
- ``floor`` : only the expert matmuls (gate/up/down + silu*mul) on per-expert contiguous inputs of
              exactly the sizes the router assigns (same routing as the `moe` run), prepared outside
              the timed region. The floor for this work: no routing, gather, weighting or scatter.
- ``hf``    : transformers' `MixtralSparseMoeBlock` with the same weights, experts implementation
              "eager" (the standalone default; set explicitly to avoid the `None` warning).

Targets per row: ``moe / floor <= 1.15`` and ``moe <= hf``.

Run from the repo root: ``python scripts/bench_moe_dispatch.py [--quick] [--out PATH]``.
"""
from __future__ import annotations

import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from moeconv.nn.moe import MoEBlock, RoutingConfig  # noqa: E402

HIDDEN = 1024
INTERMEDIATE = 2816
NUM_EXPERTS = 8
TOP_K = 2
FLOOR_TARGET = 1.15
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class SwiGLU(nn.Module):
    """Gated FFN expert: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def make_experts(gen: torch.Generator) -> list[SwiGLU]:
    experts = []
    for _ in range(NUM_EXPERTS):
        e = SwiGLU(HIDDEN, INTERMEDIATE)
        with torch.no_grad():
            for lin in (e.gate_proj, e.up_proj, e.down_proj):
                lin.weight.normal_(0.0, 0.02, generator=gen)
        experts.append(e)
    return experts


def make_moe(experts: list[SwiGLU], router_w: torch.Tensor) -> MoEBlock:
    block = MoEBlock(experts, HIDDEN, RoutingConfig(top_k=TOP_K, renormalize=True))
    with torch.no_grad():
        block.router.weight.copy_(router_w)
    return block.eval()


def make_hf(moe: MoEBlock):
    """`MixtralSparseMoeBlock` holding the fp32 weights of `moe`; returns (block, experts_impl note)."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_local_experts=NUM_EXPERTS,
        num_experts_per_tok=TOP_K,
    )
    default_impl = cfg._experts_implementation  # None for a bare config (no PreTrainedModel dispatch)
    # `use_experts_implementation` dispatches on config._experts_implementation; anything not registered
    # in ALL_EXPERTS_FUNCTIONS ("eager", or None with a warning) runs the class's own loop forward.
    cfg._experts_implementation = "eager"
    hf = MixtralSparseMoeBlock(cfg)
    with torch.no_grad():
        hf.gate.weight.copy_(moe.router.weight)
        for e, ex in enumerate(moe.experts):
            hf.experts.gate_up_proj[e].copy_(torch.cat([ex.gate_proj.weight, ex.up_proj.weight], dim=0))
            hf.experts.down_proj[e].copy_(ex.down_proj.weight)
    note = (f"config._experts_implementation: bare-config default={default_impl!r} (falls back to the class's "
            f"eager loop with a warning) -> set to 'eager' explicitly (PreTrainedModel would resolve None to "
            f"'grouped_mm' where it can dispatch)")
    return hf.eval(), note


def _cpu_snapshot():
    """(total jiffies, busy jiffies of the machine, jiffies used by this process) or None off Linux."""
    try:
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:9]]
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        own = int(fields[11]) + int(fields[12])  # utime + stime
    except (OSError, ValueError, IndexError):
        return None
    total = sum(vals)
    return total, total - vals[3] - vals[4], own  # idle + iowait are not busy


def others_cpu_share(before, after):
    """Fraction of the machine's CPU time used by *other* processes between two snapshots."""
    if before is None or after is None or after[0] <= before[0]:
        return None
    return max(0.0, ((after[1] - before[1]) - (after[2] - before[2])) / (after[0] - before[0]))


def wait_quiet(max_wait_s: float, idle_min: float = 0.9, window_s: float = 2.0) -> float | None:
    """Block until the machine was >= idle_min idle over a window (at most max_wait_s). Returns idle share."""
    deadline = time.monotonic() + max_wait_s
    idle = None
    while True:
        a = _cpu_snapshot()
        time.sleep(window_s)
        b = _cpu_snapshot()
        if a is None or b is None or b[0] <= a[0]:
            return None
        idle = 1.0 - (b[1] - a[1]) / (b[0] - a[0])
        if idle >= idle_min or time.monotonic() >= deadline:
            return idle


def bench_round_robin(fns: dict, warmup: int, repeats: int, max_others: float | None = None,
                      max_rounds: int | None = None, quiet_wait_s: float = 0.0):
    """Warm every fn up, then time them interleaved (one round = each fn once) so drift hits all alike.

    A round during which other processes used more than `max_others` of the machine's CPU is kept
    but marked contended; rounds continue until `repeats` clean ones (or `max_rounds` in all).
    Returns a list of rounds: {"s": {name: seconds}, "others": share or None, "clean": bool}.
    """
    max_rounds = max(max_rounds or repeats, repeats)
    rounds = []
    clean = 0
    with torch.inference_mode():
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        while clean < repeats and len(rounds) < max_rounds:
            a = _cpu_snapshot()
            t = {}
            for k, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                t[k] = time.perf_counter() - t0
            share = others_cpu_share(a, _cpu_snapshot())
            ok = max_others is None or share is None or share <= max_others
            clean += ok
            rounds.append({"s": t, "others": share, "clean": ok})
            if not ok and quiet_wait_s > 0:
                wait_quiet(quiet_wait_s)
    return rounds


def run_case(dtype_name: str, tokens: int, moe32: MoEBlock, hf32, warmup: int, repeats: int, seed: int,
             quiet_wait_s: float = 0.0, max_others: float | None = 0.10, max_rounds: int | None = None) -> dict:
    dtype = DTYPES[dtype_name]
    # `.to(dtype)` keeps MoEBlock's router fp32; casting a deepcopy keeps the fp32 originals.
    moe = copy.deepcopy(moe32).to(dtype)
    hf = copy.deepcopy(hf32).to(dtype)
    assert moe.router.weight.dtype == torch.float32

    gen = torch.Generator().manual_seed(seed + tokens)
    x = torch.randn(1, tokens, HIDDEN, generator=gen).to(dtype)
    hidden = x.reshape(-1, HIDDEN)

    with torch.inference_mode():
        # Routing of the MoE run, reused for the floor inputs.
        route = moe.route(hidden)
        counts = torch.bincount(route.indices.reshape(-1), minlength=NUM_EXPERTS).tolist()
        floor_inputs = []
        floor_weights = []
        for e, ex in enumerate(moe.experts):
            tok, _ = torch.where(route.indices == e)
            floor_inputs.append(hidden[tok].contiguous())
            floor_weights.append((ex.gate_proj.weight, ex.up_proj.weight, ex.down_proj.weight))
        assert [t.shape[0] for t in floor_inputs] == counts

        # Untimed correctness check hf vs moe.
        y_moe = moe(x)
        y_hf = hf(x)
        diff = (y_moe.float() - y_hf.float()).abs()
        max_abs = diff.max().item()
        rel = (diff.norm() / y_moe.float().norm()).item()
        # hf routes with logits in the block dtype (its gate is cast too); count routing disagreements.
        _, _, hf_idx = hf.gate(hidden)
        same_route = (hf_idx.sort(-1).values == route.indices.sort(-1).values).all(-1)
        route_mismatch = int((~same_route).sum())
        max_abs_same_route = diff.reshape(-1, HIDDEN)[same_route].max().item() if bool(same_route.any()) else 0.0

    dense_expert = moe.experts[0]

    def f_moe():
        return moe(x)

    def f_hf():
        return hf(x)

    def f_dense():
        return dense_expert(hidden)

    def f_floor():
        for inp, (wg, wu, wd) in zip(floor_inputs, floor_weights):
            F.linear(F.silu(F.linear(inp, wg)) * F.linear(inp, wu), wd)

    idle_before = wait_quiet(quiet_wait_s) if quiet_wait_s > 0 else None
    snap0 = _cpu_snapshot()
    rounds = bench_round_robin({"moe": f_moe, "floor": f_floor, "hf": f_hf, "dense": f_dense}, warmup, repeats,
                               max_others=max_others, max_rounds=max_rounds, quiet_wait_s=quiet_wait_s)
    others = others_cpu_share(snap0, _cpu_snapshot())
    clean = [r for r in rounds if r["clean"]]
    contended = len(clean) < repeats
    used = rounds if contended else clean  # not enough clean rounds: fall back to all of them, flagged
    times = {k: [r["s"][k] for r in used] for k in rounds[0]["s"]}
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    paired = {  # median over rounds of the per-round ratio: robust to slow drift / neighbours' load
        f"moe_{o}": statistics.median(m / t for m, t in zip(times["moe"], times[o])) for o in ("floor", "hf", "dense")
    }
    res = {
        "dtype": dtype_name,
        "tokens": tokens,
        "ms": med,
        "n_runs": len(used),
        "contended": contended,
        "min_ms": {k: min(v) * 1e3 for k, v in times.items()},
        "runs_ms": {k: [t * 1e3 for t in v] for k, v in times.items()},
        "all_rounds": [{"ms": {k: v * 1e3 for k, v in r["s"].items()}, "others_cpu_share": r["others"],
                        "clean": r["clean"]} for r in rounds],
        "paired_ratio_median": paired,
        "ratio_moe_floor": med["moe"] / med["floor"],
        "ratio_moe_hf": med["moe"] / med["hf"],
        "ratio_moe_dense": med["moe"] / med["dense"],
        "expert_token_counts": counts,
        "hf_vs_moe_max_abs_diff": max_abs,
        "hf_vs_moe_rel_l2_diff": rel,
        "hf_vs_moe_tokens_routed_differently": route_mismatch,
        "hf_vs_moe_max_abs_diff_same_route_tokens": max_abs_same_route,
        "machine_idle_share_before": idle_before,
        "others_cpu_share_during": others,
    }
    res["pass_floor"] = res["ratio_moe_floor"] <= FLOOR_TARGET
    res["pass_hf"] = med["moe"] <= med["hf"]
    if dtype_name == "fp32":
        res["hf_match_ok"] = max_abs < 1e-4
    return res


def print_table(rows: list[dict]) -> None:
    headers = ["dtype", "tokens", "runs", "moe ms", "floor ms", "hf ms", "dense ms", "moe/floor", "moe/hf",
               "moe/dense", f"floor<={FLOOR_TARGET}", "moe<=hf", "paired moe/floor", "paired moe/hf", "max|hf-moe|"]
    data = []
    for r in rows:
        m = r["ms"]
        data.append([
            r["dtype"], str(r["tokens"]), f"{r['n_runs']}{'!' if r['contended'] else ''}",
            f"{m['moe']:.1f}", f"{m['floor']:.1f}", f"{m['hf']:.1f}", f"{m['dense']:.1f}",
            f"{r['ratio_moe_floor']:.3f}", f"{r['ratio_moe_hf']:.3f}", f"{r['ratio_moe_dense']:.3f}",
            "PASS" if r["pass_floor"] else "FAIL", "PASS" if r["pass_hf"] else "FAIL", f"{r['paired_ratio_median']['moe_floor']:.3f}",
            f"{r['paired_ratio_median']['moe_hf']:.3f}", f"{r['hf_vs_moe_max_abs_diff']:.2e}",
        ])
    try:
        from rich.console import Console
        from rich.table import Table

        t = Table(title="MoEBlock dispatch benchmark (CPU, median ms; runs! = contended)")
        for h in headers:
            t.add_column(h, justify="right")
        for row in data:
            t.add_row(*row)
        Console(width=220).print(t)
    except ImportError:
        widths = [max(len(h), *(len(row[i]) for row in data)) for i, h in enumerate(headers)]
        print("  ".join(h.rjust(w) for h, w in zip(headers, widths)))
        for row in data:
            print("  ".join(c.rjust(w) for c, w in zip(row, widths)))


def _loadavg():
    try:
        return list(os.getloadavg())
    except (AttributeError, OSError):
        return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench_moe_dispatch.json", help="JSON output path")
    p.add_argument("--quick", action="store_true", help="smoke test: tokens 128 only, 2 timed runs")
    p.add_argument("--tokens", type=int, nargs="+", default=None, help="override token counts")
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=None, help="timed runs (default 7, --quick 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-others", type=float, default=0.10,
                   help="a timing round during which other processes used more than this share of the CPU is "
                        "contended: it is redone (up to --max-rounds) and left out of the medians (<0: keep all)")
    p.add_argument("--max-rounds", type=int, default=None, help="cap on timing rounds per case (default 4x repeats)")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECS",
                   help="before each case wait up to SECS for the CPU to be >=90%% idle (shared machines)")
    args = p.parse_args(argv)

    tokens_list = args.tokens or ([128] if args.quick else [512, 2048])
    repeats = args.repeats or (2 if args.quick else 7)

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    experts = make_experts(gen)
    router_w = torch.randn(NUM_EXPERTS, HIDDEN, generator=gen) * 0.02
    moe32 = make_moe(experts, router_w)
    hf32, impl_note = make_hf(moe32)

    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"threads {torch.get_num_threads()}, cpu capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"H={HIDDEN} I={INTERMEDIATE} E={NUM_EXPERTS} top_k={TOP_K}; warmup {args.warmup}, "
          f"median of {repeats} runs (round-robin)")
    print(f"hf experts implementation: {impl_note}")

    load_before = _loadavg()
    if load_before is not None and load_before[0] > 0.5:
        print(f"note: 1-min load average {load_before[0]:.2f} before start: other processes may compete for the "
              f"{os.cpu_count()} CPU(s); rounds they disturb are redone (--max-others), see also --wait-quiet")
    rows = []
    for dname in args.dtypes:
        for tokens in tokens_list:
            r = run_case(dname, tokens, moe32, hf32, args.warmup, repeats, args.seed, args.wait_quiet,
                         None if args.max_others < 0 else args.max_others, args.max_rounds or 4 * repeats)
            rows.append(r)
            if dname == "fp32":
                extra = " (fp32 target < 1e-4: " + ("OK" if r["hf_match_ok"] else "MISMATCH") + ")"
            else:
                extra = (f" ({r['hf_vs_moe_tokens_routed_differently']} tokens routed differently: hf's router "
                         f"runs in {dname}; {r['hf_vs_moe_max_abs_diff_same_route_tokens']:.3e} over the others)")
            print(f"[{dname} T={tokens}] hf vs moe max|diff| = {r['hf_vs_moe_max_abs_diff']:.3e}{extra}; "
                  f"expert token counts {r['expert_token_counts']}", flush=True)
            n_bad = sum(not x["clean"] for x in r["all_rounds"])
            if r["contended"]:
                print(f"  WARNING: only {len(r['all_rounds']) - n_bad} of {len(r['all_rounds'])} rounds ran without "
                      f"other processes taking >{100 * args.max_others:.0f}% of the CPU: medians use all rounds "
                      f"and are contended", flush=True)
            elif n_bad:
                print(f"  note: {n_bad} contended round(s) redone and left out of the medians", flush=True)

    print_table(rows)
    all_pass = all(r["pass_floor"] and r["pass_hf"] for r in rows)
    print("targets:", "ALL PASS" if all_pass else "SOME FAIL")

    out = {
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "num_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_count": os.cpu_count(),
        "loadavg_before": load_before,
        "loadavg_after": _loadavg(),
        "platform": platform.platform(),
        "processor": platform.processor(),
        "config": {"hidden": HIDDEN, "intermediate": INTERMEDIATE, "num_experts": NUM_EXPERTS, "top_k": TOP_K,
                   "warmup": args.warmup, "repeats": repeats, "seed": args.seed, "quick": args.quick},
        "hf_experts_implementation": "eager",
        "hf_experts_implementation_note": impl_note,
        "targets": {"moe_over_floor_max": FLOOR_TARGET, "moe_over_hf_max": 1.0},
        "contention_filter": {"max_others_cpu_share": None if args.max_others < 0 else args.max_others,
                              "max_rounds": args.max_rounds or 4 * repeats, "wait_quiet_s": args.wait_quiet},
        "results": rows,
        "all_pass": all_pass,
    }
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
