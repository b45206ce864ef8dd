"""Reading and writing checkpoints: loading, safetensors streaming, sharded writing."""
