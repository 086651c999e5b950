//! A fleet: two agents sharing one PostgreSQL approval store (`[approvals] store`), each in
//! its own network namespace (`[agent] namespace = "own"`) with its own bot (an unmodified
//! psql in a cgroup, unprivileged). A request raised on agent A is listed and approved through
//! agent B's admin API, and A's held DELETE completes within 1 s; a request raised on B is
//! denied through A's API and B's bot gets 42501 with the comment.
//!
//! Topology (all created here and removed on drop, also on panic):
//! ```text
//!  host: PostgreSQL (app db = the bots' target, and the approval store) on
//!        127.0.0.1, 10.231.<a>.1, 10.231.<b>.1
//!   |- veth -- netns A (10.231.<a>.2): agent A (listen 127.0.0.1, admin 10.231.<a>.2), bot A
//!   '- veth -- netns B (10.231.<b>.2): agent B (...), bot B
//! ```
//! Both agents protect the same target (`10.231.0.0/16:<port>`) and attach at the cgroup v2
//! root, which sees every namespace; only `namespace = "own"` keeps each to its own bot.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;
use vm_tests::{
    free_port,
    netns::NetNs,
    pg::{PgServer, APP_PASSWORD},
    psql::Psql,
    require_root, tollgate_bin, unique, wait_for, Cgroup, TempDir,
};

const STORE_PASSWORD: &str = "Store-Secret-91c2e7";

/// The approval store's role and database on `store`.
fn create_store(store: &PgServer) {
    store.superuser_sql(
        &format!("CREATE ROLE tollgate_store LOGIN PASSWORD '{STORE_PASSWORD}'"),
        "postgres",
    );
    store.superuser_sql(
        "CREATE DATABASE tollgate_store OWNER tollgate_store",
        "postgres",
    );
}

/// One agent in its namespace, run by the test (not by `AgentProc`, which runs agents in the
/// host's namespace). Dropping it kills the agent and removes its pins.
struct FleetAgent {
    child: Option<Child>,
    netns: PathBuf,
    policy_path: PathBuf,
    env: Vec<(String, String)>,
    admin: SocketAddr,
    metrics: SocketAddr,
    pin_path: PathBuf,
    data_dir: PathBuf,
    stderr_path: PathBuf,
    _dir: TempDir,
}

impl FleetAgent {
    fn start_env(
        ns: &NetNs,
        tag: &str,
        body: &str,
        approvals: &str,
        env: &[(&str, &str)],
    ) -> FleetAgent {
        let mut a = FleetAgent::spawn_env(ns, tag, body, approvals, env);
        a.wait_ready(tag);
        a
    }

    fn spawn_env(
        ns: &NetNs,
        tag: &str,
        body: &str,
        approvals: &str,
        env: &[(&str, &str)],
    ) -> FleetAgent {
        let dir = TempDir::new(&format!("fleet-{tag}"));
        let admin = SocketAddr::from((ns.ns_addr, free_port()));
        let metrics = SocketAddr::from((ns.ns_addr, free_port()));
        let listen = free_port();
        let pin_path = PathBuf::from(format!("/sys/fs/bpf/tollgate-fleet-{}", unique(tag)));
        let data_dir = dir.path().join("data");
        let policy = format!(
            "[agent]\nlisten = [\"127.0.0.1:{listen}\"]\nmetrics = \"{metrics}\"\nadmin = \"{admin}\"\n\
             data_dir = \"{}\"\nfail_mode = \"closed\"\nbpf_pin_path = \"{}\"\ndrain_timeout = \"2s\"\n\
             namespace = \"own\"\nhost_id = \"{tag}\"\n\n{approvals}\n{body}",
            data_dir.display(),
            pin_path.display()
        );
        let policy_path = dir.path().join("policy.toml");
        std::fs::write(&policy_path, policy).expect("policy");
        let stderr_path = dir.path().join("agent.stderr");
        let log = std::fs::File::create(&stderr_path).expect("stderr file");
        let child = ns
            .command(&tollgate_bin())
            .arg("run")
            .arg("--policy")
            .arg(&policy_path)
            .env("NO_COLOR", "1")
            .env("TOLLGATE_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn tollgate run in the namespace");
        FleetAgent {
            child: Some(child),
            netns: ns.path(),
            policy_path,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            admin,
            metrics,
            pin_path,
            data_dir,
            stderr_path,
            _dir: dir,
        }
    }

