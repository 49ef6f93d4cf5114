//! Issue 8 (operations) with the real binary: `check-config`, completions, the man page,
//! `--version`, help on every argument, `serve --listen HOST:PORT`, the data-directory
//! lookup, and — as root — acting as the data directory's owner (no root-owned file left)
//! and the permission errors a non-root user gets.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::bin_util::{Daemon, NOBODY, Outcome, Scratch, coverd, is_root, run};

async fn coverd_in(cwd: &Path, args: &[&str]) -> Outcome {
    let mut cmd = coverd();
    cmd.current_dir(cwd).args(args);
    run(cmd).await
}

/// Every environment variable coverd reads (the file's name, the credentials directory and
/// each key's, as declared) refuses a value that is not UTF-8, naming the variable, rather
/// than counting it as unset.
#[tokio::test]
async fn environment_variables_that_are_not_utf8_are_refused() {
    use std::os::unix::ffi::OsStrExt;
    let vars = ["COVERD_CONFIG", "CREDENTIALS_DIRECTORY"]
        .into_iter()
        .chain(coverd::config::keys::KEYS.iter().filter_map(|k| k.env));
    for var in vars {
        let mut cmd = coverd();
        cmd.arg("check-config")
            .env(var, std::ffi::OsStr::from_bytes(b"x\xff"));
        let out = run(cmd).await;
        assert_eq!(out.code, Some(2), "{var}: {out:?}");
        assert!(
            out.stderr.contains(&format!("`{var}`")) && out.stderr.contains("UTF-8"),
            "{var}: {out:?}"
        );
    }
}

#[tokio::test]
async fn check_config_prints_the_effective_configuration_and_fails_with_2() {
    let s = Scratch::new();
    s.write_raw_config(
        "listen = \"127.0.0.1:9999\"\n[kie]\napi_key = \"sk-very-secret-value\"\n[download]\nconcurrency = 7\n",
    );
    let mut cmd = coverd();
    cmd.arg("check-config")
        .arg("--config")
        .arg(s.config_path())
        .env("KIE_WEBHOOK_HMAC_KEY", "hmac-secret-value");
    let out = run(cmd).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(!out.stdout.contains("very-secret") && !out.stdout.contains("hmac-secret"));
    let v: toml::Table = toml::from_str(&out.stdout).expect("check-config prints TOML");
    assert_eq!(v["listen"].as_str(), Some("127.0.0.1:9999"));
    assert_eq!(v["download"]["concurrency"].as_integer(), Some(7));
    assert_eq!(v["kie"]["api_key"].as_str(), Some("<set>"));
    assert_eq!(v["kie"]["webhook_hmac_key"].as_str(), Some("<set>"));
    assert_eq!(v["poll"]["interval"].as_str(), Some("30s"));
    // Every key of the file is printed, but the *_file ones (resolved into their secret).
    let mut printed = Vec::new();
    for (k, val) in &v {
        match val.as_table() {
            Some(t) => printed.extend(t.keys().map(|kk| format!("{k}.{kk}"))),
            None => printed.push(k.clone()),
        }
    }
    let mut want: Vec<String> = coverd::config::keys()
        .into_iter()
        .filter(|k| !k.ends_with("_file"))
        .collect();
    printed.sort();
    want.sort();
    assert_eq!(printed, want);

    // Invalid: the same error and exit status as `serve`.
    s.write_raw_config("[download]\nconcurrency = 0\n");
    let check = s.run(&["check-config"]).await;
    assert_eq!(check.code, Some(2), "{check:?}");
    assert!(check.stderr.contains("download.concurrency"), "{check:?}");
    let serve = s.run(&["serve"]).await;
    assert_eq!(serve.code, Some(2));
    assert!(serve.stderr.contains("download.concurrency"), "{serve:?}");
    // An unreadable key file is caught too.
    s.write_raw_config("[kie]\napi_key_file = \"/nonexistent/key\"\n");
    let check = s.run(&["check-config"]).await;
    assert_eq!(check.code, Some(2), "{check:?}");
    assert!(check.stderr.contains("kie.api_key_file"), "{check:?}");
}

