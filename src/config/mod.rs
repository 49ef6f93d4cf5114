//! Configuration: the TOML file, environment overrides and command-line flags, resolved into
//! one validated [`Config`]. Each key is declared once in [`keys`], which generates the file's
//! structs, the key-by-key parsing and checks, `check-config`'s output and the docs table;
//! this module holds the resolved types, the order of sources (flags, the caller's
//! environment, the file, and for commands the installed unit read by [`unit`]; then the
//! secrets) and the checks across keys. Must not open the store, the network or any socket.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub mod keys;
mod secret;
#[cfg(test)]
mod tests;
mod toml_errors;
pub mod unit;
mod unit_syntax;
mod values;

use keys::RawFile;
pub use secret::{Origin, Secret};
use secret::{SecretSource, secret};
use toml_errors::describe_toml_error;
pub use values::{ApiKey, KieBaseUrl, LocalGroup, UserAgent, notify_key, resolve_addr};

/// Environment variable naming the configuration file (when `--config` is not given).
pub const ENV_CONFIG: &str = "COVERD_CONFIG";
/// Environment variable overriding `data_dir`.
pub const ENV_DATA_DIR: &str = "COVERD_DATA_DIR";
/// Environment variable overriding `listen`.
pub const ENV_LISTEN: &str = "COVERD_LISTEN";
/// Environment variable holding the KIE API key.
pub const ENV_API_KEY: &str = "KIE_API_KEY";
/// Environment variable holding the webhook HMAC key.
pub const ENV_WEBHOOK_HMAC_KEY: &str = "KIE_WEBHOOK_HMAC_KEY";
/// Environment variable holding the signing secret of outbound notifications.
pub const ENV_NOTIFY_SECRET: &str = "COVERD_NOTIFY_SECRET";
/// Environment variable holding the object store's access key id (`[storage] kind = "s3"`).
pub const ENV_S3_ACCESS_KEY_ID: &str = "COVERD_S3_ACCESS_KEY_ID";
/// Environment variable holding the object store's secret access key.
pub const ENV_S3_SECRET_ACCESS_KEY: &str = "COVERD_S3_SECRET_ACCESS_KEY";
/// Set by systemd (`LoadCredential=`): directory holding credential files.
pub const ENV_CREDENTIALS_DIRECTORY: &str = "CREDENTIALS_DIRECTORY";
/// systemd credential name of the KIE API key.
pub const CREDENTIAL_API_KEY: &str = "kie-api-key";
/// systemd credential name of the webhook HMAC key.
pub const CREDENTIAL_WEBHOOK_HMAC_KEY: &str = "kie-webhook-hmac-key";
/// systemd credential name of the notification signing secret.
pub const CREDENTIAL_NOTIFY_SECRET: &str = "notify-secret";
/// systemd credential name of the object store's access key id.
pub const CREDENTIAL_S3_ACCESS_KEY_ID: &str = "s3-access-key-id";
/// systemd credential name of the object store's secret access key.
pub const CREDENTIAL_S3_SECRET_ACCESS_KEY: &str = "s3-secret-access-key";

