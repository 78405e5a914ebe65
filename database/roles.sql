-- Least-privilege roles for login-etl. Run as a superuser, with psql:
--
--   psql "postgresql://postgres@localhost:5432/postgres" -v ON_ERROR_STOP=1 -f database/roles.sql
--
-- Idempotent, in one transaction. Run it again after the ETL's first start (to grant on the tables
-- the ETL created) and after upgrades that add a view. Options (psql -v NAME=VALUE): schema (default:
-- the current schema), etl_role, analyst_role, unmask_role, auditor_role, definer_role (defaults
-- login_etl, login_analyst, login_unmasker, login_auditor, login_audit_definer). The first four are
-- group roles (NOLOGIN): give each person or service its own login and grant it one of them, e.g.
--   CREATE ROLE alice LOGIN PASSWORD '...' IN ROLE login_analyst;
--
--   login_etl       owns the ETL's tables: it creates and migrates them at start (CREATE TABLE IF
--                   NOT EXISTS, CREATE OR REPLACE VIEW need CREATE on the schema and ownership);
--                   inserts, and updates (rekey); owns and so refreshes the snapshot (`snapshot`).
--                   No right on pii_unmask_audit. `replay` and `retention` run as this role: INSERT on
--                   etl_replay_audit and etl_retention_audit, only the columns the client states.
--   login_analyst   SELECT on user_logins, user_login_duplicates, user_login_duplicates_snapshot (its
--                   all-time copy), user_login_duplicates_snapshot_refreshed (when that was refreshed)
--                   and user_logins_replayed (which rows a replay loaded) only. Sees
--                   tokens, never values. Cannot refresh the snapshot (the owner, login_etl, does).
--   login_unmasker  INSERT on pii_unmask_audit, and only on the columns the client states (who asks,
--                   why, the token fingerprints and counts): `unmask` writes its audit row. The id,
--                   requested_at, database_user and client_addr come from the server (audit.sql).
--                   Unmasking itself needs the masking key, which no database right gives.
--   login_auditor   SELECT on the three audit tables and on the view pii_unmask_audit_rows (which
--                   stored rows each audit entry revealed; EXECUTE on the function behind it, which
--                   returns only the rows of the fingerprints it is given), without any right on the
--                   ETL's tables.
--   login_audit_definer  NOLOGIN, no members: owns that SECURITY DEFINER function and may read only
--                   the tables it reads. Worth nothing to anyone who could make it run their code.
--
-- The audit tables (pii_unmask_audit, etl_replay_audit, etl_retention_audit) belong to whoever runs
-- this file: nobody else may UPDATE, DELETE or TRUNCATE a row or change the table. One that another
-- role made (a command run without this file: the ETL role could then change it) is made again by
-- this file, its rows copied, and the old table dropped with whatever its owner attached to it.
--
-- The ETL role may create objects in its schema, so nothing here resolves a name through that
-- schema: the search path is pg_catalog, pg_temp, every name of ours is qualified, and what this file
-- makes in the schema (the view, the functions) is dropped and made again at each run, whoever made
-- an object of that name before. docs/keys-and-privacy.md has the threat model.

\set ON_ERROR_STOP 1
\if :{?schema}
\else
SELECT pg_catalog.current_schema() AS schema \gset
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
\if :{?definer_role}
\else
\set definer_role login_audit_definer
\endif

BEGIN;
SET LOCAL search_path = pg_catalog, pg_temp;
-- A row security policy on a table another role owns would run its owner's expression as us.
SET LOCAL row_security = off;

SELECT n.oid AS schema_oid FROM pg_catalog.pg_namespace n WHERE n.nspname OPERATOR(pg_catalog.=) :'schema' \gset

SELECT pg_catalog.format('CREATE ROLE %I NOLOGIN', r)
  FROM pg_catalog.unnest(ARRAY[:'etl_role', :'analyst_role', :'unmask_role', :'auditor_role',
                               :'definer_role']::pg_catalog.text[]) AS r
 WHERE NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname OPERATOR(pg_catalog.=) r) \gexec

