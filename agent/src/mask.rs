//! Masking sensitive values in responses (`[[mask]]`): column rules and value detectors,
//! compiled once per policy generation and target into a [`Masker`], then applied to every
//! text-format field a protocol handler streams to a client.
//!
//! Layout: [`Masker`] (compilation and the public calls), span merging and the styles, the
//! keyed hash (HMAC-SHA256 written out over `sha2`), then the scan: one pass over a value that
//! stops only at anchor bytes, and per detector a function that tries a match at its anchor.
//! Tests and the throughput benchmark live in `mask/tests.rs`; the fuzz target in
//! `agent/fuzz/fuzz_targets/mask.rs`.
//!
//! # Styles
//! What a masked value (a whole column value, or one detector match inside a text) becomes:
//! - `full`: a fixed `********`. Fixed width, so the length of the secret does not leak.
//! - `partial`: `****` plus the last 4 significant characters (whitespace and ASCII punctuation
//!   are skipped, and at most half of them are kept, so a short value never shows through):
//!   `****1111` for a card, `****6789` for an SSN, `****3000` for an IBAN. An email keeps its
//!   domain and, when its local part has 4 or more characters, the first of them:
//!   `j***@example.com`. A private key keeps nothing (`********`).
//! - `hash`: `hash:` plus the first 16 hex digits of HMAC-SHA256(agent key, bytes as sent).
//!   Stable per agent installation, so equal values stay joinable; without the key a dictionary
//!   of likely values cannot be hashed to reverse it.
//! - `null`: a masked column is sent as SQL NULL ([`Masked::Null`]). So is a value that is one
//!   detector match and nothing else (surrounding whitespace aside). A match inside a longer
//!   text becomes `********`: an empty replacement would splice its neighbours together.
//!
//! When several rules name the same detector, or cover the same column, the strictest style
//! wins: null, then full, then hash, then partial. Overlapping or touching matches are masked
//! as one span, in the strictest style among their detectors.
//!
//! # Why detection runs to a fixed point
//! Detectors look at the characters around a candidate (a phone number glued to a letter is
//! part of something else). Masking one match changes those neighbours for the next candidate:
//! in `a@b.co+14155552671` the phone is rejected because of the `o` before it, but once the
//! email is masked it stands alone. Detection therefore re-runs over a copy in which every
//! match is a run of `*`, until a scan finds nothing new (capped: past [`MAX_PASSES`] the whole
//! value is masked). So the `full` output of a value, scanned again, never yields a match. Only
//! values that matched pay for the extra scan.
//!
//! # Cost
//! A value shorter than the shortest enabled pattern costs one comparison. Otherwise a
//! vectorised count of its digits switches off the digit-based detectors it cannot hold (fewer
//! than 13 digits: no card), and one pass looks each byte up in a table of anchors (`@` for
//! email, the start of a digit run for cards, `-` for SSNs, `+`, `(`, `-`, `.` for phones, an
//! uppercase letter for IBANs, `J` of `eyJ`, `A` of `AKIA`, `b` of `Bearer`, ...). Only there
//! does a detector look further, and most give up after a byte or two. Everything is linear in
//! the value's length: the work at an anchor is bounded, or the bytes it consumed are not
//! looked at again by the same detector. No allocation happens unless something matched.

use std::fmt;

use sha2::{Digest, Sha256};
use tollgate_policy::Policy;

/// Re-exported so callers of [`Masker::column_style`] and [`Masker::with_detectors`] need not
/// depend on the policy crate.
pub use tollgate_policy::{MaskStyle, DETECTORS};

/// Detector label of a value masked by a column rule (`tollgate_masked_values_total`).
pub const COLUMN: &str = "column";

/// Detection passes before the whole value is masked instead (see the module docs).
pub const MAX_PASSES: usize = 8;

/// The `full` replacement, also used for `null` matches inside a longer text.
const FULL: &[u8] = b"********";

/// The outcome of masking one value that changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Masked {
    /// Send these bytes instead. The labels are the detectors that fired, one entry per masked
    /// match (a value with two emails lists `"email"` twice), or [`COLUMN`] for a column rule.
    Value(Vec<u8>, Vec<&'static str>),
    /// Send SQL NULL instead (the `null` style), with the labels as for [`Masked::Value`].
    Null(Vec<&'static str>),
}

impl Masked {
    /// The detector labels, for `tollgate_masked_values_total{target,detector}`.
    pub fn detectors(&self) -> &[&'static str] {
        match self {
            Masked::Value(_, d) | Masked::Null(d) => d,
        }
    }
}

/// What to mask and how, compiled once per policy generation for one target.
///
/// `Debug` shows the rules but never the hash key.
#[derive(Clone)]
pub struct Masker {
    /// Field selection: which fields are masked whole.
    columns: SqlColumns,
    /// Value detection: what is masked inside any value, whatever field it is in.
    detectors: Detectors,
    key: HashKey,
}

/// The field selector of SQL results: the applicable rules' `columns` (`public.users.email`).
/// Kept apart from the value detectors so another protocol's selector (JSON paths) sits beside
/// it and shares the detectors and styles.
#[derive(Clone, Default)]
struct SqlColumns {
    /// The applicable rules that select columns.
    rules: Vec<tollgate_policy::MaskRule>,
    /// Strictest style among `rules`: what [`Masker::mask_text`] uses for a column rule.
    strictest: Option<MaskStyle>,
}

impl SqlColumns {
    /// The strictest style among the rules that select `column` of `table` ("" for none).
    fn style(&self, table: &str, column: &str) -> Option<MaskStyle> {
        self.rules
            .iter()
            .filter(|r| r.matches_column(table, column))
            .fold(None, |acc, r| Some(stricter(acc, r.style)))
    }
}

/// The value detectors in force (`detectors` in mask rules), each with its strictest style.
#[derive(Clone)]
struct Detectors {
    /// Strictest style per detector ([`Det`] order); `None` = the detector is off.
    style: [Option<MaskStyle>; Det::COUNT],
    /// Bit per enabled detector.
    enabled: u16,
    /// Shortest value any enabled detector can match: anything shorter is skipped outright.
    min_len: usize,
}

impl Detectors {
    fn new(style: [Option<MaskStyle>; Det::COUNT]) -> Detectors {
        let mut enabled = 0;
        let mut min_len = usize::MAX;
        for d in Det::ALL {
            if style[d as usize].is_some() {
                enabled |= d.bit();
                min_len = min_len.min(d.min_len());
            }
        }
        Detectors {
            style,
            enabled,
            min_len,
        }
    }
}

impl fmt::Debug for Masker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let detectors: Vec<(&str, &str)> = Det::ALL
            .iter()
            .filter_map(|&d| self.detectors.style[d as usize].map(|s| (d.name(), s.as_str())))
            .collect();
        let columns: Vec<(&[String], &str)> = self
            .columns
            .rules
            .iter()
            .map(|r| (r.columns.as_slice(), r.style.as_str()))
            .collect();
        f.debug_struct("Masker")
            .field("columns", &columns)
            .field("detectors", &detectors)
            .field("key", &"<redacted>")
            .finish()
    }
}

