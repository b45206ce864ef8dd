"""What `moeconv demo` shows a person: a table in the terminal, and OUT/report.html."""
from __future__ import annotations

import html

from rich.console import Console
from rich.table import Table

from moeconv.report_format import fmt_bytes
from moeconv.render import render_upcycle

_LABEL = {"dense": "dense SmolLM2", "moe": "MoE (upcycled)", "compressed": "MoE, int8 ONNX"}


def _rows(summary: dict) -> list[dict]:
    """One row per model with the figures formatted for people, relative to the dense model."""
    models = summary["models"]
    dense = models[0]
    rows = []
    for m in models:
        ratio = m["perplexity"] / dense["perplexity"]
        size = m["bytes"] / dense["bytes"]
        rows.append({"model": _LABEL.get(m["name"], m["name"]), "runs in": m["where"],
                     "perplexity": f"{m['perplexity']:.2f}" + ("" if m is dense else f" ({ratio:.2f}×)"),
                     "size": fmt_bytes(m["bytes"]) + ("" if m is dense else f" ({size:.2f}×)"),
                     "size_note": m.get("bytes_note", ""),
                     "tokens/s": f"{m['tokens_per_second']:.1f}", "text": m["text"]})
    return rows


def render_demo(console: Console, result: dict) -> None:
    render_upcycle(console, result["report"])
    if "chain" in result:
        from moeconv.cli.commands.export_onnx import render_export
        console.print()
        render_export(console, result["chain"])
    rows = _rows(result)
    held = result["held_out"]
    t = Table(title=f"the three models (perplexity on {held['sequences']}×{held['tokens_per_sequence']} held-out "
                    "tokens of Python's docs; lower is better)")
    for col in ("model", "runs in", "perplexity", "size", "tokens/s"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["model"], r["runs in"], r["perplexity"], r["size"], r["tokens/s"])
    console.print()
    console.print(t)
    console.print(f"prompt: {result['prompt']!r}")
    for r in rows:
        console.print(f"  {r['model']}: {r['text']!r}", markup=False, highlight=False)
    console.print("[green]the MoE generates exactly the dense model's text[/green] (copy-initialised experts "
                  "compute the dense function; checked)")
    console.print(f"outputs: {result['out']} (Mixtral, loads in stock transformers)"
                  + (f", {result['chain_out']} (int8 ONNX with a KV cache for onnxruntime; made by "
                     f"`{result['chain_command']}`)" if "chain_out" in result else ""))
    console.print(f"side by side in report.html: {result['out'].rsplit('/', 1)[0]}/report.html "
                  f"({result['seconds']:.0f} s in all)")


def write_demo_html(summary: dict) -> str:
    """A self-contained page: the models side by side, the prompt, each model's text, and links to
    the per-output reports (relative links: they work wherever OUT is moved)."""
    e = html.escape
    rows = _rows(summary)
    held = summary["held_out"]
    table = "".join(
        f"<tr><td>{e(r['model'])}</td><td>{e(r['runs in'])}</td><td>{e(r['perplexity'])}</td>"
        f"<td>{e(r['size'])}<br><small>{e(r['size_note'])}</small></td><td>{e(r['tokens/s'])}</td></tr>"
        for r in rows)
    texts = "".join(f"<tr><td>{e(r['model'])}</td><td class='text'>{e(r['text'])}</td></tr>" for r in rows)
    command = (f"<p>The int8 ONNX model is <code>{e(summary['chain_command'])}</code>.</p>"
               if summary.get("chain_command") else "")
    links = " · ".join(f"<a href='{e(href)}'>{e(name)}: what each step did and measured</a>"
                       for name, href in summary.get("outputs", {}).items())
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>moeconv demo</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1000px}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #bbb;padding:4px 8px;text-align:left;vertical-align:top}}td.text{{white-space:pre-wrap;font-family:monospace}}</style>
</head><body><h1>moeconv demo: SmolLM2-135M-Instruct → Mixture-of-Experts → int8 ONNX</h1>
{command}
<p>Perplexity on {held['sequences']}×{held['tokens_per_sequence']} held-out tokens ({e(held['text'])}); lower is better.
Sizes and perplexities in brackets are relative to the dense model. Speed: greedy generation of
{summary['new_tokens']} tokens, {e(summary.get('threads_note', 'on this machine'))}.</p>
<table><tr><th>model</th><th>runs in</th><th>perplexity</th><th>size</th><th>tokens/s</th></tr>{table}</table>
<h2>Generated text</h2><p>prompt: <code>{e(summary['prompt'])}</code></p>
<table><tr><th>model</th><th>greedy continuation</th></tr>{texts}</table>
<p>{links}</p>
<p>Total time {summary['seconds']:.0f} s.</p>
</body></html>
"""
