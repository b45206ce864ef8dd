"""`--device cpu|cuda` on the streamed routes (quantize, sparsify, prune-experts, run): the option is
checked at the edge (one line, exit 2, nothing written, no tensor read), `--device cpu` writes the
default's bytes, the memory plan counts what sits on the GPU apart from host memory, and on a CUDA
GPU the same recipes run one decoder layer at a time on it. Without a GPU those tests run on one
emulated on the CPU (`emulated_cuda`: device placement, host reads and GPU memory are checked,
speed and CUDA's own kernels are not)."""
from __future__ import annotations

import contextlib
import gc
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from moeconv.cli import app
from moeconv.errors import ConfigError, MemoryPlanError
from moeconv.io.safetensors_io import SourceCheckpoint
from moeconv.stream.skeleton import Skeleton
from tests.stream.emulated_cuda import emulated_cuda
from tests.stream.test_stream import _mixtral

ROOT = Path(__file__).resolve().parents[2]
CALIB = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(1))
RECIPE = ("steps:\n  - pass: prune-experts\n    keep: 3\n  - pass: sparsify\n    method: wanda\n"
          "  - pass: quantize\n    method: int8\n")


def on_gpu():
    """Where the CUDA tests run: the GPU torch sees, else one emulated on the CPU."""
    return contextlib.nullcontext() if torch.cuda.is_available() else emulated_cuda()


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """A 3-layer bf16 Mixtral (hidden 64, 4 experts), its calibration ids and a recipe."""
    root = tmp_path_factory.mktemp("device")
    save_file({"ids": CALIB}, root / "ids.safetensors")
    (root / "recipe.yaml").write_text(RECIPE)
    return _mixtral(root / "src")


def _ids(src: Path) -> Path:
    return src.parent / "ids.safetensors"


def _argv(command: str, src: Path, out: Path) -> list[str]:
    """The command line of `command` on `src` into `out` (calibrated commands get the ids)."""
    ids = str(_ids(src))
    return {"quantize": ["quantize", str(src), str(out), "--method", "int8"],
            "sparsify": ["sparsify", str(src), str(out), "--method", "wanda", "--calib", ids],
            "prune-experts": ["prune-experts", str(src), str(out), "--keep", "3", "--calib", ids],
            "run": ["run", str(src.parent / "recipe.yaml"), "--model", str(src), "--out", str(out), "--calib", ids],
            }[command]


def _refused(argv: list[str], out: Path) -> str:
    """The one stderr line of a run refused with exit 2 that wrote nothing."""
    r = CliRunner().invoke(app, argv)
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.output, r.stderr
    assert not out.exists() and not list(out.parent.glob(f".{out.name}*"))
    return lines[0]


# ---- at the edge ------------------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present")
@pytest.mark.parametrize("command", ["quantize", "sparsify", "prune-experts", "run"])
def test_cuda_without_a_gpu_is_one_line_and_nothing_written(command, src, tmp_path):
    line = _refused(_argv(command, src, tmp_path / "out") + ["--device", "cuda"], tmp_path / "out")
    assert line.startswith("error: --device cuda: torch sees no CUDA GPU") and "--device cpu" in line, line


@pytest.mark.parametrize("value", ["tpu", "cuda:1", "CPU", ""])
def test_a_device_other_than_cpu_or_cuda_is_refused(value, src, tmp_path):
    for command in ("quantize", "run"):
        line = _refused(_argv(command, src, tmp_path / "out") + ["--device", value], tmp_path / "out")
        assert line == f"error: --device must be cpu or cuda, not {value!r}", line


