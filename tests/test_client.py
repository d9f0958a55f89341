"""The edit API client against scripted HTTP answers (httpx.MockTransport)."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable

import httpx
import pytest
from PIL import Image

from pipeline import constants, errors
from pipeline.engine.client import EditClient, EditRequest, ImagePart, build_files, build_form
from pipeline.io.netguard import AddressPolicy
from pipeline.manifest.types import EditParams

API = "https://api.example.test/openai/v1"
SECRET = "sk-test-SENTINEL-0123456789"


def png_bytes(
    size: tuple[int, int] = (8, 6), colour: tuple[int, int, int] = (200, 10, 10)
) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


def ok_body(images: list[bytes] | None = None, **extra: object) -> dict[str, object]:
    images = images or [png_bytes((16, 9))]
    body: dict[str, object] = {
        "id": "req_123",
        "created": 1702345678,
        "size": "16x9",
        "output_format": "png",
        "data": [
            {"b64_json": base64.b64encode(im).decode(), "revised_prompt": f"rev {i}"}
            for i, im in enumerate(images)
        ],
        "metadata": {
            "model": "p-image-edit",
            "executed_model": "replicate/prunaai/p-image-edit",
            "provider": "replicate",
            "provider_name": "Replicate",
            "cost": 0.01 * len(images),
            "cost_currency": "USD",
        },
    }
    body.update(extra)
    return body


def make_client(handler: Callable[[httpx.Request], httpx.Response], **kw: object) -> EditClient:
    return EditClient(
        base_url=API,
        api_key=SECRET,
        transport=httpx.MockTransport(handler),
        **kw,  # type: ignore[arg-type]
    )


def request_with(n_images: int = 1, **params: object) -> EditRequest:
    return EditRequest(
        prompt="add a starry sky",
        images=[ImagePart(f"im{i}.png", png_bytes(), "image/png") for i in range(n_images)],
        seed=7,
        params=EditParams(**params),  # type: ignore[arg-type]
    )


def test_every_parameter_is_sent_as_form_text() -> None:
    req = EditRequest(
        prompt="p",
        images=[ImagePart("a.png", b"x", "image/png")],
        seed=42,
        params=EditParams(
            n=2,
            size="1024x1024",
            aspect_ratio="16:9",
            resolution="1K",
            quality="high",
            output_format="webp",
            output_compression=80,
            user="u-1",
            extra={
                "turbo": False,
                "disable_safety_checker": True,
                "replicate_weights": "w",
                "k": [1],
            },
        ),
        response_format="url",
    )
    form = build_form(req, "p-image-edit")
    assert form == {
        "model": "p-image-edit",
        "prompt": "p",
        "n": "2",
        "size": "1024x1024",
        "aspect_ratio": "16:9",
        "resolution": "1K",
        "quality": "high",
        "response_format": "url",
        "output_format": "webp",
        "output_compression": "80",
        "seed": "42",
        "user": "u-1",
        "turbo": "false",
        "disable_safety_checker": "true",
        "replicate_weights": "w",
        "k": "[1]",
    }


def test_extras_cannot_override_request_fields() -> None:
    req = EditRequest(
        prompt="p", images=[ImagePart("a.png", b"x")], params=EditParams(extra={"prompt": "x"})
    )
    with pytest.raises(ValueError, match="prompt"):
        build_form(req, "m")


def test_one_image_is_a_part_named_image_several_are_image_brackets() -> None:
    assert [n for n, _ in build_files(request_with(1))] == ["image"]
    assert [n for n, _ in build_files(request_with(3))] == ["image[]"] * 3
    masked = EditRequest(
        prompt="p", images=[ImagePart("a.png", b"x")], mask=ImagePart("m.png", b"m")
    )
    assert [n for n, _ in build_files(masked)] == ["image", "mask"]


async def test_parses_a_b64_answer_and_sends_the_key_only_to_the_api() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=ok_body(), headers={"X-Lumenfall-Request-Id": "lf-9"})

    async with make_client(handler) as client:
        resp = await client.edit(request_with(2, n=1))
    assert seen[0].url == f"{API}/images/edits"
    assert seen[0].headers["authorization"] == f"Bearer {SECRET}"
    assert seen[0].content.count(b'name="image[]"') == 2
    assert resp.id == "req_123" and resp.created == 1702345678
    assert resp.size == "16x9" and resp.output_format == "png"
    assert resp.request_id == "lf-9"
    assert resp.cost == pytest.approx(0.01) and resp.currency == "USD"
    assert resp.provider == "replicate" and resp.executed_model == "replicate/prunaai/p-image-edit"
    assert [i.revised_prompt for i in resp.images] == ["rev 0"]
    assert resp.images[0].info.size == "16x9"


async def test_url_results_are_downloaded_without_the_key() -> None:
    image = png_bytes((10, 10))
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.host == "media.example.test":
            return httpx.Response(200, content=image)
        body = ok_body()
        body["data"] = [{"url": "https://media.example.test/a.png"}]
        return httpx.Response(200, json=body)

    async with make_client(handler) as client:
        resp = await client.edit(request_with())
    assert resp.images[0].data == image
    assert resp.images[0].revised_prompt is None
    assert "authorization" not in seen[1].headers


@pytest.mark.parametrize(
    "url",
    ["http://media.example.test/a.png", "ftp://api.example.test/a.png", "file:///etc/passwd"],
)
async def test_result_urls_off_https_and_off_the_api_host_are_refused(url: str) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        body = ok_body()
        body["data"] = [{"url": url}]
        return httpx.Response(200, json=body)

    async with make_client(handler) as client:
        with pytest.raises(errors.UnsafeURLError) as info:
            await client.edit(request_with())
    assert not info.value.retryable


@pytest.mark.parametrize("address", ["10.0.0.7", "169.254.169.254", "127.0.0.1", "fd00::1"])
async def test_result_urls_on_internal_addresses_are_refused(address: str) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        body = ok_body()
        body["data"] = [{"url": "https://media.example.test/a.png"}]
        return httpx.Response(200, json=body)

    async def resolver(host: str, port: int) -> list[str]:
        return [address]

    policy = AddressPolicy(resolver=resolver)
    async with make_client(handler, download_policy=policy) as client:
        with pytest.raises(errors.UnsafeURLError, match=f"{address}, an? .*address") as info:
            await client.edit(request_with())
    assert not info.value.retryable


async def test_downloads_are_capped() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith(".png"):
            return httpx.Response(200, content=b"\0" * 5000)
        body = ok_body()
        body["data"] = [{"url": "https://media.example.test/big.png"}]
        return httpx.Response(200, json=body)

    async with make_client(handler, max_image_bytes=1000) as client:
        with pytest.raises(errors.ResponseTooLargeError):
            await client.edit(request_with())


async def test_an_expired_url_is_a_download_error_that_is_not_retried() -> None:
    calls = {"media": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "media.example.test":
            calls["media"] += 1
            return httpx.Response(404)
        body = ok_body()
        body["data"] = [{"url": "https://media.example.test/gone.png"}]
        return httpx.Response(200, json=body)

    async with make_client(handler) as client:
        with pytest.raises(errors.DownloadError) as info:
            await client.edit(request_with())
    assert calls["media"] == 1
    assert info.value.may_have_charged


@pytest.mark.parametrize(
    ("status", "code", "cls", "retryable", "fatal"),
    [
        (400, "INVALID_REQUEST", errors.BadRequestError, False, False),
        (400, "CONTENT_POLICY_VIOLATION", errors.ContentPolicyError, False, False),
        (401, "AUTHENTICATION_FAILED", errors.AuthenticationError, False, True),
        (402, "INSUFFICIENT_BALANCE", errors.InsufficientBalanceError, False, True),
        (404, "MODEL_NOT_FOUND", errors.NotFoundError, False, True),
        (408, None, errors.RequestTimeoutError, True, False),
        (409, None, errors.ConflictError, True, False),
        (429, "RATE_LIMITED", errors.RateLimitError, True, False),
        (500, "INTERNAL_ERROR", errors.ServerError, True, False),
        (502, "ALL_PROVIDERS_EXHAUSTED", errors.ProvidersExhaustedError, True, False),
        (503, "UPSTREAM_ERROR", errors.ServerError, True, False),
    ],
)
async def test_error_statuses_map_to_one_class_each(
    status: int, code: str | None, cls: type[errors.APIStatusError], retryable: bool, fatal: bool
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        err = {"message": f"boom {status}", "type": "error", "code": code}
        return httpx.Response(status, json={"error": err}, headers={"Retry-After": "3"})

    async with make_client(handler) as client:
        with pytest.raises(cls) as info:
            await client.edit(request_with())
    exc = info.value
    assert type(exc) is cls
    assert exc.status == status and exc.retryable is retryable and exc.run_fatal is fatal
    assert exc.message == f"boom {status}"
    assert exc.retry_after == 3.0
    assert SECRET not in str(exc) and SECRET not in repr(exc)


async def test_retry_after_ms_and_http_dates_are_understood() -> None:
    assert errors.parse_retry_after({"retry-after-ms": "1500"}) == 1.5
    assert (
        errors.parse_retry_after({"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}, now=1445412470)
        == 10
    )
    assert errors.parse_retry_after({"Retry-After": "soon"}) is None


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (httpx.Response(200, text="<html>oops</html>"), "not JSON"),
        (httpx.Response(200, json={"id": "x"}), "no `data`"),
        (httpx.Response(200, json={"data": [{"b64_json": "@@not base64@@"}]}), "not valid base64"),
        (
            httpx.Response(200, json={"data": [{"b64_json": base64.b64encode(b"hello").decode()}]}),
            "not a usable image",
        ),
        (
            httpx.Response(
                200, json={"data": [{"b64_json": base64.b64encode(png_bytes()[:-20]).decode()}]}
            ),
            "truncated",
        ),
    ],
)
async def test_unusable_2xx_answers_are_retryable_and_may_have_charged(
    answer: httpx.Response, message: str
) -> None:
    async with make_client(lambda request: answer) as client:
        with pytest.raises(errors.APIResponseError, match=message) as info:
            await client.edit(request_with())
    assert info.value.retryable and info.value.may_have_charged


@pytest.mark.parametrize(
    ("raised", "cls", "charged"),
    [
        (httpx.ConnectError("refused"), errors.APIConnectionError, False),
        (httpx.ConnectTimeout("slow connect"), errors.APITimeoutError, False),
        (httpx.ReadTimeout("slow answer"), errors.APITimeoutError, True),
        (httpx.RemoteProtocolError("peer closed connection"), errors.APIConnectionError, True),
        (httpx.ReadError("reset"), errors.APIConnectionError, True),
    ],
)
async def test_transport_errors_are_translated(
    raised: Exception, cls: type[errors.APIError], charged: bool
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise raised

    async with make_client(handler) as client:
        with pytest.raises(cls) as info:
            await client.edit(request_with())
    assert type(info.value) is cls
    assert info.value.retryable
    assert info.value.may_have_charged is charged
    assert isinstance(info.value.__cause__, httpx.HTTPError)


async def test_dry_run_returns_the_estimate() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.params["dryRun"] == "true"
        return httpx.Response(
            200,
            json={
                "estimated": True,
                "model": "p-image-edit",
                "provider": "replicate",
                "total_cost_micros": 30000,
                "currency": "USD",
                "components": [{"type": "output", "metric": "image", "quantity": 3}],
            },
        )

    async with make_client(handler) as client:
        est = await client.estimate(request_with(n=3))
    assert est.total_cost_micros == 30000 and est.total_cost_usd == pytest.approx(0.03)
    assert est.components[0]["quantity"] == 3


def test_arguments_win_over_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMGEDIT_API_BASE", "https://env.example.test/v1/")
    monkeypatch.delenv("IMGEDIT_API_KEY", raising=False)
    monkeypatch.setenv("LUMENFALL_API_KEY", SECRET)
    monkeypatch.setenv("IMGEDIT_MODEL", "env-model")
    c = EditClient()
    assert c.base_url == "https://env.example.test/v1"
    assert c.model == "env-model" and c.has_api_key
    assert SECRET not in repr(c)
    c2 = EditClient(base_url="https://arg.example.test/v1", model="arg-model")
    assert c2.base_url == "https://arg.example.test/v1" and c2.model == "arg-model"
    monkeypatch.setenv("IMGEDIT_API_KEY", "other")
    assert EditClient()._auth_headers() == {"Authorization": "Bearer other"}


def test_models_are_listed() -> None:
    import asyncio

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/models"):
            return httpx.Response(200, json={"object": "list", "data": [{"id": "p-image-edit"}]})
        return httpx.Response(404, json={"error": {"message": "no", "code": "MODEL_NOT_FOUND"}})

    async def go() -> None:
        async with make_client(handler) as client:
            assert [m["id"] for m in await client.list_models()] == ["p-image-edit"]
            with pytest.raises(errors.NotFoundError):
                await client.get_model("nope")

    asyncio.run(go())
    assert json.dumps(ok_body())  # the helper body is JSON-serialisable


# --- what the API says is not believed blindly, and never stored uncut ---------------------

COST_SLOT = '"__COST__"'


def answer_with_cost(literal: str | None, n_images: int = 1) -> httpx.Response:
    """An answer whose `metadata.cost` is `literal` as JSON text (NaN and 1e999 included,
    which Python's JSON reader turns into nan and inf); None: no cost at all."""
    body = ok_body([png_bytes((16, 9))] * n_images)
    metadata = body["metadata"]
    assert isinstance(metadata, dict)
    if literal is None:
        del metadata["cost"]
        return httpx.Response(200, json=body)
    metadata["cost"] = "__COST__"
    content = json.dumps(body).replace(COST_SLOT, literal)
    return httpx.Response(200, content=content, headers={"content-type": "application/json"})


@pytest.mark.parametrize(
    ("literal", "cost", "raw", "warning"),
    [
        ("0.01", 0.01, None, None),
        ('"0.01"', 0.01, None, None),
        ("0", 0.0, None, None),
        ("1.0", 1.0, None, None),  # exactly 100x the list price of one image
        (None, None, None, None),
        ("-5", None, "-5", "reported cost -5.0 is negative: not trusted"),
        ('"NaN"', None, "NaN", "reported cost 'NaN' is not a finite number: not trusted"),
        ("NaN", None, "nan", "reported cost nan is not a finite number: not trusted"),
        (
            '"Infinity"',
            None,
            "Infinity",
            "reported cost 'Infinity' is not a finite number: not trusted",
        ),
        ("1e999", None, "inf", "reported cost inf is not a finite number: not trusted"),
        ('"abc"', None, "abc", "reported cost 'abc' is not a number: not trusted"),
        ('""', None, "", "reported cost '' is not a number: not trusted"),
        ("true", None, "True", "reported cost True is not a number: not trusted"),
        ("[0.01]", None, "[0.01]", "reported cost [0.01] is not a number: not trusted"),
        (
            "40000",
            None,
            "40000",
            "reported cost 40000.0 is over 100x the list price of 1 image(s): not trusted",
        ),
        (
            "1.01",
            None,
            "1.01",
            "reported cost 1.01 is over 100x the list price of 1 image(s): not trusted",
        ),
    ],
)
async def test_only_a_believable_reported_cost_is_trusted(
    literal: str | None, cost: float | None, raw: str | None, warning: str | None
) -> None:
    async with make_client(lambda request: answer_with_cost(literal)) as client:
        resp = await client.edit(request_with())
    assert resp.cost == (pytest.approx(cost) if cost is not None else None)
    assert resp.cost_raw == raw
    assert resp.warnings == ((warning,) if warning else ())
    assert resp.n_asked == 1


async def test_the_cost_ceiling_follows_the_images_asked_and_the_price() -> None:
    async with make_client(lambda request: answer_with_cost("2.5", 2)) as client:
        assert (await client.edit(request_with(n=3))).cost == pytest.approx(2.5)
        over = await client.edit(request_with(n=2))
    assert over.cost is None and over.cost_raw == "2.5"
    assert over.warnings == (
        "reported cost 2.5 is over 100x the list price of 2 image(s): not trusted",
    )
    dear = make_client(lambda request: answer_with_cost("40"), price_per_image_usd=1.0)
    async with dear as client:
        assert (await client.edit(request_with())).cost == pytest.approx(40.0)
    with pytest.raises(ValueError, match="price per image"):
        make_client(lambda request: answer_with_cost("1"), price_per_image_usd=float("nan"))


async def test_an_untrusted_cost_is_kept_short() -> None:
    literal = json.dumps("9" * 10_000 + "x")
    async with make_client(lambda request: answer_with_cost(literal)) as client:
        resp = await client.edit(request_with())
    assert resp.cost is None
    assert resp.cost_raw is not None and len(resp.cost_raw) <= 64
    assert resp.cost_raw.endswith("... [cut, 10001 characters]")
    assert len(resp.warnings) == 1 and len(resp.warnings[0]) < 200


async def test_a_huge_revised_prompt_is_cut_with_a_warning() -> None:
    size = 20 * 2**20

    def handler(request: httpx.Request) -> httpx.Response:
        body = ok_body()
        body["data"] = [
            {"b64_json": base64.b64encode(png_bytes()).decode(), "revised_prompt": "r" * size}
        ]
        return httpx.Response(200, json=body)

    async with make_client(handler) as client:
        resp = await client.edit(request_with())
    revised = resp.images[0].revised_prompt
    assert revised is not None and len(revised) == constants.MAX_API_TEXT_CHARS
    assert revised.startswith("rrr") and revised.endswith(f"... [cut, {size} characters]")
    assert resp.warnings == (f"revised_prompt cut from {size} to 8192 characters",)


async def test_short_texts_of_an_answer_are_cut_with_warnings() -> None:
    long = "z" * 1000

    def handler(request: httpx.Request) -> httpx.Response:
        body = ok_body(id=long, size=long, output_format=long, created="__NAN__")
        metadata = body["metadata"]
        assert isinstance(metadata, dict)
        metadata.update(provider=long, executed_model=long, model=long, cost_currency=long)
        content = json.dumps(body).replace('"__NAN__"', "NaN")
        headers = {"X-Lumenfall-Request-Id": long, "content-type": "application/json"}
        return httpx.Response(200, content=content, headers=headers)

    async with make_client(handler) as client:
        resp = await client.edit(request_with())
    short = constants.MAX_API_SHORT_TEXT_CHARS
    texts = [resp.id, resp.size, resp.output_format, resp.provider, resp.executed_model]
    texts += [resp.model, resp.currency, resp.request_id]
    assert all(t is not None and len(t) == short for t in texts)
    assert resp.created is None
    assert set(resp.warnings) == {
        f"{what} cut from 1000 to {short} characters"
        for what in (
            "request id",
            "id",
            "size",
            "output_format",
            "currency",
            "provider",
            "executed_model",
            "model",
        )
    }


async def test_huge_metadata_is_reduced_under_the_cap() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        body = ok_body()
        metadata = body["metadata"]
        assert isinstance(metadata, dict)
        metadata["blob"] = "x" * 2_000_000
        metadata["nested"] = {"deep": ["y" * 100] * 100}
        metadata["k" * 1000] = 1
        return httpx.Response(200, json=body)

    async with make_client(handler) as client:
        resp = await client.edit(request_with())
    assert len(json.dumps(resp.metadata)) <= constants.MAX_METADATA_JSON_CHARS
    assert resp.metadata["model"] == "p-image-edit" and resp.metadata["cost"] == 0.01
    assert len(resp.metadata["blob"]) == constants.MAX_API_SHORT_TEXT_CHARS
    assert "nested" not in resp.metadata and "k" * 1000 not in resp.metadata
    assert resp.cost == pytest.approx(0.01) and resp.provider == "replicate"
    [warning] = resp.warnings
    assert warning.startswith("metadata cut: 2") and warning.endswith("kept 7 of 9 members")
    assert "characters of JSON, over the 16384 cap" in warning


async def test_metadata_of_many_members_stays_under_the_cap() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=ok_body(metadata={f"k{i}": i for i in range(200_000)}))

    async with make_client(handler) as client:
        resp = await client.edit(request_with())
    assert len(json.dumps(resp.metadata)) <= constants.MAX_METADATA_JSON_CHARS
    assert resp.metadata["k0"] == 0
    assert resp.warnings[0].startswith("metadata cut: ")


