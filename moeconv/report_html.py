"""`report.html`: one self-contained page (plots embedded as PNG; nothing fetched at view time).

What a reader needs first: what went in and came out, the pass table (each pass's measured error
— relative max |Δ|, KL, top-1 agreement, perplexity when text was given — time and size), the
text each model generated when the run generated any, then the plots (`moeconv.report_plots`).
Every number is formatted for people (`moeconv.report_format`); report.json keeps the raw ones."""
from __future__ import annotations

import html
import json
from pathlib import Path

from moeconv.report_format import MISSING, fmt_bytes, fmt_change, fmt_count, fmt_float, fmt_pct, fmt_seconds
from moeconv.report_plots import plots

PASS_COLUMNS = ("pass", "summary", "time", "rel. max |Δ|", "KL", "top-1", "perplexity", "bytes after", "warnings")

_STYLE = """body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #bbb;padding:4px 8px;text-align:left;vertical-align:top}th{background:#eee}
td.num{text-align:right;white-space:nowrap}figure{margin:1.5em 0}img{max-width:100%}
pre.text{white-space:pre-wrap;margin:0;font-size:90%}.note{color:#555;font-size:90%}"""


def write_html(report: dict, path: Path) -> None:
    e = html.escape
    w = report.get("written", {})
    figs = "".join(f"<figure><figcaption>{e(t)}</figcaption><img alt='{e(t)}' src='{src}'></figure>"
                   for t, src in plots(report))
    consumer = w.get("consumer") or report.get("consumer")
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>moeconv report</title>
<style>{_STYLE}</style></head><body><h1>moeconv report</h1>
<p><b>source</b> {e(str(report.get('source')))} → <b>output</b> {e(str(report.get('output')))}
({e(str(w.get('format') or report.get('format')))}{', loads with ' + e(str(consumer)) if consumer else ''};
{e(fmt_seconds(report.get('seconds')))} in all)</p>
{_models_line(report)}{_reload_line(report.get('verification') or {})}
<h2>Passes</h2>
{_pass_table(report.get('passes') or [])}
<p class="note">Each pass's error is measured against the model before it: relative max |Δ| is max |Δlogits| over
max(1, max |logit|); KL is the mean KL divergence of the next-token distributions (before ‖ after);
top-1 is how often the most likely next token is unchanged; perplexity is on held-out text when text was given.</p>
{_generations(report.get('generations'))}
{figs}
<details><summary>report.json</summary><pre>{e(json.dumps(report, indent=2, default=str))}</pre></details>
</body></html>"""
    Path(path).write_text(page, encoding="utf-8")


def pass_cells(p: dict) -> list[str]:
    """One pass as the table's cells (text, already formatted), in `PASS_COLUMNS` order."""
    m = p.get("metrics") or {}
    return [str(p.get("pass_name") or p.get("name", "?")), p.get("summary", ""), fmt_seconds(p.get("seconds")),
            fmt_float(m.get("rel_max_diff")), fmt_float(m.get("kl")), fmt_pct(m.get("top1_agreement")), _perplexity(m), _bytes_after(m),
            "; ".join(p.get("warnings", []))]


def _pass_table(passes: list[dict]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in PASS_COLUMNS)
    return f'<table class="passes"><tr>{head}</tr>{"".join(_pass_row(p) for p in passes)}</table>'


def _pass_row(p: dict) -> str:
    cells = pass_cells(p)
    numeric = {2, 3, 4, 5, 6, 7}
    return "<tr>" + "".join(f"<td class='num'>{html.escape(c)}</td>" if i in numeric else f"<td>{html.escape(c)}</td>"
                            for i, c in enumerate(cells)) + "</tr>"


def _perplexity(m: dict) -> str:
    """Held-out perplexity before → after: a pass's own (`ppl_*`), or distill's (`eval_ppl_*`)."""
    for before, after in (("ppl_before", "ppl_after"), ("eval_ppl_before", "eval_ppl_after")):
        if m.get(before) is not None and m.get(after) is not None:
            return fmt_change(m[before], m[after])
    return MISSING


def _bytes_after(m: dict) -> str:
    """The model's bytes after the pass; for an export, the file(s) it wrote."""
    if m.get("files") and m.get("bytes") is not None:
        return f"{fmt_bytes(m['bytes'])} ({', '.join(m['files'])})"
    return fmt_bytes(m.get("model_bytes"))


def _models_line(report: dict) -> str:
    """Parameters (and active per token) in → out."""
    before, after = report.get("input_model") or {}, report.get("model") or {}
    if not after.get("parameters"):
        return ""

    def params(s: dict) -> str:
        active = s.get("active_parameters")
        extra = f" ({fmt_count(active)} active per token)" if active and active != s.get("parameters") else ""
        return fmt_count(s.get("parameters")) + extra
    into = f"{params(before)} → " if before.get("parameters") else ""
    return f"<p><b>parameters</b> {html.escape(into + params(after))}</p>\n"


def _reload_line(v: dict) -> str:
    """The written output reloaded by its consumer and compared."""
    if not v:
        return ""
    rel = v.get("rel_max_diff", v.get("relative_max_abs_diff"))
    parts = [f"relative max |Δ| {fmt_float(rel)}" if rel is not None else v.get("detail", v.get("status", ""))]
    if v.get("kl") is not None:
        parts.append(f"KL {fmt_float(v['kl'])}")
    if v.get("top1_agreement") is not None:
        parts.append(f"top-1 {fmt_pct(v['top1_agreement'])}")
    if v.get("ppl_before") is not None:
        parts.append(f"perplexity {fmt_change(v['ppl_before'], v.get('ppl_after'))}")
    against = f" against the {v['against']}" if v.get("against") else ""
    return f"<p><b>reload check</b>: {html.escape(', '.join(p for p in parts if p) + against)}</p>\n"


def _generations(gen: dict | None) -> str:
    """`report["generations"] = {"prompt": str, "texts": {model name: text}}` as a table."""
    if not gen or not gen.get("texts"):
        return ""
    e = html.escape
    rows = "".join(f"<tr><td>{e(str(name))}</td><td><pre class='text'>{e(str(text))}</pre></td></tr>"
                   for name, text in gen["texts"].items())
    return (f"<h2>Generated text</h2><p><b>prompt</b></p><pre class='text'>{e(str(gen.get('prompt', '')))}</pre>"
            f"<table class='generations'><tr><th>model</th><th>generated text</th></tr>{rows}</table>")
