//! The client side of SCRAM-SHA-256 and SCRAM-SHA-256-PLUS (RFC 5802, RFC 7677) for logging in
//! upstream, with the salted password cached.
//!
//! postgres-protocol's `ScramSha256` runs PBKDF2 (4096 HMAC rounds by default) on every login
//! and offers no way to reuse the result. The salted password depends only on the password, the
//! role's salt and the iteration count, all of which stay the same from one connection to the
//! next, so a bot that connects once per transaction (`pgbench -C`) would pay for the same
//! derivation every time. [`SaltedPasswords`] caches it, keyed by a hash of the three (one
//! cache, a field of the PostgreSQL handler), and [`Scram`] does the rest of the exchange (fresh
//! nonce, proof, server signature check) per connection as usual.
//! Holding the salted password in memory is no weaker than holding the password itself, which
//! the agent already does.

use std::{collections::HashMap, fmt::Write as _, sync::Mutex};

use base64::{engine::general_purpose::STANDARD, Engine as _};
use hmac::{Hmac, Mac};
use rand::Rng as _;
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

/// PostgreSQL's client library refuses more; a hostile server could otherwise pin a core.
const MAX_ITERATIONS: u32 = 100_000_000;
/// Derived keys kept; the cache is cleared when it would grow past this.
const CACHE_CAP: usize = 64;

/// Channel binding, as the GS2 header announces it.
#[derive(Debug, Clone)]
pub enum Binding {
    /// `n`: the client does not support channel binding (plain TCP).
    Unsupported,
    /// `y`: the client supports it but the server did not offer the -PLUS mechanism.
    Unrequested,
    /// `p=tls-server-end-point`: bound to the hash of the server's certificate.
    TlsServerEndPoint(Vec<u8>),
}

impl Binding {
    fn gs2_header(&self) -> &'static str {
        match self {
            Binding::Unsupported => "n,,",
            Binding::Unrequested => "y,,",
            Binding::TlsServerEndPoint(_) => "p=tls-server-end-point,,",
        }
    }

    fn cbind_data(&self) -> &[u8] {
        match self {
            Binding::TlsServerEndPoint(h) => h,
            _ => &[],
        }
    }
}

/// Why the exchange failed. Never contains the password or a key.
#[derive(Debug, thiserror::Error)]
pub enum ScramError {
    #[error("malformed server message: {0}")]
    Malformed(&'static str),
    #[error("the server's nonce does not extend ours")]
    Nonce,
    #[error("iteration count {0} is out of range")]
    Iterations(u32),
    #[error("the server reported an error: {0}")]
    Server(String),
    #[error("the server's signature does not verify (it does not know the password)")]
    Signature,
    #[error("message out of order")]
    State,
}

enum State {
    First {
        nonce: String,
        password: Vec<u8>,
    },
    Final {
        salted: [u8; 32],
        auth_message: String,
    },
    Done,
}

/// One SCRAM exchange: send [`Scram::message`] in SASLInitialResponse, feed the server's
/// continue message to [`Scram::update`] and send the new message, then check the server's
/// final message with [`Scram::finish`].
pub struct Scram {
    binding: Binding,
    client_first_bare: String,
    message: String,
    state: State,
}

impl Scram {
    /// Start an exchange with a fresh random nonce. PostgreSQL takes the user from the startup
    /// message, so the SCRAM user name is empty.
    pub fn new(password: &[u8], binding: Binding) -> Scram {
        let mut rng = rand::thread_rng();
        // Printable ASCII except ',' (RFC 5802 `printable`).
        let nonce: String = (0..24)
            .map(|_| match rng.gen_range(0x21u8..0x7f) {
                b',' => '~',
                c => c as char,
            })
            .collect();
        Scram::with_nonce(password, binding, "", nonce)
    }

    /// An exchange with a chosen nonce, for the fuzz target (never for a real login: the nonce
    /// must be fresh and random).
    #[doc(hidden)]
    pub fn with_fixed_nonce_for_fuzzing(password: &[u8], nonce: &str) -> Scram {
        Scram::with_nonce(password, Binding::Unrequested, "", nonce.to_string())
    }

    fn with_nonce(password: &[u8], binding: Binding, user: &str, nonce: String) -> Scram {
        let client_first_bare = format!("n={user},r={nonce}");
        let message = format!("{}{client_first_bare}", binding.gs2_header());
        Scram {
            binding,
            client_first_bare,
            message,
            state: State::First {
                nonce,
                password: normalize(password),
            },
        }
    }

    /// The message to send next.
    pub fn message(&self) -> &[u8] {
        self.message.as_bytes()
    }

