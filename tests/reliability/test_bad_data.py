"""Hostile data, recipes and run directories × every command that reads them (issue 20).

Each case is built in code: calibration / evaluation / training files of every accepted kind
(`.txt`, `.jsonl`, `.safetensors`, `.pt`), YAML recipes (plain and through `--set`), and distill
run directories to `--resume`. The promise checked is the house rule: exit code 2, exactly one
`error: …` line naming the problem, no traceback or warning line, nothing beside OUT, nothing
executed. Cases where memory, time or a payload matter run in a separate process
(`cli_process.run_cli`), which also bounds the peak memory and time of the refusal.

The default run sends every data case through one calibration reader (`upcycle --router-init
hidden --calib`) and the training reader (`distill --data`), and every command through a few
cases; `-m slow` runs the whole case × command matrix.
"""
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.reliability.cli_process import assert_refused, run_cli
from tests.reliability.corpus import copy_dir
from tests.reliability.test_bad_inputs import _assert_clean_failure, _invoke

VOCAB = 128  # the tiny models' vocabulary (tests/tiny.py)
POSITIONS = 64  # and their max_position_embeddings
RECIPE = "steps:\n  - pass: upcycle\n    num_experts: 4\n    top_k: 2\n"
WANDA = RECIPE + "  - pass: sparsify\n    method: wanda\n"


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ.get('MOECONV_EVIL_MARKER', '/tmp/moeconv-evil')}",))


# ---- data files ------------------------------------------------------------------------------
def _bytes(name, raw: bytes):
    def build(d: Path) -> Path:
        (d / name).write_bytes(raw)
        return d / name
    return build


def _pt(value, name="ids.pt"):
    def build(d: Path) -> Path:
        torch.save(value, d / name)
        return d / name
    return build


def _st(tensors: dict, name="ids.safetensors"):
    def build(d: Path) -> Path:
        save_file(tensors, str(d / name))
        return d / name
    return build


def _jsonl(*lines: str):
    return _bytes("data.jsonl", "".join(line + "\n" for line in lines).encode())


def _pickle_payload(d: Path) -> Path:
    with open(d / "ids.pt", "wb") as fh:
        pickle.dump(_Evil(), fh, protocol=2)
    return d / "ids.pt"


def _ids(fill: int | None = None, *, shape=(4, 16), at=(1, 5)) -> torch.Tensor:
    t = torch.randint(3, VOCAB, shape, generator=torch.Generator().manual_seed(0))
    if fill is not None:
        t[at] = fill
    return t


_WORDS = " ".join(f"w{i % 120 + 3}" for i in range(40))