/// The fully resolved configuration every other module reads.
#[derive(Debug, Clone)]
pub struct Config {
    pub data_dir: PathBuf,
    /// Whether `--data-dir`, `COVERD_DATA_DIR` or the file named `data_dir`. When none did,
    /// `data_dir` is the default `./coverd-data`, and `admin`/`submit` also look for the
    /// service's `/var/lib/coverd` (SPEC "Binary and commands").
    pub data_dir_named: bool,
    pub listen: SocketAddr,
    /// How KIE reaches this daemon, without trailing slash; empty when unset.
    pub public_url: String,
    pub accept_unknown_tasks: bool,
    pub metrics_listen: Option<SocketAddr>,
    pub kie: KieConfig,
    pub download: DownloadConfig,
    pub poll: PollConfig,
    pub notify: NotifyConfig,
    pub storage: StorageConfig,
    /// Where each secret was found (`check-config` says so): key, then the source in words
    /// ("the credential `kie-api-key` in /run/credentials/coverd.service", …) or `None`.
    pub secret_origins: Vec<(&'static str, Option<secret::Origin>)>,
    /// Secrets the installed unit would give the service that this process did not read
    /// (not root, or unreadable): key, then why. `check-config` exits 2 when there are any.
    pub unread_credentials: Vec<(&'static str, String)>,
    /// The installed unit whose environment and credentials filled in what the caller left
    /// unset (commands other than `serve`), in words: its file and drop-ins.
    pub unit: Option<String>,
    /// Whether the data directory is the installed unit's (its `COVERD_DATA_DIR`, its
    /// configuration file's `data_dir`, or the default in its working directory).
    pub data_dir_from_unit: bool,
    /// What the unit's files have that the commands skipped (printed as warnings).
    pub unit_warnings: Vec<String>,
}

/// `[notify]`: outbound notifications when a task settles (SPEC "Notifications (outbound)").
#[derive(Debug, Clone)]
pub struct NotifyConfig {
    /// Where to POST; `None` (empty in the file) turns notifications off.
    pub url: Option<String>,
    /// `whsec_` + base64; always set when `url` is (checked at load).
    pub secret: Option<Secret>,
    pub timeout: Duration,
    pub max_attempts: u32,
}

/// `[storage]`: where the stored files go (SPEC "Data directory", "Object storage") and who
/// may read them there.
#[derive(Debug, Clone, Default)]
pub struct StorageConfig {
    /// The group that may read `images/`; `None` keeps every file private to the daemon.
    pub local_group: Option<values::LocalGroup>,
    pub kind: StorageKind,
    /// The object store's settings; read only with [`StorageKind::S3`].
    pub s3: S3Config,
}

/// `storage.kind`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum StorageKind {
    /// Files under the data directory (`images/`, `files/`).
    #[default]
    Local,
    /// Files in an S3-compatible object store.
    S3,
}

impl StorageKind {
    pub fn as_str(self) -> &'static str {
        match self {
            StorageKind::Local => "local",
            StorageKind::S3 => "s3",
        }
    }
}

/// The object store of `storage.kind = "s3"`.
#[derive(Debug, Clone)]
pub struct S3Config {
    /// `http(s)://…` without a trailing `/`; empty: AWS's endpoint for `region`.
    pub endpoint: String,
    pub bucket: String,
    pub region: String,
    /// Empty, or ending in `/`.
    pub prefix: String,
    pub path_style: bool,
    pub access_key_id: Option<Secret>,
    pub secret_access_key: Option<Secret>,
}

