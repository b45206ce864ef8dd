"""OUT is written by one run at a time, appears complete or not at all, never replaces what it was
not asked to, and leaves nothing temporary behind (issue class: races and leftovers around OUT).
Each test builds its own OUT situation; the runs that matter are separate processes."""
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from moeconv.errors import InputError, OutputExistsError
from moeconv.io.atomic import LOCK_MARK, atomic_output_dir, output_lock
from tests.reliability.cli_process import ROOT, assert_refused, run_cli
from tests.reliability.test_determinism import assert_same_outputs


def upcycle(src, out, *extra):
    return ["upcycle", str(src), str(out), "-e", "4", "-k", "2", "--router-init", "normal", *extra]


def siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir())


def test_two_concurrent_runs_one_wins(good, tmp_path):
    """Both start together: exactly one writes OUT, the other exits 2 naming the conflict, and OUT
    is the winner's complete output (byte-identical to a run made alone)."""
    (tmp_path / "race").mkdir()
    out = tmp_path / "race" / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "moeconv.cli", *upcycle(good, out)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 2], results
    loser = next(err for rc, err in results if rc == 2).strip()
    assert "\n" not in loser and str(out) in loser and ("another moeconv run" in loser or "exists" in loser), loser
    assert siblings(out) == ["out"]
    (tmp_path / "alone").mkdir()
    alone = tmp_path / "alone" / "out"
    assert run_cli(upcycle(good, alone)).returncode == 0
    assert_same_outputs(out, alone)


def test_a_held_lock_refuses_before_any_work(good, tmp_path):
    """While another run holds OUT (here: this test process), a second one exits 2 at once."""
    (tmp_path / "w").mkdir()
    out = tmp_path / "w" / "out"
    with output_lock(out):
        result = run_cli(upcycle(good, out, "--force"))
        err = assert_refused(result, names=("another moeconv run", f"pid {os.getpid()}"))
        assert siblings(out) == [f".out{LOCK_MARK}"], err
    assert siblings(out) == []


def test_a_killed_run_does_not_block_the_next(good, tmp_path):
    """The lock is the kernel's (flock): SIGKILL releases it; the stale lock file is taken over."""
    (tmp_path / "w").mkdir()
    out = tmp_path / "w" / "out"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from moeconv.io.atomic import output_lock\n"
                               f"with output_lock({str(out)!r}):\n    print('held', flush=True); time.sleep(600)"],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert holder.stdout.readline().strip() == "held"
    holder.kill()
    holder.wait()
    assert (out.parent / f".out{LOCK_MARK}").exists()  # left by SIGKILL
    assert run_cli(upcycle(good, out)).returncode == 0
    assert siblings(out) == ["out"]


def test_dangling_symlink_is_an_existing_out(good, tmp_path):
    (tmp_path / "w").mkdir()
    out = tmp_path / "w" / "out"
    out.symlink_to(tmp_path / "nowhere")
    err = assert_refused(run_cli(upcycle(good, out)), names="exists")
    assert siblings(out) == ["out"] and out.is_symlink() and not (tmp_path / "nowhere").exists(), err


@pytest.mark.parametrize("kind", ["symlink", pytest.param("file", marks=pytest.mark.slow),
                                  pytest.param("dir", marks=pytest.mark.slow)])
def test_force_replaces_the_entry_and_leaves_nothing(kind, good, tmp_path):
    """--force replaces OUT itself (a symlink, not what it points to) and no old copy remains."""
    (tmp_path / "w").mkdir()
    out = tmp_path / "w" / "out"
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep.txt").write_text("not moeconv's")
    if kind == "symlink":
        out.symlink_to(target)
    elif kind == "file":
        out.write_text("old")
    else:
        out.mkdir()
        (out / "old.txt").write_text("old")
    result = run_cli(upcycle(good, out, "--force"))
    assert result.returncode == 0, result.stderr
    assert siblings(out) == ["out"] and out.is_dir() and not out.is_symlink()
    assert (out / "model.safetensors").is_file() and not (out / "old.txt").exists()
    assert (target / "keep.txt").read_text() == "not moeconv's"


