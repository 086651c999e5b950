//! A Rust HTTP client for the vm-tests, run as the bot: hyper over rustls (ALPN h2 or
//! http/1.1), one connection, requests one after another.
//!
//! `tg-hyper ADDR SNI CA_FILE h1|h2 REQUEST...` where each REQUEST is JSON
//! `{"method": "GET", "uri": "https://localhost:8443/api", "headers": [["host", "x"]]}`.
//! The URI's authority becomes `:authority` (h2) or `Host` (h1) unless `headers` sets a
//! `host` itself (which h2 then also sends as a plain header: a pseudo-header trick).
//! Prints one JSON line per request: `{"status": N, "body": "..."}` or `{"error": "..."}`.

use std::sync::Arc;

use http_body_util::{BodyExt as _, Empty};
use hyper::{body::Bytes, Request};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::{pem::PemObject as _, CertificateDer, ServerName};
use serde_json::{json, Value};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, addr, sni, ca, version, requests @ ..] = args.as_slice() else {
        anyhow::bail!("usage: tg-hyper ADDR SNI CA_FILE h1|h2 REQUEST_JSON...");
    };
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca)? {
        roots.add(c?)?;
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let h2 = version == "h2";
    cfg.alpn_protocols = vec![if h2 {
        b"h2".to_vec()
    } else {
        b"http/1.1".to_vec()
    }];
    let tcp = tokio::net::TcpStream::connect(addr.as_str()).await?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from(sni.clone())?, tcp)
        .await?;
    let io = TokioIo::new(tls);
    enum Sender {
        H1(hyper::client::conn::http1::SendRequest<Empty<Bytes>>),
        H2(hyper::client::conn::http2::SendRequest<Empty<Bytes>>),
    }
    let mut sender = if h2 {
        let (s, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
        tokio::spawn(conn);
        Sender::H2(s)
    } else {
        let (s, conn) = hyper::client::conn::http1::handshake(io).await?;
        tokio::spawn(conn);
        Sender::H1(s)
    };
    for r in requests {
        let spec: Value = serde_json::from_str(r)?;
        let uri: hyper::Uri = spec["uri"].as_str().unwrap_or("/").parse()?;
        let mut req = Request::builder()
            .method(spec["method"].as_str().unwrap_or("GET"))
            .uri(uri.clone());
        let mut has_host = false;
        for h in spec["headers"].as_array().into_iter().flatten() {
            let (k, v) = (h[0].as_str().unwrap_or(""), h[1].as_str().unwrap_or(""));
            has_host |= k.eq_ignore_ascii_case("host");
            req = req.header(k, v);
        }
        if !h2 && !has_host {
            if let Some(a) = uri.authority() {
                req = req.header("host", a.as_str());
            }
        }
        let req = req.body(Empty::<Bytes>::new())?;
        let resp = match &mut sender {
            Sender::H1(s) => {
                s.ready().await?;
                s.send_request(req).await
            }
            Sender::H2(s) => {
                s.ready().await?;
                s.send_request(req).await
            }
        };
        let line = match resp {
            Ok(resp) => {
                let status = resp.status().as_u16();
                let version = format!("{:?}", resp.version());
                let body = resp.into_body().collect().await.map(|b| b.to_bytes());
                match body {
                    Ok(b) => json!({"status": status, "version": version,
                        "body": String::from_utf8_lossy(&b)}),
                    Err(e) => json!({"status": status, "error": e.to_string()}),
                }
            }
            Err(e) => json!({"error": e.to_string()}),
        };
        println!("{line}");
        // After a refusal that closes the connection, the rest cannot be sent on it.
        if line["error"].is_string() {
            break;
        }
    }
    Ok(())
}
