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
# Authentication (MLflow's basic-auth app; on unless MLFLOW_AUTH=none, which only a
# loopback MLFLOW_HOST may use):
#   MLFLOW_AUTH_DATABASE_URI      users and permissions, e.g. postgresql://mlflow:<password>@db-host:5432/mlflow_auth
#   MLFLOW_AUTH_ADMIN_PASSWORD_FILE  a file holding the admin's password (or MLFLOW_AUTH_ADMIN_PASSWORD)
#   MLFLOW_AUTH_ADMIN_USERNAME    (admin)
#   MLFLOW_AUTH_DEFAULT_PERMISSION  what a signed-in user may do where nobody granted more (READ)
#   MLFLOW_FLASK_SERVER_SECRET_KEY  signs the UI's CSRF tokens (default: a new random one per
#                                 start; set it when several server hosts share one address)
# Clients sign in with MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD.
# Optional:
#   MLFLOW_HOST (0.0.0.0)  MLFLOW_PORT (5000)  MLFLOW_WORKERS (4)
#   MLFLOW_ALLOWED_HOSTS   comma-separated Host headers clients use, e.g. "mlflow.internal,mlflow.internal:5000"
#
# The tests start it with PostgreSQL and authentication (the team set-up), and
# with a sqlite backend on loopback without authentication for the rest: same
# script, same flags, so what CI checks is what the team runs.
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

if [[ "${MLFLOW_AUTH:-basic}" == none ]]; then
  case "$host" in
    127.*|localhost|::1) ;;
    *) echo "mlflow/server.sh: MLFLOW_AUTH=none lets anyone who reaches $host:$port delete runs" \
            "and move model aliases; it is only allowed on loopback (MLFLOW_HOST=127.0.0.1)" >&2
       exit 2 ;;
  esac
else
  if [[ -z "${MLFLOW_AUTH_DATABASE_URI:-}" ]]; then
    echo "mlflow/server.sh: set MLFLOW_AUTH_DATABASE_URI (users and permissions), e.g." \
         "postgresql://mlflow:secret@db:5432/mlflow_auth, or MLFLOW_AUTH=none on loopback" >&2
    exit 2
  fi
  if [[ -n "${MLFLOW_AUTH_ADMIN_PASSWORD_FILE:-}" ]]; then
    MLFLOW_AUTH_ADMIN_PASSWORD="$(<"$MLFLOW_AUTH_ADMIN_PASSWORD_FILE")"
  fi
  case "${MLFLOW_AUTH_ADMIN_PASSWORD:-}" in
    "") echo "mlflow/server.sh: set MLFLOW_AUTH_ADMIN_PASSWORD_FILE (or MLFLOW_AUTH_ADMIN_PASSWORD) to the admin's password" >&2
        exit 2 ;;
    password1234|admin|password)
        echo "mlflow/server.sh: refusing a well-known admin password; choose another" >&2
        exit 2 ;;
  esac
  python -c "import flask_wtf" 2>/dev/null || {
      echo "mlflow/server.sh: the basic-auth app needs Flask-WTF: pip install 'mlflow[auth]'" >&2; exit 2; }
  export MLFLOW_AUTH_ADMIN_USERNAME="${MLFLOW_AUTH_ADMIN_USERNAME:-admin}" MLFLOW_AUTH_ADMIN_PASSWORD
  # The UI's CSRF tokens are signed with it; every worker of this server inherits this one.
  # Several server hosts behind one address must share it: set it yourself then.
  export MLFLOW_FLASK_SERVER_SECRET_KEY="${MLFLOW_FLASK_SERVER_SECRET_KEY:-$(python -c 'import secrets; print(secrets.token_hex(32))')}"
  # MLflow reads the auth settings from an ini file; this one is private to this server.
  config="$(mktemp -t mlflow-auth.XXXXXX.ini)"
  trap 'rm -f "$config"' EXIT
  cat > "$config" <<INI
[mlflow]
default_permission = ${MLFLOW_AUTH_DEFAULT_PERMISSION:-READ}
database_uri = $MLFLOW_AUTH_DATABASE_URI
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
# a checked password is trusted for a minute per worker: without it every request
# pays a full PBKDF2 hash, and a training run logs many
auth_cache_ttl_seconds = 60
INI
  export MLFLOW_AUTH_CONFIG_PATH="$config"
  args+=(--app-name basic-auth)
fi
if [[ -n "${MLFLOW_ALLOWED_HOSTS:-}" ]]; then
  args+=(--allowed-hosts "$MLFLOW_ALLOWED_HOSTS")
fi
if [[ "${MLFLOW_AUTH:-basic}" == none ]]; then
  exec mlflow "${args[@]}"
fi
mlflow "${args[@]}" &  # not exec: the trap removes the ini file when the server ends
server=$!
trap 'kill -TERM "$server" 2>/dev/null; wait "$server"; rm -f "$config"' TERM INT
wait "$server"
