//! The man page (`coverd man`, section 1): clap's name, synopsis, description and options,
//! then every command and admin command with its arguments, and the sections an operator
//! looks for in a man page: CONFIGURATION (every key, from `config::keys`), ENVIRONMENT,
//! FILES, EXIT STATUS, SIGNALS, SEE ALSO. Error messages point here by section name
//! (`man coverd`, CONFIGURATION). Owns the page's text; must not do I/O or read settings.

use std::fmt::Write as _;

use crate::config::{self, keys};

/// The sections the page has besides clap's, in order.
pub const SECTIONS: [&str; 8] = [
    "COMMANDS",
    "CONFIGURATION",
    "ENVIRONMENT",
    "FILES",
    "EXIT STATUS",
    "SIGNALS",
    "SEE ALSO",
    "VERSION",
];

/// The whole page, in roff, for the CLI `cmd` (`Cli::command()`).
pub fn render(cmd: clap::Command) -> std::io::Result<Vec<u8>> {
    let cmd = cmd.disable_help_subcommand(true);
    let man = clap_mangen::Man::new(cmd.clone());
    let mut out = Vec::new();
    man.render_title(&mut out)?;
    man.render_name_section(&mut out)?;
    man.render_synopsis_section(&mut out)?;
    man.render_description_section(&mut out)?;
    man.render_options_section(&mut out)?;
    let mut page = String::new();
    commands(&mut page, &cmd);
    configuration(&mut page);
    page.push_str(FIXED);
    let _ = write!(
        page,
        ".SH VERSION\nv{}\n",
        cmd.get_version().unwrap_or_default()
    );
    out.extend_from_slice(page.as_bytes());
    // ASCII only: groff in a non-UTF-8 locale (a minimal Debian's, LANG unset) drops what
    // it has no glyph for, with a warning (`can't find special character 'u2026'`).
    Ok(ascii(&String::from_utf8_lossy(&out)).into_bytes())
}

/// `text` with the few non-ASCII characters the help texts use spelled in ASCII (roff's
/// own escapes for dashes), anything else as `?`.
fn ascii(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            c if c.is_ascii() => out.push(c),
            '…' => out.push_str("..."),
            '–' => out.push_str("\\(en"),
            '—' => out.push_str("\\(em"),
            '≥' => out.push_str(">="),
            '≤' => out.push_str("<="),
            '→' => out.push_str("->"),
            '×' => out.push('x'),
            '‘' | '’' => out.push('\''),
            '“' | '”' => out.push('"'),
            _ => out.push('?'),
        }
    }
    out
}

/// Text made safe for roff: backslashes doubled, a leading `.` or `'` escaped.
fn esc(text: &str) -> String {
    let text = text.replace('\\', "\\e");
    match text.chars().next() {
        Some('.' | '\'') => format!("\\&{text}"),
        _ => text,
    }
}

/// COMMANDS: each command (and admin command) by its full name, its arguments, its help.
fn commands(page: &mut String, cmd: &clap::Command) {
    page.push_str(".SH COMMANDS\n");
    let mut stack: Vec<(String, &clap::Command)> = cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set())
        .map(|s| (format!("coverd {}", s.get_name()), s))
        .collect();
    stack.reverse();
    while let Some((name, sub)) = stack.pop() {
        let nested: Vec<_> = sub
            .get_subcommands()
            .filter(|s| !s.is_hide_set() && s.get_name() != "help")
            .collect();
        if !nested.is_empty() {
            for s in nested.into_iter().rev() {
                stack.push((format!("{name} {}", s.get_name()), s));
            }
            continue;
        }
        let mut usage = name.clone();
        for arg in sub.get_arguments().filter(|a| !a.is_hide_set()) {
            let id = arg.get_id().as_str();
            if id == "help" || id == "version" {
                continue;
            }
            let value = arg
                .get_value_names()
                .and_then(|v| v.first().map(|s| s.to_string()))
                .unwrap_or_else(|| id.to_uppercase());
            let shown = match arg.get_long() {
                Some(long) if arg.get_action().takes_values() => format!("--{long} {value}"),
                Some(long) => format!("--{long}"),
                None => value,
            };
            if arg.is_required_set() {
                let _ = write!(usage, " {shown}");
            } else {
                let _ = write!(usage, " [{shown}]");
            }
        }
        let _ = writeln!(page, ".TP\n\\fB{}\\fR", esc(&usage));
        let help = sub
            .get_long_about()
            .or_else(|| sub.get_about())
            .map(|h| h.to_string())
            .unwrap_or_default();
        for line in help.lines().filter(|l| !l.trim().is_empty()) {
            let _ = writeln!(page, "{}", esc(line.trim()));
        }
        for arg in sub.get_arguments().filter(|a| !a.is_hide_set()) {
            let id = arg.get_id().as_str();
            if id == "help" || id == "version" {
                continue;
            }
            if let Some(help) = arg.get_help() {
                let name = arg
                    .get_long()
                    .map(|l| format!("--{l}"))
                    .unwrap_or_else(|| id.to_uppercase());
                let _ = writeln!(
                    page,
                    ".br\n\\fI{}\\fR: {}",
                    esc(&name),
                    esc(&help.to_string())
                );
            }
        }
    }
}