    /// Spawned but not waited for: [`FleetAgent::wait_ready`] (agents starting together).
    fn spawn(ns: &NetNs, tag: &str, body: &str, approvals: &str) -> FleetAgent {
        FleetAgent::spawn_env(ns, tag, body, approvals, &[])
    }

    fn wait_ready(&mut self, tag: &str) {
        let a = self;
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            if let Some(Ok(Some(st))) = a.child.as_mut().map(Child::try_wait) {
                a.child = None;
                panic!("agent {tag} exited during start with {st}:\n{}", a.stderr());
            }
            if matches!(
                vm_tests::http_get(a.metrics, "/metrics", Duration::from_secs(2)),
                Ok((200, _))
            ) && matches!(
                vm_tests::http_get(a.admin, "/healthz", Duration::from_secs(2)),
                Ok((200, _))
            ) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "agent {tag} not ready within 40 s:\n{}",
                a.stderr()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `kill -9` the agent, then start it again with the same policy (pins are replaced).
    fn kill9_and_restart(&mut self, tag: &str) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let log = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.stderr_path)
            .expect("stderr file");
        let f = std::fs::File::open(&self.netns).expect("netns");
        let mut cmd = Command::new(tollgate_bin());
        // SAFETY: setns(2) in the forked child before exec; the file is owned by the closure.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(move || {
                use std::os::fd::AsRawFd;
                if libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .arg("run")
            .arg("--policy")
            .arg(&self.policy_path)
            .env("NO_COLOR", "1")
            .env("TOLLGATE_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("respawn tollgate run");
        self.child = Some(child);
        self.wait_ready(tag);
    }

    /// `name{labels}` summed from this agent's /metrics.
    fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let (st, text) = vm_tests::http_get(self.metrics, "/metrics", Duration::from_secs(5))
            .expect("scrape metrics");
        assert_eq!(st, 200);
        vm_tests::metric_sum(&vm_tests::parse_metrics(&text), name, labels)
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    fn audit(&self) -> Vec<Value> {
        std::fs::read_to_string(self.data_dir.join("audit.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    fn token(&self) -> String {
        std::fs::read_to_string(self.data_dir.join("admin.token"))
            .expect("admin token")
            .trim()
            .to_string()
    }

    /// One admin API call with this agent's local admin token.
    fn api(&self, method: &str, path: &str, body: &str) -> (u16, Value) {
        http(self.admin, method, path, &self.token(), body)
    }
}

impl Drop for FleetAgent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on the pid of our own child, not yet reaped.
            unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new(tollgate_bin())
            .args(["uninstall", "--pin-path"])
            .arg(&self.pin_path)
            .output();
    }
}

/// A minimal HTTP/1.1 client (Connection: close).
fn http(addr: SocketAddr, method: &str, path: &str, token: &str, body: &str) -> (u16, Value) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect admin");
    s.set_nodelay(true).ok();
    s.set_read_timeout(Some(Duration::from_secs(15))).ok();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("send");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split("\r\n\r\n").nth(1).unwrap_or("");
    (
        status,
        serde_json::from_str(body.trim()).unwrap_or(Value::Null),
    )
}

/// A psql in a bot cgroup inside a namespace, to the namespace's host address.
fn psql(bot: &Cgroup, ns: &NetNs, port: u16, sql: &str) -> Psql {
    Psql::spawn_to(
        bot,
        Some(&ns.path()),
        &ns.host_addr.to_string(),
        port,
        "wrong-on-purpose",
        &["-c", sql],
    )
}

