//! Runs the real `coverd` binary in a scratch directory: writes a TOML config, spawns
//! `coverd serve`, learns its port from the "coverd is ready" log line, waits for `/healthz`,
//! sends signals, and runs `coverd admin … --json` commands. Every wait is on a condition
//! with a generous deadline (CI machines are slow and shared), never a blind sleep.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_coverd");

/// How long a daemon may take to start, answer or stop on a loaded machine.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// Environment variables that would change what the binary does; removed for every run.
const SCRUBBED_ENV: [&str; 11] = [
    "COVERD_CONFIG",
    "COVERD_NOTIFY_SECRET",
    "COVERD_DATA_DIR",
    "COVERD_LISTEN",
    "KIE_API_KEY",
    "KIE_WEBHOOK_HMAC_KEY",
    "CREDENTIALS_DIRECTORY",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "JOURNAL_STREAM",
    "RUST_LOG",
];

/// Where the binary under test looks for an installed unit (`COVERD_SYSTEMD_ROOT`): a path
/// that does not exist, so that a `coverd.service` installed on the test machine changes
/// nothing. Tests of the unit point the variable at a fixture tree of their own.
pub const NO_SYSTEMD_ROOT: &str = "/nonexistent/coverd-test-systemd-root";

/// A `coverd` command with a clean environment.
pub fn coverd() -> Command {
    scrubbed(BIN)
}

/// `program` (coverd, or a wrapper such as strace that runs it) with a clean environment.
pub fn scrubbed(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new(program);
    for var in SCRUBBED_ENV {
        cmd.env_remove(var);
    }
    cmd.env("COVERD_SYSTEMD_ROOT", NO_SYSTEMD_ROOT);
    cmd.stdin(Stdio::null());
    cmd
}

/// A scratch directory holding `coverd.toml` and the data directory `data/`.
pub struct Scratch {
    pub dir: tempfile::TempDir,
}

impl Scratch {
    pub fn new() -> Scratch {
        Scratch {
            dir: tempfile::tempdir().expect("scratch dir"),
        }
    }

    /// A fake KIE, and a scratch directory whose test configuration points at it.
    pub async fn with_fake() -> (crate::fake_kie::FakeKie, Scratch) {
        let fake = crate::fake_kie::FakeKie::start().await;
        let scratch = Scratch::new();
        scratch.write_config(&fake.base_url(), "", "");
        (fake, scratch)
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("coverd.toml")
    }

    /// Writes the test configuration: any free port, callbacks for unknown tasks accepted,
    /// plain http to the fake on loopback allowed (the binary has no test hooks), fast
    /// backoff, no API key (so no polling). `extra` is appended verbatim (more tables).
    pub fn write_config(&self, fake_base_url: &str, download_extra: &str, extra: &str) {
        let text = self.config_text(fake_base_url, ["", "", download_extra], extra);
        std::fs::write(self.config_path(), text).expect("write config");
    }

    /// The configuration [`Scratch::write_config`] writes, with `[top, kie, download]`
    /// lines added to the top level and those tables, and `extra` appended.
    pub fn config_text(&self, fake_base_url: &str, added: [&str; 3], extra: &str) -> String {
        let [top, kie, download] = added;
        format!(
            r#"data_dir = {data:?}
listen = "127.0.0.1:0"
accept_unknown_tasks = true
{top}

[kie]
base_url = {base:?}
{kie}

[download]
allow_http = true
allowed_hosts = []
allow_private_networks = true
backoff_base = "10ms"
backoff_max = "50ms"
timeout = "30s"
{download}
{extra}
"#,
            data = self.data_dir().display().to_string(),
            base = fake_base_url,
        )
    }

    /// Writes `text` as the whole config file.
    pub fn write_raw_config(&self, text: &str) {
        std::fs::write(self.config_path(), text).expect("write config");
    }

    /// `coverd serve --config <this config>`, started and healthy.
    pub async fn serve(&self) -> Daemon {
        Daemon::spawn(self.serve_command(), self.data_dir()).await
    }

    pub fn serve_command(&self) -> Command {
        let mut cmd = coverd();
        cmd.arg("serve").arg("--config").arg(self.config_path());
        cmd
    }

    /// `coverd --config <this config> <args>`, run to completion off the async runtime.
    pub async fn run(&self, args: &[&str]) -> Outcome {
        let mut cmd = coverd();
        cmd.arg("--config").arg(self.config_path()).args(args);
        run(cmd).await
    }