async def test_more_images_than_asked_keeps_the_first_ones() -> None:
    images = [png_bytes((16, 9), (i * 40, 0, 0)) for i in range(4)]
    async with make_client(lambda request: httpx.Response(200, json=ok_body(images))) as client:
        resp = await client.edit(request_with(n=3))
    assert [i.data for i in resp.images] == images[:3]
    assert resp.n_asked == 3
    assert resp.warnings == ("answer has 4 images for 3 asked: kept the first 3",)
    assert [i.revised_prompt for i in resp.images] == ["rev 0", "rev 1", "rev 2"]


async def test_extra_result_urls_are_not_even_downloaded() -> None:
    fetched: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "media.example.test":
            fetched.append(request.url.path)
            return httpx.Response(200, content=png_bytes())
        body = ok_body()
        body["data"] = [{"url": f"https://media.example.test/{i}.png"} for i in range(3)]
        return httpx.Response(200, json=body)

    async with make_client(handler) as client:
        resp = await client.edit(request_with())
    assert fetched == ["/0.png"] and len(resp.images) == 1


async def test_fewer_images_than_asked_is_no_error_here() -> None:
    async with make_client(lambda request: httpx.Response(200, json=ok_body())) as client:
        resp = await client.edit(request_with(n=3))
    assert len(resp.images) == 1 and resp.n_asked == 3
    assert resp.warnings == ()


