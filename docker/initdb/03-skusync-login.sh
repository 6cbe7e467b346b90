#!/bin/sh
# Give the skusync role (sql/setup.sql) a password. Runs once, on an empty data
# directory. No pg_hba.conf change is needed: logical replication connections match the
# database column, so the image's "host all all all scram-sha-256" covers them.
set -eu
# \getenv reads the password inside psql: it never appears in psql's argv.
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<'SQL'
\getenv pw SKUSYNC_PG_PASSWORD
ALTER ROLE skusync PASSWORD :'pw';
SQL
