"""The edit-API emulator against real HTTP clients: contract, rendering, ledger, faults, replay."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import io
import json
import time
import zlib
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import typer
from openai import OpenAI
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from pipeline import spec
from pipeline.emulator import render, splice
from pipeline.emulator.config import EmulatorConfig
from pipeline.emulator.faults import draw, fingerprint
from pipeline.emulator.process import EmulatorProcess, emulator_command
from pipeline.emulator.store import FileStore
from pipeline.errors import ConfigError, InvalidImageError, parse_retry_after
from pipeline.imageinfo import probe
from tests.inprocess_emulator import InProcessEmulator

integration = pytest.mark.integration

MODEL = spec.DEFAULT_MODEL
RUNTIME_DEFAULTS = EmulatorConfig().model_dump(exclude={"host", "port", "render_threads"})


def make_image(
    width: int = 96,
    height: int = 64,
    colour: tuple[int, int, int] = (200, 60, 40),
    fmt: str = "PNG",
) -> bytes:
    im = Image.new("RGB", (width, height), colour)
    draw_ = ImageDraw.Draw(im)
    draw_.ellipse((width // 4, height // 4, 3 * width // 4, 3 * height // 4), fill=(20, 90, 220))
    out = io.BytesIO()
    im.save(out, fmt)
    return out.getvalue()


def make_mask(width: int = 96, height: int = 64) -> bytes:
    im = Image.new("RGBA", (width, height), (0, 0, 0, 255))
    ImageDraw.Draw(im).rectangle((0, 0, width // 2, height // 2), fill=(0, 0, 0, 0))
    out = io.BytesIO()
    im.save(out, "PNG")
    return out.getvalue()


IMG = make_image()
REF = make_image(40, 40, (10, 200, 90))


def edit_files(*images: bytes, name: str = "image", mask: bytes | None = None) -> list[Any]:
    files: list[Any] = [(name, (f"i{i}.png", data, "image/png")) for i, data in enumerate(images)]
    if mask is not None:
        files.append(("mask", ("mask.png", mask, "image/png")))
    return files


def fields(**extra: Any) -> dict[str, str]:
    base = {"model": MODEL, "prompt": "Add a starry night sky", "response_format": "b64_json"}
    base.update({k: str(v) for k, v in extra.items()})
    return base


def b64_images(response: httpx.Response) -> list[bytes]:
    return [base64.b64decode(item["b64_json"]) for item in response.json()["data"]]


@pytest.fixture(scope="module")
def emulator() -> Iterator[EmulatorProcess]:
    with EmulatorProcess(EmulatorConfig()) as emu:
        yield emu


@pytest.fixture
def emu(emulator: EmulatorProcess) -> EmulatorProcess:
    emulator.configure(**RUNTIME_DEFAULTS)
    emulator.reset()
    return emulator


@pytest.fixture
def client(emulator: EmulatorProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=emulator.base_url, timeout=30.0, trust_env=False) as c:
        yield c


def post(client: httpx.Client, files: list[Any] | None = None, **extra: Any) -> httpx.Response:
    return client.post("/images/edits", data=fields(**extra), files=files or edit_files(IMG))


def wait_idle(emu: EmulatorProcess, timeout: float = 15.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        stats = emu.stats()
        if stats["in_flight"] == 0 or time.monotonic() > deadline:
            return stats
        time.sleep(0.05)


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "code", "param"}
    assert body["error"]["code"] == code
    assert body["error"]["message"]
    err: dict[str, Any] = body["error"]
    return err


# --- the contract ------------------------------------------------------------------------------


@integration
def test_url_answer_shape_headers_and_download(emu: EmulatorProcess, client: httpx.Client) -> None:
    r = post(client, response_format="url")
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"id", "created", "size", "output_format", "data", "metadata"}
    assert r.headers["x-lumenfall-request-id"] == body["id"]
    assert r.headers["x-lumenfall-provider"] == "replicate"
    assert r.headers["x-lumenfall-model"] == MODEL
    assert body["metadata"] == {
        "model": MODEL,
        "executed_model": "replicate/prunaai/p-image-edit",
        "provider": "replicate",
        "provider_name": "Replicate",
        "cost": 0.01,
        "cost_currency": "USD",
    }
    assert body["output_format"] == "png"
    url = body["data"][0]["url"]
    assert url.startswith(emu.root_url + "/v1/files/") and url.endswith(".png")
    download = client.get(url)
    assert download.status_code == 200
    assert download.headers["content-type"] == "image/png"
    info = probe(download.content)
    assert (info.format, info.size) == ("png", body["size"])
    stats = emu.stats()
    assert stats["downloads"] == 1
    assert stats["charged_requests"] == 1


@integration
def test_b64_json_answer(emu: EmulatorProcess, client: httpx.Client) -> None:
    r = post(client)
    assert r.status_code == 200
    (item,) = r.json()["data"]
    assert "url" not in item
    info = probe(base64.b64decode(item["b64_json"], validate=True))
    assert info.size == r.json()["size"]


VALIDATION_CASES: list[tuple[str, dict[str, Any], list[Any] | None, str, str]] = [
    ("prompt too long", {"prompt": "x" * 1001}, None, "prompt", "Too big: expected string"),
    ("prompt empty", {"prompt": " "}, None, "prompt", "Too small"),
    ("n zero", {"n": 0}, None, "n", "between 1 and 10"),
    ("n eleven", {"n": 11}, None, "n", "between 1 and 10"),
    ("n not int", {"n": "two"}, None, "n", "integer"),
    ("size", {"size": "huge"}, None, "size", "unknown size"),
    ("aspect", {"aspect_ratio": "wide"}, None, "aspect_ratio", "unknown aspect ratio"),
    ("resolution", {"resolution": "big"}, None, "resolution", "unknown resolution"),
    ("output format", {"output_format": "bmp"}, None, "output_format", "unknown output format"),
    ("compression 0", {"output_compression": 0}, None, "output_compression", "between"),
    ("compression 101", {"output_compression": 101}, None, "output_compression", "between"),
    ("seed", {"seed": "1.5"}, None, "seed", "integer"),
    ("response format", {"response_format": "file"}, None, "response_format", "one of"),
    ("quality", {"quality": "ultra"}, None, "quality", "one of"),
    ("no image", {}, [("other", ("x.png", IMG, "image/png"))], "image", "at least one"),
    ("six images", {}, edit_files(*[IMG] * 6), "image", "at most 5"),
    ("not an image", {}, edit_files(b"hello, not pixels"), "image", "not a valid image"),
    ("truncated image", {}, edit_files(IMG[:-20]), "image", "not a valid image"),
    ("avif input", {}, edit_files(make_image(fmt="AVIF")), "image", "unsupported format"),
    ("jpeg mask", {}, edit_files(IMG, mask=make_image(fmt="JPEG")), "mask", "must be a PNG"),
    ("mask size", {}, edit_files(IMG, mask=make_mask(50, 50)), "mask", "same dimensions"),
]


@integration
@pytest.mark.parametrize(
    ("extra", "files", "param", "message"),
    [case[1:] for case in VALIDATION_CASES],
    ids=[case[0] for case in VALIDATION_CASES],
)
def test_validation_errors(
    emu: EmulatorProcess,
    client: httpx.Client,
    extra: dict[str, Any],
    files: list[Any] | None,
    param: str,
    message: str,
) -> None:
    err = assert_error(post(client, files, **extra), 400, "INVALID_REQUEST")
    assert err["param"] == param
    assert err["type"] == "invalid_request_error"
    assert message in err["message"]
    stats = emu.stats()
    assert stats["charged_requests"] == 0
    assert stats["by_status"] == {"400": 1}


@integration
def test_prompt_limit_message_and_boundary(emu: EmulatorProcess, client: httpx.Client) -> None:
    err = assert_error(post(client, prompt="y" * 1001), 400, "INVALID_REQUEST")
    assert err["message"].endswith("Too big: expected string to have <=1000 characters")
    assert post(client, prompt="y" * 1000, output_format="jpeg").status_code == 200


@integration
def test_missing_prompt_and_non_multipart(emu: EmulatorProcess, client: httpx.Client) -> None:
    r = client.post("/images/edits", data={"model": MODEL}, files=edit_files(IMG))
    assert assert_error(r, 400, "INVALID_REQUEST")["param"] == "prompt"
    r = client.post("/images/edits", json={"model": MODEL, "prompt": "x"})
    assert "multipart/form-data" in assert_error(r, 400, "INVALID_REQUEST")["message"]


@integration
def test_unknown_model_is_404(emu: EmulatorProcess, client: httpx.Client) -> None:
    err = assert_error(post(client, model="nope-model"), 404, "MODEL_NOT_FOUND")
    assert "nope-model" in err["message"]


@integration
def test_disabled_model_is_404(emu: EmulatorProcess, client: httpx.Client) -> None:
    emu.configure(models=[MODEL, "p-image-edit-old"], disabled_models=["p-image-edit-old"])
    assert_error(post(client, model="p-image-edit-old"), 404, "MODEL_DISABLED")
    assert [m["id"] for m in client.get("/models").json()["data"]] == [MODEL, "p-image-edit-old"]


@integration
@pytest.mark.parametrize("fmt", ["JPEG", "WEBP", "GIF"])
def test_accepted_input_formats(emu: EmulatorProcess, client: httpx.Client, fmt: str) -> None:
    r = post(client, edit_files(make_image(fmt=fmt), make_image(fmt=fmt)), output_format="jpeg")
    assert r.status_code == 200, r.text


@integration
def test_auth_when_a_key_is_configured(emu: EmulatorProcess, client: httpx.Client) -> None:
    effective = emu.configure(api_key="sekret-key")
    assert effective["api_key"] == "***"
    assert "sekret" not in json.dumps(emu.configure())
    assert_error(post(client), 401, "AUTHENTICATION_FAILED")
    client.headers["Authorization"] = "Bearer wrong"
    assert_error(post(client), 401, "AUTHENTICATION_FAILED")
    assert_error(client.get("/models"), 401, "AUTHENTICATION_FAILED")
    client.headers["Authorization"] = "Bearer sekret-key"
    assert post(client, output_format="jpeg").status_code == 200
    assert emu.stats()["charged_requests"] == 1


@integration
def test_any_key_accepted_without_configured_key(
    emu: EmulatorProcess, client: httpx.Client
) -> None:
    client.headers["Authorization"] = "Bearer whatever"
    assert post(client, output_format="jpeg").status_code == 200


@integration
def test_insufficient_balance(emu: EmulatorProcess, client: httpx.Client) -> None:
    emu.configure(balance_usd=0.03)
    assert post(client, output_format="jpeg", n=2).status_code == 200
    err = assert_error(post(client, output_format="jpeg", n=2), 402, "INSUFFICIENT_BALANCE")
    assert err["message"] == "Insufficient balance: $0.02 required, $0.01 available"
    assert post(client, output_format="jpeg").status_code == 200
    stats = emu.stats()
    assert stats["charged_usd"] == 0.03
    assert stats["balance_usd"] == 0.0


# --- sizes, n, formats, determinism --------------------------------------------------------


def _aspect_image(size: spec.OutputSize) -> bytes:
    # A small image with (about) the same aspect ratio as `size`.
    return make_image(round(size.width / 8), round(size.height / 8))


@integration
@pytest.mark.parametrize("target", spec.SUPPORTED_SIZES, ids=str)
def test_size_mapping(emu: EmulatorProcess, client: httpx.Client, target: spec.OutputSize) -> None:
    ways: list[tuple[dict[str, Any], bytes]] = [
        ({"size": str(target)}, IMG),
        ({"size": target.aspect}, IMG),
        ({"aspect_ratio": target.aspect, "resolution": "1K"}, IMG),
        ({"size": "auto"}, _aspect_image(target)),
        ({}, _aspect_image(target)),
    ]
    for extra, image in ways:
        r = post(client, edit_files(image), output_format="jpeg", **extra)
        assert r.status_code == 200, r.text
        assert r.json()["size"] == str(target), extra
        assert probe(b64_images(r)[0]).size == str(target)


@integration
@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"size": "1920x1080"}, "1365x768"),
        ({"size": "100x1000"}, "768x1365"),
        ({"size": "1024x1024", "aspect_ratio": "16:9"}, "1024x1024"),
        ({"aspect_ratio": "7:5"}, "1183x887"),
    ],
)
def test_size_mapping_nearest_and_precedence(
    emu: EmulatorProcess, client: httpx.Client, extra: dict[str, str], expected: str
) -> None:
    r = post(client, output_format="jpeg", **extra)
    assert r.json()["size"] == expected


@integration
def test_n_images_all_different_and_costed(emu: EmulatorProcess, client: httpx.Client) -> None:
    r = post(client, n=3, output_format="jpeg", seed=7)
    images = b64_images(r)
    assert len(images) == 3
    assert len(set(images)) == 3
    assert r.json()["metadata"]["cost"] == 0.03
    stats = emu.stats()
    assert (stats["charged_requests"], stats["charged_images"], stats["charged_usd"]) == (
        1,
        3,
        0.03,
    )


@integration
@pytest.mark.parametrize(
    ("requested", "expected"),
    [
        ("png", "png"),
        ("jpeg", "jpeg"),
        ("jpg", "jpeg"),
        ("webp", "webp"),
        ("gif", "gif"),
        ("avif", "avif"),
    ],
)
def test_output_formats(
    emu: EmulatorProcess, client: httpx.Client, requested: str, expected: str
) -> None:
    r = post(client, output_format=requested)
    assert r.json()["output_format"] == expected
    assert probe(b64_images(r)[0]).format == expected
    url = post(client, output_format=requested, response_format="url").json()["data"][0]["url"]
    assert url.endswith("." + expected)
    download = client.get(url)
    assert download.headers["content-type"] == spec.CONTENT_TYPES[expected]
    assert probe(download.content).format == expected


@integration
def test_output_compression_changes_lossy_output(
    emu: EmulatorProcess, client: httpx.Client
) -> None:
    low = b64_images(post(client, output_format="jpeg", output_compression=5))[0]
    high = b64_images(post(client, output_format="jpeg", output_compression=95))[0]
    assert len(low) < len(high)


@integration
def test_deterministic_per_seed(emu: EmulatorProcess, client: httpx.Client) -> None:
    for fmt in ("png", "jpeg"):
        first = b64_images(post(client, output_format=fmt, seed=11))
        again = b64_images(post(client, output_format=fmt, seed=11))
        other = b64_images(post(client, output_format=fmt, seed=12))
        assert first == again
        assert first != other
    # The prompt is part of the edit too.
    assert b64_images(post(client, seed=11, prompt="Something else")) != b64_images(
        post(client, seed=11)
    )


@integration
@pytest.mark.parametrize("part_name", ["image[]", "image"])
def test_multi_image(emu: EmulatorProcess, client: httpx.Client, part_name: str) -> None:
    files = edit_files(IMG, REF, make_image(30, 50, (240, 240, 0)), name=part_name)
    multi = post(client, files, seed=3)
    single = post(client, edit_files(IMG, name=part_name), seed=3)
    assert multi.status_code == 200 and single.status_code == 200
    assert b64_images(multi) != b64_images(single)
    record = emu.requests()[0]
    assert record["image_part_names"] == [part_name] * 3
    assert record["n_images"] == 3


@integration
def test_mask_changes_the_edit(emu: EmulatorProcess, client: httpx.Client) -> None:
    masked = post(client, edit_files(IMG, mask=make_mask()), seed=1)
    plain = post(client, edit_files(IMG), seed=1)
    assert masked.status_code == 200
    assert b64_images(masked) != b64_images(plain)
    assert emu.requests()[0]["mask_sha256"] is not None


@integration
def test_extra_fields_are_accepted_and_recorded(emu: EmulatorProcess, client: httpx.Client) -> None:
    r = client.post(
        "/images/edits?trace=abc",
        data=fields(
            turbo="false",
            disable_safety_checker="true",
            replicate_weights="owner/weights",
            user="u-1",
            quality="high",
            thinking="off",
            seed=99,
            output_format="jpeg",
        ),
        files=edit_files(IMG, mask=make_mask()),
    )
    assert r.status_code == 200
    (record,) = emu.requests()
    assert record["fields"]["turbo"] == "false"
    assert record["fields"]["disable_safety_checker"] == "true"
    assert record["fields"]["replicate_weights"] == "owner/weights"
    assert record["fields"]["seed"] == "99"
    assert record["query"] == {"trace": "abc"}
    assert record["charged"] is True
    assert record["status"] == 200
    assert record["fault"] is None
    assert record["image_sha256"] == [hashlib.sha256(IMG).hexdigest()]
    assert record["mask_sha256"] == hashlib.sha256(make_mask()).hexdigest()


@integration
def test_revised_prompt_rate(emu: EmulatorProcess, client: httpx.Client) -> None:
    emu.configure(revised_prompt_rate=1.0)
    item = post(client, output_format="jpeg").json()["data"][0]
    assert "starry night sky" in item["revised_prompt"]
    emu.configure(revised_prompt_rate=0.0)
    assert "revised_prompt" not in post(client, output_format="jpeg").json()["data"][0]


# --- dry run, models, ledger ---------------------------------------------------------------


@integration
def test_dry_run_estimates_and_charges_nothing(emu: EmulatorProcess, client: httpx.Client) -> None:
    r = client.post("/images/edits?dryRun=true", data=fields(n=2), files=edit_files(IMG))
    assert r.status_code == 200
    assert r.json() == {
        "estimated": True,
        "model": MODEL,
        "provider": "replicate",
        "total_cost_micros": 20000,
        "currency": "USD",
        "components": [
            {
                "type": "output",
                "metric": "image",
                "quantity": 2,
                "billable_quantity": 2,
                "unit_price": 0.01,
                "total_cost": 20000,
            }
        ],
    }
    bad = client.post("/images/edits?dryRun=true", data=fields(n=20), files=edit_files(IMG))
    assert_error(bad, 400, "INVALID_REQUEST")
    stats = emu.stats()
    assert stats["dry_runs"] == 1
    assert stats["charged_requests"] == 0
    assert stats["charged_usd"] == 0.0
    assert stats["images_rendered"] == 0


@integration
def test_models_endpoints(emu: EmulatorProcess, client: httpx.Client) -> None:
    listing = client.get("/models").json()
    assert listing["object"] == "list"
    (model,) = listing["data"]
    assert set(model) == {"id", "object", "created", "owned_by"}
    assert (model["id"], model["object"]) == (MODEL, "model")
    assert client.get(f"/models/{MODEL}").json() == model
    assert "schema" in client.get(f"/models/{MODEL}?schema=true").json()
    assert_error(client.get("/models/not-a-model"), 404, "MODEL_NOT_FOUND")


@integration
def test_ledger_and_max_in_flight_under_concurrency(emu: EmulatorProcess) -> None:
    emu.configure(latency=1.0)

    async def burst() -> list[int]:
        async with httpx.AsyncClient(base_url=emu.base_url, timeout=30, trust_env=False) as c:
            responses = await asyncio.gather(
                *(
                    c.post(
                        "/images/edits",
                        data=fields(seed=i, output_format="jpeg"),
                        files=edit_files(IMG),
                    )
                    for i in range(8)
                )
            )
        return [r.status_code for r in responses]

    assert asyncio.run(burst()) == [200] * 8
    stats = emu.stats()
    assert stats["requests"] == 8
    assert stats["max_in_flight"] == 8
    assert stats["in_flight"] == 0
    assert stats["charged_requests"] == 8
    assert stats["charged_usd"] == 0.08
    assert stats["by_status"] == {"200": 8}
    assert len(emu.requests()) == 8
    emu.reset()
    assert emu.stats()["requests"] == 0
    assert emu.requests() == []


@integration
def test_files_expire_and_store_is_bounded(emu: EmulatorProcess, client: httpx.Client) -> None:
    emu.configure(file_ttl=0.2)
    url = post(client, response_format="url", output_format="jpeg").json()["data"][0]["url"]
    time.sleep(0.4)
    assert_error(client.get(url), 404, "NOT_FOUND")
    emu.configure(file_ttl=3600, file_store_bytes=1)
    first = post(client, response_format="url", output_format="jpeg").json()["data"][0]["url"]
    second = post(client, response_format="url", output_format="jpeg").json()["data"][0]["url"]
    assert_error(client.get(first), 404, "NOT_FOUND")
    assert client.get(second).status_code == 200
    assert emu.stats()["files_stored"] == 1


@integration
def test_config_endpoint_rejects_bad_values(emu: EmulatorProcess) -> None:
    with pytest.raises(ConfigError, match="more than 1"):
        emu.configure(drop_rate=0.7, slow_rate=0.5)
    with pytest.raises(ConfigError, match="latency_distribution"):
        emu.configure(latency_distribution="gaussian")
    with pytest.raises(ConfigError, match="no_such_field"):
        emu.configure(no_such_field=1)
    assert emu.configure()["drop_rate"] == 0.0


# --- faults ----------------------------------------------------------------------------------


@integration
def test_rate_limited_with_retry_after(emu: EmulatorProcess, client: httpx.Client) -> None:
    emu.configure(rate_limited_rate=1.0, retry_after=2.0)
    r = post(client)
    assert_error(r, 429, "RATE_LIMITED")
    assert r.headers["retry-after"] == "2"
    assert parse_retry_after(r.headers) == 2.0
    stats = emu.stats()
    assert stats["faults"] == {"rate_limited": 1}
    assert stats["charged_requests"] == 0


@integration
@pytest.mark.parametrize(
    ("field", "status", "code"),
    [
        ("internal_error_rate", 500, "INTERNAL_ERROR"),
        ("exhausted_rate", 502, "ALL_PROVIDERS_EXHAUSTED"),
    ],
)
def test_server_errors_are_not_charged(
    emu: EmulatorProcess, client: httpx.Client, field: str, status: int, code: str
) -> None:
    emu.configure(**{field: 1.0})
    assert_error(post(client), status, code)
    assert emu.stats()["charged_requests"] == 0
    assert emu.requests()[0]["charged"] is False


@integration
def test_dropped_connection_is_charged(emu: EmulatorProcess, client: httpx.Client) -> None:
    emu.configure(drop_rate=1.0)
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        post(client, output_format="jpeg")
    stats = wait_idle(emu)
    assert stats["charged_requests"] == 1
    assert stats["faults"] == {"dropped": 1}
    assert emu.requests()[0]["fault"] == "dropped"
    # The emulator keeps its log clean of tracebacks for drops it makes on purpose.
    assert not any("Traceback" in line for line in emu.stderr_lines())


@integration
def test_slow_answer_times_the_client_out_and_is_charged(
    emu: EmulatorProcess, client: httpx.Client
) -> None:
    emu.configure(slow_rate=1.0, slow_seconds=1.5)
    with pytest.raises(httpx.ReadTimeout):
        client.post(
            "/images/edits",
            data=fields(output_format="jpeg"),
            files=edit_files(IMG),
            timeout=httpx.Timeout(10.0, read=0.5),
        )
    stats = wait_idle(emu)
    assert stats["charged_requests"] == 1
    assert stats["faults"] == {"slow": 1}


@integration
def test_malformed_bodies_b64(emu: EmulatorProcess, client: httpx.Client) -> None:
    for kind in ("not_json", "no_data", "bad_base64", "not_image"):
        emu.configure(malformed_rate=1.0, malformed_kinds=[kind])
        r = post(client, output_format="jpeg", seed=len(kind))
        assert r.status_code == 200
        if kind == "not_json":
            with pytest.raises(json.JSONDecodeError):
                r.json()
            continue
        body = r.json()
        if kind == "no_data":
            assert "data" not in body
            continue
        payload = body["data"][0]["b64_json"]
        if kind == "bad_base64":
            with pytest.raises(binascii.Error):
                base64.b64decode(payload)
        else:
            with pytest.raises(InvalidImageError):
                probe(base64.b64decode(payload, validate=True))
    stats = emu.stats()
    assert stats["charged_requests"] == 4
    assert stats["faults"] == {
        "malformed_bad_base64": 1,
        "malformed_no_data": 1,
        "malformed_not_image": 1,
        "malformed_not_json": 1,
    }


@integration
def test_malformed_bodies_url(emu: EmulatorProcess, client: httpx.Client) -> None:
    emu.configure(malformed_rate=1.0, malformed_kinds=["not_image"])
    url = post(client, response_format="url").json()["data"][0]["url"]
    with pytest.raises(InvalidImageError):
        probe(client.get(url).content)
    # bad_base64 means nothing for a url answer: no fault is injected there.
    emu.configure(malformed_kinds=["bad_base64"])
    r = post(client, response_format="url", output_format="jpeg")
    assert probe(client.get(r.json()["data"][0]["url"]).content).format == "jpeg"
    assert emu.stats()["faults"] == {"malformed_not_image": 1}


@integration
def test_truncated_download_is_charged(emu: EmulatorProcess, client: httpx.Client) -> None:
    emu.configure(truncate_rate=1.0)
    r = post(client, response_format="url", output_format="jpeg")
    assert r.status_code == 200
    url = r.json()["data"][0]["url"]
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        client.get(url)
    # A transfer failure is transient: the next download is whole.
    assert probe(client.get(url).content).format == "jpeg"
    stats = wait_idle(emu)
    assert stats["charged_requests"] == 1
    assert stats["downloads_truncated"] == 1
    assert stats["faults"] == {"truncated_download": 1}
    assert not any("Traceback" in line for line in emu.stderr_lines())


REPLAY_RATES = {
    "fault_seed": 42,
    "rate_limited_rate": 0.2,
    "internal_error_rate": 0.15,
    "exhausted_rate": 0.15,
    "malformed_rate": 0.2,
    "malformed_kinds": ["not_json", "no_data"],
}


def _replay_faults(
    emu: EmulatorProcess, client: httpx.Client, prompts: list[str]
) -> dict[str, Any]:
    for prompt in prompts:
        post(client, prompt=prompt, output_format="jpeg")
    return {r["fields"]["prompt"]: (r["status"], r["fault"]) for r in emu.requests()}


@integration
def test_seeded_replay(emu: EmulatorProcess, client: httpx.Client) -> None:
    emu.configure(**REPLAY_RATES)
    prompts = [f"edit number {i}" for i in range(16)]
    first = _replay_faults(emu, client, prompts)
    faults = [fault for _, fault in first.values()]
    assert any(f is None for f in faults) and any(f is not None for f in faults)

    emu.reset()
    assert _replay_faults(emu, client, prompts) == first

    # Arrival order does not matter, concurrency neither.
    emu.reset()

    async def concurrent() -> None:
        async with httpx.AsyncClient(base_url=emu.base_url, timeout=30, trust_env=False) as c:
            await asyncio.gather(
                *(
                    c.post(
                        "/images/edits",
                        data=fields(prompt=p, output_format="jpeg"),
                        files=edit_files(IMG),
                    )
                    for p in reversed(prompts)
                )
            )

    asyncio.run(concurrent())
    assert {r["fields"]["prompt"]: (r["status"], r["fault"]) for r in emu.requests()} == first

    # Another seed, another sequence.
    emu.reset()
    emu.configure(fault_seed=43)
    assert _replay_faults(emu, client, prompts) != first


@integration
def test_retry_of_the_same_request_gets_a_fresh_draw(
    emu: EmulatorProcess, client: httpx.Client
) -> None:
    emu.configure(**REPLAY_RATES)
    for _ in range(12):
        post(client, output_format="jpeg")
    records = emu.requests()
    assert [r["attempt"] for r in records] == list(range(12))
    assert len({r["fingerprint"] for r in records}) == 1
    assert len({r["fault"] for r in records}) > 1


@integration
def test_openai_sdk_works_unchanged(emu: EmulatorProcess) -> None:
    client = OpenAI(base_url=emu.base_url, api_key="x")
    single = client.images.edit(
        model="p-image-edit",
        image=("a.png", IMG, "image/png"),
        prompt="Add a starry night sky",
        response_format="b64_json",
    )
    assert single.data is not None
    assert probe(base64.b64decode(single.data[0].b64_json or "")).size == single.size
    several = client.images.edit(
        model="p-image-edit",
        image=[("a.png", IMG, "image/png"), ("b.png", REF, "image/png")],
        prompt="Put image 2 into image 1",
        response_format="b64_json",
    )
    assert several.data is not None and several.data[0].b64_json
    default_url = client.images.edit(model="p-image-edit", image=("a.png", IMG), prompt="Hi")
    assert default_url.data is not None and (default_url.data[0].url or "").startswith("http")
    records = emu.requests()
    assert records[1]["image_part_names"] == ["image[]", "image[]"]
    assert [r["status"] for r in records] == [200, 200, 200]
    client.close()


# --- pure parts: rendering, draws, config, store, CLI --------------------------------------


def test_render_png_and_jpeg_splices_equal_whole_encodes() -> None:
    for width, height in ((1024, 1024), (887, 1182)):
        base = render.build_base([IMG, REF], make_mask(), width, height)
        top, strip = render.render_bands(base.layout, prompt="p", seed=1, variant=0, n=1)
        picture = render.compose(base, top, strip)
        png = render.render_variant(base, prompt="p", seed=1, variant=0, n=1, output_format="png")
        decoded = Image.open(io.BytesIO(png))
        assert np.array_equal(np.asarray(decoded), np.asarray(picture))
        jpeg = render.render_variant(
            base, prompt="p", seed=1, variant=0, n=1, output_format="jpeg", compression=70
        )
        assert jpeg == render.encode(picture, "jpeg", 70)


def test_adler32_combine_matches_zlib() -> None:
    rng = np.random.default_rng(5)
    for size_a, size_b in ((0, 10), (5, 70_000), (65_521, 65_522), (1, 1)):
        a = rng.integers(0, 256, size_a, dtype=np.uint8).tobytes()
        b = rng.integers(0, 256, size_b, dtype=np.uint8).tobytes()
        combined = splice.adler32_combine(zlib.adler32(a), zlib.adler32(b), len(b))
        assert combined == zlib.adler32(a + b)


def test_latency_distributions_are_seeded() -> None:
    fp = fingerprint([("prompt", "x")], [], [])
    fixed = EmulatorConfig(latency=0.3)
    assert {draw(fixed, fp, i, response_format="url").latency for i in range(5)} == {0.3}
    uniform = EmulatorConfig(latency=1.0, latency_jitter=0.2, latency_distribution="uniform")
    values = [draw(uniform, fp, i, response_format="url").latency for i in range(500)]
    assert all(1.0 - 0.35 <= v <= 1.0 + 0.35 for v in values)
    assert abs(sum(values) / len(values) - 1.0) < 0.05
    lognormal = EmulatorConfig(latency=2.0, latency_jitter=1.0, latency_distribution="lognormal")
    values = [draw(lognormal, fp, i, response_format="url").latency for i in range(2000)]
    assert min(values) > 0
    assert abs(sum(values) / len(values) - 2.0) < 0.2
    again = [draw(lognormal, fp, i, response_format="url").latency for i in range(2000)]
    assert values == again


def test_config_env_round_trip_and_masking() -> None:
    config = EmulatorConfig(api_key="k-123", drop_rate=0.25, malformed_kinds=["no_data"])
    assert EmulatorConfig.from_env(config.to_env()) == config
    assert "k-123" not in repr(config)
    env = {"IMGEDIT_EMULATOR_LATENCY": "0.5", "IMGEDIT_EMULATOR_MODELS": "a, b"}
    loaded = EmulatorConfig.from_env(env)
    assert (loaded.latency, loaded.models) == (0.5, ["a", "b"])
    with pytest.raises(ConfigError, match="slow_seconds"):
        EmulatorConfig.from_env({"IMGEDIT_EMULATOR_SLOW_SECONDS": "soon"})


def test_file_store_evicts_downloaded_first_and_expires() -> None:
    now = [0.0]
    store = FileStore(max_bytes=10, ttl=5.0, clock=lambda: now[0])
    a = store.put(b"aaaa", "png", "image/png")
    b = store.put(b"bbbb", "png", "image/png")
    assert store.get(a) is not None  # a is now downloaded: first to go
    c = store.put(b"cccc", "png", "image/png")
    assert store.get(a) is None
    assert store.get(b) is not None and store.get(c) is not None
    now[0] = 6.0
    assert store.get(b) is None


def test_cli_rejects_bad_config_without_traceback() -> None:
    app = typer.Typer()
    app.command()(emulator_command)
    result = CliRunner().invoke(app, ["--drop-rate", "0.8", "--slow-rate", "0.5"])
    assert result.exit_code == 2
    assert "more than 1" in result.output
    assert "Traceback" not in result.output


async def test_output_scale_sends_smaller_images_billed_as_asked() -> None:
    # For runs of many rows on a small disk: 1024x1024 asked, 64x64 sent and reported.
    emulator = InProcessEmulator(output_scale=1 / 16)
    try:
        async with httpx.AsyncClient(
            transport=emulator.transport, base_url=emulator.base_url, timeout=30
        ) as client:
            r = await client.post(
                "/images/edits",
                data=fields(size="1024x1024", output_format="jpeg"),
                files=edit_files(IMG),
            )
        assert r.status_code == 200, r.text
        body = r.json()
        (item,) = body["data"]
        info = probe(base64.b64decode(item["b64_json"], validate=True))
        assert info.size == body["size"] == "64x64"
        assert body["metadata"]["cost"] == 0.01
        assert emulator.stats()["charged_images"] == 1
    finally:
        emulator.close()
