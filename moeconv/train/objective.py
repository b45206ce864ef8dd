"""The distillation objective: one student forward and one teacher forward per micro-batch, the
loss terms of `losses.py` combined with `LossWeights`.

`DistillObjective` is the `nn.Module` the trainer optimises (and wraps in DDP): its parameters
are the student's and the hidden-state projections; the teacher is held outside the module tree
(never trained, broadcast or checkpointed) and always runs under `no_grad`.

Hidden states are the outputs of the decoder layers (`moeconv.calibrate.decoder_layers`: the
repeated block stack), captured with forward hooks; router logits are captured with a forward hook
on each `MoEBlock.router` (fp32, `(tokens, E)`), so gradients flow through them to the router.
Hooks are registered for one forward and always removed.

`layer_map` maps a student layer index to a teacher layer index. Default: identity when the layer
counts match, otherwise student layer j ↔ teacher layer ⌊(j+1)·L_t/L_s⌋ − 1 (the last layers
always pair). Router distillation uses the pairs where both layers hold an MoE block.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from moeconv.nn.hooks import removed_on_exit
from moeconv.nn.moe import MoEBlock
import moeconv.train.losses as losses

TERMS = ("kl", "ce", "hidden", "router", "balance", "z")


@dataclass(frozen=True)
class LossWeights:
    kl: float = 0.0
    ce: float = 0.0
    hidden: float = 0.0
    router: float = 0.0
    balance: float = 0.0
    z: float = 0.0

    def __post_init__(self):
        for name in TERMS:
            v = getattr(self, name)
            if not v >= 0:
                raise ValueError(f"loss weight {name} must be >= 0, got {v}")
        if not any(getattr(self, n) for n in TERMS):
            raise ValueError("every loss weight is 0: nothing to train on")

    def active(self) -> dict[str, float]:
        return {n: getattr(self, n) for n in TERMS if getattr(self, n) > 0}

    @property
    def needs_teacher(self) -> bool:
        return self.kl > 0 or self.hidden > 0 or self.router > 0


@dataclass(frozen=True)
class ObjectiveSpec:
    weights: LossWeights
    temperature: float = 1.0
    layer_map: dict[int, int] | None = None
    router_loss: str = "kl"  # kl | topk-ce
    expert_map: list[int] | None = None
    seed: int = 0


@dataclass
class Structure:
    """Where a model's decoder layers and MoE routers are."""

    prefix: str | None
    layers: list[nn.Module]
    moe: dict[int, MoEBlock] = field(default_factory=dict)  # layer index → block

    @property
    def num_layers(self) -> int:
        return len(self.layers)


def model_structure(model: nn.Module) -> Structure:
    from moeconv.calibrate import decoder_layers
    from moeconv.errors import UnsupportedError
    try:
        prefix, layers = decoder_layers(model)
    except UnsupportedError:
        return Structure(None, [])
    moe = {}
    for path, m in model.named_modules():
        if isinstance(m, MoEBlock) and prefix is not None and path.startswith(f"{prefix}."):
            moe.setdefault(int(path[len(prefix) + 1:].split(".")[0]), m)
    return Structure(prefix, list(layers), moe)


def default_layer_map(student_layers: int, teacher_layers: int) -> dict[int, int]:
    if student_layers == teacher_layers:
        return {j: j for j in range(student_layers)}
    return {j: (j + 1) * teacher_layers // student_layers - 1 for j in range(student_layers)}


def model_logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    try:
        out = model(input_ids=input_ids, use_cache=False)
    except TypeError:
        out = model(input_ids)
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, (tuple, list)) and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot find logits in {type(out).__name__}")


@contextmanager
def capture(layers: dict[int, nn.Module], routers: dict[int, MoEBlock]):
    """Yield {"hidden": {i: layer output}, "router": {i: router logits}} filled by one forward."""
    got: dict[str, dict[int, torch.Tensor]] = {"hidden": {}, "router": {}}
    handles = []
    for i, layer in layers.items():
        def on_layer(_m, _a, out, i=i):
            got["hidden"][i] = out[0] if isinstance(out, (tuple, list)) else out
        handles.append(layer.register_forward_hook(on_layer))
    for i, block in routers.items():
        def on_router(_m, _a, out, i=i):
            got["router"][i] = out
        handles.append(block.router.register_forward_hook(on_router))
    with removed_on_exit(handles):
        yield got


