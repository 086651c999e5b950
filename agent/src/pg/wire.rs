//! PostgreSQL wire protocol v3 framing: bytes in a `BytesMut` to messages and back, with no
//! sockets. The proxy owns the I/O; this module only decides where a message starts and ends,
//! what it says, and what the agent itself says back.
//!
//! Layout:
//! - **Startup phase.** [`parse_startup`] reads the first packet of a client connection:
//!   SSLRequest, GSSENCRequest, CancelRequest or StartupMessage ([`Startup`]).
//! - **Client to server.** [`parse_frontend`] returns a [`Frontend`] plus the exact raw bytes, so
//!   an allowed message is forwarded unchanged. [`decode_bind`] and [`decode_function_call`] open
//!   the two bodies that [`Frontend`] keeps raw.
//! - **Server to client.** [`parse_backend`] only frames (tag + raw bytes): it is cheap enough to
//!   stream millions of DataRows. The `decode_*` helpers and [`data_row_values`] (zero-copy) open
//!   the messages the proxy inspects.
//! - **Encoders.** `encode_*` write what the proxy says to a client (errors, ReadyForQuery,
//!   re-encoded masked rows, ...). For the upstream side, thin wrappers over
//!   `postgres_protocol::message::frontend` map its `io::Error` into [`WireError`].
//! - **Errors.** One [`WireError`] enum. [`WireError::sqlstate`] and [`WireError::label`] map it, in
//!   one place, to the SQLSTATE of the ErrorResponse the client gets and to a bounded metric label.
//!
//! Every parser follows mini-redis' check-then-parse habit. It looks at the header first, rejects an
//! unknown tag or a bad length at once, and returns `Ok(None)` while the message is incomplete. It
//! splits the message off the buffer only once the message is whole and well-formed, so on
//! `Ok(None)` *and* on `Err` the buffer is left exactly as it was. A length field is compared
//! with a cap before anything is buffered. Nothing here reserves memory because a peer announced
//! a length: the I/O loop grows the buffer as bytes really arrive, so memory follows what was
//! sent, never what was claimed.
//!
//! Protocol version: the agent speaks 3.0 to clients. A client asking for a later 3.x minor
//! (PostgreSQL 18's 3.2 with `max_protocol_version`), or sending `_pq_.` protocol options, is
//! accepted. [`Startup::needs_negotiation`] is then true, and the proxy answers with
//! [`encode_negotiate_protocol_version`] before authentication, as a PostgreSQL server does. The
//! client then continues in 3.0, so BackendKeyData and CancelRequest keep their 4-byte secrets.
//! Any other major version is refused with [`WireError::UnsupportedProtocol`].
//!
//! Text encoding: every string a client sends (queries, names, startup parameters) must be UTF-8,
//! because classification parses it as such. A client whose `client_encoding` is not UTF8 gets
//! [`WireError::InvalidUtf8`] on the first non-UTF-8 byte. Server error and notice texts are
//! decoded lossily, since they are only logged.

use bytes::{Buf, BufMut};
// Re-exported because they are part of this API, so callers (and the fuzz target) need no
// `bytes` dependency of their own to call it.
pub use bytes::{Bytes, BytesMut};
use postgres_protocol::message::{backend as pgb, frontend as pgf};

/// Largest length field of a message the proxy holds whole (Query, Parse, FunctionCall, and
/// DataRow / CopyData / FunctionCallResponse that a mask applies to), in bytes. The length field
/// counts itself but not the tag byte. The proxy must hold such a message to inspect or mask it,
/// so this bounds per-connection memory; the handler refuses a longer one with SQLSTATE 54000.
/// Bind, CopyData and unmasked rows longer than [`STREAM_FROM`] are not held: see
/// [`large_frontend`] and [`large_backend`].
pub const MAX_MESSAGE_LEN: usize = 64 * 1024 * 1024;

/// Largest length field PostgreSQL accepts for a client message (`PQ_LARGE_MESSAGE_LIMIT`,
/// `MaxAllocSize - 1`). A longer one makes the server log "invalid message length" and close the
/// connection; the agent says the same to the client, as a FATAL 08P01.
pub const PG_MAX_MESSAGE_LEN: usize = 0x3FFF_FFFE;

/// Messages of a streamable type (Bind, CopyData, DataRow, FunctionCallResponse) whose whole
/// length (tag included) is above this are relayed in pieces as they arrive instead of being
/// buffered. Small enough to bound memory, large enough that ordinary traffic never takes the
/// slower path.
pub const STREAM_FROM: usize = 1024 * 1024;

/// Largest startup packet, as in PostgreSQL (`MAX_STARTUP_PACKET_LENGTH`).
pub const MAX_STARTUP_LEN: usize = 10_000;

/// Largest length for the fixed-shape client messages (Sync, Flush, Describe, Close, Execute,
/// CopyDone, CopyFail, Terminate), as in PostgreSQL (`PQ_SMALL_MESSAGE_LIMIT`).
pub const MAX_SMALL_MESSAGE_LEN: usize = 10_000;

/// Largest PasswordMessage / SASL response, as in PostgreSQL (`PG_MAX_AUTH_TOKEN_LENGTH`).
pub const MAX_AUTH_MESSAGE_LEN: usize = 65_535;

/// Longest text written into each field of an ErrorResponse / NoticeResponse the agent builds.
/// Reports are for humans. The cap keeps [`encode_error_response`] infallible, which matters
/// because it runs on the error path.
pub const MAX_REPORT_FIELD_LEN: usize = 16 * 1024;

/// Request code of SSLRequest (1234.5679).
pub const SSL_REQUEST_CODE: u32 = 80_877_103;
/// Request code of GSSENCRequest (1234.5680).
pub const GSSENC_REQUEST_CODE: u32 = 80_877_104;
/// Request code of CancelRequest (1234.5678).
pub const CANCEL_REQUEST_CODE: u32 = 80_877_102;
/// The single byte that refuses SSLRequest and GSSENCRequest. The client then goes on in
/// plaintext, or gives up if its `sslmode` / `gssencmode` requires encryption.
pub const ENCRYPTION_REFUSED: u8 = b'N';
/// The single byte that accepts SSLRequest. The TLS handshake follows.
pub const SSL_ACCEPTED: u8 = b'S';

/// First byte of a TLS handshake record. PostgreSQL 17's `sslnegotiation=direct` sends it
/// instead of an SSLRequest. It cannot start a valid startup packet, because the first byte of a
/// length of at most [`MAX_STARTUP_LEN`] is 0.
pub const TLS_HANDSHAKE: u8 = 0x16;

/// Everything that can go wrong reading or writing a message. Each message is meant to be shown
/// to the client as is, in an ErrorResponse with [`WireError::sqlstate`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// A length field is above the cap for that message type. The agent refuses it rather than
    /// buffer it: the peer is broken, hostile, or sending a statement or row too big to inspect.
    #[error("{what} length {len} exceeds the {limit}-byte limit")]
    TooLong {
        /// The message or packet, e.g. "Query message".
        what: &'static str,
        /// The announced (or, when encoding, the computed) length.
        len: u64,
        /// The cap that applied.
        limit: usize,
    },
    /// A length field is negative, smaller than the header it must cover, or not the fixed size
    /// that this message type has.
    #[error("invalid {what} length {len} ({})", len_range(.min, .max))]
    BadLength {
        /// The message or packet.
        what: &'static str,
        /// The length field as read, signed.
        len: i64,
        /// Smallest valid length.
        min: usize,
        /// Largest valid length.
        max: usize,
    },
    /// The message type byte is not a known message in this direction. Usually the peer is not
    /// speaking the PostgreSQL protocol, or the stream lost its framing.
    #[error("unknown message type '{}' (0x{:02x}): the peer is not speaking PostgreSQL protocol 3.0", .0.escape_ascii(), .0)]
    UnknownMessage(u8),
    /// The startup packet asks for a protocol major version other than 3.
    #[error("unsupported frontend protocol {major}.{minor}: tollgate speaks protocol 3.0 (clients from PostgreSQL 7.4 on)")]
    UnsupportedProtocol {
        /// Requested major version.
        major: u16,
        /// Requested minor version.
        minor: u16,
    },
    /// The client opened with a TLS ClientHello instead of an SSLRequest (`sslnegotiation=direct`).
    /// The buffer is left untouched.
    #[error(
        "client started TLS directly (sslnegotiation=direct): connect with sslnegotiation=postgres"
    )]
    DirectTls,
    /// The StartupMessage has no `user` parameter, or an empty one.
    #[error("no PostgreSQL user name specified in startup packet")]
    MissingUser,
    /// The StartupMessage names the same parameter twice. Refused so that the agent and the
    /// upstream can never read different values.
    #[error("startup parameter \"{0}\" is given more than once")]
    DuplicateParameter(String),
    /// A string field runs to the end of the message without its NUL terminator.
    #[error("{what}: a string is missing its NUL terminator")]
    MissingNul {
        /// The message or packet.
        what: &'static str,
    },
    /// A string field is not valid UTF-8.
    #[error("{what}: a string is not valid UTF-8 (tollgate requires client_encoding UTF8)")]
    InvalidUtf8 {
        /// The message or packet.
        what: &'static str,
    },
    /// The body ends in the middle of a fixed-size field or a counted value.
    #[error("{what}: the message ends in the middle of a field")]
    Truncated {
        /// The message or packet.
        what: &'static str,
    },
    /// Bytes are left over after a complete, well-formed body.
    #[error("{what}: {extra} unexpected byte(s) after the end of the message")]
    TrailingBytes {
        /// The message or packet.
        what: &'static str,
        /// How many bytes were left.
        extra: usize,
    },
    /// A field holds a value the protocol does not allow, for example a negative count, an
    /// unknown Describe target, or a format code other than 0 (text) or 1 (binary).
    #[error("{what}: invalid {field} {value}")]
    InvalidField {
        /// The message or packet.
        what: &'static str,
        /// Which field.
        field: &'static str,
        /// The value read.
        value: i64,
    },
    /// A `decode_*` helper was given a message of another type. This is a bug in the caller.
    #[error("expected a {expected}, got message type '{}'", .got.escape_ascii())]
    UnexpectedMessage {
        /// What the helper decodes.
        expected: &'static str,
        /// The tag it got.
        got: u8,
    },
    /// An encoder was given a string with a NUL byte, which a protocol string cannot carry.
    #[error("{what}: a string contains a NUL byte, which the PostgreSQL protocol cannot carry")]
    EmbeddedNul {
        /// The message being encoded.
        what: &'static str,
    },
    /// A client message's length field is above PostgreSQL's own limit
    /// ([`PG_MAX_MESSAGE_LEN`]). The message is PostgreSQL's, which logs it and closes the
    /// connection.
    #[error("invalid message length")]
    InvalidLength {
        /// The length field as read.
        len: u64,
    },
    /// An encoder was given more items (columns, values, options) than the count field holds.
    #[error("{what}: {count} items exceed the protocol limit of {limit}")]
    TooMany {
        /// The message being encoded.
        what: &'static str,
        /// Items given.
        count: usize,
        /// Largest count the field can hold.
        limit: usize,
    },
}

