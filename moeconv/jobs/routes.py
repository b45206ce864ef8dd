"""Which route a command takes: streamed (disk → one layer → disk, memory independent of depth)
whenever the source and the options allow it, else in memory. The choice and its reason go into
the report, so a user sees why a run held the whole model.

`--device cuda` exists on the streamed route only (one decoder layer at a time on the GPU): a run
that takes the in-memory route with it is refused, with the reason the source is not streamed."""
from __future__ import annotations

from pathlib import Path

from moeconv.stream.skeleton import streamable

STREAMED_COMMANDS = ("quantize", "sparsify", "prune-experts", "run")


def choose_route(src, command: str, *, method: str | None = None, passes: list | None = None,
                 calibrated: bool = False) -> tuple[str, str]:
    """("streaming" | "in-memory", why) for `command` on `src` (`method`: sparsify's; `passes`
    and `calibrated`: what a calibrated sweep would run, for sparsify, prune-experts and run)."""
    if command not in STREAMED_COMMANDS:
        return "in-memory", f"{command} is not streamed yet"
    path = Path(str(src))
    if not path.is_dir():
        return "in-memory", "the source is not a checkpoint directory"
    why = streamable(path)
    if why is not None:
        return "in-memory", f"the source is {why}" if why.startswith("a ") else why
    if command == "quantize" or (command == "sparsify" and method == "magnitude"):
        return "streaming", "a safetensors checkpoint: read, changed and written one tensor at a time"
    from moeconv.jobs.stream_layerwise import why_not_streamed
    why = why_not_streamed(passes or [], calibrated) or _plan_problem(path, passes)
    if why is not None:
        return "in-memory", why
    if not calibrated:
        return "streaming", ("a safetensors checkpoint and data-free passes: each decoder layer read, changed by "
                             "every pass in turn, and written, one at a time")
    return "streaming", ("a safetensors checkpoint: each decoder layer read, calibrated and changed by every pass "
                         "in turn, and written, one at a time")


def refuse_off_route(device: str, route: str, why: str) -> None:
    """`ConfigError` (one line) for `--device cuda` on a run whose `route` is not "streaming"
    (`why`: the reason `choose_route` gave): the in-memory route loads the whole model on the CPU."""
    if device != "cpu" and route != "streaming":
        from moeconv.errors import ConfigError
        raise ConfigError(f"--device {device} runs the streamed route (one decoder layer at a time on the GPU); "
                          f"this run loads the whole model on the CPU ({why}): use --device cpu")


def _plan_problem(path: Path, passes: list) -> str | None:
    """Why the recipe cannot run on this model (a fact it lacks), from the skeleton's structure;
    such a run takes the in-memory route, which checks the weights before it names the problem."""
    from moeconv.pipeline import Pipeline
    from moeconv.stream.skeleton import Skeleton
    plan = Pipeline(passes).plan(Skeleton.open(path).state().facts() | {"calibration"})
    return None if plan.ok else f"the recipe does not fit this model ({plan.problems[0]})"