#[tokio::test]
async fn completions_man_page_and_version() {
    for shell in ["bash", "zsh", "fish"] {
        let out = run({
            let mut c = coverd();
            c.args(["completions", shell]);
            c
        })
        .await;
        assert_eq!(out.code, Some(0), "{shell}: {out:?}");
        assert!(
            out.stdout.contains("backup") && out.stdout.contains("check-config"),
            "{shell}"
        );
    }
    let out = run({
        let mut c = coverd();
        c.arg("man");
        c
    })
    .await;
    assert_eq!(out.code, Some(0));
    assert!(
        out.stdout.contains(".TH coverd"),
        "{}",
        &out.stdout[..200.min(out.stdout.len())]
    );

    let out = run({
        let mut c = coverd();
        c.arg("--version");
        c
    })
    .await;
    let version = out.stdout.trim();
    let head = std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    let expected = format!("coverd {}", env!("CARGO_PKG_VERSION"));
    match head {
        // Built from a checkout: "coverd 0.1.0 (abc1234)", the commit it was built from
        // (HEAD, unless a commit was made since the build).
        Some(_) => {
            let commit = version
                .strip_prefix(&format!("{expected} ("))
                .and_then(|r| r.strip_suffix(')'))
                .unwrap_or_else(|| panic!("no commit in {version:?}"));
            assert!(
                commit.len() >= 7 && commit.chars().all(|c| c.is_ascii_hexdigit()),
                "{version:?}"
            );
        }
        None => assert_eq!(version, expected),
    }
}

/// `coverd … --help` of every command: each argument and option has a description.
#[tokio::test]
async fn every_argument_has_help() {
    let commands: &[&[&str]] = &[
        &[],
        &["serve"],
        &["check-config"],
        &["completions"],
        &["man"],
        &["submit"],
        &["admin"],
        &["admin", "status"],
        &["admin", "list"],
        &["admin", "show"],
        &["admin", "track"],
        &["admin", "retry"],
        &["admin", "verify"],
        &["admin", "export"],
        &["admin", "backup"],
        &["admin", "restore"],
        &["admin", "prune"],
    ];
    for args in commands {
        let mut cmd = coverd();
        cmd.args(*args).arg("--help");
        let out = run(cmd).await;
        assert_eq!(out.code, Some(0), "{args:?}: {out:?}");
        let mut section = "";
        let lines: Vec<&str> = out.stdout.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            if !line.starts_with(' ') && line.ends_with(':') {
                section = line;
                continue;
            }
            if !["Arguments:", "Options:"].contains(&section) {
                continue;
            }
            // An entry: "  <NAME>  help" or "  -x, --flag <V>  help" (or help on the next,
            // further indented line when long).
            if line.starts_with("  ") && !line.starts_with("   ") {
                let entry = line.trim_start();
                let described = entry.contains("  ")
                    || lines
                        .get(i + 1)
                        .is_some_and(|next| next.starts_with("          "));
                assert!(described, "coverd {args:?}: no help for `{entry}`");
            }
        }
    }
}

#[tokio::test]
async fn serve_listen_takes_a_host_name() {
    let s = Scratch::new();
    s.write_config("http://127.0.0.1:9", "", "");
    let mut cmd = s.serve_command();
    cmd.args(["--listen", "localhost:0"]);
    let d = Daemon::spawn(cmd, s.data_dir()).await;
    assert!(d.addr.ip().is_loopback(), "{}", d.addr);
    d.stop().await;
    // A malformed one says which form to use.
    let out = s.run(&["serve", "--listen", "localhost"]).await;
    assert_eq!(out.code, Some(2), "{out:?}");
    assert!(out.stderr.contains("HOST:PORT"), "{out:?}");
}

