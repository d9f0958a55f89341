"""The deployment wiring, checked statically (no container engine here), and the model's
precedence: a run's own model, else the worker's IMGEDIT_MODEL, else p-image-edit."""

from __future__ import annotations

import ast
import glob
import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from flows.settings import RunSettings
from pipeline import spec
from pipeline.emulator.process import EmulatorProcess
from pipeline.engine.options import RunOptions
from pipeline.engine.run import run_manifest

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
COMPOSE = yaml.safe_load((INFRA / "compose.yaml").read_text())
COMPOSE_TEXT = (INFRA / "compose.yaml").read_text()
ENV_EXAMPLE = (INFRA / ".env.example").read_text()
SETUP = INFRA / "setup.sh"

# `${VAR}`, `${VAR:-default}`, `${VAR-default}`, `${VAR:?error}`... (`$$` escapes a dollar).
_INTERPOLATION_RE = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])[^}]*)?\}")
# `VAR=...` or `# VAR=...` lines of .env.example.
_ENV_LINE_RE = re.compile(r"^\s*#?\s*([A-Z][A-Z0-9_]*)=", re.MULTILINE)


# --- the worker image ---------------------------------------------------------------------


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order: comments dropped, continuation lines joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, args = line.partition(" ")
        out.append((keyword.upper(), args.strip()))
    assert not pending, f"{path} ends in a continuation line"
    return out


def copy_operands(args: str) -> tuple[list[str], str]:
    """The sources and destination of a COPY/ADD (flags such as --chown dropped)."""
    words = json.loads(args) if args.startswith("[") else shlex.split(args)
    assert isinstance(words, list)
    operands = [w for w in words if not w.startswith("--")]
    assert len(operands) >= 2, f"COPY/ADD without a source and destination: {args}"
    return operands[:-1], operands[-1]


class Image:
    """The files a Dockerfile's COPY instructions put into the image, by absolute path."""

    def __init__(self, dockerfile: Path, context: Path) -> None:
        self.context = context
        self.workdir = PurePosixPath("/")
        self.files: set[PurePosixPath] = set()
        self.sources: list[str] = []
        self.env: set[str] = set()
        for keyword, args in dockerfile_instructions(dockerfile):
            if keyword == "WORKDIR":
                self.workdir = self.workdir / args
            elif keyword == "ENV":
                self.env.update(m.group(1) for m in re.finditer(r"([A-Za-z_]\w*)=", args))
            elif keyword in ("COPY", "ADD"):
                assert "--from" not in args, "multi-stage COPY: teach this test about stages"
                sources, dest = copy_operands(args)
                self.sources.extend(sources)
                for source in sources:
                    self._copy(source, dest)

    def _copy(self, source: str, dest: str) -> None:
        target = self.workdir / dest
        matches = sorted(glob.glob(str(self.context / source)))
        for match in matches:
            found = Path(match)
            if found.is_dir():
                for file in found.rglob("*"):
                    if file.is_file():
                        self.files.add(target / file.relative_to(found).as_posix())
            elif dest.endswith("/") or len(matches) > 1 or source.endswith("/"):
                self.files.add(target / found.name)
            else:
                self.files.add(target)

    def has(self, path: str) -> bool:
        return (self.workdir / path) in self.files


def built_services() -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in COMPOSE["services"].items() if "build" in svc}


def image_of(service: dict[str, Any]) -> Image:
    build = service["build"]
    context = (INFRA / build["context"]).resolve()
    return Image(context / build.get("dockerfile", "Dockerfile"), context)


def test_every_built_service_builds_from_the_project_root() -> None:
    assert built_services(), "no service builds the worker image"
    for name, service in built_services().items():
        build = service["build"]
        assert (INFRA / build["context"]).resolve() == ROOT, name
        assert (ROOT / build["dockerfile"]).is_file(), name


def test_every_copy_source_exists_in_the_build_context() -> None:
    for name, service in built_services().items():
        image = image_of(service)
        assert image.sources, f"{name}: the Dockerfile copies nothing"
        for source in image.sources:
            assert glob.glob(str(image.context / source)), f"{name}: COPY {source} is missing"


def command_words(service: dict[str, Any]) -> list[str]:
    parts: list[str] = []
    for key in ("entrypoint", "command"):
        value = service.get(key)
        if isinstance(value, str):
            parts += shlex.split(value)
        elif isinstance(value, list):
            parts += [str(v) for v in value]
    return parts


def test_every_path_a_service_runs_is_in_its_image() -> None:
    checked = []
    for name, service in built_services().items():
        image = image_of(service)
        for word in command_words(service):
            # A word naming a file of the project (`infra/setup.sh`), relative to WORKDIR.
            if word.startswith("-") or "://" in word or "/" not in word:
                continue
            if not (ROOT / word).is_file():
                continue
            assert image.has(word), f"{name} runs {word}, which its image does not copy"
            checked.append(word)
    assert "infra/setup.sh" in checked


