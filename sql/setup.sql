-- Least-privilege setup for skusync. Run as a superuser (or the tables' owner with
-- CREATEROLE) in the inventory database, after the tables exist:
--
--   psql -v ON_ERROR_STOP=1 -d inventory -f sql/setup.sql
--   psql -d inventory -c '\password skusync'
--
-- The server needs wal_level = logical (restart) and free max_replication_slots /
-- max_wal_senders. Set max_slot_wal_keep_size so a stopped skusync cannot fill the disk.
--
-- What skusync needs:
--   LOGIN REPLICATION       stream the slot; create it on first start
--   SELECT on mapped tables the snapshot load (first start, resync)
--   nothing else: no ownership, no superuser, no write access.
-- pg_logical_emit_message() (postgres.heartbeat_interval_ms) and pg_current_wal_lsn()
-- (the slot-lag metric) are executable by every role.

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'skusync') THEN
        CREATE ROLE skusync LOGIN REPLICATION;
    ELSE
        ALTER ROLE skusync LOGIN REPLICATION NOSUPERUSER NOCREATEDB NOCREATEROLE;
    END IF;
END
$$;

-- Stock tables publish every change (insert, update, delete, truncate).
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_publication WHERE pubname = 'skusync') THEN
        CREATE PUBLICATION skusync FOR TABLE public.inventory;
    END IF;
    -- Activity logs publish inserts only: retention deletes never reach skusync.
    IF NOT EXISTS (SELECT FROM pg_publication WHERE pubname = 'skusync_activity') THEN
        CREATE PUBLICATION skusync_activity FOR TABLE public.activity_log
            WITH (publish = 'insert');
    END IF;
END
$$;

-- The snapshot reads the mapped tables (and only those).
GRANT USAGE ON SCHEMA public TO skusync;
GRANT SELECT ON public.inventory, public.activity_log TO skusync;
DO $$
BEGIN
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO skusync', current_database());
END
$$;
