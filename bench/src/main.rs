//! coverd's benchmarks (issue 9, `docs/benchmarks.md`). Each subcommand starts the real
//! `coverd` binary (build it with `cargo build --release` first) in a scratch data
//! directory on the same disk as the repository, and measures it against a baseline in the
//! same run, so that the figure that matters is a ratio rather than an absolute number:
//!
//! - `ingest`: failure callbacks for new task ids (`accept_unknown_tasks = true`) over
//!   keep-alive connections, at a fixed concurrency (closed loop) or a fixed rate (open
//!   loop, latency measured from the intended send time), against a no-op hyper server
//!   answering the same 200; throughput, p50/p99/p99.9 and the ratio.
//! - `downloads`: images from a local file server at concurrency 4, against
//!   `curl --parallel --parallel-max 4` into files followed by `sync` of those files.
//! - `footprint`: idle RSS (empty store), peak RSS while ingesting N callbacks, store bytes
//!   per task, time to `/healthz` 200 after a restart (warm and with the store's pages
//!   dropped from the page cache), idle RSS after that restart.
//!
//! Helper processes (`noop-server`, `file-server`) are this binary started again, so that
//! the baselines run in their own process like coverd does. Nothing here is run by
//! `cargo test`; it owns no part of coverd and must not link it.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::{Parser, Subcommand};
use http_body_util::{BodyExt, Full};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Parser)]
#[command(about = "coverd benchmarks against same-run baselines")]
struct Cli {
    /// The coverd binary to measure.
    #[arg(long, global = true, default_value = "target/release/coverd")]
    coverd: PathBuf,
    /// Scratch directory (made and removed); keep it on the disk coverd will use.
    #[arg(long, global = true, default_value = "target/bench-work")]
    work_dir: PathBuf,
    /// Repetitions; the summary gives the median and the range.
    #[arg(long, global = true, default_value_t = 3)]
    runs: usize,
    #[command(subcommand)]
    command: Cmd,
}

/// sled settings for `sled-floor` (coverd's own: 8 MiB cache, sled's defaults otherwise).
#[derive(clap::Args, Clone)]
struct SledKnobs {
    #[arg(long, default_value_t = 8)]
    cache_mib: u64,
    /// sled's segment size in bytes (sled's default: 512 KiB).
    #[arg(long)]
    segment_size: Option<usize>,
    /// `Mode::LowSpace` instead of sled's default `HighThroughput`.
    #[arg(long)]
    low_space: bool,
}

impl SledKnobs {
    fn config(&self, path: &Path) -> sled::Config {
        let mut c = sled::Config::new()
            .path(path)
            .cache_capacity(self.cache_mib * 1024 * 1024)
            .mode(if self.low_space {
                sled::Mode::LowSpace
            } else {
                sled::Mode::HighThroughput
            });
        if let Some(size) = self.segment_size {
            c = c.segment_size(size);
        }
        c
    }

