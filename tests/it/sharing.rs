//! `[storage] local_group` (SPEC "Data directory"): stored images and their directories
//! readable by one group (0750 / 0640), the data directory only traversable by it (0710),
//! everything else private; a start converts a data directory written with another setting
//! and back; a group that does not exist, or one the daemon's user is not in, stops the
//! start with status 2 and a sentence that says what to do.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;

use coverd::config::LocalGroup;
use coverd::model::State;

use crate::bin_util::{NOBODY, Scratch, coverd, is_root, run};
use crate::fake_kie::FakeKie;
use crate::fake_kie::files::{Behaviour, png};
use crate::harness::{Daemon, success_body};

/// A group of this machine other than root's own (so that a changed group shows) and, where
/// the machine has one, other than nobody's.
fn some_group() -> LocalGroup {
    for name in ["daemon", "users", "nogroup", "nobody"] {
        if let Ok(Some(g)) = nix::unistd::Group::from_name(name) {
            return LocalGroup {
                name: name.into(),
                gid: g.gid.as_raw(),
            };
        }
    }
    panic!("none of daemon, users, nogroup, nobody exists on this machine");
}

fn mode_gid(path: &Path) -> (u32, u32) {
    let m = std::fs::symlink_metadata(path).unwrap();
    (m.mode() & 0o7777, m.gid())
}

/// Downloads one task with two images.
async fn one_task(d: &Daemon, fake: &FakeKie, id: &str) {
    crate::admin_track(d, id).await;
    let urls: Vec<String> = (0..2)
        .map(|i| {
            let path = format!("/{id}/{i}.png");
            fake.files.set(&path, Behaviour::Image(png(64 + i)));
            fake.files.url(&path)
        })
        .collect();
    assert_eq!(d.callback(&success_body(id, &urls)).await.0, 200);
    d.wait_for(id, |t| t.state == State::Downloaded).await;
}

/// Every entry under `images/` and the data directory as `local_group` makes them; `db/`
/// and `tmp/` untouched.
fn assert_shared(root: &Path, gid: u32) {
    assert_eq!(mode_gid(root), (0o710, gid), "the data directory");
    assert_eq!(mode_gid(&root.join("images")), (0o750, gid), "images/");
    let mut files = 0;
    for task in std::fs::read_dir(root.join("images")).unwrap() {
        let task = task.unwrap().path();
        assert_eq!(mode_gid(&task), (0o750, gid), "{}", task.display());
        for file in std::fs::read_dir(&task).unwrap() {
            let file = file.unwrap().path();
            assert_eq!(mode_gid(&file), (0o640, gid), "{}", file.display());
            files += 1;
        }
    }
    assert!(files > 0, "no stored file to check");
    for private in ["db", "tmp"] {
        assert_eq!(
            mode_gid(&root.join(private)).0,
            0o700,
            "{private}/ stays private"
        );
    }
}

fn assert_private(root: &Path) {
    assert_eq!(mode_gid(root).0, 0o700, "the data directory");
    for task in std::fs::read_dir(root.join("images")).unwrap() {
        let task = task.unwrap().path();
        assert_eq!(mode_gid(&task).0, 0o700, "{}", task.display());
        for file in std::fs::read_dir(&task).unwrap() {
            let file = file.unwrap().path();
            assert_eq!(mode_gid(&file).0, 0o600, "{}", file.display());
        }
    }
    assert_eq!(mode_gid(&root.join("images")).0, 0o700, "images/");
}

#[tokio::test]
async fn local_group_makes_stored_images_group_readable_and_nothing_else() {
    let group = some_group();
    let fake = FakeKie::start().await;
    let g = group.clone();
    let d = Daemon::start(&fake, move |c| c.storage.local_group = Some(g)).await;
    one_task(&d, &fake, "shared-1").await;
    assert_shared(d.dir.path(), group.gid);
    d.stop().await;
}

#[tokio::test]
async fn a_start_converts_the_stored_files_to_the_setting_and_back() {
    let group = some_group();
    let fake = FakeKie::start().await;
    // Written private, by a daemon without the key (as every release before it).
    let d = Daemon::start(&fake, |_| {}).await;
    one_task(&d, &fake, "convert-1").await;
    let (dir, mut config) = d.stop().await;
    assert_private(dir.path());

    config.storage.local_group = Some(group.clone());
    let d = Daemon::start_in(dir, config).await;
    assert_shared(d.dir.path(), group.gid);
    // New downloads land shared too, beside the converted ones.
    one_task(&d, &fake, "convert-2").await;
    assert_shared(d.dir.path(), group.gid);
    let (dir, mut config) = d.stop().await;

    config.storage.local_group = None;
    let d = Daemon::start_in(dir, config).await;
    assert_private(d.dir.path());
    d.stop().await;
}

#[tokio::test]
async fn a_group_that_does_not_exist_is_a_configuration_error() {
    let s = Scratch::new();
    s.write_raw_config("[storage]\nlocal_group = \"no-such-group-coverd\"\n");
    let out = s.run(&["check-config"]).await;
    assert_eq!(out.code, Some(2), "{out:?}");
    assert!(
        out.stderr.contains("storage.local_group") && out.stderr.contains("groupadd"),
        "{out:?}"
    );
}

#[tokio::test]
async fn a_group_the_daemon_is_not_in_stops_the_start_with_status_2() {
    if !is_root() {
        eprintln!("skipped: starting the daemon as nobody needs root");
        return;
    }
    let group = some_group();
    let s = Scratch::new();
    std::fs::set_permissions(s.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let data = s.data_dir();
    std::fs::create_dir(&data).unwrap();
    std::os::unix::fs::chown(&data, Some(NOBODY), Some(NOBODY)).unwrap();
    s.write_raw_config(&format!(
        "data_dir = {:?}\nlisten = \"127.0.0.1:0\"\n[storage]\nlocal_group = {:?}\n",
        data.display().to_string(),
        group.name
    ));
    // Readable by nobody whatever the umask: an in-process daemon test that ran before in
    // this process set it to 0077 (`daemon::private_umask`), which made the file 0600.
    std::fs::set_permissions(s.config_path(), std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut serve = coverd();
    serve
        .arg("serve")
        .arg("--config")
        .arg(s.config_path())
        .current_dir("/")
        .uid(NOBODY)
        .gid(NOBODY);
    assert_ne!(group.gid, NOBODY, "{} is nobody's own group", group.name);
    // std drops root's supplementary groups when it sets the uid: nobody is in none.
    let out = run(serve).await;
    assert_eq!(out.code, Some(2), "{out:?}");
    assert!(
        out.stderr
            .contains(&format!("SupplementaryGroups={}", group.name)),
        "{out:?}"
    );
    // Nothing was made shared.
    assert_eq!(mode_gid(&data).0, 0o700);
}