fn len_range(min: &usize, max: &usize) -> String {
    if min == max {
        format!("must be exactly {min}")
    } else {
        format!("must be between {min} and {max}")
    }
}

impl WireError {
    /// The SQLSTATE for the ErrorResponse that reports this error to a client. PostgreSQL uses the
    /// same codes for the same faults.
    pub fn sqlstate(&self) -> &'static str {
        match self {
            // feature_not_supported, as PostgreSQL for an unknown protocol version.
            WireError::UnsupportedProtocol { .. } | WireError::DirectTls => "0A000",
            // invalid_authorization_specification, as PostgreSQL for a missing user.
            WireError::MissingUser => "28000",
            // character_not_in_repertoire, as PostgreSQL for invalid byte sequences.
            WireError::InvalidUtf8 { .. } => "22021",
            // Encoder errors are the agent's own: internal_error / program_limit_exceeded.
            WireError::UnexpectedMessage { .. } | WireError::EmbeddedNul { .. } => "XX000",
            WireError::TooMany { .. } => "54000",
            // protocol_violation, as PostgreSQL for every framing fault.
            WireError::TooLong { .. }
            | WireError::InvalidLength { .. }
            | WireError::BadLength { .. }
            | WireError::UnknownMessage(_)
            | WireError::DuplicateParameter(_)
            | WireError::MissingNul { .. }
            | WireError::Truncated { .. }
            | WireError::TrailingBytes { .. }
            | WireError::InvalidField { .. } => "08P01",
        }
    }

    /// A short, bounded label for metrics (`reason="too_long"`).
    pub fn label(&self) -> &'static str {
        match self {
            WireError::TooLong { .. } | WireError::InvalidLength { .. } => "too_long",
            WireError::BadLength { .. } => "bad_length",
            WireError::UnknownMessage(_) => "unknown_message",
            WireError::UnsupportedProtocol { .. } => "unsupported_protocol",
            WireError::DirectTls => "direct_tls",
            WireError::MissingUser => "missing_user",
            WireError::DuplicateParameter(_) => "duplicate_parameter",
            WireError::MissingNul { .. } => "missing_nul",
            WireError::InvalidUtf8 { .. } => "invalid_utf8",
            WireError::Truncated { .. } => "truncated",
            WireError::TrailingBytes { .. } => "trailing_bytes",
            WireError::InvalidField { .. } => "invalid_field",
            WireError::UnexpectedMessage { .. } => "unexpected_message",
            WireError::EmbeddedNul { .. } => "embedded_nul",
            WireError::TooMany { .. } => "too_many",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Body reader

/// A bounds-checked cursor over one message body. Every read checks what is left, so a lying
/// count or length yields [`WireError::Truncated`], never a panic or an allocation.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8], what: &'static str) -> Self {
        Reader { buf, pos: 0, what }
    }

    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if n > self.remaining() {
            return Err(WireError::Truncated { what: self.what });
        }
        let out = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let mut out = [0; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.array::<1>()?[0])
    }

    fn i16(&mut self) -> Result<i16, WireError> {
        self.array().map(i16::from_be_bytes)
    }

    fn i32(&mut self) -> Result<i32, WireError> {
        self.array().map(i32::from_be_bytes)
    }

    fn u32(&mut self) -> Result<u32, WireError> {
        self.array().map(u32::from_be_bytes)
    }

    /// A NUL-terminated string, without its NUL.
    fn cstr_bytes(&mut self) -> Result<&'a [u8], WireError> {
        let rest = &self.buf[self.pos..];
        let end = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or(WireError::MissingNul { what: self.what })?;
        self.pos += end + 1;
        Ok(&rest[..end])
    }

    /// [`Self::cstr`] as a [`Text`] sharing `msg`'s bytes; the reader reads `msg[skip..]`.
    fn text(&mut self, msg: &Bytes, skip: usize) -> Result<Text, WireError> {
        let start = skip + self.pos;
        let len = self.cstr_bytes()?.len();
        Text::new(msg.slice(start..start + len)).ok_or(WireError::InvalidUtf8 { what: self.what })
    }

    fn cstr(&mut self) -> Result<&'a str, WireError> {
        let bytes = self.cstr_bytes()?;
        std::str::from_utf8(bytes).map_err(|_| WireError::InvalidUtf8 { what: self.what })
    }

    /// An Int16 count, which the protocol never allows to be negative.
    fn count(&mut self, field: &'static str) -> Result<usize, WireError> {
        let n = self.i16()?;
        usize::try_from(n).map_err(|_| self.invalid(field, n.into()))
    }

    /// A format code: 0 (text) or 1 (binary).
    fn format(&mut self, field: &'static str) -> Result<i16, WireError> {
        let f = self.i16()?;
        if f == 0 || f == 1 {
            Ok(f)
        } else {
            Err(self.invalid(field, f.into()))
        }
    }

    /// `count` format codes, with the count in front.
    fn formats(&mut self, field: &'static str) -> Result<Vec<i16>, WireError> {
        let n = self.count("format count")?;
        let mut out = Vec::with_capacity(n.min(self.remaining() / 2));
        for _ in 0..n {
            out.push(self.format(field)?);
        }
        Ok(out)
    }

    /// Counted, length-prefixed values (-1 is NULL), as in Bind, FunctionCall and DataRow.
    fn values(&mut self) -> Result<Vec<Option<&'a [u8]>>, WireError> {
        let n = self.count("value count")?;
        let mut out = Vec::with_capacity(n.min(self.remaining() / 4));
        for _ in 0..n {
            out.push(self.value()?);
        }
        Ok(out)
    }

    fn value(&mut self) -> Result<Option<&'a [u8]>, WireError> {
        match self.i32()? {
            -1 => Ok(None),
            len => {
                let len =
                    usize::try_from(len).map_err(|_| self.invalid("value length", len.into()))?;
                self.take(len).map(Some)
            }
        }
    }

    fn rest(&mut self) -> &'a [u8] {
        let out = &self.buf[self.pos..];
        self.pos = self.buf.len();
        out
    }

    fn invalid(&self, field: &'static str, value: i64) -> WireError {
        WireError::InvalidField {
            what: self.what,
            field,
            value,
        }
    }

    /// The body must end exactly here.
    fn finish(self) -> Result<(), WireError> {
        match self.remaining() {
            0 => Ok(()),
            extra => Err(WireError::TrailingBytes {
                what: self.what,
                extra,
            }),
        }
    }
}

/// Checks the 5-byte header of a tagged message against `min..=max`. `Ok(None)` while the
/// header or the body is incomplete, else the whole message length (tag included).
fn check_header(
    buf: &[u8],
    what: &'static str,
    min: usize,
    max: usize,
) -> Result<Option<usize>, WireError> {
    let Some(len) = buf.get(1..5) else {
        return Ok(None);
    };
    let len = i32::from_be_bytes([len[0], len[1], len[2], len[3]]);
    let bad = || WireError::BadLength {
        what,
        len: len.into(),
        min,
        max,
    };
    let len = usize::try_from(len).map_err(|_| bad())?;
    if len < min || (min == max && len != min) {
        return Err(bad());
    }
    if len > max {
        return Err(WireError::TooLong {
            what,
            len: len as u64,
            limit: max,
        });
    }
    let total = len + 1;
    Ok((buf.len() >= total).then_some(total))
}

// ---------------------------------------------------------------------------------------------
// Startup phase

/// The first packet of a client connection (untagged: length, then a 32-bit code).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Startup {
    /// SSLRequest. Answer [`SSL_ACCEPTED`] and do TLS, or [`ENCRYPTION_REFUSED`]. Another
    /// startup packet follows either way.
    Ssl,
    /// GSSENCRequest. The agent answers [`ENCRYPTION_REFUSED`], so clients fall back.
    GssEnc,
    /// CancelRequest, on a fresh connection. The key is the one the agent gave the client in
    /// BackendKeyData, to be mapped to the upstream backend's key.
    Cancel {
        /// Process id from BackendKeyData.
        pid: i32,
        /// Secret key from BackendKeyData (4 bytes, as in protocol 3.0).
        secret: i32,
    },
    /// StartupMessage.
    Startup {
        /// Requested protocol version, (3, minor).
        version: (u16, u16),
        /// Parameters in the order sent. `user` is always there and not empty.
        params: Vec<(String, String)>,
    },
}