def test_an_out_made_by_someone_else_meanwhile_is_never_replaced(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(OutputExistsError, match="appeared while"):
        with atomic_output_dir(out) as tmp:
            (tmp / "ours.txt").write_text("ours")
            out.mkdir()  # another program, not moeconv: it takes no lock
            (out / "theirs.txt").write_text("theirs")
    assert sorted(p.name for p in out.iterdir()) == ["theirs.txt"]
    assert siblings(out) == ["out"]


def test_a_failure_at_the_final_rename_cleans_up(tmp_path, monkeypatch):
    from moeconv.io import atomic
    out = tmp_path / "out"

    def broken(src, dst):
        raise OSError(5, "Input/output error", str(dst))
    monkeypatch.setattr(atomic, "_rename_noreplace", broken)
    with pytest.raises(OSError):
        with atomic_output_dir(out) as tmp:
            (tmp / "x").write_text("x")
    assert siblings(out) == []


def test_an_interrupt_the_moment_the_temporary_exists_cleans_up(tmp_path, monkeypatch):
    """SIGINT lands between bytecodes: right after the temporary directory is made, before any
    work, it must still be removed (the full suite once caught a Ctrl-C test there under load)."""
    from moeconv.io import atomic
    out = tmp_path / "out"
    made = atomic._mkdir

    def then_interrupted(path):
        made(path)
        raise KeyboardInterrupt
    monkeypatch.setattr(atomic, "_mkdir", then_interrupted)
    with pytest.raises(KeyboardInterrupt):
        with atomic_output_dir(out):
            pass
    assert siblings(out) == [] and not out.exists()


@pytest.mark.parametrize("case", ["too-long", "parent-is-file", "not-utf8", "parent-missing"])
def test_unusable_out_paths_are_one_line(case, good, tmp_path):
    work = tmp_path / "w"
    work.mkdir()
    out, names = {
        "too-long": (work / ("x" * 250), "too long"),
        "parent-is-file": (work / "file" / "out", "not a directory"),
        "not-utf8": (Path(os.fsdecode(bytes(work) + b"/out-\xff\xfe")), "UTF-8"),
        "parent-missing": (work / "missing" / "out", "does not exist"),
    }[case]
    if case == "parent-is-file":
        (work / "file").write_text("a file")
    # every command checks OUT with the same function before loading (check_new_output); one
    # streaming and one in-memory command are run here
    for command in (upcycle(good, out), ["quantize", str(good), out, "--method", "int8"])[:1 if case != "not-utf8" else 2]:
        err = assert_refused(run_cli(command), names=names)
        assert sorted(p.name for p in work.iterdir()) == (["file"] if case == "parent-is-file" else []), err


@contextmanager
def small_filesystem(path: Path, size: str, *, read_only: bool = False):
    """A tmpfs of `size` at `path` (root only: skipped where mounting is not allowed)."""
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                      capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    try:
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
        yield path
    finally:
        for _ in range(20):
            if subprocess.run(["umount", str(path)], capture_output=True).returncode == 0:
                break
            time.sleep(0.2)


@pytest.mark.parametrize("fmt", ["hf", "moeconv"])
def test_a_full_disk_is_one_line_and_leaves_nothing(fmt, good, tmp_path):
    """hf (streaming): refused before writing from the planned size; moeconv (in memory): the
    write itself hits ENOSPC, reported in one line, the partial output removed."""
    with small_filesystem(tmp_path / "fs", "96k") as fs:
        out = fs / "out"
        err = assert_refused(run_cli(upcycle(good, out, "--format", fmt)), after_work=fmt == "moeconv")
        assert ("No space left" in err) or ("is free there" in err), err
        assert list(fs.iterdir()) == []


def test_a_read_only_filesystem_is_one_line(good, tmp_path):
    with small_filesystem(tmp_path / "fs", "1m", read_only=True) as fs:
        assert_refused(run_cli(upcycle(good, fs / "out")), names="not writable")


def test_overlap_with_the_input_is_refused_before_work(good, tmp_path):
    with pytest.raises(InputError, match="overlaps"):
        with atomic_output_dir(good / "inside", inputs=(good,)):
            pass
