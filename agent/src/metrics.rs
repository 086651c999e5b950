//! Prometheus metrics (DESIGN.md names) and the small HTTP servers for `/metrics` and the
//! admin endpoints. Labels stay bounded: identity and target names come from the policy file,
//! never from what a client sent; an unattributed client is `identity="unknown"`.

use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use http_body_util::Full;
use hyper::{body::Bytes, service::service_fn, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus::{
    core::{Collector, Desc},
    proto::{Counter, LabelPair, Metric, MetricFamily, MetricType},
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use tokio::net::TcpListener;
use tollgate_common::counter;

use crate::bpf::Datapath;

/// Every metric the agent exports.
pub struct Metrics {
    pub registry: Registry,
    pub decisions: IntCounterVec,
    pub sessions_active: IntGaugeVec,
    pub masked_values: IntCounterVec,
    pub approvals_pending: IntGauge,
    pub approvals_total: IntCounterVec,
    pub approval_wait: Histogram,
    pub policy_reloads: IntCounterVec,
    pub rejected: IntCounterVec,
    pub relay_bytes: IntCounterVec,
    pub session_seconds: HistogramVec,
    /// `tollgate_http_request_duration_seconds{target,protocol}`: one HTTP or Kubernetes
    /// request, from its headers to the end of its response body (a watch lasts long).
    pub http_request_seconds: HistogramVec,
    pub audit_write_errors: IntCounterVec,
    /// `tollgate_ssh_channels_total{target,kind,action}`.
    pub ssh_channels: IntCounterVec,
    /// `tollgate_heap_bytes_in_use` and `tollgate_heap_allocations_total`, only while the
    /// allocator counts (see `heap.rs`).
    heap: Option<(IntGauge, IntCounter)>,
}

pub(crate) fn must<T>(r: prometheus::Result<T>) -> T {
    match r {
        Ok(v) => v,
        // Metric definitions are static; a failure here is a programming error caught by tests.
        Err(e) => panic!("metric definition: {e}"),
    }
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let registry = Registry::new();
        let decisions = must(IntCounterVec::new(
            Opts::new(
                "tollgate_decisions_total",
                "Policy decisions, by identity, target, protocol and action.",
            ),
            &["identity", "target", "protocol", "action"],
        ));
        let sessions_active = must(IntGaugeVec::new(
            Opts::new(
                "tollgate_sessions_active",
                "Sessions currently proxied, by protocol.",
            ),
            &["protocol"],
        ));
        let masked_values = must(IntCounterVec::new(
            Opts::new(
                "tollgate_masked_values_total",
                "Values masked in responses, by target and detector.",
            ),
            &["target", "detector"],
        ));
        let ssh_channels = must(IntCounterVec::new(
            Opts::new(
                "tollgate_ssh_channels_total",
                "SSH channel requests decided, by target, kind (exec, shell, subsystem, env, direct-tcpip, ...) and action.",
            ),
            &["target", "kind", "action"],
        ));
        let heap = crate::heap::counting().then(|| {
            (
                must(IntGauge::new(
                    "tollgate_heap_bytes_in_use",
                    "Heap bytes allocated and not yet freed since start-up (TOLLGATE_HEAP_STATS=1 only).",
                )),
                must(IntCounter::new(
                    "tollgate_heap_allocations_total",
                    "Heap allocations (and reallocations) since start-up (TOLLGATE_HEAP_STATS=1 only).",
                )),
            )
        });
        let approvals_pending = must(IntGauge::new(
            "tollgate_approvals_pending",
            "Operations waiting for a human approval.",
        ));
        let approvals_total = must(IntCounterVec::new(
            Opts::new(
                "tollgate_approvals_total",
                "Approval requests closed, by outcome (approved, denied, expired, cancelled).",
            ),
            &["outcome"],
        ));
        let approval_wait = must(Histogram::with_opts(
            HistogramOpts::new(
                "tollgate_approval_wait_seconds",
                "Time from an approval request to its outcome.",
            )
            .buckets(vec![
                0.1, 1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 900.0, 3600.0,
            ]),
        ));
        let policy_reloads = must(IntCounterVec::new(
            Opts::new(
                "tollgate_policy_reloads_total",
                "Policy reloads, by result (ok or error).",
            ),
            &["result"],
        ));
        let rejected = must(IntCounterVec::new(
            Opts::new(
                "tollgate_connections_rejected_total",
                "Connections closed before a decision, by reason.",
            ),
            &["reason"],
        ));
        let relay_bytes = must(IntCounterVec::new(
            Opts::new(
                "tollgate_relay_bytes_total",
                "Bytes relayed, by direction (upstream = client to target).",
            ),
            &["protocol", "direction"],
        ));
        let session_seconds = must(HistogramVec::new(
            HistogramOpts::new(
                "tollgate_session_duration_seconds",
                "Duration of proxied sessions.",
            )
            .buckets(vec![0.001, 0.01, 0.1, 1.0, 10.0, 60.0, 600.0, 3600.0]),
            &["protocol"],
        ));
        let http_request_seconds = must(HistogramVec::new(
            HistogramOpts::new(
                "tollgate_http_request_duration_seconds",
                "Duration of HTTP and Kubernetes requests through the agent, headers to end of response body, by target and protocol.",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 10.0, 60.0, 600.0,
            ]),
            &["target", "protocol"],
        ));
        let audit_write_errors = must(IntCounterVec::new(
            Opts::new(
                "tollgate_audit_write_errors_total",
                "Failed writes (disk full, I/O error) to the audit log (file=\"audit\") or a session recording (file=\"recording\"); while writes fail, new connections and statements are refused under fail_mode = \"closed\".",
            ),
            &["file"],
        ));
        for f in ["audit", "recording"] {
            audit_write_errors.with_label_values(&[f]);
        }
        for c in [
            Box::new(decisions.clone()) as Box<dyn Collector>,
            Box::new(audit_write_errors.clone()),
            Box::new(sessions_active.clone()),
            Box::new(masked_values.clone()),
            Box::new(ssh_channels.clone()),
            Box::new(approvals_pending.clone()),
            Box::new(approvals_total.clone()),
            Box::new(approval_wait.clone()),
            Box::new(policy_reloads.clone()),
            Box::new(rejected.clone()),
            Box::new(relay_bytes.clone()),
            Box::new(session_seconds.clone()),
            Box::new(http_request_seconds.clone()),
        ] {
            must(registry.register(c));
        }
        if let Some((bytes, allocations)) = &heap {
            must(registry.register(Box::new(bytes.clone())));
            must(registry.register(Box::new(allocations.clone())));
        }
        // Reload counters exist from the start so dashboards see zeros, not gaps.
        for r in ["ok", "error"] {
            policy_reloads.with_label_values(&[r]);
        }
        for o in ["approved", "denied", "expired", "cancelled"] {
            approvals_total.with_label_values(&[o]);
        }
        Arc::new(Metrics {
            registry,
            decisions,
            sessions_active,
            masked_values,
            approvals_pending,
            approvals_total,
            approval_wait,
            policy_reloads,
            rejected,
            relay_bytes,
            session_seconds,
            http_request_seconds,
            audit_write_errors,
            ssh_channels,
            heap,
        })
    }

    /// Count one decided SSH channel request (`kind` and `action` are bounded words).
    pub fn ssh_channel(&self, target: &str, kind: &str, action: &str) {
        self.ssh_channels
            .with_label_values(&[target, kind, action])
            .inc();
    }

    /// Export the kernel's per-CPU counters at scrape time.
    pub fn register_datapath(&self, dp: Arc<Datapath>) {
        must(self.registry.register(Box::new(BpfCounters::new(dp))));
    }

    pub fn render(&self) -> String {
        if let Some((bytes, allocations)) = &self.heap {
            bytes.set(crate::heap::in_use());
            // Brought up to the allocator's count (two scrapes at once: the later adds 0).
            static CATCH_UP: std::sync::Mutex<()> = std::sync::Mutex::new(());
            let _one = crate::lock(&CATCH_UP);
            allocations.inc_by(crate::heap::allocations().saturating_sub(allocations.get()));
        }
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::error!(error = %e, "metrics encoding failed");
        }
        String::from_utf8_lossy(&buf).into_owned()
    }
}