impl Startup {
    /// The value of a StartupMessage parameter (`user`, `database`, `application_name`, ...).
    pub fn param(&self, name: &str) -> Option<&str> {
        match self {
            Startup::Startup { params, .. } => params
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str()),
            _ => None,
        }
    }

    /// The `_pq_.` protocol options the client asked for. The agent supports none of them. They
    /// go into NegotiateProtocolVersion and are never forwarded upstream.
    pub fn protocol_options(&self) -> Vec<&str> {
        match self {
            Startup::Startup { params, .. } => params
                .iter()
                .filter(|(k, _)| k.starts_with("_pq_."))
                .map(|(k, _)| k.as_str())
                .collect(),
            _ => Vec::new(),
        }
    }

    /// True when the proxy must send NegotiateProtocolVersion ([`encode_negotiate_protocol_version`])
    /// before authentication: the client asked for a minor version above 3.0, or for
    /// `_pq_.` options.
    pub fn needs_negotiation(&self) -> bool {
        match self {
            Startup::Startup { version, params } => {
                version.1 > 0 || params.iter().any(|(k, _)| k.starts_with("_pq_."))
            }
            _ => false,
        }
    }
}

/// Parses the first packet of a client connection. Returns `Ok(None)` while incomplete. On
/// success it consumes exactly that packet. On error it consumes nothing.
///
/// Lengths are checked as PostgreSQL checks them: 8 to [`MAX_STARTUP_LEN`] bytes. SSLRequest and
/// GSSENCRequest must be exactly 8 bytes, CancelRequest exactly 16. A TLS ClientHello sent
/// without an SSLRequest (`sslnegotiation=direct`) gives [`WireError::DirectTls`] as soon as its
/// first byte arrives.
pub fn parse_startup(buf: &mut BytesMut) -> Result<Option<Startup>, WireError> {
    const WHAT: &str = "startup packet";
    if buf.first() == Some(&TLS_HANDSHAKE) {
        return Err(WireError::DirectTls);
    }
    let Some(len) = buf.get(0..4) else {
        return Ok(None);
    };
    let len = i32::from_be_bytes([len[0], len[1], len[2], len[3]]);
    let bad = |len: i64, min, max| WireError::BadLength {
        what: WHAT,
        len,
        min,
        max,
    };
    let len = usize::try_from(len).map_err(|_| bad(len.into(), 8, MAX_STARTUP_LEN))?;
    if len < 8 {
        return Err(bad(len as i64, 8, MAX_STARTUP_LEN));
    }
    if len > MAX_STARTUP_LEN {
        return Err(WireError::TooLong {
            what: WHAT,
            len: len as u64,
            limit: MAX_STARTUP_LEN,
        });
    }
    if buf.len() < len {
        return Ok(None);
    }

    let mut r = Reader::new(&buf[4..len], WHAT);
    let code = r.u32()?;
    let startup = match code {
        SSL_REQUEST_CODE | GSSENC_REQUEST_CODE => {
            if len != 8 {
                return Err(bad(len as i64, 8, 8));
            }
            if code == SSL_REQUEST_CODE {
                Startup::Ssl
            } else {
                Startup::GssEnc
            }
        }
        CANCEL_REQUEST_CODE => {
            // Protocol 3.2 allows longer keys, but clients only get the 4-byte keys of 3.0 here.
            if len != 16 {
                return Err(bad(len as i64, 16, 16));
            }
            Startup::Cancel {
                pid: r.i32()?,
                secret: r.i32()?,
            }
        }
        _ => {
            let (major, minor) = ((code >> 16) as u16, (code & 0xffff) as u16);
            if major != 3 {
                return Err(WireError::UnsupportedProtocol { major, minor });
            }
            let mut params: Vec<(String, String)> = Vec::new();
            // A set, not a scan of `params`: a 10000-byte packet holds up to ~2500 parameters.
            let mut seen = std::collections::HashSet::new();
            loop {
                let name = r.cstr()?;
                if name.is_empty() {
                    break;
                }
                let value = r.cstr()?;
                if !seen.insert(name) {
                    return Err(WireError::DuplicateParameter(name.to_owned()));
                }
                params.push((name.to_owned(), value.to_owned()));
            }
            // PostgreSQL requires the terminator to be the last byte.
            r.finish()?;
            if !params.iter().any(|(k, v)| k == "user" && !v.is_empty()) {
                return Err(WireError::MissingUser);
            }
            Startup::Startup {
                version: (major, minor),
                params,
            }
        }
    };
    buf.advance(len);
    Ok(Some(startup))
}

// ---------------------------------------------------------------------------------------------
// Frontend (client to server)

/// A string field of a client message (a query's text), checked to be UTF-8 and sharing the
/// message's bytes instead of copying them: a statement costs no allocation for its text.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Text(Bytes);

impl Text {
    /// `b` as text, if it is UTF-8.
    fn new(b: Bytes) -> Option<Text> {
        std::str::from_utf8(&b).is_ok().then_some(Text(b))
    }

    pub fn as_str(&self) -> &str {
        // SAFETY: checked to be UTF-8 in `Text::new` (or made from a `&str`), and `Bytes` never
        // changes its contents.
        unsafe { std::str::from_utf8_unchecked(&self.0) }
    }
}

impl std::ops::Deref for Text {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl std::fmt::Debug for Text {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.as_str().fmt(f)
    }
}

impl From<&str> for Text {
    fn from(s: &str) -> Text {
        Text(Bytes::copy_from_slice(s.as_bytes()))
    }
}

/// A message from the client, after startup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frontend {
    /// 'Q': a simple query, possibly several statements.
    Query(Text),
    /// 'P': prepare `query` as statement `name` ("" is the unnamed statement).
    Parse {
        /// Statement name.
        name: String,
        /// SQL text.
        query: Text,
        /// Parameter type OIDs the client fixed (0 = unspecified).
        param_types: Vec<u32>,
    },
    /// 'B': bind a statement into a portal. `raw` is the validated rest of the body (formats,
    /// values, result formats), to open with [`decode_bind`].
    Bind {
        /// Portal name.
        portal: String,
        /// Statement name.
        statement: Text,
        /// Body after the two names.
        raw: Bytes,
    },
    /// 'D': describe a statement (`kind` b'S') or portal (b'P').
    Describe {
        /// b'S' or b'P'.
        kind: u8,
        /// Statement or portal name.
        name: String,
    },
    /// 'E': run a portal.
    Execute {
        /// Portal name.
        portal: String,
        /// Row limit, 0 for all.
        max_rows: i32,
    },
    /// 'S'.
    Sync,
    /// 'H'.
    Flush,
    /// 'C': close a statement (`kind` b'S') or portal (b'P').
    Close {
        /// b'S' or b'P'.
        kind: u8,
        /// Statement or portal name.
        name: String,
    },
    /// 'd': COPY FROM STDIN data (the body).
    CopyData(Bytes),
    /// 'c'.
    CopyDone,
    /// 'f': abort a COPY FROM STDIN, with the reason.
    CopyFail(String),
    /// 'X'.
    Terminate,
    /// 'p': PasswordMessage, GSSResponse, SASLInitialResponse or SASLResponse. The body is
    /// kept raw, because what it means depends on the authentication state.
    Password(Bytes),
    /// 'F': fast-path function call, the validated body, to open with [`decode_function_call`].
    /// It calls a function by OID with no SQL around it, so classification never sees it. The
    /// proxy should deny it or decide by OID.
    FunctionCall(Bytes),
}

impl Frontend {
    /// The protocol name of the message, for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Frontend::Query(_) => "Query",
            Frontend::Parse { .. } => "Parse",
            Frontend::Bind { .. } => "Bind",
            Frontend::Describe { .. } => "Describe",
            Frontend::Execute { .. } => "Execute",
            Frontend::Sync => "Sync",
            Frontend::Flush => "Flush",
            Frontend::Close { .. } => "Close",
            Frontend::CopyData(_) => "CopyData",
            Frontend::CopyDone => "CopyDone",
            Frontend::CopyFail(_) => "CopyFail",
            Frontend::Terminate => "Terminate",
            Frontend::Password(_) => "PasswordMessage",
            Frontend::FunctionCall(_) => "FunctionCall",
        }
    }
}

/// Name and length cap of each client message type, as PostgreSQL's `SocketBackend` sets them.
fn frontend_kind(tag: u8) -> Option<(&'static str, usize)> {
    Some(match tag {
        b'Q' => ("Query message", MAX_MESSAGE_LEN),
        b'P' => ("Parse message", MAX_MESSAGE_LEN),
        b'B' => ("Bind message", MAX_MESSAGE_LEN),
        b'F' => ("FunctionCall message", MAX_MESSAGE_LEN),
        b'd' => ("CopyData message", MAX_MESSAGE_LEN),
        b'p' => ("PasswordMessage", MAX_AUTH_MESSAGE_LEN),
        b'D' => ("Describe message", MAX_SMALL_MESSAGE_LEN),
        b'E' => ("Execute message", MAX_SMALL_MESSAGE_LEN),
        b'C' => ("Close message", MAX_SMALL_MESSAGE_LEN),
        b'S' => ("Sync message", MAX_SMALL_MESSAGE_LEN),
        b'H' => ("Flush message", MAX_SMALL_MESSAGE_LEN),
        b'c' => ("CopyDone message", MAX_SMALL_MESSAGE_LEN),
        b'f' => ("CopyFail message", MAX_SMALL_MESSAGE_LEN),
        b'X' => ("Terminate message", MAX_SMALL_MESSAGE_LEN),
        _ => return None,
    })
}

/// Parses one client message. Returns `Ok(None)` while incomplete. On success it consumes the
/// message and returns it with its exact raw bytes (tag, length, body), to forward unchanged.
/// On error it consumes nothing.
///
/// An unknown tag fails as soon as its first byte arrives, and a bad length as soon as the
/// 5-byte header is in. Strings must be NUL-terminated UTF-8 inside the body, and a body with
/// bytes after its last field is refused. Bind and FunctionCall are validated in full (counts,
/// lengths, format codes) even though their bodies are returned raw.
pub fn parse_frontend(buf: &mut BytesMut) -> Result<Option<(Frontend, Bytes)>, WireError> {
    let Some(&tag) = buf.first() else {
        return Ok(None);
    };
    let (what, limit) = frontend_kind(tag).ok_or(WireError::UnknownMessage(tag))?;
    let Some(total) = check_header(buf, what, 4, limit)? else {
        return Ok(None);
    };
    let msg = buf.split_to(total).freeze();
    match decode_frontend(tag, what, &msg) {
        Ok(m) => Ok(Some((m, msg))),
        Err(e) => {
            // Put the message back: an error leaves the buffer as it was. This copies, but only
            // on the error path, which ends the connection anyway.
            let mut whole = BytesMut::with_capacity(msg.len() + buf.len());
            whole.extend_from_slice(&msg);
            whole.extend_from_slice(buf);
            *buf = whole;
            Err(e)
        }
    }
}

