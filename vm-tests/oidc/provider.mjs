// A real OpenID Connect provider (panva/oidc-provider) for tollgate's end-to-end tests.
//
//   node provider.mjs [--port N] [--redirect-uri URL]... [--token-ttl SECONDS]
//
// Binds 127.0.0.1 only (port 0 = any free port), prints ONE JSON line on stdout once it
// listens (issuer, port, users, client ids and their random secrets), logs to stderr, and
// exits when stdin closes (so a test harness that dies takes it down).
//
// What it serves:
// - discovery, JWKS, authorization code + PKCE, client_credentials; every access token is a
//   JWT (RFC 9068, `typ: at+jwt`, RS256) whose `aud` comes from the resource indicator:
//   resource `urn:aud:<name>` gives `aud: "<name>"`, and the default resource is
//   `urn:aud:tollgate`;
// - users (password = user name + "-pw"): alice and bob in `dba`, carol in `dev`. Their
//   tokens carry `sub` and `groups` (access token and ID token, scope `groups`);
// - clients:
//     tollgate             confidential web client, authorization code + PKCE, redirect URIs
//                          from --redirect-uri (the agent's web page)
//     tollgate-cli         public client, authorization code + PKCE, loopback redirect
//     deploy-bot           workload, client_credentials, groups ["deployers"]
//     report-bot           workload, client_credentials, groups ["analysts"]
//     test-approver-<user> TEST-ONLY: client_credentials whose token is issued *as that user*
//                          (sub = user, groups = the user's groups), so tests get approver
//                          tokens without a browser. A real IdP has no such client.
//     test-expired-<user>  TEST-ONLY: like test-approver-<user>, but the token's lifetime
//                          ended before it was issued (`iat` = now - 120 s, `exp` = now -
//                          60 s, past the usual 30 s verifier leeway): an approver's token
//                          that lapsed, without a test waiting out a TTL plus the leeway.
//                          Signed by the provider's key like every other token.
// - a login page at /interaction/<uid> (a plain HTML form: username, password); consent is
//   granted automatically (every client here is first-party);
// - TEST-ONLY admin endpoint `POST /-/rotate[?keep_old=1]`: generate a new signing key; the
//   new key signs from now on, the old one is dropped from the JWKS unless keep_old=1.
//   Answers `{"kid": "<new kid>", "jwks_kids": [...]}`.

import * as crypto from 'node:crypto';
import * as http from 'node:http';
import Provider from 'oidc-provider';

// stdout carries exactly one line, the ready JSON: the library's notices go to stderr.
console.log = console.error;
console.info = console.error;

const args = process.argv.slice(2);
const opt = { port: 0, redirectUris: [], tokenTtl: 300 };
for (let i = 0; i < args.length; i += 1) {
  const a = args[i];
  const v = args[i + 1];
  if (a === '--port') { opt.port = Number(v); i += 1; }
  else if (a === '--redirect-uri') { opt.redirectUris.push(v); i += 1; }
  else if (a === '--token-ttl') { opt.tokenTtl = Number(v); i += 1; }
  else { process.stderr.write(`unknown argument ${a}\n`); process.exit(2); }
}

const USERS = {
  alice: { groups: ['dba'], name: 'Alice Admin' },
  bob: { groups: ['dba'], name: 'Bob Backup' },
  carol: { groups: ['dev'], name: 'Carol Coder' },
};
const WORKLOADS = {
  'deploy-bot': ['deployers'],
  'report-bot': ['analysts'],
};

const secret = () => crypto.randomBytes(18).toString('base64url');
const secrets = {};

