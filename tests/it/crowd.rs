//! The crowded listener (SPEC "HTTP surface"): 2,000 other connections are open to `listen`
//! in the three ways that used to hold every slot (idle keep-alive after one request, headers
//! trickling in, requests pipelined whose answers are never read), and a real callback is
//! still answered within 2 s. Once with the connection cap the daemon derives from the fd
//! limit, once with a cap far below the crowd, where only shedding idle connections helps.
//!
//! A third crowd trickles request bodies (600 connections declaring 60,000 bytes and sending
//! one a second, reconnecting whenever the daemon closes them): a body still arriving must
//! not make its connection count as "in its handler".
//!
//! The test process holds both ends of every connection (the daemon runs in-process), so it
//! raises its own RLIMIT_NOFILE and skips, saying why, when the hard limit is too low.

use std::time::{Duration, Instant};

use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinSet;

use crate::bin_util::Scratch;
use crate::fake_kie::FakeKie;
use crate::fake_kie::files::png;
use crate::harness::{Daemon, callback_on_a_new_connection, success_body, test_config};

/// Other connections open while the callback is sent.
const CROWD: usize = 2000;
/// Of which pipelining ones (each sends 2,000 requests and reads no answer).
const PIPELINED: usize = 100;
/// The contract's bound, used only as the failure bound.
const BOUND: Duration = Duration::from_secs(2);
/// A generous bound for anything the crowd itself waits on.
const PATIENCE: Duration = Duration::from_secs(30);

/// Raises the soft fd limit to the hard one; `false` (after saying why) if even that cannot
/// hold both ends of the crowd plus the daemon's reserve and the other tests' files.
fn enough_fds() -> bool {
    let needed = 2 * CROWD as u64 + coverd::server::RESERVED_FDS + 1500;
    let limit = getrlimit(Resource::Nofile);
    let hard = limit.maximum.unwrap_or(u64::MAX);
    if hard < needed {
        eprintln!(
            "skipped: the hard RLIMIT_NOFILE is {hard}, this test needs {needed} file descriptors (raise it with `ulimit -Hn` or LimitNOFILE)"
        );
        return false;
    }
    if limit.current.is_some_and(|c| c < needed) {
        setrlimit(
            Resource::Nofile,
            Rlimit {
                current: limit.maximum,
                maximum: limit.maximum,
            },
        )
        .expect("raise RLIMIT_NOFILE to its hard limit");
    }
    true
}

/// The open crowd; dropping it closes every connection.
struct Crowd {
    idle: Vec<TcpStream>,
    piped: Vec<TcpStream>,
    trickle: tokio::task::JoinHandle<()>,
    /// Connections the daemon closed while the crowd was being opened.
    shed: usize,
}

impl Drop for Crowd {
    fn drop(&mut self) {
        self.trickle.abort();
    }
}

/// Reads one `/healthz` answer (headers, then the body `ok`).
async fn read_healthz(s: &mut TcpStream) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    while !(buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.ends_with(b"ok")) {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(())
}

/// Opens `n` connections with `open`, all at once; returns the ones that opened and adds
/// those the daemon closed meanwhile to `shed`.
async fn open_each<F, Fut>(n: usize, what: &str, shed: &mut usize, open: F) -> Vec<TcpStream>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = std::io::Result<TcpStream>> + Send + 'static,
{
    let mut set = JoinSet::new();
    for _ in 0..n {
        set.spawn(open());
    }
    let mut open = Vec::new();
    while let Some(r) = set.join_next().await {
        match r.unwrap_or_else(|e| panic!("{what}: {e}")) {
            Ok(s) => open.push(s),
            Err(_) => *shed += 1,
        }
    }
    open
}

