"""Recipes: YAML files whose steps map 1:1 onto pass classes and their typed configs.

    # upcycle, then prune, then 2:4 inside the survivors
    steps:
      - pass: upcycle
        num_experts: 8
        top_k: 2
      - pass: prune-experts
        keep: 6

(A top-level list of steps is accepted too.) Every problem names the step and the line:
unknown pass, unknown field, wrong type, and — through `Pipeline.plan()` — an impossible order.
`--set STEP.FIELD=VALUE` overrides a field (STEP is the 1-based step number or the pass name).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydantic import ValidationError

from moeconv.errors import ConfigError, InputError
from moeconv.pass_base import Pass


@dataclass
class RecipeStep:
    pass_name: str
    fields: dict
    line: int
    field_lines: dict = field(default_factory=dict)  # field name → line, for precise errors


def _registry() -> dict[str, type[Pass]]:
    from passes import BY_NAME  # recipes are the edge where names become classes
    return BY_NAME


def parse_recipe(text: str, source: str = "<recipe>") -> list[RecipeStep]:
    try:
        root = yaml.compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise InputError(f"{source}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if root is None:
        raise InputError(f"{source}: empty recipe")
    if isinstance(root, yaml.MappingNode):
        steps_node = next((v for k, v in root.value if k.value == "steps"), None)
        unknown = [k.value for k, _ in root.value if k.value not in ("steps", "name", "description")]
        if unknown:
            raise InputError(f"{source}:{root.start_mark.line + 1}: unknown top-level key `{unknown[0]}` "
                             "(expected steps, name, description)")
        if steps_node is None:
            raise InputError(f"{source}: no `steps:` list")
    else:
        steps_node = root
    if not isinstance(steps_node, yaml.SequenceNode) or not steps_node.value:
        raise InputError(f"{source}:{steps_node.start_mark.line + 1}: `steps` must be a non-empty list")
    steps = []
    for i, node in enumerate(steps_node.value, 1):
        line = node.start_mark.line + 1
        if not isinstance(node, yaml.MappingNode):
            raise InputError(f"{source}:{line}: step {i} must be a mapping with a `pass:` key")
        data = yaml.safe_load(yaml.serialize(node))
        if not isinstance(data, dict) or "pass" not in data:
            raise InputError(f"{source}:{line}: step {i} has no `pass:` key")
        name = str(data.pop("pass"))
        steps.append(RecipeStep(name, data, line, {k.value: k.start_mark.line + 1 for k, _ in node.value}))
    return steps


def load_recipe(path: Path) -> list[RecipeStep]:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such recipe file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{path}: recipe is not UTF-8") from None
    return parse_recipe(text, str(path))


def apply_overrides(steps: list[RecipeStep], overrides: list[str]) -> None:
    for item in overrides:
        key, sep, raw = item.partition("=")
        step_key, dot, field = key.partition(".")
        if not sep or not dot or not field:
            raise ConfigError(f"--set {item!r}: use STEP.FIELD=VALUE (STEP: step number or pass name)")
        if step_key.isdigit():
            idx = int(step_key) - 1
            if not 0 <= idx < len(steps):
                raise ConfigError(f"--set {item!r}: no step {step_key} (recipe has {len(steps)})")
            targets = [steps[idx]]
        else:
            targets = [s for s in steps if s.pass_name == step_key]
            if not targets:
                raise ConfigError(f"--set {item!r}: no `{step_key}` step in the recipe")
        value = yaml.safe_load(raw) if raw else raw
        for s in targets:
            s.fields[field] = value


def build_passes(steps: list[RecipeStep], source: str = "<recipe>") -> list[Pass]:
    """Instantiate each step's pass with its typed config; errors name the step, field and line."""
    registry = _registry()
    passes = []
    for i, step in enumerate(steps, 1):
        cls = registry.get(step.pass_name)
        if cls is None:
            raise ConfigError(f"{source}:{step.line}: step {i}: unknown pass `{step.pass_name}` "
                              f"(known: {', '.join(sorted(registry))})")
        try:
            config = cls.Config(**step.fields)
        except ValidationError as exc:
            err = exc.errors()[0]
            field = ".".join(str(p) for p in err.get("loc", ())) or "config"
            top = str(err.get("loc", ("",))[0]) if err.get("loc") else ""
            line = step.field_lines.get(top, step.line)
            msg = "unknown field" if err.get("type") == "extra_forbidden" else err.get("msg", "invalid").removeprefix("Value error, ")
            raise ConfigError(f"{source}:{line}: step {i} `{step.pass_name}`: field `{field}`: {msg}") from None
        passes.append(cls(config))
    return passes
