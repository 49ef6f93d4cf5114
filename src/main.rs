//! The binary's edge: parses the command line (clap), loads the configuration, sets up logs,
//! runs one command and turns its outcome into an exit code (0 ok, 1 missing/failed, 2 usage
//! or configuration, 70 a worker died and 75 temporary failure of the store in `serve`).
//! Everything else lives in the library.

/// jemalloc instead of glibc's malloc: sled allocates, copies and frees nodes on every write,
/// across threads, and under glibc that was the writer thread's largest cost; ingest went from
/// ~19k to ~30k callbacks/s with it (docs/benchmarks.md).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's settings, read by name when it starts: two arenas, and pages freed for half a
/// second go back to the OS, from a background thread also while coverd is idle, so a burst
/// of callbacks does not leave its peak resident (docs/benchmarks.md).
///
/// `narenas:2` whatever the CPU count, on purpose. It cannot be derived at startup: jemalloc
/// reads this string when it initializes, at the process's first allocation (before `main`),
/// and the arena count is fixed from then on. It need not be: the allocation-heavy work is
/// serial (the store's one writer thread copying sled's nodes, its one flusher), the
/// callbacks' tokio workers allocate little per request and mostly from their thread caches,
/// which never touch an arena; so more arenas would add memory (each keeps its own dirty
/// pages and metadata, what the decay settings bound) rather than throughput. jemalloc's own
/// default, 4 per CPU, would be 64 arenas on a 16-core VM. (Measured on 2 cores only.) An
/// operator can still override it without a rebuild: `_RJEM_MALLOC_CONF=narenas:8` in the
/// environment is read after this string and wins (`…,stats_print:true` shows
/// `opt.narenas`).
///
/// The `unsafe` attribute: `export_name` can clash with another symbol of that name; this one
/// is jemalloc's documented configuration symbol (with tikv-jemallocator's `_rjem_` prefix),
/// defined nowhere else.
#[allow(non_upper_case_globals)]
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static malloc_conf: &[u8] =
    b"background_thread:true,dirty_decay_ms:500,muzzy_decay_ms:0,narenas:2\0";

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};
use coverd::admin::{self, DEFAULT_LIST_LIMIT, Request, access, backup};
use coverd::config::{self, Config, Overrides};
use coverd::daemon;
use coverd::model::{Kind, State};

