//! A headless Chromium (Debian's `chromium`) driven over the DevTools protocol, for the
//! dashboard test: a page is opened, its script runs against the real endpoint, and the
//! test reads the page's DOM and takes screenshots as a person would look at it.
//!
//! The protocol is JSON over one websocket (`tungstenite`, synchronous, no TLS: the
//! browser listens on loopback); a few commands are all a test needs, so no CDP crate
//! (and its build time) is pulled in. Calls block: from an async test, run them in
//! `tokio::task::block_in_place` so that the endpoint under test goes on answering.

use std::collections::HashMap;
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};
use tungstenite::{Message, WebSocket};

/// How long the browser may take to start and open its DevTools port.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// How long one protocol command may take (a navigation is answered once it started).
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// A running headless Chromium with one page attached; killed when dropped.
#[derive(Debug)]
pub struct Chromium {
    child: Child,
    ws: WebSocket<TcpStream>,
    /// The flat-mode session of the page: commands carrying it go to the page.
    session: String,
    next_id: u64,
    /// The page's requests by DevTools request id: their URLs, to name failed ones.
    requests: HashMap<String, String>,
    /// Requests of the page that failed below HTTP ("GET https://… : net::ERR_…"), in
    /// order: a page that shows "Failed to fetch" hides which error it was.
    failed: Vec<String>,
    _profile: tempfile::TempDir,
}

/// The base64 SHA-256 of the SubjectPublicKeyInfo of a DER certificate: what Chromium's
/// `--ignore-certificate-errors-spki-list` takes, so that only the endpoint's own key
/// is let through, not any certificate.
pub fn spki_sha256_base64(cert_der: &[u8]) -> String {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).expect("a DER certificate");
    let digest = ring::digest::digest(&ring::digest::SHA256, cert.tbs_certificate.subject_pki.raw);
    base64::engine::general_purpose::STANDARD.encode(digest.as_ref())
}

