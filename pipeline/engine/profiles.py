"""The run's model profile, resolved once per run: built in, else read from the gateway's
`GET /models/{id}?schema=true`, else a permissive guess that says so in the run's log."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

import httpx

from pipeline.engine.client import EditClient
from pipeline.errors import APIError, ConfigError
from pipeline.io.redact import redact_text
from pipeline.models.profile import ModelProfile
from pipeline.models.registry import builtin_profile, run_model
from pipeline.models.schema import permissive_profile, profile_from_schema

log = logging.getLogger(__name__)

T = TypeVar("T")


def _client(base_url: str | None, transport: httpx.AsyncBaseTransport | None) -> EditClient:
    return EditClient(base_url=base_url, transport=transport, max_connections=1)


async def aload_profile(
    model: str | None,
    *,
    base_url: str | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> ModelProfile:
    """The profile of `model` (None: IMGEDIT_MODEL, else p-image-edit); never raises for a
    schema that cannot be read: the permissive profile then says why in its note."""
    name = run_model(model)
    known = builtin_profile(name)
    if known is not None:
        return known
    try:
        async with _client(base_url, transport) as client:
            doc = await client.get_model(name, schema=True)
    except (APIError, ConfigError, ValueError) as exc:
        reason = f"its schema could not be read: {redact_text(str(exc))[:300]}"
        profile = permissive_profile(name, reason)
    else:
        profile = profile_from_schema(name, doc)
    if profile.note:
        log.warning("model %s: %s profile, %s", name, profile.origin, profile.note)
    else:
        log.info("model %s: profile read from the gateway's schema", name)
    return profile


async def alist_profiles(
    *, base_url: str | None = None, transport: httpx.AsyncBaseTransport | None = None
) -> list[ModelProfile]:
    """Every model the API lists (`GET /models?schema=true`), each with its profile: the
    built-in one when there is one, else what its schema says."""
    async with _client(base_url, transport) as client:
        listed = await client.list_models(schema=True)
    profiles: list[ModelProfile] = []
    for doc in listed:
        model_id = doc.get("id")
        if not isinstance(model_id, str) or not model_id or len(model_id) > 200:
            continue
        profiles.append(builtin_profile(model_id) or profile_from_schema(model_id, doc))
    return profiles


def blocking(start: Coroutine[Any, Any, T]) -> T:
    """Runs `start` to its end in a thread of its own (with its own event loop), so it works
    whether or not the caller's thread runs a loop already."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = asyncio.run(start)
        except BaseException as exc:  # handed to the caller
            box["error"] = exc

    thread = threading.Thread(target=target, name="imgedit-profile")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]  # type: ignore[no-any-return]


def load_profile(
    model: str | None,
    *,
    base_url: str | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> ModelProfile:
    """`aload_profile` for callers without an event loop (or inside one: it runs apart)."""
    name = run_model(model)
    known = builtin_profile(name)
    if known is not None:
        return known
    return blocking(aload_profile(name, base_url=base_url, transport=transport))


def list_profiles(*, base_url: str | None = None) -> list[ModelProfile]:
    return blocking(alist_profiles(base_url=base_url))
