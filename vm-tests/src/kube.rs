//! A fake Kubernetes API server for kubectl (no real kube-apiserver installs here): HTTPS on
//! loopback (Python's http.server + ssl), legacy discovery (`/api`, `/apis`, `/api/v1`,
//! `/version`), pods (list, get, delete, watch as newline-delimited events, `log?follow`
//! streamed line by line), secrets, events, `Table` answers when kubectl asks for them, and
//! `Status` errors. It checks the bearer token on every request (401 otherwise) and logs what
//! it received as JSON lines.

use std::path::PathBuf;

use serde_json::Value;

use crate::http::{PyTlsServer, WS_PY};

/// The secret value of Secret `default/db` (`data.password`, base64 on the wire).
pub const SECRET_PASSWORD: &str = "hunter2-db-password";

const SERVER: &str = r#"
import base64, hashlib, json, ssl, sys, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit, parse_qs
port, cert, key, log, token, secret = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6]
logf = open(log, "a", buffering=1)
lock = threading.Lock()
events = []  # (seq, type, pod)
NOW = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 300))
def pod(ns, name):
    return {"kind": "Pod", "apiVersion": "v1",
            "metadata": {"name": name, "namespace": ns, "uid": "uid-" + name, "resourceVersion": "10",
                         "creationTimestamp": NOW, "labels": {"app": name.split("-")[0]}},
            "spec": {"nodeName": "node-1", "containers": [{"name": "main", "image": "nginx:1.25"}]},
            "status": {"phase": "Running", "podIP": "10.0.0.7", "startTime": NOW,
                       "conditions": [{"type": "Ready", "status": "True"}],
                       "containerStatuses": [{"name": "main", "ready": True, "restartCount": 0,
                                              "image": "nginx:1.25", "imageID": "", "started": True,
                                              "state": {"running": {"startedAt": NOW}}}]}}
pods = {"default": {"web-1": pod("default", "web-1"), "web-2": pod("default", "web-2")},
        "prod": {"db-0": pod("prod", "db-0")}}
RES = [
    {"name": "pods", "singularName": "pod", "namespaced": True, "kind": "Pod", "shortNames": ["po"],
     "verbs": ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]},
    {"name": "pods/log", "singularName": "", "namespaced": True, "kind": "Pod", "verbs": ["get"]},
    {"name": "pods/exec", "singularName": "", "namespaced": True, "kind": "PodExecOptions", "verbs": ["create", "get"]},
    {"name": "pods/portforward", "singularName": "", "namespaced": True, "kind": "PodPortForwardOptions", "verbs": ["create", "get"]},
    {"name": "secrets", "singularName": "secret", "namespaced": True, "kind": "Secret",
     "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"]},
    {"name": "serviceaccounts", "singularName": "serviceaccount", "namespaced": True, "kind": "ServiceAccount",
     "shortNames": ["sa"], "verbs": ["get", "list"]},
    {"name": "serviceaccounts/token", "singularName": "", "namespaced": True, "group": "authentication.k8s.io",
     "version": "v1", "kind": "TokenRequest", "verbs": ["create"]},
    {"name": "events", "singularName": "event", "namespaced": True, "kind": "Event", "shortNames": ["ev"],
     "verbs": ["get", "list", "watch"]},
    {"name": "namespaces", "singularName": "namespace", "namespaced": False, "kind": "Namespace", "shortNames": ["ns"],
     "verbs": ["get", "list", "watch"]},
]
COLS = [{"name": "Name", "type": "string", "format": "name", "description": "", "priority": 0},
        {"name": "Ready", "type": "string", "format": "", "description": "", "priority": 0},
        {"name": "Status", "type": "string", "format": "", "description": "", "priority": 0},
        {"name": "Restarts", "type": "string", "format": "", "description": "", "priority": 0},
        {"name": "Age", "type": "string", "format": "", "description": "", "priority": 0}]
def row(p, status="Running"):
    meta = dict(p["metadata"])
    return {"cells": [meta["name"], "1/1", status, "0", "5m"],
            "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": meta}}
def table(rows):
    return {"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {"resourceVersion": "10"},
            "columnDefinitions": COLS, "rows": rows}