fn decode_frontend(tag: u8, what: &'static str, msg: &Bytes) -> Result<Frontend, WireError> {
    const HEADER: usize = 5;
    let mut r = Reader::new(&msg[HEADER..], what);
    let m = match tag {
        b'Q' => Frontend::Query(r.text(msg, HEADER)?),
        b'P' => {
            let name = r.cstr()?.to_owned();
            let query = r.text(msg, HEADER)?;
            let n = r.count("parameter type count")?;
            let mut param_types = Vec::with_capacity(n.min(r.remaining() / 4));
            for _ in 0..n {
                param_types.push(r.u32()?);
            }
            Frontend::Parse {
                name,
                query,
                param_types,
            }
        }
        b'B' => {
            let portal = r.cstr()?.to_owned();
            let statement = r.text(msg, HEADER)?;
            let start = HEADER + r.pos;
            check_bind_params(&mut r)?;
            Frontend::Bind {
                portal,
                statement,
                raw: msg.slice(start..),
            }
        }
        b'D' | b'C' => {
            let kind = r.u8()?;
            if kind != b'S' && kind != b'P' {
                return Err(r.invalid("target type (expected 'S' or 'P')", kind.into()));
            }
            let name = r.cstr()?.to_owned();
            if tag == b'D' {
                Frontend::Describe { kind, name }
            } else {
                Frontend::Close { kind, name }
            }
        }
        b'E' => Frontend::Execute {
            portal: r.cstr()?.to_owned(),
            max_rows: r.i32()?,
        },
        b'S' => Frontend::Sync,
        b'H' => Frontend::Flush,
        b'c' => Frontend::CopyDone,
        b'X' => Frontend::Terminate,
        b'f' => Frontend::CopyFail(r.cstr()?.to_owned()),
        b'd' => {
            r.rest();
            Frontend::CopyData(msg.slice(HEADER..))
        }
        b'p' => {
            r.rest();
            Frontend::Password(msg.slice(HEADER..))
        }
        b'F' => {
            function_call(&mut r)?;
            Frontend::FunctionCall(msg.slice(HEADER..))
        }
        _ => return Err(WireError::UnknownMessage(tag)),
    };
    r.finish()?;
    Ok(m)
}

/// The parameters of a Bind message, borrowed from its body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindParams<'a> {
    /// Parameter format codes: none (all text), one (for all), or one per value.
    pub param_formats: Vec<i16>,
    /// Parameter values, `None` for NULL.
    pub values: Vec<Option<&'a [u8]>>,
    /// Result column format codes: none (all text), one (for all), or one per column.
    pub result_formats: Vec<i16>,
}

impl BindParams<'_> {
    /// The format code (0 text, 1 binary) of parameter `i`.
    pub fn param_format(&self, i: usize) -> i16 {
        format_of(&self.param_formats, i)
    }

    /// The format code (0 text, 1 binary) the client wants for result column `i`.
    pub fn result_format(&self, i: usize) -> i16 {
        format_of(&self.result_formats, i)
    }
}

fn format_of(formats: &[i16], i: usize) -> i16 {
    match formats {
        [] => 0,
        [one] => *one,
        many => many.get(i).copied().unwrap_or(0),
    }
}

/// Opens the `raw` part of [`Frontend::Bind`]: the body after the portal and statement names.
pub fn decode_bind(raw: &[u8]) -> Result<BindParams<'_>, WireError> {
    let mut r = Reader::new(raw, "Bind message");
    let params = bind_params(&mut r)?;
    r.finish()?;
    Ok(params)
}

/// The result format codes of the `raw` part of [`Frontend::Bind`] (already validated by
/// [`parse_frontend`]), without collecting the parameters: the data path's per-Bind need.
/// Codes that are all text (0) come back as none, which means the same: libpq sends one
/// text code with every Bind, and this way a Bind costs no allocation for it.
pub fn bind_result_formats(raw: &[u8]) -> Result<Vec<i16>, WireError> {
    let mut r = Reader::new(raw, "Bind message");
    skip_params(&mut r)?;
    let n = r.count("format count")?;
    let mut formats = Vec::new();
    for i in 0..n {
        let f = r.format("result format code")?;
        if f != 0 && formats.is_empty() {
            formats.reserve(n);
            formats.resize(i, 0);
        }
        if !formats.is_empty() || f != 0 {
            formats.push(f);
        }
    }
    r.finish()?;
    Ok(formats)
}

/// Validates what [`bind_params`] does, collecting nothing.
fn check_bind_params(r: &mut Reader<'_>) -> Result<(), WireError> {
    skip_params(r)?;
    let n = r.count("format count")?;
    for _ in 0..n {
        r.format("result format code")?;
    }
    Ok(())
}

/// Steps over a Bind's parameter format codes and values, validating them as
/// [`bind_params`] does.
fn skip_params(r: &mut Reader<'_>) -> Result<(), WireError> {
    let formats = r.count("format count")?;
    for _ in 0..formats {
        r.format("parameter format code")?;
    }
    let values = r.count("value count")?;
    for _ in 0..values {
        r.value()?;
    }
    if formats > 1 && formats != values {
        return Err(r.invalid(
            "parameter format count (must be 0, 1 or the value count)",
            formats as i64,
        ));
    }
    Ok(())
}

fn bind_params<'a>(r: &mut Reader<'a>) -> Result<BindParams<'a>, WireError> {
    let param_formats = r.formats("parameter format code")?;
    let values = r.values()?;
    if param_formats.len() > 1 && param_formats.len() != values.len() {
        return Err(r.invalid(
            "parameter format count (must be 0, 1 or the value count)",
            param_formats.len() as i64,
        ));
    }
    let result_formats = r.formats("result format code")?;
    Ok(BindParams {
        param_formats,
        values,
        result_formats,
    })
}

/// A fast-path function call, borrowed from its body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FunctionCall<'a> {
    /// OID of the function called.
    pub oid: u32,
    /// Argument format codes: none, one, or one per argument.
    pub arg_formats: Vec<i16>,
    /// Arguments, `None` for NULL.
    pub args: Vec<Option<&'a [u8]>>,
    /// Format code of the result.
    pub result_format: i16,
}

/// Opens the body of [`Frontend::FunctionCall`].
pub fn decode_function_call(body: &[u8]) -> Result<FunctionCall<'_>, WireError> {
    let mut r = Reader::new(body, "FunctionCall message");
    let call = function_call(&mut r)?;
    r.finish()?;
    Ok(call)
}

fn function_call<'a>(r: &mut Reader<'a>) -> Result<FunctionCall<'a>, WireError> {
    let oid = r.u32()?;
    let arg_formats = r.formats("argument format code")?;
    let args = r.values()?;
    if arg_formats.len() > 1 && arg_formats.len() != args.len() {
        return Err(r.invalid(
            "argument format count (must be 0, 1 or the argument count)",
            arg_formats.len() as i64,
        ));
    }
    let result_format = r.format("result format code")?;
    Ok(FunctionCall {
        oid,
        arg_formats,
        args,
        result_format,
    })
}

// ---------------------------------------------------------------------------------------------
// Large messages: relayed in pieces

/// The header of a message too large to buffer: the handler relays (or discards) its `total`
/// bytes as they arrive, or refuses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Large {
    /// The message type.
    pub tag: u8,
    /// The whole length, tag byte included.
    pub total: usize,
}

/// Reads the header at the start of `buf` as that of a large client message, when it is one:
/// a Bind or CopyData longer than [`STREAM_FROM`] (relayed in pieces), or a Query, Parse or
/// FunctionCall longer than [`MAX_MESSAGE_LEN`] (refused, since its text must be inspected
/// whole). `Ok(None)` for everything else, which [`parse_frontend`] handles; an error when the
/// length is above PostgreSQL's own limit ([`PG_MAX_MESSAGE_LEN`]). Consumes nothing.
pub fn large_frontend(buf: &[u8]) -> Result<Option<Large>, WireError> {
    let (Some(&tag), Some(len)) = (buf.first(), buf.get(1..5)) else {
        return Ok(None);
    };
    let streamed = match tag {
        b'B' | b'd' => true,
        b'Q' | b'P' | b'F' => false,
        _ => return Ok(None),
    };
    let Ok(len) = usize::try_from(i32::from_be_bytes([len[0], len[1], len[2], len[3]])) else {
        return Ok(None);
    };
    if len > PG_MAX_MESSAGE_LEN {
        return Err(WireError::InvalidLength { len: len as u64 });
    }
    let total = len + 1;
    let large = if streamed {
        total > STREAM_FROM
    } else {
        len > MAX_MESSAGE_LEN
    };
    Ok(large.then_some(Large { tag, total }))
}

/// Reads the header at the start of `buf` as that of a large server message, when it is one: a
/// DataRow, CopyData or FunctionCallResponse longer than [`STREAM_FROM`]. The handler relays it
/// in pieces when no mask applies to it. Consumes nothing.
pub fn large_backend(buf: &[u8]) -> Option<Large> {
    let (&tag, len) = (buf.first()?, buf.get(1..5)?);
    if !matches!(
        tag,
        pgb::DATA_ROW_TAG | pgb::COPY_DATA_TAG | FUNCTION_CALL_RESPONSE_TAG
    ) {
        return None;
    }
    let len = usize::try_from(i32::from_be_bytes([len[0], len[1], len[2], len[3]])).ok()?;
    let total = len + 1;
    (total > STREAM_FROM).then_some(Large { tag, total })
}