fn body(pg: &PgServer, bot: &Cgroup, secret: &Path) -> String {
    format!(
        r#"[[identity]]
name = "ci-bot"
cgroup = "{glob}"

[[target]]
name = "app-db"
protocol = "postgres"
address = ["10.231.0.0/16:{port}"]
credential = "app-rw"

[credential.app-rw]
user = "app_rw"
password_file = "{secret}"

[[rule]]
name = "ci reads"
identities = ["ci-bot"]
targets = ["app-db"]
action = "allow"
sql = {{ statements = ["select", "set", "show"] }}

[[rule]]
name = "deletes need a dba"
identities = ["ci-bot"]
targets = ["app-db"]
action = "approve"
sql = {{ statements = ["delete"] }}
timeout = "2m"

[[rule]]
name = "updates need two approvers"
identities = ["ci-bot"]
targets = ["app-db"]
action = "approve"
sql = {{ statements = ["update"] }}
min_approvals = 2
timeout = "2m"
"#,
        glob = bot.glob(),
        port = pg.port,
        secret = secret.display(),
    )
}

fn count(pg: &PgServer, sql: &str) -> String {
    pg.superuser_sql(sql, "app").trim().to_string()
}

#[test]
fn two_agents_share_one_approval_store() {
    require_root();
    let ns_a = NetNs::new("fa", 41);
    let ns_b = NetNs::new("fb", 42);
    let cidr_a = format!("{}/30", ns_a.host_addr);
    let cidr_b = format!("{}/30", ns_b.host_addr);
    let pg = PgServer::start_on(
        "fleet",
        &[&ns_a.host_addr.to_string(), &ns_b.host_addr.to_string()],
        &[&cidr_a, &cidr_b],
    );
    create_store(&pg);
    let secrets = TempDir::new("fleet-secrets");
    let app_secret = secrets.path().join("app-rw.pw");
    std::fs::write(&app_secret, format!("{APP_PASSWORD}\n")).expect("secret");
    let store_secret = secrets.path().join("store.pw");
    std::fs::write(&store_secret, format!("{STORE_PASSWORD}\n")).expect("store secret");

    let bot_a = Cgroup::new("fleet-bot-a");
    let bot_b = Cgroup::new("fleet-bot-b");
    // A reads the store password from a file; B has it in the URL. Each reaches the store
    // through its own veth, at an address the agents also protect (the agent's own
    // connections carry its mark and are never redirected).
    // Both start together: the schema is migrated once (advisory lock), whoever comes first.
    let mut agent_a = FleetAgent::spawn(
        &ns_a,
        "agent-a",
        &body(&pg, &bot_a, &app_secret),
        &format!(
            "[approvals]\nstore = \"postgres://tollgate_store@{}:{}/tollgate_store\"\nstore_password_file = \"{}\"\n",
            ns_a.host_addr,
            pg.port,
            store_secret.display()
        ),
    );
    let mut agent_b = FleetAgent::spawn(
        &ns_b,
        "agent-b",
        &body(&pg, &bot_b, &app_secret),
        &format!(
            "[approvals]\nstore = \"postgres://tollgate_store:{STORE_PASSWORD}@{}:{}/tollgate_store\"\n",
            ns_b.host_addr, pg.port
        ),
    );
    agent_a.wait_ready("agent-a");
    agent_b.wait_ready("agent-b");
    // Both migrated the same schema once.
    assert_eq!(
        pg.superuser_sql(
            "SELECT string_agg(version::text, ',') FROM tollgate_schema_version",
            "tollgate_store"
        )
        .trim(),
        "1"
    );

    // 1. Raised on A, listed by B, approved through B: A's bot proceeds within 1 s.
    let mut p = psql(&bot_a, &ns_a, pg.port, "DELETE FROM orders WHERE id = 1");
    let id = p.approval_id();
    assert_eq!(
        count(&pg, "SELECT count(*) FROM orders WHERE id = 1"),
        "1",
        "held, not run"
    );
    let (st, list) = agent_b.api("GET", "/v1/approvals", "");
    assert_eq!(st, 200, "{list}");
    let listed = list["pending"]
        .as_array()
        .and_then(|a| a.iter().find(|r| r["id"] == id))
        .unwrap_or_else(|| panic!("B lists A's pending request #{id}: {list}"))
        .clone();
    assert_eq!(listed["holder"], "agent-a", "{listed}");
    assert_eq!(listed["status"], "pending");
    assert!(
        listed["operation"]
            .as_str()
            .unwrap_or("")
            .contains("DELETE FROM orders"),
        "{listed}"
    );
    // The CLI pointed at B shows it too, with the agent that holds it.
    let tf = agent_b.data_dir.join("admin.token").display().to_string();
    let (code, out, err) = vm_tests::tollgate(&[
        "approvals",
        "list",
        "--admin",
        &agent_b.admin.to_string(),
        "--token-file",
        &tf,
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.lines()
            .any(|l| l.contains(&format!("#{id} ")) && l.contains("(on agent-a)")),
        "{out}"
    );
    let t0 = Instant::now();
    let (st, v) = agent_b.api("POST", &format!("/v1/approvals/{id}/approve"), "{}");
    let api_ms = t0.elapsed().as_secs_f64() * 1000.0;
    assert_eq!(st, 200, "approve through B: {v}");
    assert_eq!(v["request"]["status"], "approved");
    let (at, _) = p.wait_line("DELETE 1", Duration::from_secs(5), |l| {
        l.trim() == "DELETE 1"
    });
    let wake = at.saturating_duration_since(t0);
    println!(
        "fleet: request #{id} raised on agent A, approved through agent B's API ({api_ms:.1} ms for the call); A's psql printed DELETE 1 {:.1} ms after the approve call started",
        wake.as_secs_f64() * 1000.0
    );
    assert!(
        wake < Duration::from_secs(1),
        "A's bot must proceed within 1 s of the approve on B, took {wake:?}"
    );
    let (ok, out) = p.finish();
    assert!(ok, "psql A: {out}");
    assert_eq!(
        count(&pg, "SELECT count(*) FROM orders WHERE id = 1"),
        "0",
        "the row is gone"
    );
    // Audit: B recorded the decision with its approver, A (the holder) the outcome.
    let approver = tollgate_approver(&agent_b);
    let on_b = agent_b.audit();
    assert!(
        on_b.iter().any(|e| e["event"] == "approval"
            && e["approval_id"] == id
            && e["action"] == "approved"
            && e["approver"] == approver.as_str()),
        "B's audit shows the approval by {approver}: {on_b:?}"
    );
    let on_a = agent_a.audit();
    assert!(
        on_a.iter().any(|e| e["event"] == "approval"
            && e["approval_id"] == id
            && e["action"] == "requested"
            && e["holder"] == "agent-a"),
        "A's audit shows the request: {on_a:?}"
    );
    assert!(
        on_a.iter().any(|e| e["event"] == "approval"
            && e["approval_id"] == id
            && e["action"] == "approved"
            && e["approver"] == approver.as_str()),
        "A's audit shows who approved its held operation: {on_a:?}"
    );
    // Metrics: the holder counts the outcome.
    assert_eq!(
        agent_a.metric("tollgate_approvals_total", &[("outcome", "approved")]),
        1.0
    );
    assert_eq!(agent_a.metric("tollgate_approvals_pending", &[]), 0.0);
    // A second approve (through A now) finds it closed.
    let (st, v) = agent_a.api("POST", &format!("/v1/approvals/{id}/approve"), "{}");
    assert_eq!(st, 409, "{v}");

    // 2. Raised on B, denied through A with a comment: B's bot gets 42501 with it.
    let mut p = psql(&bot_b, &ns_b, pg.port, "DELETE FROM orders WHERE id = 2");
    let id_b = p.approval_id();
    assert_ne!(id_b, id, "ids come from one sequence");
    let (st, v) = agent_a.api("GET", &format!("/v1/approvals/{id_b}"), "");
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["request"]["holder"], "agent-b");
    let (st, v) = agent_a.api(
        "POST",
        &format!("/v1/approvals/{id_b}/deny"),
        r#"{"comment": "not during the freeze"}"#,
    );
    assert_eq!(st, 200, "deny through A: {v}");
    let (_, l) = p.wait_line("the denial", Duration::from_secs(5), |l| {
        l.contains("42501") || l.contains("denied")
    });
    let (_, out) = p.finish();
    assert!(
        out.contains("42501") && out.contains("not during the freeze"),
        "B's bot gets 42501 with the comment: {l}\n{out}"
    );
    assert_eq!(
        count(&pg, "SELECT count(*) FROM orders WHERE id = 2"),
        "1",
        "denied: the row stays"
    );

    // 3. Two approvers on two hosts racing on one request: exactly one decides.
    let mut p = psql(&bot_a, &ns_a, pg.port, "DELETE FROM orders WHERE id = 4");
    let id_r = p.approval_id();
    let (ta, tb) = (agent_a.token(), agent_b.token());
    let (aa, ab) = (agent_a.admin, agent_b.admin);
    let path_ok = format!("/v1/approvals/{id_r}/approve");
    let path_no = format!("/v1/approvals/{id_r}/deny");
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(2));
    let b1 = barrier.clone();
    let h1 = std::thread::spawn(move || {
        b1.wait();
        http(aa, "POST", &path_ok, &ta, "{}")
    });
    let b2 = barrier.clone();
    let h2 = std::thread::spawn(move || {
        b2.wait();
        http(ab, "POST", &path_no, &tb, r#"{"comment": "raced"}"#)
    });
    let (ra, rb) = (
        h1.join().expect("approve thread"),
        h2.join().expect("deny thread"),
    );
    let mut codes = [ra.0, rb.0];
    codes.sort_unstable();
    assert_eq!(codes, [200, 409], "one decision wins: {ra:?} {rb:?}");
    let (_, out) = {
        let want = if ra.0 == 200 { "DELETE 1" } else { "42501" };
        p.wait_line(want, Duration::from_secs(5), |l| l.contains(want));
        p.finish()
    };
    let (_, final_r) = agent_b.api("GET", &format!("/v1/approvals/{id_r}"), "");
    let winner = if ra.0 == 200 { "approved" } else { "denied" };
    assert_eq!(
        final_r["request"]["status"], winner,
        "{final_r}
{out}"
    );
    println!("fleet: racing approve (A) and deny (B) on #{id_r}: {winner} won, the other got 409");

    // 4. min_approvals counts distinct subjects across hosts: the same approver (the local
    //    admin subject) approving through A and then through B is one approval.
    let mut p = psql(
        &bot_a,
        &ns_a,
        pg.port,
        "UPDATE orders SET amount = 0 WHERE id = 5",
    );
    let id_u = p.approval_id();
    let (st, v) = agent_a.api("POST", &format!("/v1/approvals/{id_u}/approve"), "{}");
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["request"]["status"], "pending", "one of two: {v}");
    let (st, v) = agent_b.api("POST", &format!("/v1/approvals/{id_u}/approve"), "{}");
    assert_eq!(st, 409, "the same subject through another host: {v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap_or("")
            .contains("already approved"),
        "{v}"
    );
    let (st, v) = agent_b.api(
        "POST",
        &format!("/v1/approvals/{id_u}/deny"),
        r#"{"comment": "needs a second person"}"#,
    );
    assert_eq!(st, 200, "{v}");
    let (_, out) = p.finish();
    assert!(
        out.contains("42501") && out.contains("needs a second person"),
        "{out}"
    );
    assert_eq!(
        count(&pg, "SELECT amount FROM orders WHERE id = 5"),
        "50",
        "not updated"
    );

    // 5. A bot that goes away cancels its request (B holds it); a restarted agent closes the
    //    requests it held ("agent restarted").
    let p = psql(&bot_b, &ns_b, pg.port, "DELETE FROM orders WHERE id = 6");
    let mut p = p;
    let id_c = p.approval_id();
    drop(p); // kills psql
    let r = wait_for(
        Duration::from_secs(10),
        "the request to be cancelled",
        || {
            let (_, v) = agent_a.api("GET", &format!("/v1/approvals/{id_c}"), "");
            (v["request"]["status"] == "cancelled").then_some(v)
        },
    );
    assert_eq!(r["request"]["holder"], "agent-b", "{r}");
    let mut p = psql(&bot_b, &ns_b, pg.port, "DELETE FROM orders WHERE id = 7");
    let id_k = p.approval_id();
    agent_b.kill9_and_restart("agent-b");
    let (_, out) = p.finish();
    let (st, v) = agent_a.api("GET", &format!("/v1/approvals/{id_k}"), "");
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["request"]["status"], "expired", "{v}\npsql: {out}");
    assert!(
        v["request"]["reason"]
            .as_str()
            .unwrap_or("")
            .contains("restarted"),
        "{v}"
    );
    assert_eq!(count(&pg, "SELECT count(*) FROM orders WHERE id = 7"), "1");

    //    A row whose holder never came back (planted: holder "gone-agent", long expired) is
    //    closed by the next agent that lists the queue.
    pg.superuser_sql(
        &format!(
            "INSERT INTO tollgate_approvals (id, holder, status, created_ms, expires_ms, doc)
             SELECT 100000, 'gone-agent', 'pending', created_ms, 0,
                    doc || '{{\"id\": 100000, \"status\": \"pending\", \"holder\": \"gone-agent\", \"expires_ms\": 0}}'::jsonb
             FROM tollgate_approvals WHERE id = {id}"
        ),
        "tollgate_store",
    );
    let (st, v) = agent_b.api("GET", "/v1/approvals", "");
    assert_eq!(st, 200, "{v}");
    assert!(
        !v["pending"]
            .as_array()
            .is_some_and(|a| a.iter().any(|r| r["id"] == 100000)),
        "{v}"
    );
    let (_, v) = agent_a.api("GET", "/v1/approvals/100000", "");
    assert_eq!(v["request"]["status"], "expired", "{v}");
    assert!(
        v["request"]["reason"]
            .as_str()
            .unwrap_or("")
            .contains("did not close it"),
        "{v}"
    );

    // 6. Each agent served only its own namespace: no session of B's bot reached A.
    let b_glob_name = bot_b.name().to_string();
    assert!(
        !agent_a
            .audit()
            .iter()
            .any(|e| e["cgroup"].as_str().unwrap_or("").contains(&b_glob_name)),
        "agent A saw a connection of B's bot"
    );
    let a_glob_name = bot_a.name().to_string();
    assert!(
        !agent_b
            .audit()
            .iter()
            .any(|e| e["cgroup"].as_str().unwrap_or("").contains(&a_glob_name)),
        "agent B saw a connection of A's bot"
    );

    // 7. No store password in anything the agents wrote.
    for a in [&agent_a, &agent_b] {
        let all = format!(
            "{}{}",
            a.stderr(),
            std::fs::read_to_string(a.data_dir.join("audit.jsonl")).unwrap_or_default()
        );
        assert!(
            !all.contains(STORE_PASSWORD),
            "the store password leaked into the agent's output"
        );
    }
}

