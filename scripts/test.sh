#!/usr/bin/env bash
# One command for the whole suite: the same set-up as run.sh, then pytest (extra args pass through).
# Given only paths under tests/unit, it sets up the virtual environment alone: unit tests need no
# service, so none is started (and nothing is installed with apt).
set -euo pipefail
only_unit=0
paths=0
for arg in "$@"; do
  case $arg in
    -*) ;;
    tests/unit|tests/unit/*) paths=$((paths + 1)) ;;
    *) paths=$((paths + 1)); only_unit=-1 ;;
  esac
done
[ "$paths" -gt 0 ] && [ "$only_unit" -eq 0 ] && export SETUP_SERVICES=0
export SETUP_FOR_TESTS=1
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh" requirements-dev.txt
# .ci/run started ../shared/tools/docker-standin.sh in the background: wait for it (it finishes in
# seconds once its images are cached), then use the engine it started.
if [ -n "${DOCKER_STANDIN_OUT:-}" ]; then
  for _ in $(seq 1800); do [ -f "$DOCKER_STANDIN_OUT/rc" ] && break; sleep 1; done
  if [ "$(cat "$DOCKER_STANDIN_OUT/rc" 2>/dev/null)" = 0 ]; then
    eval "$(grep '^export DOCKER_HOST=' "$DOCKER_STANDIN_OUT/stdout")"
  else
    echo "test: docker-standin.sh failed or did not finish; the Docker tests will fail:" >&2
    tail -5 "$DOCKER_STANDIN_OUT/stderr" >&2 || true
  fi
fi
# Two pytest workers (pytest-xdist): most integration tests wait on subprocesses, sleeps and the
# network, so two share the 2 cores well. Tests of one `xdist_group` run on one worker, in order.
# TEST_WORKERS=0 runs in this process (for -s, pdb); an explicit -n wins.
workers=()
case " $* " in *" -n "*|*" -n"[0-9]*|*" -p no:xdist "*) ;; *)
  [ "${TEST_WORKERS:-2}" != 0 ] && workers=(-n "${TEST_WORKERS:-2}" --dist loadgroup) ;;
esac
python -m pytest "${workers[@]}" "$@"