async def test_a_huge_error_message_is_cut_everywhere_it_goes() -> None:
    size = 5 * 2**20

    def handler(request: httpx.Request) -> httpx.Response:
        err = {"message": "m" * size, "code": "C" * 1000, "param": ["p"] * 1000}
        return httpx.Response(400, json={"error": err}, headers={"x-request-id": "i" * 1000})

    async with make_client(handler) as client:
        with pytest.raises(errors.BadRequestError) as info:
            await client.edit(request_with())
    exc = info.value
    marker = f"... [cut, {size} characters]"
    assert len(exc.message) == constants.MAX_API_TEXT_CHARS and exc.message.endswith(marker)
    assert len(str(exc)) < constants.MAX_API_TEXT_CHARS + 2 * constants.MAX_API_SHORT_TEXT_CHARS
    assert str(exc).endswith(marker)
    assert exc.code is not None and len(exc.code) == constants.MAX_API_SHORT_TEXT_CHARS
    assert exc.request_id is not None and len(exc.request_id) == constants.MAX_API_SHORT_TEXT_CHARS
    assert len(json.dumps(exc.body)) <= constants.MAX_METADATA_JSON_CHARS
    assert set(exc.body) == {"message", "code"}  # the list is not a short scalar
    assert len(exc.body["message"]) == constants.MAX_API_SHORT_TEXT_CHARS


