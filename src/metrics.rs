//! Prometheus metrics at `metrics_listen` (`GET /metrics`, text format 0.0.4) through the
//! `prometheus-client` crate: counters and histograms bumped by the loops as things happen,
//! gauges read from the store at scrape time (tasks per state, due queues, oldest unfinished
//! task), and the process metrics read from `/proc/self`. Owns the registry, the metric
//! names and their rendering; must not change any state (it only reads the store).

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

use crate::model::{Kind, Millis};
use crate::store::{Counts, Store, StoreError};

/// The `Content-Type` of the text format served at `/metrics`.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;
/// Due tasks are counted up to this many per queue, so a scrape stays cheap on a huge backlog.
pub const QUEUE_COUNT_LIMIT: usize = 10_000;

/// The `result` label values of `coverd_notifications_total`: one count per delivery
/// attempt's outcome. Each is rendered from the start, at 0.
pub const NOTIFY_RESULTS: [&str; 4] = ["delivered", "retry", "gone", "undeliverable"];

/// The `answer` label values of `coverd_callbacks_total` (docs/operations.md).
pub const CALLBACK_ANSWERS: [&str; 8] = ["200", "400", "401", "404", "408", "409", "413", "503"];
/// The `result` label values of `coverd_file_fetches_total` (and the deprecated
/// `coverd_image_fetches_total`).
pub const FETCH_RESULTS: [&str; 3] = ["stored", "retry", "failed"];
/// The `endpoint` label values of `coverd_kie_requests_total` (`kie::wire::Endpoint::name`).
pub const KIE_ENDPOINTS: [&str; 11] = [
    "cover/generate",
    "cover/record-info",
    "generate",
    "generate/record-info",
    "wav/generate",
    "wav/record-info",
    "mp4/generate",
    "mp4/record-info",
    "vocal-removal/generate",
    "vocal-removal/record-info",
    "common/download-url",
];
/// The `result` label values of `coverd_kie_requests_total`: `ok` and every
/// `KieError::kind` that a call can end with (a test in `kie` keeps them in step).
pub const KIE_RESULTS: [&str; 12] = [
    "ok",
    "unauthorized",
    "no_credits",
    "rate_limited",
    "maintenance",
    "server_error",
    "already_exists",
    "not_found",
    "not_kie_file",
    "invalid",
    "transport",
    "bad_response",
];

type Label = [(&'static str, &'static str); 1];
type Labels2 = [(&'static str, &'static str); 2];
type Histograms = Family<Label, Histogram, fn() -> Histogram>;

/// 50 ms … 102 s: `download.timeout` defaults to 120 s.
fn fetch_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.05, 2.0, 12))
}

/// The daemon's metrics since it started.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    callbacks: Family<Labels2, Counter>,
    callback_ack: Histogram,
    file_fetches: Family<Labels2, Counter>,
    file_bytes: Family<Label, Counter>,
    file_fetch: Histograms,
    image_fetches: Family<Label, Counter>,
    image_bytes: Counter,
    image_fetch: Histogram,
    kie_requests: Family<Labels2, Counter>,
    notifications: Family<Label, Counter>,
    polls: Counter,
    tasks: Family<Label, Gauge>,
    queue: Family<Label, Gauge>,
    oldest_unfinished: Gauge<f64, AtomicU64>,
    disk_free: Gauge,
    uploads: Family<Labels2, Counter>,
    upload: Histograms,
    storage_up: Gauge,
}

/// The results of `coverd_file_uploads_total`: a file taken by the file store (the data
/// directory, or the object store), or refused by it.
pub const UPLOAD_RESULTS: [&str; 2] = ["stored", "failed"];

/// What the store says at scrape time.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub tasks: Counts,
    pub due_downloads: usize,
    pub due_polls: usize,
    /// Age of the oldest task still submitted or received; zero when there is none.
    pub oldest_unfinished: Duration,
    /// Bytes available on the data directory's filesystem (0 when it cannot be read).
    pub disk_free_bytes: u64,
}

