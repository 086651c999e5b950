//! Recorded output of a command: a terminal as asciicast v2 ([`Cast`]), or stdout and stderr
//! of a command without one as `output` events of the session's JSON-lines recording, which
//! `tollgate replay` prints. Shared by SSH channels and `kubectl exec` (`http/exec.rs`), masked
//! with the SSH detectors across the chunks output arrives in ([`MaskedOutput`]).

use std::sync::{Arc, Mutex};

use serde_json::json;

use crate::{
    lock,
    mask::Masker,
    recording::Recorder,
    ssh::cast::{Cast, MaskedOutput},
};

/// One `output` event: `stream` is `stdout`, `stderr` or `tollgate` (a note of the agent's).
fn output_event(
    stream: &str,
    text: &str,
    ssh_channel: Option<u32>,
) -> serde_json::Map<String, serde_json::Value> {
    let mut e = crate::obj(json!({"event": "output", "stream": stream, "text": text}));
    if let Some(c) = ssh_channel {
        e.insert("ssh".into(), json!({ "channel": c }));
    }
    e
}

/// Longest line of output held for one `output` event; longer is written in pieces.
const MAX_LINE: usize = 16 << 10;

/// Output of one exec without a terminal recorded as lines; the rest is relayed only.
pub const MAX_LINES_OUTPUT: usize = 256 << 10;

/// Where an exec's output is recorded.
enum Sink {
    /// A terminal (`tty=true`): asciicast v2, created at the first resize or output by
    /// `create(width, height)` (which names it in the session recording).
    Cast {
        cast: Mutex<Option<Arc<Cast>>>,
        create: Box<dyn Fn(u32, u32) -> Option<Cast> + Send + Sync>,
    },
    /// No terminal: stdout and stderr as `output` events of the session's JSON-lines
    /// recording, one per line of output (`{"event":"output","stream":"stdout","text":...}`),
    /// masked as the cast is.
    Lines {
        recorder: Arc<Recorder>,
        out: MaskedOutput,
        /// Masked text of the line in progress (written at its newline, at a switch of
        /// streams, at the end, or past [`MAX_LINE`]).
        line: Mutex<String>,
        /// Output bytes still recorded ([`MAX_LINES_OUTPUT`] at first): `kubectl cp` and `scp`
        /// stream files over such an exec, which are relayed but not copied into the
        /// recording.
        left: Mutex<usize>,
        /// The SSH channel, named in each event (a session may run several at once).
        ssh_channel: Option<u32>,
    },
}

/// The recorded output of one exec or attach.
pub struct Terminal {
    sink: Sink,
    masker: Masker,
    /// The output channel (1 stdout, 2 stderr) of the last message: a switch ends a word for
    /// the detectors (what was held back of the other stream is written first).
    channel: Mutex<u8>,
}

impl Terminal {
    /// With a terminal: `create(width, height)` makes the cast file (and names it in the
    /// session recording).
    pub fn new(
        masker: Masker,
        create: Box<dyn Fn(u32, u32) -> Option<Cast> + Send + Sync>,
    ) -> Terminal {
        Terminal {
            sink: Sink::Cast {
                cast: Mutex::new(None),
                create,
            },
            masker,
            channel: Mutex::new(0),
        }
    }

    /// Without a terminal: stdout and stderr as lines of the session's recording (of SSH
    /// channel `ssh_channel`, if given).
    pub fn lines(masker: Masker, recorder: Arc<Recorder>, ssh_channel: Option<u32>) -> Terminal {
        Terminal {
            sink: Sink::Lines {
                recorder,
                out: MaskedOutput::default(),
                line: Mutex::new(String::new()),
                left: Mutex::new(MAX_LINES_OUTPUT),
                ssh_channel,
            },
            masker,
            channel: Mutex::new(0),
        }
    }

    fn cast(&self, width: u32, height: u32) -> Option<Arc<Cast>> {
        let Sink::Cast { cast, create } = &self.sink else {
            return None;
        };
        let mut c = lock(cast);
        if c.is_none() {
            *c = create(width, height).map(Arc::new);
        }
        c.clone()
    }