    /// `coverd admin <args> --json`, which must succeed; its stdout as JSON.
    pub async fn admin_json(&self, args: &[&str]) -> Value {
        let mut all = vec!["admin"];
        all.extend_from_slice(args);
        all.push("--json");
        let out = self.run(&all).await;
        assert_eq!(out.code, Some(0), "coverd {all:?} failed: {out:?}");
        serde_json::from_str(&out.stdout)
            .unwrap_or_else(|e| panic!("coverd {all:?} printed no JSON ({e}): {out:?}"))
    }

    /// Every task as `coverd admin export` prints it (one JSON object per line, events
    /// included), or why the export failed (exit status other than 0, or a line that is not
    /// JSON). Works with the daemon running (admin socket) or stopped (store opened directly).
    pub async fn export(&self) -> Result<Vec<Value>, String> {
        let out = self.run(&["admin", "export"]).await;
        if out.code != Some(0) {
            return Err(format!("coverd admin export failed: {out:?}"));
        }
        out.stdout
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str(l).map_err(|e| {
                    format!("coverd admin export printed a line that is not JSON ({e}): {l}")
                })
            })
            .collect()
    }
}

/// What a finished command did.
#[derive(Debug)]
pub struct Outcome {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// `nobody`'s uid (and, on Debian, its group's gid), for the tests that run coverd as
/// another user than root.
pub const NOBODY: u32 = 65534;

/// Whether the tests run as root (acting as another user needs it; CI runs as root).
pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Runs `cmd` to completion without a runtime (proptest, plain `#[test]`), its output
/// captured; SIGKILLs it and fails the test, showing what it printed, if it runs longer than
/// [`PATIENCE`] (a command that loops on a crafted record must not hang the suite).
pub fn output_blocking(cmd: &mut Command) -> std::process::Output {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run coverd");
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(PATIENCE) {
        Ok(out) => out.expect("wait for coverd"),
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            let out = rx.recv().expect("waiter").expect("wait for coverd");
            panic!(
                "{cmd:?} did not finish within {PATIENCE:?}: exit {:?}\nstdout: {}\nstderr: {}",
                out.status.code(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// Runs `cmd` to completion on a blocking thread (the fake KIE keeps serving meanwhile);
/// SIGKILLs it if it runs longer than [`PATIENCE`] (e.g. a `serve` that should have failed).
pub async fn run(mut cmd: Command) -> Outcome {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run coverd");
    let pid = child.id();
    let waiter = tokio::task::spawn_blocking(move || child.wait_with_output());
    let out = match tokio::time::timeout(PATIENCE, waiter).await {
        Ok(joined) => joined.expect("join").expect("wait for coverd"),
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            panic!("{cmd:?} did not finish within {PATIENCE:?}");
        }
    };
    Outcome {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A port that was free a moment ago (bound to 127.0.0.1:0, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// A running `coverd serve` process. Killed (SIGKILL) when dropped.
pub struct Daemon {
    child: Mutex<Child>,
    pub pid: u32,
    pub addr: SocketAddr,
    pub base: String,
    pub data_dir: PathBuf,
    log: Arc<Mutex<String>>,
    reader: Option<std::thread::JoinHandle<()>>,
    http: reqwest::Client,
}

impl Daemon {
    /// Spawns `cmd` (a `coverd serve …`), reads its stderr (logs) on a thread, and returns
    /// once it has logged "coverd is ready addr=…" and `/healthz` answers 200.
    pub async fn spawn(cmd: Command, data_dir: PathBuf) -> Daemon {
        let daemon = Daemon::spawn_ready(cmd, data_dir).await;
        daemon.wait_healthy().await;
        daemon
    }

    /// [`Daemon::spawn`], returning once it has logged that it is ready, whatever
    /// `/healthz` says (a test that makes it fail at any moment).
    pub async fn spawn_ready(mut cmd: Command, data_dir: PathBuf) -> Daemon {
        // `info` for the ready line; sled's own chatter kept out.
        cmd.env("RUST_LOG", "info,sled=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn coverd serve");
        let pid = child.id();
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(String::new()));
        let (ready_tx, ready_rx) = mpsc::channel::<SocketAddr>();
        let reader = {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    if line.contains("coverd is ready")
                        && let Some(addr) = line
                            .split_whitespace()
                            .find_map(|w| w.strip_prefix("addr="))
                            .and_then(|a| a.parse().ok())
                    {
                        let _ = ready_tx.send(addr);
                    }
                    let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
                    log.push_str(&line);
                    log.push('\n');
                }
            })
        };
        let deadline = Instant::now() + PATIENCE;
        let addr = loop {
            match ready_rx.try_recv() {
                Ok(addr) => break addr,
                Err(mpsc::TryRecvError::Disconnected) | Err(mpsc::TryRecvError::Empty) => {}
            }
            if let Ok(Some(status)) = child.try_wait() {
                let _ = reader.join();
                panic!(
                    "coverd serve exited ({status}) before it was ready:\n{}",
                    log.lock().unwrap()
                );
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!(
                    "coverd serve not ready within {PATIENCE:?}:\n{}",
                    log.lock().unwrap()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        Daemon {
            child: Mutex::new(child),
            pid,
            addr,
            base: format!("http://{addr}"),
            data_dir,
            log,
            reader: Some(reader),
            http: client(),
        }
    }

    /// Waits until `GET /healthz` answers 200 `ok`.
    pub async fn wait_healthy(&self) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Ok(resp) = self.http.get(format!("{}/healthz", self.base)).send().await
                && resp.status() == 200
                && resp.text().await.is_ok_and(|t| t == "ok")
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "/healthz never answered 200:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Everything the daemon logged so far.
    pub fn logs(&self) -> String {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Waits until the logs contain `needle`.
    pub async fn wait_for_log(&self, needle: &str) {
        let deadline = Instant::now() + PATIENCE;
        while !self.logs().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "never logged {needle:?}:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// SIGKILL, at once (`Child::kill`), then reaps the process.
    pub fn kill(&self) {
        let mut child = self.child.lock().unwrap_or_else(|p| p.into_inner());
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Sends `signal` ("TERM", "INT", …) with kill(1).
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid.to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} {} failed", self.pid);
    }

    /// Waits for the process to exit; returns its status and its whole log.
    pub async fn wait_exit(mut self) -> (ExitStatus, String) {
        let deadline = Instant::now() + PATIENCE;
        let status = loop {
            let polled = self
                .child
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .try_wait()
                .expect("try_wait");
            if let Some(status) = polled {
                break status;
            }
            if Instant::now() > deadline {
                self.kill();
                panic!("coverd did not exit within {PATIENCE:?}:\n{}", self.logs());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        if let Some(reader) = self.reader.take() {
            let _ = tokio::task::spawn_blocking(move || reader.join()).await;
        }
        (status, self.logs())
    }

    /// SIGTERM, then waits for a clean exit (status 0).
    pub async fn stop(self) -> String {
        self.signal("TERM");
        let (status, logs) = self.wait_exit().await;
        assert_eq!(status.code(), Some(0), "unclean stop:\n{logs}");
        logs
    }

    /// POSTs a callback body; status and body, or the transport error.
    pub async fn callback(&self, body: String) -> Result<(u16, String), reqwest::Error> {
        self.callback_on("cover", body).await
    }

    /// POSTs a callback body on `/callbacks/<kind>`; status and body, or the transport
    /// error.
    pub async fn callback_on(
        &self,
        kind: &str,
        body: String,
    ) -> Result<(u16, String), reqwest::Error> {
        let resp = self
            .http
            .post(format!("{}/callbacks/{kind}", self.base))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await?;
        let status = resp.status().as_u16();
        Ok((status, resp.text().await?))
    }

    /// `GET path`: status and body.
    pub async fn get(&self, path: &str) -> (u16, String) {
        crate::harness::get_text(&self.http, &format!("{}{path}", self.base)).await
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let child = self.child.get_mut().unwrap_or_else(|p| p.into_inner());
        if let Ok(None) = child.try_wait() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// An HTTP client for the daemon: no proxy, generous timeout.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("http client")
}

/// Waits (polling `coverd admin status --json`) until `pred` holds on the status JSON.
pub async fn wait_status(scratch: &Scratch, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    wait_admin(scratch, &["status"], what, pred).await
}

/// Waits (polling `coverd admin <args> --json`) until `pred` holds on what it prints.
pub async fn wait_admin(
    scratch: &Scratch,
    args: &[&str],
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let shown = scratch.admin_json(args).await;
        if pred(&shown) {
            return shown;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not reached within {PATIENCE:?}; last `admin {args:?}`: {shown}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every directory and file under `dir` (not following links), `dir` included.
pub fn tree(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![dir.to_path_buf()];
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(path.clone());
            }
            out.push(path);
        }
    }
    out
}

/// Every file under `dir` that is not a directory, relative to `base`, sorted.
pub fn files_under(base: &Path, dir: &Path) -> Vec<String> {
    let mut out: Vec<String> = tree(dir)
        .into_iter()
        .filter(|path| !path.is_dir())
        .map(|path| {
            let rel = path.strip_prefix(base).unwrap_or(&path);
            rel.display().to_string()
        })
        .collect();
    out.sort();
    out
}

/// The entries of the data directory's `tmp/` (partial downloads), unsorted.
pub fn tmp_entries(data_dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(data_dir.join("tmp"))
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}