/// Collector over the eBPF `COUNTERS` map.
struct BpfCounters {
    dp: Arc<Datapath>,
    descs: Vec<Desc>,
}

impl BpfCounters {
    fn new(dp: Arc<Datapath>) -> BpfCounters {
        let descs = vec![
            must(Desc::new(
                "tollgate_redirects_total".into(),
                "Connects to protected destinations redirected to the agent by the kernel.".into(),
                vec![],
                Default::default(),
            )),
            must(Desc::new(
                "tollgate_bpf_connects_total".into(),
                "Connects seen by the kernel hooks, by outcome.".into(),
                vec!["outcome".into()],
                Default::default(),
            )),
        ];
        BpfCounters { dp, descs }
    }
}

fn counter_metric(value: u64, labels: &[(&str, &str)]) -> Metric {
    let mut m = Metric::default();
    let mut c = Counter::default();
    c.set_value(value as f64);
    m.set_counter(c);
    m.set_label(
        labels
            .iter()
            .map(|(k, v)| {
                let mut l = LabelPair::default();
                l.set_name((*k).into());
                l.set_value((*v).into());
                l
            })
            .collect(),
    );
    m
}

impl Collector for BpfCounters {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let c = self.dp.counters();
        let mut redirects = MetricFamily::default();
        redirects.set_name("tollgate_redirects_total".into());
        redirects.set_help(
            "Connects to protected destinations redirected to the agent by the kernel.".into(),
        );
        redirects.set_field_type(MetricType::COUNTER);
        redirects.set_metric(vec![counter_metric(c[counter::REDIRECTED as usize], &[])]);
        let mut outcomes = MetricFamily::default();
        outcomes.set_name("tollgate_bpf_connects_total".into());
        outcomes.set_help("Connects seen by the kernel hooks, by outcome.".into());
        outcomes.set_field_type(MetricType::COUNTER);
        outcomes.set_metric(
            [
                ("passed", counter::PASSED),
                ("exempt", counter::EXEMPT),
                ("map_full", counter::MAP_FULL),
                ("refused", counter::REFUSED),
                ("no_agent", counter::NO_AGENT),
                ("mptcp", counter::MPTCP),
            ]
            .iter()
            .map(|(n, i)| counter_metric(c[*i as usize], &[("outcome", n)]))
            .collect(),
        );
        vec![redirects, outcomes]
    }
}

