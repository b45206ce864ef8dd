"""Rendering reports for people (rich). Passes return data; only the CLI calls these."""
from __future__ import annotations

from rich.console import Console
from rich.table import Table

from moeconv.report_format import MISSING, fmt_bytes, fmt_float, fmt_pct, fmt_seconds
from moeconv.report_html import PASS_COLUMNS, pass_cells


def _n(x) -> str:
    if x is None:
        return "-"
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f}{unit}"
    return str(x)


def _bytes(x) -> str:
    """Two decimals, as the demo's model table prints sizes (`moeconv.demo_render`, whose test pins
    them); every other table uses `fmt_bytes`."""
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if x >= div:
            return f"{x / div:.2f} {unit}"
    return f"{x} B"


def summary_table(title: str) -> Table:
    """The one summary style of every command: a titled two-column table, names in bold."""
    t = Table(title=title, show_header=False)
    t.add_column("", style="bold", no_wrap=True)
    t.add_column("", overflow="fold")  # a long path wraps, never ends in "…"
    return t


def reloaded_text(report: dict, versus: str, layout: str = "") -> str:
    """What was written, and its reload against `versus` (a summary table's `check` row)."""
    w, v = report["written"], report["verification"]
    if w.get("route") == "streaming":
        return (f"written {w.get('tensors', '?')} tensors ({w['format']}{layout}) one layer at a time, re-read and "
                f"checksummed; run beside the {v['against']} one layer of each at a time on {v['inputs']}: "
                f"max |Δlogits| {fmt_float(v['max_abs_diff'])}, top-1 agreement {fmt_pct(v['top1_agreement'])}")
    return (f"written {w.get('tensors', '?')} tensors ({w['format']}{layout}), reloaded as "
            f"{v['consumer_class']}: max |Δ| {fmt_float(v['max_abs_diff'])} vs {versus}")


def render_reloaded(console: Console, report: dict, versus: str, layout: str = "") -> None:
    """The reload line, for renderers that are not a summary table."""
    console.print(reloaded_text(report, versus, layout), markup=False)


def render_warnings(console: Console, warnings) -> None:
    for warning in warnings:
        console.print("warning: " + warning, markup=False, style="yellow")


def render_inspection(console: Console, info: dict) -> None:
    console.print(f"[bold]{info['architecture']}[/bold]  model_type={info['model_type']}  source={info['source']}")
    console.print(f"parameters: {_n(info['parameters'])} total, {_n(info['active_parameters'])} active per token; "
                  f"dtypes: {', '.join(f'{k}×{v}' for k, v in info['dtypes'].items())}")
    if info["ffn_sites"]:
        t = Table(title=f"{len(info['ffn_sites'])} FFN sites (found by graph structure)")
        t.add_column("path", no_wrap=True)
        for col in ("kind", "hidden", "intermediate", "activation", "bias", "projections"):
            t.add_column(col)
        for s in info["ffn_sites"]:
            proj = ", ".join(p.rsplit(".", 1)[-1] for p in (s["gate"], s["up"], s["down"]) if p)
            t.add_row(s["path"], s["kind"], str(s["hidden_size"]), str(s["intermediate_size"]), s["activation"],
                      "yes" if s["bias"] else "no", proj)
        console.print(t)
    if info["moe_layers"]:
        t = Table(title=f"{len(info['moe_layers'])} MoE layers")
        for col in ("path", "class", "experts", "top-k", "shared expert"):
            t.add_column(col)
        for m in info["moe_layers"]:
            t.add_row(m["path"], m["class"], str(m["num_experts"]), str(m["top_k"]), "yes" if m["shared_expert"] else "no")
        console.print(t)
    render_storage(console, info)


def render_storage(console: Console, info: dict) -> None:
    """Bytes per module group (with dtypes / quantization methods), and the quantized layers
    grouped by (group, method, shape) — every layer is in `--json`."""
    if info.get("storage"):
        t = Table(title="storage by module group")
        for col in ("group", "parameters", "bytes", "stored as"):
            t.add_column(col)
        for row in info["storage"]:
            kinds = ", ".join(f"{k} {_n(v)}" for k, v in row["storage"].items())
            t.add_row(row["group"], _n(row["params"]), fmt_bytes(row["bytes"]), kinds)
        console.print(t)
    layers = info.get("quantized_layers") or []
    if layers:
        rows: dict[tuple, list] = {}
        for q in layers:
            key = (q.get("group") or "-", q["path"].rsplit(".", 1)[-1], q["method"], "×".join(map(str, q["shape"])))
            rows.setdefault(key, []).append(q)
        t = Table(title=f"{len(layers)} quantized layers (bitsandbytes; every layer in --json)")
        for col in ("group", "projection", "method", "shape (out×in)", "layers", "bytes", "e.g."):
            t.add_column(col)
        for (group, name, method, shape), qs in rows.items():
            t.add_row(group, name, method, shape, str(len(qs)), fmt_bytes(sum(q["bytes"] for q in qs)), qs[0]["path"])
        console.print(t)


def pass_contracts(registry) -> list[dict]:
    """Each registered pass as a default-configured instance has it: name, summary, contract."""
    return [{"name": cls.name, "summary": cls.summary, **cls.default_contract().to_dict()} for cls in registry]


