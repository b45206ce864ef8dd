"""Atomic output directories: work happens in a hidden sibling, renamed into place only after
verification, so an interrupted or failed run never leaves a directory that looks complete."""
from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from moeconv.errors import InputError, OutputExistsError

TMP_MARK = ".moeconv-tmp-"


@contextmanager
def atomic_output_dir(out: Path, *, force: bool = False, inputs: tuple[Path, ...] = ()):
    out = Path(out)
    if out.exists() and not force:
        raise OutputExistsError(f"{out} exists; pass --force to replace it")
    resolved = out.resolve()
    for src in inputs:
        src = Path(src).resolve()
        if resolved == src or src in resolved.parents or resolved in src.parents:
            raise InputError(f"output {out} overlaps the input {src}; the input is never modified")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.exists():
        raise InputError(f"{parent}: parent directory of the output does not exist")
    _remove_stale(parent, out.name)
    tmp = parent / f".{out.name}{TMP_MARK}{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        trash = parent / f".{out.name}{TMP_MARK}old-{os.getpid()}"
        out.rename(trash)
        tmp.rename(out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        tmp.rename(out)


def _remove_stale(parent: Path, name: str) -> None:
    """Temp siblings left by a killed run (SIGKILL cannot be caught) whose process is gone."""
    for p in parent.glob(f".{name}{TMP_MARK}*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
