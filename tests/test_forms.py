"""The deployments' parameter forms: every field the Prefect UI shows is typed and described."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from prefect.utilities.callables import parameter_schema_from_entrypoint

from tests.prefect_stack import ROOT

DEPLOYMENTS = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]


def schema_of(entrypoint: str) -> dict[str, Any]:
    # What `prefect deploy` sends to the server: the schema read from the entrypoint's source.
    path, func = entrypoint.split(":")
    return parameter_schema_from_entrypoint(f"{ROOT / path}:{func}").model_dump()


@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=[d["name"] for d in DEPLOYMENTS])
def test_every_form_field_has_a_description(deployment: dict[str, Any]) -> None:
    schema = schema_of(deployment["entrypoint"])
    undescribed = [k for k, v in schema["properties"].items() if not v.get("description")]
    assert not undescribed, f"{deployment['name']}: no description for {undescribed}"
    for name, model in schema.get("definitions", {}).items():
        # An enum's definition (e.g. the export format) has choices, not fields.
        fields = model.get("properties", {})
        assert fields or model.get("enum"), f"{deployment['name']}: {name} is neither"
        undescribed = [k for k, v in fields.items() if not v.get("description")]
        assert not undescribed, f"{deployment['name']}: {name} has no description for {undescribed}"


def test_form_fields_keep_their_bounds_and_choices() -> None:
    props = schema_of("flows/edit_manifest.py:edit_manifest")["properties"]
    assert props["concurrency"]["minimum"] == 1 and props["concurrency"]["maximum"] == 1024
    assert props["response_format"]["enum"] == ["b64_json", "url"]
    assert "not Python" in props["select_where"]["description"]


def test_deployment_parameters_are_valid_for_their_forms() -> None:
    # The catalogue's scheduled defaults must pass the form's own validation on the server.
    from prefect.utilities.schema_tools import validate

    for deployment in DEPLOYMENTS:
        schema = schema_of(deployment["entrypoint"])
        validate(
            deployment.get("parameters", {}), schema, raise_on_error=True, ignore_required=True
        )
