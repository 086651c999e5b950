"""asyncpg against one PostgreSQL server: prints one JSON document of everything it saw.

Run by vm-tests/tests/pg_clients.rs twice, directly and through tollgate; the two documents
must be equal once "volatile" (backend PIDs, the login user the client named) is removed.
asyncpg speaks the protocol itself (no libpq), uses the extended protocol with binary results
for every query, prepares (and caches) every statement, and pipelines executemany().
argv[1]: JSON {"host", "port", "user", "password", "dbname"}.
"""

import asyncio
import datetime
import decimal
import hashlib
import io
import json
import sys

import asyncpg

args = json.loads(sys.argv[1])
UTC = datetime.timezone.utc
out = {"volatile": {}}


def norm(v):
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return {"float": repr(v)}
    if isinstance(v, (bytes, bytearray, memoryview)):
        return {"bytes": bytes(v).hex()}
    if isinstance(v, decimal.Decimal):
        return {"decimal": str(v)}
    if isinstance(v, datetime.datetime):
        return {"datetime": v.astimezone(UTC).isoformat() if v.tzinfo else v.isoformat()}
    if isinstance(v, (datetime.date, datetime.time, datetime.timedelta)):
        return {type(v).__name__: str(v)}
    if isinstance(v, asyncpg.Record):
        return [norm(x) for x in v.values()]
    if isinstance(v, (list, tuple)):
        return [norm(x) for x in v]
    if isinstance(v, dict):
        return {"dict": {k: norm(x) for k, x in sorted(v.items())}}
    return {type(v).__name__: str(v)}


def err(e):
    return {
        "class": type(e).__name__,
        "sqlstate": getattr(e, "sqlstate", None),
        "severity": getattr(e, "severity_en", None),
        "message": getattr(e, "message", str(e)),
        "detail": getattr(e, "detail", None),
        "hint": getattr(e, "hint", None),
        "position": getattr(e, "position", None),
        "constraint": getattr(e, "constraint_name", None),
        "table": getattr(e, "table_name", None),
    }


async def step(name, f):
    try:
        out[name] = await f()
    except Exception as e:  # recorded, compared: the same error both ways
        out[name] = {"raised": type(e).__name__, "error": str(e)}


async def connect():
    return await asyncpg.connect(host=args["host"], port=args["port"], user=args["user"],
                                 password=args["password"], database=args["dbname"], ssl="prefer")


