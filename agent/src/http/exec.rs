//! Recording `kubectl exec` / `attach`: the relayed WebSocket is read as it passes (the bytes
//! are relayed unchanged), its Kubernetes channel messages (`v4`/`v5.channel.k8s.io`: one
//! channel byte before each message) give the output (channels 1 and 2, masked with the SSH
//! detectors) and resizes (channel 4, `{"Width":W,"Height":H}` from the bot). With a terminal
//! (`-t`) they are written as asciicast v2 beside the session's JSON-lines recording (`Cast`,
//! shared with the SSH handler); without one, stdout and stderr are `output` events of that
//! recording, which `tollgate replay` prints. Input (channel 0) is not recorded, as for SSH.
//!
//! Frames are parsed as they pass; one data frame's payload is held (unmasked) until it is
//! complete, so the detectors see each message whole. A frame longer than [`MAX_FRAME`] stops
//! the recording of that direction (the relay goes on, and the recording says so).

use std::sync::Arc;

pub use crate::ssh::terminal::Terminal;

/// Longest frame payload the tap follows (kubectl and the kubelet send at most 32 KiB per
/// message).
pub const MAX_FRAME: u64 = 1 << 20;

/// One whole channel message: output (channels 1 and 2 from the server) is recorded; a resize
/// (channel 4 from the bot, `{"Width":W,"Height":H}`) sizes the terminal.
fn message(terminal: &Terminal, from_bot: bool, channel: u8, data: &[u8]) {
    match (from_bot, channel) {
        (false, 1 | 2) if !data.is_empty() => terminal.output(channel, data),
        (true, 4) if terminal.is_cast() => {
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) else {
                return;
            };
            let (Some(w), Some(h)) = (v["Width"].as_u64(), v["Height"].as_u64()) else {
                return;
            };
            terminal.resize(w.min(10_000) as u32, h.min(10_000) as u32);
        }
        _ => {}
    }
}

/// A streaming reader of one direction's WebSocket frames.
pub struct Tap {
    terminal: Arc<Terminal>,
    from_bot: bool,
    header: Vec<u8>,
    /// Payload bytes left in the current frame.
    left: u64,
    /// Offset into the current payload (for the mask).
    at: u64,
    key: Option<[u8; 4]>,
    /// The current frame is a data frame (text, binary or continuation).
    data: bool,
    /// Channel of the current message (its first payload byte), once read.
    channel: Option<u8>,
    /// The current frame's first payload byte is the channel (not a continuation).
    leading: bool,
    broken: bool,
    scratch: Vec<u8>,
}

impl Tap {
    pub fn new(terminal: Arc<Terminal>, from_bot: bool) -> Tap {
        Tap {
            terminal,
            from_bot,
            header: Vec::with_capacity(14),
            left: 0,
            at: 0,
            key: None,
            data: false,
            channel: None,
            leading: false,
            broken: false,
            scratch: Vec::new(),
        }
    }

    /// The header's total length once enough of it is known, or `None` while too short.
    fn header_len(h: &[u8]) -> Option<usize> {
        if h.len() < 2 {
            return None;
        }
        let masked = if h[1] & 0x80 != 0 { 4 } else { 0 };
        Some(
            2 + masked
                + match h[1] & 0x7f {
                    126 => 2,
                    127 => 8,
                    _ => 0,
                },
        )
    }

    fn start_frame(&mut self) {
        let h = &self.header;
        let op = h[0] & 0x0f;
        let (len, rest) = match h[1] & 0x7f {
            126 => (u64::from(u16::from_be_bytes([h[2], h[3]])), &h[4..]),
            127 => {
                let mut b = [0u8; 8];
                b.copy_from_slice(&h[2..10]);
                (u64::from_be_bytes(b), &h[10..])
            }
            n => (u64::from(n), &h[2..]),
        };
        self.key = (h[1] & 0x80 != 0).then(|| [rest[0], rest[1], rest[2], rest[3]]);
        self.left = len;
        self.at = 0;
        self.data = matches!(op, 0..=2);
        self.leading = matches!(op, 1 | 2);
        if self.leading {
            self.channel = None;
        }
        if len > MAX_FRAME {
            self.broken = true;
            self.terminal
                .note("[tollgate: a message longer than 1 MiB; the recording stops here]");
        }
        self.header.clear();
    }