    /// Take the server-first message (`r=...,s=...,i=...`) and prepare the client-final one,
    /// deriving the salted password through `cache`.
    pub fn update(
        &mut self,
        server_first: &[u8],
        cache: &SaltedPasswords,
    ) -> Result<(), ScramError> {
        let State::First { nonce, password } = std::mem::replace(&mut self.state, State::Done)
        else {
            return Err(ScramError::State);
        };
        let text = std::str::from_utf8(server_first).map_err(|_| ScramError::Malformed("UTF-8"))?;
        let (mut r, mut s, mut i) = (None, None, None);
        for attr in text.split(',') {
            match attr.split_at_checked(2) {
                Some(("r=", v)) if r.is_none() => r = Some(v),
                Some(("s=", v)) if s.is_none() => s = Some(v),
                Some(("i=", v)) if i.is_none() => i = Some(v),
                Some(("m=", _)) => return Err(ScramError::Malformed("mandatory extension")),
                // RFC 5802 allows extensions after `i`; anything else out of place is bad.
                _ if r.is_some() && s.is_some() && i.is_some() => {}
                _ => return Err(ScramError::Malformed("server-first attributes")),
            }
        }
        let (r, s, i) = match (r, s, i) {
            (Some(r), Some(s), Some(i)) => (r, s, i),
            _ => return Err(ScramError::Malformed("server-first attributes")),
        };
        if r.len() <= nonce.len() || !r.starts_with(&nonce) || r.contains(',') {
            return Err(ScramError::Nonce);
        }
        let salt = STANDARD
            .decode(s)
            .map_err(|_| ScramError::Malformed("salt"))?;
        let iterations: u32 = i.parse().map_err(|_| ScramError::Malformed("iterations"))?;
        if iterations == 0 || iterations > MAX_ITERATIONS {
            return Err(ScramError::Iterations(iterations));
        }
        let salted = cache.get(&password, &salt, iterations);
        let client_key = hmac(&salted, b"Client Key");
        let stored_key: [u8; 32] = Sha256::digest(client_key).into();

        let mut cbind = self.binding.gs2_header().as_bytes().to_vec();
        cbind.extend_from_slice(self.binding.cbind_data());
        let mut without_proof = String::new();
        let _ = write!(without_proof, "c={},r={r}", STANDARD.encode(&cbind));
        let auth_message = format!("{},{text},{without_proof}", self.client_first_bare);
        let signature = hmac(&stored_key, auth_message.as_bytes());
        let mut proof = client_key;
        for (p, s) in proof.iter_mut().zip(signature) {
            *p ^= s;
        }
        self.message = format!("{without_proof},p={}", STANDARD.encode(proof));
        self.state = State::Final {
            salted,
            auth_message,
        };
        Ok(())
    }

    /// Check the server-final message (`v=...` or `e=...`): the server proves it knows the
    /// password too.
    pub fn finish(&mut self, server_final: &[u8]) -> Result<(), ScramError> {
        let State::Final {
            salted,
            auth_message,
        } = std::mem::replace(&mut self.state, State::Done)
        else {
            return Err(ScramError::State);
        };
        let text = std::str::from_utf8(server_final).map_err(|_| ScramError::Malformed("UTF-8"))?;
        let first = text.split(',').next().unwrap_or("");
        if let Some(e) = first.strip_prefix("e=") {
            return Err(ScramError::Server(e.chars().take(100).collect()));
        }
        let v = first
            .strip_prefix("v=")
            .ok_or(ScramError::Malformed("server-final"))?;
        let v = STANDARD
            .decode(v)
            .map_err(|_| ScramError::Malformed("verifier"))?;
        let server_key = hmac(&salted, b"Server Key");
        let mut mac = HmacSha256::new_from_slice(&server_key).expect("any key length");
        mac.update(auth_message.as_bytes());
        mac.verify_slice(&v).map_err(|_| ScramError::Signature)
    }
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut mac = HmacSha256::new_from_slice(key).expect("any key length");
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// SASLprep the password as libpq does: if it is not valid UTF-8 or does not prepare, the raw
/// bytes are used.
fn normalize(password: &[u8]) -> Vec<u8> {
    match std::str::from_utf8(password) {
        Ok(s) => match stringprep::saslprep(s) {
            Ok(p) => p.into_owned().into_bytes(),
            Err(_) => password.to_vec(),
        },
        Err(_) => password.to_vec(),
    }
}

/// Salted passwords (`Hi(password, salt, i)`) already derived, keyed by a SHA-256 of the three;
/// cleared when it would grow past [`CACHE_CAP`]. One per PostgreSQL handler, shared by its
/// sessions.
#[derive(Default)]
pub struct SaltedPasswords {
    derived: Mutex<HashMap<[u8; 32], [u8; 32]>>,
}

impl SaltedPasswords {
    /// `Hi(password, salt, i)` (PBKDF2-HMAC-SHA-256, one block), from the cache when the same
    /// password, salt and count were derived before.
    fn get(&self, password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update((password.len() as u64).to_be_bytes());
        h.update(password);
        h.update((salt.len() as u64).to_be_bytes());
        h.update(salt);
        h.update(iterations.to_be_bytes());
        let key: [u8; 32] = h.finalize().into();
        if let Some(v) = crate::lock(&self.derived).get(&key) {
            return *v;
        }
        let v = hi(password, salt, iterations);
        let mut c = crate::lock(&self.derived);
        if c.len() >= CACHE_CAP {
            c.clear();
        }
        c.insert(key, v);
        v
    }