# case: (builder(dir) -> file, what the one line must name, "all" or "calib": calibration takes
# (rows, seq_len) tensors only, training data also takes a 1-D stream)
DATA_CASES = {
    "txt-garbage": (_bytes("data.txt", bytes(range(256)) * 8), "UTF-8", "all"),
    "txt-empty": (_bytes("data.txt", b""), "empty", "all"),
    "txt-whitespace": (_bytes("data.txt", b"\n\n  \n\t\n\n"), "empty", "all"),
    "jsonl-garbage": (_bytes("data.jsonl", b"\x00\x01{{garbage]]\n"), "data.jsonl:1: not valid JSON", "all"),
    "jsonl-not-utf8": (_bytes("data.jsonl", b'{"text": "\xff\xfe"}\n'), "data.jsonl:1", "all"),
    "jsonl-empty": (_bytes("data.jsonl", b"\n\n"), "empty", "all"),
    "jsonl-deep-nesting": (_jsonl('{"text": "w5", "x": ' + "[" * 100_000 + "]" * 100_000 + "}"),
                           "data.jsonl:1: not valid JSON (RecursionError)", "all"),
    "jsonl-huge-integer": (_jsonl(json.dumps({"text": _WORDS}), '{"text": "w5", "n": 1' + "0" * 5000 + "}"),
                           "data.jsonl:2: not valid JSON", "all"),
    "jsonl-text-number": (_jsonl('{"text": 5}'), "data.jsonl:1: field 'text' must be a string, not a number", "all"),
    "jsonl-text-null": (_jsonl('{"text": null}'), "field 'text' must be a string, not null", "all"),
    "jsonl-text-list": (_jsonl(json.dumps({"text": _WORDS}), '{"text": ["w5", "w6"]}'),
                        "data.jsonl:2: field 'text' must be a string, not a list", "all"),
    "jsonl-text-object": (_jsonl('{"text": {"w5": 1}}'), "not an object", "all"),
    "jsonl-not-object": (_jsonl("[1, 2, 3]"), "data.jsonl:1: expected a JSON object with a 'text' field", "all"),
    "pt-garbage": (_bytes("ids.pt", b"PK\x03\x04 not really a zip" * 10), "ids.pt: unreadable", "all"),
    "pt-empty-file": (_bytes("ids.pt", b""), "ids.pt: unreadable", "all"),
    "pt-pickle-payload": (_pickle_payload, "ids.pt: unreadable", "all"),
    "pt-float": (_pt(torch.rand(4, 16)), "integer tensor", "all"),
    "pt-bool": (_pt(torch.ones(4, 16, dtype=torch.bool)), "integer tensor", "all"),
    "pt-3d": (_pt(_ids(shape=(2, 4, 16))), "shape [2, 4, 16]", "all"),
    "pt-1d": (_pt(_ids(shape=(64,), at=(5,))), "(rows, seq_len)", "calib"),
    "pt-no-rows": (_pt(torch.zeros(0, 16, dtype=torch.long)), "empty", "all"),
    "pt-dict": (_pt({"ids": _ids()}), "found dict", "all"),
    "pt-id-too-large": (_pt(_ids(VOCAB)), f"token id {VOCAB} at row 1, position 5", "all"),
    "pt-id-huge": (_pt(_ids(2**62)), f"token id {2**62}", "all"),
    "pt-id-negative": (_pt(_ids(-1)), "token id -1 at row 1, position 5", "all"),
    "st-garbage": (_bytes("ids.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" * 4),
                   "ids.safetensors: unreadable", "all"),
    "st-empty-file": (_bytes("ids.safetensors", b""), "ids.safetensors: unreadable", "all"),
    "st-float": (_st({"ids": torch.rand(4, 16)}), "found F32", "all"),
    "st-3d": (_st({"ids": _ids(shape=(2, 4, 16))}), "shape [2, 4, 16]", "all"),
    "st-two-tensors": (_st({"a": _ids(), "b": _ids()}), "exactly one tensor", "all"),
    "st-id-too-large": (_st({"ids": _ids(VOCAB + 5).int()}), f"token id {VOCAB + 5}", "all"),
    "st-id-negative": (_st({"ids": _ids(-7)}), "token id -7", "all"),
}

# command: argv builder(file, out, fx). Each runs as is on the good data file (tests/passes check
# that); the failure must come from the file.
CALIB_COMMANDS = {
    "upcycle": lambda f, out, fx: ["upcycle", fx["good"], out, "-e", "4", "-k", "2", "--router-init", "hidden",
                                   "--calib", f],
    "sparsify": lambda f, out, fx: ["sparsify", fx["moe"], out, "--method", "wanda", "--calib", f,
                                    "--num-samples", "2", "--seq-len", "16"],
    "prune-experts": lambda f, out, fx: ["prune-experts", fx["moe"], out, "--keep", "2", "--calib", f,
                                         "--calib-samples", "2", "--calib-seq-len", "16"],
    "quantize-eval": lambda f, out, fx: ["quantize", fx["moe"], out, "--method", "int8", "--eval", f,
                                         "--eval-batches", "2", "--eval-seq-len", "16"],
    "run": lambda f, out, fx: ["run", fx["wanda"], "--model", fx["good"], "--out", out, "--calib", f],
}
_DISTILL = ["--steps", "1", "--batch-size", "2", "--seq-len", "16"]
TRAIN_COMMANDS = {
    "distill-data": lambda f, out, fx: ["distill", out, "--teacher", fx["moe"], "--student", fx["moe"],
                                        "--data", f, *_DISTILL],
    "distill-eval-data": lambda f, out, fx: ["distill", out, "--teacher", fx["moe"], "--student", fx["moe"],
                                             "--data", fx["data"], "--eval-data", f, *_DISTILL],
}
COMMANDS = {**CALIB_COMMANDS, **TRAIN_COMMANDS}

# The default run: every case through one calibration command and the training reader, and every
# command through these cases.
DEFAULT_COMMANDS = ("upcycle", "distill-data")
DEFAULT_CASES = ("jsonl-text-number", "pt-id-too-large", "st-id-negative", "pt-pickle-payload")


def _applies(case: str, command: str) -> bool:
    return DATA_CASES[case][2] == "all" or command in CALIB_COMMANDS


def _matrix():
    for case in sorted(DATA_CASES):
        for command in COMMANDS:
            if not _applies(case, command):
                continue
            heavy = command not in DEFAULT_COMMANDS and case not in DEFAULT_CASES
            yield pytest.param(case, command, id=f"{case}-{command}", marks=[pytest.mark.slow] if heavy else [])