async def main():
    conn = await connect()
    notices = []
    conn.add_log_listener(lambda c, m: notices.append([m.severity_en, m.sqlstate, m.message]))
    out["volatile"]["login_user"] = args["user"]
    out["volatile"]["backend_pid"] = conn.get_server_pid()
    s = conn.get_settings()
    out["server"] = {
        "parameters": {k: getattr(s, k) for k in ["server_version", "server_encoding", "client_encoding",
                                                   "DateStyle", "integer_datetimes",
                                                   "standard_conforming_strings"]},
        "current_user": await conn.fetchval("SELECT current_user"),
        "pid_matches_server": conn.get_server_pid() == await conn.fetchval("SELECT pg_backend_pid()"),
        "version": list(conn.get_server_version())[:2],
    }
    await conn.execute("DROP TABLE IF EXISTS ap_items, ap_copy")
    await conn.execute(
        "CREATE TABLE ap_items (id int PRIMARY KEY, name text, data bytea, price numeric(10,2),"
        " at timestamptz, doc jsonb, tags int[])")
    await conn.execute("CREATE TABLE ap_copy (id int, name text, price numeric, at timestamptz)")

    params = [42, "héllo 'world' \\ \"x\"", b"\x00\x01\xfe\xff", decimal.Decimal("12345.678"),
              datetime.datetime(2024, 2, 29, 23, 59, 58, 123456, tzinfo=UTC), '{"a": [1, 2, null], "b": "é"}',
              [1, None, 3], None, 2**40, 1.5, True]
    q = ("SELECT $1::int, $2::text, $3::bytea, $4::numeric, $5::timestamptz, $6::jsonb, $7::int[],"
         " $8::text, $9::bigint, $10::float8, $11::bool")

    async def params_binary():
        return norm(await conn.fetchrow(q, *params))

    await step("params_binary", params_binary)

    async def types():
        return norm(await conn.fetchrow(
            "SELECT 1::int2, 3::int8, 1.25::float4, 'x'::varchar, '2024-01-01'::date, '12:34:56'::time,"
            " '1 day 2 hours'::interval, '{\"k\": [1]}'::json, ARRAY['a', NULL, 'c'], '\\xdeadbeef'::bytea,"
            " 'NaN'::numeric, '-0.000123'::numeric, '192.168.0.1/24'::inet,"
            " 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid, '(1,2)'::point, 'infinity'::timestamptz"))

    await step("types", types)

    async def executemany():
        await conn.executemany(
            "INSERT INTO ap_items VALUES ($1, $2, $3, $4, $5, $6, $7)",
            [(i, f"item {i}", bytes([i, 255 - i]), decimal.Decimal(i) / 4,
              datetime.datetime(2024, 1, 1, tzinfo=UTC) + datetime.timedelta(hours=i),
              json.dumps({"i": i}), [i, i * 2]) for i in range(1, 41)])
        return await conn.fetchval("SELECT count(*) FROM ap_items")

    await step("executemany", executemany)

    async def prepared():
        stmt = await conn.prepare("SELECT id, name, data, price, at, doc, tags FROM ap_items WHERE id = $1")
        rows = [norm(await stmt.fetchrow(i)) for i in (1, 2, 3)]
        many = norm(await stmt.fetch(4))
        desc = {"params": [t.name for t in stmt.get_parameters()],
                "attrs": [[a.name, a.type.name] for a in stmt.get_attributes()]}
        explicit = await conn.prepare("SELECT $1::text || '!'", name="ap_named")
        return {"rows": rows, "many": many, "desc": desc,
                "explicit": await explicit.fetchval("hi"),
                "server_prepared_named": await conn.fetchval(
                    "SELECT count(*) FROM pg_prepared_statements WHERE name = 'ap_named'")}

    await step("prepared", prepared)

    async def cursors():
        res = {}
        async with conn.transaction():
            cur = await conn.cursor("SELECT g, md5(g::text), g::numeric / 3 FROM generate_series(1, 95) g")
            batches = []
            while True:
                b = await cur.fetch(20)
                if not b:
                    break
                batches.append([len(b), norm(b[0]), norm(b[-1])])
            res["fetch"] = batches
            cur = await conn.cursor("SELECT id, name FROM ap_items ORDER BY id")
            await cur.forward(10)
            res["forward"] = norm(await cur.fetchrow())
            res["iter_prefetch"] = [norm(r) async for r in conn.cursor(
                "SELECT id, data, at FROM ap_items WHERE id > $1 ORDER BY id", 30, prefetch=4)]
            await conn.execute("DECLARE ap_sql CURSOR FOR SELECT id FROM ap_items ORDER BY id")
            res["sql_fetch"] = [norm(await conn.fetch("FETCH 15 FROM ap_sql")) for _ in range(3)]
        return res

    await step("cursors", cursors)

    async def copy():
        res = {}
        records = [(i, f"row\t{i}\n\\" if i % 10 else None, decimal.Decimal(i) / 7,
                    datetime.datetime(2023, 6, 1, tzinfo=UTC)) for i in range(1, 501)]
        res["records_to_table"] = await conn.copy_records_to_table(
            "ap_copy", records=records, columns=["id", "name", "price", "at"])
        res["to_table_csv"] = await conn.copy_to_table(
            "ap_copy", source=io.BytesIO(b'9001,"quoted, comma"\n9002,\n'), columns=["id", "name"], format="csv")
        try:
            await conn.copy_to_table("ap_copy", source=io.BytesIO(b"1\nnot-a-number\n"), columns=["id"])
        except asyncpg.PostgresError as e:
            res["to_table_bad"] = err(e)
        buf = io.BytesIO()
        res["from_query_text"] = await conn.copy_from_query("SELECT * FROM ap_copy ORDER BY id", output=buf)
        res["text_sha256"] = hashlib.sha256(buf.getvalue()).hexdigest()
        buf = io.BytesIO()
        res["from_table_binary"] = await conn.copy_from_table("ap_copy", output=buf, format="binary")
        res["binary"] = [len(buf.getvalue()), hashlib.sha256(buf.getvalue()).hexdigest()]
        buf = io.BytesIO()
        await conn.copy_from_query("SELECT id, name FROM ap_copy WHERE id > $1 ORDER BY id", 9000,
                                   output=buf, format="csv", header=True)
        res["csv"] = buf.getvalue().decode()
        res["count"] = norm(await conn.fetchrow("SELECT count(*), sum(id) FROM ap_copy"))
        return res

    await step("copy", copy)

    async def listen_notify():
        other = await connect()
        out["volatile"]["notifier_pid"] = other.get_server_pid()
        got = []
        done = asyncio.Event()

        def cb(c, pid, channel, payload):
            got.append({"channel": channel, "payload": payload, "pid_is_sender": pid == other.get_server_pid()})
            if len(got) >= 4:
                done.set()

        await conn.add_listener("ap_chan", cb)
        await conn.add_listener("Ap Quoted", cb)
        await other.execute("NOTIFY ap_chan, 'hello'")
        await other.execute("SELECT pg_notify('Ap Quoted', $1)", "payload é " + "x" * 2000)
        async with other.transaction():
            await other.execute("NOTIFY ap_chan, 'in tx 1'")
            await other.execute("NOTIFY ap_chan, 'in tx 2'")
        try:
            await asyncio.wait_for(done.wait(), 10)
        except asyncio.TimeoutError:
            got.append("timeout")
        await conn.remove_listener("ap_chan", cb)
        await other.execute("NOTIFY ap_chan, 'after unlisten'")
        await asyncio.sleep(0.3)
        await other.close()
        return got

    await step("listen_notify", listen_notify)

    async def errors():
        res = {}
        for name, q, a in [
            ("unique", "INSERT INTO ap_items (id, name) VALUES ($1, $2)", [1, "dup"]),
            ("syntax", "SELEC 1", []),
            ("syntax_later", "SELECT id FROM ap_items WHERE id = = 1", []),
            ("undefined_table", "SELECT * FROM ap_nope", []),
            ("division", "SELECT 1 / $1::int", [0]),
            ("custom", "DO $$ BEGIN RAISE EXCEPTION USING ERRCODE = '23502', MESSAGE = 'custom',"
                       " DETAIL = 'd', HINT = 'h'; END $$", []),
        ]:
            try:
                await conn.execute(q, *a) if a else await conn.execute(q)
                res[name] = "no error"
            except asyncpg.PostgresError as e:
                res[name] = err(e)
        try:
            await conn.fetch("SELECT $1::int", "abc")
        except Exception as e:  # a client-side encoding error: never reaches the server
            res["bad_param"] = type(e).__name__
        try:
            await conn.executemany("INSERT INTO ap_items (id) VALUES ($1)", [(3000,), (1,), (3001,)])
        except asyncpg.PostgresError as e:
            res["executemany_unique"] = err(e)
        res["after_executemany"] = await conn.fetchval("SELECT count(*) FROM ap_items WHERE id >= 3000")
        await conn.execute("DO $$ BEGIN RAISE NOTICE 'notice %', 42; RAISE WARNING 'warn'; END $$")
        await asyncio.sleep(0.1)
        res["notices"] = list(notices)
        res["still_usable"] = await conn.fetchval("SELECT 'ok'")
        return res

    await step("errors", errors)

    async def transactions():
        res = {}
        tr = conn.transaction()
        await tr.start()
        await conn.execute("INSERT INTO ap_items (id, name) VALUES (2001, 'tx')")
        res["in_tx"] = conn.is_in_transaction()
        async with conn.transaction():  # savepoint
            await conn.execute("INSERT INTO ap_items (id, name) VALUES (2002, 'sp')")
        try:
            async with conn.transaction():
                await conn.execute("INSERT INTO ap_items (id, name) VALUES (2003, 'sp rolled back')")
                await conn.execute("INSERT INTO ap_items (id, name) VALUES (2001, 'dup')")
        except asyncpg.UniqueViolationError as e:
            res["savepoint_error"] = err(e)
        await conn.execute("SAVEPOINT manual")
        try:
            await conn.execute("SELECT 1/0")
        except asyncpg.PostgresError as e:
            res["in_tx_error"] = err(e)
        try:
            await conn.execute("SELECT 1")
        except asyncpg.PostgresError as e:
            res["in_failed_tx"] = err(e)
        await conn.execute("ROLLBACK TO SAVEPOINT manual")
        await conn.execute("INSERT INTO ap_items (id, name) VALUES (2004, 'after rollback to')")
        await tr.commit()
        try:
            async with conn.transaction():
                await conn.execute("INSERT INTO ap_items (id, name) VALUES (2005, 'rolled back')")
                raise RuntimeError("roll back")
        except RuntimeError:
            pass
        async with conn.transaction(isolation="serializable", readonly=True):
            res["isolation"] = norm(await conn.fetchrow(
                "SELECT current_setting('transaction_isolation'), current_setting('transaction_read_only')"))
        res["final"] = await conn.fetchval(
            "SELECT array_agg(id ORDER BY id) FROM ap_items WHERE id > 2000 AND id < 3000")
        res["in_tx_after"] = conn.is_in_transaction()
        return res

    await step("transactions", transactions)

    async def large():
        big = "z" * 3_000_000
        r = norm(await conn.fetchrow("SELECT length($1::text), md5($1::text)", big))
        rows = await conn.fetch("SELECT repeat('ab', 600000) FROM generate_series(1, 3)")
        return {"param": r, "result": [len(x[0]) for x in rows]}

    await step("large", large)

    await conn.execute("DROP TABLE ap_items, ap_copy")
    await conn.close()
    out["asyncpg"] = asyncpg.__version__


asyncio.run(main())
print(json.dumps(out, indent=1, sort_keys=True, ensure_ascii=False))
