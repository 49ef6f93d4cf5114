//! Which data directory `admin` and `submit` work on, and as whom (SPEC "Binary and
//! commands"): where no flag, environment, file or installed unit named one (`config`),
//! `./coverd-data`, else the service's `/var/lib/coverd`;
//! run as root on a directory owned by another user, the process becomes that user before
//! it touches anything, so it never leaves a file the service cannot read or write. Owns
//! the lookup, the change of identity and the permission messages; must not open the store.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use super::AdminError;
use crate::config::Config;

/// The systemd unit's state directory (`StateDirectory=coverd`).
pub const SERVICE_DATA_DIR: &str = "/var/lib/coverd";
/// Where `serve` keeps its data when nothing names a directory.
pub const LOCAL_DATA_DIR: &str = "./coverd-data";

/// Names the operator knows for paths this process reaches another way
/// (`/proc/self/fd/N/…`); see [`act_as_owner`].
static SHOWN: OnceLock<Vec<(PathBuf, PathBuf)>> = OnceLock::new();

/// How to name `path` in messages: the path the operator gave or the lookup found.
pub fn shown(path: &Path) -> PathBuf {
    for (alias, original) in SHOWN.get().into_iter().flatten() {
        if let Ok(rest) = path.strip_prefix(alias) {
            return if rest.as_os_str().is_empty() {
                original.clone()
            } else {
                original.join(rest)
            };
        }
    }
    path.to_path_buf()
}

/// Applies SPEC's lookup for `admin` and `submit` when no flag, environment variable or
/// file named a data directory: `./coverd-data` if it exists, else `/var/lib/coverd` if it
/// exists, else `./coverd-data` (then reported as missing). `serve` keeps the default.
pub fn locate(config: &mut Config) {
    if config.data_dir_named {
        return;
    }
    let exists = |p: &str| {
        // A directory we may not look into still exists: report that, not "missing".
        !matches!(std::fs::symlink_metadata(p), Err(e) if e.kind() == std::io::ErrorKind::NotFound)
    };
    config.data_dir = if exists(LOCAL_DATA_DIR) || !exists(SERVICE_DATA_DIR) {
        PathBuf::from(LOCAL_DATA_DIR)
    } else {
        PathBuf::from(SERVICE_DATA_DIR)
    };
}

/// An error's message naming the data directory `dir` (SPEC: every error names it), unless
/// it already does.
pub fn naming_data_dir(error: &AdminError, dir: &Path) -> String {
    let shown = shown(dir);
    let message = error.to_string();
    if message.contains(&*shown.to_string_lossy()) {
        message
    } else {
        format!("{message} (data directory {})", shown.display())
    }
}

/// "cannot read DIR: permission denied; run as root or as the service's user".
pub fn permission_denied(what: &Path) -> AdminError {
    AdminError::failed(format!(
        "cannot read {}: permission denied; run as root or as the service's user",
        shown(what).display()
    ))
}

/// Whose a directory is: the numeric ids (a systemd dynamic user may have no passwd entry).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

/// Run as root on an existing data directory owned by another user: becomes that user
/// (supplementary groups, gid, uid; for good) and returns the directory to work on. That is
/// `dir` itself (made absolute) when the user can reach it by its path, else
/// `/proc/self/fd/N`, the directory opened while still root: the path may cross a directory
/// only root may enter (systemd's `/var/lib/private`, 0700 root, under `DynamicUser=`). The
/// working directory is changed to `dir` too. `others` (absolute paths a command names, e.g. a backup's destination,
/// which may sit in such a directory too) are opened as root before the change, and those
/// the user cannot reach by path are rewritten to `/proc/self/fd/N/…`. Returns `None`
/// (nothing changed) when not root, when `dir` does not exist, or when root owns it. Must
/// run before any other thread exists.
pub fn act_as_owner(
    dir: &Path,
    others: &mut [&mut PathBuf],
) -> Result<Option<(PathBuf, Owner)>, AdminError> {
    use nix::unistd::{Gid, Uid, chdir, geteuid, setgid, setgroups, setuid};
    if !geteuid().is_root() {
        return Ok(None);
    }
    let meta = match std::fs::metadata(dir) {
        Ok(m) => m,
        Err(_) => return Ok(None),
    };
    if meta.uid() == 0 || !meta.is_dir() {
        return Ok(None);
    }
    let owner = Owner {
        uid: meta.uid(),
        gid: meta.gid(),
    };
    let absolute = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
    let fail = |what: &str, e: nix::Error| {
        AdminError::failed(format!(
            "cannot act as the owner of {} (uid {}, gid {}): {what} failed: {e}; run as that user instead",
            dir.display(),
            owner.uid,
            owner.gid
        ))
    };
    // The nearest existing directory of each other path, held open (never closed: the
    // process is short-lived and the path must stay usable to its end).
    let held: Vec<Option<(std::fs::File, PathBuf, PathBuf)>> = others
        .iter()
        .map(|p| {
            let mut base = p.as_path();
            loop {
                if let Ok(f) = std::fs::File::open(base)
                    && base.is_dir()
                {
                    let rest = p.strip_prefix(base).unwrap_or(Path::new("")).to_path_buf();
                    return Some((f, base.to_path_buf(), rest));
                }
                base = base.parent()?;
            }
        })
        .collect();
    let dir_file = std::fs::File::open(&absolute)
        .map_err(|e| AdminError::failed(format!("cannot open {}: {e}", dir.display())))?;
    chdir(&absolute).map_err(|e| fail("chdir", e))?;
    let gid = Gid::from_raw(owner.gid);
    setgroups(&[gid]).map_err(|e| fail("setgroups", e))?;
    setgid(gid).map_err(|e| fail("setgid", e))?;
    setuid(Uid::from_raw(owner.uid)).map_err(|e| fail("setuid", e))?;
    // This process holds what root read (configuration, secrets): no process of the owner's
    // may read its memory or ptrace it. The kernel already makes it undumpable at the uid
    // change unless `fs.suid_dumpable` says otherwise; say it explicitly. It still reaches
    // `/proc/self/fd/N` below: the kernel lets a process into its own fd directory and
    // links whatever its dumpable flag (`proc_fd_permission`, `ptrace_may_access` of its
    // own thread group), for every thread, so sled opening files lazily keeps working.
    nix::sys::prctl::set_dumpable(false).map_err(|e| fail("prctl(PR_SET_DUMPABLE)", e))?;
    let mut names = Vec::new();
    for (path, held) in others.iter_mut().zip(held) {
        let Some((file, base, rest)) = held else {
            continue;
        };
        if std::fs::read_dir(&base).is_ok() {
            continue;
        }
        let alias = PathBuf::from(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&file)
        ));
        std::mem::forget(file);
        names.push((alias.clone(), base));
        **path = alias.join(rest);
    }
    // The data directory itself: by its path if the owner can reach it, else through the
    // directory opened as root. (Not `.`: sled makes paths absolute with the working
    // directory's path, which crosses the closed directory again.)
    let work_dir = if std::fs::read_dir(&absolute).is_ok() {
        absolute
    } else {
        let alias = PathBuf::from(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&dir_file)
        ));
        std::mem::forget(dir_file);
        names.push((alias.clone(), dir.to_path_buf()));
        alias
    };
    let _ = SHOWN.set(names);
    Ok(Some((work_dir, owner)))
}

/// Fails with a permission message when this user cannot look into `dir`; a missing
/// directory is fine here (commands that need data say so themselves).
pub fn check_readable(dir: &Path) -> Result<(), AdminError> {
    match std::fs::read_dir(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => Err(permission_denied(dir)),
        _ => Ok(()),
    }
}
