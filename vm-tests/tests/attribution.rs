//! Attribution of workloads whose cgroup appears while the agent runs: a CI runner or systemd
//! starts each job in a fresh cgroup, and the job connects at once.

use vm_tests::*;

#[test]
fn jobs_in_cgroups_created_while_the_agent_runs_are_attributed() {
    require_root();
    let echo = EchoServer::start(EchoMode::Echo);
    let body = [
        format!(
            "[[identity]]\nname = \"job\"\ncgroup = \"{}\"\n\n",
            cgroup_family_glob("job")
        ),
        tcp_target("echo", &[echo.v4().to_string()]),
        rule("jobs may use echo", &["job"], &["echo"], "allow"),
    ]
    .concat();
    let agent = AgentProc::start("fresh", FailMode::Closed, &body);
    let addr = echo.v4().to_string();

    const JOBS: usize = 20;
    let mut wrong = Vec::new();
    for i in 0..JOBS {
        // One job after another, each in a cgroup that did not exist a moment ago.
        let cg = Cgroup::new("job");
        let r = cg.probe(
            probe_bin!(),
            &["--connect", &addr, "--send-bytes", "100", "--expect-echo"],
        );
        let ev = agent.connect_event(r.pid);
        if !(r.echo_ok() && ev["cgroup"] == cg.rel() && ev["identity"] == "job") {
            wrong.push(format!("job {i} in {}: probe {r}\n  audit {ev}", cg.rel()));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {JOBS} jobs started in fresh cgroups were not attributed to their cgroup \
         (denied as unknown); the first ones:\n{}",
        wrong.len(),
        wrong[..wrong.len().min(3)].join("\n")
    );
}

/// The kernel records the pid of the process that called `connect()`; the executable must be
/// the one that process ran at that moment. A bot that connects and then hands the socket to a
/// forked child while the original process execs an allowed binary must not inherit that
/// binary's identity.
#[test]
fn exe_identity_is_not_taken_from_an_exec_after_connect() {
    require_root();
    let echo = EchoServer::start(EchoMode::Echo);
    let bot = Cgroup::new("exec-bot");
    let sleep = std::path::Path::new("/usr/bin/sleep")
        .canonicalize()
        .expect("/usr/bin/sleep exists");
    let body = [
        format!(
            "[[identity]]\nname = \"sleeper\"\ncgroup = \"{}\"\nexe = \"{}\"\n\n",
            bot.glob(),
            sleep.display()
        ),
        tcp_target("echo", &[echo.v4().to_string()]),
        rule("only sleep may use echo", &["sleeper"], &["echo"], "allow"),
    ]
    .concat();
    let agent = AgentProc::start("exec", FailMode::Closed, &body);
    let addr = echo.v4().to_string();
    let exec = format!("{} 0.05", sleep.display());

    // Without tricks the probe is not `sleep`, so it is denied.
    let r = bot.probe(
        probe_bin!(),
        &["--connect", &addr, "--send-bytes", "64", "--expect-echo"],
    );
    assert!(r.was_denied(), "{r}");

    const TRIES: usize = 80;
    let mut stolen = Vec::new();
    for _ in 0..TRIES {
        let r = bot.probe(
            probe_bin!(),
            &[
                "--connect",
                &addr,
                "--send-bytes",
                "64",
                "--expect-echo",
                "--fork-exec",
                &exec,
            ],
        );
        let ev = agent.connect_event(r.pid);
        if r.echo_ok() || ev["action"] == "allow" {
            stolen.push(format!("probe {r}\n  audit {ev}"));
        }
    }
    assert!(
        stolen.is_empty(),
        "{} of {TRIES} connections made by tg-probe were attributed to `sleeper` because the \
         connecting process exec'd {} before the agent read /proc/<pid>/exe; the forked \
         tg-probe child then used the relay. The first ones:\n{}",
        stolen.len(),
        sleep.display(),
        stolen[..stolen.len().min(3)].join("\n")
    );
}
