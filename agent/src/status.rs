//! `GET /v1/status` on the admin listener, for `tollgate status`: is the agent up, which policy
//! generation, what is attached and pinned in the kernel, redirect counters, live sessions by
//! identity and target, pending approvals, and audit health (write errors, free space in
//! data_dir). It is read from what the agent already keeps (the metrics registry, the audit
//! health, the pin directory, the approval broker) plus a count of live sessions by identity
//! and target that the session guard keeps (`session::live`).
//!
//! The endpoint needs the same bearer token as the approvals API: it names identities and
//! targets, which are not for every local user.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use serde_json::{json, Value};

use crate::approvals::ApprovalStore;
use crate::session::Agent;

/// What `/v1/status` reads from.
pub struct Status {
    pub agent: Arc<Agent>,
    pub policy_path: PathBuf,
    pub started: Instant,
    pub started_at: SystemTime,
}

/// Bytes free for unprivileged writers and in total on the file system holding `dir`.
pub fn free_space(dir: &Path) -> std::io::Result<(u64, u64)> {
    let s = nix::sys::statvfs::statvfs(dir).map_err(std::io::Error::from)?;
    let frag = s.fragment_size();
    Ok((
        s.blocks_available().saturating_mul(frag),
        s.blocks().saturating_mul(frag),
    ))
}

/// A counter's or gauge's value (the other one is absent, so reads as 0).
fn value(m: &prometheus::proto::Metric) -> f64 {
    m.get_counter().get_value() + m.get_gauge().get_value()
}

fn metric_sum(
    families: &[prometheus::proto::MetricFamily],
    name: &str,
    label: Option<(&str, &str)>,
) -> f64 {
    families
        .iter()
        .filter(|f| f.name() == name)
        .flat_map(|f| f.get_metric())
        .filter(|m| {
            label.is_none_or(|(k, v)| {
                m.get_label()
                    .iter()
                    .any(|l| l.name() == k && l.value() == v)
            })
        })
        .map(value)
        .sum()
}

fn by_label(families: &[prometheus::proto::MetricFamily], name: &str, label: &str) -> Value {
    let mut out = serde_json::Map::new();
    for m in families
        .iter()
        .filter(|f| f.name() == name)
        .flat_map(|f| f.get_metric())
    {
        let key = m
            .get_label()
            .iter()
            .find(|l| l.name() == label)
            .map(|l| l.value().to_string())
            .unwrap_or_default();
        let v = value(m);
        out.insert(key, json!(v as u64));
    }
    Value::Object(out)
}

impl crate::approvals::api::StatusReport for Status {
    fn report<'a>(
        &'a self,
        broker: Option<&'a Arc<dyn ApprovalStore>>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Value> + Send + 'a>> {
        Box::pin(self.snapshot(broker))
    }
}