impl Default for S3Config {
    fn default() -> Self {
        S3Config {
            endpoint: String::new(),
            bucket: String::new(),
            region: keys::default_str("storage.region").to_string(),
            prefix: String::new(),
            path_style: keys::default_bool("storage.path_style"),
            access_key_id: None,
            secret_access_key: None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct KieConfig {
    pub base_url: KieBaseUrl,
    pub api_key: Option<ApiKey>,
    pub webhook_hmac_key: Option<Secret>,
    pub signature_tolerance: Duration,
    pub confirm_callbacks: bool,
    pub requests_per_10s: u32,
}

#[derive(Debug, Clone)]
pub struct DownloadConfig {
    pub concurrency: usize,
    /// Covers and track images.
    pub max_image_bytes: u64,
    /// MP3 tracks and stems.
    pub max_audio_bytes: u64,
    pub max_wav_bytes: u64,
    pub max_video_bytes: u64,
    pub max_attempts: u32,
    /// The floor of a body's average speed over [`crate::fetch::SPEED_WINDOW`]; 0: none.
    pub min_bytes_per_second: u64,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    pub timeout: Duration,
    /// Lower-cased host names; empty means any host.
    pub allowed_hosts: Vec<String>,
    pub allow_http: bool,
    pub allow_private_networks: bool,
    pub user_agent: UserAgent,
}

impl DownloadConfig {
    /// The size cap of a file of type `t` (SPEC "Configuration": `download.max_*_bytes`).
    pub fn max_bytes(&self, t: crate::kind::FileType) -> u64 {
        use crate::kind::FileType;
        match t {
            FileType::Image => self.max_image_bytes,
            FileType::Mp3 => self.max_audio_bytes,
            FileType::Wav => self.max_wav_bytes,
            FileType::Mp4 => self.max_video_bytes,
        }
    }
}

#[derive(Debug, Clone)]
pub struct PollConfig {
    pub after: Duration,
    pub interval: Duration,
    pub give_up_after: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from(keys::default_str("data_dir")),
            data_dir_named: false,
            listen: keys::default_str("listen")
                .parse()
                .expect("the declared default of `listen` is a socket address"),
            public_url: String::new(),
            accept_unknown_tasks: keys::default_bool("accept_unknown_tasks"),
            metrics_listen: None,
            kie: KieConfig {
                base_url: KieBaseUrl(keys::default_str("kie.base_url").into()),
                api_key: None,
                webhook_hmac_key: None,
                signature_tolerance: keys::default_duration("kie.signature_tolerance"),
                confirm_callbacks: keys::default_bool("kie.confirm_callbacks"),
                requests_per_10s: keys::default_int("kie.requests_per_10s"),
            },
            download: DownloadConfig {
                concurrency: keys::default_int("download.concurrency"),
                max_image_bytes: keys::default_int("download.max_image_bytes"),
                max_audio_bytes: keys::default_int("download.max_audio_bytes"),
                max_wav_bytes: keys::default_int("download.max_wav_bytes"),
                max_video_bytes: keys::default_int("download.max_video_bytes"),
                max_attempts: keys::default_int("download.max_attempts"),
                min_bytes_per_second: keys::default_int("download.min_bytes_per_second"),
                backoff_base: keys::default_duration("download.backoff_base"),
                backoff_max: keys::default_duration("download.backoff_max"),
                timeout: keys::default_duration("download.timeout"),
                allowed_hosts: vec!["*.aiquickdraw.com".into(), "*.kie.ai".into()],
                allow_http: false,
                allow_private_networks: false,
                user_agent: UserAgent(concat!("coverd/", env!("CARGO_PKG_VERSION")).into()),
            },
            poll: PollConfig {
                after: keys::default_duration("poll.after"),
                interval: keys::default_duration("poll.interval"),
                give_up_after: keys::default_duration("poll.give_up_after"),
            },
            notify: NotifyConfig {
                url: None,
                secret: None,
                timeout: keys::default_duration("notify.timeout"),
                max_attempts: keys::default_int("notify.max_attempts"),
            },
            storage: StorageConfig::default(),
            secret_origins: SECRET_KEYS.iter().map(|k| (*k, None)).collect(),
            unread_credentials: Vec::new(),
            unit: None,
            data_dir_from_unit: false,
            unit_warnings: Vec::new(),
        }
    }
}

/// What command-line flags gave; `None` means the flag was not used.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    /// `--config FILE`
    pub config_file: Option<PathBuf>,
    /// `--data-dir DIR`
    pub data_dir: Option<PathBuf>,
    /// `serve --listen ADDR`
    pub listen: Option<SocketAddr>,
}

/// Why the configuration could not be loaded. `Display` is one sentence for the operator;
/// it never contains a secret. The binary prints it and exits with status 2.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The configuration file could not be read (missing, unreadable, not UTF-8).
    #[error(
        "cannot read config file {}: {source}; check --config / {ENV_CONFIG}",
        path.display()
    )]
    Read { path: PathBuf, source: io::Error },
    /// The configuration file is not valid TOML, has an unknown key or a value of the wrong
    /// type. `message` gives line, column and, where it can be found, the dotted key.
    #[error(
        "cannot parse config file {}: {message}; fix the file (every key is listed in `man coverd`, CONFIGURATION)",
        path.display()
    )]
    Parse { path: PathBuf, message: String },
    /// A value is out of range or malformed. `key` is dotted (`download.concurrency`);
    /// `value` is the offending value as written (never given for secrets).
    #[error("invalid configuration: `{key}`{}: {reason}", show_value(value))]
    Invalid {
        key: String,
        value: Option<String>,
        reason: String,
    },
    /// An environment variable has an unusable value.
    #[error("invalid environment variable `{var}`{}: {reason}", show_value(value))]
    Env {
        var: String,
        value: Option<String>,
        reason: String,
    },
    /// A variable of the installed unit's `Environment=` has an unusable value.
    #[error(
        "invalid `Environment={var}=…` in the installed unit {unit}{}: {reason}; fix the unit (`systemctl edit coverd`) or set {var} yourself",
        show_value(value)
    )]
    UnitEnv {
        var: String,
        unit: String,
        value: Option<String>,
        reason: String,
    },
    /// The installed unit's files could not be read.
    #[error(transparent)]
    Unit(#[from] unit::UnitError),
}

fn show_value(value: &Option<String>) -> String {
    match value {
        Some(v) => format!(" = {v}"),
        None => String::new(),
    }
}

