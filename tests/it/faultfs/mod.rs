//! The fault filesystem's handle for tests: mounts `fs::FaultFs` in a child process (this
//! test binary re-executed into [`child`]), sends it commands over its stdin (power cut, error
//! injection) and reads its answers on stdout; unmounts lazily. Owns the child's life and the
//! mount point; must not hold the durability rules (`fs`) or know what runs on the mount.
//!
//! A power cut ([`FaultFs::cut`]) stops the child, which has kept on disk only what was
//! synced, unmounts, and starts a new child that rebuilds the files from that and mounts
//! again. Whoever used the mount must be dead by then (SIGKILLed, like a machine losing
//! power). If the test dies, the child sees its stdin close and unmounts itself, so a
//! failed test cannot leave a wedged mount behind.

pub mod fs;
mod tests;

use std::io::{BufRead, BufReader, Write};

use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

pub use fs::FaultOp;

/// Set in the child's environment: the backing directory, then the mount point.
const BACKING_VAR: &str = "COVERD_FAULTFS_BACKING";
const MOUNT_VAR: &str = "COVERD_FAULTFS_MOUNT";
/// The test that is the child's entry point (its full name in this crate).
const CHILD_TEST: &str = "faultfs::child";
/// Prefix of the child's answers (libtest prints its own lines on the same stdout).
const ANSWER: &str = "FAULTFS ";
/// Longest wait for an answer of the child (a mount, a command).
const ANSWER_LIMIT: Duration = Duration::from_secs(60);

/// Errors the injected faults return.
#[derive(Debug, Clone, Copy)]
pub enum Errno {
    Eio,
    Enospc,
}

impl Errno {
    fn name(self) -> &'static str {
        match self {
            Errno::Eio => "EIO",
            Errno::Enospc => "ENOSPC",
        }
    }
}

/// What the filesystem counted since it was last powered on.
#[derive(Debug, Default, Clone, Copy)]
pub struct Counts {
    pub fsyncs: u64,
    pub dir_fsyncs: u64,
    pub writes: u64,
    pub renames: u64,
    pub failed: u64,
    /// The power went off at the point [`FaultFs::die_at`] set.
    pub died: bool,
}

struct Running {
    child: Child,
    stdin: ChildStdin,
    answers: mpsc::Receiver<String>,
}

/// A mounted fault filesystem over `<dir>/backing`, at `<dir>/mnt`.
pub struct FaultFs {
    backing: PathBuf,
    mnt: PathBuf,
    running: Option<Running>,
    /// Power cuts so far.
    pub cuts: u64,
}

impl FaultFs {
    /// Mounts an empty fault filesystem under `dir` (which must exist, on a real disk).
    pub fn mount(dir: &Path) -> std::io::Result<FaultFs> {
        FaultFs::mount_at(&dir.join("backing"), &dir.join("mnt"))
    }

    /// Mounts an empty fault filesystem at `mnt`, keeping its files in `backing` (both are
    /// created if missing).
    pub fn mount_at(backing: &Path, mnt: &Path) -> std::io::Result<FaultFs> {
        let (backing, mnt) = (backing.to_path_buf(), mnt.to_path_buf());
        std::fs::create_dir_all(&backing)?;
        std::fs::create_dir_all(&mnt)?;
        let mut fs = FaultFs {
            backing,
            mnt,
            running: None,
            cuts: 0,
        };
        fs.power_on()?;
        Ok(fs)
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.mnt
    }

    /// Power cut, then power on: everything not synced is gone.
    pub fn cut(&mut self) -> std::io::Result<()> {
        self.power_off()?;
        self.power_on()
    }

    /// The power cut alone: the child forgets what was not durable and stops; the mount is
    /// detached.
    pub fn power_off(&mut self) -> std::io::Result<()> {
        if let Some(mut r) = self.running.take() {
            // A child that already died (or a closed pipe) is off too.
            let _ = ask(&mut r, "cut");
            let _ = r.child.kill();
            r.child.wait()?;
            self.cuts += 1;
        }
        unmount_lazily(&self.mnt);
        Ok(())
    }