/// The subject of the local admin token (what the audit names as approver).
fn tollgate_approver(a: &FleetAgent) -> String {
    let (st, v) = a.api("GET", "/v1/approvals", "");
    assert_eq!(st, 200, "{v}");
    v["you"].as_str().unwrap_or_default().to_string()
}

/// Runs `tollgate run` with `store` as the approval store URL, expecting it to stop at start-up:
/// its exit status, its stderr and its pin path.
fn start_and_exit(tag: &str, store: &str) -> (std::process::ExitStatus, String, String) {
    let dir = TempDir::new(&format!("fleet-{tag}"));
    let pin = format!("/sys/fs/bpf/tollgate-fleet-{}", unique(tag));
    let policy = format!(
        "[agent]\nlisten = [\"127.0.0.1:{}\"]\nmetrics = \"off\"\nadmin = \"127.0.0.1:{}\"\ndata_dir = \"{}\"\nbpf_pin_path = \"{pin}\"\n\n\
         [approvals]\nstore = \"{store}\"\n",
        free_port(),
        free_port(),
        dir.path().join("data").display()
    );
    let path = dir.path().join("policy.toml");
    std::fs::write(&path, policy).expect("policy");
    let mut child = Command::new(tollgate_bin())
        .args(["run", "--policy"])
        .arg(&path)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let status = wait_for(Duration::from_secs(30), "tollgate run to exit", || {
        child.try_wait().ok().flatten()
    });
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    let _ = Command::new(tollgate_bin())
        .args(["uninstall", "--pin-path", &pin])
        .output();
    (status, err, pin)
}