/// Longest portal or statement name [`BindScan`] keeps.
const MAX_BIND_NAME_LEN: usize = MAX_SMALL_MESSAGE_LEN;

/// A Bind message read as it streams past: it keeps the names and format codes the proxy needs
/// and counts over the parameter values without keeping them. Feed it the body (after the 5-byte
/// header) in pieces of any size, then [`BindScan::finish`]. It validates what
/// [`decode_bind`] validates, so a Bind is accepted or refused the same way whole or streamed.
#[derive(Debug, Default)]
pub struct BindScan {
    step: BindStep,
    /// Bytes of the field being read (a name, or a 2- or 4-byte integer).
    field: Vec<u8>,
    /// Bytes of the current value still to pass.
    skip: usize,
    /// Items left in the current list (format codes or values).
    left: usize,
    portal: String,
    statement: String,
    param_formats: usize,
    result_formats: Vec<i16>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum BindStep {
    #[default]
    Portal,
    Statement,
    FormatCount,
    Format,
    ValueCount,
    ValueLen,
    ResultCount,
    Result,
    End,
}

/// What a streamed Bind binds, from [`BindScan::finish`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindHead {
    /// Portal name.
    pub portal: String,
    /// Statement name.
    pub statement: String,
    /// Result column format codes.
    pub result_formats: Vec<i16>,
}

impl BindScan {
    const WHAT: &'static str = "Bind message";

    fn invalid(field: &'static str, value: i64) -> WireError {
        WireError::InvalidField {
            what: Self::WHAT,
            field,
            value,
        }
    }

    /// Reads the next piece of the body.
    pub fn feed(&mut self, mut data: &[u8]) -> Result<(), WireError> {
        while !data.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(data.len());
                self.skip -= n;
                data = &data[n..];
                if self.skip == 0 {
                    self.next_value();
                }
                continue;
            }
            let need = match self.step {
                BindStep::Portal | BindStep::Statement => {
                    let (name, rest, whole) = match data.iter().position(|&b| b == 0) {
                        Some(i) => (&data[..i], &data[i + 1..], true),
                        None => (data, &data[data.len()..], false),
                    };
                    if self.field.len() + name.len() > MAX_BIND_NAME_LEN {
                        return Err(WireError::TooLong {
                            what: "Bind message name",
                            len: (self.field.len() + name.len()) as u64,
                            limit: MAX_BIND_NAME_LEN,
                        });
                    }
                    self.field.extend_from_slice(name);
                    data = rest;
                    if whole {
                        let name = String::from_utf8(std::mem::take(&mut self.field))
                            .map_err(|_| WireError::InvalidUtf8 { what: Self::WHAT })?;
                        if self.step == BindStep::Portal {
                            self.portal = name;
                            self.step = BindStep::Statement;
                        } else {
                            self.statement = name;
                            self.step = BindStep::FormatCount;
                        }
                    }
                    continue;
                }
                BindStep::ValueLen => 4,
                BindStep::End => {
                    return Err(WireError::TrailingBytes {
                        what: Self::WHAT,
                        extra: data.len(),
                    })
                }
                _ => 2,
            };
            let n = (need - self.field.len()).min(data.len());
            self.field.extend_from_slice(&data[..n]);
            data = &data[n..];
            if self.field.len() == need {
                let field = std::mem::take(&mut self.field);
                self.step(&field)?;
                self.field = field;
                self.field.clear();
            }
        }
        Ok(())
    }

    /// One whole integer field.
    fn step(&mut self, f: &[u8]) -> Result<(), WireError> {
        let i16_at = || i16::from_be_bytes([f[0], f[1]]);
        let count = |field| {
            let n = i16_at();
            usize::try_from(n).map_err(|_| Self::invalid(field, n.into()))
        };
        let format = |field| match i16_at() {
            f @ (0 | 1) => Ok(f),
            f => Err(Self::invalid(field, f.into())),
        };
        match self.step {
            BindStep::FormatCount => {
                self.left = count("format count")?;
                self.param_formats = self.left;
                self.step = if self.left == 0 {
                    BindStep::ValueCount
                } else {
                    BindStep::Format
                };
            }
            BindStep::Format => {
                format("parameter format code")?;
                self.left -= 1;
                if self.left == 0 {
                    self.step = BindStep::ValueCount;
                }
            }
            BindStep::ValueCount => {
                let n = count("value count")?;
                if self.param_formats > 1 && self.param_formats != n {
                    return Err(Self::invalid(
                        "parameter format count (must be 0, 1 or the value count)",
                        self.param_formats as i64,
                    ));
                }
                self.left = n + 1;
                self.next_value();
            }
            BindStep::ValueLen => {
                let len = i32::from_be_bytes([f[0], f[1], f[2], f[3]]);
                match len {
                    -1 => self.next_value(),
                    0.. => {
                        self.skip = len as usize;
                        if self.skip == 0 {
                            self.next_value();
                        }
                    }
                    _ => return Err(Self::invalid("value length", len.into())),
                }
            }
            BindStep::ResultCount => {
                self.left = count("format count")?;
                self.step = if self.left == 0 {
                    BindStep::End
                } else {
                    BindStep::Result
                };
            }
            BindStep::Result => {
                self.result_formats.push(format("result format code")?);
                self.left -= 1;
                if self.left == 0 {
                    self.step = BindStep::End;
                }
            }
            BindStep::Portal | BindStep::Statement | BindStep::End => {}
        }
        Ok(())
    }

    /// The previous value is over: the next value's length, or the result formats.
    fn next_value(&mut self) {
        self.left -= 1;
        self.step = if self.left == 0 {
            BindStep::ResultCount
        } else {
            BindStep::ValueLen
        };
    }

    /// The body is over: it must end exactly after the last result format code.
    pub fn finish(self) -> Result<BindHead, WireError> {
        if self.step != BindStep::End {
            return Err(WireError::Truncated { what: Self::WHAT });
        }
        Ok(BindHead {
            portal: self.portal,
            statement: self.statement,
            result_formats: self.result_formats,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Backend (server to client): framing

/// Name and exact length (for fixed-size messages) of each server message type.
fn backend_kind(tag: u8) -> Option<(&'static str, Option<usize>)> {
    Some(match tag {
        pgb::PARSE_COMPLETE_TAG => ("ParseComplete message", Some(4)),
        pgb::BIND_COMPLETE_TAG => ("BindComplete message", Some(4)),
        pgb::CLOSE_COMPLETE_TAG => ("CloseComplete message", Some(4)),
        pgb::NOTIFICATION_RESPONSE_TAG => ("NotificationResponse message", None),
        pgb::COPY_DONE_TAG => ("CopyDone message", Some(4)),
        pgb::COMMAND_COMPLETE_TAG => ("CommandComplete message", None),
        pgb::COPY_DATA_TAG => ("CopyData message", None),
        pgb::DATA_ROW_TAG => ("DataRow message", None),
        pgb::ERROR_RESPONSE_TAG => ("ErrorResponse message", None),
        pgb::COPY_IN_RESPONSE_TAG => ("CopyInResponse message", None),
        pgb::COPY_OUT_RESPONSE_TAG => ("CopyOutResponse message", None),
        COPY_BOTH_RESPONSE_TAG => ("CopyBothResponse message", None),
        pgb::EMPTY_QUERY_RESPONSE_TAG => ("EmptyQueryResponse message", Some(4)),
        // 12 bytes in protocol 3.0, which is what the agent asks the upstream for.
        pgb::BACKEND_KEY_DATA_TAG => ("BackendKeyData message", Some(12)),
        pgb::NO_DATA_TAG => ("NoData message", Some(4)),
        pgb::NOTICE_RESPONSE_TAG => ("NoticeResponse message", None),
        pgb::AUTHENTICATION_TAG => ("Authentication message", None),
        pgb::PORTAL_SUSPENDED_TAG => ("PortalSuspended message", Some(4)),
        pgb::PARAMETER_STATUS_TAG => ("ParameterStatus message", None),
        pgb::PARAMETER_DESCRIPTION_TAG => ("ParameterDescription message", None),
        pgb::ROW_DESCRIPTION_TAG => ("RowDescription message", None),
        pgb::READY_FOR_QUERY_TAG => ("ReadyForQuery message", Some(5)),
        FUNCTION_CALL_RESPONSE_TAG => ("FunctionCallResponse message", None),
        NEGOTIATE_PROTOCOL_VERSION_TAG => ("NegotiateProtocolVersion message", None),
        _ => return None,
    })
}

/// Tag of CopyBothResponse (replication), which `postgres_protocol` does not name.
pub const COPY_BOTH_RESPONSE_TAG: u8 = b'W';
/// Tag of FunctionCallResponse, which `postgres_protocol` does not name.
pub const FUNCTION_CALL_RESPONSE_TAG: u8 = b'V';
/// Tag of NegotiateProtocolVersion, which `postgres_protocol` does not name.
pub const NEGOTIATE_PROTOCOL_VERSION_TAG: u8 = b'v';

/// Frames one server message: returns its tag and exact raw bytes (tag, length, body), and
/// consumes it. Returns `Ok(None)` while incomplete. On error it consumes nothing.
///
/// Only the header is checked: the tag must be a known server message, the length at most
/// [`MAX_MESSAGE_LEN`], and fixed-size messages (ReadyForQuery, BackendKeyData, ParseComplete,
/// ...) must have their exact length. Open the body with the `decode_*` helpers when needed.
pub fn parse_backend(buf: &mut BytesMut) -> Result<Option<(u8, Bytes)>, WireError> {
    let Some(&tag) = buf.first() else {
        return Ok(None);
    };
    let (what, fixed) = backend_kind(tag).ok_or(WireError::UnknownMessage(tag))?;
    let (min, max) = fixed.map_or((4, MAX_MESSAGE_LEN), |n| (n, n));
    let Some(total) = check_header(buf, what, min, max)? else {
        return Ok(None);
    };
    Ok(Some((tag, buf.split_to(total).freeze())))
}

// ---------------------------------------------------------------------------------------------
// Backend: decoding the messages the proxy inspects

/// Checks that `raw` is one whole message with one of `tags`, and returns its tag and a reader
/// over its body.
fn open<'a>(raw: &'a [u8], tags: &[u8], what: &'static str) -> Result<(u8, Reader<'a>), WireError> {
    let Some(&tag) = raw.first() else {
        return Err(WireError::Truncated { what });
    };
    if !tags.contains(&tag) {
        return Err(WireError::UnexpectedMessage {
            expected: what,
            got: tag,
        });
    }
    let Some(len) = raw.get(1..5) else {
        return Err(WireError::Truncated { what });
    };
    let len = i32::from_be_bytes([len[0], len[1], len[2], len[3]]);
    let actual = raw.len() - 1;
    if usize::try_from(len).ok() != Some(actual) {
        return Err(WireError::BadLength {
            what,
            len: len.into(),
            min: actual,
            max: actual,
        });
    }
    Ok((tag, Reader::new(&raw[5..], what)))
}

/// One column of a RowDescription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    /// Column name (or alias).
    pub name: String,
    /// OID of the table the column comes from, 0 if none.
    pub table_oid: u32,
    /// Attribute number within that table, 0 if none.
    pub column: i16,
    /// OID of the data type.
    pub type_oid: u32,
    /// `pg_type.typlen`; negative for variable width.
    pub type_size: i16,
    /// `pg_attribute.atttypmod`.
    pub type_modifier: i32,
    /// 0 text, 1 binary.
    pub format: i16,
}

/// Decodes a RowDescription ('T').
pub fn decode_row_description(raw: &[u8]) -> Result<Vec<Field>, WireError> {
    let (_, mut r) = open(raw, &[pgb::ROW_DESCRIPTION_TAG], "RowDescription message")?;
    let n = r.count("field count")?;
    // A field takes at least 19 bytes: this bounds the reservation by what really arrived.
    let mut fields = Vec::with_capacity(n.min(r.remaining() / 19));
    for _ in 0..n {
        fields.push(Field {
            name: r.cstr()?.to_owned(),
            table_oid: r.u32()?,
            column: r.i16()?,
            type_oid: r.u32()?,
            type_size: r.i16()?,
            type_modifier: r.i32()?,
            format: r.format("format code")?,
        });
    }
    r.finish()?;
    Ok(fields)
}

/// The values of a DataRow ('D'), borrowed from `raw` (zero-copy), `None` for NULL.
pub fn data_row_values(raw: &[u8]) -> Result<Vec<Option<&[u8]>>, WireError> {
    let (_, mut r) = open(raw, &[pgb::DATA_ROW_TAG], "DataRow message")?;
    let values = r.values()?;
    r.finish()?;
    Ok(values)
}

/// [`data_row_values`] as ranges of `raw` (`None` for NULL), into `out` (cleared first), so
/// the data path reuses one buffer for every row instead of allocating one per row.
pub fn data_row_ranges(
    raw: &[u8],
    out: &mut Vec<Option<std::ops::Range<usize>>>,
) -> Result<(), WireError> {
    out.clear();
    let (_, mut r) = open(raw, &[pgb::DATA_ROW_TAG], "DataRow message")?;
    let n = r.count("value count")?;
    out.reserve(n.min(r.remaining() / 4));
    for _ in 0..n {
        let start = 5 + r.pos;
        out.push(r.value()?.map(|v| start + 4..start + 4 + v.len()));
    }
    r.finish()?;
    Ok(())
}

/// The tag of a CommandComplete ('C'), e.g. "SELECT 3" or "INSERT 0 1".
pub fn decode_command_complete(raw: &[u8]) -> Result<&str, WireError> {
    let (_, mut r) = open(raw, &[pgb::COMMAND_COMPLETE_TAG], "CommandComplete message")?;
    let tag = r.cstr()?;
    r.finish()?;
    Ok(tag)
}

/// The row count in a command tag: rows returned (SELECT, FETCH, COPY ... TO) or affected
/// (INSERT, UPDATE, DELETE, MERGE, COPY ... FROM, MOVE). `None` for other commands.
pub fn command_rows(tag: &str) -> Option<u64> {
    let (command, _) = tag.split_once(' ')?;
    match command {
        "SELECT" | "INSERT" | "UPDATE" | "DELETE" | "MERGE" | "FETCH" | "MOVE" | "COPY" => {
            tag.rsplit(' ').next()?.parse().ok()
        }
        _ => None,
    }
}

/// The fields of an ErrorResponse ('E') or NoticeResponse ('N'). Values are decoded lossily,
/// because the server writes them in the client's encoding and they are only shown or logged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorNotice {
    /// True for ErrorResponse, false for NoticeResponse.
    pub is_error: bool,
    /// (field type, value) in the order sent: b'S' severity, b'V' non-localized severity,
    /// b'C' SQLSTATE, b'M' message, b'D' detail, b'H' hint, ...
    pub fields: Vec<(u8, String)>,
}

