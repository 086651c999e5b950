//! Socket-free tests of the wire module. The other side of every round trip is postgres-protocol,
//! the codec tokio-postgres uses, so both directions are checked against an independent
//! implementation.

use super::*;
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend as pgf;
use postgres_protocol::IsNull;
use std::fmt::Debug;

// ---------------------------------------------------------------------------------------------
// Helpers

fn build(f: impl FnOnce(&mut BytesMut)) -> Vec<u8> {
    let mut buf = BytesMut::new();
    f(&mut buf);
    buf.to_vec()
}

/// A tagged message with a correct length field.
fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// An untagged startup packet with a correct length field.
fn packet(body: &[u8]) -> Vec<u8> {
    let mut out = (body.len() as i32 + 4).to_be_bytes().to_vec();
    out.extend_from_slice(body);
    out
}

fn startup_body(version: u32, params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = version.to_be_bytes().to_vec();
    for (k, v) in params {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    body
}

/// Every strict prefix of `bytes` is incomplete, and leaves the buffer untouched.
fn assert_prefixes_incomplete<T: Debug>(
    bytes: &[u8],
    parse: impl Fn(&mut BytesMut) -> Result<Option<T>, WireError>,
) {
    for cut in 0..bytes.len() {
        let mut buf = BytesMut::from(&bytes[..cut]);
        let got = parse(&mut buf);
        assert!(
            matches!(got, Ok(None)),
            "prefix {cut} of {}: {got:?}",
            bytes.len()
        );
        assert_eq!(&buf[..], &bytes[..cut], "prefix {cut} was consumed");
    }
}

/// Parses `bytes` as one startup packet: prefixes are incomplete, the whole is consumed.
fn startup(bytes: &[u8]) -> Startup {
    assert_prefixes_incomplete(bytes, parse_startup);
    let mut buf = BytesMut::from(bytes);
    let s = parse_startup(&mut buf).expect("valid").expect("complete");
    assert!(buf.is_empty());
    s
}

/// The error for `bytes`, checking the buffer (and its capacity: no allocation) is untouched.
fn startup_err(bytes: &[u8]) -> WireError {
    let mut buf = BytesMut::from(bytes);
    let cap = buf.capacity();
    let e = parse_startup(&mut buf).expect_err("must fail");
    assert_eq!(&buf[..], bytes);
    assert_eq!(buf.capacity(), cap);
    e
}

/// Parses `bytes` as one client message, with a following message left alone.
fn frontend(bytes: &[u8]) -> Frontend {
    assert_prefixes_incomplete(bytes, parse_frontend);
    let mut buf = BytesMut::from(bytes);
    buf.extend_from_slice(b"S\0\0\0\x04");
    let (m, raw) = parse_frontend(&mut buf).expect("valid").expect("complete");
    assert_eq!(&raw[..], bytes, "raw bytes are the exact message");
    assert_eq!(&buf[..], b"S\0\0\0\x04", "next message untouched");
    m
}

fn frontend_err(bytes: &[u8]) -> WireError {
    let mut buf = BytesMut::from(bytes);
    let cap = buf.capacity();
    let e = parse_frontend(&mut buf).expect_err("must fail");
    assert_eq!(&buf[..], bytes, "an error consumes nothing");
    assert_eq!(buf.capacity(), cap, "an error allocates nothing");
    e
}

/// Frames `bytes` as one server message, checking prefixes; returns the raw frame.
fn backend(bytes: &[u8]) -> Bytes {
    assert_prefixes_incomplete(bytes, parse_backend);
    let mut buf = BytesMut::from(bytes);
    let (tag, raw) = parse_backend(&mut buf).expect("valid").expect("complete");
    assert!(buf.is_empty());
    assert_eq!(tag, bytes[0]);
    assert_eq!(&raw[..], bytes);
    raw
}

fn backend_err(bytes: &[u8]) -> WireError {
    let mut buf = BytesMut::from(bytes);
    let e = parse_backend(&mut buf).expect_err("must fail");
    assert_eq!(&buf[..], bytes);
    e
}

/// Parses with postgres-protocol (tokio-postgres' codec), which must consume exactly `raw`.
fn pg(raw: &[u8]) -> Message {
    let mut buf = BytesMut::from(raw);
    let m = Message::parse(&mut buf)
        .expect("postgres-protocol accepts it")
        .expect("complete");
    assert!(
        buf.is_empty(),
        "postgres-protocol consumed the whole message"
    );
    m
}

fn bind_msg(
    portal: &str,
    stmt: &str,
    formats: &[i16],
    values: &[Option<&[u8]>],
    results: &[i16],
) -> Vec<u8> {
    build(|buf| {
        let ok = pgf::bind(
            portal,
            stmt,
            formats.iter().copied(),
            values.iter().copied(),
            |v, buf| match v {
                Some(v) => {
                    buf.put_slice(v);
                    Ok(IsNull::No)
                }
                None => Ok(IsNull::Yes),
            },
            results.iter().copied(),
            buf,
        );
        assert!(ok.is_ok());
    })
}

fn field(name: &str, type_oid: u32) -> Field {
    Field {
        name: name.into(),
        table_oid: 16384,
        column: 2,
        type_oid,
        type_size: -1,
        type_modifier: -1,
        format: 0,
    }
}

// ---------------------------------------------------------------------------------------------
// Startup

#[test]
fn startup_message_round_trip() {
    let params = [
        ("user", "ci"),
        ("database", "orders"),
        ("application_name", "psql"),
        ("client_encoding", "UTF8"),
    ];
    let bytes = build(|b| pgf::startup_message(params.iter().copied(), b).expect("encode"));
    let s = startup(&bytes);
    let Startup::Startup {
        version,
        params: got,
    } = &s
    else {
        panic!("{s:?}")
    };
    assert_eq!(*version, (3, 0));
    assert_eq!(got.len(), 4);
    assert_eq!(s.param("database"), Some("orders"));
    assert_eq!(s.param("nope"), None);
    assert!(!s.needs_negotiation());
    // The wrapper writes the same bytes.
    assert_eq!(
        build(|b| encode_startup_message(&params, b).expect("encode")),
        bytes
    );
}

#[test]
fn ssl_gssenc_and_cancel_requests() {
    assert_eq!(startup(&build(pgf::ssl_request)), Startup::Ssl);
    assert_eq!(startup(&build(encode_ssl_request)), Startup::Ssl);
    assert_eq!(
        startup(&packet(&GSSENC_REQUEST_CODE.to_be_bytes())),
        Startup::GssEnc
    );
    let cancel = build(|b| pgf::cancel_request(4242, -7, b));
    assert_eq!(
        startup(&cancel),
        Startup::Cancel {
            pid: 4242,
            secret: -7
        }
    );
    let key = BackendKeyData {
        pid: 4242,
        secret: -7,
    };
    assert_eq!(build(|b| encode_cancel_request(key, b)), cancel);
    assert_eq!(build(encode_encryption_refused), vec![b'N']);
}

#[test]
fn ssl_request_then_startup_in_one_buffer() {
    let mut bytes = build(pgf::ssl_request);
    bytes.extend(build(|b| {
        pgf::startup_message([("user", "ci")], b).expect("encode")
    }));
    let mut buf = BytesMut::from(&bytes[..]);
    assert_eq!(parse_startup(&mut buf), Ok(Some(Startup::Ssl)));
    assert!(matches!(
        parse_startup(&mut buf),
        Ok(Some(Startup::Startup { .. }))
    ));
    assert_eq!(parse_startup(&mut buf), Ok(None));
}

#[test]
fn startup_lengths_are_bounded_before_buffering() {
    // 2^31: negative as an Int32.
    let e = startup_err(&[0x80, 0, 0, 0, 0, 3, 0, 0]);
    assert!(
        matches!(
            e,
            WireError::BadLength {
                len: -2147483648,
                ..
            }
        ),
        "{e:?}"
    );
    assert_eq!(
        e.to_string(),
        "invalid startup packet length -2147483648 (must be between 8 and 10000)"
    );
    let e = startup_err(&[0x7f, 0xff, 0xff, 0xff]);
    assert_eq!(
        e.to_string(),
        "startup packet length 2147483647 exceeds the 10000-byte limit"
    );
    assert!(matches!(
        startup_err(&10_001i32.to_be_bytes()),
        WireError::TooLong { len: 10_001, .. }
    ));
    assert!(matches!(
        startup_err(&[0xff, 0xff, 0xff, 0xff]),
        WireError::BadLength { len: -1, .. }
    ));
    assert!(matches!(
        startup_err(&7i32.to_be_bytes()),
        WireError::BadLength { len: 7, .. }
    ));
    assert!(matches!(
        startup_err(&0i32.to_be_bytes()),
        WireError::BadLength { len: 0, .. }
    ));
    // A full 10000-byte packet is fine (when well-formed).
    let pad = "x".repeat(10_000 - 4 - 4 - 5 - 3 - 2 - 2);
    let body = startup_body(0x0003_0000, &[("user", "ci"), ("a", &pad)]);
    assert_eq!(body.len() + 4, MAX_STARTUP_LEN);
    assert!(matches!(startup(&packet(&body)), Startup::Startup { .. }));
}

#[test]
fn startup_protocol_versions() {
    let e = startup_err(&packet(&startup_body(0x0002_0000, &[("user", "ci")])));
    assert_eq!(e, WireError::UnsupportedProtocol { major: 2, minor: 0 });
    assert_eq!(e.sqlstate(), "0A000");
    let e = startup_err(&packet(&(1234u32 << 16 | 5681).to_be_bytes()));
    assert_eq!(
        e,
        WireError::UnsupportedProtocol {
            major: 1234,
            minor: 5681
        }
    );
    // PostgreSQL 18's 3.2 is accepted and negotiated down to 3.0.
    let s = startup(&packet(&startup_body(0x0003_0002, &[("user", "ci")])));
    assert!(matches!(
        s,
        Startup::Startup {
            version: (3, 2),
            ..
        }
    ));
    assert!(s.needs_negotiation());
    let s = startup(&packet(&startup_body(
        0x0003_0000,
        &[("user", "ci"), ("_pq_.compression", "on")],
    )));
    assert!(s.needs_negotiation());
    assert_eq!(s.protocol_options(), vec!["_pq_.compression"]);
    let raw = backend(&build(|b| {
        encode_negotiate_protocol_version(&s.protocol_options(), b).expect("encode")
    }));
    assert_eq!(&raw[5..], b"\0\0\0\0\0\0\0\x01_pq_.compression\0");
}

#[test]
fn startup_parameter_errors() {
    let v3 = 0x0003_0000;
    assert_eq!(
        startup_err(&packet(&startup_body(v3, &[("database", "x")]))),
        WireError::MissingUser
    );
    assert_eq!(
        startup_err(&packet(&startup_body(v3, &[("user", "")]))),
        WireError::MissingUser
    );
    assert_eq!(
        startup_err(&packet(&startup_body(v3, &[("user", "a"), ("user", "b")]))),
        WireError::DuplicateParameter("user".into())
    );
    // No final terminator.
    let mut body = startup_body(v3, &[("user", "ci")]);
    body.pop();
    assert!(matches!(
        startup_err(&packet(&body)),
        WireError::MissingNul { .. }
    ));
    // A name without a value.
    let mut body = v3.to_be_bytes().to_vec();
    body.extend_from_slice(b"user\0");
    assert!(matches!(
        startup_err(&packet(&body)),
        WireError::MissingNul { .. }
    ));
    // Bytes after the terminator.
    let mut body = startup_body(v3, &[("user", "ci")]);
    body.push(b'x');
    assert!(matches!(
        startup_err(&packet(&body)),
        WireError::TrailingBytes { extra: 1, .. }
    ));
    // Invalid UTF-8.
    let mut body = v3.to_be_bytes().to_vec();
    body.extend_from_slice(b"user\0\xff\xfe\0\0");
    assert!(matches!(
        startup_err(&packet(&body)),
        WireError::InvalidUtf8 { .. }
    ));
}

#[test]
fn fixed_size_startup_requests_must_have_their_size() {
    let mut body = SSL_REQUEST_CODE.to_be_bytes().to_vec();
    body.extend_from_slice(&[0; 4]);
    let e = startup_err(&packet(&body));
    assert_eq!(
        e.to_string(),
        "invalid startup packet length 12 (must be exactly 8)"
    );
    let mut body = CANCEL_REQUEST_CODE.to_be_bytes().to_vec();
    body.extend_from_slice(&[0; 4]);
    assert!(matches!(
        startup_err(&packet(&body)),
        WireError::BadLength {
            len: 12,
            min: 16,
            max: 16,
            ..
        }
    ));
}

#[test]
fn direct_tls_is_recognised_at_the_first_byte() {
    assert_eq!(startup_err(&[0x16]), WireError::DirectTls);
    assert_eq!(
        startup_err(&[0x16, 0x03, 0x01, 0x02, 0x00]),
        WireError::DirectTls
    );
}

// ---------------------------------------------------------------------------------------------
// Frontend

#[test]
fn simple_query() {
    let bytes = build(|b| pgf::query("SELECT 'é'; DROP TABLE x", b).expect("encode"));
    assert_eq!(
        frontend(&bytes),
        Frontend::Query("SELECT 'é'; DROP TABLE x".into())
    );
    assert_eq!(
        build(|b| encode_query("SELECT 'é'; DROP TABLE x", b).expect("encode")),
        bytes
    );
    assert_eq!(
        frontend(&build(|b| pgf::query("", b).expect("encode"))),
        Frontend::Query("".into())
    );
}

#[test]
fn extended_protocol_messages() {
    let parse = build(|b| pgf::parse("s1", "SELECT $1::int, $2", [23, 0], b).expect("encode"));
    assert_eq!(
        frontend(&parse),
        Frontend::Parse {
            name: "s1".into(),
            query: "SELECT $1::int, $2".into(),
            param_types: vec![23, 0]
        }
    );
    let values: [Option<&[u8]>; 3] = [Some(&[0, 0, 0, 5]), None, Some(b"")];
    let bind = bind_msg("p1", "s1", &[1, 0, 0], &values, &[1]);
    let Frontend::Bind {
        portal,
        statement,
        raw,
    } = frontend(&bind)
    else {
        panic!()
    };
    assert_eq!((portal.as_str(), statement.as_str()), ("p1", "s1"));
    let params = decode_bind(&raw).expect("bind");
    assert_eq!(params.values, values.to_vec());
    assert_eq!(params.param_formats, vec![1, 0, 0]);
    assert_eq!((params.param_format(0), params.param_format(1)), (1, 0));
    assert_eq!((params.result_format(0), params.result_format(7)), (1, 1));
    let bind = bind_msg("", "", &[], &[], &[]);
    let Frontend::Bind { raw, .. } = frontend(&bind) else {
        panic!()
    };
    assert_eq!(decode_bind(&raw).expect("bind").result_format(3), 0);

    let describe = build(|b| pgf::describe(b'P', "p1", b).expect("encode"));
    assert_eq!(
        frontend(&describe),
        Frontend::Describe {
            kind: b'P',
            name: "p1".into()
        }
    );
    let execute = build(|b| pgf::execute("p1", 100, b).expect("encode"));
    assert_eq!(
        frontend(&execute),
        Frontend::Execute {
            portal: "p1".into(),
            max_rows: 100
        }
    );
    let close = build(|b| pgf::close(b'S', "s1", b).expect("encode"));
    assert_eq!(
        frontend(&close),
        Frontend::Close {
            kind: b'S',
            name: "s1".into()
        }
    );
    assert_eq!(frontend(&build(pgf::sync)), Frontend::Sync);
    assert_eq!(frontend(&build(pgf::flush)), Frontend::Flush);
    assert_eq!(frontend(&build(pgf::terminate)), Frontend::Terminate);
    assert_eq!(frontend(&build(encode_terminate)), Frontend::Terminate);
}

#[test]
fn copy_messages() {
    let data = build(|b| {
        pgf::CopyData::new(&b"1\talice@example.com\n"[..])
            .expect("copy")
            .write(b)
    });
    assert_eq!(
        frontend(&data),
        Frontend::CopyData(Bytes::from_static(b"1\talice@example.com\n"))
    );
    assert_eq!(frontend(&build(pgf::copy_done)), Frontend::CopyDone);
    let fail = build(|b| pgf::copy_fail("aborted by user", b).expect("encode"));
    assert_eq!(
        frontend(&fail),
        Frontend::CopyFail("aborted by user".into())
    );
}

#[test]
fn password_and_sasl_messages_stay_raw() {
    let p = build(|b| pgf::password_message(b"hunter2", b).expect("encode"));
    assert_eq!(
        frontend(&p),
        Frontend::Password(Bytes::from_static(b"hunter2\0"))
    );
    assert_eq!(
        build(|b| encode_password_message(b"hunter2", b).expect("encode")),
        p
    );
    let init =
        build(|b| pgf::sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=abc", b).expect("encode"));
    assert_eq!(
        build(
            |b| encode_sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=abc", b).expect("encode")
        ),
        init
    );
    let Frontend::Password(body) = frontend(&init) else {
        panic!()
    };
    assert_eq!(&body[..], b"SCRAM-SHA-256\0\0\0\0\x0bn,,n=,r=abc");
    let resp = build(|b| encode_sasl_response(b"c=biws,r=abc,p=xyz", b).expect("encode"));
    assert_eq!(
        frontend(&resp),
        Frontend::Password(Bytes::from_static(b"c=biws,r=abc,p=xyz"))
    );
}

#[test]
fn function_call() {
    let mut body = 2619u32.to_be_bytes().to_vec(); // an OID
    body.extend_from_slice(&[0, 1, 0, 0]); // one format: text
    body.extend_from_slice(&[0, 2, 0, 0, 0, 3, b'a', b'b', b'c', 0xff, 0xff, 0xff, 0xff]); // "abc", NULL
    body.extend_from_slice(&[0, 1]); // binary result
    let Frontend::FunctionCall(raw) = frontend(&msg(b'F', &body)) else {
        panic!()
    };
    let call = decode_function_call(&raw).expect("call");
    assert_eq!(call.oid, 2619);
    assert_eq!(call.args, vec![Some(&b"abc"[..]), None]);
    assert_eq!((call.arg_formats, call.result_format), (vec![0], 1));
    body.truncate(body.len() - 2);
    assert!(matches!(
        frontend_err(&msg(b'F', &body)),
        WireError::Truncated { .. }
    ));
}

#[test]
fn pipelined_extended_queries() {
    let mut bytes = Vec::new();
    for i in 0..3 {
        let name = format!("s{i}");
        bytes.extend(build(|b| {
            pgf::parse(&name, "SELECT $1", [25], b).expect("encode")
        }));
        bytes.extend(bind_msg("", &name, &[], &[Some(b"42")], &[]));
        bytes.extend(build(|b| pgf::describe(b'P', "", b).expect("encode")));
        bytes.extend(build(|b| pgf::execute("", 0, b).expect("encode")));
    }
    bytes.extend(build(pgf::sync));
    let tail = build(|b| pgf::query("SELECT 2", b).expect("encode"));
    bytes.extend_from_slice(&tail[..7]);

    let mut buf = BytesMut::from(&bytes[..]);
    let mut names = Vec::new();
    let mut consumed = 0;
    while let Some((m, raw)) = parse_frontend(&mut buf).expect("valid") {
        assert_eq!(&raw[..], &bytes[consumed..consumed + raw.len()]);
        consumed += raw.len();
        names.push(m.name());
    }
    assert_eq!(names.len(), 13);
    assert_eq!(&names[..4], ["Parse", "Bind", "Describe", "Execute"]);
    assert_eq!(names[12], "Sync");
    assert_eq!(&buf[..], &tail[..7], "the partial Query stays buffered");
    buf.extend_from_slice(&tail[7..]);
    assert_eq!(
        parse_frontend(&mut buf).expect("valid").map(|m| m.0),
        Some(Frontend::Query("SELECT 2".into()))
    );
}

#[test]
fn frontend_garbage_and_bad_lengths() {
    // Unknown tags fail at the first byte, before any length.
    assert_eq!(frontend_err(b"\0"), WireError::UnknownMessage(0));
    assert_eq!(
        frontend_err(b"GET / HTTP/1.1\r\n"),
        WireError::UnknownMessage(b'G')
    );
    assert_eq!(
        WireError::UnknownMessage(b'G').to_string(),
        "unknown message type 'G' (0x47): the peer is not speaking PostgreSQL protocol 3.0"
    );
    assert!(matches!(
        frontend_err(b"Q\0\0\0\x03"),
        WireError::BadLength { len: 3, .. }
    ));
    assert!(matches!(
        frontend_err(b"Q\xff\xff\xff\xff"),
        WireError::BadLength { len: -1, .. }
    ));
    assert!(matches!(
        frontend_err(b"Q\x80\0\0\0"),
        WireError::BadLength {
            len: -2147483648,
            ..
        }
    ));
    let e = frontend_err(b"Q\x7f\xff\xff\xff");
    assert_eq!(
        e.to_string(),
        "Query message length 2147483647 exceeds the 67108864-byte limit"
    );
    assert_eq!((e.sqlstate(), e.label()), ("08P01", "too_long"));
    let over = (MAX_MESSAGE_LEN as i32 + 1).to_be_bytes();
    assert!(matches!(
        frontend_err(&[&b"d"[..], &over].concat()),
        WireError::TooLong { .. }
    ));
    // Exactly at the cap is only incomplete.
    let mut buf =
        BytesMut::from(&[&b"d"[..], &(MAX_MESSAGE_LEN as i32).to_be_bytes()].concat()[..]);
    assert_eq!(parse_frontend(&mut buf), Ok(None));
    // Small messages have PostgreSQL's small cap, passwords the auth-token cap.
    assert!(matches!(
        frontend_err(&[&b"S"[..], &10_001i32.to_be_bytes()].concat()),
        WireError::TooLong { limit: 10_000, .. }
    ));
    assert!(matches!(
        frontend_err(&[&b"p"[..], &70_000i32.to_be_bytes()].concat()),
        WireError::TooLong { limit: 65_535, .. }
    ));
}

#[test]
fn frontend_malformed_bodies() {
    assert!(matches!(
        frontend_err(&msg(b'Q', b"SELECT 1")),
        WireError::MissingNul { .. }
    ));
    assert!(matches!(
        frontend_err(&msg(b'Q', b"SELECT '\xff'\0")),
        WireError::InvalidUtf8 { .. }
    ));
    let e = frontend_err(&msg(b'Q', b"SELECT 1\0xx"));
    assert_eq!(
        e,
        WireError::TrailingBytes {
            what: "Query message",
            extra: 2
        }
    );
    assert!(matches!(
        frontend_err(&msg(b'S', b"x")),
        WireError::TrailingBytes { extra: 1, .. }
    ));
    assert!(matches!(
        frontend_err(&msg(b'D', b"Xname\0")),
        WireError::InvalidField { value: 88, .. }
    ));
    assert!(matches!(
        frontend_err(&msg(b'C', b"")),
        WireError::Truncated { .. }
    ));
    assert!(matches!(
        frontend_err(&msg(b'E', b"\0\0\0")),
        WireError::Truncated { .. }
    ));
    assert!(matches!(
        frontend_err(&msg(b'P', b"\0SELECT 1\0\xff\xff")),
        WireError::InvalidField { value: -1, .. }
    ));
    assert!(matches!(
        frontend_err(&msg(b'P', b"\0SELECT 1\0\0\x02\0\0\0\x17")),
        WireError::Truncated { .. }
    ));
    // Bind: a value longer than the message, a bad length, a bad format code, mismatched counts.
    assert!(matches!(
        frontend_err(&msg(b'B', b"\0\0\0\0\0\x01\0\0\0\x64abc\0\0")),
        WireError::Truncated { .. }
    ));
    assert!(matches!(
        frontend_err(&msg(b'B', b"\0\0\0\0\0\x01\xff\xff\xff\xfe\0\0")),
        WireError::InvalidField { value: -2, .. }
    ));
    assert!(matches!(
        frontend_err(&msg(b'B', b"\0\0\0\x01\0\x02\0\0\0\0")),
        WireError::InvalidField { value: 2, .. }
    ));
    let two_formats_one_value = b"\0\0\0\x02\0\0\0\0\0\x01\0\0\0\0\0\0";
    assert!(matches!(
        frontend_err(&msg(b'B', two_formats_one_value)),
        WireError::InvalidField { value: 2, .. }
    ));
    assert!(matches!(
        frontend_err(&msg(b'B', b"\0\0\0\0\0\0\0\0\0")),
        WireError::TrailingBytes { extra: 1, .. }
    ));
}

// ---------------------------------------------------------------------------------------------
// Backend: encoders against our decoders and postgres-protocol

#[test]
fn error_and_notice_responses() {
    let report = ErrorReport::error(
        "42501",
        "tollgate: drop on public.users denied by rule \"no-ddl\" for identity ci-bot",
    )
    .with_detail("statement 1 of 1")
    .with_hint("ask for an approval");
    let raw = backend(&build(|b| encode_error_response(&report, b)));
    let e = decode_error_notice(&raw).expect("decode");
    assert!(e.is_error);
    let codes: Vec<u8> = e.fields.iter().map(|f| f.0).collect();
    assert_eq!(codes, b"SVCMDH");
    assert_eq!(
        (e.get(b'S'), e.severity(), e.code()),
        (Some("ERROR"), Some("ERROR"), Some("42501"))
    );
    assert_eq!(
        (e.message(), e.detail(), e.hint()),
        (Some(report.message), report.detail, report.hint)
    );
    assert!(matches!(pg(&raw), Message::ErrorResponse(_)));

    let notice = ErrorReport {
        severity: Severity::Notice,
        ..ErrorReport::error("00000", "masked 3 values")
    };
    let raw = backend(&build(|b| encode_notice_response(&notice, b)));
    let n = decode_error_notice(&raw).expect("decode");
    assert!(!n.is_error);
    assert_eq!(
        (n.severity(), n.message(), n.detail()),
        (Some("NOTICE"), Some("masked 3 values"), None)
    );
    assert!(matches!(pg(&raw), Message::NoticeResponse(_)));

    let fatal = ErrorReport::fatal("28P01", "password authentication failed");
    let raw = backend(&build(|b| encode_error_response(&fatal, b)));
    assert_eq!(
        decode_error_notice(&raw).expect("decode").severity(),
        Some("FATAL")
    );
}

#[test]
fn error_response_cannot_be_injected_or_overflowed() {
    let evil = "x\0Cfake\0Mboom";
    let long = "é".repeat(MAX_REPORT_FIELD_LEN);
    let raw = backend(&build(|b| {
        encode_error_response(&ErrorReport::error("XX000", evil).with_detail(&long), b)
    }));
    let e = decode_error_notice(&raw).expect("decode");
    assert_eq!(e.fields.len(), 5);
    assert_eq!(e.message(), Some("xCfakeMboom"));
    let detail = e.detail().expect("detail");
    assert_eq!(detail.len(), MAX_REPORT_FIELD_LEN);
    assert!(long.starts_with(detail));
}

#[test]
fn small_backend_messages() {
    for status in [
        TransactionStatus::Idle,
        TransactionStatus::InTransaction,
        TransactionStatus::Failed,
    ] {
        let raw = backend(&build(|b| encode_ready_for_query(status, b)));
        assert_eq!(decode_ready_for_query(&raw), Ok(status));
        let Message::ReadyForQuery(body) = pg(&raw) else {
            panic!()
        };
        assert_eq!(body.status(), status.as_byte());
    }
    let raw = backend(&build(encode_authentication_ok));
    assert_eq!(decode_authentication(&raw), Ok(Authentication::Ok));
    assert!(matches!(pg(&raw), Message::AuthenticationOk));
    let raw = backend(&build(encode_authentication_cleartext_password));
    assert_eq!(
        decode_authentication(&raw),
        Ok(Authentication::CleartextPassword)
    );
    assert!(matches!(pg(&raw), Message::AuthenticationCleartextPassword));

    let key = BackendKeyData {
        pid: 31337,
        secret: i32::MIN,
    };
    let raw = backend(&build(|b| encode_backend_key_data(key, b)));
    assert_eq!(decode_backend_key_data(&raw), Ok(key));
    let Message::BackendKeyData(body) = pg(&raw) else {
        panic!()
    };
    assert_eq!((body.process_id(), body.secret_key()), (31337, i32::MIN));

    let raw = backend(&build(|b| {
        encode_parameter_status("server_version", "15.4", b).expect("encode")
    }));
    assert_eq!(
        decode_parameter_status(&raw),
        Ok(("server_version", "15.4"))
    );
    let Message::ParameterStatus(body) = pg(&raw) else {
        panic!()
    };
    assert_eq!(
        (body.name().expect("utf8"), body.value().expect("utf8")),
        ("server_version", "15.4")
    );

    type Encoder = fn(&mut BytesMut);
    let empties: [(Encoder, u8); 5] = [
        (encode_empty_query_response, b'I'),
        (encode_parse_complete, b'1'),
        (encode_bind_complete, b'2'),
        (encode_close_complete, b'3'),
        (encode_no_data, b'n'),
    ];
    for (encode, tag) in empties {
        let raw = backend(&build(encode));
        assert_eq!(&raw[..], &[tag, 0, 0, 0, 4]);
        let ok = matches!(
            (tag, pg(&raw)),
            (b'I', Message::EmptyQueryResponse)
                | (b'1', Message::ParseComplete)
                | (b'2', Message::BindComplete)
                | (b'3', Message::CloseComplete)
                | (b'n', Message::NoData)
        );
        assert!(ok, "tag {tag}");
    }
}

#[test]
fn rows_round_trip() {
    let fields = vec![
        field("id", 23),
        field("email", 25),
        Field {
            format: 1,
            ..field("card", 17)
        },
    ];
    let raw = backend(&build(|b| {
        encode_row_description(&fields, b).expect("encode")
    }));
    assert_eq!(decode_row_description(&raw), Ok(fields));
    assert!(matches!(pg(&raw), Message::RowDescription(_)));

    let values: Vec<Option<Vec<u8>>> = vec![
        Some(b"1".to_vec()),
        Some(b"****@example.com".to_vec()),
        None,
        Some(vec![]),
    ];
    let raw = backend(&build(|b| encode_data_row(&values, b).expect("encode")));
    let got = data_row_values(&raw).expect("decode");
    assert_eq!(got, values.iter().map(|v| v.as_deref()).collect::<Vec<_>>());
    let Message::DataRow(body) = pg(&raw) else {
        panic!()
    };
    assert_eq!(body.buffer(), &raw[7..]);
    // Borrowed values re-encode to the same bytes (masking reuses unmasked columns).
    assert_eq!(
        build(|b| encode_data_row(&got, b).expect("encode")),
        raw.to_vec()
    );

    let raw = backend(&build(|b| {
        encode_command_complete("SELECT 3", b).expect("encode")
    }));
    assert_eq!(decode_command_complete(&raw), Ok("SELECT 3"));
    let Message::CommandComplete(body) = pg(&raw) else {
        panic!()
    };
    assert_eq!(body.tag().expect("utf8"), "SELECT 3");

    let raw = backend(&build(|b| {
        encode_copy_data(b"1\t****\n", b).expect("encode")
    }));
    let Message::CopyData(body) = pg(&raw) else {
        panic!()
    };
    assert_eq!(body.data(), b"1\t****\n");
}

#[test]
fn encoders_refuse_what_the_protocol_cannot_carry() {
    let mut buf = BytesMut::from(&b"keep"[..]);
    assert!(matches!(
        encode_parameter_status("a\0b", "x", &mut buf),
        Err(WireError::EmbeddedNul { .. })
    ));
    assert!(matches!(
        encode_command_complete("SELECT\0", &mut buf),
        Err(WireError::EmbeddedNul { .. })
    ));
    assert!(matches!(
        encode_row_description(&[field("a\0", 23)], &mut buf),
        Err(WireError::EmbeddedNul { .. })
    ));
    assert!(matches!(
        encode_query("SELECT 1\0", &mut buf),
        Err(WireError::EmbeddedNul { .. })
    ));
    assert!(matches!(
        encode_startup_message(&[("user", "a\0")], &mut buf),
        Err(WireError::EmbeddedNul { .. })
    ));
    let many: Vec<Option<&[u8]>> = vec![None; 40_000];
    assert!(matches!(
        encode_data_row(&many, &mut buf),
        Err(WireError::TooMany { count: 40_000, .. })
    ));
    let big = vec![0u8; MAX_MESSAGE_LEN];
    assert!(matches!(
        encode_data_row(&[Some(&big[..])], &mut buf),
        Err(WireError::TooLong { .. })
    ));
    assert!(matches!(
        encode_copy_data(&big, &mut buf),
        Err(WireError::TooLong { .. })
    ));
    assert_eq!(
        &buf[..],
        b"keep",
        "failed encoders leave the buffer as it was"
    );
}

#[test]
fn command_tags() {
    assert_eq!(command_rows("SELECT 3"), Some(3));
    assert_eq!(command_rows("INSERT 0 12"), Some(12));
    assert_eq!(command_rows("DELETE 0"), Some(0));
    assert_eq!(command_rows("COPY 1000000"), Some(1_000_000));
    assert_eq!(command_rows("CREATE TABLE"), None);
    assert_eq!(command_rows("SELECT"), None);
    assert_eq!(command_rows(""), None);
}

// ---------------------------------------------------------------------------------------------
// Backend: decoding what the upstream sends

#[test]
fn authentication_requests() {
    let md5 = msg(b'R', &[0, 0, 0, 5, 1, 2, 3, 4]);
    assert_eq!(
        decode_authentication(&backend(&md5)),
        Ok(Authentication::Md5Password { salt: [1, 2, 3, 4] })
    );
    let Message::AuthenticationMd5Password(body) = pg(&md5) else {
        panic!()
    };
    assert_eq!(body.salt(), [1, 2, 3, 4]);
    let sasl = msg(b'R', b"\0\0\0\x0aSCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0");
    assert_eq!(
        decode_authentication(&backend(&sasl)),
        Ok(Authentication::Sasl {
            mechanisms: vec!["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]
        })
    );
    assert!(matches!(pg(&sasl), Message::AuthenticationSasl(_)));
    let cont = msg(b'R', b"\0\0\0\x0br=abc,s=c2FsdA==,i=4096");
    assert_eq!(
        decode_authentication(&cont),
        Ok(Authentication::SaslContinue(b"r=abc,s=c2FsdA==,i=4096"))
    );
    let Message::AuthenticationSaslContinue(body) = pg(&cont) else {
        panic!()
    };
    assert_eq!(body.data(), b"r=abc,s=c2FsdA==,i=4096");
    let fin = msg(b'R', b"\0\0\0\x0cv=sig");
    assert_eq!(
        decode_authentication(&fin),
        Ok(Authentication::SaslFinal(b"v=sig"))
    );
    assert_eq!(
        decode_authentication(&msg(b'R', &[0, 0, 0, 7])),
        Ok(Authentication::Unsupported { code: 7 })
    );
    // Malformed: no list terminator, short salt, extra bytes after Ok.
    assert!(matches!(
        decode_authentication(&msg(b'R', b"\0\0\0\x0aSCRAM-SHA-256\0")),
        Err(WireError::MissingNul { .. })
    ));
    assert!(matches!(
        decode_authentication(&msg(b'R', &[0, 0, 0, 5, 1])),
        Err(WireError::Truncated { .. })
    ));
    assert!(matches!(
        decode_authentication(&msg(b'R', &[0, 0, 0, 0, 9])),
        Err(WireError::TrailingBytes { .. })
    ));
}

#[test]
fn copy_responses_notifications_and_parameter_descriptions() {
    let out = msg(b'H', &[0, 0, 2, 0, 0, 0, 0]);
    let expect = CopyResponse {
        direction: CopyDirection::Out,
        format: 0,
        column_formats: vec![0, 0],
    };
    assert_eq!(decode_copy_response(&backend(&out)), Ok(expect));
    assert!(matches!(pg(&out), Message::CopyOutResponse(_)));
    let inn = msg(b'G', &[1, 0, 1, 0, 1]);
    assert_eq!(
        decode_copy_response(&backend(&inn)).map(|c| (c.direction, c.format)),
        Ok((CopyDirection::In, 1))
    );
    assert!(matches!(pg(&inn), Message::CopyInResponse(_)));
    let both = msg(b'W', &[0, 0, 0]);
    assert_eq!(
        decode_copy_response(&backend(&both)).map(|c| c.direction),
        Ok(CopyDirection::Both)
    );
    assert!(matches!(
        decode_copy_response(&msg(b'H', &[2, 0, 0])),
        Err(WireError::InvalidField { .. })
    ));
    assert!(matches!(
        decode_copy_response(&msg(b'H', &[0, 0, 2, 0, 0])),
        Err(WireError::Truncated { .. })
    ));

    let notify = msg(b'A', b"\0\0\x01\x00jobs\0{\"id\":1}\0");
    let raw = backend(&notify);
    let n = decode_notification(&raw).expect("decode");
    assert_eq!((n.pid, n.channel, n.payload), (256, "jobs", "{\"id\":1}"));
    let Message::NotificationResponse(body) = pg(&notify) else {
        panic!()
    };
    assert_eq!(body.channel().expect("utf8"), "jobs");

    let desc = msg(b't', &[0, 2, 0, 0, 0, 23, 0, 0, 0, 25]);
    assert_eq!(
        decode_parameter_description(&backend(&desc)),
        Ok(vec![23, 25])
    );
    assert!(matches!(pg(&desc), Message::ParameterDescription(_)));
}

#[test]
fn real_server_error_fields() {
    // As PostgreSQL 15 sends it for `DROP TABLE nope`.
    let body = b"SERROR\0VERROR\0C42P01\0Mtable \"nope\" does not exist\0Ftablecmds.c\0L1300\0RDropErrorMsgNonExistent\0\0";
    let e = decode_error_notice(&backend(&msg(b'E', body))).expect("decode");
    assert_eq!(
        (e.code(), e.message()),
        (Some("42P01"), Some("table \"nope\" does not exist"))
    );
    assert_eq!(e.get(b'R'), Some("DropErrorMsgNonExistent"));
    // Latin-1 text from a server in another client_encoding decodes lossily.
    let e = decode_error_notice(&msg(b'N', b"SNOTICE\0Mcaf\xe9\0\0")).expect("decode");
    assert_eq!(e.message(), Some("caf\u{fffd}"));
    assert!(matches!(
        decode_error_notice(&msg(b'E', b"SERROR\0")),
        Err(WireError::Truncated { .. })
    ));
    assert!(matches!(
        decode_error_notice(&msg(b'E', b"SERROR")),
        Err(WireError::MissingNul { .. })
    ));
}

#[test]
fn backend_framing_errors() {
    assert_eq!(backend_err(b"Q\0\0\0\x04"), WireError::UnknownMessage(b'Q'));
    assert_eq!(backend_err(b"\x16"), WireError::UnknownMessage(0x16));
    let e = backend_err(b"Z\0\0\0\x06II");
    assert_eq!(
        e.to_string(),
        "invalid ReadyForQuery message length 6 (must be exactly 5)"
    );
    assert!(matches!(
        backend_err(b"K\0\0\0\x10"),
        WireError::BadLength { len: 16, .. }
    ));
    assert!(matches!(
        backend_err(b"D\0\0\0\x02"),
        WireError::BadLength { len: 2, .. }
    ));
    assert!(matches!(
        backend_err(b"D\xff\xff\xff\xff"),
        WireError::BadLength { len: -1, .. }
    ));
    let e = backend_err(b"D\x7f\xff\xff\xff");
    assert_eq!(
        e.to_string(),
        "DataRow message length 2147483647 exceeds the 67108864-byte limit"
    );
}

#[test]
fn backend_decoding_errors() {
    let rfq = build(|b| encode_ready_for_query(TransactionStatus::Idle, b));
    assert_eq!(
        decode_row_description(&rfq),
        Err(WireError::UnexpectedMessage {
            expected: "RowDescription message",
            got: b'Z'
        })
    );
    assert!(matches!(
        data_row_values(&[]),
        Err(WireError::Truncated { .. })
    ));
    assert!(matches!(
        decode_ready_for_query(&msg(b'Z', b"X")),
        Err(WireError::InvalidField { value: 88, .. })
    ));
    // A length field that disagrees with the slice.
    assert!(matches!(
        data_row_values(b"D\0\0\0\x09\0\0"),
        Err(WireError::BadLength { len: 9, .. })
    ));
    assert!(matches!(
        data_row_values(&msg(b'D', b"\0\x01\0\0\0\x05ab")),
        Err(WireError::Truncated { .. })
    ));
    assert!(matches!(
        data_row_values(&msg(b'D', b"\0\x01\xff\xff\xff\xfe")),
        Err(WireError::InvalidField { value: -2, .. })
    ));
    assert!(matches!(
        data_row_values(&msg(b'D', b"\xff\xff")),
        Err(WireError::InvalidField { value: -1, .. })
    ));
    assert!(matches!(
        data_row_values(&msg(b'D', b"\0\0z")),
        Err(WireError::TrailingBytes { extra: 1, .. })
    ));
    assert!(matches!(
        decode_row_description(&msg(b'T', b"\0\x01id\0\0\0")),
        Err(WireError::Truncated { .. })
    ));
    assert!(matches!(
        decode_row_description(&msg(b'T', b"\0\x01id")),
        Err(WireError::MissingNul { .. })
    ));
    assert!(matches!(
        decode_parameter_status(&msg(b'S', b"a\0\xff\0")),
        Err(WireError::InvalidUtf8 { .. })
    ));
}

#[test]
fn backend_result_stream() {
    let mut bytes = build(|b| encode_row_description(&[field("email", 25)], b).expect("encode"));
    for i in 0..1000 {
        let v = format!("user{i}@example.com");
        bytes.extend(build(|b| {
            encode_data_row(&[Some(v.as_bytes())], b).expect("encode")
        }));
    }
    bytes.extend(build(|b| {
        encode_command_complete("SELECT 1000", b).expect("encode")
    }));
    bytes.extend(build(|b| {
        encode_ready_for_query(TransactionStatus::Idle, b)
    }));
    let cut = bytes.len() - 3;
    let mut buf = BytesMut::from(&bytes[..cut]);
    let mut tags = Vec::new();
    while let Some((tag, raw)) = parse_backend(&mut buf).expect("valid") {
        if tag == b'D' {
            let v = data_row_values(&raw).expect("row");
            assert!(v[0].expect("not null").ends_with(b"@example.com"));
        }
        tags.push(tag);
    }
    assert_eq!(tags.len(), 1002);
    assert_eq!((tags[0], tags[1001]), (b'T', b'C'));
    buf.extend_from_slice(&bytes[cut..]);
    assert_eq!(
        parse_backend(&mut buf).expect("valid").map(|m| m.0),
        Some(b'Z')
    );
    assert!(buf.is_empty());
}

#[test]
fn error_mapping_is_total() {
    let errors = [
        WireError::MissingUser,
        WireError::DirectTls,
        WireError::InvalidUtf8 {
            what: "Query message",
        },
        WireError::UnknownMessage(0),
        WireError::TooMany {
            what: "DataRow message",
            count: 1,
            limit: 0,
        },
    ];
    let states: Vec<&str> = errors.iter().map(WireError::sqlstate).collect();
    assert_eq!(states, ["28000", "0A000", "22021", "08P01", "54000"]);
    assert!(errors
        .iter()
        .all(|e| e.sqlstate().len() == 5 && !e.label().is_empty()));
}

// ---------------------------------------------------------------------------------------------
// Fuzz-like: random and mutated inputs never panic, and the buffer contract holds

struct XorShift(u64);

impl XorShift {
    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// The checks the fuzz target runs, plus the buffer contract: `Ok(Some)` consumes exactly the
/// returned frame, `Ok(None)` and `Err` consume nothing.
fn exercise(data: &[u8]) {
    let mut buf = BytesMut::from(data);
    loop {
        let before = buf.clone();
        match parse_startup(&mut buf) {
            Ok(Some(_)) => assert!(buf.len() + 8 <= before.len()),
            Ok(None) | Err(_) => {
                assert_eq!(buf, before);
                break;
            }
        }
    }
    let mut buf = BytesMut::from(data);
    loop {
        let before = buf.clone();
        match parse_frontend(&mut buf) {
            Ok(Some((m, raw))) => {
                assert_eq!(&before[..raw.len()], &raw[..]);
                assert_eq!(&before[raw.len()..], &buf[..]);
                if let Frontend::Bind { raw, .. } = &m {
                    decode_bind(raw).expect("parse_frontend validated the Bind");
                }
                if let Frontend::FunctionCall(body) = &m {
                    decode_function_call(body).expect("parse_frontend validated the FunctionCall");
                }
            }
            Ok(None) | Err(_) => {
                assert_eq!(buf, before);
                break;
            }
        }
    }
    let mut buf = BytesMut::from(data);
    loop {
        let before = buf.clone();
        match parse_backend(&mut buf) {
            Ok(Some((_, raw))) => {
                assert_eq!(&before[raw.len()..], &buf[..]);
                decode_all(&raw);
            }
            Ok(None) | Err(_) => {
                assert_eq!(buf, before);
                break;
            }
        }
    }
    // The decoders must also survive slices that were never framed.
    decode_all(data);
}

fn decode_all(raw: &[u8]) {
    let _ = decode_row_description(raw);
    if let Ok(values) = data_row_values(raw) {
        let mut again = BytesMut::new();
        encode_data_row(&values, &mut again).expect("a decoded row re-encodes");
        assert_eq!(&again[..], raw);
    }
    let _ = decode_command_complete(raw).map(command_rows);
    let _ = decode_error_notice(raw);
    let _ = decode_ready_for_query(raw);
    let _ = decode_backend_key_data(raw);
    let _ = decode_parameter_status(raw);
    let _ = decode_authentication(raw);
    let _ = decode_copy_response(raw);
    let _ = decode_notification(raw);
    let _ = decode_parameter_description(raw);
}

#[test]
fn random_bytes_never_panic() {
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let tags = b"QPBDESHCdcfXpFRTDZKSENAGHWt123nIsv";
    for _ in 0..100_000 {
        let len = rng.below(80);
        let mut data: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
        // Bias towards plausible headers: a known tag and a small length.
        if len >= 5 && rng.below(2) == 0 {
            data[0] = tags[rng.below(tags.len())];
            data[1..5].copy_from_slice(&(rng.below(len + 2) as i32).to_be_bytes());
        }
        exercise(&data);
    }
}

#[test]
fn mutated_seeds_never_panic() {
    let seeds = seeds();
    let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
    for (_, seed) in &seeds {
        exercise(seed);
    }
    for _ in 0..100_000 {
        let mut data = seeds[rng.below(seeds.len())].1.clone();
        for _ in 0..1 + rng.below(4) {
            if data.is_empty() {
                break;
            }
            let at = rng.below(data.len());
            match rng.below(4) {
                0 => data[at] ^= 1 << rng.below(8),
                1 => data[at] = rng.next_u64() as u8,
                2 => data.truncate(at),
                _ => {
                    let other = &seeds[rng.below(seeds.len())].1;
                    data.extend_from_slice(&other[..rng.below(other.len() + 1)]);
                }
            }
        }
        exercise(&data);
    }
}

// ---------------------------------------------------------------------------------------------
// Fuzz corpus seeds

fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let q = |s: &str| build(|b| pgf::query(s, b).expect("encode"));
    let startup =
        |params: &[(&str, &str)]| build(|b| encode_startup_message(params, b).expect("encode"));
    let mut extended = Vec::new();
    extended.extend(build(|b| {
        pgf::parse("", "SELECT email FROM customers WHERE id = $1", [23], b).expect("encode")
    }));
    extended.extend(bind_msg("", "", &[1], &[Some(&[0, 0, 0, 7])], &[0]));
    extended.extend(build(|b| pgf::describe(b'P', "", b).expect("encode")));
    extended.extend(build(|b| pgf::execute("", 0, b).expect("encode")));
    extended.extend(build(pgf::sync));
    let mut pipelined = extended.clone();
    pipelined.extend(build(|b| pgf::close(b'S', "s1", b).expect("encode")));
    pipelined.extend(build(pgf::flush));
    pipelined.extend(extended.clone());
    let mut copy_in = build(|b| {
        pgf::CopyData::new(&b"1\ta@example.com\n"[..])
            .expect("copy")
            .write(b)
    });
    copy_in.extend(build(|b| {
        pgf::CopyData::new(&b"2\tb@example.com\n"[..])
            .expect("copy")
            .write(b)
    }));
    copy_in.extend(build(pgf::copy_done));
    let mut fcall = 2619u32.to_be_bytes().to_vec();
    fcall.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 1, b'x', 0, 0]);

    let mut select = build(|b| {
        encode_row_description(&[field("id", 23), field("email", 25)], b).expect("encode")
    });
    select.extend(build(|b| {
        encode_data_row(&[Some(&b"1"[..]), Some(b"a@example.com")], b).expect("encode")
    }));
    select.extend(build(|b| {
        encode_data_row(&[Some(&b"2"[..]), None], b).expect("encode")
    }));
    select.extend(build(|b| {
        encode_command_complete("SELECT 2", b).expect("encode")
    }));
    select.extend(build(|b| {
        encode_ready_for_query(TransactionStatus::Idle, b)
    }));
    let mut login = msg(b'R', b"\0\0\0\x0aSCRAM-SHA-256\0\0");
    login.extend(msg(b'R', b"\0\0\0\x0br=abc,s=c2FsdA==,i=4096"));
    login.extend(msg(b'R', b"\0\0\0\x0cv=sig"));
    login.extend(build(encode_authentication_ok));
    login.extend(build(|b| {
        encode_parameter_status("server_version", "15.4", b).expect("encode")
    }));
    login.extend(build(|b| {
        encode_backend_key_data(BackendKeyData { pid: 7, secret: 9 }, b)
    }));
    login.extend(build(|b| {
        encode_ready_for_query(TransactionStatus::Idle, b)
    }));
    let mut errors = build(|b| {
        encode_error_response(&ErrorReport::error("42501", "denied").with_hint("ask"), b)
    });
    errors.extend(build(|b| {
        encode_notice_response(&ErrorReport::error("00000", "note"), b)
    }));
    errors.extend(build(|b| {
        encode_ready_for_query(TransactionStatus::Failed, b)
    }));
    let mut copy_out = msg(b'H', &[0, 0, 2, 0, 0, 0, 0]);
    copy_out.extend(build(|b| {
        encode_copy_data(b"1\ta@example.com\n", b).expect("encode")
    }));
    copy_out.extend(msg(b'c', b""));
    copy_out.extend(build(|b| {
        encode_command_complete("COPY 1", b).expect("encode")
    }));
    let mut ext_replies = Vec::new();
    for f in [
        encode_parse_complete,
        encode_bind_complete,
        encode_no_data,
        encode_close_complete,
        encode_empty_query_response,
    ] {
        ext_replies.extend(build(f));
    }
    ext_replies.extend(msg(b't', &[0, 1, 0, 0, 0, 23]));
    ext_replies.extend(msg(b's', b""));
    ext_replies.extend(msg(b'A', b"\0\0\0\x01jobs\0go\0"));

    vec![
        (
            "startup_psql",
            startup(&[
                ("user", "ci"),
                ("database", "orders"),
                ("application_name", "psql"),
                ("client_encoding", "UTF8"),
            ]),
        ),
        (
            "startup_v3_2_pq_option",
            packet(&startup_body(
                0x0003_0002,
                &[("user", "ci"), ("_pq_.x", "1")],
            )),
        ),
        ("ssl_request", build(pgf::ssl_request)),
        ("gssenc_request", packet(&GSSENC_REQUEST_CODE.to_be_bytes())),
        (
            "cancel_request",
            build(|b| pgf::cancel_request(4242, 99, b)),
        ),
        ("query_select", q("SELECT id, email FROM customers")),
        ("query_multi", q("SELECT 1; DROP TABLE users; -- x")),
        ("extended_pipeline", extended),
        ("extended_pipelined_twice", pipelined),
        ("copy_in", copy_in),
        (
            "copy_fail",
            build(|b| pgf::copy_fail("abort", b).expect("encode")),
        ),
        (
            "password",
            build(|b| pgf::password_message(b"hunter2", b).expect("encode")),
        ),
        (
            "sasl_initial",
            build(|b| {
                pgf::sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=abc", b).expect("encode")
            }),
        ),
        ("function_call", msg(b'F', &fcall)),
        ("terminate", build(pgf::terminate)),
        ("backend_select", select),
        ("backend_login", login),
        ("backend_errors", errors),
        ("backend_copy_out", copy_out),
        ("backend_extended_replies", ext_replies),
        ("oversized_length", b"Q\x7f\xff\xff\xffSELECT".to_vec()),
        ("garbage_tag", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
    ]
}

// ---------------------------------------------------------------------------------------------
// Large messages

/// Feeds a Bind body to a [`BindScan`] in the given pieces.
fn scan_bind(body: &[u8], cuts: &[usize]) -> Result<BindHead, WireError> {
    let mut scan = BindScan::default();
    let mut at = 0;
    for &c in cuts.iter().chain(std::iter::once(&body.len())) {
        let c = c.clamp(at, body.len());
        scan.feed(&body[at..c])?;
        at = c;
    }
    scan.finish()
}

#[test]
fn bind_scan_reads_what_decode_bind_reads_at_every_split() {
    let big = vec![7u8; 3000];
    let values: Vec<Option<&[u8]>> = vec![Some(b"abc"), None, Some(b""), Some(&big)];
    let binds = [
        bind_msg("p1", "s1", &[1, 0, 0, 1], &values, &[1, 0]),
        bind_msg("", "", &[], &[], &[]),
        bind_msg("portal", "", &[1], &[Some(b"\x00ff")], &[]),
        bind_msg("", "st", &[], &[None], &[1]),
    ];
    for m in &binds {
        let mut buf = BytesMut::from(&m[..]);
        let Some((
            Frontend::Bind {
                portal,
                statement,
                raw,
            },
            _,
        )) = parse_frontend(&mut buf).expect("valid")
        else {
            panic!("not a Bind");
        };
        let want = BindHead {
            portal,
            statement: statement.to_string(),
            result_formats: decode_bind(&raw).expect("valid").result_formats,
        };
        let body = &m[5..];
        assert_eq!(scan_bind(body, &[]), Ok(want.clone()));
        for cut in 0..=body.len() {
            assert_eq!(scan_bind(body, &[cut]), Ok(want.clone()), "cut at {cut}");
        }
        let bytewise: Vec<usize> = (0..body.len()).collect();
        assert_eq!(scan_bind(body, &bytewise), Ok(want));
    }
}

#[test]
fn bind_scan_refuses_what_parse_frontend_refuses() {
    let ok = bind_msg("p", "s", &[1], &[Some(b"xy")], &[0]);
    let body = ok[5..].to_vec();
    let mut cases: Vec<Vec<u8>> = vec![
        // Cut short anywhere.
        body[..body.len() - 1].to_vec(),
        body[..3].to_vec(),
        // A byte too many.
        [&body[..], b"\0"].concat(),
        // No NUL after the names.
        b"p".to_vec(),
    ];
    // A format code 2.
    let mut bad = body.clone();
    bad[6] = 2;
    cases.push(bad);
    // A value length of -2.
    cases.push(
        [
            &b"p\0s\0\0\0\0\x01"[..],
            &(-2i32).to_be_bytes(),
            &b"\0\0"[..],
        ]
        .concat(),
    );
    // Two format codes for one value.
    cases.push(b"\0\0\0\x02\0\0\0\0\0\x01\0\0\0\0\0\0".to_vec());
    // A name that is not UTF-8.
    cases.push(b"\xff\0\0\0\0\0\0\0\0".to_vec());
    for body in cases {
        let whole = parse_frontend(&mut BytesMut::from(&msg(b'B', &body)[..]));
        assert!(whole.is_err(), "{body:?} is refused whole");
        for cut in 0..=body.len() {
            assert!(scan_bind(&body, &[cut]).is_err(), "{body:?} cut at {cut}");
        }
    }
    // A name over the cap is refused before it is all in.
    let mut scan = BindScan::default();
    assert!(matches!(
        scan.feed(&vec![b'a'; 20_000]),
        Err(WireError::TooLong { .. })
    ));
}

fn header(tag: u8, len: usize) -> Vec<u8> {
    [&[tag][..], &(len as u32).to_be_bytes()].concat()
}

#[test]
fn large_messages_are_told_apart_by_type_and_length() {
    // Bind and CopyData above STREAM_FROM are streamed, whatever their length up to PG's.
    for tag in [b'B', b'd'] {
        // The length field does not count the tag byte.
        assert_eq!(large_frontend(&header(tag, STREAM_FROM - 1)), Ok(None));
        assert_eq!(
            large_frontend(&header(tag, STREAM_FROM)),
            Ok(Some(Large {
                tag,
                total: STREAM_FROM + 1
            }))
        );
        assert!(large_frontend(&header(tag, PG_MAX_MESSAGE_LEN)).is_ok_and(|l| l.is_some()));
    }
    // SQL text and fast-path calls are held up to MAX_MESSAGE_LEN, refused beyond.
    for tag in [b'Q', b'P', b'F'] {
        assert_eq!(large_frontend(&header(tag, STREAM_FROM * 8)), Ok(None));
        assert_eq!(large_frontend(&header(tag, MAX_MESSAGE_LEN)), Ok(None));
        assert!(large_frontend(&header(tag, MAX_MESSAGE_LEN + 1)).is_ok_and(|l| l.is_some()));
    }
    // Above PostgreSQL's own limit: PostgreSQL's own message and SQLSTATE.
    let e = large_frontend(&header(b'B', PG_MAX_MESSAGE_LEN + 1)).expect_err("over PG's limit");
    assert_eq!(e.to_string(), "invalid message length");
    assert_eq!(e.sqlstate(), "08P01");
    // Other types, short headers, negative lengths: parse_frontend's business.
    assert_eq!(large_frontend(&header(b'S', 1 << 30)), Ok(None));
    assert_eq!(large_frontend(b"B\x00\x10"), Ok(None));
    assert_eq!(large_frontend(&header(b'B', u32::MAX as usize)), Ok(None));
    // Server side: rows, COPY data and function results.
    for tag in [b'D', b'd', b'V'] {
        assert_eq!(large_backend(&header(tag, STREAM_FROM - 1)), None);
        assert_eq!(
            large_backend(&header(tag, i32::MAX as usize)),
            Some(Large {
                tag,
                total: i32::MAX as usize + 1
            })
        );
    }
    assert_eq!(large_backend(&header(b'E', 1 << 30)), None);
    assert_eq!(large_backend(&header(b'D', u32::MAX as usize)), None);
}

/// Writes the seeds to `agent/fuzz/corpus/pg_frame/`. Run after changing them:
/// `cargo test -p tollgate --lib pg::wire::tests::write_fuzz_corpus -- --ignored`.
#[test]
#[ignore = "writes files into the source tree"]
fn write_fuzz_corpus() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/pg_frame");
    std::fs::create_dir_all(&dir).expect("mkdir");
    for (name, bytes) in seeds() {
        std::fs::write(dir.join(name), bytes).expect("write seed");
    }
}

#[test]
fn data_row_ranges_read_what_data_row_values_read_and_refuse_the_same() {
    let rows: Vec<Vec<Option<&[u8]>>> = vec![
        vec![],
        vec![None],
        vec![Some(b"")],
        vec![Some(b"12345"), None, Some(b"x"), Some(&[0xff; 300])],
    ];
    // A reused buffer holding an earlier row's ranges.
    let mut ranges = vec![Some(0..3), None, Some(1..2), Some(4..9), None];
    for values in rows {
        let mut raw = BytesMut::new();
        encode_data_row(&values, &mut raw).expect("encode");
        let raw = raw.to_vec();
        data_row_ranges(&raw, &mut ranges).expect("ranges");
        let got: Vec<Option<&[u8]>> = ranges.iter().map(|r| r.clone().map(|r| &raw[r])).collect();
        assert_eq!(got, values);
        // Every cut and every extra byte is refused by both.
        for cut in 0..raw.len() {
            let mut short = raw[..cut].to_vec();
            if short.len() >= 5 {
                short[1..5].copy_from_slice(&((cut - 1) as u32).to_be_bytes());
            }
            assert_eq!(
                data_row_ranges(&short, &mut ranges).is_err(),
                data_row_values(&short).is_err(),
                "{short:?}"
            );
            if cut > 6 {
                assert!(data_row_ranges(&short, &mut ranges).is_err(), "{short:?}");
            }
        }
        let mut long = raw.clone();
        long.push(0);
        let len = (long.len() - 1) as u32;
        long[1..5].copy_from_slice(&len.to_be_bytes());
        assert!(data_row_ranges(&long, &mut ranges).is_err());
        assert!(data_row_values(&long).is_err());
    }
}

#[test]
fn bind_result_formats_are_decode_binds() {
    for (formats, values, results) in [
        (&[][..], &[][..], &[][..]),
        (&[1][..], &[Some(&b"xy"[..]), None][..], &[0, 1][..]),
        (
            &[0, 1][..],
            &[Some(&b""[..]), Some(&b"\x01"[..])][..],
            &[1][..],
        ),
    ] {
        let m = bind_msg("", "s1", formats, values, results);
        let raw = &m[5 + 4..];
        assert_eq!(bind_result_formats(raw), Ok(results.to_vec()));
        assert_eq!(
            decode_bind(raw).map(|b| b.result_formats),
            Ok(results.to_vec())
        );
    }
    // All text is no codes; anything else comes back as sent.
    for (results, want) in [
        (&[0][..], &[][..]),
        (&[0, 0, 0][..], &[][..]),
        (&[0, 1][..], &[0, 1][..]),
        (&[0, 0, 1, 0][..], &[0, 0, 1, 0][..]),
        (&[1, 0][..], &[1, 0][..]),
    ] {
        let m = bind_msg("", "", &[], &[], results);
        let raw = &m[5 + 2..];
        assert_eq!(bind_result_formats(raw), Ok(want.to_vec()), "{results:?}");
        assert_eq!(
            decode_bind(raw).map(|b| b.result_formats),
            Ok(results.to_vec())
        );
        // A code that is not 0 or 1 is refused, wherever it is.
        let mut bad = raw.to_vec();
        let at = bad.len() - 2 * results.len();
        bad[at + 1] = 2;
        assert!(bind_result_formats(&bad).is_err(), "{results:?}");
    }
}
