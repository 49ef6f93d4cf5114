//! The binary's edge: parses the command line (clap), loads the configuration, sets up logs,
//! runs one command and turns its outcome into an exit code (0 ok, 1 missing/failed, 2 usage
//! or configuration, 75 temporary failure of the store in `serve`). Everything else lives in
//! the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use coverd::admin::{self, DEFAULT_LIST_LIMIT, Request};
use coverd::config::{self, Config, Overrides};
use coverd::daemon;

#[derive(Parser, Debug)]
#[command(
    name = "coverd",
    version,
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
    /// Data directory (overrides `data_dir` and $COVERD_DATA_DIR).
    #[arg(long, global = true, value_name = "DIR")]
    data_dir: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the daemon in the foreground.
    Serve {
        /// Callback listener address (overrides `listen` and $COVERD_LISTEN).
        #[arg(long, value_name = "ADDR")]
        listen: Option<SocketAddr>,
    },
    /// Ask KIE for a cover of a finished song; prints the cover task id.
    Submit {
        music_task_id: String,
        /// Print {"task_id": …, "music_task_id": …}.
        #[arg(long)]
        json: bool,
    },
    /// Inspect and repair state (through the running daemon, or directly when it is stopped).
    Admin {
        #[command(subcommand)]
        command: AdminCommand,
    },
}

#[derive(Subcommand, Debug)]
enum AdminCommand {
    /// Counts per state, oldest unfinished task, data size, daemon up or not.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Tasks, newest first.
    List {
        /// Only tasks in this state: submitted, received, downloaded or failed.
        #[arg(long)]
        state: Option<String>,
        /// At most this many tasks.
        #[arg(long, default_value_t = DEFAULT_LIST_LIMIT)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// One task: record, images, full event history.
    Show {
        task_id: String,
        #[arg(long)]
        json: bool,
    },
    /// Adopt a cover task that was submitted elsewhere (state submitted).
    Track {
        task_id: String,
        #[arg(long)]
        music_task_id: Option<String>,
    },
    /// Put a failed task back to work; on a downloaded task, re-fetch missing or corrupt images.
    Retry { task_id: String },
    /// Re-hash every stored image against its record (exit 1 if any is missing or corrupt).
    Verify {
        #[arg(long)]
        json: bool,
    },
    /// Every task, with its history, as one JSON object per line.
    Export,
    /// Send the task's outbound notification again (same webhook-id).
    Redeliver { task_id: String },
}

fn main() -> ExitCode {
    // First of all: whatever coverd creates (data directory, store, images, admin socket)
    // is private from the moment it exists, whatever umask it was started with.
    daemon::private_umask();
    let cli = Cli::parse();
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
    let config = match config::load(&overrides) {
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
    runtime.block_on(run(cli.command, config))
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
                    // 75 (EX_TEMPFAIL): the store failed for a reason a restart can fix
                    // (the unit's Restart=on-failure restarts it; never 0 on a failure).
                    let temporary = e
                        .downcast_ref::<daemon::DaemonError>()
                        .is_some_and(daemon::DaemonError::is_temporary);
                    ExitCode::from(if temporary { 75 } else { 1 })
                }
            };
        }
        Command::Submit {
            music_task_id,
            json,
        } => (Request::Submit { music_task_id }, json),
        Command::Admin { command } => match command {
            AdminCommand::Status { json } => (Request::Status, json),
            AdminCommand::List { state, limit, json } => (Request::List { state, limit }, json),
            AdminCommand::Show { task_id, json } => (Request::Show { task_id }, json),
            AdminCommand::Track {
                task_id,
                music_task_id,
            } => (
                Request::Track {
                    task_id,
                    music_task_id,
                },
                false,
            ),
            AdminCommand::Retry { task_id } => (Request::Retry { task_id }, false),
            AdminCommand::Verify { json } => (Request::Verify, json),
            AdminCommand::Export => (Request::Export, false),
            AdminCommand::Redeliver { task_id } => (Request::Redeliver { task_id }, false),
        },
    };
    match admin::run(config, request).await {
        Ok(reply) => {
            let text = admin::render(&reply, json);
            if !text.is_empty() {
                println!("{text}");
            }
            if let Some(note) = admin::notes(&reply, json) {
                eprintln!("{note}");
            }
            ExitCode::from(reply.exit_code())
        }
        Err(e) => {
            eprintln!("coverd: {e}");
            ExitCode::from(e.exit)
        }
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    // Handlers first: a SIGTERM during start-up then stops the daemon gracefully too, and a
    // SIGHUP never kills it (its default action).
    let signals = install_signal_handlers();
    warn_on_sighup();
    let running = daemon::start(config, daemon::Hooks::default()).await?;
    let token = running.shutdown_token();
    tokio::spawn(async move {
        signals.await;
        tracing::info!("shutting down (signal received): finishing in-flight requests");
        token.cancel();
    });
    running.wait().await?;
    Ok(())
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

/// Logs: the daemon under systemd (`$JOURNAL_STREAM`) writes to journald natively, its
/// fields without prefix (`TASK_ID=…`, `STATE=…`); otherwise stderr (under journald without
/// colours or timestamps, which journald adds). Level from `$RUST_LOG`, default `info` for
/// the daemon, `warn` for commands.
fn init_logs(daemon: bool) {
    use tracing_subscriber::EnvFilter;
    use tracing_subscriber::prelude::*;
    let default = if daemon { "info" } else { "warn" };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
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