    /// How many salted passwords are kept.
    pub fn len(&self) -> usize {
        crate::lock(&self.derived).len()
    }

    /// Whether none is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn hi(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
    let prf = HmacSha256::new_from_slice(password).expect("any key length");
    let mut mac = prf.clone();
    mac.update(salt);
    mac.update(&1u32.to_be_bytes());
    let mut u: [u8; 32] = mac.finalize().into_bytes().into();
    let mut out = u;
    for _ in 1..iterations {
        let mut mac = prf.clone();
        mac.update(&u);
        u = mac.finalize().into_bytes().into();
        for (o, x) in out.iter_mut().zip(u) {
            *o ^= x;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 7677 section 3: user "user", password "pencil".
    #[test]
    fn rfc7677_exchange() {
        let mut s = Scram::with_nonce(
            b"pencil",
            Binding::Unsupported,
            "user",
            "rOprNGfwEbeRWgbNEkqO".into(),
        );
        assert_eq!(s.message(), b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO");
        s.update(b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096", &SaltedPasswords::default())
            .expect("update");
        assert_eq!(
            std::str::from_utf8(s.message()).expect("utf8"),
            "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
        );
        s.finish(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")
            .expect("server signature");
    }

    #[test]
    fn a_wrong_server_signature_or_error_fails() {
        let start = || {
            let mut s = Scram::with_nonce(
                b"pencil",
                Binding::Unsupported,
                "user",
                "rOprNGfwEbeRWgbNEkqO".into(),
            );
            s.update(b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096", &SaltedPasswords::default())
                .expect("update");
            s
        };
        assert!(matches!(
            start().finish(b"v=AAAATRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="),
            Err(ScramError::Signature)
        ));
        assert!(matches!(
            start().finish(b"e=invalid-proof"),
            Err(ScramError::Server(_))
        ));
        assert!(matches!(
            start().finish(b"x=1"),
            Err(ScramError::Malformed(_))
        ));
    }

    #[test]
    fn hostile_server_first_messages_are_refused() {
        let fresh = || Scram::with_nonce(b"pw", Binding::Unsupported, "", "abc".into());
        for bad in [
            &b"r=xyz1,s=c2FsdA==,i=4096"[..], // nonce not extended from ours
            b"r=abc,s=c2FsdA==,i=4096",       // not extended at all
            b"r=abcd,s=!!!,i=4096",           // salt not base64
            b"r=abcd,s=c2FsdA==,i=0",
            b"r=abcd,s=c2FsdA==,i=4294967295",
            b"r=abcd,s=c2FsdA==",
            b"m=ext,r=abcd,s=c2FsdA==,i=1",
            b"\xff",
            b"",
        ] {
            assert!(
                fresh().update(bad, &SaltedPasswords::default()).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let mut s = fresh();
        assert!(s.finish(b"v=AAAA").is_err(), "final before first");
    }

    #[test]
    fn the_cache_answers_with_the_same_key_and_only_for_the_same_inputs() {
        let cache = SaltedPasswords::default();
        let a = cache.get(b"secret", b"salt-1", 4096);
        assert_eq!(a, hi(b"secret", b"salt-1", 4096));
        assert_eq!(a, cache.get(b"secret", b"salt-1", 4096));
        assert_eq!(cache.len(), 1, "the same inputs are derived once");
        assert_ne!(a, cache.get(b"secret", b"salt-2", 4096));
        assert_ne!(a, cache.get(b"secret", b"salt-1", 4097));
        assert_ne!(a, cache.get(b"other", b"salt-1", 4096));
        assert_eq!(cache.len(), 4);
        // Two handlers' caches are apart: nothing is process-wide.
        assert!(SaltedPasswords::default().is_empty());
        for i in 0..CACHE_CAP as u32 {
            cache.get(b"secret", b"salt-1", 1 + i);
        }
        assert!(cache.len() <= CACHE_CAP, "bounded: {}", cache.len());
    }

    #[test]
    fn plus_binds_the_certificate_hash() {
        let mut s = Scram::with_nonce(
            b"pw",
            Binding::TlsServerEndPoint(vec![1, 2, 3]),
            "",
            "abc".into(),
        );
        assert!(s.message().starts_with(b"p=tls-server-end-point,,n=,r=abc"));
        s.update(b"r=abcdef,s=c2FsdA==,i=16", &SaltedPasswords::default())
            .expect("update");
        let mut cbind = b"p=tls-server-end-point,,".to_vec();
        cbind.extend([1, 2, 3]);
        let want = format!("c={},r=abcdef,p=", STANDARD.encode(cbind));
        assert!(std::str::from_utf8(s.message())
            .expect("utf8")
            .starts_with(&want));
    }
}