impl Snapshot {
    /// Reads the gauges' values from the store, `now` on the schedulers' clock.
    pub fn read(store: &Store, now: Millis) -> Result<Snapshot, StoreError> {
        let oldest = store
            .oldest_unfinished()?
            .map(|t| Duration::from_millis(u64::try_from(now - t.created_at).unwrap_or(0)))
            .unwrap_or_default();
        Ok(Snapshot {
            tasks: store.counts()?,
            due_downloads: store.due_downloads(now, QUEUE_COUNT_LIMIT)?.len(),
            due_polls: store.due_polls(now, QUEUE_COUNT_LIMIT)?.len(),
            oldest_unfinished: oldest,
            disk_free_bytes: crate::dirsync::free_bytes(store.path()).unwrap_or(0),
        })
    }
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let m = Metrics {
            registry: Registry::default(),
            callbacks: Family::default(),
            // 1 ms … 16 s: an answer must come well inside KIE's 15 s.
            callback_ack: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            file_fetches: Family::default(),
            file_bytes: Family::default(),
            file_fetch: Family::new_with_constructor(fetch_histogram),
            image_fetches: Family::default(),
            image_bytes: Counter::default(),
            image_fetch: fetch_histogram(),
            kie_requests: Family::default(),
            notifications: Family::default(),
            polls: Counter::default(),
            tasks: Family::default(),
            queue: Family::default(),
            oldest_unfinished: Gauge::default(),
            disk_free: Gauge::default(),
            uploads: Family::default(),
            upload: Family::new_with_constructor(fetch_histogram),
            storage_up: Gauge::default(),
        };
        m.storage_up.set(1);
        registry.register(
            "coverd_build",
            "Build of the running coverd (value 1)",
            Info::new([("version", env!("CARGO_PKG_VERSION"))]),
        );
        // Name, help, metric: in the order they are rendered.
        macro_rules! register {
            ($($name:literal, $help:literal => $field:ident;)*) => {
                $(registry.register($name, $help, m.$field.clone());)*
            };
        }
        register! {
            "coverd_tasks", "Tasks per state" => tasks;
            "coverd_callbacks", "Callback deliveries by task kind (the route) and the HTTP status answered" => callbacks;
            "coverd_callback_ack_seconds", "Time from a callback request received to its answer" => callback_ack;
            "coverd_file_fetches", "File fetch attempts by task kind and result (stored, retry, failed)" => file_fetches;
            "coverd_file_bytes", "Bytes of files stored, by task kind" => file_bytes;
            "coverd_file_fetch_seconds", "Duration of one file fetch attempt, whatever its result, by task kind" => file_fetch;
            "coverd_image_fetches", "Deprecated (removed in the next release): coverd_file_fetches_total{kind=\"cover\"}" => image_fetches;
            "coverd_image_bytes", "Deprecated (removed in the next release): coverd_file_bytes_total{kind=\"cover\"}" => image_bytes;
            "coverd_image_fetch_seconds", "Deprecated (removed in the next release): coverd_file_fetch_seconds{kind=\"cover\"}" => image_fetch;
            "coverd_kie_requests", "Calls to KIE's API by endpoint and result" => kie_requests;
            "coverd_queue_tasks", "Tasks due now per queue (downloads, polls), counted up to 10000" => queue;
            "coverd_oldest_unfinished_seconds", "Age of the oldest task still submitted or received (0 when none)" => oldest_unfinished;
            "coverd_notifications", "Outbound notifications by result" => notifications;
            "coverd_polls", "record-info polls made by the poller" => polls;
            "coverd_disk_free_bytes", "Bytes available on the data directory's filesystem" => disk_free;
            "coverd_file_uploads", "Files handed to the file store (the object store with storage.kind = \"s3\", else the data directory) by task kind and result (stored, failed)" => uploads;
            "coverd_file_upload_seconds", "Duration of storing one fetched file (upload, or install in the data directory), by task kind" => upload;
            "coverd_storage_up", "1 while the file store takes files, 0 while the object store is down or refuses (uploads paused)" => storage_up;
        }
        // Every documented label value from the start, at 0, so that `increase(…)` and
        // alert rules see the first occurrence (Prometheus' instrumentation advice).
        for result in NOTIFY_RESULTS {
            let _ = m.notifications.get_or_create(&[("result", result)]);
        }
        for kind in Kind::ALL.map(Kind::as_str) {
            for answer in CALLBACK_ANSWERS {
                let _ = m
                    .callbacks
                    .get_or_create(&[("kind", kind), ("answer", answer)]);
            }
            for result in FETCH_RESULTS {
                let _ = m
                    .file_fetches
                    .get_or_create(&[("kind", kind), ("result", result)]);
            }
            let _ = m.file_bytes.get_or_create(&[("kind", kind)]);
            let _ = m.file_fetch.get_or_create(&[("kind", kind)]);
            for result in UPLOAD_RESULTS {
                let _ = m
                    .uploads
                    .get_or_create(&[("kind", kind), ("result", result)]);
            }
            let _ = m.upload.get_or_create(&[("kind", kind)]);
        }
        for result in FETCH_RESULTS {
            let _ = m.image_fetches.get_or_create(&[("result", result)]);
        }
        for endpoint in KIE_ENDPOINTS {
            for result in KIE_RESULTS {
                let _ = m
                    .kie_requests
                    .get_or_create(&[("endpoint", endpoint), ("result", result)]);
            }
        }
        registry.register_collector(Box::new(Process::new()));
        Metrics { registry, ..m }
    }

    /// Counts one callback answer on the route of `kind` by its status code and observes how
    /// long it took.
    pub fn callback_answered(&self, kind: Kind, status: u16, took: Duration) {
        let answer = match status {
            200 => "200",
            400 => "400",
            401 => "401",
            404 => "404",
            408 => "408",
            409 => "409",
            413 => "413",
            503 => "503",
            _ => "other",
        };
        self.callbacks
            .get_or_create(&[("kind", kind.as_str()), ("answer", answer)])
            .inc();
        self.callback_ack.observe(took.as_secs_f64());
    }

    /// Counts one file fetch attempt's recorded result (`stored`, `retry` or `failed`) for a
    /// task of `kind`; a cover's also under the deprecated `coverd_image_*` names.
    pub fn file_fetch(&self, kind: Kind, result: &'static str, bytes: u64) {
        self.file_fetches
            .get_or_create(&[("kind", kind.as_str()), ("result", result)])
            .inc();
        self.file_bytes
            .get_or_create(&[("kind", kind.as_str())])
            .inc_by(bytes);
        if kind == Kind::Cover {
            self.image_fetches
                .get_or_create(&[("result", result)])
                .inc();
            self.image_bytes.inc_by(bytes);
        }
    }

    /// Observes the duration of one file fetch attempt of a task of `kind`.
    pub fn file_fetch_took(&self, kind: Kind, took: Duration) {
        self.file_fetch
            .get_or_create(&[("kind", kind.as_str())])
            .observe(took.as_secs_f64());
        if kind == Kind::Cover {
            self.image_fetch.observe(took.as_secs_f64());
        }
    }

    /// Counts one file the file store took, and how long that took.
    pub fn file_stored(&self, kind: Kind, took: Duration) {
        self.uploads
            .get_or_create(&[("kind", kind.as_str()), ("result", "stored")])
            .inc();
        self.upload
            .get_or_create(&[("kind", kind.as_str())])
            .observe(took.as_secs_f64());
    }

    /// Counts one file the file store refused.
    pub fn file_store_failed(&self, kind: Kind) {
        self.uploads
            .get_or_create(&[("kind", kind.as_str()), ("result", "failed")])
            .inc();
    }

    /// Whether the file store takes files (`coverd_storage_up`).
    pub fn storage_up(&self, up: bool) {
        self.storage_up.set(i64::from(up));
    }

    /// Whether the last word was that the file store takes files.
    pub fn storage_is_up(&self) -> bool {
        self.storage_up.get() == 1
    }

    /// Counts one KIE API call: `endpoint` as in KIE's path, `result` `ok` or the error kind.
    pub fn kie_request(&self, endpoint: &'static str, result: &'static str) {
        self.kie_requests
            .get_or_create(&[("endpoint", endpoint), ("result", result)])
            .inc();
    }

    /// Counts one notification attempt's outcome (`result` is one of [`NOTIFY_RESULTS`];
    /// anything else is not counted, so the label set stays bounded).
    pub fn notification(&self, result: &str) {
        if let Some(result) = NOTIFY_RESULTS.into_iter().find(|r| *r == result) {
            self.notifications
                .get_or_create(&[("result", result)])
                .inc();
        }
    }

    /// Counts one record-info poll made by the poller.
    pub fn poll_made(&self) {
        self.polls.inc();
    }

    /// The text exposition, with the gauges set from `snapshot`.
    pub fn render(&self, snapshot: &Snapshot) -> String {
        let c = &snapshot.tasks;
        let states = [
            ("submitted", c.submitted),
            ("received", c.received),
            ("downloaded", c.downloaded),
            ("failed", c.failed),
        ];
        set_each(&self.tasks, "state", states);
        let queues = [
            ("downloads", snapshot.due_downloads as u64),
            ("polls", snapshot.due_polls as u64),
        ];
        set_each(&self.queue, "queue", queues);
        self.oldest_unfinished
            .set(snapshot.oldest_unfinished.as_secs_f64());
        self.disk_free
            .set(i64::try_from(snapshot.disk_free_bytes).unwrap_or(i64::MAX));
        let mut out = String::new();
        // Writing into a String cannot fail; an encoder error would be a bug in a metric.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry);
        out
    }
}