def test_prefect_yaml_entrypoints_exist_and_are_in_the_image() -> None:
    deployments = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
    image = image_of(COMPOSE["services"]["worker"])
    assert image.has("prefect.yaml")
    for deployment in deployments:
        path, _, func = deployment["entrypoint"].partition(":")
        file = ROOT / path
        assert file.is_file(), f"{deployment['name']}: {path} does not exist"
        tree = ast.parse(file.read_text())
        defined = {
            node.name
            for node in tree.body
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        }
        assert func in defined, f"{deployment['name']}: {path} defines no {func}"
        assert image.has(path), f"{deployment['name']}: {path} is not in the worker image"


# --- infra/setup.sh -----------------------------------------------------------------------


def test_setup_script_is_executable_and_parses() -> None:
    assert os.access(SETUP, os.X_OK), "infra/setup.sh is not executable"
    sh = shutil.which("sh")
    assert sh, "no sh"
    result = subprocess.run([sh, "-n", str(SETUP)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    git = shutil.which("git")
    if git and (ROOT / ".git").exists():
        # A fresh clone gets its mode from the index, not from this working tree.
        staged = subprocess.run(
            [git, "ls-files", "-s", "infra/setup.sh"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        if staged:
            assert staged.startswith("100755"), f"infra/setup.sh is not executable in git: {staged}"


def service_environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        pairs = (item.partition("=") for item in env)
        return {k: v for k, _, v in pairs}
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def test_setup_service_gets_every_variable_setup_sh_reads() -> None:
    read = set(re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", SETUP.read_text()))
    assert {"IMGEDIT_API_LIMIT", "IMGEDIT_API_RPM", "IMGEDIT_HOME"} <= read
    setup = COMPOSE["services"]["setup"]
    given = set(service_environment(setup)) | image_of(setup).env
    assert read <= given, f"infra/setup.sh reads {sorted(read - given)}, which setup lacks"


# --- .env.example and compose interpolation -----------------------------------------------


def test_every_env_example_variable_reaches_a_service() -> None:
    documented = _ENV_LINE_RE.findall(ENV_EXAMPLE)
    assert "IMGEDIT_API_LIMIT" in documented and "IMGEDIT_API_RPM" in documented
    passed: dict[str, list[str]] = {}
    for name, service in COMPOSE["services"].items():
        for value in service_environment(service).values():
            for var in _INTERPOLATION_RE.findall(value):
                passed.setdefault(var[0], []).append(name)
    missing = [var for var in documented if var not in passed]
    assert not missing, f".env.example documents {missing}, which no service's environment uses"


def test_every_compose_variable_is_documented_or_defaulted() -> None:
    documented = set(_ENV_LINE_RE.findall(ENV_EXAMPLE))
    used = _INTERPOLATION_RE.findall(COMPOSE_TEXT)
    assert used
    bare = sorted({var for var, op in used if op not in ("-", ":-") and var not in documented})
    assert not bare, f"compose.yaml uses {bare} with no default and .env.example lacks them"


def test_an_empty_s3_endpoint_means_aws_as_documented() -> None:
    # `${VAR:-x}` would turn the documented `AWS_ENDPOINT_URL_S3=` (AWS) back into MinIO.
    assert "# AWS_ENDPOINT_URL_S3=  " in ENV_EXAMPLE
    env = service_environment(COMPOSE["services"]["worker"])
    assert env["AWS_ENDPOINT_URL_S3"].startswith("${AWS_ENDPOINT_URL_S3-")


# --- the model: argument > IMGEDIT_MODEL > p-image-edit -------------------------------------


def test_run_settings_leave_the_model_to_the_worker() -> None:
    assert RunSettings().flow_kwargs()["model"] is None
    assert RunSettings(model="m").flow_kwargs()["model"] == "m"
    description = RunSettings.model_fields["model"].description or ""
    assert "IMGEDIT_MODEL" in description


def test_edit_manifest_flow_leaves_the_model_to_the_worker() -> None:
    from prefect.utilities.callables import parameter_schema_from_entrypoint

    schema = parameter_schema_from_entrypoint(
        f"{ROOT / 'flows/edit_manifest.py'}:edit_manifest"
    ).model_dump()
    model = schema["properties"]["model"]
    assert model.get("default") is None
    assert "IMGEDIT_MODEL" in model["description"]


@pytest.mark.integration
async def test_model_argument_beats_imgedit_model_beats_the_default(
    tmp_path: Path,
    sources: dict[str, Path],
    emulator: EmulatorProcess,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"image,prompt\n{sources['square.png']},make it blue\n")
    emulator.configure(models=[spec.DEFAULT_MODEL, "other-model"])

    async def sent_model(model: str | None, out: str) -> str:
        emulator.reset()
        summary = await run_manifest(
            RunOptions(
                manifest=str(manifest),
                output=str(tmp_path / out),
                api_base=emulator.base_url,
                model=model,
            )
        )
        assert summary.by_status.get("succeeded") == 1, summary.by_status
        [request] = emulator.requests()
        return str(request["fields"]["model"])

    try:
        monkeypatch.delenv("IMGEDIT_MODEL", raising=False)
        assert await sent_model(None, "default") == spec.DEFAULT_MODEL
        monkeypatch.setenv("IMGEDIT_MODEL", "other-model")
        assert await sent_model(None, "env") == "other-model"
        assert await sent_model(spec.DEFAULT_MODEL, "argument") == spec.DEFAULT_MODEL
    finally:
        emulator.configure(models=[spec.DEFAULT_MODEL])
