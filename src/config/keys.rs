//! The declaration of every configuration file key, once: name, kind, default as written in
//! the file, environment variable, bounds, the rule's wording, the [`Config`] field it sets
//! and, where it is not the kind's own, its parser. From it come the structs the file is
//! parsed into (`RawFile` and one per section, unknown keys rejected), the parsing and bounds
//! checks of every key with its environment override ([`RawFile::apply_declared`]), what
//! `check-config` prints ([`RawFile::shown`]), the key table in docs/configuration.md
//! ([`docs_table`]) and `Config::default()`'s scalar defaults (the unset/off ones, the host
//! list and the versioned User-Agent stay in `Default`, checked against this table by a unit
//! test). Owns no precedence beyond key-by-key (flags, secrets and checks across keys are
//! `config`'s) and no I/O.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::values;
use super::{
    Config, ConfigError, ENV_API_KEY, ENV_DATA_DIR, ENV_LISTEN, ENV_NOTIFY_SECRET,
    ENV_S3_ACCESS_KEY_ID, ENV_S3_SECRET_ACCESS_KEY, ENV_WEBHOOK_HMAC_KEY,
};

/// A duration key's value, at least the minimum declared in [`KEYS`].
fn duration(key: &str, value: String) -> Result<Duration, ConfigError> {
    values::duration_at_least(key, value, duration_min(key))
}

/// An integer key's value, within the bounds declared in [`KEYS`].
fn int_in<T: TryFrom<i64>>(key: &str, value: i64) -> Result<T, ConfigError> {
    values::int_between(key, value, int_bounds(key))
}

/// What kind of value a key takes in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Str,
    Bool,
    Int,
    Duration,
    StrList,
}

/// The range a value must lie in; checked by the kind's parser ([`int_in`], [`duration`])
/// and printed in the docs table.
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
    /// Whether the value is a secret (never echoed, shown as set or unset).
    pub secret: bool,
}

const NS: Duration = Duration::from_nanos(1);
const fn int(min: i64, max: i64) -> Bounds {
    Bounds::Int { min, max }
}
const fn at_least(min: Duration) -> Bounds {
    Bounds::Duration { min }
}

macro_rules! keys {
    (
        $Top:ident {
            $( $tk:ident : $tkind:ident = $tdef:literal, env $tenv:expr, $tb:expr, $trule:literal
                $(=> $($tpath:ident).+ $(as $tsecret:ident)? $(via $tparse:path)?)? ; )*
        }
        $( [$sec:ident] $Sec:ident {
            $( $k:ident : $kind:ident = $def:literal, env $env:expr, $b:expr, $rule:literal
                $(=> $($path:ident).+ $(as $secret:ident)? $(via $parse:path)?)? ; )*
        } )*
    ) => {
        /// Every key the configuration file accepts, in the docs table's order.
        pub const KEYS: &[KeyDecl] = &[
            $(key!(@decl stringify!($tk), $tkind, $tdef, $tenv, $tb, $trule,
                [$($($tsecret)?)?]),)*
            $($(key!(@decl concat!(stringify!($sec), ".", stringify!($k)), $kind, $def, $env,
                $b, $rule, [$($($secret)?)?]),)*)*
        ];

        /// The file as written: every key optional, unknown keys rejected, each value of its
        /// declared kind. No `Debug`: it may hold secrets.
        #[derive(Deserialize, Serialize, Default)]
        #[serde(deny_unknown_fields)]
        pub(super) struct $Top {
            $(pub(super) $tk: Option<key!(@raw $tkind)>,)*
            $(pub(super) $sec: Option<$Sec>,)*
        }

        $(
            #[derive(Deserialize, Serialize, Default)]
            #[serde(deny_unknown_fields)]
            pub(super) struct $Sec {
                $(pub(super) $k: Option<key!(@raw $kind)>,)*
            }
        )*

        impl $Top {
            /// Every section present (and every key unset): what [`super::keys`] lists.
            pub(super) fn all_sections() -> Self {
                $Top { $($sec: Some($Sec::default()),)* ..$Top::default() }
            }

            /// Moves every value of a key with a field in [`Config`] out of the file (or,
            /// where the key has one, out of its environment variable, which wins) into
            /// `config`, parsed and checked. Keys a flag sets are skipped; secret keys and
            /// the `*_file` keys stay for the secret step.
            pub(super) fn apply_declared(
                &mut self,
                config: &mut Config,
                src: &Sources<'_>,
            ) -> Result<(), ConfigError> {
                $(key!(@apply config, src, self.$tk.take(), stringify!($tk), $tenv, $tkind,
                    [$($($tpath).+)?], [$($($tsecret)?)?], [$($($tparse)?)?]);)*
                $(
                    let section = self.$sec.get_or_insert_with(Default::default);
                    $(key!(@apply config, src, section.$k.take(),
                        concat!(stringify!($sec), ".", stringify!($k)), $env, $kind,
                        [$($($path).+)?], [$($($secret)?)?], [$($($parse)?)?]);)*
                )*
                Ok(())
            }

            /// `config` as the file would say it (`check-config`): secrets as
            /// [`super::SECRET_SHOWN`] or `""`, keys without a field of their own (the
            /// `*_file` keys) left out.
            pub(super) fn shown(config: &Config) -> Self {
                $Top {
                    $($tk: key!(@show config, [$($($tpath).+)?], [$($($tsecret)?)?], $tdef),)*
                    $($sec: Some($Sec {
                        $($k: key!(@show config, [$($($path).+)?], [$($($secret)?)?], $def),)*
                    }),)*
                }
            }
        }
    };
}