async def test_a_huge_text_error_body_is_cut() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(502, text="<html>" + "x" * 5_000_000)

    async with make_client(handler) as client:
        with pytest.raises(errors.ServerError) as info:
            await client.edit(request_with())
    assert len(info.value.message) == errors.MAX_TEXT_ERROR_BODY_CHARS
    assert info.value.message.startswith("<html>xxx")


async def test_transport_error_text_is_cut() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadError("peer said: " + "q" * 1_000_000)

    async with make_client(handler) as client:
        with pytest.raises(errors.APIConnectionError) as info:
            await client.edit(request_with())
    assert len(str(info.value)) < 2 * constants.MAX_API_SHORT_TEXT_CHARS
    assert "peer said: qqq" in str(info.value)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Retry-After": "999999"}, constants.MAX_RETRY_AFTER_S),
        ({"Retry-After": "1e999"}, constants.MAX_RETRY_AFTER_S),
        ({"Retry-After": "inf"}, constants.MAX_RETRY_AFTER_S),
        ({"retry-after-ms": "1e12"}, constants.MAX_RETRY_AFTER_S),
        ({"Retry-After": "Fri, 31 Dec 9999 23:59:59 GMT"}, constants.MAX_RETRY_AFTER_S),
        ({"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}, 0.0),  # in the past: now
        ({"Retry-After": "NaN"}, None),
        ({"Retry-After": "-3"}, None),
        ({"retry-after-ms": "nan"}, None),
        ({"retry-after-ms": "-5", "Retry-After": "2"}, 2.0),
        ({"retry-after-ms": "soon", "Retry-After": "2"}, 2.0),
        ({"Retry-After": "Fri, 99 Foo 99999 99:99:99 GMT"}, None),
        ({"Retry-After": "x" * 100_000}, None),
    ],
)
def test_retry_after_is_capped_and_garbage_is_ignored(
    headers: dict[str, str], expected: float | None
) -> None:
    assert errors.parse_retry_after(headers) == expected


