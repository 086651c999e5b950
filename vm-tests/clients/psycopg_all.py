"""psycopg 3 against one PostgreSQL server: prints one JSON document of everything it saw.

Run by vm-tests/tests/pg_clients.rs twice, directly and through tollgate; the two documents
must be equal once "volatile" (backend PIDs, the login user the client named) is removed.
argv[1]: JSON {"host", "port", "user", "password", "dbname"}.
"""

import datetime
import decimal
import hashlib
import json
import sys

import psycopg
from psycopg import pq
from psycopg.types.json import Jsonb

args = json.loads(sys.argv[1])
DSN = psycopg.conninfo.make_conninfo(sslmode="prefer", **args)
out = {"volatile": {}}
UTC = datetime.timezone.utc


def norm(v):
    """A JSON value that keeps what the client decoded (type and value)."""
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return {"float": repr(v)}
    if isinstance(v, (bytes, bytearray, memoryview)):
        return {"bytes": bytes(v).hex()}
    if isinstance(v, decimal.Decimal):
        return {"decimal": str(v)}
    if isinstance(v, datetime.datetime):
        return {"datetime": v.astimezone(UTC).isoformat()}
    if isinstance(v, (datetime.date, datetime.time, datetime.timedelta)):
        return {type(v).__name__: str(v)}
    if isinstance(v, (list, tuple)):
        return [norm(x) for x in v]
    if isinstance(v, dict):
        return {"dict": {k: norm(x) for k, x in sorted(v.items())}}
    return {type(v).__name__: str(v)}


def err(e):
    d = e.diag
    return {
        "class": type(e).__name__,
        "sqlstate": e.sqlstate,
        "severity": d.severity_nonlocalized,
        "message": d.message_primary,
        "detail": d.message_detail,
        "hint": d.message_hint,
        "position": d.statement_position,
        "constraint": d.constraint_name,
        "table": d.table_name,
    }


def step(name, f):
    try:
        out[name] = f()
    except Exception as e:  # recorded, compared: the same error both ways
        out[name] = {"raised": type(e).__name__, "error": str(e)}


conn = psycopg.connect(DSN, autocommit=True)
notices = []
conn.add_notice_handler(lambda d: notices.append([d.severity_nonlocalized, d.sqlstate, d.message_primary]))
out["volatile"]["login_user"] = conn.info.user
out["volatile"]["backend_pid"] = conn.info.backend_pid
out["server"] = {
    "parameters": {
        k: conn.info.parameter_status(k)
        for k in ["server_version", "server_encoding", "client_encoding", "DateStyle",
                  "IntervalStyle", "integer_datetimes", "standard_conforming_strings"]
    },
    "current_user": conn.execute("SELECT current_user").fetchone()[0],
    "pid_matches_server": conn.info.backend_pid == conn.execute("SELECT pg_backend_pid()").fetchone()[0],
}
conn.execute("DROP TABLE IF EXISTS pc_items, pc_copy")
conn.execute(
    "CREATE TABLE pc_items (id int PRIMARY KEY, name text, data bytea, price numeric(10,2),"
    " at timestamptz, doc jsonb, tags int[])"
)
conn.execute("CREATE TABLE pc_copy (id int, name text, price numeric, at timestamptz)")

PARAMS = [
    42, "héllo 'world' \\ \"x\"", b"\x00\x01\xfe\xff", decimal.Decimal("12345.678"),
    datetime.datetime(2024, 2, 29, 23, 59, 58, 123456, tzinfo=UTC), Jsonb({"a": [1, 2, None], "b": "é"}),
    [1, None, 3], None, 2**40, 1.5, True,
]
Q = ("SELECT %s::int, %s::text, %s::bytea, %s::numeric, %s::timestamptz, %s::jsonb, %s::int[],"
     " %s::text, %s::bigint, %s::float8, %s::bool")
