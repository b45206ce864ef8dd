"""GPTQ for the compressed-tensors schemes, routing-aware: each expert's Hessian comes from the
tokens its router actually sends it.

`gptq(w, hessian, args)`: the GPTQ column sweep (Frantar et al.) on the upper Cholesky factor of
the dampened inverse Hessian that SparseGPT already computes (`moeconv.hessian.
upper_inverse_cholesky`): each column is rounded onto the grid of its group's scale (computed
from the already-updated weights when the sweep enters the group, with compressed-tensors'
`calculate_qparams`), and its rounding error is spread over the columns not yet quantized,
except into weights that were exactly zero: those stay zero (symmetric schemes map 0 to 0), so a
2:4 pattern survives, as SparseGPT keeps its pruned weights. The result lies exactly on the
returned scales' grid, so compressing it loses nothing more.

`quantize_gptq(model, method, args, calibration)`: layer by layer (`moeconv.calibrate.
run_layerwise`: each layer sees the outputs of the already-quantized layers before it), every
target's Hessian from its own inputs. An expert that received fewer than `MIN_TOKENS` calibration
tokens is run on every token entering its MoE block (as if routed all of them), its matrices'
Hessians taken from that run, and named in `fallback`; every expert gets the same scheme either way.
"""
from __future__ import annotations

import time
from contextlib import ExitStack

import torch
from torch import nn

MIN_TOKENS = 16  # an expert routed fewer calibration tokens is calibrated on its block's inputs
BLOCK = 32        # columns per block of the sweep: within it each column updates the next; past it, one product
DAMPENING = 0.01


def _column_args(args):
    """`args` for quantizing one column with a per-row scale (the group's)."""
    return args.model_copy(update={"strategy": "channel", "group_size": None})


