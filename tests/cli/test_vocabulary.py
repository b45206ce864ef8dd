"""One CLI vocabulary (issue #21): one option name per concept in every command that has the concept,
old names still accepted (hidden), and `--help` in one style: typer's own `[default: …]` for every
option that has a default, no `<str>`/`<bool>` type labels, usage lines in upper case (`SRC OUT`).

Parse level only (click's `make_context` parses without running the command) plus a few
invocations that stop at a missing source: no model is loaded; seconds in all."""
from __future__ import annotations

import re

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from moeconv.cli import app

# Every command, and the arguments it needs to parse at all (the options under test come after).
BASE = {
    ("inspect",): ["M"],
    ("passes",): [],
    ("upcycle",): ["SRC", "OUT"],
    ("quantize",): ["SRC", "OUT"],
    ("sparsify",): ["SRC", "OUT"],
    ("prune-experts",): ["SRC", "OUT", "--calib", "c.txt"],
    ("distill",): ["OUT", "--teacher", "T", "--student", "S", "--data", "d.txt"],
    ("plan",): ["r.yaml"],
    ("run",): ["r.yaml", "--model", "M", "--out", "OUT"],
    ("demo",): [],
    ("export", "onnx"): ["SRC", "OUT"],
    ("export", "gguf"): ["SRC", "OUT"],
}

# The shared vocabulary: option → a value it parses (None: a switch), and the python name it fills.
VOCABULARY = {
    "--calib": ("c.txt", "calib"),
    "--calib-samples": ("3", "calib_samples"),
    "--calib-seq-len": ("16", "calib_seq_len"),
    "--eval": ("e.txt", "eval_file"),
    "--eval-samples": ("2", None),
    "--eval-seq-len": ("16", "eval_seq_len"),
    "--targets": ("experts", "targets"),
    "--ignore": ("router", "ignore"),
    "--block-size": ("64", "block_size"),
    "--shard-size": ("1GB", "shard_size"),
    "--max-memory": ("1GB", "max_memory"),
    "--format": ("auto", "fmt"),
    "--seed": ("1", "seed"),
    "--force": (None, "force"),
}

# Which shared names each command has (every command that has the concept uses the one name).
SHARED = {
    ("upcycle",): ["--calib", "--calib-samples", "--calib-seq-len", "--targets", "--ignore", "--shard-size",
                   "--format", "--seed", "--force"],
    ("quantize",): ["--calib", "--calib-samples", "--calib-seq-len", "--eval", "--eval-samples", "--eval-seq-len",
                    "--targets", "--ignore", "--block-size", "--shard-size", "--max-memory", "--seed", "--force"],
    ("sparsify",): ["--calib", "--calib-samples", "--calib-seq-len", "--targets", "--ignore", "--block-size",
                    "--shard-size", "--max-memory", "--seed", "--force"],
    ("prune-experts",): ["--calib", "--calib-samples", "--calib-seq-len", "--targets", "--ignore", "--max-memory",
                         "--seed", "--force"],
    ("distill",): ["--eval", "--eval-samples", "--seed", "--force"],
    ("plan",): ["--calib", "--calib-samples", "--calib-seq-len", "--max-memory"],
    ("run",): ["--calib", "--calib-samples", "--calib-seq-len", "--format", "--max-memory", "--seed", "--force"],
    ("export", "onnx"): ["--block-size", "--max-memory", "--seed", "--force"],
    ("export", "gguf"): ["--seed", "--force"],
    ("demo",): ["--force"],
}

# Old names, still accepted: (command, old option, value) → (python name, parsed value).
ALIASES = {
    (("upcycle",), "--layers", "every:2"): ("targets", ["every:2"]),
    (("quantize",), "--blocksize", "128"): ("block_size", 128),
    (("quantize",), "--eval-batches", "4"): ("eval_samples", 4),
    (("sparsify",), "--num-samples", "4"): ("calib_samples", 4),
    (("sparsify",), "--seq-len", "32"): ("calib_seq_len", 32),
    (("distill",), "--eval-data", "e.txt"): ("eval_data", "e.txt"),
    (("distill",), "--eval-rows", "5"): ("eval_rows", 5),
}