step("params_text", lambda: norm(conn.execute(Q, PARAMS).fetchone()))
step("params_binary", lambda: norm(conn.cursor(binary=True).execute(Q, PARAMS).fetchone()))
step("binary_types", lambda: [
    norm(r) for r in conn.cursor(binary=True).execute(
        "SELECT 1::int2, 2::int4, 3::int8, 1.25::float4, 'x'::varchar, now() > '2000-01-01',"
        " '2024-01-01'::date, '12:34:56'::time, '1 day 2 hours'::interval,"
        " '{\"k\": [1]}'::json, ARRAY['a', NULL, 'c'], '\\xdeadbeef'::bytea, 'NaN'::numeric,"
        " '-0.000123'::numeric, '192.168.0.1/24'::inet, 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid"
    ).fetchall()
])
step("binary_description", lambda: [
    [c.name, c.type_code] for c in conn.cursor(binary=True).execute(
        "SELECT 1::int AS a, 'x'::text AS b, NULL::bytea AS c").description
])


def inserts():
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO pc_items VALUES (%s, %s, %s, %s, %s, %s, %s)",
            [(i, f"item {i}", bytes([i, 255 - i]), decimal.Decimal(i) / 4,
              datetime.datetime(2024, 1, 1, tzinfo=UTC) + datetime.timedelta(hours=i),
              Jsonb({"i": i}), [i, i * 2]) for i in range(1, 41)],
        )
        return cur.rowcount


step("executemany_rowcount", inserts)


def prepared():
    res = []
    for i in (1, 2, 3, 4, 5, 6):
        res.append(norm(conn.execute("SELECT id, name, data, price FROM pc_items WHERE id = %s",
                                     [i], prepare=True).fetchone()))
    res.append(norm(conn.cursor(binary=True).execute(
        "SELECT id, tags, doc FROM pc_items WHERE id = %s", [7], prepare=True).fetchone()))
    names = conn.execute("SELECT name, statement, parameter_types::text[] FROM pg_prepared_statements"
                         " ORDER BY name").fetchall()
    return {"rows": res, "server_prepared": norm(names)}


step("prepared", prepared)


def named_cursors():
    res = {}
    with conn.transaction():
        with conn.cursor("pc_big") as cur:
            cur.itersize = 7
            cur.execute("SELECT g, md5(g::text), g::numeric / 3 FROM generate_series(1, 95) g")
            batches = []
            while True:
                b = cur.fetchmany(20)
                if not b:
                    break
                batches.append([len(b), norm(b[0]), norm(b[-1])])
            res["fetchmany"] = batches
        with conn.cursor("pc_scroll", scrollable=True) as cur:
            cur.execute("SELECT id, name FROM pc_items ORDER BY id")
            first = cur.fetchone()
            cur.scroll(10, mode="absolute")
            mid = cur.fetchone()
            res["scroll"] = norm([first, mid, cur.fetchmany(3), cur.rownumber])
        res["pg_cursors"] = conn.execute("SELECT count(*) FROM pg_cursors").fetchone()[0]
        with conn.cursor("pc_iter", binary=True) as cur:
            cur.itersize = 9
            cur.execute("SELECT id, data, at FROM pc_items ORDER BY id")
            res["iter_binary"] = [norm(r) for r in cur]
    with conn.cursor("pc_hold", withhold=True) as cur:
        cur.execute("SELECT id FROM pc_items ORDER BY id DESC")
        res["withhold"] = norm(cur.fetchmany(5))
    return res


step("named_cursors", named_cursors)


