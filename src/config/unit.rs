//! The installed unit: `coverd.service` read from its files as systemd would load it (the
//! first unit file found on systemd's search path, then its `coverd.service.d/*.conf`
//! drop-ins), for what the CLI takes from it (SPEC "Binary and commands"): its
//! `Environment=` (systemd's quoting, C escapes and specifiers), its `WorkingDirectory=`, and
//! where its credentials are (`/run/credentials/coverd.service/` while it runs, else its
//! `LoadCredential=` paths, else the credential stores). The files are untrusted input:
//! sizes, lines, drop-ins and assignments are bounded, non-regular files are not opened
//! (a FIFO would block), unknown lines are skipped. Owns reading and parsing those files and
//! finding a credential; must not decide precedence (`config` does) or run `systemctl`.

use std::collections::BTreeMap;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use super::unit_syntax::{expand_specifiers, logical_lines, split_words, valid_env_name};

pub use super::unit_syntax::UNIT_NAME;
/// TEST ONLY: a directory standing in for `/` where coverd looks for the unit
/// (`etc/systemd/system`, …), its running credentials (`run/credentials/coverd.service`)
/// and the credential stores (`etc/credstore`, …). Paths named inside the unit
/// (`LoadCredential=NAME:PATH`, `COVERD_CONFIG`) are used as written.
pub const ENV_SYSTEMD_ROOT: &str = "COVERD_SYSTEMD_ROOT";

/// systemd's search path for system units, highest priority first (the ones an operator or
/// a package installs into; generators and transient units are left out).
const UNIT_DIRS: [&str; 4] = [
    "etc/systemd/system",
    "run/systemd/system",
    "usr/local/lib/systemd/system",
    "usr/lib/systemd/system",
];
/// Where systemd puts a running service's credentials.
const RUNNING_CREDENTIALS: &str = "run/credentials/coverd.service";
/// The credential stores, in systemd's order.
const CREDSTORES: [&str; 3] = ["etc/credstore", "run/credstore", "usr/lib/credstore"];
const CREDSTORES_ENCRYPTED: [&str; 3] = [
    "etc/credstore.encrypted",
    "run/credstore.encrypted",
    "usr/lib/credstore.encrypted",
];

/// Limits on what is read: a unit file or drop-in, its lines, the drop-ins, the
/// `Environment=` variables and credentials kept, one credential's size (systemd's own).
pub const MAX_FILE_BYTES: u64 = 256 * 1024;
pub const MAX_LINES: usize = 10_000;
pub const MAX_DROPINS: usize = 128;
pub const MAX_ENV_VARS: usize = 1_024;
pub const MAX_CREDENTIALS: usize = 256;
pub const MAX_CREDENTIAL_BYTES: u64 = 1024 * 1024;
/// At most this many warnings are kept (a hostile file could produce one per line).
const MAX_WARNINGS: usize = 16;

/// Why the installed unit could not be read. Each names the file and what to do.
#[derive(Debug, thiserror::Error)]
pub enum UnitError {
    #[error(
        "cannot read the installed unit {}: {source}; fix it or its permissions (`systemctl cat coverd`)",
        path.display()
    )]
    Read { path: PathBuf, source: io::Error },
    #[error(
        "the installed unit {} is over {limit}; coverd reads no larger unit files (`systemctl cat coverd`)",
        path.display()
    )]
    TooLarge { path: PathBuf, limit: String },
}

/// Where the systemd tree is: `/`, or the test fixture named by [`ENV_SYSTEMD_ROOT`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Root(PathBuf);

impl Root {
    /// `/`, unless [`ENV_SYSTEMD_ROOT`] names a fixture tree (tests).
    pub fn from_env() -> Root {
        match std::env::var_os(ENV_SYSTEMD_ROOT) {
            Some(dir) if !dir.is_empty() => Root(PathBuf::from(dir)),
            _ => Root(PathBuf::from("/")),
        }
    }

    pub fn at(dir: impl Into<PathBuf>) -> Root {
        Root(dir.into())
    }

    /// `rel` (relative, as in the constants above) under this root.
    fn join(&self, rel: &str) -> PathBuf {
        self.0.join(rel)
    }
}

