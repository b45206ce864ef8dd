"""PyTorch vs onnxruntime on inputs that differ from the export's example in shape *and routing*.

Cases (`parity_cases`): the example itself; one token; a long sequence; other batch sizes; a
padded batch (left padding for causal LMs, right padding for encoders); the candidate batch whose
expert usage differs most from the example's (searched among random batches); and, for the
KV-cache graph, decode steps of 1 and 3 tokens after a past produced by PyTorch.

For every case the routing is recorded in PyTorch (a hook on each router): which experts of which
MoE layer received tokens, and which of those the example input never reached. The promise is
stated on outputs at real (unpadded) positions, for logits / hidden states and, with a KV cache,
the present keys and values: max |Δ| ≤ max(`atol`, 4 × PyTorch's own rounding noise on that input,
measured by re-running it with another batch layout). Tiny models stay far below `atol` (~1e-6);
real ones have positions where fp32 rounding is amplified, and there PyTorch is the yardstick.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from moeconv.nn.hooks import removed_on_exit
from moeconv.nn.moe import MoEBlock
from moeconv.onnx import runtime
from moeconv.onnx.signature import Signature

SEARCH_CANDIDATES = 16
NOISE_FACTOR = 4.0  # allowed multiple of PyTorch's own batch-layout noise (see `compare`)


@dataclass
class Case:
    name: str
    ids: torch.Tensor
    mask: torch.Tensor | None
    past: list[torch.Tensor] | None = None

    def valid(self) -> torch.Tensor:
        """(B, S) bool: positions whose outputs are compared (padding excluded)."""
        if self.mask is None:
            return torch.ones(self.ids.shape, dtype=torch.bool)
        return self.mask[:, self.mask.shape[1] - self.ids.shape[1]:].bool()

    def describe(self) -> dict:
        past = 0 if not self.past else int(self.past[0].shape[2])
        return {"case": self.name, "batch": int(self.ids.shape[0]), "tokens": int(self.ids.shape[1]),
                "past": past, "padded": bool(self.mask is not None and not bool(self.mask.all()))}


# --------------------------------------------------------------------------- routing


@contextmanager
def record_routing(model: torch.nn.Module):
    """Yields a dict block path → list of (tokens, k) expert indices, one entry per forward inside."""
    picks: dict[str, list[torch.Tensor]] = {}
    handles = []
    for path, block in model.named_modules():
        if not isinstance(block, MoEBlock):
            continue

        def hook(_m, _args, logits, path=path, block=block):
            idx = torch.topk(F.softmax(logits.float(), -1), block.top_k, dim=-1).indices
            picks.setdefault(path, []).append(idx)
        handles.append(block.router.register_forward_hook(hook))
    with removed_on_exit(handles):
        yield picks


def _experts(model: torch.nn.Module) -> dict[str, int]:
    return {p: b.num_experts for p, b in model.named_modules() if isinstance(b, MoEBlock)}


def routed(sig: Signature, case_or_args, *, rows: int = 1) -> dict[str, torch.Tensor] | list[dict[str, torch.Tensor]]:
    """Per-expert token counts of every MoE block for one forward; with `rows` > 1 the batch is
    split into `rows` equal groups of sequences and one count dict is returned per group."""
    args = case_or_args if isinstance(case_or_args, tuple) else sig.torch_args(case_or_args.ids, case_or_args.mask,
                                                                                case_or_args.past)
    sizes = _experts(sig.wrapper)
    with record_routing(sig.wrapper) as picks, torch.inference_mode():
        sig.wrapper(*args)
    groups = []
    for r in range(rows):
        counts = {}
        for path, idx in picks.items():
            flat = torch.cat(idx)
            per = flat.shape[0] // rows
            counts[path] = torch.bincount(flat[r * per:(r + 1) * per].flatten(), minlength=sizes[path])
        groups.append(counts)
    return groups[0] if rows == 1 else groups


def _hit(counts: dict[str, torch.Tensor]) -> set[tuple[str, int]]:
    return {(p, int(e)) for p, c in counts.items() for e in torch.nonzero(c).flatten().tolist()}


def _hist_distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Mean over layers of the L1 distance between normalised expert-usage histograms (0..2)."""
    if not a:
        return 0.0
    d = [((a[p].float() / a[p].sum()) - (b[p].float() / b[p].sum())).abs().sum().item() for p in a if p in b]
    return sum(d) / max(len(d), 1)


# --------------------------------------------------------------------------- cases


