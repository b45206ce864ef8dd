"""`upcycle_checkpoint`: the `moeconv upcycle SRC OUT` job — a dense checkpoint in, a verified MoE
checkpoint out. (A job built on the `upcycle` pass, not a pass itself: the registry lists passes.)

Two routes, same numbers for the same seed (both call `moeconv.expert_init`):
- **streaming** (HF family with safetensors → HF MoE family): the architecture is built on the
  `meta` device (no weights) to find the FFN sites; output tensors are planned up front and
  produced one at a time from the source shards, so peak memory is about one layer's FFN plus
  one output tensor, whatever the model size or shard size.
- **in memory** (GGUF, built-in and other models, `router_init=hidden`, or `--format moeconv`):
  load → `Pipeline([Upcycle])` (its numeric check proves exactness) → write.

Either way the output is written to a hidden sibling directory, every tensor is re-read and
checksummed, the output is loaded with the consumer users have (stock transformers or
`moeconv.load`) and compared with the dense model, and only then renamed into place.
"""
from __future__ import annotations

import json
import math
import re
import shutil
import time
from pathlib import Path
from typing import Literal

import torch

from moeconv import Context, Pipeline, __version__
from moeconv.errors import InputError, UnsupportedError, VerificationError
from moeconv.expert_init import expert_tensors, router_weight, split_partition
from moeconv.formats.hf_moe import MoeFormat, check_representable, format_for, moe_config_dict, rename
from moeconv.formats.native import save_moeconv
from moeconv.formats.writer import TensorSource, module_source, write_checkpoint
from moeconv.io.atomic import atomic_output_dir, check_new_output
from moeconv.io.config_checks import check_fits_disk, check_layers_present
from moeconv.io.json_files import read_json_object
from moeconv.io.load import TOKENIZER_FILES, hf_config, load
from moeconv.io.transformers_io import load_causal_lm, model_class, read_tokenizer
from moeconv.io.safetensors_io import SourceCheckpoint, TensorSpec
from moeconv.pass_base import EXACT_RTOL
from moeconv.patterns import find_ffn_sites
from moeconv.sites import expert_rel_names, role_paths, select_sites
from moeconv.state import model_outputs
from passes.upcycle import Upcycle, UpcycleConfig

FormatChoice = Literal["auto", "hf", "moeconv"]
MAX_PLANNED_TENSORS = 2_000_000  # DeepSeek-V3 upcycled-size plans are ~50k
FULL_VERIFY_MAX_BYTES = 3 * 2**30  # functional check loads dense + MoE; above this, weights only


def parse_size(text: str | int) -> int:
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*", str(text), re.I)
    if not m:
        raise InputError(f"bad size {text!r}: use e.g. 5GB, 500MB, 2GiB")
    unit = m.group(2).upper().rstrip("B").replace("I", "")
    mult = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}[unit]
    if "I" in m.group(2).upper():
        mult = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[unit]
    size = int(float(m.group(1)) * mult)
    if size <= 0:
        raise InputError(f"bad size {text!r}: must be positive")
    return size


