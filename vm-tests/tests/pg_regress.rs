//! PostgreSQL 15's own regression suite (the installcheck `parallel_schedule`, run by
//! `pg_regress`) against one real server, first direct and then through tollgate under the
//! documented allow-all rule (`policy/examples/allow-all.toml`, taken verbatim), with
//! `pg_regress` and every `psql` it starts running unprivileged in a bot cgroup. The same tests
//! must pass both ways.
//!
//! The suite comes from Debian's source package and `postgresql-server-dev-15`, installed and
//! built by `cargo xtask setup` under the tools dir (`<tools>/pg-regress/`).

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use vm_tests::{pg::PgServer, require_root, AgentProc, Cgroup, FailMode, TempDir};

/// The bootstrap superuser's password (`PgServer`): the regression suite logs in as `postgres`
/// (the `sequence` test's output names the owner).
const SUPERUSER_PASSWORD: &str = "postgres-superuser-pw";
const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
const PG_REGRESS: &str = "/usr/lib/postgresql/15/lib/pgxs/src/test/regress/pg_regress";

/// `cargo xtask setup`'s tools dir (same rule as `xtask/src/util.rs`).
fn suite_dir() -> PathBuf {
    let tools = std::env::var_os("TOLLGATE_TOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
                .join(".cache/tollgate/tools")
        });
    let dir = tools.join("pg-regress");
    assert!(
        dir.join("src/test/regress/parallel_schedule").is_file()
            && dir.join("modules/regress.so").is_file()
            && Path::new(PG_REGRESS).is_file(),
        "PostgreSQL's regression suite is not set up in {}: run `cargo xtask setup` as root \
         (it fetches Debian's postgresql-15 source package and installs postgresql-server-dev-15)",
        dir.display()
    );
    dir
}

/// The allow-all example's rules, verbatim (everything from its first `[[rule]]`).
fn allow_all_rules() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policy/examples/allow-all.toml");
    let text = fs::read_to_string(&path).expect("policy/examples/allow-all.toml");
    let at = text
        .find("\n[[rule]]")
        .map(|i| i + 1)
        .expect("allow-all.toml has a [[rule]]");
    text[at..].to_string()
}

/// One pg_regress run: test name -> its status word (`ok`, `FAILED`, `failed (ignored)`).
struct Run {
    results: BTreeMap<String, String>,
    diffs: String,
    output: String,
    secs: f64,
}

impl Run {
    fn passed(&self) -> Vec<&str> {
        self.results
            .iter()
            .filter(|(_, s)| s.starts_with("ok"))
            .map(|(n, _)| n.as_str())
            .collect()
    }
}

/// Parse pg_regress 15's progress lines: `test name ... ok 12 ms`, `     name ... FAILED`.
fn parse(output: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for line in output.lines() {
        let Some((left, right)) = line.split_once(" ... ") else {
            continue;
        };
        let name = left.trim().trim_start_matches("test ").trim();
        if name.is_empty() || name.contains(' ') {
            continue;
        }
        let status = right.trim();
        let status = if status.starts_with("ok") {
            "ok"
        } else if status.contains("ignored") {
            "failed (ignored)"
        } else {
            "FAILED"
        };
        out.insert(name.to_string(), status.to_string());
    }
    out
}

/// Run the installcheck schedule as the bot (uid 65534, in `bot`'s cgroup) against
/// 127.0.0.1:`port`, writing into `work/<name>`.
fn pg_regress(bot: &Cgroup, work: &Path, name: &str, port: u16) -> Run {
    let out = work.join(name);
    fs::create_dir_all(&out).expect("outputdir");
    // The bot writes results, and the server (COPY TO a server file) writes into it too.
    chmod_all(&out);
    let start = Instant::now();
    let mut cmd = bot.command(Path::new(PG_REGRESS));
    // Directories pg_regress makes (results/) must be writable by the server too.
    // SAFETY: umask is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            libc::umask(0);
            Ok(())
        });
    }
    let o = cmd
        .arg(format!("--inputdir={}", work.join("regress").display()))
        .arg(format!("--outputdir={}", out.display()))
        .arg(format!("--bindir={PG_BIN}"))
        .arg(format!("--dlpath={}", work.join("modules").display()))
        .arg(format!(
            "--schedule={}",
            work.join("regress/parallel_schedule").display()
        ))
        .args([
            "--host=127.0.0.1",
            "--user=postgres",
            "--max-connections=20",
        ])
        .arg(format!("--port={port}"))
        .current_dir(&out)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("PGPASSWORD", SUPERUSER_PASSWORD)
        .env("PGSSLMODE", "disable")
        .env("HOME", &out)
        .output()
        .expect("run pg_regress");
    let output = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    Run {
        results: parse(&output),
        diffs: fs::read_to_string(out.join("regression.diffs")).unwrap_or_default(),
        output,
        secs: start.elapsed().as_secs_f64(),
    }
}

fn chmod_all(p: &Path) {
    let s = Command::new("chmod")
        .args(["-R", "a+rwX"])
        .arg(p)
        .status()
        .expect("chmod");
    assert!(s.success());
}

/// The first `lines` lines of each failed test's part of regression.diffs.
fn diff_excerpt(diffs: &str, tests: &[&str], lines: usize) -> String {
    let mut out = String::new();
    for t in tests {
        let marker = format!("/expected/{t}.out");
        if let Some(at) = diffs.find(&marker) {
            let from = diffs[..at].rfind("diff ").unwrap_or(at);
            out.push_str(&format!("--- {t}:\n"));
            for l in diffs[from..].lines().take(lines) {
                out.push_str(l);
                out.push('\n');
            }
        }
    }
    out
}