/// The pieces [`keys!`] generates for one key.
macro_rules! key {
    (@decl $name:expr, $kind:ident, $default:expr, $env:expr, $bounds:expr, $rule:expr,
        [$($secret:ident)?]) => {
        KeyDecl {
            name: $name,
            kind: Kind::$kind,
            default: $default,
            env: $env,
            bounds: $bounds,
            rule: $rule,
            secret: key!(@is_secret [$($secret)?]),
        }
    };
    (@is_secret []) => { false };
    (@is_secret [secret]) => { true };

    (@raw Str) => { String };
    (@raw Bool) => { bool };
    (@raw Int) => { i64 };
    (@raw Duration) => { String };
    (@raw StrList) => { Vec<String> };

    // The parser of a kind, for keys that declare none (a `Str` or `StrList` key with a
    // field names its own: there is no check every string could share).
    (@parser Bool) => { values::boolean };
    (@parser Int) => { int_in };
    (@parser Duration) => { duration };

    // No field of its own, or a secret: read by the secret step.
    (@apply $c:ident, $src:ident, $v:expr, $name:expr, $env:expr, $kind:ident,
        [], [], []) => {};
    (@apply $c:ident, $src:ident, $v:expr, $name:expr, $env:expr, $kind:ident,
        [$($p:ident).+], [secret], []) => {};
    (@apply $c:ident, $src:ident, $v:expr, $name:expr, $env:expr, $kind:ident,
        [$($p:ident).+], [], []) => {
        key!(@apply $c, $src, $v, $name, $env, $kind, [$($p).+], [], [key!(@parser $kind)])
    };
    (@apply $c:ident, $src:ident, $v:expr, $name:expr, $env:expr, $kind:ident,
        [$($p:ident).+], [], [$parse:expr]) => {
        if let Some((value, blame)) = $src.value($name, $env, $v) {
            $c.$($p).+ = $parse($name, value).map_err(|e| e.blamed(blame, $src.unit))?;
        }
    };

    (@show $c:ident, [], [], $def:literal) => { None };
    (@show $c:ident, [$($p:ident).+], [secret], $def:literal) => { Some(values::secret_shown($c.$($p).+.is_some())) };
    (@show $c:ident, [$($p:ident).+], [], $def:literal) => { Some(values::Shown::shown_as(&$c.$($p).+, $def)) };
}