    fn args(&self) -> Vec<String> {
        let mut a = vec!["--cache-mib".to_string(), self.cache_mib.to_string()];
        if let Some(size) = self.segment_size {
            a.extend(["--segment-size".to_string(), size.to_string()]);
        }
        if self.low_space {
            a.push("--low-space".to_string());
        }
        a
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Callback ingest vs a no-op hyper server.
    Ingest {
        /// Open connections (keep-alive).
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// Fixed rate in requests per second (open loop); without it, closed loop.
        #[arg(long)]
        rate: Option<u64>,
        /// Seconds of load per target and run.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// Image downloads vs curl --parallel.
    Downloads {
        #[arg(long, default_value_t = 200)]
        images: usize,
        #[arg(long, default_value_t = 5 * 1024 * 1024)]
        image_bytes: usize,
        /// Images per task (tasks = images / per_task).
        #[arg(long, default_value_t = 2)]
        per_task: usize,
        /// End the curl baseline with a plain `sync` (every dirty page of the machine, the
        /// issue's recipe) instead of `sync FILE…` (an fsync of each downloaded file).
        #[arg(long)]
        global_sync: bool,
        /// The mixed-kind run instead (issue 18): per run 4 music tasks of 2 tracks (an
        /// MP3 of 5 MiB and a JPEG of 300 KiB each), a WAV of 50 MiB and a video of 100 MiB,
        /// called back on their own routes; `--images`, `--image-bytes` and `--per-task`
        /// are ignored.
        #[arg(long)]
        mixed: bool,
        /// Where coverd stores the files: `local` (the data directory) or `s3` (the bucket of
        /// the Garage that `--garage-env` describes). With `s3` a second baseline runs: curl
        /// fetching the files into local files, then `curl -T` uploading them to the same
        /// store (4 at a time, SigV4).
        #[arg(long, default_value = "local", value_parser = ["local", "s3"])]
        storage: String,
        /// The `env` file `scripts/garage-cluster DIR` writes (`DIR/env`): endpoint, bucket,
        /// region and key of the store for `--storage s3`.
        #[arg(long, value_name = "FILE")]
        garage_env: Option<PathBuf>,
    },
    /// RSS, store bytes per task and restart time at `tasks` finished tasks.
    Footprint {
        #[arg(long, default_value_t = 100_000)]
        tasks: u64,
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
    },
    /// sled's own floor: bytes per task of a bare sled (coverd's cache and flush settings)
    /// holding per task what a layout writes, `batch` tasks per transaction.
    SledFloor {
        #[arg(long, default_value_t = 100_000)]
        keys: u64,
        /// Value bytes of the main record (coverd's failed-task record is about 120 B
        /// without history, ~170 B with its 2 history events inline).
        #[arg(long, default_value_t = 120)]
        record_bytes: usize,
        /// Shorthand for `--layout v1`.
        #[arg(long)]
        with_indexes: bool,
        /// What is written per task: `record` (one record), `record-index` (+ one by-state
        /// key), `record-index-counter` (+ a rewrite of the shared counter per transaction),
        /// `v1` (coverd's schema 1: record, 2 history events of 60 B, a by-state and a
        /// by-created key, the shared counter).
        #[arg(long, default_value = "record")]
        layout: String,
        /// Tasks per transaction.
        #[arg(long, default_value_t = 1)]
        batch: u64,
        /// Flush (sled's `flush`, as the first step of coverd's durability round) after
        /// every transaction, as coverd does per batch, instead of once at the end: with it,
        /// the CPU per task is sled's floor for durable ingest.
        #[arg(long)]
        flush_each_batch: bool,
        /// Leave the store(s) in `<work-dir>/sled-floor` (e.g. for `heaptrack coverd-bench
        /// sled-open --path …`).
        #[arg(long)]
        keep: bool,
        #[command(flatten)]
        sled: SledKnobs,
    },
    /// (helper) Opens the sled at `path` like coverd, reads a key, waits 1 s and prints its
    /// own RSS in MiB.
    SledOpen {
        #[arg(long)]
        path: PathBuf,
        #[command(flatten)]
        sled: SledKnobs,
    },
    /// (helper) A hyper server answering every request 200 `{"status":"received"}`.
    NoopServer {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// (helper) Serves `GET /img/<anything>` as `bytes` of a PNG-looking body, and
    /// `GET /mix/<mp3|jpg|wav|mp4>/<anything>` as the mixed run's files.
    FileServer {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        bytes: usize,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Cmd::NoopServer { listen } => rt.block_on(noop_server(listen)),
        Cmd::FileServer { listen, bytes } => rt.block_on(file_server(listen, bytes)),
        Cmd::Ingest {
            concurrency,
            rate,
            seconds,
        } => rt.block_on(ingest(&cli, concurrency, rate, seconds)),
        Cmd::Downloads {
            images,
            image_bytes,
            per_task,
            global_sync,
            mixed,
            ref storage,
            ref garage_env,
        } => {
            let store = match (storage.as_str(), garage_env) {
                ("s3", Some(env)) => Some(S3::from_env_file(env)?),
                ("s3", None) => bail!(
                    "--storage s3 needs --garage-env DIR/env (start a store with scripts/garage-cluster DIR)"
                ),
                _ => None,
            };
            if mixed && store.is_some() {
                bail!("--mixed runs with local storage only; leave out --storage s3");
            }
            if mixed {
                rt.block_on(downloads_mixed(&cli, global_sync))
            } else {
                rt.block_on(downloads(
                    &cli,
                    images,
                    image_bytes,
                    per_task,
                    global_sync,
                    store.as_ref(),
                ))
            }
        }
        Cmd::SledFloor {
            keys,
            record_bytes,
            with_indexes,
            ref layout,
            batch,
            flush_each_batch,
            keep,
            ref sled,
        } => {
            let layout = if with_indexes { "v1" } else { layout.as_str() };
            let floor = Floor {
                keys,
                record_bytes,
                layout,
                batch: batch.max(1),
                flush_each_batch,
                keep,
            };
            sled_floor(&cli, &floor, sled)
        }
        Cmd::SledOpen { ref path, ref sled } => {
            let db = sled.config(path).open()?;
            let tree = db.open_tree("tasks")?;
            let _ = tree.get("f-0")?;
            std::thread::sleep(Duration::from_secs(1));
            let (now, _) = rss(std::process::id())?;
            println!("{:.1}", now as f64 / MIB);
            Ok(())
        }
        Cmd::Footprint { tasks, concurrency } => rt.block_on(footprint(&cli, tasks, concurrency)),
    }
}

// ---------------------------------------------------------------------------------------
// Processes

/// A child process stopped with SIGTERM (then waited for) when dropped.
struct Proc {
    child: Child,
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM and wait; the exit status.
    fn stop(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        if let Some(status) = self.child.try_wait()? {
            return Ok(status);
        }
        if let Some(pid) = rustix::process::Pid::from_raw(self.child.id() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        Ok(self.child.wait()?)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

fn free_addr() -> anyhow::Result<SocketAddr> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?)
}

fn spawn_self(args: &[String]) -> anyhow::Result<Proc> {
    let exe = std::env::current_exe()?;
    let child = Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .spawn()
        .context("starting a helper process")?;
    Ok(Proc { child })
}

struct Coverd {
    proc: Proc,
    listen: SocketAddr,
    metrics: SocketAddr,
    data_dir: PathBuf,
}

/// Writes the config for a coverd in `dir` (data in `dir/data`) and returns it.
fn coverd_config(dir: &Path, extra: &str) -> anyhow::Result<(PathBuf, SocketAddr, SocketAddr)> {
    std::fs::create_dir_all(dir)?;
    let listen = free_addr()?;
    let metrics = free_addr()?;
    let data = dir.join("data");
    let config = dir.join("coverd.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {data:?}\nlisten = \"{listen}\"\nmetrics_listen = \"{metrics}\"\n\
             accept_unknown_tasks = true\n{extra}\n"
        ),
    )?;
    Ok((config, listen, metrics))
}

/// Starts coverd with `config` and waits for `/healthz` 200; also returns the time that took.
async fn start_coverd(
    cli: &Cli,
    dir: &Path,
    config: &Path,
    listen: SocketAddr,
    metrics: SocketAddr,
) -> anyhow::Result<(Coverd, Duration)> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("coverd.log"))?;
    let started = Instant::now();
    let child = Command::new(&cli.coverd)
        .arg("--config")
        .arg(config)
        .arg("serve")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| {
            format!(
                "starting {} (build it first: cargo build --release)",
                cli.coverd.display()
            )
        })?;
    let proc = Proc { child };
    let deadline = started + Duration::from_secs(120);
    loop {
        if let Ok(resp) = get(listen, "/healthz").await
            && resp.0 == 200
        {
            break;
        }
        if Instant::now() > deadline {
            bail!("coverd not healthy after 120 s; see {}", dir.display());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let took = started.elapsed();
    Ok((
        Coverd {
            proc,
            listen,
            metrics,
            data_dir: dir.join("data"),
        },
        took,
    ))
}

/// User + system CPU seconds used so far by `pid` (from `/proc/<pid>/stat`, 100 ticks/s).
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the `(comm)`, which may contain spaces: state is field 3, utime 14.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>()? + f[12].parse::<f64>()?;
    Ok(ticks / 100.0)
}

/// `VmRSS` and `VmHWM` of `pid`, in bytes.
fn rss(pid: u32) -> anyhow::Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    Ok((field("VmRSS:"), field("VmHWM:")))
}