fn invalid(key: &str, value: Option<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        value,
        reason: reason.into(),
    }
}

/// Where a key's value came from, for blaming an invalid one on its source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Blame {
    File,
    /// The caller's environment variable.
    Env(&'static str),
    /// The installed unit's `Environment=` variable.
    Unit(&'static str),
}

impl ConfigError {
    /// This error as one of the source in `blame`, when the value came from the caller's or
    /// the unit's environment (`unit` describes the unit).
    fn blamed(self, blame: Blame, unit: &str) -> ConfigError {
        match (self, blame) {
            (ConfigError::Invalid { value, reason, .. }, Blame::Env(var)) => ConfigError::Env {
                var: var.into(),
                value,
                reason,
            },
            (ConfigError::Invalid { value, reason, .. }, Blame::Unit(var)) => {
                ConfigError::UnitEnv {
                    var: var.into(),
                    unit: unit.into(),
                    value,
                    reason,
                }
            }
            (err, _) => err,
        }
    }
}

/// Load the configuration using the real process environment, as `serve` does: flags,
/// environment, file, defaults.
///
/// An environment variable that is not valid UTF-8 is an error rather than silently unset.
pub fn load(overrides: &Overrides) -> Result<Config, ConfigError> {
    check_env_is_utf8()?;
    load_with_env(overrides, &|name| std::env::var(name).ok())
}

/// Load the configuration for a command (`admin`, `submit`, `check-config`): as [`load`],
/// then the installed unit ([`unit::Unit::find`] under [`unit::Root::from_env`]) for what
/// flags, environment and file leave unset, with its credentials when run as root (SPEC
/// "Binary and commands").
///
/// `next_start` (`check-config`): the unit's credentials only where its next start finds
/// them, not the running service's copies ([`unit::Unit::for_next_start`]).
pub fn load_for_command(overrides: &Overrides, next_start: bool) -> Result<Config, ConfigError> {
    check_env_is_utf8()?;
    let unit = unit::Unit::find(&unit::Root::from_env())?
        .map(|u| if next_start { u.for_next_start() } else { u });
    let as_root = nix::unistd::geteuid().is_root();
    load_with(
        overrides,
        &|name| std::env::var(name).ok(),
        unit.as_ref(),
        as_root,
    )
}

/// Every variable `load` reads: the file's name, the credentials, and each key's.
fn check_env_is_utf8() -> Result<(), ConfigError> {
    let keys_vars = keys::KEYS.iter().filter_map(|k| k.env);
    for var in [ENV_CONFIG, ENV_CREDENTIALS_DIRECTORY]
        .into_iter()
        .chain(keys_vars)
    {
        if let Err(std::env::VarError::NotUnicode(_)) = std::env::var(var) {
            return Err(ConfigError::Env {
                var: var.to_string(),
                value: None,
                reason: "is not valid UTF-8; set it to a UTF-8 value or unset it".into(),
            });
        }
    }
    Ok(())
}

/// Load the configuration with `env` standing in for the process environment.
///
/// Precedence: `overrides` (flags) beat environment variables beat the file beat the
/// built-in defaults. An empty environment variable counts as unset.
pub fn load_with_env(
    overrides: &Overrides,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, ConfigError> {
    load_with(overrides, env, None, false)
}

/// [`load_with_env`], with the installed unit `unit` filling in what flags, `env` and the
/// file leave unset, and its credentials read when `as_root`.
///
/// The unit's `COVERD_CONFIG` names the file when neither `--config` nor `env` does. Its
/// environment beats that file, as it does for the service, also when the caller names the
/// same file; under a file of the caller's own it only fills in what the file leaves unset.
/// A relative data directory from the unit is the service's: in its working directory.
pub fn load_with(
    overrides: &Overrides,
    env: &dyn Fn(&str) -> Option<String>,
    unit: Option<&unit::Unit>,
    as_root: bool,
) -> Result<Config, ConfigError> {
    let env = |name: &str| env(name).filter(|v| !v.is_empty());
    let unit_env = |name: &str| {
        unit.and_then(|u| u.env(name))
            .filter(|v| !v.is_empty())
            .map(str::to_string)
    };
    let unit_file = unit_env(ENV_CONFIG).map(|f| match unit {
        Some(u) => u.resolve(Path::new(&f)),
        None => PathBuf::from(f),
    });
    let file = overrides
        .config_file
        .clone()
        .or_else(|| env(ENV_CONFIG).map(PathBuf::from));
    let unit_first = match (&file, &unit_file) {
        (None, _) => true,
        (Some(f), Some(u)) => f == u,
        (Some(_), None) => false,
    };
    let file = file.or(unit_file);
    let raw = match &file {
        Some(path) => read_file(path)?,
        None => RawFile::default(),
    };
    let view = UnitView {
        unit,
        env: &unit_env,
        first: unit_first,
        as_root,
        described: unit.map(unit::Unit::describe).unwrap_or_default(),
    };
    resolve(raw, overrides, &env, &view)
}

/// What the installed unit adds, for [`resolve`]: nothing when `unit` is `None`.
struct UnitView<'a> {
    unit: Option<&'a unit::Unit>,
    env: &'a dyn Fn(&str) -> Option<String>,
    /// The unit's environment beats the file ([`keys::Sources::unit_first`]).
    first: bool,
    as_root: bool,
    described: String,
}

/// Every key the configuration file accepts, dotted (`download.concurrency`).
/// Derived from the structs the file is parsed into, so it cannot miss a key.
pub fn keys() -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(serde_json::Value::Object(top)) = serde_json::to_value(RawFile::all_sections()) {
        for (key, value) in top {
            match value {
                serde_json::Value::Object(section) => {
                    out.extend(section.keys().map(|k| format!("{key}.{k}")));
                }
                _ => out.push(key),
            }
        }
    }
    out
}