/// One credential the unit loads (`LoadCredential=` or `LoadCredentialEncrypted=`).
#[derive(Debug, Clone, PartialEq, Eq)]
struct LoadCredential {
    /// `PATH` of `NAME:PATH`, if given.
    path: Option<String>,
    encrypted: bool,
    /// The directive, for messages (`LoadCredential=notify-secret`).
    directive: String,
}

/// The unit as systemd would load it, reduced to what coverd's commands use.
#[derive(Debug, Clone)]
pub struct Unit {
    /// The unit file (the first found on the search path).
    pub path: PathBuf,
    /// The drop-ins applied, in the order applied.
    pub dropins: Vec<PathBuf>,
    env: BTreeMap<String, String>,
    working_directory: Option<PathBuf>,
    credentials: BTreeMap<String, LoadCredential>,
    /// Lines skipped or not followed (an `EnvironmentFile=`, an unknown specifier), in words;
    /// the CLI prints them.
    pub warnings: Vec<String>,
    root: Root,
    /// Credentials are looked for where the next start will find them, never in the running
    /// service's copies (`check-config`, whose pass is the go-ahead for a restart).
    next_start: bool,
}

/// Where a credential the unit loads was found, as root.
#[derive(Debug)]
pub enum Credential {
    /// The unit does not load it: the service does not have it.
    NotLoaded,
    /// Its value and the file it was read from.
    Found { value: String, path: PathBuf },
    /// Present, encrypted (`systemd-creds encrypt`): only the service manager can read it.
    Encrypted { path: PathBuf },
    /// Loaded by the unit but found nowhere; `searched` says where it was looked for.
    Missing { searched: String },
    /// Not root: not read (the credential stores and `/run/credentials` are root's).
    NotRoot { directive: String },
    /// Present but unreadable (an I/O error, too large, not a regular file).
    Unreadable { path: PathBuf, reason: String },
}

impl Unit {
    /// `coverd.service` under `root`, with its drop-ins; `None` when no unit file is found,
    /// or the unit is masked (linked to `/dev/null`).
    pub fn find(root: &Root) -> Result<Option<Unit>, UnitError> {
        // A unit file that cannot be looked at is an error, not "no unit": taking
        // ./coverd-data instead is the trap the unit is read to avoid.
        let mut found = None;
        for path in UNIT_DIRS.iter().map(|d| root.join(d).join(UNIT_NAME)) {
            match path.symlink_metadata() {
                Ok(_) => {
                    found = Some(path);
                    break;
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
                    ) => {}
                Err(source) => return Err(UnitError::Read { path, source }),
            }
        }
        let Some(path) = found else {
            return Ok(None);
        };
        let Some(text) = read_bounded(&path)? else {
            return Ok(None);
        };
        let mut files = vec![(path.clone(), text)];
        for dropin in dropins(root)? {
            if let Some(text) = read_bounded(&dropin)? {
                files.push((dropin, text));
            }
        }
        Ok(Some(Unit::from_files(root.clone(), files)))
    }

    /// The unit from its files' contents, the unit file first, then its drop-ins in order.
    pub fn from_files(root: Root, files: Vec<(PathBuf, Vec<u8>)>) -> Unit {
        let mut files = files.into_iter();
        let (path, first) = files.next().unwrap_or_default();
        let mut unit = Unit {
            path: path.clone(),
            dropins: Vec::new(),
            env: BTreeMap::new(),
            working_directory: None,
            credentials: BTreeMap::new(),
            warnings: Vec::new(),
            root,
            next_start: false,
        };
        unit.apply(&path, &first);
        for (path, text) in files {
            unit.apply(&path, &text);
            unit.dropins.push(path);
        }
        unit
    }

    /// The value of `var` in the unit's environment (the last assignment wins).
    pub fn env(&self, var: &str) -> Option<&str> {
        self.env.get(var).map(String::as_str)
    }

    /// The service's working directory: `WorkingDirectory=`, else `/` (a system service's).
    pub fn working_directory(&self) -> &Path {
        self.working_directory
            .as_deref()
            .unwrap_or_else(|| Path::new("/"))
    }

    /// `path` as the service would resolve it: relative to its working directory.
    pub fn resolve(&self, path: &Path) -> PathBuf {
        self.working_directory().join(path)
    }