def status(code, reason, msg):
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": msg, "reason": reason, "code": code}
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def send_json(self, code, obj):
        b = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(b)))
        self.end_headers()
        self.wfile.write(b)
    def chunk(self, data):
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()
    def start_stream(self, ctype):
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
    def handle_any(self):
        u = urlsplit(self.path)
        q = parse_qs(u.query)
        auth = self.headers.get("Authorization")
        logf.write(json.dumps({"method": self.command, "path": self.path, "authorization": auth,
                               "accept": self.headers.get("Accept"),
                               "impersonate": {k.lower(): v for (k, v) in self.headers.items()
                                               if k.lower().startswith("impersonate-")}}) + "\n")
        if auth != "Bearer " + token:
            return self.send_json(401, status(401, "Unauthorized", "Unauthorized"))
        parts = [p for p in u.path.split("/") if p]
        want_table = "as=Table" in (self.headers.get("Accept") or "")
        if parts == ["api"]:
            return self.send_json(200, {"kind": "APIVersions", "versions": ["v1"],
                "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1:%d" % port}]})
        if parts == ["apis"]:
            return self.send_json(200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": []})
        if parts == ["api", "v1"]:
            return self.send_json(200, {"kind": "APIResourceList", "groupVersion": "v1", "resources": RES})
        if parts == ["version"]:
            return self.send_json(200, {"major": "1", "minor": "32", "gitVersion": "v1.32.0-fake",
                "gitCommit": "fake", "gitTreeState": "clean", "buildDate": NOW, "goVersion": "go1.23",
                "compiler": "gc", "platform": "linux/amd64"})
        if len(parts) >= 5 and parts[:3] == ["api", "v1", "namespaces"]:
            ns, res, rest = parts[3], parts[4], parts[5:]
            if res == "pods":
                return self.pods(ns, rest, q, want_table)
            if res == "events":
                return self.send_json(200, {"kind": "EventList", "apiVersion": "v1", "metadata": {}, "items": []})
            if res == "serviceaccounts" and len(rest) == 2 and rest[1] == "token" and self.command == "POST":
                # TokenRequest: a token for the service account, minted (as the API server
                # does). The request body (JSON or protobuf) is read and not looked at.
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                return self.send_json(201, {"kind": "TokenRequest", "apiVersion": "authentication.k8s.io/v1",
                    "metadata": {"name": rest[0], "namespace": ns, "creationTimestamp": None},
                    "spec": {"audiences": ["https://kubernetes.default.svc"], "expirationSeconds": 3600},
                    "status": {"token": "eyJhbGciOiJSUzI1NiJ9.minted-for-%s" % rest[0],
                               "expirationTimestamp": NOW}})
            if res == "secrets" and rest == ["db"] and ns == "default":
                return self.send_json(200, {"kind": "Secret", "apiVersion": "v1", "type": "Opaque",
                    "metadata": {"name": "db", "namespace": "default", "creationTimestamp": NOW,
                                 "annotations": {"kubectl.kubernetes.io/last-applied-configuration":
                                                 json.dumps({"stringData": {"password": secret}})}},
                    "data": {"password": base64.b64encode(secret.encode()).decode()}})
        return self.send_json(404, status(404, "NotFound", "the server could not find the requested resource"))
    def pods(self, ns, rest, q, want_table):
        with lock:
            space = pods.setdefault(ns, {})
            items = [space[k] for k in sorted(space)]
        if not rest and self.command == "GET":
            if q.get("watch", ["false"])[0] in ("1", "true"):
                return self.watch(ns, want_table)
            if want_table:
                return self.send_json(200, table([row(p) for p in items]))
            return self.send_json(200, {"kind": "PodList", "apiVersion": "v1",
                                        "metadata": {"resourceVersion": "10"}, "items": items})
        name = rest[0] if rest else ""
        with lock:
            p = space.get(name)
        if p is None:
            return self.send_json(404, status(404, "NotFound", 'pods "%s" not found' % name))
        if len(rest) == 2 and rest[1] == "log":
            self.start_stream("text/plain")
            n = 1 if q.get("follow", ["false"])[0] == "true" else 0
            for i in range(1, 31):
                self.chunk(b"%s log line %d\n" % (name.encode(), i))
                if not n and i == 3: break
                time.sleep(0.3)
            return self.chunk(b"")
        if len(rest) == 2 and rest[1] in ("exec", "attach"):
            return self.exec(name, q)
        if len(rest) == 1 and self.command == "GET":
            return self.send_json(200, p)
        if len(rest) == 1 and self.command == "DELETE":
            with lock:
                space.pop(name, None)
                events.append(("DELETED", p))
            return self.send_json(200, p)
        return self.send_json(405, status(405, "MethodNotAllowed", "not supported by the fake"))
    def exec(self, name, q):
        # kubectl >= 1.30: WebSocket with the v5 (or v4) channel protocol: one byte of
        # channel (1 stdout, 2 stderr, 3 status) before each message.
        if (self.headers.get("Upgrade") or "").lower() != "websocket":
            return self.send_json(400, status(400, "BadRequest", "this fake speaks WebSocket only"))
        offered = [x.strip() for x in (self.headers.get("Sec-WebSocket-Protocol") or "").split(",")]
        proto = next((p for p in ("v5.channel.k8s.io", "v4.channel.k8s.io") if p in offered), None)
        if proto is None:
            return self.send_json(400, status(400, "BadRequest", "no supported channel protocol"))
        key = self.headers["Sec-WebSocket-Key"]
        acc = base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()).decode()
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", acc)
        self.send_header("Sec-WebSocket-Protocol", proto)
        self.end_headers()
        cmd = " ".join(q.get("command", []))
        if q.get("tty", ["false"])[0] == "true":
            return self.terminal(name, cmd)
        self.wfile.write(ws_frame(2, b"\x01" + ("exec in %s: %s\n" % (name, cmd)).encode()))
        # Without a terminal, `echo WORDS` prints WORDS on stdout and a note on stderr.
        words = q.get("command", [])
        if words[:1] == ["echo"]:
            self.wfile.write(ws_frame(2, b"\x01" + (" ".join(words[1:]) + "\n").encode()))
            self.wfile.write(ws_frame(2, b"\x02" + ("echo in %s: a note on stderr\n" % name).encode()))
        self.wfile.write(ws_frame(2, b"\x03" + json.dumps({"metadata": {}, "status": "Success"}).encode()))
        self.wfile.write(ws_frame(8, b"\x03\xe8"))
        self.wfile.flush()
        self.close_connection = True
    def terminal(self, name, cmd):
        # A tiny line-mode shell on a terminal: it echoes what is typed (as a tty does), and
        # runs `echo WORDS`, `stty size` (from the last resize on channel 4) and `exit N`.
        size = [0, 0]
        out = lambda s: (self.wfile.write(ws_frame(2, b"\x01" + s.encode())), self.wfile.flush())
        out("%s in %s\r\n$ " % (cmd, name))
        line = b""
        code = 0
        while True:
            m = ws_read(self.rfile)
            if m is None: break
            op, data = m
            if op == 8: break
            if not data: continue
            ch, data = data[0], data[1:]
            if ch == 4:
                r = json.loads(data)
                size = [r.get("Height", 0), r.get("Width", 0)]
                continue
            if ch != 0: continue
            done = False
            for b in data:
                if b in (13, 10):
                    out("\r\n")
                    words = line.decode(errors="replace").split()
                    line = b""
                    if words[:1] == ["echo"]: out(" ".join(words[1:]) + "\r\n")
                    elif words == ["stty", "size"]: out("%d %d\r\n" % tuple(size))
                    elif words[:1] == ["exit"]:
                        code = int(words[1]) if len(words) > 1 else 0
                        done = True
                        break
                    elif words: out("%s: not found\r\n" % words[0])
                    out("$ ")
                elif b == 3:
                    line = b""
                    out("^C\r\n$ ")
                else:
                    line += bytes([b])
                    out(bytes([b]).decode(errors="replace"))
            if done: break
        if code == 0:
            st = {"metadata": {}, "status": "Success"}
        else:
            st = {"metadata": {}, "status": "Failure", "message": "command terminated with non-zero exit code: %d" % code,
                  "reason": "NonZeroExitCode", "details": {"causes": [{"reason": "ExitCode", "message": str(code)}]}}
        self.wfile.write(ws_frame(2, b"\x03" + json.dumps(st).encode()))
        self.wfile.write(ws_frame(8, b"\x03\xe8"))
        self.wfile.flush()
        self.close_connection = True
    def watch(self, ns, want_table):
        self.start_stream("application/json")
        def send(kind, p, st="Running"):
            obj = table([row(p, st)]) if want_table else p
            self.chunk(json.dumps({"type": kind, "object": obj}).encode() + b"\n")
        with lock:
            seen = len(events)
        deadline = time.time() + 30
        while time.time() < deadline:
            with lock:
                new = events[seen:]
                seen = len(events)
            for kind, p in new:
                if p["metadata"]["namespace"] == ns:
                    send(kind, p, "Terminating")
            time.sleep(0.1)
        self.chunk(b"")
    do_GET = handle_any
    do_DELETE = handle_any
    do_POST = handle_any
    do_PUT = handle_any
    do_PATCH = handle_any
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
class S(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        pass  # a client that hangs up mid-stream (kubectl logs -f killed) is normal here
srv = S(("127.0.0.1", port), H)
srv.daemon_threads = True
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
print("ready", flush=True)
srv.serve_forever()
"#;

/// The fake API server. Stopped (by its pid) on drop.
pub struct FakeApiServer {
    pub port: u16,
    /// Its CA certificate (the agent's `tls.ca_file`).
    pub ca_file: PathBuf,
    server: PyTlsServer,
}

impl FakeApiServer {
    /// Start it, accepting only `Authorization: Bearer <token>`.
    pub fn start(tag: &str, token: &str) -> FakeApiServer {
        let s = PyTlsServer::start(
            &format!("{tag}-kube"),
            &format!("{WS_PY}{SERVER}"),
            &[token, SECRET_PASSWORD],
        );
        FakeApiServer {
            port: s.port,
            ca_file: s.ca_file.clone(),
            server: s,
        }
    }

    /// Every request it received, in order.
    pub fn access_log(&self) -> Vec<Value> {
        self.server.access_log()
    }
}

/// A kubeconfig for `https://127.0.0.1:<port>` trusting `ca_pem` (as
/// `certificate-authority-data`), with no secret: the user has only a `username` (kubectl
/// prompts for credentials when a user has nothing at all; with a name it sends basic auth
/// with an empty password, which the agent strips like any Authorization from a bot).
pub fn kubeconfig(port: u16, ca_pem: &str) -> String {
    use base64::Engine as _;
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: https://127.0.0.1:{port}\n    certificate-authority-data: {ca}\nusers:\n- name: bot\n  user:\n    username: ci-bot\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: bot\n    namespace: default\ncurrent-context: fake\n"
    )
}
