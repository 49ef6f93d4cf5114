//! A real Garage (2.5.0) for the object-storage tests: one single-node server per test on
//! loopback, in its own temp dir with its own ports, RPC secret and S3 key; bucket `coverd`;
//! stop and restart for outage tests; a client to read and write behind coverd's back.
#![allow(dead_code)] // each test uses the part of the helper it needs

use std::fs::{self, File};
use std::future::Future;
use std::io::{Read, Seek, SeekFrom};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use object_store::aws::{AmazonS3, AmazonS3Builder, Checksum};
use object_store::list::{PaginatedListOptions, PaginatedListStore};
use object_store::path::Path as ObjectPath;
use object_store::{BackoffConfig, ClientOptions, ObjectStoreExt, RetryConfig};

/// The version the tests are written against (its CLI and config format).
const VERSION: &str = "2.5.0";
const NOT_INSTALLED: &str = "garage 2.5.0 is not installed: run `cargo install garage --version 2.5.0 --locked` (.ci/run does it when it is missing)";
/// How long Garage gets to answer after a start (it takes 0.5 s alone, 3 s with 31 others).
const READY_WITHIN: Duration = Duration::from_secs(30);
/// Between two looks at a condition while waiting for it.
const POLL: Duration = Duration::from_millis(25);
/// For one CLI command (each takes about 50 ms).
const CLI_WITHIN: Duration = Duration::from_secs(10);
/// For one `garage status` while waiting for the node to come up.
const PROBE_WITHIN: Duration = Duration::from_secs(2);
/// Fresh ports tried when another process took one between our probe and Garage's bind.
const PORT_TRIES: usize = 5;

/// A running (or stopped) single-node Garage.
pub struct Garage {
    /// `http://127.0.0.1:PORT`, the S3 API.
    pub endpoint: String,
    pub bucket: String,
    pub region: String,
    pub access_key_id: String,
    pub secret_access_key: String,
    bin: PathBuf,
    dir: tempfile::TempDir,
    config: PathBuf,
    log: PathBuf,
    s3_port: u16,
    rpc_port: u16,
    child: Mutex<Option<Child>>,
}

/// What a CLI command did.
struct CliOutput {
    status: std::process::ExitStatus,
    stdout: String,
    stderr: String,
}

/// What a wait for Garage found.
enum Boot {
    Ready,
    /// Garage could not bind one of its ports: another process took it after we probed.
    PortTaken,
}

impl Garage {
    /// Starts a single-node Garage on loopback in a temp dir: config with data_fsync = true and
    /// metadata_fsync = true, replication_factor 1, layout assigned and applied, bucket "coverd"
    /// created, a key imported (`garage key import`; random per instance, in `access_key_id`
    /// and `secret_access_key`) and allowed read+write+owner on the bucket. Returns once the S3
    /// API answers requests signed with that key (about 0.5 s; 3 s with 32 starting at once).
    pub fn start() -> Garage {
        let bin = garage_bin();
        let dir = tempfile::Builder::new()
            .prefix("coverd-garage-")
            .tempdir()
            .expect("garage temp dir");
        let config = dir.path().join("garage.toml");
        let log = dir.path().join("garage.log");
        // Per instance, so that a test can never talk to another test's Garage by mistake.
        let access_key_id = format!("GK{}", random_hex(12));
        let secret_access_key = random_hex(32);
        let mut g = Garage {
            endpoint: String::new(),
            bucket: "coverd".into(),
            region: "garage".into(),
            access_key_id,
            secret_access_key,
            bin,
            dir,
            config,
            log,
            s3_port: 0,
            rpc_port: 0,
            child: Mutex::new(None),
        };
        for _ in 0..PORT_TRIES {
            g.configure();
            let from = g.spawn();
            if let Boot::PortTaken = g.wait(from, |g| {
                g.cli(&["status"], PROBE_WITHIN)
                    .is_some_and(|o| o.status.success())
            }) {
                g.kill();
                continue;
            }
            g.setup();
            if let Boot::PortTaken = g.wait(from, Garage::s3_answers) {
                g.kill();
                continue;
            }
            return g;
        }
        panic!(
            "garage: {PORT_TRIES} sets of free ports were each taken before garage bound them\n{}",
            g.log_tail()
        );
    }

    /// Stops the server (SIGKILL and wait) keeping its directories and ports.
    pub fn stop(&mut self) {
        self.kill();
    }