@pytest.fixture(scope="module")
def fx(good, moe, data, tmp_path_factory):
    d = tmp_path_factory.mktemp("bad-data-fx")
    (d / "wanda.yaml").write_text(WANDA)
    (d / "recipe.yaml").write_text(RECIPE)
    return {"good": good, "moe": moe, "data": data, "wanda": d / "wanda.yaml", "recipe": d / "recipe.yaml"}


def _work(tmp_path: Path) -> Path:
    work = tmp_path / "work"
    work.mkdir()
    return work / "out"


@pytest.mark.parametrize("case,command", list(_matrix()))
def test_bad_data_file(case, command, fx, tmp_path, monkeypatch):
    marker = tmp_path / "evil-ran"
    monkeypatch.setenv("MOECONV_EVIL_MARKER", str(marker))
    files = tmp_path / "files"
    files.mkdir()
    build, names, _ = DATA_CASES[case]
    bad = build(files)
    out = _work(tmp_path)
    result, shown = _invoke(COMMANDS[command](bad, out, fx))
    err = _assert_clean_failure(result, out, shown)
    assert bad.name in err and names in err, err
    assert not marker.exists(), "a pickle payload was executed"


def test_text_tokens_outside_the_model_vocabulary(fx, tmp_path):
    """A tokenizer whose ids the model does not have (a mismatched tokenizer): refused by id."""
    src = copy_dir(fx["good"], tmp_path / "small-vocab")
    from tests.passes.upcycle_helpers import tiny_tokenizer
    tok = tiny_tokenizer()
    tok.add_tokens(["zzz"])  # id 128: one past the model's embedding table
    tok.save_pretrained(src)
    f = tmp_path / "zzz.txt"
    f.write_text(" ".join(["w5 zzz w6"] * 60))
    out = _work(tmp_path)
    result, shown = _invoke(["upcycle", src, out, "-e", "4", "-k", "2", "--router-init", "hidden", "--calib", f])
    err = _assert_clean_failure(result, out, shown)
    assert "zzz.txt" in err and f"token id {VOCAB}" in err and "0..127" in err, err


def test_rows_longer_than_the_position_table(fx, tmp_path):
    f = tmp_path / "wide.safetensors"
    save_file({"ids": _ids(shape=(2, 100_000))}, str(f))
    for command in ("upcycle", "sparsify"):
        (tmp_path / command).mkdir()
        out = _work(tmp_path / command)
        result, shown = _invoke(CALIB_COMMANDS[command](f, out, fx))
        err = _assert_clean_failure(result, out, shown)
        assert "wide.safetensors" in err and "100000" in err and f"{POSITIONS} positions" in err, err


def test_the_default_sequence_length_fits_the_model(fx, tmp_path):
    """Without --calib-seq-len, sparsify (256 tokens a row) and prune-experts (128) calibrate on
    rows of the model's 64 positions instead of refusing a length nobody asked for."""
    argv = {"sparsify": ["sparsify", fx["moe"], "{out}", "--method", "wanda", "--calib", fx["data"],
                         "--num-samples", "2"],
            "prune-experts": ["prune-experts", fx["moe"], "{out}", "--keep", "2", "--calib", fx["data"],
                              "--calib-samples", "2"]}
    for command, args in argv.items():
        out = tmp_path / command
        result, _ = _invoke([str(out) if a == "{out}" else a for a in args])
        assert result.exit_code == 0, (command, result.output, repr(result.exception))
        assert (out / "report.json").is_file()


# ---- sequence lengths (separate processes: memory and time are what is at stake) ----------------
SEQ_CASES = {
    "sparsify": ("--calib-seq-len", lambda fx, out: ["sparsify", fx["moe"], out, "--method", "wanda", "--calib",
                                                     fx["data"], "--calib-samples", "2", "--calib-seq-len", "100000"]),
    "prune-experts": ("--calib-seq-len", lambda fx, out: ["prune-experts", fx["moe"], out, "--keep", "2", "--calib",
                                                          fx["data"], "--calib-samples", "2",
                                                          "--calib-seq-len", "100000"]),
    "quantize-eval": ("--eval-seq-len", lambda fx, out: ["quantize", fx["moe"], out, "--method", "int8", "--eval",
                                                         fx["data"], "--eval-seq-len", "100000"]),
    "distill": ("--seq-len", lambda fx, out: ["distill", out, "--teacher", fx["moe"], "--student", fx["moe"],
                                              "--data", fx["data"], "--steps", "1", "--batch-size", "2",
                                              "--seq-len", "100000"]),
}


@pytest.mark.parametrize("command", [pytest.param(c, marks=[] if c in ("sparsify", "distill") else [pytest.mark.slow])
                                     for c in SEQ_CASES])
