#!/usr/bin/env bash
# One command for the whole suite: the same set-up as run.sh, then pytest (extra args pass through).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh" requirements-dev.txt
python -m pytest "$@"
