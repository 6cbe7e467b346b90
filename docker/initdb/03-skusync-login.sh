#!/bin/sh
# Give the skusync role (sql/setup.sql) a password. Runs once, on an empty data
# directory. No pg_hba.conf change is needed: logical replication connections match the
# database column, so the image's "host all all all scram-sha-256" covers them.
set -eu
psql -v ON_ERROR_STOP=1 -v pw="$SKUSYNC_PG_PASSWORD" \
     --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<'SQL'
ALTER ROLE skusync PASSWORD :'pw';
SQL
