use std::time::{Duration, Instant};

use super::*;

const KEY: [u8; 32] = [7; 32];

fn masker(detectors: &[&str], style: MaskStyle) -> Masker {
    Masker::with_detectors(detectors, style, KEY)
}

fn all(style: MaskStyle) -> Masker {
    masker(DETECTORS, style)
}

/// The masked text, `<NULL>` for SQL NULL, `None` if unchanged.
fn out(m: &Masker, v: &[u8]) -> Option<String> {
    match m.mask_text(v, false)? {
        Masked::Value(b, labels) => {
            assert!(!labels.is_empty(), "a change without a detector: {v:?}");
            Some(String::from_utf8_lossy(&b).into_owned())
        }
        Masked::Null(labels) => {
            assert!(!labels.is_empty());
            Some("<NULL>".to_string())
        }
    }
}

/// `text` through `detector` alone, style full.
fn full(detector: &str, text: &str) -> Option<String> {
    out(&masker(&[detector], MaskStyle::Full), text.as_bytes())
}

/// Each positive case becomes `expected` (with `********` where the secret was); each negative
/// case is left alone, by its own detector and by all of them together.
fn check(detector: &str, positives: &[(&str, &str)], negatives: &[&str]) {
    for (input, expected) in positives {
        assert_eq!(
            full(detector, input).as_deref(),
            Some(*expected),
            "{detector} should mask {input:?}"
        );
    }
    for input in negatives {
        assert_eq!(
            full(detector, input),
            None,
            "{detector} must not mask {input:?}"
        );
    }
}

fn policy(text: &str) -> tollgate_policy::Policy {
    let head = "[[target]]\nname = \"db\"\nprotocol = \"postgres\"\naddress = [\"127.0.0.1:5432\"]\n\
                [[target]]\nname = \"other\"\nprotocol = \"postgres\"\naddress = [\"127.0.0.1:5433\"]\n";
    tollgate_policy::parse(&format!("{head}{text}"), "t.toml").expect("valid policy")
}

#[test]
fn detector_names_follow_the_policy_contract() {
    let ours: Vec<&str> = Det::ALL.iter().map(|d| d.name()).collect();
    assert_eq!(ours, DETECTORS);
    assert_eq!(Det::ALL.len(), Det::COUNT);
}

#[test]
fn email() {
    check(
        "email",
        &[
            ("alice@example.com", "********"),
            ("mail: Bob.Smith+tag@mail.example.co.uk.", "mail: ********."),
            ("<a@b.co>", "<********>"),
            ("USER@EXAMPLE.ORG", "********"),
            ("a@example.com.123", "********.123"),
            ("x@a-b.example.com-- ok", "********-- ok"),
        ],
        &[
            "alice@localhost",
            "@example.com",
            "alice@",
            "a@b.c",
            "user@123.456",
            "j***@example.com",
            "foo @ bar.com",
            "a@-b.com",
            "a@b.com4111",
            "no at sign here.com",
        ],
    );
}

#[test]
fn credit_card() {
    check(
        "credit_card",
        &[
            ("4111111111111111", "********"),
            ("4111 1111 1111 1111", "********"),
            ("4111-1111-1111-1111", "********"),
            ("amex 378282246310005.", "amex ********."),
            ("3782 822463 10005", "********"),
            (
                "card: 5555555555554444, exp 12/27",
                "card: ********, exp 12/27",
            ),
            ("6011111111111117", "********"),
            ("4222222222222", "********"),
            ("qty 1 4111 1111 1111 1111", "qty 1 ********"),
            ("4111111111111111 1234", "******** 1234"),
            ("(4012888888881881)", "(********)"),
        ],
        &[
            "4111111111111112",
            "4111 1111 1111 1112",
            "12345678901234",
            "41111111111111111111",
            "x4111111111111111",
            "4111111111111111x",
            "0.4111111111111111",
            "4111111111111111.25",
            "0000000000000000",
            "4111 1111 1111 111",
            "1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6",
            "2024-05-17 12:34:56.789012+00",
        ],
    );
}

