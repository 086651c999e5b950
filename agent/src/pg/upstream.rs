//! Logging in to the real PostgreSQL server with the target's credential (the bot never holds
//! it): StartupMessage, then cleartext, MD5 or SCRAM-SHA-256 as the server asks. Everything the
//! server sends after `AuthenticationOk` up to the first `ReadyForQuery` is returned raw so the
//! handler can relay it (with its own BackendKeyData).

use std::io;

use bytes::{Bytes, BytesMut};
use postgres_protocol::{
    authentication::{md5_hash, sasl},
    message::{backend, frontend},
};
use rustls_pki_types::ServerName;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tollgate_policy::{Credential, TargetTls, TlsMode};

use crate::{
    pg::{scram, wire},
    tls::{self, Conn, UpstreamTlsError},
};

/// Why logging in upstream failed. `Display` is safe to show the bot: it names the credential
/// to fix and never contains the secret.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    /// The credential's secret could not be read.
    #[error("cannot read the secret of credential \"{credential}\": {reason}")]
    Secret { credential: String, reason: String },
    /// The server refused the login: blamed on the credential only when the server rejected
    /// the credential (SQLSTATE class 28), otherwise what the server said (`database "x" does
    /// not exist`, `sorry, too many clients already`).
    #[error("{}", rejected_text(credential, code, message))]
    Rejected {
        credential: String,
        code: String,
        message: String,
    },
    /// The server asked for an authentication method the agent does not speak.
    #[error(
        "upstream asked for an unsupported authentication method ({0}) for credential \"{1}\""
    )]
    Unsupported(&'static str, String),
    /// SCRAM exchange failed (bad server proof or malformed message).
    #[error("SCRAM authentication with credential \"{credential}\" failed: {reason}")]
    Scram { credential: String, reason: String },
    /// TLS to the server could not be set up as the target's `tls` table asks.
    #[error("upstream TLS: {0}")]
    Tls(#[from] UpstreamTlsError),
    /// The connection broke or the server spoke nonsense.
    #[error("upstream I/O: {0}")]
    Io(#[from] io::Error),
}

fn rejected_text(credential: &str, code: &str, message: &str) -> String {
    if code.starts_with("28") {
        format!("upstream rejected credential \"{credential}\": {message}")
    } else {
        format!("the upstream server refused the login: {message}")
    }
}

impl LoginError {
    /// Whether fixing the target's credential is the likely fix.
    pub fn blames_credential(&self) -> bool {
        match self {
            LoginError::Rejected { code, .. } => code.starts_with("28") || code.is_empty(),
            LoginError::Io(_) | LoginError::Tls(_) => false,
            _ => true,
        }
    }

    /// SQLSTATE for the bot: 28P01 for credential problems, 08006 for transport problems.
    pub fn sqlstate(&self) -> &str {
        match self {
            LoginError::Rejected { code, .. } if !code.is_empty() => code,
            LoginError::Io(_) | LoginError::Tls(_) => "08006",
            _ => "28P01",
        }
    }
}

/// The secret of a credential, read fresh at each login so rotation needs no restart.
/// Never logged, never returned in an error.
pub fn read_secret(name: &str, cred: &Credential) -> Result<Option<Vec<u8>>, LoginError> {
    crate::session::credentials::read_secret(name, cred).map_err(|e| LoginError::Secret {
        credential: e.credential,
        reason: e.reason,
    })
}

/// Result of a successful login.
pub struct Session {
    pub stream: Conn,
    /// Server's BackendKeyData (process id, secret) for cancel requests.
    pub backend_key: Option<(i32, i32)>,
    /// Raw ParameterStatus (and NoticeResponse) messages to relay to the client.
    pub relay: BytesMut,
    /// Transaction status byte of the first ReadyForQuery.
    pub status: u8,
    /// Bytes read past the first ReadyForQuery (normally none).
    pub rest: BytesMut,
}

async fn read_msg(
    stream: &mut Conn,
    buf: &mut BytesMut,
) -> Result<(backend::Message, Bytes), LoginError> {
    loop {
        // Framing (and its length cap) is `wire`'s; postgres-protocol decodes the login
        // messages. The raw bytes are kept for relaying ParameterStatus and notices.
        let framed = wire::parse_backend(buf)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        if let Some((_, raw)) = framed {
            let msg = backend::Message::parse(&mut BytesMut::from(&raw[..]))?.ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidData, "truncated upstream message")
            })?;
            return Ok((msg, raw));
        }
        if stream.read_buf(buf).await? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "upstream closed the connection during login",
            )
            .into());
        }
    }
}

