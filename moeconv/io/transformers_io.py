"""Every call into transformers that reads files named by an input goes through here.

The promise: nothing a checkpoint names is ever imported or run. transformers can run Python
shipped in a checkpoint (an `auto_map` entry in `config.json` or `tokenizer_config.json` points at
a `.py` file); when `trust_remote_code` is left unset it *asks on standard input*, so a `y` piped
into a script runs the file. Here every `from_pretrained` passes `trust_remote_code=False`
explicitly (transformers then uses its own classes or refuses, and never asks), and a checkpoint
that could only be read by running its own code is refused first with one line that says why. Nothing is downloaded
(`local_files_only=True`, `HF_HUB_OFFLINE=1`). A test (tests/reliability/test_code_execution.py)
fails if any `from_pretrained` in moeconv/, passes/ or scripts/ lacks `trust_remote_code=False`.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from moeconv.errors import InputError
from moeconv.io.json_files import json_object_or_none
from moeconv.nn.quantized import refuse_hub_kernels

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a converter never downloads behind a user's back
# transformers imports bitsandbytes itself when it loads a bitsandbytes checkpoint; that import
# must not fetch a Hub kernel either (see moeconv.nn.quantized.refuse_hub_kernels)
refuse_hub_kernels()

# Config keys through which transformers finds code (a model's, a pipeline's, generate's).
CODE_KEYS = ("auto_map", "custom_pipelines", "custom_generate")


def refuse_custom_code(directory: Path) -> None:
    """Raise `InputError` when loading `directory` would need Python code it ships: a tokenizer
    whose class only its `auto_map` provides, or a config whose `model_type` transformers does not
    know but whose `auto_map` does. (An `auto_map` beside a class transformers has is inert under
    `trust_remote_code=False`: transformers' own class is used.)"""
    directory = Path(directory)
    tok = json_object_or_none(directory / "tokenizer_config.json")
    if tok is not None and "auto_map" in tok and not _known_tokenizer(tok.get("tokenizer_class")):
        raise InputError(f"{directory / 'tokenizer_config.json'}: its tokenizer is custom code (`auto_map`); "
                         "moeconv never runs code from a checkpoint (use a tokenizer.json tokenizer)")
    cfg = json_object_or_none(directory / "config.json")
    if cfg is not None and "auto_map" in cfg:
        from transformers import CONFIG_MAPPING
        if cfg.get("model_type") not in CONFIG_MAPPING:
            raise InputError(f"{directory / 'config.json'}: model_type {str(cfg.get('model_type'))[:40]!r} exists only "
                             "as custom code (`auto_map`); moeconv never runs code from a checkpoint")


def _known_tokenizer(name) -> bool:
    if not isinstance(name, str) or not name.isidentifier():
        return False
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name
    try:
        return any(tokenizer_class_from_name(n) is not None for n in (name, name.removesuffix("Fast")))
    except Exception:
        return False


def read_config(path: Path):
    """`AutoConfig` of a checkpoint directory (its `model_type` must be one transformers knows)."""
    from transformers import AutoConfig
    refuse_custom_code(path)
    return AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)


def read_tokenizer(source):
    """The tokenizer of a checkpoint directory or a `.gguf` file (raises what transformers raises)."""
    from transformers import AutoTokenizer
    p = Path(str(source))
    if p.suffix == ".gguf":
        return AutoTokenizer.from_pretrained(p.parent, trust_remote_code=False, gguf_file=p.name,
                                             local_files_only=True)
    refuse_custom_code(p)
    return AutoTokenizer.from_pretrained(p, local_files_only=True, trust_remote_code=False)


def load_model(cls, path: Path, **kwargs):
    """`cls`'s pretrained loader on a directory, never running its code."""
    refuse_custom_code(path)
    return cls.from_pretrained(path, local_files_only=True, trust_remote_code=False, **kwargs)


def load_causal_lm(path: Path, *, gguf_file: str | None = None, dtype=torch.float32):
    """`AutoModelForCausalLM` of a directory (or of `path/gguf_file`): how users load what we write."""
    from transformers import AutoModelForCausalLM
    if gguf_file is None:
        refuse_custom_code(path)
    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=False, gguf_file=gguf_file,
                                                local_files_only=True, dtype=dtype)


def load_causal_lm_with_info(path: Path, *, dtype=torch.float32):
    """(`AutoModelForCausalLM` of a directory, transformers' loading info: missing / unexpected /
    mismatched keys), for checks that every written weight is the one a consumer reads."""
    from transformers import AutoModelForCausalLM
    refuse_custom_code(path)
    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=False, local_files_only=True, dtype=dtype,
                                                output_loading_info=True)


def config_for(model_type: str, **fields):
    """A config object of a type transformers knows, from fields (reads no file). Keys that name
    code to run are dropped: a config moeconv builds or writes never points at a `.py` file."""
    from transformers import AutoConfig
    fields = {k: v for k, v in fields.items() if k not in CODE_KEYS}
    return AutoConfig.for_model(model_type, **fields)


def causal_lm_class(config):
    """The class `AutoModelForCausalLM` builds for `config` (KeyError if none)."""
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM._model_mapping[type(config)]


def model_class(config):
    """The transformers class that builds `config`: one of its `architectures` when that names a
    model class registered for this config type, otherwise the causal-LM (or base) class. An
    `architectures` entry is only a name; it must never pick an arbitrary transformers attribute."""
    import transformers
    from transformers import AutoModel, AutoModelForCausalLM, PreTrainedModel
    allowed = {}
    for auto in (AutoModelForCausalLM, AutoModel, transformers.AutoModelForMaskedLM,
                 transformers.AutoModelForSequenceClassification):
        try:
            cls = auto._model_mapping[type(config)]
        except KeyError:
            continue
        allowed[cls.__name__] = cls
    for arch in getattr(config, "architectures", None) or []:
        if not isinstance(arch, str):
            continue
        cls = allowed.get(arch)
        if cls is None and arch.isidentifier():
            candidate = getattr(transformers, arch, None) if arch.endswith(_MODEL_SUFFIXES) else None
            if (isinstance(candidate, type) and issubclass(candidate, PreTrainedModel)
                    and getattr(candidate, "config_class", None) is type(config)):
                cls = candidate
        if cls is not None:
            return cls
    for name in (AutoModelForCausalLM, AutoModel):
        try:
            return name._model_mapping[type(config)]
        except KeyError:
            continue
    raise KeyError(type(config).__name__)


_MODEL_SUFFIXES = ("Model", "ForCausalLM", "LMHeadModel", "ForMaskedLM", "ForSequenceClassification",
                   "ForTokenClassification", "ForQuestionAnswering", "ForPreTraining", "ForConditionalGeneration")
