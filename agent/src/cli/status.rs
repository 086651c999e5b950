//! `tollgate status`: the agent's `/v1/status` document as text for people.

use std::fmt::Write as _;

use serde_json::Value;

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}

/// Below this much free space in data_dir, `status` reports the agent unhealthy.
pub const LOW_BYTES: u64 = 1 << 30;

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

/// Render a status document; also returns whether everything looks healthy (the exit status
/// of `tollgate status`: 0 healthy, 1 otherwise).
pub fn render(s: &Value) -> (String, bool) {
    let mut o = String::new();
    let mut healthy = true;
    let p = &s["policy"];
    let _ = writeln!(
        o,
        "agent:     up (pid {}, version {}, up {}s)",
        u(&s["pid"]),
        s["version"].as_str().unwrap_or("?"),
        u(&s["uptime_seconds"])
    );
    let _ = writeln!(
        o,
        "policy:    {} generation {} ({} reloads ok, {} rejected); mode {}, fail_mode {}; {} identities, {} targets, {} rules",
        p["file"].as_str().unwrap_or("?"),
        u(&p["generation"]),
        u(&p["reloads_ok"]),
        u(&p["reloads_failed"]),
        p["mode"].as_str().unwrap_or("?"),
        p["fail_mode"].as_str().unwrap_or("?"),
        u(&p["identities"]),
        u(&p["targets"]),
        u(&p["rules"]),
    );
    let d = &s["datapath"];
    let links: Vec<&str> = d["pinned_links"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    if links.is_empty() {
        healthy = false;
    }
    let _ = writeln!(
        o,
        "kernel:    {} programs attached and pinned under {}{}",
        links.len(),
        d["pin_path"].as_str().unwrap_or("?"),
        if links.is_empty() {
            " (none: connections are not redirected; see `tollgate doctor`)".to_string()
        } else {
            format!(" ({})", links.join(", "))
        }
    );
    let mut connects = String::new();
    if let Some(m) = d["connects"].as_object() {
        for (k, v) in m {
            let _ = write!(connects, " {k}={}", u(v));
        }
    }
    let _ = writeln!(
        o,
        "redirects: {} redirected to the agent;{connects}",
        u(&d["redirects_total"])
    );
    let se = &s["sessions"];
    let _ = writeln!(o, "sessions:  {} live", u(&se["active"]));
    if let Some(list) = se["by_identity_target"].as_array() {
        for e in list {
            let _ = writeln!(
                o,
                "           {:>5}  {} -> {}",
                u(&e["sessions"]),
                e["identity"].as_str().unwrap_or("?"),
                e["target"].as_str().unwrap_or("?")
            );
        }
    }
    let a = &s["approvals"];
    if a["enabled"] == Value::Bool(false) {
        let _ = writeln!(o, "approvals: off");
    } else if let Some(e) = a["error"].as_str() {
        healthy = false;
        let _ = writeln!(o, "approvals: store unavailable: {e}");
    } else {
        let _ = writeln!(
            o,
            "approvals: {} pending{}",
            u(&a["pending"]),
            a["oldest_pending_seconds"]
                .as_u64()
                .map(|s| format!(" (oldest waiting {s}s)"))
                .unwrap_or_default()
        );
    }
    let au = &s["audit"];
    let free = match (au["free_bytes"].as_u64(), au["total_bytes"].as_u64()) {
        (Some(f), Some(t)) if t > 0 => {
            let pct = f as f64 * 100.0 / t as f64;
            // Unhealthy when writes are about to fail; low (the alert's 10%) is only noted.
            let nearly_full = f < LOW_BYTES || pct < 1.0;
            if nearly_full {
                healthy = false;
            }
            let note = if nearly_full {
                " NEARLY FULL: the audit log stops, and operations are refused, when it fills"
            } else if pct < 10.0 {
                " (low)"
            } else {
                ""
            };
            format!("{} free of {} ({pct:.0}%){note}", bytes(f), bytes(t))
        }
        _ => "free space unknown".into(),
    };
    let state = match au["error"].as_str() {
        Some(e) => {
            healthy = false;
            format!("FAILING: {e}")
        }
        None => "writing".into(),
    };
    if u(&au["write_errors"]) > 0 {
        healthy = false;
    }
    let _ = writeln!(
        o,
        "audit:     {state}; {} write errors since start; data_dir {}: {free}",
        u(&au["write_errors"]),
        au["data_dir"].as_str().unwrap_or("?"),
    );
    (o, healthy)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_and_judges_health() {
        let mut s = serde_json::json!({
            "up": true, "pid": 7, "version": "0.1.0", "uptime_seconds": 3,
            "policy": {"file": "/etc/tollgate/policy.toml", "generation": 2, "reloads_ok": 1, "reloads_failed": 0, "mode": "enforce", "fail_mode": "closed", "identities": 1, "targets": 1, "rules": 2},
            "datapath": {"pin_path": "/sys/fs/bpf/tollgate", "pinned_links": ["connect4", "connect6"], "redirects_total": 5, "connects": {"passed": 9}},
            "sessions": {"active": 1, "by_identity_target": [{"identity": "ci-bot", "target": "orders-db", "sessions": 1}]},
            "approvals": {"enabled": true, "pending": 1, "oldest_pending_seconds": 40},
            "audit": {"healthy": true, "error": null, "write_errors": 0, "data_dir": "/var/lib/tollgate", "free_bytes": 50u64 << 30, "total_bytes": 100u64 << 30}
        });
        let (text, ok) = render(&s);
        assert!(ok, "{text}");
        assert!(text.contains("generation 2"), "{text}");
        assert!(text.contains("2 programs attached and pinned"), "{text}");
        assert!(text.contains("1  ci-bot -> orders-db"), "{text}");
        assert!(text.contains("1 pending (oldest waiting 40s)"), "{text}");
        assert!(text.contains("50.0 GiB free of 100.0 GiB (50%)"), "{text}");
        s["audit"]["write_errors"] = 3.into();
        assert!(!render(&s).1);
        s["audit"]["write_errors"] = 0.into();
        s["datapath"]["pinned_links"] = serde_json::json!([]);
        let (text, ok) = render(&s);
        assert!(
            !ok && text.contains("connections are not redirected"),
            "{text}"
        );
    }
}
