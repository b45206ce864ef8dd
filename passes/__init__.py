"""The passes moeconv ships. One explicit registry: the CLI, recipes and `moeconv passes` read it."""
from passes.upcycle import Upcycle

REGISTRY = (Upcycle,)

BY_NAME = {p.name: p for p in REGISTRY}

__all__ = ["REGISTRY", "BY_NAME", "Upcycle"]
