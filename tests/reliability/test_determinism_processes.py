"""Two runs of each command with the same seed, in two separate processes, write byte-identical outputs.

`test_determinism` runs both inside one process, where every set and every hash-keyed order is
the same in both runs, so output that follows the hash seed passes there. Here each run is a fresh
`python -m moeconv.cli` with its own, explicitly different PYTHONHASHSEED (explicit so the test
does not depend on the luck of two random seeds), and the files are compared as there.
"""
from pathlib import Path

import pytest

from tests.reliability.cli_process import run_cli
from tests.reliability.test_determinism import COMMANDS, RECIPE, SEED, assert_same_outputs

HASH_SEEDS = ("1", "2")
# Each test is two fresh processes (~2.5 s just to start each). Measured on a shared 2-core
# machine: upcycle, upcycle-moeconv 11 s, quantize 15 s (the default run: the streaming upcycle is
# where hash-seed order showed up); sparsify, prune-experts, run 13 s, distill 14 s, export-onnx 22 s.
HEAVY = {"distill", "export-onnx", "prune-experts", "run", "sparsify"}


def _run(command: str, out: Path, fixtures: tuple, *, seed: list[str], hash_seed: str) -> Path:
    """`moeconv COMMAND … --seed N` into OUT in a fresh process with PYTHONHASHSEED=`hash_seed`."""
    args = [str(x).format(out=out) for x in COMMANDS[command](*fixtures)] + seed
    # One intra-op thread: tiny models gain nothing from more, and the 2-core machine is shared.
    result = run_cli(args, env={"PYTHONHASHSEED": hash_seed, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def _fixtures(good, moe, data, tmp_path: Path) -> tuple:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    return good, moe, data, recipe


def _out(tmp_path: Path, run: str) -> Path:
    (tmp_path / run).mkdir()
    return tmp_path / run / "out"


@pytest.mark.parametrize("command", [pytest.param(c, marks=pytest.mark.slow) if c in HEAVY else c
                                     for c in sorted(COMMANDS)])
def test_two_processes_are_byte_identical(command, good, moe, data, tmp_path):
    fixtures = _fixtures(good, moe, data, tmp_path)
    outs = [_run(command, _out(tmp_path, f"hash{h}"), fixtures, seed=SEED, hash_seed=h) for h in HASH_SEEDS]
    assert_same_outputs(*outs)


def test_another_seed_changes_the_output_across_processes(good, tmp_path):
    """The comparison can fail across processes: same hash seed, another --seed, other bytes."""
    fixtures = (good, None, None, None)
    outs = [_run("upcycle", _out(tmp_path, seed), fixtures, seed=["--seed", seed], hash_seed=HASH_SEEDS[0])
            for seed in ("7", "8")]
    with pytest.raises(AssertionError, match="safetensors differs"):
        assert_same_outputs(*outs)


def test_source_names_are_sorted_whatever_the_sharding(tmp_path):
    """`SourceCheckpoint.names()` (the streaming upcycle's output order) is sorted by name, not the
    order of a set or of the shards: the cause of the cross-process difference above."""
    import json

    import torch
    from safetensors.torch import save_file

    from moeconv.io.safetensors_io import INDEX_NAME, SourceCheckpoint
    shards = {"model-00001-of-00002.safetensors": ["z.weight", "m.weight"],
              "model-00002-of-00002.safetensors": ["b.weight", "a.weight"]}
    for fname, names in shards.items():
        save_file({n: torch.zeros(1) for n in names}, str(tmp_path / fname))
    weight_map = {n: fname for fname, names in shards.items() for n in names}
    (tmp_path / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert SourceCheckpoint(tmp_path).names() == ["a.weight", "b.weight", "m.weight", "z.weight"]
