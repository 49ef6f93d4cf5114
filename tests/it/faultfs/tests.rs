//! The fault filesystem's own rules, checked through the mount: what a power cut keeps and
//! forgets, renames as one unit, injected errors reaching the caller, Unix sockets. Owns
//! these checks only; must not test coverd or sled.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::{Errno, FaultFs, FaultOp};

fn mounted() -> (tempfile::TempDir, FaultFs) {
    let dir = tempfile::tempdir().unwrap();
    let fs = FaultFs::mount(dir.path()).unwrap();
    (dir, fs)
}

fn sync_dir(p: &Path) {
    File::open(p).unwrap().sync_all().unwrap();
}

fn write(p: &Path, data: &[u8]) -> File {
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(p)
        .unwrap();
    f.write_all(data).unwrap();
    f
}

fn read(p: &Path) -> Option<Vec<u8>> {
    let mut v = Vec::new();
    File::open(p).ok()?.read_to_end(&mut v).ok()?;
    Some(v)
}

#[test]
fn a_power_cut_keeps_only_what_was_synced() {
    let (_dir, mut fs) = mounted();
    let root = fs.path().to_path_buf();
    // Entry synced, data not: the name survives, empty.
    drop(write(&root.join("unsynced-data"), b"lost"));
    // Both, with an fdatasync: kept.
    write(&root.join("synced"), b"kept").sync_data().unwrap();
    // sync_file_range is not a sync.
    let f = write(&root.join("ranged"), b"lost too");
    let rc = unsafe { libc::sync_file_range(std::os::fd::AsRawFd::as_raw_fd(&f), 0, 0, 7) };
    assert_eq!(rc, 0);
    drop(f);
    std::fs::create_dir(root.join("sub")).unwrap();
    sync_dir(&root);
    // Data synced, entry not: gone.
    write(&root.join("unsynced-name"), b"lost")
        .sync_all()
        .unwrap();
    // A file in a synced directory whose own entry in it was never synced.
    write(&root.join("sub/inner"), b"lost").sync_all().unwrap();
    // Data written after the last sync of a file that is otherwise durable.
    let f = OpenOptions::new()
        .append(true)
        .open(root.join("synced"))
        .unwrap();
    f.write_at(b"!", 4).unwrap();
    drop(f);

    fs.cut().unwrap();
    assert_eq!(read(&root.join("unsynced-data")).as_deref(), Some(&b""[..]));
    assert_eq!(read(&root.join("unsynced-name")), None);
    assert_eq!(read(&root.join("synced")).as_deref(), Some(&b"kept"[..]));
    assert_eq!(read(&root.join("ranged")).as_deref(), Some(&b""[..]));
    assert!(root.join("sub").is_dir());
    assert_eq!(read(&root.join("sub/inner")), None);

    // Truncation and overwrite are durable only once synced, too.
    let f = OpenOptions::new()
        .write(true)
        .open(root.join("synced"))
        .unwrap();
    f.set_len(1).unwrap();
    f.write_at(b"xy", 3).unwrap();
    fs.cut().unwrap();
    assert_eq!(read(&root.join("synced")).as_deref(), Some(&b"kept"[..]));
    let f = OpenOptions::new()
        .write(true)
        .open(root.join("synced"))
        .unwrap();
    f.set_len(1).unwrap();
    f.write_at(b"xy", 3).unwrap();
    f.sync_all().unwrap();
    drop(f);
    fs.cut().unwrap();
    assert_eq!(read(&root.join("synced")).as_deref(), Some(&b"k\0\0xy"[..]));
}

