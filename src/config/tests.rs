//! Unit tests of loading the configuration: sources, precedence, bounds, messages.

use super::toml_errors::{key_at, redact_strings};
use super::*;
use std::collections::HashMap;

/// An injected environment built from pairs.
fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let map: HashMap<String, String> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    move |name| map.get(name).cloned()
}

fn no_env() -> impl Fn(&str) -> Option<String> {
    env_of(&[])
}

/// Write `text` as a config file and load it with `env`.
fn load_toml(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("coverd.toml");
    std::fs::write(&path, text).unwrap();
    let overrides = Overrides {
        config_file: Some(path),
        ..Overrides::default()
    };
    load_with_env(&overrides, &env_of(env))
}

fn load_ok(text: &str) -> Config {
    match load_toml(text, &[]) {
        Ok(config) => config,
        Err(e) => panic!("{text:?} should load, got: {e}"),
    }
}

fn load_err(text: &str) -> ConfigError {
    match load_toml(text, &[]) {
        Ok(_) => panic!("{text:?} should be rejected"),
        Err(e) => e,
    }
}

fn invalid_key(err: &ConfigError) -> &str {
    match err {
        ConfigError::Invalid { key, .. } => key,
        other => panic!("expected Invalid, got {other:?}"),
    }
}

const SPEC_EXAMPLE: &str = r#"
data_dir = "./coverd-data"        # env COVERD_DATA_DIR
listen = "127.0.0.1:8787"         # env COVERD_LISTEN; the callback listener
public_url = ""                   # how KIE reaches this daemon; callBackUrl = public_url + "/callbacks/cover"
accept_unknown_tasks = false      # take callbacks for task ids never submitted or tracked here
metrics_listen = ""               # e.g. "127.0.0.1:9187": Prometheus text at /metrics; off when empty

[kie]
base_url = "https://api.kie.ai"
api_key = ""                      # or env KIE_API_KEY, or api_key_file, or systemd credential "kie-api-key"
api_key_file = ""
webhook_hmac_key = ""             # or env KIE_WEBHOOK_HMAC_KEY, or webhook_hmac_key_file, or credential "kie-webhook-hmac-key"
webhook_hmac_key_file = ""
signature_tolerance = "5m"        # accepted clock skew of X-Webhook-Timestamp
confirm_callbacks = true          # with an API key: take image URLs from record-info, not the callback body
requests_per_10s = 18             # client-side limit on KIE API calls (KIE allows 20 per 10 s)

[download]
concurrency = 4
max_image_bytes = 26214400        # covers and track images
max_audio_bytes = 104857600       # MP3 tracks and stems
max_wav_bytes = 524288000
max_video_bytes = 1073741824
max_attempts = 8                  # per image, transient failures
backoff_base = "2s"               # exponential backoff with jitter
backoff_max = "5m"
timeout = "120s"                  # to the response headers, and the longest stall between bytes
min_bytes_per_second = 65536      # averaged over 30 s once the body flows (curl's --speed-limit); slower is a transient failure
allowed_hosts = ["*.aiquickdraw.com", "*.kie.ai"]   # "*.domain" matches its subdomains; empty list: any host
allow_http = false                # plain http image URLs (tests, private mirrors)
allow_private_networks = false    # loopback / private / link-local targets (tests only)
user_agent = "coverd/<version>"   # KIE's file hosts reject requests without one

[poll]
after = "2m"                      # wait this long for a callback before polling record-info
interval = "30s"
give_up_after = "24h"             # then the task fails with "no result from KIE"

[notify]
url = ""                  # POST here when a task settles (downloaded or failed); off when empty
secret_file = ""          # signing key ("whsec_" + base64), or env COVERD_NOTIFY_SECRET, or credential "notify-secret"
timeout = "10s"
max_attempts = 12         # backoff with jitter from 5 s, doubling, at most 1 h apart
"#;

#[test]
fn defaults_when_no_file() {
    let config = load_with_env(&Overrides::default(), &no_env()).unwrap();
    assert_eq!(format!("{config:?}"), format!("{:?}", Config::default()));
    // An empty COVERD_CONFIG counts as unset.
    let config = load_with_env(&Overrides::default(), &env_of(&[(ENV_CONFIG, "")])).unwrap();
    assert_eq!(format!("{config:?}"), format!("{:?}", Config::default()));
}

