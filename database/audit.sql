-- pii_unmask_audit: one row per `python main.py unmask` call, committed before any value is shown.
-- Never a plaintext value or a token: tokens are named by a SHA-256 prefix (models.token_fingerprint).
-- Used by database/audit.py (created on first use only by the administrator: audit_tables.py) and by database/roles.sql (\ir).
-- Who, when and from where come from the server, never from the client: roles.sql grants the
-- unmasker INSERT on the other columns only, and the trigger below overwrites these three on every
-- insert, whoever inserts (even a role with INSERT on the whole table, or the owner).
CREATE TABLE IF NOT EXISTS pii_unmask_audit (
    id                 bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    requested_at       timestamptz NOT NULL DEFAULT pg_catalog.now(),
    requested_by       text        NOT NULL CHECK (pg_catalog.btrim(requested_by) <> '' AND pg_catalog.length(requested_by) <= 128),
    database_user      text        NOT NULL DEFAULT session_user,
    client_addr        inet                 DEFAULT pg_catalog.inet_client_addr(),
    reason             text        NOT NULL CHECK (pg_catalog.btrim(reason) <> '' AND pg_catalog.length(reason) <= 1000),
    token_count        integer     NOT NULL CHECK (token_count > 0),
    failed_count       integer     NOT NULL DEFAULT 0 CHECK (failed_count BETWEEN 0 AND token_count),
    token_fingerprints text[]      NOT NULL CHECK (pg_catalog.cardinality(token_fingerprints) = token_count)
);

CREATE OR REPLACE FUNCTION pii_unmask_audit_server_columns() RETURNS trigger
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    NEW.requested_at  := pg_catalog.now();
    NEW.database_user := session_user;
    NEW.client_addr   := pg_catalog.inet_client_addr();
    RETURN NEW;
END $$;
DROP TRIGGER IF EXISTS pii_unmask_audit_server_columns ON pii_unmask_audit;
CREATE TRIGGER pii_unmask_audit_server_columns BEFORE INSERT ON pii_unmask_audit
    FOR EACH ROW EXECUTE FUNCTION pii_unmask_audit_server_columns();