impl Masker {
    /// From the policy's mask rules that apply to `target` ([`tollgate_policy::MaskRule::applies_to`]),
    /// with a secret `hash_key` for the keyed `hash` style (stable per agent installation: the
    /// caller loads or creates it in `data_dir`). `None` if no rule applies, so the handler can
    /// skip masking work altogether.
    pub fn for_target(policy: &Policy, target: &str, hash_key: [u8; 32]) -> Option<Masker> {
        let mut columns = Vec::new();
        let mut column_style = None;
        let mut det_style = [None; Det::COUNT];
        for rule in policy.masks_for(target) {
            if !rule.columns.is_empty() {
                columns.push(rule.clone());
                column_style = Some(stricter(column_style, rule.style));
            }
            for name in &rule.detectors {
                // The policy parser rejects unknown names, so none are dropped here.
                if let Some(d) = Det::from_name(name) {
                    det_style[d as usize] = Some(stricter(det_style[d as usize], rule.style));
                }
            }
        }
        if columns.is_empty() && det_style.iter().all(Option::is_none) {
            return None;
        }
        Some(Masker::build(columns, column_style, det_style, hash_key))
    }

    /// Detectors only, no column rules: for masking free text (statement text, fuzzing,
    /// benchmarks). Names not in [`DETECTORS`] are ignored.
    pub fn with_detectors(detectors: &[&str], style: MaskStyle, hash_key: [u8; 32]) -> Masker {
        let mut det_style = [None; Det::COUNT];
        for d in detectors.iter().filter_map(|n| Det::from_name(n)) {
            det_style[d as usize] = Some(style);
        }
        Masker::build(Vec::new(), None, det_style, hash_key)
    }

    fn build(
        columns: Vec<tollgate_policy::MaskRule>,
        column_style: Option<MaskStyle>,
        det_style: [Option<MaskStyle>; Det::COUNT],
        hash_key: [u8; 32],
    ) -> Masker {
        Masker {
            columns: SqlColumns {
                rules: columns,
                strictest: column_style,
            },
            detectors: Detectors::new(det_style),
            key: HashKey::new(hash_key),
        }
    }

    /// Whether any applicable rule selects columns (if not, a handler need not resolve the
    /// tables of result columns at all).
    pub fn has_column_rules(&self) -> bool {
        !self.columns.rules.is_empty()
    }

    /// Whether a column is masked by a column rule ([`tollgate_policy::MaskRule::matches_column`]).
    /// `table` is schema-qualified (`public.customers`); `None` for a column that is not a
    /// plain table column (an expression): then only globs whose table part matches anything
    /// (`*.email`, or a bare `email`) select it.
    pub fn column_masked(&self, table: Option<&str>, column: &str) -> bool {
        self.column_style(table, column).is_some()
    }

    /// The strictest style among the column rules that select this column (see
    /// [`Masker::column_masked`]), for handlers that want each column's own style rather than
    /// the strictest of all column rules that [`Masker::mask_text`] applies.
    pub fn column_style(&self, table: Option<&str>, column: &str) -> Option<MaskStyle> {
        self.columns.style(table.unwrap_or(""), column)
    }

    /// Whether any detector is enabled (if not, only column rules can change values).
    pub fn has_detectors(&self) -> bool {
        self.detectors.enabled != 0
    }

