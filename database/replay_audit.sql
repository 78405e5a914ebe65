-- etl_replay_audit: one row per `python main.py replay` call (dry runs too), committed before any
-- quarantined message moves. Who asked and why, the filter, the counts and the message ids; never a
-- value or a body. Used by database/replay.py (created on first use only by the administrator: audit_tables.py) and by
-- database/roles.sql (\ir). As for pii_unmask_audit (audit.sql), who, when and from where come from
-- the server: roles.sql grants INSERT on the other columns only, and the trigger below overwrites
-- these three on every insert, whoever inserts.
CREATE TABLE IF NOT EXISTS etl_replay_audit (
    id                  bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    requested_at        timestamptz NOT NULL DEFAULT pg_catalog.now(),
    requested_by        text        NOT NULL CHECK (pg_catalog.btrim(requested_by) <> '' AND pg_catalog.length(requested_by) <= 128),
    database_user       text        NOT NULL DEFAULT session_user,
    client_addr         inet                 DEFAULT pg_catalog.inet_client_addr(),
    reason              text        NOT NULL CHECK (pg_catalog.btrim(reason) <> '' AND pg_catalog.length(reason) <= 1000),
    dry_run             boolean     NOT NULL,
    where_reason        text,
    since               timestamptz,
    examined_count      integer     NOT NULL CHECK (examined_count = to_load_count + still_failing_count
                                                          + undecryptable_count),
    to_load_count       integer     NOT NULL CHECK (to_load_count >= 0),
    still_failing_count integer     NOT NULL CHECK (still_failing_count >= 0),
    undecryptable_count integer     NOT NULL CHECK (undecryptable_count >= 0),
    -- every message examined, and those that passed today's validation
    message_ids         text[]      NOT NULL CHECK (pg_catalog.cardinality(message_ids) = examined_count),
    to_load_ids         text[]      NOT NULL CHECK (pg_catalog.cardinality(to_load_ids) = to_load_count)
);

CREATE OR REPLACE FUNCTION etl_replay_audit_server_columns() RETURNS trigger
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    NEW.requested_at  := pg_catalog.now();
    NEW.database_user := session_user;
    NEW.client_addr   := pg_catalog.inet_client_addr();
    RETURN NEW;
END $$;
DROP TRIGGER IF EXISTS etl_replay_audit_server_columns ON etl_replay_audit;
CREATE TRIGGER etl_replay_audit_server_columns BEFORE INSERT ON etl_replay_audit
    FOR EACH ROW EXECUTE FUNCTION etl_replay_audit_server_columns();