-- The definer role can log in as nobody and nobody can become it (SET ROLE): it owns code that runs
-- with its rights. A membership granted by mistake, either way, is revoked here.
ALTER ROLE :"definer_role" NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS NOINHERIT;
SELECT pg_catalog.format('REVOKE %I FROM %I', g.rolname, m.rolname)
  FROM pg_catalog.pg_auth_members a
  JOIN pg_catalog.pg_roles g ON g.oid OPERATOR(pg_catalog.=) a.roleid
  JOIN pg_catalog.pg_roles m ON m.oid OPERATOR(pg_catalog.=) a.member
 WHERE :'definer_role' OPERATOR(pg_catalog.=) ANY (ARRAY[g.rolname, m.rolname]::pg_catalog.text[]) \gexec

GRANT USAGE ON SCHEMA :"schema" TO :"etl_role", :"analyst_role", :"unmask_role", :"auditor_role", :"definer_role";
GRANT CREATE ON SCHEMA :"schema" TO :"etl_role";

-- The ETL's objects, whoever created them, belong to the ETL role (its start-up migrations need it;
-- so do the daily partitions it creates ahead and `retention` drops: docs/partitions.md).
-- The snapshot too: REFRESH MATERIALIZED VIEW needs ownership (PostgreSQL 15), so only the ETL role
-- refreshes it (`python main.py snapshot`), and records when in user_login_duplicates_snapshot_refreshed;
-- analysts only read both.
SELECT pg_catalog.format('ALTER %s %I.%I OWNER TO %I',
              CASE c.relkind WHEN 'v' THEN 'VIEW' WHEN 'm' THEN 'MATERIALIZED VIEW' WHEN 'S' THEN 'SEQUENCE'
                             ELSE 'TABLE' END,
              :'schema', c.relname, :'etl_role')
  FROM pg_catalog.pg_class c
 WHERE c.relnamespace OPERATOR(pg_catalog.=) :schema_oid
   AND c.relkind OPERATOR(pg_catalog.=) ANY (ARRAY['r', 'p', 'v', 'm', 'S']::"char"[])
   AND (c.relname OPERATOR(pg_catalog.=) ANY (ARRAY['user_logins', 'user_logins_rejected', 'etl_schema_version',
                      'user_login_duplicates', 'user_logins_replayed', 'user_logins_default', 'user_logins_legacy',
                      'user_login_duplicates_snapshot', 'user_login_duplicates_snapshot_refreshed',
                      'etl_key_checks', 'etl_quarantine_epoch']::pg_catalog.name[])
        OR c.relname OPERATOR(pg_catalog.~) '^user_logins_p[0-9]{8}$') \gexec


-- The key check values (never a key): `unmask` reads them to tell a token of another key from a
-- tampered one (database/key_checks.py), when the table exists.
SELECT pg_catalog.format('GRANT SELECT ON %I.%I TO %I', :'schema', c.relname, :'unmask_role')
  FROM pg_catalog.pg_class c
 WHERE c.relnamespace OPERATOR(pg_catalog.=) :schema_oid
   AND c.relname OPERATOR(pg_catalog.=) 'etl_key_checks' \gexec

-- The functions this file makes in the schema, and the view, are made again below; one of those
-- names that the administrator does not own (the ETL role may create in the schema) is dropped now.
DROP VIEW IF EXISTS :"schema".pii_unmask_audit_rows;
DROP FUNCTION IF EXISTS :"schema".pii_unmask_fingerprint_rows(pg_catalog.text[]);
SELECT pg_catalog.format('DROP FUNCTION %s CASCADE', p.oid::pg_catalog.regprocedure)
  FROM pg_catalog.pg_proc p
 WHERE p.pronamespace OPERATOR(pg_catalog.=) :schema_oid
   AND p.proname OPERATOR(pg_catalog.=) ANY (ARRAY['pii_unmask_audit_server_columns', 'etl_replay_audit_server_columns',
                                                   'pii_unmask_fingerprint_rows']::pg_catalog.name[])
   AND p.proowner OPERATOR(pg_catalog.<>) (SELECT r.oid FROM pg_catalog.pg_roles r
                                            WHERE r.rolname OPERATOR(pg_catalog.=) CURRENT_USER) \gexec

