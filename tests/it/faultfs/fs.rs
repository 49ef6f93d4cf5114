//! The fault filesystem itself, run by the child process of `faultfs`: a FUSE passthrough
//! over `<backing>/live` that keeps, beside it in `<backing>/durable`, only what a careful disk
//! without battery would keep after a power cut. Owns the durability rules, the fault
//! counters and the rebuild of `live` from `durable` at power-on; must not know any test,
//! coverd or sled.
//!
//! The rules: a file's data and size become durable only when that file is `fsync`ed or
//! `fdatasync`ed (its bytes are copied into `durable/data/<id>`); the entries of a directory
//! (creations, unlinks, renames, mkdir, rmdir, sockets, symlinks) only when that directory is
//! `fsync`ed (its listing is copied into `durable/tree.json`). A rename is one unit: when
//! either of its directories is synced, both of its sides become durable together. Nothing
//! else — `sync_file_range`, close, flock, time — makes anything durable. Hard links are
//! refused (nothing here needs them).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::OsStr;
use std::fs::File;
use std::io::Write as _;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner,
    OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};
use serde::{Deserialize, Serialize};

/// How long the kernel may cache names and attributes. Nothing but this process changes
/// `live` while it is mounted, and a power cut remounts.
const TTL: Duration = Duration::from_secs(1);
/// Dirty ranges kept per file before they are merged into one span.
const MAX_RANGES: usize = 256;
/// Deepest directory tree rebuilt at power-on.
const MAX_DEPTH: usize = 64;
/// Id of the root directory (FUSE inode 1).
const ROOT: u64 = 0;

/// What kind of operation a fault is aimed at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultOp {
    /// Every `fsync`/`fdatasync` of a file or directory.
    Fsync,
    /// `fdatasync` only.
    Fdatasync,
    Write,
    Rename,
}

impl FaultOp {
    pub fn parse(s: &str) -> Option<FaultOp> {
        Some(match s {
            "fsync" => FaultOp::Fsync,
            "fdatasync" => FaultOp::Fdatasync,
            "write" => FaultOp::Write,
            "rename" => FaultOp::Rename,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            FaultOp::Fsync => "fsync",
            FaultOp::Fdatasync => "fdatasync",
            FaultOp::Write => "write",
            FaultOp::Rename => "rename",
        }
    }
}

/// The injected failures: the Nth operation of a kind, or every write past a byte budget.
#[derive(Default)]
pub struct Faults {
    /// (kind, operations of that kind still to let through before failing one, errno).
    nth: Vec<(FaultOp, u64, i32)>,
    /// Bytes writes may still add, and the errno past them.
    budget: Option<(u64, i32)>,
    /// (kind, operations of that kind still to let through): the power goes off when the
    /// next one comes, before it does anything (a cut at an exact point of a program).
    die: Option<(FaultOp, u64)>,
}

impl Faults {
    pub fn fail_nth(&mut self, op: FaultOp, n: u64, errno: i32) {
        self.nth.push((op, n.saturating_sub(1), errno));
    }

    /// The power goes off at the `n`th (1 = the next) operation of kind `op`.
    pub fn die_at(&mut self, op: FaultOp, n: u64) {
        self.die = Some((op, n.saturating_sub(1)));
    }

    /// Whether the power must go off now, at an operation of these kinds.
    fn dies(&mut self, ops: &[FaultOp]) -> bool {
        match &mut self.die {
            Some((op, left)) if ops.contains(op) => {
                if *left == 0 {
                    self.die = None;
                    true
                } else {
                    *left -= 1;
                    false
                }
            }
            _ => false,
        }
    }

    pub fn set_budget(&mut self, bytes: u64, errno: i32) {
        self.budget = Some((bytes, errno));
    }

    pub fn clear(&mut self) {
        *self = Faults::default();
    }

    /// Counts one operation of these kinds; the errno if one of them must fail.
    fn check(&mut self, ops: &[FaultOp]) -> Option<i32> {
        let mut fail = None;
        self.nth.retain_mut(|(op, left, errno)| {
            if !ops.contains(op) {
                return true;
            }
            if *left == 0 {
                fail.get_or_insert(*errno);
                false
            } else {
                *left -= 1;
                true
            }
        });
        fail
    }