#[test]
fn an_unreachable_store_stops_the_start_with_a_clear_error() {
    require_root();
    // A closed port on loopback: nothing listens there.
    let port = free_port();
    let (status, err, pin) = start_and_exit(
        "down",
        &format!("postgres://tollgate_store:{STORE_PASSWORD}@127.0.0.1:{port}/tollgate_store"),
    );
    assert!(!status.success(), "must exit non-zero: {err}");
    assert!(
        err.contains("approval store") && err.contains(&format!("127.0.0.1:{port}")),
        "the error names the store: {err}"
    );
    assert!(
        !err.contains(STORE_PASSWORD),
        "the password is never printed: {err}"
    );
    assert!(
        !Path::new(&pin).exists(),
        "nothing was pinned before the store check"
    );
}

#[test]
fn a_lost_store_fails_held_operations_closed_and_recovers() {
    require_root();
    let ns = NetNs::new("fl", 43);
    let cidr = format!("{}/30", ns.host_addr);
    let addr = ns.host_addr.to_string();
    // The bots' database and the approval store on two servers, so the store can go away
    // while the target stays.
    let app = PgServer::start_on("fleet-app", &[&addr], &[&cidr]);
    let store = PgServer::start_on("fleet-store", &[&addr], &[&cidr]);
    create_store(&store);
    let secrets = TempDir::new("fleet-lost-secrets");
    let app_secret = secrets.path().join("app-rw.pw");
    std::fs::write(&app_secret, format!("{APP_PASSWORD}\n")).expect("secret");
    let bot = Cgroup::new("fleet-bot-lost");
    // The password from the agent's environment this time.
    let agent = FleetAgent::start_env(
        &ns,
        "agent-l",
        &body(&app, &bot, &app_secret),
        &format!(
            "[approvals]\nstore = \"postgres://tollgate_store@{addr}:{}/tollgate_store\"\nstore_password_env = \"TOLLGATE_TEST_STORE_PW\"\n",
            store.port
        ),
        &[("TOLLGATE_TEST_STORE_PW", STORE_PASSWORD)],
    );

    // Held, then the store dies: the held DELETE fails closed with 42501 once the listener
    // has been unable to reconnect for 10 s (LOST_GRACE), well before the rule's 2m timeout.
    let mut p = psql(&bot, &ns, app.port, "DELETE FROM orders WHERE id = 3");
    let lost_id = p.approval_id();
    let t0 = Instant::now();
    store.stop();
    let (at, l) = p.wait_line("the fail-closed error", Duration::from_secs(30), |l| {
        l.contains("42501") || l.contains("ERROR")
    });
    let (_, out) = p.finish();
    let took = at.saturating_duration_since(t0);
    println!(
        "fleet: store stopped with #{lost_id} held; the bot got 42501 after {:.1} s",
        took.as_secs_f64()
    );
    assert!(
        out.contains("42501") && out.contains("approval store unavailable"),
        "fail closed with a clear message: {l}\n{out}"
    );
    assert!(took < Duration::from_secs(20), "{took:?}");
    assert_eq!(
        count(&app, "SELECT count(*) FROM orders WHERE id = 3"),
        "1",
        "nothing ran"
    );

    // Store still down: new held operations are refused at once, everything else works.
    let p = psql(
        &bot,
        &ns,
        app.port,
        "SELECT count(*) AS n FROM orders WHERE id = 3",
    );
    let (ok, out) = p.finish();
    assert!(ok && out.contains(" 1"), "reads still work: {out}");
    let t = Instant::now();
    let p = psql(&bot, &ns, app.port, "DELETE FROM orders WHERE id = 3");
    let (ok, out) = p.finish();
    assert!(
        !ok && out.contains("42501") && out.contains("approval store unavailable"),
        "refused at once: {out}"
    );
    assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());
    let (st, v) = agent.api("GET", "/v1/approvals", "");
    assert_eq!(st, 503, "the API says the store is unavailable: {v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap_or("")
            .contains("approval store unavailable"),
        "{v}"
    );

    // Back: the agent recovers by itself; the request it lost is closed, a new one works.
    store.start_again();
    let lost = wait_for(
        Duration::from_secs(30),
        "the lost request to be closed",
        || {
            let (st, v) = agent.api("GET", &format!("/v1/approvals/{lost_id}"), "");
            (st == 200 && v["request"]["status"] != "pending").then_some(v)
        },
    );
    assert_eq!(lost["request"]["status"], "expired", "{lost}");
    let mut p = psql(&bot, &ns, app.port, "DELETE FROM orders WHERE id = 3");
    let id = p.approval_id();
    assert!(id > lost_id, "ids keep counting: {id} after {lost_id}");
    let (st, v) = agent.api("POST", &format!("/v1/approvals/{id}/approve"), "{}");
    assert_eq!(st, 200, "{v}");
    p.wait_line("DELETE 1", Duration::from_secs(5), |l| {
        l.trim() == "DELETE 1"
    });
    let (ok, out) = p.finish();
    assert!(ok, "{out}");
    assert_eq!(count(&app, "SELECT count(*) FROM orders WHERE id = 3"), "0");
    assert!(
        !agent.stderr().contains(STORE_PASSWORD),
        "the store password never reaches the log"
    );
}