fn dir_bytes(dir: &Path) -> anyhow::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        total += if meta.is_dir() {
            dir_bytes(&entry.path())?
        } else {
            meta.len()
        };
    }
    Ok(total)
}

/// Drops the page cache of every file under `dir` (a cold start without root).
fn drop_cache(dir: &Path) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.metadata()?.is_dir() {
            drop_cache(&entry.path())?;
        } else {
            let f = std::fs::File::open(entry.path())?;
            rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed)?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// A minimal HTTP/1.1 keep-alive client (no allocation per request beyond the buffer).

struct Conn {
    addr: SocketAddr,
    stream: Option<TcpStream>,
    buf: Vec<u8>,
}

impl Conn {
    fn new(addr: SocketAddr) -> Conn {
        Conn {
            addr,
            stream: None,
            buf: Vec::with_capacity(4096),
        }
    }

    /// Sends `request` (a complete HTTP/1.1 request) and returns the status and body.
    async fn send(&mut self, request: &[u8]) -> anyhow::Result<(u16, Vec<u8>)> {
        for attempt in 0..2 {
            if self.stream.is_none() {
                let s = TcpStream::connect(self.addr).await?;
                s.set_nodelay(true)?;
                self.stream = Some(s);
                self.buf.clear();
            }
            match self.exchange(request).await {
                Ok(answer) => return Ok(answer),
                Err(e) if attempt == 0 => {
                    // A closed keep-alive connection: reconnect once.
                    self.stream = None;
                    let _ = e;
                }
                Err(e) => return Err(e),
            }
        }
        unreachable!()
    }

    async fn exchange(&mut self, request: &[u8]) -> anyhow::Result<(u16, Vec<u8>)> {
        let stream = self.stream.as_mut().expect("connected");
        stream.write_all(request).await?;
        loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                let head = std::str::from_utf8(&self.buf[..end])?;
                let status: u16 = head
                    .split(' ')
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .context("bad status line")?;
                let mut len = 0usize;
                let mut close = false;
                for line in head.lines().skip(1) {
                    let (k, v) = line.split_once(':').unwrap_or((line, ""));
                    if k.eq_ignore_ascii_case("content-length") {
                        len = v.trim().parse()?;
                    } else if k.eq_ignore_ascii_case("connection")
                        && v.trim().eq_ignore_ascii_case("close")
                    {
                        close = true;
                    }
                }
                let total = end + 4 + len;
                while self.buf.len() < total {
                    read_more(stream, &mut self.buf).await?;
                }
                let body = self.buf[end + 4..total].to_vec();
                self.buf.drain(..total);
                if close {
                    self.stream = None;
                }
                return Ok((status, body));
            }
            read_more(stream, &mut self.buf).await?;
        }
    }
}