def parity_cases(sig: Signature, baseline: dict[str, torch.Tensor], seed: int = 0) -> list[Case]:
    """`baseline`: the routing of the export's example input (`routed(sig, sig.example)`)."""
    g = torch.Generator().manual_seed(seed + 1000)
    v, L = sig.vocab, sig.max_len

    def ids(b, s):
        return torch.randint(0, v, (b, s), generator=g)

    def ones(t):
        return torch.ones_like(t) if sig.uses_mask else None

    if sig.with_past:
        ex_ids = torch.cat([torch.randint(0, v, (sig.example[0].shape[0], 5), generator=g), sig.example[0]], 1)
    else:
        ex_ids = sig.example[0]
    cases = [Case("prefill shaped like the example" if sig.with_past else "example input", ex_ids, ones(ex_ids))]
    for name, (b, s) in (("one token", (1, 1)), ("long sequence", (1, min(L, 48))), ("batch 3", (3, 13)),
                         ("batch 4, short", (4, 5))):
        t = ids(b, s)
        cases.append(Case(name, t, ones(t)))
    if sig.uses_mask:
        t = ids(3, 11)
        mask = torch.ones_like(t)
        if sig.kind == "causal-lm":
            mask[1, :4] = 0    # left padding, as in batched generation
        else:
            mask[1, 7:] = 0    # right padding, as in batched encoding
        cases.append(Case("padded batch", t, mask))
    cases.append(_most_differently_routed(sig, ex_ids, baseline, g))
    if sig.with_past:
        for name, (b, p, s) in (("decode 1 token after past 9", (2, 9, 1)), ("3 tokens after past 6", (1, 6, 3))):
            prefix = ids(b, p)
            past = runtime.run_torch(sig, prefix, torch.ones_like(prefix))[1:]
            new = ids(b, s)
            cases.append(Case(name, new, torch.ones(b, p + s, dtype=torch.long), [t.clone() for t in past]))
    return cases


def _most_differently_routed(sig: Signature, example_ids: torch.Tensor, base: dict, g: torch.Generator) -> Case:
    """Among random batches shaped like the example, the one whose routing differs most from it."""
    b, s = example_ids.shape
    cand = torch.randint(0, sig.vocab, (SEARCH_CANDIDATES * b, s), generator=g)
    if not base:  # a dense model: nothing to search
        return Case("same shape, other tokens", cand[:b], torch.ones_like(cand[:b]) if sig.uses_mask else None)
    base_hit = _hit(base)
    # one batched forward; rows are independent, so each group of b rows is routed as it would be alone
    groups = routed(sig, Case("", cand, torch.ones_like(cand) if sig.uses_mask else None), rows=SEARCH_CANDIDATES)
    keys = [(len(_hit(c) - base_hit), _hist_distance(c, base)) for c in groups]
    i = max(range(SEARCH_CANDIDATES), key=lambda j: keys[j])
    best = cand[i * b:(i + 1) * b]
    return Case("same shape, routed most differently", best, torch.ones_like(best) if sig.uses_mask else None)


# --------------------------------------------------------------------------- comparison


def _masked_max_diff(got: np.ndarray, ref: torch.Tensor, valid: torch.Tensor, seq_axis: int) -> tuple[float, float]:
    """(max |Δ|, max |ref|) over valid positions; NaN/inf in either → inf."""
    g = torch.from_numpy(np.asarray(got)).float()
    r = ref.float()
    if g.shape != r.shape:
        return math.inf, r.abs().max().item()
    # move batch to 0 and sequence to 1, then select valid (b, s) pairs
    if seq_axis != 1:
        g, r = g.movedim(seq_axis, 1), r.movedim(seq_axis, 1)
    g, r = g[valid], r[valid]
    if g.numel() == 0:
        return 0.0, 0.0
    if not (torch.isfinite(g).all() and torch.isfinite(r).all()):
        return math.inf, r.abs().max().item()
    return (g - r).abs().max().item(), r.abs().max().item()


def _diffs(got, ref, case: Case, sig: Signature) -> tuple[float, float, float]:
    """(max |Δ| of the main output, of the present keys/values (0 without a cache), max |ref|)."""
    diff, scale = _masked_max_diff(got[0], ref[0], case.valid(), 1)
    kv = 0.0
    if sig.with_past:
        full = case.mask.bool()
        kv = max(_masked_max_diff(o, r, full, 2)[0] for o, r in zip(got[1:], ref[1:]))
    return diff, kv, scale


def perturbed_reference(sig: Signature, case: Case) -> list[torch.Tensor]:
    """PyTorch on the same case with another batch layout (each row alone, or a lone row doubled):
    the same math in another fp32 summation order, i.e. PyTorch's own rounding noise."""
    b = case.ids.shape[0]
    past = case.past
    if b > 1:
        parts = [runtime.run_torch(sig, case.ids[r:r + 1], None if case.mask is None else case.mask[r:r + 1],
                                   None if past is None else [t[r:r + 1] for t in past]) for r in range(b)]
        return [torch.cat([p[j] for p in parts]) for j in range(len(parts[0]))]
    two = runtime.run_torch(sig, case.ids.repeat(2, 1), None if case.mask is None else case.mask.repeat(2, 1),
                            None if past is None else [t.repeat(2, 1, 1, 1) for t in past])
    return [t[:1] for t in two]