TYPE_LABEL = re.compile(r"<(str|bool|int|float|path|list\[[a-z]+\]|[a-z ]+ range)>")


@pytest.fixture(scope="module")
def root():
    return get_command(app)


def _command(root, path):
    cmd = root
    for name in path:
        cmd = cmd.commands[name]
    return cmd


def _parse(root, path, args):
    cmd = _command(root, path)
    return cmd.make_context(" ".join(path), [*BASE[path], *args]).params


def _param(cmd, name):
    return next((p for p in cmd.params if name in getattr(p, "opts", [])), None)


def test_every_command_is_covered(root):
    found = {(n,) for n, c in root.commands.items() if not hasattr(c, "commands")}
    found |= {("export", n) for n in root.commands["export"].commands}
    assert found == set(BASE)


@pytest.mark.parametrize("path", list(SHARED), ids=" ".join)
def test_command_accepts_the_shared_names(root, path):
    cmd = _command(root, path)
    for name in SHARED[path]:
        param = _param(cmd, name)
        assert param is not None, f"{' '.join(path)} has no {name}"
        assert param.opts[0] == name, f"{' '.join(path)}: {name} is shown as {param.opts[0]}"
        value, _ = VOCABULARY[name]
        if name in BASE[path]:
            continue  # given by the base arguments already
        params = _parse(root, path, [name] if value is None else [name, value])
        got = params[param.name]
        assert got not in (None, False, 0, []) or value == "0", f"{' '.join(path)} {name}: parsed {got!r}"


def test_no_command_spells_a_shared_concept_another_way(root):
    """The old spellings exist only as hidden aliases: never shown, never a parameter's name."""
    old = {"--num-samples", "--seq-len", "--blocksize", "--eval-batches", "--eval-rows", "--eval-data", "--layers"}
    for path in BASE:
        cmd = _command(root, path)
        shown = {o for p in cmd.params for o in getattr(p, "opts", [])}
        if path == ("distill",):
            shown.discard("--seq-len")  # distill's --seq-len is its training rows' length, not calibration
        assert not shown & old, f"{' '.join(path)} shows {shown & old}"


@pytest.mark.parametrize("key", list(ALIASES), ids=lambda k: f"{' '.join(k[0])} {k[1]}")
def test_old_names_still_work(root, key):
    path, old, value = key
    name, want = ALIASES[key]
    got = _parse(root, path, [old, value])[name]
    assert (str(got) if isinstance(want, str) else got) == want


def test_old_names_work_end_to_end(tmp_path):
    """An old name gets past the parser: the run stops at the missing source, exit 2, one line."""
    missing = tmp_path / "nowhere"
    for argv in (["sparsify", missing, tmp_path / "o1", "--method", "magnitude", "--num-samples", "2",
                  "--seq-len", "16"],
                 ["quantize", missing, tmp_path / "o2", "--method", "nf4", "--blocksize", "64", "--eval-batches", "2"],
                 ["upcycle", missing, tmp_path / "o3", "--layers", "every:1"]):
        r = CliRunner().invoke(app, [str(a) for a in argv])
        assert r.exit_code == 2, r.output
        err = r.stderr.strip()
        assert "no such option" not in err.lower() and err.count("\n") == 0 and "Traceback" not in r.output, err
        assert str(missing) in err, err


def test_plan_calib_takes_a_file_and_the_old_switch_still_works(root, tmp_path):
    assert _parse(root, ("plan",), ["--calib", "c.txt"])["calib"].name == "c.txt"
    for argv in (["--calib"], ["--calib", "--model", "M"]):
        params = _parse(root, ("plan",), argv)
        assert params["assume_calib"] is True and params["calib"] is None
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps:\n  - pass: upcycle\n  - pass: sparsify\n")
    assert CliRunner().invoke(app, ["plan", str(recipe)]).exit_code == 2  # sparsify needs calibration
    assert CliRunner().invoke(app, ["plan", str(recipe), "--calib"]).exit_code == 0
    calib = tmp_path / "calib.txt"
    calib.write_text("some text")
    ok = CliRunner().invoke(app, ["plan", str(recipe), "--calib", str(calib)])
    assert ok.exit_code == 0 and "plan ok" in ok.stdout, ok.output


