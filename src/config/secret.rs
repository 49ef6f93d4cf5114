//! Secrets: the [`Secret`] string whose `Debug` never shows it, and where a secret is read
//! from (environment, inline key, key file, systemd credential), in that order, then, for
//! commands, from the installed unit ([`UnitSecrets`]: its environment and credentials).
//! Owns no other key; must not log or echo a secret value.

use std::io;
use std::path::Path;

use super::unit::{Credential, Unit};
use super::{ConfigError, ENV_CREDENTIALS_DIRECTORY, invalid};

/// A secret string (API key, HMAC key). Its `Debug` never shows the value.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Where a secret was found, in words; for a key file, its path and the credential that
/// would do the same job under systemd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub text: String,
    pub file: Option<std::path::PathBuf>,
    pub credential: &'static str,
    /// Present but not readable by this process (an encrypted credential): the secret is
    /// there for the service, its value unknown here.
    pub sealed: bool,
}

impl Origin {
    fn named(text: String) -> Origin {
        Origin {
            text,
            file: None,
            credential: "",
            sealed: false,
        }
    }

    /// Why the service's user, a systemd `DynamicUser` with `ProtectHome=` and
    /// `PrivateTmp=`, would not be able to read this key file, as far as root can tell.
    pub fn unreadable_by_service(&self) -> Option<String> {
        use std::os::unix::fs::PermissionsExt;
        let file = self.file.as_ref()?;
        let mode = std::fs::metadata(file).ok().map(|m| m.permissions().mode());
        let why = unreadable_reason(file, mode)?;
        Some(format!(
            "the service will not be able to read {}: {why}; give it as the credential `{}` instead (LoadCredential=, see `man coverd`, CONFIGURATION)",
            file.display(),
            self.credential
        ))
    }
}

/// [`Origin::unreadable_by_service`]'s rule, for a key file at `file` with `mode` (`None`:
/// it cannot be looked at, which `check-config` reports otherwise).
pub(super) fn unreadable_reason(file: &Path, mode: Option<u32>) -> Option<String> {
    if let Some(dir) = ["/home", "/root", "/tmp", "/var/tmp", "/run/user"]
        .into_iter()
        .find(|dir| file.starts_with(dir))
    {
        return Some(format!(
            "it is under {dir}, which the unit hides from the service"
        ));
    }
    match mode {
        Some(mode) if mode & 0o004 == 0 => Some(format!(
            "it is not readable by others (mode {:o}), and the service runs as its own dynamic user",
            mode & 0o7777
        )),
        _ => None,
    }
}

/// Where one secret may come from, in order of precedence.
pub(super) struct SecretSource {
    pub(super) env_var: &'static str,
    pub(super) inline_key: &'static str,
    pub(super) inline: Option<String>,
    pub(super) file_key: &'static str,
    pub(super) file: Option<String>,
    pub(super) credential: &'static str,
}

/// Trailing whitespace removed; empty means unset.
fn non_empty_secret(value: Option<String>) -> Option<String> {
    value
        .map(|v| v.trim_end().to_string())
        .filter(|v| !v.is_empty())
}

/// The secret from its first set source; it must fit in an HTTP header (no control
/// characters), or every KIE call would fail later.
/// Returns it with where it was found, in words (`check-config` says so).
pub(super) fn secret(
    env: &dyn Fn(&str) -> Option<String>,
    src: SecretSource,
) -> Result<Option<(Secret, Origin)>, ConfigError> {
    let key = src.inline_key;
    let found = secret_from_sources(env, src)?;
    if let Some((s, _)) = &found {
        on_one_line(key, s)?;
    }
    Ok(found)
}

/// A secret must fit in an HTTP header: no control characters.
fn on_one_line(key: &str, secret: &Secret) -> Result<(), ConfigError> {
    if secret.expose().chars().any(char::is_control) {
        return Err(invalid(
            key,
            None,
            "the key contains control characters (a line break in the middle?); store it on one line",
        ));
    }
    Ok(())
}

/// What the installed unit may add to one secret.
pub(super) enum Found {
    Yes(Secret, Origin),
    /// An encrypted credential: there for the service, unreadable here.
    Sealed(Origin),
    /// A credential the unit loads that this process did not read, and why.
    Unread(String),
    No,
}

/// The installed unit as a source of secrets: its environment variable (before the file's
/// keys when [`UnitSecrets::first`], else after them) and its credential, read as root.
pub(super) struct UnitSecrets<'a> {
    pub(super) unit: &'a Unit,
    pub(super) env: &'a dyn Fn(&str) -> Option<String>,
    pub(super) first: bool,
    pub(super) as_root: bool,
}