#[tokio::test]
async fn admin_finds_the_data_directory_without_flags() {
    let s = Scratch::new();
    let cwd = s.dir.path();
    if !Path::new("/var/lib/coverd").exists() {
        let out = coverd_in(cwd, &["admin", "status"]).await;
        assert_eq!(out.code, Some(1), "{out:?}");
        assert!(
            out.stderr.contains("./coverd-data") && out.stderr.contains("/var/lib/coverd"),
            "{out:?}"
        );
    } else {
        eprintln!("skipped the no-data case: /var/lib/coverd exists on this machine");
    }
    // ./coverd-data is found with no flag at all.
    let out = coverd_in(
        cwd,
        &["admin", "--data-dir", "coverd-data", "track", "look-1"],
    )
    .await;
    assert_eq!(out.code, Some(0), "{out:?}");
    let out = coverd_in(cwd, &["admin", "status"]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(
        out.stdout
            .starts_with("daemon: stopped (data directory ./coverd-data)\n"),
        "{out:?}"
    );
    assert!(
        out.stdout.contains("polling: unknown (daemon stopped)"),
        "{out:?}"
    );
    let out = coverd_in(cwd, &["admin", "status", "--json"]).await;
    let v: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(
        (&v["daemon"], &v["polling"]),
        (&Value::from("stopped"), &Value::Null)
    );
    assert_eq!(v["tasks"]["submitted"], 1);
    // The daemon's answer says whether it polls.
    let mut cmd = coverd();
    cmd.current_dir(cwd)
        .args(["serve", "--listen", "127.0.0.1:0"]);
    let d = Daemon::spawn(cmd, cwd.join("coverd-data")).await;
    let out = coverd_in(cwd, &["admin", "status", "--json"]).await;
    let v: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(
        (&v["daemon"], &v["polling"]),
        (&Value::from("running"), &Value::from(false))
    );
    // Without an API key, track says that nothing will poll.
    let out = coverd_in(cwd, &["admin", "track", "look-2"]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.contains("nothing will poll"), "{out:?}");
    d.stop().await;
}

/// `coverd admin --data-dir DATA backup DEST`, which must succeed.
async fn admin_backup(data: &str, dest: &Path) {
    let mut c = coverd();
    c.args(["admin", "--data-dir", data, "backup"]).arg(dest);
    let out = run(c).await;
    assert_eq!(out.code, Some(0), "{out:?}");
}

/// Every path under `dir` (itself included) whose owner is not `uid`.
fn not_owned_by(dir: &Path, uid: u32) -> Vec<PathBuf> {
    let mut bad = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if meta.uid() != uid {
            bad.push(p.clone());
        }
        if meta.is_dir() {
            for e in std::fs::read_dir(&p).unwrap().flatten() {
                stack.push(e.path());
            }
        }
    }
    bad
}