#[test]
fn a_rename_is_durable_once_its_directory_is_synced_and_as_one_unit() {
    let (_dir, mut fs) = mounted();
    let root = fs.path().to_path_buf();
    std::fs::create_dir(root.join("tmp")).unwrap();
    std::fs::create_dir(root.join("images")).unwrap();
    write(&root.join("tmp/a.part"), b"image")
        .sync_all()
        .unwrap();
    sync_dir(&root.join("tmp"));
    sync_dir(&root);

    // Not synced: undone.
    std::fs::rename(root.join("tmp/a.part"), root.join("images/a.png")).unwrap();
    fs.cut().unwrap();
    assert_eq!(
        read(&root.join("tmp/a.part")).as_deref(),
        Some(&b"image"[..])
    );
    assert_eq!(read(&root.join("images/a.png")), None);

    // The destination synced: both sides at once (never in both places, never in none).
    std::fs::rename(root.join("tmp/a.part"), root.join("images/a.png")).unwrap();
    sync_dir(&root.join("images"));
    fs.cut().unwrap();
    assert_eq!(read(&root.join("tmp/a.part")), None);
    assert_eq!(
        read(&root.join("images/a.png")).as_deref(),
        Some(&b"image"[..])
    );

    // The source synced: the same.
    std::fs::rename(root.join("images/a.png"), root.join("tmp/b")).unwrap();
    sync_dir(&root.join("images"));
    fs.cut().unwrap();
    assert_eq!(read(&root.join("images/a.png")), None);
    assert_eq!(read(&root.join("tmp/b")).as_deref(), Some(&b"image"[..]));

    // Replacing a file in one directory (sled's snapshot, coverd's admin.sock): the old
    // content until the directory is synced, then the new one.
    write(&root.join("snap"), b"old").sync_all().unwrap();
    sync_dir(&root);
    write(&root.join("snap.tmp"), b"new").sync_all().unwrap();
    std::fs::rename(root.join("snap.tmp"), root.join("snap")).unwrap();
    fs.cut().unwrap();
    assert_eq!(read(&root.join("snap")).as_deref(), Some(&b"old"[..]));
    assert_eq!(read(&root.join("snap.tmp")), None);
    write(&root.join("snap.tmp"), b"new").sync_all().unwrap();
    std::fs::rename(root.join("snap.tmp"), root.join("snap")).unwrap();
    sync_dir(&root);
    fs.cut().unwrap();
    assert_eq!(read(&root.join("snap")).as_deref(), Some(&b"new"[..]));
    assert_eq!(read(&root.join("snap.tmp")), None);
    // Unlinks too.
    std::fs::remove_file(root.join("snap")).unwrap();
    fs.cut().unwrap();
    assert!(root.join("snap").exists());
    std::fs::remove_file(root.join("snap")).unwrap();
    sync_dir(&root);
    fs.cut().unwrap();
    assert!(!root.join("snap").exists());
}

#[test]
fn injected_errors_reach_the_caller_and_unix_sockets_work() {
    let (_dir, mut fs) = mounted();
    let root = fs.path().to_path_buf();
    let f = write(&root.join("f"), b"x");

    fs.fail_nth(FaultOp::Fsync, 2, Errno::Eio).unwrap();
    f.sync_all().unwrap();
    assert_eq!(f.sync_all().unwrap_err().raw_os_error(), Some(libc::EIO));
    f.sync_all().unwrap();

    fs.fail_nth(FaultOp::Fdatasync, 1, Errno::Enospc).unwrap();
    f.sync_all().unwrap();
    assert_eq!(
        f.sync_data().unwrap_err().raw_os_error(),
        Some(libc::ENOSPC)
    );

    fs.fail_nth(FaultOp::Write, 1, Errno::Eio).unwrap();
    assert_eq!(
        f.write_at(b"y", 0).unwrap_err().raw_os_error(),
        Some(libc::EIO)
    );
    f.write_at(b"y", 0).unwrap();

    fs.fail_nth(FaultOp::Rename, 1, Errno::Eio).unwrap();
    let e = std::fs::rename(root.join("f"), root.join("g")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO));
    assert!(root.join("f").exists());

    fs.budget(10_000, Errno::Enospc).unwrap();
    f.write_at(&[1; 8_000], 0).unwrap();
    let e = f.write_all_at(&[1; 4_000], 8_000).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
    fs.clear_faults().unwrap();
    f.write_at(&[1; 4_000], 8_000).unwrap();
    let c = fs.counts().unwrap();
    // The kernel may split a write at page boundaries: the budget fails one piece or more.
    assert!(c.failed >= 5, "{c:?}");
    assert_eq!((c.fsyncs, c.dir_fsyncs, c.renames), (5, 0, 1), "{c:?}");
    assert!(c.writes >= 5, "{c:?}");

    // coverd's admin socket lives in the data directory.
    let sock = root.join("admin.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let mut client = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    let (mut server, _) = listener.accept().unwrap();
    client.write_all(b"ping").unwrap();
    let mut got = [0u8; 4];
    server.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"ping");
}

/// `die_at`: the power goes off at an exact operation, before it does anything; nothing
/// after it is served or becomes durable.
#[test]
fn a_cut_at_the_nth_fsync_keeps_what_was_synced_before_it() {
    let (_dir, mut fs) = mounted();
    let root = fs.path().to_path_buf();
    write(&root.join("before"), b"kept").sync_all().unwrap();
    sync_dir(&root);
    fs.die_at(FaultOp::Fsync, 2).unwrap();
    let f = write(&root.join("after"), b"lost");
    // The first fsync goes through (the file's data), the second is the cut.
    f.sync_all().unwrap();
    let e = File::open(&root).unwrap().sync_all().unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO));
    // Dead from now on: nothing is served.
    assert!(read(&root.join("before")).is_none());
    assert!(fs.counts().unwrap().died);
    drop(f);
    fs.cut().unwrap();
    assert_eq!(read(&root.join("before")).as_deref(), Some(&b"kept"[..]));
    assert_eq!(read(&root.join("after")), None);
    assert!(!fs.counts().unwrap().died);
}