/// CONFIGURATION: every key of the file with its default, environment variable and rule.
fn configuration(page: &mut String) {
    page.push_str(
        ".SH CONFIGURATION\n\
         One TOML file, every key optional: \\fB--config\\fR, else \\fB$COVERD_CONFIG\\fR; \
         without either, the built-in defaults below. Flags beat environment variables, which \
         beat the file. Durations are strings such as \"500ms\", \"30s\", \"2min\", \"24h\", \
         \"30d\". Unknown keys and invalid values are an error (exit 2) naming the key; \
         \\fBcoverd check-config\\fR prints what is in force, secrets as \"<set>\".\n",
    );
    for k in keys::KEYS {
        let _ = writeln!(page, ".TP\n\\fB{}\\fR = {}", esc(k.name), esc(k.default));
        let mut rule = k.rule_text().replace('`', "");
        if !rule.is_empty() && !rule.ends_with('.') {
            rule.push('.');
        }
        let env = k
            .env
            .map(|e| format!(" Environment: {e}."))
            .unwrap_or_default();
        let text = format!("{}{env}", rule.trim_start_matches("; "));
        if !text.trim().is_empty() {
            let _ = writeln!(page, "{}", esc(text.trim()));
        }
    }
    let _ = writeln!(
        page,
        ".PP\nSecrets are read, in this order, from the environment, the key itself, its \
         \\fB*_file\\fR key, then the systemd credential of the same name in \
         \\fB$CREDENTIALS_DIRECTORY\\fR: \\fB{}\\fR, \\fB{}\\fR, \\fB{}\\fR, \\fB{}\\fR, \\fB{}\\fR.",
        config::CREDENTIAL_API_KEY,
        config::CREDENTIAL_WEBHOOK_HMAC_KEY,
        config::CREDENTIAL_NOTIFY_SECRET,
        config::CREDENTIAL_S3_ACCESS_KEY_ID,
        config::CREDENTIAL_S3_SECRET_ACCESS_KEY,
    );
}

