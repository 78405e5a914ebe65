#!/usr/bin/env bash
# Create login-queue with a dead-letter queue and a RedrivePolicy. Idempotent: a second run
# changes nothing. Uses awslocal, so it works unchanged as a LocalStack init hook
# (/etc/localstack/init/ready.d/) and against the embedded emulator on the host.
#
#   QUEUE_NAME (login-queue)  DLQ_NAME (<queue>-dlq)  MAX_RECEIVE_COUNT (10)
#   VISIBILITY_TIMEOUT (30)
set -euo pipefail
export DISABLE_DEPRECATION_NOTICE=1
QUEUE_NAME=${QUEUE_NAME:-login-queue}
DLQ_NAME=${DLQ_NAME:-$QUEUE_NAME-dlq}
# SQS moves a message to the DLQ after this many receives. The ETL quarantines a message that
# keeps failing for other reasons earlier (see README), so the DLQ is the last resort.
MAX_RECEIVE_COUNT=${MAX_RECEIVE_COUNT:-10}
VISIBILITY_TIMEOUT=${VISIBILITY_TIMEOUT:-30}

dlq_url=$(awslocal sqs create-queue --queue-name "$DLQ_NAME" \
  --attributes MessageRetentionPeriod=1209600 --query QueueUrl --output text)
dlq_arn=$(awslocal sqs get-queue-attributes --queue-url "$dlq_url" --attribute-names QueueArn \
  --query Attributes.QueueArn --output text)
queue_url=$(awslocal sqs create-queue --queue-name "$QUEUE_NAME" --query QueueUrl --output text)
redrive="{\\\"deadLetterTargetArn\\\":\\\"$dlq_arn\\\",\\\"maxReceiveCount\\\":\\\"$MAX_RECEIVE_COUNT\\\"}"
awslocal sqs set-queue-attributes --queue-url "$queue_url" \
  --attributes "{\"VisibilityTimeout\":\"$VISIBILITY_TIMEOUT\",\"RedrivePolicy\":\"$redrive\"}"
echo "queue ready: $queue_url (dead letters: $dlq_url after $MAX_RECEIVE_COUNT receives)"
