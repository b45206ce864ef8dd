"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for the distillation trainer: every rank holds
1/N of the student's and the teacher's parameters, gradients and optimizer state, and gathers one
decoder layer at a time for its forward and backward.

`shard_objective(objective, device)` shards a *structural copy* of the objective and leaves the
caller's modules plain: the copy shares the caller's parameter tensors (a `deepcopy` whose memo
maps each parameter to itself), `fully_shard` then gives the copy sharded parameters of its own,
and `ShardedObjective.release()` frees the caller's full tensors (their storage becomes empty;
the `Parameter` objects stay, so everything that refers to them still does). After training
`gather_back()` all-gathers every parameter into the caller's tensors, which are plain again —
the pass's checks, the writer and the verification never see a DTensor or an FSDP hook.

Why a copy and not the caller's modules: `fully_shard` cannot be undone (it swaps each module's
class and installs hooks), and the model outlives training (checks, write, reload-and-compare).

Units: `fully_shard` on each decoder layer of the student and of the teacher (first on each of
its submodules whose parameters have another dtype than the rest, since a unit holds one dtype:
MoE routers, fp32 in a bf16 model, and with bf16 mixed precision every router, which computes in
fp32), then on the student
and on the teacher as a whole (their embeddings, norms and heads), then on the hidden-state
projections when there are any. The objective itself is not sharded as a unit: its evaluation
runs the student outside the objective's own forward, and an FSDP root must be the first module
to run forward, so each model is its own root (`roots`).

Same numbers as one process: FSDP's reduce-scatter averages gradients over ranks as DDP's
all-reduce does, and an expert that no token reached on one rank still contributes a zero
gradient there (`set_reduce_scatter_unused_params`, FSDP's `find_unused_parameters`).

Checkpoints use the trainer's one format (full tensors in safetensors, the optimizer state in
`torch.save` format, read with `weights_only=True`), gathered here (`full_tensor`) and cut back
into shards on resume (`shard_like`). Not `torch.distributed.checkpoint.save/load`: its
file-system reader restores its `.metadata` with `pickle.load`, which runs whatever a checkpoint
names, and moeconv resumes from checkpoints a user points it at.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn


