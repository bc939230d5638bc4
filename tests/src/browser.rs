//! Headless Chromium (Debian's `chromium`, installed by `cargo xtask setup`), driven over the
//! DevTools protocol on a pipe (`--remote-debugging-pipe`: JSON messages ended by a NUL byte,
//! read by the browser on descriptor 3 and written on 4): load a page, run JavaScript in it,
//! resize the viewport, take screenshots. The traffic graph's browser test and the demo use it.

use std::{
    fs::File,
    io::{self, Read, Write},
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::process::CommandExt,
    },
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc::{self, Receiver},
    time::{Duration, Instant},
};

use anyhow::{Context, bail, ensure};
use base64::Engine;
use serde_json::{Value, json};

/// How long one DevTools call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// The Chromium binary: `$INTERCEPTOR_CHROMIUM`, else `chromium` on `PATH`. Fails loudly,
/// naming the fix, when there is none.
pub fn chromium_bin() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("INTERCEPTOR_CHROMIUM") {
        let path = PathBuf::from(path);
        ensure!(
            path.is_file(),
            "INTERCEPTOR_CHROMIUM={} is not a file: point it at a Chromium binary, or unset it \
             and run `cargo xtask setup`, which installs Debian's chromium",
            path.display()
        );
        return Ok(path);
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join("chromium"))
        .find(|path| path.is_file())
        .context(
            "headless Chromium is required (the traffic graph's browser test, the demo's \
             screenshot) but `chromium` is not on PATH: run `cargo xtask setup`, which installs \
             Debian's chromium package, or set INTERCEPTOR_CHROMIUM to a Chromium binary",
        )
}

/// A directory under the cargo target directory (`$CARGO_TARGET_DIR`, else `target/`), created.
pub fn output_dir(name: &str) -> anyhow::Result<PathBuf> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let dir = target.join(name);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir.canonicalize()?)
}

/// A running headless Chromium with one page attached; closed and cleaned up on drop.
pub struct Browser {
    child: Child,
    to_browser: File,
    from_browser: Receiver<Value>,
    next_id: u64,
    session: String,
    profile: PathBuf,
}