impl Status {
    /// The status document.
    pub async fn snapshot(&self, broker: Option<&Arc<dyn ApprovalStore>>) -> Value {
        let gen = self.agent.gen.load();
        let policy = &gen.policy;
        let cfg = &policy.agent;
        // Render first: it refreshes gauges kept outside the registry.
        let _ = self.agent.metrics.render();
        let families = self.agent.metrics.registry.gather();
        let reloads_ok = metric_sum(
            &families,
            "tollgate_policy_reloads_total",
            Some(("result", "ok")),
        );
        let reloads_failed = metric_sum(
            &families,
            "tollgate_policy_reloads_total",
            Some(("result", "error")),
        );
        let links: Vec<String> = crate::bpf::pinned_links(&cfg.bpf_pin_path)
            .iter()
            .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect();
        let mut live: Vec<Value> = self
            .agent
            .live
            .snapshot()
            .into_iter()
            .map(|((i, t), n)| json!({"identity": i, "target": t, "sessions": n}))
            .collect();
        live.sort_by_key(|v| std::cmp::Reverse(v["sessions"].as_u64().unwrap_or(0)));
        let approvals = match broker {
            Some(b) => match b.list().await {
                Ok((pending, _)) => {
                    let now = SystemTime::now()
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .map(|d| d.as_millis() as u64)
                        .unwrap_or(0);
                    let oldest = pending
                        .iter()
                        .map(|r| now.saturating_sub(r.created_ms) / 1000)
                        .max();
                    json!({"enabled": true, "pending": pending.len(), "oldest_pending_seconds": oldest})
                }
                Err(e) => json!({"enabled": true, "error": e.to_string()}),
            },
            None => json!({"enabled": false}),
        };
        let write_errors = metric_sum(&families, "tollgate_audit_write_errors_total", None);
        let (free, total) = match free_space(&cfg.data_dir) {
            Ok((f, t)) => (Some(f), Some(t)),
            Err(_) => (None, None),
        };
        let audit_error = self.agent.audit.check().err();
        let started = self
            .started_at
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        json!({
            "up": true,
            "version": env!("CARGO_PKG_VERSION"),
            "pid": std::process::id(),
            "started_unix": started,
            "uptime_seconds": self.started.elapsed().as_secs(),
            "policy": {
                "file": self.policy_path.display().to_string(),
                "generation": 1 + reloads_ok as u64,
                "reloads_ok": reloads_ok as u64,
                "reloads_failed": reloads_failed as u64,
                "mode": cfg.mode.as_str(),
                "fail_mode": cfg.fail_mode.as_str(),
                "identities": policy.identities.len(),
                "targets": policy.targets.len(),
                "rules": policy.rules.len(),
            },
            "datapath": {
                "pin_path": cfg.bpf_pin_path.display().to_string(),
                "pinned_links": links,
                "redirects_total": metric_sum(&families, "tollgate_redirects_total", None) as u64,
                "connects": by_label(&families, "tollgate_bpf_connects_total", "outcome"),
            },
            "sessions": {
                "active": metric_sum(&families, "tollgate_sessions_active", None) as u64,
                "by_protocol": by_label(&families, "tollgate_sessions_active", "protocol"),
                "by_identity_target": live,
            },
            "approvals": approvals,
            "audit": {
                "healthy": audit_error.is_none(),
                "error": audit_error,
                "write_errors": write_errors as u64,
                "data_dir": cfg.data_dir.display().to_string(),
                "free_bytes": free,
                "total_bytes": total,
            },
        })
    }
}

/// Gauges read at scrape time for dashboards and alerts: how many links are pinned (an alert
/// can then tell "agent down while bots are gated" from "agent uninstalled"), and the space
/// left where the audit log and recordings are written.
struct HostGauges {
    pin_path: PathBuf,
    data_dir: PathBuf,
    descs: Vec<prometheus::core::Desc>,
}

const LINKS: (&str, &str) = (
    "tollgate_bpf_links_pinned",
    "eBPF program links pinned under bpf_pin_path (they keep redirecting while the agent is down).",
);
const FREE: (&str, &str) = (
    "tollgate_data_dir_free_bytes",
    "Bytes free for writing on the file system of data_dir (audit log, recordings).",
);
const SIZE: (&str, &str) = (
    "tollgate_data_dir_size_bytes",
    "Size in bytes of the file system of data_dir.",
);

fn gauge_family((name, help): (&str, &str), value: f64) -> prometheus::proto::MetricFamily {
    let mut g = prometheus::proto::Gauge::default();
    g.set_value(value);
    let mut m = prometheus::proto::Metric::default();
    m.set_gauge(g);
    let mut f = prometheus::proto::MetricFamily::default();
    f.set_name(name.into());
    f.set_help(help.into());
    f.set_field_type(prometheus::proto::MetricType::GAUGE);
    f.set_metric(vec![m]);
    f
}

impl prometheus::core::Collector for HostGauges {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        let mut out = vec![gauge_family(
            LINKS,
            crate::bpf::pinned_links(&self.pin_path).len() as f64,
        )];
        // Unknown space is left out rather than reported as 0 (which would page someone).
        if let Ok((free, size)) = free_space(&self.data_dir) {
            out.push(gauge_family(FREE, free as f64));
            out.push(gauge_family(SIZE, size as f64));
        }
        out
    }
}

/// Register the scrape-time gauges ([`HostGauges`]) on the agent's registry.
pub fn register_gauges(
    registry: &prometheus::Registry,
    pin_path: &Path,
    data_dir: &Path,
) -> prometheus::Result<()> {
    let descs = [LINKS, FREE, SIZE]
        .iter()
        .map(|(n, h)| {
            prometheus::core::Desc::new((*n).into(), (*h).into(), vec![], Default::default())
        })
        .collect::<prometheus::Result<Vec<_>>>()?;
    registry.register(Box::new(HostGauges {
        pin_path: pin_path.to_path_buf(),
        data_dir: data_dir.to_path_buf(),
        descs,
    }))
}
