#!/bin/sh
# Give the skusync role (sql/setup.sql) a password and allow its replication
# connections from other containers. Runs once, on an empty data directory.
set -eu
psql -v ON_ERROR_STOP=1 -v pw="$SKUSYNC_PG_PASSWORD" \
     --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<'SQL'
ALTER ROLE skusync PASSWORD :'pw';
SQL
# "host all all all" (added by the image) does not cover replication connections
echo "host replication skusync all scram-sha-256" >> "$PGDATA/pg_hba.conf"