#[test]
fn default_values_match_spec() {
    let c = Config::default();
    assert_eq!(c.listen.to_string(), "127.0.0.1:8787");
    assert_eq!(c.data_dir, PathBuf::from("./coverd-data"));
    assert_eq!(
        c.download.user_agent.as_str(),
        format!("coverd/{}", env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(
        c.download.allowed_hosts,
        vec!["*.aiquickdraw.com", "*.kie.ai"]
    );
    assert_eq!(c.download.max_audio_bytes, 104_857_600);
    assert_eq!(c.download.max_wav_bytes, 524_288_000);
    assert_eq!(c.download.max_video_bytes, 1_073_741_824);
    assert_eq!(c.poll.give_up_after, Duration::from_secs(86_400));
}

#[test]
fn spec_example_file_parses_to_defaults() {
    let mut config = load_ok(SPEC_EXAMPLE);
    assert_eq!(config.download.user_agent, "coverd/<version>");
    config.download.user_agent = Config::default().download.user_agent;
    // The example names `data_dir` (its default value), so it counts as named.
    assert!(config.data_dir_named);
    config.data_dir_named = false;
    assert_eq!(format!("{config:?}"), format!("{:?}", Config::default()));
}

#[test]
fn every_key_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("hmac");
    std::fs::write(&key_file, "hmac-secret\n").unwrap();
    let text = format!(
        r#"
data_dir = "/var/lib/coverd"
listen = "[::1]:9000"
public_url = "https://coverd.example.com/hooks/"
accept_unknown_tasks = true
metrics_listen = "127.0.0.1:9187"
[kie]
base_url = "http://127.0.0.1:4000/"
api_key = "api-secret"
webhook_hmac_key_file = {key_file:?}
signature_tolerance = "90s"
confirm_callbacks = false
requests_per_10s = 5
[download]
concurrency = 16
max_image_bytes = 1024
max_attempts = 3
backoff_base = "500ms"
backoff_max = "1m"
timeout = "10s"
allowed_hosts = ["Files.Example.COM", "10.0.0.1", "[::1]"]
allow_http = true
allow_private_networks = true
user_agent = "test agent/1.0 (+https://x.example)"
[poll]
after = "0s"
interval = "1s"
give_up_after = "30d"
"#
    );
    let c = load_ok(&text);
    assert_eq!(c.data_dir, PathBuf::from("/var/lib/coverd"));
    assert_eq!(c.listen, "[::1]:9000".parse().unwrap());
    assert_eq!(c.public_url, "https://coverd.example.com/hooks");
    assert!(c.accept_unknown_tasks);
    assert_eq!(c.metrics_listen, Some("127.0.0.1:9187".parse().unwrap()));
    assert_eq!(c.kie.base_url, "http://127.0.0.1:4000");
    assert_eq!(
        c.kie.api_key.as_ref().map(ApiKey::expose),
        Some("api-secret")
    );
    assert_eq!(c.kie.webhook_hmac_key, Some(Secret::new("hmac-secret")));
    assert_eq!(c.kie.signature_tolerance, Duration::from_secs(90));
    assert!(!c.kie.confirm_callbacks);
    assert_eq!(c.kie.requests_per_10s, 5);
    assert_eq!(c.download.concurrency, 16);
    assert_eq!(c.download.max_image_bytes, 1024);
    assert_eq!(c.download.max_attempts, 3);
    assert_eq!(c.download.backoff_base, Duration::from_millis(500));
    assert_eq!(c.download.backoff_max, Duration::from_secs(60));
    assert_eq!(c.download.timeout, Duration::from_secs(10));
    assert_eq!(
        c.download.allowed_hosts,
        vec!["files.example.com", "10.0.0.1", "[::1]"]
    );
    assert!(c.download.allow_http);
    assert!(c.download.allow_private_networks);
    assert_eq!(c.download.user_agent, "test agent/1.0 (+https://x.example)");
    assert_eq!(c.poll.after, Duration::ZERO);
    assert_eq!(c.poll.interval, Duration::from_secs(1));
    assert_eq!(c.poll.give_up_after, Duration::from_secs(30 * 86_400));
}

#[test]
fn precedence_flag_beats_env_beats_file() {
    let file = "data_dir = \"/from/file\"\nlisten = \"127.0.0.1:1001\"\n";
    let env = [(ENV_DATA_DIR, "/from/env"), (ENV_LISTEN, "127.0.0.1:1002")];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, file).unwrap();
    let flags = Overrides {
        config_file: Some(path.clone()),
        data_dir: Some("/from/flag".into()),
        listen: Some("127.0.0.1:1003".parse().unwrap()),
    };
    let file_only = Overrides {
        config_file: Some(path),
        ..Overrides::default()
    };
    // (overrides, env, expected data_dir, expected listen port)
    type Case<'a> = (&'a Overrides, &'a [(&'a str, &'a str)], &'a str, u16);
    let cases: [Case<'_>; 5] = [
        (&Overrides::default(), &[], "./coverd-data", 8787),
        (&file_only, &[], "/from/file", 1001),
        (&file_only, &env, "/from/env", 1002),
        (
            &file_only,
            &[(ENV_DATA_DIR, ""), (ENV_LISTEN, "")],
            "/from/file",
            1001,
        ),
        (&flags, &env, "/from/flag", 1003),
    ];
    for (overrides, env, data_dir, port) in cases {
        let c = load_with_env(overrides, &env_of(env)).unwrap();
        assert_eq!(c.data_dir, PathBuf::from(data_dir), "{overrides:?} {env:?}");
        assert_eq!(c.listen.port(), port, "{overrides:?} {env:?}");
    }
}

#[test]
fn config_file_flag_beats_env() {
    let dir = tempfile::tempdir().unwrap();
    let flag_file = dir.path().join("flag.toml");
    let env_file = dir.path().join("env.toml");
    std::fs::write(&flag_file, "data_dir = \"/flag-file\"\n").unwrap();
    std::fs::write(&env_file, "data_dir = \"/env-file\"\n").unwrap();
    let env_path = env_file.to_str().unwrap();
    let c = load_with_env(&Overrides::default(), &env_of(&[(ENV_CONFIG, env_path)])).unwrap();
    assert_eq!(c.data_dir, PathBuf::from("/env-file"));
    let flags = Overrides {
        config_file: Some(flag_file),
        ..Overrides::default()
    };
    let c = load_with_env(&flags, &env_of(&[(ENV_CONFIG, env_path)])).unwrap();
    assert_eq!(c.data_dir, PathBuf::from("/flag-file"));
}

