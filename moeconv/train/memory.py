"""What one training process holds, estimated per rank for both strategies, before anything is
allocated: `moeconv plan` shows it for a recipe with `distill`, the distill pass reports it beside
what the trainer measured (`TrainResult.memory`), and `--strategy auto` picks FSDP from it.

Per rank, with P the student's and teacher's parameter bytes, T the trained parameters' bytes, L
the largest decoder layer's bytes, N processes (AdamW keeps two moments per trained parameter, in
its dtype):

| held              | ddp                  | fsdp                                                   |
|-------------------|----------------------|--------------------------------------------------------|
| parameters        | P                    | P / N + 2 L (one layer gathered, the next prefetched)  |
| gradients         | T (+ T in DDP's buckets when N > 1) | T / N, + T while micro-batches accumulate unsharded (else + L) |
| optimizer state   | 2 T                  | 2 T / N                                                |
| activations       | one micro-batch's    | one micro-batch's                                      |
"""
from __future__ import annotations

from dataclasses import dataclass

PARTS = ("parameters", "gradients", "optimizer_state", "activations")


@dataclass(frozen=True)
class TrainingSizes:
    """Bytes of what training touches (the inputs of `per_rank`)."""

    student: int
    teacher: int
    trained: int
    largest_layer: int
    activations: int


def per_rank(sizes: TrainingSizes, processes: int, strategy: str, micro_batches: int = 1) -> dict[str, int]:
    """The bytes one of `processes` ranks holds, by part (`PARTS`) and in `total`."""
    n = max(1, processes)
    p, t, layer = sizes.student + sizes.teacher, sizes.trained, sizes.largest_layer
    if strategy == "fsdp":
        out = {"parameters": -(-p // n) + 2 * layer,
               "gradients": -(-t // n) + (t if micro_batches > 1 else layer),
               "optimizer_state": -(-2 * t // n)}
    else:
        out = {"parameters": p, "gradients": t * (2 if n > 1 else 1), "optimizer_state": 2 * t}
    out["activations"] = sizes.activations
    out["total"] = sum(out[k] for k in PARTS)
    return out


def both(sizes: TrainingSizes, processes: int, micro_batches: int = 1) -> dict:
    """{"processes": N, "ddp": per_rank(…), "fsdp": per_rank(…)}: the comparison plan and report show."""
    return {"processes": processes, "ddp": per_rank(sizes, processes, "ddp", micro_batches),
            "fsdp": per_rank(sizes, processes, "fsdp", micro_batches)}


def sizes_of(objective, trained_names: set[str], activations: int) -> TrainingSizes:
    """`TrainingSizes` of a `DistillObjective` (its student, teacher and projections), with
    `trained_names` the trained parameters' names (`objective.named_parameters()` names)."""
    def nbytes(params) -> int:
        seen, total = set(), 0
        for p in params:
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel() * p.element_size()
        return total
    teacher = getattr(objective, "teacher", None)
    layers = list(objective.s.layers) + (list(objective.t.layers) if teacher is not None else [])
    return TrainingSizes(student=nbytes(objective.parameters()),
                         teacher=nbytes(teacher.parameters()) if teacher is not None else 0,
                         trained=nbytes(p for n, p in objective.named_parameters() if n in trained_names),
                         largest_layer=max((nbytes(layer.parameters()) for layer in layers), default=0),
                         activations=activations)


def device_capacity(device: str) -> int | None:
    """Bytes one process may use on `device`: the GPU's memory, or on the CPU the memory available
    shared by the processes torchrun started on this machine; None when unknown."""
    import os

    import torch
    if str(device).startswith("cuda") and torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)
    from moeconv.io.config_checks import available_memory
    avail = available_memory()
    if not avail:
        return None
    return avail // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def choose_strategy(requested: str, estimate: dict, capacity: int | None, processes: int) -> tuple[str, str]:
    """(strategy, why): `requested` unless it is "auto", which picks fsdp under torchrun when the
    DDP estimate per rank exceeds `capacity`, else ddp."""
    from moeconv.io.config_checks import format_bytes
    if requested != "auto":
        return requested, "requested"
    if processes <= 1:
        return "ddp", "one process: nothing to shard"
    need = estimate["ddp"]["total"]
    if capacity is not None and need > capacity:
        return "fsdp", (f"DDP would hold about {format_bytes(need)} per process, more than the "
                        f"{format_bytes(capacity)} each may use; FSDP about {format_bytes(estimate['fsdp']['total'])}")
    room = f" of the {format_bytes(capacity)} each may use" if capacity is not None else ""
    return "ddp", f"DDP holds about {format_bytes(need)} per process{room}"