/// The sections that do not come from code.
const FIXED: &str = r#".SH ENVIRONMENT
.TP
\fBCOVERD_CONFIG\fR
The configuration file, when --config names none (the unit sets it with a drop-in: Environment=COVERD_CONFIG=/etc/coverd/coverd.toml). admin, submit and check-config take the installed unit's when neither names one.
.TP
\fBCOVERD_DATA_DIR\fR, \fBCOVERD_LISTEN\fR
The data directory and the callback listener (the keys data_dir and listen). For admin, submit and check-config, what these, the flags and the file leave unset comes from the installed unit's Environment= (see FILES).
.TP
\fBCOVERD_SYSTEMD_ROOT\fR
For tests only: a directory standing in for / where admin, submit and check-config look for the installed unit, the running service's credentials and the credential stores.
.TP
\fBKIE_API_KEY\fR, \fBKIE_WEBHOOK_HMAC_KEY\fR, \fBCOVERD_NOTIFY_SECRET\fR
Secrets: the KIE API key, the webhook HMAC key, the notification signing secret (whsec_…).
.TP
\fBCOVERD_S3_ACCESS_KEY_ID\fR, \fBCOVERD_S3_SECRET_ACCESS_KEY\fR
The object store's key (storage.kind = "s3"): never logged, shown or written to a backup.
.TP
\fBCREDENTIALS_DIRECTORY\fR
Set by systemd (LoadCredential=): where the credentials named under CONFIGURATION are read.
.TP
\fBRUST_LOG\fR
Log filter (default: info for serve, warn for the other commands).
.TP
\fBNOTIFY_SOCKET\fR, \fBWATCHDOG_USEC\fR, \fBJOURNAL_STREAM\fR
Set by systemd: readiness and watchdog (Type=notify), logging to journald with priorities.
.SH FILES
.TP
\fBDATA_DIR/db/\fR
The store (sled): every task, its history and the indexes. Back it up only with \fBcoverd admin backup\fR or with the daemon stopped.
.TP
\fBDATA_DIR/images/TASK_ID/INDEX.EXT\fR
Stored cover images (EXT png, jpg, webp or gif, from the file's bytes).
.TP
\fBDATA_DIR/files/TASK_ID/NAME.EXT\fR
Stored files of the other kinds: track\-I.mp3 and track\-I.EXT (music), audio.wav, video.mp4, STEM.mp3 (stems); EXT from the file's bytes. The same rules as images/. A file here is always complete and matches its recorded sha256. Private to the daemon's user (0700 / 0600), or, with \fBstorage.local_group\fR set, readable by that group (0750 / 0640, the data directory 0710); the daemon's user must then be in the group and allowed chown(2) (in the unit: SupplementaryGroups= and SystemCallFilter=@chown).
.TP
\fBs3://BUCKET/PREFIXTASK_ID/NAME.EXT\fR
With \fBstorage.kind\fR = "s3": the stored files, one object each (same names as above), uploaded with their SHA\-256 checksum (larger than 8 MiB: in parts, read back and hashed) and recorded only then; file entries carry \fBlocation\fR and a null \fBpath\fR. A store that is down pauses uploads (logged once; /healthz stays 200 and says so; coverd_storage_up 0). \fBadmin migrate\-files \-\-to s3\fR moves the files of DATA_DIR/images and DATA_DIR/files there.
.TP
\fBDATA_DIR/tmp/\fR
Partial downloads (and, with an object store, files waiting for their upload); emptied at every start.
.TP
\fBDATA_DIR/admin.sock\fR
The running daemon's admin socket (0600); admin commands use it, and open the store themselves when the daemon is stopped.
.TP
\fB./coverd-data\fR, \fB/var/lib/coverd\fR
The data directory when none is named: \fBserve\fR uses ./coverd-data; admin commands use the installed unit's, and only where no unit is installed ./coverd-data if it exists, else /var/lib/coverd.
.TP
\fB/var/lib/coverd-backup\fR
The unit's second state directory: where the running daemon may write backups.
.TP
\fB/etc/coverd/coverd.toml\fR
The configuration file, by convention (named by COVERD_CONFIG or --config).
.TP
\fB/etc/systemd/system/coverd.service\fR, \fB/run/systemd/system/\fR, \fB/usr/local/lib/systemd/system/\fR, \fB/usr/lib/systemd/system/\fR, and \fBcoverd.service.d/*.conf\fR in each
The installed unit, the first found, and its drop-ins in file-name order. admin, submit and check-config (not serve) read its Environment= (systemd's quoting and the machine-independent specifiers such as %S), WorkingDirectory= and LoadCredential= for what flags, environment and file leave unset: so on the service's host they use its configuration file and data directory whatever the current directory, and ./coverd-data only where no unit is installed. EnvironmentFile= is not read.
.TP
\fB/run/credentials/coverd.service/\fR
The credentials systemd handed the running service; run as root, admin and submit read the unit's credentials here while it runs. check-config does not: it checks each where the next start will find it.
.TP
\fB/etc/credstore/\fR, \fB/run/credstore/\fR, \fB/usr/lib/credstore/\fR (and \fBcredstore.encrypted/\fR beside each)
Where systemd finds a credential the unit loads by name (LoadCredential=NAME); run as root with the service stopped, the commands read it there (or at LoadCredential=NAME:PATH). An encrypted one counts as present; check-config says it cannot check its value. Not root, check-config names the credentials it could not read and exits 2.
.SH EXIT STATUS
.TP
\fB0\fR
Success.
.TP
\fB1\fR
Missing, unhealthy or failed (an unknown task, a quarantined record or a damaged file named by status, verify or export, a failed command).
.TP
\fB2\fR
Usage or configuration error (the message names the key or argument).
.TP
\fB70\fR
\fBserve\fR: a worker (downloads, polls, notifications, the store's writer or flusher) stopped or panicked; systemd restarts the daemon.
.TP
\fB75\fR
\fBserve\fR: the store failed (disk full, I/O error, a failed flush); systemd restarts the daemon once the disk takes writes, and the store is proven again at open.
.SH SIGNALS
.TP
\fBSIGTERM\fR, \fBSIGINT\fR
Stop accepting, finish the requests in flight and the store writes under way, flush, exit 0.
.TP
\fBSIGHUP\fR
Logged at warning ("no configuration reload; restart to apply changes"); the daemon keeps serving.
.PP
Under systemd the daemon sends READY=1 once its store is open and its listeners are bound, and feeds the watchdog (WatchdogSec=) while its store and workers are healthy.
.SH SEE ALSO
systemd.exec(5), systemd-creds(1), journalctl(1). GET /healthz answers 200 ok while the store takes writes and the workers run; GET /metrics (metrics_listen) serves Prometheus metrics.
"#;

#[cfg(test)]
mod tests {
    #[test]
    fn escaping_keeps_roff_control_characters_out() {
        assert_eq!(super::esc(".hidden"), "\\&.hidden");
        assert_eq!(super::esc("a\\b"), "a\\eb");
        assert_eq!(super::esc("plain"), "plain");
    }
}
