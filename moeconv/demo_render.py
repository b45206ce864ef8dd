"""What `moeconv demo` shows a person (rich)."""
from __future__ import annotations

from rich.console import Console

from moeconv.render import render_run, render_upcycle


def render_demo(console: Console, result: dict) -> None:
    render_upcycle(console, result["report"])
    console.print(f"\nprompt: {result['prompt']!r}")
    console.print(f"dense SmolLM2 : {result['texts']['dense']!r}")
    console.print(f"MoE ({result['moe_class']}): {result['texts']['moe']!r}")
    console.print(f"[green]identical greedy text[/green]; MoE checkpoint and report.json in {result['out']}")
    if "chain" in result:
        console.print()
        render_run(console, result["chain"]["report"])
        console.print(f"compressed (onnxruntime, int8, 2:4): {result['texts']['compressed']!r}")
        console.print("[yellow]2:4 sparsity without healing costs a 135M model much of its quality[/yellow] "
                      "(measured per step above and in report.html); `moeconv distill --mode heal` trains it back.")
        console.print(f"the chain's recipe, ONNX graph and report.html (open it in a browser) are in {result['chain_out']}")