impl UnitSecrets<'_> {
    /// `src` from the caller's sources ([`secret`]) and the unit's, in SPEC's order.
    pub(super) fn secret(
        &self,
        caller_env: &dyn Fn(&str) -> Option<String>,
        src: SecretSource,
    ) -> Result<Found, ConfigError> {
        let (key, var, credential) = (src.inline_key, src.env_var, src.credential);
        let from_env = || -> Result<Option<Found>, ConfigError> {
            let Some(value) = non_empty_secret((self.env)(var)) else {
                return Ok(None);
            };
            let value = Secret::new(value);
            on_one_line(key, &value)?;
            let from = format!(
                "the environment variable {var} of the installed unit {}",
                self.unit.describe()
            );
            Ok(Some(Found::Yes(value, Origin::named(from))))
        };
        if self.first
            && caller_env(var).is_none()
            && let Some(found) = from_env()?
        {
            return Ok(found);
        }
        if let Some((s, o)) = secret(caller_env, src)? {
            return Ok(Found::Yes(s, o));
        }
        if !self.first
            && let Some(found) = from_env()?
        {
            return Ok(found);
        }
        Ok(match self.unit.credential(credential, self.as_root) {
            Credential::NotLoaded | Credential::Missing { .. } => Found::No,
            Credential::Found { value, path } => {
                let value = Secret::new(value);
                on_one_line(key, &value)?;
                let from = format!(
                    "the credential `{credential}` of the installed unit, at {}",
                    path.display()
                );
                Found::Yes(value, Origin::named(from))
            }
            Credential::Encrypted { path } => Found::Sealed(Origin {
                text: format!(
                    "the encrypted credential `{credential}` of the installed unit, at {} (only the service can decrypt it; its value was not checked)",
                    path.display()
                ),
                file: None,
                credential,
                sealed: true,
            }),
            Credential::NotRoot { directive } => Found::Unread(format!(
                "the installed unit loads it as the credential `{credential}` ({directive}), which only root can read; run `sudo coverd check-config`"
            )),
            Credential::Unreadable { path, reason } => Found::Unread(format!(
                "cannot read the credential `{credential}` at {}: {reason}",
                path.display()
            )),
        })
    }
}

fn secret_from_sources(
    env: &dyn Fn(&str) -> Option<String>,
    src: SecretSource,
) -> Result<Option<(Secret, Origin)>, ConfigError> {
    let inline = non_empty_secret(src.inline);
    let file = src.file.filter(|f| !f.is_empty());
    if inline.is_some() && file.is_some() {
        return Err(invalid(
            src.inline_key,
            None,
            format!(
                "`{}` and `{}` are both set; keep only one",
                src.inline_key, src.file_key
            ),
        ));
    }
    if let Some(value) = non_empty_secret(env(src.env_var)) {
        let from = format!("the environment variable {}", src.env_var);
        return Ok(Some((Secret::new(value), Origin::named(from))));
    }
    if let Some(value) = inline {
        let from = format!("`{}` in the configuration file", src.inline_key);
        return Ok(Some((Secret::new(value), Origin::named(from))));
    }
    if let Some(path) = file {
        let value = std::fs::read_to_string(&path).map_err(|e| {
            invalid(
                src.file_key,
                Some(format!("{path:?}")),
                format!("cannot read the key file: {e}"),
            )
        })?;
        return match non_empty_secret(Some(value)) {
            Some(value) => Ok(Some((
                Secret::new(value),
                Origin {
                    text: format!("the file {path} (`{}`)", src.file_key),
                    file: Some(path.into()),
                    credential: src.credential,
                    sealed: false,
                },
            ))),
            None => Err(invalid(
                src.file_key,
                Some(format!("{path:?}")),
                "the key file is empty; put the key in it or remove this setting",
            )),
        };
    }
    let Some(dir) = env(ENV_CREDENTIALS_DIRECTORY) else {
        return Ok(None);
    };
    let path = Path::new(&dir).join(src.credential);
    let cred_error = |reason: String| ConfigError::Env {
        var: ENV_CREDENTIALS_DIRECTORY.into(),
        value: Some(format!("{dir:?}")),
        reason,
    };
    match std::fs::read_to_string(&path) {
        Ok(value) => match non_empty_secret(Some(value)) {
            Some(value) => Ok(Some((
                Secret::new(value),
                Origin::named(format!("the credential `{}` in {dir}", src.credential)),
            ))),
            None => Err(cred_error(format!(
                "credential `{}` is empty; fill it or drop it from the unit",
                src.credential
            ))),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(cred_error(format!(
            "cannot read credential `{}`: {e}",
            src.credential
        ))),
    }
}
