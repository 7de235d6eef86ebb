"""``grcm --help`` is plain text listing grcm's commands and classes, and help never waits on torch.

Start-up times themselves are not asserted here (the help cache is described in docs/configs.md,
"Options and errors"); what is tested is what makes them fast: which modules a help call imports,
and the help cache.
"""

from __future__ import annotations

import importlib
import inspect
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import grcm
from grcm.cli import DATA_CLASSES, EXTRA_COMMANDS, LIGHTNING_COMMANDS, MODEL_CLASSES

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "lightning", "numpy", "transformers")


def run_python(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GRCM_CACHE_DIR": str(tmp_path / "cache")}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env)


def test_top_level_help_is_plain_text_and_imports_nothing_heavy(tmp_path):
    code = (
        "import sys\nfrom grcm.cli import main\nmain(['--help'])\n"
        f"print('HEAVY', [m for m in {HEAVY!r} if m in sys.modules])"
    )
    result = run_python(code, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stdout
    for name in [*LIGHTNING_COMMANDS, *EXTRA_COMMANDS, *MODEL_CLASSES, *DATA_CLASSES]:
        assert name in result.stdout
    assert "``" not in result.stdout and ":class:" not in result.stdout, "no raw reST markup"


@pytest.mark.parametrize("command", ["prepare", "sids", "plot-sids", "demo"])
def test_extra_command_help_imports_no_torch(tmp_path, command):
    code = (
        "import sys\nfrom grcm.cli import main\n"
        f"try:\n    main([{command!r}, '--help'])\nexcept SystemExit:\n    pass\n"
        "print('HEAVY', [m for m in ('torch', 'lightning') if m in sys.modules])"
    )
    result = run_python(code, tmp_path)
    assert "usage: grcm" in result.stdout and "HEAVY []" in result.stdout, result.stdout + result.stderr


def _grcm_classes(base) -> set[type]:
    """Every concrete (non-abstract) subclass of ``base`` defined in a grcm module."""
    found = set()
    for module_info in pkgutil.walk_packages(grcm.__path__, "grcm."):
        if module_info.name in ("grcm.__main__",):
            continue
        module = importlib.import_module(module_info.name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == module.__name__ and issubclass(cls, base) and not inspect.isabstract(cls):
                found.add(cls)
    return found


def _import_class(path: str) -> type:
    """The class a ``--model``/``--data`` class path names (as jsonargparse imports it)."""
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def test_help_lists_every_model_and_data_class():
    """Each listed path imports a concrete grcm class (the public path, e.g. a package's re-export), and
    every concrete LightningModule / LightningDataModule of grcm is listed exactly once."""
    import lightning as L

    for listed, base in ((MODEL_CLASSES, L.LightningModule), (DATA_CLASSES, L.LightningDataModule)):
        classes = [_import_class(path) for path in listed]
        assert len(set(classes)) == len(classes), f"a class is listed under two paths: {sorted(listed)}"
        assert set(classes) == _grcm_classes(base)


def test_abstract_bases_are_not_offered_as_models():
    import lightning as L

    from grcm.data.datamodules import RetrievalDataModule
    from grcm.retriever.sid_retrieval import SIDRetrievalModule

    assert inspect.isabstract(SIDRetrievalModule) and inspect.isabstract(RetrievalDataModule)
    with pytest.raises(TypeError, match="abstract"):
        SIDRetrievalModule()
    assert not _grcm_classes(L.LightningModule) & {SIDRetrievalModule}
    assert "grcm.retriever.grdr.GRDRRetriever" in MODEL_CLASSES  # the package path, not grdr.retriever's


def test_lightning_command_help_is_cached(tmp_path):
    first = run_python("from grcm.cli import main\nmain(['fit', '--help'])", tmp_path)
    assert first.returncode == 0 and "--trainer.max_epochs" in first.stdout and "--model.help" in first.stdout
    assert list((tmp_path / "cache" / "help").glob("*.txt")), "the help text was cached"
    code = (
        "import sys\nfrom grcm.cli import main\nmain(['fit', '--help'])\n"
        "assert 'lightning' not in sys.modules and 'torch' not in sys.modules"
    )
    second = run_python(code, tmp_path)
    assert second.returncode == 0, second.stderr
    assert second.stdout == first.stdout


def test_help_cache_key_follows_arguments_and_config_contents(tmp_path):
    from grcm.cli import help_cache_key

    config = tmp_path / "a.yaml"
    config.write_text("trainer: {max_epochs: 1}\n")
    key = help_cache_key(["fit", "-c", str(config), "--help"])
    assert key == help_cache_key(["fit", "-c", str(config), "--help"])
    assert key != help_cache_key(["test", "-c", str(config), "--help"])
    config.write_text("trainer: {max_epochs: 2}\n")
    assert key != help_cache_key(["fit", "-c", str(config), "--help"])
