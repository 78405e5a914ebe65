-- Least-privilege roles for login-etl. Run as a superuser (or the database owner), with psql:
--
--   psql "postgresql://postgres@localhost:5432/postgres" -v ON_ERROR_STOP=1 -f database/roles.sql
--
-- Idempotent. Run it again after the ETL's first start (to grant on the tables the ETL created)
-- and after upgrades that add a view. Options (psql -v NAME=VALUE): schema (default: the current
-- schema), etl_role, analyst_role, unmask_role, auditor_role (defaults login_etl, login_analyst,
-- login_unmasker, login_auditor). These are group roles (NOLOGIN): give each person or service its
-- own login and grant it one of them, e.g.
--   CREATE ROLE alice LOGIN PASSWORD '...' IN ROLE login_analyst;
--
--   login_etl       owns the ETL's tables: it creates and migrates them at start (CREATE TABLE IF
--                   NOT EXISTS, CREATE OR REPLACE VIEW need CREATE on the schema and ownership);
--                   inserts, and updates (rekey); owns and so refreshes the snapshot (`snapshot`).
--                   No right on pii_unmask_audit. `replay` runs as this
--                   role (it loads into its tables): INSERT on etl_replay_audit, only the columns the
--                   client states; who, when and from where come from the server (replay_audit.sql).
--   login_analyst   SELECT on user_logins, user_login_duplicates, user_login_duplicates_snapshot (its
--                   all-time copy), user_login_duplicates_snapshot_refreshed (when that was refreshed)
--                   and user_logins_replayed (which rows a replay loaded) only. Sees
--                   tokens, never values. Cannot refresh the snapshot (the owner, login_etl, does).
--   login_unmasker  INSERT on pii_unmask_audit, and only on the columns the client states (who asks,
--                   why, the token fingerprints and counts): `unmask` writes its audit row. The id,
--                   requested_at, database_user and client_addr come from the server (audit.sql).
--                   Unmasking itself needs the masking key, which no database right gives.
--   login_auditor   SELECT on pii_unmask_audit, and on the view pii_unmask_audit_rows (which stored
--                   rows each audit entry revealed; EXECUTE on the function behind it, which returns
--                   only the rows of the fingerprints it is given), and on etl_replay_audit, without
--                   any right on the ETL's tables.
-- Nobody but the administrator may UPDATE or DELETE audit rows.

\if :{?schema}
\else
SELECT current_schema() AS schema \gset
\endif
\if :{?etl_role}
\else
\set etl_role login_etl
\endif
\if :{?analyst_role}
\else
\set analyst_role login_analyst
\endif
\if :{?unmask_role}
\else
\set unmask_role login_unmasker
\endif
\if :{?auditor_role}
\else
\set auditor_role login_auditor
\endif

SET search_path = :"schema";

SELECT format('CREATE ROLE %I NOLOGIN', r)
  FROM unnest(ARRAY[:'etl_role', :'analyst_role', :'unmask_role', :'auditor_role']) AS r
 WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) \gexec

GRANT USAGE ON SCHEMA :"schema" TO :"etl_role", :"analyst_role", :"unmask_role", :"auditor_role";
GRANT CREATE ON SCHEMA :"schema" TO :"etl_role";

-- The ETL's objects, whoever created them, belong to the ETL role (its start-up migrations need it;
-- so do the daily partitions it creates ahead and `retention` drops: docs/partitions.md).
-- The snapshot too: REFRESH MATERIALIZED VIEW needs ownership (PostgreSQL 15), so only the ETL role
-- refreshes it (`python main.py snapshot`), and records when in user_login_duplicates_snapshot_refreshed;
-- analysts only read both.
SELECT format('ALTER %s %I.%I OWNER TO %I',
              CASE c.relkind WHEN 'v' THEN 'VIEW' WHEN 'm' THEN 'MATERIALIZED VIEW' ELSE 'TABLE' END,
              n.nspname, c.relname, :'etl_role')
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = :'schema' AND c.relkind IN ('r', 'p', 'v', 'm')
   AND (c.relname IN ('user_logins', 'user_logins_rejected', 'etl_schema_version', 'user_login_duplicates',
                      'user_logins_replayed', 'etl_retention_audit', 'user_logins_default', 'user_logins_legacy',
                      'user_login_duplicates_snapshot', 'user_login_duplicates_snapshot_refreshed',
                      'etl_key_checks')
        OR c.relname ~ '^user_logins_p[0-9]{8}$') \gexec

-- The key check values (never a key): `unmask` reads them to tell a token of another key from a
-- tampered one (database/key_checks.py), when the table exists.
SELECT format('GRANT SELECT ON %I.%I TO %I', n.nspname, c.relname, :'unmask_role')
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = :'schema' AND c.relname = 'etl_key_checks' \gexec

-- The audit table: owned by whoever runs this file; append-only for everyone else.
\ir audit.sql
REVOKE ALL ON pii_unmask_audit FROM PUBLIC, :"unmask_role";  -- also an older table-wide INSERT
GRANT INSERT (requested_by, reason, token_count, failed_count, token_fingerprints)
   ON pii_unmask_audit TO :"unmask_role";
