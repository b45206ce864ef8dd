"""The one selector grammar (`moeconv.selectors`): parsing, matching, the one error message, and
the same strings meaning the same layers in upcycle, quantize, sparsify and prune-experts, from
Python and from the CLI."""
from __future__ import annotations

import re

import pytest
import torch
from typer.testing import CliRunner

from moeconv import Context, Pipeline, load
from moeconv.cli import app
from moeconv.errors import ConfigError
from moeconv.module_groups import module_groups
from moeconv.selectors import (EverySelector, GroupSelector, LayersSelector, PathSelector, RegexSelector, Selection,
                               layer_index, parse_selector)
from moeconv.sites import select_sites
from passes.prune_experts import PruneExperts, PruneExpertsConfig, select_blocks
from passes.quantize import Quantize, QuantizeConfig
from passes.sparsify import SparsifyConfig, select_targets
from passes.upcycle import Upcycle, UpcycleConfig
from tests.tiny import tiny_hf

LAYERS = 4
HINT = ("use re:REGEX, layers:0-3,7, every:2[+1], a group (attention, experts, shared_expert, router, "
        "mlp or dense-ffn, embeddings, lm_head, other) or a module path")


# ----------------------------------------------------------------------------- grammar

@pytest.mark.parametrize("text, cls", [
    ("re:o_proj$", RegexSelector), ("layers:0-3,7", LayersSelector), ("every:2", EverySelector),
    ("every:3+2", EverySelector), ("attention", GroupSelector), ("dense-ffn", GroupSelector),
    ("model.layers.3", PathSelector), ("lm_head", GroupSelector), ("model.layers.0.mlp.experts.1", PathSelector),
])
def test_each_form_parses_to_its_type_and_keeps_its_text(text, cls):
    sel = parse_selector(text)
    assert type(sel) is cls and sel.text == text
    assert parse_selector(text) is sel  # parsed once, then cached


@pytest.mark.parametrize("path, layer", [
    ("model.layers.5.mlp", 5), ("model.layers.5.mlp.experts.3.up_proj", 5), ("transformer.h.12.attn.c_attn", 12),
    ("encoder.layer.0.intermediate.dense", 0), ("0.ffn.up", 0), ("lm_head", None), ("model.embed_tokens", None),
    ("model.blk10.mlp", None),  # a number inside a name is not a layer number
])
def test_layer_index_is_the_first_numeric_path_component(path, layer):
    assert layer_index(path) == layer


def _picks(text, paths, group=None):
    sel = parse_selector(text)
    return [p for p in paths if sel.matches(p, layer_index(p), group)]


PATHS = [f"model.layers.{i}.mlp" for i in range(12)] + ["lm_head", "model.embed_tokens"]


def test_layers_and_every_select_by_layer_index_and_never_outside_layers():
    assert _picks("layers:1-2,10", PATHS) == ["model.layers.1.mlp", "model.layers.2.mlp", "model.layers.10.mlp"]
    assert _picks("every:4", PATHS) == ["model.layers.0.mlp", "model.layers.4.mlp", "model.layers.8.mlp"]
    assert _picks("every:4+3", PATHS) == ["model.layers.3.mlp", "model.layers.7.mlp", "model.layers.11.mlp"]
    assert _picks("every:1", PATHS) == PATHS[:12]  # lm_head and the embeddings have no layer


def test_regex_is_searched_and_paths_select_themselves_and_what_is_under_them():
    assert _picks("re:layers\\.1", PATHS) == ["model.layers.1.mlp", "model.layers.10.mlp", "model.layers.11.mlp"]
    assert _picks("re:^lm", PATHS) == ["lm_head"]
    assert _picks("model.layers.1", PATHS) == ["model.layers.1.mlp"]  # not layers.10 / layers.11
    assert _picks("model.layers.1.mlp", PATHS) == ["model.layers.1.mlp"]
    assert _picks("model.layers.1.ml", PATHS) == []  # a prefix counts only at a dot


def test_groups_match_the_candidates_group_with_two_conveniences():
    assert parse_selector("attention").matches("x", None, "attention")
    assert not parse_selector("attention").matches("model.layers.0.self_attn", 0, "mlp")
    assert parse_selector("dense-ffn").matches("x", None, "mlp")  # another name for mlp
    assert parse_selector("experts").matches("x", None, "shared_expert")  # every expert, shared too
    assert not parse_selector("shared_expert").matches("x", None, "experts")
    assert not parse_selector("mlp").matches("mlp", None, "attention")  # a group name is never a path