    /// Rebuilds the durable state and mounts it.
    pub fn power_on(&mut self) -> std::io::Result<()> {
        if self.running.is_some() {
            return Ok(());
        }
        let exe = std::env::current_exe()?;
        let mut child = Command::new(exe)
            .args([CHILD_TEST, "--exact", "--nocapture", "--test-threads=1"])
            .env(BACKING_VAR, &self.backing)
            .env(MOUNT_VAR, &self.mnt)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, answers) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                // libtest's "test faultfs::child ... " may start the line.
                if let Some(at) = line.find(ANSWER) {
                    if tx.send(line[at + ANSWER.len()..].to_string()).is_err() {
                        break;
                    }
                }
            }
        });
        let mut r = Running {
            child,
            stdin,
            answers,
        };
        match r.answers.recv_timeout(ANSWER_LIMIT) {
            Ok(a) if a == "ready" => {}
            other => {
                let _ = r.child.kill();
                let _ = r.child.wait();
                unmount_lazily(&self.mnt);
                return Err(std::io::Error::other(format!(
                    "the fault filesystem did not mount at {}: {other:?} (is fuse3 installed and /dev/fuse usable?)",
                    self.mnt.display()
                )));
            }
        }
        self.running = Some(r);
        Ok(())
    }

    fn command(&mut self, line: &str) -> std::io::Result<String> {
        let r = self
            .running
            .as_mut()
            .ok_or_else(|| std::io::Error::other("the fault filesystem is powered off"))?;
        ask(r, line)
    }

    /// Fails the `n`th (1 = the next) operation of kind `op` with `errno`.
    pub fn fail_nth(&mut self, op: FaultOp, n: u64, errno: Errno) -> std::io::Result<()> {
        self.command(&format!("fail {} {n} {}", op.name(), errno.name()))
            .map(drop)
    }

    /// Cuts the power at the `n`th (1 = the next) operation of kind `op`, before it does
    /// anything: from then on every request fails with EIO and nothing more becomes durable.
    /// Whoever used the mount must then be killed and [`FaultFs::cut`] called, as after any
    /// cut. A cut at an exact point of a program, where a kill at a random moment might
    /// miss it.
    pub fn die_at(&mut self, op: FaultOp, n: u64) -> std::io::Result<()> {
        self.command(&format!("die {} {n}", op.name())).map(drop)
    }

    /// Fails every write once `bytes` more have been written.
    pub fn budget(&mut self, bytes: u64, errno: Errno) -> std::io::Result<()> {
        self.command(&format!("budget {bytes} {}", errno.name()))
            .map(drop)
    }

    /// Removes every injected fault.
    pub fn clear_faults(&mut self) -> std::io::Result<()> {
        self.command("clear").map(drop)
    }

    pub fn counts(&mut self) -> std::io::Result<Counts> {
        let a = self.command("counts")?;
        let n: Vec<u64> = a
            .split_whitespace()
            .filter_map(|w| w.split_once('=').and_then(|(_, v)| v.parse().ok()))
            .collect();
        match n[..] {
            [fsyncs, dir_fsyncs, writes, renames, failed, died] => Ok(Counts {
                fsyncs,
                dir_fsyncs,
                writes,
                renames,
                failed,
                died: died != 0,
            }),
            _ => Err(std::io::Error::other(format!("bad counts answer: {a}"))),
        }
    }
}

impl Drop for FaultFs {
    fn drop(&mut self) {
        if let Some(mut r) = self.running.take() {
            let _ = ask(&mut r, "quit");
            let _ = r.child.kill();
            let _ = r.child.wait();
        }
        unmount_lazily(&self.mnt);
    }
}

fn ask(r: &mut Running, line: &str) -> std::io::Result<String> {
    writeln!(r.stdin, "{line}")?;
    r.stdin.flush()?;
    let a = r
        .answers
        .recv_timeout(ANSWER_LIMIT)
        .map_err(|e| std::io::Error::other(format!("no answer to '{line}': {e}")))?;
    match a.strip_prefix("ok") {
        Some(rest) => Ok(rest.trim().to_string()),
        None => Err(std::io::Error::other(format!("'{line}': {a}"))),
    }
}

/// Detaches the mount at `mnt` if one is there (`fusermount3 -u -z`; `umount -l` where
/// fusermount3 is missing). Quiet when nothing is mounted.
fn unmount_lazily(mnt: &Path) {
    if !is_mounted(mnt) {
        return;
    }
    let ok = Command::new("fusermount3")
        .arg("-u")
        .arg("-z")
        .arg(mnt)
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(mnt)
            .stderr(Stdio::null())
            .status();
    }
}

