#!/usr/bin/env bash
# LocalStack init hook: create the queue and its DLQ (scripts/init-queue.sh), then load sample
# messages (scripts/sample_data.py) if, and only if, the queue did not exist before this run.
# docker-compose.yml mounts it into /etc/localstack/init/ready.d/; it runs unchanged on the host
# against the embedded emulator (awslocal on PATH). A second run changes nothing.
#
#   QUEUE_NAME (login-queue)   SAMPLE_COUNT (1000; 0 loads none)   SAMPLE_SEED (42)
#   SAMPLE_SENDER: auto (default) | boto3 | awslocal
#   LOGIN_ETL_SCRIPTS: where init-queue.sh and sample_data.py are (default: beside this file)
#
# The endpoint is resolved as awslocal resolves it: AWS_ENDPOINT_URL, else http://$LOCALSTACK_HOST,
# else http://localhost:4566.
set -euo pipefail
export DISABLE_DEPRECATION_NOTICE=1
export AWS_ACCESS_KEY_ID=${AWS_ACCESS_KEY_ID:-test} AWS_SECRET_ACCESS_KEY=${AWS_SECRET_ACCESS_KEY:-test}
export AWS_DEFAULT_REGION=${AWS_DEFAULT_REGION:-us-east-1}
export QUEUE_NAME=${QUEUE_NAME:-login-queue}
SCRIPTS=${LOGIN_ETL_SCRIPTS:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)}
SAMPLE_COUNT=${SAMPLE_COUNT:-1000}
SAMPLE_SEED=${SAMPLE_SEED:-42}
SAMPLE_SENDER=${SAMPLE_SENDER:-auto}
ENDPOINT=${AWS_ENDPOINT_URL:-http://${LOCALSTACK_HOST:-localhost:4566}}

log() { echo "login-etl init: $*" >&2; }

case "$SAMPLE_COUNT" in '' | *[!0-9]*) log "SAMPLE_COUNT must be a whole number, got '$SAMPLE_COUNT'"; exit 2 ;; esac
case "$SAMPLE_SENDER" in auto | boto3 | awslocal) ;; *) log "SAMPLE_SENDER must be auto, boto3 or awslocal"; exit 2 ;; esac

# A Python that can import boto3: python3 on PATH, then the interpreter awslocal runs on (awslocal
# depends on boto3 through localstack-client), then LocalStack's own virtual environment.
python_with_boto3() {
  local awslocal_python candidate
  awslocal_python=$(sed -n '1s|^#![[:space:]]*\(/[^ ]*python[0-9.]*\)[[:space:]]*$|\1|p' \
    "$(command -v awslocal)" 2>/dev/null || true)
  for candidate in python3 "$awslocal_python" /opt/code/localstack/.venv/bin/python; do
    [ -n "$candidate" ] && command -v "$candidate" >/dev/null 2>&1 \
      && "$candidate" -c 'import boto3' >/dev/null 2>&1 && { echo "$candidate"; return 0; }
  done
  return 1
}

# "Does the queue exist?" must not be answered "no" because of a network error: that would load
# the samples a second time. Only NonExistentQueue means no.
if out=$(awslocal sqs get-queue-url --queue-name "$QUEUE_NAME" 2>&1); then
  existed=1
elif grep -q -e NonExistentQueue -e QueueDoesNotExist <<<"$out"; then
  existed=0
else
  log "cannot tell whether $QUEUE_NAME exists: $out"
  exit 1
fi

bash "$SCRIPTS/init-queue.sh"
queue_url=$(awslocal sqs get-queue-url --queue-name "$QUEUE_NAME" --query QueueUrl --output text)

if [ "$existed" = 1 ]; then
  log "$QUEUE_NAME existed already: no sample messages loaded"
  exit 0
fi
if [ "$SAMPLE_COUNT" = 0 ]; then
  log "SAMPLE_COUNT=0: no sample messages loaded"
  exit 0
fi

python=
if [ "$SAMPLE_SENDER" != awslocal ]; then
  python=$(python_with_boto3) || python=
  if [ -z "$python" ] && [ "$SAMPLE_SENDER" = boto3 ]; then
    log "SAMPLE_SENDER=boto3 but no python with boto3 found"
    exit 1
  fi
fi

if [ -n "$python" ]; then
  "$python" "$SCRIPTS/sample_data.py" --send --count "$SAMPLE_COUNT" --seed "$SAMPLE_SEED" \
    --queue-url "$queue_url" --endpoint-url "$ENDPOINT"
  log "loaded $SAMPLE_COUNT sample messages into $queue_url (boto3, $python)"
  exit 0
fi

# No boto3: generate with any python3 (printing needs only the standard library) and send each
# batch of 10 with the AWS CLI. Slower (one CLI start per batch), same messages.
command -v python3 >/dev/null 2>&1 || { log "python3 not found: cannot generate sample messages"; exit 1; }
sent=0
while IFS= read -r entries; do
  read -r ok failed < <(awslocal sqs send-message-batch --queue-url "$queue_url" --entries "$entries" \
    --query '[length(Successful || `[]`), length(Failed || `[]`)]' --output text) || true
  if [ "${failed:-1}" != 0 ]; then
    log "SendMessageBatch refused ${failed:-all} entries"
    exit 1
  fi
  sent=$((sent + ok))
done < <(python3 "$SCRIPTS/sample_data.py" --batches --count "$SAMPLE_COUNT" --seed "$SAMPLE_SEED")
if [ "$sent" != "$SAMPLE_COUNT" ]; then
  log "sent $sent of $SAMPLE_COUNT sample messages"
  exit 1
fi
log "loaded $sent sample messages into $queue_url (awslocal send-message-batch)"