#[test]
fn us_ssn() {
    check(
        "us_ssn",
        &[
            ("123-45-6789", "********"),
            ("SSN: 078-05-1120.", "SSN: ********."),
            ("665-01-0001", "********"),
        ],
        &[
            "000-12-3456",
            "666-12-3456",
            "900-12-3456",
            "999-12-3456",
            "123-00-4567",
            "123-45-0000",
            "1123-45-6789",
            "123-45-67890",
            "a123-45-6789",
            "123-45-6789-1",
            "123456789",
            "123 45 6789",
        ],
    );
}

#[test]
fn iban() {
    check(
        "iban",
        &[
            ("DE89 3704 0044 0532 0130 00", "********"),
            ("DE89370400440532013000", "********"),
            ("GB82WEST12345698765432", "********"),
            ("GB82 WEST 1234 5698 7654 32 ok", "******** ok"),
            ("NO9386011117947", "********"),
            ("FR1420041010050500013M02606", "********"),
            ("iban=BE68539007547034;", "iban=********;"),
            // A known country stops at its registry length even if another group follows.
            ("PL61 1090 1014 0000 0712 1981 2874 2024", "******** 2024"),
            ("CH9300762011623852957", "********"),
        ],
        &[
            "DE89370400440532013001",
            "DE88 3704 0044 0532 0130 00",
            "de89370400440532013000",
            "XDE89370400440532013000",
            "DE8937040044053201300",
            "DE893704004405320130001",
            "DE01370400440532013000",
        ],
    );
}

#[test]
fn phone() {
    check(
        "phone",
        &[
            ("+14155552671", "********"),
            ("tel +1 415 555 2671.", "tel ********."),
            ("+44 20 7946 0958", "********"),
            ("+44 (0)20 7946 0958", "********"),
            ("+49-30-123456", "********"),
            ("(415) 555-2671", "********"),
            ("(415)555-2671", "********"),
            ("415-555-2671", "********"),
            ("415.555.2671", "********"),
            ("call 1-800-555-0199 now", "call ******** now"),
            ("+14155552671 (mobile)", "******** (mobile)"),
        ],
        &[
            "14155552671",
            "id 4155552671",
            "+0123456789",
            "+1234567",
            "1e+100000000",
            "115-555-2671",
            "415-155-2671",
            "2024-01-15",
            "415-555-26710",
            "415-555-2671-3",
            "v1.415.555.2671",
            "2024-05-17 12:34:56+00",
            "+1234567890123456",
            "550e8400-e29b-41d4-a716-446655440000",
        ],
    );
}

const JWT: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIiwiaWF0IjoxNTE2MjM5MDIyfQ.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c";

#[test]
fn jwt() {
    let sentence = format!("token {JWT}.");
    let jwe = format!("{JWT}.abc.def");
    // Glued to other characters (concatenated by the bot): still a token.
    let glued = format!("x{JWT}");
    let dotted = format!("a.{JWT}");
    check(
        "jwt",
        &[
            (JWT, "********"),
            (&sentence, "token ********."),
            ("eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.", "********"),
            (&jwe, "********"),
            (&glued, "x********"),
            (&dotted, "a.********"),
            ("xeyJhbGciOiJIUzI1NiJ9.a.b", "x********"),
        ],
        &[
            "eyJhbGciOiJIUzI1NiJ9.payload",
            "eyJhbG.a.b",
            "keyJhbGciOiJIUzI1NiJ9",
        ],
    );
}

#[test]
fn aws_access_key() {
    check(
        "aws_access_key",
        &[
            ("AKIAIOSFODNN7EXAMPLE", "********"),
            ("key=ASIAY34FZKBOKMUTVV7A;", "key=********;"),
            ("\"AROA1234567890ABCDEF\"", "\"********\""),
            // Glued to other characters (concatenated by the bot): still a key.
            ("XAKIAIOSFODNN7EXAMPLE", "X********"),
            ("AKIAIOSFODNN7EXAMPLEX", "********X"),
            (
                "prefix_AKIAIOSFODNN7EXAMPLE_suffix",
                "prefix_********_suffix",
            ),
            // lower(), initcap() of a key: its case carried nothing, so these are keys too.
            ("akiaiosfodnn7example", "********"),
            ("key=Akiaiosfodnn7example;", "key=********;"),
            ("xasiay34fzkbokmutvv7a", "x********"),
        ],
        &[
            "AKIAIOSFODNN7EXAMPL",
            "akiaiosfodnn7exampl",
            "ABCDIOSFODNN7EXAMPLE",
            "AKIAIOSFODNN7exAMPLE",
            "akiaIOSFODNN7EXAMPLE",
            "a hakia of words and more",
        ],
    );
}

