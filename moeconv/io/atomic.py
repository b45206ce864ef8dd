"""Atomic, exclusive output directories.

The promise: OUT either does not change, or appears complete and verified; two runs never both
write it; nothing temporary is left behind by a failure.

- The work happens in a hidden sibling (`.OUT.moeconv-tmp-PID`), moved into place only after
  verification; any exception (Ctrl-C included) removes it.
- One run at a time per OUT: an exclusive `flock` on `.OUT.moeconv-lock` is held from before the
  first check to after the final rename. The kernel drops it when a process dies (even SIGKILL),
  so a crashed run never blocks the next; a second run exits 2 naming the conflict.
- Without --force the final move is create-if-absent (`renameat2(RENAME_NOREPLACE)`): an OUT
  made by anyone else meanwhile is never replaced. With --force the old entry (directory, file or
  symlink — the link itself, never its target) is moved aside and removed after the new one is in.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from moeconv.errors import InputError, OutputExistsError

TMP_MARK = ".moeconv-tmp-"
LOCK_MARK = ".moeconv-lock"
_NAME_MAX = 255
_HELD: dict[str, int] = {}  # lock path → depth: this process already holds it (distill, then its job)


@contextmanager
def atomic_output_dir(out: Path, *, force: bool = False, inputs: tuple[Path, ...] = ()):
    """Yield an empty temporary directory; on success it becomes `out`."""
    out = Path(out)
    parent = check_output_path(out, inputs)
    with output_lock(out):
        if os.path.lexists(out) and not force:
            raise OutputExistsError(f"{out} exists; pass --force to replace it")
        _remove_stale(parent, out.name)
        tmp = parent / f".{out.name}{TMP_MARK}{os.getpid()}"
        _remove(tmp)
        try:
            # made inside the try: a Ctrl-C the moment the directory exists (the first sign of a
            # run that a supervisor or a test watches for) still removes it
            _mkdir(tmp)
            yield tmp
            _publish(tmp, out, force)
        except BaseException:
            _remove(tmp)
            raise


def check_new_output(out: Path, *, force: bool = False, inputs: tuple[Path, ...] = ()) -> None:
    """Fail fast, before any work, on what `atomic_output_dir` would refuse at its start."""
    check_output_path(out, inputs)
    if os.path.lexists(out) and not force:
        raise OutputExistsError(f"{out} exists; pass --force to replace it")


def check_output_path(out: Path, inputs: tuple[Path, ...] = ()) -> Path:
    """Refuse an OUT that cannot be written (parent missing, not a directory, not writable; a name
    too long for its temporary sibling; not UTF-8) or that overlaps an input. Returns the parent."""
    out = Path(out)
    name = out.name
    if not name or name in (".", ".."):
        raise InputError(f"{out}: not a usable output name")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(f"{os.fsencode(out)!r}: output name is not valid UTF-8 "
                         "(safetensors and transformers need UTF-8 paths)") from None
    longest = len(os.fsencode(f".{name}{TMP_MARK}old-{os.getpid()}"))
    if longest > _NAME_MAX:
        raise InputError(f"{out}: output name is too long ({len(os.fsencode(name))} bytes; at most "
                         f"{_NAME_MAX - (longest - len(os.fsencode(name)))} leave room for its temporary sibling)")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.exists():
        raise InputError(f"{parent}: parent directory of the output does not exist")
    if not parent.is_dir():
        raise InputError(f"{parent}: parent of the output is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{parent}: parent directory of the output is not writable")
    resolved = out.resolve()
    for src in inputs:
        src = Path(src).resolve()
        if resolved == src or src in resolved.parents or resolved in src.parents:
            raise InputError(f"output {out} overlaps the input {src}; the input is never modified")
    return parent


@contextmanager
def output_lock(out: Path):
    """Hold the exclusive lock on `out` (re-entrant within one process); a held lock is an
    `OutputExistsError` naming the other process."""
    out = Path(out)
    parent = out.parent if str(out.parent) else Path(".")
    path = parent / f".{out.name}{LOCK_MARK}"
    key = os.path.abspath(path)
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
    fd = _acquire(path, out)
    _HELD[key] = 1
    try:
        yield
    finally:
        del _HELD[key]
        try:
            os.unlink(path)  # while still locked: a waiter then finds the file gone and retries
        except OSError:
            pass
        os.close(fd)


def _acquire(path: Path, out: Path) -> int:
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise InputError(f"{out}: cannot create the output lock {path.name} ({exc.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            raise OutputExistsError(f"{out} is being written by another moeconv run"
                                    f"{f' (pid {holder})' if holder else ''}; wait for it or choose another OUT") from None
        # The holder before us may have unlinked the file between our open and our lock: then we
        # hold a lock on a deleted file and must start over on the current one.
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
            return fd
        os.close(fd)


def _read_pid(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    except OSError:
        return ""
    return text if text.isdigit() else ""


def _publish(tmp: Path, out: Path, force: bool) -> None:
    if not force or not os.path.lexists(out):
        try:
            _rename_noreplace(tmp, out)
            return
        except FileExistsError:
            if not force:
                raise OutputExistsError(f"{out} appeared while this run was working (not made by moeconv); "
                                        "it was left as it is, pass --force to replace it") from None
    trash = out.parent / f".{out.name}{TMP_MARK}old-{os.getpid()}"
    _remove(trash)
    os.rename(out, trash)  # the entry itself: a symlink is moved, never followed
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(trash, out)
        raise
    _remove(trash)


def _rename_noreplace(src: Path, dst: Path) -> None:
    """rename(2) that fails with FileExistsError instead of replacing `dst` (Linux renameat2)."""
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is not None:
        at_fdcwd, rename_noreplace = -100, 1
        if renameat2(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), rename_noreplace) == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.ENOSYS, errno.EINVAL):  # EINVAL: the filesystem lacks the flag
            raise OSError(code, os.strerror(code), str(dst)) if code != errno.EEXIST else FileExistsError(
                code, os.strerror(code), str(dst))
    if os.path.lexists(dst):  # fallback: the lock still keeps other moeconv runs out
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


def _mkdir(path: Path) -> None:
    try:
        path.mkdir()
    except OSError as exc:
        raise InputError(f"{path.parent}: cannot create the output there ({exc.strerror})") from None


def _remove(path: Path) -> None:
    """Remove a file, a symlink (not its target) or a directory tree; absent is fine."""
    if path.is_symlink() or (os.path.lexists(path) and not path.is_dir()):
        try:
            path.unlink()
        except OSError:
            pass
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=True)


def _remove_stale(parent: Path, name: str) -> None:
    """Temp siblings left by a killed run (SIGKILL cannot be caught) whose process is gone."""
    prefix = f".{name}{TMP_MARK}"  # not a glob: OUT's name may hold [, * or ?
    for p in [p for p in parent.iterdir() if p.name.startswith(prefix)]:
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            _remove(p)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
