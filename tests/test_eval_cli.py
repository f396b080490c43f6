"""``msode-eval``'s plan arguments: files or bundled plan names, as ``Registrar.load`` takes them."""

import json

from msode_train.evaluate import main


def test_unknown_plan_is_refused_with_the_bundled_names(tmp_path, capsys):
    assert main(["--plan", "no_such_plan.plan", "--n", "1", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no_such_plan.plan" in err and "rigid_bspline.plan" in err


def test_bundled_plan_by_name(tmp_path):
    """A bundled plan's name is enough (``--plan rigid_bspline.plan`` in the docs' commands); the label is
    the name's stem."""
    out = tmp_path / "eval"
    args = ["--plan", "analytic_ssd", "--motion", "rigid", "--pairs", "t1:t1", "--n", "1", "--stages", "rigid"]
    assert main([*args, "--baselines", "none", "--no-figures", "--out", str(out)]) == 0
    assert list(json.loads((out / "results.json").read_text())["rows"]) == ["identity", "analytic_ssd"]
