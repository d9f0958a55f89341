"""Model profiles: rows checked, requests sent and costs read by the run's model's rules."""

from __future__ import annotations

import base64
import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest
from openai import AsyncOpenAI, BadRequestError
from typer.testing import CliRunner

from pipeline import constants, spec
from pipeline.emulator.catalog import FLEX_MODEL, usage_micros
from pipeline.emulator.process import EmulatorProcess
from pipeline.engine.client import EditClient
from pipeline.engine.client_answer import read_answer
from pipeline.engine.client_request import EditRequest, fit_request
from pipeline.engine.client_usage import read_usage
from pipeline.engine.options import RunOptions
from pipeline.engine.profiles import aload_profile
from pipeline.engine.run import run_manifest
from pipeline.imageinfo import probe
from pipeline.manifest.open import format_report, validate_manifest
from pipeline.manifest.types import EditParams
from pipeline.models.builtin import BUILTIN, P_IMAGE_EDIT
from pipeline.models.prices import TOKEN_PRICES
from pipeline.models.schema import permissive_profile, profile_from_schema, profile_to_schema
from tests.conftest import image_bytes
from tests.inprocess_emulator import InProcessEmulator

GPT = BUILTIN["gpt-image-1"]
MODELS = [spec.DEFAULT_MODEL, "gpt-image-1", "gpt-image-1-mini", FLEX_MODEL]


def write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in columns})
    return path


@pytest.fixture
def pictures(tmp_path: Path) -> list[Path]:
    paths = []
    for i in range(8):
        path = tmp_path / f"p{i}.png"
        path.write_bytes(image_bytes((64 + i, 48), (20 * i, 90, 200)))
        paths.append(path)
    return paths


@pytest.fixture
def emulator() -> Iterator[InProcessEmulator]:
    emu = InProcessEmulator(models=MODELS)
    yield emu
    emu.close()


# --- manifest rows by profile -------------------------------------------------------------


def test_eight_images_are_refused_for_p_image_edit_and_accepted_for_gpt_image_1(
    tmp_path: Path, pictures: list[Path]
) -> None:
    manifest = write_csv(
        tmp_path / "m.csv",
        [{"id": "eight", "images": json.dumps([str(p) for p in pictures]), "prompt": "merge"}],
    )
    default = validate_manifest(str(manifest))
    assert (default.valid, default.invalid) == (0, 1)
    assert "8 images; the limit is 5" in format_report(default)
    gpt = validate_manifest(str(manifest), profile=GPT)
    assert (gpt.valid, gpt.invalid) == (1, 0)
    assert "checked for model gpt-image-1 (built-in profile)" in format_report(gpt)


def test_gpt_image_rules_refuse_what_it_rejects_and_report_what_it_does_not_take(
    tmp_path: Path, pictures: list[Path]
) -> None:
    image = str(pictures[0])
    manifest = write_csv(
        tmp_path / "m.csv",
        [
            {"id": "ok", "image": image, "prompt": "p", "seed": "7", "size": "1536x1024"},
            {"id": "size", "image": image, "prompt": "p", "size": "1920x1080"},
            {"id": "ratio", "image": image, "prompt": "p", "size": "16:9"},
            {"id": "quality", "image": image, "prompt": "p", "quality": "ultra"},
            {"id": "gif", "image": image, "prompt": "p", "output_format": "gif"},
            {
                "id": "alpha",
                "image": image,
                "prompt": "p",
                "output_format": "jpeg",
                "params": json.dumps({"background": "transparent"}),
            },
            {"id": "long", "image": image, "prompt": "x" * 1500},
        ],
    )
    report = validate_manifest(str(manifest), profile=GPT)
    reasons = {row.id: " ".join(e.reason for e in row.errors) for row in report.errors}
    assert set(reasons) == {"size", "ratio", "quality", "gif", "alpha"}
    assert "not one gpt-image-1 takes" in reasons["size"]
    assert "supported: low, medium, high, auto" in reasons["quality"]
    assert "background transparent needs output_format png or webp" in reasons["alpha"]
    # Up to 32,000 characters for gpt-image; p-image-edit keeps its 1000.
    assert report.valid == 2 and report.dropped["seed"] == 1
    assert "not sent to gpt-image-1 (it does not take them): seed in 1 rows" in format_report(
        report
    )
    default = validate_manifest(str(manifest))
    assert {row.id for row in default.errors} == {"long"}
    assert not default.dropped


