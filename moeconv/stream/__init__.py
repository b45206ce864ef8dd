"""Out-of-core execution: a model whose parameters stay on disk until one part of it is needed.

`skeleton.Skeleton` builds the architecture with every parameter on the `meta` device (buffers
real: rotary tables and masks are computed, not stored), maps each parameter to its tensor in a
safetensors checkpoint, and materialises one submodule (a decoder layer, the embeddings) at a
time. `compare.streamed_logits` runs a model through such a skeleton one decoder layer at a time,
so a source and its converted output are compared without either being whole in memory.
"""