-- An audit table the administrator does not own is set aside (renamed) before its file makes the
-- table again, and its rows are copied into the new one afterwards (audit_take_back).
CREATE FUNCTION pg_temp.audit_set_aside(nsp pg_catalog.oid, tab pg_catalog.name) RETURNS pg_catalog.text
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    rel record;
    aside text;
BEGIN
    SELECT c.oid, c.relkind, c.relowner INTO rel
      FROM pg_class c WHERE c.relnamespace = nsp AND c.relname = tab;
    IF NOT FOUND OR (rel.relkind = 'r' AND pg_get_userbyid(rel.relowner) = current_user) THEN
        RETURN '';
    END IF;
    IF rel.relkind <> 'r' THEN
        RAISE EXCEPTION 'roles.sql: %, owned by %, is not a table (relkind %): not an audit table. Look at it, drop it, and run roles.sql again',
            rel.oid::regclass, pg_get_userbyid(rel.relowner), rel.relkind;
    END IF;
    aside := format('%s_before_%s', tab, to_char(clock_timestamp(), 'YYYYMMDDHH24MISSUS'));
    EXECUTE format('ALTER TABLE %s RENAME TO %I', rel.oid::regclass, aside);
    RETURN aside;
END $$;

CREATE FUNCTION pg_temp.audit_take_back(nsp pg_catalog.oid, tab pg_catalog.name, aside pg_catalog.text)
    RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    fresh oid;
    old oid;
    columns text;
    identity text;