fn error_fields(body: &backend::ErrorResponseBody) -> (String, String) {
    use fallible_iterator::FallibleIterator as _;
    let mut code = String::new();
    let mut message = String::new();
    let mut fields = body.fields();
    while let Ok(Some(f)) = fields.next() {
        match f.type_() {
            b'C' => code = String::from_utf8_lossy(f.value_bytes()).into_owned(),
            b'M' => message = String::from_utf8_lossy(f.value_bytes()).into_owned(),
            _ => {}
        }
    }
    (code, message)
}

/// Secure a fresh connection to the server as the target's `tls` table says: SSLRequest, then
/// a rustls handshake on 'S'; on 'N', plaintext only for `prefer`.
pub async fn negotiate_tls(
    mut stream: TcpStream,
    tls: &TargetTls,
    name: ServerName<'static>,
) -> Result<Conn, LoginError> {
    if tls.mode == TlsMode::Disable {
        return Ok(Conn::Plain(stream));
    }
    let config = tls::client_config(tls)?;
    let mut out = BytesMut::new();
    frontend::ssl_request(&mut out);
    stream.write_all(&out).await?;
    let mut answer = [0u8; 1];
    stream.read_exact(&mut answer).await?;
    match answer[0] {
        wire::SSL_ACCEPTED => {
            let connector = tokio_rustls::TlsConnector::from(config);
            let s = connector
                .connect(name, stream)
                .await
                .map_err(UpstreamTlsError::Handshake)?;
            Ok(Conn::Tls(Box::new(tokio_rustls::TlsStream::Client(s))))
        }
        wire::ENCRYPTION_REFUSED if tls.mode == TlsMode::Prefer => Ok(Conn::Plain(stream)),
        _ => Err(UpstreamTlsError::NotOffered(tls.mode.as_str()).into()),
    }
}

/// Channel binding for SCRAM over `stream`: the server certificate's hash under TLS.
fn channel_binding(stream: &Conn, plus: bool) -> scram::Binding {
    let cert = match stream {
        Conn::Tls(s) => s.get_ref().1.peer_certificates().and_then(|c| c.first()),
        Conn::Plain(_) => return scram::Binding::Unsupported,
    };
    match cert {
        Some(c) if plus => scram::Binding::TlsServerEndPoint(tls::server_end_point(c)),
        _ => scram::Binding::Unrequested,
    }
}