const PEM: &str = "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA0Z3VS5JJcds3xfn/ygWyF8PbnGy0AHB7MhgHcTz6sE2I2yPB\naFDrBz9vFqU4yJ9sWwAfbQ6Fw==\n-----END RSA PRIVATE KEY-----";

#[test]
fn private_key() {
    let wrapped = format!("key:\n{PEM}\nend");
    let cut = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW";
    check(
        "private_key",
        &[
            (PEM, "********"),
            (&wrapped, "key:\n********\nend"),
            (cut, "********"),
            (
                "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIFHzBJBgkqhkiG9w0BBQ0w\n-----END ENCRYPTED PRIVATE KEY----- tail",
                "******** tail",
            ),
        ],
        &[
            "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIU\n-----END CERTIFICATE-----",
            "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE\n-----END PUBLIC KEY-----",
            "the words PRIVATE KEY alone",
        ],
    );
}

#[test]
fn bearer_token() {
    check(
        "bearer_token",
        &[
            (
                "Authorization: Bearer abcdefghijklmnopqrstuvwxyz0123",
                "Authorization: Bearer ********",
            ),
            (
                "bearer  dGhpcyBpcyBhIHNlY3JldCB0b2tlbg==",
                "bearer  ********",
            ),
            ("BEARER a.b-c_d~e+f/g1234567890123", "BEARER ********"),
        ],
        &[
            "Bearer short",
            "Bearertoken abcdefghijklmnopqrstuvwxyz",
            "xBearer abcdefghijklmnopqrstuvwxyz",
            "Bearer ********",
        ],
    );
}

#[test]
fn only_named_detectors_run() {
    let m = masker(&["email"], MaskStyle::Full);
    assert_eq!(out(&m, b"4111111111111111 AKIAIOSFODNN7EXAMPLE"), None);
    assert!(!masker(&[], MaskStyle::Full).has_detectors());
    assert_eq!(
        out(&masker(&[], MaskStyle::Full), b"alice@example.com"),
        None
    );
}