#[derive(Parser, Debug)]
#[command(
    name = "coverd",
    version = env!("COVERD_LONG_VERSION"),
    about = "Durable intake of KIE.AI cover callbacks and image downloads"
)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Debug)]
struct Global {
    /// Configuration file (TOML); default: $COVERD_CONFIG, else built-in defaults.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Data directory (overrides `data_dir` and $COVERD_DATA_DIR); admin and submit
    /// otherwise use the installed coverd.service's, else ./coverd-data if it exists, else
    /// /var/lib/coverd.
    #[arg(long, global = true, value_name = "DIR")]
    data_dir: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the daemon in the foreground.
    Serve {
        /// Callback listener address, HOST:PORT such as 127.0.0.1:8787 or localhost:8787
        /// (overrides `listen` and $COVERD_LISTEN).
        #[arg(long, value_name = "ADDR", value_parser = parse_listen)]
        listen: Option<SocketAddr>,
    },
    /// Validate the configuration file, environment and secrets as `serve` does, and print
    /// the effective configuration (secrets as "<set>"); exit 0 when valid, 2 when not.
    CheckConfig,
    /// Print a shell completion script.
    Completions {
        /// The shell to complete in.
        shell: Shell,
    },
    /// Print the man page (roff) on stdout.
    Man,
    /// Ask KIE for a task and keep its files; prints the new task id.
    ///
    /// submit MUSIC_TASK_ID, or submit cover MUSIC_TASK_ID: a cover of a finished song.
    ///
    /// submit music ENDPOINT REQUEST_JSON: a song. ENDPOINT is generate, extend,
    /// upload-cover, upload-extend, add-instrumental, add-vocals, replace-section or mashup;
    /// REQUEST_JSON is KIE's request body, a file or - for stdin (coverd adds callBackUrl).
    ///
    /// submit wav|video|stems MUSIC_TASK_ID AUDIO_ID: a WAV, a music video or the stems of one
    /// track (AUDIO_ID: the track's id, `audio_id` in `coverd admin show`).
    ///
    /// Only a cover's request is ever sent twice: for the other kinds a request whose outcome
    /// is unknown stays an intent (`coverd admin intents`) and the command exits 1.
    Submit {
        /// [KIND] and its arguments (see above).
        #[arg(value_name = "ARGS", num_args = 1..=3, required = true)]
        args: Vec<String>,
        /// Video: the author shown (at most 50 characters).
        #[arg(long, value_name = "A")]
        author: Option<String>,
        /// Video: the domain name shown (at most 50 characters).
        #[arg(long, value_name = "D")]
        domain_name: Option<String>,
        /// Stems: up to 12 stems (split_stem) instead of vocals + instrumental.
        #[arg(long)]
        split: bool,
        /// Print {"task_id": …, "music_task_id": …} instead of the bare id.
        #[arg(long)]
        json: bool,
    },
    /// Inspect and repair state (through the running daemon, or directly when it is stopped).
    Admin {
        #[command(subcommand)]
        command: AdminCommand,
    },
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum Shell {
    Bash,
    Zsh,
    Fish,
}

#[derive(Subcommand, Debug)]
enum AdminCommand {
    /// Counts per state, oldest unfinished task, data size, daemon up or not.
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Tasks, newest first.
    List {
        /// Only tasks in this state.
        #[arg(long, value_enum)]
        state: Option<StateArg>,
        /// Only tasks of this kind.
        #[arg(long, value_enum)]
        kind: Option<KindArg>,
        /// At most this many tasks.
        #[arg(long, default_value_t = DEFAULT_LIST_LIMIT)]
        limit: usize,
        /// Print a JSON array instead of text.
        #[arg(long)]
        json: bool,
    },
    /// One task: record, images, full event history.
    Show {
        /// The cover task's id (KIE's taskId).
        #[arg(value_name = "TASK_ID")]
        task_id: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Adopt a task that was submitted elsewhere (state submitted).
    Track {
        /// The task's id (KIE's taskId).
        #[arg(value_name = "TASK_ID")]
        task_id: String,
        /// What the task makes (default: cover).
        #[arg(long, value_enum)]
        kind: Option<KindArg>,
        /// The song's task id the task was made from, if known (not for music).
        #[arg(long, value_name = "ID")]
        music_task_id: Option<String>,
        /// The track (audio id) a wav, video or stems task was made from, if known.
        #[arg(long, value_name = "ID")]
        audio_id: Option<String>,
    },
    /// Remove one task and its files (a mistaken track, say); asks first unless --yes.
    Forget {
        /// The task's id (KIE's taskId).
        #[arg(value_name = "TASK_ID")]
        task_id: String,
        /// Do not ask.
        #[arg(long)]
        yes: bool,
        /// Also a task that is not finished (submitted or received).
        #[arg(long)]
        force: bool,
    },
    /// Put a failed task back to work; on a downloaded task, re-fetch missing or corrupt images.
    Retry {
        /// The cover task's id (KIE's taskId).
        #[arg(value_name = "TASK_ID")]
        task_id: String,
    },
    /// Re-hash every stored image against its record (exit 1 if any is missing or corrupt).
    Verify {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Every task, with its history, as one JSON object per line.
    Export,
    /// Submissions whose outcome is not recorded: a cover's (the daemon asks KIE again) and
    /// the other kinds' whose outcome is unknown (never sent again; check KIE, then drop).
    Intents {
        /// Forget this intent (its key, as listed) once you have checked KIE.
        #[arg(long, value_name = "KEY")]
        drop: Option<String>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Send the task's outbound notification again (same webhook-id).
    Redeliver {
        /// The cover task's id (KIE's taskId).
        #[arg(value_name = "TASK_ID")]
        task_id: String,
    },
    /// Consistent copy of the whole data directory into DEST, daemon running or stopped.
    Backup {
        /// A new or empty directory; with the systemd service running, one it can write,
        /// such as /var/lib/coverd-backup/NAME.
        #[arg(value_name = "DEST")]
        dest: PathBuf,
        /// Print the manifest (backup.json) as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Rebuild the data directory from a backup (daemon stopped, data directory empty).
    Restore {
        /// A directory written by `coverd admin backup`.
        #[arg(value_name = "SRC")]
        src: PathBuf,
        /// Print the backup's manifest as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Forget downloaded and failed tasks (and their images) last changed longer ago than D.
    ///
    /// A task's sent notifications go with it; a task whose notification is still pending
    /// is kept until it is delivered or given up on.
    Prune {
        /// Age such as "30d", "12h" or "90min" (a bare "m" is refused: minutes or months?).
        #[arg(long, value_name = "D", value_parser = parse_age)]
        older_than: Duration,
        /// Only count what would be removed.
        #[arg(long)]
        dry_run: bool,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Move the stored files from the data directory to the object store (storage.kind = "s3").
    ///
    /// Each file is checked against its sha256, uploaded and verified, recorded, and only
    /// then removed from the data directory. Stopped at any point, run it again: it resumes
    /// where it stopped and never moves a file twice (docs/storage.md).
    MigrateFiles {
        /// Where to: the object store of [storage] (only "s3").
        #[arg(long, value_name = "STORE", value_parser = ["s3"])]
        to: String,
        /// Only count what would be moved.
        #[arg(long)]
        dry_run: bool,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// `--listen`: an IP:PORT, or a host name resolved now (its first address).
fn parse_listen(value: &str) -> Result<SocketAddr, String> {
    config::resolve_addr(value).map_err(|e| format!("{value:?} {e}"))
}

fn parse_age(value: &str) -> Result<Duration, String> {
    admin::parse_age(value)
}

/// Writes a command's output to stdout. A reader that stopped early (`| head`: EPIPE, as
/// Rust ignores SIGPIPE) is not an error: the command ends with `code` as if it had read it
/// all, as `ls | head` does; `println!` would panic (exit 101). Any other write error is
/// exit 1.
fn to_stdout(bytes: &[u8], what: &str, code: ExitCode) -> ExitCode {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Ok(()) => code,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => code,
        Err(e) => {
            eprintln!("coverd: cannot write {what} to stdout: {e}");
            ExitCode::from(1)
        }
    }
}

fn main() -> ExitCode {
    // First of all: whatever coverd creates (data directory, store, images, admin socket)
    // is private from the moment it exists, whatever umask it was started with.
    daemon::private_umask();
    let cli = Cli::parse();
    match &cli.command {
        Command::Completions { shell } => {
            let shell = match shell {
                Shell::Bash => clap_complete::Shell::Bash,
                Shell::Zsh => clap_complete::Shell::Zsh,
                Shell::Fish => clap_complete::Shell::Fish,
            };
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "coverd", &mut script);
            return to_stdout(&script, "the completions", ExitCode::SUCCESS);
        }
        Command::Man => {
            return match coverd::manual::render(Cli::command()) {
                Ok(page) => to_stdout(&page, "the man page", ExitCode::SUCCESS),
                Err(e) => {
                    eprintln!("coverd: cannot write the man page: {e}");
                    ExitCode::from(1)
                }
            };
        }
        _ => {}
    }
    let overrides = Overrides {
        config_file: cli.global.config.clone(),
        data_dir: cli.global.data_dir.clone(),
        listen: match &cli.command {
            Command::Serve { listen } => *listen,
            _ => None,
        },
    };
    let daemon = matches!(cli.command, Command::Serve { .. });
    init_logs(daemon);
    // `serve` is the service (or a foreground run): flags, environment, file. Commands also
    // read the installed unit for what those leave unset (SPEC "Binary and commands").
    let loaded = if daemon {
        config::load(&overrides)
    } else {
        config::load_for_command(&overrides, matches!(cli.command, Command::CheckConfig))
    };
    let mut config = match loaded {
        Ok(c) => c,
        Err(e) => {
            // The daemon's refusal to start goes to its log at error priority (under
            // systemd: `journalctl -p err`); a command's goes to the terminal.
            if daemon {
                fatal(&format!("coverd cannot start: configuration error: {e}"));
            } else {
                eprintln!("coverd: {e}");
            }
            return ExitCode::from(2);
        }
    };
    for warning in &config.unit_warnings {
        eprintln!("coverd: warning: {warning}");
    }
    if let Command::CheckConfig = cli.command {
        let shown = config.effective_toml();
        if let Some(unit) = &config.unit {
            eprintln!(
                "coverd: the installed unit {unit} fills in what flags, environment and file leave unset"
            );
        }
        for line in config.secret_report(nix::unistd::geteuid().is_root()) {
            eprintln!("coverd: {line}");
        }
        if !config.unread_credentials.is_empty() {
            let keys: Vec<&str> = config.unread_credentials.iter().map(|(k, _)| *k).collect();
            eprintln!(
                "coverd: cannot check the secrets the service gets ({}): they were not read (see above); run as root",
                keys.join(", ")
            );
            let _ = to_stdout(shown.as_bytes(), "the configuration", ExitCode::SUCCESS);
            return ExitCode::from(2);
        }
        eprintln!("coverd: the configuration is valid");
        return to_stdout(shown.as_bytes(), "the configuration", ExitCode::SUCCESS);
    }
    let serve = daemon;
    let mut command = cli.command;
    if !serve {
        // Paths given on the command line are relative to where the operator stands, which
        // acting as the data directory's owner may change.
        access::locate(&mut config);
        // Restore as root: the empty target goes to the backup's owner first, so that all
        // the rest runs as that user (SPEC: a backup is untrusted input).
        if let Command::Admin {
            command: AdminCommand::Restore { src, .. },
        } = &command
            && let Err(e) =
                backup::give_target_to_src_owner(&config.data_dir, &backup::absolute(src))
        {
            eprintln!("coverd: {}", access::naming_data_dir(&e, &config.data_dir));
            return ExitCode::from(admin_exit(e.kind));
        }
        let mut others: Vec<&mut PathBuf> = Vec::new();
        if let Command::Admin {
            command: AdminCommand::Backup { dest: p, .. } | AdminCommand::Restore { src: p, .. },
        } = &mut command
        {
            *p = backup::absolute(p);
            others.push(p);
        }
        match access::act_as_owner(&config.data_dir, &mut others) {
            Ok(Some((dir, _owner))) => config.data_dir = dir,
            Ok(None) => {}
            Err(e) => {
                eprintln!("coverd: {}", access::naming_data_dir(&e, &config.data_dir));
                return ExitCode::from(admin_exit(e.kind));
            }
        }
        // Whatever admin writes (a backup, a restored store) is private to its user.
        nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("coverd: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let code = runtime.block_on(run(command, config));
    // A daemon whose worker died exits within SPEC's 5 s: a blocking task still running
    // (a download's file writer) is not waited for.
    runtime.shutdown_timeout(Duration::from_millis(500));
    code
}

async fn run(command: Command, config: Config) -> ExitCode {
    let (request, json) = match command {
        Command::Serve { .. } => {
            return match serve(config).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    // Said once: the log already goes to stderr (the journal under systemd),
                    // so printing it as well doubled every line. Every error's message names
                    // its cause, so `{e:#}` repeated that too.
                    fatal(&format!("coverd stopped: {e}"));
                    // 75 (EX_TEMPFAIL): the store failed for a reason a restart can fix; 70
                    // (EX_SOFTWARE): a worker died (the unit's Restart=on-failure restarts
                    // it; never 0 on a failure).
                    ExitCode::from(
                        e.downcast_ref::<daemon::DaemonError>()
                            .map_or(1, daemon::DaemonError::exit_status),
                    )
                }
            };
        }
        Command::CheckConfig | Command::Completions { .. } | Command::Man => {
            return ExitCode::SUCCESS;
        }
        Command::Submit {
            args,
            author,
            domain_name,
            split,
            json,
        } => match submit_request(&args, author, domain_name, split) {
            Ok(request) => (request, json),
            Err(e) => {
                eprintln!("coverd: {}", e.message);
                return ExitCode::from(admin_exit(e.kind));
            }
        },
        Command::Admin { command } => match command {
            AdminCommand::Status { json } => (Request::Status, json),
            AdminCommand::List {
                state,
                kind,
                limit,
                json,
            } => (
                Request::List {
                    state: state.map(|s| State::from(s).as_str().to_string()),
                    kind: kind.map(|k| Kind::from(k).as_str().to_string()),
                    limit,
                },
                json,
            ),
            AdminCommand::Show { task_id, json } => (Request::Show { task_id }, json),
            AdminCommand::Track {
                task_id,
                kind,
                music_task_id,
                audio_id,
            } => (
                Request::Track {
                    task_id,
                    music_task_id,
                    kind: kind.map(|k| Kind::from(k).as_str().to_string()),
                    audio_id,
                },
                false,
            ),
            AdminCommand::Forget {
                task_id,
                yes,
                force,
            } => {
                if !yes && let Err(e) = confirm_forget(&task_id) {
                    eprintln!("coverd: {}", e.message);
                    return ExitCode::from(admin_exit(e.kind));
                }
                (Request::Forget { task_id, force }, false)
            }
            AdminCommand::Retry { task_id } => (Request::Retry { task_id }, false),
            AdminCommand::Verify { json } => (Request::Verify, json),
            AdminCommand::Export => (Request::Export, false),
            AdminCommand::Redeliver { task_id } => (Request::Redeliver { task_id }, false),
            AdminCommand::Intents { drop, json } => (Request::Intents { drop }, json),
            AdminCommand::Backup { dest, json } => (Request::Backup { dest, seen: None }, json),
            AdminCommand::Restore { src, json } => (Request::Restore { src }, json),
            AdminCommand::MigrateFiles {
                to: _,
                dry_run,
                json,
            } => (Request::MigrateFiles { dry_run }, json),
            AdminCommand::Prune {
                older_than,
                dry_run,
                json,
            } => (
                Request::Prune {
                    older_than_secs: older_than.as_secs(),
                    dry_run,
                },
                json,
            ),
        },
    };
    let bar = progress_bar(&request);
    let progress = bar.clone().map(|bar| {
        Arc::new(move |done: u64, total: u64| {
            if bar.length() != Some(total) {
                bar.set_style(
                    indicatif::ProgressStyle::with_template(
                        "{msg} [{bar:40}] {pos}/{len} tasks ({eta} left)",
                    )
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                    .progress_chars("=> "),
                );
                bar.set_length(total);
            }
            bar.set_position(done);
        }) as backup::Progress
    });
    let data_dir = config.data_dir.clone();
    let result = admin::run_with(config, request, progress).await;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    match result {
        Ok(reply) => {
            let text = admin::render(&reply, json);
            if let Some(note) = admin::notes(&reply, json) {
                eprintln!("{note}");
            }
            let code = ExitCode::from(reply.exit_code());
            if text.is_empty() {
                code
            } else {
                to_stdout(format!("{text}\n").as_bytes(), "the reply", code)
            }
        }
        Err(e) => {
            eprintln!("coverd: {}", access::naming_data_dir(&e, &data_dir));
            ExitCode::from(admin_exit(e.kind))
        }
    }
}

/// A progress bar on stderr for the whole-store commands, only when stderr is a terminal:
/// a spinner until the command reports its totals (through the daemon it never does).
fn progress_bar(request: &Request) -> Option<indicatif::ProgressBar> {
    let what = request.progress_label()?;
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = indicatif::ProgressBar::new_spinner().with_message(what);
    bar.enable_steady_tick(Duration::from_millis(120));
    Some(bar)
}

async fn serve(config: Config) -> anyhow::Result<()> {
    // Handlers first: a SIGTERM during start-up then stops the daemon gracefully too, and a
    // SIGHUP never kills it (its default action).
    let signals = install_signal_handlers();
    warn_on_sighup();
    let running = daemon::start(config, test_hooks()).await?;
    let token = running.shutdown_token();
    tokio::spawn(async move {
        signals.await;
        tracing::info!("shutting down (signal received): finishing in-flight requests");
        token.cancel();
    });
    running.wait().await?;
    Ok(())
}

/// TEST ONLY: with `COVERD_TEST_STOP_WORKER=<download|poll|notify|writer|flusher>` in its
/// environment, `serve` makes that worker panic when it receives SIGUSR2, so that a process
/// test (tests/it/workers.rs) sees the real binary exit with status 70. Nothing else reads
/// the variable; unset (always, in production) it changes nothing and SIGUSR2 keeps its
/// default action. docs/reliability.md ("Stopped workers") documents it. Only in a build
/// with the `testing` feature (`cargo test` builds the binary so; `cargo build` does not).
#[cfg(feature = "testing")]
fn test_hooks() -> daemon::Hooks {
    let mut hooks = daemon::Hooks::default();
    let Some(name) = std::env::var_os("COVERD_TEST_STOP_WORKER") else {
        return hooks;
    };
    let Some(worker) = name.to_str().and_then(daemon::Worker::parse) else {
        tracing::warn!("COVERD_TEST_STOP_WORKER={name:?} names no worker; ignored");
        return hooks;
    };
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut usr2) = signal(SignalKind::user_defined2()) else {
        return hooks;
    };
    let faults = Arc::new(daemon::Faults::default());
    hooks.faults = Some(faults.clone());
    tracing::warn!(
        "test hook: SIGUSR2 makes the {} panic (COVERD_TEST_STOP_WORKER)",
        worker.name()
    );
    tokio::spawn(async move {
        if usr2.recv().await.is_some() {
            faults.stop(worker);
        }
    });
    hooks
}

/// Without the `testing` feature: no hooks, whatever the environment says.
#[cfg(not(feature = "testing"))]
fn test_hooks() -> daemon::Hooks {
    daemon::Hooks::default()
}

/// Registers SIGTERM and SIGINT handlers now; the returned future ends at the first signal.
fn install_signal_handlers() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let handlers = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    );
    async move {
        match handlers {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => {
                // Without signal handlers the daemon can only be killed; say so and keep serving.
                tracing::error!(
                    "cannot install SIGTERM/SIGINT handlers: coverd keeps serving but only SIGKILL stops it"
                );
                std::future::pending::<()>().await;
            }
        }
    }
}

/// The last line of a daemon that stops: at error level, once. Under journald it goes to
/// stderr with a `<3>` priority prefix rather than through the native socket: the process
/// exits right after, and journald attributes a native entry from an exited process to no
/// unit (`journalctl -u coverd` would miss it), while the stderr stream is known to be the
/// unit's from the start.
fn fatal(message: &str) {
    if stderr_is_journal() {
        eprintln!("<3>{message}");
    } else if tracing::enabled!(tracing::Level::ERROR) {
        tracing::error!("{message}");
    } else {
        eprintln!("coverd: {message}");
    }
}

/// Whether stderr is the journal stream systemd connected (`$JOURNAL_STREAM` is its
/// `device:inode`), not merely inherited by a process whose stderr goes elsewhere.
fn stderr_is_journal() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(meta) = std::fs::metadata("/proc/self/fd/2") else {
        return false;
    };
    stream.to_str() == Some(&format!("{}:{}", meta.dev(), meta.ino()))
}

/// SIGHUP usually means "reload the configuration", which coverd does not do: say so at
/// warning and keep serving (its default action would end the daemon with no log line and,
/// under systemd, no restart).
fn warn_on_sighup() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::hangup()) {
        Ok(mut hup) => {
            tokio::spawn(async move {
                while hup.recv().await.is_some() {
                    tracing::warn!("SIGHUP: no configuration reload; restart to apply changes");
                }
            });
        }
        Err(e) => {
            tracing::warn!("cannot install the SIGHUP handler: {e}; SIGHUP would stop coverd")
        }
    }
}

/// sled's modules whose logs repeat errors the store reports (see `init_logs`): a failed
/// log write (`iobuf`, `logger`), its periodic flush failing on that error again, or its
/// periodic fsync failing (`flusher`; the kernel reports a writeback error to every open
/// description of the file, so the store's own `fdatasync` of `db/db` fails on it too), and
/// each tree's flush when the store closes (`tree`).
const SLED_REPEATS: [&str; 5] = [
    "sled::tree=off",
    "sled::flusher=off",
    "sled::pagecache::iobuf=off",
    "sled::pagecache::logger=off",
    // object_store logs each retry inside one request at info; the request's outcome is
    // coverd's to say (an outage: once, `download`'s "uploads paused").
    "object_store::client::retry=warn",
];

/// Logs: the daemon under systemd (`$JOURNAL_STREAM`) writes to journald natively, its
/// fields without prefix (`TASK_ID=…`, `STATE=…`); otherwise stderr (under journald without
/// colours or timestamps, which journald adds). Level from `$RUST_LOG`, default `info` for
/// the daemon, `warn` for commands.
fn init_logs(daemon: bool) {
    use tracing_subscriber::EnvFilter;
    use tracing_subscriber::prelude::*;
    let default = if daemon { "info" } else { "warn" };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    // sled logs the I/O errors that coverd's store reports itself, as Rust `Debug` dumps and
    // again for each of its trees when the store closes (11 "failed to flush" lines at
    // exit): the store says each failure once, in words (SPEC "Logs": one event, one line).
    // So does object_store, for each retry of a request to the object store.
    let filter = SLED_REPEATS
        .iter()
        .filter_map(|d| d.parse().ok())
        .fold(filter, EnvFilter::add_directive);
    // Under systemd, the daemon logs straight to journald with real priorities
    // (`journalctl -p warning` works); commands keep writing to the terminal.
    let journald = stderr_is_journal();
    if daemon && journald {
        if let Ok(journald) = tracing_journald::layer() {
            let journald = journald.with_field_prefix(None);
            tracing_subscriber::registry()
                .with(filter)
                .with(journald)
                .init();
            return;
        }
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(!journald && std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if journald {
        builder.without_time().init();
    } else {
        builder.init();
    }
}

/// SPEC's exit status for an admin or submit failure: 1 missing, unhealthy or failed; 2 usage
/// or configuration.
fn admin_exit(kind: admin::AdminErrorKind) -> u8 {
    match kind {
        admin::AdminErrorKind::Missing | admin::AdminErrorKind::Failed => 1,
        admin::AdminErrorKind::Usage => 2,
    }
}

/// The request of `coverd submit ARGS…` (see its help).
fn submit_request(
    args: &[String],
    author: Option<String>,
    domain_name: Option<String>,
    split: bool,
) -> Result<Request, admin::AdminError> {
    let usage = |m: String| Err(admin::AdminError::usage(m));
    let kind = Kind::parse(&args[0]);
    if kind.is_none() || kind == Some(Kind::Cover) {
        let rest = match kind {
            Some(_) => &args[1..],
            None => args,
        };
        let [music_task_id] = rest else {
            return usage(
                "usage: coverd submit [cover] MUSIC_TASK_ID (or submit music|wav|video|stems …; see --help)".into(),
            );
        };
        return Ok(Request::Submit {
            music_task_id: music_task_id.clone(),
        });
    }
    let kind = kind.expect("checked above");
    if (author.is_some() || domain_name.is_some()) && kind != Kind::Video {
        return usage("--author and --domain-name are for `submit video` only".into());
    }
    if split && kind != Kind::Stems {
        return usage("--split is for `submit stems` only".into());
    }
    let request = match (kind, &args[1..]) {
        (Kind::Music, [endpoint, source]) => {
            let endpoint = match endpoint.as_str() {
                "generate" => "generate".to_string(),
                other => format!("generate/{other}"),
            };
            let text = if source == "-" {
                let mut text = String::new();
                std::io::Read::read_to_string(
                    &mut std::io::Read::take(std::io::stdin(), 1 << 20),
                    &mut text,
                )
                .map(|_| text)
            } else {
                std::fs::read_to_string(source)
            }
            .map_err(|e| {
                admin::AdminError::usage(format!("cannot read the request {source}: {e}"))
            })?;
            let body: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
                admin::AdminError::usage(format!("the request {source} is not JSON: {e}"))
            })?;
            coverd::submit::KindRequest {
                kind: kind.as_str().into(),
                endpoint,
                body,
                music_task_id: None,
                audio_id: None,
            }
        }
        (Kind::Wav | Kind::Video | Kind::Stems, [music, audio]) => {
            let mut body = serde_json::json!({"taskId": music, "audioId": audio});
            for (key, value) in [("author", author), ("domainName", domain_name)] {
                if let Some(v) = value {
                    if v.chars().count() > 50 {
                        return usage(format!("--{key} takes at most 50 characters"));
                    }
                    body[key] = v.into();
                }
            }
            if kind == Kind::Stems {
                body["type"] = if split {
                    "split_stem"
                } else {
                    "separate_vocal"
                }
                .into();
            }
            coverd::submit::KindRequest {
                kind: kind.as_str().into(),
                endpoint: kind.describe().create[0].into(),
                body,
                music_task_id: Some(music.clone()),
                audio_id: Some(audio.clone()),
            }
        }
        (Kind::Music, _) => {
            return usage(
                "usage: coverd submit music ENDPOINT REQUEST_JSON (a file, or - for stdin)".into(),
            );
        }
        (k, _) => {
            return usage(format!(
                "usage: coverd submit {} MUSIC_TASK_ID AUDIO_ID",
                k.as_str()
            ));
        }
    };
    Ok(Request::SubmitKind { request })
}

/// Asks on the terminal before `admin forget` removes a task; without a terminal, refuses
/// (a script says `--yes`).
fn confirm_forget(task_id: &str) -> Result<(), admin::AdminError> {
    use std::io::{BufRead, IsTerminal, Write};
    if !std::io::stdin().is_terminal() {
        return Err(admin::AdminError::usage(format!(
            "forget removes task {task_id} and its files for good; add --yes to confirm (no terminal to ask on)"
        )));
    }
    eprint!("forget task {task_id} and its stored files for good? [y/N] ");
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    let _ = std::io::stdin().lock().read_line(&mut answer);
    if matches!(answer.trim(), "y" | "Y" | "yes") {
        Ok(())
    } else {
        Err(admin::AdminError::usage(format!(
            "task {task_id} was not forgotten"
        )))
    }
}

/// A task kind argument (`--kind`), parsed by clap so a typo is a usage error with the
/// choices listed.
#[derive(ValueEnum, Clone, Copy, Debug)]
enum KindArg {
    Cover,
    Music,
    Wav,
    Video,
    Stems,
}

impl From<KindArg> for Kind {
    fn from(k: KindArg) -> Kind {
        match k {
            KindArg::Cover => Kind::Cover,
            KindArg::Music => Kind::Music,
            KindArg::Wav => Kind::Wav,
            KindArg::Video => Kind::Video,
            KindArg::Stems => Kind::Stems,
        }
    }
}

/// `admin list --state`, parsed by clap so a typo is a usage error with the choices listed.
#[derive(ValueEnum, Clone, Copy, Debug)]
enum StateArg {
    Submitted,
    Received,
    Downloaded,
    Failed,
}

impl From<StateArg> for State {
    fn from(s: StateArg) -> State {
        match s {
            StateArg::Submitted => State::Submitted,
            StateArg::Received => State::Received,
            StateArg::Downloaded => State::Downloaded,
            StateArg::Failed => State::Failed,
        }
    }
}
