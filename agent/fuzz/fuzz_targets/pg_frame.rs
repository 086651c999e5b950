//! Fuzzes PostgreSQL message framing: the same bytes are read as a client's startup packets, as
//! client messages, and as server messages, and every server frame goes through every decoder.
//! Beyond "no panic", it asserts the buffer contract the proxy relies on: `Ok(Some)` consumes
//! exactly the returned frame, while `Ok(None)` and `Err` consume nothing.
//!
//! The streaming path is covered too: the bytes are read as the headers of large messages
//! (`large_frontend`, `large_backend`), and as a Bind body fed to `BindScan` in three pieces
//! cut where the input says, which must accept exactly what `parse_frontend` accepts whole,
//! with the same names and result formats.
//!
//! Seeds: `agent/fuzz/corpus/pg_frame/` (regenerate with
//! `cargo test -p tollgate --lib pg::wire::tests::write_fuzz_corpus -- --ignored`).
//! Run: `cargo +nightly fuzz run pg_frame fuzz/corpus/pg_frame` from `agent/`.
#![no_main]

use tollgate::pg::wire::{self, BytesMut, Frontend};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    startup(data);
    frontend(data);
    backend(data);
    streamed(data);
    // The decoders must also survive slices that were never framed.
    decode_all(data);
});

fn startup(data: &[u8]) {
    let mut buf = BytesMut::from(data);
    loop {
        let before = buf.clone();
        match wire::parse_startup(&mut buf) {
            Ok(Some(_)) => assert!(
                buf.len() + 8 <= before.len(),
                "a startup packet is 8+ bytes"
            ),
            Ok(None) | Err(_) => {
                assert_eq!(buf, before, "incomplete or bad input must not be consumed");
                return;
            }
        }
    }
}

fn frontend(data: &[u8]) {
    let mut buf = BytesMut::from(data);
    loop {
        let before = buf.clone();
        match wire::parse_frontend(&mut buf) {
            Ok(Some((msg, raw))) => {
                assert_eq!(&before[..raw.len()], &raw[..], "raw is the exact message");
                assert_eq!(
                    &before[raw.len()..],
                    &buf[..],
                    "only the message is consumed"
                );
                match &msg {
                    Frontend::Bind { raw, .. } => {
                        let bind = wire::decode_bind(raw);
                        assert!(bind.is_ok(), "parse_frontend validated the Bind");
                        // The same codes, except that all text (every code 0) is none.
                        let mut want = bind.ok().map(|b| b.result_formats);
                        if let Some(w) = want.as_mut().filter(|w| w.iter().all(|&f| f == 0)) {
                            w.clear();
                        }
                        assert_eq!(
                            wire::bind_result_formats(raw).ok(),
                            want,
                            "the data path's result formats are decode_bind's"
                        );
                    }
                    Frontend::FunctionCall(body) => {
                        assert!(
                            wire::decode_function_call(body).is_ok(),
                            "parse_frontend validated the call"
                        );
                    }
                    _ => {}
                }
            }
            Ok(None) | Err(_) => {
                assert_eq!(buf, before, "incomplete or bad input must not be consumed");
                return;
            }
        }
    }
}

fn backend(data: &[u8]) {
    let mut buf = BytesMut::from(data);
    loop {
        let before = buf.clone();
        match wire::parse_backend(&mut buf) {
            Ok(Some((tag, raw))) => {
                assert_eq!(raw.first(), Some(&tag));
                assert_eq!(
                    &before[raw.len()..],
                    &buf[..],
                    "only the message is consumed"
                );
                decode_all(&raw);
            }
            Ok(None) | Err(_) => {
                assert_eq!(buf, before, "incomplete or bad input must not be consumed");
                return;
            }
        }
    }
}

/// A Bind body read whole and streamed must come to the same answer.
fn streamed(data: &[u8]) {
    let _ = wire::large_frontend(data);
    let _ = wire::large_backend(data);
    // The first two bytes choose where the body is cut; the rest is the body.
    let (cuts, body) = data.split_at(data.len().min(2));
    if body.len() > wire::MAX_SMALL_MESSAGE_LEN {
        return; // BindScan caps names, parse_frontend does not.
    }
    let mut msg = vec![b'B'];
    msg.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    msg.extend_from_slice(body);
    let whole = wire::parse_frontend(&mut BytesMut::from(&msg[..]));
    let a = usize::from(cuts.first().copied().unwrap_or(0)) % (body.len() + 1);
    let b = a + usize::from(cuts.get(1).copied().unwrap_or(0)) % (body.len() - a + 1);
    let mut scan = wire::BindScan::default();
    let scanned = scan
        .feed(&body[..a])
        .and_then(|()| scan.feed(&body[a..b]))
        .and_then(|()| scan.feed(&body[b..]))
        .and_then(|()| scan.finish());
    match (whole, scanned) {
        (
            Ok(Some((
                Frontend::Bind {
                    portal,
                    statement,
                    raw,
                },
                _,
            ))),
            Ok(head),
        ) => {
            assert_eq!((portal, statement.to_string()), (head.portal, head.statement));
            let formats = wire::decode_bind(&raw).expect("validated").result_formats;
            assert_eq!(formats, head.result_formats);
        }
        (Err(_), Err(_)) => {}
        (w, s) => panic!("whole {w:?} but streamed {s:?}"),
    }
}

fn decode_all(raw: &[u8]) {
    let _ = wire::decode_row_description(raw);
    // The data path reads rows as ranges into a reused buffer: exactly the values, or the
    // same refusal.
    let mut ranges = vec![Some(0..1)];
    let as_ranges = wire::data_row_ranges(raw, &mut ranges)
        .map(|()| ranges.iter().map(|r| r.clone().map(|r| &raw[r])).collect::<Vec<_>>());
    assert_eq!(as_ranges, wire::data_row_values(raw));
    if let Ok(values) = wire::data_row_values(raw) {
        // Masking re-encodes rows: a decoded row must re-encode to the same bytes.
        let mut again = BytesMut::new();
        assert!(wire::encode_data_row(&values, &mut again).is_ok());
        assert_eq!(&again[..], raw);
    }
    let _ = wire::decode_command_complete(raw).map(wire::command_rows);
    let _ = wire::decode_error_notice(raw);
    let _ = wire::decode_ready_for_query(raw);
    let _ = wire::decode_backend_key_data(raw);
    let _ = wire::decode_parameter_status(raw);
    let _ = wire::decode_authentication(raw);
    let _ = wire::decode_copy_response(raw);
    let _ = wire::decode_notification(raw);
    let _ = wire::decode_parameter_description(raw);
}