def test_100k_token_sequences_are_refused(command, fx, tmp_path):
    flag, argv = SEQ_CASES[command]
    out = _work(tmp_path)
    err = assert_refused(run_cli(argv(fx, out)), out, names=(flag, "100000", f"{POSITIONS} positions"))
    assert "max_position_embeddings" in err, err


@pytest.fixture(scope="module")
def long_context(good, tmp_path_factory):
    """`good` claiming 10 M positions (rotary llama: any length runs): only the activation estimate
    stands between a 1 M-token sequence and the machine's memory."""
    src = copy_dir(good, tmp_path_factory.mktemp("long-context") / "llama")
    cfg = json.loads((src / "config.json").read_text())
    cfg["max_position_embeddings"] = 10_000_000
    (src / "config.json").write_text(json.dumps(cfg))
    return src


@pytest.mark.parametrize("command", ["sparsify", pytest.param("distill", marks=pytest.mark.slow)])
def test_activation_memory_is_bounded(command, long_context, fx, tmp_path):
    out = _work(tmp_path)
    if command == "sparsify":
        argv = ["sparsify", long_context, out, "--method", "wanda", "--targets", "dense-ffn", "--calib", fx["data"],
                "--calib-samples", "64", "--calib-seq-len", "1000000"]
        names = ("--calib-seq-len", "1000000", "activations", "GiB")
    else:
        argv = ["distill", out, "--teacher", long_context, "--student", long_context, "--data", fx["data"],
                "--steps", "1", "--batch-size", "8", "--seq-len", "1000000"]
        names = ("--batch-size 8", "--seq-len 1000000", "activations", "GiB")
    assert_refused(run_cli(argv), out, names=names)


# ---- a 200 MB single line -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def huge_line(tmp_path_factory):
    """200 MB of words without a line break, as text and as one JSONL document."""
    d = tmp_path_factory.mktemp("huge-line")
    chunk = ("w5 w6 w7 w8 " * 1024).encode()
    n = 200 * 2**20 // len(chunk)
    with open(d / "line.txt", "wb") as f:
        for _ in range(n):
            f.write(chunk)
    with open(d / "line.jsonl", "wb") as f:
        f.write(b'{"text": "')
        for _ in range(n):
            f.write(chunk)
        f.write(b'"}\n')
    yield d
    shutil.rmtree(d, ignore_errors=True)


HUGE_CASES = {
    # calibration reads only the text its samples need: one document of 200 MB is not refused, and
    # its first megabyte is all that is read
    "upcycle-txt": (None, lambda f, out, fx: ["upcycle", fx["good"], out, "-e", "4", "-k", "2",
                                              "--router-init", "hidden", "--calib", f], "line.txt"),
    "upcycle-jsonl": ("line longer than 16.0 MiB", CALIB_COMMANDS["upcycle"], "line.jsonl"),
    "sparsify-jsonl": ("line longer than 16.0 MiB", CALIB_COMMANDS["sparsify"], "line.jsonl"),
    "run-jsonl": ("line longer than 16.0 MiB", CALIB_COMMANDS["run"], "line.jsonl"),
    "quantize-jsonl": ("line longer than 16.0 MiB", CALIB_COMMANDS["quantize-eval"], "line.jsonl"),
    "prune-jsonl": ("line longer than 16.0 MiB", CALIB_COMMANDS["prune-experts"], "line.jsonl"),
    "distill-txt": ("at most 64.0 MiB is read", TRAIN_COMMANDS["distill-data"], "line.txt"),
    "distill-jsonl": ("at most 64.0 MiB is read", TRAIN_COMMANDS["distill-data"], "line.jsonl"),
    "distill-eval-txt": ("at most 64.0 MiB is read", TRAIN_COMMANDS["distill-eval-data"], "line.txt"),
}
_HUGE_DEFAULT = ("upcycle-txt", "upcycle-jsonl", "distill-txt")


@pytest.mark.parametrize("case", [pytest.param(c, marks=[] if c in _HUGE_DEFAULT else [pytest.mark.slow])
                                  for c in HUGE_CASES])
def test_200mb_single_line(case, huge_line, fx, tmp_path):
    names, argv, name = HUGE_CASES[case]
    out = _work(tmp_path)
    result = run_cli(argv(huge_line / name, out, fx))
    if names is None:
        assert result.returncode == 0, result.stderr[-3000:]
        assert "Traceback" not in result.stderr and (out / "config.json").is_file()
        assert result.max_rss <= 1200 * 2**20, f"peak RSS {result.max_rss / 2**20:.0f} MiB"
    else:
        assert_refused(result, out, names=(name, names))


# ---- recipes -------------------------------------------------------------------------------------
BOMB = ("a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
        "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
        "e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]\n"
        "g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]\nh: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]\n")