    /// `text` as a log line may show it: each detector match replaced, `[masked]` for the
    /// `null` style, and the text itself (not a copy) when nothing matched.
    pub fn shown<'t>(&self, text: &'t str) -> std::borrow::Cow<'t, str> {
        match self.mask_text(text.as_bytes(), false) {
            Some(Masked::Value(v, _)) => String::from_utf8_lossy(&v).into_owned().into(),
            Some(Masked::Null(_)) => "[masked]".into(),
            None => text.into(),
        }
    }

    /// Mask one text-format value.
    ///
    /// With `column_rule`, the whole value is masked by the column rules' style (the strictest
    /// of them; [`COLUMN`] is the label) and the result is always `Some`. Otherwise the enabled
    /// detectors run and each match inside the value is replaced; `None` means nothing matched
    /// (and nothing was allocated). Values may be any bytes: non-UTF-8 is scanned as bytes.
    pub fn mask_text(&self, value: &[u8], column_rule: bool) -> Option<Masked> {
        if column_rule {
            // A caller that says "column rule" on a masker without one still gets it masked:
            // fail closed.
            let style = self.columns.strictest.unwrap_or(MaskStyle::Full);
            return Some(self.mask_column(value, style));
        }
        self.mask_detected(value)
    }

    /// Mask a value computed from a masked column (`upper(email)`, a whole row, a column of a
    /// view that derives from one): `partial` would show the kept part of a value whose shape
    /// was changed (`reverse(email)` keeps the local part in its "domain"), so only `null` and
    /// `hash` are kept as they are and every other style masks in full.
    pub fn mask_derived(&self, value: &[u8]) -> Masked {
        let style = match self.columns.strictest {
            Some(s @ (MaskStyle::Null | MaskStyle::Hash)) => s,
            _ => MaskStyle::Full,
        };
        self.mask_column(value, style)
    }

    /// Mask a whole column value in `style` (as from [`Masker::column_style`]).
    pub fn mask_column(&self, value: &[u8], style: MaskStyle) -> Masked {
        let labels = vec![COLUMN];
        let mut out = Vec::new();
        match style {
            MaskStyle::Null => return Masked::Null(labels),
            MaskStyle::Full => out.extend_from_slice(FULL),
            MaskStyle::Hash => self.key.render(value, &mut out),
            MaskStyle::Partial => {
                let (a, b) = trim_ascii_ws(value);
                let mut one = Vec::new();
                scan(value, Det::Email.bit(), &mut one);
                match one.as_slice() {
                    [h] if h.start == a && h.end == b => partial_email(&value[a..b], &mut out),
                    _ => partial_tail(value, &mut out),
                }
            }
        }
        Masked::Value(out, labels)
    }

    fn mask_detected(&self, value: &[u8]) -> Option<Masked> {
        if self.detectors.enabled == 0 || value.len() < self.detectors.min_len {
            return None;
        }
        let mut hits = Vec::new();
        self.scan(value, &mut hits);
        if hits.is_empty() {
            return None;
        }
        // Re-scan with every match blanked out until nothing new turns up (module docs).
        let mut shadow = value.to_vec();
        let mut blanked = 0;
        let mut passes = 1;
        loop {
            for h in &hits[blanked..] {
                shadow[h.start..h.end].fill(b'*');
            }
            blanked = hits.len();
            self.scan(&shadow, &mut hits);
            if hits.len() == blanked {
                break;
            }
            passes += 1;
            if passes >= MAX_PASSES {
                return Some(self.mask_whole(value, &hits));
            }
        }
        Some(self.render(value, hits))
    }

    fn scan(&self, s: &[u8], hits: &mut Vec<Hit>) {
        scan(s, self.detectors.enabled, hits);
    }

    fn style_of(&self, dets: u16) -> MaskStyle {
        Det::ALL
            .iter()
            .filter(|d| dets & d.bit() != 0)
            .filter_map(|&d| self.detectors.style[d as usize])
            .fold(MaskStyle::Partial, |acc, s| stricter(Some(acc), s))
    }

    /// The fixed point was not reached: mask everything, in the strictest style that fired.
    fn mask_whole(&self, value: &[u8], hits: &[Hit]) -> Masked {
        let labels = hits.iter().map(|h| h.det.name()).collect();
        let dets = hits.iter().fold(0, |acc, h| acc | h.det.bit());
        let mut out = Vec::new();
        match self.style_of(dets) {
            MaskStyle::Null => return Masked::Null(labels),
            MaskStyle::Hash => self.key.render(value, &mut out),
            MaskStyle::Full | MaskStyle::Partial => out.extend_from_slice(FULL),
        }
        Masked::Value(out, labels)
    }

    fn render(&self, value: &[u8], mut hits: Vec<Hit>) -> Masked {
        hits.sort_unstable_by_key(|h| (h.start, h.end));
        let labels = hits.iter().map(|h| h.det.name()).collect();
        // Merge overlapping and touching matches: (start, end, detector bits).
        let mut spans: Vec<(usize, usize, u16)> = Vec::with_capacity(hits.len());
        for h in &hits {
            match spans.last_mut() {
                Some(last) if h.start <= last.1 => {
                    last.1 = last.1.max(h.end);
                    last.2 |= h.det.bit();
                }
                _ => spans.push((h.start, h.end, h.det.bit())),
            }
        }
        if let [(a, b, dets)] = spans[..] {
            let (ta, tb) = trim_ascii_ws(value);
            if a <= ta && b >= tb && self.style_of(dets) == MaskStyle::Null {
                return Masked::Null(labels);
            }
        }
        let mut out = Vec::with_capacity(value.len() + 8);
        let mut pos = 0;
        for (a, b, dets) in spans {
            out.extend_from_slice(&value[pos..a]);
            let span = &value[a..b];
            match self.style_of(dets) {
                MaskStyle::Full | MaskStyle::Null => out.extend_from_slice(FULL),
                MaskStyle::Hash => self.key.render(span, &mut out),
                MaskStyle::Partial if dets & Det::PrivateKey.bit() != 0 => {
                    out.extend_from_slice(FULL)
                }
                MaskStyle::Partial if dets == Det::Email.bit() => partial_email(span, &mut out),
                MaskStyle::Partial => partial_tail(span, &mut out),
            }
            pos = b;
        }
        out.extend_from_slice(&value[pos..]);
        Masked::Value(out, labels)
    }
}

/// Strictness order of styles: null, full, hash, partial.
fn rank(s: MaskStyle) -> u8 {
    match s {
        MaskStyle::Partial => 0,
        MaskStyle::Hash => 1,
        MaskStyle::Full => 2,
        MaskStyle::Null => 3,
    }
}

fn stricter(a: Option<MaskStyle>, b: MaskStyle) -> MaskStyle {
    match a {
        Some(a) if rank(a) >= rank(b) => a,
        _ => b,
    }
}

/// Range of `v` without leading and trailing ASCII whitespace.
fn trim_ascii_ws(v: &[u8]) -> (usize, usize) {
    let a = v
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(v.len());
    let b = v
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(a, |i| i + 1);
    (a, b)
}

/// `partial` for an email match (`local@domain`): `j***@domain`.
fn partial_email(span: &[u8], out: &mut Vec<u8>) {
    let Some(at) = span.iter().rposition(|&b| b == b'@') else {
        return partial_tail(span, out);
    };
    // Only ASCII bytes can be in a detected local part; a whole column value checked by the
    // email detector has the same property, so the first byte is a whole character.
    if at >= 4 && span[0].is_ascii() {
        out.push(span[0]);
    }
    out.extend_from_slice(b"***");
    out.extend_from_slice(&span[at..]);
}