    /// The unit file and its drop-ins, in words (`/etc/…/coverd.service with 2 drop-ins`).
    pub fn describe(&self) -> String {
        match self.dropins.len() {
            0 => self.path.display().to_string(),
            1 => format!(
                "{} with the drop-in {}",
                self.path.display(),
                self.dropins[0].display()
            ),
            n => format!("{} with {n} drop-ins", self.path.display()),
        }
    }

    /// This unit, looking for credentials only where its next start will find them
    /// ([`Unit::credential`]).
    pub fn for_next_start(self) -> Unit {
        Unit {
            next_start: true,
            ..self
        }
    }

    /// Where the credential `name` is for this unit: while the service runs, in what systemd
    /// handed it; otherwise (or when it was not handed that one) where systemd would find
    /// it when it starts. [`Unit::for_next_start`] (`check-config`): only where the next
    /// start finds it, so that a credential removed since the start fails the check that
    /// precedes a restart instead of the restart. Reads only as root (`as_root`); otherwise
    /// says that it did not.
    pub fn credential(&self, name: &str, as_root: bool) -> Credential {
        let Some(load) = self.credentials.get(name) else {
            return Credential::NotLoaded;
        };
        if !as_root {
            return Credential::NotRoot {
                directive: load.directive.clone(),
            };
        }
        let running = self.root.join(RUNNING_CREDENTIALS);
        let running = running.is_dir().then(|| running.join(name));
        if self.next_start {
            return match self.stored(name, load) {
                Credential::Missing { searched }
                    if running
                        .as_ref()
                        .is_some_and(|p| p.symlink_metadata().is_ok()) =>
                {
                    Credential::Missing {
                        searched: format!(
                            "{searched}; the running service still has the copy systemd gave it at its start, but the next start will not find it"
                        ),
                    }
                }
                other => other,
            };
        }
        // While the service runs, what systemd handed it; one it was not handed (added
        // since it started) is looked for where systemd will find it at the next start,
        // so that an `admin` command finds it as the service will after a restart.
        if let Some(path) = running {
            match read_credential(&path) {
                Ok(Some(value)) => return Credential::Found { value, path },
                Ok(None) => {}
                Err(reason) => return Credential::Unreadable { path, reason },
            }
        }
        self.stored(name, load)
    }

