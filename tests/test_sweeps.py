"""Every W&B sweep file (experiments/sweeps/*.yaml) launches a command whose every parameter value parses.

Each sweep's ``command`` is expanded the way ``wandb agent`` expands it (``${args}`` -> ``--key=value``
with Python's ``str`` of the value) and run with ``--print_config``; the printed config must hold
the swept value at the swept key. Every value of every parameter (both ends of a distribution) is
parsed at least once, so a sweep can never die on a misspelled key or an impossible value.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import yaml

from grcm.cli import main

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = sorted((ROOT / "experiments" / "sweeps").glob("*.yaml"))
INTEGER_DISTRIBUTIONS = {"int_uniform", "q_uniform", "q_log_uniform", "q_log_uniform_values", "q_normal"}


def _values(name: str, spec: dict) -> list:
    """The values a sweep parameter can take that the test parses: all listed ones, or a range's ends."""
    if "values" in spec:
        values = list(spec["values"])
    elif "value" in spec:
        values = [spec["value"]]
    elif "min" in spec and "max" in spec:
        values = [spec["min"], spec["max"]]
        if spec.get("distribution") in INTEGER_DISTRIBUTIONS:
            values = [int(v) for v in values]
    else:
        raise AssertionError(f"sweep parameter {name}: give values, value or min/max")
    assert None not in values, f"sweep parameter {name}: a bare None reaches the command line as the string 'None'"
    return values


def _override_sets(parameters: dict) -> list[dict]:
    """Few override sets that together use every value of every parameter."""
    values = {name: _values(name, spec) for name, spec in parameters.items()}
    width = max(len(v) for v in values.values())
    return [{name: vals[i % len(vals)] for name, vals in values.items()} for i in range(width)]


def _lookup(config: dict, dotted: str):
    node = config
    for key in dotted.split("."):
        node = node[key]
    return node


def test_every_method_has_a_sweep():
    """Every trainable method of the dataset configs (two_stage only evaluates two trained models) has a sweep."""
    methods = {path.stem for path in (ROOT / "experiments" / "msvd").glob("*.yaml")} - {"two_stage"}
    assert {"dual_tower", "hybrid_tower", "ace_tokenizer", "ace_retriever", "grdr"} <= methods
    assert methods <= {path.stem for path in SWEEPS}


@pytest.mark.parametrize("sweep", SWEEPS, ids=[path.stem for path in SWEEPS])
def test_sweep_values_parse_into_the_config(sweep, capsys, monkeypatch):
    spec = yaml.safe_load(sweep.read_text())
    assert spec["metric"]["goal"] in ("minimize", "maximize")
    command = spec["command"]
    assert command[:3] == ["${env}", "grcm", "fit"] and command[-1] == "${args}", command
    monkeypatch.chdir(ROOT)  # the agent runs from the project root: config paths are relative to it
    monkeypatch.setenv("WANDB_RUN_ID", "sweeprun7")
    fixed = command[3:-1]
    for overrides in _override_sets(spec["parameters"]):
        argv = ["fit", *fixed, *(f"--{name}={value}" for name, value in overrides.items()), "--print_config"]
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        printed = capsys.readouterr()
        assert exit_info.value.code in (0, None), f"{sweep.name}: {' '.join(argv)}\n{printed.err[-2000:]}"
        config = yaml.safe_load(printed.out)
        for name, value in overrides.items():
            parsed = _lookup(config, name)
            assert parsed == (pytest.approx(value) if isinstance(value, float) else value), (sweep.name, name)
        text = printed.out
        assert "sweeprun7" in text, "every sweep run writes under its own W&B run id"
        assert "WandbLogger" in text


def test_override_sets_cover_every_value():
    parameters = {"a": {"values": [1, 2, 3]}, "b": {"distribution": "int_uniform", "min": 1.0, "max": 4.0}}
    sets = _override_sets(parameters)
    assert {s["a"] for s in sets} == {1, 2, 3} and {s["b"] for s in sets} == {1, 4}
    assert all(isinstance(s["b"], int) for s in sets)
    with pytest.raises(AssertionError, match="bare None"):
        _override_sets({"c": {"values": [None, 1]}})
    assert list(itertools.chain(_values("d", {"value": "ace"}))) == ["ace"]