def upcycle_checkpoint(src, out, cfg: UpcycleConfig, *, fmt: FormatChoice = "auto", dtype: torch.dtype | None = None,
                       shard_size="5GB", force: bool = False, verify: Literal["auto", "full", "weights"] = "auto",
                       calibration: torch.Tensor | None = None, progress=None) -> dict:
    """Convert `src` to an MoE checkpoint at `out`; returns the report (also written as report.json)."""
    t0 = time.perf_counter()
    shard_bytes = parse_size(shard_size)
    out = Path(out)
    src_path = Path(str(src)) if not str(src).startswith("builtin:") else None
    raw = None
    if src_path is not None and src_path.is_dir() and (src_path / "config.json").is_file():
        raw = read_json_object(src_path / "config.json")
    family = format_for(raw.get("model_type")) if raw and "moeconv" not in raw else None
    if fmt == "hf" and family is None:
        what = raw.get("model_type") if raw else str(src)
        raise UnsupportedError(f"--format hf: no Hugging Face MoE family for {what!r} (llama/mistral → Mixtral, "
                               "qwen2 → Qwen2-MoE, qwen3 → Qwen3-MoE); use --format moeconv")
    check_new_output(out, force=force)
    streaming = (family is not None and fmt != "moeconv" and cfg.router_init != "hidden"
                 and ((src_path / "model.safetensors").is_file() or (src_path / "model.safetensors.index.json").is_file()))
    inputs = tuple(p for p in (src_path,) if p is not None and p.exists())
    with atomic_output_dir(out, force=force, inputs=inputs) as tmp:
        if streaming:
            report = _stream_hf(src_path, raw, tmp, cfg, family, dtype, shard_bytes, verify, progress)
        else:
            report = _in_memory(src, tmp, cfg, family if fmt != "moeconv" else None, dtype, shard_bytes,
                                verify, calibration, progress)
        _copy_tokenizer(src_path, tmp, report)
        report.update({"moeconv_version": __version__, "source": str(src), "output": str(out),
                       "seconds": round(time.perf_counter() - t0, 2),
                       "recipe": [{"pass": "upcycle", **cfg.model_dump()}]})
        (tmp / "recipe.json").write_text(json.dumps(report["recipe"], indent=2) + "\n")
        (tmp / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    return report


# ----------------------------------------------------------------------------- in memory


def _in_memory(src, tmp: Path, cfg: UpcycleConfig, family: MoeFormat | None, dtype, shard_bytes, verify,
               calibration, progress) -> dict:
    state = load(src, dtype=dtype)
    if family is None and state.config is not None:
        family = format_for(getattr(state.config, "model_type", None)) if state.source.kind == "gguf" else None
    sites = find_ffn_sites(state.module)
    chosen = select_sites(sites, cfg.targets, cfg.ignore)
    if family is not None:
        _check_family(family, state.config.to_dict(), cfg, sites, chosen)
    ctx = Context(calibration=calibration, seed=cfg.seed, progress=progress)
    result = Pipeline([Upcycle(cfg)]).run(state, ctx)
    state = result.state
    pass_report = result.report.passes[0]
    on_tensor = _tensor_progress(progress, len(state.module.state_dict()))
    if family is not None:
        config = moe_config_dict(family, state.config.to_dict(), **_moe_args(cfg, sites, chosen, state.config.to_dict()))
        site_paths = [s.path for _, s in chosen]
        roles = expert_rel_names(chosen[0][1])
        target_dtype = _config_dtype(config) or next(state.module.parameters()).dtype

        def cast(name, t):  # routers are fp32 in memory; HF families keep them in the model dtype
            return t.to(target_dtype) if t.is_floating_point() and t.dtype != target_dtype else t
        source = module_source(state.module, lambda n: rename(family, site_paths, roles, n), cast)
        stats = write_checkpoint(tmp, source, config, shard_bytes=shard_bytes, on_tensor=on_tensor)
        stats["notes"] = source.notes
        consumer = f"transformers.AutoModelForCausalLM ({family.architecture})"
    else:
        stats = save_moeconv(state, tmp, shard_bytes=shard_bytes, on_tensor=on_tensor)
        consumer = "moeconv.load"
    report = {"route": "in-memory", "format": family.name if family else "moeconv", "consumer": consumer,
              "upcycle": pass_report.to_dict(), "written": stats}
    # Reload with the consumer and compare against the in-memory MoE model (itself checked
    # against the dense model by the pass's numeric check).
    report["verification"] = _verify_reload(tmp, state.module, family, cfg, vocab=_vocab(state.config, state.module),
                                            exact=True, what="in-memory MoE")
    report["verification"]["dense_vs_moe_rel_max_diff"] = pass_report.metrics.get("rel_max_diff")
    report["params"] = {"before": pass_report.metrics["params_before"], "after": pass_report.metrics["params_after"],
                        "active_after": pass_report.metrics["active_params_after"]}
    return report


def _tensor_progress(progress, total: int | None = None):
    if progress is None:
        return None
    counter = {"n": 0}

    def on_tensor(spec):
        counter["n"] += 1
        progress("write tensors", counter["n"], total)
    return on_tensor


def _vocab(config, module) -> int:
    v = getattr(config, "vocab_size", None)
    if isinstance(v, int):
        return v
    for m in module.modules():
        if isinstance(m, torch.nn.Embedding):
            return m.num_embeddings
    raise VerificationError("cannot find the vocabulary size to build check inputs")


def _config_dtype(config: dict) -> torch.dtype | None:
    d = config.get("dtype") or config.get("torch_dtype")
    if isinstance(d, str) and hasattr(torch, d):
        return getattr(torch, d)
    return None


def _check_family(family: MoeFormat, dense: dict, cfg: UpcycleConfig, sites, chosen) -> None:
    check_representable(family, dense, layers_selected=len(chosen), layers_total=len(sites),
                        renormalize=cfg.renormalize, top_k=cfg.top_k, num_experts=cfg.num_experts,
                        router_bias=cfg.router_bias, shared_experts=cfg.shared_experts,
                        kinds={s.kind for _, s in chosen})


def _moe_args(cfg: UpcycleConfig, sites, chosen, dense: dict) -> dict:
    inter = chosen[0][1].intermediate_size
    chosen_idx = {i for i, _ in chosen}
    return {"num_experts": cfg.num_experts, "top_k": cfg.top_k,
            "expert_intermediate": inter // cfg.num_experts if cfg.expert_init == "split" else inter,
            "dense_layers": [i for i in range(len(sites)) if i not in chosen_idx],
            "renormalize": cfg.renormalize, "shared_intermediate": inter if cfg.shared_experts else None}


# ----------------------------------------------------------------------------- streaming


def _stream_hf(src: Path, raw: dict, tmp: Path, cfg: UpcycleConfig, family: MoeFormat, dtype, shard_bytes,
               verify, progress) -> dict:
    ckpt = SourceCheckpoint(src)
    config = hf_config(src, raw)
    check_layers_present(src / "config.json", raw, ckpt.specs)  # before a skeleton of that many layers
    with torch.device("meta"):
        meta_model = model_class(config)(config)
    sites = find_ffn_sites(meta_model)
    chosen = select_sites(sites, cfg.targets, cfg.ignore)
    dense_dict = config.to_dict()
    _check_family(family, dense_dict, cfg, sites, chosen)
    if cfg.expert_init == "split":
        for _, s in chosen:
            if s.intermediate_size % cfg.num_experts:
                raise UnsupportedError(f"split needs num_experts to divide the intermediate size ({s.intermediate_size})")
    if dtype is not None:
        dense_dict["dtype"] = str(dtype).replace("torch.", "")
    moe_cfg = moe_config_dict(family, dense_dict, **_moe_args(cfg, sites, chosen, dense_dict))
    # The expert copies' bytes, from the headers alone: before planning millions of tensors.
    copies = (1 if cfg.expert_init == "split" else cfg.num_experts) + int(cfg.shared_experts)
    ffn_bytes = sum(ckpt.specs[f"{p}.weight"].nbytes for _, s in chosen for p in role_paths(s).values()
                    if f"{p}.weight" in ckpt.specs)
    check_fits_disk(tmp, sum(s.nbytes for s in ckpt.specs.values()) + ffn_bytes * (copies - 1))
    planned = len(ckpt.specs) + copies * sum(len(role_paths(s)) + 1 for _, s in chosen)
    if planned > MAX_PLANNED_TENSORS:  # each planned tensor costs memory before any byte moves
        raise UnsupportedError(f"upcycle: {cfg.num_experts} experts × {len(chosen)} FFNs would write {planned:,} "
                               f"tensors; at most {MAX_PLANNED_TENSORS:,} are planned in one run")
    source, accounting = _streaming_source(ckpt, meta_model, chosen, cfg, family, dtype)
    stats = write_checkpoint(tmp, source, moe_cfg, shard_bytes=shard_bytes,
                             on_tensor=_tensor_progress(progress, len(source.specs)))
    stats["notes"] = source.notes
    report = {"route": "streaming", "format": family.name,
              "consumer": f"transformers.AutoModelForCausalLM ({family.architecture})",
              "upcycle": {"sites_found": len(sites), "sites_converted": len(chosen),
                          "sites": [s.path for _, s in chosen]},
              "written": stats, "source_tensors": accounting}
    out_bytes = stats["bytes"]
    src_bytes = sum(s.nbytes for s in ckpt.specs.values())
    mode = verify if verify != "auto" else ("full" if out_bytes + src_bytes <= FULL_VERIFY_MAX_BYTES else "weights")
    if mode == "full":
        # The reference is the dense model with its weights rounded to the output dtype (when
        # --dtype casts), so the check measures the upcycling, not the requested cast.
        dense = load_causal_lm(src, dtype=dtype or torch.float32)
        dense = dense.float().eval()
        report["verification"] = _verify_reload(tmp, dense, family, cfg, vocab=config.vocab_size,
                                                exact=cfg.is_exact(), what="dense source")
        n_dense = sum(p.numel() for p in dense.parameters())
        del dense
    else:
        report["verification"] = {"mode": "weights", "detail": "every tensor re-read and checksummed; functional "
                                  "check skipped above {:.1f} GiB (use --verify full)".format(FULL_VERIFY_MAX_BYTES / 2**30)}
        n_dense = None
    report["params"] = {"before": n_dense, "after": sum(int(torch.Size(s.shape).numel()) for s in source.specs)}
    return report


def _streaming_source(ckpt: SourceCheckpoint, meta_model, chosen, cfg: UpcycleConfig, family: MoeFormat, dtype):
    """Plan every output tensor from the checkpoint headers; produce each on demand."""
    spec_ = cfg.init_spec()
    meta_sd = meta_model.state_dict()
    expected = set(meta_sd.keys())
    # Validate before any byte is written: shapes and dtypes against the architecture, nothing missing.
    for name, spec in ckpt.specs.items():
        if name in meta_sd and tuple(meta_sd[name].shape) != spec.shape:
            raise InputError(f"{ckpt.path}: tensor {name} has shape {list(spec.shape)}, the config implies "
                             f"{list(meta_sd[name].shape)}")
        if name in meta_sd and meta_sd[name].is_floating_point() and not spec.dtype.is_floating_point:
            raise InputError(f"{ckpt.path}: tensor {name} is {spec.dtype}, expected a floating-point weight")
    tied = _tied_param_names(meta_model)
    missing = [n for n in expected if n not in ckpt.specs and n not in tied and n in dict(meta_model.named_parameters())]
    if missing:
        raise InputError(f"{ckpt.path}: {len(missing)} weights missing from the checkpoint (e.g. {sorted(missing)[0]})")
    site_of: dict[str, tuple[int, object]] = {}
    for index, site in chosen:
        for role, path in role_paths(site).items():
            for suffix in ("weight", "bias"):
                site_of[f"{path}.{suffix}"] = (index, site)
    roles = expert_rel_names(chosen[0][1])
    site_paths = [s.path for _, s in chosen]
    specs: list[TensorSpec] = []
    plan: dict[str, tuple] = {}  # out name → how to produce it
    accounting = {"copied": 0, "transformed": 0, "dropped": []}
    ignorable = list(getattr(meta_model, "_keys_to_ignore_on_load_unexpected", None) or [])
    emitted: set[str] = set()

    def out_dtype(src_dtype):
        return dtype if (dtype is not None and src_dtype.is_floating_point) else src_dtype

    for name in ckpt.names():
        spec = ckpt.specs[name]
        if name in site_of:
            index, site = site_of[name]
            accounting["transformed"] += 1
            if site.path in emitted:
                continue
            emitted.add(site.path)
            dense_specs = {role: ckpt.specs[f"{p}.weight"] for role, p in role_paths(site).items()}
            tgt_dtype = out_dtype(dense_specs["down"].dtype)
            inter = site.intermediate_size
            e_inter = inter // cfg.num_experts if cfg.expert_init == "split" else inter
            local = [("router.weight", (cfg.num_experts, site.hidden_size), ("router", index, site))]
            for e in range(cfg.num_experts):
                for role, rel in roles.items():
                    shape = list(dense_specs[role].shape)
                    shape[1 if role == "down" else 0] = e_inter
                    local.append((f"experts.{e}.{rel}.weight", tuple(shape), ("expert", index, site, e, role)))
            if cfg.shared_experts:
                for role, rel in roles.items():
                    local.append((f"shared_expert.{rel}.weight", dense_specs[role].shape, ("shared", index, site, role)))
                local.append(("shared_expert_gate.weight", (1, site.hidden_size), ("shared_gate", index, site)))
            for rel_name, shape, how in local:
                out_name = rename(family, site_paths, roles, f"{site.path}.{rel_name}")
                specs.append(TensorSpec(out_name, tgt_dtype, tuple(shape)))
                plan[out_name] = how
            continue
        if name not in expected:
            # One rule with the in-memory loaders (transformers' own): names the class declares
            # ignorable are dropped and reported; any other stray tensor is refused, never lost.
            if not any(re.search(p, name) for p in ignorable):
                raise InputError(f"{ckpt.path}: weights do not match the config: tensor {name} is not a parameter "
                                 f"or buffer of {type(meta_model).__name__}")
            accounting["dropped"].append(f"{name} (ignored on load by {type(meta_model).__name__})")
            continue
        accounting["copied"] += 1
        specs.append(TensorSpec(name, out_dtype(spec.dtype), spec.shape))
        plan[name] = ("copy", name)

    cache: dict = {"site": None, "dense": None, "partition": None, "expert": (None, None)}

    def dense_for(index, site):
        if cache["site"] != site.path:
            cache["site"] = site.path
            cache["dense"] = {}
            for role, p in role_paths(site).items():
                cache["dense"][role] = _finite(f"{p}.weight", ckpt.get(f"{p}.weight"), ckpt.path)
                if f"{p}.bias" in ckpt.specs:
                    cache["dense"][f"{role}.bias"] = _finite(f"{p}.bias", ckpt.get(f"{p}.bias"), ckpt.path)
            cache["partition"] = (split_partition(cache["dense"], site.intermediate_size, cfg.num_experts, spec_, index)
                                  if cfg.expert_init == "split" else None)
            cache["expert"] = (None, None)
        return cache["dense"]

    def produce(s: TensorSpec) -> torch.Tensor:
        how = plan[s.name]
        if how[0] == "copy":
            t = ckpt.get(how[1])
            _finite(how[1], t, ckpt.path)
        elif how[0] == "router":
            _, index, site = how
            t = router_weight(cfg.num_experts, site.hidden_size, cfg.router_init, cfg.router_std, cfg.seed, index)
        elif how[0] == "expert":
            _, index, site, e, role = how
            dense = dense_for(index, site)
            if cache["expert"][0] != (site.path, e):
                cache["expert"] = ((site.path, e), expert_tensors(dense, e, cfg.num_experts, site.intermediate_size,
                                                                  spec_, index, cache["partition"]))
            t = cache["expert"][1][role]
        elif how[0] == "shared":
            _, index, site, role = how
            t = dense_for(index, site)[role]
        else:
            t = torch.zeros(1, how[2].hidden_size)
        t = t.to(s.dtype)
        if how[0] != "copy" and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            # finite source weights made non-finite (noise of absurd scale, or overflow in the
            # output dtype): never written, whatever --verify says
            raise VerificationError(f"upcycling produced NaN/Inf in {s.name} ({s.dtype}); nothing was written")
        return t

    notes = [f"dropped {d}" for d in accounting["dropped"]]
    return TensorSource(specs, produce, notes), accounting


def _tied_param_names(model) -> set[str]:
    """Parameter names that share storage with an earlier one (tied embeddings)."""
    seen, tied = set(), set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.add(name)
        seen.add(id(p))
    return tied


def _finite(name: str, t: torch.Tensor, where) -> torch.Tensor:
    from moeconv.io.load import allow_nonfinite_default
    if t.is_floating_point() and not allow_nonfinite_default() and not bool(torch.isfinite(t).all()):
        raise InputError(f"{where}: weight {name} contains NaN or Inf (pass --allow-nonfinite to convert anyway)")
    return t


# ----------------------------------------------------------------------------- verification


def _verify_reload(tmp: Path, reference: torch.nn.Module, family: MoeFormat | None, cfg: UpcycleConfig, *,
                   vocab: int, exact: bool, what: str) -> dict:
    """Load what was written with the consumer users have and compare outputs with `reference`."""
    if family is not None:
        try:
            reloaded = load_causal_lm(tmp, dtype=torch.float32)
        except Exception as exc:
            raise VerificationError(f"written checkpoint does not load in transformers: {exc}") from None
        if type(reloaded).__name__ != family.architecture:
            raise VerificationError(f"transformers loaded {type(reloaded).__name__}, expected {family.architecture}")
    else:
        reloaded = load(tmp).module
    reloaded = reloaded.eval()
    ref_dtype = next(reference.parameters()).dtype
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    inputs = torch.randint(0, vocab, (2, 24), generator=gen)
    ref = model_outputs(reference.float() if ref_dtype != torch.float32 else reference, inputs).float()
    got = model_outputs(reloaded.float(), inputs).float()
    if ref_dtype != torch.float32:
        reference.to(ref_dtype)
    diff = (got - ref).abs().max().item()
    rel = diff / max(1.0, ref.abs().max().item())
    result = {"mode": "full", "against": what, "consumer_class": type(reloaded).__name__,
              "max_abs_diff": diff, "rel_max_diff": rel, "exact_promised": exact}
    if not math.isfinite(diff):
        raise VerificationError(f"reloaded output differs from the {what} by a non-finite amount ({diff}); "
                                "nothing was written")
    if exact and not rel <= EXACT_RTOL:
        raise VerificationError(f"reloaded output differs from the {what}: relative max |Δ| {rel:.3g} > {EXACT_RTOL}")
    return result


def _copy_tokenizer(src_path: Path | None, tmp: Path, report: dict) -> None:
    copied = []
    if src_path is not None and src_path.is_dir():
        for name in TOKENIZER_FILES:
            if (src_path / name).is_file():
                shutil.copy2(src_path / name, tmp / name)
                copied.append(name)
    elif src_path is not None and src_path.suffix == ".gguf":
        try:
            copied = list(read_tokenizer(src_path).save_pretrained(tmp))
            copied = [Path(c).name for c in copied]
        except Exception as exc:  # the weights are the job; a tokenizer we cannot rebuild is reported
            report.setdefault("warnings", []).append(f"tokenizer not carried over: {exc.__class__.__name__}")
    report["tokenizer_files"] = copied