    /// Where systemd finds credential `name` at the service's start: the path the unit
    /// names, else the credential stores.
    fn stored(&self, name: &str, load: &LoadCredential) -> Credential {
        let id = match &load.path {
            Some(p) if p.starts_with('/') => {
                let path = PathBuf::from(p);
                return if load.encrypted {
                    match path.symlink_metadata() {
                        Ok(_) => Credential::Encrypted { path },
                        Err(_) => Credential::Missing {
                            searched: path.display().to_string(),
                        },
                    }
                } else {
                    match read_credential(&path) {
                        Ok(Some(value)) => Credential::Found { value, path },
                        Ok(None) => Credential::Missing {
                            searched: format!(
                                "{} (the service will not start without it)",
                                path.display()
                            ),
                        },
                        Err(reason) => Credential::Unreadable { path, reason },
                    }
                };
            }
            Some(p) => p.as_str(),
            None => name,
        };
        if !valid_credential_name(id) {
            return Credential::Missing {
                searched: format!("nowhere: `{id}` is not a valid credential name"),
            };
        }
        // LoadCredentialEncrypted= looks in the encrypted stores first; LoadCredential=
        // only in the plain ones.
        let (first, second): (&[&str], &[&str]) = if load.encrypted {
            (&CREDSTORES_ENCRYPTED, &CREDSTORES)
        } else {
            (&CREDSTORES, &[])
        };
        for dir in first.iter().chain(second) {
            let path = self.root.join(dir).join(id);
            if dir.ends_with(".encrypted") {
                if path.symlink_metadata().is_ok() {
                    return Credential::Encrypted { path };
                }
                continue;
            }
            match read_credential(&path) {
                Ok(Some(value)) => return Credential::Found { value, path },
                Ok(None) => {}
                Err(reason) => return Credential::Unreadable { path, reason },
            }
        }
        let stores = |dirs: &[&str]| {
            dirs.iter()
                .map(|d| self.root.join(d).display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut searched = stores(first);
        if !second.is_empty() {
            searched = format!("{searched}, {}", stores(second));
        }
        if !load.encrypted
            && let Some(enc) = CREDSTORES_ENCRYPTED
                .iter()
                .map(|d| self.root.join(d).join(id))
                .find(|p| p.symlink_metadata().is_ok())
        {
            searched = format!(
                "{searched} (there is an encrypted {}, which `{}` does not load: use LoadCredentialEncrypted={name})",
                enc.display(),
                load.directive
            );
        }
        Credential::Missing { searched }
    }

    /// Applies one file's `[Service]` lines.
    fn apply(&mut self, path: &Path, text: &[u8]) {
        let mut section = String::new();
        for (n, line) in logical_lines(text) {
            let Ok(line) = line else {
                self.warn(format!(
                    "{}:{n}: not UTF-8; the line was skipped",
                    path.display()
                ));
                continue;
            };
            let line = line.trim();
            if line.is_empty() || line.starts_with(['#', ';']) {
                continue;
            }
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = name.to_string();
                continue;
            }
            if section != "Service" {
                continue;
            }
            let Some((key, value)) = line.split_once('=') else {
                continue;
            };
            let (key, value) = (key.trim(), value.trim());
            let at = || format!("{}:{n}", path.display());
            match key {
                "Environment" => self.environment(value, &at()),
                "WorkingDirectory" => self.set_working_directory(value, &at()),
                "LoadCredential" | "LoadCredentialEncrypted" => {
                    self.load_credential(key, value, &at())
                }
                "EnvironmentFile" if !value.is_empty() => self.warn(format!(
                    "{}: EnvironmentFile= is not read by coverd's commands; set COVERD_CONFIG and COVERD_DATA_DIR with Environment= so that they see them",
                    at()
                )),
                _ => {}
            }
        }
    }

    fn warn(&mut self, warning: String) {
        if self.warnings.len() < MAX_WARNINGS {
            self.warnings.push(warning);
        }
    }

    /// `Environment=`: words as systemd splits them, each `NAME=VALUE` after its specifiers
    /// are resolved; an empty value resets the list; a syntax error ends the line (the
    /// assignments before it stay), as in systemd.
    fn environment(&mut self, value: &str, at: &str) {
        if value.is_empty() {
            self.env.clear();
            return;
        }
        let (words, error) = split_words(value);
        for word in words {
            let word = match expand_specifiers(&word) {
                Ok(w) => w,
                Err(spec) => {
                    self.warn(format!(
                        "{at}: Environment= uses the specifier %{spec}, which coverd's commands do not resolve; that assignment was skipped"
                    ));
                    continue;
                }
            };
            let Some((name, val)) = word.split_once('=').filter(|(n, _)| valid_env_name(n)) else {
                self.warn(format!(
                    "{at}: `{}` is not a NAME=VALUE assignment; skipped, as systemd does",
                    word.escape_debug()
                ));
                continue;
            };
            if self.env.len() >= MAX_ENV_VARS && !self.env.contains_key(name) {
                self.warn(format!(
                    "{at}: more than {MAX_ENV_VARS} environment variables; the rest were skipped"
                ));
                return;
            }
            self.env.insert(name.to_string(), val.to_string());
        }
        if let Some(error) = error {
            self.warn(format!(
                "{at}: Environment= {error}; the rest of the line was skipped, as systemd does"
            ));
        }
    }

    fn set_working_directory(&mut self, value: &str, at: &str) {
        let value = value.strip_prefix('-').unwrap_or(value);
        if value.is_empty() {
            self.working_directory = None;
            return;
        }
        match expand_specifiers(value) {
            Ok(dir) if dir.starts_with('/') => self.working_directory = Some(PathBuf::from(dir)),
            Ok(dir) => self.warn(format!(
                "{at}: WorkingDirectory={dir} is not an absolute path; coverd's commands take / instead"
            )),
            Err(spec) => self.warn(format!(
                "{at}: WorkingDirectory= uses the specifier %{spec}, which coverd's commands do not resolve"
            )),
        }
    }

    /// `LoadCredential=NAME[:PATH]` (or `…Encrypted=`): the last one of a name wins; an
    /// empty value resets both lists (they are one list in systemd).
    fn load_credential(&mut self, key: &str, value: &str, at: &str) {
        if value.is_empty() {
            self.credentials.clear();
            return;
        }
        let expanded = match expand_specifiers(value) {
            Ok(v) => v,
            Err(spec) => {
                self.warn(format!(
                    "{at}: {key}= uses the specifier %{spec}, which coverd's commands do not resolve; skipped"
                ));
                return;
            }
        };
        let (name, path) = match expanded.split_once(':') {
            Some((name, path)) => (name, Some(path.to_string()).filter(|p| !p.is_empty())),
            None => (expanded.as_str(), None),
        };
        if !valid_credential_name(name) {
            self.warn(format!(
                "{at}: {key}= names `{}`, which is not a valid credential name; skipped",
                name.escape_debug()
            ));
            return;
        }
        if self.credentials.len() >= MAX_CREDENTIALS && !self.credentials.contains_key(name) {
            self.warn(format!(
                "{at}: more than {MAX_CREDENTIALS} credentials; the rest were skipped"
            ));
            return;
        }
        self.credentials.insert(
            name.to_string(),
            LoadCredential {
                path,
                encrypted: key == "LoadCredentialEncrypted",
                directive: format!("{key}={value}"),
            },
        );
    }
}

/// The drop-ins of `coverd.service.d/` across the search path: a file name found in a
/// higher-priority directory hides the same name lower down; applied in file-name order.
fn dropins(root: &Root) -> Result<Vec<PathBuf>, UnitError> {
    let mut by_name: BTreeMap<std::ffi::OsString, PathBuf> = BTreeMap::new();
    for dir in UNIT_DIRS {
        let dir = root.join(dir).join(format!("{UNIT_NAME}.d"));
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(source) => return Err(UnitError::Read { path: dir, source }),
        };
        for entry in entries {
            let entry = entry.map_err(|source| UnitError::Read {
                path: dir.clone(),
                source,
            })?;
            let name = entry.file_name();
            if !name.to_string_lossy().ends_with(".conf") || by_name.contains_key(&name) {
                continue;
            }
            if by_name.len() >= MAX_DROPINS {
                return Err(UnitError::TooLarge {
                    path: dir,
                    limit: format!("{MAX_DROPINS} drop-ins"),
                });
            }
            by_name.insert(name, entry.path());
        }
    }
    Ok(by_name.into_values().collect())
}