    /// Starts it again on the same directories and ports; returns once the S3 API answers.
    pub fn restart(&mut self) {
        self.kill();
        let from = self.spawn();
        if let Boot::PortTaken = self.wait(from, Garage::s3_answers) {
            panic!(
                "garage could not restart: port {} or {} was taken while it was stopped\n{}",
                self.s3_port,
                self.rpc_port,
                self.log_tail()
            );
        }
    }

    pub fn is_running(&self) -> bool {
        let mut child = self.child.lock().unwrap();
        match child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// An object_store client for tests (path style, plain http, the key above, SHA-256
    /// checksums on writes, two quick retries) to get/put/delete objects behind coverd's back.
    pub fn client(&self) -> AmazonS3 {
        self.builder(ClientOptions::new())
            .with_retry(RetryConfig {
                backoff: BackoffConfig::default(),
                max_retries: 2,
                retry_timeout: Duration::from_secs(10),
            })
            .build()
            .expect("garage client")
    }

    /// The object at `key`; `None` when there is none.
    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        let path = object_path(key);
        let s3 = self.client();
        block_on(async move {
            match s3.get(&path).await {
                Ok(got) => Some(got.bytes().await.expect("garage get body").to_vec()),
                Err(object_store::Error::NotFound { .. }) => None,
                Err(e) => panic!("garage get {key}: {e}"),
            }
        })
    }

    pub fn put(&self, key: &str, bytes: &[u8]) {
        let path = object_path(key);
        let s3 = self.client();
        let payload = bytes.to_vec().into();
        block_on(async move { s3.put(&path, payload).await })
            .unwrap_or_else(|e| panic!("garage put {key}: {e}"));
    }

    /// Deletes the object at `key` (nothing there is not an error, as in S3).
    pub fn delete(&self, key: &str) {
        let path = object_path(key);
        let s3 = self.client();
        block_on(async move { s3.delete(&path).await })
            .unwrap_or_else(|e| panic!("garage delete {key}: {e}"));
    }