    /// Read `bytes` (the next bytes of this direction, as relayed).
    pub fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() && !self.broken {
            if self.left == 0 {
                // In a header (a frame with an empty payload is only a header).
                let need = Self::header_len(&self.header).unwrap_or(2);
                let take = (need - self.header.len()).min(bytes.len());
                self.header.extend_from_slice(&bytes[..take]);
                bytes = &bytes[take..];
                if Self::header_len(&self.header) == Some(self.header.len()) {
                    self.start_frame();
                }
                continue;
            }
            let take = (self.left.min(bytes.len() as u64)) as usize;
            let (chunk, rest) = bytes.split_at(take);
            bytes = rest;
            if self.data {
                let at = self.at;
                self.scratch
                    .extend(chunk.iter().enumerate().map(|(i, b)| match self.key {
                        Some(k) => b ^ k[((at + i as u64) % 4) as usize],
                        None => *b,
                    }));
            }
            self.left -= take as u64;
            self.at += take as u64;
            if self.left == 0 && self.data {
                // One whole frame (masking sees a message's text whole, as kubectl frames it).
                let mut skip = 0;
                if self.leading && !self.scratch.is_empty() {
                    self.channel = Some(self.scratch[0]);
                    skip = 1;
                }
                if let Some(ch) = self.channel {
                    message(&self.terminal, self.from_bot, ch, &self.scratch[skip..]);
                }
                self.scratch.clear();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        lock, mask::Masker, recording::Recorder, ssh::cast::Cast, ssh::terminal::MAX_LINES_OUTPUT,
    };
    use std::sync::Mutex;

    fn frame(op: u8, payload: &[u8], key: Option<[u8; 4]>) -> Vec<u8> {
        let mut f = vec![0x80 | op];
        let m = if key.is_some() { 0x80 } else { 0 };
        match payload.len() {
            n if n < 126 => f.push(m | n as u8),
            n if n < 65536 => {
                f.push(m | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(m | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        if let Some(k) = key {
            f.extend_from_slice(&k);
            f.extend(payload.iter().enumerate().map(|(i, b)| b ^ k[i % 4]));
        } else {
            f.extend_from_slice(payload);
        }
        f
    }

    #[test]
    fn output_and_resizes_are_read_across_any_split() {
        let data_dir = std::env::temp_dir().join(format!("tg-exec-tap-{}", std::process::id()));
        let made = Arc::new(Mutex::new(Vec::<std::path::PathBuf>::new()));
        let cleanup = data_dir.clone();
        let made2 = made.clone();
        let terminal = Arc::new(Terminal::new(
            Masker::with_detectors(
                crate::ssh::SSH_DETECTORS,
                tollgate_policy::MaskStyle::Full,
                [7; 32],
            ),
            Box::new(move |w, h| {
                let c = Cast::create(&data_dir, "s-1", 1, w, h, "xterm").ok()?;
                lock(&made2).push(data_dir.join("sessions").join(c.file_name()));
                Some(c)
            }),
        ));
        let mut up = Vec::new();
        up.extend(frame(
            2,
            b"\x04{\"Width\":80,\"Height\":24}",
            Some([1, 2, 3, 4]),
        ));
        up.extend(frame(2, b"\x00typed", Some([9, 8, 7, 6])));
        up.extend(frame(
            2,
            b"\x04{\"Width\":100,\"Height\":30}",
            Some([5, 5, 5, 5]),
        ));
        let mut down = Vec::new();
        down.extend(frame(2, b"\x01hello ", None));
        down.extend(frame(
            2,
            &[b"\x02".as_slice(), &vec![b'x'; 300]].concat(),
            None,
        ));
        down.extend(frame(2, b"\x01AKIAIOSFODNN7EXAMPLE world", None));
        let mut tap_up = Tap::new(terminal.clone(), true);
        let mut tap_down = Tap::new(terminal.clone(), false);
        // The resize first, then the output, one byte at a time and in odd pieces.
        for b in up.chunks(1).take(30) {
            tap_up.feed(b);
        }
        for piece in down.chunks(7) {
            tap_down.feed(piece);
        }
        for piece in up[30..].chunks(3) {
            tap_up.feed(piece);
        }
        // The exec ends: the taps and the terminal go, and the cast's held-back tail is written.
        drop((tap_up, tap_down, terminal));
        let path = lock(&made).first().cloned().expect("a cast");
        let text = std::fs::read_to_string(path).expect("cast");
        let mut lines = text.lines();
        let header: serde_json::Value =
            serde_json::from_str(lines.next().expect("header")).expect("json");
        assert_eq!(
            (header["width"].as_u64(), header["height"].as_u64()),
            (Some(80), Some(24))
        );
        let out: String = lines
            .clone()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|e| e[1] == "o")
            .filter_map(|e| e[2].as_str().map(str::to_string))
            .collect();
        assert!(out.starts_with("hello xxx"), "{out}");
        assert!(out.ends_with(" world"), "{out}");
        assert!(!out.contains("AKIAIOSFODNN7EXAMPLE"), "{out}");
        assert!(!text.contains("typed"), "input is not recorded: {text}");
        assert!(text.contains("\"r\",\"100x30\""), "{text}");
        assert_eq!(lock(&made).len(), 1);
        let _ = std::fs::remove_dir_all(cleanup);
    }

    /// A fresh data dir, the session's recorder, and an exec without a terminal recording
    /// into it with the SSH detectors.
    fn lines_terminal(
        tag: &str,
        session: &str,
    ) -> (std::path::PathBuf, Arc<Recorder>, Arc<Terminal>) {
        let dir = std::env::temp_dir().join(format!("tg-exec-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let health = Arc::new(crate::audit::Health::default());
        let recorder = Arc::new(Recorder::open(&dir, session, health).expect("open"));
        let terminal = Arc::new(Terminal::lines(
            Masker::with_detectors(
                crate::ssh::SSH_DETECTORS,
                tollgate_policy::MaskStyle::Full,
                [7; 32],
            ),
            recorder.clone(),
            None,
        ));
        (dir, recorder, terminal)
    }

    /// Without a terminal, stdout and stderr become `output` lines of the session recording,
    /// masked across frame boundaries, and `tollgate replay` prints them per stream.
    #[test]
    fn output_without_a_terminal_is_recorded_as_lines() {
        let (dir, recorder, terminal) = lines_terminal("lines", "s-2");
        let mut down = Vec::new();
        // The key is cut across two frames of stdout.
        down.extend(frame(2, b"\x01build ok AKIAIOSFOD", None));
        down.extend(frame(2, b"\x01NN7EXAMPLE\nsecond line\n", None));
        down.extend(frame(2, b"\x02warning: disk 91% full\n", None));
        down.extend(frame(2, b"\x01done", None));
        down.extend(frame(2, b"\x03{\"status\":\"Success\"}", None));
        let mut tap_up = Tap::new(terminal.clone(), true);
        tap_up.feed(&frame(2, b"\x00typed input", Some([1, 2, 3, 4])));
        let mut tap_down = Tap::new(terminal.clone(), false);
        for piece in down.chunks(5) {
            tap_down.feed(piece);
        }
        drop((tap_up, tap_down, terminal, recorder));
        let text =
            std::fs::read_to_string(crate::replay::recording_path(&dir, "s-2")).expect("recording");
        let events: Vec<serde_json::Value> = text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        let stream = |name: &str| -> String {
            events
                .iter()
                .filter(|e| e["event"] == "output" && e["stream"] == name)
                .filter_map(|e| e["text"].as_str())
                .collect::<Vec<_>>()
                .join("|")
        };
        assert_eq!(
            stream("stdout"),
            "build ok ********|second line|done",
            "{text}"
        );
        assert_eq!(stream("stderr"), "warning: disk 91% full", "{text}");
        assert!(
            !text.contains("typed") && !text.contains("Success"),
            "{text}"
        );
        let shown = crate::replay::replay(&dir, "s-2")
            .expect("replay")
            .join("\n");
        assert!(shown.contains("STDOUT build ok ********"), "{shown}");
        assert!(shown.contains("STDERR warning: disk 91% full"), "{shown}");
        assert!(!shown.contains("AKIAIOSFODNN7EXAMPLE"), "{shown}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A large output (`kubectl cp` streams a tar archive over an exec) is relayed, but only
    /// its first [`MAX_LINES_OUTPUT`] bytes are recorded, with a note saying so.
    #[test]
    fn lines_are_recorded_up_to_a_bound() {
        let (dir, recorder, terminal) = lines_terminal("bound", "s-3");
        let mut tap = Tap::new(terminal.clone(), false);
        let line = [b"\x01".as_slice(), &[b'y'; 1000], b"\n"].concat();
        for _ in 0..1000 {
            tap.feed(&frame(2, &line, None));
        }
        drop((tap, terminal, recorder));
        let text =
            std::fs::read_to_string(crate::replay::recording_path(&dir, "s-3")).expect("recording");
        assert!(
            text.len() > MAX_LINES_OUTPUT && text.len() < MAX_LINES_OUTPUT + (64 << 10),
            "{} bytes",
            text.len()
        );
        assert_eq!(text.matches("relayed but not recorded").count(), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