fn is_mounted(mnt: &Path) -> bool {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
        return true;
    };
    let want = mnt.to_string_lossy();
    mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(&*want))
}

/// The child's entry point: a test that does nothing unless this binary was started by
/// [`FaultFs::power_on`]. Mounts, answers `ready`, then serves commands from stdin until
/// `cut`, `quit` or the end of stdin.
#[test]
fn child() {
    let (Some(backing), Some(mnt)) = (std::env::var_os(BACKING_VAR), std::env::var_os(MOUNT_VAR))
    else {
        return;
    };
    let code = serve(Path::new(&backing), Path::new(&mnt));
    std::process::exit(code);
}

fn serve(backing: &Path, mnt: &Path) -> i32 {
    let say = |s: &str| {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{ANSWER}{s}");
        let _ = out.flush();
    };
    let fs = match fs::FaultFs::power_on(backing) {
        Ok(fs) => std::sync::Arc::new(fs),
        Err(e) => {
            say(&format!("error rebuilding from {}: {e}", backing.display()));
            return 1;
        }
    };
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::FSName("coverd-faultfs".into()),
        fuser::MountOption::DefaultPermissions,
    ];
    let session = match fuser::Session::new(Shared(fs.clone()), mnt, &config) {
        Ok(s) => s,
        Err(e) => {
            say(&format!("error mounting at {}: {e}", mnt.display()));
            return 1;
        }
    };
    let bg = match session.spawn() {
        Ok(bg) => bg,
        Err(e) => {
            say(&format!("error starting the session: {e}"));
            return 1;
        }
    };
    say("ready");
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let words: Vec<&str> = line.split_whitespace().collect();
        match words[..] {
            ["cut"] => {
                fs.cut();
                say("ok");
                // No unmount, no cleanup: the parent detaches the dead mount.
                std::process::exit(0);
            }
            ["quit"] => {
                say("ok");
                break;
            }
            ["clear"] => {
                fs.with(|f, _| f.clear());
                say("ok");
            }
            ["counts"] => {
                let c = fs.with(|_, c| *c);
                say(&format!(
                    "ok fsyncs={} dir_fsyncs={} writes={} renames={} failed={} died={}",
                    c.fsyncs,
                    c.dir_fsyncs,
                    c.writes,
                    c.renames,
                    c.failed,
                    u8::from(c.died)
                ));
            }
            ["fail", op, n, e] => match (FaultOp::parse(op), n.parse::<u64>(), errno(e)) {
                (Some(op), Ok(n), Some(e)) if n > 0 => {
                    fs.with(|f, _| f.fail_nth(op, n, e));
                    say("ok");
                }
                _ => say(&format!("error: bad command '{line}'")),
            },
            ["die", op, n] => match (FaultOp::parse(op), n.parse::<u64>()) {
                (Some(op), Ok(n)) if n > 0 => {
                    fs.with(|f, _| f.die_at(op, n));
                    say("ok");
                }
                _ => say(&format!("error: bad command '{line}'")),
            },
            ["budget", n, e] => match (n.parse::<u64>(), errno(e)) {
                (Ok(n), Some(e)) => {
                    fs.with(|f, _| f.set_budget(n, e));
                    say("ok");
                }
                _ => say(&format!("error: bad command '{line}'")),
            },
            _ => say(&format!("error: unknown command '{line}'")),
        }
    }
    // `quit` or the parent is gone: unmount (lazily, in case someone still uses it).
    fs.cut();
    drop(bg);
    unmount_lazily(mnt);
    0
}

fn errno(name: &str) -> Option<i32> {
    match name {
        "EIO" => Some(libc::EIO),
        "ENOSPC" => Some(libc::ENOSPC),
        _ => None,
    }
}

/// The session owns its filesystem; the command loop shares it.
struct Shared(std::sync::Arc<fs::FaultFs>);

macro_rules! forward {
    ($($name:ident($($arg:ident: $ty:ty),*);)*) => {
        $(fn $name(&self, $($arg: $ty),*) { self.0.$name($($arg),*) })*
    };
}