impl ErrorNotice {
    /// The value of field `code`.
    pub fn get(&self, code: u8) -> Option<&str> {
        self.fields
            .iter()
            .find(|(c, _)| *c == code)
            .map(|(_, v)| v.as_str())
    }

    /// Non-localized severity ('V'), or the localized one ('S') from servers before 9.6.
    pub fn severity(&self) -> Option<&str> {
        self.get(b'V').or_else(|| self.get(b'S'))
    }

    /// SQLSTATE ('C').
    pub fn code(&self) -> Option<&str> {
        self.get(b'C')
    }

    /// Primary message ('M').
    pub fn message(&self) -> Option<&str> {
        self.get(b'M')
    }

    /// Detail ('D').
    pub fn detail(&self) -> Option<&str> {
        self.get(b'D')
    }

    /// Hint ('H').
    pub fn hint(&self) -> Option<&str> {
        self.get(b'H')
    }
}

/// Decodes an ErrorResponse ('E') or NoticeResponse ('N').
pub fn decode_error_notice(raw: &[u8]) -> Result<ErrorNotice, WireError> {
    let (tag, mut r) = open(
        raw,
        &[pgb::ERROR_RESPONSE_TAG, pgb::NOTICE_RESPONSE_TAG],
        "ErrorResponse or NoticeResponse message",
    )?;
    let mut fields = Vec::new();
    loop {
        let code = r.u8()?;
        if code == 0 {
            break;
        }
        fields.push((code, String::from_utf8_lossy(r.cstr_bytes()?).into_owned()));
    }
    r.finish()?;
    Ok(ErrorNotice {
        is_error: tag == pgb::ERROR_RESPONSE_TAG,
        fields,
    })
}

/// Transaction status in ReadyForQuery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransactionStatus {
    /// b'I': not in a transaction block.
    Idle,
    /// b'T': in a transaction block.
    InTransaction,
    /// b'E': in a failed transaction block.
    Failed,
}

impl TransactionStatus {
    /// The status byte.
    pub fn as_byte(self) -> u8 {
        match self {
            TransactionStatus::Idle => b'I',
            TransactionStatus::InTransaction => b'T',
            TransactionStatus::Failed => b'E',
        }
    }

    /// Reads a status byte.
    pub fn from_byte(b: u8) -> Option<Self> {
        match b {
            b'I' => Some(TransactionStatus::Idle),
            b'T' => Some(TransactionStatus::InTransaction),
            b'E' => Some(TransactionStatus::Failed),
            _ => None,
        }
    }
}

/// Decodes a ReadyForQuery ('Z').
pub fn decode_ready_for_query(raw: &[u8]) -> Result<TransactionStatus, WireError> {
    let (_, mut r) = open(raw, &[pgb::READY_FOR_QUERY_TAG], "ReadyForQuery message")?;
    let b = r.u8()?;
    r.finish()?;
    TransactionStatus::from_byte(b).ok_or(WireError::InvalidField {
        what: "ReadyForQuery message",
        field: "transaction status",
        value: b.into(),
    })
}

/// The cancel key in BackendKeyData ('K'), protocol 3.0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BackendKeyData {
    /// Backend process id.
    pub pid: i32,
    /// Secret key.
    pub secret: i32,
}

/// Decodes a BackendKeyData ('K').
pub fn decode_backend_key_data(raw: &[u8]) -> Result<BackendKeyData, WireError> {
    let (_, mut r) = open(raw, &[pgb::BACKEND_KEY_DATA_TAG], "BackendKeyData message")?;
    let key = BackendKeyData {
        pid: r.i32()?,
        secret: r.i32()?,
    };
    r.finish()?;
    Ok(key)
}

/// Decodes a ParameterStatus ('S') into (name, value).
pub fn decode_parameter_status(raw: &[u8]) -> Result<(&str, &str), WireError> {
    let (_, mut r) = open(raw, &[pgb::PARAMETER_STATUS_TAG], "ParameterStatus message")?;
    let pair = (r.cstr()?, r.cstr()?);
    r.finish()?;
    Ok(pair)
}

/// An Authentication ('R') request from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Authentication<'a> {
    /// 0: authenticated.
    Ok,
    /// 3: send the password in clear.
    CleartextPassword,
    /// 5: send `md5(md5(password || user) || salt)`.
    Md5Password {
        /// The salt.
        salt: [u8; 4],
    },
    /// 10: start SASL with one of these mechanisms (SCRAM-SHA-256, SCRAM-SHA-256-PLUS).
    Sasl {
        /// Mechanism names, in server preference order.
        mechanisms: Vec<&'a str>,
    },
    /// 11: SASL challenge.
    SaslContinue(&'a [u8]),
    /// 12: SASL outcome (server signature).
    SaslFinal(&'a [u8]),
    /// Anything else (2 Kerberos V5, 6 SCM, 7 GSS, 8 GSS continue, 9 SSPI, ...), which the agent
    /// does not implement.
    Unsupported {
        /// The request code.
        code: i32,
    },
}

/// Decodes an Authentication request ('R').
pub fn decode_authentication(raw: &[u8]) -> Result<Authentication<'_>, WireError> {
    let (_, mut r) = open(raw, &[pgb::AUTHENTICATION_TAG], "Authentication message")?;
    let auth = match r.i32()? {
        0 => Authentication::Ok,
        3 => Authentication::CleartextPassword,
        5 => Authentication::Md5Password { salt: r.array()? },
        10 => {
            let mut mechanisms = Vec::new();
            loop {
                let m = r.cstr()?;
                if m.is_empty() {
                    break;
                }
                mechanisms.push(m);
            }
            Authentication::Sasl { mechanisms }
        }
        11 => Authentication::SaslContinue(r.rest()),
        12 => Authentication::SaslFinal(r.rest()),
        code => {
            r.rest();
            Authentication::Unsupported { code }
        }
    };
    r.finish()?;
    Ok(auth)
}

