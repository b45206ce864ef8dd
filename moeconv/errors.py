"""Typed errors. Every `MoeconvError` is a user-facing problem: the CLI prints its message on one
line and exits with code 2. Anything else escaping a pass is a bug in moeconv."""
from __future__ import annotations


class MoeconvError(Exception):
    """Base class: a clear, one-line, user-facing problem."""

    hint: str | None = None

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        if hint is not None:
            self.hint = hint

    def one_line(self) -> str:
        msg = " ".join(str(self).split())
        return f"{msg} (hint: {self.hint})" if self.hint else msg


class InputError(MoeconvError):
    """The model, checkpoint or data given to moeconv is missing, broken or unreadable."""


class ConfigError(MoeconvError):
    """A pass or command configuration is invalid."""


class UnsupportedError(MoeconvError):
    """The request is well-formed but moeconv cannot carry it out exactly, so it refuses."""


class NoFfnFoundError(MoeconvError):
    """FFN discovery found nothing to work on."""


class PlanError(MoeconvError):
    """A pass list whose facts do not line up; carries every problem at once."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("; ".join(problems))


class VerificationError(MoeconvError):
    """A pass or writer broke its promise (numbers out of tolerance, a tensor missing on reload)."""


class OutputExistsError(MoeconvError):
    """The output path exists and --force was not given."""


class ReportedVerificationError(VerificationError):
    """A broken promise whose measurements are worth keeping: the job driver keeps the partial
    output as `OUT.failed/` with a `FAILED` marker and `report` (the full measured report)."""

    what = "check"  # what failed, for the marker: "parity check"

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


class ParityError(ReportedVerificationError):
    """onnxruntime disagrees with PyTorch beyond the tolerance; carries the full report (the job
    driver keeps the failed export as OUT.failed/ with it)."""

    what = "parity check"

    def __init__(self, message: str, report: dict, output_dir):
        super().__init__(message, report)
        self.output_dir = output_dir


class MemoryPlanError(MoeconvError):
    """The run's estimated peak memory (`moeconv.memory_plan`) exceeds what it may use; refused
    before any tensor is read, with the estimate and the fixes in one line."""