    fn spend(&mut self, bytes: u64) -> Option<i32> {
        match &mut self.budget {
            Some((left, errno)) if *left < bytes => Some(*errno),
            Some((left, _)) => {
                *left -= bytes;
                None
            }
            None => None,
        }
    }
}

/// Counts, for the tests' evidence.
#[derive(Default, Debug, Clone, Copy)]
pub struct Counts {
    pub fsyncs: u64,
    pub dir_fsyncs: u64,
    pub writes: u64,
    pub renames: u64,
    pub failed: u64,
    /// The power went off at a `die_at` point.
    pub died: bool,
}

#[derive(Serialize, Deserialize, Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    File,
    Dir,
    Socket,
    Fifo,
    Symlink,
}

/// A durable directory entry.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
struct Entry {
    id: u64,
    kind: Kind,
    mode: u32,
    /// A symlink's target.
    target: Option<String>,
}

/// What survives a power cut, besides the files in `durable/data/`.
#[derive(Serialize, Deserialize, Default)]
struct Tree {
    dirs: BTreeMap<u64, BTreeMap<String, Entry>>,
}

/// Where a live node is.
struct Node {
    parent: u64,
    name: String,
}

/// A rename not yet durable: when either directory is synced, both sides are.
struct PendingRename {
    from: (u64, String),
    to: (u64, String),
    entry: Entry,
}

struct Handle {
    file: File,
    id: u64,
}

struct State {
    live: PathBuf,
    durable: PathBuf,
    nodes: HashMap<u64, Node>,
    by_ino: HashMap<u64, u64>,
    next_id: u64,
    handles: HashMap<u64, Handle>,
    next_fh: u64,
    /// Byte ranges written since the file's last sync, per id (end exclusive).
    dirty: HashMap<u64, Vec<(u64, u64)>>,
    tree: Tree,
    renames: Vec<PendingRename>,
    faults: Faults,
    counts: Counts,
    /// Set by a power cut: nothing more is served.
    dead: bool,
}

pub struct FaultFs {
    state: Mutex<State>,
}

type R<T> = Result<T, Errno>;

/// `COVERD_FAULTFS_TRACE=1`: every change and sync on stderr (debugging a failed run).
fn trace(what: std::fmt::Arguments) {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if *ON.get_or_init(|| std::env::var_os("COVERD_FAULTFS_TRACE").is_some()) {
        eprintln!("faultfs: {what}");
    }
}

fn errno(e: std::io::Error) -> Errno {
    Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO))
}

fn name_of(name: &OsStr) -> R<String> {
    name.to_str()
        .map(str::to_string)
        .ok_or(Errno::from_i32(libc::EINVAL))
}

fn kind_of(m: &std::fs::Metadata) -> Kind {
    let t = m.file_type();
    use std::os::unix::fs::FileTypeExt;
    if t.is_dir() {
        Kind::Dir
    } else if t.is_symlink() {
        Kind::Symlink
    } else if t.is_socket() {
        Kind::Socket
    } else if t.is_fifo() {
        Kind::Fifo
    } else {
        Kind::File
    }
}

fn file_type(k: Kind) -> FileType {
    match k {
        Kind::File => FileType::RegularFile,
        Kind::Dir => FileType::Directory,
        Kind::Socket => FileType::Socket,
        Kind::Fifo => FileType::NamedPipe,
        Kind::Symlink => FileType::Symlink,
    }
}

fn attr_of(id: u64, m: &std::fs::Metadata) -> FileAttr {
    let t = |s: i64, ns: i64| {
        if s >= 0 {
            UNIX_EPOCH + Duration::new(s as u64, ns as u32)
        } else {
            UNIX_EPOCH
        }
    };
    FileAttr {
        ino: INodeNo(id + 1),
        size: m.len(),
        blocks: m.blocks(),
        atime: t(m.atime(), m.atime_nsec()),
        mtime: t(m.mtime(), m.mtime_nsec()),
        ctime: t(m.ctime(), m.ctime_nsec()),
        crtime: UNIX_EPOCH,
        kind: file_type(kind_of(m)),
        perm: (m.mode() & 0o7777) as u16,
        nlink: m.nlink() as u32,
        uid: m.uid(),
        gid: m.gid(),
        rdev: m.rdev() as u32,
        blksize: m.blksize() as u32,
        flags: 0,
    }
}

fn id_of(ino: INodeNo) -> u64 {
    ino.0.saturating_sub(1)
}