/// Sets the gauge of each `(label value, n)` in `family`, labelled `label`.
fn set_each<const N: usize>(
    family: &Family<Label, Gauge>,
    label: &'static str,
    values: [(&'static str, u64); N],
) {
    for (value, n) in values {
        family
            .get_or_create(&[(label, value)])
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }
}

/// The standard `process_*` metrics, read from `/proc/self` at every scrape (Linux only;
/// elsewhere only the start time is known).
#[derive(Debug)]
struct Process {
    /// Fallback start time (seconds since the epoch) when `/proc` cannot tell.
    created: f64,
}

/// The kernel reports CPU times in `/proc` in USER_HZ, which is 100 on every Linux
/// architecture coverd is built for.
const USER_HZ: f64 = 100.0;

impl Process {
    fn new() -> Process {
        Process {
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0),
        }
    }
}

/// Fields of `/proc/self/stat` after the command name: (utime+stime in ticks, start ticks
/// since boot).
fn proc_stat() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name is in parentheses and may contain spaces: split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): utime is field 14, stime 15, starttime 22.
    let get = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    Some((get(14)? + get(15)?, get(22)?))
}

fn boot_time() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    stat.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

/// A `Vm…:   1234 kB` line of `/proc/self/status`, in bytes.
fn status_bytes(key: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix(key))?;
    let kb: u64 = line
        .trim_start_matches(':')
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kb * 1024)
}

