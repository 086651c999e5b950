//! One bot channel: collect its setup requests, decide the exec/shell/subsystem request, then
//! pass everything through to an upstream channel of its own. Channels are independent: a
//! refused or failed channel ends alone, its siblings on the same connection go on.

use std::sync::{atomic::Ordering, Arc};

use russh::{client, server, Channel, ChannelMsg, ChannelReadHalf, ChannelWriteHalf};
use serde_json::json;
use tollgate_policy::{Action, Operation, SshOpKind};

use super::{upstream::UpstreamClient, Counters};
use crate::{mask::Masker, recording::Recorder, session::SessionCx};

/// Exit status of a command refused by tollgate (POSIX "found but not executable").
pub const DENIED_STATUS: u32 = 126;

/// The logged-in upstream connection shared by the session's channels.
pub struct Upstream {
    pub handle: client::Handle<UpstreamClient>,
}

pub struct ChannelCx<'a> {
    pub cx: &'a SessionCx,
    pub server: server::Handle,
    pub upstream: Result<Arc<Upstream>, String>,
    pub counters: Arc<Counters>,
    pub masker: &'a Masker,
    pub recorder: Option<Arc<Recorder>>,
}

/// A `pty-req`: terminal, columns, rows, pixel width and height, modes.
type PtyReq = (String, u32, u32, u32, u32, Vec<(russh::Pty, u32)>);

/// Requests collected before the channel's main request.
struct Setup {
    pty: Option<PtyReq>,
    env: Vec<(String, String)>,
}

/// The main request of a session channel.
enum Main {
    Exec(Vec<u8>),
    Shell,
    Subsystem(String),
}

impl<'a> ChannelCx<'a> {
    fn mask(&self, text: &str) -> String {
        match self.masker.mask_text(text.as_bytes(), false) {
            Some(crate::mask::Masked::Value(v, labels)) => {
                for l in labels {
                    self.cx
                        .agent
                        .metrics
                        .masked_values
                        .with_label_values(&[&self.cx.target.name, l])
                        .inc();
                }
                String::from_utf8_lossy(&v).into_owned()
            }
            Some(crate::mask::Masked::Null(_)) => "[masked]".into(),
            None => text.to_string(),
        }
    }
}

