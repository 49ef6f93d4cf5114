//! Printing replies for people (tables, sentences) and scripts (`--json`). Pure: must not
//! do I/O.

use super::{QuarantinedJson, Reply};

/// Renders a reply for people (`json = false`) or scripts (`json = true`).
pub fn render(reply: &Reply, json: bool) -> String {
    if json {
        let value = match reply {
            Reply::Status { status } => serde_json::to_string_pretty(status),
            Reply::Tasks { tasks } => serde_json::to_string_pretty(tasks),
            Reply::Task { task, .. } => serde_json::to_string_pretty(task),
            Reply::Submitted { submitted, .. } => serde_json::to_string(submitted),
            Reply::Verified { verify } => serde_json::to_string_pretty(verify),
            Reply::Export { .. } => Ok(render(reply, false)),
            Reply::BackedUp { backup, .. } | Reply::Restored { backup, .. } => {
                serde_json::to_string_pretty(backup)
            }
            Reply::Pruned { prune } => serde_json::to_string_pretty(prune),
            Reply::Migrated { migrate } => serde_json::to_string_pretty(migrate),
            Reply::Intents { intents, .. } => serde_json::to_string_pretty(intents),
        };
        return value.unwrap_or_default();
    }
    match reply {
        Reply::Status { status } => {
            let t = &status.tasks;
            // The first line says which data directory and whether its daemon runs (SPEC),
            // so a stray ./coverd-data cannot pass for the service's.
            let mut out = format!(
                "daemon: {} (data directory {})\ntasks: {} submitted, {} received, {} downloaded, {} failed\n",
                status.daemon, status.data_dir, t.submitted, t.received, t.downloaded, t.failed
            );
            match &status.oldest_unfinished {
                Some(o) => {
                    out += &format!(
                        "oldest unfinished: {} ({}, since {})\n",
                        o.task_id, o.state, o.created_at
                    )
                }
                None => out += "oldest unfinished: none\n",
            }
            let n = &status.notifications;
            out += &format!(
                "notifications: {}{} pending, {} undeliverable\n",
                if n.enabled {
                    ""
                } else {
                    "off (notify.url is empty); "
                },
                n.pending,
                n.undeliverable
            );
            out += &format!(
                "data: {} bytes ({} in stored files, the rest the database)
",
                status.data_bytes, status.stored_bytes
            );
            out += &format!(
                "polling: {}",
                match status.polling {
                    Some(true) => "on",
                    Some(false) => "off (no KIE API key)",
                    None => "unknown (daemon stopped)",
                }
            );
            out += &render_quarantined(&status.quarantined);
            let more = status
                .quarantined_total
                .saturating_sub(status.quarantined.len() as u64);
            if more > 0 {
                out += &format!(
                    "\nand {more} more quarantined record(s): `coverd admin verify` names them all"
                );
            }
            out
        }
        Reply::Tasks { tasks } => {
            if tasks.is_empty() {
                return "no tasks".into();
            }
            tasks
                .iter()
                .map(|t| {
                    let stored = t.files.iter().filter(|i| i.state == "downloaded").count();
                    format!(
                        "{}  {:<10}  {}  {} {}/{}{}",
                        t.task_id,
                        t.state,
                        t.created_at,
                        files_label(&t.kind),
                        stored,
                        t.files.len(),
                        t.error
                            .as_deref()
                            .map(|e| format!("  error: {e}"))
                            .unwrap_or_default()
                    )
                })
                .collect::<Vec<_>>()
                .join("\n")
        }
        Reply::Task { task, message } => {
            let mut out = String::new();
            if !message.is_empty() {
                out += message;
                out += "\n";
            }
            out += &format!(
                "task {}{}\n  music task: {}\n  state: {}\n  source: {}\n  created: {}\n  updated: {}\n  callbacks: {}  polls: {}\n",
                task.task_id,
                kind_suffix(&task.kind, task.audio_id.as_deref()),
                task.music_task_id.as_deref().unwrap_or("-"),
                task.state,
                task.source.as_deref().unwrap_or("-"),
                task.created_at,
                task.updated_at,
                task.callbacks,
                task.polls
            );
            if let Some(e) = &task.error {
                out += &format!("  error: {e}\n");
            }
            if let Some(n) = &task.notify {
                out += &format!(
                    "  notification: {} after {} attempt(s)\n",
                    n.state, n.attempts
                );
            }
            for i in &task.files {
                let what = match task.kind.as_str() {
                    "cover" => "image".to_string(),
                    _ => format!("file {}", i.name.as_deref().unwrap_or("?")),
                };
                out += &format!(
                    "  {what} {}: {} after {} attempt(s) {}{}\n",
                    i.index,
                    i.state,
                    i.attempts,
                    i.path.as_deref().unwrap_or(&i.url),
                    i.error
                        .as_deref()
                        .map(|e| format!(" ({e})"))
                        .unwrap_or_default()
                );
            }
            for e in task.events.iter().flatten() {
                out += &format!("  {} {}: {}\n", e.at, e.kind, e.detail);
            }
            out.trim_end().to_string()
        }
        Reply::Verified { verify } => {
            let mut out = format!(
                "checked {} stored image(s): {} ok, {} missing, {} corrupt",
                verify.checked,
                verify.ok,
                verify.missing.len(),
                verify.corrupt.len()
            );
            for p in &verify.missing {
                out += &format!("\nmissing: {p}");
            }
            for p in &verify.corrupt {
                out += &format!("\ncorrupt: {p}");
            }
            if !verify.missing.is_empty() || !verify.corrupt.is_empty() {
                out += "\n`coverd admin retry TASK_ID` fetches a task's damaged images again";
            }
            out += &render_quarantined(&verify.quarantined);
            match verify.statistics.result.as_str() {
                "ok" => {}
                "repaired" => {
                    out += &format!(
                        "\nthe counts, bytes stored and quarantined records that `admin status` reads: {}",
                        verify.statistics.detail
                    )
                }
                _ => {
                    out += &format!(
                        "\nthe counts, bytes stored and quarantined records that `admin status` reads were not compared: {}",
                        verify.statistics.detail
                    )
                }
            }
            out
        }
        // One JSON object per line, always (SPEC); quarantined records go to stderr
        // (see [`notes`]).
        Reply::Export { tasks, .. } => tasks
            .iter()
            .filter_map(|t| serde_json::to_string(t).ok())
            .collect::<Vec<_>>()
            .join("\n"),
        Reply::BackedUp { dest, backup } => format!(
            "backed up {} tasks and {} images ({} bytes) to {dest}",
            backup.tasks, backup.images, backup.bytes
        ),
        Reply::Restored { data_dir, backup } => format!(
            "restored {} tasks and {} images ({} bytes) from the backup of {} into {data_dir}; start the daemon now",
            backup.tasks, backup.images, backup.bytes, backup.created_at
        ),
        Reply::Migrated { migrate } => {
            let mut text = format!(
                "{} {} file(s), {} bytes, to {}; {} already there",
                if migrate.dry_run {
                    "would move"
                } else {
                    "moved"
                },
                migrate.files,
                migrate.bytes,
                migrate.to,
                migrate.already
            );
            if !migrate.skipped.is_empty() {
                text.push_str(&format!(
                    "\nleft in the data directory, missing or not matching their record (run `coverd admin verify`, then `coverd admin retry TASK_ID`): {}",
                    migrate.skipped.join(", ")
                ));
            }
            text
        }
        Reply::Pruned { prune } => format!(
            "{} {} finished task(s) last changed before {} and {} bytes of images",
            if prune.dry_run {
                "would remove"
            } else {
                "removed"
            },
            prune.tasks,
            prune.before,
            prune.bytes
        ),
        // The id alone on stdout, so scripts can capture it; the message goes to stderr.
        Reply::Submitted { submitted, .. } => submitted.task_id.clone(),
        Reply::Intents { intents, message } => {
            let mut out = String::new();
            if !message.is_empty() {
                out += message;
                out += "\n";
            }
            if intents.is_empty() {
                out += "no submissions waiting";
            }
            for i in intents {
                out += &format!(
                    "{}  {}  {}  since {}: {}\n",
                    i.key, i.kind, i.state, i.recorded_at, i.detail
                );
            }
            out.trim_end().to_string()
        }
    }
}

