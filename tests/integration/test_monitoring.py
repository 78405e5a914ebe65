"""What operators look at, tested: the alert rules with promtool, and every dashboard panel's and every
alert's PromQL evaluated by a real Prometheus (Debian's `prometheus` package) scraping a real ETL run.

Grafana itself does not run here; what it would send to Prometheus does.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import pytest
import yaml

from helpers import TEST_SQS_ENDPOINT, login, send, unavailable
from proxy import TcpProxy

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "monitoring"
ALERTS = MONITORING / "alerts.yml"
DASHBOARD = MONITORING / "dashboard.json"
KUBERNETES_SCRAPE = MONITORING / "prometheus-kubernetes.yml"
KUBERNETES_BASE = ROOT / "deploy" / "kubernetes" / "base"
# What Grafana puts in place of its variables for a 1 s scrape interval (its $__rate_interval is at
# least four scrape intervals).
GRAFANA_VARIABLES = {"$__rate_interval": "5s", "$__interval": "1s", "$__range": "30s"}


def tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        unavailable(f"{name} (Debian package prometheus; scripts/setup.sh installs it)")
    return found


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def dashboard_exprs() -> list[tuple[str, str]]:
    """(panel title, expr) of every target of every panel, rows included."""

    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    board = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in panels(board["panels"]) for t in p.get("targets", [])]


# --- the rules, with promtool ---------------------------------------------------------------------


def test_the_alert_rules_pass_promtool_check_rules() -> None:
    result = subprocess.run(
        [tool("promtool"), "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_the_alert_rules_pass_their_promtool_unit_tests() -> None:
    result = subprocess.run(
        [tool("promtool"), "test", "rules", "alerts_test.yml"],
        cwd=MONITORING,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_case_that_fires_it_and_one_that_does_not() -> None:
    cases = yaml.safe_load((MONITORING / "alerts_test.yml").read_text())["tests"]
    fired: set[str] = set()
    silent: set[str] = set()
    for case in cases:
        for check in case.get("alert_rule_test", []):
            (fired if check.get("exp_alerts") else silent).add(check["alertname"])
    names = {rule["alert"] for rule in alert_rules()}
    assert names >= {
        "LoginEtlAbsent",
        "LoginEtlBacklogGrowingNothingCommitted",
        "LoginEtlFreshnessObjectiveMissed",
        "LoginEtlRejectionRatioHigh",
        "LoginEtlServiceErrors",
        "LoginEtlKedaScalerErrors",
        "LoginEtlQueueOldestMessageTooOld",
        "LoginEtlDeadLetterQueueNotEmpty",
        "LoginEtlSnapshotNotRefreshed",
    }
    assert fired == names and silent == names


def test_every_alert_has_a_severity_a_summary_and_a_description_that_says_what_to_do_first() -> None:
    for rule in alert_rules():
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert rule["annotations"]["summary"].strip(), rule["alert"]
        assert "First" in rule["annotations"]["description"], rule["alert"]


def assert_config_loads_the_rules(config: Path) -> None:
    """`promtool check config` accepts the Prometheus config and finds its one rule file."""
    result = subprocess.run(
        [tool("promtool"), "check", "config", str(config)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout


def test_the_monitoring_profile_s_prometheus_config_is_valid_and_loads_the_rules() -> None:
    assert_config_loads_the_rules(MONITORING / "prometheus.yml")
    [job] = yaml.safe_load((MONITORING / "prometheus.yml").read_text())["scrape_configs"]
    assert job["job_name"] == "login-etl"  # what LoginEtlAbsent and the Replicas panel look for


def test_the_dashboard_uses_the_provisioned_datasource_and_covers_what_operators_watch() -> None:
    board = json.loads(DASHBOARD.read_text())
    datasource = yaml.safe_load((MONITORING / "grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = datasource["datasources"][0]["uid"]
    assert all(p["datasource"]["uid"] == uid for p in board["panels"])
    titles = " ".join(p["title"].lower() for p in board["panels"])
    for topic in (
        "throughput",
        "freshness",
        "backlog",
        "rejections by reason",
        "commit latency",
        "errors by service",
        "replicas",
    ):
        assert topic in titles
    provider = yaml.safe_load((MONITORING / "grafana/provisioning/dashboards/login-etl.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


# --- every query against a real Prometheus scraping a real ETL --------------------------------------

# Series an alert reads that neither the ETL nor Prometheus exports: they exist only where that
# system runs, so the real-Prometheus check only parses them; promtool (alerts_test.yml) tests the
# alerts' behaviour with and without them.
EXTERNAL_SERIES = {
    "keda_scaler_metrics_value": "KEDA's operator (Kubernetes with KEDA only)",
    "keda_scaler_detail_errors_total": "KEDA's operator (Kubernetes with KEDA only)",
    "aws_sqs_": "cloudwatch_exporter (monitoring/cloudwatch-exporter.yml)",
    "kube_cronjob_": "kube-state-metrics (Kubernetes only)",
}

_SET_OR_COMPARISON = re.compile(r"==|!=|>=|<=|>|<|\b(?:and|or|unless)\b")
# What may follow such an operator before its right-hand side.
_MODIFIERS = re.compile(
    r"\s*(?:bool\b)?\s*(?:(?:on|ignoring)\s*\([^)]*\))?\s*(?:(?:group_left|group_right)\s*(?:\([^)]*\))?)?"
)
_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:e[-+]?\d+)?", re.IGNORECASE)


def operands(expr: str) -> list[str]:
    """What an alert's expression reads, without its thresholds: the sides of its top-level
    comparisons and set operators (`and`, `or`, `unless`), with `absent(x)` and parentheses opened,
    numbers left out. `a > 0 and absent(b == 1)` gives [a, b]."""
    parts: list[str] = []
    depth, start, i, quote_char = 0, 0, 0, ""
    while i < len(expr):
        char = expr[i]
        if quote_char:
            if char == "\\":
                i += 1
            elif char == quote_char:
                quote_char = ""
        elif char in "\"'`":
            quote_char = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif depth == 0 and (found := _SET_OR_COMPARISON.match(expr, i)):
            parts.append(expr[start:i])
            start = i = _MODIFIERS.match(expr, found.end()).end()  # type: ignore[union-attr]
            continue
        i += 1
    parts.append(expr[start:])
    result: list[str] = []
    for part in (p.strip() for p in parts):
        if not part or _NUMBER.fullmatch(part):
            continue
        inner = _opened(part)
        result += [part] if inner is None else operands(inner)
    return result


def _opened(part: str) -> str | None:
    """The inside of `(x)` or `absent(x)` when those parentheses hold the whole part, else None."""
    prefix = "absent(" if part.startswith("absent(") else "(" if part.startswith("(") else ""
    if not prefix or not part.endswith(")"):
        return None
    depth = 0
    for i, char in enumerate(part[len(prefix) - 1 :], start=len(prefix) - 1):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth == 0:
            return part[len(prefix) : -1] if i == len(part) - 1 else None
    return None


def test_operands_are_the_sides_of_comparisons_and_set_operators_without_thresholds() -> None:
    assert operands('absent(up{job="a"} == 1) unless on() (max(k{x!="y"}) == 0)') == ['up{job="a"}', 'max(k{x!="y"})']
    assert operands("max(q) > 0 and max(delta(q[10m])) > 0 and sum(increase(c[10m])) == 0") == [
        "max(q)",
        "max(delta(q[10m]))",
        "sum(increase(c[10m]))",
    ]
    assert operands("a / (b + c) > on() group_left t") == ["a / (b + c)", "t"]
    assert operands("sum by (service) (rate(errors_or_else[5m])) > bool 0.05") == [
        "sum by (service) (rate(errors_or_else[5m]))"
    ]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class PromApi:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def get(self, path: str, **params: str) -> Any:
        url = f"{self.base}{path}?{urllib.parse.urlencode(params)}" if params else f"{self.base}{path}"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:  # a bad query: 400 with the parser's error in the body
            return json.loads(exc.read())

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base}/-/ready", timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def query(self, expr: str) -> list[dict[str, Any]]:
        answer = self.get("/api/v1/query", query=expr)
        assert answer["status"] == "success", f"{expr}: {answer.get('error')}"
        return list(answer["data"]["result"])


def start_prometheus(config: dict[str, Any], directory: Path) -> tuple[subprocess.Popen[bytes], PromApi]:
    """A real Prometheus (Debian's package) on a free port with this configuration, once ready."""
    prometheus = tool("prometheus")
    port = free_port()
    (directory / "prometheus.yml").write_text(yaml.safe_dump(config))
    with open(directory / "prometheus.log", "w") as log:
        server = subprocess.Popen(
            [
                prometheus,
                f"--config.file={directory / 'prometheus.yml'}",
                f"--storage.tsdb.path={directory / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    api = PromApi(port)
    deadline = time.monotonic() + 30
    while not api.ready():
        if time.monotonic() > deadline or server.poll() is not None:
            server.kill()
            server.wait()
            pytest.fail("Prometheus did not start: " + (directory / "prometheus.log").read_text()[-2000:])
        time.sleep(0.2)
    return server, api


@dataclass
class Run:
    """What the module's ETL run sent, and when PostgreSQL was cut."""

    api: PromApi
    sent: dict[str, int]
    cut_at: float
    etl_log: Path


@pytest.fixture(scope="module")
def etl_and_prometheus(
    pg_admin_url: str, sqs_client: Any, masking_key: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Run]:
    """A real ETL in --follow mode fed for ~10 s, scraped every second by a real Prometheus that
    evaluates alerts.yml every second. Its PostgreSQL is behind a TCP proxy, cut for 1.5 s while
    messages arrive, so that writes really fail and are retried. Shared by this module's tests."""
    import psycopg2

    tmp_path = tmp_path_factory.mktemp("monitoring")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = psycopg2.connect(pg_admin_url)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f"CREATE SCHEMA {schema}")
    queue_url = sqs_client.create_queue(QueueName=f"test-{uuid.uuid4().hex}")["QueueUrl"]
    database = urlsplit(pg_admin_url)
    proxy = TcpProxy(database.hostname or "127.0.0.1", database.port or 5432)
    userinfo = database.netloc.rpartition("@")[0]
    dsn = database._replace(netloc=f"{userinfo + '@' if userinfo else ''}{database.hostname}:{proxy.port}").geturl()
    sep = "&" if "?" in dsn else "?"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "SQS_", "DATABASE_URL", "MASKING_KEY"))},
        "AWS_ENDPOINT_URL": TEST_SQS_ENDPOINT,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "SQS_QUEUE_URL": queue_url,
        "DATABASE_URL": f"{dsn}{sep}options={quote(f'-csearch_path={schema}')}",
        "MASKING_KEY": masking_key,
    }
    metrics_port = free_port()
    etl_log = open(tmp_path / "etl.log", "w")  # noqa: SIM115 - closed with the run
    etl = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "main.py"),
            "--follow",
            "--metrics-port",
            str(metrics_port),
            "--wait-seconds",
            "1",
            "--progress-seconds",
            "0.5",
            "--flush-seconds",
            "0.2",
            "--backoff-cap-seconds",
            "1",
        ],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=etl_log,
        env=env,
    )
    server: subprocess.Popen[bytes] | None = None
    sent = {"loaded": 0, "not_json": 0, "missing_field": 0, "wrong_type": 0, "too_long": 0, "not_storable": 0}
    stop, paused, sending = threading.Event(), threading.Event(), threading.Lock()

    def feed() -> None:
        n = 0
        while not stop.wait(0.4):
            with sending:
                if paused.is_set():
                    continue
                bad = [
                    "not json",
                    login(n, ip=None),
                    login(n, app_version=2),
                    login(n, device_type="x" * 40),
                    login(n, user_id="nul\u0000"),
                ]
                send(sqs_client, queue_url, [login(n + i) for i in range(15)] + bad)
                sent["loaded"] += 15
                for kind in ("not_json", "missing_field", "wrong_type", "too_long", "not_storable"):
                    sent[kind] += 1
                n += 100

    def committed() -> float:
        """Messages stored or quarantined so far, from the ETL's own /metrics."""
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
            text = response.read().decode()
        counts = re.findall(r"^login_etl_messages_(?:loaded|rejected)_total(?:\{[^}]*\})? (\S+)$", text, re.MULTILINE)
        return sum(float(count) for count in counts)

    feeder = threading.Thread(target=feed, daemon=True)
    try:
        server, api = start_prometheus(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(ALERTS)],
                "scrape_configs": [
                    {"job_name": "login-etl", "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]}
                ],
            },
            tmp_path,
        )
        # Prometheus's first scrape comes a few seconds after it is ready (its target updates are
        # throttled): feed from then on, so that every event happens under its eyes.
        deadline = time.monotonic() + 30
        while not api.query('up{job="login-etl"} == 1'):
            assert time.monotonic() < deadline, "Prometheus never scraped the ETL"
            time.sleep(0.2)
        feeder.start()
        time.sleep(3)
        # PostgreSQL gone for 1.5 s while messages arrive: their writes fail and are retried. Cut
        # when what was sent has committed, so that no commit is in flight (one whose answer is
        # lost would be stored but not counted, and the counts below would be off by its rows).
        with sending:
            paused.set()
        deadline = time.monotonic() + 20
        while committed() < sum(sent.values()):
            assert time.monotonic() < deadline, "the ETL did not commit what was sent"
            time.sleep(0.1)
        cut_at = time.time()
        proxy.cut()
        paused.clear()
        time.sleep(1.5)
        proxy.restore()
        time.sleep(4)  # about eight scrapes and rule evaluations with traffic in all
        stop.set()
        feeder.join(timeout=10)
        # Let the last messages commit and be scraped.
        total = sent["loaded"]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            loaded = api.query("sum(login_etl_messages_loaded_total)")
            if loaded and float(loaded[0]["value"][1]) >= total:
                break
            time.sleep(0.5)
        time.sleep(1.5)  # one more scrape and evaluation
        yield Run(api, sent, cut_at, tmp_path / "etl.log")
    finally:
        stop.set()
        etl.send_signal(signal.SIGTERM)
        try:
            etl.wait(timeout=20)
            etl_log.close()
        finally:
            if server is not None:
                server.terminate()
                server.wait(timeout=20)
            proxy.close()
            sqs_client.delete_queue(QueueUrl=queue_url)
            with admin.cursor() as cur:
                cur.execute(f"DROP SCHEMA {schema} CASCADE")
            admin.close()


