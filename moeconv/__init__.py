"""moeconv: sparse upcycling and compression of PyTorch / Hugging Face models, each step verified.

Python API::

    from moeconv import load, Pipeline, Context
    from passes import Upcycle
    state = load("path/to/checkpoint")
    result = Pipeline([Upcycle(num_experts=8, top_k=2)]).run(state, Context(seed=0))
"""
from moeconv.context import Context
from moeconv.errors import MoeconvError
from moeconv.pass_base import Pass, PassConfig, PassResult
from moeconv.pipeline import Pipeline
from moeconv.report import PassReport, RunReport
from moeconv.state import ModelState
from moeconv.version import __version__


def load(source, **kwargs) -> ModelState:
    """Load a checkpoint directory, GGUF file, built-in model or `nn.Module` (see `moeconv.io.load`)."""
    from moeconv.io.load import load as _load
    return _load(source, **kwargs)


__all__ = ["Context", "ModelState", "MoeconvError", "Pass", "PassConfig", "PassReport",
           "PassResult", "Pipeline", "RunReport", "load", "__version__"]