/// Log in as `user` to `database` with `params` (client parameters such as application_name
/// to pass through) using the secret of credential `cred_name`; a SCRAM login derives its salted
/// password through `salted` (the handler's cache).
pub async fn login(
    mut stream: Conn,
    user: &str,
    params: &[(String, String)],
    cred_name: &str,
    secret: Option<&[u8]>,
    salted: &scram::SaltedPasswords,
) -> Result<Session, LoginError> {
    let mut out = BytesMut::new();
    let mut all: Vec<(&str, &str)> = vec![("user", user)];
    for (k, v) in params {
        if k != "user" {
            all.push((k.as_str(), v.as_str()));
        }
    }
    frontend::startup_message(all.iter().copied(), &mut out)?;
    stream.write_all(&out).await?;
    stream.flush().await?;
    out.clear();

    let mut buf = BytesMut::with_capacity(8192);
    let mut relay = BytesMut::new();
    let mut backend_key = None;
    let mut scram: Option<scram::Scram> = None;
    let need = |what: &'static str| -> Result<&[u8], LoginError> {
        secret.ok_or_else(|| LoginError::Secret {
            credential: cred_name.to_string(),
            reason: format!("the server asks for a {what} but the credential has no secret"),
        })
    };
    loop {
        let (msg, raw) = read_msg(&mut stream, &mut buf).await?;
        match msg {
            backend::Message::AuthenticationOk => {}
            backend::Message::AuthenticationCleartextPassword => {
                frontend::password_message(need("password")?, &mut out)?;
            }
            backend::Message::AuthenticationMd5Password(b) => {
                let h = md5_hash(user.as_bytes(), need("password")?, b.salt());
                frontend::password_message(h.as_bytes(), &mut out)?;
            }
            backend::Message::AuthenticationSasl(b) => {
                use fallible_iterator::FallibleIterator as _;
                let mut mechs = b.mechanisms();
                let (mut plain, mut plus) = (false, false);
                while let Ok(Some(m)) = mechs.next() {
                    plain |= m == sasl::SCRAM_SHA_256;
                    plus |= m == sasl::SCRAM_SHA_256_PLUS;
                }
                // Over TLS, bind the exchange to the server's certificate when the server
                // offers it (SCRAM-SHA-256-PLUS), so a man in the middle cannot relay it.
                let plus = plus && stream.is_tls();
                if !plain && !plus {
                    return Err(LoginError::Unsupported(
                        "SASL without SCRAM-SHA-256",
                        cred_name.into(),
                    ));
                }
                let s = scram::Scram::new(need("password")?, channel_binding(&stream, plus));
                let mech = if plus {
                    sasl::SCRAM_SHA_256_PLUS
                } else {
                    sasl::SCRAM_SHA_256
                };
                frontend::sasl_initial_response(mech, s.message(), &mut out)?;
                scram = Some(s);
            }
            backend::Message::AuthenticationSaslContinue(b) => {
                let s = scram.as_mut().ok_or(LoginError::Unsupported(
                    "SASL continue without start",
                    cred_name.into(),
                ))?;
                s.update(b.data(), salted).map_err(|e| LoginError::Scram {
                    credential: cred_name.into(),
                    reason: e.to_string(),
                })?;
                frontend::sasl_response(s.message(), &mut out)?;
            }
            backend::Message::AuthenticationSaslFinal(b) => {
                let s = scram.as_mut().ok_or(LoginError::Unsupported(
                    "SASL final without start",
                    cred_name.into(),
                ))?;
                s.finish(b.data()).map_err(|e| LoginError::Scram {
                    credential: cred_name.into(),
                    reason: e.to_string(),
                })?;
            }
            backend::Message::AuthenticationGss
            | backend::Message::AuthenticationSspi
            | backend::Message::AuthenticationKerberosV5 => {
                return Err(LoginError::Unsupported(
                    "GSSAPI/SSPI/Kerberos",
                    cred_name.into(),
                ));
            }
            backend::Message::ErrorResponse(b) => {
                let (code, message) = error_fields(&b);
                return Err(LoginError::Rejected {
                    credential: cred_name.into(),
                    code,
                    message,
                });
            }
            backend::Message::BackendKeyData(b) => {
                backend_key = Some((b.process_id(), b.secret_key()))
            }
            backend::Message::ParameterStatus(_) | backend::Message::NoticeResponse(_) => {
                relay.extend_from_slice(&raw)
            }
            backend::Message::ReadyForQuery(b) => {
                return Ok(Session {
                    stream,
                    backend_key,
                    relay,
                    status: b.status(),
                    rest: buf,
                });
            }
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "unexpected message from upstream during login",
                )
                .into());
            }
        }
        if !out.is_empty() {
            stream.write_all(&out).await?;
            stream.flush().await?;
            out.clear();
        }
    }
}

/// Send `query` (one whole Query message) on the logged-in upstream `s` and hand each answer
/// message to `feed` until it returns the outcome (at the query's ReadyForQuery); for the
/// agent's own catalog reads at login. `what` names the query when the server closes first.
pub async fn query_until<T>(
    s: &mut Session,
    query: &[u8],
    what: &str,
    mut feed: impl FnMut(u8, &[u8]) -> Option<io::Result<T>>,
) -> io::Result<T> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    s.stream.write_all(query).await?;
    let buf = &mut s.rest;
    loop {
        while let Some((tag, raw)) = wire::parse_backend(buf)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?
        {
            if let Some(done) = feed(tag, &raw) {
                return done;
            }
        }
        if s.stream.read_buf(buf).await? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("upstream closed during the {what}"),
            ));
        }
    }
}

