"""ONNX export helpers used by `passes/export_onnx.py` (one job per module).

- `signature`: what the exported graph takes and returns (causal LM logits, the KV-cache decode
  graph, encoder hidden states, plain modules), as export wrappers with example inputs.
- `moe_export`: how `MoEBlock`s are lowered: `portable` (standard ONNX ops, as traced) or `fused`
  (onnxruntime's `com.microsoft.MoE`), and the probe that decides whether `fused` is exact.
- `graph`: ONNX-file chores: provenance in `metadata_props`, IR version, external data, sizes.
- `runtime`: onnxruntime sessions, feeds, greedy generation and latency.
- `parity`: PyTorch vs onnxruntime on inputs that differ in shape *and routing* from the example.
- `quantize`: onnxruntime's own quantizers (dynamic int8, `MatMulNBits` int4, `QMoE`), routers float.
- `genai_config`: config.json / generation_config.json (and genai_config.json with past) beside the
  graph, checked against it.
"""

MODEL_FILE = "model.onnx"  # the graph's file name in an export directory
