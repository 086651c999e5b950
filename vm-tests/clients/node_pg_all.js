// node-postgres (pg, pg-cursor, pg-copy-streams) against one PostgreSQL server: prints one JSON
// document of everything it saw.
//
// Run by vm-tests/tests/pg_clients.rs twice, directly and through tollgate; the two documents
// must be equal once "volatile" (backend PIDs, the login user the client named) is removed.
// node-postgres has no pipeline mode (it sends one query at a time); a named query is a
// server-side prepared statement (Parse once per connection, then Bind/Execute).
// argv[2]: JSON {"host", "port", "user", "password", "dbname"}.
'use strict';

const crypto = require('crypto');
const { Readable, Writable } = require('stream');
const { pipeline } = require('stream/promises');
const { Client } = require('pg');
const Cursor = require('pg-cursor');
const copyStreams = require('pg-copy-streams');

const args = JSON.parse(process.argv[2]);
const out = { volatile: { login_user: args.user } };

function norm(v) {
  if (v === null || v === undefined) return null;
  if (typeof v === 'boolean' || typeof v === 'string') return v;
  if (typeof v === 'number') return Number.isInteger(v) ? v : { float: String(v) };
  if (typeof v === 'bigint') return { bigint: v.toString() };
  if (Buffer.isBuffer(v)) return { bytes: v.toString('hex') };
  if (v instanceof Date) return { date: v.toISOString() };
  if (Array.isArray(v)) return v.map(norm);
  if (typeof v === 'object') {
    const o = {};
    for (const k of Object.keys(v).sort()) o[k] = norm(v[k]);
    return { object: o };
  }
  return { [typeof v]: String(v) };
}

const rows = (r) => r.rows.map((x) => (Array.isArray(x) ? x.map(norm) : norm(x)));

function err(e) {
  return {
    class: e.constructor.name,
    sqlstate: e.code === undefined ? null : e.code,
    severity: e.severity === undefined ? null : e.severity,
    message: e.message,
    detail: e.detail === undefined ? null : e.detail,
    hint: e.hint === undefined ? null : e.hint,
    position: e.position === undefined ? null : e.position,
    constraint: e.constraint === undefined ? null : e.constraint,
    table: e.table === undefined ? null : e.table,
  };
}

async function step(name, f) {
  try {
    out[name] = await f();
  } catch (e) {
    // recorded, compared: the same error both ways
    out[name] = { raised: e.constructor.name, error: String(e.message) };
  }
}

function connect() {
  return new Client({
    host: args.host,
    port: args.port,
    user: args.user,
    password: args.password,
    database: args.dbname,
  });
}