pub type Handler =
    Arc<dyn Fn(&Request<hyper::body::Incoming>) -> Response<Full<Bytes>> + Send + Sync>;

pub fn text(
    status: StatusCode,
    content_type: &str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

/// `/healthz` and `/readyz`: `ok`, or 503 naming why the audit log or recordings cannot be
/// written (each call retries the write, so it turns back to `ok` once space is freed).
pub fn health_response(audit: Option<&crate::audit::Audit>) -> Response<Full<Bytes>> {
    match audit.map(|a| a.check()) {
        Some(Err(e)) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            format!("audit write failing: {e}\n"),
        ),
        _ => text(StatusCode::OK, "text/plain", "ok\n"),
    }
}

/// Serve a tiny HTTP/1 endpoint on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, handler: Handler) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "http accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let h = handler.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let h = h.clone();
                async move { Ok::<_, Infallible>(h(&req)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// `/metrics` handler.
pub fn metrics_handler(m: Arc<Metrics>) -> Handler {
    Arc::new(move |req| match req.uri().path() {
        "/metrics" => text(StatusCode::OK, "text/plain; version=0.0.4", m.render()),
        _ => text(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /metrics\n",
        ),
    })
}

pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_design_names() {
        let m = Metrics::new();
        m.decisions
            .with_label_values(&["ci-bot", "db", "tcp", "allow"])
            .inc();
        m.sessions_active.with_label_values(&["tcp"]).set(0);
        m.masked_values
            .with_label_values(&["db", "email"])
            .inc_by(0);
        let out = m.render();
        for name in [
            "tollgate_decisions_total{action=\"allow\",identity=\"ci-bot\",protocol=\"tcp\",target=\"db\"} 1",
            "tollgate_sessions_active{protocol=\"tcp\"} 0",
            "tollgate_approvals_pending 0",
            "tollgate_approvals_total{outcome=\"cancelled\"} 0",
            "tollgate_approval_wait_seconds_count 0",
            "tollgate_policy_reloads_total{result=\"error\"} 0",
        ] {
            assert!(out.contains(name), "missing {name} in\n{out}");
        }
    }
}
