//! Issue 15 items 1 and 2 with the real binary: the commands read the installed unit
//! (`coverd.service` in a fixture tree named by `COVERD_SYSTEMD_ROOT`) for what flags, the
//! caller's environment and the file leave unset: its `Environment=` (drop-ins in systemd's
//! order, systemd's quoting), its data directory over a stray `./coverd-data`, and, as root,
//! its credentials (running, `LoadCredential=` path, credential store, encrypted); not root,
//! `check-config` names the credentials it could not read and exits 2.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

use crate::bin_util::{NOBODY, Outcome, coverd, is_root, run};

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// A scratch directory holding a fixture systemd tree (`root/`) and whatever the test puts
/// beside it; 0755, so that `nobody` can read what is made readable.
struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        Fixture { dir }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn root(&self) -> PathBuf {
        self.path("root")
    }

    /// Writes `text` at `rel` (under the scratch directory), readable by all: the
    /// directories made on the way are 0755 whatever the process umask (in-process daemons
    /// of other tests set it to 0077).
    fn put(&self, rel: &str, text: &str) -> PathBuf {
        let p = self.path(rel);
        let mut dir = self.dir.path().to_path_buf();
        for part in Path::new(rel).parent().unwrap().components() {
            dir.push(part);
            if !dir.exists() {
                std::fs::create_dir(&dir).unwrap();
                std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
            }
        }
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        p
    }

    /// `coverd ARGS` with this fixture as the systemd tree, run in `cwd`.
    fn command(&self, cwd: &Path, args: &[&str]) -> std::process::Command {
        let mut c = coverd();
        c.env("COVERD_SYSTEMD_ROOT", self.root())
            .current_dir(cwd)
            .args(args);
        c
    }

    async fn run(&self, args: &[&str]) -> Outcome {
        run(self.command(self.dir.path(), args)).await
    }
}

/// check-config's TOML on stdout.
fn toml_of(out: &Outcome) -> toml::Table {
    toml::from_str(&out.stdout).unwrap_or_else(|e| panic!("not TOML ({e}): {out:?}"))
}

/// The documented step: `sudo env COVERD_CONFIG=… coverd check-config` with `[notify] url`
/// set and its secret as the credential `notify-secret`, as the shipped unit loads it.
#[tokio::test]
async fn check_config_sees_the_units_credential_as_root_and_says_so_otherwise() {
    let f = Fixture::new();
    let data = f.path("service-data");
    let config = f.put(
        "etc-coverd/coverd.toml",
        "[notify]\nurl = \"http://127.0.0.1:9/hook\"\n",
    );
    f.put(
        "root/etc/systemd/system/coverd.service",
        &format!(
            "[Service]\nExecStart=/usr/local/bin/coverd serve\nEnvironment=COVERD_DATA_DIR={}\nLoadCredential=kie-api-key\nLoadCredential=notify-secret\n",
            data.display()
        ),
    );
    f.put(
        "root/etc/systemd/system/coverd.service.d/override.conf",
        &format!(
            "[Service]\nEnvironment=COVERD_CONFIG={}\n",
            config.display()
        ),
    );
    let cred = f.put("root/etc/credstore/notify-secret", &format!("{SECRET}\n"));
    std::fs::set_permissions(&cred, std::fs::Permissions::from_mode(0o600)).unwrap();

    if is_root() {
        // The documented form (the caller names the unit's file) and the bare one.
        for named in [true, false] {
            let mut c = f.command(f.dir.path(), &["check-config"]);
            if named {
                c.env("COVERD_CONFIG", &config);
            }
            let out = run(c).await;
            assert_eq!(out.code, Some(0), "named {named}: {out:?}");
            assert!(
                out.stderr.contains(&format!(
                    "notify secret: found in the credential `notify-secret` of the installed unit, at {}",
                    cred.display()
                )),
                "{out:?}"
            );
            assert!(out.stderr.contains("kie.api_key: not set"), "{out:?}");
            assert!(!out.stdout.contains("MfKQ") && !out.stderr.contains("MfKQ"));
            let v = toml_of(&out);
            assert_eq!(v["data_dir"].as_str(), data.to_str(), "{out:?}");
            assert_eq!(v["notify"]["url"].as_str(), Some("http://127.0.0.1:9/hook"));
        }
    } else {
        eprintln!("skipped the root half: not root");
    }

    // Not root (run as nobody when root): the credential is not read; check-config says
    // which one and exits 2, rather than "no signing secret".
    let mut c = f.command(Path::new("/"), &["check-config"]);
    c.env("COVERD_CONFIG", &config);
    if is_root() {
        c.uid(NOBODY).gid(NOBODY);
    }
    let out = run(c).await;
    assert_eq!(out.code, Some(2), "{out:?}");
    assert!(
        out.stderr.contains("notify secret: not read")
            && out.stderr.contains("`notify-secret`")
            && out.stderr.contains("only root can read"),
        "{out:?}"
    );
    assert!(out.stderr.contains("kie.api_key: not read"), "{out:?}");
    assert!(
        !out.stderr.contains("there is no signing secret"),
        "{out:?}"
    );
}