#[test]
fn several_matches_in_one_value() {
    let m = all(MaskStyle::Full);
    let v = b"mail a@b.co, card 4111 1111 1111 1111, mail c@d.io, key AKIAIOSFODNN7EXAMPLE";
    match m.mask_text(v, false) {
        Some(Masked::Value(b, labels)) => {
            assert_eq!(
                b,
                b"mail ********, card ********, mail ********, key ********".to_vec()
            );
            assert_eq!(labels, ["email", "credit_card", "email", "aws_access_key"]);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn overlapping_matches_are_one_span() {
    // The bearer token is also a JWT: one span, both detectors counted.
    let m = all(MaskStyle::Full);
    let v = format!("Bearer {JWT}");
    match m.mask_text(v.as_bytes(), false) {
        Some(Masked::Value(b, mut labels)) => {
            assert_eq!(b, b"Bearer ********".to_vec());
            labels.sort_unstable();
            assert_eq!(labels, ["bearer_token", "jwt"]);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn masking_reaches_a_fixed_point() {
    // The phone is glued to the email: only visible once the email is masked.
    let m = all(MaskStyle::Full);
    match m.mask_text(b"a@b.co+14155552671", false) {
        Some(Masked::Value(b, labels)) => {
            assert_eq!(b, b"********".to_vec());
            assert_eq!(labels, ["email", "phone"]);
        }
        other => panic!("{other:?}"),
    }
    for v in [
        "a@b.co+14155552671",
        "x@y.com4111111111111111",
        "AKIAIOSFODNN7EXAMPLE4111111111111111",
        "123-45-6789-4111111111111111",
        "4111111111111111.123-45-6789",
        "+14155552671.4111111111111111",
        "-----BEGIN PRIVATE KEY-----AKIAIOSFODNN7EXAMPLE",
        "Bearer a@b.coabcdefghijklmnopqrstuvwxyz",
        "DE89370400440532013000AKIAIOSFODNN7EXAMPLE",
    ] {
        if let Some(Masked::Value(b, _)) = m.mask_text(v.as_bytes(), false) {
            assert_eq!(
                m.mask_text(&b, false),
                None,
                "{v:?} -> {:?}",
                String::from_utf8_lossy(&b)
            );
        }
    }
}

/// Random soups of secret fragments and separators: `full` output never holds a match.
#[test]
fn full_output_never_matches_again() {
    let parts: [&[u8]; 34] = [
        b"4111",
        b"1111",
        b" ",
        b"-",
        b".",
        b"a@b.co",
        b"x.y@ex-ample.org",
        b"+1",
        b"+44 ",
        b"415",
        b"555",
        b"2671",
        b"(415) ",
        b"AKIA",
        b"IOSFODNN7EXAMPLE",
        b"eyJhbGciOiJIUzI1NiJ9",
        b"DE89",
        b"3704 0044 0532 0130 00",
        b"Bearer ",
        b"abcdefghij0123456789",
        b"x",
        b"9",
        b"0",
        b"(",
        b")",
        b"-----BEGIN RSA PRIVATE KEY-----",
        b"-----END RSA PRIVATE KEY-----",
        b"@",
        b"com",
        b"123-45-6789",
        b"\xff",
        b"*",
        b"1-",
        b"078-05-1120",
    ];
    let full = all(MaskStyle::Full);
    let others = [MaskStyle::Partial, MaskStyle::Hash, MaskStyle::Null].map(all);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for _ in 0..20_000 {
        let len = next() % 12 + 1;
        let v: Vec<u8> = (0..len)
            .flat_map(|_| {
                parts[(next() % parts.len() as u64) as usize]
                    .iter()
                    .copied()
            })
            .collect();
        match full.mask_text(&v, false) {
            Some(Masked::Value(out, labels)) => {
                assert!(!labels.is_empty());
                assert_eq!(
                    full.mask_text(&out, false),
                    None,
                    "{:?} -> {:?}",
                    String::from_utf8_lossy(&v),
                    String::from_utf8_lossy(&out)
                );
            }
            Some(Masked::Null(_)) => panic!("full never gives NULL"),
            None => {}
        }
        for m in &others {
            let _ = m.mask_text(&v, false);
        }
    }
}

#[test]
fn style_full_is_fixed_width() {
    let m = masker(&["credit_card", "email"], MaskStyle::Full);
    assert_eq!(out(&m, b"4222222222222").as_deref(), Some("********"));
    let long = format!("{}@example.com", "a".repeat(200));
    assert_eq!(out(&m, long.as_bytes()).as_deref(), Some("********"));
}

#[test]
fn style_partial() {
    let m = all(MaskStyle::Partial);
    let cases = [
        ("4111 1111 1111 1111", "****1111"),
        ("card 4111111111111111!", "card ****1111!"),
        ("123-45-6789", "****6789"),
        ("DE89 3704 0044 0532 0130 00", "****3000"),
        ("+1 415 555 2671", "****2671"),
        ("john.doe@example.com", "j***@example.com"),
        ("to: jo@example.com", "to: ***@example.com"),
        ("AKIAIOSFODNN7EXAMPLE", "****MPLE"),
        (PEM, "********"),
    ];
    for (input, expected) in cases {
        assert_eq!(
            out(&m, input.as_bytes()).as_deref(),
            Some(expected),
            "{input}"
        );
    }
}

#[test]
fn style_partial_column_values() {
    let m = all(MaskStyle::Partial);
    let col = |v: &[u8]| match m.mask_column(v, MaskStyle::Partial) {
        Masked::Value(b, labels) => {
            assert_eq!(labels, [COLUMN]);
            b
        }
        Masked::Null(_) => panic!("partial is never null"),
    };
    assert_eq!(col(b"Alice Smith"), b"****mith");
    assert_eq!(col(b"abc"), b"****c");
    assert_eq!(col(b"a"), b"****");
    assert_eq!(col(b""), b"****");
    assert_eq!(col("José".as_bytes()), "****sé".as_bytes());
    assert_eq!(col(b" john.doe@example.com "), b"j***@example.com");
    assert_eq!(col(b"4111-1111-1111-1111"), b"****1111");
    // Not UTF-8 (LATIN1 bytes): by byte.
    assert_eq!(col(b"\xe9t\xe9 caf\xe9"), b"****af\xe9".to_vec());
}

#[test]
fn style_hash_is_stable_and_keyed() {
    let a = Masker::with_detectors(&["email"], MaskStyle::Hash, KEY);
    let b = Masker::with_detectors(&["email"], MaskStyle::Hash, [8; 32]);
    let h1 = out(&a, b"alice@example.com").expect("masked");
    let h2 = out(&a, b"contact: alice@example.com").expect("masked");
    let other = out(&a, b"bob@example.com").expect("masked");
    let keyed = out(&b, b"alice@example.com").expect("masked");
    assert!(h1.starts_with("hash:") && h1.len() == 21, "{h1}");
    assert!(h1[5..].bytes().all(|c| c.is_ascii_hexdigit()));
    assert_eq!(
        h2,
        format!("contact: {h1}"),
        "same secret, same hash: joins work"
    );
    assert_ne!(h1, other);
    assert_ne!(h1, keyed, "another installation's key gives another hash");
    // A column value and the same bytes found by a detector hash alike.
    match a.mask_column(b"alice@example.com", MaskStyle::Hash) {
        Masked::Value(v, _) => assert_eq!(v, h1.as_bytes()),
        Masked::Null(_) => panic!("hash is never null"),
    }
}

#[test]
fn hash_is_hmac_sha256() {
    // RFC 4231 test case 1: a 20-byte key, zero-padded like ours.
    let mut key = [0u8; 32];
    key[..20].fill(0x0b);
    let mac = HashKey::new(key).mac(b"Hi There");
    let hex: String = mac.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(
        hex,
        "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"
    );
}

#[test]
fn style_null() {
    let m = all(MaskStyle::Null);
    assert_eq!(out(&m, b"alice@example.com").as_deref(), Some("<NULL>"));
    assert_eq!(out(&m, b"  4111111111111111\n").as_deref(), Some("<NULL>"));
    assert_eq!(
        out(&m, b"mail alice@example.com now").as_deref(),
        Some("mail ******** now")
    );
    assert_eq!(
        m.mask_column(b"anything", MaskStyle::Null),
        Masked::Null(vec![COLUMN])
    );
}

#[test]
fn column_rules() {
    let p = policy(
        "[[mask]]\ntargets = [\"db\"]\ncolumns = [\"*.email\", \"customers.card_number\"]\nstyle = \"partial\"\n\
         [[mask]]\ntargets = [\"*\"]\ncolumns = [\"ssn\"]\nstyle = \"null\"\n",
    );
    let m = Masker::for_target(&p, "db", KEY).expect("rules apply");
    assert!(m.column_masked(Some("public.customers"), "email"));
    assert!(m.column_masked(Some("public.customers"), "EMAIL"));
    assert!(m.column_masked(None, "email"), "expression named email");
    assert!(m.column_masked(Some("public.customers"), "card_number"));
    assert!(m.column_masked(Some("customers"), "card_number"));
    assert!(!m.column_masked(Some("public.orders"), "card_number"));
    assert!(!m.column_masked(None, "card_number"));
    assert!(!m.column_masked(Some("public.customers"), "name"));
    assert!(m.column_masked(Some("hr.people"), "ssn"));
    assert_eq!(
        m.column_style(Some("public.customers"), "email"),
        Some(MaskStyle::Partial)
    );
    assert_eq!(
        m.column_style(Some("hr.people"), "ssn"),
        Some(MaskStyle::Null)
    );
    // Without the column, mask_text takes the strictest column style: null.
    assert_eq!(
        m.mask_text(b"alice@example.com", true),
        Some(Masked::Null(vec![COLUMN]))
    );
    assert!(!m.has_detectors());
    assert_eq!(m.mask_text(b"alice@example.com", false), None);

    let only_star = Masker::for_target(&p, "other", KEY).expect("the * rule applies");
    assert!(!only_star.column_masked(Some("public.customers"), "email"));
    assert!(only_star.column_masked(None, "ssn"));
}

#[test]
fn for_target_is_none_without_rules() {
    let p = policy("[[mask]]\ntargets = [\"db\"]\ndetectors = [\"email\"]\n");
    assert!(Masker::for_target(&p, "other", KEY).is_none());
    let m = Masker::for_target(&p, "db", KEY).expect("applies");
    assert!(m.has_detectors());
    assert_eq!(
        out(&m, b"alice@example.com").as_deref(),
        Some("********"),
        "style defaults to full"
    );
    assert!(Masker::for_target(&policy(""), "db", KEY).is_none());
}

#[test]
fn strictest_style_wins_per_detector() {
    let p = policy(
        "[[mask]]\ntargets = [\"db\"]\ndetectors = [\"email\", \"credit_card\"]\nstyle = \"partial\"\n\
         [[mask]]\ntargets = [\"db\"]\ndetectors = [\"email\"]\nstyle = \"hash\"\n",
    );
    let m = Masker::for_target(&p, "db", KEY).expect("applies");
    let v = out(&m, b"a@b.co 4111111111111111").expect("masked");
    assert!(v.starts_with("hash:"), "{v}");
    assert!(v.ends_with(" ****1111"), "{v}");
    // A span where both fire takes the stricter style.
    assert_eq!(rank(stricter(Some(MaskStyle::Hash), MaskStyle::Partial)), 1);
    assert_eq!(
        stricter(Some(MaskStyle::Full), MaskStyle::Null),
        MaskStyle::Null
    );
    assert_eq!(stricter(None, MaskStyle::Partial), MaskStyle::Partial);
}

#[test]
fn debug_hides_the_key() {
    let s = format!("{:?}", all(MaskStyle::Hash));
    assert!(s.contains("redacted") && s.contains("email"), "{s}");
}

#[test]
fn non_utf8_and_arbitrary_bytes() {
    let m = all(MaskStyle::Full);
    assert_eq!(
        m.mask_text(b"\xff\xfealice@example.com\x80", false),
        Some(Masked::Value(
            b"\xff\xfe********\x80".to_vec(),
            vec!["email"]
        ))
    );
    // Every byte value, every short prefix of the tricky markers: no panic.
    let bytes: Vec<u8> = (0..=255u8).cycle().take(4096).collect();
    for style in [
        MaskStyle::Full,
        MaskStyle::Partial,
        MaskStyle::Hash,
        MaskStyle::Null,
    ] {
        let m = all(style);
        let _ = m.mask_text(&bytes, false);
        let _ = m.mask_text(&bytes, true);
        for marker in [
            "-----BEGIN RSA PRIVATE KEY-----",
            "eyJhbGciOiJIUzI1NiJ9.a.",
            "+44 (0",
            "(415) 555-",
            "DE89 3704 ",
            "Bearer ",
            "AKIA",
            "a@b.",
            "4111 1111 1111 111",
        ] {
            for end in 0..=marker.len() {
                let _ = m.mask_text(&marker.as_bytes()[..end], false);
            }
        }
    }
}

/// 1 MB values, adversarial for each scanner, finish in time proportional to their size.
#[test]
fn huge_values_take_linear_time() {
    const MB: usize = 1 << 20;
    let m = all(MaskStyle::Full);
    let patterns: [&[u8]; 14] = [
        b"a@",
        b"a.b@c",
        b"1 ",
        b"4111 ",
        b"1-",
        b"+1",
        b"eyJ.",
        b"eyJhbGciOiJIUzI1NiJ9.",
        b"-----BEGIN PRIVATE KEY-----",
        b"Bearer ",
        b"AKIA",
        b"DE89 ",
        b"(415",
        b"x",
    ];
    for p in patterns {
        let v: Vec<u8> = p.iter().copied().cycle().take(MB).collect();
        let t = Instant::now();
        let _ = m.mask_text(&v, false);
        let small = &v[..MB / 8];
        let t_small = Instant::now();
        let _ = m.mask_text(small, false);
        let (big, small) = (t.elapsed() - t_small.elapsed(), t_small.elapsed());
        // Quadratic would be 64x; allow noise on a loaded machine.
        assert!(
            big < small * 24 + Duration::from_millis(200),
            "{:?}: 1 MB took {big:?}, 128 KB {small:?}",
            String::from_utf8_lossy(p)
        );
    }
    // A 1 MB value full of secrets is masked whole, every one of them.
    let v: Vec<u8> = b"alice@example.com 4111111111111111 "
        .iter()
        .copied()
        .cycle()
        .take(MB)
        .collect();
    match m.mask_text(&v, false) {
        Some(Masked::Value(b, labels)) => {
            assert!(labels.len() > 50_000);
            assert!(!b.windows(16).any(|w| w == b"4111111111111111"));
        }
        other => panic!("{:?}", other.map(|o| o.detectors().len())),
    }
}

/// A deterministic mix of typical result fields, about 1 MB, some 5% holding a secret.
fn bench_fields() -> Vec<Vec<u8>> {
    let plain: [&[u8]; 10] = [
        b"42",
        b"1718623496",
        b"2024-05-17 12:34:56.789012+00",
        b"550e8400-e29b-41d4-a716-446655440000",
        b"Alice Smith",
        b"shipped",
        b"{\"id\": 42, \"status\": \"shipped\", \"items\": [1, 2, 3], \"total\": 129.95}",
        b"The quick brown fox jumps over the lazy dog; order 12345 left Berlin at 10:30.",
        b"3.141592653589793",
        b"t",
    ];
    let secret: [&[u8]; 8] = [
        b"alice@example.com",
        b"4111 1111 1111 1111",
        b"123-45-6789",
        b"DE89 3704 0044 0532 0130 00",
        b"(415) 555-2671",
        b"AKIAIOSFODNN7EXAMPLE",
        b"note: contact bob@example.org or +44 20 7946 0958 about the refund",
        JWT.as_bytes(),
    ];
    let mut fields = Vec::new();
    let mut total = 0;
    let mut x: u32 = 12345;
    while total < (1 << 20) {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
        let r = (x >> 16) as usize;
        let f = if r.is_multiple_of(20) {
            secret[r / 20 % secret.len()]
        } else {
            plain[r % plain.len()]
        };
        total += f.len();
        fields.push(f.to_vec());
    }
    fields
}

/// This thread's CPU time: unlike wall time, not inflated when a shared machine deschedules us.
fn cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the call only writes it.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0);
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// MB/s of `f` over `bytes` bytes, by CPU time: best of several rounds.
fn mbs(bytes: usize, mut f: impl FnMut()) -> f64 {
    let best = (0..7)
        .map(|_| {
            let t = cpu_time();
            f();
            cpu_time() - t
        })
        .min()
        .unwrap_or_default();
    bytes as f64 / best.as_secs_f64().max(1e-9) / 1e6
}

/// Throughput over about 1 MB of typical fields, laid out back to back as in a DataRow buffer.
/// `cargo test -p tollgate --release --lib mask::tests::bench -- --ignored --nocapture`
#[test]
#[ignore = "benchmark: run in release with --ignored --nocapture"]
fn bench_throughput() {
    let fields = bench_fields();
    let mut buf = Vec::new();
    let mut ranges = Vec::new();
    for f in &fields {
        ranges.push(buf.len()..buf.len() + f.len());
        buf.extend_from_slice(f);
    }
    let bytes = buf.len();
    let joined: Vec<u8> = fields.join(&b' ');
    for (name, style) in [("full", MaskStyle::Full), ("hash", MaskStyle::Hash)] {
        let m = all(style);
        let masked = ranges
            .iter()
            .filter(|r| m.mask_text(&buf[(*r).clone()], false).is_some())
            .count();
        let per_field = mbs(bytes, || {
            for r in &ranges {
                std::hint::black_box(m.mask_text(&buf[r.clone()], false));
            }
        });
        let one_value = mbs(joined.len(), || {
            std::hint::black_box(m.mask_text(&joined, false));
        });
        println!(
            "mask {name}, all detectors: {per_field:.0} MB/s over {} fields ({masked} masked), \
             {one_value:.0} MB/s as one 1 MB value",
            ranges.len(),
        );
    }
    let m = all(MaskStyle::Full);
    let clean: Vec<_> = ranges
        .iter()
        .filter(|r| m.mask_text(&buf[(*r).clone()], false).is_none())
        .cloned()
        .collect();
    let clean_bytes = clean.iter().map(|r| r.len()).sum();
    let clean_mbs = mbs(clean_bytes, || {
        for r in &clean {
            std::hint::black_box(m.mask_text(&buf[r.clone()], false));
        }
    });
    println!("mask full, all detectors, only the fields with no secret: {clean_mbs:.0} MB/s");
    for d in DETECTORS {
        let m = masker(&[d], MaskStyle::Full);
        let v = mbs(bytes, || {
            for r in &ranges {
                std::hint::black_box(m.mask_text(&buf[r.clone()], false));
            }
        });
        println!("  {d} alone: {v:.0} MB/s");
    }
}
