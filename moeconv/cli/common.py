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


DEVICE_HELP = ("Where each decoder layer is computed: cpu, or cuda (one GPU). With cuda one decoder layer at a time "
               "is read onto the GPU and calibrated, changed and checked there, beside the embeddings and head; "
               "every other layer stays on disk, and the output is written from CPU memory. Needs the streamed "
               "route (a safetensors checkpoint) and a GPU torch can see.")


def device_option(help: str = DEVICE_HELP):
    """`--device cpu|cuda`: where the streamed route materialises each layer (checked, before any
    tensor is read, by `moeconv.stream.skeleton.stream_device` and `moeconv.jobs.routes.refuse_off_route`)."""
    return typer.Option("cpu", "--device", metavar="cpu|cuda", help=help)


OFFLOAD_HELP = ("Layer-wise passes (wanda, sparsegpt, prune-experts) cache every calibration token's hidden "
                "state; what does not fit in the memory --max-memory leaves (default: the memory available) is "
                "written here and read back a batch at a time. Default: inside the output's hidden temporary "
                "directory. Pick a disk with room for a few copies of tokens x hidden size x 2 bytes.")


def offload_dir_option(help: str = OFFLOAD_HELP):
    return typer.Option(None, "--offload-dir", metavar="DIR", help=help, show_default="inside the temporary output")


def activation_spill(plan, max_memory: str | None, offload_dir: Path | None) -> dict:
    """`run_streamed`'s `activation_budget` and `offload_dir` for a run planned as `plan`: the
    hidden states get what `--max-memory` leaves after the rest of the plan
    (`moeconv.memory_plan.activation_budget`). A `--offload-dir` that is not a directory is a
    `ConfigError` (one line), raised before any tensor is read."""
    from moeconv.errors import ConfigError
    from moeconv.memory_plan import activation_budget
    if offload_dir is not None and not Path(offload_dir).is_dir():
        raise ConfigError(f"--offload-dir {str(offload_dir)[:200]}: no such directory (create it, or leave the option "
                          "out to use the output's temporary directory)")
    return {"activation_budget": activation_budget(plan, max_memory), "offload_dir": offload_dir}
