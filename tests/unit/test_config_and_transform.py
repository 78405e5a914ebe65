"""Settings from the environment, and the parse-and-mask step of one message."""

from __future__ import annotations

import json
from datetime import date

import pytest

from config import DEFAULT_DATABASE_URL, DEFAULT_QUEUE_URL, ConfigError, Settings, redact_dsn
from etl.transform import transform
from models import MaskedLogin, ReceivedMessage, Rejection
from pii.masking import Masker, generate_key

KEY = generate_key()


def test_defaults_point_at_the_local_stack() -> None:
    settings = Settings.from_env({"MASKING_KEY": KEY})
    assert settings.queue_url == DEFAULT_QUEUE_URL
    assert settings.database_url == DEFAULT_DATABASE_URL
    assert settings.endpoint_url == "http://localhost:4566"  # taken from the non-AWS queue URL
    assert settings.region == "us-east-1"


def test_a_real_aws_queue_url_without_endpoint_means_real_aws() -> None:
    url = "https://sqs.eu-west-1.amazonaws.com/123456789012/login-queue"
    settings = Settings.from_env({"MASKING_KEY": KEY, "SQS_QUEUE_URL": url, "AWS_DEFAULT_REGION": "eu-west-1"})
    assert settings.endpoint_url is None and settings.region == "eu-west-1"


def test_aws_endpoint_url_wins_over_the_queue_url_host() -> None:
    settings = Settings.from_env({"MASKING_KEY": KEY, "AWS_ENDPOINT_URL": "http://sqs.internal:9324"})
    assert settings.endpoint_url == "http://sqs.internal:9324"


@pytest.mark.parametrize("value", [None, "", "   "])
def test_a_missing_key_names_masking_key_and_how_to_create_one(value: str | None) -> None:
    env = {} if value is None else {"MASKING_KEY": value}
    with pytest.raises(ConfigError, match="MASKING_KEY is not set.*keygen"):
        Settings.from_env(env)


def test_a_malformed_key_is_refused_without_echoing_it() -> None:
    with pytest.raises(ConfigError, match="MASKING_KEY is malformed") as info:
        Settings.from_env({"MASKING_KEY": "c2VjcmV0"})
    assert "c2VjcmV0" not in str(info.value)


def test_the_repr_of_settings_shows_neither_key_nor_password() -> None:
    settings = Settings.from_env({"MASKING_KEY": KEY, "DATABASE_URL": "postgresql://u:hunter2@db/x"})
    text = repr(settings)
    assert "hunter2" not in text and KEY not in text and "masking_key" not in text


def test_redact_dsn_hides_the_password_only() -> None:
    assert redact_dsn("postgresql://u:hunter2@db:5432/x") == "postgresql://u@db:5432/x"
    assert redact_dsn("postgresql://u@db/x") == "postgresql://u@db/x"


masker = Masker(bytes(64))


def message(body: str, sent_ms: int | None = 1_700_000_000_000) -> ReceivedMessage:
    return ReceivedMessage(message_id="m-1", receipt_handle="r-1", body=body, sent_timestamp_ms=sent_ms)


def test_a_good_message_becomes_a_masked_row_dated_by_its_utc_sent_time() -> None:
    # 2023-11-14T23:59:59.999Z: the UTC date, whatever the local time zone says.
    body = json.dumps(
        {
            "user_id": "u",
            "device_type": "ios",
            "ip": "1.2.3.4",
            "device_id": "123-45-6789",
            "locale": None,
            "app_version": "0.96",
        }
    )
    row = transform(message(body, sent_ms=1_700_006_399_999), masker)
    assert isinstance(row, MaskedLogin)
    assert row.create_date == date(2023, 11, 14)
    assert (row.message_id, row.app_version, row.locale) == ("m-1", "0.96", None)
    assert masker.unmask(row.masked_ip) == "1.2.3.4" and masker.unmask(row.masked_device_id) == "123-45-6789"


def test_a_bad_message_becomes_a_rejection_with_its_body_encrypted() -> None:
    body = '{"ip": "1.2.3.4", "device_id": "123-45-6789"'
    rejection = transform(message(body), masker)
    assert isinstance(rejection, Rejection)
    assert "not valid JSON" in rejection.reason
    assert "1.2.3.4" not in repr(rejection) and "123-45-6789" not in rejection.encrypted_body
    assert masker.unmask(rejection.encrypted_body) == body


def test_a_message_without_a_sent_time_gets_the_same_create_date_on_every_delivery(monkeypatch) -> None:
    """Issue 18: the fallback was the wall clock, so a redelivery on another day got another day
    (another partition) and was stored twice. Now the date is a function of the message alone."""
    import datetime as real_datetime

    body = json.dumps(
        {"user_id": "u", "device_type": "ios", "ip": "1.2.3.4", "device_id": "123-45-6789", "app_version": "1"}
    )
    first = transform(message(body, sent_ms=None), masker)

    class Tomorrow(real_datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return real_datetime.datetime.now(tz) + real_datetime.timedelta(days=1)

    from etl import transform as transform_module

    monkeypatch.setattr(transform_module, "datetime", Tomorrow, raising=False)
    again = transform(message(body, sent_ms=None), masker)
    assert isinstance(first, MaskedLogin) and isinstance(again, MaskedLogin)
    assert first.create_date == again.create_date == date(1970, 1, 1)
