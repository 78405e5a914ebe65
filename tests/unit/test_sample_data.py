"""scripts/sample_data.py: what --send does, and that its threads do not share a boto3 Session."""

from __future__ import annotations

import threading
from typing import Any

import boto3.session
import pytest

import sample_data


class FakeSession:
    """Records on which thread it was made and on which threads clients were made from it."""

    made: list[FakeSession] = []

    def __init__(self, **_kwargs: Any) -> None:
        self.thread = threading.get_ident()
        self.client_threads: list[int] = []
        FakeSession.made.append(self)

    def client(self, _service: str, **_kwargs: Any) -> Any:
        self.client_threads.append(threading.get_ident())
        return FakeClient()


class FakeClient:
    sent = 0
    lock = threading.Lock()

    def send_message_batch(self, QueueUrl: str, Entries: list[dict[str, str]]) -> dict[str, Any]:  # noqa: N803
        with FakeClient.lock:
            first = FakeClient.sent
            FakeClient.sent += len(Entries)
        # SQS's answer: each entry's Id and the MessageId given to it.
        return {"Successful": [{"Id": e["Id"], "MessageId": f"m-{first + n}"} for n, e in enumerate(Entries)]}


def test_send_never_uses_a_boto3_session_from_another_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    # boto3 Sessions are not thread-safe (clients are): each session must stay on its own thread.
    monkeypatch.setattr(boto3.session, "Session", FakeSession)
    FakeSession.made.clear()
    bodies = list(sample_data.generate(95, seed=3))
    ids = sample_data.send(bodies, "http://q", "http://e", threads=4)
    assert sorted(ids) == sorted(f"m-{n}" for n in range(95))
    assert FakeClient.sent == 95 and FakeSession.made
    for session in FakeSession.made:
        assert set(session.client_threads) <= {session.thread}


def test_the_docstring_says_send_needs_an_existing_queue() -> None:
    doc = sample_data.__doc__ or ""
    send_line = next(line for line in doc.splitlines() if "--send" in line)
    assert "create" not in send_line and "init-queue.sh" in doc
