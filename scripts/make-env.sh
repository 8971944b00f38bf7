#!/usr/bin/env bash
# Writes .env for docker compose from .env.example with freshly generated secrets (Postgres and MinIO
# passwords). Refuses to overwrite an existing .env: the Postgres volume keeps the password it was created with.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -e .env ]; then
    echo ".env exists; leaving it as it is (delete it first to generate new secrets)" >&2
    exit 1
fi
secret() { python3 -c 'import secrets; print(secrets.token_urlsafe(24))'; }
umask 077
sed -e "s|^POSTGRES_PASSWORD=.*|POSTGRES_PASSWORD=$(secret)|" \
    -e "s|^MINIO_ROOT_PASSWORD=.*|MINIO_ROOT_PASSWORD=$(secret)|" \
    .env.example > .env
echo "wrote .env (mode 600) with generated Postgres and MinIO passwords; next: docker compose up -d --build"
