"""End to end with a Tink keyset: the ETL masks with it, Tink decrypts what PostgreSQL holds."""

from __future__ import annotations

import base64
import json

import tink
from tink import daead, secret_key_access

from cli.exit_codes import EXIT_OK
from helpers import GOOD_LOGIN, query, send
from main import main
from pii import encoding

daead.register()


def test_the_etl_masks_with_a_keyset_and_tink_decrypts_the_stored_tokens(
    etl_env, sqs_client, monkeypatch, capsys
) -> None:
    # GIVEN a keyset from keygen as the only key source, and logins from one address written two ways
    assert main(["keygen", "--format", "tink"]) == EXIT_OK
    keyset = capsys.readouterr().out
    monkeypatch.delenv("MASKING_KEY", raising=False)
    monkeypatch.setenv("MASKING_KEYSET", keyset)
    bodies = [
        json.dumps({**GOOD_LOGIN, "user_id": f"u-{n}", "ip": ip, "device_id": "593-47-5928"})
        for n, ip in enumerate(["1.2.3.4", "::ffff:1.2.3.4", "203.113.250.101"])
    ]
    send(sqs_client, etl_env["SQS_QUEUE_URL"], bodies)
    # WHEN the ETL runs
    assert main([]) == EXIT_OK
    # THEN the stored tokens are Tink's: the keyset decrypts them to the documented plaintexts
    rows = query(
        etl_env["DATABASE_URL"], "SELECT user_id, masked_ip, masked_device_id FROM user_logins ORDER BY user_id"
    )
    primitive = tink.json_proto_keyset_format.parse(keyset, secret_key_access.TOKEN).primitive(daead.DeterministicAead)
    plain = {
        user: (
            primitive.decrypt_deterministically(base64.b64decode(ip), b"ip"),
            primitive.decrypt_deterministically(base64.b64decode(device), b"device_id"),
        )
        for user, ip, device in rows
    }
    assert plain == {
        "u-0": (encoding.encode_ip("1.2.3.4"), encoding.encode_padded("593-47-5928")),
        "u-1": (encoding.encode_ip("1.2.3.4"), encoding.encode_padded("593-47-5928")),
        "u-2": (encoding.encode_ip("203.113.250.101"), encoding.encode_padded("593-47-5928")),
    }
    # and one address written two ways is one duplicate; all IP tokens have one length
    assert len({len(ip) for _, ip, _ in rows}) == 1
    assert sorted(query(etl_env["DATABASE_URL"], "SELECT field, logins FROM user_login_duplicates")) == [
        ("device_id", 3),
        ("ip", 2),
        ("network", 2),  # 1.2.3.0/24
    ]
    # and the audited unmask shows the canonical text
    capsys.readouterr()
    assert main(["unmask", "--reason", "tink test", rows[1][1]]) == EXIT_OK
    assert capsys.readouterr().out.splitlines() == ["1.2.3.4"]