/// Send a CancelRequest for `key` over `conn`, a new (marked) connection to the server that
/// [`negotiate_tls`] secured as the target's logins are (PostgreSQL reads a CancelRequest
/// after an SSLRequest too): a target that requires TLS never gets the key in plaintext, which
/// would let whoever reads it off the wire cancel that backend's statements.
pub async fn cancel(mut conn: Conn, key: (i32, i32)) -> io::Result<()> {
    let mut out = BytesMut::new();
    frontend::cancel_request(key.0, key.1, &mut out);
    conn.write_all(&out).await?;
    let _ = conn.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    #[test]
    fn a_login_failure_blames_the_credential_only_when_the_server_rejected_it() {
        let rejected = |code: &str, message: &str| LoginError::Rejected {
            credential: "app-rw".into(),
            code: code.into(),
            message: message.into(),
        };
        let e = rejected(
            "28P01",
            "password authentication failed for user \"app_rw\"",
        );
        assert!(e.blames_credential());
        assert!(e.to_string().contains("credential \"app-rw\""), "{e}");
        for (code, msg) in [
            ("3D000", "database \"x\" does not exist"),
            ("53300", "sorry, too many clients already"),
        ] {
            let e = rejected(code, msg);
            assert!(!e.blames_credential());
            assert_eq!(e.sqlstate(), code);
            assert_eq!(
                e.to_string(),
                format!("the upstream server refused the login: {msg}")
            );
        }
    }

    /// Cancel `key` against a server that refuses TLS ('N' to an SSLRequest); returns the
    /// result and every byte the server received.
    async fn cancel_to_plain_server(mode: TlsMode) -> (Result<(), LoginError>, Vec<u8>) {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.expect("accept");
            let mut got = vec![0u8; 8];
            s.read_exact(&mut got).await.expect("first message");
            if got[4..8] == wire::SSL_REQUEST_CODE.to_be_bytes() {
                s.write_all(b"N").await.expect("refuse TLS");
            }
            s.read_to_end(&mut got).await.expect("rest");
            got
        });
        let stream = TcpStream::connect(addr).await.expect("connect");
        let tls = TargetTls {
            mode,
            ..Default::default()
        };
        let name = ServerName::try_from("localhost").expect("name");
        let r = match negotiate_tls(stream, &tls, name).await {
            Ok(conn) => cancel(conn, (4242, 77)).await.map_err(Into::into),
            Err(e) => Err(e),
        };
        (r, server.await.expect("server"))
    }

    fn cancel_request() -> Vec<u8> {
        let mut b = BytesMut::new();
        frontend::cancel_request(4242, 77, &mut b);
        b.to_vec()
    }

    #[tokio::test]
    async fn a_cancel_goes_as_securely_as_the_targets_logins() {
        let mut ssl_request = BytesMut::new();
        frontend::ssl_request(&mut ssl_request);

        // require: the server will not encrypt, so the key is not sent at all.
        let (r, got) = cancel_to_plain_server(TlsMode::Require).await;
        assert!(r.is_err(), "require without TLS must fail");
        assert_eq!(got, ssl_request.to_vec(), "nothing after the SSLRequest");

        // prefer: plaintext after the refusal, as the target's logins do.
        let (r, got) = cancel_to_plain_server(TlsMode::Prefer).await;
        assert!(r.is_ok(), "{:?}", r.err().map(|e| e.to_string()));
        assert_eq!(got, [ssl_request.to_vec(), cancel_request()].concat());

        // disable: the CancelRequest alone.
        let (r, got) = cancel_to_plain_server(TlsMode::Disable).await;
        assert!(r.is_ok());
        assert_eq!(got, cancel_request());
    }
}
