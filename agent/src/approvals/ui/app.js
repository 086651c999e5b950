// tollgate approvals page. Everything shown comes from the JSON API and is set with
// textContent (operation text comes from bots): never innerHTML with data.
'use strict';

let csrf = '';
let shown = '';

function $(id) { return document.getElementById(id); }

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function say(text, kind) {
  const m = $('message');
  m.textContent = text;
  m.className = kind || '';
}

async function call(method, path, body) {
  const opts = { method, credentials: 'same-origin', headers: {} };
  if (method !== 'GET') {
    opts.headers['X-Tollgate-CSRF'] = csrf;
    opts.headers['Content-Type'] = 'application/json';
    opts.body = JSON.stringify(body || {});
  }
  const r = await fetch(path, opts);
  let data = null;
  try { data = await r.json(); } catch (_) { data = null; }
  return { status: r.status, data };
}

function when(ms) {
  if (!ms) return '';
  return new Date(ms).toISOString().replace('T', ' ').replace(/\.\d+Z$/, 'Z');
}

function who(r) {
  return r.identity || r.workload_subject || '(unknown)';
}

function votes(r) {
  const names = (r.approvals || []).map((v) => v.subject).join(', ');
  return `${(r.approvals || []).length}/${r.min_approvals}` + (names ? ` (${names})` : '');
}

async function decide(id, verdict, comment) {
  const body = comment ? { comment } : {};
  const r = await call('POST', `/v1/approvals/${encodeURIComponent(id)}/${verdict}`, body);
  if (r.status === 200) {
    const st = r.data && r.data.request ? r.data.request.status : verdict;
    say(`#${id}: ${verdict === 'approve' ? 'approval recorded' : 'denied'} (now ${st})`, 'ok');
  } else {
    const why = r.data && r.data.error ? r.data.error : 'no reason given';
    say(`#${id}: ${verdict} refused: HTTP ${r.status}: ${why}`, 'error');
  }
  await refresh(true);
}

function denyForm(td, id) {
  if (td.querySelector('.deny-form')) return;
  const box = el('div', null, 'deny-form');
  const input = el('input', null, 'comment');
  input.type = 'text';
  input.placeholder = 'reason (required)';
  input.maxLength = 1000;
  const ok = el('button', 'Confirm deny', 'confirm-deny');
  ok.type = 'button';
  ok.addEventListener('click', () => {
    const c = input.value.trim();
    if (!c) { say(`#${id}: a denial needs a comment`, 'error'); return; }
    box.remove();
    decide(id, 'deny', c);
  });
  const cancel = el('button', 'Cancel', 'cancel');
  cancel.type = 'button';
  cancel.addEventListener('click', () => box.remove());
  box.append(input, ok, cancel);
  td.append(box);
  input.focus();
}

function pendingRow(r) {
  const tr = el('tr');
  tr.id = `req-${r.id}`;
  tr.append(el('td', `#${r.id}`), el('td', who(r)), el('td', r.target),
    el('td', r.operation, 'operation'), el('td', r.rule), el('td', votes(r), 'votes'),
    el('td', when(r.created_ms)), el('td', when(r.expires_ms)));
  const td = el('td', null, 'actions');
  const approve = el('button', 'Approve', 'approve');
  approve.type = 'button';
  approve.addEventListener('click', () => decide(r.id, 'approve'));
  const deny = el('button', 'Deny', 'deny');
  deny.type = 'button';
  deny.addEventListener('click', () => denyForm(td, r.id));
  td.append(approve, deny);
  tr.append(td);
  return tr;
}

function recentRow(r) {
  const tr = el('tr');
  tr.id = `req-${r.id}`;
  const by = r.denied_by ? r.denied_by.subject
    : (r.approvals || []).map((v) => v.subject).join(', ');
  tr.append(el('td', `#${r.id}`), el('td', who(r)), el('td', r.target),
    el('td', r.operation, 'operation'), el('td', r.rule), el('td', r.status, 'status'),
    el('td', by), el('td', when(r.created_ms)), el('td', r.decided || ''));
  return tr;
}

async function refresh(force) {
  // Leave the table alone while a denial comment is being typed.
  if (!force && document.querySelector('.deny-form')) return;
  let r;
  try {
    r = await call('GET', '/v1/approvals');
  } catch (e) {
    say(`cannot reach the agent: ${e}`, 'error');
    return;
  }
  if (r.status === 401) {
    say('Your session has ended. Reload the page to sign in again.', 'error');
    return;
  }
  if (r.status !== 200 || !r.data) {
    say(`listing failed: HTTP ${r.status}: ${r.data && r.data.error ? r.data.error : ''}`, 'error');
    return;
  }
  const text = JSON.stringify([r.data.pending, r.data.recent]);
  if (text === shown) return;
  shown = text;
  const p = $('pending').tBodies[0];
  p.replaceChildren(...r.data.pending.map(pendingRow));
  $('pending-empty').hidden = r.data.pending.length > 0;
  const rec = $('recent').tBodies[0];
  rec.replaceChildren(...r.data.recent.map(recentRow));
}

async function logout() {
  const r = await call('POST', '/ui/logout');
  if (r.status === 200) {
    csrf = '';
    $('pending').tBodies[0].replaceChildren();
    $('recent').tBodies[0].replaceChildren();
    $('who').textContent = '';
    say('Signed out. Reload the page to sign in again.', 'ok');
  } else {
    say(`sign-out failed: HTTP ${r.status}`, 'error');
  }
}

async function start() {
  const s = await call('GET', '/ui/session');
  if (s.status === 401) { window.location.assign('/ui/login'); return; }
  if (s.status !== 200 || !s.data) { say(`HTTP ${s.status} from /ui/session`, 'error'); return; }
  csrf = s.data.csrf;
  const groups = (s.data.groups || []).join(', ');
  $('who').textContent = `Signed in as ${s.data.subject}` + (groups ? ` (${groups})` : '');
  $('logout').addEventListener('click', logout);
  await refresh(true);
  setInterval(() => { refresh(false); }, 3000);
}

document.addEventListener('DOMContentLoaded', start);
