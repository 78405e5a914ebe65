#!/usr/bin/env bash
# One command from a fresh clone to rows in user_logins: set up, load sample messages, drain, show.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh" requirements-dev.txt
python scripts/sample_data.py --send --count "${SAMPLE_COUNT:-1000}" --seed "${SAMPLE_SEED:-42}"
python main.py
psql -h localhost -U postgres -d postgres -c \
  'SELECT user_id, device_type, masked_ip, masked_device_id, locale, app_version, create_date
   FROM user_logins ORDER BY create_date DESC LIMIT 5'
psql -h localhost -U postgres -d postgres -c \
  'SELECT message_id, reason FROM user_logins_rejected ORDER BY received_at DESC LIMIT 5'
