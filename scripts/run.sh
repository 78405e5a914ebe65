#!/usr/bin/env bash
# One command from a fresh clone to rows in user_logins: set up, load sample messages, drain, show.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh" requirements-dev.txt
sent=$(mktemp)
trap 'rm -f "$sent"' EXIT
python scripts/sample_data.py --send --count "${SAMPLE_COUNT:-1000}" --seed "${SAMPLE_SEED:-42}" --ids-file "$sent"
python main.py
# This checkout's database (.env; the environment wins, as for main.py), and only the rows of the
# messages just sent: not rows an earlier run or another program loaded.
database_url=${DATABASE_URL:-$(python -c 'from dotenv import dotenv_values; print(dotenv_values(".env").get("DATABASE_URL") or "")')}
ids="{$(paste -sd, "$sent")}"
psql "$database_url" -v ids="$ids" <<'SQL'
SELECT user_id, device_type, masked_ip, masked_device_id, locale, app_version, create_date
  FROM user_logins WHERE message_id = ANY (:'ids'::text[]) ORDER BY create_date DESC, message_id LIMIT 5;
SELECT message_id, reason FROM user_logins_rejected WHERE message_id = ANY (:'ids'::text[])
 ORDER BY received_at DESC LIMIT 5;
SQL
echo "run.sh: these rows are in $(python -c 'import sys; from config import redact_dsn; print(redact_dsn(sys.argv[1]))' "$database_url")" >&2