// One line a key: `name: Kind = default as the docs show it, env VAR, bounds, "the rule's
// wording after the bounds" => the field of `Config` it sets [as secret] [via parser]`.
// Without a parser the kind's own is used (bounds checked; `Bool`, `Int`, `Duration`);
// `as secret` fields are filled
// by the secret step and shown as set/unset; keys without a field (`*_file`) only feed the
// secret step.
keys! {
    RawFile {
        data_dir: Str = r#""./coverd-data""#, env Some(ENV_DATA_DIR), Bounds::None,
            "not empty; flag `--data-dir`" => data_dir via values::data_dir;
        listen: Str = r#""127.0.0.1:8787""#, env Some(ENV_LISTEN), Bounds::None,
            "`IP:PORT` (`[::1]:8787` for IPv6) or `HOST:PORT`, resolved at start; flag `--listen`" => listen via values::parse_addr;
        public_url: Str = r#""""#, env None, Bounds::None,
            "empty, or an `http(s)://` URL without query or fragment; trailing `/` removed"
            => public_url via values::public_url;
        accept_unknown_tasks: Bool = "false", env None, Bounds::None, "" => accept_unknown_tasks;
        metrics_listen: Str = r#""" (off)"#, env None, Bounds::None, "empty, or `IP:PORT` or `HOST:PORT`"
            => metrics_listen via values::optional_addr;
    }
    [kie] RawKie {
        base_url: Str = r#""https://api.kie.ai""#, env None, Bounds::None,
            "an `http(s)://` URL; trailing `/` removed" => kie.base_url via values::base_url;
        api_key: Str = "unset", env Some(ENV_API_KEY), Bounds::None, "secret, see below"
            => kie.api_key as secret;
        api_key_file: Str = "unset", env None, Bounds::None, "path of a file holding the API key";
        webhook_hmac_key: Str = "unset", env Some(ENV_WEBHOOK_HMAC_KEY), Bounds::None,
            "secret, see below" => kie.webhook_hmac_key as secret;
        webhook_hmac_key_file: Str = "unset", env None, Bounds::None,
            "path of a file holding the HMAC key";
        signature_tolerance: Duration = r#""5m""#, env None, at_least(NS), ""
            => kie.signature_tolerance;
        confirm_callbacks: Bool = "true", env None, Bounds::None, "" => kie.confirm_callbacks;
        requests_per_10s: Int = "18", env None, int(1, 1000), "" => kie.requests_per_10s;
    }
    [download] RawDownload {
        concurrency: Int = "4", env None, int(1, 64), "" => download.concurrency;
        max_image_bytes: Int = "26214400", env None, int(1024, i64::MAX), ""
            => download.max_image_bytes;
        max_audio_bytes: Int = "104857600", env None, int(1024, i64::MAX), ""
            => download.max_audio_bytes;
        max_wav_bytes: Int = "524288000", env None, int(1024, i64::MAX), ""
            => download.max_wav_bytes;
        max_video_bytes: Int = "1073741824", env None, int(1024, i64::MAX), ""
            => download.max_video_bytes;
        max_attempts: Int = "8", env None, int(1, 100), "" => download.max_attempts;
        backoff_base: Duration = r#""2s""#, env None, at_least(NS),
            " and ≤ `download.backoff_max`" => download.backoff_base;
        backoff_max: Duration = r#""5m""#, env None, at_least(Duration::ZERO), ""
            => download.backoff_max;
        timeout: Duration = r#""120s""#, env None, at_least(Duration::from_secs(1)),
            "; to the response headers, and the longest stall between bytes"
            => download.timeout;
        min_bytes_per_second: Int = "65536", env None, int(0, i64::MAX),
            "; averaged over 30 s once the body flows; slower is a transient failure; 0: no floor"
            => download.min_bytes_per_second;
        allowed_hosts: StrList = r#"["*.aiquickdraw.com", "*.kie.ai"]"#, env None, Bounds::None,
            "bare host names or IPs, no scheme, path or port; `*.domain` for its subdomains; lower-cased; `[]` allows any host"
            => download.allowed_hosts via values::allowed_hosts;
        allow_http: Bool = "false", env None, Bounds::None, "" => download.allow_http;
        allow_private_networks: Bool = "false", env None, Bounds::None, ""
            => download.allow_private_networks;
        user_agent: Str = r#""coverd/<version>""#, env None, Bounds::None,
            "not empty; visible ASCII and spaces only" => download.user_agent
            via values::user_agent_of;
    }
    [poll] RawPoll {
        after: Duration = r#""2m""#, env None, at_least(Duration::ZERO), "" => poll.after;
        interval: Duration = r#""30s""#, env None, at_least(Duration::from_secs(1)), ""
            => poll.interval;
        give_up_after: Duration = r#""24h""#, env None, at_least(NS), "" => poll.give_up_after;
    }
    [notify] RawNotify {
        url: Str = r#""" (off)"#, env None, Bounds::None,
            "empty, or an `http(s)://` URL (a query is kept); the image URL guard does not apply"
            => notify.url via values::notify_url;
        secret_file: Str = "unset", env Some(ENV_NOTIFY_SECRET), Bounds::None,
            "path of a file holding the signing secret, `whsec_` + base64; required when `notify.url` is set; see below";
        timeout: Duration = r#""10s""#, env None, at_least(NS), "; per attempt" => notify.timeout;
        max_attempts: Int = "12", env None, int(1, 100), "" => notify.max_attempts;
    }
    [storage] RawStorage {
        local_group: Str = r#""" (off)"#, env None, Bounds::None,
            "empty, or the name of an existing group (resolved at start); `images/` and what is in it become readable by that group (0750 / 0640), the data directory traversable by it (0710); see below"
            => storage.local_group via values::local_group;
        kind: Str = r#""local""#, env None, Bounds::None,
            "`local` (files under the data directory) or `s3` (an S3-compatible object store, the keys below)"
            => storage.kind via values::storage_kind;
        endpoint: Str = r#""""#, env None, Bounds::None,
            "with `s3`: the store's `http(s)://` URL (Garage `http://127.0.0.1:3900`); empty: AWS's endpoint for `region`"
            => storage.s3.endpoint via values::s3_endpoint;
        bucket: Str = r#""""#, env None, Bounds::None,
            "with `s3`: required; 3–63 of `a–z 0–9 . -`" => storage.s3.bucket via values::s3_bucket;
        region: Str = r#""garage""#, env None, Bounds::None,
            "not empty; what the store expects (Garage: its `s3_region`)" => storage.s3.region via values::s3_region;
        prefix: Str = r#""""#, env None, Bounds::None,
            "empty, or parts of `A–Z a–z 0–9 . _ -` each ending in `/` (`coverd-vm1/`); one per instance sharing a bucket"
            => storage.s3.prefix via values::s3_prefix;
        path_style: Bool = "true", env None, Bounds::None,
            "`true`: `endpoint/bucket/key` (Garage, MinIO); `false`: `bucket.endpoint/key`" => storage.s3.path_style;
        access_key_id: Str = "unset", env Some(ENV_S3_ACCESS_KEY_ID), Bounds::None,
            "secret, see below; required with `s3`" => storage.s3.access_key_id as secret;
        secret_access_key_file: Str = "unset", env Some(ENV_S3_SECRET_ACCESS_KEY), Bounds::None,
            "path of a file holding the secret access key; required with `s3`; see below";
    }
}

