"""The peer tool on moeconv's `peer` benchmark model: llm-compressor 0.14 SparseGPT 2:4 on the
random 8-expert Mixtral of `scripts/bench_sparsify.py --model peer` (same model, same seed, same
32x128 calibration tokens), with the output error measured exactly as moeconv measures its own
(`moeconv.evaluate.output_error` on `calib[:4, :128]` against the dense model).

Runs in a separate environment holding llm-compressor (not a moeconv dependency), e.g.

    python -m venv --system-site-packages /tmp/lcenv
    /tmp/lcenv/bin/pip install --no-deps 'llmcompressor==0.14.*' compressed-tensors==0.19.0
    /tmp/lcenv/bin/pip install loguru datasets nvidia-ml-py 'auto-round>=0.14.1,<=0.15.1'
    /tmp/lcenv/bin/python scripts/peer_llmcompressor.py [--routed-only] [--out FILE]

Pruned: only the expert projections (w1/w3/w2 as gate_proj/up_proj/down_proj of llm-compressor's
linearised per-expert modules); attention, the routers (`mlp.gate`), embeddings, norms and lm_head
stay dense and are checked to be bit-identical to the reference afterwards. By default
llm-compressor's `moe_calibrate_all_experts=True` (its default: every expert sees every token
while calibrating, the routed output is unchanged); `--routed-only` sets it False.

Prints one JSON line: wall time and peak RSS (VmHWM, reset just before the call) of the `oneshot`
call, output error, the 2:4 check and versions.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def build():
    """Identical to `bench_sparsify.build("peer", 32, 128)` (without moeconv's `load` wrapper)."""
    import torch
    import transformers
    cfg = transformers.MixtralConfig(hidden_size=512, intermediate_size=1792, num_hidden_layers=8,
                                     num_attention_heads=8, num_key_value_heads=8, num_local_experts=8,
                                     num_experts_per_tok=2, vocab_size=32000, max_position_embeddings=512)
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(cfg).eval()
    calib = torch.randint(0, cfg.vocab_size, (32, 128), generator=torch.Generator().manual_seed(0))
    return model, calib


def check_24(weight) -> tuple[int, int]:
    """(groups of 4 consecutive input weights with more than 2 non-zeros, zero fraction numerator)."""
    w = weight.detach()
    groups = w.reshape(w.shape[0], -1, 4)
    bad = int(((groups != 0).sum(-1) > 2).sum())
    return bad, int((w == 0).sum())


def gptq_w4a16(args) -> dict:
    """llm-compressor GPTQ W4A16 (its preset: int4, symmetric, groups of 128) on every Linear but
    lm_head and the routers, on the same model and calibration tokens; output error measured as
    moeconv measures its own (`moeconv.evaluate.output_error` on `calib[:4, :128]`)."""
    import tempfile

    import compressed_tensors
    import datasets
    import llmcompressor
    import torch
    import transformers
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    from moeconv.evaluate import output_error
    model, calib = build()
    ref = copy.deepcopy(model)
    cfg_dir = tempfile.mkdtemp(prefix="peer_mixtral_cfg_")
    model.config.save_pretrained(cfg_dir)
    model.config._name_or_path = cfg_dir
    ds = datasets.Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    processor = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel({"[UNK]": 0}, unk_token="[UNK]")), unk_token="[UNK]")
    modifier = GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head", "re:.*mlp\\.gate$"],
                            block_size=128, dampening_frac=0.01)
    t0 = time.perf_counter()
    done = oneshot(model=model, processor=processor, dataset=ds, recipe=modifier, num_calibration_samples=calib.shape[0],
                   max_seq_length=calib.shape[1], shuffle_calibration_samples=False, batch_size=1,
                   moe_calibrate_all_experts=not args.routed_only)
    seconds = time.perf_counter() - t0
    done = done if done is not None else model
    return {"tool": "llm-compressor", "llmcompressor": llmcompressor.__version__,
            "compressed_tensors": compressed_tensors.__version__, "threads": torch.get_num_threads(),
            "target": "GPTQModifier scheme=W4A16 (int4 symmetric, group 128) on Linear, ignore lm_head and mlp.gate",
            "moe_calibrate_all_experts": not args.routed_only, "seconds": seconds,
            "output_error": output_error(ref, done, calib[:4, :128])}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--routed-only", action="store_true",
                    help="moe_calibrate_all_experts=False (experts calibrate on their routed tokens only)")
    ap.add_argument("--gptq-w4a16", action="store_true", help="GPTQ W4A16 instead of SparseGPT 2:4")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.gptq_w4a16:
        line = json.dumps(gptq_w4a16(args))
        print(line)
        if args.out:
            args.out.write_text(line + "\n")
        return

    import tempfile

    import compressed_tensors
    import datasets
    import llmcompressor
    import torch
    import transformers
    from llmcompressor import oneshot
    from llmcompressor.modeling.moe.linear_experts import LinearExperts2D
    from llmcompressor.modifiers.pruning import SparseGPTModifier

    from moeconv.evaluate import output_error

    model, calib = build()
    check = calib[:4, :128]
    ref = copy.deepcopy(model)
    ref_state = ref.state_dict()  # views of the untouched reference (no extra copy in the RSS)

    # oneshot's validate_model() re-reads the config from model.config.name_or_path (empty for an
    # in-memory model), so give it a directory holding this model's config.json.
    cfg_dir = tempfile.mkdtemp(prefix="peer_mixtral_cfg_")
    model.config.save_pretrained(cfg_dir)
    model.config._name_or_path = cfg_dir

    ds = datasets.Dataset.from_dict({"input_ids": calib.tolist(),
                                     "attention_mask": torch.ones_like(calib).tolist()})
    # oneshot insists on a processor whenever a dataset is given, though a pre-tokenised dataset
    # (an `input_ids` column) is used as is; there is no hub here, so a local placeholder tokenizer.
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    processor = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel({"[UNK]": 0}, unk_token="[UNK]")), unk_token="[UNK]")
    modifier = SparseGPTModifier(
        sparsity=0.5, mask_structure="2:4", block_size=128, dampening_frac=0.01,
        # Only the per-expert projections of the linearised experts. (SparsityModifierBase names
        # a hooked module f"{target}.{sub}" -- with a trailing dot when the target is the Linear
        # itself -- so `re:.*lm_head$`-style ignores never match; hence targets, not ignores.)
        targets=["re:.*mlp\\.experts\\.\\d+\\.(gate|up|down)_proj$"],
        ignore=["re:.*lm_head", "re:.*self_attn.*", "re:.*mlp\\.gate(\\.|$)"],
    )

    import gc
    gc.collect()
    rss_before = _status_mb("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")
        peak_reset = True
    except OSError:
        peak_reset = False
    c0 = time.process_time()
    t0 = time.perf_counter()
    pruned = oneshot(model=model, processor=processor, dataset=ds, recipe=modifier, num_calibration_samples=calib.shape[0],
                     max_seq_length=calib.shape[1], shuffle_calibration_samples=False, batch_size=1,
                     moe_calibrate_all_experts=not args.routed_only)
    seconds = time.perf_counter() - t0
    cpu_seconds = time.process_time() - c0
    peak = _status_mb("VmHWM")
    pruned = pruned if pruned is not None else model

    # What was pruned: every Linear that differs from the dense reference must be an expert
    # projection of a linearised experts module, and satisfy 2:4.
    experts_modules = [(n, m) for n, m in pruned.named_modules() if isinstance(m, LinearExperts2D)]
    bad_groups, zeros, numel, n_expert_linears = 0, 0, 0, 0
    for name, experts in experts_modules:
        for i in range(experts.num_experts):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                w = getattr(experts[i], proj).weight
                b, z = check_24(w)
                bad_groups += b
                zeros += z
                numel += w.numel()
                n_expert_linears += 1
    got_state = pruned.state_dict()
    untouched = {k: torch.equal(got_state[k], v) for k, v in ref_state.items()
                 if k in got_state and ".experts." not in k}
    changed_non_expert = sorted(k for k, same in untouched.items() if not same)
    missing_non_expert = sorted(k for k in ref_state if ".experts." not in k and k not in got_state)

    err = output_error(ref, pruned, check)

    # Cross-check: pack the experts back into transformers' fused MixtralExperts and evaluate that too.
    from llmcompressor.modeling.moe.linearize import repack_moe
    repacked = repack_moe(copy.deepcopy(pruned))
    err_repacked = output_error(ref, repacked, check)
    fused_bad = 0
    for n, m in repacked.named_modules():
        if type(m).__name__ == "MixtralExperts":
            fused_bad += check_24(m.gate_up_proj.reshape(-1, m.gate_up_proj.shape[-1]))[0]
            fused_bad += check_24(m.down_proj.reshape(-1, m.down_proj.shape[-1]))[0]

    out = {
        "tool": "llm-compressor", "llmcompressor": llmcompressor.__version__,
        "compressed_tensors": compressed_tensors.__version__, "torch": torch.__version__,
        "transformers": transformers.__version__, "threads": torch.get_num_threads(),
        "model": "peer: random Mixtral h512 i1792 8 layers 8 experts top-2, seed 0",
        "calibration": list(calib.shape),
        "target": ("SparseGPTModifier sparsity=0.5 mask_structure=2:4 block_size=128 dampening_frac=0.01 "
                   "on expert gate_proj/up_proj/down_proj only (targets regex; self_attn, mlp.gate, lm_head, embeddings dense)"),
        "moe_calibrate_all_experts": not args.routed_only,
        "seconds": seconds, "cpu_seconds": cpu_seconds, "peak_rss_mb": peak, "rss_before_mb": rss_before, "peak_over_before_mb": peak - rss_before, "peak_reset": peak_reset,
        "output_error": err, "output_error_repacked": err_repacked,
        "expert_modules": len(experts_modules), "expert_linears_pruned": n_expert_linears,
        "expert_zero_fraction": zeros / max(numel, 1), "violating_4_groups": bad_groups,
        "violating_4_groups_repacked": fused_bad,
        "non_expert_tensors_changed": changed_non_expert, "non_expert_tensors_missing": missing_non_expert,
    }
    line = json.dumps(out)
    print(line)
    if args.out:
        args.out.write_text(line + "\n")


if __name__ == "__main__":
    main()