/// Opens the crowd against `addr`: idle keep-alive connections that had one answer, then
/// pipelining ones that never read their answers, then ones whose headers trickle in a byte
/// every 500 ms (kept up until the crowd is dropped).
async fn open_crowd(addr: std::net::SocketAddr) -> Crowd {
    let slow_n = (CROWD - PIPELINED) / 2;
    let idle_n = CROWD - PIPELINED - slow_n;
    let mut shed = 0;

    let idle = open_each(
        idle_n,
        "idle connection task",
        &mut shed,
        move || async move {
            let mut s = TcpStream::connect(addr).await.expect("connect");
            s.write_all(b"GET /healthz HTTP/1.1\r\nhost: crowd\r\n\r\n")
                .await?;
            tokio::time::timeout(PATIENCE, read_healthz(&mut s))
                .await
                .map_err(|_| std::io::Error::other("no answer in time"))??;
            Ok(s)
        },
    )
    .await;

    // 2,000 requests at once (they fit the kernel's buffers, so the write returns), answers
    // never read: ~340 KB of answers, more than a tiny receive buffer, the daemon's socket
    // buffer and hyper's write buffer together usually hold, so most get stuck writing.
    let piped = open_each(
        PIPELINED,
        "pipelining task",
        &mut shed,
        move || async move {
            let socket = TcpSocket::new_v4().expect("socket");
            socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
            let mut s = socket.connect(addr).await.expect("connect");
            let requests = b"DELETE /healthz HTTP/1.1\r\nhost: crowd\r\n\r\n".repeat(2000);
            match tokio::time::timeout(PATIENCE, s.write_all(&requests)).await {
                Ok(Err(e)) => Err(e),
                // Written, or the daemon stopped reading them: either way, open and unread.
                Ok(Ok(())) | Err(_) => Ok(s),
            }
        },
    )
    .await;

    let mut slow = open_each(
        slow_n,
        "slow connection task",
        &mut shed,
        move || async move {
            let mut s = TcpStream::connect(addr).await.expect("connect");
            s.write_all(b"POST /callbacks/cover HTTP/1.1\r\nx-slow: ")
                .await
                .map(|()| s)
        },
    )
    .await;
    let trickle = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            // A closed connection fails its write and is dropped from the crowd.
            slow.retain(|s| s.try_write(b"a").is_ok_and(|n| n == 1));
        }
    });
    eprintln!(
        "crowd: {} idle, {} pipelining, {shed} shed while opening",
        idle.len(),
        piped.len(),
    );
    Crowd {
        idle,
        piped,
        trickle,
        shed,
    }
}

/// Waits until a `/healthz` round trip on a new connection succeeds.
async fn drained(addr: std::net::SocketAddr) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let probe = async {
            let mut s = TcpStream::connect(addr).await?;
            s.write_all(b"GET /healthz HTTP/1.1\r\nhost: probe\r\n\r\n")
                .await?;
            read_healthz(&mut s).await
        };
        match tokio::time::timeout(PATIENCE, probe).await {
            Ok(Ok(())) => return,
            // Shed before its answer: try again.
            Ok(Err(_)) if Instant::now() < deadline => continue,
            _ => panic!("the daemon never answered a probe behind the crowd"),
        }
    }
}

fn addr(d: &Daemon) -> std::net::SocketAddr {
    d.base
        .trim_start_matches("http://")
        .parse()
        .expect("daemon address")
}

/// Sends three callbacks at once, each on a fresh connection, to the listener at `base`
/// while the crowd is open: every one must be answered 200 within [`BOUND`] (a locked-out
/// listener makes them wait for the crowd's timeouts, 10 s or more). Returns their task ids.
async fn callbacks_answered_in_time(base: &str, fake: &FakeKie, what: &str) -> Vec<String> {
    callbacks_named_answered_in_time(base, fake, what, "crowd").await
}

/// [`callbacks_answered_in_time`] with task ids `<prefix>0`, `<prefix>1`, `<prefix>2`.
async fn callbacks_named_answered_in_time(
    base: &str,
    fake: &FakeKie,
    what: &str,
    prefix: &str,
) -> Vec<String> {
    let mut set = JoinSet::new();
    for i in 0..3 {
        let id = format!("{prefix}{i}");
        let body = success_body(&id, &[fake.files.url("/crowd.png")]);
        let base = base.to_string();
        set.spawn(async move {
            let (took, resp) = callback_on_a_new_connection(&base, body, PATIENCE).await;
            (id, took, resp)
        });
    }
    let mut timings = Vec::new();
    let mut ids = Vec::new();
    while let Some(joined) = set.join_next().await {
        let (id, took, resp) = joined.expect("callback task");
        let resp = resp
            .unwrap_or_else(|| panic!("{what}: callback {id} not answered within {PATIENCE:?}"))
            .unwrap_or_else(|e| panic!("{what}: callback {id} failed: {e}"));
        assert_eq!(resp.status(), 200, "{what}: callback {id}");
        timings.push(took);
        ids.push(id);
    }
    eprintln!("{what}: callbacks answered in {timings:?}");
    assert!(
        timings.iter().all(|t| *t <= BOUND),
        "{what}: callbacks answered in {timings:?}, not all within {BOUND:?}"
    );
    ids
}

/// [`callbacks_answered_in_time`] against the in-process daemon, and each one stored.
async fn assert_callbacks_answered(d: &Daemon, fake: &FakeKie, what: &str) {
    for id in callbacks_answered_in_time(&d.base, fake, what).await {
        assert!(d.task(&id).is_some(), "{what}: callback {id} not stored");
    }
}