def test_fit_request_leaves_out_what_the_model_does_not_take() -> None:
    request = EditRequest(
        prompt="p",
        images=(),
        seed=3,
        params=EditParams(quality="high", aspect_ratio="16:9", extra={"turbo": False}),
    )
    fitted, dropped = fit_request(request, GPT)
    assert dropped == ("seed", "aspect_ratio", "turbo")
    assert fitted.seed is None and fitted.params.aspect_ratio is None
    assert fitted.params.quality == "high" and fitted.params.extra == {}
    same, none = fit_request(request, P_IMAGE_EDIT)
    assert same is request and none == ()


# --- schemas ------------------------------------------------------------------------------


def test_schemas_round_trip_and_hostile_ones_fall_back() -> None:
    flex = profile_from_schema("x", {"schema": profile_to_schema(GPT)})
    assert (flex.max_images, flex.max_prompt_chars, flex.origin) == (16, 32_000, "schema")
    assert flex.sizes.fixed == ("1024x1024", "1536x1024", "1024x1536")
    assert flex.response_formats == ("b64_json",)
    assert not flex.takes("seed") and flex.takes("quality")
    for doc in (None, [], "text", {"schema": "nope"}, {"schema": {"foo": {}}}):
        assert profile_from_schema("x", doc).origin == "permissive"
    hostile = {
        "parameters": {
            "properties": {
                "prompt": {"maxLength": 10**12},
                "image": {"maxItems": float("inf"), "minItems": -5},
                "n": {"minimum": True, "maximum": 10**9},
                "thinking": {"enum": [f"v{i}" for i in range(10_000)] + [{"x": 1}]},
                "size": {"enum": ["0x0", "1024x1024", "auto", "x" * 10_000]},
                **{f"extra{i}": {} for i in range(1000)},
            }
        },
        "pricing": {"per_image": 1e9},
    }
    profile = profile_from_schema("hostile", hostile)
    assert profile.max_prompt_chars == constants.MAX_SCHEMA_PROMPT_CHARS
    assert profile.max_images == constants.PERMISSIVE_MAX_IMAGES  # inf is no number
    assert (profile.min_images, profile.max_n) == (1, spec.MAX_N)
    assert len(profile.enums["thinking"]) == constants.MAX_SCHEMA_ENUM_VALUES
    assert profile.sizes.fixed == ("1024x1024",)
    assert len(profile.extras) < constants.MAX_SCHEMA_PROPERTIES
    assert not profile.cost.price_known
    assert profile.note is not None and "image count" in profile.note


async def test_a_schema_that_cannot_be_read_gives_a_permissive_profile_that_says_so() -> None:
    def huge(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b'{"schema": "' + b"x" * (2 * 2**20) + b'"}')

    def missing(request: httpx.Request) -> httpx.Response:
        body = {"error": {"message": "Model 'm' not found", "code": "MODEL_NOT_FOUND"}}
        return httpx.Response(404, json=body)

    for handler, words in ((huge, "over 1048576 bytes"), (missing, "MODEL_NOT_FOUND")):
        profile = await aload_profile(
            "m", base_url="http://127.0.0.1:9/v1", transport=httpx.MockTransport(handler)
        )
        assert profile.origin == "permissive"
        assert profile.note is not None and words in profile.note
    assert permissive_profile("m", "why").takes("seed")


