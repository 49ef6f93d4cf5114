//! Checks and parsers for single configuration values (socket addresses, URLs, durations,
//! bounded integers, download hosts, the User-Agent, the notification secret's key), each
//! naming its key in the error, and the checked newtypes `KieBaseUrl`, `UserAgent`, `ApiKey`.
//! The parsers a key declares in `keys` take `(key, value as written)`; [`Shown`] turns a
//! resolved value back into the file's terms for `check-config`. Owns no precedence between
//! sources and no I/O but name lookups (`HOST:PORT`, the group of `storage.local_group`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::{ConfigError, SECRET_SHOWN, Secret, invalid};

/// KIE's API base URL, validated once when the config is read: an http(s) URL with a host,
/// no query or fragment, without trailing slash, e.g. `https://api.kie.ai`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KieBaseUrl(pub(super) String);

impl KieBaseUrl {
    /// Checks `value` as the setting `key` (e.g. `kie.base_url`).
    pub fn parse(key: &str, value: &str) -> Result<KieBaseUrl, ConfigError> {
        http_url(key, value).map(KieBaseUrl)
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// `storage.local_group`: a group of this machine, resolved when the configuration is
/// read, so that a name that does not exist stops the start (exit 2) instead of leaving the
/// files private.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalGroup {
    pub name: String,
    pub gid: u32,
}

pub(super) fn local_group(key: &str, value: String) -> Result<Option<LocalGroup>, ConfigError> {
    if value.is_empty() {
        return Ok(None);
    }
    let shown = Some(format!("{value:?}"));
    if value.len() > 256 || value.contains([':', '/', '\n', '\0']) {
        return Err(invalid(key, shown, "is not a group name"));
    }
    match nix::unistd::Group::from_name(&value) {
        Ok(Some(group)) => Ok(Some(LocalGroup {
            gid: group.gid.as_raw(),
            name: value,
        })),
        Ok(None) => Err(invalid(
            key,
            shown,
            "no such group on this machine; create it (`groupadd NAME`) or leave the key empty",
        )),
        Err(e) => Err(invalid(
            key,
            shown,
            format!("cannot look the group up: {e}"),
        )),
    }
}

impl PartialEq<&str> for KieBaseUrl {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

/// The User-Agent of every outgoing request, validated once when the config is read: not
/// empty, visible ASCII and spaces only (so it is always a valid HTTP header value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserAgent(pub(super) String);

impl UserAgent {
    pub fn parse(value: String) -> Result<UserAgent, ConfigError> {
        user_agent(value).map(UserAgent)
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl PartialEq<&str> for UserAgent {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

/// The KIE API key, validated once when the config is read: trimmed, not empty, no control
/// characters (so `Bearer <key>` is always a valid HTTP header value). `Debug` hides it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey(Secret);

impl ApiKey {
    /// Checks `value` as the setting `key` (e.g. `kie.api_key`).
    pub fn parse(key: &str, value: &Secret) -> Result<ApiKey, ConfigError> {
        let trimmed = value.expose().trim();
        if trimmed.is_empty() {
            return Err(invalid(
                key,
                None,
                "the key is empty; set it or remove the setting",
            ));
        }
        if trimmed.chars().any(char::is_control) {
            return Err(invalid(
                key,
                None,
                "the key contains control characters (a line break in the middle?); store it on one line",
            ));
        }
        Ok(ApiKey(Secret::new(trimmed)))
    }
    pub fn expose(&self) -> &str {
        self.0.expose()
    }
}

// The parsers keys declare: `(key, value as written)`.

pub(super) fn base_url(key: &str, value: String) -> Result<KieBaseUrl, ConfigError> {
    KieBaseUrl::parse(key, &value)
}

pub(super) fn user_agent_of(_key: &str, value: String) -> Result<UserAgent, ConfigError> {
    UserAgent::parse(value)
}

pub(super) fn boolean(_key: &str, value: bool) -> Result<bool, ConfigError> {
    Ok(value)
}

/// A directory path, not empty.
pub(super) fn data_dir(key: &str, value: String) -> Result<PathBuf, ConfigError> {
    non_empty_dir(key, PathBuf::from(value))
}

pub(super) fn non_empty_dir(key: &str, dir: PathBuf) -> Result<PathBuf, ConfigError> {
    if dir.as_os_str().is_empty() {
        return Err(invalid(
            key,
            Some("\"\"".into()),
            "must not be empty; give a directory path",
        ));
    }
    Ok(dir)
}

/// Empty (unset), or an http(s) URL without query or fragment.
pub(super) fn public_url(key: &str, value: String) -> Result<String, ConfigError> {
    if value.is_empty() {
        return Ok(value);
    }
    http_url(key, &value)
}

/// `storage.kind`: `local` or `s3`.
pub(super) fn storage_kind(key: &str, value: String) -> Result<super::StorageKind, ConfigError> {
    match value.as_str() {
        "local" => Ok(super::StorageKind::Local),
        "s3" => Ok(super::StorageKind::S3),
        _ => Err(invalid(
            key,
            Some(format!("{value:?}")),
            "must be \"local\" (files under the data directory) or \"s3\" (an object store)",
        )),
    }
}

/// `storage.endpoint`: empty (AWS), or an `http(s)://` URL without query or fragment.
pub(super) fn s3_endpoint(key: &str, value: String) -> Result<String, ConfigError> {
    if value.is_empty() {
        return Ok(value);
    }
    http_url(key, &value)
}

/// `storage.bucket`: empty (unset), or an S3 bucket name (3–63 of `a–z 0–9 . -`, starting
/// and ending with a letter or digit).
pub(super) fn s3_bucket(key: &str, value: String) -> Result<String, ConfigError> {
    let edge = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    let ok = value.is_empty()
        || ((3..=63).contains(&value.len())
            && value
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-')
            && edge(value.chars().next())
            && edge(value.chars().last()));
    accepted_if(
        ok,
        key,
        value,
        "is not a bucket name: 3–63 of a–z, 0–9, `.` and `-`, starting and ending with a letter or digit",
    )
}

/// `value` when `ok`, else the error that `key`'s value `reason`.
fn accepted_if(ok: bool, key: &str, value: String, reason: &str) -> Result<String, ConfigError> {
    if ok {
        Ok(value)
    } else {
        Err(invalid(key, Some(format!("{value:?}")), reason))
    }
}

/// `storage.region`: not empty, printable ASCII without spaces.
pub(super) fn s3_region(key: &str, value: String) -> Result<String, ConfigError> {
    let ok = !value.is_empty() && value.len() <= 64 && value.chars().all(|c| c.is_ascii_graphic());
    accepted_if(
        ok,
        key,
        value,
        "must be the region the store expects (Garage: its `s3_region`, often \"garage\"; AWS: e.g. \"eu-west-1\")",
    )
}

/// `storage.prefix`: empty, or parts of `A–Z a–z 0–9 . _ -` each ending in `/` (never `.`
/// or `..`), at most 256 bytes: every object key is this followed by a task id and a file
/// name, so a prefix can neither escape into another instance's keys nor be ambiguous.
pub(super) fn s3_prefix(key: &str, value: String) -> Result<String, ConfigError> {
    let part_ok = |p: &str| {
        !p.is_empty()
            && p != "."
            && p != ".."
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    };
    let ok = value.is_empty()
        || (value.len() <= 256
            && value
                .strip_suffix('/')
                .is_some_and(|body| body.split('/').all(part_ok)));
    accepted_if(
        ok,
        key,
        value,
        "must be empty or parts of A–Z, a–z, 0–9, `.`, `_` and `-`, each ending in `/` (e.g. \"coverd-vm1/\")",
    )
}

/// Empty (off), or a socket address.
pub(super) fn optional_addr(key: &str, value: String) -> Result<Option<SocketAddr>, ConfigError> {
    if value.is_empty() {
        return Ok(None);
    }
    parse_addr(key, value).map(Some)
}

pub(super) fn allowed_hosts(_key: &str, hosts: Vec<String>) -> Result<Vec<String>, ConfigError> {
    hosts.iter().map(|h| allowed_host(h)).collect()
}

/// The HMAC key of a notification secret: the base64 after `whsec_`, decoded; `None` when
/// the secret is not of that form.
pub fn notify_key(secret: &Secret) -> Option<Vec<u8>> {
    use base64::Engine as _;
    let b64 = secret.expose().strip_prefix("whsec_")?;
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .ok()
        .filter(|k| !k.is_empty())
}

/// Empty (off), or an http(s) URL; queries are allowed (receivers often carry a token there).
pub(super) fn notify_url(_key: &str, value: String) -> Result<Option<String>, ConfigError> {
    if value.is_empty() {
        return Ok(None);
    }
    let bad = |reason: &str| {
        invalid(
            "notify.url",
            Some(format!("{:?}", url_shown(&value))),
            format!("{reason} (use e.g. \"http://127.0.0.1:9000/coverd\")"),
        )
    };
    if value.chars().any(char::is_whitespace) {
        return Err(bad("must not contain spaces"));
    }
    let url = url::Url::parse(&value).map_err(|e| bad(&format!("not a URL ({e})")))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(bad("must start with http:// or https:// and name a host"));
    }
    Ok(Some(value))
}

/// A URL as `check-config` and error messages show it: its query and password may carry a
/// receiver's token (the notifier treats them as secret), so each is replaced by
/// [`SECRET_SHOWN`](super::SECRET_SHOWN); the rest (scheme, host, path) is printed as given.
pub(super) fn url_shown(value: &str) -> String {
    let (base, query) = match value.split_once('?') {
        Some((base, _)) => (base, Some(super::SECRET_SHOWN)),
        None => (value, None),
    };
    // `scheme://user:password@host…`: hide the password, keep the user name.
    let base = match base.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            match authority.rsplit_once('@') {
                Some((userinfo, host)) if userinfo.contains(':') => {
                    let user = userinfo.split(':').next().unwrap_or_default();
                    format!("{scheme}://{user}:{}@{host}{path}", super::SECRET_SHOWN)
                }
                _ => base.to_string(),
            }
        }
        None => base.to_string(),
    };
    match query {
        Some(q) => format!("{base}?{q}"),
        None => base,
    }
}

/// `IP:PORT`, or `HOST:PORT` resolved now (its first address): `listen`, `metrics_listen`,
/// `COVERD_LISTEN` and `serve --listen` (SPEC: "a host name (localhost:8787) is resolved at
/// start"). The error says what is wrong and how to write it.
pub fn resolve_addr(value: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = value.parse() {
        return Ok(addr);
    }
    let hint = "use HOST:PORT, e.g. 127.0.0.1:8787, [::1]:8787 or localhost:8787";
    if !value.contains(':') || value.chars().any(char::is_whitespace) {
        return Err(format!("not a socket address; {hint}"));
    }
    match std::net::ToSocketAddrs::to_socket_addrs(value) {
        Ok(mut addrs) => addrs
            .next()
            .ok_or_else(|| format!("resolves to no address; {hint}")),
        Err(e) => Err(format!("cannot be resolved ({e}); {hint}")),
    }
}

pub(super) fn parse_addr(key: &str, value: String) -> Result<SocketAddr, ConfigError> {
    resolve_addr(&value).map_err(|reason| invalid(key, Some(format!("{value:?}")), reason))
}

/// An http(s) URL without query or fragment; returned without trailing `/`.
pub(super) fn http_url(key: &str, value: &str) -> Result<String, ConfigError> {
    let bad = |reason: &str| invalid(key, Some(format!("{value:?}")), reason);
    const HINT: &str = "(use e.g. \"https://coverd.example.com\")";
    if value.is_empty() {
        return Err(bad(&format!("must not be empty {HINT}")));
    }
    if value.chars().any(char::is_whitespace) {
        return Err(bad(&format!("must not contain spaces {HINT}")));
    }
    let trimmed = value.trim_end_matches('/');
    let url = url::Url::parse(trimmed).map_err(|e| bad(&format!("not a URL ({e}) {HINT}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(bad(&format!("must start with http:// or https:// {HINT}")));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(bad(&format!("must not have a query or fragment {HINT}")));
    }
    Ok(trimmed.to_string())
}

/// A duration key's value, at least `min` (the key's declared minimum: `keys` passes it).
pub(super) fn duration_at_least(
    key: &str,
    value: String,
    min: Duration,
) -> Result<Duration, ConfigError> {
    let parsed = humantime::parse_duration(&value).map_err(|_| {
        invalid(
            key,
            Some(format!("{value:?}")),
            "not a duration (use e.g. \"30s\", \"2m\")",
        )
    })?;
    if parsed < min {
        let reason = if min == Duration::from_nanos(1) {
            "must be greater than zero".to_string()
        } else {
            format!("must be at least {}", Shown::<String>::shown(&min))
        };
        return Err(invalid(key, Some(format!("{value:?}")), reason));
    }
    Ok(parsed)
}

/// An integer key's value, within `min..=max` (the key's declared bounds: `keys` passes
/// them).
pub(super) fn int_between<T>(
    key: &str,
    value: i64,
    (min, max): (i64, i64),
) -> Result<T, ConfigError>
where
    T: TryFrom<i64>,
{
    let reason = if max == i64::MAX {
        format!("must be at least {min}")
    } else {
        format!("must be between {min} and {max}")
    };
    if value < min || value > max {
        return Err(invalid(key, Some(value.to_string()), reason));
    }
    T::try_from(value).map_err(|_| invalid(key, Some(value.to_string()), reason))
}

pub(super) fn allowed_host(value: &str) -> Result<String, ConfigError> {
    let bad = |reason: &str| {
        invalid(
            "download.allowed_hosts",
            Some(format!("{value:?}")),
            format!(
                "{reason}; list bare host names such as \"tempfile.aiquickdraw.com\" or \"*.kie.ai\""
            ),
        )
    };
    if value.is_empty() {
        return Err(bad("an entry is empty"));
    }
    // `*.domain`: every subdomain of a domain name (KIE's pages do not name every file host).
    if let Some(domain) = value.strip_prefix("*.") {
        return match url::Host::parse(domain) {
            Ok(url::Host::Domain(d)) if d.contains('.') && !d.contains('*') => {
                Ok(format!("*.{}", d.to_ascii_lowercase()))
            }
            _ => Err(bad(
                "a `*.` entry must be followed by a domain name with a dot",
            )),
        };
    }
    if value.contains('*') {
        return Err(bad(
            "`*` is only allowed as a whole first label (`*.example.com`)",
        ));
    }
    if value.contains("://") {
        return Err(bad("an entry has a scheme"));
    }
    if value.contains(['/', '?', '#', '@']) {
        return Err(bad("an entry has a path"));
    }
    let bracketed = value.starts_with('[') && value.ends_with(']');
    if value.contains(':') && !bracketed {
        return Err(bad("an entry has a port"));
    }
    match url::Host::parse(value) {
        Ok(host) => Ok(host.to_string().to_ascii_lowercase()),
        Err(_) => Err(bad("an entry is not a valid host name")),
    }
}

pub(super) fn user_agent(value: String) -> Result<String, ConfigError> {
    if value.is_empty() {
        return Err(invalid(
            "download.user_agent",
            Some("\"\"".into()),
            "must not be empty (KIE's file hosts reject requests without one)",
        ));
    }
    if !value.chars().all(|c| c == ' ' || c.is_ascii_graphic()) {
        return Err(invalid(
            "download.user_agent",
            Some(format!("{value:?}")),
            "may only contain visible ASCII characters and spaces",
        ));
    }
    Ok(value)
}

/// A raw value as an environment variable gives it; only string keys take one (`None` for
/// the others, and `keys`' unit test checks no other kind declares a variable).
pub(super) trait FromEnv: Sized {
    fn from_env(value: String) -> Option<Self>;
}

impl FromEnv for String {
    fn from_env(value: String) -> Option<Self> {
        Some(value)
    }
}

macro_rules! not_from_env {
    ($($t:ty),*) => {$(
        impl FromEnv for $t {
            fn from_env(_: String) -> Option<Self> {
                None
            }
        }
    )*};
}
not_from_env!(i64, bool, Vec<String>);

/// A resolved value in the file's terms (`check-config`), of the raw type `R` of its kind.
pub(super) trait Shown<R> {
    fn shown(&self) -> R;
    /// As `check-config` prints the value of a key whose default the docs write as
    /// `default_doc`; the same as [`Shown::shown`] but for durations.
    fn shown_as(&self, _default_doc: &str) -> R {
        self.shown()
    }
}

macro_rules! shown_as_string {
    ($($t:ty),*) => {$(
        impl Shown<String> for $t {
            fn shown(&self) -> String {
                self.to_string()
            }
        }
    )*};
}
shown_as_string!(String, SocketAddr);

impl Shown<String> for PathBuf {
    fn shown(&self) -> String {
        self.display().to_string()
    }
}

impl<T: Shown<String>> Shown<String> for Option<T> {
    /// Unset or off is `""`.
    fn shown(&self) -> String {
        self.as_ref().map(Shown::shown).unwrap_or_default()
    }
}

impl Shown<String> for Duration {
    /// In the style durations are written in (SPEC "Configuration": `"24h"`, not
    /// `"1day"`): one number and the largest unit that holds it exactly — `d` from two
    /// days, `h`, `m`, `s`, `ms` — else humantime's longer form.
    fn shown(&self) -> String {
        let (secs, nanos) = (self.as_secs(), self.subsec_nanos());
        if nanos == 0 {
            let exact = |unit: u64| secs > 0 && secs % unit == 0;
            if exact(86_400) && secs >= 2 * 86_400 {
                format!("{}d", secs / 86_400)
            } else if exact(3600) {
                format!("{}h", secs / 3600)
            } else if exact(60) {
                format!("{}m", secs / 60)
            } else {
                format!("{secs}s")
            }
        } else if nanos % 1_000_000 == 0 && secs < 10 {
            format!("{}ms", self.as_millis())
        } else {
            humantime::format_duration(*self).to_string()
        }
    }

    /// The default as the docs write it (`"120s"`, `"24h"`) when the value is the default.
    fn shown_as(&self, default_doc: &str) -> String {
        let default = default_doc.trim_matches('"');
        if humantime::parse_duration(default).ok() == Some(*self) {
            default.to_string()
        } else {
            self.shown()
        }
    }
}

impl Shown<String> for KieBaseUrl {
    fn shown(&self) -> String {
        self.0.clone()
    }
}

impl Shown<String> for super::StorageKind {
    fn shown(&self) -> String {
        self.as_str().to_string()
    }
}

impl Shown<String> for LocalGroup {
    fn shown(&self) -> String {
        self.name.clone()
    }
}

impl Shown<String> for UserAgent {
    fn shown(&self) -> String {
        self.0.clone()
    }
}

impl<T: Copy + TryInto<i64>> Shown<i64> for T {
    fn shown(&self) -> i64 {
        (*self).try_into().unwrap_or(i64::MAX)
    }
}

impl Shown<bool> for bool {
    fn shown(&self) -> bool {
        *self
    }
}

impl Shown<Vec<String>> for Vec<String> {
    fn shown(&self) -> Vec<String> {
        self.clone()
    }
}

/// How `check-config` shows a secret: set or not, never the value.
pub(super) fn secret_shown(set: bool) -> String {
    if set { SECRET_SHOWN } else { "" }.into()
}
