"""Each run option is declared once (pipeline.engine.options) and found, with the same default,
bounds and description, in the CLI, the flow's parameter form, the deployments' forms and the
parameters a scaled-out run gives its shards."""

from __future__ import annotations

import re
from typing import Any

import pytest
import typer
from prefect.utilities.callables import parameter_schema_from_entrypoint

from flows.cli import app
from flows.edit_manifest import SHARD_OWN_OPTIONS, shard_parameters
from flows.settings import RUN_GROUP_OPTIONS, RunSettings
from pipeline.engine.options import RunOptions, cli_name
from tests.prefect_stack import ROOT

FIELDS = list(RunOptions.model_fields.items())
IDS = [name for name, _ in FIELDS]


def words(text: str | None) -> str:
    return re.sub(r"\s+", " ", text or "").strip()


def schema(entrypoint: str) -> dict[str, Any]:
    path, func = entrypoint.split(":")
    return parameter_schema_from_entrypoint(f"{ROOT / path}:{func}").model_dump()


def bounds(field: Any) -> dict[str, Any]:
    out = {}
    for item in field.metadata:
        for key, json_key in (
            ("ge", "minimum"),
            ("le", "maximum"),
            ("gt", "exclusiveMinimum"),
            ("lt", "exclusiveMaximum"),
        ):
            if hasattr(item, key):
                out[json_key] = getattr(item, key)
    return out


def flat(prop: dict[str, Any]) -> dict[str, Any]:
    """The property's own keys and those of its non-null anyOf branch."""
    merged = dict(prop)
    for branch in prop.get("anyOf", []):
        if branch.get("type") != "null":
            merged.update(branch)
    return merged


FLOW = schema("flows/edit_manifest.py:edit_manifest")["properties"]


@pytest.mark.parametrize(("name", "field"), FIELDS, ids=IDS)
def test_the_flow_takes_each_option_as_declared(name: str, field: Any) -> None:
    prop = flat(FLOW[name])
    assert words(prop.get("description")) == words(field.description)
    if field.is_required():
        assert "default" not in FLOW[name]
    else:
        default = field.default
        assert FLOW[name].get("default") == (
            list(default) if isinstance(default, tuple) else default
        )
    for key, value in bounds(field).items():
        assert prop.get(key) == value, (name, key)


RUN = typer.main.get_command(app).commands["run"]  # type: ignore[attr-defined]


@pytest.mark.parametrize(("name", "field"), FIELDS, ids=IDS)
def test_the_cli_offers_each_option_as_declared(name: str, field: Any) -> None:
    option = cli_name(name)
    if option is None:
        return  # spelled its own way (--rows, --ids) or not offered (a shard's rows)
    [param] = [p for p in RUN.params if option in getattr(p, "opts", ())]
    assert words(param.help).startswith(words(field.description))
    assert param.default == field.default
    minimum = bounds(field).get("minimum")
    if minimum is not None:
        assert param.min == minimum


def test_the_run_group_of_the_deployments_is_the_options_own() -> None:
    for name in RUN_GROUP_OPTIONS:
        mine, theirs = RunSettings.model_fields[name], RunOptions.model_fields[name]
        assert mine.description == theirs.description and mine.default == theirs.default
        assert bounds(mine) == bounds(theirs)
    for entrypoint in (
        "flows/backfill.py:backfill",
        "flows/augment_dataset.py:augment_dataset",
        "flows/catalogue_reedit.py:catalogue_reedit",
    ):
        props = schema(entrypoint)["definitions"]["RunSettings"]["properties"]
        for name in RUN_GROUP_OPTIONS:
            assert words(flat(props[name]).get("description")) == words(
                RunOptions.model_fields[name].description
            )


def test_shards_get_every_option_but_their_own() -> None:
    opts = RunOptions(manifest="s3://b/m.csv", output="s3://b/out", concurrency=7, lease_seconds=5)
    given = shard_parameters(opts)
    assert set(given) == set(RunOptions.model_fields) - SHARD_OWN_OPTIONS
    assert given["concurrency"] == 7 and given["lease_seconds"] == 5
    assert set(RunOptions.model_fields) >= SHARD_OWN_OPTIONS
