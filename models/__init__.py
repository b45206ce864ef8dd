"""Small reference models used by tests and examples.

Three nanoGPT-style architectures covering the FFN layouts the converter must
handle: a GPT-2 decoder (``c_fc -> GELU -> c_proj``), a Llama decoder with a
gated SwiGLU FFN, and a BERT encoder whose FFN is split across
``Intermediate`` and ``Output`` modules as in Hugging Face BERT.
"""

from .bert import Bert, BertConfig
from .gpt import GPT, GPTConfig
from .llama import Llama, LlamaConfig

__all__ = ["GPT", "GPTConfig", "Llama", "LlamaConfig", "Bert", "BertConfig"]
