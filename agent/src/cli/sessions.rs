//! `tollgate sessions list`: one row per recorded session with its status (ended, cut off by an
//! agent stop, cut off by a crash, still open), duration, statements, denials and approvals;
//! and the status line `tollgate replay` ends with.
//!
//! The recording (`<data_dir>/sessions/<id>.<hex>.jsonl`) says what happened inside a session;
//! the audit log says how it closed. A session whose recording has no `end` line was cut off:
//! by an agent stop when the audit log has its `close` with status `aborted` (the drain
//! deadline passed), else by a crash when the agent that served it is gone (a later
//! `agent_start`, or its pid no longer runs). Only a session whose agent still runs is open.

use std::{
    collections::HashMap,
    fmt::Write as _,
    fs,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use serde_json::Value;

use crate::replay::ReplayError;

/// How a session stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// Its agent still runs and it has not ended.
    Open,
    /// It ended (the client left, or it failed with the error given).
    Ended(Option<String>),
    /// The agent stopped and the drain deadline cut it off.
    Stopped,
    /// The agent died without closing it.
    Crashed,
}

impl Status {
    /// Short label for tables and `--status`.
    pub fn label(&self) -> &'static str {
        match self {
            Status::Open => "open",
            Status::Ended(None) => "ended",
            Status::Ended(Some(_)) => "ended-error",
            Status::Stopped => "cut-off-stop",
            Status::Crashed => "cut-off-crash",
        }
    }
}

/// One approval in a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Approval {
    /// Request id.
    pub id: u64,
    /// approved, denied, expired, cancelled (or `pending` when no outcome was recorded).
    pub outcome: String,
    /// Who approved or denied.
    pub approvers: Vec<String>,
}

/// One session.
#[derive(Debug, Clone)]
pub struct Summary {
    pub id: String,
    pub started: String,
    pub identity: String,
    pub target: String,
    pub statements: usize,
    pub denials: usize,
    pub approvals: Vec<Approval>,
    pub status: Status,
    /// Until the end (or the last event, when cut off; or now, when open).
    pub duration: Option<Duration>,
    pub path: PathBuf,
}

/// Filters for `sessions list`.
#[derive(Debug, Default)]
pub struct Filter {
    pub identity: Option<String>,
    pub target: Option<String>,
    /// Started at or after this time.
    pub since: Option<SystemTime>,
    /// `open`, `ended`, `stopped`, `crashed`, `cut-off` (stopped or crashed), `denied` (at
    /// least one denial) or `approval` (at least one approval request).
    pub status: Option<String>,
}

/// `--since`: an RFC 3339 time or a duration back from now (`2h`, `30m`).
pub fn parse_since(s: &str) -> Result<SystemTime, String> {
    if let Ok(t) = humantime::parse_rfc3339_weak(s) {
        return Ok(t);
    }
    match humantime::parse_duration(s) {
        Ok(d) => Ok(SystemTime::now() - d),
        Err(_) => Err(format!(
            "--since {s:?}: give an RFC 3339 time (2026-12-05T10:00:00Z) or a duration back from now (2h, 30m)"
        )),
    }
}

/// What the audit log says about sessions and agent lifetimes.
#[derive(Default)]
pub struct AuditIndex {
    /// Session id to the status of its `close` event.
    closes: HashMap<String, (String, Option<SystemTime>)>,
    /// `agent_start` times and pids, in file order.
    starts: Vec<(SystemTime, u32)>,
}

fn ts(v: &Value) -> Option<SystemTime> {
    v["ts"]
        .as_str()
        .and_then(|t| humantime::parse_rfc3339_weak(t).ok())
}