    /// Masked `text` of stream `channel` (1 stdout, 2 stderr): one `output` event per whole
    /// line; with `end`, what is left of the line too.
    fn write_lines(
        recorder: &Recorder,
        line: &Mutex<String>,
        ssh_channel: Option<u32>,
        channel: u8,
        text: &str,
        end: bool,
    ) {
        let stream = if channel == 2 { "stderr" } else { "stdout" };
        let write = |t: &str| recorder.write(output_event(stream, t, ssh_channel));
        let mut held = lock(line);
        held.push_str(text);
        while let Some(i) = held.find('\n') {
            let rest = held.split_off(i + 1);
            write(held.trim_end_matches(['\n', '\r']));
            *held = rest;
        }
        if (end && !held.is_empty()) || held.len() > MAX_LINE {
            write(&std::mem::take(&mut *held));
        }
    }

    /// Output of `channel`: what the other stream held back is written first.
    pub fn output(&self, channel: u8, data: &[u8]) {
        let last = std::mem::replace(&mut *lock(&self.channel), channel);
        match &self.sink {
            Sink::Cast { .. } => {
                if let Some(c) = self.cast(80, 24) {
                    if last != channel {
                        c.finish(&self.masker);
                    }
                    c.output(data, &self.masker);
                }
            }
            Sink::Lines {
                recorder,
                out,
                line,
                left,
                ssh_channel,
            } => {
                let mut left = lock(left);
                if *left == 0 {
                    return;
                }
                if last != channel {
                    let t = out.flush(&self.masker).unwrap_or_default();
                    Self::write_lines(recorder, line, *ssh_channel, last, &t, true);
                }
                let take = data.len().min(*left);
                *left -= take;
                let t = out.push(&data[..take], &self.masker).unwrap_or_default();
                Self::write_lines(recorder, line, *ssh_channel, channel, &t, false);
                if *left == 0 {
                    let t = out.flush(&self.masker).unwrap_or_default();
                    Self::write_lines(recorder, line, *ssh_channel, channel, &t, true);
                    drop(left);
                    self.note(&format!(
                        "[tollgate: output past {} KiB is relayed but not recorded]",
                        MAX_LINES_OUTPUT >> 10
                    ));
                }
            }
        }
    }

    /// A note from the agent in the recording (in the output, where a human reads it).
    pub fn note(&self, text: &str) {
        match &self.sink {
            Sink::Cast { cast, .. } => {
                if let Some(c) = lock(cast).clone() {
                    c.output(format!("\r\n{text}\r\n").as_bytes(), &self.masker);
                }
            }
            Sink::Lines {
                recorder,
                ssh_channel,
                ..
            } => {
                recorder.write(output_event("tollgate", text, *ssh_channel));
            }
        }
    }

    /// The terminal's new size (with a terminal; the cast is made at the first one).
    pub fn resize(&self, width: u32, height: u32) {
        let Sink::Cast { cast, .. } = &self.sink else {
            return;
        };
        let fresh = lock(cast).is_none();
        if let Some(c) = self.cast(width, height) {
            if !fresh {
                c.resize(width, height);
            }
        }
    }

    /// Whether output goes to a terminal recording (asciicast).
    pub fn is_cast(&self) -> bool {
        matches!(self.sink, Sink::Cast { .. })
    }
}

impl Drop for Terminal {
    /// The exec ended (both directions' taps are gone): what was held back is written.
    fn drop(&mut self) {
        match &self.sink {
            Sink::Cast { cast, .. } => {
                if let Some(c) = lock(cast).as_ref() {
                    c.finish(&self.masker);
                }
            }
            Sink::Lines {
                recorder,
                out,
                line,
                ssh_channel,
                ..
            } => {
                let last = *lock(&self.channel);
                let t = out.flush(&self.masker).unwrap_or_default();
                Self::write_lines(recorder, line, *ssh_channel, last, &t, true);
            }
        }
    }
}