/// Serve one session channel to its end.
pub async fn session(ccx: ChannelCx<'_>, ch: Channel<server::Msg>) {
    let id = ch.id();
    let (mut bot_r, bot_w) = ch.split();
    let mut setup = Setup {
        pty: None,
        env: Vec::new(),
    };
    let main = loop {
        match bot_r.wait().await {
            Some(ChannelMsg::RequestPty {
                term,
                col_width,
                row_height,
                pix_width,
                pix_height,
                terminal_modes,
                ..
            }) => {
                setup.pty = Some((
                    term,
                    col_width,
                    row_height,
                    pix_width,
                    pix_height,
                    terminal_modes,
                ))
            }
            Some(ChannelMsg::WindowChange {
                col_width,
                row_height,
                pix_width,
                pix_height,
            }) => {
                if let Some(p) = &mut setup.pty {
                    (p.1, p.2, p.3, p.4) = (col_width, row_height, pix_width, pix_height);
                }
            }
            Some(ChannelMsg::SetEnv {
                variable_name,
                variable_value,
                ..
            }) => {
                // The handler already answered; only allowed variables go upstream.
                if env_allowed(ccx.cx, &variable_name) {
                    setup.env.push((variable_name, variable_value));
                }
            }
            Some(ChannelMsg::Exec { command, .. }) => break Main::Exec(command),
            Some(ChannelMsg::RequestShell { .. }) => break Main::Shell,
            Some(ChannelMsg::RequestSubsystem { name, .. }) => break Main::Subsystem(name),
            Some(ChannelMsg::Eof | ChannelMsg::Close) | None => return,
            Some(_) => {}
        }
    };
    let (kind, kind_word, text) = match &main {
        Main::Exec(c) => (
            SshOpKind::Exec,
            "exec",
            String::from_utf8_lossy(c).into_owned(),
        ),
        Main::Shell => (SshOpKind::Shell, "shell", String::new()),
        Main::Subsystem(n) => (SshOpKind::Subsystem, "subsystem", n.clone()),
    };
    let shown = ccx.mask(&text);
    let audit_text = match &main {
        Main::Exec(_) => shown.clone(),
        Main::Shell => "shell".into(),
        Main::Subsystem(n) => format!("subsystem {n}"),
    };
    // A command that is not UTF-8 cannot match a pattern faithfully: decided as its lossy text,
    // which contains U+FFFD, which the matcher refuses.
    let d = ccx.cx.decide(
        Operation::Ssh {
            kind,
            command: &text,
        },
        &audit_text,
    );
    ccx.cx
        .agent
        .metrics
        .ssh_channel(&ccx.cx.target.name, kind_word, d.action.as_str());
    let who = ccx.cx.identity.as_deref().unwrap_or("(unknown)");
    let what = match &main {
        Main::Exec(_) => format!("exec \"{shown}\""),
        Main::Shell => "shell".into(),
        Main::Subsystem(n) => format!("subsystem \"{n}\""),
    };
    // What the bot sent while its request waited for approval, passed on once it runs.
    let mut held = Vec::new();
    let refusal = match d.action {
        Action::Allow => None,
        Action::Deny => Some(match &d.rule {
            Some(rule) => format!(
                "tollgate: {what} denied by rule \"{rule}\" for identity {who}\r\n"
            ),
            None => format!(
                "tollgate: {what} denied for identity {who}: no rule allows it ({}); ask for access\r\n",
                d.reason.as_str()
            ),
        }),
        Action::Approve => {
            match approve(
                &ccx,
                &mut bot_r,
                &bot_w,
                &what,
                kind_word,
                &audit_text,
                &d,
                &mut held,
            )
            .await
            {
                Ok(()) => None,
                Err(Some(msg)) => Some(msg),
                // The bot went away: the request was withdrawn.
                Err(None) => return,
            }
        }
    };
    if let Some(msg) = refusal {
        let rule = d.rule.as_deref();
        record(
            &ccx,
            kind_word,
            &shown,
            "deny",
            rule,
            Some(DENIED_STATUS),
            0,
            0,
        );
        refuse(&bot_w, &msg).await;
        return;
    }
    let up = match &ccx.upstream {
        Ok(u) => u.clone(),
        Err(e) => {
            fail(&bot_w, &format!("tollgate: upstream login failed: {e}\r\n")).await;
            return;
        }
    };
    let up_ch = match up.handle.channel_open_session().await {
        Ok(c) => c,
        Err(e) => {
            fail(
                &bot_w,
                &format!("tollgate: upstream refused a new channel: {e}\r\n"),
            )
            .await;
            return;
        }
    };
    let setup_ok = async {
        if let Some((term, w, h, pw, ph, modes)) = &setup.pty {
            up_ch
                .request_pty(false, term, *w, *h, *pw, *ph, modes)
                .await?;
        }
        for (k, v) in &setup.env {
            up_ch.set_env(false, k.clone(), v.clone()).await?;
        }
        match &main {
            Main::Exec(c) => up_ch.exec(true, c.clone()).await,
            Main::Shell => up_ch.request_shell(true).await,
            Main::Subsystem(n) => up_ch.request_subsystem(true, n.clone()).await,
        }
    }
    .await;
    if let Err(e) = setup_ok {
        fail(
            &bot_w,
            &format!("tollgate: upstream channel failed: {e}\r\n"),
        )
        .await;
        return;
    }
    // A terminal (a pty was requested) is recorded as asciicast v2 beside the session's
    // JSON-lines recording, which names the file.
    let cast = setup.pty.as_ref().and_then(|(term, w, h, ..)| {
        let c = super::cast::Cast::create(
            &ccx.cx.gen.policy.agent.data_dir,
            &ccx.cx.id,
            u32::from(id),
            *w,
            *h,
            term,
        )
        .inspect_err(|e| tracing::warn!(error = %e, "cannot create the terminal recording"))
        .ok()?;
        if let Some(r) = &ccx.recorder {
            r.write(crate::obj(
                json!({"event": "terminal", "cast": c.file_name(), "command": shown}),
            ));
        }
        Some(c)
    });
    // Without a terminal, a command's (or a piped shell's) stdout and stderr are lines of the
    // session's recording, as for `kubectl exec` (the first 256 KiB: scp streams files this
    // way). A subsystem (sftp) speaks a binary protocol: only its channel line is recorded.
    let lines = match (&cast, &ccx.recorder, &main) {
        (None, Some(r), Main::Exec(_) | Main::Shell) => Some(super::terminal::Terminal::lines(
            ccx.masker.clone(),
            r.clone(),
            Some(u32::from(id)),
        )),
        _ => None,
    };
    let output = |channel: u8, data: &[u8]| {
        if let Some(c) = &cast {
            c.output(data, ccx.masker);
        }
        if let Some(l) = &lines {
            l.output(channel, data);
        }
    };
    let (up_r, up_w) = up_ch.split();
    let (up_bytes, down_bytes, status) = pump(
        &ccx,
        id,
        held,
        bot_r,
        &bot_w,
        up_r,
        &up_w,
        cast.as_ref(),
        &output,
    )
    .await;
    // What the line recording held back is written before the channel's line.
    drop(lines);
    if let Some(c) = &cast {
        c.finish(ccx.masker);
    }
    record(
        &ccx,
        kind_word,
        &shown,
        "allow",
        d.rule.as_deref(),
        status,
        up_bytes,
        down_bytes,
    );
}