/// The contents of a unit file or drop-in, at most [`MAX_FILE_BYTES`] and
/// [`MAX_LINES`]; `None` for one linked to `/dev/null` (masked). Only regular files are
/// read (opened non-blocking, checked after opening).
fn read_bounded(path: &Path) -> Result<Option<Vec<u8>>, UnitError> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let err = |source| UnitError::Read {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
        .open(path)
        .map_err(err)?;
    let meta = file.metadata().map_err(err)?;
    if meta.file_type().is_char_device() {
        return Ok(None);
    }
    if !meta.is_file() {
        return Err(err(io::Error::other("not a regular file")));
    }
    let mut text = Vec::new();
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut text)
        .map_err(err)?;
    let too_large = |limit: String| UnitError::TooLarge {
        path: path.to_path_buf(),
        limit,
    };
    if text.len() as u64 > MAX_FILE_BYTES {
        return Err(too_large(format!("{MAX_FILE_BYTES} bytes")));
    }
    if text.iter().filter(|b| **b == b'\n').count() > MAX_LINES {
        return Err(too_large(format!("{MAX_LINES} lines")));
    }
    Ok(Some(text))
}

/// A credential's value (trailing whitespace removed), `None` when there is no such file
/// (or it is empty: systemd hands the service an empty file, which coverd counts as unset).
fn read_credential(path: &Path) -> Result<Option<String>, String> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    match file.metadata() {
        Ok(m) if m.is_file() => {}
        Ok(_) => return Err("not a regular file".into()),
        Err(e) => return Err(e.to_string()),
    }
    let mut bytes = Vec::new();
    file.take(MAX_CREDENTIAL_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| e.to_string())?;
    if bytes.len() as u64 > MAX_CREDENTIAL_BYTES {
        return Err(format!("larger than {MAX_CREDENTIAL_BYTES} bytes"));
    }
    let text = String::from_utf8(bytes).map_err(|_| "not UTF-8 text".to_string())?;
    let text = text.trim_end();
    Ok((!text.is_empty()).then(|| text.to_string()))
}