def _help(path) -> str:
    r = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "250"})
    assert r.exit_code == 0, r.output
    return r.stdout


def _rows(text: str) -> dict[str, str]:
    """Option name → its help row (all its lines) in the Options panel."""
    rows, name = {}, None
    for line in text.splitlines():
        cells = line.strip("│ ").split()
        first = cells[1] if cells[:1] == ["*"] and len(cells) > 1 else (cells[0] if cells else "")
        if first.startswith("--"):
            name = first
            rows[name] = line
        elif name and line.startswith("│"):
            rows[name] += line
        else:
            name = None
    return rows


def _has_default(param) -> bool:
    if isinstance(param.show_default, str):
        return True
    if param.default is None or param.name == "help":
        return False
    return not (param.is_flag and not param.secondary_opts and not param.default)  # an off switch: nothing to show


@pytest.mark.parametrize("path", list(BASE), ids=" ".join)
def test_help_shows_defaults_and_no_type_labels(root, path):
    text = _help(path)
    usage = next(line for line in text.splitlines() if "Usage:" in line)
    assert "{" not in usage and "}" not in usage, usage
    args = [p for p in _command(root, path).params if p.param_type_name == "argument"]
    for a in args:
        assert (a.metavar or a.name).upper() in usage, usage
    assert not TYPE_LABEL.search(text), TYPE_LABEL.search(text).group(0)
    rows = _rows(text)
    for param in _command(root, path).params:
        if param.param_type_name != "option" or param.hidden:
            continue
        row = rows.get(param.opts[0])
        assert row is not None, f"{param.opts[0]} missing from {' '.join(path)} --help"
        if _has_default(param):
            assert "[default:" in row, f"{' '.join(path)} {param.opts[0]}: no default shown"
        if param.required:
            assert "[required]" in row


def test_defaults_the_issue_names_are_shown():
    """--keep/--ratio say what is required; --ratio, --dtype, --block-size show their defaults."""
    prune = _rows(_help(("prune-experts",)))
    assert "required" in prune["--keep"] and "[required]" in prune["--calib"]
    assert "[default: 0.5]" in _rows(_help(("sparsify",)))["--ratio"]
    assert "[default: the source's]" in _rows(_help(("upcycle",)))["--dtype"]
    assert "[default: 64]" in _rows(_help(("quantize",)))["--block-size"]
    assert "Required by --method wanda and sparsegpt" in _rows(_help(("sparsify",)))["--calib"]


def test_aliases_are_hidden_from_help():
    assert "--num-samples" not in _help(("sparsify",)) and "--blocksize" not in _help(("quantize",))
    assert "--assume-calib" not in _help(("plan",))


def test_passes_shows_what_plan_checks_and_fits_80_columns():
    """`moeconv passes` lists, for each default-configured pass, the facts `plan` requires of it,
    and at 80 columns no word of it is cut."""
    from moeconv.pipeline import Pipeline
    from moeconv.render import pass_contracts
    from passes import REGISTRY
    rows = {r["name"]: r for r in pass_contracts(REGISTRY)}
    for cls in REGISTRY:
        try:
            p = cls()
        except Exception:
            continue  # no default instance (prune-experts needs a budget): its contract is the declared one
        step = Pipeline([p]).plan(set()).steps[0]
        row = rows[cls.name]
        assert set(step.requires) == set(row["requires"]) | {" | ".join(sorted(g)) for g in row["requires_any"]}
    r = CliRunner().invoke(app, ["passes"], env={"COLUMNS": "80"})
    assert r.exit_code == 0 and "…" not in r.stdout, r.stdout
    assert max(len(line) for line in r.stdout.splitlines()) <= 80
    for row in rows.values():
        assert row["name"] in r.stdout and row["summary"].split()[-1] in r.stdout  # summaries wrap, whole
