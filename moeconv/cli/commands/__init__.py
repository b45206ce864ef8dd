"""CLI commands beyond the core ones, one module each (part of the CLI shell, `moeconv/cli/`:
these may import `passes`). Each module defines `register(app: typer.Typer) -> None`."""
import importlib
import importlib.util

COMMANDS = ("quantize", "sparsify", "prune_experts", "export_onnx", "export_gguf", "distill", "recipe", "demo")


def register_all(app) -> None:
    for name in COMMANDS:
        if importlib.util.find_spec(f"moeconv.cli.commands.{name}") is not None:
            importlib.import_module(f"moeconv.cli.commands.{name}").register(app)
