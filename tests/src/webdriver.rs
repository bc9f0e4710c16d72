//! A small WebDriver client (W3C protocol over HTTP/JSON) for the browser test: chromedriver
//! driving Debian's headless Chromium. Only what the test uses.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// The W3C element key in WebDriver answers.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// chromedriver on a free port, killed on drop.
#[derive(Debug)]
pub struct Driver {
    child: Child,
    base: String,
}

impl Driver {
    pub fn start() -> Driver {
        let bin = ["chromedriver", "/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"]
            .into_iter()
            .find(|b| Command::new(b).arg("--version").output().is_ok_and(|o| o.status.success()))
            .expect("chromedriver is not installed: run `make test` (scripts/ensure-chromium.sh installs it)");
        let port = crate::free_port();
        let child = Command::new(bin)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        Driver {
            child,
            base: format!("http://127.0.0.1:{port}"),
        }
    }

    /// A headless Chromium session with a `width` x `height` window.
    pub async fn session(&self, width: u32, height: u32) -> Session {
        let chrome = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
            .into_iter()
            .find(|p| Path::new(p).exists());
        let mut opts = json!({ "args": [
            "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--hide-scrollbars", "--force-device-scale-factor=1", format!("--window-size={width},{height}"),
        ]});
        if let Some(c) = chrome {
            opts["binary"] = c.into();
        }
        let caps = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome", "goog:chromeOptions": opts,
        }}});
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::new();
        let v = call(
            &http,
            reqwest::Method::POST,
            &format!("{}/session", self.base),
            Some(caps),
        )
        .await;
        let id = v["sessionId"].as_str().expect("session id").to_owned();
        Session {
            http,
            base: format!("{}/session/{id}", self.base),
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn call(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    body: Option<Value>,
) -> Value {
    let mut req = http.request(method, url);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.expect("WebDriver request");
    let status = resp.status();
    let v: Value = resp.json().await.expect("WebDriver JSON");
    assert!(status.is_success(), "WebDriver {url}: {status} {v}");
    v["value"].clone()
}

/// One browser session; ended on drop (best effort).
#[derive(Debug)]
pub struct Session {
    http: reqwest::Client,
    base: String,
}

impl Session {
    async fn cmd(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        call(&self.http, method, &format!("{}{path}", self.base), body).await
    }

    pub async fn goto(&self, url: &str) {
        self.cmd(reqwest::Method::POST, "/url", Some(json!({ "url": url })))
            .await;
    }

    /// The element `css` names, waiting up to 20 s for it to exist.
    pub async fn find(&self, css: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let v = self
                .script(
                    "const e = document.querySelector(arguments[0]); return e ? true : false;",
                    json!([css]),
                )
                .await;
            if v == true {
                let e = self
                    .cmd(
                        reqwest::Method::POST,
                        "/element",
                        Some(json!({ "using": "css selector", "value": css })),
                    )
                    .await;
                return e[ELEMENT]
                    .as_str()
                    .unwrap_or_else(|| panic!("element {css}: {e}"))
                    .to_owned();
            }
            assert!(Instant::now() < deadline, "no element {css}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn click(&self, css: &str) {
        let e = self.find(css).await;
        self.cmd(
            reqwest::Method::POST,
            &format!("/element/{e}/click"),
            Some(json!({})),
        )
        .await;
    }

    /// Types `text` into the element (for a file input: the file's path).
    pub async fn type_into(&self, css: &str, text: &str) {
        let e = self.find(css).await;
        self.cmd(
            reqwest::Method::POST,
            &format!("/element/{e}/value"),
            Some(json!({ "text": text })),
        )
        .await;
    }

    /// Runs `js` (a function body; `arguments` are `args`) and returns its value.
    pub async fn script(&self, js: &str, args: Value) -> Value {
        self.cmd(
            reqwest::Method::POST,
            "/execute/sync",
            Some(json!({ "script": js, "args": args })),
        )
        .await
    }

    /// The visible text of `css` (empty if it does not exist).
    pub async fn text(&self, css: &str) -> String {
        let v = self
            .script(
                "const e = document.querySelector(arguments[0]); return e ? e.innerText : '';",
                json!([css]),
            )
            .await;
        v.as_str().unwrap_or_default().to_owned()
    }

    /// Waits up to `secs` for `js` (returning a boolean) to be true.
    pub async fn wait_until(&self, what: &str, secs: u64, js: &str) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while self.script(js, json!([])).await != true {
            assert!(Instant::now() < deadline, "waited {secs} s for {what}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Saves a PNG of the page to `path`.
    pub async fn screenshot(&self, path: &Path) {
        use base64::Engine as _;
        let v = self.cmd(reqwest::Method::GET, "/screenshot", None).await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().expect("base64"))
            .expect("PNG");
        std::fs::write(path, png).expect("write screenshot");
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let (http, url) = (self.http.clone(), self.base.clone());
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = http.delete(url).send().await;
            });
        }
    }
}