/// The one known difference, documented in the README: a DO block whose PL/pgSQL does not
/// compile is refused by tollgate (it cannot be classified, so it never reaches the server) with
/// the server's message but without its position, because libpg_query keeps no position for
/// PL/pgSQL errors; psql then prints no `LINE n:` and caret lines. True when every line of
/// `test`'s diff is such a missing pair right after an identical `ERROR:` line, and there is at
/// least one.
fn only_missing_error_positions(diffs: &str, test: &str) -> bool {
    let marker = format!("/expected/{test}.out");
    let Some(at) = diffs.find(&marker) else {
        return false;
    };
    let from = diffs[..at].rfind("diff ").unwrap_or(at);
    let body = &diffs[from..];
    let end = body[5..].find("\ndiff ").map_or(body.len(), |i| i + 6);
    let mut changed = 0;
    let mut after_error = false;
    for l in body[..end].lines().skip(3) {
        if l.starts_with("@@") {
            after_error = false;
        } else if let Some(removed) = l.strip_prefix('-') {
            let is_line = removed.starts_with("LINE ");
            let is_caret = removed.trim() == "^";
            if !after_error || !(is_line || is_caret) {
                return false;
            }
            changed += 1;
        } else if l.starts_with('+') {
            return false;
        } else {
            after_error = l.starts_with(" ERROR:");
        }
    }
    changed > 0
}

#[test]
fn regression_suite_passes_the_same_through_tollgate_as_direct() {
    require_root();
    let suite = suite_dir();
    let pg = PgServer::start("regress");
    let work = TempDir::new("regress");
    // A copy the bot (65534) and the server (postgres, COPY FROM its data files) can read.
    let copy = Command::new("cp")
        .arg("-a")
        .arg(suite.join("src/test/regress"))
        .arg(work.path().join("regress"))
        .status()
        .expect("cp");
    assert!(copy.success());
    fs::create_dir_all(work.path().join("modules")).expect("modules dir");
    for m in ["regress.so", "autoinc.so", "refint.so"] {
        fs::copy(
            suite.join("modules").join(m),
            work.path().join("modules").join(m),
        )
        .expect("copy module");
    }
    chmod_all(work.path());

    // Direct first: no agent protects the server yet.
    let bot = Cgroup::new("regress-bot");
    let direct = pg_regress(&bot, work.path(), "direct", pg.port);

    let secret = work.path().join("superuser.pw");
    fs::write(&secret, format!("{SUPERUSER_PASSWORD}\n")).expect("secret");
    fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("chmod secret");
    let policy = format!(
        "[[identity]]\nname = \"admin-bot\"\ncgroup = \"{glob}\"\n\n\
         [[target]]\nname = \"app-db\"\nprotocol = \"postgres\"\naddress = [\"{addr}\"]\n\
         credential = \"app-admin\"\npool = false\n\n\
         [credential.app-admin]\nuser = \"postgres\"\npassword_file = \"{secret}\"\n\n{rules}",
        glob = bot.glob(),
        addr = pg.addr(),
        secret = secret.display(),
        rules = allow_all_rules(),
    );
    let agent = AgentProc::start("regress", FailMode::Closed, &policy);
    let through = pg_regress(&bot, work.path(), "through", pg.port);

    let direct_ok = direct.passed();
    let through_ok = through.passed();
    eprintln!(
        "pg_regress installcheck: {} of {} passed direct ({:.0} s), {} of {} through tollgate ({:.0} s)",
        direct_ok.len(),
        direct.results.len(),
        direct.secs,
        through_ok.len(),
        through.results.len(),
        through.secs
    );
    // A few tests can fail direct too: the mirror may serve the source of another 15.x minor
    // release than the installed server (setup says which, in `<tools>/pg-regress/`), whose
    // expected files differ in places. What must hold is "the same both ways".
    assert!(
        direct.results.len() >= 200 && direct_ok.len() + 15 >= direct.results.len(),
        "the direct run itself is broken ({} of {} passed):\n{}",
        direct_ok.len(),
        direct.results.len(),
        direct.output
    );
    let (position_only, only_direct): (Vec<&str>, Vec<&str>) = direct_ok
        .iter()
        .copied()
        .filter(|t| !through_ok.contains(t))
        .partition(|t| only_missing_error_positions(&through.diffs, t));
    if !position_only.is_empty() {
        eprintln!(
            "pg_regress: {position_only:?} differ through tollgate only by the LINE/caret of DO blocks whose PL/pgSQL does not compile (documented)"
        );
    }
    let only_through: Vec<&str> = through_ok
        .iter()
        .copied()
        .filter(|t| !direct_ok.contains(t))
        .collect();
    if !only_direct.is_empty() || !only_through.is_empty() {
        let log = agent.stderr_text();
        panic!(
            "pg_regress differs through tollgate: {} passed direct, {} through.\n\
             pass direct only ({}): {only_direct:?}\npass through only: {only_through:?}\n\
             diffs (through tollgate):\n{}\nagent log (tail):\n{}",
            direct_ok.len(),
            through_ok.len(),
            only_direct.len(),
            diff_excerpt(&through.diffs, &only_direct, 25),
            log.lines()
                .rev()
                .take(30)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}
