//! TLS to the fleet approval store, with libpq's `sslmode` words in the store URL:
//! `disable`, `prefer` (the default: TLS when the server offers it, unverified), `require`
//! (TLS, unverified), `verify-ca` (TLS, the chain checked against `sslrootcert`) and
//! `verify-full` (`verify-ca`, and the certificate naming the host). tokio-postgres negotiates
//! (SSLRequest); rustls encrypts. tokio-postgres itself knows neither the verify modes nor
//! `sslrootcert`, so they are taken out of the URL before it is parsed.

use std::{
    future::Future,
    io,
    path::PathBuf,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::{
    config::SslMode,
    tls::{ChannelBinding, TlsConnect},
};
use tollgate_policy::{TargetTls, TlsMode};

use super::pg::Socket;

/// The TLS words of a store URL, and the URL without the ones tokio-postgres cannot parse.
#[derive(Debug, PartialEq, Eq)]
pub struct StoreTlsParams {
    pub url: String,
    pub mode: TlsMode,
    pub root_cert: Option<PathBuf>,
}

impl StoreTlsParams {
    /// Split `sslmode` and `sslrootcert` off a `postgres://` URL.
    pub fn from_url(url: &str) -> Result<StoreTlsParams, String> {
        let (base, query) = match url.split_once('?') {
            Some((b, q)) => (b, q),
            None => (url, ""),
        };
        let mut mode = TlsMode::Prefer;
        let mut root_cert = None;
        let mut kept = Vec::new();
        for (k, v) in openidconnect::url::form_urlencoded::parse(query.as_bytes()) {
            match k.as_ref() {
                "sslmode" => {
                    mode = TlsMode::from_word(&v).ok_or_else(|| {
                        let words: Vec<&str> = TlsMode::ALL.map(TlsMode::as_str).to_vec();
                        format!(
                            "sslmode={v} is not supported for the store; use one of: {}",
                            words.join(", ")
                        )
                    })?;
                }
                "sslrootcert" => root_cert = Some(PathBuf::from(v.as_ref())),
                _ => kept.push((k.into_owned(), v.into_owned())),
            }
        }
        if mode.checks_chain() && root_cert.is_none() {
            return Err(format!(
                "sslmode={} needs sslrootcert=/path/to/ca.pem",
                mode.as_str()
            ));
        }
        if !mode.checks_chain() && root_cert.is_some() {
            return Err("sslrootcert is only used with sslmode=verify-ca or verify-full".into());
        }
        let mut url = base.to_string();
        if !kept.is_empty() {
            url.push('?');
            url.push_str(
                &openidconnect::url::form_urlencoded::Serializer::new(String::new())
                    .extend_pairs(kept)
                    .finish(),
            );
        }
        Ok(StoreTlsParams {
            url,
            mode,
            root_cert,
        })
    }

    /// tokio-postgres's negotiation mode for these words.
    pub fn ssl_mode(&self) -> SslMode {
        match self.mode {
            TlsMode::Disable => SslMode::Disable,
            TlsMode::Prefer => SslMode::Prefer,
            TlsMode::Require | TlsMode::VerifyCa | TlsMode::VerifyFull => SslMode::Require,
        }
    }

    /// The rustls configuration (None: `disable`).
    pub fn client_config(&self) -> Result<Option<Arc<ClientConfig>>, String> {
        if self.mode == TlsMode::Disable {
            return Ok(None);
        }
        crate::tls::client_config(&TargetTls {
            mode: self.mode,
            ca_file: self.root_cert.clone(),
            server_name: None,
        })
        .map(Some)
        .map_err(|e| e.to_string())
    }
}

/// Connects one store socket over TLS when tokio-postgres asks for it.
pub struct StoreTls {
    pub config: Option<Arc<ClientConfig>>,
    /// The host as written in the URL (checked by `verify-full`, sent as SNI).
    pub host: String,
}

impl TlsConnect<Socket> for StoreTls {
    type Stream = StoreTlsStream;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<StoreTlsStream>> + Send>>;

    fn connect(self, stream: Socket) -> Self::Future {
        Box::pin(async move {
            let config = self
                .config
                .ok_or_else(|| io::Error::other("TLS to the store is disabled (sslmode)"))?;
            let name = ServerName::try_from(self.host.clone())
                .map_err(|_| io::Error::other(format!("invalid TLS name {:?}", self.host)))?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, stream)
                .await?;
            Ok(StoreTlsStream(Box::new(tls)))
        })
    }
}

/// A TLS stream to the store.
pub struct StoreTlsStream(Box<tokio_rustls::client::TlsStream<Socket>>);

impl tokio_postgres::tls::TlsStream for StoreTlsStream {
    /// `tls-server-end-point` from the store's certificate, so tokio-postgres logs in with
    /// SCRAM-SHA-256-PLUS when the server offers it: a man in the middle (possible under
    /// `require` and `prefer`, which do not check the certificate) cannot relay the exchange.
    fn channel_binding(&self) -> ChannelBinding {
        match self.0.get_ref().1.peer_certificates() {
            Some([cert, ..]) => {
                ChannelBinding::tls_server_end_point(crate::tls::server_end_point(cert))
            }
            _ => ChannelBinding::none(),
        }
    }
}

impl AsyncRead for StoreTlsStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(self.get_mut().0.as_mut()).poll_read(cx, buf)
    }
}

impl AsyncWrite for StoreTlsStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(self.get_mut().0.as_mut()).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.get_mut().0.as_mut()).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.get_mut().0.as_mut()).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_words_are_taken_out_of_the_url() {
        let p = StoreTlsParams::from_url(
            "postgres://u@db:5432/s?application_name=x&sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem",
        )
        .expect("valid");
        assert_eq!(p.url, "postgres://u@db:5432/s?application_name=x");
        assert_eq!(p.mode, TlsMode::VerifyFull);
        assert_eq!(p.root_cert, Some(PathBuf::from("/etc/ca.pem")));
        assert_eq!(p.ssl_mode(), SslMode::Require);

        let p = StoreTlsParams::from_url("postgres://u@db/s").expect("valid");
        assert_eq!(
            (p.url.as_str(), p.mode),
            ("postgres://u@db/s", TlsMode::Prefer)
        );
        let p = StoreTlsParams::from_url("postgres://u@db/s?sslmode=disable").expect("valid");
        assert_eq!(
            (p.url.as_str(), p.ssl_mode()),
            ("postgres://u@db/s", SslMode::Disable)
        );
        assert!(p.client_config().expect("none").is_none());

        let p = StoreTlsParams::from_url("postgres://u@db/s?sslmode=verify-ca&sslrootcert=/ca.pem")
            .expect("valid");
        assert_eq!(
            (p.mode, p.ssl_mode()),
            (TlsMode::VerifyCa, SslMode::Require)
        );

        for bad in [
            "postgres://u@db/s?sslmode=verify-ca",
            "postgres://u@db/s?sslmode=verify-full",
            "postgres://u@db/s?sslmode=verify-whatever",
            "postgres://u@db/s?sslmode=require&sslrootcert=/ca.pem",
        ] {
            assert!(StoreTlsParams::from_url(bad).is_err(), "{bad}");
        }
    }
}
