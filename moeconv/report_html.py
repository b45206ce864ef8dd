"""`report.html`: one self-contained page (plots embedded as PNG; nothing fetched at view time)."""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _plots(report: dict) -> list[tuple[str, str]]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plots = []
    model = report.get("model", {})
    load = model.get("expert_load") or {}
    if load:
        layers = list(load)
        n = max(len(v) for v in load.values())
        fig, ax = plt.subplots(figsize=(8, 0.35 * len(layers) + 1.5))
        im = ax.imshow([[c for c in load[k]] + [0] * (n - len(load[k])) for k in layers], aspect="auto", cmap="viridis")
        ax.set_yticks(range(len(layers)), [k.split(".")[-2] if "." in k else k for k in layers])
        ax.set_xticks(range(n))
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        fig.colorbar(im, ax=ax, label="tokens routed")
        ax.set_title("expert load per layer (routing histogram)")
        plots.append(("Expert load", _png(fig)))
    sparsity = model.get("expert_sparsity") or {}
    if sparsity:
        fig, ax = plt.subplots(figsize=(8, 3))
        for k, v in sparsity.items():
            ax.plot(range(len(v)), v, marker="o", label=k)
        ax.set_xticks(range(max(len(v) for v in sparsity.values())))
        ax.set_xlabel("expert")
        ax.set_ylabel("fraction of zero weights")
        ax.set_ylim(0, 1)
        ax.set_title("per-expert sparsity")
        if len(sparsity) <= 8:
            ax.legend(fontsize=6)
        plots.append(("Expert sparsity", _png(fig)))
    groups = model.get("bytes_per_group") or {}
    if groups:
        before = report.get("input_model", {}).get("bytes_per_group") or {}
        names = sorted(set(groups) | set(before))
        fig, ax = plt.subplots(figsize=(8, 3))
        xs = range(len(names))
        if before:
            ax.bar([x - 0.2 for x in xs], [before.get(n, 0) / 2**20 for n in names], width=0.4, label="input")
        ax.bar([x + (0.2 if before else 0) for x in xs], [groups.get(n, 0) / 2**20 for n in names],
               width=0.4 if before else 0.6, label="output")
        ax.set_xticks(list(xs), names, rotation=20)
        ax.set_ylabel("MiB")
        ax.set_title("bytes per module group")
        ax.legend()
        plots.append(("Bytes per module group", _png(fig)))
    passes = report.get("passes") or []
    if passes:
        fig, ax = plt.subplots(figsize=(8, 3))
        names = [p["pass_name"] for p in passes]
        vals = [p["metrics"].get("rel_max_diff") or 0.0 for p in passes]
        ax.bar(range(len(names)), [max(v, 1e-12) for v in vals])
        ax.set_yscale("log")
        ax.set_xticks(range(len(names)), names)
        ax.set_ylabel("relative max |Δoutput|")
        ax.set_title("measured error of each pass (vs the step before)")
        plots.append(("Error per pass", _png(fig)))
    return plots


def _mib(n: int) -> str:
    return f"{n / 2**20:.3g} MiB" if n >= 2**20 else f"{n / 2**10:.3g} KiB"


def _bytes_after(m: dict) -> str:
    """The model's bytes after the pass; for an export, the file it wrote."""
    if m.get("files") and m.get("bytes") is not None:
        return f"{_mib(m['bytes'])} ({', '.join(m['files'])})"
    return _mib(m["model_bytes"]) if m.get("model_bytes") is not None else "-"


def write_html(report: dict, path: Path) -> None:
    rows = []
    for p in report.get("passes", []):
        m = p.get("metrics", {})
        rows.append(f"<tr><td>{html.escape(p['pass_name'])}</td><td>{html.escape(p.get('summary', ''))}</td>"
                    f"<td>{p.get('seconds') if p.get('seconds') is not None else '-'}</td>"
                    f"<td>{m.get('rel_max_diff', '-') if m.get('rel_max_diff') is None else format(m['rel_max_diff'], '.3g')}</td>"
                    f"<td>{html.escape(_bytes_after(m))}</td>"
                    f"<td>{html.escape(', '.join(p.get('warnings', [])))}</td></tr>")
    v = report.get("verification", {})
    w = report.get("written", {})
    figs = "".join(f"<figure><figcaption>{html.escape(t)}</figcaption><img alt='{html.escape(t)}' src='{src}'></figure>"
                   for t, src in _plots(report))
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>moeconv report</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1000px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #bbb;padding:4px 8px;text-align:left}}figure{{margin:1.5em 0}}img{{max-width:100%}}</style>
</head><body><h1>moeconv report</h1>
<p><b>source</b> {html.escape(str(report.get('source')))} → <b>output</b> {html.escape(str(report.get('output')))}
({html.escape(str(w.get('format')))}, loads with {html.escape(str(w.get('consumer')))})</p>
<p><b>reload check</b>: relative max |Δ| {v.get('rel_max_diff', float('nan')):.3g} against the {html.escape(str(v.get('against')))}</p>
<table><tr><th>pass</th><th>summary</th><th>time (s)</th><th>rel. max |Δ|</th><th>bytes after</th><th>warnings</th></tr>{''.join(rows)}</table>
{figs}
<details><summary>report.json</summary><pre>{html.escape(json.dumps(report, indent=2, default=str))}</pre></details>
</body></html>"""
    Path(path).write_text(page, encoding="utf-8")