#[test]
fn a_tls_only_store_is_reached_over_verified_tls_and_refused_otherwise() {
    require_root();
    let ca = vm_tests::pg::TestCa::new("store");
    let store = PgServer::start_with_tls("fleet-tls", &ca);
    create_store(&store);
    let dir = TempDir::new("fleet-tls-ca");
    let ca_file = dir.path().join("store-ca.pem");
    std::fs::write(&ca_file, &ca.ca_pem).expect("ca");
    let wrong_file = dir.path().join("wrong-ca.pem");
    std::fs::write(&wrong_file, vm_tests::pg::TestCa::new("wrong").ca_pem).expect("ca");
    let url = |query: &str| {
        format!(
            "postgres://tollgate_store:{STORE_PASSWORD}@127.0.0.1:{}/tollgate_store?{query}",
            store.port
        )
    };

    // The server takes TCP logins over TLS only: plaintext is refused, by the server.
    let (status, err, _) = start_and_exit("tls-plain", &url("sslmode=disable"));
    assert!(!status.success(), "plaintext must not start: {err}");
    assert!(
        err.contains("approval store") && err.contains("no encryption"),
        "the server's refusal is shown: {err}"
    );
    // verify-full with another CA: the certificate is refused before any password is sent.
    let (status, err, _) = start_and_exit(
        "tls-wrong",
        &url(&format!(
            "sslmode=verify-full&sslrootcert={}",
            wrong_file.display()
        )),
    );
    assert!(
        !status.success(),
        "an unverified store must not start: {err}"
    );
    assert!(
        err.contains("approval store") && err.to_lowercase().contains("certificate"),
        "the error says why: {err}"
    );
    assert!(
        !err.contains(STORE_PASSWORD),
        "no password in errors: {err}"
    );

    // verify-full with the right CA: the agent starts, and its store connections are TLS,
    // logged in with SCRAM-SHA-256-PLUS (channel_binding=require fails without it).
    let body = format!(
        "[approvals]\nstore = \"{}\"\n",
        url(&format!(
            "sslmode=verify-full&sslrootcert={}&channel_binding=require",
            ca_file.display()
        ))
    );
    let agent = vm_tests::AgentProc::start_with_admin("fleet-tls", vm_tests::FailMode::Open, &body);
    let ssl = wait_for(Duration::from_secs(10), "a TLS store connection", || {
        let n = store.superuser_sql(
            "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE a.usename = 'tollgate_store' AND s.ssl",
            "postgres",
        );
        (n.trim() != "0").then(|| n.trim().to_string())
    });
    let plain = store.superuser_sql(
        "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
         WHERE a.usename = 'tollgate_store' AND NOT s.ssl",
        "postgres",
    );
    assert_eq!(
        plain.trim(),
        "0",
        "no plaintext store connection ({ssl} over TLS)"
    );
    drop(agent);
}