@pytest.mark.parametrize("text, reason", [
    ("", "empty"), ("   ", "empty"), (" model.layers.0", "whitespace"), ("re:(", "not a valid regex: missing )"),
    ("layers:", "layers: takes"), ("layers:x", "layers: takes"), ("layers:1-", "layers: takes"),
    ("layers: 1", "layers: takes"), ("layers:3-1", "runs backwards"), ("every:0", "step must be >= 1"),
    ("every:x", "every: takes"), ("every:", "every: takes"), ("every:2+2", "offset must be smaller"),
    ("bogus:1", "unknown prefix 'bogus:'"), ("regex:a", "unknown prefix 'regex:'"),
])
def test_a_bad_selector_gets_the_one_message(text, reason):
    with pytest.raises(ValueError) as exc:
        parse_selector(text)
    msg = str(exc.value)
    assert msg.startswith(f"bad selector {text!r} (") and reason in msg and msg.endswith(": " + HINT), msg
    assert "\n" not in msg


def test_selection_is_targets_minus_ignore():
    sel = Selection.of(["layers:0-5"], ["every:2", "model.layers.5"])
    assert [p for p in PATHS if sel.selects(p, "mlp")] == ["model.layers.1.mlp", "model.layers.3.mlp"]
    assert Selection.of(None).selects("lm_head", None) and Selection.of([]).selects("lm_head", None)
    assert not Selection.of(None, ["lm_head"]).selects("lm_head", "lm_head")
    assert Selection.of(["attention", "mlp", "re:x"]).absent_groups({"mlp"}) == ["attention"]
    assert Selection.of(["experts"]).absent_groups({"shared_expert"}) == []


# ----------------------------------------------------------------------------- one meaning, four commands

@pytest.fixture(scope="module")
def models():
    """A dense 4-layer Llama and its upcycle (moeconv MoE layers, a shared expert each)."""
    dense = load(tiny_hf("llama", num_hidden_layers=LAYERS))
    moe = load(tiny_hf("llama", num_hidden_layers=LAYERS))
    moe = Pipeline([Upcycle(num_experts=4, top_k=2, shared_experts=True)]).run(moe, Context()).state
    return dense, moe


def _layers(paths) -> set[int | None]:
    return {layer_index(p) for p in paths}


def _selected_layers(make, targets, ignore, dense, moe) -> dict[str, set]:
    """Decoder layers each command's own selection picks (quantize: layers passing its selectors)."""
    up, qz, sp, pr = (make(cls) for cls in (UpcycleConfig, QuantizeConfig, SparsifyConfig, PruneExpertsConfig))
    rows, _ = Quantize(qz).select_layers(moe.module, module_groups(moe), qz.spec())
    passed = [r["module"] for r in rows if r["reason"] not in ("not in targets", "ignored (--ignore)")]
    return {"upcycle": _layers(s.path for _, s in select_sites(dense.ffn_sites(), up.targets, up.ignore)),
            "quantize": _layers(passed),
            "sparsify": _layers(select_targets(moe, sp.targets, sp.ignore)),
            "prune-experts": _layers(p for p, _ in select_blocks(moe, pr)[0])}


@pytest.mark.parametrize("targets, ignore, layers", [
    (["layers:1-2"], [], {1, 2}),
    (["layers:0,3"], [], {0, 3}),
    (["every:2"], [], {0, 2}),
    (["every:2+1"], [], {1, 3}),
    (["re:layers\\.3\\."], [], {3}),
    (["model.layers.2"], [], {2}),
    (["layers:0-3"], ["every:3"], {1, 2}),
    (["every:1"], ["re:layers\\.[02]\\.", "model.layers.1"], {3}),
])
def test_the_same_strings_select_the_same_layers_in_all_four_configs(models, targets, ignore, layers):
    dense, moe = models

    def make(cls):
        extra = {"keep": 2} if cls is PruneExpertsConfig else {}
        cfg = cls(targets=targets, ignore=ignore, **extra)
        assert (cfg.targets, cfg.ignore) == (targets, ignore)  # kept as written, for recipes and reports
        return cfg
    assert _selected_layers(make, targets, ignore, dense, moe) == dict.fromkeys(
        ("upcycle", "quantize", "sparsify", "prune-experts"), layers)


