"""Daily partition names and windows, and the day a message's rows belong to (issue 18)."""

from __future__ import annotations

from datetime import date, datetime, timezone

from database import partitions
from models import UNDATED_CREATE_DATE, ReceivedMessage, Rejection


def test_a_partition_name_and_its_day_round_trip_and_other_tables_have_no_day() -> None:
    day = date(2026, 2, 28)
    assert partitions.partition_name(day) == "user_logins_p20260228"
    assert partitions.day_of(partitions.partition_name(day)) == day
    assert partitions.day_of("user_logins_default") is None and partitions.day_of("user_logins_p2026") is None


def test_the_window_is_yesterday_today_and_the_days_ahead() -> None:
    days = partitions.window(date(2026, 12, 31))
    assert days[0] == date(2026, 12, 30) and days[1] == date(2026, 12, 31) and days[-1] == date(2027, 1, 7)
    assert len(days) == partitions.DAYS_BEHIND + 1 + partitions.DAYS_AHEAD


def test_closed_partitions_are_the_days_before_today_and_the_default_one() -> None:
    today = date(2026, 3, 1)
    assert partitions.is_closed("user_logins_p20260228", today) and partitions.is_closed("user_logins_default", today)
    assert not partitions.is_closed("user_logins_p20260301", today)  # today's: being written
    assert not partitions.is_closed("user_logins_p20260302", today)  # created ahead
    assert not partitions.is_closed("user_logins_legacy", today)  # not a partition of ours


def test_a_partitions_token_indexes_are_named_after_it() -> None:
    assert partitions.token_index_names("user_logins_p20260228") == {
        "user_logins_p20260228_device_user_day": "(masked_device_id, user_id, create_date)",
        "user_logins_p20260228_ip_user_day": "(masked_ip, user_id, create_date)",
        "user_logins_p20260228_network_user_day": "(masked_network, user_id, create_date)",
    }


def test_a_rejection_is_dated_like_the_login_row_of_its_message() -> None:
    sent_ms = 1_700_006_399_999  # 2023-11-14T23:59:59.999Z
    message = ReceivedMessage("m", "r", "{}", sent_timestamp_ms=sent_ms)
    rejection = Rejection("m", "x", "v1.x", message.sent_at, 1)
    assert rejection.create_date == message.create_date == date(2023, 11, 14)
    assert Rejection("m", "x", "v1.x", None, 1).create_date is None
    assert ReceivedMessage("m", "r", "{}").create_date == UNDATED_CREATE_DATE
    late = datetime(2023, 11, 14, 23, 59, 59, 999000, tzinfo=timezone.utc)
    assert Rejection("m", "x", "v1.x", late, 1).create_date == date(2023, 11, 14)


def test_retention_refuses_a_keep_days_below_one_before_connecting(capsys) -> None:
    import pytest

    from cli.exit_codes import EXIT_CONFIG
    from main import main

    with pytest.raises(SystemExit) as info:
        main(["retention", "--keep-days", "0"])
    assert info.value.code == EXIT_CONFIG
    assert "--keep-days: must be >= 1" in capsys.readouterr().err


def test_retention_refuses_a_keep_days_sqs_may_still_redeliver_into_with_one_line_and_exit_2(
    monkeypatch, capsys
) -> None:
    import pytest

    from cli.exit_codes import EXIT_CONFIG
    from main import main

    # GIVEN SQS keeps messages up to 14 days (1,209,600 s): a message of 14 days ago may come back today
    monkeypatch.setenv("DATABASE_URL", "postgresql://nobody@127.0.0.1:1/none")
    for keep_days in ("1", "14"):
        # WHEN retention is asked to keep fewer days THEN it refuses before connecting (no network here)
        assert main(["retention", "--keep-days", keep_days, "--dry-run"]) == EXIT_CONFIG
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"error: --keep-days {keep_days} could drop a day SQS")
        assert "--allow-redelivered-days" in err
    # AND 15 days, or fewer with the explicit override, are accepted
    from database.retention import MIN_KEEP_DAYS, Retention, RetentionTooShort

    assert MIN_KEEP_DAYS == 15
    Retention("postgresql://nobody@127.0.0.1:1/none", keep_days=15, requested_by="t")
    Retention("postgresql://nobody@127.0.0.1:1/none", keep_days=1, requested_by="t", allow_redelivered_days=True)
    with pytest.raises(RetentionTooShort):
        Retention("postgresql://nobody@127.0.0.1:1/none", keep_days=14, requested_by="t")
