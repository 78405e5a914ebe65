"""deploy/kubernetes/, checked without a cluster: rendered, validated against schemas, read for what
schemas cannot see, and the probes it points at exercised on a real process.

No cluster, no kubelet, no KEDA runs here (docs/kubernetes.md says what that leaves unproven).
Checked: `kubectl kustomize` renders the base, the example overlay, and the overlay with both
components; every core object validates strictly (kubernetes-validate) for each Kubernetes version
in SUPPORTED_KUBERNETES; the ScaledObject and TriggerAuthentication against JSON Schemas made here
from KEDA 2.16.1's vendored CRD files (check-jsonschema, deploy/kubernetes/schemas/); the scaler's
metadata, the grace period
against --stop-timeout, the probes, the security settings, the IAM policy against the calls the
code makes; the container's environment and arguments through the ETL's own configuration check.
Locally a missing tool skips a test; under CI=true it fails it.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from cli.exit_codes import EXIT_BUSY, EXIT_CONFIG
from cli.parser import build_parser
from config import ConfigError, Settings, database_url_from_env
from helpers import login, send
from kube import DEPLOY, container, expanded_args, kubectl, kustomize, one, pod_template, resolved_env, tool
from pii.masking import Masker, generate_key
from proxy import TcpProxy

ROOT = Path(__file__).resolve().parents[2]
SCHEMAS = DEPLOY / "schemas" / "keda-2.16.1"
# The CRD file (vendored unmodified from KEDA's chart, see its README) of each KEDA kind we use.
CRD_FILES = {"ScaledObject": "crd-scaledobjects.yaml", "TriggerAuthentication": "crd-triggerauthentications.yaml"}
# The Kubernetes minor versions the manifests are validated for (kubernetes-validate 1.37.0 ships
# schemas for 1.25 to 1.37). 1.30 is the oldest still in EKS standard support at the time of writing.
SUPPORTED_KUBERNETES = [f"1.{minor}" for minor in range(30, 38)]
DATABASE_URL = "postgresql://etl:secret@login-db.example.internal:5432/logins?sslmode=verify-full"
# Measured peak RSS of one ETL process (bench/run.py --rss, bench/replicas.py): flat at 66-67 MB.
MEASURED_PEAK_RSS_MB = 67
# The probe paths observability.Metrics serves from memory (no PostgreSQL, no SQS).
PROBE_PATHS = {"/livez", "/readyz"}
# The SQS and KMS operations the ETL's code calls, as IAM actions (batch calls share the action).
# boto3 client method -> the IAM action it needs (batch calls need the single-message action).
IAM_ACTION_OF = {
    "get_queue_attributes": "sqs:GetQueueAttributes",
    "receive_message": "sqs:ReceiveMessage",
    "delete_message_batch": "sqs:DeleteMessage",
    "change_message_visibility_batch": "sqs:ChangeMessageVisibility",
    "decrypt": "kms:Decrypt",
}


def schemas_module() -> Any:
    """deploy/kubernetes/schemas/to_jsonschema.py, which makes JSON Schemas from KEDA's CRD files."""
    spec = importlib.util.spec_from_file_location("to_jsonschema", DEPLOY / "schemas" / "to_jsonschema.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def keda_schema(kind: str) -> dict[str, Any]:
    """The JSON Schema of a KEDA kind, made now from its vendored CRD file."""
    schema: dict[str, Any] = schemas_module().schema_of(SCHEMAS / CRD_FILES[kind])
    return schema


def check_jsonschema(kind: str, docs: list[dict[str, Any]], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """check-jsonschema on `docs` against the schema of `kind`, both written to tmp_path."""
    schema = tmp_path / f"{kind}.schema.json"
    schema.write_text(json.dumps(keda_schema(kind)))
    files = []
    for n, doc in enumerate(docs):
        files.append(tmp_path / f"{kind}-{n}.json")
        files[-1].write_text(json.dumps(doc))
    return subprocess.run(
        [tool("check-jsonschema"), "--schemafile", str(schema), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture(scope="module")
def example() -> list[dict[str, Any]]:
    return kustomize(DEPLOY / "overlays" / "example")


@pytest.fixture(scope="module")
def with_components(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """The example overlay with both components enabled, as a user would enable them (a copy)."""
    copy = tmp_path_factory.mktemp("deploy") / "kubernetes"
    shutil.copytree(DEPLOY, copy)
    overlay = copy / "overlays" / "example" / "kustomization.yaml"
    text = overlay.read_text()
    assert "  # - ../../components/key-file\n" in text
    overlay.write_text(
        text.replace(
            "  # - ../../components/key-file\n", "  - ../../components/rekey-job\n  - ../../components/key-file\n"
        )
    )
    return kustomize(copy / "overlays" / "example")


# -- rendering and schemas ------------------------------------------------------------------------


def test_the_base_the_overlay_and_the_components_render(example, with_components) -> None:
    path, client, embedded = kubectl()
    print(f"rendered by {path}: kubectl {client}, kustomize {embedded}")  # shown with -rA or -s
    base = kustomize(DEPLOY / "base")
    kinds = [
        "ConfigMap",
        "ConfigMap",
        "Deployment",
        "NetworkPolicy",
        "PodDisruptionBudget",
        "ScaledObject",
        "ServiceAccount",
        "TriggerAuthentication",
    ]
    assert sorted(d["kind"] for d in base) == kinds
    assert sorted(d["kind"] for d in example) == sorted([*kinds, "Namespace", "CronJob", "ServiceAccount"])
    assert sorted(d["kind"] for d in with_components) == sorted(
        [
            "ConfigMap",
            "CronJob",
            "Deployment",
            "Job",
            "Namespace",
            "NetworkPolicy",
            "PodDisruptionBudget",
            "ScaledObject",
            "ServiceAccount",
            "ServiceAccount",
            "TriggerAuthentication",
        ]
    )  # the wrapped-key ConfigMap is gone with the key file; the snapshot's own ServiceAccount
    assert {d["metadata"].get("namespace") for d in example if d["kind"] != "Namespace"} == {"login-etl"}


@pytest.mark.parametrize("version", SUPPORTED_KUBERNETES)
def test_every_core_object_is_valid_for_each_supported_kubernetes_version(example, with_components, version) -> None:
    import kubernetes_validate

    unique = {json.dumps(d, sort_keys=True): d for d in example + with_components}  # once each
    objects = [d for d in unique.values() if not d["apiVersion"].startswith("keda.sh/")]
    assert {d["kind"] for d in objects} == {
        "Namespace",
        "ServiceAccount",
        "ConfigMap",
        "Deployment",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "Job",
        "CronJob",
    }
    for doc in objects:
        kubernetes_validate.validate(doc, version, strict=True)  # raises ValidationError with the path


def test_strict_validation_refuses_an_unknown_field(example) -> None:
    """The check above can fail: a misspelt field of the Deployment is an error, not ignored."""
    import kubernetes_validate

    deployment = json.loads(json.dumps(one(example, "Deployment")))
    deployment["spec"]["template"]["spec"]["terminationGracePeriod"] = 45
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, SUPPORTED_KUBERNETES[-1], strict=True)


def test_keda_objects_match_kedas_crd_schemas_and_bad_ones_do_not(example, with_components, tmp_path) -> None:
    for kind in CRD_FILES:
        result = check_jsonschema(kind, [one(example, kind), one(with_components, kind)], tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr
    bad = json.loads(json.dumps(one(example, "ScaledObject")))
    bad["spec"]["maxReplicas"] = 4  # not a field of ScaledObjectSpec (maxReplicaCount is)
    bad["spec"]["triggers"][0]["metadata"]["queueLength"] = 5000  # metadata values are strings
    result = check_jsonschema("ScaledObject", [bad], tmp_path)
    assert result.returncode == 1 and "maxReplicas" in result.stdout and "queueLength" in result.stdout, result.stdout
    bad = json.loads(json.dumps(one(example, "TriggerAuthentication")))
    bad["spec"]["podIdentity"]["provider"] = "aws-kiam"  # in KEDA 2.13's enum, gone by 2.16
    bad["spec"]["podIdentity"]["roleARN"] = "arn:aws:iam::123456789012:role/x"  # roleArn is the field
    result = check_jsonschema("TriggerAuthentication", [bad], tmp_path)
    assert result.returncode == 1 and "aws-kiam" in result.stdout and "roleARN" in result.stdout, result.stdout
    cluster = {**one(example, "TriggerAuthentication"), "kind": "ClusterTriggerAuthentication"}
    result = check_jsonschema("TriggerAuthentication", [cluster], tmp_path)
    assert result.returncode == 1 and "$.kind: 'TriggerAuthentication' was expected" in result.stdout, result.stdout


def test_the_vendored_crds_define_the_namespaced_kinds_and_share_kedas_216_spec() -> None:
    """The TriggerAuthentication CRD is the namespaced one, and its spec is KEDA 2.16.1's: the same
    Go type as the ClusterTriggerAuthentication of the chart's 2.16.1 commit (schemas/README.md)."""
    to_jsonschema = schemas_module()
    crds = {kind: to_jsonschema.crd_of(SCHEMAS / name) for kind, name in CRD_FILES.items()}
    for kind, crd in crds.items():
        assert (crd["spec"]["names"]["kind"], crd["spec"]["scope"], crd["spec"]["group"]) == (
            kind,
            "Namespaced",
            "keda.sh",
        )
    cluster = to_jsonschema.crd_of(SCHEMAS / "crd-clustertriggerauthentications.yaml")
    assert (cluster["spec"]["names"]["kind"], cluster["spec"]["scope"]) == ("ClusterTriggerAuthentication", "Cluster")
    namespaced = to_jsonschema.openapi_schema(crds["TriggerAuthentication"])
    assert namespaced["properties"]["spec"] == to_jsonschema.openapi_schema(cluster)["properties"]["spec"]
    # Descriptions are kept: the files are KEDA's, not a hand-made digest of them.
    assert "description" in to_jsonschema.openapi_schema(crds["ScaledObject"])["properties"]["spec"]


# -- what the schemas cannot see ------------------------------------------------------------------


def test_the_scaler_watches_the_queue_the_etl_consumes_with_string_metadata(example) -> None:
    scaled, auth = one(example, "ScaledObject"), one(example, "TriggerAuthentication")
    [trigger] = scaled["spec"]["triggers"]
    metadata = trigger["metadata"]
    assert trigger["type"] == "aws-sqs-queue"
    assert {"queueURL", "awsRegion", "queueLength", "activationQueueLength", "scaleOnInFlight"} <= metadata.keys()
    assert all(isinstance(value, str) for value in metadata.values())
    assert metadata["scaleOnInFlight"] == "true" and "identityOwner" not in metadata  # deprecated there
    assert int(metadata["queueLength"]) > 0 and int(metadata["activationQueueLength"]) >= 0
    env = resolved_env(example, one(example, "Deployment"), {("login-etl-database", "url"): DATABASE_URL})
    assert metadata["queueURL"] == env["SQS_QUEUE_URL"]
    assert metadata["awsRegion"] == env["AWS_REGION"] == urlsplit(metadata["queueURL"]).hostname.split(".")[1]
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    assert auth["spec"]["podIdentity"]["provider"] == "aws" and "identityOwner" not in auth["spec"]["podIdentity"]
    assert auth["spec"]["podIdentity"]["roleArn"].startswith("arn:aws:iam::")
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] == one(example, "Deployment")["metadata"]["name"]
    assert spec["minReplicaCount"] == 0 < spec["maxReplicaCount"] and spec["cooldownPeriod"] > 0
    assert "replicas" not in one(example, "Deployment")["spec"], "KEDA owns the replica count"


def test_queue_length_exceeds_what_one_busy_replica_holds_in_flight(example) -> None:
    """With scaleOnInFlight a replica's own messages count: below this, one busy replica would look
    like work for two. The ceiling follows the loop's bounds (etl/pipeline.py) for the configured flags."""
    deployment = one(example, "Deployment")
    env = resolved_env(example, deployment, {("login-etl-database", "url"): DATABASE_URL})
    args = build_parser().parse_args(expanded_args(container(deployment), env))
    inbox_messages = max(4, 2 * args.batch_size // 10) * 10  # Pipeline._inbox, prepared receives of 10
    deleting = max(2, 2 * args.batch_size // 10) * 10  # Pipeline's delete slots (max_calls of its Deleters)
    receiving = args.receivers * 10
    ceiling = inbox_messages + args.batch_size + deleting + receiving
    queue_length = int(one(example, "ScaledObject")["spec"]["triggers"][0]["metadata"]["queueLength"])
    assert queue_length >= ceiling, (queue_length, ceiling)


def test_the_grace_period_outlasts_the_stop_timeout(example, with_components) -> None:
    for docs in (example, with_components):
        deployment = one(docs, "Deployment")
        env = resolved_env(
            docs,
            deployment,
            {("login-etl-database", "url"): DATABASE_URL, ("login-etl-masking-key-file", "masking_key"): ""},
        )
        args = build_parser().parse_args(expanded_args(container(deployment), env))
        grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        # After the stop timeout the process still closes its connection and exits; the receivers'
        # long poll (5 s in --follow) ends first. 10 s of margin covers both.
        assert args.follow and grace >= args.stop_timeout + 10, (grace, args.stop_timeout)


def test_the_probes_ask_the_etl_over_http_only_what_it_answers_from_memory(example) -> None:
    deployment = one(example, "Deployment")
    etl = container(deployment)
    env = resolved_env(example, deployment, {("login-etl-database", "url"): DATABASE_URL})
    args = build_parser().parse_args(expanded_args(etl, env))
    ports = {p["name"]: p["containerPort"] for p in etl["ports"]}
    assert ports["metrics"] == args.metrics_port
    for name, path in (("livenessProbe", "/livez"), ("readinessProbe", "/readyz")):
        probe = etl[name]
        # No exec probe: `python main.py check` would connect to PostgreSQL and SQS, and fail in an outage.
        assert set(probe) & {"exec", "tcpSocket", "grpc"} == set(), probe
        assert probe["httpGet"]["path"] == path and path in PROBE_PATHS
        assert probe["httpGet"]["port"] in ("metrics", args.metrics_port)
        assert probe["timeoutSeconds"] >= 2 and probe["failureThreshold"] >= 2
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(args.metrics_port)


def test_the_pod_runs_locked_down_as_the_images_user(example, with_components) -> None:
    uid = re.search(r"^USER (\d+):(\d+)$", (ROOT / "Dockerfile").read_text(), re.M)
    assert uid is not None
    for docs in (example, with_components):
        for workload in [d for d in docs if d["kind"] in ("Deployment", "Job", "CronJob")]:
            pod = pod_template(workload)["spec"]
            context = pod["securityContext"]
            assert context["runAsNonRoot"] is True and context["seccompProfile"]["type"] == "RuntimeDefault"
            assert (context["runAsUser"], context["runAsGroup"]) == (int(uid.group(1)), int(uid.group(2)))
            assert context["fsGroup"] == context["runAsGroup"]
            account = "login-etl-snapshot" if workload["kind"] == "CronJob" else "login-etl"
            assert pod["automountServiceAccountToken"] is False and pod["serviceAccountName"] == account
            etl = container(workload)
            assert etl["securityContext"] == {
                "allowPrivilegeEscalation": False,
                "readOnlyRootFilesystem": True,
                "privileged": False,
                "capabilities": {"drop": ["ALL"]},
            }
            memory = etl["resources"]["limits"]["memory"]
            assert memory.endswith("Mi") and int(memory[:-2]) >= 2 * MEASURED_PEAK_RSS_MB
            assert etl["resources"]["requests"]["cpu"] and etl["resources"]["requests"]["memory"]


def test_only_the_scraper_reaches_the_metrics_port_of_the_etls_pods(example) -> None:
    deployment = one(example, "Deployment")
    policy = one(example, "NetworkPolicy")["spec"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    # GIVEN the policy: it selects the ETL's pods, and governs their ingress
    assert policy["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert policy["policyTypes"] == ["Ingress"]
    # THEN one rule: from pods named prometheus in the monitoring namespace, to the metrics port only
    [rule] = policy["ingress"]
    [source] = rule["from"]
    assert source["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}
    assert source["podSelector"] == {
        "matchExpressions": [{"key": "app.kubernetes.io/name", "operator": "In", "values": ["prometheus"]}]
    }  # not widened (nor emptied) by the kustomization's labels
    [port] = container(deployment)["ports"]
    assert rule["ports"] == [{"port": port["name"], "protocol": "TCP"}]
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(port["containerPort"])
    assert f"--metrics-port={port['containerPort']}" in container(deployment)["args"]


def test_the_disruption_budget_covers_the_pods_and_the_service_account_has_a_role(example) -> None:
    pdb, deployment = one(example, "PodDisruptionBudget"), one(example, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["maxUnavailable"] == 1
    [account] = [d for d in example if d["kind"] == "ServiceAccount" and d["metadata"]["name"] == "login-etl"]
    assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")


def test_the_iam_policy_grants_exactly_the_calls_the_code_makes() -> None:
    # Every method used on the SQS client (`self.client.<method>`, a KeyError if one is not in the
    # table) and KMS Decrypt; GenerateDataKey is `keygen`'s, run by an operator, not by the ETL.
    # The hot calls go through `_call`, by either transport: the boto3 method names of `_METHOD_NAMES`.
    called: set[str] = set()
    for node in ast.walk(ast.parse((ROOT / "aws" / "sqs.py").read_text())):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "client":
            called.add(IAM_ACTION_OF[node.attr])
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "_METHOD_NAMES" for t in node.targets):
            assert isinstance(node.value, ast.Dict)
            called.update(IAM_ACTION_OF[ast.literal_eval(value)] for value in node.value.values)
    for node in ast.walk(ast.parse((ROOT / "pii" / "keys.py").read_text())):
        if isinstance(node, ast.Attribute) and node.attr == "decrypt":
            called.add(IAM_ACTION_OF["decrypt"])
    assert len(called) == 5, called
    policy = json.loads((DEPLOY / "aws" / "etl-policy.json").read_text())
    granted: set[str] = set()
    for statement in policy["Statement"]:
        assert statement["Effect"] == "Allow" and "*" not in json.dumps(statement["Resource"])
        actions = statement["Action"]
        granted.update([actions] if isinstance(actions, str) else actions)
    assert granted == called
    [kms] = [s for s in policy["Statement"] if s["Action"] == "kms:Decrypt"]
    assert kms["Condition"]["StringEquals"] == {"kms:EncryptionContext:purpose": "login-etl-masking-key"}
    scaler = json.loads((DEPLOY / "aws" / "keda-scaler-policy.json").read_text())
    assert [s["Action"] for s in scaler["Statement"]] == ["sqs:GetQueueAttributes"]


# -- the app's own configuration check on what the Deployment gives it -----------------------------


def test_the_deployments_environment_and_arguments_pass_the_etls_configuration_check(example) -> None:
    deployment = one(example, "Deployment")
    env = resolved_env(example, deployment, {("login-etl-database", "url"): DATABASE_URL})
    settings = Settings.from_env(env)  # raises ConfigError with the reason
    assert settings.database_url == DATABASE_URL  # from the Secret mounted as a file (DATABASE_URL_FILE)
    assert "DATABASE_URL" not in env and not [v for v in env.values() if "secret@" in v]  # not in the environment
    assert settings.key_source.origin == "MASKING_KEY_KMS_CIPHERTEXT" and settings.key_version == 1
    assert settings.queue_url == env["SQS_QUEUE_URL"] and settings.endpoint_url is None  # real AWS
    assert settings.region == "eu-west-1"
    words = expanded_args(container(deployment), env)
    assert not [w for w in words if "$(" in w], "an argument names a variable the container does not have"
    args = build_parser().parse_args(words)
    assert (args.follow, args.command, args.receivers, args.batch_size) == (True, None, 8, 1000)


def test_the_base_alone_is_refused_by_the_same_check() -> None:
    """The check above can fail: the base has no wrapped key, and the ETL says so instead of starting."""
    base = kustomize(DEPLOY / "base")
    env = resolved_env(base, one(base, "Deployment"), {("login-etl-database", "url"): DATABASE_URL})
    with pytest.raises(ConfigError, match="MASKING_KEY is not set"):
        Settings.from_env(env)


def test_the_key_file_variant_loads_the_key_from_the_mounted_secret(with_components, tmp_path) -> None:
    for kind in ("Deployment", "Job"):
        workload = one(with_components, kind)
        pod = workload["spec"]["template"]["spec"]
        [volume] = [v for v in pod["volumes"] if v.get("secret", {}).get("secretName") == "login-etl-masking-key-file"]
        [mount] = [m for m in container(workload)["volumeMounts"] if m["name"] == volume["name"]]
        assert volume["secret"]["defaultMode"] == 0o400 and mount["readOnly"] is True
        # The kubelet writes the Secret here; stand in for it with a key file of the same mode.
        key = generate_key()
        mounted = tmp_path / kind / volume["secret"]["secretName"]
        mounted.mkdir(parents=True)
        (mounted / "masking_key").write_text(key + "\n")
        (mounted / "masking_key").chmod(0o400)
        env = resolved_env(with_components, workload, {("login-etl-database", "url"): DATABASE_URL})
        assert "MASKING_KEY_KMS_CIPHERTEXT" not in env
        path = env["MASKING_KEY_FILE"]
        assert path.startswith(mount["mountPath"] + "/")
        env["MASKING_KEY_FILE"] = str(mounted / path[len(mount["mountPath"]) + 1 :])
        settings = Settings.from_env(env)
        masker = Masker.from_keys(settings.key_source.load(), active=settings.key_version)
        assert masker.unmask(masker.mask("ip", "203.0.113.5")) == "203.0.113.5"
    job = container(one(with_components, "Job"))
    assert job["command"][-1] == "rekey"


def test_the_snapshot_cronjob_refreshes_nightly_one_at_a_time_with_the_database_url_only(
    example, with_components
) -> None:
    deployment_image = container(one(example, "Deployment"))["image"]
    for docs in (example, with_components):
        cronjob = one(docs, "CronJob")
        spec = cronjob["spec"]
        assert spec["concurrencyPolicy"] == "Forbid" and spec["timeZone"] == "Etc/UTC"
        minute, hour, *every_day = spec["schedule"].split()
        assert every_day == ["*", "*", "*"] and minute.isdigit() and hour.isdigit()  # once a night
        etl = container(cronjob)
        assert etl["image"] == deployment_image  # the overlay's image reaches the CronJob too
        env = resolved_env(docs, cronjob, {("login-etl-database", "url"): DATABASE_URL})
        assert list(env) == ["DATABASE_URL_FILE"]  # no masking key: the refresh needs none
        assert database_url_from_env(env) == DATABASE_URL  # the Secret, mounted as a file
        args = build_parser().parse_args(expanded_args(etl, env))
        assert args.command == "snapshot"
        job = spec["jobTemplate"]["spec"]
        assert pod_template(cronjob)["spec"]["restartPolicy"] == "Never"
        [rule] = job["podFailurePolicy"]["rules"]
        assert rule["action"] == "FailJob" and set(rule["onExitCodes"]["values"]) == {EXIT_CONFIG, EXIT_BUSY}


def test_every_job_and_cronjob_has_a_deadline_below_its_schedule(with_components) -> None:
    jobs = {d["metadata"]["name"]: d for d in with_components if d["kind"] in ("Job", "CronJob")}
    assert set(jobs) == {"login-etl-rekey", "login-etl-snapshot"}
    for name, workload in jobs.items():
        spec = workload["spec"]["jobTemplate"]["spec"] if workload["kind"] == "CronJob" else workload["spec"]
        assert 0 < spec["activeDeadlineSeconds"], name
    nightly = jobs["login-etl-snapshot"]["spec"]
    # ended well before the next night, and above what its own timeouts allow (database/): 2 builds
    # waiting 30 min each, the refresh's 90 min
    from database.snapshot import REFRESH_TIMEOUT_SECONDS
    from database.token_indexes import LOCK_WAIT_SECONDS

    deadline = nightly["jobTemplate"]["spec"]["activeDeadlineSeconds"]
    assert 2 * LOCK_WAIT_SECONDS + REFRESH_TIMEOUT_SECONDS < deadline <= 6 * 3600


def test_the_snapshot_job_runs_as_its_own_service_account_with_no_cloud_role(example) -> None:
    accounts = {d["metadata"]["name"]: d for d in example if d["kind"] == "ServiceAccount"}
    assert set(accounts) == {"login-etl", "login-etl-snapshot"}
    snapshot = accounts["login-etl-snapshot"]
    assert not snapshot["metadata"].get("annotations")  # no eks.amazonaws.com/role-arn: no AWS rights
    assert snapshot["automountServiceAccountToken"] is False
    assert "eks.amazonaws.com/role-arn" in accounts["login-etl"]["metadata"]["annotations"]  # the ETL's is unchanged
    assert pod_template(one(example, "CronJob"))["spec"]["serviceAccountName"] == "login-etl-snapshot"


def test_replicas_spread_over_zones_and_nodes_without_blocking_a_scale_up(example) -> None:
    deployment = one(example, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    spread = {c["topologyKey"]: c for c in deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]}
    assert set(spread) == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}
    for constraint in spread.values():
        assert constraint["labelSelector"]["matchLabels"].items() <= labels.items()  # selects the ETL's pods
        assert constraint["whenUnsatisfiable"] == "ScheduleAnyway" and constraint["maxSkew"] == 1
        assert constraint["matchLabelKeys"] == ["pod-template-hash"]  # this revision's pods only


def test_the_example_overlay_pins_the_image_by_digest(example) -> None:
    for workload in [d for d in example if d["kind"] in ("Deployment", "CronJob")]:
        image = container(workload)["image"]
        assert re.fullmatch(r"[a-z0-9.\-]+/login-etl@sha256:[0-9a-f]{64}", image), image


# -- the probes on a real process -----------------------------------------------------------------


def _get(port: int, path: str) -> tuple[int, str, float]:
    began = time.monotonic()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode(), time.monotonic() - began
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(), time.monotonic() - began


def test_the_probes_stay_up_through_a_database_outage_and_readiness_drops_on_sigterm(
    etl_env,
    sqs_client,
    tmp_path,
) -> None:
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    proxy = TcpProxy("127.0.0.1", urlsplit(etl_env["DATABASE_URL"]).port or 5432)
    database = urlsplit(etl_env["DATABASE_URL"])
    env = {**os.environ, "DATABASE_URL": database._replace(netloc=f"{database.hostname}:{proxy.port}").geturl()}
    with open(tmp_path / "etl.err", "w") as err:
        process = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "main.py"),
                "--follow",
                "--wait-seconds",
                "1",
                f"--metrics-port={port}",
                "--stop-timeout=6",
                "--backoff-cap-seconds=1",
            ],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if _get(port, "/readyz")[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.2)
        assert _get(port, "/readyz")[:2] == (200, "ready\n")
        proxy.cut()  # PostgreSQL gone: every write now fails and is retried
        send(sqs_client, etl_env["SQS_QUEUE_URL"], [login(n) for n in range(20)])
        answers = []
        for _ in range(8):
            answers += [_get(port, "/livez"), _get(port, "/readyz")]
            time.sleep(0.5)
        assert all(code == 200 for code, _text, _seconds in answers), answers
        assert max(seconds for _code, _text, seconds in answers) < 2
        assert "PostgreSQL write failed" in (tmp_path / "etl.err").read_text()
        process.send_signal(signal.SIGTERM)
        time.sleep(1)
        assert _get(port, "/readyz")[:2] == (503, "stopping: finishing the batch in hand\n")
        assert _get(port, "/livez")[0] == 200  # stopping is not dead: no restart while finishing
        proxy.restore()
        assert process.wait(timeout=30) == 0, (tmp_path / "etl.err").read_text()[-2000:]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        proxy.close()
    assert "Traceback" not in (tmp_path / "etl.err").read_text()
