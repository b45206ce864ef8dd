"""The source side of the streamed check run inside the write sweep (moeconv/stream/sweep_check.py):
the logits and the facts about the source equal a separate `streamed_logits` run bit for bit, the
streamed quantize takes this path (its source is read once) and reports exactly what the separate
check reported, and a sweep that does not visit the layers in order falls back to that check."""
import torch

from moeconv.io.safetensors_io import SourceCheckpoint
from moeconv.stream.compare import streamed_logits
from moeconv.stream.skeleton import Skeleton
from moeconv.stream.sweep_check import SweepCheck, visits_layers_in_order
from moeconv.summary import LayerFacts
from tests.stream.test_stream import _mixtral


def test_order_rule():
    layers = ["m.0", "m.1", "m.2"]
    assert visits_layers_in_order([None, "m.0", "m.0", "m.1", "m.2", None], layers)
    assert not visits_layers_in_order([None, "m.0", "m.2", "m.1"], layers)  # out of order
    assert not visits_layers_in_order(["m.0", "m.1", "m.0", "m.2"], layers)  # comes back to one
    assert not visits_layers_in_order(["m.0", "m.2"], layers)  # skips one


def test_sweep_logits_and_facts_equal_a_separate_run(tmp_path):
    src = _mixtral(tmp_path / "src")
    batches = [torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))]
    alone_facts, sweep_facts = LayerFacts(), LayerFacts()
    alone = streamed_logits(Skeleton.open(src), batches, observe=alone_facts)
    skel = Skeleton.open(src)
    check = SweepCheck(skel, batches, sweep_facts)
    names = [n for n, _ in skel.module.named_parameters()]
    for name in names:  # a sweep in the writer's order: every parameter of a layer, then the next
        block = skel.block_of(name.rpartition(".")[0])
        check.enter(block)
        assert skel._parameter(name).device.type != "meta", name  # held while the sweep needs it
    got = check.logits()
    check.close()
    assert all(torch.equal(a, b) for a, b in zip(alone, got))
    assert sweep_facts.summary() == alone_facts.summary()
    assert {p.device.type for p in skel.module.parameters()} == {"meta"}


def test_streamed_quantize_reads_its_source_once(tmp_path, monkeypatch):
    from moeconv.jobs import stream_quantize
    from passes.quantize import QuantizeConfig
    src = _mixtral(tmp_path / "src")
    reads: dict[str, int] = {}
    real_get, real_mapped = SourceCheckpoint.get, SourceCheckpoint.mapped

    def counting(real):
        def read(self, name):
            if self.path == src:
                reads[name] = reads.get(name, 0) + 1
            return real(self, name)
        return read
    monkeypatch.setattr(SourceCheckpoint, "get", counting(real_get))
    monkeypatch.setattr(SourceCheckpoint, "mapped", counting(real_mapped))
    fused = stream_quantize.quantize_streamed(src, tmp_path / "fused", QuantizeConfig(method="int8"))
    matrices = [n for n in reads if "experts" in n or "self_attn" in n]
    assert matrices and all(reads[n] == 1 for n in matrices)  # quantized from the layer the check holds
    monkeypatch.setattr(stream_quantize, "visits_layers_in_order", lambda *a: False)
    separate = stream_quantize.quantize_streamed(src, tmp_path / "separate", QuantizeConfig(method="int8"))
    for key in ("verification", "input_model", "model"):
        assert fused[key] == separate[key], key
    a, b = SourceCheckpoint(tmp_path / "fused"), SourceCheckpoint(tmp_path / "separate")
    assert all(torch.equal(real_get(a, n), real_get(b, n)) for n in a.names())