def is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor
    return isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of `t` (the tensor itself when it is not sharded); writes to it change `t`."""
    return t.to_local() if is_dtensor(t) else t


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole of `t` on every rank (an all-gather: every rank calls it, in the same order)."""
    return t.full_tensor() if is_dtensor(t) else t


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`full` cut as the sharded tensor `like` is (same mesh and placements), or `full` on `like`'s
    device when `like` is not sharded. Every rank must pass the same `full` (each cuts its own
    part, no communication): a mask computed from the same weights, a tensor every rank read
    from the same checkpoint."""
    if not is_dtensor(like):
        return full.to(like.device)
    from torch.distributed.tensor import distribute_tensor
    return distribute_tensor(full.to(like.device_mesh.device_type), like.device_mesh, like.placements,
                             src_data_rank=None)


def mixed_precision_policy(name: str | None):
    """`None` (compute in the parameters' dtype) or "bf16": bf16 forward/backward, fp32 gradient
    reduction, fp32 parameters and optimizer state."""
    from torch.distributed.fsdp import MixedPrecisionPolicy
    if name is None:
        return MixedPrecisionPolicy()
    if name != "bf16":
        raise ValueError(f"mixed precision must be bf16, not {name!r}")
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


@dataclass
class ShardedObjective:
    """The sharded copy (`objective`), the FSDP roots that hold trained parameters (`roots`), and
    pairs (caller's parameter, its sharded copy) for every parameter of both models."""

    objective: nn.Module
    roots: list
    pairs: list[tuple[nn.Parameter, nn.Parameter]] = field(default_factory=list)
    released: bool = False

    def set_gradient_sync(self, sync: bool) -> None:
        """Reduce-scatter gradients after this backward (`True`), or accumulate them unsharded."""
        for root in self.roots:
            root.set_requires_gradient_sync(sync)

    def release(self) -> None:
        """Free the caller's full parameter tensors (the sharded copy now holds the values)."""
        with torch.no_grad():
            for orig, _ in self.pairs:
                orig.data = torch.empty(0, dtype=orig.dtype, device=orig.device)
        self.released = True

    def gather_back(self) -> None:
        """Every parameter's trained value, all-gathered, into the caller's tensors (a collective)."""
        with torch.no_grad():
            for orig, sharded in self.pairs:
                whole = full_tensor(sharded.detach()).to(orig.device, orig.dtype)
                if whole.untyped_storage().data_ptr() == local(sharded.detach()).untyped_storage().data_ptr():
                    whole = whole.clone()  # one process: the "gathered" tensor is the shard itself
                orig.data = whole
        self.released = False


def _unsharded_submodules(unit: nn.Module):
    """`unit`'s submodules (not itself) outside any module `fully_shard` was already applied to."""
    from torch.distributed.fsdp import FSDPModule
    for child in unit.children():
        if isinstance(child, FSDPModule):
            continue
        yield child
        yield from _unsharded_submodules(child)


def _dominant_dtype(params) -> torch.dtype | None:
    """The dtype most of the elements of `params` have."""
    count: dict[torch.dtype, int] = {}
    for p in params:
        count[p.dtype] = count.get(p.dtype, 0) + p.numel()
    return max(count, key=count.get) if count else None


def _parameters(*modules) -> list[nn.Parameter]:
    seen: dict[int, nn.Parameter] = {}
    for m in modules:
        if m is not None:
            for p in m.parameters():
                seen.setdefault(id(p), p)
    return list(seen.values())


def shard_objective(objective: nn.Module, *, device: torch.device, mixed_precision: str | None = None,
                    mesh=None) -> ShardedObjective:
    """A copy of the `DistillObjective` `objective` whose student, teacher and projections are
    sharded over the default process group (NCCL devices or gloo CPU: `device`'s type)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from moeconv.nn.moe import MoEBlock
    if mesh is None:
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    teacher = getattr(objective, "teacher", None)
    originals = _parameters(objective, teacher)
    memo = {id(p): p for p in originals}  # share the tensors: fully_shard copies out each rank's part
    copied = copy.deepcopy(objective, memo)
    shared = {id(p): p for p in originals}
    policy = mixed_precision_policy(mixed_precision)
    keep_policy = mixed_precision_policy(None)

    def own_units(unit: nn.Module) -> None:
        """Shard apart, uncast, the submodules of `unit` whose parameters are kept in another dtype
        than the rest (an FSDP unit holds one dtype): MoE routers, fp32 in a bf16 model, and under
        mixed precision every router, since `MoEBlock.route` computes in fp32."""
        subs = list(_unsharded_submodules(unit))
        dominant = _dominant_dtype(p for m in [unit, *subs] for p in m.parameters(recurse=False))
        for sub in subs:
            direct = [p for p in sub.parameters(recurse=False)]
            routers = mixed_precision and any(sub is b.router for b in unit.modules() if isinstance(b, MoEBlock))
            if direct and (routers or {p.dtype for p in direct} != {dominant}):
                fully_shard(sub, mesh=mesh, mp_policy=keep_policy)

    def shard(module, layers) -> None:
        for layer in layers:
            own_units(layer)
            fully_shard(layer, mesh=mesh, mp_policy=policy)
        own_units(module)
        fully_shard(module, mesh=mesh, mp_policy=policy)

    # parameter identity before sharding: the copy's parameter at each position is the caller's
    before = {name: p for name, p in copied.named_parameters(remove_duplicate=False)}
    t_before = ({name: p for name, p in copied.teacher.named_parameters(remove_duplicate=False)}
                if copied.teacher is not None else {})
    shard(copied.student, copied.s.layers)
    roots = [copied.student]
    if copied.teacher is not None:
        shard(copied.teacher, copied.t.layers)
    if getattr(copied, "proj", None) is not None and any(True for _ in copied.proj.parameters()):
        fully_shard(copied.proj, mesh=mesh, mp_policy=policy)
        roots.append(copied.proj)
    for root in roots:
        root.set_reduce_scatter_unused_params(True)
    after = dict(copied.named_parameters(remove_duplicate=False))
    t_after = dict(copied.teacher.named_parameters(remove_duplicate=False)) if copied.teacher is not None else {}
    pairs = _pairs(((before, after), (t_before, t_after)), shared)
    if len(pairs) != len(originals):
        raise RuntimeError(f"internal: {len(originals) - len(pairs)} parameter(s) of the objective were not sharded")
    return ShardedObjective(copied, roots, pairs)


def _pairs(before_after, shared: dict[int, nn.Parameter]) -> list[tuple[nn.Parameter, nn.Parameter]]:
    """(caller's parameter, its sharded copy), once per parameter: each name's parameter before
    sharding (the caller's own, shared by the copy) and after."""
    pairs, done = [], set()
    for before, after in before_after:
        for name, p in before.items():
            if id(p) in shared and id(p) not in done:
                done.add(id(p))
                pairs.append((shared[id(p)], after[name]))
    return pairs


def local_bytes(tensors) -> int:
    """Bytes this rank holds for `tensors` (its shards of sharded ones; each storage once)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        t = local(t)
        if t.numel() == 0:
            continue
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def optimizer_tensors(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for state in opt.state.values() for v in state.values() if isinstance(v, torch.Tensor)]


def gather_optimizer_state(opt: torch.optim.Optimizer) -> dict:
    """`opt.state_dict()` with every sharded state tensor gathered whole on the CPU (a collective:
    every rank calls it; the same dict a one-process run of the same optimizer would save)."""
    sd = opt.state_dict()
    state = {}
    for k in sorted(sd["state"]):
        state[k] = {name: (full_tensor(v).cpu() if isinstance(v, torch.Tensor) else v)
                    for name, v in sorted(sd["state"][k].items())}
    return {"state": state, "param_groups": sd["param_groups"]}


def shard_optimizer_state(sd: dict, params: list[torch.Tensor]) -> dict:
    """A whole (one-process) AdamW state dict cut into this rank's shards of `params` (every rank
    passes the same dict, read from the same checkpoint)."""
    state = {}
    for k in sorted(sd["state"]):
        p = params[sd["param_groups"][0]["params"].index(k)]
        state[k] = {name: (shard_like(v, p) if isinstance(v, torch.Tensor) and v.shape == p.shape and v.dim() else v)
                    for name, v in sorted(sd["state"][k].items())}
    return {"state": state, "param_groups": sd["param_groups"]}
