#!/usr/bin/env bash
# A shared MLflow tracking server for a team (see mlflow/README.md).
#
# Runs and the model registry go to a real database (PostgreSQL), artifacts to
# an object store (S3, MinIO or any S3-compatible store) or a shared
# filesystem. The server proxies artifacts (--serve-artifacts), so clients
# need only MLFLOW_TRACKING_URI=http://<host>:<port>, no bucket credentials.
#
# Required:
#   MLFLOW_BACKEND_STORE_URI      postgresql://mlflow:<password>@db-host:5432/mlflow
#   MLFLOW_ARTIFACTS_DESTINATION  s3://<bucket>/mlflow   or   /mnt/shared/mlflow-artifacts
# For S3/MinIO (read by boto3 on the server only):
#   AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, and for MinIO MLFLOW_S3_ENDPOINT_URL=http://minio:9000
# Optional:
#   MLFLOW_HOST (0.0.0.0)  MLFLOW_PORT (5000)  MLFLOW_WORKERS (4)
#   MLFLOW_ALLOWED_HOSTS   comma-separated Host headers clients use, e.g. "mlflow.internal,mlflow.internal:5000"
#
# The tests start it with a sqlite backend and a local folder (same script,
# same flags), so what CI checks is what the team runs.
set -euo pipefail

: "${MLFLOW_BACKEND_STORE_URI:?set MLFLOW_BACKEND_STORE_URI, e.g. postgresql://mlflow:secret@db:5432/mlflow}"
: "${MLFLOW_ARTIFACTS_DESTINATION:?set MLFLOW_ARTIFACTS_DESTINATION, e.g. s3://team-bucket/mlflow}"
host="${MLFLOW_HOST:-0.0.0.0}"
port="${MLFLOW_PORT:-5000}"
workers="${MLFLOW_WORKERS:-4}"

case "$MLFLOW_BACKEND_STORE_URI" in
  postgresql*) python -c "import psycopg2" 2>/dev/null || {
      echo "mlflow/server.sh: the PostgreSQL backend needs psycopg2: pip install psycopg2-binary" >&2; exit 2; } ;;
esac
case "$MLFLOW_ARTIFACTS_DESTINATION" in
  s3://*) python -c "import boto3" 2>/dev/null || {
      echo "mlflow/server.sh: an s3:// artifact store needs boto3: pip install boto3" >&2; exit 2; } ;;
esac

export MLFLOW_DISABLE_TELEMETRY="${MLFLOW_DISABLE_TELEMETRY:-true}"
# MLflow's background job runner (GenAI trace jobs) starts several worker
# processes this pipeline never uses; set it to true if you use those features.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
args=(server
  --backend-store-uri "$MLFLOW_BACKEND_STORE_URI"
  --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION"
  --serve-artifacts
  --host "$host" --port "$port" --workers "$workers")
if [[ -n "${MLFLOW_ALLOWED_HOSTS:-}" ]]; then
  args+=(--allowed-hosts "$MLFLOW_ALLOWED_HOSTS")
fi
exec mlflow "${args[@]}"
