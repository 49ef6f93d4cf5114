//! The data directory and the admin socket at start: the process's private umask, the
//! data directory created 0700 (and removed again when the start fails before its workers
//! run) or tightened to 0700 when it is open to others, `storage.local_group`'s access
//! brought to the setting (with a hint when chown(2) is refused), and `admin.sock` bound
//! 0600 through a private staging directory. Owns those steps and their messages; must not
//! open the store or decide the start order (`daemon` does).

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::error::DaemonError;
use crate::config::Config;
use crate::download;
use crate::sharing::FileAccess;

/// A private directory inside the data directory where the admin socket is bound and made
/// 0600 before it is renamed into place (so the path `admin.sock` is never reachable with
/// looser modes). As short as `admin.sock` so as not to hit the socket path length limit.
const SOCKET_STAGING: &str = ".admin.d";

/// Sets the process's file-creation mask to 0077, so that everything coverd creates in the
/// data directory is private (0700 / 0600) from the moment it exists, whatever the umask
/// it was started with (systemd's `UMask=0077` is not there when run by hand). A mask
/// rather than modes at each call site because sled creates its own files (db, conf,
/// blobs, snapshots) with default modes we cannot pass. The mask is process-wide: this is
/// called once at the start of every command (`main`) and again by
/// [`start`](super::start) for callers that embed the daemon; the daemon itself never wants
/// anything else.
pub fn private_umask() {
    use rustix::fs::Mode;
    rustix::process::umask(Mode::from_raw_mode(0o077));
}

/// The outermost directory a start is about to create for the data directory, removed
/// again (with what the start put there) when the start fails before [`CreatedDir::keep`].
pub(super) struct CreatedDir(Option<PathBuf>);

impl CreatedDir {
    pub(super) fn before_creating(dir: &Path) -> CreatedDir {
        let missing = |p: &Path| matches!(std::fs::symlink_metadata(p), Err(e) if e.kind() == std::io::ErrorKind::NotFound);
        let mut outermost = None;
        let mut here = Some(dir);
        while let Some(p) = here.filter(|p| !p.as_os_str().is_empty() && missing(p)) {
            outermost = Some(p.to_path_buf());
            here = p.parent();
        }
        CreatedDir(outermost)
    }

    pub(super) fn keep(mut self) {
        self.0 = None;
    }
}

impl Drop for CreatedDir {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => tracing::info!(
                    "removed {} again: it was created by this start, which failed",
                    dir.display()
                ),
                Err(e) => tracing::warn!(
                    "cannot remove {}, created by this failed start: {e}",
                    dir.display()
                ),
            }
        }
    }
}

/// Makes an existing data directory open to others beyond what `access` allows (0710 with
/// `storage.local_group`) 0700, with a warning. (`dirsync::create_private_dir` creates it
/// 0700; this is the data directory's own check, which `download`'s directories, whose modes
/// `sharing` owns, must not get.)
pub(super) fn tighten_data_dir(dir: &Path, access: FileAccess) -> std::io::Result<()> {
    let mode = std::fs::metadata(dir)?.permissions().mode() & 0o777;
    if mode & !access.data_dir_mode() & 0o077 != 0 {
        match std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)) {
            Ok(()) => tracing::warn!(
                "data directory {} was open to other users (mode {mode:o}); made it 0700",
                dir.display()
            ),
            Err(e) => tracing::warn!(
                "data directory {} is open to other users (mode {mode:o}) and cannot be made 0700: {e}; run `chmod 700 {}`",
                dir.display(),
                dir.display()
            ),
        }
    }
    Ok(())
}

/// Binds the admin socket at `path` with mode 0600 from the moment it exists at that path:
/// bound inside a fresh 0700 staging directory, chmod-ed, then renamed into place.
pub(super) fn bind_admin_socket(
    data_dir: &Path,
    path: &Path,
) -> Result<tokio::net::UnixListener, DaemonError> {
    let staging = data_dir.join(SOCKET_STAGING);
    let setup = |e: std::io::Error| DaemonError::Setup {
        what: "the admin socket",
        reason: format!("{}: {e}", staging.display()),
    };
    // We hold the store's lock, so leftovers here belong to a dead daemon.
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&staging)
        .map_err(setup)?;
    let staged = staging.join("s");
    let listener =
        tokio::net::UnixListener::bind(&staged).map_err(|source| DaemonError::Listen {
            addr: path.display().to_string(),
            source,
        })?;
    std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600)).map_err(setup)?;
    std::fs::rename(&staged, path).map_err(setup)?;
    let _ = std::fs::remove_dir(&staging);
    Ok(listener)
}

/// Gives `images/`, `files/` and the data directory the access `storage.local_group` asks for; when
/// that is refused, says whether the daemon's user is missing from the group or a system
/// call filter refuses chown(2) ([`DaemonError::Sharing`]).
pub(super) fn share_stored_files(
    config: &Config,
    data_dir: &Path,
    access: FileAccess,
) -> Result<(), DaemonError> {
    let reconciled = download::STORED_DIRS.iter().try_fold(0, |n, dir| {
        access
            .reconcile(data_dir, &data_dir.join(dir))
            .map(|changed| n + changed)
    });
    match reconciled {
        Ok(0) => {}
        Ok(changed) => tracing::info!(
            changed,
            "gave images/, files/ and the data directory the access `storage.local_group` asks for"
        ),
        Err(source) => {
            let (group, gid) = config.storage.local_group.as_ref().map_or_else(
                || ("(none)".to_string(), None),
                |g| (g.name.clone(), Some(g.gid)),
            );
            let member = gid.is_some_and(|gid| {
                let gid = nix::unistd::Gid::from_raw(gid);
                nix::unistd::getegid() == gid
                    || nix::unistd::getgroups().is_ok_and(|groups| groups.contains(&gid))
            });
            let hint = if member {
                // In the group, yet refused: a seccomp filter (the shipped unit's
                // `~@privileged` takes the chown family with it) answers EPERM.
                format!(
                    "the daemon is in the group, so a system call filter refuses chown(2): add SystemCallFilter=@chown beside SupplementaryGroups={group} in the unit's drop-in"
                )
            } else {
                format!(
                    "the daemon's user must be a member of that group (in the unit: SupplementaryGroups={group} and SystemCallFilter=@chown)"
                )
            };
            return Err(DaemonError::Sharing {
                group,
                data_dir: data_dir.to_path_buf(),
                source,
                hint,
            });
        }
    }
    Ok(())
}