/// A daemon running as nobody on a data directory of nobody's in a scratch directory that
/// anyone may cross (0755).
async fn serve_as_nobody() -> (Scratch, PathBuf, Daemon) {
    let s = Scratch::new();
    std::fs::set_permissions(s.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let data = s.data_dir();
    std::fs::create_dir(&data).unwrap();
    std::os::unix::fs::chown(&data, Some(NOBODY), Some(NOBODY)).unwrap();
    let mut serve = coverd();
    serve
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .current_dir("/")
        .uid(NOBODY)
        .gid(NOBODY);
    let daemon = Daemon::spawn(serve, data.clone()).await;
    (s, data, daemon)
}

#[tokio::test]
async fn root_acts_as_the_data_directory_owner() {
    if !is_root() {
        eprintln!(
            "skipped: acting as the owner needs root (this test runs as uid {})",
            rustix::process::geteuid().as_raw()
        );
        return;
    }
    // Stopped: the scratch directory is 0700 root, so `nobody` cannot reach the data by its
    // path, as with systemd's /var/lib/private: admin works through its working directory.
    let s = Scratch::new();
    let data = s.data_dir();
    std::fs::create_dir(&data).unwrap();
    std::os::unix::fs::chown(&data, Some(NOBODY), Some(NOBODY)).unwrap();
    let d = data.to_str().unwrap();
    for args in [
        &["admin", "--data-dir", d, "track", "own-1"][..],
        &["admin", "--data-dir", d, "status"],
        &["admin", "--data-dir", d, "verify"],
        &["admin", "--data-dir", d, "export"],
        &["admin", "--data-dir", d, "prune", "--older-than", "1d"],
    ] {
        let out = run({
            let mut c = coverd();
            c.args(args);
            c
        })
        .await;
        assert_eq!(out.code, Some(0), "{args:?}: {out:?}");
    }
    let out = run({
        let mut c = coverd();
        c.args(["admin", "--data-dir", d, "status"]);
        c
    })
    .await;
    assert!(
        out.stdout.contains(&format!("(data directory {d})")),
        "{out:?}"
    );
    let bad = not_owned_by(&data, NOBODY);
    assert!(
        bad.is_empty(),
        "root-owned files left in the data directory: {bad:?}"
    );

    // Backup and restore beside it, as with /var/lib/private/coverd-backup: the owner
    // cannot reach those paths either, but they are opened before root becomes the owner.
    let backups = s.dir.path().join("backups");
    std::fs::create_dir(&backups).unwrap();
    std::os::unix::fs::chown(&backups, Some(NOBODY), Some(NOBODY)).unwrap();
    let one = backups.join("one");
    let out = run({
        let mut c = coverd();
        c.args(["admin", "--data-dir", d, "backup"]).arg(&one);
        c
    })
    .await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.contains(&one.display().to_string()), "{out:?}");
    let restored = s.dir.path().join("restored");
    std::fs::create_dir(&restored).unwrap();
    std::os::unix::fs::chown(&restored, Some(NOBODY), Some(NOBODY)).unwrap();
    let out = run({
        let mut c = coverd();
        c.arg("--data-dir")
            .arg(&restored)
            .args(["admin", "restore"])
            .arg(&one);
        c
    })
    .await;
    assert_eq!(out.code, Some(0), "{out:?}");
    let out = run({
        let mut c = coverd();
        c.arg("--data-dir")
            .arg(&restored)
            .args(["admin", "show", "own-1"]);
        c
    })
    .await;
    assert_eq!(out.code, Some(0), "{out:?}");
    for dir in [&backups, &restored] {
        let bad = not_owned_by(dir, NOBODY);
        assert!(bad.is_empty(), "root-owned files: {bad:?}");
    }

    // Running as nobody: root's admin goes through the socket, as nobody.
    let (s2, data2, daemon) = serve_as_nobody().await;
    let d2 = data2.to_str().unwrap();
    let out = run({
        let mut c = coverd();
        c.args(["admin", "--data-dir", d2, "track", "own-2"]);
        c
    })
    .await;
    assert_eq!(out.code, Some(0), "{out:?}");
    let backup = s2.dir.path().join("bk");
    std::fs::create_dir(&backup).unwrap();
    std::os::unix::fs::chown(&backup, Some(NOBODY), Some(NOBODY)).unwrap();
    admin_backup(d2, &backup.join("one")).await;
    daemon.stop().await;
    // Stopped now: root's offline admin on nobody's directory.
    admin_backup(d2, &backup.join("two")).await;
    let bad = not_owned_by(&data2, NOBODY);
    assert!(
        bad.is_empty(),
        "root-owned files in the data directory: {bad:?}"
    );
    let bad = not_owned_by(&backup, NOBODY);
    assert!(bad.is_empty(), "root-owned files in the backups: {bad:?}");
}

