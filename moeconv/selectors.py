"""One selector grammar for every command that picks parts of a model.

`upcycle` (which dense FFNs become MoE layers), `quantize` and `sparsify` (which linear layers)
and `prune-experts` (which MoE layers) read their `targets` / `ignore` strings here, with one
meaning. A string is parsed once (`parse_selector`, cached) into a typed `Selector`; the configs'
field validators call `check_selectors`, so a bad string is refused when the config is built, with
the same message from every command and from the Python API. Like torchao's
`filter_fn(module, fqn)`, a selector judges one candidate from what is known about it alone: its
module path, its layer index and its group.

Grammar, tried in this order:

- `re:REGEX`: REGEX is *searched* (not matched) in the module path: `re:o_proj$`, `re:\\.2\\.`.
- `layers:0-3,7`: the layer index is one of the comma-separated numbers or inclusive ranges.
- `every:N` / `every:N+R`: layer index % N == R, with N >= 1 and 0 <= R < N (`every:2`: even
  layers, `every:2+1`: odd ones).
- a group name, the groups of `moeconv.module_groups`: `attention`, `experts`, `shared_expert`,
  `router`, `mlp`, `embeddings`, `lm_head`, `other`; and `dense-ffn`, another name for `mlp`
  (dense FFNs found by graph structure). `experts` selects every expert of an MoE layer, the
  shared expert included (what sparsify has always pruned by default); `shared_expert` selects
  only the shared experts (routed only: `targets experts` + `ignore shared_expert`).
- anything else is a module path: that module and everything under it (`model.layers.3`
  selects `model.layers.3.mlp` and `model.layers.3.self_attn.q_proj`). A group name wins over a
  module of the same name; `re:^mlp(\\.|$)` reaches such a module.

Any other `word:` prefix, an empty string, whitespace at either end, a regex that does not
compile, a malformed or backwards `layers:` list or a bad `every:` step/offset raises ValueError:
`bad selector 'layers:x' (REASON): use re:REGEX, layers:0-3,7, every:2[+1], a group (…) or a
module path`.

Layer index: the first component of the module path that is a number
(`model.layers.5.mlp.experts.3.up_proj` → 5, `transformer.h.2.mlp` → 2). In the layer stacks
moeconv meets (`model.layers.N`, GPT-2's `transformer.h.N`, BERT's `encoder.layer.N`, an
`nn.Sequential` of blocks) that is the decoder layer number, and it needs only the path: the
streaming upcycle, which sees a meta-device skeleton, reads it the same as every other command.
Modules with no number in their path (embeddings, the final norm, `lm_head`) have no layer index,
and `layers:` / `every:` never select them. A model with several stacks (encoder and decoder, a
vision tower) counts each from 0: add `re:` or a module path to pick one.

What each command's candidates are, and the group each is in:

- `upcycle`: dense FFN sites, at the site's path, group `mlp` (`FFN_SITE_GROUP`);
- `prune-experts`: MoE layers, at the MoE block's path, group `experts` (`MOE_LAYER_GROUP`);
- `quantize`, `sparsify`: linear layers, in the group `module_groups(state)` gives them.

A group no candidate of a command can be in (`attention` for upcycle or prune-experts) is valid
grammar and selects nothing there: as `targets` that ends in the command's "selects nothing"
error, which names what the model has (and, via `Selection.absent_groups`, the group that
matched nothing). It is not refused at validation: a config does not know its model, and the
same `ignore` list stays valid for every command of a recipe.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Annotated, Iterable

from pydantic import AfterValidator

from moeconv.module_groups import GROUPS

FFN_SITE_GROUP = "mlp"        # the group of an upcycle candidate (a dense FFN site)
MOE_LAYER_GROUP = "experts"   # the group of a prune-experts candidate (an MoE layer)
# Group selector → the `module_groups` groups it selects.
_MEMBERS = {g: frozenset({g}) for g in GROUPS} | {"dense-ffn": frozenset({"mlp"}),
                                                  "experts": frozenset({"experts", "shared_expert"})}
_GROUP_LIST = ", ".join("mlp or dense-ffn" if g == "mlp" else g for g in GROUPS)
HELP = f"re:REGEX, layers:0-3,7, every:2[+1], a group ({_GROUP_LIST}) or a module path"

_PREFIX = re.compile(r"^([A-Za-z][\w-]*):")
_LAYERS = re.compile(r"^\d+(?:-\d+)?(?:,\d+(?:-\d+)?)*$")
_EVERY = re.compile(r"^(\d+)(?:\+(\d+))?$")
_NUMBER = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


# ----------------------------------------------------------------------------- selectors

@dataclass(frozen=True)
class Selector:
    """One parsed selector; `text` is the string it came from."""

    text: str

    def matches(self, path: str, layer: int | None, group: str | None) -> bool:
        """Whether the candidate at `path`, in decoder layer `layer` (None: outside any layer)
        and in `group` (None: no group known) is selected."""
        raise NotImplementedError


@dataclass(frozen=True)
class RegexSelector(Selector):
    pattern: re.Pattern

    def matches(self, path, layer, group) -> bool:
        return self.pattern.search(path) is not None


@dataclass(frozen=True)
class LayersSelector(Selector):
    ranges: tuple[tuple[int, int], ...]  # inclusive (first, last)

    def matches(self, path, layer, group) -> bool:
        return layer is not None and any(lo <= layer <= hi for lo, hi in self.ranges)


@dataclass(frozen=True)
class EverySelector(Selector):
    step: int
    offset: int

    def matches(self, path, layer, group) -> bool:
        return layer is not None and layer % self.step == self.offset


@dataclass(frozen=True)
class GroupSelector(Selector):
    members: frozenset[str]  # `module_groups` groups this name covers

    def matches(self, path, layer, group) -> bool:
        return group in self.members


@dataclass(frozen=True)
class PathSelector(Selector):
    path: str

    def matches(self, path, layer, group) -> bool:
        return path == self.path or path.startswith(self.path + ".")


# ----------------------------------------------------------------------------- parsing

def bad_selector(text, reason: str = "") -> ValueError:
    """The one error every command gives for a selector it cannot read."""
    why = f" ({reason})" if reason else ""
    return ValueError(f"bad selector {text!r}{why}: use {HELP}")


@functools.lru_cache(maxsize=4096)
def parse_selector(text: str) -> Selector:
    """`text` as a `Selector`; ValueError (`bad_selector`) when it is not one. Cached: each
    string is parsed (and its regex compiled) once per process."""
    if not isinstance(text, str) or not text.strip():
        raise bad_selector(text, "empty")
    if text != text.strip():
        raise bad_selector(text, "whitespace at an end")
    prefix = _PREFIX.match(text)
    if prefix is None:
        if text in _MEMBERS:
            return GroupSelector(text, _MEMBERS[text])
        return PathSelector(text, text)
    kind, body = prefix.group(1), text[prefix.end():]
    if kind == "re":
        try:
            return RegexSelector(text, re.compile(body))
        except re.error as exc:
            raise bad_selector(text, f"not a valid regex: {exc}") from None
    if kind == "layers":
        return LayersSelector(text, _ranges(text, body))
    if kind == "every":
        step, offset = _every(text, body)
        return EverySelector(text, step, offset)
    raise bad_selector(text, f"unknown prefix {kind + ':'!r}")


def _ranges(text: str, body: str) -> tuple[tuple[int, int], ...]:
    if not _LAYERS.match(body):
        raise bad_selector(text, "layers: takes layer numbers and ranges, such as layers:0-3,7")
    out = []
    for part in body.split(","):
        lo, _, hi = part.partition("-")
        first, last = int(lo), int(hi or lo)
        if last < first:  # selects nothing: surely a typo, never what was meant
            raise bad_selector(text, f"range {part} runs backwards")
        out.append((first, last))
    return tuple(out)


def _every(text: str, body: str) -> tuple[int, int]:
    m = _EVERY.match(body)
    if m is None:
        raise bad_selector(text, "every: takes a step and an optional offset, such as every:2 or every:2+1")
    step, offset = int(m.group(1)), int(m.group(2) or 0)
    if step < 1:
        raise bad_selector(text, "the step must be >= 1")
    if offset >= step:  # layer % step is always below step: it would select nothing
        raise bad_selector(text, "the offset must be smaller than the step")
    return step, offset


def check_selectors(values: list[str] | None) -> list[str] | None:
    """Parse every selector of a config field (pydantic `field_validator`s call this); the
    strings are kept as given, so configs, recipes and reports still show what the user wrote."""
    for text in values or []:
        parse_selector(text)
    return values


# The config field types: a list of selectors checked when the config is built (pydantic).
Selectors = Annotated[list[str], AfterValidator(check_selectors)]
OptionalSelectors = Annotated[list[str] | None, AfterValidator(check_selectors)]


def layer_index(path: str) -> int | None:
    """The decoder layer a module path is in: its first numeric component (module docstring)."""
    m = _NUMBER.search(path)
    return int(m.group(1)) if m else None


# ----------------------------------------------------------------------------- targets minus ignore

@dataclass(frozen=True)
class Selection:
    """`targets` minus `ignore`. No targets (None or an empty list) means every candidate."""

    targets: tuple[Selector, ...] | None
    ignore: tuple[Selector, ...] = ()

    @classmethod
    def of(cls, targets: Iterable[str] | None, ignore: Iterable[str] | None = ()) -> Selection:
        parsed = tuple(parse_selector(t) for t in targets or ())
        return cls(parsed or None, tuple(parse_selector(t) for t in ignore or ()))

    def targeted(self, path: str, group: str | None) -> bool:
        """Picked by some target (always true without targets); `ignore` not consulted."""
        return self.targets is None or _any(self.targets, path, group)

    def ignored(self, path: str, group: str | None) -> bool:
        return _any(self.ignore, path, group)

    def selects(self, path: str, group: str | None) -> bool:
        return self.targeted(path, group) and not self.ignored(path, group)

    def absent_groups(self, present: Iterable[str]) -> list[str]:
        """Target group names that cover none of the `present` groups: why a target selected
        nothing, for the commands' "selects nothing" errors."""
        present = set(present)
        return [s.text for s in self.targets or () if isinstance(s, GroupSelector) and not s.members & present]

    def describe(self) -> str:
        """`targets [...] minus ignore [...]`, for error messages."""
        said = f"targets {[s.text for s in self.targets]}" if self.targets else "every candidate"
        return said + (f" minus ignore {[s.text for s in self.ignore]}" if self.ignore else "")


def _any(selectors: tuple[Selector, ...], path: str, group: str | None) -> bool:
    if not selectors:
        return False
    layer = layer_index(path)
    return any(s.matches(path, layer, group) for s in selectors)


def absent_note(selection: Selection, present: Iterable[str], what: str) -> str:
    """'; group 'attention' holds no FFN site' style note, or '' when every target group applies."""
    absent = selection.absent_groups(present)
    if not absent:
        return ""
    names = ", ".join(repr(a) for a in absent)
    return f"; {'group' if len(absent) == 1 else 'groups'} {names} {'holds' if len(absent) == 1 else 'hold'} no {what}"