GRANT SELECT ON pii_unmask_audit TO :"auditor_role";

-- The replay audit, likewise: the ETL role (which runs `replay`) appends, the auditor reads.
\ir replay_audit.sql
REVOKE ALL ON etl_replay_audit FROM PUBLIC, :"etl_role";
GRANT INSERT (requested_by, reason, dry_run, where_reason, since, examined_count, to_load_count,
              still_failing_count, undecryptable_count, message_ids, to_load_ids)
   ON etl_replay_audit TO :"etl_role";
GRANT SELECT (id) ON etl_replay_audit TO :"etl_role";  -- INSERT … RETURNING id: the audit id, nothing else
GRANT SELECT ON etl_replay_audit TO :"auditor_role";

-- Analysts: user_logins, the duplicates and replayed views, the duplicates snapshot and its refresh
-- time, when they exist; nothing else.
SELECT format('GRANT SELECT ON %I.%I TO %I', n.nspname, c.relname, :'analyst_role')
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = :'schema'
   AND c.relname IN ('user_logins', 'user_login_duplicates', 'user_logins_replayed', 'user_login_duplicates_snapshot',
                     'user_login_duplicates_snapshot_refreshed') \gexec

SELECT to_regclass('user_logins') IS NULL OR to_regclass('user_logins_rejected') IS NULL AS etl_tables_missing \gset
\if :etl_tables_missing
\echo 'roles.sql: user_logins does not exist yet. Start the ETL once as a member of' :"etl_role" 'and run this file again to grant' :"analyst_role" 'read access and create the auditors'' view.'
\else
-- For auditors: the stored rows behind each audit entry, matched by token fingerprint. A view runs
-- with its owner's rights (whoever runs this file), so the auditor needs none on the ETL's tables,
-- and sees which message and user a value was revealed for, never a token or a value.
-- The rows are found by a function that names its tables at each call: a view over the tables would
-- stay bound to the table it was made on, and the ETL's migration to daily partitions renames
-- user_logins to user_logins_legacy and moves its rows out batch by batch (docs/partitions.md), so
-- such a view would see one side only until this file ran again. The function reads user_logins
-- and, while that migration runs, user_logins_legacy (either layout: the original one has no
-- message_id), and returns only the rows of the fingerprints it is given.
CREATE OR REPLACE FUNCTION pii_unmask_fingerprint_rows(fingerprints text[])
    RETURNS TABLE (fingerprint text, source_table text, message_id text, user_id text, field text)
    LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, :"schema" AS $$
#variable_conflict use_column
DECLARE
    login_table text;
BEGIN
    FOREACH login_table IN ARRAY ARRAY['user_logins', 'user_logins_legacy'] LOOP
        CONTINUE WHEN to_regclass(login_table) IS NULL;
        RETURN QUERY EXECUTE format(
            $q$SELECT m.fingerprint, 'user_logins'::text, m.message_id, m.user_id, m.field
                 FROM (SELECT left(encode(sha256(convert_to(v.token, 'UTF8')), 'hex'), 16) AS fingerprint,
                              to_jsonb(l) ->> 'message_id' AS message_id, l.user_id::text AS user_id, v.field
                         FROM %I l CROSS JOIN LATERAL (VALUES ('ip'::text, l.masked_ip::text),
                                                             ('device_id', l.masked_device_id::text),
                                                             ('ip_network', to_jsonb(l) ->> 'masked_network'))
                                                      AS v(field, token)
                        WHERE v.token IS NOT NULL) m
                WHERE m.fingerprint = ANY ($1)$q$,
            login_table) USING fingerprints;
    END LOOP;
    RETURN QUERY
    SELECT r.fingerprint, 'user_logins_rejected'::text, r.message_id::text, NULL::text, 'encrypted_body'::text
      FROM (SELECT left(encode(sha256(convert_to(j.encrypted_body, 'UTF8')), 'hex'), 16) AS fingerprint, j.message_id
              FROM user_logins_rejected j) r
     WHERE r.fingerprint = ANY (fingerprints);
END $$;
REVOKE ALL ON FUNCTION pii_unmask_fingerprint_rows(text[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pii_unmask_fingerprint_rows(text[]) TO :"auditor_role";
-- Dropped and made again: an older definition (over the tables) had other column types.
DROP VIEW IF EXISTS pii_unmask_audit_rows;
CREATE VIEW pii_unmask_audit_rows AS
SELECT a.id AS audit_id, a.requested_at, a.requested_by, a.database_user, a.reason, f.fingerprint,
       m.source_table, m.message_id, m.user_id, m.field
  FROM pii_unmask_audit a
 CROSS JOIN LATERAL unnest(a.token_fingerprints) AS f(fingerprint)
  JOIN pii_unmask_fingerprint_rows(ARRAY(SELECT DISTINCT unnest(token_fingerprints) FROM pii_unmask_audit)) AS m
    ON m.fingerprint = f.fingerprint;
REVOKE ALL ON pii_unmask_audit_rows FROM PUBLIC;
GRANT SELECT ON pii_unmask_audit_rows TO :"auditor_role";
\endif