/// The two crowd tests take turns: each one's crowd would otherwise load the machine while
/// the other one measures.
static ONE_CROWD_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The start of every crowd test: `None` (skip) without enough file descriptors, else this
/// test's turn and a fake KIE serving `/crowd.png`.
async fn crowd_test() -> Option<(tokio::sync::MutexGuard<'static, ()>, FakeKie)> {
    if !enough_fds() {
        return None;
    }
    let turn = ONE_CROWD_AT_A_TIME.lock().await;
    let (fake, _) = FakeKie::serving([("/crowd.png", png(2000))]).await;
    Some((turn, fake))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callback_answered_within_2s_while_2000_connections_crowd_the_listener() {
    let Some((_turn, fake)) = crowd_test().await else {
        return;
    };
    let d = Daemon::start(&fake, |c| c.accept_unknown_tasks = true).await;
    let crowd = open_crowd(addr(&d)).await;
    assert_callbacks_answered(&d, &fake, "derived cap").await;
    assert_eq!(d.get("/healthz").await, (200, "ok".into()));
    drop(crowd);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crowd_over_the_connection_cap_is_shed_not_waited_for() {
    const CAP: usize = 300;
    let Some((_turn, fake)) = crowd_test().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path(), &fake);
    config.accept_unknown_tasks = true;
    let d = Daemon::start_with(dir, config, |h| h.max_connections = Some(CAP)).await;
    let crowd = open_crowd(addr(&d)).await;
    // The crowd is open, not still connecting: once a probe queued behind it in the kernel's
    // accept queue is answered, the daemon has taken (and mostly shed) every crowd
    // connection, so what is measured below is a callback among open connections.
    drained(addr(&d)).await;
    assert_callbacks_answered(&d, &fake, "small cap").await;
    // Shed, not merely queued: no more than the cap of the idle ones can still be open.
    let deadline = Instant::now() + PATIENCE;
    loop {
        let open = crowd
            .idle
            .iter()
            .filter(|s| {
                let mut b = [0u8; 1];
                matches!(s.try_read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
            })
            .count();
        if open <= CAP {
            eprintln!(
                "cap {CAP}: {open} of {} idle connections still open",
                crowd.idle.len()
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{open} idle connections still open, over the cap of {CAP}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(d.get("/healthz").await, (200, "ok".into()));
    drop(crowd);
    d.stop().await;
}

/// The same crowd against the real binary, with the connection cap it derives from its own
/// fd limit: the promise holds for the daemon as shipped, not only for the library.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_binary_answers_a_callback_within_2s_among_2000_connections() {
    let Some((_turn, fake)) = crowd_test().await else {
        return;
    };
    let scratch = Scratch::new();
    scratch.write_config(&fake.base_url(), "", "");
    let daemon = scratch.serve().await;
    let crowd = open_crowd(daemon.addr).await;
    eprintln!(
        "binary crowd: {} idle, {} pipelining, {} shed while opening",
        crowd.idle.len(),
        crowd.piped.len(),
        crowd.shed
    );
    let ids = callbacks_answered_in_time(&daemon.base, &fake, "real binary").await;
    assert_eq!(daemon.get("/healthz").await.0, 200);
    drop(crowd);
    for id in ids {
        let task = scratch.admin_json(&["show", &id]).await;
        assert_eq!(task["task_id"], id.as_str(), "callback {id} stored");
    }
    daemon.stop().await;
}

/// Connections of the slow-body crowd.
const SLOW_BODIES: usize = 600;
/// What each of them sends at once: a callback's headers declaring a 60,000-byte body
/// (under the 64 KiB cap, so it is not refused at once); then a byte a second.
const SLOW_BODY_HEAD: &[u8] = b"POST /callbacks/cover HTTP/1.1\r\nhost: crowd\r\ncontent-type: application/json\r\ncontent-length: 60000\r\n\r\n";
/// The pause before a closed slow-body connection connects again.
const RECONNECT_PAUSE: Duration = Duration::from_millis(250);
/// Connections one slow-body client opens at most (the test ends long before).
const MAX_RECONNECTS: usize = 10_000;

/// The slow-body crowd; dropping it closes every connection.
struct SlowBodies {
    /// The crowd's own runtime: its 600 clients must not queue in the run queue of the
    /// test's runtime, which reads the genuine answers (in production the attackers are other
    /// machines; sharing one scheduler would starve the daemon's tasks behind the test's).
    clients: Option<tokio::runtime::Runtime>,
    /// Requests started so far (headers sent), reconnections included.
    started: tokio::sync::watch::Receiver<usize>,
}

impl Drop for SlowBodies {
    fn drop(&mut self) {
        if let Some(rt) = self.clients.take() {
            // Inside an async test: no blocking wait for the clients, their sockets close.
            rt.shutdown_background();
        }
    }
}

/// Starts [`SLOW_BODIES`] clients against `addr`, each sending [`SLOW_BODY_HEAD`] and then
/// a byte of body a second, and when the daemon closes the connection (shed, or its body
/// timed out) connecting again after [`RECONNECT_PAUSE`].
fn trickle_bodies(addr: std::net::SocketAddr) -> SlowBodies {
    let (count, started) = tokio::sync::watch::channel(0usize);
    let clients = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("slow-bodies")
        .enable_all()
        .build()
        .expect("the slow-body crowd's runtime");
    for _ in 0..SLOW_BODIES {
        let count = count.clone();
        clients.spawn(async move {
            for _ in 0..MAX_RECONNECTS {
                if let Ok(mut s) = TcpStream::connect(addr).await
                    && s.write_all(SLOW_BODY_HEAD).await.is_ok()
                {
                    count.send_modify(|n| *n += 1);
                    let mut tick = tokio::time::interval(Duration::from_secs(1));
                    tick.tick().await;
                    let mut answer = [0u8; 1024];
                    loop {
                        tokio::select! {
                            // An answer (408, 503) or the close: either way it ends here.
                            r = s.read(&mut answer) => if !matches!(r, Ok(n) if n > 0) { break },
                            _ = tick.tick() => if s.write_all(b" ").await.is_err() { break },
                        }
                    }
                }
                tokio::time::sleep(RECONNECT_PAUSE).await;
            }
        });
    }
    SlowBodies {
        clients: Some(clients),
        started,
    }
}

impl SlowBodies {
    /// Waits (bounded) until at least `n` requests have started.
    async fn started(&mut self, n: usize) {
        let reached = tokio::time::timeout(PATIENCE, self.started.wait_for(|s| *s >= n))
            .await
            .is_ok_and(|r| r.is_ok());
        assert!(
            reached,
            "only {} slow-body requests started within {PATIENCE:?}, expected {n}",
            *self.started.borrow()
        );
    }
}

/// Genuine callbacks sent in three rounds while the slow-body crowd keeps the listener
/// full: once every slow client has sent its headers, and twice more after as many
/// reconnections again (the crowd churning, as an attacker who reconnects would). Every
/// callback must be answered 200 within [`BOUND`]. Returns the task ids.
async fn callbacks_among_slow_bodies(
    base: &str,
    addr: std::net::SocketAddr,
    fake: &FakeKie,
    what: &str,
) -> Vec<String> {
    let mut crowd = trickle_bodies(addr);
    let mut ids = Vec::new();
    for round in 1..=3 {
        crowd.started(round * SLOW_BODIES).await;
        let what = format!("{what}, round {round}");
        let prefix = format!("slow{round}-");
        ids.extend(callbacks_named_answered_in_time(base, fake, &what, &prefix).await);
    }
    eprintln!(
        "{what}: {} slow-body requests started in all",
        *crowd.started.borrow()
    );
    ids
}

/// Issue 14 item 6: 600 connections trickling bodies (reconnecting as soon as they are
/// closed) against the real binary under an fd limit of 1,100, so that the cap it derives
/// itself is the 332 of the report; three rounds of genuine callbacks, each answered 200
/// within 2 s and stored. (Against the in-process daemon the crowd, the daemon and the
/// rest of the suite share one process on two cores, and the bound measured the test's
/// own load: it failed 1 full run in 5. The binary has its own process, as in production.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_binary_sheds_slow_bodies_under_its_own_cap() {
    let Some((_turn, fake)) = crowd_test().await else {
        return;
    };
    let scratch = Scratch::new();
    scratch.write_config(&fake.base_url(), "", "");
    let daemon = crate::bin_util::Daemon::spawn(
        crate::process::serve_after("ulimit -n 1100", &scratch),
        scratch.data_dir(),
    )
    .await;
    assert!(
        daemon.logs().contains("max_connections=332"),
        "the derived cap:\n{}",
        daemon.logs()
    );
    let ids = callbacks_among_slow_bodies(&daemon.base, daemon.addr, &fake, "real binary").await;
    assert_eq!(daemon.get("/healthz").await.0, 200);
    for id in ids {
        let task = scratch.admin_json(&["show", &id]).await;
        assert_eq!(task["task_id"], id.as_str(), "callback {id} stored");
    }
    daemon.stop().await;
}
