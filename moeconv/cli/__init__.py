"""The `moeconv` command: a thin typer shell over the Python API.

Parse, build API objects, call, render, set the exit code. Every `MoeconvError` becomes one line
on stderr and exit code 2 (a traceback only with `-v`); Ctrl-C prints "interrupted" and exits 130
after the atomic writers have removed their temporary output.
"""
from __future__ import annotations

import errno
import os
import signal
import sys
import warnings
from pathlib import Path
from typing import Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import typer  # noqa: E402
from rich.console import Console  # noqa: E402

from moeconv.cli.common import (calib_option, calib_samples_option, calib_seq_len_option,  # noqa: E402
                                force_option, ignore_option, seed_option, shard_size_option, targets_option)
from moeconv.cli.help_style import restyle  # noqa: E402
from moeconv.errors import MoeconvError  # noqa: E402

try:  # typer ≥ 0.22 vendors click
    from typer import _click as _clicklib  # noqa: E402
except ImportError:  # pragma: no cover
    import click as _clicklib  # noqa: E402


class _OneLineUsageErrors(typer.core.TyperGroup):
    """A bad option value or an unknown option is bad input too: one line and exit code 2, not
    click's usage block (a help request and `moeconv` alone still print the help). Every command
    under it shows its help in one style (`moeconv.cli.help_style`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        restyle(self)

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _clicklib.exceptions.NoArgsIsHelpError as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except _clicklib.exceptions.ClickException as exc:
            ctx = getattr(exc, "ctx", None)
            hint = f" (see {ctx.command_path} --help)" if ctx is not None else ""
            sys.stderr.write(f"error: {' '.join(exc.format_message().split())}{hint}\n")
            sys.exit(exc.exit_code)
        except typer.Abort:
            sys.stderr.write("interrupted\n")
            sys.exit(130)
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    cls=_OneLineUsageErrors,
    add_completion=False,
    no_args_is_help=True,
    help="moeconv: turn dense PyTorch / Hugging Face models into verified Mixture-of-Experts models.\n\n"
         "MODEL arguments accept a Hugging Face checkpoint directory, a .gguf file, a moeconv-format "
         "directory, builtin:gpt|llama|bert, or FILE.py[:factory].",
    pretty_exceptions_enable=False,
)
err = Console(stderr=True, highlight=False, soft_wrap=True)  # errors stay on one line
out = Console(highlight=False)
_state = {"verbose": False}
_LIBRARIES = r"(torch|transformers|accelerate|bitsandbytes|onnx|onnxscript|onnxruntime|safetensors|gguf|tokenizers)(\.|$)"


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Show tracebacks and library logs."),
          allow_nonfinite: bool = typer.Option(False, "--allow-nonfinite",
                                               help="Convert models whose weights hold NaN/Inf (refused by default).")):
    _state["verbose"] = verbose
    if allow_nonfinite:
        os.environ["MOECONV_ALLOW_NONFINITE"] = "1"
    if not verbose:
        # Libraries' own warnings (torch, transformers, …) would be extra stderr lines around our one
        # line; what matters to the user is in the report. -v shows them.
        warnings.filterwarnings("ignore", module=_LIBRARIES)
        _quiet_library_bars()
        try:
            from transformers.utils import logging as hf_logging
            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()
        except Exception:
            pass


def _quiet_library_bars() -> None:
    """Library tqdm bars (transformers' GGUF dequantizing, …) would interleave with ours. tqdm
    reads TQDM_DISABLE only when it is imported, and importing torch already did that."""
    import functools
    import tqdm.std
    init = tqdm.std.tqdm.__init__
    if getattr(init, "_moeconv_quiet", False):
        return

    @functools.wraps(init)
    def quiet(self, *args, **kwargs):
        kwargs["disable"] = True
        init(self, *args, **kwargs)
    quiet._moeconv_quiet = True
    tqdm.std.tqdm.__init__ = quiet


def _run(fn):
    """Call `fn`, mapping errors to exit codes (2: user-facing problem, 130: interrupted)."""
    def on_term(signum, frame):
        raise KeyboardInterrupt
    old = signal.signal(signal.SIGTERM, on_term)
    try:
        return fn()
    except MoeconvError as exc:
        _fail(exc.one_line())
    except KeyboardInterrupt:
        err.print("interrupted: no output was written", markup=False)
        raise typer.Exit(130)
    except OSError as exc:
        if exc.errno not in _ENVIRONMENT_ERRNOS:
            raise
        _fail(_os_error_line(exc))
    except MemoryError:
        _fail("out of memory (no output was written); use a smaller model, fewer calibration tokens, "
              "or a machine with more memory")
    finally:
        signal.signal(signal.SIGTERM, old)


def _fail(line: str):
    """The one `error:` line and exit code 2 (with -v, the traceback of the error being handled first)."""
    if _state["verbose"]:
        err.print_exception()
    err.print(f"error: {line}", markup=False)
    raise typer.Exit(2)


# What the machine, not moeconv, ran out of or refused: one line (the atomic writers have already
# removed their temporary output). Any other OSError is a bug and keeps its traceback.
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM,
                       errno.ENAMETOOLONG, errno.EMFILE, errno.ENFILE, errno.EIO, errno.ENOTDIR, errno.EISDIR}


def _os_error_line(exc: OSError) -> str:
    where = exc.filename if exc.filename is not None else ""
    what = exc.strerror or exc.__class__.__name__
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return f"{what} while writing {where or 'the output'} (no output was written; free space or choose another OUT)"
    return f"{what}: {where}" if where else what


@app.command()
def inspect(
    model: str = typer.Argument(..., help="Checkpoint dir, .gguf file, builtin:NAME or FILE.py[:factory]."),
    as_json: bool = typer.Option(False, "--json", help="Print the inspection as JSON."),
):
    """Show the architecture, parameter counts, every FFN site found by graph structure, and MoE layers."""
    def go():
        from moeconv import load
        from moeconv.errors import NoFfnFoundError
        from moeconv.inspect import inspect_state
        from moeconv.render import render_inspection
        info = inspect_state(load(model))
        if not info["ffn_sites"] and not info["moe_layers"]:
            raise NoFfnFoundError(f"{model}: no FFN or MoE layer found in {info['architecture']} "
                                  "(looked for down(act(up(x))), gated, fused gate_up, Conv1D and split patterns)")
        if as_json:
            import json
            print(json.dumps(info, indent=2))
        else:
            render_inspection(out, info)
    _run(go)


@app.command("passes")
def list_passes(as_json: bool = typer.Option(False, "--json", help="Print the list as JSON.")):
    """List the registered passes with the facts they require, provide and invalidate.

    Shown as a default-configured pass has them; `moeconv plan` shows a recipe's own."""
    from passes import REGISTRY
    from moeconv.render import pass_contracts, render_passes
    if as_json:
        import json
        print(json.dumps(pass_contracts(REGISTRY), indent=2))
    else:
        render_passes(out, REGISTRY)


@app.command()
def upcycle(
    src: str = typer.Argument(..., help="Dense model: HF checkpoint dir, .gguf file, builtin:NAME, FILE.py."),
    out_dir: Path = typer.Argument(..., metavar="OUT", help="Output directory (must not exist unless --force)."),
    num_experts: int = typer.Option(8, "--num-experts", "-e", help="Experts per MoE layer."),
    top_k: int = typer.Option(2, "--top-k", "-k", help="Experts each token is routed to."),
    router_init: str = typer.Option("zeros", help="zeros | normal | hidden (k-means of calibration hidden states)."),
    router_std: float = typer.Option(0.02, help="Std of the normal router init."),
    expert_init: str = typer.Option("copy", help="copy (exact) | noise | drop (Drop-Upcycling) | split (fine-grained)."),
    noise_scale: float = typer.Option(0.01, help="Relative noise for --expert-init noise."),
    drop_ratio: float = typer.Option(0.5, help="Fraction of neurons re-initialised for --expert-init drop."),
    split_mode: str = typer.Option("random", help="random | clustered neuron partition for --expert-init split."),
    shared_experts: Optional[bool] = typer.Option(None, "--shared-experts/--no-shared-experts",
                                                  help="Add an always-on, sigmoid-gated shared expert.",
                                                  show_default="as the output family needs: on for Qwen2-MoE, "
                                                               "which always has one"),
    renormalize: bool = typer.Option(True, "--renormalize/--no-renormalize", help="Renormalise top-k weights."),
    targets: Optional[list[str]] = targets_option("Which FFNs become MoE layers", "every FFN", "--layers"),
    ignore: Optional[list[str]] = ignore_option("FFNs to leave dense"),
    fmt: str = typer.Option("auto", "--format", help="auto (HF MoE family when there is one) | hf | moeconv."),
    dtype: Optional[str] = typer.Option(None, help="Output dtype: float32 | bfloat16 | float16.",
                                        show_default="the source's"),
    shard_size: str = shard_size_option(),
    verify: str = typer.Option("auto", help="auto | full (reload and compare logits) | weights (checksums only)."),
    calib: Optional[Path] = calib_option("Calibration text (.txt / .jsonl) or token ids, for --router-init hidden."),
    calib_samples: int = calib_samples_option(),
    calib_seq_len: Optional[int] = calib_seq_len_option(),
    seed: int = seed_option("Seed for every random choice (same seed → byte-identical output)."),
    force: bool = force_option(),
):
    """Turn a dense model into a Mixture-of-Experts checkpoint, verified on reload.

    Llama/Mistral become Mixtral, Qwen2 becomes Qwen2-MoE (with the shared expert that family
    always has, added by itself), Qwen3 becomes Qwen3-MoE (stock transformers loads them); everything else is written in moeconv's format (`moeconv.load`).
    With --expert-init copy the MoE computes exactly the dense function; that is checked.
    """
    options = dict(num_experts=num_experts, top_k=top_k, router_init=router_init, router_std=router_std,
                   expert_init=expert_init, noise_scale=noise_scale, drop_ratio=drop_ratio, split_mode=split_mode,
                   renormalize=renormalize, targets=targets or None, ignore=ignore or [], seed=seed)
    if shared_experts is not None:  # unset, the output family decides (`UpcycleConfig.for_family`)
        options["shared_experts"] = shared_experts
    calibration = (calib, calib_samples, calib_seq_len)
    _run(lambda: _upcycle(src, out_dir, options, fmt=fmt, dtype=dtype, shard_size=shard_size, verify=verify,
                          calib=calibration, force=force))


def _upcycle(src, out_dir: Path, options: dict, *, fmt, dtype, shard_size, verify, calib, force) -> None:
    from moeconv.errors import ConfigError, InputError
    from moeconv.jobs.upcycle import upcycle_checkpoint
    from moeconv.pass_base import _first_error
    from moeconv.progress import Progress
    from moeconv.render import render_upcycle
    from passes.upcycle import UpcycleConfig
    from pydantic import ValidationError
    import torch
    try:
        cfg = UpcycleConfig(**options)
    except ValidationError as exc:  # the config's `targets` is this command's --targets
        raise ConfigError(f"upcycle: {_first_error(exc)}".replace("upcycle: targets: ", "upcycle: --targets: ")) from None
    if fmt not in ("auto", "hf", "moeconv"):
        raise ConfigError(f"--format must be auto, hf or moeconv, not {fmt!r}")
    if verify not in ("auto", "full", "weights"):
        raise ConfigError(f"--verify must be auto, full or weights, not {verify!r}")
    if dtype is not None and dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"--dtype must be float32, bfloat16 or float16, not {dtype!r}")
    calibration = None
    calib, calib_samples, calib_seq_len = calib
    if calib is not None:
        from moeconv.data import calibration_tokens
        calibration = calibration_tokens(calib, src, num_samples=calib_samples, seq_len=calib_seq_len,
                                         seq_len_flag="--calib-seq-len", samples_flag="--calib-samples")
    elif cfg.router_init == "hidden":
        raise InputError("--router-init hidden needs --calib FILE")
    with Progress(err, enabled=not _state["verbose"]) as progress:
        report = upcycle_checkpoint(src, out_dir, cfg, fmt=fmt, dtype=getattr(torch, dtype) if dtype else None,
                                    shard_size=shard_size, force=force, verify=verify, calibration=calibration,
                                    progress=progress)
    render_upcycle(out, report)


from moeconv.cli.commands import register_all  # noqa: E402

register_all(app)


def skip_exit_collections() -> None:
    """Freeze the objects alive at exit, so the interpreter's shutdown collections skip them: they
    walk every torch and transformers object again, 1.0-1.4 s of each command (measured on the
    streamed upcycle). moeconv closes its files with context managers and removes its temporary
    directories itself, so nothing it needs waits on those collections."""
    import atexit
    import gc
    atexit.register(gc.freeze)


def main():  # pragma: no cover - console entry point wrapper
    skip_exit_collections()
    app()
