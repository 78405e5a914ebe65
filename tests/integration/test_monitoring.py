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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from helpers import login, send, unavailable

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "monitoring"
ALERTS = MONITORING / "alerts.yml"
DASHBOARD = MONITORING / "dashboard.json"
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
    }
    assert fired == names and silent == names


def test_every_alert_has_a_severity_a_summary_and_a_description_that_says_what_to_do_first() -> None:
    for rule in alert_rules():
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert rule["annotations"]["summary"].strip(), rule["alert"]
        assert "First" in rule["annotations"]["description"], rule["alert"]


def test_the_monitoring_profile_s_prometheus_config_is_valid_and_loads_the_rules() -> None:
    result = subprocess.run(
        [tool("promtool"), "check", "config", str(MONITORING / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout
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


@pytest.fixture
def etl_and_prometheus(etl_env, sqs_client, tmp_path: Path) -> Iterator[tuple[PromApi, dict[str, int]]]:
    """A real ETL in --follow mode fed for ~10 s, scraped every second by a real Prometheus that
    evaluates alerts.yml every second. Yields the API and how many messages of each kind were sent."""
    prometheus = tool("prometheus")
    metrics_port, prom_port = free_port(), free_port()
    queue_url = etl_env["SQS_QUEUE_URL"]
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
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ.copy(),
    )
    config = tmp_path / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(ALERTS)],
                "scrape_configs": [
                    {"job_name": "login-etl", "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]}
                ],
            }
        )
    )
    server = subprocess.Popen(
        [
            prometheus,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
            "--log.level=warn",
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "prometheus.log", "w"),
    )  # noqa: SIM115
    sent = {"loaded": 0, "not_json": 0, "missing_field": 0, "wrong_type": 0, "too_long": 0, "not_storable": 0}
    stop = threading.Event()

    def feed() -> None:
        n = 0
        while not stop.wait(0.4):
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

    feeder = threading.Thread(target=feed, daemon=True)
    try:
        api = PromApi(prom_port)
        deadline = time.monotonic() + 30
        while not api.ready():
            assert time.monotonic() < deadline and server.poll() is None, (tmp_path / "prometheus.log").read_text()
            time.sleep(0.2)
        feeder.start()
        time.sleep(8)  # eight scrapes and rule evaluations with traffic
        stop.set()
        feeder.join(timeout=10)
        # Let the last messages commit and be scraped.
        total = sent["loaded"]
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            loaded = api.query("sum(login_etl_messages_loaded_total)")
            if loaded and float(loaded[0]["value"][1]) >= total:
                break
            time.sleep(0.5)
        time.sleep(1.5)  # one more scrape and evaluation
        yield api, sent
    finally:
        stop.set()
        etl.send_signal(signal.SIGTERM)
        try:
            etl.communicate(timeout=20)
        finally:
            server.terminate()
            server.wait(timeout=20)


def test_every_panel_and_every_alert_returns_series_from_a_real_prometheus(etl_and_prometheus) -> None:
    api, sent = etl_and_prometheus
    end = time.time()
    empty = []
    for title, expr in dashboard_exprs():
        for name, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(name, value)
        assert "$" not in expr, f"{title}: a Grafana variable this test does not know: {expr}"
        answer = api.get("/api/v1/query_range", query=expr, start=str(end - 40), end=str(end), step="1")
        assert answer["status"] == "success", f"{title}: {expr}: {answer.get('error')}"
        finite = [v for series in answer["data"]["result"] for _, v in series["values"] if math.isfinite(float(v))]
        if not finite:
            empty.append(f"{title}: {expr}")
    assert not empty, "panels without data: " + "; ".join(empty)

    # Alerts: every rule loaded and evaluated without error; each expression parses and every series
    # it reads exists (a misspelt metric would make an alert that can never fire).
    groups = api.get("/api/v1/rules")["data"]["groups"]
    rules = {rule["name"]: rule for group in groups for rule in group["rules"]}
    assert {rule["alert"] for rule in alert_rules()} <= rules.keys()
    for name, rule in rules.items():
        assert rule["health"] == "ok", f"{name}: {rule.get('lastError')}"
    for rule in alert_rules():
        api.query(rule["expr"])  # parses and evaluates
        selectors = re.findall(r"\b(?:login_etl_[a-z_]+|up)(?:\{[^}]*\})?|login_etl:[a-z_:]+", rule["expr"])
        assert selectors, rule["alert"]
        for selector in selectors:
            assert api.query(selector), f"{rule['alert']}: {selector} returns no series"

    # And the numbers are right: every kind of rejection sent is counted under its own reason.
    by_reason = {
        r["metric"]["reason"]: float(r["value"][1])
        for r in api.query("sum by (reason) (login_etl_messages_rejected_total)")
    }
    for kind in ("not_json", "missing_field", "wrong_type", "too_long", "not_storable"):
        assert by_reason[kind] == sent[kind], (kind, by_reason, sent)
    assert by_reason["processing_failed"] == 0 and by_reason["other"] == 0
    [stored] = api.query("sum(login_etl_freshness_seconds_count)")
    assert float(stored["value"][1]) == sent["loaded"] + sum(v for k, v in sent.items() if k != "loaded")
    [p99] = api.query("histogram_quantile(0.99, sum by (le) (login_etl_freshness_seconds_bucket))")
    assert 0 < float(p99["value"][1]) <= 30  # committed within seconds of being sent