class DistillObjective(nn.Module):
    """`forward(input_ids) -> (loss, {term: value})` for one micro-batch."""

    def __init__(self, student: nn.Module, teacher: nn.Module | None, spec: ObjectiveSpec):
        super().__init__()
        w = spec.weights
        if w.needs_teacher and teacher is None:
            raise ValueError("kl, hidden and router losses need a teacher")
        self.student = student
        object.__setattr__(self, "teacher", teacher)  # outside the module tree on purpose
        self.spec = spec
        self.s = model_structure(student)
        self.t = model_structure(teacher) if teacher is not None else Structure(None, [])
        self.pairs: list[tuple[int, int]] = []
        self.router_pairs: list[tuple[int, int]] = []
        self.notes: list[str] = []
        if w.hidden > 0 or w.router > 0:
            if not self.s.layers or not self.t.layers:
                raise ValueError("hidden-state and router losses need models with a decoder layer stack")
            lmap = spec.layer_map or default_layer_map(self.s.num_layers, self.t.num_layers)
            for j, i in lmap.items():
                if not (0 <= j < self.s.num_layers and 0 <= i < self.t.num_layers):
                    raise ValueError(f"layer_map {j}→{i} is out of range (student has {self.s.num_layers} layers, "
                                     f"teacher {self.t.num_layers})")
            self.pairs = sorted(lmap.items())
        self.proj = None
        if w.hidden > 0:
            self.proj = losses.HiddenProjections(self.pairs, self._dims(self.s, student), self._dims(self.t, teacher),
                                                 seed=spec.seed)
        if w.router > 0:
            self.router_pairs = [(j, i) for j, i in self.pairs if j in self.s.moe and i in self.t.moe]
            if not self.router_pairs:
                raise ValueError("router distillation needs MoE layers in both models at mapped positions")
            for j, i in self.router_pairs:
                te, se = self.t.moe[i].num_experts, self.s.moe[j].num_experts
                losses.expert_map_matrix(spec.expert_map, te, se)  # raises with the reason
        if (w.balance > 0 or w.z > 0) and not self.s.moe:
            raise ValueError("load-balance and z-loss need an MoE student")

    @staticmethod
    def _dims(struct: Structure, model: nn.Module) -> dict[int, int]:
        # One probe forward would be exact, but configs/embeddings give every decoder width we meet;
        # the hidden size is the embedding width.
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if emb is None:
            emb = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
        if emb is None:
            raise ValueError("hidden-state loss needs a model with an input embedding")
        return {i: int(emb.embedding_dim) for i in range(struct.num_layers)}

    def _run(self, model, struct: Structure, ids, layer_idx, router_idx):
        layers = {i: struct.layers[i] for i in layer_idx}
        routers = {i: struct.moe[i] for i in router_idx}
        with capture(layers, routers) as got:
            logits = model_logits(model, ids)
        return logits, got

    def forward(self, input_ids: torch.Tensor):
        spec, w = self.spec, self.spec.weights
        s_layers = [j for j, _ in self.pairs] if w.hidden > 0 else []
        t_layers = [i for _, i in self.pairs] if w.hidden > 0 else []
        s_routers = set(j for j, _ in self.router_pairs)
        if w.balance > 0 or w.z > 0:
            s_routers |= set(self.s.moe)
        t_routers = [i for _, i in self.router_pairs]
        t_logits, t_got = None, None
        if w.needs_teacher:
            with torch.no_grad():
                t_logits, t_got = self._run(self.teacher, self.t, input_ids, t_layers, t_routers)
        s_logits, s_got = self._run(self.student, self.s, input_ids, s_layers, sorted(s_routers))
        parts: dict[str, torch.Tensor] = {}
        if w.kl > 0:
            parts["kl"] = losses.kl_loss(s_logits, t_logits, spec.temperature)
        if w.ce > 0:
            parts["ce"] = losses.ce_loss(s_logits, input_ids)
        if w.hidden > 0:
            parts["hidden"] = losses.hidden_mse(s_got["hidden"], t_got["hidden"], self.proj)
        if w.router > 0:
            terms = []
            for j, i in self.router_pairs:
                s_r, t_r = s_got["router"][j], t_got["router"][i]
                if spec.router_loss == "topk-ce":
                    terms.append(losses.router_topk_ce(s_r, t_r, self.t.moe[i].top_k, spec.expert_map))
                else:
                    terms.append(losses.router_kl(s_r, t_r, spec.expert_map))
            parts["router"] = torch.stack(terms).mean()
        if w.balance > 0:
            parts["balance"] = torch.stack([losses.load_balance_loss(s_got["router"][j], self.s.moe[j].top_k)
                                            for j in sorted(self.s.moe)]).mean()
        if w.z > 0:
            parts["z"] = torch.stack([losses.z_loss(s_got["router"][j]) for j in sorted(self.s.moe)]).mean()
        loss = sum(getattr(w, k) * v for k, v in parts.items())
        return loss, {k: v.detach() for k, v in parts.items()}

    @torch.no_grad()
    def evaluate(self, input_ids: torch.Tensor) -> dict[str, float]:
        """Sums over every predicted position: student CE (`ce_sum`, `tokens`) and, with a teacher,
        KL(teacher ‖ student) at T=1 (`kl_sum`, `kl_tokens`) and teacher CE (`teacher_ce_sum`)."""
        s = model_logits(self.student, input_ids).float()
        out = {"ce_sum": F.cross_entropy(s[:, :-1].reshape(-1, s.shape[-1]), input_ids[:, 1:].reshape(-1),
                                         reduction="sum").item(),
               "tokens": float(input_ids[:, 1:].numel())}
        if self.teacher is not None:
            t = model_logits(self.teacher, input_ids).float()
            out["kl_sum"] = losses.kl_loss(s, t, 1.0).item() * s.shape[0] * s.shape[1]
            out["kl_tokens"] = float(s.shape[0] * s.shape[1])
            out["teacher_ce_sum"] = F.cross_entropy(t[:, :-1].reshape(-1, t.shape[-1]), input_ids[:, 1:].reshape(-1),
                                                    reduction="sum").item()
        return out
