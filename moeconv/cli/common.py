"""Helpers shared by the CLI's command modules (part of the CLI shell, `moeconv/cli/`)."""
from __future__ import annotations

import json
from pathlib import Path

import typer

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


# ---- one vocabulary -----------------------------------------------------------------------------
# One option name per concept in every command that has the concept (issue #21). A command's older
# name for it follows as a hidden alias: still accepted, not shown (`moeconv.cli.help_style`).
# Each factory returns the `typer.Option` a command declares as its parameter's default.

CALIB_HELP = "Calibration text (.txt: blank-line separated documents; .jsonl: a 'text' field per line) or token ids (.safetensors / .pt)."


def calib_option(help: str = CALIB_HELP, *aliases: str, required: bool = False):
    """`--calib FILE`: the calibration data."""
    return typer.Option(... if required else None, "--calib", *aliases, metavar="FILE", help=help)


def calib_samples_option(default: int = 32, *aliases: str, help: str = "Calibration sequences taken from --calib."):
    return typer.Option(default, "--calib-samples", *aliases, min=1, help=help)


def calib_seq_len_option(default: int | None = None, *aliases: str, help: str = "Tokens per calibration sequence.",
                         show_default: str | bool = "128, or the model's context if shorter"):
    """`--calib-seq-len N`; without a number: `moeconv.data.DEFAULT_SEQ_LEN`, or the model's
    position count when that is smaller (what `calibration_tokens` does with None)."""
    return typer.Option(default, "--calib-seq-len", *aliases, min=2, help=help,
                        show_default=show_default if default is None else True)


def eval_option(help: str, *aliases: str, show_default: str | bool = False):
    """`--eval FILE`: held-out data the result is evaluated on."""
    return typer.Option(None, "--eval", *aliases, metavar="FILE", help=help, show_default=show_default)


def eval_samples_option(default: int, *aliases: str, help: str = "Held-out sequences evaluated.", minimum: int = 1):
    return typer.Option(default, "--eval-samples", *aliases, min=minimum, help=help)


def targets_option(what: str, default: str, *aliases: str):
    """`--targets SELECTOR` (repeatable): what the command changes."""
    return typer.Option(None, "--targets", *aliases, help=f"{what}: {SELECTOR_HELP}. Repeatable.",
                        show_default=default)


def ignore_option(what: str):
    return typer.Option(None, "--ignore", help=f"{what} (same syntax as --targets). Repeatable.")


def seed_option(help: str):
    return typer.Option(0, "--seed", help=help)


def force_option():
    return typer.Option(False, "--force", help="Replace OUT if it exists.")


def shard_size_option():
    return typer.Option("5GB", "--shard-size", metavar="SIZE", help="Maximum shard size, e.g. 5GB, 500MB.")


MAX_MEMORY_HELP = ("Refuse, before reading any weight, a run whose estimated peak memory exceeds this size "
                   "(e.g. 16GB; 0: the memory available).")


def max_memory_option(help: str = MAX_MEMORY_HELP):
    return typer.Option(None, "--max-memory", metavar="SIZE", help=help, show_default="the memory available")