/// Adds `[start, end)` to a file's dirty ranges, merging them past [`MAX_RANGES`].
fn mark(ranges: &mut Vec<(u64, u64)>, start: u64, end: u64) {
    if end <= start {
        return;
    }
    ranges.push((start, end));
    if ranges.len() > MAX_RANGES {
        let lo = ranges.iter().map(|r| r.0).min().unwrap_or(0);
        let hi = ranges.iter().map(|r| r.1).max().unwrap_or(0);
        ranges.clear();
        ranges.push((lo, hi));
    }
}

impl State {
    fn path(&self, id: u64) -> R<PathBuf> {
        let mut parts = Vec::new();
        let mut at = id;
        while at != ROOT {
            let node = self.nodes.get(&at).ok_or(Errno::ENOENT)?;
            parts.push(node.name.as_str());
            at = node.parent;
            if parts.len() > 4096 {
                return Err(Errno::ELOOP);
            }
        }
        let mut p = self.live.clone();
        for part in parts.iter().rev() {
            p.push(part);
        }
        Ok(p)
    }

    fn child(&self, parent: u64, name: &str) -> R<PathBuf> {
        Ok(self.path(parent)?.join(name))
    }

    /// The id of the live file at `parent/name` (given its metadata), known or new.
    fn adopt(&mut self, parent: u64, name: &str, m: &std::fs::Metadata) -> u64 {
        let id = match self.by_ino.get(&m.ino()) {
            Some(id) => *id,
            None => {
                let id = self.next_id;
                self.next_id += 1;
                self.by_ino.insert(m.ino(), id);
                id
            }
        };
        self.nodes.insert(
            id,
            Node {
                parent,
                name: name.to_string(),
            },
        );
        id
    }

    /// Forgets the live node at `path` (it is being unlinked or replaced).
    fn forget_path(&mut self, path: &Path) {
        if let Ok(m) = std::fs::symlink_metadata(path) {
            if let Some(id) = self.by_ino.remove(&m.ino()) {
                self.nodes.remove(&id);
                self.dirty.remove(&id);
            }
        }
    }

    fn entry_of(&self, id: u64, path: &Path, m: &std::fs::Metadata) -> Entry {
        let kind = kind_of(m);
        Entry {
            id,
            kind,
            mode: m.mode() & 0o7777,
            target: if kind == Kind::Symlink {
                std::fs::read_link(path)
                    .ok()
                    .map(|t| t.to_string_lossy().into_owned())
            } else {
                None
            },
        }
    }

    fn lookup(&mut self, parent: u64, name: &str) -> R<FileAttr> {
        let path = self.child(parent, name)?;
        let m = std::fs::symlink_metadata(&path).map_err(errno)?;
        let id = self.adopt(parent, name, &m);
        Ok(attr_of(id, &m))
    }

    fn stat(&self, id: u64, fh: Option<FileHandle>) -> R<FileAttr> {
        if let Some(h) = fh.and_then(|fh| self.handles.get(&fh.0)) {
            let m = h.file.metadata().map_err(errno)?;
            return Ok(attr_of(id, &m));
        }
        let m = std::fs::symlink_metadata(self.path(id)?).map_err(errno)?;
        Ok(attr_of(id, &m))
    }

