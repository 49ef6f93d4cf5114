//! The declaration table of every configuration file key: name, kind, default as written in
//! the file, environment variable, bounds and the rule's wording, once per key. The bounds
//! checks in `resolve` and the key table in docs/configuration.md ([`docs_table`]) come from
//! here, and so do `Config::default()`'s scalar defaults (the unset/off ones, the host list and
//! the versioned User-Agent stay in `Default`, checked against this table by a unit test).
//! Owns no parsing of file values and no I/O.

use std::time::Duration;

use super::{ENV_API_KEY, ENV_DATA_DIR, ENV_LISTEN, ENV_NOTIFY_SECRET, ENV_WEBHOOK_HMAC_KEY};

/// What kind of value a key takes in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Str,
    Bool,
    Int,
    Duration,
    StrList,
}

/// The range a value must lie in; checked by `resolve` and printed in the docs table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bounds {
    None,
    /// An integer in `min..=max`; `max == i64::MAX` means no upper bound.
    Int {
        min: i64,
        max: i64,
    },
    /// A duration of at least `min`; `min == 1ns` reads as "greater than zero".
    Duration {
        min: Duration,
    },
}

/// One key of the configuration file.
#[derive(Debug, Clone, Copy)]
pub struct KeyDecl {
    /// Dotted (`download.concurrency`).
    pub name: &'static str,
    pub kind: Kind,
    /// The default as the docs show it (TOML syntax, or `unset`).
    pub default: &'static str,
    /// The environment variable that overrides the key, if any.
    pub env: Option<&'static str>,
    pub bounds: Bounds,
    /// The rule's wording after what `bounds` says (which is printed first).
    pub rule: &'static str,
}

const NS: Duration = Duration::from_nanos(1);
const fn int(min: i64, max: i64) -> Bounds {
    Bounds::Int { min, max }
}
const fn at_least(min: Duration) -> Bounds {
    Bounds::Duration { min }
}

macro_rules! keys {
    ($( $name:literal : $kind:ident = $default:literal, env $env:expr, $bounds:expr, $rule:literal; )*) => {
        /// Every key the configuration file accepts, in the docs table's order.
        pub const KEYS: &[KeyDecl] = &[$(KeyDecl {
            name: $name,
            kind: Kind::$kind,
            default: $default,
            env: $env,
            bounds: $bounds,
            rule: $rule,
        }),*];
    };
}