impl AuditIndex {
    /// Read `<data_dir>/audit.jsonl` and its newest uncompressed rotation (`audit.jsonl.1`).
    pub fn read(data_dir: &Path) -> AuditIndex {
        let mut ix = AuditIndex::default();
        for name in ["audit.jsonl.1", "audit.jsonl"] {
            let Ok(f) = fs::File::open(data_dir.join(name)) else {
                continue;
            };
            for line in BufReader::new(f).lines().map_while(Result::ok) {
                // Cheap filter first: only closes and agent starts matter here.
                let close = line.contains("\"event\":\"close\"");
                if !close && !line.contains("\"event\":\"agent_start\"") {
                    continue;
                }
                let Ok(v) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                if close {
                    if let Some(s) = v["session"].as_str() {
                        let status = v["status"].as_str().unwrap_or("").to_string();
                        ix.closes.insert(s.to_string(), (status, ts(&v)));
                    }
                } else if let (Some(t), Some(pid)) = (ts(&v), v["pid"].as_u64()) {
                    ix.starts.push((t, pid as u32));
                }
            }
        }
        ix
    }

    /// The status of a session that started at `started` and whose recording has no end.
    fn unended(&self, id: &str, started: Option<SystemTime>) -> (Status, Option<SystemTime>) {
        if let Some((status, at)) = self.closes.get(id) {
            return if status == "aborted" {
                (Status::Stopped, *at)
            } else {
                (Status::Ended(None), *at)
            };
        }
        let Some(started) = started else {
            return (Status::Crashed, None);
        };
        let serving = self.starts.iter().rev().find(|(t, _)| *t <= started);
        let restarted = self.starts.iter().any(|(t, _)| *t > started);
        match serving {
            Some((_, pid)) if !restarted && agent_alive(*pid) => (Status::Open, None),
            _ => (Status::Crashed, None),
        }
    }
}

fn agent_alive(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "tollgate")
}

/// Summarise one recording.
pub fn summarize(path: &Path, audit: &AuditIndex) -> Option<Summary> {
    let text = fs::read_to_string(path).ok()?;
    let mut lines = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok());
    let start = lines.next()?;
    let s = |v: &Value, k: &str| v[k].as_str().unwrap_or("-").to_string();
    let id = s(&start, "session");
    let started_at = ts(&start);
    let mut sum = Summary {
        id: id.clone(),
        started: s(&start, "ts"),
        identity: s(&start, "identity"),
        target: s(&start, "target"),
        statements: 0,
        denials: 0,
        approvals: Vec::new(),
        status: Status::Open,
        duration: None,
        path: path.to_path_buf(),
    };
    let mut last = started_at;
    let mut ended: Option<(Option<String>, Option<SystemTime>)> = None;
    for v in lines {
        if let Some(t) = ts(&v) {
            last = Some(t);
        }
        match v["event"].as_str().unwrap_or("") {
            // PostgreSQL's statements, and any protocol's neutral operation events.
            "statement" | "operation" => {
                sum.statements += 1;
                if v["error"].is_string() || v["decision"] == "deny" {
                    sum.denials += 1;
                }
            }
            "approval_requested" => {
                if let Some(id) = v["approval_id"].as_u64() {
                    sum.approvals.push(Approval {
                        id,
                        outcome: "pending".into(),
                        approvers: Vec::new(),
                    });
                }
            }
            "approval" => {
                let Some(id) = v["approval_id"].as_u64() else {
                    continue;
                };
                let approvers: Vec<String> = match &v["approvers"] {
                    Value::Array(a) => a
                        .iter()
                        .filter_map(|x| {
                            x.as_str()
                                .map(str::to_string)
                                .or_else(|| x["subject"].as_str().map(str::to_string))
                        })
                        .collect(),
                    Value::String(one) => vec![one.clone()],
                    _ => Vec::new(),
                };
                let outcome = v["outcome"].as_str().unwrap_or("?").to_string();
                match sum.approvals.iter_mut().find(|a| a.id == id) {
                    Some(a) => {
                        a.outcome = outcome;
                        a.approvers = approvers;
                    }
                    None => sum.approvals.push(Approval {
                        id,
                        outcome,
                        approvers,
                    }),
                }
            }
            "end" => ended = Some((v["error"].as_str().map(str::to_string), ts(&v))),
            _ => {}
        }
    }
    let (status, until) = match ended {
        Some((err, at)) => (Status::Ended(err), at),
        None => {
            let (st, at) = audit.unended(&id, started_at);
            let until = match st {
                Status::Open => Some(SystemTime::now()),
                _ => at.or(last),
            };
            (st, until)
        }
    };
    sum.status = status;
    sum.duration = match (started_at, until) {
        (Some(a), Some(b)) => b.duration_since(a).ok(),
        _ => None,
    };
    Some(sum)
}