def test_cuda_on_the_in_memory_route_says_why(src, tmp_path, monkeypatch):
    """A run that loads the whole model (compressed-tensors quantize, `run --format hf`) cannot
    onload layers one at a time: `--device cuda` is refused with the route's reason, before the
    model is read (torch is told a GPU exists; nothing reaches it)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    out = tmp_path / "out"
    line = _refused(["quantize", str(src), str(out), "--method", "w4a16", "--device", "cuda"], out)
    assert "--device cuda runs the streamed route" in line and "quantize --method w4a16 is not streamed" in line
    line = _refused(_argv("run", src, out) + ["--format", "hf", "--device", "cuda"], out)
    assert "--device cuda runs the streamed route" in line and "--format hf is written from a model in memory" in line


def test_skeleton_devices(src, monkeypatch):
    skel = Skeleton.open(src, device="cpu")
    assert skel.device == torch.device("cpu") and skel.reading(src).device == torch.device("cpu")
    with pytest.raises(ConfigError, match="--device must be cpu or cuda"):
        skel.on("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="torch sees no CUDA GPU"):
        Skeleton.open(src, device="cuda")


# ---- cpu is the default, byte for byte --------------------------------------------------------

def _files(out: Path) -> dict[str, bytes]:
    """Every file the run wrote but its report (which holds timings)."""
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and not p.name.startswith("report.")}


@pytest.mark.parametrize("command", ["quantize", "sparsify"])
def test_device_cpu_writes_the_defaults_bytes(command, src, tmp_path):
    runs = {}
    for name, extra in {"default": [], "cpu": ["--device", "cpu"]}.items():
        r = CliRunner().invoke(app, _argv(command, src, tmp_path / name) + extra)
        assert r.exit_code == 0, r.output
        runs[name] = json.loads((tmp_path / name / "report.json").read_text())
    default, cpu = _files(tmp_path / "default"), _files(tmp_path / "cpu")
    assert any(n.endswith(".safetensors") for n in default) and default == cpu
    assert runs["cpu"]["route"]["route"] == "streaming"
    assert runs["cpu"]["memory_plan"] == runs["default"]["memory_plan"]
    assert runs["cpu"]["memory_plan"]["device"] == "cpu" and runs["cpu"]["memory_plan"]["on_device"] == {}
    assert runs["cpu"]["verification"] == runs["default"]["verification"]


# ---- the memory plan --------------------------------------------------------------------------

def test_the_plan_counts_what_sits_on_the_gpu_apart(src, monkeypatch):
    from moeconv import memory_plan as mp
    from passes.sparsify import Sparsify
    kw = dict(calib_tokens=CALIB.numel(), calib_seq_len=CALIB.shape[1])
    cpu = mp.plan_streaming(src, [Sparsify(method="wanda")], **kw)
    gpu = mp.plan_streaming(src, [Sparsify(method="wanda")], device="cuda", **kw)
    moved = {mp.STREAM_LAYER, mp.STREAM_OUTER, mp.ACTIVATIONS, mp.HESSIANS, mp.PRUNING}
    assert cpu.device == "cpu" and cpu.on_device == {} and moved <= set(cpu.parts)
    assert gpu.device == "cuda" and set(gpu.on_device) == moved and not moved & set(gpu.parts)
    assert gpu.on_device == {k: cpu.parts[k] for k in moved}  # the same working set, on the GPU
    assert gpu.total == sum(gpu.parts.values()) == cpu.total - sum(gpu.on_device.values()) \
        + gpu.parts[mp.CUDA_RUNTIME] + gpu.parts[mp.STREAM_TRANSIT]
    assert gpu.to_dict()["on_device"] == gpu.on_device
    # --max-memory is host memory: the GPU's share never counts against it ...
    monkeypatch.setattr(mp, "gpu_memory_free", lambda: 2**40)
    mp.check_plan(gpu, gpu.total)
    with pytest.raises(MemoryPlanError) as exc:
        mp.check_plan(gpu, gpu.total - 1)
    assert "Hessians" not in str(exc.value) and "CUDA runtime" in str(exc.value)
    # ... and what is on the GPU is checked against its free memory, in one line
    with pytest.raises(MemoryPlanError) as exc:
        mp.check_device_plan(gpu, capacity=1000)
    line = exc.value.one_line()
    assert "of GPU memory" in line and "Hessians" in line and "free on the GPU" in line and "--device cpu" in line
    mp.check_device_plan(cpu, capacity=0)  # a CPU plan holds nothing on a GPU


def test_run_dry_run_shows_the_gpu_share(src, monkeypatch):
    """`run --dry-run --device cuda` prints the plan with the GPU's parts marked (torch is told a
    GPU with 1 TiB free exists; a dry run reads the model on the CPU only)."""
    from moeconv import memory_plan as mp
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(mp, "gpu_memory_free", lambda: 2**40)
    r = CliRunner().invoke(app, _argv("run", src, src.parent / "never") + ["--dry-run", "--device", "cuda"],
                           env={"COLUMNS": "250"})
    assert r.exit_code == 0, r.output
    text = " ".join(r.stdout.split())
    assert "per-layer Hessians (on cuda)" in text and "CUDA runtime (host side)" in text, text
    assert "of host memory, " in text and "on the cuda GPU, at the peak" in text and "streaming route" in text, text
    monkeypatch.setattr(mp, "gpu_memory_free", lambda: 1000)
    line = _refused(_argv("run", src, src.parent / "never") + ["--dry-run", "--device", "cuda"], src.parent / "never")
    assert "free on the GPU" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present")
def test_the_device_benchmark_says_it_needs_a_gpu(capsys):
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_device
    assert bench_device.main([]) == 2
    assert "torch sees no CUDA GPU" in capsys.readouterr().err


# ---- on a CUDA GPU ----------------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="a real CUDA GPU is present (tested below)")
@pytest.mark.parametrize("command", ["quantize", "sparsify", "prune-experts", "run"])
def test_on_an_emulated_gpu_each_command_writes_the_cpu_runs_bytes_within_its_gpu_plan(command, src, tmp_path):
    """`--device cuda` on a GPU emulated with CPU kernels: every tensor a step makes meets the
    layer on the GPU (a CPU tensor in a GPU op is torch's device error there), and with the same
    kernels the output is the CPU run's, byte for byte, with the same check. The GPU's peak
    stays within what the memory plan put on it, and nothing is left on it at the end."""
    r = CliRunner().invoke(app, _argv(command, src, tmp_path / "cpu"))
    assert r.exit_code == 0, r.output
    with emulated_cuda() as gpu:
        base = torch.cuda.memory_allocated()
        r = CliRunner().invoke(app, _argv(command, src, tmp_path / "gpu") + ["--device", "cuda"])
        assert r.exit_code == 0, r.output
        gc.collect()
        left = torch.cuda.memory_allocated() - base
        peak = gpu.peak - base
    cpu, emu = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("cpu", "gpu"))
    assert emu["memory_plan"]["device"] == "cuda" and cpu["memory_plan"]["device"] == "cpu"
    assert _files(tmp_path / "gpu") == _files(tmp_path / "cpu")
    assert emu["verification"] == cpu["verification"]
    planned = sum(emu["memory_plan"]["on_device"].values())
    assert 0 < peak <= planned, f"GPU peak {peak} B > planned {planned} B"
    assert left == 0, f"{left} B left on the GPU"


# Without a real GPU the deep runs below go through the emulator, which runs every op through
# Python: minutes each, so they are `slow` there; the small-model test above covers the default run
ON_EMULATION_SLOW = [] if torch.cuda.is_available() else [pytest.mark.slow]


@pytest.fixture(scope="module")
def deep_src(tmp_path_factory):
    """An 8-layer synthetic bf16 Mixtral (hidden 512, 4 experts of 1024; ~14 MB a layer), deep
    enough that a few layers are much less than the whole model, with calibration ids and a recipe."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from synthetic_checkpoint import MixtralShape, write_checkpoint
    root = tmp_path_factory.mktemp("device-gpu")
    shape = MixtralShape(layers=8, hidden=512, intermediate=1024, experts=4, heads=8, kv_heads=2, vocab=512)
    write_checkpoint(root / "src", shape, shard_size="64MB", tokenizer=False)
    ids = torch.randint(3, shape.vocab, (8, 64), generator=torch.Generator().manual_seed(1))
    save_file({"ids": ids}, root / "ids.safetensors")
    (root / "recipe.yaml").write_text(RECIPE)
    return root / "src"


def _deep_argv(command: str, src: Path, out: Path) -> list[str]:
    argv = _argv(command, src, out)
    return argv + (["--calib-samples", "8", "--calib-seq-len", "64"] if command == "sparsify" else [])


def _layer_bytes(src: Path) -> tuple[int, int, int]:
    """(largest decoder layer, everything outside the layers, the whole model), stored bytes."""
    layers: dict[str, int] = {}
    outer = 0
    for spec in SourceCheckpoint(src).specs.values():
        if ".layers." in spec.name:
            key = spec.name.split(".layers.")[1].split(".")[0]
            layers[key] = layers.get(key, 0) + spec.nbytes
        else:
            outer += spec.nbytes
    return max(layers.values()), outer, sum(layers.values()) + outer


def _warm_up_cuda() -> None:
    """Allocate what CUDA libraries keep for the process (cuBLAS / cuBLASLt workspaces, bitsandbytes'
    int8 path) before the peak is measured, so the peak is the run's own tensors."""
    from moeconv.nn.quantized import refuse_hub_kernels
    refuse_hub_kernels()  # as moeconv imports bitsandbytes: no code fetched from the Hub
    import bitsandbytes as bnb
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        a = torch.randn(64, 64, device="cuda", dtype=dtype)
        (a @ a).sum().item()
    lin = bnb.nn.Linear8bitLt(64, 64, bias=False, has_fp16_weights=False)
    lin.weight = bnb.nn.Int8Params(torch.randn(64, 64), requires_grad=False, has_fp16_weights=False)
    lin = lin.cuda()
    lin(torch.randn(4, 64, device="cuda", dtype=torch.float16)).sum().item()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


@pytest.mark.parametrize("command", [pytest.param(c, marks=ON_EMULATION_SLOW) for c in ("quantize", "sparsify", "run")])
def test_cuda_runs_the_recipe_one_layer_at_a_time_close_to_the_cpu_run(command, deep_src, tmp_path):
    """quantize int8, sparsify wanda and prune-experts → sparsify → quantize, with `--device cuda`:
    the same output layout as on the CPU and a measured change close to the CPU run's. Not equal:
    the weights may differ in the last bit between CUDA and CPU kernels (bitsandbytes' int8
    rounding, matmul summation order in the calibration statistics, near-ties in the scores that
    choose what to prune), and the check itself runs on each device's kernels. Peak GPU memory
    (in-process, `torch.cuda.max_memory_allocated` above what CUDA's libraries keep) stays below
    the embeddings and head plus four layers' bytes: the layer at work with its statistics, then
    one layer of each model in the check; the model is twice that."""
    r = CliRunner().invoke(app, _deep_argv(command, deep_src, tmp_path / "cpu"))
    assert r.exit_code == 0, r.output
    with on_gpu():
        _warm_up_cuda()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        r = CliRunner().invoke(app, _deep_argv(command, deep_src, tmp_path / "gpu") + ["--device", "cuda"])
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    assert r.exit_code == 0, r.output
    cpu, gpu = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("cpu", "gpu"))
    assert gpu["route"]["route"] == "streaming" and gpu["memory_plan"]["device"] == "cuda"
    assert gpu["memory_plan"]["on_device"] and "CUDA runtime (host side)" in gpu["memory_plan"]["parts"]
    assert [p["pass_name"] for p in gpu["passes"]] == [p["pass_name"] for p in cpu["passes"]]
    a, b = SourceCheckpoint(tmp_path / "cpu"), SourceCheckpoint(tmp_path / "gpu")
    assert a.specs == b.specs  # the same tensors (names, dtypes, shapes)
    if command == "quantize":  # no data: only bitsandbytes' own rounding may differ
        for name in a.names():
            x, y = a.get(name), b.get(name)
            if x.dtype == torch.int8:
                assert (x.int() - y.int()).abs().max() <= 1, name
            elif x.is_floating_point():
                torch.testing.assert_close(x, y, rtol=1e-3, atol=0, msg=name)
    v, w = cpu["verification"], gpu["verification"]
    assert w["rel_max_diff"] == pytest.approx(v["rel_max_diff"], rel=0.5, abs=0.02)
    assert w["kl"] == pytest.approx(v["kl"], rel=0.5, abs=2e-3)
    assert w["top1_agreement"] == pytest.approx(v["top1_agreement"], abs=0.15)
    layer, outer, whole = _layer_bytes(deep_src)
    bound = outer + 4 * layer
    assert bound < whole / 1.5  # the premise: a few layers are well short of the model
    assert 0 < peak <= bound, f"peak {peak / 2**20:.1f} MiB > {bound / 2**20:.1f} MiB (layer {layer / 2**20:.1f} MiB)"