/// Where a credential is found: while the service runs, only what systemd handed it; else
/// the unit's `LoadCredential=NAME:PATH`, else the credential stores; an encrypted one counts
/// as present (check-config cannot read it and says so).
#[tokio::test]
async fn credentials_come_from_where_systemd_finds_them() {
    if !is_root() {
        eprintln!("skipped: credentials are read only as root");
        return;
    }
    let f = Fixture::new();
    let config = f.put(
        "coverd.toml",
        &format!(
            "data_dir = {:?}\n[notify]\nurl = \"http://127.0.0.1:9/hook\"\n",
            f.path("data").display().to_string()
        ),
    );
    let by_path = f.put("keys/api-key", "key-from-path\n");
    f.put(
        "root/usr/lib/systemd/system/coverd.service",
        &format!(
            "[Service]\nEnvironment=COVERD_CONFIG={}\nLoadCredential=kie-api-key:{}\nLoadCredential=kie-webhook-hmac-key\nLoadCredentialEncrypted=notify-secret\n",
            config.display(),
            by_path.display()
        ),
    );
    // The stores, from the lowest priority up.
    f.put("root/usr/lib/credstore/kie-webhook-hmac-key", "hmac-usr\n");
    let enc = f.put("root/etc/credstore.encrypted/notify-secret", "Wyi3…sealed");
    let out = f.run(&["check-config"]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    let found = |key: &str, path: &Path| {
        format!(
            "{key}: found in the credential `{}` of the installed unit, at {}",
            match key {
                "kie.api_key" => "kie-api-key",
                _ => "kie-webhook-hmac-key",
            },
            path.display()
        )
    };
    assert!(
        out.stderr.contains(&found("kie.api_key", &by_path)),
        "{out:?}"
    );
    assert!(
        out.stderr.contains(&found(
            "kie.webhook_hmac_key",
            &f.path("root/usr/lib/credstore/kie-webhook-hmac-key")
        )),
        "{out:?}"
    );
    assert!(
        out.stderr.contains(&format!(
            "notify secret: found in the encrypted credential `notify-secret` of the installed unit, at {} (only the service can decrypt it",
            enc.display()
        )),
        "{out:?}"
    );
    // /etc/credstore beats /usr/lib/credstore.
    let etc = f.put("root/etc/credstore/kie-webhook-hmac-key", "hmac-etc\n");
    let out = f.run(&["check-config"]).await;
    assert!(
        out.stderr.contains(&found("kie.webhook_hmac_key", &etc)),
        "{out:?}"
    );

    // The service runs: check-config, whose pass is the go-ahead for a restart, looks where
    // the next start finds each credential, not at the copies systemd handed the running
    // service (the operations.md walk found a removed notify-secret passing check-config,
    // then the restart failing with status 2).
    f.put(
        "root/run/credentials/coverd.service/kie-api-key",
        "key-running\n",
    );
    f.put("root/run/credentials/coverd.service/notify-secret", SECRET);
    let out = f.run(&["check-config"]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(
        out.stderr.contains(&found("kie.api_key", &by_path)),
        "{out:?}"
    );
    assert!(
        out.stderr.contains(&found("kie.webhook_hmac_key", &etc)),
        "{out:?}"
    );
    assert!(
        out.stderr.contains(&format!(
            "notify secret: found in the encrypted credential `notify-secret` of the installed unit, at {}",
            enc.display()
        )),
        "{out:?}"
    );
    std::fs::remove_file(&enc).unwrap();
    let out = f.run(&["check-config"]).await;
    assert_eq!(out.code, Some(2), "{out:?}");
    assert!(out.stderr.contains("no signing secret"), "{out:?}");
    // admin commands, which act with the running service, still read its copy.
    let running = f.path("root/run/credentials/coverd.service/notify-secret");
    let unit = coverd::config::unit::Unit::find(&coverd::config::unit::Root::at(f.root()))
        .unwrap()
        .unwrap();
    match unit.credential("notify-secret", true) {
        coverd::config::unit::Credential::Found { path, .. } => assert_eq!(path, running),
        other => panic!("{other:?}"),
    }
    f.put("root/etc/credstore.encrypted/notify-secret", "Wyi3…sealed");
    // The caller's sources beat the unit's credentials.
    let mut c = f.command(f.dir.path(), &["check-config"]);
    c.env("KIE_API_KEY", "key-from-caller");
    let out = run(c).await;
    assert!(
        out.stderr
            .contains("kie.api_key: found in the environment variable KIE_API_KEY"),
        "{out:?}"
    );
}

/// Drop-ins in systemd's order (file name order across directories, /etc hiding /usr/lib's
/// file of the same name), `Environment=` with quotes and escapes, and the precedence:
/// caller's environment, then the file, then the unit (which beats its own file).
#[tokio::test]
async fn the_units_environment_follows_systemds_rules() {
    let f = Fixture::new();
    let listen = |out: &Outcome| {
        toml_of(out)["listen"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_default()
    };
    let data = f.path("data with space");
    f.put(
        "root/usr/lib/systemd/system/coverd.service",
        &format!(
            "[Service]\nEnvironment=\"COVERD_DATA_DIR={}\" 'COVERD_LISTEN=127.0.0.1:1111'\n",
            data.display().to_string().replace(' ', "\\x20")
        ),
    );
    let out = f.run(&["check-config"]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(listen(&out), "127.0.0.1:1111");
    assert_eq!(toml_of(&out)["data_dir"].as_str(), data.to_str());
    f.put(
        "root/usr/lib/systemd/system/coverd.service.d/20-b.conf",
        "[Service]\nEnvironment=COVERD_LISTEN=127.0.0.1:3333\n",
    );
    f.put(
        "root/etc/systemd/system/coverd.service.d/10-a.conf",
        "[Service]\nEnvironment=COVERD_LISTEN=127.0.0.1:2222\n",
    );
    assert_eq!(listen(&f.run(&["check-config"]).await), "127.0.0.1:3333");
    // /etc's 20-b.conf hides /usr/lib's.
    f.put(
        "root/etc/systemd/system/coverd.service.d/20-b.conf",
        "# an operator's override\n[Service]\nEnvironment=COVERD_LISTEN=127.0.0.1:4444 \\\n  OTHER=1\n",
    );
    assert_eq!(listen(&f.run(&["check-config"]).await), "127.0.0.1:4444");
    // A later name wins whatever its directory.
    f.put(
        "root/usr/lib/systemd/system/coverd.service.d/30-c.conf",
        "[Service]\nEnvironment=COVERD_LISTEN=127.0.0.1:5555\n",
    );
    assert_eq!(listen(&f.run(&["check-config"]).await), "127.0.0.1:5555");
    // An empty Environment= resets what came before.
    f.put(
        "root/usr/lib/systemd/system/coverd.service.d/40-d.conf",
        "[Service]\nEnvironment=\n",
    );
    let out = f.run(&["check-config"]).await;
    assert_eq!(listen(&out), "127.0.0.1:8787", "{out:?}");
    std::fs::remove_file(f.path("root/usr/lib/systemd/system/coverd.service.d/40-d.conf")).unwrap();

    // The caller's environment beats the unit.
    let mut c = f.command(f.dir.path(), &["check-config"]);
    c.env("COVERD_LISTEN", "127.0.0.1:6666");
    assert_eq!(listen(&run(c).await), "127.0.0.1:6666");
    // A file of the caller's own beats the unit; the unit's own file does not (as for the
    // service, whose environment beats its file).
    let own = f.put("own.toml", "listen = \"127.0.0.1:7777\"\n");
    let mut c = f.command(f.dir.path(), &["check-config"]);
    c.env("COVERD_CONFIG", &own);
    assert_eq!(listen(&run(c).await), "127.0.0.1:7777");
    f.put(
        "root/etc/systemd/system/coverd.service.d/50-config.conf",
        &format!("[Service]\nEnvironment=COVERD_CONFIG={}\n", own.display()),
    );
    let mut c = f.command(f.dir.path(), &["check-config"]);
    c.env("COVERD_CONFIG", &own);
    assert_eq!(listen(&run(c).await), "127.0.0.1:5555");
    assert_eq!(listen(&f.run(&["check-config"]).await), "127.0.0.1:5555");

    // A bad value is blamed on the unit.
    f.put(
        "root/etc/systemd/system/coverd.service.d/60-bad.conf",
        "[Service]\nEnvironment=COVERD_LISTEN=nope\n",
    );
    let out = f.run(&["check-config"]).await;
    assert_eq!(out.code, Some(2), "{out:?}");
    assert!(
        out.stderr.contains("Environment=COVERD_LISTEN=")
            && out.stderr.contains("installed unit")
            && out.stderr.contains("coverd.service"),
        "{out:?}"
    );
}

/// Where the unit is installed, its data directory wins over a stray `./coverd-data` in the
/// current directory; `admin status` names it on its first line, an error names it too.
#[tokio::test]
async fn admin_uses_the_units_data_directory_not_a_stray_one() {
    let f = Fixture::new();
    let service = f.path("service-data");
    let cwd = f.path("checkout");
    std::fs::create_dir_all(&cwd).unwrap();
    for (dir, task) in [
        (service.to_str().unwrap(), "svc-1"),
        ("coverd-data", "stray-1"),
    ] {
        let mut c = coverd();
        c.current_dir(&cwd)
            .args(["admin", "--data-dir", dir, "track", task]);
        let out = run(c).await;
        assert_eq!(out.code, Some(0), "{out:?}");
    }
    assert!(cwd.join("coverd-data/db").exists());
    // No unit: the stray one is used.
    let out = run(f.command(&cwd, &["admin", "status"])).await;
    assert!(
        out.stdout
            .starts_with("daemon: stopped (data directory ./coverd-data)\n"),
        "{out:?}"
    );
    // The unit names its directory with a specifier-free path; WorkingDirectory= makes its
    // relative default absolute too (checked below).
    f.put(
        "root/etc/systemd/system/coverd.service",
        &format!(
            "[Service]\nEnvironment=COVERD_DATA_DIR={}\n",
            service.display()
        ),
    );
    let out = run(f.command(&cwd, &["admin", "status"])).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(
        out.stdout.starts_with(&format!(
            "daemon: stopped (data directory {})\n",
            service.display()
        )),
        "{out:?}"
    );
    let out = run(f.command(&cwd, &["admin", "show", "stray-1"])).await;
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        out.stderr
            .contains(&format!("(data directory {})", service.display())),
        "{out:?}"
    );
    let out = run(f.command(&cwd, &["admin", "show", "svc-1"])).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    // --data-dir still beats the unit.
    let out = run(f.command(
        &cwd,
        &["admin", "--data-dir", "coverd-data", "show", "stray-1"],
    ))
    .await;
    assert_eq!(out.code, Some(0), "{out:?}");

    // A unit without COVERD_DATA_DIR: the service's default, in its working directory.
    f.put(
        "root/etc/systemd/system/coverd.service",
        &format!("[Service]\nWorkingDirectory={}\n", service.display()),
    );
    let out = run(f.command(&cwd, &["admin", "status"])).await;
    assert_eq!(out.code, Some(1), "{out:?}");
    let expected = service.join("./coverd-data");
    assert!(
        out.stderr.contains(&format!(
            "no coverd data in {}, the data directory of the installed unit",
            expected.display()
        )),
        "{out:?}"
    );
    // Not even a command that writes creates it: systemd makes it for the service's user.
    let out = run(f.command(&cwd, &["admin", "track", "early-1"])).await;
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(!expected.exists(), "the unit's data directory was created");
}
