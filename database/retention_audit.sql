-- etl_retention_audit: one row per partition dropped or batch of rows deleted by `python main.py
-- retention` (database/retention.py), committed with the drop or delete it records. Used by
-- database/retention.py (created on first use only by the administrator: database/audit_tables.py)
-- and by database/roles.sql (\ir), which grants the ETL role INSERT on the columns it states; when and
-- which database user come from the server (their defaults). Functions are qualified: this file also
-- runs with the ETL's schema on the search path.
CREATE TABLE IF NOT EXISTS etl_retention_audit (
    id            bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_at        timestamptz NOT NULL DEFAULT pg_catalog.now(),
    database_user text        NOT NULL DEFAULT session_user,
    requested_by  text        NOT NULL,
    keep_days     integer     NOT NULL,
    cutoff        date        NOT NULL,
    action        text        NOT NULL,
    object        text        NOT NULL,
    rows          bigint      NOT NULL
);
