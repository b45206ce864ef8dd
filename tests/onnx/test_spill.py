"""ParameterSpill: parameters set aside on disk during a fused export come back bit for bit, in
place (shared parameters stay shared), and the spill directory is removed."""
import torch
from torch import nn

from moeconv.onnx.spill import ParameterSpill


def test_spilled_parameters_come_back_exactly_and_in_place(tmp_path):
    torch.manual_seed(0)
    experts = nn.ModuleList([nn.Linear(8, 16), nn.Linear(16, 8, bias=False), nn.Linear(8, 8).to(torch.bfloat16)])
    experts.append(nn.Linear(8, 8))
    experts[3].weight = experts[2].weight  # shared: must stay one parameter
    before = {n: p.detach().clone() for n, p in experts.named_parameters(remove_duplicate=False)}
    params = list(experts.parameters())
    spill = ParameterSpill(tmp_path / "spill")
    spill.spill(experts)
    assert all(p.numel() == 0 for p in experts.parameters())  # the memory is free meanwhile
    assert len(list((tmp_path / "spill").iterdir())) == len(params)
    spill.restore()
    for n, p in experts.named_parameters(remove_duplicate=False):
        assert p.dtype == before[n].dtype and torch.equal(p.view(torch.uint8), before[n].view(torch.uint8)), n
    assert experts[3].weight is experts[2].weight and [id(p) for p in experts.parameters()] == [id(p) for p in params]
    assert not (tmp_path / "spill").exists()