/// Where [`RawFile::apply_declared`] takes a key's value from besides the file.
pub(super) struct Sources<'a> {
    /// The caller's environment.
    pub(super) env: &'a dyn Fn(&str) -> Option<String>,
    /// The installed unit's `Environment=` (commands other than `serve`; else nothing).
    pub(super) unit_env: &'a dyn Fn(&str) -> Option<String>,
    /// Whether the unit's environment beats the file: the file is the unit's own (or there is
    /// none), so the service sees it that way; under any other file the unit fills in only
    /// what the file leaves unset (SPEC's precedence table).
    pub(super) unit_first: bool,
    /// The unit in words, for errors.
    pub(super) unit: &'a str,
    /// Whether a command-line flag sets the key (then neither file nor environment count).
    pub(super) flagged: &'a dyn Fn(&str) -> bool,
}

impl Sources<'_> {
    /// The value in force for `name` and where it came from; `None` when no source sets it
    /// or a flag decides. Order: the caller's environment, then the file and the unit's
    /// environment (which first: [`Sources::unit_first`]).
    pub(super) fn value<R: values::FromEnv>(
        &self,
        name: &str,
        env: Option<&'static str>,
        file: Option<R>,
    ) -> Option<(R, super::Blame)> {
        use super::Blame;
        if (self.flagged)(name) {
            return None;
        }
        let from = |lookup: &dyn Fn(&str) -> Option<String>, blame: fn(&'static str) -> Blame| {
            env.and_then(|var| Some((R::from_env(lookup(var)?)?, blame(var))))
        };
        let caller = from(self.env, Blame::Env);
        let unit = || from(self.unit_env, Blame::Unit);
        let file = file.map(|v| (v, Blame::File));
        if self.unit_first {
            caller.or_else(unit).or(file)
        } else {
            caller.or(file).or_else(unit)
        }
    }
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
// They are written as the docs show them (TOML text), not as typed Rust values: the same text
// is the docs table's default column and what `check-config` compares a value with, and some
// of it is wording no value has (`unset`, `"" (off)`, `"coverd/<version>"`); typed defaults
// would need that text beside them in every line, and a second macro arm per kind to format
// it back, for a parse that a unit test already runs on every default.

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

    /// An environment variable reaches a key's parser only for string keys
    /// (`values::FromEnv`), and a secret is the only kind of value shown masked.
    #[test]
    fn environment_variables_are_declared_on_string_keys() {
        for k in KEYS {
            if k.env.is_some() {
                assert_eq!(
                    k.kind,
                    Kind::Str,
                    "{} takes an environment variable",
                    k.name
                );
            }
            if k.secret {
                assert!(
                    k.env.is_some(),
                    "secret {} has no environment variable",
                    k.name
                );
            }
        }
        assert_eq!(KEYS.iter().filter(|k| k.secret).count(), 3);
    }

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