    /// Every key starting with `prefix` (a plain string prefix, not a directory), sorted.
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        let s3 = self.client();
        let prefix = prefix.to_string();
        block_on(async move { list_keys(&s3, &prefix).await })
    }

    /// Bytes of the data blocks this Garage holds on disk (its `data_dir`): grows as an upload's
    /// parts are stored, before the object exists.
    pub fn data_bytes(&self) -> u64 {
        fn walk(dir: &Path) -> u64 {
            fs::read_dir(dir)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => walk(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        }
        walk(&self.dir.path().join("data"))
    }

    /// The server's log (stdout and stderr of every start), for a test's failure message.
    pub fn log_tail(&self) -> String {
        let Ok(mut f) = File::open(&self.log) else {
            return format!("(no garage log at {})", self.log.display());
        };
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = f.seek(SeekFrom::Start(len.saturating_sub(6000)));
        let mut text = Vec::new();
        let _ = f.read_to_end(&mut text);
        format!(
            "--- end of garage log {} ---\n{}",
            self.log.display(),
            String::from_utf8_lossy(&text)
        )
    }

    /// New ports, a fresh config and empty directories (a start after a lost port race must not
    /// find the old node's key and layout).
    fn configure(&mut self) {
        for d in ["meta", "data"] {
            let d = self.dir.path().join(d);
            if d.exists() {
                fs::remove_dir_all(&d).expect("garage: clear directory");
            }
        }
        // Both listeners are open together, so the two ports differ.
        let a = TcpListener::bind("127.0.0.1:0").expect("free port");
        let b = TcpListener::bind("127.0.0.1:0").expect("free port");
        self.s3_port = a.local_addr().unwrap().port();
        self.rpc_port = b.local_addr().unwrap().port();
        drop((a, b));
        self.endpoint = format!("http://127.0.0.1:{}", self.s3_port);
        let dir = self.dir.path().display();
        let text = format!(
            r#"metadata_dir = "{dir}/meta"
data_dir = "{dir}/data"
db_engine = "lmdb"
metadata_fsync = true
data_fsync = true
replication_factor = 1
rpc_bind_addr = "127.0.0.1:{rpc}"
rpc_public_addr = "127.0.0.1:{rpc}"
rpc_secret = "{secret}"

[s3_api]
s3_region = "{region}"
api_bind_addr = "127.0.0.1:{s3}"
"#,
            rpc = self.rpc_port,
            s3 = self.s3_port,
            secret = random_hex(32),
            region = self.region,
        );
        fs::write(&self.config, text).expect("write garage config");
    }

    /// Starts `garage server`; returns the log's length before it, where its own lines begin.
    fn spawn(&mut self) -> u64 {
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("garage log");
        let from = log.metadata().map(|m| m.len()).unwrap_or(0);
        let mut cmd = self.command();
        cmd.arg("server")
            .env("RUST_LOG", "garage=info,netapp=info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("garage log"))
            .stderr(log);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("garage: cannot run {}: {e}", self.bin.display()));
        *self.child.lock().unwrap() = Some(child);
        from
    }

    /// Layout, bucket, key and permissions through the CLI (which talks to the node over RPC).
    fn setup(&self) {
        let id = self.cli_ok(&["node", "id", "-q"]);
        let id = id.trim().split('@').next().unwrap_or_default().to_string();
        self.cli_ok(&["layout", "assign", "-z", "dc1", "-c", "1G", &id]);
        self.cli_ok(&["layout", "apply", "--version", "1"]);
        self.cli_ok(&["bucket", "create", &self.bucket]);
        self.cli_ok(&[
            "key",
            "import",
            "--yes",
            "-n",
            "coverd",
            &self.access_key_id,
            &self.secret_access_key,
        ]);
        self.cli_ok(&[
            "bucket",
            "allow",
            "--read",
            "--write",
            "--owner",
            &self.bucket,
            "--key",
            &self.access_key_id,
        ]);
    }

    /// Polls `ready` until it holds; the port race (Garage's log since `from` says a bind
    /// failed) ends the wait early; Garage exiting, or no answer within [`READY_WITHIN`], fails
    /// the test with the log.
    fn wait(&self, from: u64, ready: impl Fn(&Garage) -> bool) -> Boot {
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            // The S3 listener's bind failure is only logged (the process lives on), the RPC
            // listener's is a panic: look at the log first either way.
            if self.log_since(from).contains("Address already in use") {
                return Boot::PortTaken;
            }
            if !self.is_running() {
                panic!("garage exited while starting\n{}", self.log_tail());
            }
            if ready(self) {
                // An S3 bind failure could be logged right after another process answered on
                // that port: look once more.
                if self.log_since(from).contains("Address already in use") {
                    return Boot::PortTaken;
                }
                return Boot::Ready;
            }
            if Instant::now() > deadline {
                panic!(
                    "garage did not answer within {READY_WITHIN:?} (S3 {}, RPC port {})\n{}",
                    self.endpoint,
                    self.rpc_port,
                    self.log_tail()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// A signed request gets an answer: HEAD of a missing object is NotFound.
    fn s3_answers(&self) -> bool {
        let s3 = self
            .builder(ClientOptions::new().with_timeout(Duration::from_secs(2)))
            .with_retry(RetryConfig {
                backoff: BackoffConfig::default(),
                max_retries: 0,
                retry_timeout: Duration::from_secs(2),
            })
            .build()
            .expect("garage client");
        let path = ObjectPath::from("coverd-garage-ready-probe");
        match block_on(async move { s3.head(&path).await }) {
            Ok(_) | Err(object_store::Error::NotFound { .. }) => true,
            Err(_) => false,
        }
    }

    /// `options` first: the builder keeps `allow_http` in them.
    fn builder(&self, options: ClientOptions) -> AmazonS3Builder {
        AmazonS3Builder::new()
            .with_client_options(options)
            .with_endpoint(&self.endpoint)
            .with_bucket_name(&self.bucket)
            .with_region(&self.region)
            .with_access_key_id(&self.access_key_id)
            .with_secret_access_key(&self.secret_access_key)
            .with_allow_http(true)
            .with_virtual_hosted_style_request(false)
            .with_checksum_algorithm(Checksum::SHA256)
    }

    /// `garage -c <config>`, without the caller's GARAGE_* variables (they override the file).
    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.bin);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("GARAGE_") {
                cmd.env_remove(k);
            }
        }
        cmd.env("NO_COLOR", "1").arg("-c").arg(&self.config);
        cmd
    }

    /// `garage ARGS` against this node, given `within` to finish (a CLI that reached some
    /// other process on our RPC port would wait for its handshake forever): `None` when it did
    /// not (it is killed).
    fn cli(&self, args: &[&str], within: Duration) -> Option<CliOutput> {
        let out_path = self.dir.path().join("cli.out");
        let err_path = self.dir.path().join("cli.err");
        let mut child = self
            .command()
            .args(args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(File::create(&out_path).expect("garage cli output file"))
            .stderr(File::create(&err_path).expect("garage cli output file"))
            .spawn()
            .unwrap_or_else(|e| panic!("garage: cannot run {}: {e}", self.bin.display()));
        let deadline = Instant::now() + within;
        let status = loop {
            if let Some(status) = child.try_wait().expect("garage cli wait") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        Some(CliOutput {
            status,
            stdout: fs::read_to_string(&out_path).unwrap_or_default(),
            stderr: fs::read_to_string(&err_path).unwrap_or_default(),
        })
    }

    fn cli_ok(&self, args: &[&str]) -> String {
        let Some(out) = self.cli(args, CLI_WITHIN) else {
            panic!(
                "`garage {}` did not finish within {CLI_WITHIN:?}\n{}",
                args.join(" "),
                self.log_tail()
            );
        };
        if !out.status.success() {
            panic!(
                "`garage {}` failed ({}):\n{}{}\n{}",
                args.join(" "),
                out.status,
                out.stdout,
                out.stderr,
                self.log_tail()
            );
        }
        out.stdout
    }

    fn log_since(&self, from: u64) -> String {
        let mut text = Vec::new();
        if let Ok(mut f) = File::open(&self.log) {
            let _ = f.seek(SeekFrom::Start(from));
            let _ = f.read_to_end(&mut text);
        }
        String::from_utf8_lossy(&text).into_owned()
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.lock().unwrap().take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The garage binary: `COVERD_GARAGE`, else `garage` on PATH, else cargo's bin directory;
/// checked once to be 2.5.0.
fn garage_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let bin = find_garage().unwrap_or_else(|| panic!("{NOT_INSTALLED}"));
        let out = Command::new(&bin)
            .arg("--version")
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}\n{NOT_INSTALLED}", bin.display()));
        let version = String::from_utf8_lossy(&out.stdout);
        if !version.contains(VERSION) {
            panic!(
                "{} is `{}`, not {VERSION}\n{NOT_INSTALLED}",
                bin.display(),
                version.trim()
            );
        }
        bin
    })
    .clone()
}

