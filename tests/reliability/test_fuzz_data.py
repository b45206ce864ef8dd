"""Property tests for the data-side readers (issue 20): random calibration / training files of every
kind, random `--set` overrides of a recipe, and randomly broken distill run directories. The only
allowed outcomes are a valid result or a `MoeconvError` (which the CLI turns into one line), never
another exception. FAST variants run by default; the 1000-example ones with `-m slow`."""
import atexit
import json
import pickle
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from moeconv.errors import MoeconvError

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
VOCAB, POSITIONS = 128, 64  # the `good` fixture's

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
words = st.lists(st.sampled_from(["w3", "w17", "w127", "w64", "w100", "w128", "zz", "[EOS]", "\n", "\n\n", " ",
                                  "\u2028", "é"]), max_size=400).map(" ".join)


# ---- (a) calibration and training files -------------------------------------------------------------
def _safetensors_bytes(header, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


_INT_DTYPES = [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8]
_DTYPES = _INT_DTYPES + [torch.float32, torch.float16, torch.bool]


@st.composite
def tensors(draw):
    dtype = draw(st.sampled_from(_DTYPES))
    shape = draw(st.lists(st.integers(0, 40), min_size=0, max_size=3))
    n = 1
    for s in shape:
        n *= s
    if dtype.is_floating_point:
        t = torch.rand(n).to(dtype)
    elif dtype == torch.bool:
        t = torch.rand(n) > 0.5
    else:
        info = torch.iinfo(dtype)
        lo, hi = draw(st.sampled_from([(0, VOCAB), (0, VOCAB + 2), (max(info.min, -3), VOCAB), (info.min, info.max)]))
        t = torch.randint(lo, hi, (n,), generator=torch.Generator().manual_seed(draw(st.integers(0, 99))), dtype=torch.int64)
        t = t.clamp(info.min, info.max).to(dtype)
    return t.reshape(shape)


good_ids = st.builds(lambda r, c, seed: torch.randint(0, VOCAB, (r, c), generator=torch.Generator().manual_seed(seed)),
                     st.integers(1, 6), st.integers(1, 70), st.integers(0, 9))
odd_tensors = st.sampled_from([
    lambda: torch.sparse_coo_tensor(torch.tensor([[0, 1], [1, 0]]), torch.tensor([3, 4]), (2, 16)),
    lambda: torch.zeros(2, 16, dtype=torch.long).to_sparse_csr(),
    lambda: torch.empty(2, 16, dtype=torch.long, device="meta"),
    lambda: torch.arange(64).reshape(16, 4).t(),
    lambda: torch.zeros(2, 16, dtype=torch.complex64),
    lambda: torch.quantize_per_tensor(torch.zeros(2, 16), 0.1, 0, torch.qint8),
    lambda: torch.nn.Parameter(torch.zeros(2, 16, dtype=torch.long), requires_grad=False),
    lambda: torch.zeros(2, 16, dtype=torch.uint16),
]).map(lambda make: make())
pt_objects = st.one_of(tensors(), good_ids, odd_tensors, json_values, st.dictionaries(st.text(max_size=4), tensors(), max_size=2),
                       st.lists(tensors(), max_size=2))


class _Evil:
    def __reduce__(self):
        return (print, ("a pickle payload ran",))


def _write_pt(obj, name):
    def write(d: Path) -> Path:
        torch.save(obj, d / name)
        return d / name
    return write


def _write_st(ts, name):
    def write(d: Path) -> Path:
        save_file({k: v.contiguous() for k, v in ts.items()}, str(d / name))
        return d / name
    return write


def _write_bytes(raw, name):
    def write(d: Path) -> Path:
        (d / name).write_bytes(raw)
        return d / name
    return write


def _jsonl_line(v) -> str:
    return v if isinstance(v, str) else json.dumps(v)


jsonl_lines = st.one_of(
    st.builds(lambda t: json.dumps({"text": t}), words),
    st.builds(lambda v: json.dumps({"text": v}), json_values),
    json_values.map(json.dumps),
    st.text(max_size=40),
    st.integers(1, 3000).map(lambda n: '{"text": "w5", "x": ' + "[" * n + "]" * n + "}"),
    st.integers(4000, 6000).map(lambda n: '{"text": "w5", "n": 1' + "0" * n + "}"),
)

data_files = st.one_of(
    st.builds(_write_bytes, st.binary(max_size=300), st.sampled_from(["d.txt", "d.jsonl", "d.pt", "d.safetensors"])),
    st.builds(_write_bytes, words.map(str.encode), st.just("d.txt")),
    st.builds(_write_bytes, st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")), st.just("d.txt")),
    st.builds(_write_bytes, st.lists(jsonl_lines, max_size=5).map(lambda ls: "\n".join(ls).encode("utf-8", "surrogatepass")),
              st.just("d.jsonl")),
    st.builds(_write_pt, pt_objects, st.just("d.pt")),
    st.builds(_write_st, st.dictionaries(st.sampled_from(["ids", "a", "b"]), tensors(), max_size=2), st.just("d.safetensors")),
    st.builds(_write_st, st.builds(lambda t: {"ids": t}, good_ids), st.just("d.safetensors")),
    st.builds(_write_bytes, st.builds(_safetensors_bytes,
                                      st.dictionaries(st.text(max_size=4), json_values, max_size=2),
                                      st.binary(max_size=64)), st.just("d.safetensors")),
    st.just(_write_pt(_Evil(), "d.pt")),
)


def _gist(exc: Exception) -> str:
    """The kind of refusal, without file names or numbers (for hypothesis' statistics)."""
    import re
    text = re.sub(r"/\S+|--set \S+|'[^']*'|`[^`]*`|\([^)]*\)", "", str(exc))
    return re.sub(r"-?\d[\d,.]*", "N", text)[:60]


def _check_calibration(good, write, num_samples, seq_len):
    from moeconv.data import calibration_tokens
    with tempfile.TemporaryDirectory() as d:
        path = write(Path(d))
        try:
            ids = calibration_tokens(path, str(good), num_samples=num_samples, seq_len=seq_len)
        except MoeconvError as exc:
            event(f"refused: {_gist(exc)}")
            return
        event("accepted")
        assert ids.dtype == torch.int64 and ids.dim() == 2 and 1 <= ids.shape[0] <= num_samples
        assert 2 <= ids.shape[1] <= POSITIONS and int(ids.min()) >= 0 and int(ids.max()) < VOCAB


def _check_training(good, write, seq_len, eval_fraction):
    from moeconv.cli.commands.distill import student_tokenizer
    from moeconv.train.data import load_token_data
    tok = student_tokenizer(str(good))
    with tempfile.TemporaryDirectory() as d:
        path = write(Path(d))
        try:
            data = load_token_data(path, seq_len=seq_len, tokenizer=tok, eval_fraction=eval_fraction, vocab_size=VOCAB)
        except MoeconvError as exc:
            event(f"refused: {_gist(exc)}")
            return
        event("accepted")
        for rows in (data.train, data.eval):
            if rows is not None:
                assert rows.dtype == torch.int64 and rows.dim() == 2 and rows.shape[1] == seq_len and rows.shape[0] >= 1
                assert int(rows.min()) >= 0 and int(rows.max()) < VOCAB


calib_args = (data_files, st.integers(1, 8) | st.sampled_from([0, -1, 10**6]),
              st.none() | st.integers(2, 16) | st.sampled_from([-1, 0, 1, 64, 65, 100_000]))
train_args = (data_files, st.integers(2, 16) | st.sampled_from([-1, 0, 1, 100_000]),
              st.sampled_from([0.0, 0.1, 0.5, 0.99, 1.0, -0.5]))


@FAST
@given(*calib_args)
def test_calibration_files_fast(good, write, num_samples, seq_len):
    _check_calibration(good, write, num_samples, seq_len)


@FAST
@given(*train_args)
def test_training_files_fast(good, write, seq_len, eval_fraction):
    _check_training(good, write, seq_len, eval_fraction)


@pytest.mark.slow
@SLOW
@given(*calib_args)
def test_calibration_files_1000(good, write, num_samples, seq_len):
    _check_calibration(good, write, num_samples, seq_len)


@pytest.mark.slow
@SLOW
@given(*train_args)
def test_training_files_1000(good, write, seq_len, eval_fraction):
    _check_training(good, write, seq_len, eval_fraction)


# ---- (b) recipes through --set ---------------------------------------------------------------------
BASE = ("steps:\n  - pass: upcycle\n    num_experts: 4\n    top_k: 2\n  - pass: prune-experts\n    keep: 2\n"
        "  - pass: sparsify\n    method: magnitude\n  - pass: quantize\n    method: int8\n  - pass: distill\n"
        "    steps: 2\n")
FIELDS = ["num_experts", "top_k", "seed", "router_init", "expert_init", "targets", "ignore", "keep", "ratio",
          "per_layer", "criterion", "method", "pattern", "blocksize", "steps", "lr", "loss_weights", "layer_map",
          "expert_map", "freeze", "checkpoint_every", "resume", "run_dir", "pass", "zz"]
yaml_values = st.one_of(
    json_values.map(json.dumps),
    st.text(max_size=30),
    st.integers().map(str),
    st.sampled_from(["!!python/object/apply:os.system ['true']", "!!python/name:os.system", "!!binary aGk=",
                     "!!set {a: null}", "!!timestamp 2001-12-14", "&a [*a]", "*a", "[&a [1, 1], [*a, *a]]",
                     "{? [a]: 1}", "{1: 2}", ".inf", ".nan", "-.inf", "0x7fffffffffffffffff", "1e400", "~", "",
                     "'", "[", "{a: [", "2**70", str(2**64), str(-2**63 - 1), "1" + "0" * 5000, "[" * 40 + "]" * 40]),
    st.integers(1, 4000).map(lambda n: "[" * n + "]" * n),
)
STEP_KEYS = ["1", "2", "3", "4", "5", "upcycle", "sparsify", "quantize", "distill", "prune-experts"]
valid_values = st.sampled_from(["1", "2", "4", "0.5", "normal", "hidden", "magnitude", "wanda", "nf4", "int8", "[experts]",
                                "{kl: 1}", "{0: 1}", "[0, 0, 1, 1]", "7", "null", "true", "reap", "2:4", "global"])
_STEP_PASSES = {"1": "upcycle", "2": "prune-experts", "3": "sparsify", "4": "quantize", "5": "distill"}


@st.composite
def own_field(draw):
    """STEP.FIELD with FIELD one of that step's pass's own config fields."""
    from passes import BY_NAME
    key = draw(st.sampled_from(STEP_KEYS))
    fields = sorted(BY_NAME[_STEP_PASSES.get(key, key)].Config.model_fields)
    return f"{key}.{draw(st.sampled_from(fields))}"


override_items = st.one_of(
    st.builds(lambda k, v: f"{k}={v}", own_field(), valid_values),
    st.builds(lambda k, v: f"{k}={v}", own_field(), yaml_values),
    st.builds(lambda s, f, v: f"{s}.{f}={v}", st.sampled_from(STEP_KEYS), st.sampled_from(FIELDS), yaml_values),
    st.builds(lambda s, f, v: f"{s}.{f}={v}", st.sampled_from(STEP_KEYS + ["0", "6", "x", ""]) | st.text(max_size=5),
              st.sampled_from(FIELDS) | st.text(max_size=6), yaml_values),
    st.text(max_size=20),
)
overrides = st.lists(override_items, min_size=1, max_size=2)


def _check_overrides(items):
    from moeconv.pipeline import Pipeline
    from moeconv.recipe import apply_overrides, build_passes, parse_recipe
    steps = parse_recipe(BASE, "r.yaml")
    try:
        apply_overrides(steps, items)
        passes = build_passes(steps, "r.yaml")
        for facts in ({"dense-ffn", "float-weights", "hf-config"}, {"dense-ffn", "float-weights", "hf-config",
                                                                     "calibration"}):
            Pipeline(passes).plan(set(facts))
    except MoeconvError as exc:
        event(f"refused: {_gist(exc)}")
        return
    event("accepted")


@FAST
@given(overrides)
def test_recipe_overrides_fast(items):
    _check_overrides(items)


@pytest.mark.slow
@SLOW
@given(overrides)
def test_recipe_overrides_1000(items):
    _check_overrides(items)


def test_plan_command_with_overrides(tmp_path):
    """The same values through `moeconv plan --set` (in process): one line and exit 2, or a plan."""
    from tests.reliability.test_bad_inputs import _invoke
    recipe = tmp_path / "r.yaml"
    recipe.write_text(BASE)
    for value in ["!!python/object/apply:os.system ['true']", "[&a [1, 1], [*a, *a]]", "1" + "0" * 30,
                  "[" * 100 + "]" * 100, "{1: 2}", "2"]:
        result, shown = _invoke(["plan", recipe, "--set", f"upcycle.top_k={value}"])
        assert result.exit_code in (0, 2) and not shown, result.output
        assert "Traceback" not in result.output
        if result.exit_code == 2:
            assert result.stderr.strip().startswith("error:") and "\n" not in result.stderr.strip()


# ---- (c) distill run directories (the resume reader) ------------------------------------------------
_BASE_RUN: dict = {}
FILES = ["trainer.json", "trainable.safetensors", "masks.safetensors", "optimizer.pt", "rng-rank0.pt"]
META_FIELDS = ["format_version", "step", "world_size", "config", "data", "trainable", "evals"]


def _objective():
    from tests.train.tiny_lm import TinyLM
    from moeconv.train.objective import DistillObjective, LossWeights, ObjectiveSpec
    return DistillObjective(TinyLM(seed=2, hidden=8, layers=1), TinyLM(seed=1, hidden=8, layers=1),
                            ObjectiveSpec(LossWeights(kl=1.0), temperature=2.0))


def _config():
    from moeconv.train.trainer import TrainConfig
    return TrainConfig(steps=3, lr=1e-3, batch_size=4, checkpoint_every=1)


def _base_run() -> Path:
    """A real 3-step run with masks, checkpointed at every step (built once per process)."""
    if "dir" not in _BASE_RUN:
        from tests.train.tiny_lm import rows
        from moeconv.train.trainer import Trainer
        d = Path(tempfile.mkdtemp(prefix="moeconv-fuzz-run-"))
        obj = _objective()
        masks = {n: torch.zeros_like(p, dtype=torch.bool) for n, p in obj.named_parameters()
                 if p.requires_grad and n.endswith("head.weight")}
        Trainer(obj, rows(8), _config(), masks=masks, run_dir=d).fit()
        _BASE_RUN["dir"], _BASE_RUN["masks"] = d, masks
        atexit.register(shutil.rmtree, d, True)
    return _BASE_RUN["dir"]


mutations = st.one_of(
    st.tuples(st.just("meta-field"), st.sampled_from(META_FIELDS), json_values),
    st.tuples(st.just("meta-config"), st.sampled_from(["steps", "lr", "seed", "batch_size", "betas", "x"]), json_values),
    st.tuples(st.just("meta-drop"), st.sampled_from(META_FIELDS), st.none()),
    st.tuples(st.just("bytes"), st.sampled_from(FILES), st.binary(max_size=200)),
    st.tuples(st.just("torch"), st.sampled_from(FILES), pt_objects),
    st.tuples(st.just("safetensors"), st.sampled_from(FILES), st.dictionaries(
        st.sampled_from(["student.head.weight", "student.embed.weight", "x"]), tensors(), max_size=2)),
    st.tuples(st.just("delete"), st.sampled_from(FILES), st.none()),
    st.tuples(st.just("rename"), st.sampled_from(["step-00000009", "step-x", "step-00000001x"]), st.none()),
    st.tuples(st.just("metrics"), st.just("metrics.jsonl"), st.lists(jsonl_lines | st.binary(max_size=20).map(
        lambda b: b.decode("latin-1")), max_size=4)),
    st.tuples(st.just("evil"), st.sampled_from(["optimizer.pt", "rng-rank0.pt"]), st.none()),
    st.tuples(st.just("opt-group"), st.sampled_from(["betas", "eps", "weight_decay", "amsgrad", "params", "foreach",
                                                     "maximize", "lr", "fused"]),
              json_values | tensors() | st.lists(tensors(), max_size=2).map(tuple)),
    st.tuples(st.just("opt-key"), st.sampled_from([0, 1, "0", -1]), tensors() | json_values),
    st.tuples(st.just("opt-state"), st.sampled_from(["step", "exp_avg", "exp_avg_sq", "x"]), tensors() | odd_tensors),
    st.tuples(st.just("torch"), st.sampled_from(["rng-rank0.pt", "optimizer.pt"]),
              st.fixed_dictionaries({"torch": tensors() | odd_tensors}, optional={"cuda": tensors() | json_values})),
)


def _mutate(run: Path, kind: str, target: str, value) -> None:
    ckpt = sorted((run / "checkpoints").glob("step-*"))[-1]
    if kind in ("meta-field", "meta-config", "meta-drop"):
        try:
            meta = json.loads((ckpt / "trainer.json").read_text())
        except (OSError, ValueError):  # an earlier change broke or removed it
            return
        if not isinstance(meta, dict):
            return
        if kind == "meta-field":
            meta[target] = value
        elif kind == "meta-drop":
            meta.pop(target, None)
        elif isinstance(meta.get("config"), dict):
            meta["config"][target] = value
        (ckpt / "trainer.json").write_text(json.dumps(meta))
    elif kind == "bytes":
        (ckpt / target).write_bytes(value)
    elif kind == "torch":
        torch.save(value, ckpt / target)
    elif kind == "safetensors":
        save_file({k: v.contiguous() for k, v in value.items()}, str(ckpt / target))
    elif kind == "delete":
        (ckpt / target).unlink(missing_ok=True)
    elif kind == "rename" and not (ckpt.parent / target).exists():
        ckpt.rename(ckpt.parent / target)
    elif kind == "metrics":
        (run / "metrics.jsonl").write_text("\n".join(value), encoding="utf-8", errors="surrogatepass")
    elif kind in ("opt-group", "opt-state", "opt-key"):
        try:
            opt = torch.load(ckpt / "optimizer.pt", weights_only=True)
            if kind == "opt-group":
                opt["param_groups"][0][target] = value
            elif kind == "opt-key":
                opt["state"][target] = opt["state"].pop(0) if isinstance(value, torch.Tensor) else value
            else:
                for v in opt["state"].values():
                    v[target] = value
        except Exception:  # an earlier change broke it: leave it broken
            return
        torch.save(opt, ckpt / "optimizer.pt")
    elif kind == "evil":
        with open(ckpt / target, "wb") as fh:
            pickle.dump({"state": _Evil()}, fh, protocol=2)


def _check_resume(changes):
    from tests.train.tiny_lm import rows
    from moeconv.train.trainer import Trainer
    base = _base_run()
    with tempfile.TemporaryDirectory() as d:
        run = Path(d) / "run"
        shutil.copytree(base, run)
        for change in changes:
            _mutate(run, *change)
        obj = _objective()
        masks = {n: m.clone() for n, m in _BASE_RUN["masks"].items()}
        try:
            result = Trainer(obj, rows(8), _config(), masks=masks, run_dir=run).fit(run)
        except MoeconvError as exc:
            event(f"refused: {_gist(exc)[:40]}")
            return
        event("resumed")
        assert 1 <= result.resumed_from <= 3


resume_changes = st.lists(mutations, min_size=1, max_size=3)


@FAST
@given(resume_changes)
def test_resume_reader_fast(changes):
    _check_resume(changes)


@pytest.mark.slow
@SLOW
@given(resume_changes)
def test_resume_reader_1000(changes):
    _check_resume(changes)
