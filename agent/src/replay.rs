//! `tollgate replay ID`: read a session's JSON-lines recording under `<data_dir>/sessions/`
//! and print it for a human (the CLI adds how it closed; `cli/sessions.rs` lists sessions).

use std::{
    fs,
    path::{Path, PathBuf},
};

use serde_json::Value;

/// Why a recording could not be listed or replayed.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// No such session file.
    #[error("no recording for session {id} under {dir} (see `tollgate sessions list`)")]
    NotFound { id: String, dir: String },
    /// The sessions directory could not be read.
    #[error("cannot read {dir}: {source}")]
    Io { dir: String, source: std::io::Error },
}

fn s<'a>(v: &'a Value, k: &str) -> &'a str {
    v[k].as_str().unwrap_or("-")
}

/// The protocol's own fields of an event (nested under its `protocol`), as ` key=value`.
fn nested(v: &Value) -> String {
    let Some(fields) = v[s(v, "protocol")].as_object() else {
        return String::new();
    };
    fields
        .iter()
        .map(|(k, x)| match x.as_str() {
            Some(t) => format!(" {k}={t}"),
            None => format!(" {k}={x}"),
        })
        .collect()
}

/// The output of an asciicast v2 recording in `dir` (named by a session's recording): the
/// `"o"` events concatenated. Only plain names ending in `.cast` are read, never through a link.
fn cast_text(dir: &Path, name: &str) -> String {
    use std::io::Read as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    if !name.ends_with(".cast")
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        || name.starts_with('.')
    {
        return "(no terminal recording)".into();
    }
    let mut t = String::new();
    let read = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(dir.join(name))
        .and_then(|mut f| f.read_to_string(&mut t));
    if read.is_err() {
        return format!("(cannot read {name})");
    }
    t.lines()
        .skip(1)
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| e[1] == "o")
        .filter_map(|e| e[2].as_str().map(str::to_string))
        .collect()
}

/// The session's timeline as readable lines.
pub fn replay(data_dir: &Path, id: &str) -> Result<Vec<String>, ReplayError> {
    crate::journal::Journal::recover(data_dir);
    let p = recording_path(data_dir, id);
    let not_found = || ReplayError::NotFound {
        id: id.to_string(),
        dir: data_dir.join("sessions").display().to_string(),
    };
    let text = {
        use std::io::Read as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let mut f = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&p)
            .map_err(|_| not_found())?;
        let mut t = String::new();
        f.read_to_string(&mut t).map_err(|_| not_found())?;
        t
    };
    let mut out = Vec::new();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            out.push(format!("(unreadable line: {} bytes)", line.len()));
            continue;
        };
        let ts = s(&v, "ts");
        out.push(match s(&v, "event") {
            // Another protocol's start: its own fields are nested under its name.
            "start" if !matches!(v["protocol"].as_str(), None | Some("postgres")) => format!(
                "{ts}  START  identity={} target={} protocol={}{} pid={} cgroup={} exe={}",
                s(&v, "identity"), s(&v, "target"), s(&v, "protocol"),
                nested(&v), v["pid"], s(&v, "cgroup"), s(&v, "exe")
            ),
            "operation" => {
                let label = s(&v, "protocol").to_ascii_uppercase();
                match v["error"].as_str() {
                    Some(e) => format!("{ts}  DENY   {}{}\n{:26}-> {e}", s(&v, "text"), nested(&v), ""),
                    None => format!("{ts}  {label:<6} {}{}", s(&v, "text"), nested(&v)),
                }
            }
            "start" => format!(
                "{ts}  START  identity={} target={} database={} user={} (client said user={}) app={} pid={} cgroup={} exe={}",
                s(&v, "identity"), s(&v, "target"), s(&v, "database"), s(&v, "user"), s(&v, "client_user"),
                s(&v, "application_name"), v["pid"], s(&v, "cgroup"), s(&v, "exe")
            ),
            "statement" => match v["error"].as_str() {
                Some(e) => format!("{ts}  DENY   {}\n{:26}-> {e}", s(&v, "text"), ""),
                None => format!("{ts}  SQL    {}", s(&v, "text")),
            },
            "result" => match v["error"].as_str() {
                Some(e) => format!("{ts}  ERROR  {e}"),
                None => format!(
                    "{ts}  OK     {}{}{}",
                    s(&v, "tag"),
                    v["rows"].as_u64().map(|r| format!(" rows={r}")).unwrap_or_default(),
                    v["masked"].as_u64().filter(|m| *m > 0).map(|m| format!(" masked={m}")).unwrap_or_default()
                ),
            },
            "end" => format!("{ts}  END{}", v["error"].as_str().map(|e| format!(" ({e})")).unwrap_or_default()),
            "approval_requested" => format!(
                "{ts}  HOLD   approval #{} under rule \"{}\": {}",
                v["approval_id"], s(&v, "rule"), s(&v, "text")
            ),
            "approval" => {
                let by: Vec<&str> = v["approvers"]
                    .as_array()
                    .map(|a| a.iter().filter_map(Value::as_str).collect())
                    .unwrap_or_default();
                format!(
                    "{ts}  APPROVAL #{} {}{}{}",
                    v["approval_id"],
                    s(&v, "outcome"),
                    if by.is_empty() { String::new() } else { format!(" by {}", by.join(", ")) },
                    v["comment"].as_str().map(|c| format!(" ({c})")).unwrap_or_default()
                )
            }
            // SSH channels: one line per exec/shell/subsystem, and the terminal's output.
            kind @ ("exec" | "shell" | "subsystem") => format!(
                "{ts}  {:<6} {} -> {}{}{}",
                kind.to_uppercase(),
                s(&v, "command"),
                s(&v, "action"),
                v["rule"].as_str().map(|r| format!(" rule=\"{r}\"")).unwrap_or_default(),
                v["exit_status"].as_u64().map(|x| format!(" exit={x} up={} down={}", v["bytes_up"], v["bytes_down"])).unwrap_or_default()
            ),
            // Output of a command without a terminal (`kubectl exec` without -t), per stream.
            "output" => format!("{ts}  {:<6} {}", s(&v, "stream").to_uppercase(), s(&v, "text")),
            "terminal" => format!(
                "{ts}  TERM   {} (asciicast: {})\n{}",
                s(&v, "command"),
                s(&v, "cast"),
                cast_text(&data_dir.join("sessions"), s(&v, "cast"))
            ),
            other => format!("{ts}  {other}"),
        });
    }
    Ok(out)
}

