"""Helpers shared by the CLI's command modules (part of the CLI shell, `moeconv/cli/`)."""
from __future__ import annotations

import json
from pathlib import Path

# The one selector grammar (`moeconv.selectors`), as every --targets/--layers help shows it; kept
# here as text so that `--help` does not import torch.
SELECTOR_HELP = "re:REGEX, layers:0-3,7, every:2[+1], a group (attention, experts, router, mlp, …) or a module path"


def format_of(src: str) -> str:
    """The output format that keeps the source's: moeconv-format in → moeconv-format out; anything
    else → the automatic choice (`auto` keeps an HF MoE family and writes a dense HF model with
    save_pretrained)."""
    cfg = Path(src) / "config.json"
    try:
        return "moeconv" if "moeconv" in json.loads(cfg.read_text(encoding="utf-8")) else "auto"
    except (OSError, ValueError):
        return "auto"
