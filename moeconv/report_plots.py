"""The plots of report.html, each a (caption, PNG data URI) or None when the report lacks its data.

Before/after plots read `report["input_model"]` (the model the command was given) and
`report["model"]` (the model it wrote); `moeconv.summary` measures both."""
from __future__ import annotations

import base64
import io
import math
import re

from moeconv.report_format import fmt_bytes


def plots(report: dict) -> list[tuple[str, str]]:
    """Every plot the report has data for, in page order. Figures are made with matplotlib's
    object API, not pyplot: no GUI backend, no global figure state, and pyplot's import (0.5 s
    of every command's run) is never paid."""
    before, after = report.get("input_model") or {}, report.get("model") or {}
    made = [expert_load(before.get("expert_load") or {}, after.get("expert_load") or {}),
            layer_sparsity(before.get("layer_sparsity") or {}, after.get("layer_sparsity") or {},
                           after.get("expert_sparsity") or {}),
            bytes_per_group(before.get("bytes_per_group") or {}, after.get("bytes_per_group") or {}),
            error_per_pass(report.get("passes") or [])]
    return [p for p in made if p is not None]


# int8 rounding alone leaves ~0.2% of a layer's weights zero: below 1% the plot shows no sparsity
SPARSE_ENOUGH_TO_PLOT = 0.01


def layer_label(path: str) -> str:
    """'model.layers.12.mlp' → '12': the decoder layer's index (the path when it has none)."""
    numbers = re.findall(r"\.(\d+)(?:\.|$)", path)
    return numbers[-1] if numbers else path


def expert_load(before: dict[str, list[int]], after: dict[str, list[int]]):
    """Heatmaps of the share of routed tokens each expert gets, per MoE layer: the input model's
    and the output's side by side, on one colour scale (columns past a layer's experts are blank)."""
    if not after and not before:
        return None
    panels = [(t, load) for t, load in (("before (input model)", before), ("after (output model)", after)) if load]
    layers = list(dict.fromkeys(list(before) + list(after)))
    n = max(len(v) for _, load in panels for v in load.values())
    grids = [[_shares(load.get(k), n) for k in layers] for _, load in panels]
    top = max((x for g in grids for row in g for x in row if not math.isnan(x)), default=1.0) or 1.0
    height = 0.3 * len(layers) + 1.8
    fig = _figure((5 * len(panels) + 1, height))
    # margins in inches, not fractions of the height: a 32-layer figure otherwise left ~2 inches
    # of blank between the overall title and the panels
    fig.subplots_adjust(top=1 - 0.55 / height, bottom=0.6 / height)
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, (title, load), grid in zip(axes[0], panels, grids):
        im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=top)
        ax.set_yticks(range(len(layers)), [layer_label(k) for k in layers])
        ax.set_xticks(range(n))
        fewer = any(len(v) < n for v in load.values())  # prune-experts renumbers the experts it keeps
        ax.set_xlabel("expert (kept, renumbered)" if fewer else "expert")
        ax.set_ylabel("layer")
        ax.set_title(title)
    fig.colorbar(im, ax=list(axes[0]), label="share of the layer's routed tokens")
    fig.suptitle("expert load per layer (routing histogram on the same tokens)", y=1 - 0.05 / height, va="top")
    return "Expert load (before / after)", _png(fig)


def _shares(counts: list[int] | None, n: int) -> list[float]:
    if not counts:
        return [math.nan] * n
    total = sum(counts) or 1
    return [c / total for c in counts] + [math.nan] * (n - len(counts))