/// A credential name systemd accepts: a file name (not `.` or `..`, no `/`), at most 255
/// bytes, no control characters.
fn valid_credential_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && name.len() <= 255
        && !name.contains('/')
        && !name.chars().any(char::is_control)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(v: &str) -> Vec<String> {
        let (w, err) = split_words(v);
        assert_eq!(err, None, "{v:?}");
        w
    }

    fn unit_of(files: &[&str]) -> Unit {
        Unit::from_files(
            Root::at("/nonexistent"),
            files
                .iter()
                .enumerate()
                .map(|(i, t)| (PathBuf::from(format!("/f{i}")), t.as_bytes().to_vec()))
                .collect(),
        )
    }

    #[test]
    fn environment_words_follow_systemd_quoting() {
        assert_eq!(words("A=1 B=2"), ["A=1", "B=2"]);
        assert_eq!(words("  A=1\t B=2  "), ["A=1", "B=2"]);
        assert_eq!(words(r#""A=a b" B='c d'"#), ["A=a b", "B=c d"]);
        // Quotes in the middle of a word, as systemd's extract_first_word allows.
        assert_eq!(words(r#"A="a b"c B=x'y z'"#), ["A=a bc", "B=xy z"]);
        assert_eq!(
            words(r#"A=\"q\" B=a\sb C=\x41\101\u00e9"#),
            ["A=\"q\"", "B=a b", "C=AAé"]
        );
        // Escapes inside quotes too; the other quote is plain inside.
        assert_eq!(
            words(r#""A=it's \"x\"" 'B=say "hi"'"#),
            ["A=it's \"x\"", "B=say \"hi\""]
        );
        assert_eq!(words(r#"A=c:\\dir"#), [r"A=c:\dir"]);
        assert_eq!(words(""), Vec::<String>::new());
        assert_eq!(words(r#"A="""#), ["A="]);
    }

    #[test]
    fn a_syntax_error_keeps_the_words_before_it() {
        let (w, err) = split_words(r#"A=1 B="open C=3"#);
        assert_eq!(w, ["A=1"]);
        assert!(err.unwrap().contains("unterminated quote"));
        let (w, err) = split_words(r"A=1 B=\q C=3");
        assert_eq!(w, ["A=1"]);
        assert!(err.unwrap().contains(r"unknown escape \q"));
        let (w, err) = split_words(r"A=1 B=x\");
        assert_eq!(w, ["A=1"]);
        assert!(err.unwrap().contains("backslash"));
        for bad in [r"A=\x00", r"A=\000", r"A=\xff", r"A=\u12", r"A=\UFFFFFFFF"] {
            let (w, err) = split_words(bad);
            assert!(w.is_empty() && err.is_some(), "{bad}");
        }
    }

    #[test]
    fn specifiers_resolve_or_are_refused() {
        assert_eq!(
            expand_specifiers("%S/coverd %n %% %E").unwrap(),
            "/var/lib/coverd coverd.service % /etc"
        );
        assert_eq!(expand_specifiers("%H"), Err('H'));
        assert_eq!(expand_specifiers("50%"), Err('%'));
    }

    #[test]
    fn environment_lines_accumulate_reset_and_override() {
        let u = unit_of(&[
            "[Unit]\nEnvironment=IGNORED=1\n[Service]\nEnvironment=A=1 B=2\nEnvironment=\"C=%S/x y\"\n",
            "[Service]\nEnvironment=B=override\n",
        ]);
        assert_eq!(u.env("IGNORED"), None, "only [Service] counts");
        assert_eq!(u.env("A"), Some("1"));
        assert_eq!(u.env("B"), Some("override"));
        assert_eq!(u.env("C"), Some("/var/lib/x y"));
        let u = unit_of(&[
            "[Service]\nEnvironment=A=1\n",
            "[Service]\nEnvironment=\nEnvironment=B=2\n",
        ]);
        assert_eq!((u.env("A"), u.env("B")), (None, Some("2")));
        // Not an assignment, or an unknown specifier: skipped with a warning.
        let u = unit_of(&["[Service]\nEnvironment=novalue 1A=x A=%H B=ok\n"]);
        assert_eq!(
            (u.env("A"), u.env("B"), u.env("1A")),
            (None, Some("ok"), None)
        );
        assert_eq!(u.warnings.len(), 3, "{:?}", u.warnings);
    }

    #[test]
    fn lines_continue_after_a_backslash_and_comments_are_skipped() {
        let u = unit_of(&[
            "# comment\n; another\n[Service]\nEnvironment=A=1 \\\n# a comment inside\n  B=2\nEnvironment=C=x\\\\\nEnvironment=D=4\r\n",
        ]);
        assert_eq!(u.env("A"), Some("1"));
        assert_eq!(u.env("B"), Some("2"));
        assert_eq!(
            u.env("C"),
            Some(r"x\"),
            "an escaped backslash does not continue"
        );
        assert_eq!(u.env("D"), Some("4"));
    }

    #[test]
    fn hostile_bytes_are_skipped_not_trusted() {
        let mut text = b"[Service]\nEnvironment=A=\xff\xfe\nEnvironment=B=ok\n".to_vec();
        text.extend_from_slice(b"[Service\nEnvironment=C=still-service\n");
        let u = Unit::from_files(Root::at("/x"), vec![(PathBuf::from("/u"), text)]);
        assert_eq!(u.env("A"), None);
        assert_eq!(u.env("B"), Some("ok"));
        // A broken section header is not a header: the line is skipped.
        assert_eq!(u.env("C"), Some("still-service"));
        let many: String = (0..MAX_ENV_VARS + 10)
            .map(|i| format!("Environment=V{i}=x\n"))
            .collect();
        let u = unit_of(&[&format!("[Service]\n{many}")]);
        assert_eq!(u.env.len(), MAX_ENV_VARS);
    }

    #[test]
    fn working_directory_and_credentials_are_read() {
        let u = unit_of(&[
            "[Service]\nWorkingDirectory=-%S/coverd\nLoadCredential=a\nLoadCredential=b:/etc/b\nLoadCredentialEncrypted=c\nLoadCredential=../x\n",
        ]);
        assert_eq!(u.working_directory(), Path::new("/var/lib/coverd"));
        assert_eq!(u.credentials["a"].path, None);
        assert_eq!(u.credentials["b"].path.as_deref(), Some("/etc/b"));
        assert!(u.credentials["c"].encrypted);
        assert!(!u.credentials.contains_key("../x"));
        let u = unit_of(&[
            "[Service]\nLoadCredential=a\n",
            "[Service]\nLoadCredential=\n",
        ]);
        assert!(u.credentials.is_empty());
        assert_eq!(unit_of(&[""]).working_directory(), Path::new("/"));
    }

    #[test]
    fn files_are_found_in_systemds_order_with_their_dropins() {
        let root = tempfile::tempdir().unwrap();
        let put = |rel: &str, text: &str| {
            let p = root.path().join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        };
        let r = Root::at(root.path());
        assert!(Unit::find(&r).unwrap().is_none());
        put(
            "usr/lib/systemd/system/coverd.service",
            "[Service]\nEnvironment=A=usr B=usr\n",
        );
        put(
            "usr/lib/systemd/system/coverd.service.d/10-a.conf",
            "[Service]\nEnvironment=B=usr-10\n",
        );
        put(
            "usr/lib/systemd/system/coverd.service.d/20-b.conf",
            "[Service]\nEnvironment=C=usr-20\n",
        );
        put(
            "etc/systemd/system/coverd.service.d/20-b.conf",
            "[Service]\nEnvironment=C=etc-20\n",
        );
        put(
            "etc/systemd/system/coverd.service.d/05-z.conf",
            "[Service]\nEnvironment=B=etc-05\n",
        );
        put(
            "etc/systemd/system/coverd.service.d/notes.txt",
            "[Service]\nEnvironment=A=txt\n",
        );
        let u = Unit::find(&r).unwrap().unwrap();
        assert_eq!(
            u.path,
            root.path().join("usr/lib/systemd/system/coverd.service")
        );
        // 05-z, 10-a, 20-b (/etc's hides /usr/lib's), in name order whatever the directory.
        assert_eq!(u.env("A"), Some("usr"));
        assert_eq!(u.env("B"), Some("usr-10"));
        assert_eq!(u.env("C"), Some("etc-20"));
        assert_eq!(u.dropins.len(), 3);
        // The first unit file found wins.
        put(
            "etc/systemd/system/coverd.service",
            "[Service]\nEnvironment=A=etc\n",
        );
        let u = Unit::find(&r).unwrap().unwrap();
        assert_eq!((u.env("A"), u.env("B")), (Some("etc"), Some("usr-10")));
        // Masked: no unit.
        std::fs::remove_file(root.path().join("etc/systemd/system/coverd.service")).unwrap();
        std::os::unix::fs::symlink(
            "/dev/null",
            root.path().join("etc/systemd/system/coverd.service"),
        )
        .unwrap();
        assert!(Unit::find(&r).unwrap().is_none());
    }

    #[test]
    fn oversized_or_odd_files_are_refused() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("etc/systemd/system");
        std::fs::create_dir_all(&dir).unwrap();
        let unit = dir.join("coverd.service");
        std::fs::write(&unit, vec![b'#'; MAX_FILE_BYTES as usize + 1]).unwrap();
        let err = Unit::find(&Root::at(root.path())).unwrap_err();
        assert!(err.to_string().contains("bytes"), "{err}");
        std::fs::write(&unit, "\n".repeat(MAX_LINES + 1)).unwrap();
        let err = Unit::find(&Root::at(root.path())).unwrap_err();
        assert!(err.to_string().contains("lines"), "{err}");
        std::fs::remove_file(&unit).unwrap();
        nix::unistd::mkfifo(&unit, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let err = Unit::find(&Root::at(root.path())).unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
    }

    #[test]
    fn credentials_are_found_where_systemd_finds_them() {
        let root = tempfile::tempdir().unwrap();
        let put = |rel: &str, text: &str| {
            let p = root.path().join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, text).unwrap();
            p
        };
        let elsewhere = put("elsewhere/b", "b-from-path\n");
        let u = Unit::from_files(
            Root::at(root.path()),
            vec![(
                PathBuf::from("/u"),
                format!(
                    "[Service]\nLoadCredential=a\nLoadCredential=b:{}\nLoadCredentialEncrypted=c\nLoadCredential=d\n",
                    elsewhere.display()
                )
                .into_bytes(),
            )],
        );
        let value = |c: Credential| match c {
            Credential::Found { value, .. } => value,
            other => panic!("{other:?}"),
        };
        assert!(matches!(u.credential("z", true), Credential::NotLoaded));
        assert!(matches!(
            u.credential("a", false),
            Credential::NotRoot { .. }
        ));
        assert!(matches!(
            u.credential("a", true),
            Credential::Missing { .. }
        ));
        put("usr/lib/credstore/a", "a-usr\n");
        assert_eq!(value(u.credential("a", true)), "a-usr");
        put("etc/credstore/a", "a-etc\n");
        assert_eq!(value(u.credential("a", true)), "a-etc");
        assert_eq!(value(u.credential("b", true)), "b-from-path");
        put("etc/credstore.encrypted/c", "sealed");
        assert!(matches!(
            u.credential("c", true),
            Credential::Encrypted { .. }
        ));
        // LoadCredential= does not decrypt: missing, with a hint.
        put("etc/credstore.encrypted/d", "sealed");
        match u.credential("d", true) {
            Credential::Missing { searched } => {
                assert!(searched.contains("LoadCredentialEncrypted=d"), "{searched}")
            }
            other => panic!("{other:?}"),
        }
        // While the service runs: what systemd handed it first; one it was not handed
        // (added since its start) where the next start will find it.
        put("run/credentials/coverd.service/a", "a-running\n");
        assert_eq!(value(u.credential("a", true)), "a-running");
        assert_eq!(value(u.credential("b", true)), "b-from-path");
        assert!(matches!(
            u.credential("d", true),
            Credential::Missing { .. }
        ));
        // For the next start (check-config): only where that start finds it. A credential
        // removed from its store since the service started is missing, however alive the
        // running service's copy is.
        let next = u.for_next_start();
        assert_eq!(value(next.credential("a", true)), "a-etc");
        std::fs::remove_file(root.path().join("etc/credstore/a")).unwrap();
        std::fs::remove_file(root.path().join("usr/lib/credstore/a")).unwrap();
        match next.credential("a", true) {
            Credential::Missing { searched } => {
                assert!(
                    searched.contains("the next start will not find it"),
                    "{searched}"
                )
            }
            other => panic!("{other:?}"),
        }
    }
}