/// Which way a COPY goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyDirection {
    /// CopyInResponse ('G'): COPY FROM STDIN, the client sends CopyData.
    In,
    /// CopyOutResponse ('H'): COPY TO STDOUT, the server sends CopyData (to be masked).
    Out,
    /// CopyBothResponse ('W'): streaming replication.
    Both,
}

/// A CopyInResponse, CopyOutResponse or CopyBothResponse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyResponse {
    /// Which way.
    pub direction: CopyDirection,
    /// Overall format: 0 text (rows are lines), 1 binary.
    pub format: u8,
    /// Per-column format codes.
    pub column_formats: Vec<i16>,
}

/// Decodes a CopyInResponse ('G'), CopyOutResponse ('H') or CopyBothResponse ('W').
pub fn decode_copy_response(raw: &[u8]) -> Result<CopyResponse, WireError> {
    let (tag, mut r) = open(
        raw,
        &[
            pgb::COPY_IN_RESPONSE_TAG,
            pgb::COPY_OUT_RESPONSE_TAG,
            COPY_BOTH_RESPONSE_TAG,
        ],
        "CopyInResponse, CopyOutResponse or CopyBothResponse message",
    )?;
    let direction = match tag {
        pgb::COPY_IN_RESPONSE_TAG => CopyDirection::In,
        pgb::COPY_OUT_RESPONSE_TAG => CopyDirection::Out,
        _ => CopyDirection::Both,
    };
    let format = r.u8()?;
    if format > 1 {
        return Err(r.invalid("copy format", format.into()));
    }
    let column_formats = r.formats("column format code")?;
    r.finish()?;
    Ok(CopyResponse {
        direction,
        format,
        column_formats,
    })
}

/// A NotificationResponse ('A'), from LISTEN/NOTIFY.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification<'a> {
    /// The notifying backend.
    pub pid: i32,
    /// Channel name.
    pub channel: &'a str,
    /// Payload.
    pub payload: &'a str,
}

/// Decodes a NotificationResponse ('A').
pub fn decode_notification(raw: &[u8]) -> Result<Notification<'_>, WireError> {
    let (_, mut r) = open(
        raw,
        &[pgb::NOTIFICATION_RESPONSE_TAG],
        "NotificationResponse message",
    )?;
    let n = Notification {
        pid: r.i32()?,
        channel: r.cstr()?,
        payload: r.cstr()?,
    };
    r.finish()?;
    Ok(n)
}

/// Decodes a ParameterDescription ('t') into parameter type OIDs.
pub fn decode_parameter_description(raw: &[u8]) -> Result<Vec<u32>, WireError> {
    let (_, mut r) = open(
        raw,
        &[pgb::PARAMETER_DESCRIPTION_TAG],
        "ParameterDescription message",
    )?;
    let n = r.count("parameter count")?;
    let mut oids = Vec::with_capacity(n.min(r.remaining() / 4));
    for _ in 0..n {
        oids.push(r.u32()?);
    }
    r.finish()?;
    Ok(oids)
}

// ---------------------------------------------------------------------------------------------
// Encoders: what the agent itself says to a client

/// Severity of an ErrorResponse / NoticeResponse the agent writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// The statement failed. The session goes on.
    Error,
    /// The session ends.
    Fatal,
    /// A warning notice.
    Warning,
    /// A notice.
    Notice,
    /// An informational notice.
    Info,
}

impl Severity {
    /// The protocol's spelling, used for both 'S' and 'V'.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
            Severity::Warning => "WARNING",
            Severity::Notice => "NOTICE",
            Severity::Info => "INFO",
        }
    }
}

/// An error or notice the agent reports to a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorReport<'a> {
    /// Severity.
    pub severity: Severity,
    /// Five-character SQLSTATE, e.g. "42501".
    pub code: &'a str,
    /// Primary message.
    pub message: &'a str,
    /// Optional detail.
    pub detail: Option<&'a str>,
    /// Optional hint (psql prints it as `HINT:`).
    pub hint: Option<&'a str>,
    /// Optional cursor position into the statement text, 1-based, in characters (psql prints
    /// `LINE n:` and a caret).
    pub position: Option<u32>,
}

impl<'a> ErrorReport<'a> {
    /// An ERROR: the statement fails, the session goes on.
    pub fn error(code: &'a str, message: &'a str) -> Self {
        ErrorReport {
            severity: Severity::Error,
            code,
            message,
            detail: None,
            hint: None,
            position: None,
        }
    }

    /// A FATAL: the session ends after it.
    pub fn fatal(code: &'a str, message: &'a str) -> Self {
        ErrorReport {
            severity: Severity::Fatal,
            ..Self::error(code, message)
        }
    }

    /// Adds a detail.
    pub fn with_detail(self, detail: &'a str) -> Self {
        ErrorReport {
            detail: Some(detail),
            ..self
        }
    }

    /// Adds a hint.
    pub fn with_hint(self, hint: &'a str) -> Self {
        ErrorReport {
            hint: Some(hint),
            ..self
        }
    }

    /// Adds a cursor position (1-based, in characters).
    pub fn with_position(self, position: u32) -> Self {
        ErrorReport {
            position: Some(position),
            ..self
        }
    }
}

/// Writes a tagged message: tag, length placeholder, `body`, then the real length. On error,
/// `buf` is restored to what it was.
fn encode_msg(
    buf: &mut BytesMut,
    tag: u8,
    what: &'static str,
    body: impl FnOnce(&mut BytesMut) -> Result<(), WireError>,
) -> Result<(), WireError> {
    let start = buf.len();
    buf.put_u8(tag);
    buf.put_i32(0);
    let result = body(buf).and_then(|()| {
        let len = buf.len() - start - 1;
        match i32::try_from(len) {
            Ok(n) if len <= MAX_MESSAGE_LEN => Ok(n),
            _ => Err(WireError::TooLong {
                what,
                len: len as u64,
                limit: MAX_MESSAGE_LEN,
            }),
        }
    });
    match result {
        Ok(len) => {
            buf[start + 1..start + 5].copy_from_slice(&len.to_be_bytes());
            Ok(())
        }
        Err(e) => {
            buf.truncate(start);
            Err(e)
        }
    }
}

fn put_cstr(buf: &mut BytesMut, s: &str, what: &'static str) -> Result<(), WireError> {
    if s.as_bytes().contains(&0) {
        return Err(WireError::EmbeddedNul { what });
    }
    buf.put_slice(s.as_bytes());
    buf.put_u8(0);
    Ok(())
}

/// Writes `s` as a report field: NUL bytes dropped (so a statement echoed into a message cannot
/// inject fields), clipped to [`MAX_REPORT_FIELD_LEN`] at a character boundary.
fn put_report_field(buf: &mut BytesMut, code: u8, s: &str) {
    let mut end = s.len().min(MAX_REPORT_FIELD_LEN);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    buf.put_u8(code);
    for part in s[..end].split('\0') {
        buf.put_slice(part.as_bytes());
    }
    buf.put_u8(0);
}

fn encode_report(buf: &mut BytesMut, tag: u8, report: &ErrorReport<'_>) {
    let start = buf.len();
    buf.put_u8(tag);
    buf.put_i32(0);
    let severity = report.severity.as_str();
    put_report_field(buf, b'S', severity);
    put_report_field(buf, b'V', severity);
    put_report_field(buf, b'C', report.code);
    put_report_field(buf, b'M', report.message);
    if let Some(detail) = report.detail {
        put_report_field(buf, b'D', detail);
    }
    if let Some(hint) = report.hint {
        put_report_field(buf, b'H', hint);
    }
    if let Some(position) = report.position {
        put_report_field(buf, b'P', &position.to_string());
    }
    buf.put_u8(0);
    // At most 7 clipped fields: far below i32::MAX.
    let len = (buf.len() - start - 1) as i32;
    buf[start + 1..start + 5].copy_from_slice(&len.to_be_bytes());
}

/// Writes an ErrorResponse ('E') with severity ('S' and 'V'), SQLSTATE, message, and detail and
/// hint when given. Infallible, because it runs on error paths: NUL bytes are dropped and each
/// field is clipped to [`MAX_REPORT_FIELD_LEN`].
pub fn encode_error_response(report: &ErrorReport<'_>, buf: &mut BytesMut) {
    encode_report(buf, pgb::ERROR_RESPONSE_TAG, report);
}

/// Writes a NoticeResponse ('N'), with the same fields and rules as [`encode_error_response`].
pub fn encode_notice_response(report: &ErrorReport<'_>, buf: &mut BytesMut) {
    encode_report(buf, pgb::NOTICE_RESPONSE_TAG, report);
}

/// Writes ReadyForQuery ('Z').
pub fn encode_ready_for_query(status: TransactionStatus, buf: &mut BytesMut) {
    buf.put_u8(pgb::READY_FOR_QUERY_TAG);
    buf.put_i32(5);
    buf.put_u8(status.as_byte());
}

fn encode_auth(code: i32, buf: &mut BytesMut) {
    buf.put_u8(pgb::AUTHENTICATION_TAG);
    buf.put_i32(8);
    buf.put_i32(code);
}

/// Writes AuthenticationOk ('R', 0).
pub fn encode_authentication_ok(buf: &mut BytesMut) {
    encode_auth(0, buf);
}