def unanswered(
    api: PromApi, panels: list[tuple[str, str]], alerts: list[dict[str, Any]], start: float, end: float
) -> list[str]:
    """What a real Prometheus does not answer with data: each panel's query over [start, end] as
    Grafana sends it (no finite value, or an error), and each operand of each alert (`operands`:
    no series now, or an error). Operands of EXTERNAL_SERIES only have to parse."""
    problems = []
    for title, expr in panels:
        for name, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(name, value)
        if "$" in expr:
            problems.append(f"panel {title}: a Grafana variable this test does not know: {expr}")
            continue
        answer = api.get("/api/v1/query_range", query=expr, start=str(start), end=str(end), step="1")
        if answer["status"] != "success":
            problems.append(f"panel {title}: {expr}: {answer.get('error')}")
        elif not any(math.isfinite(float(v)) for series in answer["data"]["result"] for _, v in series["values"]):
            problems.append(f"panel {title}: {expr}: no data")
    for rule in alerts:
        for operand in operands(rule["expr"]):
            answer = api.get("/api/v1/query", query=operand)
            if answer["status"] != "success":
                problems.append(f"alert {rule['alert']}: {operand}: {answer.get('error')}")
            elif not answer["data"]["result"] and not any(name in operand for name in EXTERNAL_SERIES):
                problems.append(f"alert {rule['alert']}: {operand}: no series")
    return problems


