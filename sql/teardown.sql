-- Remove everything sql/setup.sql and `skusync run` created. Stop skusync first
-- (an active slot cannot be dropped). Run as a superuser in the inventory database:
--
--   psql -v ON_ERROR_STOP=1 -d inventory -f sql/teardown.sql
--
-- Dropping the slot releases the WAL it retains. Redis keeps its data; delete the
-- <prefix>:* keys there if you want them gone too.

-- The slot is skusync's default name (postgres.slot): edit it here if yours differs. An
-- active slot stops the script before anything is dropped: a role dropped under a running
-- skusync would leave its slot behind, retaining WAL for good.
DO $$
DECLARE
    pid int;
BEGIN
    SELECT active_pid INTO pid FROM pg_replication_slots WHERE slot_name = 'skusync' AND active;
    IF FOUND THEN
        RAISE EXCEPTION 'replication slot skusync is streamed by process % (a running skusync): stop it, then run this script again', pid;
    END IF;
END
$$;

SELECT pg_drop_replication_slot(slot_name)
  FROM pg_replication_slots
 WHERE slot_name = 'skusync';

DROP PUBLICATION IF EXISTS skusync;
DROP PUBLICATION IF EXISTS skusync_activity;

DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'skusync') THEN
        EXECUTE format('REVOKE ALL ON DATABASE %I FROM skusync', current_database());
        REVOKE ALL ON ALL TABLES IN SCHEMA public FROM skusync;
        REVOKE USAGE ON SCHEMA public FROM skusync;
        DROP ROLE skusync;
    END IF;
END
$$;