/// `partial` for anything else: `****` and the last (at most 4, at most half) significant
/// characters. UTF-8 values are handled by character, anything else by byte (a single-byte
/// client encoding such as LATIN1).
fn partial_tail(v: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(b"****");
    match std::str::from_utf8(v) {
        Ok(s) => {
            let sig = |c: &char| !(c.is_whitespace() || c.is_ascii_punctuation());
            let keep = (s.chars().filter(sig).count() / 2).min(4);
            let tail: Vec<char> = s.chars().rev().filter(sig).take(keep).collect();
            let mut buf = [0u8; 4];
            for c in tail.iter().rev() {
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
        Err(_) => {
            let sig = |b: &&u8| !(b.is_ascii_whitespace() || b.is_ascii_punctuation());
            let keep = (v.iter().filter(sig).count() / 2).min(4);
            let tail: Vec<u8> = v.iter().rev().filter(sig).take(keep).copied().collect();
            out.extend(tail.iter().rev());
        }
    }
}

/// HMAC-SHA256 with the pads absorbed once, so each value costs two compressions less.
#[derive(Clone)]
struct HashKey {
    inner: Sha256,
    outer: Sha256,
}

impl HashKey {
    fn new(key: [u8; 32]) -> HashKey {
        // HMAC (RFC 2104): a key shorter than the 64-byte block is zero-padded.
        let mut ipad = [0x36u8; 64];
        let mut opad = [0x5cu8; 64];
        for (i, k) in key.iter().enumerate() {
            ipad[i] ^= k;
            opad[i] ^= k;
        }
        let mut inner = Sha256::new();
        inner.update(ipad);
        let mut outer = Sha256::new();
        outer.update(opad);
        HashKey { inner, outer }
    }

    fn mac(&self, msg: &[u8]) -> [u8; 32] {
        let mut inner = self.inner.clone();
        inner.update(msg);
        let mut outer = self.outer.clone();
        outer.update(inner.finalize());
        outer.finalize().into()
    }

    /// `hash:` and the first 16 hex digits of the MAC.
    fn render(&self, msg: &[u8], out: &mut Vec<u8>) {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        out.extend_from_slice(b"hash:");
        for b in &self.mac(msg)[..8] {
            out.push(HEX[usize::from(b >> 4)]);
            out.push(HEX[usize::from(b & 0xf)]);
        }
    }
}

/// The detectors, in [`DETECTORS`] order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Det {
    Email,
    CreditCard,
    UsSsn,
    Iban,
    Phone,
    Jwt,
    AwsAccessKey,
    PrivateKey,
    BearerToken,
}

impl Det {
    const COUNT: usize = 9;
    const ALL: [Det; Det::COUNT] = [
        Det::Email,
        Det::CreditCard,
        Det::UsSsn,
        Det::Iban,
        Det::Phone,
        Det::Jwt,
        Det::AwsAccessKey,
        Det::PrivateKey,
        Det::BearerToken,
    ];

    fn name(self) -> &'static str {
        match self {
            Det::Email => "email",
            Det::CreditCard => "credit_card",
            Det::UsSsn => "us_ssn",
            Det::Iban => "iban",
            Det::Phone => "phone",
            Det::Jwt => "jwt",
            Det::AwsAccessKey => "aws_access_key",
            Det::PrivateKey => "private_key",
            Det::BearerToken => "bearer_token",
        }
    }

    fn from_name(name: &str) -> Option<Det> {
        Det::ALL.into_iter().find(|d| d.name() == name)
    }

    fn bit(self) -> u16 {
        1 << self as u16
    }

    /// Length of the shortest value this detector can match.
    fn min_len(self) -> usize {
        match self {
            Det::Email => 6,                   // a@b.co
            Det::CreditCard => 13,             // 13 digits
            Det::UsSsn => 11,                  // 123-45-6789
            Det::Iban => 15,                   // Norway
            Det::Phone => 9,                   // + and 8 digits
            Det::Jwt => 12,                    // 10-char header and two dots
            Det::AwsAccessKey => 20,           // AKIA and 16
            Det::PrivateKey => 27,             // -----BEGIN PRIVATE KEY-----
            Det::BearerToken => 7 + TOKEN_MIN, // "Bearer " and the token
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Hit {
    start: usize,
    end: usize,
    det: Det,
}

// ---- the scan ----

/// Which detectors may start a match at each byte value (bits of [`Det::bit`]).
static ANCHORS: [u16; 256] = anchors();

const fn anchors() -> [u16; 256] {
    const fn bit(d: Det) -> u16 {
        1 << d as u16
    }
    let mut t = [0u16; 256];
    let mut i = 0;
    while i < 256 {
        let b = i as u8;
        t[i] = if b.is_ascii_digit() {
            bit(Det::CreditCard)
        } else if b.is_ascii_uppercase() {
            bit(Det::Iban)
                | match b {
                    b'A' => bit(Det::AwsAccessKey),
                    b'J' => bit(Det::Jwt),
                    b'B' => bit(Det::BearerToken),
                    _ => 0,
                }
        } else {
            match b {
                b'a' => bit(Det::AwsAccessKey),
                b'b' => bit(Det::BearerToken),
                b'@' => bit(Det::Email),
                b'-' => bit(Det::UsSsn) | bit(Det::Phone) | bit(Det::PrivateKey),
                b'.' | b'+' | b'(' => bit(Det::Phone),
                _ => 0,
            }
        };
        i += 1;
    }
    t
}

/// Run the detectors in `enabled` over `s` in one pass: each byte is looked up in [`ANCHORS`],
/// and only the detectors that can start a match there look further. `skip[d]` is where
/// detector `d` may next start: the end of its last match, or of the bytes a failed candidate
/// consumed. That keeps one detector's matches from overlapping and every scan linear.
fn scan(s: &[u8], mut enabled: u16, hits: &mut Vec<Hit>) {
    // Digit-based detectors need a minimum of digits in the value; counting them is one
    // vectorised pass, cheaper than stopping at every digit run of a short value.
    const NEED: [(Det, usize); 3] = [(Det::CreditCard, 13), (Det::UsSsn, 9), (Det::Phone, 8)];
    let digit_based = NEED.iter().fold(0, |acc, (d, _)| acc | d.bit());
    if enabled & digit_based != 0 {
        let digits = s.iter().filter(|b| b.is_ascii_digit()).count();
        for (d, need) in NEED {
            if digits < need {
                enabled &= !d.bit();
            }
        }
    }
    let card = Det::CreditCard as usize;
    let mut skip = [0usize; Det::COUNT];
    let mut i = 0;
    while i < s.len() {
        // Inside a card run already looked at, its digits are no anchors: search only up to
        // the run's end without them, so digit-heavy values don't stop at every digit.
        let (mask, limit) = if i < skip[card] {
            (enabled & !Det::CreditCard.bit(), skip[card])
        } else {
            (enabled, s.len())
        };
        // Kept apart from `anchor` so that this compiles to a tight loop.
        match s[i..limit]
            .iter()
            .position(|&b| ANCHORS[usize::from(b)] & mask != 0)
        {
            Some(off) => {
                let p = i + off;
                let b = s[p];
                let want = ANCHORS[usize::from(b)] & mask;
                if want == Det::CreditCard.bit() {
                    // The start of a digit run (the common anchor): measured inline.
                    let (run_end, digits, dashes) = card_run_extent(s, p);
                    if digits >= 13 {
                        card_candidates(s, p, run_end, hits);
                    }
                    skip[card] = run_end;
                    // Only a dash inside the run can be another detector's anchor.
                    i = if dashes && mask & ANCHORS[usize::from(b'-')] != 0 {
                        p + 1
                    } else {
                        run_end
                    };
                } else {
                    anchor(s, p, b, want, &mut skip, hits);
                    i = p + 1;
                }
            }
            None => i = limit,
        }
    }
}

/// Try every detector in `want` at the anchor byte `s[i] == b`. Each try first checks the
/// few bytes every match of its kind has there, so most anchors cost a comparison or two.
#[inline]
fn anchor(
    s: &[u8],
    i: usize,
    b: u8,
    want: u16,
    skip: &mut [usize; Det::COUNT],
    hits: &mut Vec<Hit>,
) {
    // Try detector `$d` for a match starting at `$start` (no earlier than its last match
    // ended): `$found` gives `Some((start, end))`.
    macro_rules! attempt {
        ($d:expr, $start:expr, $found:expr) => {
            if want & $d.bit() != 0 && $start >= skip[$d as usize] {
                if let Some((start, end)) = $found {
                    hits.push(Hit {
                        start,
                        end,
                        det: $d,
                    });
                    skip[$d as usize] = end;
                }
            }
        };
    }
    // Both `AAA-GG-SSSS` and `AAA-EEE-SSSS` have three digits before their first separator.
    let three_digits_before = || i >= 3 && s[i - 3..i].iter().all(|&c| digit(c));
    match b {
        b'@' => attempt!(Det::Email, i, email_at(s, i)),
        b'0'..=b'9' => {
            if want & Det::CreditCard.bit() != 0 && i >= skip[Det::CreditCard as usize] {
                let (run_end, digits, _) = card_run_extent(s, i);
                if digits >= 13 {
                    card_candidates(s, i, run_end, hits);
                }
                skip[Det::CreditCard as usize] = run_end;
            }
        }
        b'-' => {
            if three_digits_before() {
                attempt!(Det::UsSsn, i - 3, us_ssn_at(s, i - 3).map(|e| (i - 3, e)));
                attempt!(Det::Phone, i - 3, phone_at(s, i, b));
            }
            if s.get(i + 1) == Some(&b'-') {
                attempt!(Det::PrivateKey, i, private_key_at(s, i).map(|e| (i, e)));
            }
        }
        b'.' => {
            if three_digits_before() {
                attempt!(Det::Phone, i - 3, phone_at(s, i, b));
            }
        }
        b'+' | b'(' => attempt!(Det::Phone, i, phone_at(s, i, b)),
        b'b' => bearer(s, i, want, skip, hits),
        _ => {
            // Uppercase letters: an IBAN starts with two and two digits.
            if s.get(i + 1).is_some_and(u8::is_ascii_uppercase)
                && s.get(i + 2).is_some_and(u8::is_ascii_digit)
            {
                attempt!(Det::Iban, i, iban_at(s, i).map(|e| (i, e)));
            }
            match b {
                // A key id lowercased (`lower(key)`) starts with `a`.
                b'A' | b'a' => attempt!(
                    Det::AwsAccessKey,
                    i,
                    aws_access_key_at(s, i).map(|e| (i, e))
                ),
                b'B' => bearer(s, i, want, skip, hits),
                b'J' if i >= 2 && want & Det::Jwt.bit() != 0 => {
                    let p = i - 2;
                    if p >= skip[Det::Jwt as usize] && &s[p..i] == b"ey" {
                        let (found, reached) = jwt_at(s, p);
                        if let Some(end) = found {
                            hits.push(Hit {
                                start: p,
                                end,
                                det: Det::Jwt,
                            });
                        }
                        skip[Det::Jwt as usize] = reached;
                    }
                }
                _ => {}
            }
        }
    }
}

fn bearer(s: &[u8], i: usize, want: u16, skip: &mut [usize; Det::COUNT], hits: &mut Vec<Hit>) {
    let d = Det::BearerToken;
    if want & d.bit() == 0 || i < skip[d as usize] || s.get(i + 1).is_none_or(|&c| c | 0x20 != b'e')
    {
        return;
    }
    let (found, reached) = bearer_token_at(s, i);
    if let Some((start, end)) = found {
        hits.push(Hit { start, end, det: d });
    }
    skip[d as usize] = reached;
}

fn alnum(b: u8) -> bool {
    b.is_ascii_alphanumeric()
}

fn digit(b: u8) -> bool {
    b.is_ascii_digit()
}

/// The byte before `i`, if any.
fn before(s: &[u8], i: usize) -> Option<u8> {
    i.checked_sub(1).map(|j| s[j])
}

/// No alphanumeric byte right before `i`.
fn left_free(s: &[u8], i: usize) -> bool {
    !before(s, i).is_some_and(alnum)
}

/// No alphanumeric byte at `i`.
fn right_free(s: &[u8], i: usize) -> bool {
    !s.get(i).is_some_and(|&b| alnum(b))
}

// ---- email ----

/// RFC 5322 `atext` and `.`, without `*` (so a `j***@example.com` partial stays inert).
fn local_char(b: u8) -> bool {
    alnum(b) || b"!#$%&'+/=?^_`{|}~.-".contains(&b)
}

/// `local@domain.tld` around the `@` at `at`: the maximal run of local-part characters before
/// it, then dot-separated labels of letters, digits and inner hyphens ending in an alphabetic
/// TLD of 2+ letters. A trailing label that is not a TLD (`a@b.com.123`) is left out. Neither
/// run crosses another `@`, so all `@`s together scan each byte at most twice.
#[inline(never)]
fn email_at(s: &[u8], at: usize) -> Option<(usize, usize)> {
    let mut start = at;
    while start > 0 && local_char(s[start - 1]) {
        start -= 1;
    }
    while start < at && s[start] == b'.' {
        start += 1;
    }
    if start == at {
        return None;
    }
    email_domain_end(s, at + 1).map(|end| (start, end))
}

fn email_domain_end(s: &[u8], mut j: usize) -> Option<usize> {
    let n = s.len();
    let mut labels = 0;
    let mut best = None;
    loop {
        let ls = j;
        while j < n && (alnum(s[j]) || s[j] == b'-') {
            j += 1;
        }
        let mut le = j;
        while le > ls && s[le - 1] == b'-' {
            le -= 1;
        }
        if le == ls || s[ls] == b'-' || le - ls > 63 {
            break;
        }
        labels += 1;
        if labels >= 2 && le - ls >= 2 && s[ls..le].iter().all(u8::is_ascii_alphabetic) {
            best = Some(le);
        }
        if le < j || j >= n || s[j] != b'.' {
            break;
        }
        j += 1;
    }
    best
}

// ---- credit_card ----

fn card_sep(b: u8) -> bool {
    b == b' ' || b == b'-'
}

/// The run of digit groups (separated by single spaces or dashes) starting at `run_start`:
/// where it ends, how many digits it holds, and whether a dash separates two of them.
#[inline]
fn card_run_extent(s: &[u8], run_start: usize) -> (usize, usize, bool) {
    let n = s.len();
    let mut i = run_start;
    let mut digits = 0;
    let mut dashes = false;
    loop {
        while i < n && digit(s[i]) {
            i += 1;
            digits += 1;
        }
        if i + 1 < n && card_sep(s[i]) && digit(s[i + 1]) {
            dashes |= s[i] == b'-';
            i += 1;
        } else {
            return (i, digits, dashes);
        }
    }
}

/// Card numbers in the run `run_start..run_end` (see [`card_run_extent`]). A group of 13-19
/// digits is a candidate on its own; so is a window of groups starting with a group of 4 and
/// continuing with groups of 3-6 (4-4-4-4, 4-6-5, 4-4-4-4-3) with one separator, 13-19
/// digits in all. Candidates must pass Luhn, must not be all zeros, and must not touch a
/// letter or digit, nor be a decimal fraction or integer part (`0.4111…`, `4111….50`).
#[inline(never)]
fn card_candidates(s: &[u8], run_start: usize, run_end: usize, hits: &mut Vec<Hit>) {
    let n = s.len();
    let group_end = |mut j: usize| {
        while j < n && digit(s[j]) {
            j += 1;
        }
        j
    };
    let decimal_before = matches!(before(s, run_start), Some(b'.' | b','))
        && before(s, run_start - 1).is_some_and(digit);
    let left_ok = left_free(s, run_start) && !decimal_before;
    let decimal_after = matches!(s.get(run_end), Some(b'.' | b','))
        && s.get(run_end + 1).is_some_and(|&b| digit(b));
    let right_ok = right_free(s, run_end) && !decimal_after;
    let mut gs = run_start;
    while gs < run_end {
        let ge = group_end(gs);
        let len = ge - gs;
        let is_last = ge == run_end;
        if gs == run_start && !left_ok {
            // Glued to a letter or digit on the left: no candidate may start here.
        } else if (13..=19).contains(&len) {
            if (!is_last || right_ok) && card_ok(&s[gs..ge]) {
                hits.push(Hit {
                    start: gs,
                    end: ge,
                    det: Det::CreditCard,
                });
            }
        } else if len == 4 && !is_last {
            if let Some(end) = card_window(s, gs, ge, run_end, right_ok) {
                hits.push(Hit {
                    start: gs,
                    end,
                    det: Det::CreditCard,
                });
            }
        }
        gs = ge + 1;
    }
}

/// The longest Luhn-valid window of groups starting with the 4-digit group `gs..ge`.
fn card_window(s: &[u8], gs: usize, ge: usize, run_end: usize, right_ok: bool) -> Option<usize> {
    let sep = s[ge];
    let mut digits = 4;
    let mut best = None;
    let mut es = ge + 1;
    while es < run_end {
        let mut ee = es;
        while ee < run_end && digit(s[ee]) {
            ee += 1;
        }
        let len = ee - es;
        if s[es - 1] != sep || !(3..=6).contains(&len) {
            break;
        }
        digits += len;
        if digits > 19 {
            break;
        }
        if digits >= 13 && (ee < run_end || right_ok) && card_ok(&s[gs..ee]) {
            best = Some(ee);
        }
        es = ee + 1;
    }
    best
}

/// Luhn over the digits of `s` (separators skipped), and not all zeros.
fn card_ok(s: &[u8]) -> bool {
    let mut sum = 0u32;
    let mut double = false;
    let mut nonzero = false;
    for &b in s.iter().rev().filter(|b| b.is_ascii_digit()) {
        let mut d = u32::from(b - b'0');
        nonzero |= d != 0;
        if double {
            d *= 2;
            if d > 9 {
                d -= 9;
            }
        }
        sum += d;
        double = !double;
    }
    nonzero && sum.is_multiple_of(10)
}

// ---- us_ssn ----

/// `AAA-GG-SSSS` starting at `start` (the anchor is its first dash), with dashes, not touching
/// a letter, digit or dash, outside the ranges the SSA never issues: area 000, 666 or 9xx,
/// group 00, serial 0000. Undashed 9-digit numbers are not matched: they are indistinguishable
/// from ids.
#[inline(never)]
fn us_ssn_at(s: &[u8], start: usize) -> Option<usize> {
    let end = start + 11;
    let w = s.get(start..end)?;
    let all_digits = |r: std::ops::Range<usize>| w[r].iter().all(|&b| digit(b));
    if !(all_digits(0..3) && w[3] == b'-' && all_digits(4..6) && w[6] == b'-' && all_digits(7..11))
    {
        return None;
    }
    if !left_free(s, start) || before(s, start) == Some(b'-') {
        return None;
    }
    if !right_free(s, end) || s.get(end) == Some(&b'-') {
        return None;
    }
    let area = &w[0..3];
    if area == b"000"
        || area == b"666"
        || area[0] == b'9'
        || &w[4..6] == b"00"
        || &w[7..11] == b"0000"
    {
        return None;
    }
    Some(end)
}

// ---- iban ----

/// IBAN length by country (SWIFT IBAN registry).
fn iban_len(cc: &[u8]) -> Option<usize> {
    Some(match cc {
        b"NO" => 15,
        b"BE" => 16,
        b"DK" | b"FI" | b"FK" | b"FO" | b"GL" | b"NL" | b"SD" => 18,
        b"MK" | b"SI" => 19,
        b"AT" | b"BA" | b"EE" | b"KZ" | b"LT" | b"LU" | b"MN" | b"XK" => 20,
        b"CH" | b"HR" | b"LI" | b"LV" => 21,
        b"BG" | b"BH" | b"CR" | b"DE" | b"GB" | b"GE" | b"IE" | b"ME" | b"RS" | b"VA" => 22,
        b"AE" | b"GI" | b"IL" | b"IQ" | b"OM" | b"SO" | b"TL" => 23,
        b"AD" | b"CZ" | b"ES" | b"MD" | b"PK" | b"RO" | b"SA" | b"SE" | b"SK" | b"TN" | b"VG" => 24,
        b"LY" | b"PT" | b"ST" => 25,
        b"IS" | b"TR" => 26,
        b"BI" | b"DJ" | b"FR" | b"GR" | b"IT" | b"MC" | b"MR" | b"SM" => 27,
        b"AL" | b"AZ" | b"BY" | b"CY" | b"DO" | b"GT" | b"HN" | b"HU" | b"LB" | b"NI" | b"PL"
        | b"SV" => 28,
        b"BR" | b"EG" | b"PS" | b"QA" | b"UA" => 29,
        b"JO" | b"KW" | b"MU" | b"YE" => 30,
        b"MT" | b"SC" => 31,
        b"LC" => 32,
        b"RU" => 33,
        _ => return None,
    })
}

fn bban_char(b: u8) -> bool {
    b.is_ascii_uppercase() || digit(b)
}

/// Country code, 2 check digits (02-98), then up to 30 uppercase letters and digits, compact
/// or in space-separated groups of 4 (`DE89 3704 0044 0532 0130 00`). The total length must be
/// the registry length for a known country (15-34 otherwise), and the mod-97 checksum must
/// hold. Lowercase IBANs are not matched.
#[inline(never)]
fn iban_at(s: &[u8], i: usize) -> Option<usize> {
    let n = s.len();
    let shape = i + 15 <= n
        && s[i].is_ascii_uppercase()
        && s[i + 1].is_ascii_uppercase()
        && digit(s[i + 2])
        && digit(s[i + 3])
        && left_free(s, i);
    if !shape {
        return None;
    }
    let check = usize::from(s[i + 2] - b'0') * 10 + usize::from(s[i + 3] - b'0');
    if !(2..=98).contains(&check) {
        return None;
    }
    let want = iban_len(&s[i..i + 2]);
    let max = want.unwrap_or(34);
    let mut len = 4;
    let mut j = i + 4;
    // Candidate ends: (byte offset, length). Grouped form may stop at any group boundary.
    let mut ends: [(usize, usize); 9] = [(0, 0); 9];
    let mut count = 0;
    if s.get(j) == Some(&b' ') {
        while len < max && j + 1 < n && s[j] == b' ' && bban_char(s[j + 1]) {
            j += 1;
            let gs = j;
            while j < n && j - gs < 4 && len < max && bban_char(s[j]) {
                j += 1;
                len += 1;
            }
            if count < ends.len() {
                ends[count] = (j, len);
                count += 1;
            }
            if j - gs < 4 {
                break;
            }
        }
    } else {
        while j < n && len < max && bban_char(s[j]) {
            j += 1;
            len += 1;
        }
        ends[0] = (j, len);
        count = 1;
    }
    // Longest candidate first.
    for &(end, len) in ends[..count].iter().rev() {
        let len_ok = match want {
            Some(w) => len == w,
            None => (15..=34).contains(&len),
        };
        if len_ok && right_free(s, end) && iban_checksum(&s[i..end]) {
            return Some(end);
        }
    }
    None
}

/// ISO 13616 mod-97 over the IBAN with spaces skipped: the first 4 characters (always
/// country and check digits, never spaces) moved to the end, letters as 10-35.
fn iban_checksum(v: &[u8]) -> bool {
    let (head, body) = v.split_at(4);
    let mut r: u32 = 0;
    for &b in body.iter().chain(head).filter(|&&b| b != b' ') {
        r = if digit(b) {
            (r * 10 + u32::from(b - b'0')) % 97
        } else {
            (r * 100 + u32::from(b - b'A') + 10) % 97
        };
    }
    r == 1
}

// ---- phone ----

fn phone_sep(b: u8) -> bool {
    matches!(b, b' ' | b'-' | b'.')
}

/// A phone number anchored at `s[i] == b`. Two forms. International, at `+`: a country code
/// not starting with 0, 8-15 digits in all, with single spaces, dashes or dots between groups
/// and one parenthesised group (`+44 (0)20 7946 0958`). North American, at `(` or at the first
/// separator: `(415) 555-2671`, `415-555-2671`, `415.555.2671`, area code and exchange starting
/// 2-9, optionally after a `1-`, `1.` or `1 ` trunk prefix. Plain digit strings are never
/// phones: they are ids.
#[inline(never)]
fn phone_at(s: &[u8], i: usize, b: u8) -> Option<(usize, usize)> {
    match b {
        b'+' => phone_intl(s, i).map(|end| (i, end)),
        b'(' => phone_nanp_paren(s, i).map(|end| (nanp_start(s, i), end)),
        _ if i >= 3 => phone_nanp_plain(s, i - 3).map(|end| (nanp_start(s, i - 3), end)),
        _ => None,
    }
}

fn phone_intl(s: &[u8], plus: usize) -> Option<usize> {
    if before(s, plus).is_some_and(|b| alnum(b) || b == b'+') {
        return None;
    }
    let n = s.len();
    let mut j = plus + 1;
    if !s.get(j).is_some_and(|b| (b'1'..=b'9').contains(b)) {
        return None;
    }
    let mut digits = 0;
    let mut end = j;
    let mut paren = false;
    while j < n && digits <= 15 {
        let b = s[j];
        if digit(b) {
            digits += 1;
            j += 1;
            end = j;
        } else if phone_sep(b) && end == j && s.get(j + 1).is_some_and(|&c| digit(c) || c == b'(') {
            j += 1;
        } else if b == b'(' && !paren && digits > 0 {
            let Some(close) = (j + 2..(j + 6).min(n)).find(|&k| s[k] == b')') else {
                break;
            };
            if !s[j + 1..close].iter().all(|&c| digit(c)) {
                break;
            }
            paren = true;
            digits += close - j - 1;
            j = close + 1;
            end = j;
            if s.get(j).is_some_and(|&c| digit(c)) {
                continue;
            }
            if !(s.get(j).is_some_and(|&c| phone_sep(c)) && s.get(j + 1).is_some_and(|&c| digit(c)))
            {
                break;
            }
            j += 1;
        } else {
            break;
        }
    }
    ((8..=15).contains(&digits) && right_free(s, end)).then_some(end)
}

/// Whether `s[i..i+len]` are all digits, the first in 2-9 if `nanp_lead`.
fn digits_at(s: &[u8], i: usize, len: usize, nanp_lead: bool) -> bool {
    s.get(i..i + len)
        .is_some_and(|w| w.iter().all(|&b| digit(b)) && (!nanp_lead || w[0] >= b'2'))
}

/// The end of a North American number may not run on into more digits (`415-555-26712`,
/// `415-555-2671-3`).
fn nanp_right_ok(s: &[u8], end: usize) -> bool {
    right_free(s, end)
        && !(s.get(end).is_some_and(|&b| b == b'-' || b == b'.')
            && s.get(end + 1).is_some_and(|&b| digit(b)))
}

/// `(AAA) EEE-SSSS`, `(AAA)EEE-SSSS`, `(AAA) EEE SSSS`, `(AAA) EEE.SSSS`.
fn phone_nanp_paren(s: &[u8], i: usize) -> Option<usize> {
    if !left_free(s, i) || !digits_at(s, i + 1, 3, true) || s.get(i + 4) != Some(&b')') {
        return None;
    }
    let mut j = i + 5;
    if s.get(j) == Some(&b' ') {
        j += 1;
    }
    if !digits_at(s, j, 3, true) || !s.get(j + 3).is_some_and(|&b| phone_sep(b)) {
        return None;
    }
    let end = j + 8;
    (digits_at(s, j + 4, 4, false) && nanp_right_ok(s, end)).then_some(end)
}

/// `AAA-EEE-SSSS` or `AAA.EEE.SSSS` (one separator throughout).
fn phone_nanp_plain(s: &[u8], i: usize) -> Option<usize> {
    let sep = *s.get(i + 3)?;
    if !(sep == b'-' || sep == b'.') || s.get(i + 7) != Some(&sep) {
        return None;
    }
    if !(digits_at(s, i, 3, true) && digits_at(s, i + 4, 3, true) && digits_at(s, i + 8, 4, false))
    {
        return None;
    }
    // The byte before: a boundary, or the `1-`/`1 `/`1.` trunk prefix.
    let left_ok = match before(s, i) {
        Some(b) if digit(b) => false,
        None => true,
        Some(b'-' | b'.') => nanp_start(s, i) < i,
        Some(b) => !(alnum(b) || b == b'+'),
    };
    let end = i + 12;
    (left_ok && nanp_right_ok(s, end)).then_some(end)
}

/// Where a North American number starting at `i` really starts: before a lone `1-`, `1 ` or
/// `1.` trunk prefix if there is one.
fn nanp_start(s: &[u8], i: usize) -> usize {
    if i >= 2
        && matches!(s[i - 1], b'-' | b' ' | b'.')
        && s[i - 2] == b'1'
        && !before(s, i - 2).is_some_and(|b| alnum(b) || matches!(b, b'-' | b'.' | b'+'))
    {
        i - 2
    } else {
        i
    }
}

// ---- jwt ----

fn b64url(b: u8) -> bool {
    alnum(b) || b == b'-' || b == b'_'
}

/// At `s[p..] == "eyJ…"` (base64url of `{"`, the start of a JSON header) of 10+ characters,
/// then 2-4 more `.`-separated base64url segments (JWS has 3, JWE 5; the last JWS segment is
/// empty for `alg: none`). Also glued after other characters (`'x' || token`): the `eyJ` and
/// the dots are rare enough elsewhere. Returns the match and how far the candidate reached (no
/// other token starts before that).
#[inline(never)]
fn jwt_at(s: &[u8], p: usize) -> (Option<usize>, usize) {
    let n = s.len();
    let mut j = p;
    while j < n && b64url(s[j]) {
        j += 1;
    }
    if j - p < 10 {
        return (None, j);
    }
    let mut segments = 1;
    let mut last_dot = j;
    while segments < 5 && j < n && s[j] == b'.' {
        last_dot = j;
        j += 1;
        while j < n && b64url(s[j]) {
            j += 1;
        }
        segments += 1;
    }
    if segments > 3 && last_dot + 1 == j {
        // A trailing `.` after a complete token is punctuation, not an empty segment.
        j = last_dot;
        segments -= 1;
    }
    ((segments >= 3).then_some(j), j)
}

// ---- aws_access_key ----

const AWS_PREFIXES: [&[u8; 4]; 8] = [
    b"AKIA", b"ASIA", b"AGPA", b"AIDA", b"AROA", b"ANPA", b"ANVA", b"AIPA",
];

/// At `s[p]` (`A` or `a`): one of the AWS key-id prefixes and 16 letters or digits, also
/// inside a longer word: a key a bot glued to other characters (`x` || key, `key=AKIA…x`) is
/// still a key, and the pattern is rare enough outside keys (a prefix and 16 characters of 36)
/// that no boundary is needed against false positives. A key id is capitals and digits, so
/// its case carries nothing: `lower()`, `upper()` and `initcap()` of a key are keys too
/// (after the first character, letters of one case); only mixed case is not.
#[inline(never)]
fn aws_access_key_at(s: &[u8], p: usize) -> Option<usize> {
    let end = p + 20;
    let key = s.get(p..end)?;
    let lower = key[1].is_ascii_lowercase();
    let ok = AWS_PREFIXES
        .iter()
        .any(|pre| key[..4].eq_ignore_ascii_case(&pre[..]))
        && key[1..].iter().all(|&b| {
            digit(b)
                || if lower {
                    b.is_ascii_lowercase()
                } else {
                    b.is_ascii_uppercase()
                }
        });
    ok.then_some(end)
}

// ---- private_key ----

/// Characters of a PEM label (`RSA PRIVATE KEY`, `OPENSSH PRIVATE KEY`, ...).
fn pem_label_end(s: &[u8], from: usize) -> Option<usize> {
    let end = (from..s.len().min(from + 64))
        .find(|&k| !(s[k].is_ascii_uppercase() || digit(s[k]) || s[k] == b' '))?;
    s[end..].starts_with(b"-----").then_some(end)
}

/// At `-----BEGIN <label> PRIVATE KEY…-----`: through the matching `-----END …-----`, masked as
/// one block. A block without an end line is masked to the end of the value (a key cut short
/// is still a key).
#[inline(never)]
fn private_key_at(s: &[u8], b: usize) -> Option<usize> {
    const BEGIN: &[u8] = b"-----BEGIN ";
    const END: &[u8] = b"-----END ";
    if !s[b..].starts_with(BEGIN) {
        return None;
    }
    let label_start = b + BEGIN.len();
    let label_end = pem_label_end(s, label_start)?;
    memchr::memmem::find(&s[label_start..label_end], b"PRIVATE KEY")?;
    let body = label_end + 5;
    Some(match memchr::memmem::find(&s[body..], END) {
        Some(e) => {
            let ls = body + e + END.len();
            pem_label_end(s, ls).map_or(ls, |le| le + 5)
        }
        None => s.len(),
    })
}

// ---- bearer_token ----

/// Shortest token after `Bearer ` that is masked.
const TOKEN_MIN: usize = 20;

/// RFC 6750 `b64token` characters.
fn token_char(b: u8) -> bool {
    alnum(b) || matches!(b, b'-' | b'.' | b'_' | b'~' | b'+' | b'/')
}

/// At `Bearer` (any case, standing alone), spaces, then a token of 20+ characters (and `=`
/// padding): the token is masked, the scheme kept. Returns the token and how far the candidate
/// reached.
#[inline(never)]
fn bearer_token_at(s: &[u8], i: usize) -> (Option<(usize, usize)>, usize) {
    let n = s.len();
    if !(i + 7 <= n && s[i..i + 6].eq_ignore_ascii_case(b"bearer") && left_free(s, i)) {
        return (None, i + 1);
    }
    let mut j = i + 6;
    while j < n && (s[j] == b' ' || s[j] == b'\t') {
        j += 1;
    }
    if j == i + 6 {
        return (None, j);
    }
    let t = j;
    while j < n && token_char(s[j]) {
        j += 1;
    }
    let body = j - t;
    while j < n && s[j] == b'=' {
        j += 1;
    }
    ((body >= TOKEN_MIN).then_some((t, j)), j)
}

#[cfg(test)]
mod tests;
