"""The passes moeconv ships. One explicit registry: the CLI, recipes and `moeconv passes` read it."""
from passes.distill import Distill, KeepTeacher
from passes.export_onnx import ExportOnnx
from passes.prune_experts import PruneExperts
from passes.quantize import Quantize
from passes.sparsify import Sparsify
from passes.upcycle import Upcycle

REGISTRY = (Upcycle, PruneExperts, Sparsify, Quantize, KeepTeacher, Distill, ExportOnnx)

BY_NAME = {p.name: p for p in REGISTRY}

__all__ = ["REGISTRY", "BY_NAME", "Distill", "ExportOnnx", "KeepTeacher", "PruneExperts", "Quantize",
           "Sparsify", "Upcycle"]
