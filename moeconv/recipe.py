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

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydantic import ValidationError

from moeconv.errors import ConfigError, InputError
from moeconv.pass_base import Pass

# A recipe is plain data of a human-sized length; everything past these is refused before it is
# built (YAML aliases can make a few hundred bytes expand to billions of nodes).
MAX_RECIPE_BYTES = 256 * 1024
MAX_STEPS = 256
MAX_DEPTH = 32             # nesting of lists and mappings
MAX_NODES = 100_000        # nodes once every alias is expanded
MAX_SCALAR_CHARS = 4096    # one string or number
MAX_OVERRIDE_CHARS = 4096  # one --set value
_PLAIN_TAGS = {f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null", "seq", "map")}
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass
class RecipeStep:
    pass_name: str
    fields: dict
    line: int
    field_lines: dict = field(default_factory=dict)  # field name → line, for precise errors
    overrides: dict = field(default_factory=dict)    # field name → the --set that gave its value


def _registry() -> dict[str, type[Pass]]:
    from passes import BY_NAME  # recipes are the edge where names become classes
    return BY_NAME


def _short_tag(tag: str) -> str:
    return "!!" + tag[len("tag:yaml.org,2002:"):] if tag.startswith("tag:yaml.org,2002:") else tag


def _scan(text: str, source: str) -> None:
    """Walk the YAML events (no object is built) and refuse what a recipe never needs: tags other
    than the plain ones (`!!python/object/apply:os.system`), nesting deeper than MAX_DEPTH, scalars
    longer than MAX_SCALAR_CHARS, and more than MAX_NODES nodes once aliases are expanded."""
    open_sizes: list[list] = []  # per open collection: [expanded size so far, anchor]
    anchors: dict[str, int] = {}
    total = 0
    try:
        for ev in yaml.parse(text, Loader=_Loader):
            line = ev.start_mark.line + 1 if ev.start_mark is not None else 1
            tag = getattr(ev, "tag", None)
            if isinstance(ev, yaml.NodeEvent) and not isinstance(ev, yaml.AliasEvent) \
                    and tag not in (None, "!") and tag not in _PLAIN_TAGS:
                raise InputError(f"{source}:{line}: YAML tag `{_short_tag(tag)[:60]}` is not allowed: a recipe is "
                                 "plain data (strings, numbers, booleans, lists, mappings)")
            if isinstance(ev, yaml.AliasEvent):
                size = anchors.get(ev.anchor, 1)
            elif isinstance(ev, yaml.ScalarEvent):
                if len(ev.value) > MAX_SCALAR_CHARS:
                    raise InputError(f"{source}:{line}: a value of {len(ev.value):,} characters; at most "
                                     f"{MAX_SCALAR_CHARS:,} in a recipe")
                size = 1
                if ev.anchor is not None:
                    anchors[ev.anchor] = 1
            elif isinstance(ev, yaml.CollectionStartEvent):
                open_sizes.append([1, ev.anchor])
                if len(open_sizes) > MAX_DEPTH:
                    raise InputError(f"{source}:{line}: lists and mappings nested more than {MAX_DEPTH} deep")
                total += 1
                _check_total(total, source, line)
                continue
            elif isinstance(ev, yaml.CollectionEndEvent):
                size, anchor = open_sizes.pop()
                if anchor is not None:
                    anchors[anchor] = size
                if open_sizes:
                    open_sizes[-1][0] += size
                continue
            else:
                continue
            total += size
            _check_total(total, source, line)
            if open_sizes:
                open_sizes[-1][0] += size
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, source) from None


def _check_total(total: int, source: str, line: int) -> None:
    if total > MAX_NODES:
        raise InputError(f"{source}:{line}: more than {MAX_NODES:,} values once YAML aliases are expanded "
                         "(an alias bomb?); write the recipe out plainly")


def _yaml_error(exc: Exception, source: str) -> InputError:
    mark = getattr(exc, "problem_mark", None)
    where = f":{mark.line + 1}" if mark is not None else ""
    problem = getattr(exc, "problem", None) or exc
    return InputError(f"{source}{where}: not valid YAML ({' '.join(str(problem).split())[:160]})")