fn find_garage() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("COVERD_GARAGE") {
        let p = PathBuf::from(p);
        if !p.is_file() {
            panic!(
                "COVERD_GARAGE={} is not a file\n{NOT_INSTALLED}",
                p.display()
            );
        }
        return Some(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let cargo_home = std::env::var_os("CARGO_HOME").map(PathBuf::from);
    let home_cargo = std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo"));
    std::env::split_paths(&path)
        .chain(
            cargo_home
                .into_iter()
                .chain(home_cargo)
                .map(|c| c.join("bin")),
        )
        .map(|d| d.join("garage"))
        .find(|p| p.is_file())
}

/// `key` as an object_store path, exactly (no normalising of `//` or `.`).
fn object_path(key: &str) -> ObjectPath {
    ObjectPath::parse(key).unwrap_or_else(|e| panic!("not an object key {key:?}: {e}"))
}

/// Runs `fut` on a small runtime of its own; on a thread of its own when the caller is already
/// inside a runtime (a `#[tokio::test]`), where blocking on another one would panic.
fn block_on<T: Send>(fut: impl Future<Output = T> + Send) -> T {
    let run = move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime")
            .block_on(fut)
    };
    if tokio::runtime::Handle::try_current().is_err() {
        return run();
    }
    std::thread::scope(|s| {
        s.spawn(run)
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

/// `n` random bytes from the kernel, hex.
fn random_hex(n: usize) -> String {
    let mut bytes = vec![0u8; n];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .expect("read /dev/urandom");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Every key of `s3`'s bucket starting with `prefix` (a plain string prefix, `""` for all),
/// sorted; panics when the store does not answer.
pub async fn list_keys(s3: &AmazonS3, prefix: &str) -> Vec<String> {
    let mut keys = Vec::new();
    let mut page_token = None;
    loop {
        let opts = PaginatedListOptions {
            page_token,
            ..Default::default()
        };
        let page = s3
            .list_paginated(Some(prefix).filter(|p| !p.is_empty()), opts)
            .await
            .unwrap_or_else(|e| panic!("list {prefix:?} in the bucket: {e}"));
        keys.extend(
            page.result
                .objects
                .into_iter()
                .map(|o| o.location.to_string()),
        );
        page_token = page.page_token;
        if page_token.is_none() {
            keys.sort();
            return keys;
        }
    }
}