function newKey() {
  const { privateKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
  const jwk = privateKey.export({ format: 'jwk' });
  return { ...jwk, kid: `k-${crypto.randomBytes(6).toString('hex')}`, alg: 'RS256', use: 'sig' };
}

const clients = [];
secrets.tollgate = secret();
clients.push({
  client_id: 'tollgate',
  client_secret: secrets.tollgate,
  redirect_uris: opt.redirectUris.length ? opt.redirectUris : ['http://127.0.0.1/unused'],
  grant_types: ['authorization_code', 'refresh_token'],
  response_types: ['code'],
  token_endpoint_auth_method: 'client_secret_basic',
});
clients.push({
  client_id: 'tollgate-cli',
  application_type: 'native',
  redirect_uris: ['http://127.0.0.1/callback'],
  grant_types: ['authorization_code'],
  response_types: ['code'],
  token_endpoint_auth_method: 'none',
});
// A client_credentials client with a fresh secret, plus `extra` metadata.
function credentialsClient(id, extra) {
  secrets[id] = secret();
  clients.push({
    client_id: id,
    client_secret: secrets[id],
    grant_types: ['client_credentials'],
    response_types: [],
    redirect_uris: [],
    token_endpoint_auth_method: 'client_secret_basic',
    ...extra,
  });
}
for (const [id, groups] of Object.entries(WORKLOADS)) {
  credentialsClient(id, { tollgate_groups: groups });
}
for (const user of Object.keys(USERS)) {
  for (const [prefix, expired] of [['test-approver', false], ['test-expired', true]]) {
    credentialsClient(`${prefix}-${user}`, {
      tollgate_test_user: user,
      ...(expired ? { tollgate_test_expired: true } : {}),
    });
  }
}

const cookieKeys = [secret(), secret()];
let keys = [newKey()];
let issuer;

function makeProvider() {
  const provider = new Provider(issuer, {
    clients,
    jwks: { keys },
    cookies: { keys: cookieKeys },
    extraClientMetadata: {
      properties: ['tollgate_groups', 'tollgate_test_user', 'tollgate_test_expired'],
      validator(_ctx, key, value) {
        if (value === undefined) return;
        if (key === 'tollgate_groups' && !Array.isArray(value)) throw new Error('tollgate_groups must be an array');
        if (key === 'tollgate_test_user' && !USERS[value]) throw new Error('unknown test user');
        if (key === 'tollgate_test_expired' && value !== true) throw new Error('tollgate_test_expired must be true');
      },
    },
    async findAccount(_ctx, id) {
      const u = USERS[id];
      if (!u) return undefined;
      return {
        accountId: id,
        async claims() { return { sub: id, name: u.name, groups: u.groups }; },
      };
    },
    claims: { openid: ['sub'], profile: ['name'], groups: ['groups'] },
    scopes: ['openid', 'profile', 'groups', 'offline_access'],
    conformIdTokenClaims: false,
    pkce: { required: () => true },
    interactions: { url: (_ctx, interaction) => `/interaction/${interaction.uid}` },
    features: {
      devInteractions: { enabled: false },
      clientCredentials: { enabled: true },
      resourceIndicators: {
        enabled: true,
        defaultResource: () => 'urn:aud:tollgate',
        useGrantedResource: () => true,
        getResourceServerInfo(_ctx, indicator) {
          const m = /^urn:aud:([A-Za-z0-9._-]+)$/.exec(indicator);
          if (!m) throw new Provider.errors.InvalidTarget('resource must be urn:aud:<audience>');
          return {
            audience: m[1],
            scope: 'approve',
            accessTokenFormat: 'jwt',
            accessTokenTTL: opt.tokenTtl,
            jwt: { sign: { alg: 'RS256' } },
          };
        },
      },
    },
    async extraTokenClaims(_ctx, token) {
      if (token.accountId && USERS[token.accountId]) {
        return { groups: USERS[token.accountId].groups };
      }
      const client = token.client ?? (await _ctx.oidc.provider.Client.find(token.clientId));
      if (client?.tollgate_groups) return { groups: client.tollgate_groups };
      return undefined;
    },
    formats: {
      customizers: {
        // TEST-ONLY: a test-approver-<user> (or test-expired-<user>) client's token speaks
        // for <user>; a test-expired-<user> token lapsed a minute before it was issued.
        async jwt(_ctx, token, jwt) {
          const user = token.client?.tollgate_test_user;
          if (user) {
            jwt.payload.sub = user;
            jwt.payload.groups = USERS[user].groups;
          }
          if (token.client?.tollgate_test_expired) {
            const now = Math.floor(Date.now() / 1000);
            jwt.payload.iat = now - 120;
            jwt.payload.exp = now - 60;
          }
        },
      },
    },
    ttl: {
      AccessToken: () => opt.tokenTtl,
      ClientCredentials: () => opt.tokenTtl,
    },
    renderError(ctx, out) {
      ctx.type = 'html';
      ctx.body = `<!DOCTYPE html><title>error</title><h1>${esc(out.error)}</h1><p>${esc(out.error_description ?? '')}</p>`;
    },
  });
  provider.on('server_error', (_ctx, err) => process.stderr.write(`server_error: ${err.stack}\n`));
  return provider;
}

function esc(s) {
  return String(s).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

function loginPage(uid, client, error) {
  return `<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>Sign in - test IdP</title>
<style>body{font-family:sans-serif;margin:3em}form{display:grid;gap:.6em;width:18em}</style></head>
<body><h1>Sign in</h1><p>to <b id="client">${esc(client)}</b></p>
${error ? `<p id="error" style="color:#b00">${esc(error)}</p>` : ''}
<form method="post" action="/interaction/${esc(uid)}/login" autocomplete="off">
<label>Username <input id="username" name="username" required autofocus></label>
<label>Password <input id="password" name="password" type="password" required></label>
<button id="submit" type="submit">Sign in</button>
</form></body></html>`;
}

async function readForm(req) {
  let body = '';
  for await (const chunk of req) {
    body += chunk;
    if (body.length > 10000) throw new Error('form too large');
  }
  return new URLSearchParams(body);
}

let provider;

async function interaction(req, res, url) {
  const m = /^\/interaction\/([^/]+)(\/login)?$/.exec(url.pathname);
  if (!m) return false;
  const details = await provider.interactionDetails(req, res);
  const { prompt, params, session } = details;
  if (prompt.name === 'login') {
    if (req.method === 'POST' && m[2]) {
      const form = await readForm(req);
      const user = form.get('username') ?? '';
      if (!USERS[user] || form.get('password') !== `${user}-pw`) {
        res.writeHead(200, { 'content-type': 'text/html; charset=utf-8' });
        res.end(loginPage(details.uid, params.client_id, 'wrong username or password'));
        return true;
      }
      await provider.interactionFinished(req, res, { login: { accountId: user } }, { mergeWithLastSubmission: false });
      return true;
    }
    res.writeHead(200, { 'content-type': 'text/html; charset=utf-8' });
    res.end(loginPage(details.uid, params.client_id));
    return true;
  }
  if (prompt.name === 'consent') {
    // First-party clients only: consent is implied.
    const grant = details.grantId
      ? await provider.Grant.find(details.grantId)
      : new provider.Grant({ accountId: session.accountId, clientId: params.client_id });
    const d = prompt.details;
    if (d.missingOIDCScope) grant.addOIDCScope(d.missingOIDCScope.join(' '));
    if (d.missingOIDCClaims) grant.addOIDCClaims(d.missingOIDCClaims);
    if (d.missingResourceScopes) {
      for (const [indicator, scopes] of Object.entries(d.missingResourceScopes)) {
        grant.addResourceScope(indicator, scopes.join(' '));
      }
    }
    const grantId = await grant.save();
    await provider.interactionFinished(req, res, { consent: { grantId } }, { mergeWithLastSubmission: true });
    return true;
  }
  res.writeHead(400, { 'content-type': 'text/plain' });
  res.end(`unsupported prompt ${prompt.name}`);
  return true;
}

const server = http.createServer(async (req, res) => {
  try {
    const url = new URL(req.url, issuer);
    if (url.pathname === '/-/rotate' && req.method === 'POST') {
      const fresh = newKey();
      keys = url.searchParams.get('keep_old') === '1' ? [fresh, ...keys] : [fresh];
      provider = makeProvider();
      process.stderr.write(`rotated keys: ${keys.map((k) => k.kid).join(',')}\n`);
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ kid: fresh.kid, jwks_kids: keys.map((k) => k.kid) }));
      return;
    }
    if (await interaction(req, res, url)) return;
    provider.callback()(req, res);
  } catch (err) {
    process.stderr.write(`request error: ${err.stack}\n`);
    if (!res.headersSent) res.writeHead(500, { 'content-type': 'text/plain' });
    res.end('internal error');
  }
});

server.listen(opt.port, '127.0.0.1', () => {
  const { port } = server.address();
  issuer = `http://127.0.0.1:${port}`;
  provider = makeProvider();
  process.stdout.write(`${JSON.stringify({
    ready: true,
    issuer,
    port,
    kid: keys[0].kid,
    users: Object.fromEntries(Object.entries(USERS).map(([u, v]) => [u, { password: `${u}-pw`, groups: v.groups }])),
    clients: secrets,
    public_clients: ['tollgate-cli'],
  })}\n`);
});

process.stdin.on('end', () => process.exit(0));
process.stdin.on('close', () => process.exit(0));
process.stdin.resume();
for (const sig of ['SIGTERM', 'SIGINT']) process.on(sig, () => process.exit(0));