def _compose(text: str, source: str):
    if len(text) > MAX_RECIPE_BYTES:
        raise InputError(f"{source}: {len(text):,} characters; a recipe is at most {MAX_RECIPE_BYTES // 1024} KiB")
    _scan(text, source)
    try:
        return yaml.compose(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, source) from None


def _construct(node, source: str):
    """The Python value of a scanned node (safe constructors only)."""
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_document(node)
    except (yaml.YAMLError, ValueError, OverflowError, RecursionError) as exc:  # e.g. an int past 4300 digits
        line = node.start_mark.line + 1 if node.start_mark is not None else 1
        raise InputError(f"{source}:{line}: not valid YAML ({exc.__class__.__name__}: "
                         f"{' '.join(str(exc).split())[:120]})") from None
    finally:
        loader.dispose()


def _key_text(node) -> str:
    return node.value if isinstance(node, yaml.ScalarNode) else f"<a {node.id}>"


def parse_recipe(text: str, source: str = "<recipe>") -> list[RecipeStep]:
    root = _compose(text, source)
    if root is None:
        raise InputError(f"{source}: empty recipe")
    if isinstance(root, yaml.MappingNode):
        keys = [_key_text(k) for k, _ in root.value]
        steps_node = next((v for k, v in root.value if isinstance(k, yaml.ScalarNode) and k.value == "steps"), None)
        unknown = [k for k in keys if k not in ("steps", "name", "description")]
        if unknown:
            raise InputError(f"{source}:{root.start_mark.line + 1}: unknown top-level key `{unknown[0][:60]}` "
                             "(expected steps, name, description)")
        if steps_node is None:
            raise InputError(f"{source}: no `steps:` list")
    else:
        steps_node = root
    if not isinstance(steps_node, yaml.SequenceNode) or not steps_node.value:
        raise InputError(f"{source}:{steps_node.start_mark.line + 1}: `steps` must be a non-empty list")
    if len(steps_node.value) > MAX_STEPS:
        raise InputError(f"{source}:{steps_node.start_mark.line + 1}: {len(steps_node.value):,} steps; a recipe has "
                         f"at most {MAX_STEPS}")
    steps = []
    for i, node in enumerate(steps_node.value, 1):
        line = node.start_mark.line + 1
        if not isinstance(node, yaml.MappingNode):
            raise InputError(f"{source}:{line}: step {i} must be a mapping with a `pass:` key")
        for k, _ in node.value:
            if not isinstance(k, yaml.ScalarNode) or not isinstance(_construct(k, source), str):
                raise InputError(f"{source}:{k.start_mark.line + 1}: step {i}: field names must be strings, "
                                 f"not `{_key_text(k)[:40]}`")
        data = _construct(node, source)
        if not isinstance(data, dict) or "pass" not in data:
            raise InputError(f"{source}:{line}: step {i} has no `pass:` key")
        name = data.pop("pass")
        if not isinstance(name, str):
            raise InputError(f"{source}:{line}: step {i}: `pass` must be a pass name, not {str(name)[:40]}")
        steps.append(RecipeStep(name, data, line, {k.value: k.start_mark.line + 1 for k, _ in node.value}))
    return steps


def load_recipe(path: Path) -> list[RecipeStep]:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such recipe file")
    size = path.stat().st_size
    if size > MAX_RECIPE_BYTES:
        raise InputError(f"{path}: {size:,} bytes; a recipe is at most {MAX_RECIPE_BYTES // 1024} KiB "
                         f"(and {MAX_STEPS} steps)")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(MAX_RECIPE_BYTES + 1)
    except UnicodeDecodeError:
        raise InputError(f"{path}: recipe is not UTF-8") from None
    return parse_recipe(text, str(path))


_FIELD = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")