async function main() {
  const conn = connect();
  const notices = [];
  conn.on('notice', (m) => notices.push([m.severity, m.code, m.message]));
  const status = {};
  conn.connection.on('parameterStatus', (m) => { status[m.parameterName] = m.parameterValue; });
  await conn.connect();
  out.volatile.backend_pid = conn.processID;
  const q = (text, values) => conn.query({ text, values, rowMode: 'array' });
  out.server = {
    parameters: Object.fromEntries(
      ['server_version', 'server_encoding', 'client_encoding', 'DateStyle', 'integer_datetimes',
        'standard_conforming_strings']
        .map((k) => [k, status[k] === undefined ? null : status[k]])),
    current_user: (await q('SELECT current_user')).rows[0][0],
    pid_matches_server: conn.processID === (await q('SELECT pg_backend_pid()')).rows[0][0],
  };
  await q('DROP TABLE IF EXISTS np_items, np_copy');
  await q('CREATE TABLE np_items (id int PRIMARY KEY, name text, data bytea, price numeric(10,2),'
    + ' at timestamptz, doc jsonb, tags int[])');
  await q('CREATE TABLE np_copy (id int, name text, price numeric, at timestamptz)');

  const params = [42, "héllo 'world' \\ \"x\"", Buffer.from([0, 1, 0xfe, 0xff]), '12345.678',
    new Date(Date.UTC(2024, 1, 29, 23, 59, 58, 123)), { a: [1, 2, null], b: 'é' }, [1, null, 3], null,
    '1099511627776', 1.5, true];
  const sql = 'SELECT $1::int, $2::text, $3::bytea, $4::numeric, $5::timestamptz, $6::jsonb, $7::int[],'
    + ' $8::text, $9::bigint, $10::float8, $11::bool';
  await step('params_text', async () => rows(await q(sql, params)));
  // Binary results (`binary: true`), one type at a time: node-postgres's binary parsers do not
  // cover every type (some throw in the client after the binary DataRow arrived), and each
  // outcome is compared.
  await step('params_binary', async () => {
    const res = {};
    for (const [t, v] of [['int4', 42], ['int8', '7'], ['text', 'bin é'], ['bytea', Buffer.from([1, 2, 255])],
      ['bool', true], ['float8', 2.5], ['numeric', '12.5'], ['timestamptz', new Date(Date.UTC(2024, 0, 2))],
      ['int4[]', [1, 2]], ['jsonb', { a: 1 }], ['uuid', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11']]) {
      try {
        const r = await conn.query({ text: `SELECT $1::${t} AS v, NULL::${t} AS n`, values: [v], binary: true, rowMode: 'array' });
        res[t] = { rows: rows(r), formats: r.fields.map((f) => [f.name, f.dataTypeID, f.format]) };
      } catch (e) {
        res[t] = { raised: e.constructor.name, error: String(e.message) };
      }
    }
    return res;
  });
  await step('types', async () => rows(await q(
    "SELECT 1::int2, 3::int8, 1.25::float4, 'x'::varchar, '2024-01-01'::date, '12:34:56'::time,"
    + " '1 day 2 hours'::interval, '{\"k\": [1]}'::json, ARRAY['a', NULL, 'c'], '\\xdeadbeef'::bytea,"
    + " 'NaN'::numeric, '-0.000123'::numeric, '192.168.0.1/24'::inet,"
    + " 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid, '(1,2)'::point, 'infinity'::timestamptz")));

  await step('inserts', async () => {
    let n = 0;
    for (let i = 1; i <= 40; i++) {
      const r = await conn.query({
        name: 'np_insert',
        text: 'INSERT INTO np_items VALUES ($1, $2, $3, $4, $5, $6, $7)',
        values: [i, `item ${i}`, Buffer.from([i, 255 - i]), String(i / 4),
          new Date(Date.UTC(2024, 0, 1, i)), JSON.stringify({ i }), [i, i * 2]],
      });
      n += r.rowCount;
    }
    return n;
  });

  await step('prepared', async () => {
    const res = [];
    for (const i of [1, 2, 3]) {
      res.push(rows(await conn.query({ name: 'np_get', text: 'SELECT id, name, data, price, at, doc, tags FROM np_items WHERE id = $1',
        values: [i], rowMode: 'array' })));
    }
    const server = (await q("SELECT name, statement FROM pg_prepared_statements ORDER BY name")).rows;
    return { rows: res, server_prepared: server };
  });

  await step('cursors', async () => {
    const res = {};
    await q('BEGIN');
    const cur = conn.query(new Cursor(
      'SELECT g, md5(g::text), g::numeric / 3 FROM generate_series(1, 95) g', [], { rowMode: 'array' }));
    const batches = [];
    for (;;) {
      const b = await cur.read(20);
      if (b.length === 0) break;
      batches.push([b.length, norm(b[0]), norm(b[b.length - 1])]);
    }
    await cur.close();
    res.portal_read = batches;
    await q('DECLARE np_sql CURSOR FOR SELECT id, name FROM np_items ORDER BY id');
    res.sql_fetch = [];
    for (let i = 0; i < 3; i++) res.sql_fetch.push(rows(await q('FETCH 15 FROM np_sql')));
    res.pg_cursors = (await q('SELECT count(*)::int FROM pg_cursors')).rows[0][0];
    await q('COMMIT');
    return res;
  });

  await step('copy', async () => {
    const res = {};
    const lines = [];
    for (let i = 1; i <= 500; i++) {
      lines.push(`${i}\t${i % 10 ? `row\\t${i}\\n\\\\` : '\\N'}\t${(i / 7).toFixed(6)}\t2023-06-01 00:00:00+00\n`);
    }
    const from = conn.query(copyStreams.from('COPY np_copy (id, name, price, at) FROM STDIN'));
    await pipeline(Readable.from(lines), from);
    res.from_stdin_rowcount = from.rowCount;
    const csv = conn.query(copyStreams.from('COPY np_copy (id, name) FROM STDIN (FORMAT CSV)'));
    await pipeline(Readable.from(['9001,"quoted, comma"\n9002,\n']), csv);
    res.from_stdin_csv_rowcount = csv.rowCount;
    try {
      const bad = conn.query(copyStreams.from('COPY np_copy (id) FROM STDIN'));
      await pipeline(Readable.from(['1\nnot-a-number\n']), bad);
    } catch (e) {
      res.from_stdin_bad = err(e);
    }
    const collect = async (text) => {
      const chunks = [];
      await pipeline(conn.query(copyStreams.to(text)), new Writable({
        write(c, _e, cb) { chunks.push(c); cb(); },
      }));
      return Buffer.concat(chunks);
    };
    const t = await collect('COPY (SELECT * FROM np_copy ORDER BY id) TO STDOUT');
    res.to_stdout_text = [t.length, crypto.createHash('sha256').update(t).digest('hex')];
    const b = await collect('COPY np_copy TO STDOUT (FORMAT BINARY)');
    res.to_stdout_binary = [b.length, crypto.createHash('sha256').update(b).digest('hex')];
    res.to_stdout_csv = (await collect('COPY (SELECT id, name FROM np_copy WHERE id > 9000 ORDER BY id) TO STDOUT (FORMAT CSV, HEADER)')).toString();
    res.count = rows(await q('SELECT count(*), sum(id) FROM np_copy'));
    return res;
  });

  await step('listen_notify', async () => {
    const other = connect();
    await other.connect();
    out.volatile.notifier_pid = other.processID;
    const got = [];
    let wake;
    const four = new Promise((resolve) => { wake = resolve; });
    conn.on('notification', (n) => {
      got.push({ channel: n.channel, payload: n.payload, pid_is_sender: n.processId === other.processID });
      if (got.length >= 4) wake();
    });
    await q('LISTEN np_chan');
    await q('LISTEN "Np Quoted"');
    await other.query("NOTIFY np_chan, 'hello'");
    await other.query("SELECT pg_notify('Np Quoted', $1)", [`payload é ${'x'.repeat(2000)}`]);
    await other.query('BEGIN');
    await other.query("NOTIFY np_chan, 'in tx 1'");
    await other.query("NOTIFY np_chan, 'in tx 2'");
    await other.query('COMMIT');
    const timeout = new Promise((resolve) => setTimeout(() => resolve('timeout'), 10000));
    if ((await Promise.race([four, timeout])) === 'timeout') got.push('timeout');
    await q('UNLISTEN *');
    await other.query("NOTIFY np_chan, 'after unlisten'");
    await q('SELECT 1');
    await other.end();
    return got;
  });

  await step('errors', async () => {
    const res = {};
    for (const [name, text, values] of [
      ['unique', 'INSERT INTO np_items (id, name) VALUES ($1, $2)', [1, 'dup']],
      ['unique_simple', "INSERT INTO np_items (id, name) VALUES (1, 'dup')", undefined],
      ['syntax', 'SELEC 1', undefined],
      ['syntax_extended', 'SELEC $1', [1]],
      ['syntax_later', 'SELECT id FROM np_items WHERE id = = 1', undefined],
      ['undefined_table', 'SELECT * FROM np_nope', undefined],
      ['division', 'SELECT 1 / $1::int', [0]],
      ['bad_param', 'SELECT $1::int', ['abc']],
      ['custom', "DO $$ BEGIN RAISE EXCEPTION USING ERRCODE = '23502', MESSAGE = 'custom', DETAIL = 'd', HINT = 'h'; END $$", undefined],
    ]) {
      try {
        await conn.query(text, values);
        res[name] = 'no error';
      } catch (e) {
        res[name] = err(e);
      }
    }
    try {
      await conn.query({ name: 'np_insert', text: 'INSERT INTO np_items VALUES ($1, $2, $3, $4, $5, $6, $7)',
        values: [2, 'dup', null, null, null, null, null] });
    } catch (e) {
      res.unique_prepared = err(e);
    }
    await q("DO $$ BEGIN RAISE NOTICE 'notice %', 42; RAISE WARNING 'warn'; END $$");
    res.notices = notices.slice();
    res.still_usable = (await q("SELECT 'ok'")).rows[0][0];
    return res;
  });

  await step('transactions', async () => {
    const res = {};
    await q('BEGIN');
    await q("INSERT INTO np_items (id, name) VALUES (2001, 'tx')");
    await q('SAVEPOINT a');
    await q("INSERT INTO np_items (id, name) VALUES (2002, 'sp')");
    await q('RELEASE SAVEPOINT a');
    await q('SAVEPOINT b');
    await q("INSERT INTO np_items (id, name) VALUES (2003, 'sp rolled back')");
    try {
      await q("INSERT INTO np_items (id, name) VALUES (2001, 'dup')");
    } catch (e) {
      res.savepoint_error = err(e);
    }
    try {
      await q('SELECT 1');
    } catch (e) {
      res.in_failed_tx = err(e);
    }
    await q('ROLLBACK TO SAVEPOINT b');
    await q("INSERT INTO np_items (id, name) VALUES (2004, 'after rollback to')");
    await q('COMMIT');
    await q('BEGIN');
    await q("INSERT INTO np_items (id, name) VALUES (2005, 'rolled back')");
    await q('ROLLBACK');
    await q('BEGIN ISOLATION LEVEL SERIALIZABLE READ ONLY');
    res.isolation = rows(await q("SELECT current_setting('transaction_isolation'), current_setting('transaction_read_only')"));
    try {
      await q("INSERT INTO np_items (id) VALUES (2006)");
    } catch (e) {
      res.read_only_error = err(e);
    }
    await q('ROLLBACK');
    res.final = (await q('SELECT array_agg(id ORDER BY id) FROM np_items WHERE id > 2000 AND id < 3000')).rows[0][0];
    return res;
  });

  await step('large', async () => {
    const big = 'z'.repeat(3000000);
    const r = rows(await q('SELECT length($1::text), md5($1::text)', [big]));
    const l = (await q("SELECT repeat('ab', 600000) FROM generate_series(1, 3)")).rows.map((x) => x[0].length);
    return { param: r, result: l };
  });

  await q('DROP TABLE np_items, np_copy');
  await conn.end();
  out.pg = require('pg/package.json').version;
}

main().then(
  () => process.stdout.write(`${JSON.stringify(out, null, 1)}\n`),
  (e) => {
    process.stderr.write(`${e.stack}\n`);
    process.exit(1);
  },
);
