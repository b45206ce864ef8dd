"""The demo's chain is an ordinary recipe: it parses, its steps are the five passes issue 9 names,
and it plans cleanly against a dense float checkpoint with calibration data (the full run is the
slow test tests/slow/test_demo.py)."""
from moeconv.cli.commands.recipe import DENSE_FACTS
from moeconv.demo import chain_recipe
from moeconv.pipeline import Pipeline
from moeconv.recipe import build_passes, load_recipe


def test_chain_recipe_plans(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(chain_recipe(4, 2))
    passes = build_passes(load_recipe(path), str(path))
    assert [p.name for p in passes] == ["upcycle", "prune-experts", "sparsify", "quantize", "export-onnx"]
    assert passes[1].config.keep == 3 and passes[2].config.pattern == "2:4" and passes[3].config.method == "int8"
    assert Pipeline(passes).plan(set(DENSE_FACTS) | {"calibration"}).ok


def test_chain_never_prunes_below_top_k(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(chain_recipe(2, 2))  # nothing can go: the prune step is left out, not run empty
    assert [p.name for p in build_passes(load_recipe(path), str(path))] == ["upcycle", "sparsify", "quantize",
                                                                             "export-onnx"]