def test_every_panel_and_every_alert_returns_series_from_a_real_prometheus(etl_and_prometheus: Run) -> None:
    api, end = etl_and_prometheus.api, time.time()
    assert unanswered(api, dashboard_exprs(), alert_rules(), end - 90, end) == []
    # Every rule loaded and evaluated without error, each alert's whole expression included.
    groups = api.get("/api/v1/rules")["data"]["groups"]
    rules = {rule["name"]: rule for group in groups for rule in group["rules"]}
    assert {rule["alert"] for rule in alert_rules()} <= rules.keys()
    for name, rule in rules.items():
        assert rule["health"] == "ok", f"{name}: {rule.get('lastError')}"


def test_the_check_reports_a_misspelt_metric_in_a_panel_and_in_an_alert(etl_and_prometheus: Run) -> None:
    # GIVEN the dashboard and the rules with one panel and one alert misspelt
    panels = dashboard_exprs()
    [(title, expr)] = [(t, e) for t, e in panels if "messages_loaded_total" in e and t == "Throughput"]
    bad_panel = (title, expr.replace("messages_loaded_total", "mesages_loaded_total"))
    alerts = alert_rules()
    [errors] = [rule for rule in alerts if rule["alert"] == "LoginEtlServiceErrors"]
    bad_alert = {**errors, "expr": errors["expr"].replace("login_etl_errors_total", "login_etl_erors_total")}
    assert bad_panel[1] != expr and bad_alert["expr"] != errors["expr"]
    # WHEN the same check runs on them
    api, end = etl_and_prometheus.api, time.time()
    problems = unanswered(api, [*panels, bad_panel], [*alerts, bad_alert], end - 90, end)
    # THEN it reports those two, and only those
    assert problems == [
        f"panel Throughput: {bad_panel[1].replace('$__rate_interval', '5s')}: no data",
        "alert LoginEtlServiceErrors: sum by (service) (rate(login_etl_erors_total[5m])): no series",
    ]


