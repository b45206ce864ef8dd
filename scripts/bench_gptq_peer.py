"""moeconv's routing-aware GPTQ W4A16 against llm-compressor's, on the same peer model and tokens
(issue #17): time and KL to the float model, printed as ratios, both measured in this run.

    python scripts/bench_gptq_peer.py --peer-python /tmp/lcenv/bin/python [--json FILE]

The model and tokens are `peer_llmcompressor.build()` (random Mixtral h512, 8 layers, 8 experts
top-2, 32x128 calibration tokens); both sides quantize every Linear but lm_head and the routers to
int4, symmetric, groups of 128. moeconv runs `quantize_ct_to_dir(..., algorithm="gptq")` (its
GPTQ time from the report; the write and the transformers reload check are not counted), the peer
runs `peer_llmcompressor.py --gptq-w4a16` in its own environment (the oneshot call's time). The
output error of both is `moeconv.evaluate.output_error` against the float model on calib[:4, :128];
moeconv's is measured on the written directory as transformers loads it.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


def moeconv_side(work: Path) -> dict:
    import torch
    from safetensors.torch import save_file

    from moeconv.evaluate import output_error
    from moeconv.io.transformers_io import load_causal_lm
    from moeconv.jobs.quantize_ct import quantize_ct_to_dir
    from peer_llmcompressor import build
    model, calib = build()
    model.save_pretrained(work / "peer")
    save_file({"ids": calib.contiguous()}, work / "calib.safetensors")
    report = quantize_ct_to_dir(work / "peer", work / "w4a16", method="w4a16", group_size=128, algorithm="gptq",
                                calibration=calib)
    got = load_causal_lm(work / "w4a16").eval()
    return {"seconds": report["gptq"]["seconds"], "fallback": len(report["gptq"]["fallback"]),
            "threads": torch.get_num_threads(), "output_error": output_error(model, got, calib[:4, :128])}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--peer-python", required=True, help="python of an environment with llm-compressor 0.14")
    ap.add_argument("--routed-only", action="store_true", help="the peer's moe_calibrate_all_experts=False")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        ours = moeconv_side(Path(tmp))
        cmd = [args.peer_python, str(ROOT / "scripts" / "peer_llmcompressor.py"), "--gptq-w4a16",
               *(["--routed-only"] if args.routed_only else [])]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"peer failed:\n{r.stderr[-3000:]}")
        peer = json.loads(r.stdout.strip().splitlines()[-1])
    time_ratio = ours["seconds"] / peer["seconds"]
    kl_ratio = ours["output_error"]["kl"] / peer["output_error"]["kl"]
    print(f"GPTQ W4A16 on the peer Mixtral, 32x128 calibration tokens ({ours['threads']} threads)")
    print(f"{'':24} {'moeconv':>12} {'llm-compressor':>15} {'ratio':>8}")
    print(f"{'seconds':24} {ours['seconds']:12.1f} {peer['seconds']:15.1f} {time_ratio:8.3f}   target <= 0.5")
    print(f"{'KL to float':24} {ours['output_error']['kl']:12.4g} {peer['output_error']['kl']:15.4g} {kl_ratio:8.3f}   target < 1")
    print(f"{'top-1 agreement':24} {ours['output_error']['top1_agreement']:12.3f} "
          f"{peer['output_error']['top1_agreement']:15.3f}")
    result = {"moeconv": ours, "peer": peer, "time_ratio": time_ratio, "kl_ratio": kl_ratio}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    ok = time_ratio <= 0.5 and kl_ratio < 1
    print("ok" if ok else "MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