/// The recording of session `id` under `data_dir` (which may not exist).
pub fn recording_path(data_dir: &Path, id: &str) -> PathBuf {
    let safe: String = id
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .collect();
    let dir = data_dir.join("sessions");
    // `<id>.jsonl` (older agents) or `<id>.<random hex>.jsonl`.
    let is_it = |name: &str| {
        name.strip_prefix(safe.as_str())
            .and_then(|r| r.strip_suffix(".jsonl"))
            .is_some_and(|mid| {
                mid.is_empty()
                    || mid
                        .strip_prefix('.')
                        .is_some_and(|h| !h.is_empty() && h.bytes().all(|b| b.is_ascii_hexdigit()))
            })
    };
    // The randomly named recording first: a `<id>.jsonl` may have been planted by someone else
    // (in a data_dir that was not the agent's own), and it is never read through a link.
    let mut found: Vec<PathBuf> = fs::read_dir(&dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(is_it))
                .collect()
        })
        .unwrap_or_default();
    found.sort_by_key(|p| p.file_name().is_some_and(|n| n.len() == safe.len() + 6));
    found
        .into_iter()
        .next()
        .unwrap_or_else(|| dir.join(format!("{safe}.jsonl")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        audit::Health,
        obj,
        recording::{OperationEvent, Recorder},
    };
    use serde_json::json;
    use std::sync::Arc;

    /// A protocol other than PostgreSQL records neutral events, and replay renders them with
    /// its nested fields (`cli::sessions` counts them).
    #[test]
    fn neutral_operation_events_replay_for_any_protocol() {
        let dir = std::env::temp_dir().join(format!("tg-replay-neutral-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let r = Recorder::open(&dir, "s-1", Arc::new(Health::default())).expect("open");
        r.write(obj(
            json!({"event": "start", "session": "s-1", "identity": "ops-bot",
            "target": "bastion", "protocol": "ssh", "ssh": {"user": "deploy"}, "pid": 7}),
        ));
        let op = |text, decision, error, channel: u32| OperationEvent {
            protocol: "ssh",
            kind: "exec",
            text,
            decision,
            error,
            fields: obj(json!({ "channel": channel })),
        };
        r.operation("s-1", op("systemctl status nginx", "allow", None, 0));
        let why = "tollgate: exec denied by rule \"no rm\"";
        r.operation("s-1", op("rm -rf /", "deny", Some(why), 1));
        let lines = replay(&dir, "s-1").expect("replay");
        assert!(
            lines[0]
                .contains("START  identity=ops-bot target=bastion protocol=ssh user=deploy pid=7"),
            "{lines:?}"
        );
        assert!(
            lines[1].ends_with("SSH    systemctl status nginx channel=0"),
            "{lines:?}"
        );
        assert!(lines[2].contains("DENY   rm -rf / channel=1"), "{lines:?}");
        assert!(
            lines[2].contains("-> tollgate: exec denied by rule \"no rm\""),
            "{lines:?}"
        );
        let _ = fs::remove_dir_all(&dir);
    }
}