/// Lines naming quarantined records (empty when there are none), each after a newline.
pub(super) fn render_quarantined(quarantined: &[QuarantinedJson]) -> String {
    if quarantined.is_empty() {
        return String::new();
    }
    let mut out = format!(
        "\n{} quarantined record(s), skipped by the daemon:",
        quarantined.len()
    );
    for q in quarantined {
        out += &format!("\nquarantined: {}: {}", q.task_id, q.reason);
        if q.kept_callbacks > 0 {
            out += &format!(
                " ({} callback(s) kept aside, applied once the record can be read)",
                q.kept_callbacks
            );
        }
    }
    out += "\nrun the newer coverd that wrote a record, or restore a corrupt one from a backup";
    out
}

/// What goes to stderr besides the reply: `submit`'s message, and the records `export`
/// could not read (its stdout stays one task per line).
pub fn notes(reply: &Reply, json: bool) -> Option<String> {
    match reply {
        Reply::Submitted { message, .. } if !json => Some(message.clone()),
        Reply::Export { quarantined, .. } if !quarantined.is_empty() => {
            Some(render_quarantined(quarantined).trim_start().to_string())
        }
        _ => None,
    }
}

/// What a task's files are called in the list: `images` for a cover, else `files`.
fn files_label(kind: &str) -> &'static str {
    if kind == "cover" { "images" } else { "files" }
}

/// After a task id in `admin show`: nothing for a cover (as before kinds), else its kind and
/// the track it was made from.
fn kind_suffix(kind: &str, audio_id: Option<&str>) -> String {
    match (kind, audio_id) {
        ("cover", _) => String::new(),
        (k, Some(a)) => format!(" ({k} of track {a})"),
        (k, None) => format!(" ({k})"),
    }
}