def layer_sparsity(before: dict[str, float], after: dict[str, float], per_expert: dict[str, list[float]]):
    """Fraction of zero FFN weights per decoder layer (all experts together), before and after;
    whiskers: the least and most sparse expert of the layer, when they differ."""
    if max([*after.values(), *before.values(), 0.0]) < SPARSE_ENOUGH_TO_PLOT:
        return None  # nothing is sparse: a row of (near-)zero bars says nothing
    layers = list(dict.fromkeys(list(before) + list(after)))
    xs = range(len(layers))
    fig = _figure((8, 3))
    ax = fig.subplots()
    width = 0.4 if before else 0.6
    if before:
        ax.bar([x - 0.2 for x in xs], [before.get(k, 0) for k in layers], width=width, label="before", color="#bbb")
    heights = [after.get(k, 0) for k in layers]
    ax.bar([x + (0.2 if before else 0) for x in xs], heights, width=width, label="after", color="#3b75af")
    spread = _expert_spread(layers, per_expert)
    if spread:
        lo = [max(0.0, h - spread[k][0]) if k in spread else 0 for h, k in zip(heights, layers)]
        hi = [max(0.0, spread[k][1] - h) if k in spread else 0 for h, k in zip(heights, layers)]
        ax.errorbar([x + (0.2 if before else 0) for x in xs], heights, yerr=[lo, hi], fmt="none", ecolor="black",
                    capsize=3, label="least / most sparse expert")
    ax.set_xticks(*_thinned(list(xs), [layer_label(k) for k in layers]))
    ax.set_xlabel("layer")
    ax.set_ylabel("fraction of zero weights")
    ax.set_ylim(0, 1)
    ax.set_title("FFN sparsity per layer (experts together)")
    ax.legend(fontsize=7)
    return "Sparsity per layer", _png(fig)


def _thinned(ticks: list, labels: list[str], most: int = 20) -> tuple[list, list[str]]:
    """Every k-th tick and label, at most `most` of them: 32 layer numbers side by side overlap."""
    step = max(1, math.ceil(len(ticks) / most))
    return ticks[::step], labels[::step]


def _expert_spread(layers: list[str], per_expert: dict[str, list[float]]) -> dict[str, tuple[float, float]]:
    """Layer → (min, max) expert sparsity, for layers whose experts differ."""
    out = {}
    for path, fr in per_expert.items():
        layer = next((k for k in layers if path == k or path.startswith(k + ".")), None)
        if layer is not None and fr and max(fr) - min(fr) > 1e-3:
            out[layer] = (min(fr), max(fr))
    return out


def bytes_per_group(before: dict[str, int], after: dict[str, int]):
    if not after:
        return None
    names = sorted(set(after) | set(before))
    biggest = max(list(after.values()) + list(before.values()) + [1])
    unit, scale = next((u, 1024**i) for i, u in reversed(list(enumerate(("B", "KiB", "MiB", "GiB", "TiB"))))
                       if biggest >= 1024**i or i == 0)  # round ticks in the largest unit that fits
    fig = _figure((8, 3))
    ax = fig.subplots()
    xs = range(len(names))
    if before:
        ax.bar([x - 0.2 for x in xs], [before.get(n, 0) / scale for n in names], width=0.4, label="input",
               color="#bbb")
    ax.bar([x + (0.2 if before else 0) for x in xs], [after.get(n, 0) / scale for n in names],
           width=0.4 if before else 0.6, label="output", color="#3b75af")
    ax.set_ylabel(unit)
    ax.set_xticks(list(xs), names, rotation=20)
    ax.set_title(f"bytes per module group (output {fmt_bytes(sum(after.values()))}"
                 + (f", input {fmt_bytes(sum(before.values()))})" if before else ")"))
    ax.legend()
    return "Bytes per module group", _png(fig)


def error_per_pass(passes: list[dict]):
    measured = [p for p in passes if p.get("metrics", {}).get("rel_max_diff") is not None]
    if not measured:
        return None
    fig = _figure((8, 3))
    ax = fig.subplots()
    names = [p.get("pass_name") or p.get("name", "?") for p in measured]
    ax.bar(range(len(names)), [max(p["metrics"]["rel_max_diff"], 1e-12) for p in measured])
    ax.set_yscale("log")
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("relative max |Δoutput|")
    ax.set_title("measured error of each pass (vs the step before; 1e-12 = exact)")
    return "Error per pass", _png(fig)


def _figure(size: tuple[float, float]):
    from matplotlib.figure import Figure
    return Figure(figsize=size)


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")  # the Agg canvas, chosen by format
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