fn env_allowed(cx: &SessionCx, name: &str) -> bool {
    let gen = cx.agent.gen.load();
    super::decide_forward(
        &gen.policy,
        cx.identity.as_deref(),
        &cx.target.name,
        "env",
        name,
    )
    .action
        == Action::Allow
}

/// One JSON line per channel in the session's recording.
#[expect(clippy::too_many_arguments, reason = "one recording line's fields")]
fn record(
    ccx: &ChannelCx<'_>,
    kind: &str,
    shown: &str,
    action: &str,
    rule: Option<&str>,
    status: Option<u32>,
    up: u64,
    down: u64,
) {
    if let Some(r) = &ccx.recorder {
        r.write(crate::obj(json!({
            "event": kind, "command": shown, "action": action, "rule": rule,
            "exit_status": status, "bytes_up": up, "bytes_down": down,
        })));
    }
}

/// Refuse a channel the way a shell refuses a command it cannot run: the message on stderr,
/// exit status 126, EOF, close.
async fn refuse(w: &ChannelWriteHalf<server::Msg>, msg: &str) {
    let _ = w.extended_data_bytes(1, msg.as_bytes().to_vec()).await;
    let _ = w.exit_status(DENIED_STATUS).await;
    let _ = w.eof().await;
    let _ = w.close().await;
}

/// End a channel whose upstream failed: stderr message and status 255 (what ssh uses for its
/// own errors).
async fn fail(w: &ChannelWriteHalf<server::Msg>, msg: &str) {
    tracing::warn!("{}", msg.trim_end());
    let _ = w.extended_data_bytes(1, msg.as_bytes().to_vec()).await;
    let _ = w.exit_status(255).await;
    let _ = w.eof().await;
    let _ = w.close().await;
}

/// Hold the request for a human. `Ok` to run it; `Err(Some(message))` to refuse it;
/// `Err(None)` when the bot closed the channel meanwhile (the request is withdrawn by dropping
/// its ticket).
#[expect(
    clippy::too_many_arguments,
    reason = "both halves of the bot channel plus the decision's texts; a struct would only rename them"
)]
async fn approve(
    ccx: &ChannelCx<'_>,
    bot_r: &mut ChannelReadHalf,
    bot_w: &ChannelWriteHalf<server::Msg>,
    what: &str,
    kind: &str,
    audit_text: &str,
    d: &tollgate_policy::Decision,
    held: &mut Vec<ChannelMsg>,
) -> Result<(), Option<String>> {
    let who = ccx.cx.identity.as_deref().unwrap_or("(unknown)");
    let mut ticket = match ccx
        .cx
        .open_approval(&ccx.cx.policy(), audit_text, kind, d)
        .await
    {
        Ok(t) => t,
        Err(e) => {
            return Err(Some(format!(
                "tollgate: {what} needs approval (rule \"{}\") but {e}; denied\r\n",
                d.rule.as_deref().unwrap_or("")
            )))
        }
    };
    let n = ticket.id();
    let _ = bot_w
        .extended_data_bytes(
            1,
            format!(
                "tollgate: {what} for identity {who} waits for approval #{n} (rule \"{}\"): tollgate approvals approve {n}\r\n",
                d.rule.as_deref().unwrap_or("")
            )
            .into_bytes(),
        )
        .await;
    let outcome = loop {
        tokio::select! {
            o = ccx.cx.wait_approval(&mut ticket) => break o,
            m = bot_r.wait() => match m {
                // Closing the channel (or the connection) withdraws the request.
                Some(ChannelMsg::Close) | None => return Err(None),
                // Input and EOF wait with the request (bounded: the SSH window limits how much
                // the bot can send before we adjust it, and nothing is adjusted meanwhile).
                Some(m) => held.push(m),
            },
        }
    };
    use crate::session::ApprovalOutcome as O;
    match outcome {
        O::Approved { .. } => Ok(()),
        O::Denied {
            approver, comment, ..
        } => Err(Some(format!(
            "tollgate: {what} denied by {approver} (approval #{n}){}\r\n",
            comment.map(|c| format!(": {c}")).unwrap_or_default()
        ))),
        O::Expired { reason, .. } => Err(Some(format!(
            "tollgate: {what} not approved (approval #{n}): {reason}\r\n"
        ))),
        O::Unavailable => Err(Some(format!(
            "tollgate: {what} needs approval, which is not available on this agent; denied\r\n"
        ))),
    }
}