def gptq(w: torch.Tensor, hessian: torch.Tensor, args, *, dampening: float = DAMPENING
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(quantized weight, scale (…, out, groups), zero point or None) for `w` (out, in) or a batch
    (B, out, in) of same-shaped matrices and their inputs' Σxxᵀ `hessian` ((B,) in, in): one
    sweep quantizes the whole batch (the Python loop over columns runs once per shape, not once
    per matrix: every expert of a layer at once)."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    from moeconv.hessian import upper_inverse_cholesky
    single = w.dim() == 2
    if single:
        w, hessian = w[None], hessian[None]
    batch, rows, cols = w.shape
    group = args.group_size if args.strategy == "group" else cols
    # the factor in float64: in float32 SmolLM2-MoE's W4A16 perplexity was 26.16, in float64 25.58
    hinv = upper_inverse_cholesky(hessian.double(), dampening)[0].float()
    col_args = _column_args(args)
    # Column-major working copy: a column of every row is one contiguous run, which is what the
    # per-column steps touch (as in SparseGPT's sweep)
    Wt = w.float().transpose(1, 2).contiguous()  # (B, cols, rows)
    zero = Wt == 0  # kept exactly zero (a 2:4 pattern survives): no error is spread into them
    keep = bool(zero.any())
    scales, zps = [], []
    scale = zp = None
    for i1 in range(0, cols, BLOCK):
        i2 = min(i1 + BLOCK, cols)
        err = torch.zeros(batch, i2 - i1, rows, device=Wt.device)
        for j in range(i1, i2):
            if j % group == 0:
                g = Wt[:, j:j + group]  # (B, group, rows)
                scale, zp = calculate_qparams(g.amin(1), g.amax(1), args)
                scale = scale.reshape(batch * rows, 1)
                zp = zp.reshape(batch * rows, 1) if zp is not None else None
                scales.append(scale.reshape(batch, rows, 1))
                zps.append(zp.reshape(batch, rows, 1) if zp is not None else None)
            col = Wt[:, j]  # (B, rows)
            q = fake_quantize(col.reshape(batch * rows, 1), scale, zp, col_args).reshape(batch, rows)
            e = (col - q) / hinv[:, j, j].unsqueeze(1)
            Wt[:, j] = q
            if j + 1 < i2:
                Wt[:, j + 1:i2] -= hinv[:, j, j + 1:i2].unsqueeze(2) * e.unsqueeze(1)
                if keep:
                    Wt[:, j + 1:i2].masked_fill_(zero[:, j + 1:i2], 0.0)
            err[:, j - i1] = e
        if i2 < cols:  # the rest of the matrix, lazily: one product per block of columns
            Wt[:, i2:] -= torch.bmm(hinv[:, i1:i2, i2:].transpose(1, 2), err)
            if keep:
                Wt[:, i2:].masked_fill_(zero[:, i2:], 0.0)
    W = Wt.transpose(1, 2).contiguous()
    scale = torch.cat(scales, -1)
    zp = torch.cat(zps, -1) if zps and zps[0] is not None else None
    if single:
        return W[0], scale[0], (zp[0] if zp is not None else None)
    return W, scale, zp


def quantize_gptq(model: nn.Module, method: str, args, calibration: torch.Tensor, *, batch_size: int = 8,
                  progress=None):
    """GPTQ every target of `model` in place (module docstring); returns a `QuantizedModel` with
    `fallback` (experts calibrated on all their block's tokens) and `seconds`."""
    from moeconv.calibrate import run_layerwise
    from moeconv.formats.compressed_tensors_io import QuantizedModel, check_group_widths, targets
    chosen, ignored = targets(model)
    check_group_widths(chosen, method, args)
    result = QuantizedModel(method, args, ignored=ignored)
    sweep = _Layerwise(model, dict(chosen), args, result)
    t0 = time.perf_counter()
    device = next(model.parameters()).device
    batches = [b.to(device) for b in calibration.split(batch_size)]
    with torch.no_grad():
        for name in [n for n in sweep.wanted if not any(n.startswith(p) for p in _layer_prefixes(model))]:
            _apply(result, name, sweep.wanted[name], torch.eye(sweep.wanted[name].in_features), args)  # no Hessian
            result.outside.append(name)
        run_layerwise(model, batches, sweep.on_layer, progress=progress)
    result.seconds = time.perf_counter() - t0
    return result


class _Layerwise:
    """`run_layerwise`'s per-layer step: observe, fall back where an expert saw too few tokens, quantize."""

    def __init__(self, model: nn.Module, wanted: dict[str, nn.Module], args, result):
        self.model, self.wanted, self.args, self.result = model, wanted, args, result

    def on_layer(self, index: int, path: str, layer: nn.Module, forward) -> None:
        from moeconv.calibrate import expert_coverage, observe_inputs
        from moeconv.nn.moe import MoEBlock
        from moeconv.hessian import InputStats
        mine = {n: m for n, m in self.wanted.items() if n.startswith(path + ".")}
        blocks = {p: b for p, b in self.model.named_modules() if isinstance(b, MoEBlock) and p.startswith(path + ".")}
        stats = InputStats()
        block_inputs: dict[str, list[torch.Tensor]] = {p: [] for p in blocks}
        with ExitStack() as stack:
            stack.enter_context(observe_inputs(mine, stats.add))
            stack.enter_context(observe_inputs(blocks, lambda p, x: block_inputs[p].append(x.clone())))
            for b in blocks.values():
                stack.enter_context(expert_coverage(b))
            forward()
        stats.release()
        hessians = {n: (stats.hessian.get(n), stats.tokens.get(n, 0)) for n in mine}
        self._fall_back(mine, blocks, block_inputs, hessians)
        _apply_batched(self.result, mine, {n: (h if h is not None else torch.eye(mine[n].in_features))
                                           for n, (h, _) in hessians.items()}, self.args)

    def _fall_back(self, mine, blocks, block_inputs, hessians) -> None:
        """Experts routed fewer than `MIN_TOKENS` tokens: their matrices' Hessians from running the
        expert on every token entering its block (as if routed all of them)."""
        from moeconv.calibrate import observe_inputs
        from moeconv.hessian import InputStats
        redone: set[str] = set()
        for name, (_, tokens) in list(hessians.items()):
            where = _in_expert(name, blocks)
            if tokens >= MIN_TOKENS or name in redone or where is None:
                continue
            bpath, e = where
            again = {n: m for n, m in mine.items() if n.startswith(f"{bpath}.experts.{e}.")}
            stats = InputStats()
            with observe_inputs(again, stats.add), torch.inference_mode():
                for x in block_inputs[bpath]:
                    blocks[bpath].experts[e](x)
            stats.release()
            for n in again:
                redone.add(n)
                self.result.fallback.append(f"{n} ({hessians[n][1]} tokens routed)")
                hessians[n] = (stats.hessian[n], stats.tokens[n])


def _in_expert(name: str, blocks: dict) -> tuple[str, int] | None:
    """(MoE block path, expert index) of a matrix inside an expert, else None."""
    for p in blocks:
        pre = f"{p}.experts."
        if name.startswith(pre):
            return p, int(name[len(pre):].split(".", 1)[0])
    return None


def _layer_prefixes(model) -> list[str]:
    from moeconv.calibrate import decoder_layers
    prefix, layers = decoder_layers(model)
    return [f"{prefix}.{i}." for i in range(len(layers))]


BATCH_BYTES = 512 * 2**20  # working set of one batched sweep (weights, Hessians and their factor)


def _apply_batched(result, mine: dict[str, nn.Linear], hessians: dict[str, torch.Tensor], args) -> None:
    """`_apply` for every matrix of a layer, same-shaped ones in one batched sweep."""
    by_shape: dict[tuple, list[str]] = {}
    for name, m in mine.items():
        by_shape.setdefault(tuple(m.weight.shape), []).append(name)
    for (rows, cols), names in by_shape.items():
        per = max(1, BATCH_BYTES // (8 * (rows * cols + 2 * cols * cols)))
        for start in range(0, len(names), per):
            chunk = names[start:start + per]
            w = torch.stack([mine[n].weight.detach().float() for n in chunk])
            new, scale, zp = gptq(w, torch.stack([hessians[n].float() for n in chunk]), args)
            for k, n in enumerate(chunk):
                _store(result, n, mine[n], w[k], new[k], scale[k], zp[k] if zp is not None else None)


def _store(result, name: str, m: nn.Linear, old: torch.Tensor, new: torch.Tensor, scale, zp) -> None:
    zero = old == 0
    result.zeros_before += int(zero.sum())
    result.zeros_after_of_those += int((new[zero] == 0).sum())
    with torch.no_grad():
        m.weight.copy_(new.to(m.weight.dtype))
    result.qparams[name] = (scale, zp)


def _apply(result, name: str, m: nn.Linear, h: torch.Tensor, args) -> None:
    w = m.weight.detach().float()
    new, scale, zp = gptq(w, h.float(), args)
    _store(result, name, m, w, new, scale, zp)