def test_experts_means_routed_and_shared_experts_in_quantize_and_sparsify(models):
    _, moe = models
    groups = module_groups(moe)
    assert "shared_expert" in set(groups.values())
    qz = QuantizeConfig(targets=["experts"])
    rows, _ = Quantize(qz).select_layers(moe.module, groups, qz.spec())
    quantized = {r["module"] for r in rows if r["reason"] != "not in targets"}
    sparsified = set(select_targets(moe, ["experts"], []))
    assert quantized == sparsified and {groups[p] for p in sparsified} == {"experts", "shared_expert"}
    assert {groups[p] for p in select_targets(moe, ["experts"], ["shared_expert"])} == {"experts"}


def test_a_group_a_command_cannot_use_selects_nothing_and_says_so(models):
    dense, moe = models
    with pytest.raises(ConfigError, match="no FFN site selected .*group 'attention' holds no FFN site"):
        select_sites(dense.ffn_sites(), ["attention"], [])
    with pytest.raises(ConfigError, match="no MoE layer selected .*model.layers.0.mlp.*'attention' holds no MoE"):
        select_blocks(moe, PruneExpertsConfig(keep=2, targets=["attention"]))
    with pytest.raises(ConfigError, match="no matrix matches .*group 'router' holds no candidate matrix"):
        select_targets(moe, ["router"], [])  # routers are never pruned


# ----------------------------------------------------------------------------- prune-experts: some layers

def test_prune_experts_prunes_only_the_selected_moe_layers():
    state = load(tiny_hf("llama", num_hidden_layers=2))
    state = Pipeline([Upcycle(num_experts=4, top_k=2, router_init="normal")]).run(state, Context()).state
    before = {n: p.detach().clone() for n, p in state.module.model.layers[0].named_parameters()}
    calib = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))
    res = Pipeline([PruneExperts(keep=2, ignore=["layers:0"])]).run(state, Context(calibration=calib))
    layers = state.module.model.layers
    assert [layers[0].mlp.num_experts, layers[1].mlp.num_experts] == [4, 2]
    assert all(torch.equal(p, before[n]) for n, p in layers[0].named_parameters())
    rep = res.report.passes[0]
    assert [r["layer"] for r in rep.tables["layers"]] == ["model.layers.1.mlp"]
    assert rep.tables["skipped"] == [{"layer": "model.layers.0.mlp", "experts": 4,
                                      "reason": "not selected by targets/ignore"}]
    assert rep.metrics["moe_layers_skipped"] == 1 and "1 MoE layer skipped" in rep.summary


# ----------------------------------------------------------------------------- the CLI

COMMANDS = {  # command → its arguments before the selector option
    "upcycle": ["--num-experts", "4", "--top-k", "2", "--targets"],
    "quantize": ["--targets"],
    "sparsify": ["--method", "magnitude", "--targets"],
    "prune-experts": ["--keep", "2", "--calib", "calib.txt", "--targets"],  # --calib is required
}


@pytest.mark.parametrize("bad", ["layers:x", "re:(", "every:0", "bogus:1"])
def test_every_command_refuses_a_bad_selector_with_the_same_line(tmp_path, bad):
    with pytest.raises(ValueError) as exc:
        parse_selector(bad)
    lines = {}
    for cmd, args in COMMANDS.items():
        out = tmp_path / f"{cmd}-out"
        r = CliRunner().invoke(app, [cmd, str(tmp_path / "no-model"), str(out), *args, bad])
        assert r.exit_code == 2, (cmd, r.exit_code, r.stderr, r.exception)
        assert "Traceback" not in r.stderr and r.stdout == "" and not out.exists(), cmd
        assert r.stderr.count("\n") == 1 and r.stderr.count("error:") == 1, (cmd, r.stderr)
        lines[cmd] = re.sub(rf"^error: {re.escape(cmd)}: ", "error: ", r.stderr.strip())
    flags = {cmd: "--targets" if cmd == "upcycle" else "targets" for cmd in COMMANDS}  # each names its option
    assert lines == {cmd: f"error: {flags[cmd]}: {exc.value}" for cmd in COMMANDS}, lines