    /// Makes a file's data and size durable: copies its dirty ranges into `durable/data`.
    fn sync_file(&mut self, id: u64, fh: Option<FileHandle>) -> R<()> {
        let opened;
        let live = match fh.and_then(|fh| self.handles.get(&fh.0)) {
            Some(h) => &h.file,
            None => {
                opened = File::open(self.path(id)?).map_err(errno)?;
                &opened
            }
        };
        let len = live.metadata().map_err(errno)?.len();
        let target = self.durable.join("data").join(id.to_string());
        let out = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&target)
            .map_err(errno)?;
        let ranges = self.dirty.remove(&id).unwrap_or_default();
        let mut buf = vec![0u8; 1 << 16];
        for (start, end) in ranges {
            let end = end.min(len);
            let mut at = start;
            while at < end {
                let n = ((end - at) as usize).min(buf.len());
                let got = live.read_at(&mut buf[..n], at).map_err(errno)?;
                if got == 0 {
                    break;
                }
                out.write_all_at(&buf[..got], at).map_err(errno)?;
                at += got as u64;
            }
        }
        out.set_len(len).map_err(errno)?;
        Ok(())
    }

    /// Makes a directory's entries durable, and both sides of every pending rename that
    /// touches it.
    fn sync_dir(&mut self, id: u64) -> R<()> {
        let path = self.path(id)?;
        let mut listing = BTreeMap::new();
        for e in std::fs::read_dir(&path).map_err(errno)? {
            let e = e.map_err(errno)?;
            let Some(name) = e.file_name().to_str().map(str::to_string) else {
                continue;
            };
            let p = path.join(&name);
            let Ok(m) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            let child = self.adopt(id, &name, &m);
            listing.insert(name, self.entry_of(child, &p, &m));
        }
        trace(format_args!(
            "fsyncdir {} ({id}): {:?}",
            path.display(),
            listing.iter().map(|(n, e)| (n, e.id)).collect::<Vec<_>>()
        ));
        self.tree.dirs.insert(id, listing);
        let mut keep = Vec::new();
        for r in std::mem::take(&mut self.renames) {
            if r.from.0 != id && r.to.0 != id {
                keep.push(r);
                continue;
            }
            if r.from.0 != id {
                let dir = self.tree.dirs.entry(r.from.0).or_default();
                if dir.get(&r.from.1).map(|e| e.id) == Some(r.entry.id) {
                    dir.remove(&r.from.1);
                }
            }
            if r.to.0 != id {
                self.tree
                    .dirs
                    .entry(r.to.0)
                    .or_default()
                    .insert(r.to.1.clone(), r.entry.clone());
            }
        }
        self.renames = keep;
        self.save_tree()
    }

    fn save_tree(&self) -> R<()> {
        let tmp = self.durable.join("tree.json.tmp");
        let bytes = serde_json::to_vec(&self.tree).map_err(|_| Errno::EIO)?;
        let mut f = File::create(&tmp).map_err(errno)?;
        f.write_all(&bytes).map_err(errno)?;
        drop(f);
        std::fs::rename(&tmp, self.durable.join("tree.json")).map_err(errno)
    }

    fn fault(&mut self, ops: &[FaultOp]) -> R<()> {
        if self.faults.dies(ops) {
            // The cut itself: nothing from now on is served or becomes durable.
            self.dead = true;
            self.counts.died = true;
            return Err(Errno::EIO);
        }
        match self.faults.check(ops) {
            Some(e) => {
                self.counts.failed += 1;
                Err(Errno::from_i32(e))
            }
            None => Ok(()),
        }
    }
}

impl FaultFs {
    /// Powers on: rebuilds `<backing>/live` from what `<backing>/durable` holds (an empty
    /// filesystem the first time) and serves it.
    pub fn power_on(backing: &Path) -> std::io::Result<FaultFs> {
        let live = backing.join("live");
        let durable = backing.join("durable");
        std::fs::create_dir_all(durable.join("data"))?;
        let tree: Tree = match std::fs::read(durable.join("tree.json")) {
            Ok(b) => serde_json::from_slice(&b).map_err(std::io::Error::other)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Tree::default(),
            Err(e) => return Err(e),
        };
        if live.exists() {
            std::fs::remove_dir_all(&live)?;
        }
        std::fs::create_dir(&live)?;
        std::fs::set_permissions(&live, std::fs::Permissions::from_mode(0o755))?;
        let mut state = State {
            live: live.clone(),
            durable: durable.clone(),
            nodes: HashMap::new(),
            by_ino: HashMap::new(),
            next_id: 1,
            handles: HashMap::new(),
            next_fh: 1,
            dirty: HashMap::new(),
            tree,
            renames: Vec::new(),
            faults: Faults::default(),
            counts: Counts::default(),
            dead: false,
        };
        state.by_ino.insert(std::fs::metadata(&live)?.ino(), ROOT);
        let mut reachable = HashSet::from([ROOT]);
        rebuild(&mut state, ROOT, &live, 0, &mut reachable)?;
        // Durable data of files no durable entry names is garbage: a new file reusing the id
        // must not start from it.
        let mut max = reachable.iter().copied().max().unwrap_or(0);
        for e in std::fs::read_dir(durable.join("data"))? {
            let e = e?;
            let id = e.file_name().to_str().and_then(|s| s.parse::<u64>().ok());
            match id {
                Some(id) if reachable.contains(&id) => max = max.max(id),
                _ => std::fs::remove_file(e.path())?,
            }
        }
        state.tree.dirs.retain(|id, _| reachable.contains(id));
        state.next_id = max + 1;
        Ok(FaultFs {
            state: Mutex::new(state),
        })
    }