keys! {
    "data_dir": Str = r#""./coverd-data""#, env Some(ENV_DATA_DIR), Bounds::None, "not empty; flag `--data-dir`";
    "listen": Str = r#""127.0.0.1:8787""#, env Some(ENV_LISTEN), Bounds::None, "`IP:PORT` (`[::1]:8787` for IPv6); flag `--listen`";
    "public_url": Str = r#""""#, env None, Bounds::None, "empty, or an `http(s)://` URL without query or fragment; trailing `/` removed";
    "accept_unknown_tasks": Bool = "false", env None, Bounds::None, "";
    "metrics_listen": Str = r#""" (off)"#, env None, Bounds::None, "empty, or `IP:PORT`";
    "kie.base_url": Str = r#""https://api.kie.ai""#, env None, Bounds::None, "an `http(s)://` URL; trailing `/` removed";
    "kie.api_key": Str = "unset", env Some(ENV_API_KEY), Bounds::None, "secret, see below";
    "kie.api_key_file": Str = "unset", env None, Bounds::None, "path of a file holding the API key";
    "kie.webhook_hmac_key": Str = "unset", env Some(ENV_WEBHOOK_HMAC_KEY), Bounds::None, "secret, see below";
    "kie.webhook_hmac_key_file": Str = "unset", env None, Bounds::None, "path of a file holding the HMAC key";
    "kie.signature_tolerance": Duration = r#""5m""#, env None, at_least(NS), "";
    "kie.confirm_callbacks": Bool = "true", env None, Bounds::None, "";
    "kie.requests_per_10s": Int = "18", env None, int(1, 1000), "";
    "download.concurrency": Int = "4", env None, int(1, 64), "";
    "download.max_image_bytes": Int = "26214400", env None, int(1024, i64::MAX), "";
    "download.max_attempts": Int = "8", env None, int(1, 100), "";
    "download.backoff_base": Duration = r#""2s""#, env None, at_least(NS), " and ≤ `download.backoff_max`";
    "download.backoff_max": Duration = r#""5m""#, env None, at_least(Duration::ZERO), "";
    "download.timeout": Duration = r#""120s""#, env None, at_least(Duration::from_secs(1)), "";
    "download.allowed_hosts": StrList = r#"["tempfile.aiquickdraw.com"]"#, env None, Bounds::None, "bare host names or IPs, no scheme, path or port; lower-cased; `[]` allows any host";
    "download.allow_http": Bool = "false", env None, Bounds::None, "";
    "download.allow_private_networks": Bool = "false", env None, Bounds::None, "";
    "download.user_agent": Str = r#""coverd/<version>""#, env None, Bounds::None, "not empty; visible ASCII and spaces only";
    "poll.after": Duration = r#""2m""#, env None, at_least(Duration::ZERO), "";
    "poll.interval": Duration = r#""30s""#, env None, at_least(Duration::from_secs(1)), "";
    "poll.give_up_after": Duration = r#""24h""#, env None, at_least(NS), "";
    "notify.url": Str = r#""" (off)"#, env None, Bounds::None, "empty, or an `http(s)://` URL (a query is kept); the image URL guard does not apply";
    "notify.secret_file": Str = "unset", env Some(ENV_NOTIFY_SECRET), Bounds::None, "path of a file holding the signing secret, `whsec_` + base64; required when `notify.url` is set; see below";
    "notify.timeout": Duration = r#""10s""#, env None, at_least(NS), "; per attempt";
    "notify.max_attempts": Int = "12", env None, int(1, 100), "";
}

/// The declaration of `name`. Panics on a name not in [`KEYS`]: callers pass literals, and
/// the unit tests resolve every key.
pub fn decl(name: &str) -> &'static KeyDecl {
    KEYS.iter()
        .find(|k| k.name == name)
        .unwrap_or_else(|| panic!("configuration key `{name}` is not declared in config::keys"))
}

/// `(min, max)` of an integer key.
pub(super) fn int_bounds(name: &str) -> (i64, i64) {
    match decl(name).bounds {
        Bounds::Int { min, max } => (min, max),
        other => panic!("configuration key `{name}` has no integer bounds: {other:?}"),
    }
}

/// The minimum of a duration key.
pub(super) fn duration_min(name: &str) -> Duration {
    match decl(name).bounds {
        Bounds::Duration { min } => min,
        other => panic!("configuration key `{name}` has no duration bounds: {other:?}"),
    }
}

// The built-in defaults, read from the declarations by `Config::default()`. A declared
// default that does not parse as its kind panics there; every test builds a default config.

/// The declared default of a string key, without its quotes.
pub(super) fn default_str(name: &str) -> &'static str {
    let d = decl(name).default;
    d.split(" (").next().unwrap_or(d).trim_matches('"')
}

/// The declared default of a boolean key.
pub(super) fn default_bool(name: &str) -> bool {
    match decl(name).default {
        "true" => true,
        "false" => false,
        other => panic!("configuration key `{name}`: default {other:?} is not a boolean"),
    }
}

/// The declared default of an integer key.
pub(super) fn default_int<T: std::str::FromStr>(name: &str) -> T {
    let d = decl(name).default;
    d.parse().unwrap_or_else(|_| {
        panic!("configuration key `{name}`: default {d:?} is not an integer that fits")
    })
}