BEGIN
    IF aside = '' THEN
        RETURN;
    END IF;
    SELECT c.oid INTO fresh FROM pg_class c WHERE c.relnamespace = nsp AND c.relname = tab;
    SELECT c.oid INTO old FROM pg_class c WHERE c.relnamespace = nsp AND c.relname = aside;
    -- The columns both have, of one type: no cast (a cast of the old owner's type could be its code).
    IF EXISTS (SELECT FROM pg_attribute f JOIN pg_attribute o ON o.attrelid = old AND o.attname = f.attname
                WHERE f.attrelid = fresh AND f.attnum > 0 AND NOT f.attisdropped AND NOT o.attisdropped
                  AND o.atttypid <> f.atttypid) THEN
        RAISE EXCEPTION 'roles.sql: the columns of % are not of the types of %: copy its rows by hand', old::regclass, fresh::regclass;
    END IF;
    SELECT string_agg(quote_ident(f.attname), ', ' ORDER BY f.attnum) INTO columns
      FROM pg_attribute f JOIN pg_attribute o ON o.attrelid = old AND o.attname = f.attname AND NOT o.attisdropped
     WHERE f.attrelid = fresh AND f.attnum > 0 AND NOT f.attisdropped;
    -- Who and when as recorded then: the server-columns trigger is off while the rows are copied.
    EXECUTE format('ALTER TABLE %s DISABLE TRIGGER USER', fresh::regclass);
    EXECUTE format('INSERT INTO %s (%s) OVERRIDING SYSTEM VALUE SELECT %s FROM ONLY %s',
                   fresh::regclass, columns, columns, old::regclass);
    EXECUTE format('ALTER TABLE %s ENABLE TRIGGER USER', fresh::regclass);
    identity := pg_get_serial_sequence(fresh::regclass::text, 'id');
    IF identity IS NOT NULL THEN
        EXECUTE format('SELECT pg_catalog.setval(%L, coalesce((SELECT max(id) FROM %s), 0) + 1, false)',
                       identity, fresh::regclass);
    END IF;
    EXECUTE format('DROP TABLE %s CASCADE', old::regclass);
    RAISE NOTICE 'roles.sql: % was owned by another role; made again, its rows copied', fresh::regclass;
END $$;

-- The audit files name the table unqualified (database/audit_tables.py runs them as well): only
-- while they run is the search path the schema, with pg_catalog (implicitly first) and every
-- function in them qualified.
SELECT pg_temp.audit_set_aside(:schema_oid, 'pii_unmask_audit') AS aside \gset
SET LOCAL search_path = :"schema";
\ir audit.sql
SET LOCAL search_path = pg_catalog, pg_temp;
SELECT pg_temp.audit_take_back(:schema_oid, 'pii_unmask_audit', :'aside');

SELECT pg_temp.audit_set_aside(:schema_oid, 'etl_replay_audit') AS aside \gset
SET LOCAL search_path = :"schema";
\ir replay_audit.sql
SET LOCAL search_path = pg_catalog, pg_temp;
SELECT pg_temp.audit_take_back(:schema_oid, 'etl_replay_audit', :'aside');

SELECT pg_temp.audit_set_aside(:schema_oid, 'etl_retention_audit') AS aside \gset
SET LOCAL search_path = :"schema";
\ir retention_audit.sql
SET LOCAL search_path = pg_catalog, pg_temp;
SELECT pg_temp.audit_take_back(:schema_oid, 'etl_retention_audit', :'aside');

-- Append-only for the role that writes each, readable by the auditor; nothing for anyone else.
REVOKE ALL ON :"schema".pii_unmask_audit, :"schema".etl_replay_audit, :"schema".etl_retention_audit
  FROM PUBLIC, :"etl_role", :"analyst_role", :"unmask_role", :"auditor_role", :"definer_role";
GRANT INSERT (requested_by, reason, token_count, failed_count, token_fingerprints)
   ON :"schema".pii_unmask_audit TO :"unmask_role";
GRANT INSERT (requested_by, reason, dry_run, where_reason, since, examined_count, to_load_count,
              still_failing_count, undecryptable_count, message_ids, to_load_ids)
   ON :"schema".etl_replay_audit TO :"etl_role";
GRANT SELECT (id) ON :"schema".etl_replay_audit TO :"etl_role";  -- INSERT … RETURNING id: the audit id, nothing else
GRANT INSERT (requested_by, keep_days, cutoff, action, object, rows) ON :"schema".etl_retention_audit TO :"etl_role";
GRANT SELECT ON :"schema".pii_unmask_audit, :"schema".etl_replay_audit, :"schema".etl_retention_audit
   TO :"auditor_role";

-- Analysts: user_logins, the duplicates and replayed views, the duplicates snapshot and its refresh
-- time, when they exist; nothing else.
SELECT pg_catalog.format('GRANT SELECT ON %I.%I TO %I', :'schema', c.relname, :'analyst_role')
  FROM pg_catalog.pg_class c
 WHERE c.relnamespace OPERATOR(pg_catalog.=) :schema_oid
   AND c.relname OPERATOR(pg_catalog.=) ANY (ARRAY['user_logins', 'user_login_duplicates', 'user_logins_replayed',
                     'user_login_duplicates_snapshot', 'user_login_duplicates_snapshot_refreshed']::pg_catalog.name[]) \gexec

SELECT NOT (EXISTS (SELECT FROM pg_catalog.pg_class c WHERE c.relnamespace OPERATOR(pg_catalog.=) :schema_oid
                                                       AND c.relname OPERATOR(pg_catalog.=) 'user_logins')
            AND EXISTS (SELECT FROM pg_catalog.pg_class c WHERE c.relnamespace OPERATOR(pg_catalog.=) :schema_oid
                                                           AND c.relname OPERATOR(pg_catalog.=) 'user_logins_rejected'))
       AS etl_tables_missing \gset
\if :etl_tables_missing
\echo 'roles.sql: user_logins does not exist yet. Start the ETL once as a member of' :"etl_role" 'and run this file again to grant' :"analyst_role" 'read access and create the auditors'' view.'
\else
-- For auditors: the stored rows behind each audit entry, matched by token fingerprint; an entry
-- whose fingerprints match no stored row is listed too, with empty row columns. The auditor needs
-- no right on the ETL's tables: the view reads the audit table with its owner's rights, and the
-- rows come from a SECURITY DEFINER function owned by the definer role, which may read only the
-- tables it reads. It names its tables at each call (the ETL's migration to daily partitions renames
-- user_logins to user_logins_legacy and moves its rows out batch by batch: docs/partitions.md), reads
-- only a table (a view or a policy of the ETL role would be its code) whose columns are text, and
-- qualifies every function and operator; it returns only the rows of the fingerprints it is given.
-- The definer role may read only these tables.
REVOKE ALL ON ALL TABLES IN SCHEMA :"schema" FROM :"definer_role";
-- Whole tables, not columns: the ETL's migration to partitions carries a table's grants (not its
-- column grants) over to the new user_logins.
SELECT pg_catalog.format('GRANT SELECT ON %I.%I TO %I', :'schema', c.relname, :'definer_role')
  FROM pg_catalog.pg_class c
 WHERE c.relnamespace OPERATOR(pg_catalog.=) :schema_oid
   AND c.relname OPERATOR(pg_catalog.=) ANY (ARRAY['user_logins', 'user_logins_legacy',
                                                   'user_logins_rejected']::pg_catalog.name[]) \gexec

-- Made by format() so that the schema's name is a constant in the body (psql does not substitute
-- variables inside dollar quotes).
SELECT pg_catalog.format($create$
CREATE FUNCTION %I.pii_unmask_fingerprint_rows(fingerprints pg_catalog.text[])
    RETURNS TABLE (fingerprint pg_catalog.text, source_table pg_catalog.text, message_id pg_catalog.text,
                   user_id pg_catalog.text, field pg_catalog.text)
    LANGUAGE plpgsql STABLE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    SET row_security = off
    AS %L$create$, :'schema', pg_catalog.replace($body$
#variable_conflict use_column
DECLARE
    etl_schema constant pg_catalog.text := @schema@;
    login_table pg_catalog.text;
    relation pg_catalog.oid;
    kind "char";
    scan pg_catalog.text;
    message_id_column pg_catalog.text;
    network_row pg_catalog.text;
BEGIN
    FOREACH login_table IN ARRAY ARRAY['user_logins', 'user_logins_legacy', 'user_logins_rejected']::pg_catalog.text[] LOOP
        SELECT c.oid, c.relkind INTO relation, kind
          FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
         WHERE n.nspname OPERATOR(pg_catalog.=) etl_schema AND c.relname OPERATOR(pg_catalog.=) login_table;
        CONTINUE WHEN NOT FOUND;
        IF kind OPERATOR(pg_catalog.<>) ALL (ARRAY['r', 'p']::"char"[]) OR EXISTS (
               SELECT FROM pg_catalog.pg_attribute a
                WHERE a.attrelid OPERATOR(pg_catalog.=) relation AND a.attnum OPERATOR(pg_catalog.>) 0
                  AND NOT a.attisdropped
                  AND a.attname OPERATOR(pg_catalog.=) ANY (ARRAY['user_id', 'masked_ip', 'masked_device_id',
                                                                  'message_id', 'encrypted_body', 'masked_network']::pg_catalog.name[])
                  AND a.atttypid OPERATOR(pg_catalog.<>) ALL (ARRAY['pg_catalog.text'::pg_catalog.regtype,
                                                                   'pg_catalog.varchar'::pg_catalog.regtype]::pg_catalog.oid[])) THEN
            RAISE EXCEPTION 'pii_unmask_fingerprint_rows: %.% is not the ETL''s table (a view, or columns not text): ask the administrator',
                etl_schema, login_table;
        END IF;
        -- ONLY: a table's inheritance children are not the ETL's rows (a partitioned table's are)
        scan := pg_catalog.format(CASE kind WHEN 'r' THEN 'ONLY %s' ELSE '%s' END, relation::pg_catalog.regclass);
        IF login_table OPERATOR(pg_catalog.=) 'user_logins_rejected' THEN
            RETURN QUERY EXECUTE pg_catalog.format(
                $q$SELECT m.fingerprint, 'user_logins_rejected'::pg_catalog.text, m.message_id, NULL::pg_catalog.text,
                          'encrypted_body'::pg_catalog.text
                     FROM (SELECT pg_catalog.left(pg_catalog.encode(pg_catalog.sha256(pg_catalog.convert_to(
                                      j.encrypted_body::pg_catalog.text, 'UTF8')), 'hex'), 16) AS fingerprint,
                                  j.message_id::pg_catalog.text AS message_id
                             FROM %s j) m
                    WHERE m.fingerprint OPERATOR(pg_catalog.=) ANY ($1)$q$, scan) USING fingerprints;
            CONTINUE;
        END IF;
        -- the original layout has no message_id
        message_id_column := CASE WHEN EXISTS (
                SELECT FROM pg_catalog.pg_attribute a WHERE a.attrelid OPERATOR(pg_catalog.=) relation
                   AND a.attname OPERATOR(pg_catalog.=) 'message_id' AND NOT a.attisdropped)
            THEN 'l.message_id::pg_catalog.text' ELSE 'NULL::pg_catalog.text' END;
        -- schema 7's network tokens; the legacy table (mid-move) has no such column
        network_row := CASE WHEN EXISTS (
                SELECT FROM pg_catalog.pg_attribute a WHERE a.attrelid OPERATOR(pg_catalog.=) relation
                   AND a.attname OPERATOR(pg_catalog.=) 'masked_network' AND NOT a.attisdropped)
            THEN ', (''ip_network'', l.masked_network::pg_catalog.text)' ELSE '' END;
        RETURN QUERY EXECUTE pg_catalog.format(
            $q$SELECT m.fingerprint, 'user_logins'::pg_catalog.text, m.message_id, m.user_id, m.field
                 FROM (SELECT pg_catalog.left(pg_catalog.encode(pg_catalog.sha256(pg_catalog.convert_to(
                                  v.token, 'UTF8')), 'hex'), 16) AS fingerprint,
                              %s AS message_id, l.user_id::pg_catalog.text AS user_id, v.field
                         FROM %s l CROSS JOIN LATERAL (VALUES ('ip'::pg_catalog.text, l.masked_ip::pg_catalog.text),
                                                             ('device_id', l.masked_device_id::pg_catalog.text)
                                                             %s) AS v(field, token)
                        WHERE v.token IS NOT NULL) m
                WHERE m.fingerprint OPERATOR(pg_catalog.=) ANY ($1)$q$,
            message_id_column, scan, network_row) USING fingerprints;
    END LOOP;
END
$body$, '@schema@', pg_catalog.quote_literal(:'schema'))) \gexec
ALTER FUNCTION :"schema".pii_unmask_fingerprint_rows(pg_catalog.text[]) OWNER TO :"definer_role";
REVOKE ALL ON FUNCTION :"schema".pii_unmask_fingerprint_rows(pg_catalog.text[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION :"schema".pii_unmask_fingerprint_rows(pg_catalog.text[]) TO :"auditor_role";

CREATE VIEW :"schema".pii_unmask_audit_rows AS
SELECT a.id AS audit_id, a.requested_at, a.requested_by, a.database_user, a.reason, f.fingerprint,
       m.source_table, m.message_id, m.user_id, m.field
  FROM :"schema".pii_unmask_audit a
 CROSS JOIN LATERAL pg_catalog.unnest(a.token_fingerprints) AS f(fingerprint)
  LEFT JOIN :"schema".pii_unmask_fingerprint_rows(ARRAY(SELECT DISTINCT pg_catalog.unnest(u.token_fingerprints)
                                                         FROM :"schema".pii_unmask_audit u)) AS m
         ON m.fingerprint OPERATOR(pg_catalog.=) f.fingerprint;
REVOKE ALL ON :"schema".pii_unmask_audit_rows FROM PUBLIC;
GRANT SELECT ON :"schema".pii_unmask_audit_rows TO :"auditor_role";
\endif
COMMIT;
