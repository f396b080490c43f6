"""Package layers (msode_sdk <- msode_export <- msode_train) and the architecture registry that lets the
export package rebuild training networks without importing the training package.

A lower package never imports a higher one, not even lazily inside a function: checked on the source
(imports, ``importlib.import_module`` / ``__import__`` with a literal name). ``msode_train`` registers its
architectures with ``msode_export.checkpoint`` when imported, and declares the ``msode.architectures``
entry point that the registry loads on a miss.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import types
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

from msode_export import checkpoint as ck

ROOT = Path(__file__).resolve().parents[1]
#: package -> (its source folder, packages above it that it must never import)
LAYERS = {
    "msode_sdk": (ROOT / "sdk" / "msode_sdk", ("msode_export", "msode_train")),
    "msode_export": (ROOT / "export" / "msode_export", ("msode_train",)),
}
#: known violations not yet removed; new ones fail the test
KNOWN: dict[str, str] = {}


def _imported_names(tree: ast.AST):
    """``(line, top-level package)`` of every import in a module, including lazy ones and
    ``importlib.import_module("...")`` / ``__import__("...")`` with a literal name."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module.split(".")[0]
        elif (
            isinstance(node, ast.Call)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            if name in ("import_module", "__import__"):
                yield node.lineno, node.args[0].value.split(".")[0]


@pytest.mark.parametrize("package", sorted(LAYERS))
def test_a_lower_package_never_imports_a_higher_one(package):
    folder, forbidden = LAYERS[package]
    bad = []
    for path in sorted(folder.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        rel = path.relative_to(ROOT).as_posix()
        bad += [
            f"{rel}:{line} imports {name}"
            for line, name in _imported_names(tree)
            if name in forbidden and KNOWN.get(rel) != name
        ]
    assert not bad, "layer violations (msode_sdk <- msode_export <- msode_train):\n" + "\n".join(bad)


def test_importing_msode_train_registers_every_architecture():
    import msode_train  # noqa: F401
    from msode_train.models import ARCHITECTURES

    assert set(ARCHITECTURES) <= set(ck.architectures())
    for name, (_, factory) in ARCHITECTURES.items():
        assert ck.get_architecture(name) is factory


def test_export_finds_training_architectures_through_the_entry_point():
    """In a fresh process the export package resolves a training architecture without anyone importing
    msode_train: the registry loads the ``msode.architectures`` entry point (declared in pyproject.toml;
    an editable install must be re-installed after that file changes)."""
    code = (
        "import sys\n"
        "from importlib.metadata import entry_points\n"
        "from msode_export import checkpoint as ck\n"
        "assert 'msode_train' not in sys.modules\n"
        "eps = [ep.value for ep in entry_points(group=ck.ENTRY_POINT_GROUP)]\n"
        "assert 'msode_train.models:register_architectures' in eps, eps\n"
        "ck.get_architecture('rigid_convfc')\n"
        "assert 'msode_train.models' in sys.modules\n"
        "print(' '.join(ck.architectures()))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert {"rigid_convfc", "bspline_fcn", "dense_unet"} <= set(r.stdout.split())


def _fake_plugins(monkeypatch, *values):
    eps = [EntryPoint(name=f"p{i}", value=v, group=ck.ENTRY_POINT_GROUP) for i, v in enumerate(values)]
    monkeypatch.setattr(ck, "entry_points", lambda group: eps if group == ck.ENTRY_POINT_GROUP else [])
    monkeypatch.setattr(ck, "_PLUGINS", {})


def test_unknown_architecture_is_a_typed_error_naming_what_is_registered(monkeypatch):
    _fake_plugins(monkeypatch)
    with pytest.raises(
        ck.UnknownArchitectureError,
        match=r"unknown network architecture 'no_such_net'; "
        r"registered: \[.*\].*--import MODULE",
    ) as ei:
        ck.get_architecture("no_such_net")
    assert isinstance(ei.value, ck.CheckpointError) and ei.value.name == "no_such_net"
    assert ei.value.registered == ck.architectures() and ei.value.__cause__ is None
    # a name in msode_train's style (<transform>_<kind>) says where such names come from
    monkeypatch.delitem(sys.modules, "msode_train", raising=False)
    with pytest.raises(
        ck.UnknownArchitectureError, match="looks like an msode_train architecture: `import msode_train`"
    ):
        ck.get_architecture("rigid_transformer")


def test_a_broken_plugin_is_reported_not_swallowed(monkeypatch):
    monkeypatch.setattr(ck, "_ARCHITECTURES", dict(ck._ARCHITECTURES))  # nothing registered here outlives the test
    _fake_plugins(monkeypatch, "msode_no_such_plugin_module:register")
    with pytest.raises(
        ck.UnknownArchitectureError,
        match="plugins that failed to load: .*msode_no_such_plugin_module.*ModuleNotFoundError",
    ) as ei:
        ck.get_architecture("no_such_net")
    assert isinstance(ei.value.__cause__, ModuleNotFoundError)

    # a working plugin beside the broken one: its architecture resolves, with a warning about the other
    calls = []

    def hook():
        calls.append(1)
        ck.register_architecture("test_layers_net", lambda *a, **k: "built")

    monkeypatch.setitem(sys.modules, "tests_layers_plugin", types.SimpleNamespace(hook=hook))
    _fake_plugins(monkeypatch, "msode_no_such_plugin_module:register", "tests_layers_plugin:hook")
    with pytest.warns(RuntimeWarning, match="msode_no_such_plugin_module"):
        assert ck.get_architecture("test_layers_net")() == "built"
    ck.get_architecture("test_layers_net")  # registered now: the plugins are not loaded again
    with pytest.raises(ck.UnknownArchitectureError):
        ck.get_architecture("still_unknown")  # a later miss does not re-run a loaded plugin either
    assert calls == [1]


def test_the_sdk_imports_and_runs_without_the_higher_packages(tmp_path):
    """msode_sdk in a process where msode_export and msode_train cannot be imported: it imports, its CLI
    builds (without `msode export`), a plan registers, and the benchmark module loads."""
    from msode_export.analytic import build_analytic_plan
    from msode_sdk.transforms import Grid

    plan = build_analytic_plan(
        tmp_path / "p.plan", Grid((20, 24, 16), (8.0, 8.0, 8.0)), stages=("rigid",), formats=("torchscript",)
    )
    code = (
        "import sys\n"
        "sys.modules['msode_export'] = None; sys.modules['msode_train'] = None  # imports of them fail\n"
        "import torch\n"
        "import msode_sdk, msode_sdk.bench, msode_sdk.cli\n"
        "from msode_sdk import Registrar\n"
        "parser = msode_sdk.cli.build_parser()\n"
        "cmds = parser._subparsers._group_actions[0].choices\n"
        "assert 'register' in cmds and 'export' not in cmds, sorted(cmds)\n"
        f"reg = Registrar.load({str(plan)!r}, device='cpu')\n"
        "x = torch.rand(1, 1, 16, 24, 20)\n"
        "res = reg.register_model_grid(x, x)\n"
        "assert res.stages[0].nfe > 0\n"
        "assert not any(m.split('.')[0] in ('msode_export', 'msode_train') for m in sys.modules if sys.modules[m])\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