async def test_a_429_asking_for_days_is_capped_on_the_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        err = {"message": "slow down", "code": "RATE_LIMITED"}
        return httpx.Response(429, json={"error": err}, headers={"Retry-After": "999999"})

    async with make_client(handler) as client:
        with pytest.raises(errors.RateLimitError) as info:
            await client.edit(request_with())
    assert info.value.retry_after == constants.MAX_RETRY_AFTER_S


@pytest.mark.parametrize(
    "literal", ["-1", "NaN", "1e999", "true", '"10000"', "1000000000000", "null"]
)
async def test_an_unusable_dry_run_estimate_is_refused(literal: str) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        content = '{"estimated": true, "total_cost_micros": ' + literal + ', "currency": "USD"}'
        return httpx.Response(200, content=content, headers={"content-type": "application/json"})

    async with make_client(handler) as client:
        with pytest.raises(errors.APIResponseError, match="cannot use") as info:
            await client.estimate(request_with())
    assert not info.value.retryable and not info.value.may_have_charged


async def test_dry_run_texts_and_components_are_capped() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        body = {
            "total_cost_micros": 10000,
            "currency": "U" * 1000,
            "model": "m" * 1000,
            "components": [{"type": "output", "note": "n" * 100_000}] * 1000,
        }
        return httpx.Response(200, json=body)

    async with make_client(handler) as client:
        est = await client.estimate(request_with())
    assert est.total_cost_micros == 10000
    assert len(est.currency) == len(est.model or "") == constants.MAX_API_SHORT_TEXT_CHARS
    assert 0 < len(est.components) < 1000
    assert len(json.dumps(est.components)) <= constants.MAX_METADATA_JSON_CHARS