def test_a_real_postgresql_outage_shows_in_errors_by_service(etl_and_prometheus: Run) -> None:
    api, end = etl_and_prometheus.api, time.time()
    [(_, expr)] = [(t, e) for t, e in dashboard_exprs() if t == "Errors by service"]
    expr = expr.replace("$__rate_interval", GRAFANA_VARIABLES["$__rate_interval"])
    answer = api.get(
        "/api/v1/query_range", query=expr, start=str(etl_and_prometheus.cut_at - 5), end=str(end), step="1"
    )
    peak = {s["metric"].get("service"): max(float(v) for _, v in s["values"]) for s in answer["data"]["result"]}
    assert peak.get("postgres", 0) > 0, (peak, etl_and_prometheus.etl_log.read_text()[-3000:])
    [failed] = api.query('sum(login_etl_errors_total{service="postgres", kind="write"})')
    assert float(failed["value"][1]) >= 1


def test_the_metrics_count_what_was_sent(etl_and_prometheus: Run) -> None:
    api, sent = etl_and_prometheus.api, etl_and_prometheus.sent
    # Every kind of rejection sent is counted under its own reason, once, in spite of the outage.
    by_reason = {
        r["metric"]["reason"]: float(r["value"][1])
        for r in api.query("sum by (reason) (login_etl_messages_rejected_total)")
    }
    for kind in ("not_json", "missing_field", "wrong_type", "too_long", "not_storable"):
        assert by_reason[kind] == sent[kind], (kind, by_reason, sent)
    assert by_reason["processing_failed"] == 0 and by_reason["other"] == 0
    [stored] = api.query("sum(login_etl_messages_loaded_total)")
    assert float(stored["value"][1]) == sent["loaded"]
    [committed] = api.query("sum(login_etl_freshness_seconds_count)")
    assert float(committed["value"][1]) == sent["loaded"] + sum(v for k, v in sent.items() if k != "loaded")
    [p99] = api.query("histogram_quantile(0.99, sum by (le) (login_etl_freshness_seconds_bucket))")
    assert 0 < float(p99["value"][1]) <= 60  # committed within seconds of being sent, outage included


