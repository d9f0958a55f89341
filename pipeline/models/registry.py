"""Which model a run uses, and the profile known for it without asking the gateway."""

from __future__ import annotations

import os

from pipeline import spec
from pipeline.models.builtin import BUILTIN, P_IMAGE_EDIT
from pipeline.models.profile import ModelProfile

ENV_MODEL = "IMGEDIT_MODEL"
DEFAULT_PROFILE = P_IMAGE_EDIT


def run_model(model: str | None = None) -> str:
    """The argument, else IMGEDIT_MODEL, else p-image-edit."""
    return model or os.environ.get(ENV_MODEL) or spec.DEFAULT_MODEL


def builtin_profile(model: str) -> ModelProfile | None:
    return BUILTIN.get(model)


def builtin_models() -> list[str]:
    return list(BUILTIN)
