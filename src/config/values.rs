//! Checks and parsers for single configuration values (socket addresses, URLs, durations,
//! bounded integers, download hosts, the User-Agent, the notification secret's key), each
//! naming its key in the error. Owns no precedence between sources and no I/O.

use std::net::SocketAddr;
use std::time::Duration;

use super::{ConfigError, Secret, invalid, keys};

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

/// An http(s) URL; queries are allowed (receivers often carry a token there).
pub(super) fn notify_url(value: &str) -> Result<String, ConfigError> {
    let bad = |reason: &str| {
        invalid(
            "notify.url",
            Some(format!("{value:?}")),
            format!("{reason} (use e.g. \"http://127.0.0.1:9000/coverd\")"),
        )
    };
    if value.chars().any(char::is_whitespace) {
        return Err(bad("must not contain spaces"));
    }
    let url = url::Url::parse(value).map_err(|e| bad(&format!("not a URL ({e})")))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(bad("must start with http:// or https:// and name a host"));
    }
    Ok(value.to_string())
}

pub(super) const ADDR_HINT: &str =
    "not a socket address (use e.g. \"127.0.0.1:8787\" or \"[::1]:8787\")";

pub(super) fn parse_addr(key: &str, value: &str) -> Result<SocketAddr, ConfigError> {
    value
        .parse()
        .map_err(|_| invalid(key, Some(format!("{value:?}")), ADDR_HINT))
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

/// A duration key's value, or its default; at least the minimum declared in [`keys::KEYS`].
pub(super) fn duration(
    key: &str,
    value: Option<String>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    let min = keys::duration_min(key);
    let Some(value) = value else {
        return Ok(default);
    };
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
            format!("must be at least {}", humantime::format_duration(min))
        };
        return Err(invalid(key, Some(format!("{value:?}")), reason));
    }
    Ok(parsed)
}

/// An integer key's value, or its default; within the bounds declared in [`keys::KEYS`].
pub(super) fn int_in<T>(key: &str, value: Option<i64>, default: T) -> Result<T, ConfigError>
where
    T: TryFrom<i64>,
{
    let (min, max) = keys::int_bounds(key);
    let Some(value) = value else {
        return Ok(default);
    };
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
            format!("{reason}; list bare host names such as \"tempfile.aiquickdraw.com\""),
        )
    };
    if value.is_empty() {
        return Err(bad("an entry is empty"));
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