/// The secrets, as `check-config` names them in [`Config::secret_report`].
const SECRET_KEYS: [&str; 5] = [
    "kie.api_key",
    "kie.webhook_hmac_key",
    "notify secret",
    "storage.access_key_id",
    "storage secret access key",
];

/// What `<set>` stands for in [`Config::effective_toml`].
pub const SECRET_SHOWN: &str = "<set>";

impl Config {
    /// `check-config`'s lines about the secrets: where each was found, or that it is not
    /// set; run as root, a warning for a key file the service's user will not be able to
    /// read (the service then fails to start with status 2).
    pub fn secret_report(&self, as_root: bool) -> Vec<String> {
        let mut lines = Vec::new();
        for (key, origin) in &self.secret_origins {
            match origin {
                Some(o) => {
                    lines.push(format!("{key}: found in {}", o.text));
                    if as_root && let Some(why) = o.unreadable_by_service() {
                        lines.push(format!("warning: {key}: {why}"));
                    }
                }
                None => match self.unread_credentials.iter().find(|(k, _)| k == key) {
                    Some((_, why)) => lines.push(format!("{key}: not read: {why}")),
                    None => lines.push(format!("{key}: not set")),
                },
            }
        }
        lines
    }

    /// Whether the secret `key` is there for the service but this process could not read
    /// its value: an encrypted credential, or one it did not read (not root).
    pub fn secret_unreadable_here(&self, key: &str) -> bool {
        self.unread_credentials.iter().any(|(k, _)| *k == key)
            || self
                .secret_origins
                .iter()
                .any(|(k, o)| *k == key && o.as_ref().is_some_and(|o| o.sealed))
    }

    /// The effective configuration as TOML (`coverd check-config`): every key with the value
    /// in force after file, environment and flags. Secrets show as `"<set>"` (or `""` when
    /// unset), and so do `notify.url`'s query and password; the `*_file` keys are left out
    /// because the secret they name is already resolved into its key.
    pub fn effective_toml(&self) -> String {
        let mut shown = RawFile::shown(self);
        // A receiver's token often rides in notify.url's query: shown like a secret.
        if let Some(url) = shown.notify.as_mut().and_then(|n| n.url.as_mut()) {
            *url = values::url_shown(url);
        }
        toml::to_string(&shown)
            .unwrap_or_else(|e| format!("# cannot print the configuration: {e}\n"))
    }
}

fn read_file(path: &Path) -> Result<RawFile, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    toml::from_str(&text).map_err(|err| ConfigError::Parse {
        path: path.to_path_buf(),
        message: describe_toml_error(&text, &err),
    })
}

