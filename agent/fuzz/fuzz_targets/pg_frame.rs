//! Fuzzes PostgreSQL message framing: the same bytes are read as a client's startup packets, as
//! client messages, and as server messages, and every server frame goes through every decoder.
//! Beyond "no panic", it asserts the buffer contract the proxy relies on: `Ok(Some)` consumes
//! exactly the returned frame, while `Ok(None)` and `Err` consume nothing.
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
                        assert!(
                            wire::decode_bind(raw).is_ok(),
                            "parse_frontend validated the Bind"
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

fn decode_all(raw: &[u8]) {
    let _ = wire::decode_row_description(raw);
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