@dataclass
class TorchSide:
    """What PyTorch computed for one case: its outputs, its expert counts (when a baseline is
    given) and its own rounding noise (when a bound is asked for)."""
    ref: list[torch.Tensor]
    counts: dict
    noise: float | None


def torch_side(sig: Signature, cases: list[Case], *, baseline: dict | None = None,
               atol: float | None = None) -> list[TorchSide]:
    """Every case's PyTorch side of `compare`, computed up front, so the PyTorch model can leave
    memory before onnxruntime loads the graph (the two would otherwise hold the weights twice)."""
    out = []
    for case in cases:
        counts = routed(sig, case) if baseline is not None else {}
        ref = runtime.run_torch(sig, case.ids, case.mask, case.past)
        noise = None
        if atol is not None:
            noise = max(_diffs([t.numpy() for t in perturbed_reference(sig, case)], ref, case, sig)[:2])
        out.append(TorchSide(ref, counts, noise))
    return out


def compare(sess, sig: Signature, cases: list[Case], refs: list[list[torch.Tensor]] | None = None,
            *, baseline: dict | None = None, atol: float | None = None,
            torch_results: list[TorchSide] | None = None) -> tuple[list[dict], list[list[torch.Tensor]]]:
    """Run every case in onnxruntime and PyTorch (or against `refs`); one row per case.

    With `atol`, each row gets its `bound`: max(atol, NOISE_FACTOR × PyTorch's own noise on that
    case), the noise being how far PyTorch moves from itself under another batch layout. Real
    models amplify fp32 rounding at some positions (SmolLM2: logits move by ~2e-3 when a row is
    run alone instead of batched); an export is held to PyTorch's own reproducibility there and
    to `atol` everywhere else."""
    rows, all_refs = [], []
    for i, case in enumerate(cases):
        noise = None
        if torch_results is not None:
            counts, ref, noise = torch_results[i].counts, torch_results[i].ref, torch_results[i].noise
        elif refs is None:
            counts = routed(sig, case) if baseline is not None else {}
            ref = runtime.run_torch(sig, case.ids, case.mask, case.past)
        else:
            counts, ref = {}, refs[i]
        got = runtime.run(sess, sig, case.ids, case.mask, case.past)
        diff, kv, scale = _diffs(got, ref, case, sig)
        row = {**case.describe(), "max_abs_diff": max(diff, kv), "ref_max_abs": scale}
        if sig.output_is_logits:
            row.update(_logit_agreement(got[0], ref[0], case.valid()))
        if sig.with_past:
            row["present_max_abs_diff"] = kv
        if atol is not None:
            if noise is None:
                noise = max(_diffs([t.numpy() for t in perturbed_reference(sig, case)], ref, case, sig)[:2])
            row["torch_noise"] = noise
            row["bound"] = max(atol, NOISE_FACTOR * noise)
        if baseline is not None and counts:
            base_hit = _hit(baseline)
            row["experts_hit"] = len(_hit(counts))
            row["experts_hit_not_in_example"] = len(_hit(counts) - base_hit)
            row["routing_distance_to_example"] = round(_hist_distance(counts, baseline), 4)
        rows.append(row)
        all_refs.append(ref)
    return rows, all_refs


def _logit_agreement(got: np.ndarray, ref: torch.Tensor, valid: torch.Tensor) -> dict:
    g = torch.from_numpy(np.asarray(got)).float()[valid]
    r = ref.float()[valid]
    if g.numel() == 0 or not torch.isfinite(g).all():
        return {"top1_agreement": 0.0, "kl": math.inf}
    kl = F.kl_div(F.log_softmax(g, -1), F.log_softmax(r, -1), log_target=True, reduction="none").sum(-1).mean()
    return {"top1_agreement": (g.argmax(-1) == r.argmax(-1)).float().mean().item(), "kl": max(kl.item(), 0.0)}


def summarise(rows: list[dict], atol: float | None = None) -> dict:
    worst = max((r["max_abs_diff"] for r in rows), default=0.0)
    out = {"max_abs_diff": worst, "cases": len(rows)}
    if atol is not None:
        out.update(ok=all(r["max_abs_diff"] <= r["bound"] for r in rows), atol=atol, noise_factor=NOISE_FACTOR,
                   max_torch_noise=max(r["torch_noise"] for r in rows),
                   cases_within_atol=sum(1 for r in rows if r["max_abs_diff"] <= atol))
    if any("experts_hit_not_in_example" in r for r in rows):
        out["cases_reaching_experts_the_example_did_not"] = sum(1 for r in rows if r.get("experts_hit_not_in_example"))
        out["max_routing_distance_to_example"] = max(r.get("routing_distance_to_example", 0.0) for r in rows)
    if any("top1_agreement" in r for r in rows):
        out["min_top1_agreement"] = min(r["top1_agreement"] for r in rows if "top1_agreement" in r)
        out["max_kl"] = max(r["kl"] for r in rows if "kl" in r)
    return out