#[test]
fn missing_named_file_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.toml");
    let by_flag = Overrides {
        config_file: Some(missing.clone()),
        ..Overrides::default()
    };
    let by_env = [(ENV_CONFIG, missing.to_str().unwrap())];
    for err in [
        load_with_env(&by_flag, &no_env()).unwrap_err(),
        load_with_env(&Overrides::default(), &env_of(&by_env)).unwrap_err(),
    ] {
        assert!(matches!(&err, ConfigError::Read { path, .. } if *path == missing));
        let msg = err.to_string();
        assert!(
            msg.contains("nope.toml") && msg.contains("COVERD_CONFIG"),
            "{msg}"
        );
    }
}

#[test]
fn unknown_keys_are_errors_naming_the_key() {
    let cases = [
        ("colour = 1\n", "colour", "`colour`"),
        (
            "[download]\nconcurrency = 2\nparallel = 3\n",
            "parallel",
            "`download.parallel`",
        ),
        ("[kie]\napikey = \"x\"\n", "apikey", "`kie.apikey`"),
        ("[poll]\nevery = \"1s\"\n", "every", "`poll.every`"),
        ("[extra]\na = 1\n", "extra", "`extra`"),
    ];
    for (text, key, dotted) in cases {
        let err = load_err(text);
        assert!(matches!(err, ConfigError::Parse { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains(&format!("unknown key `{key}`")), "{msg}");
        assert!(msg.contains(dotted), "{msg}");
        assert!(msg.contains("line "), "{msg}");
    }
}

#[test]
fn syntax_and_type_errors_are_parse_errors_with_location() {
    let cases = [
        ("listen = \n", "line 1"),
        (
            "[download]\nconcurrency = \"four\"\n",
            "`download.concurrency`",
        ),
        ("[download]\nallow_http = 1\n", "`download.allow_http`"),
        (
            "[download]\nallowed_hosts = \"a.example\"\n",
            "`download.allowed_hosts`",
        ),
        (
            "[download]\nallowed_hosts = [\n  \"a.example\",\n  7,\n]\n",
            "`download.allowed_hosts`",
        ),
        ("kie = 3\n", "expected a table"),
        ("notify = 3\n", "expected a table"),
        ("poll = \"1s\"\n", "expected a table"),
        (
            "[download]\nconcurrency = 99999999999999999999\n",
            "out of range",
        ),
        ("data_dir = \"a\"\ndata_dir = \"b\"\n", "line 2"),
    ];
    for (text, needle) in cases {
        let err = load_err(text);
        assert!(matches!(err, ConfigError::Parse { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains(needle), "{text:?}: {msg}");
    }
}

#[test]
fn bad_duration_names_the_key() {
    let keys = [
        ("kie", "signature_tolerance"),
        ("download", "backoff_base"),
        ("download", "backoff_max"),
        ("download", "timeout"),
        ("poll", "after"),
        ("poll", "interval"),
        ("poll", "give_up_after"),
    ];
    for (section, key) in keys {
        let err = load_err(&format!("[{section}]\n{key} = \"abc\"\n"));
        let dotted = format!("{section}.{key}");
        assert_eq!(invalid_key(&err), dotted);
        assert_eq!(
            err.to_string(),
            format!(
                "invalid configuration: `{dotted}` = \"abc\": not a duration (use e.g. \"30s\", \"2m\")"
            )
        );
    }
}

#[test]
fn listen_takes_a_host_name_from_the_environment_too() {
    let c = load_toml("", &[(ENV_LISTEN, "localhost:1234")]).unwrap();
    assert!(
        c.listen.ip().is_loopback() && c.listen.port() == 1234,
        "{}",
        c.listen
    );
}

#[test]
fn validation_bounds() {
    // (file text, Some(rejected key) or None when accepted)
    let cases: &[(&str, Option<&str>)] = &[
        ("data_dir = \"\"", Some("data_dir")),
        ("listen = \"localhost\"", Some("listen")),
        ("listen = \"\"", Some("listen")),
        ("listen = \"0.0.0.0:80\"", None),
        // A host name is resolved at load (SPEC), as `serve --listen` always did.
        ("listen = \"localhost:8787\"", None),
        ("listen = \"no-such-host.invalid:8787\"", Some("listen")),
        ("metrics_listen = \"localhost:9187\"", None),
        ("metrics_listen = \"\"", None),
        ("metrics_listen = \"9187\"", Some("metrics_listen")),
        ("public_url = \"\"", None),
        ("public_url = \"http://10.0.0.5:8787\"", None),
        ("public_url = \"ftp://x.example\"", Some("public_url")),
        ("public_url = \"coverd.example.com\"", Some("public_url")),
        (
            "public_url = \"https://x.example/?a=b\"",
            Some("public_url"),
        ),
        ("public_url = \"https://x example\"", Some("public_url")),
        ("[kie]\nbase_url = \"\"", Some("kie.base_url")),
        ("[kie]\nbase_url = \"api.kie.ai\"", Some("kie.base_url")),
        ("[kie]\nbase_url = \"https://\"", Some("kie.base_url")),
        (
            "[kie]\nsignature_tolerance = \"0s\"",
            Some("kie.signature_tolerance"),
        ),
        ("[kie]\nsignature_tolerance = \"1ms\"", None),
        ("[kie]\nrequests_per_10s = 0", Some("kie.requests_per_10s")),
        ("[kie]\nrequests_per_10s = 1", None),
        ("[kie]\nrequests_per_10s = 1000", None),
        (
            "[kie]\nrequests_per_10s = 1001",
            Some("kie.requests_per_10s"),
        ),
        ("[download]\nconcurrency = -1", Some("download.concurrency")),
        ("[download]\nconcurrency = 0", Some("download.concurrency")),
        ("[download]\nconcurrency = 1", None),
        ("[download]\nconcurrency = 64", None),
        ("[download]\nconcurrency = 65", Some("download.concurrency")),
        (
            "[download]\nmax_image_bytes = 1023",
            Some("download.max_image_bytes"),
        ),
        ("[download]\nmax_image_bytes = 1024", None),
        (
            "[download]\nmax_audio_bytes = 1023",
            Some("download.max_audio_bytes"),
        ),
        ("[download]\nmax_wav_bytes = 1024", None),
        (
            "[download]\nmax_video_bytes = 0",
            Some("download.max_video_bytes"),
        ),
        ("[download]\nallowed_hosts = [\"*.KIE.ai\"]", None),
        (
            "[download]\nallowed_hosts = [\"*\"]",
            Some("download.allowed_hosts"),
        ),
        (
            "[download]\nallowed_hosts = [\"*.com\"]",
            Some("download.allowed_hosts"),
        ),
        (
            "[download]\nallowed_hosts = [\"a.*.com\"]",
            Some("download.allowed_hosts"),
        ),
        (
            "[download]\nallowed_hosts = [\"*.10.0.0.1\"]",
            Some("download.allowed_hosts"),
        ),
        (
            "[download]\nmax_attempts = 0",
            Some("download.max_attempts"),
        ),
        ("[download]\nmax_attempts = 1", None),
        ("[download]\nmax_attempts = 100", None),
        (
            "[download]\nmax_attempts = 101",
            Some("download.max_attempts"),
        ),
        (
            "[download]\nbackoff_base = \"0s\"",
            Some("download.backoff_base"),
        ),
        (
            "[download]\nbackoff_base = \"6m\"",
            Some("download.backoff_base"),
        ),
        (
            "[download]\nbackoff_base = \"1s\"\nbackoff_max = \"1s\"",
            None,
        ),
        (
            "[download]\nbackoff_max = \"1s\"",
            Some("download.backoff_base"),
        ),
        ("[download]\ntimeout = \"999ms\"", Some("download.timeout")),
        ("[download]\ntimeout = \"1s\"", None),
        ("[download]\nallowed_hosts = []", None),
        (
            "[download]\nallowed_hosts = [\"\"]",
            Some("download.allowed_hosts"),
        ),
        (
            "[download]\nallowed_hosts = [\"https://a.example\"]",
            Some("download.allowed_hosts"),
        ),
        (
            "[download]\nallowed_hosts = [\"a.example/x\"]",
            Some("download.allowed_hosts"),
        ),
        (
            "[download]\nallowed_hosts = [\"a.example:443\"]",
            Some("download.allowed_hosts"),
        ),
        (
            "[download]\nallowed_hosts = [\"a b\"]",
            Some("download.allowed_hosts"),
        ),
        ("[download]\nuser_agent = \"\"", Some("download.user_agent")),
        (
            "[download]\nuser_agent = \"tab\\there\"",
            Some("download.user_agent"),
        ),
        (
            "[download]\nuser_agent = \"caf\u{e9}/1\"",
            Some("download.user_agent"),
        ),
        ("[download]\nuser_agent = \"a b/1.0 (x; y)\"", None),
        ("[poll]\ninterval = \"999ms\"", Some("poll.interval")),
        ("[poll]\ninterval = \"1s\"", None),
        ("[poll]\ngive_up_after = \"0s\"", Some("poll.give_up_after")),
    ];
    for (text, rejected) in cases {
        match (load_toml(text, &[]), rejected) {
            (Ok(_), None) => {}
            (Err(err), Some(key)) => {
                assert_eq!(invalid_key(&err), *key, "{text:?}");
                let msg = err.to_string();
                assert!(
                    msg.starts_with(&format!("invalid configuration: `{key}`")),
                    "{msg}"
                );
            }
            (Ok(_), Some(key)) => panic!("{text:?} should be rejected naming {key}"),
            (Err(err), None) => panic!("{text:?} should load, got: {err}"),
        }
    }
}

#[test]
fn urls_and_hosts_are_normalised() {
    let c = load_ok(
        "public_url = \"https://x.example/base//\"\n[kie]\nbase_url = \"https://api.example/\"\n\
         [download]\nallowed_hosts = [\"TempFile.AIQuickDraw.com\"]\n",
    );
    assert_eq!(c.public_url, "https://x.example/base");
    assert_eq!(c.kie.base_url, "https://api.example");
    assert_eq!(c.download.allowed_hosts, vec!["tempfile.aiquickdraw.com"]);
}

#[test]
fn bad_env_values_name_the_variable() {
    let err = load_with_env(&Overrides::default(), &env_of(&[(ENV_LISTEN, "nope")])).unwrap_err();
    assert!(matches!(&err, ConfigError::Env { var, .. } if var == ENV_LISTEN));
    assert_eq!(
        err.to_string(),
        "invalid environment variable `COVERD_LISTEN` = \"nope\": not a socket address; \
         use HOST:PORT, e.g. 127.0.0.1:8787, [::1]:8787 or localhost:8787"
    );
    // A flag makes a bad environment value irrelevant.
    let flags = Overrides {
        listen: Some("127.0.0.1:1".parse().unwrap()),
        ..Overrides::default()
    };
    assert!(load_with_env(&flags, &env_of(&[(ENV_LISTEN, "nope")])).is_ok());
}

#[test]
fn empty_data_dir_flag_is_rejected() {
    let flags = Overrides {
        data_dir: Some(PathBuf::new()),
        ..Overrides::default()
    };
    let err = load_with_env(&flags, &no_env()).unwrap_err();
    assert_eq!(invalid_key(&err), "data_dir");
}

#[test]
fn secrets_from_each_source() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("api.key");
    std::fs::write(&key_file, "from-file \n\n").unwrap();
    let creds = tempfile::tempdir().unwrap();
    std::fs::write(creds.path().join(CREDENTIAL_API_KEY), "from-cred\n").unwrap();
    let cred_dir = creds.path().to_str().unwrap();
    let file_line = format!("[kie]\napi_key_file = {key_file:?}\n");
    let inline = "[kie]\napi_key = \"from-inline\"\n";
    let inline_empty_and_file = format!("[kie]\napi_key = \"\"\napi_key_file = {key_file:?}\n");
    // (file text, env, expected key)
    type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, Option<&'a str>);
    let cases: Vec<Case<'_>> = vec![
        ("", vec![], None),
        ("", vec![(ENV_API_KEY, "")], None),
        ("", vec![(ENV_API_KEY, "from-env")], Some("from-env")),
        (inline, vec![], Some("from-inline")),
        (inline, vec![(ENV_API_KEY, "from-env")], Some("from-env")),
        (inline, vec![(ENV_API_KEY, "")], Some("from-inline")),
        (&file_line, vec![], Some("from-file")),
        (
            &file_line,
            vec![(ENV_API_KEY, "from-env")],
            Some("from-env"),
        ),
        (&inline_empty_and_file, vec![], Some("from-file")),
        (
            "",
            vec![(ENV_CREDENTIALS_DIRECTORY, cred_dir)],
            Some("from-cred"),
        ),
        (
            inline,
            vec![(ENV_CREDENTIALS_DIRECTORY, cred_dir)],
            Some("from-inline"),
        ),
        (
            &file_line,
            vec![(ENV_CREDENTIALS_DIRECTORY, cred_dir)],
            Some("from-file"),
        ),
        (
            "",
            vec![
                (ENV_CREDENTIALS_DIRECTORY, cred_dir),
                (ENV_API_KEY, "from-env"),
            ],
            Some("from-env"),
        ),
    ];
    for (text, env, expected) in cases {
        let c = load_toml(text, &env).unwrap();
        assert_eq!(
            c.kie.api_key.as_ref().map(ApiKey::expose),
            expected,
            "{text:?} {env:?}"
        );
        assert_eq!(c.kie.webhook_hmac_key, None);
    }
}

#[test]
fn webhook_hmac_key_sources() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("hmac.key");
    std::fs::write(&key_file, "hmac-file\n").unwrap();
    std::fs::write(dir.path().join(CREDENTIAL_WEBHOOK_HMAC_KEY), "hmac-cred").unwrap();
    let cred_dir = dir.path().to_str().unwrap();
    // (file text, env, expected key)
    type Case<'a> = (String, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case<'_>> = vec![
        (
            String::new(),
            vec![(ENV_WEBHOOK_HMAC_KEY, "hmac-env")],
            "hmac-env",
        ),
        (
            "[kie]\nwebhook_hmac_key = \"hmac-inline\"".into(),
            vec![],
            "hmac-inline",
        ),
        (
            format!("[kie]\nwebhook_hmac_key_file = {key_file:?}"),
            vec![],
            "hmac-file",
        ),
        (
            String::new(),
            vec![(ENV_CREDENTIALS_DIRECTORY, cred_dir)],
            "hmac-cred",
        ),
    ];
    for (text, env, expected) in cases {
        let c = load_toml(&text, &env).unwrap();
        let got = c.kie.webhook_hmac_key.as_ref().map(Secret::expose);
        assert_eq!(got, Some(expected), "{text:?}");
        assert_eq!(c.kie.api_key, None);
    }
}

#[test]
fn secret_and_secret_file_both_set_is_an_error() {
    for (key, file_key) in [
        ("kie.api_key", "kie.api_key_file"),
        ("kie.webhook_hmac_key", "kie.webhook_hmac_key_file"),
    ] {
        let short = key.trim_start_matches("kie.");
        let text = format!("[kie]\n{short} = \"s3cret-inline\"\n{short}_file = \"/k\"\n");
        // Even a key from the environment does not excuse a contradictory file.
        let err = load_toml(&text, &[(ENV_API_KEY, "e"), (ENV_WEBHOOK_HMAC_KEY, "e")]).unwrap_err();
        assert_eq!(invalid_key(&err), key);
        let msg = err.to_string();
        assert!(msg.contains(&format!("`{key}`")), "{msg}");
        assert!(msg.contains(&format!("`{file_key}`")), "{msg}");
        assert!(!msg.contains("s3cret-inline"), "{msg}");
        assert!(!format!("{err:?}").contains("s3cret-inline"));
    }
}

#[test]
fn unusable_key_files_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.key");
    std::fs::write(&empty, " \n").unwrap();
    let missing = dir.path().join("missing.key");
    for (path, needle) in [(&empty, "empty"), (&missing, "cannot read")] {
        let err = load_toml(&format!("[kie]\napi_key_file = {path:?}\n"), &[]).unwrap_err();
        assert_eq!(invalid_key(&err), "kie.api_key_file");
        let msg = err.to_string();
        assert!(msg.contains(needle), "{msg}");
        assert!(msg.contains(path.to_str().unwrap()), "{msg}");
    }
}