/// The declared default of a duration key.
pub(super) fn default_duration(name: &str) -> Duration {
    let d = default_str(name);
    humantime::parse_duration(d)
        .unwrap_or_else(|_| panic!("configuration key `{name}`: default {d:?} is not a duration"))
}

impl KeyDecl {
    /// The docs table's rule column: the bounds, then the rest of the wording.
    pub fn rule_text(&self) -> String {
        let bounds = match self.bounds {
            Bounds::None => String::new(),
            Bounds::Int { min, max: i64::MAX } => format!("≥ {min}"),
            Bounds::Int { min, max } => format!("{min}–{max}"),
            Bounds::Duration { min } if min == Duration::ZERO => "duration".into(),
            Bounds::Duration { min } if min == NS => "duration > 0".into(),
            Bounds::Duration { min } => {
                format!("duration ≥ {}", humantime::format_duration(min))
            }
        };
        format!("{bounds}{}", self.rule)
    }
}

/// The key table of docs/configuration.md ("## Keys"), header included, one line per key,
/// each line ending in `\n`.
pub fn docs_table() -> String {
    let mut out = String::from("| key | default | env | rule |\n| --- | --- | --- | --- |\n");
    for k in KEYS {
        let env = k.env.map(|e| format!("`{e}`")).unwrap_or_default();
        let default = match k.default {
            "unset" => "unset".to_string(),
            d => match d.split_once(" (") {
                Some((value, note)) => format!("`{value}` ({note}"),
                None => format!("`{d}`"),
            },
        };
        let rule = k.rule_text();
        let cell = |s: &str| {
            if s.is_empty() {
                String::new()
            } else {
                format!(" {s}")
            }
        };
        out.push_str(&format!(
            "| `{}` | {default} |{} |{} |\n",
            k.name,
            cell(&env),
            cell(&rule)
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    /// The declared defaults and kinds are the ones `Config::default()` holds, as
    /// `check-config` prints them; secrets and `*_file` keys are declared `unset`.
    #[test]
    fn declared_defaults_and_kinds_are_the_built_in_ones() {
        let shown: toml::Table = toml::from_str(&Config::default().effective_toml()).unwrap();
        for k in KEYS {
            let value = match k.name.split_once('.') {
                Some((section, key)) => shown[section].as_table().unwrap().get(key),
                None => shown.get(k.name),
            };
            let Some(value) = value.filter(|_| k.default != "unset") else {
                assert!(
                    k.default == "unset" && value.is_none_or(|v| v.as_str() == Some("")),
                    "{}: declared {:?}, built in {value:?}",
                    k.name,
                    k.default
                );
                continue;
            };
            let declared = k.default.split(" (").next().unwrap();
            let built_in = value.to_string();
            let built_in = if k.name == "download.user_agent" {
                built_in.replace(env!("CARGO_PKG_VERSION"), "<version>")
            } else {
                built_in
            };
            if k.kind == Kind::Duration {
                let parse = |s: &str| humantime::parse_duration(s.trim_matches('"')).unwrap();
                assert_eq!(parse(declared), parse(&built_in), "default of {}", k.name);
            } else {
                assert_eq!(declared, built_in, "default of {}", k.name);
            }
            let kind = match value {
                toml::Value::Boolean(_) => Kind::Bool,
                toml::Value::Integer(_) => Kind::Int,
                toml::Value::Array(_) => Kind::StrList,
                toml::Value::String(_) if k.kind == Kind::Duration => Kind::Duration,
                _ => Kind::Str,
            };
            assert_eq!(k.kind, kind, "kind of {}", k.name);
            let bounded = match k.bounds {
                Bounds::None => None,
                Bounds::Int { .. } => Some(Kind::Int),
                Bounds::Duration { .. } => Some(Kind::Duration),
            };
            assert!(
                bounded.is_none_or(|b| b == k.kind),
                "bounds of {} do not fit its kind",
                k.name
            );
        }
    }
}