    pub fn with<T>(&self, f: impl FnOnce(&mut Faults, &mut Counts) -> T) -> T {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let s = &mut *s;
        f(&mut s.faults, &mut s.counts)
    }

    /// The power cut: from now on every request fails and nothing becomes durable.
    pub fn cut(&self) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).dead = true;
    }

    fn run<T>(&self, f: impl FnOnce(&mut State) -> R<T>) -> R<T> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.dead {
            return Err(Errno::EIO);
        }
        f(&mut s)
    }
}

/// Recreates directory `id` (at `path`, existing) from the durable tree.
fn rebuild(
    state: &mut State,
    id: u64,
    path: &Path,
    depth: usize,
    reachable: &mut HashSet<u64>,
) -> std::io::Result<()> {
    if depth > MAX_DEPTH {
        return Ok(());
    }
    let entries = state.tree.dirs.get(&id).cloned().unwrap_or_default();
    for (name, e) in entries {
        if !reachable.insert(e.id) && e.kind == Kind::Dir {
            // A directory reachable twice would make a cycle.
            continue;
        }
        let p = path.join(&name);
        match e.kind {
            Kind::Dir => std::fs::create_dir(&p)?,
            Kind::File => {
                let data = state.durable.join("data").join(e.id.to_string());
                if data.exists() {
                    std::fs::copy(&data, &p)?;
                } else {
                    File::create(&p)?;
                }
            }
            Kind::Socket | Kind::Fifo => {
                let ft = if e.kind == Kind::Socket {
                    rustix::fs::FileType::Socket
                } else {
                    rustix::fs::FileType::Fifo
                };
                rustix::fs::mknodat(
                    rustix::fs::CWD,
                    &p,
                    ft,
                    rustix::fs::Mode::from_raw_mode(e.mode),
                    0,
                )?;
            }
            Kind::Symlink => {
                std::os::unix::fs::symlink(e.target.as_deref().unwrap_or(""), &p)?;
            }
        }
        if e.kind != Kind::Symlink {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(e.mode))?;
        }
        let m = std::fs::symlink_metadata(&p)?;
        state.by_ino.insert(m.ino(), e.id);
        state.nodes.insert(
            e.id,
            Node {
                parent: id,
                name: name.clone(),
            },
        );
        if e.kind == Kind::Dir {
            rebuild(state, e.id, &p, depth + 1, reachable)?;
        }
    }
    Ok(())
}