/// Pass the channel both ways until the upstream closes it. Returns (bytes up, bytes down,
/// exit status).
#[expect(
    clippy::too_many_arguments,
    reason = "the four channel halves, what was held, and the recording"
)]
async fn pump(
    ccx: &ChannelCx<'_>,
    id: russh::ChannelId,
    held: Vec<ChannelMsg>,
    mut bot_r: ChannelReadHalf,
    bot_w: &ChannelWriteHalf<server::Msg>,
    mut up_r: ChannelReadHalf,
    up_w: &ChannelWriteHalf<client::Msg>,
    cast: Option<&super::cast::Cast>,
    output: &(dyn Fn(u8, &[u8]) + Sync),
) -> (u64, u64, Option<u32>) {
    let counters = &ccx.counters;
    let up_bytes = std::sync::atomic::AtomicU64::new(0);
    let down_bytes = std::sync::atomic::AtomicU64::new(0);
    // Bot to upstream: data, EOF, window changes, signals. Ends when the bot closes.
    let to_up = async {
        let mut held = held.into_iter();
        loop {
            let m = match held.next() {
                Some(m) => m,
                None => match bot_r.wait().await {
                    Some(m) => m,
                    None => break,
                },
            };
            let r = match m {
                ChannelMsg::Data { data } => {
                    up_bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
                    counters.up.fetch_add(data.len() as u64, Ordering::Relaxed);
                    up_w.data_bytes(data).await
                }
                ChannelMsg::ExtendedData { data, ext } => up_w.extended_data_bytes(ext, data).await,
                ChannelMsg::Eof => up_w.eof().await,
                ChannelMsg::WindowChange {
                    col_width,
                    row_height,
                    pix_width,
                    pix_height,
                } => {
                    if let Some(c) = cast {
                        c.resize(col_width, row_height);
                    }
                    up_w.window_change(col_width, row_height, pix_width, pix_height)
                        .await
                }
                ChannelMsg::Signal { signal } => up_w.signal(signal).await,
                ChannelMsg::Close => break,
                _ => Ok(()),
            };
            if r.is_err() {
                break;
            }
        }
        let _ = up_w.close().await;
    };
    // Upstream to bot: data, stderr, EOF, exit status/signal, close.
    // The upstream's EOF is held until its exit status (or signal, or close) has been passed
    // on: a client that has sent its own EOF closes the channel as soon as it gets ours, and
    // russh's server forgets a channel the client closed, so a status sent after that would
    // be dropped (the bot then exits 255). sshd itself never closes before the status.
    let to_bot = async {
        let mut status = None;
        let mut closed = false;
        let mut eof_held = false;
        while let Some(m) = up_r.wait().await {
            let r = match m {
                ChannelMsg::Data { data } => {
                    down_bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
                    counters
                        .down
                        .fetch_add(data.len() as u64, Ordering::Relaxed);
                    output(1, &data);
                    bot_w.data_bytes(data).await
                }
                ChannelMsg::ExtendedData { data, ext } => {
                    down_bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
                    counters
                        .down
                        .fetch_add(data.len() as u64, Ordering::Relaxed);
                    output(if ext == 1 { 2 } else { 1 }, &data);
                    bot_w.extended_data_bytes(ext, data).await
                }
                ChannelMsg::Eof => {
                    eof_held = true;
                    Ok(())
                }
                ChannelMsg::ExitStatus { exit_status } => {
                    status = Some(exit_status);
                    let r = bot_w.exit_status(exit_status).await;
                    if std::mem::take(&mut eof_held) {
                        let _ = bot_w.eof().await;
                    }
                    r
                }
                ChannelMsg::ExitSignal {
                    signal_name,
                    core_dumped,
                    error_message,
                    lang_tag,
                } => {
                    let _ = ccx
                        .server
                        .exit_signal_request(id, signal_name, core_dumped, error_message, lang_tag)
                        .await;
                    if std::mem::take(&mut eof_held) {
                        let _ = bot_w.eof().await;
                    }
                    Ok(())
                }
                ChannelMsg::Failure => {
                    let _ = bot_w
                        .extended_data_bytes(
                            1,
                            b"tollgate: the upstream server refused the request\r\n".to_vec(),
                        )
                        .await;
                    let _ = bot_w.exit_status(255).await;
                    break;
                }
                ChannelMsg::Close => {
                    closed = true;
                    break;
                }
                _ => Ok(()),
            };
            if r.is_err() {
                break;
            }
        }
        if !closed && status.is_none() {
            // The upstream connection went away mid-channel: say so, the way ssh reports its
            // own failures (status 255), instead of a silent close.
            let _ = bot_w
                .extended_data_bytes(
                    1,
                    b"tollgate: the upstream connection was lost\r\n".to_vec(),
                )
                .await;
            let _ = bot_w.exit_status(255).await;
        }
        let _ = bot_w.eof().await;
        let _ = bot_w.close().await;
        status
    };
    // The channel ends when the upstream side has closed; the bot side's loop then sees the
    // close we sent and ends too (bounded, in case the bot never answers). When the bot side
    // ends first (its close, or a write upstream failed because that channel is already
    // gone), what the upstream still sends (exit status or signal, EOF, close) is passed on
    // all the same: `to_bot` is never dropped while it can still deliver the exit status.
    let mut to_up = std::pin::pin!(to_up);
    let mut to_bot = std::pin::pin!(to_bot);
    let status = tokio::select! {
        biased;
        s = &mut to_bot => s,
        _ = &mut to_up => tokio::time::timeout(std::time::Duration::from_secs(5), &mut to_bot)
            .await
            .unwrap_or(None),
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), &mut to_up).await;
    (
        up_bytes.load(Ordering::Relaxed),
        down_bytes.load(Ordering::Relaxed),
        status,
    )
}