impl fuser::Filesystem for Shared {
    forward! {
        lookup(req: &fuser::Request, parent: fuser::INodeNo, name: &std::ffi::OsStr, reply: fuser::ReplyEntry);
        getattr(req: &fuser::Request, ino: fuser::INodeNo, fh: Option<fuser::FileHandle>, reply: fuser::ReplyAttr);
        readlink(req: &fuser::Request, ino: fuser::INodeNo, reply: fuser::ReplyData);
        mknod(req: &fuser::Request, parent: fuser::INodeNo, name: &std::ffi::OsStr, mode: u32, umask: u32, rdev: u32, reply: fuser::ReplyEntry);
        mkdir(req: &fuser::Request, parent: fuser::INodeNo, name: &std::ffi::OsStr, mode: u32, umask: u32, reply: fuser::ReplyEntry);
        unlink(req: &fuser::Request, parent: fuser::INodeNo, name: &std::ffi::OsStr, reply: fuser::ReplyEmpty);
        rmdir(req: &fuser::Request, parent: fuser::INodeNo, name: &std::ffi::OsStr, reply: fuser::ReplyEmpty);
        symlink(req: &fuser::Request, parent: fuser::INodeNo, link_name: &std::ffi::OsStr, target: &Path, reply: fuser::ReplyEntry);
        rename(req: &fuser::Request, parent: fuser::INodeNo, name: &std::ffi::OsStr, newparent: fuser::INodeNo, newname: &std::ffi::OsStr, flags: fuser::RenameFlags, reply: fuser::ReplyEmpty);
        open(req: &fuser::Request, ino: fuser::INodeNo, flags: fuser::OpenFlags, reply: fuser::ReplyOpen);
        create(req: &fuser::Request, parent: fuser::INodeNo, name: &std::ffi::OsStr, mode: u32, umask: u32, flags: i32, reply: fuser::ReplyCreate);
        read(req: &fuser::Request, ino: fuser::INodeNo, fh: fuser::FileHandle, offset: u64, size: u32, flags: fuser::OpenFlags, lock_owner: Option<fuser::LockOwner>, reply: fuser::ReplyData);
        write(req: &fuser::Request, ino: fuser::INodeNo, fh: fuser::FileHandle, offset: u64, data: &[u8], write_flags: fuser::WriteFlags, flags: fuser::OpenFlags, lock_owner: Option<fuser::LockOwner>, reply: fuser::ReplyWrite);
        flush(req: &fuser::Request, ino: fuser::INodeNo, fh: fuser::FileHandle, lock_owner: fuser::LockOwner, reply: fuser::ReplyEmpty);
        release(req: &fuser::Request, ino: fuser::INodeNo, fh: fuser::FileHandle, flags: fuser::OpenFlags, lock_owner: Option<fuser::LockOwner>, flush: bool, reply: fuser::ReplyEmpty);
        fsync(req: &fuser::Request, ino: fuser::INodeNo, fh: fuser::FileHandle, datasync: bool, reply: fuser::ReplyEmpty);
        opendir(req: &fuser::Request, ino: fuser::INodeNo, flags: fuser::OpenFlags, reply: fuser::ReplyOpen);
        readdir(req: &fuser::Request, ino: fuser::INodeNo, fh: fuser::FileHandle, offset: u64, reply: fuser::ReplyDirectory);
        fsyncdir(req: &fuser::Request, ino: fuser::INodeNo, fh: fuser::FileHandle, datasync: bool, reply: fuser::ReplyEmpty);
        statfs(req: &fuser::Request, ino: fuser::INodeNo, reply: fuser::ReplyStatfs);
        access(req: &fuser::Request, ino: fuser::INodeNo, mask: fuser::AccessFlags, reply: fuser::ReplyEmpty);
        fallocate(req: &fuser::Request, ino: fuser::INodeNo, fh: fuser::FileHandle, offset: u64, length: u64, mode: i32, reply: fuser::ReplyEmpty);
    }

    #[allow(clippy::too_many_arguments)]
    fn setattr(
        &self,
        req: &fuser::Request,
        ino: fuser::INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<fuser::TimeOrNow>,
        mtime: Option<fuser::TimeOrNow>,
        ctime: Option<std::time::SystemTime>,
        fh: Option<fuser::FileHandle>,
        crtime: Option<std::time::SystemTime>,
        chgtime: Option<std::time::SystemTime>,
        bkuptime: Option<std::time::SystemTime>,
        flags: Option<fuser::BsdFileFlags>,
        reply: fuser::ReplyAttr,
    ) {
        self.0.setattr(
            req, ino, mode, uid, gid, size, atime, mtime, ctime, fh, crtime, chgtime, bkuptime,
            flags, reply,
        )
    }
}
