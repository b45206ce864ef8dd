"""`moeconv plan` / `moeconv run` on recipes as a user writes them: a wrong order exits 2 and
names the fix; a typo names the file, line, step and field; `--set` overrides a field."""
from typer.testing import CliRunner

from moeconv.cli import app

WRONG_ORDER = "steps:\n  - pass: prune-experts\n    keep: 2\n  - pass: upcycle\n    num_experts: 4\n    top_k: 2\n"
TYPO = "steps:\n  - pass: upcycle\n    num_experts: 4\n    top_kk: 2\n"
GOOD = "steps:\n  - pass: upcycle\n    num_experts: 4\n    top_k: 2\n"


def test_wrong_order_exits_2_and_names_the_fix(tmp_path):
    recipe = tmp_path / "wrong.yaml"
    recipe.write_text(WRONG_ORDER)
    result = CliRunner().invoke(app, ["plan", str(recipe), "--calib"])
    assert result.exit_code == 2
    assert "move `upcycle` before `prune-experts`" in result.stderr
    assert "Traceback" not in result.output


def test_typo_names_file_line_step_and_field(tmp_path):
    recipe = tmp_path / "typo.yaml"
    recipe.write_text(TYPO)
    result = CliRunner().invoke(app, ["plan", str(recipe)])
    assert result.exit_code == 2
    err = result.stderr.strip()
    assert err == f"error: {recipe}:4: step 1 `upcycle`: field `top_kk`: unknown field", err


def test_set_overrides_and_dry_run_writes_nothing(tmp_path):
    recipe = tmp_path / "good.yaml"
    recipe.write_text(GOOD)
    out = tmp_path / "out"
    bad = CliRunner().invoke(app, ["plan", str(recipe), "--set", "1.top_k=9"])
    assert bad.exit_code == 2 and "top_k" in bad.stderr
    dry = CliRunner().invoke(app, ["run", str(recipe), "--model", "builtin:llama", "--out", str(out), "--dry-run",
                                   "--set", "1.top_k=1"])
    assert dry.exit_code == 0, dry.output
    assert "plan ok" in dry.stdout and not out.exists()