async def test_an_unknown_model_on_the_emulator_is_read_from_its_schema(
    tmp_path: Path, pictures: list[Path], emulator: InProcessEmulator
) -> None:
    profile = await aload_profile(
        FLEX_MODEL, base_url=emulator.base_url, transport=emulator.transport
    )
    assert (profile.origin, profile.note, profile.max_images) == ("schema", None, 3)
    assert profile.enums["thinking"] == ("off", "on", "minimal", "high")
    assert profile.sizes.free == (256, 2048) and profile.cost.price_per_image_usd == 0.02
    image = str(pictures[0])
    manifest = write_csv(
        tmp_path / "m.csv",
        [
            {"id": "ok", "image": image, "prompt": "p", "param.thinking": "high", "seed": "5"},
            {"id": "four", "images": "|".join(str(p) for p in pictures[:4]), "prompt": "p"},
            {"id": "think", "image": image, "prompt": "p", "param.thinking": "ultra"},
            {"id": "big", "image": image, "prompt": "p", "size": "4096x4096"},
            {"id": "free", "image": image, "prompt": "p", "size": "512x768"},
        ],
    )
    opts = RunOptions(
        manifest=str(manifest),
        output=str(tmp_path / "out"),
        api_base=emulator.base_url,
        model=FLEX_MODEL,
    )
    summary = await run_manifest(opts, emulator.parts())
    results = pd.read_parquet(summary.results_uri).set_index("id")
    assert results["status"].to_dict() == {
        "ok": "succeeded",
        "four": "invalid",
        "think": "invalid",
        "big": "invalid",
        "free": "succeeded",
    }
    assert "the limit is 3" in results.loc["four", "error_message"]
    assert "supported: off, on, minimal, high" in results.loc["think", "error_message"]
    assert results.loc["free", "actual_size"] == "512x768"
    assert results.loc["ok", "cost"] == pytest.approx(0.02)
    sent = {r["fields"].get("size", "-"): r for r in emulator.requests()}
    assert sent["-"]["fields"]["thinking"] == "high" and sent["-"]["fields"]["seed"] == "5"


# --- the emulator's models ----------------------------------------------------------------


async def _post(emu: InProcessEmulator, model: str, **fields: str) -> httpx.Response:
    async with httpx.AsyncClient(transport=emu.transport, base_url=emu.base_url) as client:
        return await client.post(
            f"{emu.base_url}/images/edits",
            data={"model": model, "prompt": "add a hat", **fields},
            files=[("image", ("a.png", image_bytes((64, 48)), "image/png"))],
        )


async def test_the_emulator_serves_each_model_by_its_own_rules(
    emulator: InProcessEmulator,
) -> None:
    seed = await _post(emulator, "gpt-image-1", seed="3", response_format="b64_json")
    assert seed.status_code == 400 and seed.json()["error"]["param"] == "seed"
    url = await _post(emulator, "gpt-image-1", response_format="url")
    assert url.status_code == 400 and "supported: b64_json" in url.json()["error"]["message"]
    ok = await _post(emulator, "gpt-image-1", quality="high", size="1536x1024")
    body = ok.json()
    assert ok.status_code == 200 and "b64_json" in body["data"][0]
    assert "cost" not in body["metadata"] and body["usage"]["output_tokens"] == 6240
    assert emulator.stats()["charged_usd"] == pytest.approx(
        usage_micros("gpt-image-1", body["usage"]) / spec.MICROS_PER_USD
    )
    think = await _post(emulator, FLEX_MODEL, thinking_level="ultra")
    assert think.status_code == 400
    assert think.json()["error"]["message"].endswith("supported: off, on, minimal, high")
    enhanced = await _post(emulator, FLEX_MODEL, enhance_prompt="on", response_format="b64_json")
    assert enhanced.json()["data"][0]["revised_prompt"]
    plain = await _post(emulator, FLEX_MODEL, enhance_prompt="off", response_format="b64_json")
    assert "revised_prompt" not in plain.json()["data"][0]
    default = await _post(emulator, spec.DEFAULT_MODEL, seed="3", thinking="whatever")
    assert default.status_code == 200  # p-image-edit: everything passes, as before
    async with httpx.AsyncClient(transport=emulator.transport) as client:
        listing = (await client.get(f"{emulator.base_url}/models?schema=true")).json()
    schemas = {m["id"]: m["schema"] for m in listing["data"]}
    assert list(schemas) == MODELS
    assert schemas[FLEX_MODEL]["thinking"]["enum"] == ["off", "on", "minimal", "high"]
    assert "seed" not in schemas["gpt-image-1"]