/// The built-in defaults, overridden key by key by the file and the environment (as
/// declared in [`keys`]), then by the flags; then the secrets and the checks across keys.
fn resolve(
    mut raw: RawFile,
    overrides: &Overrides,
    env: &dyn Fn(&str) -> Option<String>,
    unit: &UnitView<'_>,
) -> Result<Config, ConfigError> {
    // Where the data directory comes from, flags aside.
    let data_dir_blame = keys::Sources {
        env,
        unit_env: unit.env,
        unit_first: unit.first,
        unit: &unit.described,
        flagged: &|_| false,
    }
    .value("data_dir", Some(ENV_DATA_DIR), raw.data_dir.clone())
    .map(|(_, blame)| blame);
    // The unit's data directory: from its environment, from its own file, or the default
    // (which the service takes in its working directory).
    let data_dir_from_unit = unit.unit.is_some()
        && overrides.data_dir.is_none()
        && match data_dir_blame {
            Some(Blame::Unit(_)) | None => true,
            Some(Blame::File) => unit.first,
            Some(Blame::Env(_)) => false,
        };
    let mut config = Config {
        data_dir_named: overrides.data_dir.is_some()
            || data_dir_blame.is_some()
            || unit.unit.is_some(),
        data_dir_from_unit,
        unit: unit.unit.map(|_| unit.described.clone()),
        unit_warnings: unit.unit.map(|u| u.warnings.clone()).unwrap_or_default(),
        ..Config::default()
    };
    let flagged = |key: &str| match key {
        "data_dir" => overrides.data_dir.is_some(),
        "listen" => overrides.listen.is_some(),
        _ => false,
    };
    raw.apply_declared(
        &mut config,
        &keys::Sources {
            env,
            unit_env: unit.env,
            unit_first: unit.first,
            unit: &unit.described,
            flagged: &flagged,
        },
    )?;
    if let Some(dir) = &overrides.data_dir {
        config.data_dir = values::non_empty_dir("data_dir", dir.clone())?;
    }
    if data_dir_from_unit && let Some(u) = unit.unit {
        config.data_dir = u.resolve(&config.data_dir);
    }
    if let Some(addr) = overrides.listen {
        config.listen = addr;
    }
    resolve_secrets(&mut config, raw, env, unit)?;
    check_across_keys(&config)?;
    Ok(config)
}

/// The three secrets, each from its environment variable, inline key, key file or systemd
/// credential (see [`secret`]), then from the installed unit.
fn resolve_secrets(
    config: &mut Config,
    raw: RawFile,
    env: &dyn Fn(&str) -> Option<String>,
    unit: &UnitView<'_>,
) -> Result<(), ConfigError> {
    let kie = raw.kie.unwrap_or_default();
    let notify = raw.notify.unwrap_or_default();
    let storage = raw.storage.unwrap_or_default();
    let mut origins = Vec::new();
    let mut unread = Vec::new();
    let mut find = |key: &'static str, src: SecretSource| -> Result<Option<Secret>, ConfigError> {
        let found = match unit.unit {
            None => secret(env, src)?.map(|(s, o)| (Some(s), o)),
            Some(u) => {
                let from_unit = secret::UnitSecrets {
                    unit: u,
                    env: unit.env,
                    first: unit.first,
                    as_root: unit.as_root,
                };
                match from_unit.secret(env, src)? {
                    secret::Found::Yes(s, o) => Some((Some(s), o)),
                    secret::Found::Sealed(o) => Some((None, o)),
                    secret::Found::Unread(why) => {
                        unread.push((key, why));
                        None
                    }
                    secret::Found::No => None,
                }
            }
        };
        origins.push((key, found.as_ref().map(|(_, from)| from.clone())));
        Ok(found.and_then(|(s, _)| s))
    };
    let api_key = find(
        SECRET_KEYS[0],
        SecretSource {
            env_var: ENV_API_KEY,
            inline_key: "kie.api_key",
            inline: kie.api_key,
            file_key: "kie.api_key_file",
            file: kie.api_key_file,
            credential: CREDENTIAL_API_KEY,
        },
    )?;
    config.kie.api_key = api_key
        .map(|key| ApiKey::parse("kie.api_key", &key))
        .transpose()?;
    config.kie.webhook_hmac_key = find(
        SECRET_KEYS[1],
        SecretSource {
            env_var: ENV_WEBHOOK_HMAC_KEY,
            inline_key: "kie.webhook_hmac_key",
            inline: kie.webhook_hmac_key,
            file_key: "kie.webhook_hmac_key_file",
            file: kie.webhook_hmac_key_file,
            credential: CREDENTIAL_WEBHOOK_HMAC_KEY,
        },
    )?;
    config.notify.secret = find(
        SECRET_KEYS[2],
        SecretSource {
            env_var: ENV_NOTIFY_SECRET,
            // The secret has no inline key in the file, only `secret_file`.
            inline_key: "notify.secret_file",
            inline: None,
            file_key: "notify.secret_file",
            file: notify.secret_file,
            credential: CREDENTIAL_NOTIFY_SECRET,
        },
    )?;
    config.storage.s3.access_key_id = find(
        SECRET_KEYS[3],
        SecretSource {
            env_var: ENV_S3_ACCESS_KEY_ID,
            inline_key: "storage.access_key_id",
            inline: storage.access_key_id,
            // The key id has no `*_file` key, only the credential.
            file_key: "storage.access_key_id",
            file: None,
            credential: CREDENTIAL_S3_ACCESS_KEY_ID,
        },
    )?;
    config.storage.s3.secret_access_key = find(
        SECRET_KEYS[4],
        SecretSource {
            env_var: ENV_S3_SECRET_ACCESS_KEY,
            // The secret has no inline key in the file, only `secret_access_key_file`.
            inline_key: "storage.secret_access_key_file",
            inline: None,
            file_key: "storage.secret_access_key_file",
            file: storage.secret_access_key_file,
            credential: CREDENTIAL_S3_SECRET_ACCESS_KEY,
        },
    )?;
    config.secret_origins = origins;
    config.unread_credentials = unread;
    Ok(())
}

