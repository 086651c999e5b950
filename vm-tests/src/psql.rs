//! An unmodified psql as the bot: started in the bot's cgroup (unprivileged, see
//! [`Cgroup::command`]), its stdout and stderr lines streamed to the test with the instant each
//! arrived, so a test can wait for the approval notice while the statement is held and time
//! the result. Killed on drop.

use std::{
    io::{BufRead, BufReader, Read},
    path::Path,
    process::{Child, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use crate::{wait_for, Cgroup};

/// A running psql.
pub struct Psql {
    pub child: Child,
    lines: mpsc::Receiver<(Instant, String)>,
    seen: Vec<String>,
}

impl Psql {
    /// `psql -X -v VERBOSITY=verbose <args>` in `bot`'s cgroup, to 127.0.0.1:`port` (redirected
    /// to the agent) as user `bot`, database `app`. `password` goes in `PGPASSWORD`: a workload's
    /// JWT, or any placeholder when the agent injects the upstream credential itself.
    pub fn spawn(bot: &Cgroup, port: u16, password: &str, args: &[&str]) -> Psql {
        Psql::spawn_to(bot, None, "127.0.0.1", port, password, args)
    }

    /// Like [`Psql::spawn`], to `host`, and inside the network namespace `netns` (a
    /// `/run/netns/NAME` file) when given.
    pub fn spawn_to(
        bot: &Cgroup,
        netns: Option<&Path>,
        host: &str,
        port: u16,
        password: &str,
        args: &[&str],
    ) -> Psql {
        let conn = format!(
            "host={host} port={port} user=bot dbname=app sslmode=disable connect_timeout=10"
        );
        let psql = Path::new("/usr/bin/psql");
        let mut child = match netns {
            Some(ns) => bot.command_in_netns(psql, ns),
            None => bot.command(psql),
        }
        .arg(conn)
        .args(["-X", "-v", "VERBOSITY=verbose"])
        .args(args)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("PGPASSWORD", password)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("psql");
        let (tx, rx) = mpsc::channel();
        for pipe in [
            Box::new(child.stdout.take().expect("stdout")) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().expect("stderr")),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for l in BufReader::new(pipe).lines().map_while(Result::ok) {
                    let _ = tx.send((Instant::now(), l));
                }
            });
        }
        Psql {
            child,
            lines: rx,
            seen: Vec::new(),
        }
    }

    /// The next line matching `pred`, and when it arrived.
    pub fn wait_line(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> (Instant, String) {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok((at, l)) => {
                    self.seen.push(l.clone());
                    if pred(&l) {
                        return (at, l);
                    }
                }
                Err(_) => panic!(
                    "psql: no line with {what} within {timeout:?}; saw:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// The approval id of the notice psql printed (which must also say how to approve).
    pub fn approval_id(&mut self) -> u64 {
        let (_, l) = self.wait_line("the approval notice", Duration::from_secs(20), |l| {
            l.contains("waiting for approval #")
        });
        let id = l
            .split("waiting for approval #")
            .nth(1)
            .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|d| d.parse().ok())
            .unwrap_or_else(|| panic!("no id in {l}"));
        assert!(
            l.contains(&format!("(tollgate approvals approve {id})")),
            "the notice says how to approve: {l}"
        );
        id
    }

    /// Is psql still running (the statement still held)?
    pub fn running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    /// Wait for psql to exit: whether it succeeded, and all of its output.
    pub fn finish(mut self) -> (bool, String) {
        let status = wait_for(Duration::from_secs(30), "psql to exit", || {
            self.child.try_wait().ok().flatten()
        });
        while let Ok((_, l)) = self.lines.recv_timeout(Duration::from_millis(200)) {
            self.seen.push(l);
        }
        (status.success(), self.seen.join("\n"))
    }
}

impl Drop for Psql {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