async def test_the_openai_sdk_edits_on_a_gpt_image_model(emulator: InProcessEmulator) -> None:
    async with httpx.AsyncClient(transport=emulator.transport) as http:
        sdk = AsyncOpenAI(base_url=emulator.base_url, api_key="x", http_client=http)
        answer = await sdk.images.edit(
            model="gpt-image-1",
            image=[("a.png", image_bytes((64, 48)), "image/png"), ("b.png", image_bytes())],
            prompt="Put image 2 into image 1",
            size="1024x1536",
            quality="low",
        )
        assert answer.data is not None and answer.data[0].b64_json
        assert probe(base64.b64decode(answer.data[0].b64_json)).size == "1024x1536"
        assert answer.usage is not None and answer.usage.output_tokens == 408
        with pytest.raises(BadRequestError):
            await sdk.images.edit(
                model="gpt-image-1",
                image=("a.png", image_bytes(), "image/png"),
                prompt="p",
                response_format="url",
            )
        with pytest.raises(BadRequestError):
            await sdk.images.edit(
                model="gpt-image-1",
                image=("a.png", image_bytes(), "image/png"),
                prompt="p",
                extra_body={"seed": 1},
            )


# --- runs by profile ----------------------------------------------------------------------


async def test_a_gpt_image_run_drops_seed_and_prices_usage(
    tmp_path: Path, pictures: list[Path], emulator: InProcessEmulator
) -> None:
    manifest = write_csv(
        tmp_path / "m.csv",
        [
            {
                "id": "a",
                "images": json.dumps([str(p) for p in pictures]),
                "prompt": "merge them",
                "seed": "42",
                "size": "1024x1024",
                "quality": "medium",
                "param.turbo": "false",
            }
        ],
    )
    opts = RunOptions(
        manifest=str(manifest),
        output=str(tmp_path / "out"),
        api_base=emulator.base_url,
        model="gpt-image-1",
        response_format="url",  # gpt-image answers b64_json only: the run switches
    )
    summary = await run_manifest(opts, emulator.parts())
    row = pd.read_parquet(summary.results_uri).iloc[0]
    assert row["status"] == "succeeded", row["error_message"]
    assert list(row["dropped_params"]) == ["seed", "turbo"]
    (request,) = emulator.requests()
    assert "seed" not in request["fields"] and "turbo" not in request["fields"]
    assert request["n_images"] == 8 and request["fields"]["response_format"] == "b64_json"
    sidecar = json.loads(Path(row["sidecar_uri"]).read_text())
    usage = sidecar["usage"]
    prices = TOKEN_PRICES["gpt-image-1"]
    expected = prices.cost_usd(
        usage["text_input_tokens"], usage["image_input_tokens"], usage["output_tokens"]
    )
    assert usage["output_tokens"] == 1056
    assert (row["cost_source"], row["cost"]) == ("usage", pytest.approx(expected))
    assert sidecar["request"]["dropped_params"] == ["seed", "turbo"]
    assert emulator.stats()["charged_usd"] == pytest.approx(expected, abs=1e-6)
    assert summary.estimated_cost_usd == pytest.approx(GPT.cost.price_per_image_usd)