async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>) -> anyhow::Result<()> {
    let mut chunk = [0u8; 8192];
    let n = stream.read(&mut chunk).await?;
    if n == 0 {
        bail!("connection closed");
    }
    buf.extend_from_slice(&chunk[..n]);
    Ok(())
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn post_request(path: &str, body: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, Vec<u8>)> {
    let mut c = Conn::new(addr);
    let req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    c.send(req.as_bytes()).await
}

fn failure_callback(task_id: &str) -> String {
    format!(
        r#"{{"code":501,"msg":"Cover generation failed","data":{{"taskId":"{task_id}","images":null}}}}"#
    )
}

// ---------------------------------------------------------------------------------------
// Load generation

#[derive(Default)]
struct Load {
    /// Latencies in microseconds.
    latencies: Vec<u32>,
    ok: u64,
    other: u64,
    errors: u64,
    elapsed: Duration,
}

impl Load {
    fn rps(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64()
    }

    fn pct(&self, p: f64) -> f64 {
        if self.latencies.is_empty() {
            return f64::NAN;
        }
        let i = ((self.latencies.len() as f64 - 1.0) * p).round() as usize;
        self.latencies[i] as f64 / 1000.0
    }
}

/// Until what the load runs: a time, or a number of requests in total.
#[derive(Clone, Copy)]
enum Until {
    Time(Duration),
    Count(u64),
}

/// Failure callbacks with fresh task ids `<prefix>-<n>` to `addr`.
async fn load(
    addr: SocketAddr,
    concurrency: usize,
    rate: Option<u64>,
    until: Until,
    prefix: &str,
) -> Load {
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut handles = Vec::new();
    for conn_no in 0..concurrency {
        let next = next.clone();
        let prefix = prefix.to_string();
        handles.push(tokio::spawn(async move {
            let mut conn = Conn::new(addr);
            let mut out = Load::default();
            // Open loop: this connection's share of the rate, its own schedule.
            let interval = rate.map(|r| Duration::from_secs_f64(concurrency as f64 / r as f64));
            let offset = interval.map(|i| i.mul_f64(conn_no as f64 / concurrency as f64));
            let mut k: u32 = 0;
            loop {
                let intended = match (interval, offset) {
                    (Some(i), Some(o)) => {
                        let at = start + o + i * k;
                        k += 1;
                        tokio::time::sleep_until(at.into()).await;
                        at
                    }
                    _ => Instant::now(),
                };
                let n = next.fetch_add(1, Ordering::Relaxed);
                let done = match until {
                    Until::Time(d) => intended.duration_since(start) >= d,
                    Until::Count(c) => n >= c,
                };
                if done {
                    break;
                }
                let req = post_request(
                    "/callbacks/cover",
                    &failure_callback(&format!("{prefix}-{n}")),
                );
                match conn.send(&req).await {
                    Ok((200, _)) => {
                        out.ok += 1;
                        let us = intended.elapsed().as_micros().min(u32::MAX as u128) as u32;
                        out.latencies.push(us);
                    }
                    Ok(_) => out.other += 1,
                    Err(_) => {
                        out.errors += 1;
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            out
        }));
    }
    let mut total = Load::default();
    for h in handles {
        let part = h.await.expect("load task");
        total.latencies.extend(part.latencies);
        total.ok += part.ok;
        total.other += part.other;
        total.errors += part.errors;
    }
    total.elapsed = start.elapsed();
    total.latencies.sort_unstable();
    total
}

fn describe(name: &str, l: &Load) -> String {
    format!(
        "{name:>8}: {:>9.0} req/s  p50 {:>7.2} ms  p99 {:>7.2} ms  p99.9 {:>7.2} ms  \
         (200: {}, other: {}, errors: {})",
        l.rps(),
        l.pct(0.5),
        l.pct(0.99),
        l.pct(0.999),
        l.ok,
        l.other,
        l.errors
    )
}

/// "median (min–max)" of `values`.
fn summary(values: &mut [f64], digits: usize) -> String {
    values.sort_by(|a, b| a.total_cmp(b));
    let med = values[values.len() / 2];
    format!(
        "{med:.digits$} (range {:.digits$}–{:.digits$}, n={})",
        values[0],
        values[values.len() - 1],
        values.len()
    )
}

async fn wait_ready(addr: SocketAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(addr).await.is_err() {
        if Instant::now() > deadline {
            bail!("helper at {addr} did not start");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

async fn ingest(
    cli: &Cli,
    concurrency: usize,
    rate: Option<u64>,
    seconds: u64,
) -> anyhow::Result<()> {
    let work = cli.work_dir.join("ingest");
    let _ = std::fs::remove_dir_all(&work);
    let noop_addr = free_addr()?;
    let _noop = spawn_self(&[
        "noop-server".into(),
        "--listen".into(),
        noop_addr.to_string(),
    ])?;
    wait_ready(noop_addr).await?;
    let (config, listen, metrics) = coverd_config(&work, "")?;
    let (mut coverd, _) = start_coverd(cli, &work, &config, listen, metrics).await?;
    let mode = match rate {
        Some(r) => format!("fixed rate {r}/s over {concurrency} connections"),
        None => format!("fixed concurrency {concurrency}"),
    };
    println!("ingest: {mode}, {seconds} s per target, {} runs", cli.runs);
    let until = Until::Time(Duration::from_secs(seconds));
    let (mut ratios, mut c_rps, mut n_rps, mut p50, mut p99, mut p999) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    for run in 0..cli.runs {
        let noop = load(noop_addr, concurrency, rate, until, &format!("n{run}")).await;
        let real = load(listen, concurrency, rate, until, &format!("r{run}")).await;
        println!(
            "run {run}:\n{}\n{}",
            describe("no-op", &noop),
            describe("coverd", &real)
        );
        let ratio = real.rps() / noop.rps();
        println!("   ratio coverd/no-op: {ratio:.3}");
        ratios.push(ratio);
        c_rps.push(real.rps());
        n_rps.push(noop.rps());
        p50.push(real.pct(0.5));
        p99.push(real.pct(0.99));
        p999.push(real.pct(0.999));
    }
    let (_, hwm) = rss(coverd.proc.pid())?;
    let cpu = cpu_seconds(coverd.proc.pid())?;
    let status = coverd.proc.stop()?;
    println!("\nsummary ({mode}):");
    println!("  coverd req/s      {}", summary(&mut c_rps, 0));
    println!("  no-op req/s       {}", summary(&mut n_rps, 0));
    println!("  ratio             {}", summary(&mut ratios, 3));
    println!("  coverd p50 ms     {}", summary(&mut p50, 2));
    println!("  coverd p99 ms     {}", summary(&mut p99, 2));
    println!("  coverd p99.9 ms   {}", summary(&mut p999, 2));
    println!("  coverd peak RSS   {:.1} MiB", hwm as f64 / MIB);
    println!("  coverd CPU s      {cpu:.1} (whole run, all loads)");
    println!("  coverd exit       {status}");
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

const MIB: f64 = 1024.0 * 1024.0;

// ---------------------------------------------------------------------------------------
// Downloads

async fn metric(addr: SocketAddr, line_prefix: &str) -> anyhow::Result<f64> {
    let (status, body) = get(addr, "/metrics").await?;
    if status != 200 {
        bail!("/metrics answered {status}");
    }
    let text = String::from_utf8(body)?;
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix(line_prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0))
}

async fn downloads(
    cli: &Cli,
    images: usize,
    image_bytes: usize,
    per_task: usize,
    global_sync: bool,
    store: Option<&S3>,
) -> anyhow::Result<()> {
    let work = cli.work_dir.join("downloads");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let files = free_addr()?;
    let _server = spawn_self(&[
        "file-server".into(),
        "--listen".into(),
        files.to_string(),
        "--bytes".into(),
        image_bytes.to_string(),
    ])?;
    wait_ready(files).await?;
    let has_curl = Command::new("curl")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !has_curl {
        bail!("curl is needed for the baseline (apt-get install curl)");
    }
    let tasks = images.div_ceil(per_task);
    println!(
        "downloads: {} images of {image_bytes} bytes ({tasks} tasks of {per_task}), \
         concurrency 4, {} runs; baseline curl + {}{}",
        tasks * per_task,
        cli.runs,
        if global_sync { "sync" } else { "sync FILE..." },
        match store {
            Some(s3) => format!(
                "; coverd stores in {} (bucket {}), second baseline curl + curl -T to it",
                s3.endpoint, s3.bucket
            ),
            None => String::new(),
        }
    );
    let mut runs = Vec::new();
    for run in 0..cli.runs {
        let urls: Vec<Vec<String>> = (0..tasks)
            .map(|t| {
                (0..per_task)
                    .map(|i| format!("http://{files}/img/{run}-{t}-{i}.png"))
                    .collect()
            })
            .collect();

        let curl = curl_baseline(&work, run, urls.iter().flatten(), global_sync)?;
        let upload = match store {
            Some(s3) => Some(curl_upload_baseline(&work, run, urls.iter().flatten(), s3)?),
            None => None,
        };

        // coverd: success callbacks, then wait until every task is downloaded.
        let dir = work.join(format!("coverd-{run}"));
        let storage = match store {
            Some(s3) => s3.storage_table(&dir, &format!("bench-{run}/"))?,
            None => String::new(),
        };
        let (config, listen, metrics) = coverd_config(
            &dir,
            &format!(
                "[kie]\nconfirm_callbacks = false\n[download]\nconcurrency = 4\n\
                 allowed_hosts = []\nallow_http = true\nallow_private_networks = true\n{storage}"
            ),
        )?;
        let (mut coverd, _) = start_coverd(cli, &dir, &config, listen, metrics).await?;
        let started = Instant::now();
        let mut conn = Conn::new(coverd.listen);
        for (t, urls) in urls.iter().enumerate() {
            let list = urls
                .iter()
                .map(|u| format!("\"{u}\""))
                .collect::<Vec<_>>()
                .join(",");
            let body = format!(
                r#"{{"code":200,"msg":"success","data":{{"taskId":"dl-{run}-{t}","images":[{list}]}}}}"#
            );
            let (status, _) = conn.send(&post_request("/callbacks/cover", &body)).await?;
            if status != 200 {
                bail!("callback answered {status}");
            }
        }
        let (took, hwm, cpu) = wait_downloaded(&mut coverd, tasks, started, &dir).await?;
        let stored = dir_bytes(&coverd.data_dir.join("images"))?;
        let expected = (tasks * per_task * image_bytes) as u64;
        match store {
            None if stored != expected => {
                bail!("coverd stored {stored} bytes of images, expected {expected}")
            }
            Some(_) if stored != 0 => {
                bail!("coverd stored {stored} bytes in the data directory, not the bucket")
            }
            _ => {}
        }
        std::fs::remove_dir_all(&dir)?;
        runs.push(DownloadRun {
            curl,
            upload,
            coverd: took,
            hwm,
            cpu,
        });
        runs.last().expect("just pushed").print(run);
    }
    DownloadRun::summarize(&runs);
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

/// Curl's side of a downloads run: `urls` fetched 4 at a time into files, then an fsync of
/// every file and the directory (`sync FILE…`), or a plain `sync`; how long that took.
fn curl_baseline<'a>(
    work: &Path,
    run: usize,
    urls: impl Iterator<Item = &'a String>,
    global_sync: bool,
) -> anyhow::Result<Duration> {
    let out = work.join(format!("curl-{run}"));
    std::fs::create_dir_all(&out)?;
    let mut cfg = std::fs::File::create(work.join("curl.cfg"))?;
    let mut names = Vec::new();
    for (n, url) in urls.enumerate() {
        let name = out.join(format!("{n}"));
        writeln!(cfg, "url = \"{url}\"\noutput = \"{}\"", name.display())?;
        names.push(name);
    }
    drop(cfg);
    let started = Instant::now();
    let status = Command::new("curl")
        .args(["--silent", "--fail", "--parallel", "--parallel-max", "4"])
        .arg("--config")
        .arg(work.join("curl.cfg"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    if !status.success() {
        bail!("curl failed: {status}");
    }
    let mut sync = Command::new("sync");
    if !global_sync {
        sync.args(&names).arg(&out);
    }
    let status = sync.status()?;
    if !status.success() {
        bail!("sync failed: {status}");
    }
    let took = started.elapsed();
    std::fs::remove_dir_all(&out)?;
    Ok(took)
}

/// Waits until `tasks` tasks are downloaded (a failed one, or 600 s, is an error), then
/// stops coverd; how long since `started`, its peak RSS and its CPU seconds.
async fn wait_downloaded(
    coverd: &mut Coverd,
    tasks: usize,
    started: Instant,
    dir: &Path,
) -> anyhow::Result<(Duration, u64, f64)> {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let done = metric(coverd.metrics, "coverd_tasks{state=\"downloaded\"}").await?;
        if done as usize >= tasks {
            break;
        }
        let failed = metric(coverd.metrics, "coverd_tasks{state=\"failed\"}").await?;
        if failed > 0.0 || Instant::now() > deadline {
            bail!("downloads failed or stalled; see {}", dir.display());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let took = started.elapsed();
    let (_, hwm) = rss(coverd.proc.pid())?;
    let cpu = cpu_seconds(coverd.proc.pid())?;
    coverd.proc.stop()?;
    Ok((took, hwm, cpu))
}

/// One run of a downloads benchmark.
struct DownloadRun {
    curl: Duration,
    /// With `--storage s3`: curl fetching into files, then `curl -T` to the store.
    upload: Option<Duration>,
    coverd: Duration,
    /// coverd's peak RSS, bytes.
    hwm: u64,
    cpu: f64,
}

impl DownloadRun {
    fn ratio(&self) -> f64 {
        self.curl.as_secs_f64() / self.coverd.as_secs_f64()
    }

    fn upload_ratio(&self) -> Option<f64> {
        self.upload
            .map(|u| u.as_secs_f64() / self.coverd.as_secs_f64())
    }

    fn print(&self, run: usize) {
        println!(
            "run {run}: curl {:.2} s, coverd {:.2} s, speed ratio coverd/curl {:.3}, \
             coverd peak RSS {:.1} MiB, coverd CPU {:.2} s",
            self.curl.as_secs_f64(),
            self.coverd.as_secs_f64(),
            self.ratio(),
            self.hwm as f64 / MIB,
            self.cpu
        );
        if let (Some(upload), Some(ratio)) = (self.upload, self.upload_ratio()) {
            println!(
                "       curl + curl -T to the store {:.2} s, speed ratio coverd/(curl + curl -T) {ratio:.3}",
                upload.as_secs_f64()
            );
        }
    }

    fn summarize(runs: &[DownloadRun]) {
        let of = |f: &dyn Fn(&DownloadRun) -> f64| runs.iter().map(f).collect::<Vec<f64>>();
        let (mut curl, mut coverd, mut ratios, mut hwms, mut cpus) = (
            of(&|r| r.curl.as_secs_f64()),
            of(&|r| r.coverd.as_secs_f64()),
            of(&|r| r.ratio()),
            of(&|r| r.hwm as f64 / MIB),
            of(&|r| r.cpu),
        );
        println!("\nsummary:");
        println!("  curl seconds          {}", summary(&mut curl, 2));
        println!("  coverd seconds        {}", summary(&mut coverd, 2));
        println!(
            "  ratio (curl time / coverd time)  {}",
            summary(&mut ratios, 3)
        );
        println!("  coverd peak RSS MiB   {}", summary(&mut hwms, 1));
        println!("  coverd CPU seconds    {}", summary(&mut cpus, 2));
        let mut uploads: Vec<f64> = runs
            .iter()
            .filter_map(|r| r.upload.map(|u| u.as_secs_f64()))
            .collect();
        let mut upload_ratios: Vec<f64> =
            runs.iter().filter_map(DownloadRun::upload_ratio).collect();
        if !uploads.is_empty() {
            println!("  curl + curl -T seconds  {}", summary(&mut uploads, 2));
            println!(
                "  ratio ((curl + curl -T) time / coverd time)  {}",
                summary(&mut upload_ratios, 3)
            );
        }
    }
}

/// The object store of `--storage s3`, from the `env` file `scripts/garage-cluster` writes.
struct S3 {
    endpoint: String,
    bucket: String,
    region: String,
    key_id: String,
    secret: String,
}

impl S3 {
    fn from_env_file(path: &Path) -> anyhow::Result<S3> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let get = |name: &str| -> anyhow::Result<String> {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{name}=")))
                .map(|v| v.trim_matches(['"', '\'']).to_string())
                .with_context(|| format!("{} has no {name}", path.display()))
        };
        Ok(S3 {
            endpoint: get("GARAGE_ENDPOINT")?,
            bucket: get("GARAGE_BUCKET")?,
            region: get("GARAGE_REGION")?,
            key_id: get("GARAGE_ACCESS_KEY_ID")?,
            secret: get("GARAGE_SECRET_ACCESS_KEY")?,
        })
    }

    /// coverd's `[storage]` table for this store under `prefix`, the secret in a file in `dir`.
    fn storage_table(&self, dir: &Path, prefix: &str) -> anyhow::Result<String> {
        std::fs::create_dir_all(dir)?;
        let secret = dir.join("s3-secret");
        std::fs::write(&secret, &self.secret)?;
        Ok(format!(
            "[storage]\nkind = \"s3\"\nendpoint = {:?}\nbucket = {:?}\nregion = {:?}\nprefix = {prefix:?}\n\
             access_key_id = {:?}\nsecret_access_key_file = {:?}\n",
            self.endpoint,
            self.bucket,
            self.region,
            self.key_id,
            secret.display().to_string()
        ))
    }
}

/// The second baseline of `--storage s3`: curl fetching `urls` 4 at a time into files, then
/// `curl -T` uploading those files 4 at a time to the store (SigV4, as the AWS CLI signs);
/// how long both took.
fn curl_upload_baseline<'a>(
    work: &Path,
    run: usize,
    urls: impl Iterator<Item = &'a String>,
    s3: &S3,
) -> anyhow::Result<Duration> {
    let out = work.join(format!("curl-up-{run}"));
    std::fs::create_dir_all(&out)?;
    let (mut get, mut put) = (String::new(), String::new());
    for (n, url) in urls.enumerate() {
        let name = out.join(format!("{n}"));
        get.push_str(&format!(
            "url = \"{url}\"\noutput = \"{}\"\n",
            name.display()
        ));
        put.push_str(&format!(
            "url = \"{}/{}/curl-{run}/{n}\"\nupload-file = \"{}\"\n",
            s3.endpoint,
            s3.bucket,
            name.display()
        ));
    }
    std::fs::write(work.join("get.cfg"), get)?;
    std::fs::write(work.join("put.cfg"), put)?;
    let started = Instant::now();
    let status = Command::new("curl")
        .args(["--silent", "--fail", "--parallel", "--parallel-max", "4"])
        .arg("--config")
        .arg(work.join("get.cfg"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    if !status.success() {
        bail!("curl failed: {status}");
    }
    let status = Command::new("curl")
        .args(["--silent", "--fail", "--parallel", "--parallel-max", "4"])
        .arg("--aws-sigv4")
        .arg(format!("aws:amz:{}:s3", s3.region))
        .arg("--user")
        .arg(format!("{}:{}", s3.key_id, s3.secret))
        .args(["-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD"])
        .arg("--config")
        .arg(work.join("put.cfg"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    if !status.success() {
        bail!("curl -T to {} failed: {status}", s3.endpoint);
    }
    let took = started.elapsed();
    std::fs::remove_dir_all(&out)?;
    Ok(took)
}

/// The mixed-kind downloads (issue 18): per run, 4 music tasks of 2 tracks (an MP3 of 5 MiB
/// and a JPEG of 300 KiB each), a WAV of 50 MiB and a video of 100 MiB, called back on their
/// own routes; against curl fetching the same files 4 at a time and `sync FILE…`.
async fn downloads_mixed(cli: &Cli, global_sync: bool) -> anyhow::Result<()> {
    const MUSIC_TASKS: usize = 4;
    let work = cli.work_dir.join("downloads-mixed");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let files = free_addr()?;
    let _server = spawn_self(&[
        "file-server".into(),
        "--listen".into(),
        files.to_string(),
        "--bytes".into(),
        "1024".into(),
    ])?;
    wait_ready(files).await?;
    let total_bytes = MUSIC_TASKS * 2 * (MIX_MP3 + MIX_JPG) + MIX_WAV + MIX_MP4;
    println!(
        "downloads (mixed kinds): per run {MUSIC_TASKS} music tasks of 2 tracks (MP3 {} MiB + JPEG {} KiB), \
         a WAV of {} MiB and a video of {} MiB: {:.1} MiB in {} files, concurrency 4, {} runs; \
         baseline curl + {}",
        MIX_MP3 >> 20,
        MIX_JPG >> 10,
        MIX_WAV >> 20,
        MIX_MP4 >> 20,
        total_bytes as f64 / MIB,
        MUSIC_TASKS * 4 + 2,
        cli.runs,
        if global_sync { "sync" } else { "sync FILE..." }
    );
    let mut runs = Vec::new();
    for run in 0..cli.runs {
        let url = |kind: &str, name: String| format!("http://{files}/mix/{kind}/{run}-{name}");
        // (route, task id, callback body, its URLs)
        let mut tasks: Vec<(&str, String, String, Vec<String>)> = Vec::new();
        for t in 0..MUSIC_TASKS {
            let id = format!("mus-{run}-{t}");
            let urls: Vec<String> = (0..2)
                .flat_map(|i| {
                    [
                        url("mp3", format!("{t}-{i}.mp3")),
                        url("jpg", format!("{t}-{i}.jpg")),
                    ]
                })
                .collect();
            let tracks: Vec<serde_json::Value> = (0..2)
                .map(|i| {
                    serde_json::json!({"id": format!("{id}-{i}"), "audio_url": urls[2 * i],
                        "image_url": urls[2 * i + 1], "title": "bench", "duration": 180.0})
                })
                .collect();
            let body = serde_json::json!({"code": 200, "msg": "ok", "data":
                {"callbackType": "complete", "task_id": id, "data": tracks}});
            tasks.push(("music", id, body.to_string(), urls));
        }
        let wav = url("wav", "a.wav".into());
        let id = format!("wav-{run}");
        let body = serde_json::json!({"code": 200, "data": {"task_id": id, "audioWavUrl": wav}});
        tasks.push(("wav", id, body.to_string(), vec![wav]));
        let mp4 = url("mp4", "v.mp4".into());
        let id = format!("vid-{run}");
        let body = serde_json::json!({"code": 200, "data": {"task_id": id, "video_url": mp4}});
        tasks.push(("video", id, body.to_string(), vec![mp4]));

        let curl = curl_baseline(&work, run, tasks.iter().flat_map(|t| &t.3), global_sync)?;

        let dir = work.join(format!("coverd-{run}"));
        let (config, listen, metrics) = coverd_config(
            &dir,
            "[kie]\nconfirm_callbacks = false\n[download]\n\
             concurrency = 4\nallowed_hosts = []\nallow_http = true\nallow_private_networks = true\n",
        )?;
        let (mut coverd, _) = start_coverd(cli, &dir, &config, listen, metrics).await?;
        let started = Instant::now();
        let mut conn = Conn::new(coverd.listen);
        for (route, _, body, _) in &tasks {
            let (status, _) = conn
                .send(&post_request(&format!("/callbacks/{route}"), body))
                .await?;
            if status != 200 {
                bail!("callback on /callbacks/{route} answered {status}");
            }
        }
        let (took, hwm, cpu) = wait_downloaded(&mut coverd, tasks.len(), started, &dir).await?;
        let stored = dir_bytes(&coverd.data_dir.join("files"))?;
        if stored != total_bytes as u64 {
            bail!("coverd stored {stored} bytes of files, expected {total_bytes}");
        }
        std::fs::remove_dir_all(&dir)?;
        runs.push(DownloadRun {
            upload: None,
            curl,
            coverd: took,
            hwm,
            cpu,
        });
        runs.last().expect("just pushed").print(run);
    }
    DownloadRun::summarize(&runs);
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Footprint

async fn footprint(cli: &Cli, tasks: u64, concurrency: usize) -> anyhow::Result<()> {
    let work = cli.work_dir.join("footprint");
    println!(
        "footprint: {tasks} failed tasks, ingest concurrency {concurrency}, {} runs",
        cli.runs
    );
    let (mut idle_empty, mut peak, mut per_task, mut warm, mut cold, mut idle_after) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    for run in 0..cli.runs {
        let _ = std::fs::remove_dir_all(&work);
        let (config, listen, metrics) = coverd_config(&work, "")?;
        let (mut coverd, _) = start_coverd(cli, &work, &config, listen, metrics).await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (empty_rss, _) = rss(coverd.proc.pid())?;
        let sampler_pid = coverd.proc.pid();
        let l = load(coverd.listen, concurrency, None, Until::Count(tasks), "f").await;
        let (_, hwm) = rss(sampler_pid)?;
        if l.ok != tasks {
            bail!("only {} of {tasks} callbacks answered 200", l.ok);
        }
        let status = coverd.proc.stop()?;
        if !status.success() {
            bail!("coverd exited {status}");
        }
        let bytes = dir_bytes(&coverd.data_dir.join("db"))?;

        let (mut again, warm_took) = start_coverd(cli, &work, &config, listen, metrics).await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (after_rss, _) = rss(again.proc.pid())?;
        again.proc.stop()?;
        drop_cache(&work.join("data"))?;
        let (mut third, cold_took) = start_coverd(cli, &work, &config, listen, metrics).await?;
        third.proc.stop()?;

        println!(
            "run {run}: idle RSS empty {:.1} MiB; ingest {:.0}/s, peak RSS {:.1} MiB; \
             store {:.1} MiB = {:.0} B/task; ready after restart {:.3} s warm, {:.3} s cold; \
             idle RSS after restart {:.1} MiB",
            empty_rss as f64 / MIB,
            l.rps(),
            hwm as f64 / MIB,
            bytes as f64 / MIB,
            bytes as f64 / tasks as f64,
            warm_took.as_secs_f64(),
            cold_took.as_secs_f64(),
            after_rss as f64 / MIB,
        );
        idle_empty.push(empty_rss as f64 / MIB);
        peak.push(hwm as f64 / MIB);
        per_task.push(bytes as f64 / tasks as f64);
        warm.push(warm_took.as_secs_f64());
        cold.push(cold_took.as_secs_f64());
        idle_after.push(after_rss as f64 / MIB);
    }
    println!("\nsummary ({tasks} tasks):");
    println!(
        "  idle RSS, empty store MiB      {}",
        summary(&mut idle_empty, 1)
    );
    println!("  peak RSS while ingesting MiB   {}", summary(&mut peak, 1));
    println!(
        "  store bytes per task           {}",
        summary(&mut per_task, 0)
    );
    println!("  ready after restart, warm s    {}", summary(&mut warm, 3));
    println!("  ready after restart, cold s    {}", summary(&mut cold, 3));
    println!(
        "  idle RSS after restart MiB     {}",
        summary(&mut idle_after, 1)
    );
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// sled's floor

struct Floor<'a> {
    keys: u64,
    record_bytes: usize,
    layout: &'a str,
    batch: u64,
    flush_each_batch: bool,
    keep: bool,
}

fn sled_floor(cli: &Cli, floor: &Floor, knobs: &SledKnobs) -> anyhow::Result<()> {
    use sled::Transactional as _;
    let &Floor {
        keys,
        record_bytes,
        layout,
        batch,
        flush_each_batch,
        keep,
    } = floor;
    let (index, counter, v1) = match layout {
        "record" => (false, false, false),
        "record-index" => (true, false, false),
        "record-index-counter" => (true, true, false),
        "v1" => (true, true, true),
        other => bail!("unknown layout {other:?}: record, record-index, record-index-counter, v1"),
    };
    let dir = cli.work_dir.join("sled-floor");
    let _ = std::fs::remove_dir_all(&dir);
    let mut per_key = vec![];
    for run in 0..cli.runs {
        let path = dir.join(format!("db-{run}"));
        let db = knobs.config(&path).flush_every_ms(Some(500)).open()?;
        let tasks = db.open_tree("tasks")?;
        let events = db.open_tree("events")?;
        let by_state = db.open_tree("by_state")?;
        let by_created = db.open_tree("by_created")?;
        let meta = db.open_tree("meta")?;
        let record = vec![0x5au8; record_bytes];
        let event = [0x33u8; 60];
        let started = Instant::now();
        let cpu_before = cpu_seconds(std::process::id())?;
        let mut n = 0;
        while n < keys {
            let end = (n + batch).min(keys);
            (&tasks, &events, &by_state, &by_created, &meta)
                .transaction(|(t, e, s, c, m)| {
                    for n in n..end {
                        let id = format!("f-{n}");
                        t.insert(id.as_bytes(), record.as_slice())?;
                        let mut k = vec![3u8];
                        k.extend_from_slice(&n.to_be_bytes());
                        k.extend_from_slice(id.as_bytes());
                        if index {
                            s.insert(k.clone(), &[])?;
                        }
                        if v1 {
                            for i in 0u32..2 {
                                let mut k = id.as_bytes().to_vec();
                                k.extend_from_slice(&i.to_be_bytes());
                                e.insert(k, &event[..])?;
                            }
                            c.insert(&k[1..], &[])?;
                        }
                    }
                    if counter {
                        m.insert("count/failed", &end.to_be_bytes())?;
                    }
                    Ok::<_, sled::transaction::ConflictableTransactionError<()>>(())
                })
                .map_err(|e| anyhow::anyhow!("transaction: {e:?}"))?;
            if flush_each_batch {
                db.flush()?;
            }
            n = end;
        }
        db.flush()?;
        let took = started.elapsed();
        // This process's CPU (all threads: the writing one and sled's I/O threads).
        let cpu_us = (cpu_seconds(std::process::id())? - cpu_before) * 1e6 / keys as f64;
        drop((tasks, events, by_state, by_created, meta, db));
        let bytes = dir_bytes(&path)?;
        // What a reopened sled holds: the RSS of a fresh process that only opens it.
        let out = Command::new(std::env::current_exe()?)
            .arg("sled-open")
            .arg("--path")
            .arg(&path)
            .args(knobs.args())
            .output()?;
        let reopened: f64 = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(f64::NAN);
        println!(
            "run {run}: {keys} tasks, layout {layout}, record {record_bytes} B, batch {batch}: \
             {:.1} MiB = {:.0} B per task; written in {:.1} s with {cpu_us:.1} µs of CPU per \
             task{}; RSS of a process that reopens it {:.1} MiB",
            bytes as f64 / MIB,
            bytes as f64 / keys as f64,
            took.as_secs_f64(),
            if flush_each_batch {
                " (a flush per batch)"
            } else {
                ""
            },
            reopened
        );
        per_key.push(bytes as f64 / keys as f64);
    }
    println!(
        "\nsummary: sled bytes per task {}",
        summary(&mut per_key, 0)
    );
    if keep {
        println!("kept in {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Helper servers

async fn serve<F, Fut>(listen: SocketAddr, handler: F) -> anyhow::Result<()>
where
    F: Fn(hyper::Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = hyper::Response<Full<Bytes>>> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind(listen).await?;
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let handler = handler.clone();
                async move { Ok::<_, std::convert::Infallible>(handler(req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn noop_server(listen: SocketAddr) -> anyhow::Result<()> {
    serve(
        listen,
        |req: hyper::Request<hyper::body::Incoming>| async move {
            // Read the body, as coverd must.
            let _ = req.into_body().collect().await;
            hyper::Response::builder()
                .status(200)
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from_static(b"{\"status\":\"received\"}")))
                .expect("static response")
        },
    )
    .await
}

/// `magic`, then pseudo-random bytes (incompressible, like a media file), `len` in all.
fn media_body(magic: &[u8], len: usize) -> Bytes {
    let mut body = Vec::with_capacity(len);
    body.extend_from_slice(magic);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    while body.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        body.extend_from_slice(&x.to_le_bytes());
    }
    body.truncate(len);
    Bytes::from(body)
}

/// The mixed run's files: (path prefix, content type, body).
fn mixed_bodies() -> Vec<(&'static str, &'static str, Bytes)> {
    vec![
        (
            "/mix/mp3/",
            "audio/mpeg",
            media_body(b"ID3\x04\0\0\0\0\0\x0fTIT2", MIX_MP3),
        ),
        (
            "/mix/jpg/",
            "image/jpeg",
            media_body(b"\xff\xd8\xff\xe0\0\x10JFIF", MIX_JPG),
        ),
        (
            "/mix/wav/",
            "audio/wav",
            media_body(b"RIFF\x24\0\0\0WAVEfmt ", MIX_WAV),
        ),
        (
            "/mix/mp4/",
            "video/mp4",
            media_body(b"\0\0\0\x20ftypisom\0\0\x02\0", MIX_MP4),
        ),
    ]
}

const MIX_MP3: usize = 5 << 20;
const MIX_JPG: usize = 300 << 10;
const MIX_WAV: usize = 50 << 20;
const MIX_MP4: usize = 100 << 20;

async fn file_server(listen: SocketAddr, bytes: usize) -> anyhow::Result<()> {
    // A PNG signature, then pseudo-random bytes (incompressible, like an image).
    let png = media_body(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR", bytes);
    let mut routes = vec![("/img/", "image/png", png)];
    routes.extend(mixed_bodies());
    let routes = std::sync::Arc::new(routes);
    serve(listen, move |req: hyper::Request<hyper::body::Incoming>| {
        let routes = routes.clone();
        async move {
            let found = routes
                .iter()
                .find(|(prefix, _, _)| req.uri().path().starts_with(prefix));
            match found {
                Some((_, content_type, body)) => hyper::Response::builder()
                    .status(200)
                    .header("content-type", *content_type)
                    .body(Full::new(body.clone()))
                    .expect("static response"),
                None => hyper::Response::builder()
                    .status(404)
                    .body(Full::new(Bytes::new()))
                    .expect("static response"),
            }
        }
    })
    .await
}