#[test]
fn credentials_directory_lookup() {
    let creds = tempfile::tempdir().unwrap();
    let cred_dir = creds.path().to_str().unwrap();
    // Directory set but no credential files: both keys unset, no error.
    let c = load_toml("", &[(ENV_CREDENTIALS_DIRECTORY, cred_dir)]).unwrap();
    assert!(c.kie.api_key.is_none() && c.kie.webhook_hmac_key.is_none());
    // Both credentials present.
    std::fs::write(creds.path().join("kie-api-key"), "cred-api\n").unwrap();
    std::fs::write(creds.path().join("kie-webhook-hmac-key"), "cred-hmac").unwrap();
    let c = load_toml("", &[(ENV_CREDENTIALS_DIRECTORY, cred_dir)]).unwrap();
    assert_eq!(c.kie.api_key.as_ref().map(ApiKey::expose), Some("cred-api"));
    assert_eq!(c.kie.webhook_hmac_key, Some(Secret::new("cred-hmac")));
    // Without CREDENTIALS_DIRECTORY the files are not looked at.
    let c = load_toml("", &[]).unwrap();
    assert!(c.kie.api_key.is_none());
    // An empty credential file is an error naming the credential.
    std::fs::write(creds.path().join("kie-api-key"), "").unwrap();
    let err = load_toml("", &[(ENV_CREDENTIALS_DIRECTORY, cred_dir)]).unwrap_err();
    assert!(matches!(&err, ConfigError::Env { var, .. } if var == ENV_CREDENTIALS_DIRECTORY));
    assert!(err.to_string().contains("`kie-api-key`"), "{err}");
}