impl Filesystem for FaultFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.run(|s| s.lookup(id_of(parent), &name_of(name)?)) {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.run(|s| s.stat(id_of(ino), fh)) {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<std::time::SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<std::time::SystemTime>,
        _chgtime: Option<std::time::SystemTime>,
        _bkuptime: Option<std::time::SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let r = self.run(|s| {
            let id = id_of(ino);
            let path = s.path(id);
            if let Some(mode) = mode {
                std::fs::set_permissions(path.clone()?, std::fs::Permissions::from_mode(mode))
                    .map_err(errno)?;
            }
            if let Some(size) = size {
                match fh.and_then(|fh| s.handles.get(&fh.0)) {
                    Some(h) => h.file.set_len(size).map_err(errno)?,
                    None => std::fs::OpenOptions::new()
                        .write(true)
                        .open(path?)
                        .and_then(|f| f.set_len(size))
                        .map_err(errno)?,
                }
                // Bytes past the new size read as zeros if the file grows again.
                mark(s.dirty.entry(id).or_default(), size, u64::MAX);
            }
            s.stat(id, fh)
        });
        match r {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.run(|s| std::fs::read_link(s.path(id_of(ino))?).map_err(errno)) {
            Ok(t) => reply.data(t.as_os_str().as_bytes()),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let r = self.run(|s| {
            let name = name_of(name)?;
            let p = s.child(id_of(parent), &name)?;
            let ft = rustix::fs::FileType::from_raw_mode(mode);
            rustix::fs::mknodat(
                rustix::fs::CWD,
                &p,
                ft,
                rustix::fs::Mode::from_raw_mode(mode & !umask & 0o7777),
                rdev.into(),
            )
            .map_err(|e| Errno::from_i32(e.raw_os_error()))?;
            s.lookup(id_of(parent), &name)
        });
        match r {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let r = self.run(|s| {
            let name = name_of(name)?;
            let p = s.child(id_of(parent), &name)?;
            std::fs::DirBuilder::new()
                .mode(mode & !umask & 0o7777)
                .create(&p)
                .map_err(errno)?;
            let a = s.lookup(id_of(parent), &name);
            trace(format_args!(
                "mkdir {} {:?}",
                p.display(),
                a.as_ref().map(|a| a.ino.0 - 1)
            ));
            a
        });
        match r {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = self.run(|s| {
            let p = s.child(id_of(parent), &name_of(name)?)?;
            let m = std::fs::symlink_metadata(&p).map_err(errno)?;
            std::fs::remove_file(&p).map_err(errno)?;
            if let Some(id) = s.by_ino.remove(&m.ino()) {
                s.nodes.remove(&id);
            }
            Ok(())
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = self.run(|s| {
            let p = s.child(id_of(parent), &name_of(name)?)?;
            let m = std::fs::symlink_metadata(&p).map_err(errno)?;
            std::fs::remove_dir(&p).map_err(errno)?;
            if let Some(id) = s.by_ino.remove(&m.ino()) {
                s.nodes.remove(&id);
            }
            Ok(())
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn symlink(
        &self,
        _req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let r = self.run(|s| {
            let name = name_of(link_name)?;
            std::os::unix::fs::symlink(target, s.child(id_of(parent), &name)?).map_err(errno)?;
            s.lookup(id_of(parent), &name)
        });
        match r {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let r = self.run(|s| {
            if flags.intersects(RenameFlags::RENAME_EXCHANGE | RenameFlags::RENAME_WHITEOUT) {
                return Err(Errno::EINVAL);
            }
            s.counts.renames += 1;
            s.fault(&[FaultOp::Rename])?;
            let (from_dir, to_dir) = (id_of(parent), id_of(newparent));
            let (name, newname) = (name_of(name)?, name_of(newname)?);
            let from = s.child(from_dir, &name)?;
            let to = s.child(to_dir, &newname)?;
            let m = std::fs::symlink_metadata(&from).map_err(errno)?;
            let noreplace = flags.contains(RenameFlags::RENAME_NOREPLACE);
            if noreplace && std::fs::symlink_metadata(&to).is_ok() {
                return Err(Errno::EEXIST);
            }
            let same = std::fs::symlink_metadata(&to).is_ok_and(|t| t.ino() == m.ino());
            if !same {
                s.forget_path(&to);
            }
            std::fs::rename(&from, &to).map_err(errno)?;
            let id = s.adopt(to_dir, &newname, &m);
            trace(format_args!(
                "rename {} -> {} ({id})",
                from.display(),
                to.display()
            ));
            let entry = s.entry_of(id, &to, &m);
            s.renames.push(PendingRename {
                from: (from_dir, name),
                to: (to_dir, newname),
                entry,
            });
            Ok(())
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let r = self.run(|s| {
            let id = id_of(ino);
            let raw = flags.0 & !(libc::O_CREAT | libc::O_EXCL | libc::O_NOCTTY);
            let acc = raw & libc::O_ACCMODE;
            let file = std::fs::OpenOptions::new()
                // Always readable: a sync copies the file's dirty bytes from this descriptor.
                .read(true)
                .write(acc == libc::O_WRONLY || acc == libc::O_RDWR)
                .custom_flags(raw & !libc::O_ACCMODE)
                .open(s.path(id)?)
                .map_err(errno)?;
            if raw & libc::O_TRUNC != 0 {
                mark(s.dirty.entry(id).or_default(), 0, u64::MAX);
            }
            let fh = s.next_fh;
            s.next_fh += 1;
            s.handles.insert(fh, Handle { file, id });
            Ok(fh)
        });
        match r {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let r = self.run(|s| {
            let name = name_of(name)?;
            let p = s.child(id_of(parent), &name)?;
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .mode(mode & !umask & 0o7777)
                .custom_flags(flags & !(libc::O_ACCMODE | libc::O_CREAT | libc::O_NOCTTY))
                .open(&p)
                .map_err(errno)?;
            let attr = s.lookup(id_of(parent), &name)?;
            let id = id_of(attr.ino);
            mark(s.dirty.entry(id).or_default(), 0, u64::MAX);
            let fh = s.next_fh;
            s.next_fh += 1;
            s.handles.insert(fh, Handle { file, id });
            Ok((attr, fh))
        });
        match r {
            Ok((a, fh)) => {
                reply.created(&TTL, &a, Generation(0), FileHandle(fh), FopenFlags::empty())
            }
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let r = self.run(|s| {
            let h = s.handles.get(&fh.0).ok_or(Errno::EBADF)?;
            let mut buf = vec![0u8; size as usize];
            let mut got = 0;
            while got < buf.len() {
                let n = h
                    .file
                    .read_at(&mut buf[got..], offset + got as u64)
                    .map_err(errno)?;
                if n == 0 {
                    break;
                }
                got += n;
            }
            buf.truncate(got);
            Ok(buf)
        });
        match r {
            Ok(b) => reply.data(&b),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let r = self.run(|s| {
            s.counts.writes += 1;
            s.fault(&[FaultOp::Write])?;
            if let Some(e) = s.faults.spend(data.len() as u64) {
                s.counts.failed += 1;
                return Err(Errno::from_i32(e));
            }
            let h = s.handles.get(&fh.0).ok_or(Errno::EBADF)?;
            let id = h.id;
            // O_APPEND writes land at the end whatever the offset says.
            let start = if h.file.metadata().is_ok() && is_append(&h.file) {
                h.file.metadata().map_err(errno)?.len()
            } else {
                offset
            };
            h.file.write_all_at(data, start).map_err(errno)?;
            mark(
                s.dirty.entry(id).or_default(),
                start,
                start + data.len() as u64,
            );
            Ok(data.len() as u32)
        });
        match r {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close(2): makes nothing durable.
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.handles.remove(&fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let r = self.run(|s| {
            s.counts.fsyncs += 1;
            if datasync {
                s.fault(&[FaultOp::Fsync, FaultOp::Fdatasync])?;
            } else {
                s.fault(&[FaultOp::Fsync])?;
            }
            s.sync_file(id_of(ino), Some(fh))
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply.opened(FileHandle(0), FopenFlags::empty());
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let r = self.run(|s| {
            let id = id_of(ino);
            let path = s.path(id)?;
            let mut names = Vec::new();
            for e in std::fs::read_dir(&path).map_err(errno)? {
                let e = e.map_err(errno)?;
                if let Some(n) = e.file_name().to_str() {
                    names.push(n.to_string());
                }
            }
            names.sort();
            let mut out = vec![
                (ino, FileType::Directory, ".".to_string()),
                (ino, FileType::Directory, "..".to_string()),
            ];
            for n in names {
                let Ok(m) = std::fs::symlink_metadata(path.join(&n)) else {
                    continue;
                };
                let child = s.adopt(id, &n, &m);
                out.push((INodeNo(child + 1), file_type(kind_of(&m)), n));
            }
            Ok(out)
        });
        match r {
            Ok(entries) => {
                for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset as usize)
                {
                    if reply.add(ino, i as u64 + 1, kind, name) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(e),
        }
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let r = self.run(|s| {
            s.counts.dir_fsyncs += 1;
            if datasync {
                s.fault(&[FaultOp::Fsync, FaultOp::Fdatasync])?;
            } else {
                s.fault(&[FaultOp::Fsync])?;
            }
            s.sync_dir(id_of(ino))
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let r = self
            .run(|s| rustix::fs::statvfs(&s.live).map_err(|e| Errno::from_i32(e.raw_os_error())));
        match r {
            Ok(v) => reply.statfs(
                v.f_blocks,
                v.f_bfree,
                v.f_bavail,
                v.f_files,
                v.f_ffree,
                v.f_bsize as u32,
                v.f_namemax as u32,
                v.f_frsize as u32,
            ),
            Err(e) => reply.error(e),
        }
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        reply.ok();
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let r = self.run(|s| {
            let h = s.handles.get(&fh.0).ok_or(Errno::EBADF)?;
            let id = h.id;
            rustix::fs::fallocate(
                &h.file,
                rustix::fs::FallocateFlags::from_bits_retain(mode as u32),
                offset,
                length,
            )
            .map_err(|e| Errno::from_i32(e.raw_os_error()))?;
            mark(s.dirty.entry(id).or_default(), offset, offset + length);
            Ok(())
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }
}

fn is_append(file: &File) -> bool {
    rustix::fs::fcntl_getfl(file).is_ok_and(|f| f.contains(rustix::fs::OFlags::APPEND))
}