def apply_overrides(steps: list[RecipeStep], overrides: list[str]) -> None:
    for item in overrides:
        key, sep, raw = item.partition("=")
        step_key, dot, field = key.partition(".")
        shown = item if len(item) <= 80 else item[:77] + "..."
        if not sep or not dot or not field:
            raise ConfigError(f"--set {shown!r}: use STEP.FIELD=VALUE (STEP: step number or pass name)")
        if not _FIELD.fullmatch(field):
            raise ConfigError(f"--set {shown!r}: `{field[:40]}` is not a field name")
        if step_key.isascii() and step_key.isdigit():
            idx = int(step_key[:12]) - 1 if len(step_key) <= 12 else -1
            if not 0 <= idx < len(steps):
                raise ConfigError(f"--set {shown!r}: no step {step_key[:12]} (recipe has {len(steps)})")
            targets = [steps[idx]]
        else:
            targets = [s for s in steps if s.pass_name == step_key]
            if not targets:
                raise ConfigError(f"--set {shown!r}: no `{step_key[:40]}` step in the recipe")
        if len(raw) > MAX_OVERRIDE_CHARS:
            raise ConfigError(f"--set {key[:60]}: a value of {len(raw):,} characters; at most {MAX_OVERRIDE_CHARS:,}")
        value = _override_value(raw, f"--set {key[:60]}") if raw else raw
        for s in targets:
            s.fields[field] = value
            s.overrides[field] = f"--set {key}"


def _override_value(raw: str, source: str):
    """A --set value, parsed as YAML under the same rules as a recipe (one line of plain data)."""
    try:
        node = _compose(raw, source)
    except InputError as exc:
        raise ConfigError(" ".join(str(exc).split()).replace(f"{source}:1:", f"{source}:", 1)) from None
    if node is None:
        return None
    try:
        return _construct(node, source)
    except InputError as exc:
        raise ConfigError(" ".join(str(exc).split()).replace(f"{source}:1:", f"{source}:", 1)) from None


def build_passes(steps: list[RecipeStep], source: str = "<recipe>") -> list[Pass]:
    """Instantiate each step's pass with its typed config; errors name the step, field and line."""
    registry = _registry()
    passes = []
    for i, step in enumerate(steps, 1):
        cls = registry.get(step.pass_name)
        if cls is None:
            raise ConfigError(f"{source}:{step.line}: step {i}: unknown pass `{str(step.pass_name)[:60]}` "
                              f"(known: {', '.join(sorted(registry))})")
        if not all(isinstance(k, str) for k in step.fields):  # only a Python caller's RecipeStep
            raise ConfigError(f"{source}:{step.line}: step {i} `{step.pass_name}`: field names must be strings")
        try:
            config = cls.Config(**step.fields)
        except ValidationError as exc:
            err = exc.errors()[0]
            field = ".".join(str(p) for p in err.get("loc", ())) or "config"
            top = str(err.get("loc", ("",))[0]) if err.get("loc") else ""
            msg = "unknown field" if err.get("type") == "extra_forbidden" else err.get("msg", "invalid").removeprefix("Value error, ")
            raise ConfigError(f"{_where(step, top, source)}: step {i} `{step.pass_name}`: field `{field}`: {msg}") from None
        for name, value in step.fields.items():
            big = _huge_int(value)
            if big is not None:  # pydantic takes any int; no setting means anything past 64 bits
                text = str(big) if big.bit_length() < 100 else f"a {big.bit_length()}-bit integer"
                raise ConfigError(f"{_where(step, name, source)}: step {i} `{step.pass_name}`: field `{name}`: "
                                  f"{text} is out of range (integers are at most 64-bit)")
        passes.append(cls(config))
    return passes


def _huge_int(value, depth: int = 0):
    """The first integer in `value` (nested lists/dicts) outside the signed 64-bit range, or None."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value if not -2**63 <= value < 2**63 else None
    if depth > MAX_DEPTH:
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    for k, v in items:
        for x in ((k, v) if isinstance(value, dict) else (v,)):
            found = _huge_int(x, depth + 1)
            if found is not None:
                return found
    return None


def _where(step: RecipeStep, name: str, source: str) -> str:
    """`recipe.yaml:LINE` of a field, or the `--set` that gave it its value."""
    if name in step.overrides:
        return f"{source} ({step.overrides[name][:60]})"
    return f"{source}:{step.field_lines.get(name, step.line)}"