# --- Kubernetes: the scrape job ------------------------------------------------------------------


def test_the_kubernetes_scrape_config_is_valid_and_loads_the_rules(tmp_path: Path) -> None:
    # Debian's Prometheus is built without Kubernetes discovery (promtool refuses the field), so
    # promtool checks the rest with each job's discovery swapped for a file; the discovery is checked here.
    config = yaml.safe_load(KUBERNETES_SCRAPE.read_text())
    assert config["rule_files"] == ["alerts.yml"]
    config["rule_files"] = [str(ALERTS)]
    for job in config["scrape_configs"]:
        if "static_configs" in job:  # the exporters' Services
            continue
        assert [sd["role"] for sd in job.pop("kubernetes_sd_configs")] == ["pod"], job["job_name"]
        job["file_sd_configs"] = [{"files": [str(tmp_path / "pods.json")]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    assert_config_loads_the_rules(tmp_path / "prometheus.yml")


def _meta(kind: str, key: str) -> str:
    """The label kubernetes_sd gives a pod's annotation or label `key`."""
    return f"__meta_kubernetes_pod_{kind}_" + re.sub(r"[^a-zA-Z0-9_]", "_", key)


def test_on_kubernetes_the_etl_pods_are_scraped_as_job_login_etl(tmp_path: Path) -> None:
    # GIVEN the kubernetes-pods job of prometheus-kubernetes.yml, fed the labels kubernetes_sd would
    # give a login-etl pod (the Deployment's annotations, the kustomization's labels) and another pod
    [job] = [
        j for j in yaml.safe_load(KUBERNETES_SCRAPE.read_text())["scrape_configs"] if j["job_name"] == "kubernetes-pods"
    ]
    template = yaml.safe_load((KUBERNETES_BASE / "deployment.yaml").read_text())["spec"]["template"]
    [labels] = [
        entry["pairs"] for entry in yaml.safe_load((KUBERNETES_BASE / "kustomization.yaml").read_text())["labels"]
    ]
    assert labels["app.kubernetes.io/name"] == "login-etl"
    annotations = template["metadata"]["annotations"]
    pod = {
        "__meta_kubernetes_namespace": "login-etl",
        "__meta_kubernetes_pod_name": "login-etl-7d9c-x2x4z",
        **{_meta("annotation", k): str(v) for k, v in annotations.items()},
        **{_meta("label", k): v for k, v in labels.items()},
    }
    other = {
        "__meta_kubernetes_namespace": "shop",
        "__meta_kubernetes_pod_name": "cart-1",
        _meta("annotation", "prometheus.io/scrape"): "true",
        _meta("label", "app.kubernetes.io/name"): "cart",
    }
    targets = tmp_path / "pods.json"
    targets.write_text(
        json.dumps([{"targets": ["127.0.0.1"], "labels": pod}, {"targets": ["127.0.0.2:80"], "labels": other}])
    )
    job = {k: v for k, v in job.items() if k != "kubernetes_sd_configs"}
    job["file_sd_configs"] = [{"files": [str(targets)], "refresh_interval": "1s"}]
    server, api = start_prometheus({"global": {"scrape_interval": "1s"}, "scrape_configs": [job]}, tmp_path)
    try:
        # WHEN Prometheus has relabelled them
        deadline = time.monotonic() + 30
        while len(active := api.get("/api/v1/targets", state="active")["data"]["activeTargets"]) < 2:
            assert time.monotonic() < deadline, active
            time.sleep(0.2)
        # THEN the ETL's pod is job login-etl, on the annotated port and path; the other keeps its job
        by_pod = {t["labels"]["pod"]: t for t in active}
        etl = by_pod["login-etl-7d9c-x2x4z"]
        assert etl["labels"]["job"] == "login-etl"
        assert (
            etl["scrapeUrl"]
            == f"http://127.0.0.1:{annotations['prometheus.io/port']}{annotations['prometheus.io/path']}"
        )
        assert by_pod["cart-1"]["labels"]["job"] == "kubernetes-pods"
        # and what LoginEtlAbsent and the "Replicas up" panel select finds it
        deadline = time.monotonic() + 30
        while not api.query('up{job="login-etl"}'):
            assert time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        server.terminate()
        server.wait(timeout=20)


# --- Kubernetes: what the outside alerts read --------------------------------------------------------

CLOUDWATCH_EXPORTER = MONITORING / "cloudwatch-exporter.yml"


def test_the_cloudwatch_exporter_exports_what_the_outside_alerts_read_for_the_queues_the_scrape_job_labels() -> None:
    config = yaml.safe_load(CLOUDWATCH_EXPORTER.read_text())
    assert config["set_timestamp"] is False  # else the samples are older than Prometheus' lookback
    # cloudwatch_exporter's names: aws_<namespace>_<metric in snake case>_<statistic>, queue_name=<QueueName>
    exported = {}
    for metric in config["metrics"]:
        assert metric["aws_namespace"] == "AWS/SQS" and metric["aws_dimensions"] == ["QueueName"]
        snake = re.sub(r"(?<!^)(?=[A-Z])", "_", metric["aws_metric_name"]).lower()
        for statistic in metric["aws_statistics"]:
            exported[f"aws_sqs_{snake}_{statistic.lower()}"] = set(metric["aws_dimension_select"]["QueueName"])
    [job] = [
        j for j in yaml.safe_load(KUBERNETES_SCRAPE.read_text())["scrape_configs"] if j["job_name"] == "sqs-cloudwatch"
    ]
    roles = {rule["replacement"]: rule["regex"] for rule in job["metric_relabel_configs"]}
    assert set(roles) == {"source", "dead-letter"}
    rules = {rule["alert"]: rule["expr"] for rule in alert_rules()}
    age = rules["LoginEtlQueueOldestMessageTooOld"]
    assert 'aws_sqs_approximate_age_of_oldest_message_maximum{login_etl_queue="source"}' in age
    assert roles["source"] in exported["aws_sqs_approximate_age_of_oldest_message_maximum"]
    dlq = rules["LoginEtlDeadLetterQueueNotEmpty"]
    assert 'aws_sqs_approximate_number_of_messages_visible_maximum{login_etl_queue="dead-letter"}' in dlq
    assert roles["dead-letter"] in exported["aws_sqs_approximate_number_of_messages_visible_maximum"]


class _Exposition(threading.Thread):
    """An HTTP server answering /metrics with fixed Prometheus text: what an exporter would serve."""

    def __init__(self, text: str) -> None:
        import http.server

        body = text.encode()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the standard library's name)
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        super().__init__(target=self.server.serve_forever, daemon=True)


def test_the_queue_alerts_fire_in_a_real_prometheus_on_what_cloudwatch_exporter_serves(tmp_path: Path) -> None:
    # GIVEN the sqs-cloudwatch scrape job of prometheus-kubernetes.yml pointed at a server that
    # answers as cloudwatch_exporter does for a stuck queue and a dead-letter queue with 3 messages,
    # and every rule of alerts.yml with the thresholds' `for` waived
    age, visible = (
        "aws_sqs_approximate_age_of_oldest_message_maximum",
        "aws_sqs_approximate_number_of_messages_visible_maximum",
    )
    exporter = _Exposition(
        f"# TYPE {age} gauge\n"
        f'{age}{{job="aws_sqs",instance="",queue_name="login-queue",}} 3600.0\n'
        f"# TYPE {visible} gauge\n"
        f'{visible}{{job="aws_sqs",instance="",queue_name="login-queue",}} 10.0\n'
        f'{visible}{{job="aws_sqs",instance="",queue_name="login-queue-dlq",}} 3.0\n'
        f'{visible}{{job="aws_sqs",instance="",queue_name="other-dlq",}} 9.0\n'
    )
    exporter.start()
    [job] = [
        j for j in yaml.safe_load(KUBERNETES_SCRAPE.read_text())["scrape_configs"] if j["job_name"] == "sqs-cloudwatch"
    ]
    job.update(scrape_interval="1s", scrape_timeout="1s", static_configs=[{"targets": [f"127.0.0.1:{exporter.port}"]}])
    rules = yaml.safe_load(ALERTS.read_text())
    for group in rules["groups"]:
        group["interval"] = "1s"
        for rule in group["rules"]:
            rule.pop("for", None)
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(rules))
    config = {
        "global": {"scrape_interval": "1s"},
        "rule_files": [str(tmp_path / "alerts.yml")],
        "scrape_configs": [job],
    }
    server, api = start_prometheus(config, tmp_path)
    try:
        # WHEN Prometheus has scraped and evaluated them
        deadline = time.monotonic() + 30
        wanted = {"LoginEtlQueueOldestMessageTooOld", "LoginEtlDeadLetterQueueNotEmpty"}
        while (
            not wanted
            <= (firing := {a["labels"]["alertname"]: a for a in api.get("/api/v1/alerts")["data"]["alerts"]}).keys()
        ):
            assert time.monotonic() < deadline, firing
            time.sleep(0.2)
        # THEN the queue-age and dead-letter alerts fire, on the right queues' values; nothing else
        # does but LoginEtlAbsent (no ETL is scraped here)
        assert set(firing) == wanted | {"LoginEtlAbsent"}
        assert float(firing["LoginEtlQueueOldestMessageTooOld"]["value"]) == 3600
        assert float(firing["LoginEtlDeadLetterQueueNotEmpty"]["value"]) == 3
    finally:
        server.terminate()
        server.wait(timeout=20)
        exporter.server.shutdown()