impl Browser {
    /// Starts Chromium through `command` (a [`chromium_bin`] command, perhaps prepared to run
    /// in a lab namespace) with a `width`×`height` window and a fresh profile.
    pub fn launch(mut command: Command, width: u32, height: u32) -> anyhow::Result<Self> {
        let profile = std::env::temp_dir().join(format!(
            "interceptor-chromium-{}-{}",
            std::process::id(),
            PROFILES.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&profile)?;
        let log = File::create(profile.join("chromium.log"))?;
        let (browser_reads, we_write) = pipe()?;
        let (we_read, browser_writes) = pipe()?;
        let (reads_fd, writes_fd) = (browser_reads.as_raw_fd(), browser_writes.as_raw_fd());
        command
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--remote-debugging-pipe",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--hide-scrollbars",
                "--mute-audio",
                "--lang=en-GB",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg(format!("--window-size={width},{height}"))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // SAFETY: only async-signal-safe calls (fcntl, dup2) on descriptors this process owns;
        // the two pipe ends are first moved above 10 so that placing one on 3 cannot close the
        // other.
        unsafe {
            command.pre_exec(move || {
                let reads = libc::fcntl(reads_fd, libc::F_DUPFD_CLOEXEC, 10);
                let writes = libc::fcntl(writes_fd, libc::F_DUPFD_CLOEXEC, 10);
                if reads < 0 || writes < 0 || libc::dup2(reads, 3) < 0 || libc::dup2(writes, 4) < 0
                {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command
            .spawn()
            .with_context(|| format!("starting {:?}", command.get_program()))?;
        drop((browser_reads, browser_writes));
        let (tx, from_browser) = mpsc::channel();
        let mut reader = File::from(we_read);
        std::thread::spawn(move || {
            let mut pending = Vec::new();
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    break;
                }
                pending.extend_from_slice(&buf[..n]);
                while let Some(end) = pending.iter().position(|b| *b == 0) {
                    let message: Vec<u8> = pending.drain(..=end).collect();
                    if let Ok(value) = serde_json::from_slice(&message[..end])
                        && tx.send(value).is_err()
                    {
                        return;
                    }
                }
            }
        });
        let mut browser = Browser {
            child,
            to_browser: File::from(we_write),
            from_browser,
            next_id: 1,
            session: String::new(),
            profile,
        };
        let targets = browser.call("Target.getTargets", json!({}))?;
        let page = targets["targetInfos"]
            .as_array()
            .and_then(|t| t.iter().find(|t| t["type"] == "page"))
            .and_then(|t| t["targetId"].as_str())
            .map(str::to_owned);
        let page = match page {
            Some(id) => id,
            None => browser.call("Target.createTarget", json!({"url": "about:blank"}))?["targetId"]
                .as_str()
                .context("Target.createTarget gave no targetId")?
                .to_owned(),
        };
        let attached = browser.call(
            "Target.attachToTarget",
            json!({"targetId": page, "flatten": true}),
        )?;
        browser.session = attached["sessionId"]
            .as_str()
            .context("Target.attachToTarget gave no sessionId")?
            .to_owned();
        browser.call("Page.enable", json!({}))?;
        Ok(browser)
    }

    /// Sends one DevTools command (to the page once attached) and waits for its result.
    pub fn call(&mut self, method: &str, params: Value) -> anyhow::Result<Value> {
        let id = self.next_id;
        self.next_id += 1;
        let mut message = json!({"id": id, "method": method, "params": params});
        if !self.session.is_empty() {
            message["sessionId"] = json!(self.session);
        }
        let mut bytes = serde_json::to_vec(&message)?;
        bytes.push(0);
        self.to_browser
            .write_all(&bytes)
            .with_context(|| format!("Chromium stopped listening: {}", self.log_tail()))?;
        let deadline = Instant::now() + CALL_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let reply = self.from_browser.recv_timeout(left).map_err(|_| {
                anyhow::anyhow!(
                    "Chromium did not answer {method} within {CALL_TIMEOUT:?}: {}",
                    self.log_tail()
                )
            })?;
            if reply["id"] != json!(id) {
                continue; // an event, or a late answer to an abandoned call
            }
            if let Some(error) = reply.get("error") {
                bail!("{method}: {error}");
            }
            return Ok(reply["result"].clone());
        }
    }

    /// Loads `url` and waits until the document is complete.
    pub fn navigate(&mut self, url: &str) -> anyhow::Result<()> {
        let result = self.call("Page.navigate", json!({"url": url}))?;
        if let Some(error) = result.get("errorText") {
            bail!("loading {url}: {error}");
        }
        self.wait_for(
            "document.readyState === 'complete'",
            Duration::from_secs(15),
        )
        .with_context(|| format!("loading {url}"))?;
        Ok(())
    }

    /// The value of a JavaScript expression in the page (promises are awaited).
    pub fn eval(&mut self, expression: &str) -> anyhow::Result<Value> {
        let result = self.call(
            "Runtime.evaluate",
            json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
        )?;
        if let Some(exception) = result.get("exceptionDetails") {
            bail!("JavaScript `{expression}` threw: {exception}");
        }
        Ok(result["result"]["value"].clone())
    }

    /// Waits until `expression` is truthy, checking every 50 ms; returns its value.
    pub fn wait_for(&mut self, expression: &str, timeout: Duration) -> anyhow::Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let value = self.eval(expression)?;
            let truthy = match &value {
                Value::Null | Value::Bool(false) => false,
                Value::Number(n) => n.as_f64() != Some(0.0),
                Value::String(s) => !s.is_empty(),
                _ => true,
            };
            if truthy {
                return Ok(value);
            }
            ensure!(
                Instant::now() < deadline,
                "`{expression}` still false after {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sets the page's viewport (`mobile` for a phone's) and gives the page time to lay out.
    pub fn set_viewport(
        &mut self,
        width: u32,
        height: u32,
        scale: f64,
        mobile: bool,
    ) -> anyhow::Result<()> {
        self.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": width, "height": height, "deviceScaleFactor": scale, "mobile": mobile}),
        )?;
        self.eval("new Promise(done => setTimeout(done, 500))")?;
        Ok(())
    }

    /// Saves a PNG of the viewport to `path`.
    pub fn screenshot(&mut self, path: &Path) -> anyhow::Result<()> {
        let shot = self.call("Page.captureScreenshot", json!({"format": "png"}))?;
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().context("no screenshot data")?)?;
        ensure!(
            png.starts_with(b"\x89PNG\r\n\x1a\n"),
            "the screenshot is not a PNG"
        );
        std::fs::write(path, png).with_context(|| format!("writing {}", path.display()))
    }

    /// The end of Chromium's own output, for error messages.
    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.profile.join("chromium.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().rev().take(8).collect();
        format!(
            "chromium's last output: {}",
            lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
        )
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        self.session.clear();
        let _ = self.call("Browser.close", json!({}));
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// Distinguishes the profiles of browsers started by one process.
static PROFILES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// A pipe: (read end, write end), both close-on-exec.
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array it is given, which we then own.
    unsafe {
        if libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok((OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])))
    }
}