#[tokio::test]
async fn a_user_without_access_is_told_so() {
    if !is_root() {
        eprintln!("skipped: needs root to run commands as another user");
        return;
    }
    // A daemon run by root; its socket is 0600 root.
    let s = Scratch::new();
    std::fs::set_permissions(s.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    s.write_config("http://127.0.0.1:9", "", "");
    std::fs::set_permissions(s.config_path(), std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::create_dir(s.data_dir()).unwrap();
    std::fs::set_permissions(s.data_dir(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let d = s.serve().await;
    // The daemon makes its data directory 0700 at start; open it again so that only the
    // socket's own permissions stand in the way.
    std::fs::set_permissions(s.data_dir(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let as_nobody = |args: &[&str]| {
        let mut c = coverd();
        c.arg("--data-dir")
            .arg(s.data_dir())
            .args(args)
            .current_dir("/")
            .uid(NOBODY)
            .gid(NOBODY);
        c
    };
    let out = run(as_nobody(&["admin", "status"])).await;
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        out.stderr.contains("admin.sock") && out.stderr.contains("permission denied"),
        "{out:?}"
    );
    assert!(!out.stderr.contains("store I/O"), "{out:?}");
    d.stop().await;
    // The directory closed to others: a permission problem, not "no data".
    std::fs::set_permissions(s.data_dir(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let out = run(as_nobody(&["admin", "status"])).await;
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        out.stderr.contains(&format!(
            "cannot read {}: permission denied; run as root or as the service's user",
            s.data_dir().display()
        )),
        "{out:?}"
    );
}

/// Issue 14 item 8: root's admin acting as the owner of a data directory it reaches only
/// through a directory opened as root (`/proc/self/fd/N`, as under systemd's
/// `/var/lib/private`) stays undumpable, so other processes of the service's user cannot
/// read its memory (which holds what root read: configuration, secrets). Shown on a live
/// admin process: it waits on a SIGSTOPped daemon's socket while the test looks at it.
#[tokio::test]
async fn admin_acting_as_the_owner_stays_undumpable() {
    if !is_root() {
        eprintln!(
            "skipped: acting as the owner needs root (this test runs as uid {})",
            rustix::process::geteuid().as_raw()
        );
        return;
    }
    let (s, data, daemon) = serve_as_nobody().await;
    daemon.signal("STOP");
    // Now only root may cross the parent: the owner reaches the data through the alias.
    std::fs::set_permissions(s.dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let mut admin = coverd()
        .args(["admin", "--data-dir"])
        .arg(&data)
        .arg("status")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let proc_dir = PathBuf::from(format!("/proc/{}", admin.id()));
    // Wait until it acts as nobody and has connected to the (stopped) daemon's socket.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let connected = loop {
        let status = std::fs::read_to_string(proc_dir.join("status")).unwrap_or_default();
        let as_nobody = status
            .lines()
            .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("65534"));
        let socket = std::fs::read_dir(proc_dir.join("fd"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| {
                std::fs::read_link(e.path())
                    .is_ok_and(|l| l.to_string_lossy().starts_with("socket:"))
            });
        if as_nobody && socket {
            break true;
        }
        if std::time::Instant::now() > deadline || admin.try_wait().unwrap().is_some() {
            break false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    // /proc/PID/environ belongs to the process's user while it is dumpable, to root if not.
    let environ_owner = std::fs::metadata(proc_dir.join("environ")).map(|m| m.uid());
    let _ = admin.kill();
    let _ = admin.wait();
    std::fs::set_permissions(s.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    daemon.signal("CONT");
    daemon.stop().await;
    assert!(connected, "admin never connected to the daemon as nobody");
    assert_eq!(
        environ_owner.unwrap(),
        0,
        "the admin process acting as nobody is dumpable: nobody's processes could read its memory"
    );
}

/// Issue 15 item 5 (SPEC "Configuration"): `prune --older-than 6m` is refused (minutes or
/// months?) before anything is touched, and the cutoff is printed as a date, in
/// `--dry-run` too.
#[tokio::test]
async fn prune_refuses_a_bare_m_and_prints_its_cutoff_as_a_date() {
    let s = Scratch::new();
    let d = s.data_dir();
    let d = d.to_str().unwrap();
    let admin = |args: &[&str]| {
        let mut c = coverd();
        c.args(["admin", "--data-dir", d]).args(args);
        run(c)
    };
    let out = admin(&["track", "p-1"]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    for age in ["6m", "6M"] {
        let out = admin(&["prune", "--older-than", age]).await;
        assert_eq!(out.code, Some(2), "{out:?}");
        assert!(
            out.stderr.contains("ambiguous") && out.stderr.contains("6min"),
            "{out:?}"
        );
    }
    let out = admin(&["prune", "--older-than", "180d", "--dry-run"]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    let year = time::OffsetDateTime::now_utc().year() - 1;
    assert!(
        out.stdout
            .contains("would remove 0 finished task(s) last changed before")
            && (out.stdout.contains(&format!("before {year}-"))
                || out.stdout.contains(&format!("before {}-", year + 1))),
        "{out:?}"
    );
}

/// Issue 15 item 7: a reader that stops early (`coverd admin list | head -1`) ends the
/// command quietly with its usual status, not a panic ("failed printing to stdout: Broken
/// pipe", exit 101). The pipe's read end is closed before the command writes.
#[tokio::test]
async fn output_into_a_closed_pipe_is_not_a_panic() {
    let s = Scratch::new();
    let d = s.data_dir();
    let d = d.to_str().unwrap();
    let mut track = coverd();
    track.args(["admin", "--data-dir", d, "track", "pipe-1"]);
    assert_eq!(run(track).await.code, Some(0));
    for args in [
        &["admin", "--data-dir", d, "list", "--limit", "3000"][..],
        &["admin", "--data-dir", d, "export"],
        &["admin", "--data-dir", d, "status", "--json"],
        &["completions", "zsh"],
        &["man"],
    ] {
        let mut child = coverd()
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let out = tokio::task::spawn_blocking(move || child.wait_with_output())
            .await
            .unwrap()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

/// Issue 15 item 9: the man page is complete enough for error messages to point to it: the
/// sections an operator looks for, every configuration key, every admin command by its
/// full name, and no page it names that does not exist (`coverd-admin(1)`).
#[tokio::test]
async fn the_man_page_has_every_section_key_and_command() {
    let out = run({
        let mut c = coverd();
        c.arg("man");
        c
    })
    .await;
    assert_eq!(out.code, Some(0), "{out:?}");
    let page = out.stdout;
    // groff in a non-UTF-8 locale drops (with a warning) what it has no glyph for.
    let odd: Vec<char> = page.chars().filter(|c| !c.is_ascii()).collect();
    assert!(odd.is_empty(), "non-ASCII in the man page: {odd:?}");
    for section in ["NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS"]
        .into_iter()
        .chain(coverd::manual::SECTIONS)
    {
        let heading = if section.contains(' ') {
            format!(".SH \"{section}\"")
        } else {
            format!(".SH {section}")
        };
        assert!(
            page.contains(&heading) || page.contains(&format!(".SH {section}\n")),
            "no {section} section"
        );
    }
    for key in coverd::config::keys::KEYS {
        assert!(
            page.contains(&format!("\\fB{}\\fR", key.name)),
            "key {} missing",
            key.name
        );
    }
    for command in [
        "coverd serve",
        "coverd check-config",
        "coverd submit",
        "coverd admin status",
        "coverd admin list",
        "coverd admin show",
        "coverd admin track",
        "coverd admin retry",
        "coverd admin verify",
        "coverd admin export",
        "coverd admin redeliver",
        "coverd admin backup",
        "coverd admin restore",
        "coverd admin prune",
    ] {
        assert!(
            page.contains(&format!("\\fB{command}")),
            "{command} missing"
        );
    }
    for code in ["0", "1", "2", "70", "75"] {
        assert!(
            page.contains(&format!(".TP\n\\fB{code}\\fR\n")),
            "exit status {code} missing"
        );
    }
    assert!(
        !page.contains("coverd-admin(1)") && !page.contains("(1)\n.TP\ncoverd-"),
        "names pages that do not exist"
    );
    // Error messages point here, not to docs/ (not installed with the binary).
    let sources = [
        "src/config/mod.rs",
        "src/admin/exec.rs",
        "src/admin/backup/mod.rs",
        "src/admin/backup/files.rs",
        "src/admin/backup/manifest.rs",
        "src/admin/backup/prune.rs",
        "src/admin/backup/restore.rs",
        "src/admin/backup/source.rs",
    ];
    for file in sources {
        let text =
            std::fs::read_to_string(format!("{}/{file}", env!("CARGO_MANIFEST_DIR"))).unwrap();
        for line in text.lines().filter(|l| !l.trim_start().starts_with("//")) {
            assert!(
                !line.contains("docs/"),
                "{file} points a user to docs/: {line}"
            );
        }
    }
}

/// Issue 15 item 2: a command that changes something names the data directory it changed.
#[tokio::test]
async fn a_change_names_its_data_directory() {
    let s = Scratch::new();
    let d = s.data_dir();
    let d = d.to_str().unwrap();
    let out = run({
        let mut c = coverd();
        c.args(["admin", "--data-dir", d, "track", "named-1"]);
        c
    })
    .await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(
        format!("{}{}", out.stdout, out.stderr).contains(&format!("(data directory {d})")),
        "{out:?}"
    );
}