BOMB_VALUE = ("[&a [x, x, x, x, x, x, x, x, x], &b [*a, *a, *a, *a, *a, *a, *a, *a, *a], "
              "&c [*b, *b, *b, *b, *b, *b, *b, *b, *b], &d [*c, *c, *c, *c, *c, *c, *c, *c, *c], "
              "&e [*d, *d, *d, *d, *d, *d, *d, *d, *d], &f [*e, *e, *e, *e, *e, *e, *e, *e, *e], "
              "&g [*f, *f, *f, *f, *f, *f, *f, *f, *f], [*g, *g, *g, *g, *g, *g, *g, *g, *g]]")
DEEP_VALUE = "[" * 50_000 + "]" * 50_000

# case: (recipe text, --set items, what the line must name)
RECIPE_CASES = {
    "python-tag": (RECIPE + "    router_init: !!python/object/apply:os.system ['touch {marker}']\n", [],
                   ("r.yaml:5", "!!python/object/apply:os.system", "not allowed")),
    "python-tag-set": (RECIPE, ["upcycle.router_init=!!python/object/apply:os.system ['touch {marker}']"],
                       ("--set upcycle.router_init", "!!python/object/apply:os.system")),
    "python-name-tag": ("steps:\n  - pass: upcycle\n    seed: !!python/name:os.system\n", [],
                        ("r.yaml:3", "!!python/name:os.system")),
    "binary-tag": (RECIPE + "    router_init: !!binary aGVsbG8=\n", [], ("r.yaml:5", "!!binary")),
    "int-key": (RECIPE + "    7: 1\n", [], ("r.yaml:5", "field names must be strings", "`7`")),
    "null-key": (RECIPE + "    ~: 1\n", [], ("r.yaml:5", "field names must be strings")),
    "complex-key": (RECIPE + "    ? [a, b]\n    : 1\n", [], ("r.yaml:5", "field names must be strings")),
    "complex-top-key": ("? [a]\n: 1\n" + RECIPE, [], ("r.yaml:1", "unknown top-level key")),
    "pass-not-a-name": ("steps:\n  - pass: {a: 1}\n", [], ("r.yaml:2", "`pass` must be a pass name")),
    # refused by the field's own bound, or (for a field without one) as wider than 64 bits
    "huge-int": (RECIPE.replace("num_experts: 4", "num_experts: 1" + "0" * 30), [], ("r.yaml:3", "`num_experts`")),
    "huge-int-nested": ("steps:\n  - pass: distill\n    layer_map: {0: 1" + "0" * 30 + "}\n", [],
                        ("r.yaml:3", "`layer_map", "")),
    "huge-int-5000-digits": (RECIPE.replace("top_k: 2", "top_k: 1" + "0" * 5000), [], ("r.yaml:4", "4,096")),
    "huge-int-set": (RECIPE, ["1.num_experts=1" + "0" * 40], ("--set 1.num_experts", "`num_experts`")),
    "huge-int-set-unbounded": ("steps:\n  - pass: distill\n", ["distill.layer_map={0: 1" + "0" * 30 + "}"],
                               ("--set distill.layer_map", "`layer_map", "")),
    "seed-2**70": (RECIPE + f"    seed: {2**70}\n", [], ("r.yaml:5", "seed", "4294967295")),
    "seed-negative-set": (RECIPE, ["upcycle.seed=-1"], ("--set upcycle.seed", "4294967295")),
    "many-steps": ("steps:\n" + "  - pass: upcycle\n" * 300, [], ("r.yaml:2", "300 steps", "at most 256")),
    "bomb": (BOMB + RECIPE, [], ("r.yaml", "aliases", "100,000")),
    "bomb-set": (RECIPE, [f"1.targets={BOMB_VALUE}"], ("--set 1.targets", "aliases")),
    "deep": (RECIPE + "    targets: " + DEEP_VALUE + "\n", [], ("r.yaml:5", "nested more than 32")),
    "deep-set": (RECIPE, [f"upcycle.targets={DEEP_VALUE[:200]}"], ("--set upcycle.targets", "nested more than 32")),
    "set-step-unicode-digit": (RECIPE, ["²2.top_k=1"], ("--set", "no `²2` step")),
    "set-step-huge-number": (RECIPE, ["9" * 5000 + ".top_k=1"], ("--set", "no step")),
    "set-not-a-field": (RECIPE, ["1.{a: b}=1"], ("--set", "not a field name")),
    "set-value-too-long": (RECIPE, ["1.router_init=" + "x" * 10_000], ("--set 1.router_init", "at most 4,096")),
    "two-documents": (RECIPE + "---\n" + RECIPE, [], ("r.yaml:5", "not valid YAML")),
    "undefined-alias": ("steps: [*nope]\n", [], ("r.yaml:1", "undefined alias")),
}