/// Every recorded session matching `filter`, oldest first.
pub fn list(data_dir: &Path, filter: &Filter) -> Result<Vec<Summary>, ReplayError> {
    let dir = data_dir.join("sessions");
    let rd = fs::read_dir(&dir).map_err(|source| ReplayError::Io {
        dir: dir.display().to_string(),
        source,
    })?;
    crate::journal::Journal::recover(data_dir);
    let audit = AuditIndex::read(data_dir);
    let mut out: Vec<Summary> = rd
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
        .filter_map(|p| summarize(&p, &audit))
        .filter(|s| {
            filter.identity.as_ref().is_none_or(|i| &s.identity == i)
                && filter.target.as_ref().is_none_or(|t| &s.target == t)
                && filter.since.is_none_or(|since| {
                    humantime::parse_rfc3339_weak(&s.started).is_ok_and(|t| t >= since)
                })
                && filter.status.as_deref().is_none_or(|st| match st {
                    "open" => s.status == Status::Open,
                    "ended" => matches!(s.status, Status::Ended(_)),
                    "stopped" => s.status == Status::Stopped,
                    "crashed" => s.status == Status::Crashed,
                    "cut-off" => matches!(s.status, Status::Stopped | Status::Crashed),
                    "denied" => s.denials > 0,
                    "approval" => !s.approvals.is_empty(),
                    _ => false,
                })
        })
        .collect();
    out.sort_by(|a, b| a.started.cmp(&b.started).then(a.id.cmp(&b.id)));
    Ok(out)
}

/// Values `--status` takes.
pub const STATUSES: &[&str] = &[
    "open", "ended", "stopped", "crashed", "cut-off", "denied", "approval",
];

fn duration_text(d: Option<Duration>) -> String {
    match d {
        None => "-".into(),
        Some(d) => {
            let s = d.as_secs();
            if s >= 3600 {
                format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
            } else if s >= 60 {
                format!("{}m{:02}s", s / 60, s % 60)
            } else {
                format!("{:.1}s", d.as_secs_f64())
            }
        }
    }
}

/// The approvals of a session as `#id outcome by a,b`.
pub fn approvals_text(a: &[Approval]) -> String {
    a.iter()
        .map(|a| {
            if a.approvers.is_empty() {
                format!("#{} {}", a.id, a.outcome)
            } else {
                format!("#{} {} by {}", a.id, a.outcome, a.approvers.join(","))
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// The table `sessions list` prints.
pub fn render(rows: &[Summary]) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "{:<24} {:<24} {:<14} {:>9}  {:<30} {:>5} {:>6}  APPROVALS",
        "SESSION", "STARTED", "STATUS", "DURATION", "IDENTITY -> TARGET", "STMTS", "DENIED"
    );
    for r in rows {
        let _ = writeln!(
            o,
            "{:<24} {:<24} {:<14} {:>9}  {:<30} {:>5} {:>6}  {}",
            r.id,
            r.started,
            r.status.label(),
            duration_text(r.duration),
            format!("{} -> {}", r.identity, r.target),
            r.statements,
            r.denials,
            if r.approvals.is_empty() {
                "-".to_string()
            } else {
                approvals_text(&r.approvals)
            }
        );
    }
    o
}

/// The closing line of `tollgate replay`.
pub fn status_line(s: &Summary) -> String {
    let d = duration_text(s.duration);
    match &s.status {
        Status::Open => format!("STATUS open (still running, {d} so far)"),
        Status::Ended(None) => format!("STATUS ended after {d}"),
        Status::Ended(Some(e)) => format!("STATUS ended after {d} with an error: {e}"),
        Status::Stopped => format!(
            "STATUS cut off by an agent stop after {d} (the drain deadline passed)"
        ),
        Status::Crashed => format!(
            "STATUS cut off by an agent crash after {d} (no end was recorded and the agent that served it is gone)"
        ),
    }
}

#[cfg(test)]
mod tests;
