//! Headless Chromium for tests, driven through Debian's chromedriver (WebDriver: plain HTTP and
//! JSON, so no client library is needed). [`Browser::start`] spawns chromedriver on a free
//! loopback port and opens a headless session with its own profile directory; drop ends the
//! session (which closes Chromium) and kills chromedriver by pid.

use std::{
    net::SocketAddr,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use base64::Engine as _;
use serde_json::{json, Value};

use crate::{free_port, oidc::http_request, TempDir};

/// The W3C element reference key.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

pub struct Browser {
    driver: Child,
    addr: SocketAddr,
    session: String,
    dir: TempDir,
}

impl Browser {
    pub fn start(tag: &str) -> Browser {
        let dir = TempDir::new(&format!("browser-{tag}"));
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("chromedriver.log")).expect("log file");
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("chromedriver (Debian chromium-driver) is missing: run `cargo xtask setup`");
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut b = Browser {
            driver,
            addr,
            session: String::new(),
            dir,
        };
        crate::wait_for(Duration::from_secs(15), "chromedriver to listen", || {
            http_request(addr, "GET", "/status", &[], b"").ok()
        });
        let profile = b.dir.path().join("profile");
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless", "--no-sandbox", "--disable-gpu",
                         "--disable-background-networking", "--disable-dev-shm-usage",
                         "--window-size=1000,800",
                         format!("--user-data-dir={}", profile.display())],
            }
        }}});
        let v = b.call("POST", "/session", Some(caps));
        b.session = v["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no WebDriver session: {v}"))
            .to_string();
        b
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let (status, text) = http_request(
            self.addr,
            method,
            path,
            &[("Content-Type", "application/json")],
            body.as_bytes(),
        )
        .unwrap_or_else(|e| panic!("WebDriver {method} {path}: {e}"));
        let v: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("WebDriver {method} {path}: {e}: {text}"));
        assert_eq!(status, 200, "WebDriver {method} {path}: {text}");
        v["value"].clone()
    }

    fn session_call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        self.call(method, &format!("/session/{}{path}", self.session), body)
    }

    pub fn goto(&self, url: &str) {
        self.session_call("POST", "/url", Some(json!({ "url": url })));
    }

    pub fn url(&self) -> String {
        self.session_call("GET", "/url", None)
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    pub fn source(&self) -> String {
        self.session_call("GET", "/source", None)
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// The element matching a CSS selector, waiting up to 10 s for it.
    pub fn find(&self, css: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (status, text) = http_request(
                self.addr,
                "POST",
                &format!("/session/{}/element", self.session),
                &[("Content-Type", "application/json")],
                json!({"using": "css selector", "value": css})
                    .to_string()
                    .as_bytes(),
            )
            .expect("WebDriver find");
            if status == 200 {
                let v: Value = serde_json::from_str(&text).expect("json");
                return v["value"][ELEMENT]
                    .as_str()
                    .unwrap_or_else(|| panic!("no element id in {text}"))
                    .to_string();
            }
            if Instant::now() > deadline {
                panic!("no element {css} on {}: {}", self.url(), self.source());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn type_into(&self, css: &str, text: &str) {
        let el = self.find(css);
        self.session_call(
            "POST",
            &format!("/element/{el}/value"),
            Some(json!({ "text": text })),
        );
    }

    pub fn click(&self, css: &str) {
        let el = self.find(css);
        self.session_call("POST", &format!("/element/{el}/click"), Some(json!({})));
    }

    /// The rendered text of the element matching a CSS selector (waiting for it).
    pub fn text(&self, css: &str) -> String {
        let el = self.find(css);
        self.session_call("GET", &format!("/element/{el}/text"), None)
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// Wait until the text of `css` satisfies `pred`; returns it.
    pub fn wait_text(&self, css: &str, what: &str, pred: impl Fn(&str) -> bool) -> String {
        crate::wait_for(Duration::from_secs(15), what, || {
            let t = self.text(css);
            pred(&t).then_some(t)
        })
    }

    /// A cookie of the current page's origin (HttpOnly ones too), as WebDriver reports it:
    /// `name`, `value`, `path`, `httpOnly`, `secure`, `sameSite`, ...
    pub fn cookie(&self, name: &str) -> Value {
        self.session_call("GET", &format!("/cookie/{name}"), None)
    }

    /// Wait until the current URL satisfies `pred`; returns it.
    pub fn wait_url(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        crate::wait_for(Duration::from_secs(15), what, || {
            let u = self.url();
            pred(&u).then_some(u)
        })
    }

    /// Save a PNG screenshot of the page to `path`.
    pub fn screenshot(&self, path: &Path) {
        let v = self.session_call("GET", "/screenshot", None);
        let png = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().expect("screenshot base64"))
            .expect("screenshot decodes");
        assert!(png.starts_with(b"\x89PNG"), "screenshot is a PNG");
        std::fs::write(path, png).expect("write screenshot");
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = http_request(
                self.addr,
                "DELETE",
                &format!("/session/{}", self.session),
                &[],
                b"",
            );
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
