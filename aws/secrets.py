"""Secrets Manager: the database connection string of the Lambda function, read at a cold start."""

from __future__ import annotations

from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from aws.errors import AwsError

# A cold start must not spend the function's timeout on retries: a few quick attempts, then the
# invocation fails and SQS delivers the batch again.
_CONFIG = Config(connect_timeout=3, read_timeout=5, retries={"max_attempts": 3, "mode": "standard"})


class SecretError(AwsError):
    """Raised when a secret cannot be read (missing, access denied, Secrets Manager unreachable)."""


def read_secret(secret_id: str, *, region: str, client: Any = None) -> str:
    """The SecretString of `secret_id` (a name or ARN); raise SecretError saying what to check.

    The endpoint is boto3's own choice (AWS_ENDPOINT_URL_SECRETS_MANAGER / AWS_ENDPOINT_URL, else AWS).
    """
    client = client or boto3.client("secretsmanager", region_name=region, config=_CONFIG)
    try:
        value = client.get_secret_value(SecretId=secret_id).get("SecretString")
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "error")
        raise SecretError(
            f"secret {secret_id}: {code}; check that it exists in {region} and that the "
            "function's role may call secretsmanager:GetSecretValue on it"
        ) from None
    except BotoCoreError as exc:
        raise SecretError(f"secret {secret_id}: Secrets Manager unreachable ({type(exc).__name__})") from None
    if not value:
        raise SecretError(f"secret {secret_id} has no SecretString (a binary secret is not supported)")
    return str(value)
