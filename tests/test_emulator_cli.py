"""`imgedit emulator`'s options are EmulatorConfig's fields: names, defaults, help, env vars."""

from __future__ import annotations

from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from pipeline.emulator import command
from pipeline.emulator.config import EmulatorConfig
from pipeline.emulator.process import emulator_command


def _app() -> typer.Typer:
    app = typer.Typer(add_completion=False)
    app.command()(emulator_command)
    return app


def _options() -> dict[str, Any]:
    cli = typer.main.get_command(_app())
    return {param.name: param for param in cli.params}


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> list[tuple[EmulatorConfig, str]]:
    """What the command would serve, instead of serving it."""
    calls: list[tuple[EmulatorConfig, str]] = []
    monkeypatch.setattr(
        command, "serve", lambda config, log_level: calls.append((config, log_level))
    )
    for name in EmulatorConfig.model_fields:
        monkeypatch.delenv(command.env_name(name), raising=False)
    return calls


def test_every_config_field_is_an_option_with_its_default_and_description() -> None:
    options = _options()
    assert set(options) == {*EmulatorConfig.model_fields, "log_level"}
    defaults: dict[str, Any] = {}
    for name, field in EmulatorConfig.model_fields.items():
        option = options[name]
        assert option.opts == ["--" + name.replace("_", "-")]
        assert option.help == field.description and field.description
        assert option.envvar == "IMGEDIT_EMULATOR_" + name.upper()
        default = field.get_default(call_default_factory=True)
        if isinstance(default, list):
            assert option.default == ",".join(default)
        else:
            assert option.default == default
        defaults[name] = option.default
    # The option defaults, read as the command reads them, are the config's defaults.
    assert EmulatorConfig().updated(defaults) == EmulatorConfig()
    assert options["log_level"].default == "warning"


def test_help_lists_every_option() -> None:
    result = CliRunner().invoke(_app(), ["--help"], env={"COLUMNS": "250", "TERMINAL_WIDTH": "250"})
    assert result.exit_code == 0, result.output
    for name in [*EmulatorConfig.model_fields, "log_level"]:
        assert "--" + name.replace("_", "-") in result.output
    assert "Mean time to answer an edit, rendering included, seconds." in result.output
    assert "IMGEDIT_EMULATOR_LATENCY" in result.output


def test_env_and_flags_reach_the_config(served: list[tuple[EmulatorConfig, str]]) -> None:
    env = {"IMGEDIT_EMULATOR_LATENCY": "0.25", "IMGEDIT_EMULATOR_MODELS": "a, b"}
    result = CliRunner().invoke(_app(), ["--drop-rate", "0.5", "--log-level", "info"], env=env)
    assert result.exit_code == 0, result.output
    [(config, log_level)] = served
    assert config == EmulatorConfig(latency=0.25, models=["a", "b"], drop_rate=0.5)
    assert log_level == "info"


def test_out_of_range_values_are_refused_before_serving(
    served: list[tuple[EmulatorConfig, str]],
) -> None:
    for args in (["--drop-rate", "1.5"], ["--port", "70000"], ["--file-ttl", "0"]):
        result = CliRunner().invoke(_app(), args)
        assert result.exit_code == 2, (args, result.output)
        assert "Traceback" not in result.output
    assert served == []


def test_refuses_without_the_emulator_extra(
    served: list[tuple[EmulatorConfig, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(command, "missing_extra", lambda: "pip install 'imgedit[emulator]'")
    result = CliRunner().invoke(_app(), [])
    assert result.exit_code == 2
    assert "imgedit[emulator]" in result.output
    assert served == []