def render_passes(console: Console, registry) -> None:
    """Two tables that fit 80 columns without cutting a word: each pass's facts (one per line) and
    promise, then what each pass does. The facts are `pass_contracts`', which `plan` checks too."""
    rows = pass_contracts(registry)
    t = Table(title="passes: facts of a default-configured instance (options change some; `moeconv plan` "
                    "shows a recipe's own)")
    for col in ("pass", "requires", "provides", "invalidates", "promise"):
        t.add_column(col, no_wrap=True)  # one fact per line: facts are never cut at narrow widths
    for row in rows:
        needs = row["requires"] + [" or\n".join(g) for g in row["requires_any"]]
        t.add_row(row["name"], "\n".join(needs) or "-", "\n".join(row["provides"]) or "-",
                  "\n".join(row["invalidates"]) or "-", row["promise"])
    console.print(t)
    d = Table(title="what each pass does")
    d.add_column("pass", no_wrap=True)
    d.add_column("what it does")
    for row in rows:
        d.add_row(row["name"], row["summary"])
    console.print(d)


def render_upcycle(console: Console, report: dict) -> None:
    t = Table(title="upcycle", show_header=False)
    t.add_column("", style="bold")
    t.add_column("")
    up = report["upcycle"]
    metrics = up.get("metrics", up)
    t.add_row("output", f"{report['output']}  ({report['format']}, loads with {report['consumer']})")
    t.add_row("route", report["route"])
    t.add_row("layers converted", f"{metrics.get('sites_converted')} of {metrics.get('sites_found')}")
    if report.get("shared_expert"):
        t.add_row("shared expert", report["shared_expert"])
    params = report.get("params", {})
    t.add_row("parameters", f"{_n(params.get('before'))} → {_n(params.get('after'))}"
              + (f" ({_n(params['active_after'])} active per token)" if params.get("active_after") else ""))
    w = report["written"]
    t.add_row("written", f"{w['tensors']} tensors, {fmt_bytes(w['bytes'])} in {w['shards']} shard(s), all re-read and checksummed")
    v = report["verification"]
    if v.get("mode") == "full":
        verdict = "exact" if v.get("exact_promised") else "measured"
        t.add_row("check", f"{verdict}: max |Δ| {fmt_float(v['max_abs_diff'])} (relative {fmt_float(v['rel_max_diff'])}) "
                  f"vs {v['against']}, reloaded as {v['consumer_class']}")
    else:
        t.add_row("check", v.get("detail", v.get("mode")))
    if v.get("dense_vs_moe_rel_max_diff") is not None:
        t.add_row("dense vs MoE", f"relative max |Δlogits| {fmt_float(v['dense_vs_moe_rel_max_diff'])} (in memory, before writing)")
    dropped = report.get("source_tensors", {}).get("dropped") or []
    if dropped:
        t.add_row("dropped", "; ".join(dropped))
    t.add_row("time", fmt_seconds(report["seconds"]))
    console.print(t)
    for wmsg in report.get("warnings", []):
        console.print(f"[yellow]warning:[/yellow] {wmsg}")


def _alternatives(fact: str) -> str:
    return fact.replace(" | ", " or ")


def render_plan(console: Console, plan) -> None:
    """The step × facts table (missing facts in red) and, when nothing is missing, "plan ok"."""
    t = Table(title="plan")
    for col in ("step", "pass", "needs (missing in red)", "facts after"):
        t.add_column(col)
    for i, step in enumerate(plan.steps, 1):
        # a group of alternatives ("a | b" in the pipeline) reads as `moeconv passes` writes it
        needs = ", ".join(f"[red]{_alternatives(f)}[/red]" if f in step.missing else _alternatives(f)
                          for f in sorted(step.requires)) or "-"
        t.add_row(str(i), step.name, needs, ", ".join(sorted(step.facts_after)))
    console.print(t)
    if plan.ok:  # problems are the caller's error line (`PlanError`): each printed once
        console.print("[green]plan ok[/green]")


def render_run(console: Console, report: dict) -> None:
    """The pass table with report.html's cells (`pass_cells`), so the terminal and the page read
    the same; perplexity only when some pass measured one, bytes and warnings left to the page."""
    rows = [pass_cells(p) for p in report["passes"]]
    shown = 7 if any(r[6] != MISSING for r in rows) else 6
    t = Table(title=f"run → {report['output']}")
    for i, col in enumerate(PASS_COLUMNS[:shown]):
        t.add_column(col, justify="right" if i >= 2 else "left")
    for r in rows:
        t.add_row(*r[:shown])
    console.print(t)
    if report.get("shared_expert"):  # chosen by the job for the output family, not by the recipe
        console.print(f"shared expert: {report['shared_expert']}", markup=False)
    w, v = report["written"], report["verification"]
    if w.get("route") == "streaming":
        console.print(f"streamed: every decoder layer read once, changed by each pass in turn and written; "
                      f"written as {w['format']} (loads with {w['consumer']}), re-read and checksummed; run beside "
                      f"the {v['against']} one layer of each at a time on {v['inputs']}: relative max |Δlogits| "
                      f"{fmt_float(v['rel_max_diff'])}, top-1 agreement {fmt_pct(v['top1_agreement'])}; "
                      f"report.json in {report['output']}")
        return
    console.print(f"written as {w['format']} (loads with {w['consumer']}); reload check: relative max |Δ| "
                  f"{fmt_float(v['rel_max_diff'])} vs the in-memory result; report.json in {report['output']}")