fn open_fds() -> Option<u64> {
    Some(std::fs::read_dir("/proc/self/fd").ok()?.count() as u64)
}

fn max_fds() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))?;
    line.split_whitespace().next()?.parse().ok()
}

impl Collector for Process {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        fn gauge(
            encoder: &mut DescriptorEncoder,
            name: &str,
            help: &str,
            value: f64,
        ) -> Result<(), std::fmt::Error> {
            let metric = ConstGauge::new(value);
            let e = encoder.encode_descriptor(name, help, None, metric.metric_type())?;
            metric.encode(e)
        }
        let stat = proc_stat();
        if let Some((ticks, _)) = stat {
            let metric = ConstCounter::new(ticks as f64 / USER_HZ);
            let e = encoder.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds",
                None,
                metric.metric_type(),
            )?;
            metric.encode(e)?;
        }
        let start = match (stat, boot_time()) {
            (Some((_, start_ticks)), Some(boot)) => boot as f64 + start_ticks as f64 / USER_HZ,
            _ => self.created,
        };
        let as_f64 = |v: Option<u64>| v.map(|v| v as f64);
        let gauges = [
            (
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds",
                Some(start),
            ),
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                as_f64(status_bytes("VmRSS")),
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                as_f64(status_bytes("VmSize")),
            ),
            (
                "process_open_fds",
                "Number of open file descriptors",
                as_f64(open_fds()),
            ),
            (
                "process_max_fds",
                "Maximum number of open file descriptors",
                as_f64(max_fds()),
            ),
        ];
        for (name, help, value) in gauges {
            if let Some(value) = value {
                gauge(&mut encoder, name, help, value)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of the sample line `name` (with its labels, exactly as rendered).
    fn sample(text: &str, name: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::new();
        m.callback_answered(Kind::Cover, 200, Duration::from_millis(3));
        m.callback_answered(Kind::Cover, 404, Duration::from_millis(1));
        m.callback_answered(Kind::Cover, 503, Duration::from_millis(1));
        m.file_fetch(Kind::Cover, "stored", 1000);
        m.file_fetch_took(Kind::Cover, Duration::from_millis(120));
        m.kie_request("cover/record-info", "ok");
        m.notification("delivered");
        m.notification("no such result");
        let text = m.render(&Snapshot {
            tasks: Counts {
                submitted: 1,
                received: 2,
                downloaded: 3,
                failed: 4,
            },
            due_downloads: 5,
            due_polls: 6,
            oldest_unfinished: Duration::from_secs(90),
            disk_free_bytes: 7 << 30,
        });
        let expect = [
            ("coverd_disk_free_bytes", 7516192768.0),
            ("coverd_build_info{version=\"0.1.0\"}", 1.0),
            ("coverd_tasks{state=\"failed\"}", 4.0),
            ("coverd_callbacks_total{kind=\"cover\",answer=\"200\"}", 1.0),
            ("coverd_callbacks_total{kind=\"cover\",answer=\"404\"}", 1.0),
            ("coverd_callbacks_total{kind=\"cover\",answer=\"503\"}", 1.0),
            ("coverd_callback_ack_seconds_count", 3.0),
            ("coverd_callback_ack_seconds_bucket{le=\"0.002\"}", 2.0),
            ("coverd_image_fetches_total{result=\"stored\"}", 1.0),
            ("coverd_image_bytes_total", 1000.0),
            ("coverd_image_fetch_seconds_count", 1.0),
            (
                "coverd_kie_requests_total{endpoint=\"cover/record-info\",result=\"ok\"}",
                1.0,
            ),
            ("coverd_queue_tasks{queue=\"downloads\"}", 5.0),
            ("coverd_queue_tasks{queue=\"polls\"}", 6.0),
            ("coverd_oldest_unfinished_seconds", 90.0),
            ("coverd_notifications_total{result=\"delivered\"}", 1.0),
            ("coverd_notifications_total{result=\"undeliverable\"}", 0.0),
        ];
        for (name, value) in expect {
            assert_eq!(sample(&text, name), Some(value), "{name} in\n{text}");
        }
        // A test process may not have used 10 ms of CPU yet: present is enough.
        assert!(
            sample(&text, "process_cpu_seconds_total").is_some_and(|v| v >= 0.0),
            "{text}"
        );
        for name in [
            "process_start_time_seconds",
            "process_resident_memory_bytes",
            "process_open_fds",
        ] {
            assert!(
                sample(&text, name).is_some_and(|v| v > 0.0),
                "{name} in\n{text}"
            );
        }
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            assert_eq!(line.rsplit(' ').count(), 2, "{line}");
        }
    }
}