/// What no single key can check: the backoff's base against its maximum, and the
/// notification URL against its signing secret (which must be `whsec_` + base64).
fn check_across_keys(config: &Config) -> Result<(), ConfigError> {
    let (base, max) = (config.download.backoff_base, config.download.backoff_max);
    if base > max {
        return Err(invalid(
            "download.backoff_base",
            Some(format!(
                "{:?}",
                humantime::format_duration(base).to_string()
            )),
            format!(
                "must not exceed `download.backoff_max` ({}); lower it or raise the maximum",
                humantime::format_duration(max)
            ),
        ));
    }
    let where_from = format!(
        "(from `notify.secret_file`, {ENV_NOTIFY_SECRET} or the credential `{CREDENTIAL_NOTIFY_SECRET}`)"
    );
    let make_one = "make one with `echo whsec_$(head -c 32 /dev/urandom | base64)`";
    let reason = match &config.notify.secret {
        Some(s) if notify_key(s).is_none() => format!(
            "the notification secret {where_from} must be \"whsec_\" followed by base64; {make_one}"
        ),
        // Present but not readable here (encrypted, or not root): the service may have it;
        // `check-config` reports it.
        None if config.notify.url.is_some() && !config.secret_unreadable_here(SECRET_KEYS[2]) => {
            format!("`notify.url` is set but there is no signing secret {where_from}; {make_one}")
        }
        _ => return check_storage(config),
    };
    Err(invalid("notify.secret_file", None, reason))
}

/// `storage.kind = "s3"` needs a bucket and both halves of the key (present, or there for
/// the service where this process cannot read them).
fn check_storage(config: &Config) -> Result<(), ConfigError> {
    if config.storage.kind != StorageKind::S3 {
        return Ok(());
    }
    let s3 = &config.storage.s3;
    if s3.bucket.is_empty() {
        return Err(invalid(
            "storage.bucket",
            None,
            "is required with `storage.kind = \"s3\"`; name the bucket the files go to (`man coverd`, CONFIGURATION)",
        ));
    }
    let missing = |key: &str, set: bool| !set && !config.secret_unreadable_here(key);
    if missing(SECRET_KEYS[3], s3.access_key_id.is_some()) {
        return Err(invalid(
            "storage.access_key_id",
            None,
            format!(
                "is required with `storage.kind = \"s3\"`: set it, {ENV_S3_ACCESS_KEY_ID} or the credential `{CREDENTIAL_S3_ACCESS_KEY_ID}`"
            ),
        ));
    }
    if missing(SECRET_KEYS[4], s3.secret_access_key.is_some()) {
        return Err(invalid(
            "storage.secret_access_key_file",
            None,
            format!(
                "is required with `storage.kind = \"s3\"`: name a file holding the secret access key, or set {ENV_S3_SECRET_ACCESS_KEY} or the credential `{CREDENTIAL_S3_SECRET_ACCESS_KEY}`"
            ),
        ));
    }
    Ok(())
}
