//! The status summary a clean close leaves for a stopped daemon's `admin status`: written
//! by the last handle only and never after a failed write, removed at open, and ignored
//! when sled's log changed under it or the file is crafted.
use crate::machine::Origin;
use crate::model::Kind;
use std::path::Path;

use super::ctx;
use crate::machine::{Event, Report};
use crate::model::Millis;
use crate::store::summary::{FILE, FORMAT, MAX_BYTES, MAX_TEXT, SLED_LOG, Summary, read};
use crate::store::{IfMissing, SCHEMA_VERSION, Store};

/// A store with a task in each of three states and one quarantined record.
fn filled(dir: &Path) -> Store {
    let store = Store::open(dir).unwrap();
    for (i, id) in ["a", "b", "c"].iter().enumerate() {
        let track = Event::Track(Origin::cover(Some(format!("m-{id}"))));
        store
            .apply(id, &track, &ctx(10 + i as Millis), IfMissing::Create)
            .unwrap();
    }
    let callback = Event::Callback(Kind::Cover, Report::images(vec!["https://h/0.png".into()]));
    store
        .apply("b", &callback, &ctx(20), IfMissing::Reject)
        .unwrap();
    let failed = Event::Callback(
        Kind::Cover,
        Report::Failure {
            reason: "KIE code 501: nope".into(),
        },
    );
    store
        .apply("c", &failed, &ctx(30), IfMissing::Reject)
        .unwrap();
    store.put_raw_task("d", b"\xffdamaged").unwrap();
    // A read finds the damage and puts it in the quarantine index.
    assert!(store.get("d").is_err());
    store
}

fn file(dir: &Path) -> std::path::PathBuf {
    dir.join("db").join(FILE)
}

#[tokio::test]
async fn a_clean_close_leaves_what_status_would_read_and_an_open_removes_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = filled(dir.path());
    let live = store.summary().unwrap();
    assert_eq!(live.counts.submitted, 1, "{live:?}");
    assert_eq!(live.quarantined.len(), 1, "{live:?}");
    store.close().await.unwrap();

    let found = read(dir.path()).expect("a summary after a clean close");
    let expected = Summary {
        db_bytes: found.db_bytes,
        ..live
    };
    assert_eq!(found, expected);
    assert!(found.db_bytes > 0);

    let store = Store::open(dir.path()).unwrap();
    assert!(!file(dir.path()).exists(), "an open removes it");
    assert_eq!(read(dir.path()), None);
    store.close().await.unwrap();
    assert!(read(dir.path()).is_some());
}

#[tokio::test]
async fn no_summary_while_another_handle_may_still_write() {
    let dir = tempfile::tempdir().unwrap();
    let store = filled(dir.path());
    let other = store.clone();
    store.close().await.unwrap();
    assert!(!file(dir.path()).exists());
    other.close().await.unwrap();
    assert!(file(dir.path()).exists(), "the last handle writes it");
}

#[tokio::test]
async fn no_summary_after_a_failed_write() {
    let dir = tempfile::tempdir().unwrap();
    let store = filled(dir.path());
    store.inject_write_failures(true);
    store.close().await.unwrap();
    assert!(!file(dir.path()).exists());
}

#[tokio::test]
async fn a_store_changed_by_a_build_that_does_not_know_the_file_is_read_anew() {
    let dir = tempfile::tempdir().unwrap();
    filled(dir.path()).close().await.unwrap();
    assert!(read(dir.path()).is_some());
    // An older coverd opens sled without removing the file, and writes.
    let db = sled::open(dir.path().join("db")).unwrap();
    db.open_tree("tasks").unwrap().insert("e", b"x").unwrap();
    db.flush().unwrap();
    drop(db);
    assert!(file(dir.path()).exists());
    assert_eq!(read(dir.path()), None);
}

#[tokio::test]
async fn a_copied_store_is_read_anew() {
    let dir = tempfile::tempdir().unwrap();
    filled(dir.path()).close().await.unwrap();
    let db = dir.path().join("db").join(SLED_LOG);
    let copy = dir.path().join("db").join("copy");
    std::fs::copy(&db, &copy).unwrap();
    std::fs::rename(&copy, &db).unwrap();
    assert_eq!(read(dir.path()), None);
}

/// What a crafted or damaged file holds is never shown: each is ignored.
#[tokio::test]
async fn a_crafted_file_is_ignored() {
    let dir = tempfile::tempdir().unwrap();
    filled(dir.path()).close().await.unwrap();
    let path = file(dir.path());
    let good = std::fs::read_to_string(&path).unwrap();
    assert!(read(dir.path()).is_some());
    let mut v: serde_json::Value = serde_json::from_str(&good).unwrap();
    let crafted = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut c = v.clone();
        f(&mut c);
        serde_json::to_string(&c).unwrap()
    };
    let cases = [
        crafted(&|c| c["quarantined"][0]["reason"] = "\u{1b}]0;owned\u{7}".into()),
        crafted(&|c| c["quarantined"][0]["task_id"] = "x".repeat(MAX_TEXT + 1).into()),
        crafted(&|c| c["quarantined_total"] = 0.into()),
        crafted(&|c| c["oldest_unfinished"]["state"] = "downloaded".into()),
        crafted(&|c| c["oldest_unfinished"]["task_id"] = "../x".into()),
        crafted(&|c| c["format"] = 2.into()),
        crafted(&|c| c["schema"] = (SCHEMA_VERSION + 1).into()),
        crafted(&|c| c["extra"] = 1.into()),
        crafted(&|c| c["log"]["len"] = 1.into()),
        format!("{good}{}", " ".repeat(MAX_BYTES as usize)),
        good[..good.len() / 2].to_string(),
    ];
    for case in &cases {
        std::fs::write(&path, case).unwrap();
        assert_eq!(read(dir.path()), None, "{}", &case[..case.len().min(300)]);
    }
    // Not followed: a link to a good copy.
    v["format"] = FORMAT.into();
    let elsewhere = dir.path().join("elsewhere.json");
    std::fs::write(&elsewhere, serde_json::to_string(&v).unwrap()).unwrap();
    std::fs::remove_file(&path).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &path).unwrap();
    assert_eq!(read(dir.path()), None);
    std::fs::remove_file(&path).unwrap();
    std::fs::rename(&elsewhere, &path).unwrap();
    assert!(read(dir.path()).is_some());
}