/// Writes AuthenticationCleartextPassword ('R', 3).
pub fn encode_authentication_cleartext_password(buf: &mut BytesMut) {
    encode_auth(3, buf);
}

/// Writes ParameterStatus ('S'), e.g. ("server_version", "15.4").
pub fn encode_parameter_status(
    name: &str,
    value: &str,
    buf: &mut BytesMut,
) -> Result<(), WireError> {
    const WHAT: &str = "ParameterStatus message";
    encode_msg(buf, pgb::PARAMETER_STATUS_TAG, WHAT, |buf| {
        put_cstr(buf, name, WHAT)?;
        put_cstr(buf, value, WHAT)
    })
}

/// Writes BackendKeyData ('K'): the cancel key the client will send back in a CancelRequest.
pub fn encode_backend_key_data(key: BackendKeyData, buf: &mut BytesMut) {
    buf.put_u8(pgb::BACKEND_KEY_DATA_TAG);
    buf.put_i32(12);
    buf.put_i32(key.pid);
    buf.put_i32(key.secret);
}

/// Writes NegotiateProtocolVersion ('v'): the agent supports minor version 0 and none of the
/// `_pq_.` options. See [`Startup::needs_negotiation`].
pub fn encode_negotiate_protocol_version(
    unsupported_options: &[&str],
    buf: &mut BytesMut,
) -> Result<(), WireError> {
    const WHAT: &str = "NegotiateProtocolVersion message";
    let count = i32::try_from(unsupported_options.len()).map_err(|_| WireError::TooMany {
        what: WHAT,
        count: unsupported_options.len(),
        limit: i32::MAX as usize,
    })?;
    encode_msg(buf, NEGOTIATE_PROTOCOL_VERSION_TAG, WHAT, |buf| {
        buf.put_i32(0);
        buf.put_i32(count);
        unsupported_options
            .iter()
            .try_for_each(|o| put_cstr(buf, o, WHAT))
    })
}

/// Writes a DataRow ('D') from values, `None` for NULL. Masking uses it to re-encode rows; the
/// values may be owned (`Vec<u8>`) or borrowed (`&[u8]`) from the original row.
pub fn encode_data_row<T: AsRef<[u8]>>(
    values: &[Option<T>],
    buf: &mut BytesMut,
) -> Result<(), WireError> {
    const WHAT: &str = "DataRow message";
    let count = i16::try_from(values.len()).map_err(|_| WireError::TooMany {
        what: WHAT,
        count: values.len(),
        limit: i16::MAX as usize,
    })?;
    // Size it first, so a huge value is refused before it is copied.
    let len = values.iter().fold(6usize, |n, v| {
        n.saturating_add(4)
            .saturating_add(v.as_ref().map_or(0, |v| v.as_ref().len()))
    });
    if len > MAX_MESSAGE_LEN {
        return Err(WireError::TooLong {
            what: WHAT,
            len: len as u64,
            limit: MAX_MESSAGE_LEN,
        });
    }
    buf.reserve(len + 1);
    encode_msg(buf, pgb::DATA_ROW_TAG, WHAT, |buf| {
        buf.put_i16(count);
        for v in values {
            match v {
                None => buf.put_i32(-1),
                Some(v) => {
                    let v = v.as_ref();
                    // Cannot fail: every value is under MAX_MESSAGE_LEN, checked above.
                    buf.put_i32(v.len() as i32);
                    buf.put_slice(v);
                }
            }
        }
        Ok(())
    })
}

/// Writes a RowDescription ('T').
pub fn encode_row_description(fields: &[Field], buf: &mut BytesMut) -> Result<(), WireError> {
    const WHAT: &str = "RowDescription message";
    let count = i16::try_from(fields.len()).map_err(|_| WireError::TooMany {
        what: WHAT,
        count: fields.len(),
        limit: i16::MAX as usize,
    })?;
    encode_msg(buf, pgb::ROW_DESCRIPTION_TAG, WHAT, |buf| {
        buf.put_i16(count);
        for f in fields {
            put_cstr(buf, &f.name, WHAT)?;
            buf.put_u32(f.table_oid);
            buf.put_i16(f.column);
            buf.put_u32(f.type_oid);
            buf.put_i16(f.type_size);
            buf.put_i32(f.type_modifier);
            buf.put_i16(f.format);
        }
        Ok(())
    })
}

/// Writes CommandComplete ('C') with a command tag such as "SELECT 3".
pub fn encode_command_complete(tag: &str, buf: &mut BytesMut) -> Result<(), WireError> {
    const WHAT: &str = "CommandComplete message";
    encode_msg(buf, pgb::COMMAND_COMPLETE_TAG, WHAT, |buf| {
        put_cstr(buf, tag, WHAT)
    })
}

/// Writes CopyData ('d'), e.g. a masked line of COPY TO STDOUT output.
pub fn encode_copy_data(data: &[u8], buf: &mut BytesMut) -> Result<(), WireError> {
    const WHAT: &str = "CopyData message";
    if data.len() > MAX_MESSAGE_LEN - 4 {
        return Err(WireError::TooLong {
            what: WHAT,
            len: data.len() as u64 + 4,
            limit: MAX_MESSAGE_LEN,
        });
    }
    encode_msg(buf, pgb::COPY_DATA_TAG, WHAT, |buf| {
        buf.put_slice(data);
        Ok(())
    })
}

fn encode_empty(tag: u8, buf: &mut BytesMut) {
    buf.put_u8(tag);
    buf.put_i32(4);
}

/// Writes EmptyQueryResponse ('I'): the answer to an empty query string.
pub fn encode_empty_query_response(buf: &mut BytesMut) {
    encode_empty(pgb::EMPTY_QUERY_RESPONSE_TAG, buf);
}

/// Writes ParseComplete ('1').
pub fn encode_parse_complete(buf: &mut BytesMut) {
    encode_empty(pgb::PARSE_COMPLETE_TAG, buf);
}

/// Writes BindComplete ('2').
pub fn encode_bind_complete(buf: &mut BytesMut) {
    encode_empty(pgb::BIND_COMPLETE_TAG, buf);
}

/// Writes CloseComplete ('3').
pub fn encode_close_complete(buf: &mut BytesMut) {
    encode_empty(pgb::CLOSE_COMPLETE_TAG, buf);
}

/// Writes NoData ('n').
pub fn encode_no_data(buf: &mut BytesMut) {
    encode_empty(pgb::NO_DATA_TAG, buf);
}

/// Writes the one-byte refusal ('N') of an SSLRequest or GSSENCRequest.
pub fn encode_encryption_refused(buf: &mut BytesMut) {
    buf.put_u8(ENCRYPTION_REFUSED);
}

// ---------------------------------------------------------------------------------------------
// Upstream side: thin wrappers over postgres_protocol's frontend encoders

/// Runs a `postgres_protocol` encoder and maps its `io::Error`: it fails only on an embedded NUL
/// or a length that does not fit its field. It leaves a partial message behind when it fails, so
/// the buffer is cut back to where it was.
fn upstream<E>(
    buf: &mut BytesMut,
    what: &'static str,
    strings: &[&[u8]],
    encode: impl FnOnce(&mut BytesMut) -> Result<(), E>,
) -> Result<(), WireError> {
    let start = buf.len();
    encode(buf).map_err(|_| {
        buf.truncate(start);
        if strings.iter().any(|s| s.contains(&0)) {
            WireError::EmbeddedNul { what }
        } else {
            let len = strings.iter().map(|s| s.len() + 1).sum::<usize>();
            WireError::TooLong {
                what,
                len: len as u64,
                limit: i32::MAX as usize,
            }
        }
    })
}

/// Writes a protocol 3.0 StartupMessage for the upstream.
pub fn encode_startup_message(
    params: &[(&str, &str)],
    buf: &mut BytesMut,
) -> Result<(), WireError> {
    let strings: Vec<&[u8]> = params
        .iter()
        .flat_map(|(k, v)| [k.as_bytes(), v.as_bytes()])
        .collect();
    upstream(buf, "StartupMessage", &strings, |buf| {
        pgf::startup_message(params.iter().copied(), buf)
    })
}

/// Writes an SSLRequest for the upstream.
pub fn encode_ssl_request(buf: &mut BytesMut) {
    pgf::ssl_request(buf);
}

/// Writes a CancelRequest for the upstream.
pub fn encode_cancel_request(key: BackendKeyData, buf: &mut BytesMut) {
    pgf::cancel_request(key.pid, key.secret, buf);
}

/// Writes a PasswordMessage ('p'): a cleartext password or an md5 hash.
pub fn encode_password_message(password: &[u8], buf: &mut BytesMut) -> Result<(), WireError> {
    upstream(buf, "PasswordMessage", &[password], |buf| {
        pgf::password_message(password, buf)
    })
}

/// Writes a SASLInitialResponse ('p').
pub fn encode_sasl_initial_response(
    mechanism: &str,
    data: &[u8],
    buf: &mut BytesMut,
) -> Result<(), WireError> {
    upstream(
        buf,
        "SASLInitialResponse",
        &[mechanism.as_bytes(), data],
        |buf| pgf::sasl_initial_response(mechanism, data, buf),
    )
}

/// Writes a SASLResponse ('p').
pub fn encode_sasl_response(data: &[u8], buf: &mut BytesMut) -> Result<(), WireError> {
    // The SASL data is length-framed, not a string: a NUL in it is fine.
    upstream(buf, "SASLResponse", &[], |buf| {
        pgf::sasl_response(data, buf)
    })
}

/// Writes a Query ('Q'), e.g. the agent's own catalog lookups.
pub fn encode_query(query: &str, buf: &mut BytesMut) -> Result<(), WireError> {
    upstream(buf, "Query message", &[query.as_bytes()], |buf| {
        pgf::query(query, buf)
    })
}

/// Writes a Terminate ('X').
pub fn encode_terminate(buf: &mut BytesMut) {
    pgf::terminate(buf);
}

#[cfg(test)]
mod tests;