def _recipe_argv(command, recipe, sets, fx, out):
    extra = [a for s in sets for a in ("--set", s)]
    if command == "plan":
        return ["plan", recipe, *extra]
    return ["run", recipe, "--model", fx["good"], "--out", out, *extra]


@pytest.mark.parametrize("command", ["run", "plan"])
@pytest.mark.parametrize("case", sorted(RECIPE_CASES))
def test_bad_recipe(case, command, fx, tmp_path, monkeypatch):
    marker = tmp_path / "evil-ran"
    monkeypatch.setenv("MOECONV_EVIL_MARKER", str(marker))
    text, sets, names = RECIPE_CASES[case]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text.replace("{marker}", str(marker)))
    out = _work(tmp_path)
    result, shown = _invoke(_recipe_argv(command, recipe, [s.replace("{marker}", str(marker)) for s in sets], fx, out))
    err = _assert_clean_failure(result, out, shown)
    for name in names:
        assert name in err, (name, err)
    assert not marker.exists(), "a YAML tag ran code"


# Separate processes: a 1.2 M-step recipe (22 MB), an alias bomb and deep nesting must be refused
# in bounded time and memory, and the python tag must not run.
_BIG = "steps:\n" + "  - pass: upcycle\n" * 1_200_000
PROCESS_RECIPES = {
    "1.2M-steps": (_BIG, [], ("r.yaml", "at most 256 KiB")),
    "14k-steps-flow": ("steps: [" + "{pass: upcycle}, " * 14_000 + "]\n", [], ("r.yaml:1", "14,000 steps")),
    "bomb": (BOMB + RECIPE, [], ("aliases",)),
    "bomb-set": (RECIPE, [f"1.targets={BOMB_VALUE}"], ("--set 1.targets", "aliases")),
    "deep": (RECIPE + "    targets: " + "[" * 100_000 + "]" * 100_000 + "\n", [], ("nested more than 32",)),
    "deep-set": (RECIPE, ["1.targets=" + "[" * 2000 + "]" * 2000], ("--set 1.targets", "nested more than 32")),
    "python-tag": (RECIPE + "    router_init: !!python/object/apply:os.system ['touch {marker}']\n", [],
                   ("!!python/object/apply:os.system",)),
}
_PROCESS_DEFAULT = {("1.2M-steps", "run"), ("bomb", "plan"), ("deep-set", "run")}


@pytest.mark.parametrize("case,command", [
    pytest.param(c, m, id=f"{c}-{m}", marks=[] if (c, m) in _PROCESS_DEFAULT else [pytest.mark.slow])
    for c in sorted(PROCESS_RECIPES) for m in ("run", "plan")])
def test_bad_recipe_in_a_process(case, command, fx, tmp_path):
    marker = tmp_path / "evil-ran"
    text, sets, names = PROCESS_RECIPES[case]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text.replace("{marker}", str(marker)))
    out = _work(tmp_path)
    result = run_cli(_recipe_argv(command, recipe, sets, fx, out), env={"MOECONV_EVIL_MARKER": str(marker)})
    assert_refused(result, out, names=names, max_seconds=30)
    assert not marker.exists(), "a YAML tag ran code"


def test_run_refuses_a_huge_seed(fx, tmp_path):
    for seed in (str(2**70), "-1"):
        (tmp_path / seed).mkdir()
        out = _work(tmp_path / seed)
        result, shown = _invoke(["run", fx["recipe"], "--model", fx["good"], "--out", out, "--seed", seed])
        err = _assert_clean_failure(result, out, shown)
        assert "--seed" in err and "4294967295" in err, err


def test_distill_refuses_a_huge_seed(fx, tmp_path):
    for seed in (str(2**70), "-1"):
        (tmp_path / seed).mkdir()
        out = _work(tmp_path / seed)
        result, shown = _invoke(["distill", out, "--teacher", fx["moe"], "--student", fx["moe"], "--data", fx["data"],
                                 *_DISTILL, "--seed", seed])
        err = _assert_clean_failure(result, out, shown)
        assert "seed" in err and "4294967295" in err, err


# ---- distill --resume ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_dir(good, data, tmp_path_factory):
    """A real 2-step distill run of `good` into itself, checkpointed at both steps."""
    from typer.testing import CliRunner
    from moeconv.cli import app
    d = tmp_path_factory.mktemp("distill-run")
    result = CliRunner().invoke(app, ["distill", str(d / "out"), "--teacher", str(good), "--student", str(good),
                                      "--data", str(data), "--steps", "2", "--batch-size", "2", "--seq-len", "16",
                                      "--checkpoint-every", "1", "--eval-rows", "0"])
    assert result.exit_code == 0, result.output
    return d / "out.run"