async def test_p_image_edit_runs_send_everything_as_before(
    tmp_path: Path, pictures: list[Path], emulator: InProcessEmulator
) -> None:
    manifest = write_csv(
        tmp_path / "m.csv",
        [{"id": "a", "image": str(pictures[0]), "prompt": "p", "seed": "42", "param.turbo": "0"}],
    )
    opts = RunOptions(
        manifest=str(manifest), output=str(tmp_path / "out"), api_base=emulator.base_url
    )
    summary = await run_manifest(opts, emulator.parts())
    row = pd.read_parquet(summary.results_uri).iloc[0]
    assert row["status"] == "succeeded" and list(row["dropped_params"]) == []
    assert (row["cost_source"], row["cost"]) == ("metadata", 0.01)
    (request,) = emulator.requests()
    assert request["fields"]["seed"] == "42" and request["fields"]["turbo"] == "0"


# --- usage is not trusted blindly ---------------------------------------------------------


def test_usage_is_checked_and_capped() -> None:
    warnings: list[str] = []
    for bad in ("lots", {"input_tokens": -1, "output_tokens": 5}, {"input_tokens": True}):
        assert read_usage(bad, warnings) is None
    assert read_usage({"input_tokens": 1, "output_tokens": 10**12}, warnings) is None
    assert len(warnings) == 4
    undetailed = read_usage({"input_tokens": 100, "output_tokens": 10}, [])
    assert undetailed is not None and undetailed.image_input == 100  # the dearer kind
    absurd = {"input_tokens": 0, "output_tokens": constants.MAX_USAGE_TOKENS}
    answer = read_answer(
        {"usage": absurd, "metadata": {"cost": 0.01}},
        httpx.Headers(),
        images=[],
        n_asked=1,
        request_id=None,
        ceiling_usd=1.0,
        latency_s=0.0,
        warnings=[],
        token_prices=TOKEN_PRICES["gpt-image-1"],
    )
    assert answer.cost is None and answer.cost_raw == "4000.0"
    assert any("not trusted" in w for w in answer.warnings)


async def test_a_client_of_an_unknown_model_without_a_profile_is_permissive() -> None:
    async with EditClient(base_url="http://127.0.0.1:9/v1", model="some-model") as client:
        assert client.profile.origin == "permissive" and client.profile.takes("seed")


# --- the CLI ------------------------------------------------------------------------------


@pytest.mark.integration
def test_imgedit_models_lists_the_emulators_models(
    tmp_path: Path, pictures: list[Path], emulator_process: EmulatorProcess
) -> None:
    from flows.cli import app

    emulator_process.configure(models=MODELS)
    try:
        runner = CliRunner()
        listed = runner.invoke(app, ["models", "--api-base", emulator_process.base_url, "--json"])
        assert listed.exit_code == 0, listed.output
        limits = json.loads(listed.output)
        assert list(limits) == MODELS
        assert limits["gpt-image-1"]["images"] == "1..16"
        assert limits[FLEX_MODEL]["profile"] == "schema"
        assert "thinking: off/on/minimal/high" in limits[FLEX_MODEL]["parameters"]
        table = runner.invoke(app, ["models", "--api-base", emulator_process.base_url])
        assert table.exit_code == 0 and FLEX_MODEL in table.output
        manifest = write_csv(
            tmp_path / "m.csv",
            [{"images": "|".join(str(p) for p in pictures), "prompt": "merge"}],
        )
        refused = runner.invoke(app, ["validate", str(manifest), "--no-sources"])
        assert refused.exit_code == 1 and "8 images; the limit is 5" in refused.output
        args = ["validate", str(manifest), "--model", "gpt-image-1"]
        accepted = runner.invoke(app, args)
        assert accepted.exit_code == 0, accepted.output
        flex = runner.invoke(
            app,
            [*args[:2], "--model", FLEX_MODEL, "--api-base", emulator_process.base_url],
        )
        assert flex.exit_code == 1 and "the limit is 3" in flex.output
        assert "checked for model emu-flex-edit (schema profile)" in flex.output
    finally:
        emulator_process.configure(models=[spec.DEFAULT_MODEL])