/// A direct-tcpip channel (`ssh -L` / `-D`), allowed by `forwarding = true`: opened upstream to
/// the same destination (audited by the handler's decision; the session recording gets a line
/// with the destination and the bytes each way when it ends).
pub async fn direct_tcpip(
    cx: &SessionCx,
    upstream: Result<Arc<Upstream>, String>,
    counters: Arc<Counters>,
    recorder: Option<Arc<Recorder>>,
    ch: Channel<server::Msg>,
    host: String,
    port: u32,
) {
    let Ok(up) = upstream else {
        let _ = ch.close().await;
        return;
    };
    let up_ch = match up
        .handle
        .channel_open_direct_tcpip(host.clone(), port, "127.0.0.1", 0)
        .await
    {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(session = %cx.id, error = %e, "upstream refused direct-tcpip");
            let _ = ch.close().await;
            return;
        }
    };
    let mut bot = ch.into_stream();
    let mut upc = up_ch.into_stream();
    let (a, b) = tokio::io::copy_bidirectional(&mut bot, &mut upc)
        .await
        .unwrap_or_default();
    counters.up.fetch_add(a, Ordering::Relaxed);
    counters.down.fetch_add(b, Ordering::Relaxed);
    if let Some(r) = &recorder {
        r.write(crate::obj(json!({
            "event": "direct-tcpip", "destination": format!("{host}:{port}"),
            "bytes_up": a, "bytes_down": b,
        })));
    }
}