def _step(run: Path) -> Path:
    return run / "checkpoints" / "step-00000002"


def _meta(edit):
    def apply(run: Path):
        p = _step(run) / "trainer.json"
        meta = json.loads(p.read_text())
        edit(meta)
        p.write_text(json.dumps(meta))
    return apply


def _write(name: str, raw: bytes):
    return lambda run: (_step(run) / name).write_bytes(raw)


def _save(name: str, value):
    return lambda run: torch.save(value, _step(run) / name)


def _remove(name: str):
    return lambda run: (_step(run) / name).unlink()


def _step_past_the_run(run: Path):
    ckpt = _step(run).rename(run / "checkpoints" / "step-00000009")
    meta = json.loads((ckpt / "trainer.json").read_text())
    (ckpt / "trainer.json").write_text(json.dumps({**meta, "step": 9}))


def _optimizer_setting(key, value):
    def apply(run: Path):
        p = _step(run) / "optimizer.pt"
        s = torch.load(p, weights_only=True)
        s["param_groups"][0][key] = value
        torch.save(s, p)
    return apply


def _evil_optimizer(run: Path):
    with open(_step(run) / "optimizer.pt", "wb") as fh:
        pickle.dump({"state": _Evil()}, fh, protocol=2)


def _other_shape(run: Path):
    from safetensors.torch import load_file
    p = _step(run) / "trainable.safetensors"
    t = load_file(str(p))
    name = sorted(t)[0]
    t[name] = torch.zeros(3, 3)
    save_file(t, str(p))


def _optimizer_for_other_shapes(run: Path):
    p = _step(run) / "optimizer.pt"
    s = torch.load(p, weights_only=True)
    for v in s["state"].values():
        v["exp_avg"] = torch.zeros(5)
    torch.save(s, p)


# case: (break the run dir in place, what the line must name, options: resume target, other flags)
RESUME_CASES = {
    "missing-dir": (lambda run: shutil.rmtree(run), "no training checkpoint"),
    "empty-dir": (lambda run: shutil.rmtree(run / "checkpoints"), "no training checkpoint"),
    "trainer-json-garbage": (_write("trainer.json", b"\x00{not json"), "trainer.json: not valid JSON"),
    "trainer-json-not-utf8": (_write("trainer.json", b'{"step": "\xff"}'), "trainer.json: not valid JSON"),
    "trainer-json-deep": (_write("trainer.json", b"[" * 100_000 + b"]" * 100_000), "trainer.json: not valid JSON"),
    "trainer-json-list": (_write("trainer.json", b"[1, 2]"), "trainer.json: expected a JSON object"),
    "format-version-true": (_meta(lambda m: m.update(format_version=True)), "unsupported checkpoint format"),
    "format-version-9": (_meta(lambda m: m.update(format_version=9)), "unsupported checkpoint format"),
    "step-negative": (_meta(lambda m: m.update(step=-3)), "field `step`"),
    "step-string": (_meta(lambda m: m.update(step="2")), "field `step`"),
    "step-huge": (_meta(lambda m: m.update(step=10**30)), "field `step`"),
    "step-not-its-dir": (_meta(lambda m: m.update(step=1)), "step 1 does not match its directory step-00000002"),
    "step-past-the-run": (_step_past_the_run, "step 9 is past the run's 2 steps"),
    "world-size-zero": (_meta(lambda m: m.update(world_size=0)), "field `world_size`"),
    "config-missing": (_meta(lambda m: m.pop("config")), "field `config`"),
    "trainable-not-shapes": (_meta(lambda m: m.update(trainable={"x": "big"})), "field `trainable`"),
    "evals-not-a-list": (_meta(lambda m: m.update(evals={"a": 1})), "field `evals`"),
    "different-lr": (_meta(lambda m: m["config"].update(lr=0.5)), "cannot resume exactly: lr was 0.5"),
    "different-model-shape": (_meta(lambda m: m.update(trainable={"lm_head.weight": [7, 7]})),
                              "trainable parameters do not match"),
    "trainable-missing": (_remove("trainable.safetensors"), "trainable.safetensors is missing"),
    "trainable-garbage": (_write("trainable.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage"),
                          "trainable.safetensors: unreadable"),
    "trainable-other-shape": (_other_shape, "trainable.safetensors: tensor"),
    "optimizer-missing": (_remove("optimizer.pt"), "optimizer.pt is missing"),
    "optimizer-garbage": (_write("optimizer.pt", b"garbage" * 100), "optimizer.pt: unreadable"),
    "optimizer-pickle-payload": (_evil_optimizer, "optimizer.pt: unreadable"),
    "optimizer-a-tensor": (_save("optimizer.pt", torch.zeros(3)), "optimizer.pt: not an optimizer state"),
    "optimizer-other-shapes": (_optimizer_for_other_shapes, "optimizer.pt: optimizer `exp_avg`"),
    "optimizer-other-settings": (_optimizer_setting("betas", (0.5, 0.5)), "optimizer setting `betas` is (0.5, 0.5)"),
    "optimizer-no-groups": (_save("optimizer.pt", {"state": {}, "param_groups": []}),
                            "optimizer.pt: optimizer state for a different set of parameters"),
    "rng-missing": (_remove("rng-rank0.pt"), "rng-rank0.pt is missing"),
    "rng-wrong-type": (_save("rng-rank0.pt", {"torch": torch.zeros(7)}), "rng-rank0.pt: not a saved random"),
    "rng-a-list": (_save("rng-rank0.pt", [1, 2, 3]), "rng-rank0.pt: not a saved random"),
    "rng-garbage": (_write("rng-rank0.pt", b"\x80\x02garbage"), "rng-rank0.pt: unreadable"),
    "masks-garbage": (_write("masks.safetensors", b"garbage"), "masks.safetensors: unreadable"),
}
_RESUME_DEFAULT = ("trainer-json-garbage", "step-not-its-dir", "different-model-shape", "optimizer-pickle-payload",
                   "optimizer-other-shapes", "rng-wrong-type", "step-past-the-run")


