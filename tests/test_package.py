"""The package import is light: names load on first use, and the CLI's help needs no torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import spatial_entropy

HEAVY = ("torch", "timm", "scipy", "skimage", "matplotlib", "torchvision")


def _modules_after(code: str) -> tuple[list[str], str]:
    """Run ``code`` in a fresh interpreter on this checkout; return the heavy modules it
    imported and its stdout."""
    src = str(Path(spatial_entropy.__file__).resolve().parents[1])
    env = os.environ | {"PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    probe = (
        f"{code}\nimport json, sys\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    *printed, modules = result.stdout.strip().splitlines()
    return json.loads(modules), "\n".join(printed)


def test_import_loads_no_heavy_module():
    loaded, _ = _modules_after("import spatial_entropy; spatial_entropy.__version__")
    assert loaded == []


def test_parser_and_help_load_no_heavy_module():
    code = (
        "import contextlib, io\n"
        "from spatial_entropy import cli\n"
        "cli.build_parser()\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out, "
        "contextlib.suppress(SystemExit):\n"
        "    cli.main(['--help'])\n"
        "for command in cli.COMMAND_MODULES:\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "        cli.main([command, '--help'])\n"
        "print(out.getvalue().splitlines()[0])"
    )
    loaded, printed = _modules_after(code)
    assert loaded == []
    assert printed.startswith("usage: spatial-entropy")


@pytest.mark.parametrize("name", spatial_entropy.__all__)
def test_every_public_name_resolves(name):
    value = getattr(spatial_entropy, name)
    assert value is not None
    if name != "__version__":
        # the lazy table names the module (or the package, for data/) that defines it
        home = f"spatial_entropy.{spatial_entropy._EXPORTS[name]}"
        assert value.__module__ == home or value.__module__.startswith(f"{home}.")
        assert name in dir(spatial_entropy)


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        spatial_entropy.not_a_name  # noqa: B018