def copy():
    res = {}
    with conn.cursor() as cur:
        with cur.copy("COPY pc_copy (id, name, price, at) FROM STDIN") as cp:
            for i in range(1, 501):
                cp.write_row((i, f"row\t{i}\n\\", decimal.Decimal(i) / 7,
                              datetime.datetime(2023, 6, 1, tzinfo=UTC)))
        res["from_stdin_text_rowcount"] = cur.rowcount
        with cur.copy("COPY pc_copy (id, name, price, at) FROM STDIN (FORMAT BINARY)") as cp:
            cp.set_types(["int4", "text", "numeric", "timestamptz"])
            for i in range(501, 601):
                cp.write_row((i, None if i % 10 == 0 else f"bin {i}", decimal.Decimal(i),
                              datetime.datetime(2023, 6, 2, tzinfo=UTC)))
        res["from_stdin_binary_rowcount"] = cur.rowcount
        with cur.copy("COPY pc_copy (id, name) FROM STDIN (FORMAT CSV)") as cp:
            cp.write(b'9001,"quoted, comma"\n9002,\n')
        res["from_stdin_csv_rowcount"] = cur.rowcount
        try:
            with cur.copy("COPY pc_copy (id) FROM STDIN") as cp:
                cp.write(b"1\nnot-a-number\n")
        except psycopg.Error as e:
            res["from_stdin_bad"] = err(e)
        rows = []
        with cur.copy("COPY (SELECT * FROM pc_copy ORDER BY id) TO STDOUT") as cp:
            for row in cp.rows():
                rows.append(row)
        res["to_stdout_text"] = {"rows": len(rows), "first": norm(rows[0]), "last": norm(rows[-1]),
                                 "sha256": hashlib.sha256(repr(rows).encode()).hexdigest()}
        with cur.copy("COPY pc_copy TO STDOUT (FORMAT BINARY)") as cp:
            data = b"".join(bytes(b) for b in cp)
        res["to_stdout_binary"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        with cur.copy("COPY (SELECT id, name FROM pc_copy WHERE id > 9000 ORDER BY id) TO STDOUT (FORMAT CSV, HEADER)") as cp:
            data = b"".join(bytes(b) for b in cp)
        res["to_stdout_csv"] = data.decode()
        res["count"] = conn.execute("SELECT count(*), sum(id) FROM pc_copy").fetchone()
    return res


step("copy", copy)


def listen_notify():
    other = psycopg.connect(DSN, autocommit=True)
    out["volatile"]["notifier_pid"] = other.info.backend_pid
    conn.execute("LISTEN pc_chan")
    conn.execute("LISTEN \"Pc Quoted\"")
    other.execute("NOTIFY pc_chan, 'hello'")
    other.execute("SELECT pg_notify('Pc Quoted', %s)", ["payload é " + "x" * 2000])
    with other.transaction():
        other.execute("NOTIFY pc_chan, 'in tx 1'")
        other.execute("NOTIFY pc_chan, 'in tx 2'")
    got = []
    for n in conn.notifies(timeout=10, stop_after=4):
        got.append({"channel": n.channel, "payload": n.payload, "pid_is_sender": n.pid == other.info.backend_pid})
    conn.execute("UNLISTEN *")
    other.execute("NOTIFY pc_chan, 'after unlisten'")
    late = [n.payload for n in conn.notifies(timeout=0.5)]
    other.close()
    return {"received": got, "after_unlisten": late}


step("listen_notify", listen_notify)


def pipeline():
    res = {}
    with conn.pipeline() as p:
        c1 = conn.execute("SELECT count(*) FROM pc_items")
        c2 = conn.cursor(binary=True).execute("SELECT %s::int * 2, %s::text", [21, "pipe"])
        c3 = conn.execute("UPDATE pc_items SET name = name || '!' WHERE id <= %s", [3])
        p.sync()
        res["results"] = norm([c1.fetchone(), c2.fetchone(), c3.rowcount])
        with conn.cursor() as cur:
            cur.executemany("INSERT INTO pc_items (id, name) VALUES (%s, %s)",
                            [(1000 + i, f"piped {i}") for i in range(50)])
    res["after"] = conn.execute("SELECT count(*) FROM pc_items").fetchone()[0]
    try:
        with conn.pipeline():
            conn.execute("INSERT INTO pc_items (id) VALUES (5000)")
            conn.execute("SELECT 1/0")
            conn.execute("INSERT INTO pc_items (id) VALUES (5001)")
    except psycopg.Error as e:
        res["error"] = err(e)
    res["after_error"] = conn.execute("SELECT array_agg(id ORDER BY id) FROM pc_items WHERE id >= 5000").fetchone()[0]
    return res


step("pipeline", pipeline)


def errors():
    res = {}
    for name, q, params in [
        ("unique", "INSERT INTO pc_items (id, name) VALUES (%s, %s)", [1, "dup"]),
        ("syntax", "SELEC 1", None),
        ("syntax_later", "SELECT id FROM pc_items WHERE id = = 1", None),
        ("undefined_table", "SELECT * FROM pc_nope", None),
        ("division", "SELECT 1 / %s", [0]),
        ("bad_param", "SELECT %s::int", ["abc"]),
        ("not_null_raise", "DO $$ BEGIN RAISE EXCEPTION USING ERRCODE = '23502', MESSAGE = 'custom', DETAIL = 'd', HINT = 'h'; END $$", None),
    ]:
        try:
            conn.execute(q, params)
            res[name] = "no error"
        except psycopg.Error as e:
            res[name] = err(e)
    try:
        conn.cursor(binary=True).execute("INSERT INTO pc_items (id) VALUES (%s)", [2], prepare=True)
    except psycopg.Error as e:
        res["unique_binary_prepared"] = err(e)
    conn.execute("DO $$ BEGIN RAISE NOTICE 'notice %', 42; RAISE WARNING 'warn'; END $$")
    res["notices"] = list(notices)
    res["still_usable"] = conn.execute("SELECT 'ok'").fetchone()[0]
    return res


step("errors", errors)


def transactions():
    res = {}
    conn.autocommit = False
    res["status_idle"] = conn.info.transaction_status.name
    conn.execute("INSERT INTO pc_items (id, name) VALUES (2001, 'tx')")
    res["status_in_tx"] = conn.info.transaction_status.name
    with conn.transaction():  # a savepoint inside the open transaction
        conn.execute("INSERT INTO pc_items (id, name) VALUES (2002, 'sp')")
    try:
        with conn.transaction():
            conn.execute("INSERT INTO pc_items (id, name) VALUES (2003, 'sp rolled back')")
            conn.execute("INSERT INTO pc_items (id, name) VALUES (2001, 'dup')")
    except psycopg.errors.UniqueViolation as e:
        res["savepoint_error"] = err(e)
    res["status_after_savepoint_rollback"] = conn.info.transaction_status.name
    conn.execute("SAVEPOINT manual")
    try:
        conn.execute("SELECT 1/0")
    except psycopg.Error as e:
        res["in_tx_error"] = err(e)
    res["status_failed"] = conn.info.transaction_status.name
    try:
        conn.execute("SELECT 1")
    except psycopg.Error as e:
        res["in_failed_tx"] = err(e)
    conn.execute("ROLLBACK TO SAVEPOINT manual")
    conn.execute("INSERT INTO pc_items (id, name) VALUES (2004, 'after rollback to')")
    conn.commit()
    res["committed"] = conn.execute("SELECT array_agg(id ORDER BY id) FROM pc_items WHERE id > 2000 AND id < 3000").fetchone()[0]
    conn.rollback()
    conn.execute("INSERT INTO pc_items (id, name) VALUES (2005, 'rolled back')")
    conn.rollback()
    with conn.transaction():
        conn.execute("SET LOCAL TimeZone = 'Asia/Kolkata'")
        res["local_tz"] = conn.execute("SELECT current_setting('TimeZone'), '2024-01-01 00:00+00'::timestamptz::text").fetchone()
    res["tz_after"] = conn.execute("SELECT current_setting('TimeZone') = %s", [conn.info.parameter_status("TimeZone")]).fetchone()[0]
    conn.rollback()
    conn.autocommit = True
    res["final"] = conn.execute("SELECT array_agg(id ORDER BY id) FROM pc_items WHERE id > 2000 AND id < 3000").fetchone()[0]
    res["isolation"] = None
    with psycopg.connect(DSN) as c2:
        c2.isolation_level = psycopg.IsolationLevel.SERIALIZABLE
        c2.read_only = True
        res["isolation"] = c2.execute("SELECT current_setting('transaction_isolation'), current_setting('transaction_read_only')").fetchone()
    return res


step("transactions", transactions)


def large():
    big = "z" * 3_000_000
    r = conn.execute("SELECT length(%s::text), md5(%s::text)", [big, big]).fetchone()
    rows = conn.cursor(binary=True).execute("SELECT repeat('ab', 600000) FROM generate_series(1, 3)").fetchall()
    return {"param": r, "result": [len(x[0]) for x in rows]}


step("large", large)

conn.execute("DROP TABLE pc_items, pc_copy")
conn.close()
out["libpq"] = pq.version()
out["psycopg"] = psycopg.__version__
print(json.dumps(out, indent=1, sort_keys=True, ensure_ascii=False))