impl Chromium {
    /// Starts `chromium` (or `$CHROMIUM`) headless, trusting TLS servers whose
    /// certificate has the public key `spki_sha256` (see [`spki_sha256_base64`]), with a
    /// window of `width` x `height`. Fails the test, saying how to install it, when the
    /// browser is missing: a dashboard test that did not run must not pass.
    pub fn launch(spki_sha256: &str, width: u32, height: u32) -> Chromium {
        let binary = std::env::var("CHROMIUM").unwrap_or_else(|_| "chromium".to_owned());
        let profile = tempfile::tempdir().expect("a profile folder");
        let mut cmd = Command::new(&binary);
        cmd.arg("--headless")
            .arg("--disable-gpu")
            .arg("--no-first-run")
            .arg("--no-default-browser-check")
            .arg("--disable-extensions")
            .arg("--disable-background-networking")
            .arg("--disable-sync")
            .arg("--hide-scrollbars")
            .arg("--mute-audio")
            .arg(format!("--window-size={width},{height}"))
            // Port 0: the browser picks a free one and writes it into DevToolsActivePort.
            .arg("--remote-debugging-port=0")
            .arg("--remote-debugging-address=127.0.0.1")
            // The SPKI list is honoured only with a profile folder of one's own.
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg(format!("--ignore-certificate-errors-spki-list={spki_sha256}"))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(profile.path().join("chromium.log")).expect("a log file"));
        // Chromium refuses to start as root with its sandbox; the tests run as root in CI.
        if crate::proc_status(std::process::id(), "Uid") == "0" {
            cmd.arg("--no-sandbox");
        }
        let child = cmd.spawn().unwrap_or_else(|e| {
            panic!(
                "the dashboard test needs a headless browser and `{binary}` does not start ({e}): install Debian's \
                 `chromium` package (tests/setup.sh does: apt-get install chromium), or set CHROMIUM to the binary"
            )
        });
        let mut browser = Chromium::connect(child, profile);
        let target = browser.call_browser("Target.createTarget", json!({"url": "about:blank"}));
        let target_id = target["targetId"].as_str().expect("a target id").to_owned();
        let attached = browser.call_browser("Target.attachToTarget", json!({"targetId": target_id, "flatten": true}));
        browser.session = attached["sessionId"].as_str().expect("a session id").to_owned();
        browser.call("Page.enable", json!({}));
        browser.call("Network.enable", json!({}));
        browser
    }

    /// Waits for the DevTools port the browser writes into its profile, and connects.
    fn connect(mut child: Child, profile: tempfile::TempDir) -> Chromium {
        let file = profile.path().join("DevToolsActivePort");
        let deadline = Instant::now() + START_TIMEOUT;
        let (port, path) = loop {
            if let Ok(text) = std::fs::read_to_string(&file) {
                let mut lines = text.lines();
                if let (Some(port), Some(path)) = (lines.next(), lines.next()) {
                    break (port.trim().to_owned(), path.trim().to_owned());
                }
            }
            if let Ok(Some(status)) = child.try_wait() {
                let log = std::fs::read_to_string(profile.path().join("chromium.log")).unwrap_or_default();
                panic!("chromium exited at start ({status}):\n{log}");
            }
            assert!(
                Instant::now() < deadline,
                "chromium did not open its DevTools port within {START_TIMEOUT:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        let stream = TcpStream::connect(format!("127.0.0.1:{port}")).expect("the DevTools port");
        stream.set_read_timeout(Some(CALL_TIMEOUT)).expect("a read timeout");
        let (ws, _) =
            tungstenite::client(format!("ws://127.0.0.1:{port}{path}"), stream).expect("the DevTools websocket");
        Chromium {
            child,
            ws,
            session: String::new(),
            next_id: 0,
            requests: HashMap::new(),
            failed: Vec::new(),
            _profile: profile,
        }
    }

    fn send(&mut self, method: &str, params: Value, session: Option<String>) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut message = json!({"id": id, "method": method, "params": params});
        if let Some(session) = session {
            message["sessionId"] = Value::String(session);
        }
        self.ws
            .send(Message::text(message.to_string()))
            .unwrap_or_else(|e| panic!("DevTools {method}: {e}"));
        let deadline = Instant::now() + CALL_TIMEOUT;
        loop {
            assert!(
                Instant::now() < deadline,
                "DevTools {method}: no answer in {CALL_TIMEOUT:?}"
            );
            let frame = self.ws.read().unwrap_or_else(|e| panic!("DevTools {method}: {e}"));
            let Message::Text(text) = frame else { continue };
            let answer: Value = serde_json::from_str(text.as_str()).expect("DevTools speaks JSON");
            // Events (no id) and answers to nothing we wait for pass by, but for the
            // network's: they name the requests that fail.
            if answer["id"].as_u64() != Some(id) {
                self.note_network_event(&answer);
                continue;
            }
            if let Some(error) = answer.get("error") {
                panic!("DevTools {method} failed: {error}");
            }
            return answer["result"].clone();
        }
    }

    fn note_network_event(&mut self, event: &Value) {
        let params = &event["params"];
        let id = params["requestId"].as_str().unwrap_or_default().to_owned();
        match event["method"].as_str() {
            Some("Network.requestWillBeSent") => {
                let request = &params["request"];
                let line = format!(
                    "{} {}",
                    request["method"].as_str().unwrap_or("?"),
                    request["url"].as_str().unwrap_or("?")
                );
                self.requests.insert(id, line);
            }
            Some("Network.loadingFailed") => {
                let request = self.requests.remove(&id).unwrap_or_else(|| format!("request {id}"));
                let error = params["errorText"].as_str().unwrap_or("?");
                let canceled = if params["canceled"].as_bool() == Some(true) {
                    " (canceled)"
                } else {
                    ""
                };
                self.failed.push(format!("{request}: {error}{canceled}"));
            }
            Some("Network.loadingFinished") => {
                self.requests.remove(&id);
            }
            _ => {}
        }
    }

    /// The page's requests that failed below HTTP so far (a refused connection, a
    /// reset, a TLS error, a request the browser dropped on a network change), each as
    /// "METHOD URL: net::ERR_…".
    pub fn failed_requests(&self) -> &[String] {
        &self.failed
    }

    fn call_browser(&mut self, method: &str, params: Value) -> Value {
        self.send(method, params, None)
    }

    /// A command to the page.
    pub fn call(&mut self, method: &str, params: Value) -> Value {
        let session = self.session.clone();
        self.send(method, params, Some(session))
    }

    /// Opens `url` and waits until its document and scripts have loaded.
    pub fn navigate(&mut self, url: &str) {
        let result = self.call("Page.navigate", json!({"url": url}));
        if let Some(error) = result.get("errorText").and_then(Value::as_str) {
            panic!("chromium cannot open {url}: {error}");
        }
        self.wait_for(
            &format!("{url} loaded"),
            "document.readyState === 'complete'",
            Duration::from_secs(20),
        );
    }

    /// Evaluates `expression` in the page (awaiting a promise) and returns its value as
    /// JSON; a thrown exception fails the test.
    pub fn eval(&mut self, expression: &str) -> Value {
        let result = self.call(
            "Runtime.evaluate",
            json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
        );
        if let Some(e) = result.get("exceptionDetails") {
            panic!("{expression}: threw {e}");
        }
        result["result"]["value"].clone()
    }

    /// Evaluates `expression` every 100 ms until its value is neither false, null nor
    /// undefined, for at most `timeout`; returns that value. `what` names the wait in
    /// the failure, which shows the page's text.
    pub fn wait_for(&mut self, what: &str, expression: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.eval(expression);
            if !matches!(v, Value::Null | Value::Bool(false)) {
                return v;
            }
            if Instant::now() > deadline {
                let text = self.eval("document.body ? document.body.innerText : ''");
                panic!(
                    "waited {timeout:?} for {what} ({expression}); the page shows:\n{}\nrequests that failed: {:#?}",
                    text.as_str().unwrap_or_default(),
                    self.failed
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Saves a PNG of the whole page (beyond the window too) at `path`.
    pub fn screenshot(&mut self, path: &Path) {
        let metrics = self.call("Page.getLayoutMetrics", json!({}));
        let size = &metrics["cssContentSize"];
        let (w, h) = (
            size["width"].as_f64().unwrap_or(1400.0),
            size["height"].as_f64().unwrap_or(1000.0),
        );
        let shot = self.call(
            "Page.captureScreenshot",
            json!({"format": "png", "captureBeyondViewport": true,
                   "clip": {"x": 0, "y": 0, "width": w, "height": h, "scale": 1}}),
        );
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().expect("screenshot data"))
            .expect("base64 PNG");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("the screenshot folder");
        }
        std::fs::write(path, png).expect("the screenshot is written");
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        let _ = self.ws.close(None);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