#[test]
fn secrets_with_control_characters_are_refused() {
    let err = load_with_env(
        &Overrides::default(),
        &env_of(&[("KIE_API_KEY", "abc\ndef")]),
    )
    .expect_err("refused");
    let text = err.to_string();
    assert!(
        text.contains("kie.api_key") && text.contains("control"),
        "{text}"
    );
    assert!(!text.contains("abc"), "{text}");
}

#[test]
fn secrets_never_shown() {
    let c = load_toml(
        "[kie]\napi_key = \"s3cret-api\"\nwebhook_hmac_key = \"s3cret-hmac\"\n",
        &[],
    )
    .unwrap();
    let debug = format!("{c:?} {c:#?}");
    assert!(!debug.contains("s3cret"), "{debug}");
    assert_eq!(
        c.kie.api_key.as_ref().map(ApiKey::expose),
        Some("s3cret-api")
    );

    // Values echoed by TOML errors are hidden: strings always, anything on a secret key.
    for text in [
        "[kie]\nconfirm_callbacks = \"s3cret-misplaced\"\n",
        "[kie]\napi_key = 123456789\n",
        "[kie]\nwebhook_hmac_key = 123456789\n",
        "[kie]\napi_key = [\"s3cret-in-list\"]\n",
    ] {
        let err = load_err(text);
        let shown = format!("{err} {err:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(!shown.contains("123456789"), "{shown}");
    }
}

#[test]
fn key_heuristic() {
    let text = "a = 1\n# c = 2\n[download]\nallowed_hosts = [\n  \"x\",\n  3,\n]\n[poll]\n";
    let at = |needle: &str| key_at(text, text.find(needle).unwrap());
    assert_eq!(at("a =").as_deref(), Some("a"));
    assert_eq!(at("3,").as_deref(), Some("download.allowed_hosts"));
    assert_eq!(at("[poll]").as_deref(), Some("poll"));
    assert_eq!(
        redact_strings(r#"x string "a\"b", y string "c""#),
        "x a string, y a string"
    );
}

#[test]
fn notify_section() {
    let dir = tempfile::tempdir().unwrap();
    let good = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let file = dir.path().join("notify-secret");
    std::fs::write(&file, format!("{good}\n")).unwrap();
    let cred_dir = dir.path().to_str().unwrap();

    // Off by default.
    let c = load_ok("");
    assert_eq!(c.notify.url, None);
    assert_eq!(c.notify.timeout, Duration::from_secs(10));
    assert_eq!(c.notify.max_attempts, 12);

    // Every source of the secret.
    let url = "[notify]\nurl = \"http://127.0.0.1:9/hook?t=1\"\n";
    for (text, env) in [
        (format!("{url}secret_file = {file:?}"), vec![]),
        (url.to_string(), vec![(ENV_NOTIFY_SECRET, good)]),
        (url.to_string(), vec![(ENV_CREDENTIALS_DIRECTORY, cred_dir)]),
    ] {
        let c = load_toml(&text, &env).unwrap();
        assert_eq!(c.notify.url.as_deref(), Some("http://127.0.0.1:9/hook?t=1"));
        assert_eq!(c.notify.secret.as_ref().map(Secret::expose), Some(good));
        assert!(notify_key(c.notify.secret.as_ref().unwrap()).is_some());
    }

    // A URL without a secret, a malformed secret, a bad URL: errors naming the key,
    // never showing the secret.
    let err = load_toml(url, &[]).unwrap_err();
    assert_eq!(invalid_key(&err), "notify.secret_file");
    for bad in [
        "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        "whsec_",
        "whsec_not base64!",
    ] {
        let err = load_toml(url, &[(ENV_NOTIFY_SECRET, bad)]).unwrap_err();
        assert_eq!(invalid_key(&err), "notify.secret_file", "{bad}");
        assert!(!err.to_string().contains("MfKQ"), "{err}");
    }
    let err = load_toml("[notify]\nurl = \"ftp://x\"", &[(ENV_NOTIFY_SECRET, good)]).unwrap_err();
    assert_eq!(invalid_key(&err), "notify.url");
    let err = load_toml("[notify]\nmax_attempts = 0", &[]).unwrap_err();
    assert_eq!(invalid_key(&err), "notify.max_attempts");
    let err = load_toml("[notify]\ntimeout = \"soon\"", &[]).unwrap_err();
    assert_eq!(invalid_key(&err), "notify.timeout");
    let err = load_toml("[notify]\nsecret = \"x\"", &[]).unwrap_err();
    assert!(err.to_string().contains("secret"), "{err}");
    // Debug never shows it.
    let c = load_toml(url, &[(ENV_NOTIFY_SECRET, good)]).unwrap();
    assert!(!format!("{c:?}").contains("MfKQ"));
}

/// Issue 14 item 8: a receiver's token in notify.url's query (or its password) is a secret
/// to `check-config` and to error messages, as it is to the notifier's logs.
#[test]
fn notify_url_token_is_never_shown() {
    let good = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let text = "[notify]\nurl = \"https://bob:hunter2@app.example:8443/hook?token=s3cr3t&x=1\"\n";
    let c = load_toml(text, &[(ENV_NOTIFY_SECRET, good)]).unwrap();
    let shown = c.effective_toml();
    assert!(
        shown.contains(r#"url = "https://bob:<set>@app.example:8443/hook?<set>""#),
        "{shown}"
    );
    assert!(
        !shown.contains("s3cr3t") && !shown.contains("hunter2"),
        "{shown}"
    );
    // The value in force is untouched.
    assert!(c.notify.url.unwrap().ends_with("token=s3cr3t&x=1"));
    let err = load_toml(
        "[notify]\nurl = \"ftp://h/x?token=s3cr3t\"",
        &[(ENV_NOTIFY_SECRET, good)],
    )
    .unwrap_err();
    assert!(!err.to_string().contains("s3cr3t"), "{err}");
    assert_eq!(values::url_shown("http://h/p"), "http://h/p");
    assert_eq!(values::url_shown("http://u@h/p?"), "http://u@h/p?<set>");
}

/// SPEC "Configuration" (issue 15 item 10): durations are printed back in the style they
/// are written in: a default as the docs write it, another value with one unit.
#[test]
fn check_config_prints_durations_as_they_are_written() {
    let shown = Config::default().effective_toml();
    for line in [
        "give_up_after = \"24h\"",
        "timeout = \"120s\"",
        "after = \"2m\"",
        "backoff_base = \"2s\"",
    ] {
        assert!(shown.contains(line), "{line} missing in:\n{shown}");
    }
    assert!(!shown.contains("day"), "{shown}");
    let c = load_toml(
        "[poll]\ngive_up_after = \"2days\"\ninterval = \"1h 30m\"\nafter = \"90s\"\n[download]\nbackoff_base = \"250ms\"",
        &[],
    )
    .unwrap();
    let shown = c.effective_toml();
    for line in [
        "give_up_after = \"2d\"",
        "interval = \"90m\"",
        "after = \"90s\"",
        "backoff_base = \"250ms\"",
    ] {
        assert!(shown.contains(line), "{line} missing in:\n{shown}");
    }
}

/// Issue 15 items 4 and 10: check-config says where each secret was found (or that it is
/// not set), and as root warns of a key file the service's user will not be able to read.
#[test]
fn check_config_says_where_each_secret_was_found() {
    use std::os::unix::fs::PermissionsExt;
    let good = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let creds = tempfile::tempdir().unwrap();
    std::fs::write(creds.path().join("kie-api-key"), "key-from-credential\n").unwrap();
    let here = tempfile::tempdir().unwrap();
    let file = here.path().join("notify-secret");
    std::fs::write(&file, good).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let text = format!("[notify]\nurl = \"http://127.0.0.1:9/h\"\nsecret_file = {file:?}\n");
    let c = load_toml(
        &text,
        &[(ENV_CREDENTIALS_DIRECTORY, creds.path().to_str().unwrap())],
    )
    .unwrap();
    let report = c.secret_report(true);
    assert_eq!(
        report[0],
        format!(
            "kie.api_key: found in the credential `kie-api-key` in {}",
            creds.path().display()
        )
    );
    assert_eq!(report[1], "kie.webhook_hmac_key: not set");
    assert!(
        report[2].starts_with("notify secret: found in the file "),
        "{report:?}"
    );
    // A 0600 file: unreadable by the service wherever the test's temp dir is.
    assert!(
        report[3].starts_with("warning: notify secret: the service will not be able to read")
            && report[3].contains("credential `notify-secret`"),
        "{report:?}"
    );
    assert!(
        !report.join("\n").contains("MfKQ"),
        "a secret value was shown"
    );
    // Not as root: nobody else runs it, no warning.
    assert_eq!(c.secret_report(false).len(), 5);
}

#[test]
fn a_key_file_the_service_cannot_read_is_told_apart() {
    use super::secret::unreadable_reason;
    let at = |p: &str| std::path::PathBuf::from(p);
    let why = unreadable_reason(&at("/etc/coverd/notify-secret"), Some(0o100600)).unwrap();
    assert!(why.contains("not readable by others (mode 600)"), "{why}");
    assert_eq!(
        unreadable_reason(&at("/etc/coverd/notify-secret"), Some(0o100644)),
        None
    );
    for dir in ["/tmp", "/var/tmp", "/home", "/root"] {
        let why = unreadable_reason(&at(&format!("{dir}/k")), Some(0o100644)).unwrap();
        assert!(why.contains(&format!("under {dir}")), "{why}");
    }
    assert_eq!(unreadable_reason(&at("/etc/k"), None), None);
}

/// Issue 15 items 1 and 2: the installed unit fills in what the caller leaves unset; its
/// data directory (named, or the default) is the service's, in its working directory; a
/// data directory the caller names is the caller's.
#[test]
fn the_installed_unit_fills_in_what_the_caller_leaves_unset() {
    use super::unit::{Root, Unit};
    let unit = Unit::from_files(
        Root::at("/nonexistent"),
        vec![(
            "/u".into(),
            b"[Service]\nWorkingDirectory=%S/coverd\nEnvironment=COVERD_DATA_DIR=data COVERD_LISTEN=127.0.0.1:1\n"
                .to_vec(),
        )],
    );
    let load = |env: &[(&str, &str)], flags: &Overrides| {
        load_with(flags, &env_of(env), Some(&unit), false).unwrap()
    };
    let c = load(&[], &Overrides::default());
    assert_eq!(c.data_dir, PathBuf::from("/var/lib/coverd/data"));
    assert!(c.data_dir_named && c.data_dir_from_unit);
    assert_eq!(c.listen.port(), 1);
    assert_eq!(c.unit.as_deref(), Some("/u"));
    let c = load(&[(ENV_DATA_DIR, "mine")], &Overrides::default());
    assert_eq!(c.data_dir, PathBuf::from("mine"));
    assert!(c.data_dir_named && !c.data_dir_from_unit);
    let flags = Overrides {
        data_dir: Some("flagged".into()),
        ..Overrides::default()
    };
    let c = load(&[], &flags);
    assert_eq!(c.data_dir, PathBuf::from("flagged"));
    assert!(!c.data_dir_from_unit);
    // Without the unit nothing changes.
    let c = load_with(&Overrides::default(), &no_env(), None, true).unwrap();
    assert!(!c.data_dir_named && c.unit.is_none());
}

/// `[storage] kind = "s3"`: the bucket and both halves of the key are required (each error
/// names its key), the key comes from the environment or files like every secret, and
/// `check-config` never shows it.
#[test]
fn object_storage_needs_a_bucket_and_a_key_and_never_shows_the_key() {
    let base = "[storage]\nkind = \"s3\"\nendpoint = \"http://127.0.0.1:3900\"\n";
    let err = load_toml(base, &[]).unwrap_err();
    assert_eq!(invalid_key(&err), "storage.bucket", "{err}");
    let with_bucket = format!("{base}bucket = \"coverd\"\n");
    let err = load_toml(&with_bucket, &[]).unwrap_err();
    assert_eq!(invalid_key(&err), "storage.access_key_id", "{err}");
    let err = load_toml(&with_bucket, &[(ENV_S3_ACCESS_KEY_ID, "GKid")]).unwrap_err();
    assert_eq!(invalid_key(&err), "storage.secret_access_key_file", "{err}");
    let secret = "s3cr3t-value-never-shown";
    let c = load_toml(
        &with_bucket,
        &[
            (ENV_S3_ACCESS_KEY_ID, "GKid"),
            (ENV_S3_SECRET_ACCESS_KEY, secret),
        ],
    )
    .unwrap();
    assert_eq!(c.storage.kind, StorageKind::S3);
    assert_eq!(c.storage.s3.bucket, "coverd");
    assert_eq!(c.storage.s3.region, "garage");
    assert!(c.storage.s3.path_style);
    assert_eq!(
        c.storage.s3.secret_access_key.as_ref().map(Secret::expose),
        Some(secret)
    );
    let shown = c.effective_toml();
    assert!(
        !shown.contains(secret) && !shown.contains("GKid"),
        "{shown}"
    );
    assert!(shown.contains("access_key_id = \"<set>\""), "{shown}");
    // From a key file, as `secret_access_key_file` names it.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("s3-secret");
    std::fs::write(&file, format!("{secret}\n")).unwrap();
    let text = format!(
        "{with_bucket}access_key_id = \"GKid\"\nsecret_access_key_file = {:?}\n",
        file.display().to_string()
    );
    let c = load_toml(&text, &[]).unwrap();
    assert_eq!(
        c.storage.s3.secret_access_key.as_ref().map(Secret::expose),
        Some(secret)
    );
    // Local storage (the default) needs none of it.
    assert_eq!(load_ok("").storage.kind, StorageKind::Local);
}

/// The bucket, prefix and kind are checked one by one, naming the key.
#[test]
fn object_storage_keys_are_checked() {
    for (text, key) in [
        ("kind = \"ftp\"", "storage.kind"),
        ("bucket = \"No_Such\"", "storage.bucket"),
        ("bucket = \"ab\"", "storage.bucket"),
        ("prefix = \"vm1\"", "storage.prefix"),
        ("prefix = \"/vm1/\"", "storage.prefix"),
        ("prefix = \"../\"", "storage.prefix"),
        ("prefix = \"a//\"", "storage.prefix"),
        ("prefix = \"a b/\"", "storage.prefix"),
        ("endpoint = \"ftp://x\"", "storage.endpoint"),
        ("region = \"\"", "storage.region"),
    ] {
        let err = load_toml(&format!("[storage]\n{text}\n"), &[]).unwrap_err();
        assert_eq!(invalid_key(&err), key, "{text}: {err}");
    }
    for prefix in ["", "vm1/", "a/b.c_d-e/"] {
        let c = load_ok(&format!("[storage]\nprefix = {prefix:?}\n"));
        assert_eq!(c.storage.s3.prefix, prefix);
    }
}