@pytest.mark.parametrize("case", [pytest.param(c, marks=[] if c in _RESUME_DEFAULT else [pytest.mark.slow])
                                  for c in sorted(RESUME_CASES)])
def test_bad_resume(case, run_dir, fx, tmp_path, monkeypatch):
    marker = tmp_path / "evil-ran"
    monkeypatch.setenv("MOECONV_EVIL_MARKER", str(marker))
    run = tmp_path / "runs" / "r.run"
    shutil.copytree(run_dir, run)
    breaker, names = RESUME_CASES[case]
    breaker(run)
    out = _work(tmp_path)
    result, shown = _invoke(["distill", out, "--teacher", fx["good"], "--student", fx["good"], "--data", fx["data"],
                             "--steps", "2", "--batch-size", "2", "--seq-len", "16", "--checkpoint-every", "1",
                             "--eval-rows", "0", "--resume", run])
    err = _assert_clean_failure(result, out, shown)
    assert names in err, err
    assert not marker.exists(), "a pickle payload was executed"


# ---- bounded reading keeps the numbers -------------------------------------------------------------
def test_long_documents_are_tokenized_in_pieces_with_the_same_ids(good, monkeypatch):
    """A document longer than TOKENIZE_CHUNK_CHARS goes to the tokenizer in pieces cut before a
    space: the ids are those of one call."""
    from moeconv.cli.commands.distill import student_tokenizer
    from moeconv.train import data as train_data
    tok = student_tokenizer(str(good))
    doc = " ".join(f"w{(i * 7) % 120 + 3}" for i in range(500)) + "\nw5  w6\n w7"
    whole = tok(doc, add_special_tokens=False)["input_ids"]
    monkeypatch.setattr(train_data, "TOKENIZE_CHUNK_CHARS", 37)
    assert train_data.tokenize_documents(tok, [doc]).tolist() == whole + [tok.eos_token_id]
    for text in (doc, doc + "x" * 100):  # a run without whitespace is cut too: no piece is longer
        pieces = list(train_data._pieces(text))
        assert all(len(p) <= 37 for p in pieces) and "".join(pieces) == text and len(pieces) > 20


def test_calibration_reads_only_what_it_needs_and_the_same_ids(good, tmp_path, monkeypatch):
    from moeconv import data as data_mod
    text = "\n\n".join(" ".join(f"w{(i * 13 + j) % 120 + 3}" for j in range(50)) for i in range(400))
    f = tmp_path / "big.txt"
    f.write_text(text)
    seen = []
    tokenizer = data_mod._tokenizer

    def spy(source):
        tok = tokenizer(source)

        def call(t, **kw):
            seen.append(len(t))
            return tok(t, **kw)
        return call
    monkeypatch.setattr(data_mod, "_tokenizer", spy)
    monkeypatch.setattr(data_mod, "MIN_CALIB_CHARS", 1024)
    ids = data_mod.calibration_tokens(f, str(good), num_samples=4, seq_len=32)
    assert seen == [4 * 32 * data_mod.CHARS_PER_TOKEN] and len(text) > 10 * seen[0]  # a prefix, not the file
    full = tokenizer(str(good))(text, return_tensors="pt").input_ids[0]
    assert ids.tolist() == full[: 4 * 32].reshape(4, 32).tolist()
