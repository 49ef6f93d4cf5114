//! Object storage (`[storage] kind = "s3"`) through the real binary against a real
//! single-node Garage (`garage::Garage`): every kind stored in the bucket with matching
//! checksums, `verify` catching objects damaged or deleted behind coverd's back and `retry`
//! repairing them, `prune` deleting, two instances sharing a bucket, Garage stopped while
//! uploads wait and started again, SIGKILL mid-upload, and `migrate-files` of a local data
//! directory, interrupted and resumed. And a 3-node cluster (`scripts/garage-cluster`) losing
//! a node while uploads run.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use coverd::model::Kind;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjectPath;
use object_store::{ClientOptions, ObjectStoreExt, RetryConfig};
use serde_json::Value;

use crate::bin_util::{Scratch, wait_status};
use crate::fake_kie::FakeKie;
use crate::fake_kie::files::{Behaviour, png, sha256_hex, wav};
use crate::garage::Garage;
use crate::harness::success_body;
use crate::kinds::{OTHER_KINDS, case, success_callback};

/// A scratch directory whose configuration stores files in `garage` under `prefix`, the
/// secret access key in a 0600 file beside it.
fn s3_scratch(fake: &FakeKie, garage: &Garage, prefix: &str) -> Scratch {
    let scratch = Scratch::new();
    write_s3_config(&scratch, fake, garage, prefix);
    scratch
}

fn write_s3_config(scratch: &Scratch, fake: &FakeKie, garage: &Garage, prefix: &str) {
    scratch.write_config(
        &fake.base_url(),
        "",
        &storage_table(scratch, garage, prefix),
    );
}

/// The `[storage]` table for `garage` under `prefix`, the secret access key written to a
/// 0600 file in `scratch` and named by `secret_access_key_file`.
pub(crate) fn storage_table(scratch: &Scratch, garage: &Garage, prefix: &str) -> String {
    let store = S3Store {
        endpoint: &garage.endpoint,
        bucket: &garage.bucket,
        region: &garage.region,
        access_key_id: &garage.access_key_id,
        secret_access_key: &garage.secret_access_key,
    };
    s3_storage_table(scratch, &store, prefix)
}

/// The values of an S3 `[storage]` table: where, which bucket, as whom.
struct S3Store<'a> {
    endpoint: &'a str,
    bucket: &'a str,
    region: &'a str,
    access_key_id: &'a str,
    secret_access_key: &'a str,
}

/// The `[storage]` table storing files in `store` under `prefix` (path style), the secret
/// access key written to a 0600 file in `scratch` and named by `secret_access_key_file`.
fn s3_storage_table(scratch: &Scratch, store: &S3Store, prefix: &str) -> String {
    use std::os::unix::fs::PermissionsExt;
    let secret = scratch.dir.path().join("s3-secret");
    std::fs::write(&secret, store.secret_access_key).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let s = |v: &str| serde_json::to_string(v).unwrap();
    format!(
        "\n[storage]\nkind = \"s3\"\nendpoint = {}\nbucket = {}\nregion = {}\nprefix = {}\npath_style = true\naccess_key_id = {}\nsecret_access_key_file = {}\n",
        s(store.endpoint),
        s(store.bucket),
        s(store.region),
        s(prefix),
        s(store.access_key_id),
        s(&secret.display().to_string()),
    )
}

/// The key of `location` (`s3://coverd/<key>`).
fn key_of(location: &Value) -> String {
    location
        .as_str()
        .and_then(|l| l.strip_prefix("s3://coverd/"))
        .unwrap_or_else(|| panic!("{location} is not an object of bucket coverd"))
        .to_string()
}

/// A cover callback for `id` with `n` PNGs served by the fake; their bytes.
async fn cover(fake: &FakeKie, d: &crate::bin_util::Daemon, id: &str, n: usize) -> Vec<Bytes> {
    let mut urls = Vec::new();
    let mut all = Vec::new();
    for i in 0..n {
        let path = format!("/s3/{id}/{i}.png");
        let bytes = png(2_000 + 997 * i + id.len() * 13);
        fake.files.set(&path, Behaviour::Image(bytes.clone()));
        urls.push(fake.files.url(&path));
        all.push(bytes);
    }
    let (status, text) = d.callback(success_body(id, &urls)).await.unwrap();
    assert_eq!(status, 200, "{text}");
    all
}

#[tokio::test]
async fn every_kind_is_stored_in_the_bucket_verified_repaired_and_pruned() {
    let garage = Garage::start();
    let fake = FakeKie::start().await;
    let scratch = s3_scratch(&fake, &garage, "vm1/");
    let d = scratch.serve().await;
    let covers = cover(&fake, &d, "s3-cover", 2).await;
    let mut expected: Vec<(String, Vec<(String, Bytes)>)> = vec![(
        "s3-cover".into(),
        covers
            .iter()
            .enumerate()
            .map(|(i, b)| (format!("vm1/s3-cover/{i}.png"), b.clone()))
            .collect(),
    )];
    for kind in OTHER_KINDS {
        let id = format!("s3-{}", kind.as_str());
        let (files, names) = case(&fake, kind, "s3");
        let body = success_callback(&fake, kind, &id, &files);
        let (status, text) = d
            .callback_on(kind.as_str(), body.to_string())
            .await
            .unwrap();
        assert_eq!(status, 200, "{text}");
        let want = names
            .iter()
            .zip(&files.items)
            .map(|(n, (_, b))| (format!("vm1/{id}/{n}"), b.clone()))
            .collect();
        expected.push((id, want));
    }
    wait_status(&scratch, "every task downloaded", |v| {
        v["tasks"]["downloaded"] == expected.len()
    })
    .await;
    // Each file: in the bucket at its key, with the recorded sha256; `path` null.
    for (id, want) in &expected {
        let show = scratch.admin_json(&["show", id]).await;
        for (i, (key, bytes)) in want.iter().enumerate() {
            let file = &show["files"][i];
            assert_eq!(file["path"], Value::Null, "{show:#}");
            assert_eq!(key_of(&file["location"]), *key, "{show:#}");
            assert_eq!(file["sha256"], sha256_hex(bytes).as_str());
            let stored = garage
                .get(key)
                .unwrap_or_else(|| panic!("{key} not in the bucket"));
            assert_eq!(sha256_hex(&stored), sha256_hex(bytes), "{key}");
        }
    }
    let data = scratch.data_dir();
    for dir in ["images", "files"] {
        let left: Vec<_> = std::fs::read_dir(data.join(dir)).unwrap().collect();
        assert!(left.is_empty(), "{dir}/ holds files: {left:?}");
    }
    // Behind coverd's back: one object damaged, one deleted. verify names both (exit 1).
    let damaged = "vm1/s3-cover/1.png";
    let deleted = "vm1/s3-wav/audio.wav";
    garage.put(damaged, b"not the image any more");
    garage.delete(deleted);
    let out = scratch.run(&["admin", "verify", "--json"]).await;
    assert_eq!(out.code, Some(1), "{out:?}");
    let verify: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(
        verify["corrupt"],
        serde_json::json!([format!("s3://coverd/{damaged}")]),
        "{verify:#}"
    );
    assert_eq!(
        verify["missing"],
        serde_json::json!([format!("s3://coverd/{deleted}")]),
        "{verify:#}"
    );
    // retry fetches and uploads them again.
    for id in ["s3-cover", "s3-wav"] {
        let out = scratch.run(&["admin", "retry", id]).await;
        assert_eq!(out.code, Some(0), "{out:?}");
    }
    wait_status(&scratch, "the repaired tasks downloaded again", |v| {
        v["tasks"]["downloaded"] == expected.len()
    })
    .await;
    let verify = scratch.admin_json(&["verify"]).await;
    assert_eq!(verify["ok"], verify["checked"], "{verify:#}");
    assert_eq!(garage.get(damaged).unwrap(), covers[1].as_ref());
    // prune deletes the objects with the records.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let prune = scratch.admin_json(&["prune", "--older-than", "1ms"]).await;
    assert_eq!(prune["tasks"], expected.len(), "{prune:#}");
    assert_eq!(garage.keys("vm1/"), Vec::<String>::new());
    d.stop().await;
}

/// Two instances, own data directories and prefixes, one bucket, the same task id: neither
/// sees nor removes the other's objects.
#[tokio::test]
async fn two_instances_share_a_bucket_without_stepping_on_each_other() {
    let garage = Garage::start();
    let fake = FakeKie::start().await;
    let one = s3_scratch(&fake, &garage, "vm1/");
    let two = s3_scratch(&fake, &garage, "vm2/");
    let (d1, d2) = (one.serve().await, two.serve().await);
    let a = cover(&fake, &d1, "same-task", 1).await;
    wait_status(&one, "downloaded on vm1", |v| v["tasks"]["downloaded"] == 1).await;
    // The same id on the other instance, other bytes (other fake paths).
    fake.files.set("/other/0.png", Behaviour::Image(png(7_777)));
    let url = fake.files.url("/other/0.png");
    let (status, _) = d2
        .callback(success_body("same-task", &[url]))
        .await
        .unwrap();
    assert_eq!(status, 200);
    wait_status(&two, "downloaded on vm2", |v| v["tasks"]["downloaded"] == 1).await;
    assert_eq!(garage.get("vm1/same-task/0.png").unwrap(), a[0].as_ref());
    assert_eq!(
        garage.get("vm2/same-task/0.png").unwrap(),
        png(7_777).as_ref()
    );
    let prune = one.admin_json(&["prune", "--older-than", "1ms"]).await;
    assert_eq!(prune["tasks"], 1);
    assert!(garage.get("vm1/same-task/0.png").is_none());
    assert!(garage.get("vm2/same-task/0.png").is_some());
    let verify = two.admin_json(&["verify"]).await;
    assert_eq!(verify["ok"], 1, "{verify:#}");
    d1.stop().await;
    d2.stop().await;
}

/// Garage stopped while files wait to be uploaded: uploads pause (no attempt used, no task
/// failed, `/healthz` 200 saying so), and once it is back every file lands and verifies.
/// A WAV above the multipart size goes in parts and is read back.
#[tokio::test]
async fn an_object_store_outage_pauses_uploads_and_fails_no_task() {
    let mut garage = Garage::start();
    let fake = FakeKie::start().await;
    let scratch = s3_scratch(&fake, &garage, "");
    let d = scratch.serve().await;
    garage.stop();
    let mut ids = Vec::new();
    for i in 0..4 {
        let id = format!("outage-{i}");
        cover(&fake, &d, &id, 2).await;
        ids.push(id);
    }
    // One big file: a multipart upload (more than 8 MiB).
    let big = wav(9 << 20);
    fake.files
        .set("/outage/big.wav", Behaviour::Image(big.clone()));
    let body = serde_json::json!({"code": 200, "msg": "success",
        "data": {"task_id": "outage-wav", "audio_wav_url": fake.files.url("/outage/big.wav")}});
    let (status, _) = d.callback_on("wav", body.to_string()).await.unwrap();
    assert_eq!(status, 200);
    d.wait_for_log("uploads paused").await;
    let (status, body) = d.get("/healthz").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("uploads paused"), "{body}");
    let status = scratch.admin_json(&["status"]).await;
    assert_eq!(status["tasks"]["failed"], 0, "{status:#}");
    garage.restart();
    wait_status(&scratch, "every task downloaded", |v| {
        v["tasks"]["downloaded"] == 5
    })
    .await;
    let (_, body) = d.get("/healthz").await;
    assert_eq!(body, "ok");
    let verify = scratch.admin_json(&["verify"]).await;
    assert_eq!(verify["ok"], 9, "{verify:#}");
    let show = scratch.admin_json(&["show", "outage-wav"]).await;
    assert_eq!(show["files"][0]["sha256"], sha256_hex(&big).as_str());
    assert_eq!(garage.get("outage-wav/audio.wav").unwrap(), big.as_ref());
    // The store's outage was not the files' fault: one attempt each.
    for id in &ids {
        let show = scratch.admin_json(&["show", id]).await;
        for f in show["files"].as_array().unwrap() {
            assert_eq!(f["attempts"], 1, "{show:#}");
        }
    }
    let logs = d.logs();
    assert_eq!(
        logs.matches("uploads paused").count(),
        1,
        "one line for the outage, not one per file or pause:\n{logs}"
    );
    assert_eq!(logs.matches("uploads resumed").count(), 1, "{logs}");
    d.stop().await;
}

/// SIGKILL while uploads run: every object a record names is whole, and after the restart
/// every file lands and verifies.
#[tokio::test]
async fn sigkill_mid_upload_records_no_object_that_is_not_whole() {
    let garage = Garage::start();
    let fake = FakeKie::start().await;
    let scratch = s3_scratch(&fake, &garage, "k/");
    let d = scratch.serve().await;
    let mut want = Vec::new();
    for i in 0..6 {
        let id = format!("kill-wav-{i}");
        let bytes = wav((3 << 20) + i * 1_000_003);
        let path = format!("/kill/{i}.wav");
        fake.files.set(&path, Behaviour::Image(bytes.clone()));
        let body = serde_json::json!({"code": 200, "msg": "success",
            "data": {"task_id": id, "audio_wav_url": fake.files.url(&path)}});
        let (status, _) = d.callback_on("wav", body.to_string()).await.unwrap();
        assert_eq!(status, 200);
        want.push((id, bytes));
    }
    // Kill once the first object is in the bucket: the others are on their way.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while garage.keys("k/").is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "no upload landed");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    d.kill();
    let tasks = scratch.export().await.unwrap();
    for t in &tasks {
        for f in t["files"].as_array().unwrap() {
            if f["state"] == "downloaded" {
                let key = key_of(&f["location"]);
                let stored = garage.get(&key).expect("a recorded object exists");
                assert_eq!(sha256_hex(&stored), f["sha256"].as_str().unwrap(), "{key}");
            }
        }
    }
    let d = scratch.serve().await;
    wait_status(&scratch, "every task downloaded", |v| {
        v["tasks"]["downloaded"] == want.len()
    })
    .await;
    for (id, bytes) in &want {
        assert_eq!(
            garage.get(&format!("k/{id}/audio.wav")).unwrap(),
            bytes.as_ref()
        );
    }
    d.stop().await;
    let verify = scratch.admin_json(&["verify"]).await;
    assert_eq!(verify["ok"], want.len(), "{verify:#}");
}

/// A local data directory moved to the bucket by `migrate-files`: a dry run counts, a run
/// killed partway leaves every file either in the data directory or recorded in the bucket,
/// and runs after it finish the move, never moving a file twice.
#[tokio::test]
async fn migrate_files_moves_a_local_data_directory_and_resumes() {
    let garage = Garage::start();
    let fake = FakeKie::start().await;
    let scratch = Scratch::new();
    scratch.write_config(&fake.base_url(), "", "");
    let d = scratch.serve().await;
    let n = 24;
    for i in 0..n {
        cover(&fake, &d, &format!("mig-{i}"), 2).await;
    }
    wait_status(&scratch, "every task downloaded", |v| {
        v["tasks"]["downloaded"] == n
    })
    .await;
    d.stop().await;
    write_s3_config(&scratch, &fake, &garage, "m/");
    let dry = scratch
        .admin_json(&["migrate-files", "--to", "s3", "--dry-run"])
        .await;
    assert_eq!(dry["files"], 2 * n, "{dry:#}");
    assert!(garage.keys("m/").is_empty());
    // Interrupted: SIGKILL once the first object is in the bucket.
    let mut cmd = crate::bin_util::coverd();
    cmd.arg("--config")
        .arg(scratch.config_path())
        .args(["admin", "migrate-files", "--to", "s3"]);
    let mut child = cmd.spawn().unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while garage.keys("m/").is_empty() && child.try_wait().unwrap().is_none() {
        assert!(tokio::time::Instant::now() < deadline, "nothing moved");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    let moved_first = garage.keys("m/").len();
    // Every file is in one place or the other, whole.
    let verify = scratch.admin_json(&["verify"]).await;
    assert_eq!(verify["ok"], 2 * n, "{verify:#}");
    let second = scratch.admin_json(&["migrate-files", "--to", "s3"]).await;
    assert_eq!(
        second["files"].as_u64().unwrap() + second["already"].as_u64().unwrap(),
        2 * n as u64,
        "{second:#}"
    );
    assert!(
        second["already"].as_u64().unwrap() + 1 >= moved_first as u64,
        "{second:#}"
    );
    let third = scratch.admin_json(&["migrate-files", "--to", "s3"]).await;
    assert_eq!(third["files"], 0, "{third:#}");
    assert_eq!(third["already"], 2 * n, "{third:#}");
    assert_eq!(garage.keys("m/").len(), 2 * n);
    let images = scratch.data_dir().join("images");
    let left: Vec<_> = std::fs::read_dir(&images).unwrap().collect();
    assert!(left.is_empty(), "images/ still holds {left:?}");
    let verify = scratch.admin_json(&["verify"]).await;
    assert_eq!(verify["ok"], 2 * n, "{verify:#}");
    let show = scratch.admin_json(&["show", "mig-0"]).await;
    assert_eq!(key_of(&show["files"][0]["location"]), "m/mig-0/0.png");
    assert_eq!(show["images"][0]["path"], Value::Null);
    let _ = Kind::Cover;
}

/// A backup with files in the bucket holds the state and names the bucket (never the key);
/// restore checks every object (there, with its size) and refuses, naming the task, when one
/// is gone.
#[tokio::test]
async fn backup_names_the_bucket_and_restore_checks_every_object() {
    let garage = Garage::start();
    let fake = FakeKie::start().await;
    let scratch = s3_scratch(&fake, &garage, "vm1/");
    let d = scratch.serve().await;
    cover(&fake, &d, "bk-1", 2).await;
    cover(&fake, &d, "bk-2", 2).await;
    wait_status(&scratch, "both downloaded", |v| {
        v["tasks"]["downloaded"] == 2
    })
    .await;
    let dest = scratch.dir.path().join("backup");
    let dest_s = dest.display().to_string();
    let manifest = scratch.admin_json(&["backup", &dest_s]).await;
    d.stop().await;
    assert_eq!(manifest["objects"], 4, "{manifest:#}");
    assert_eq!(manifest["images"], 0, "{manifest:#}");
    assert_eq!(manifest["storage"]["bucket"], "coverd", "{manifest:#}");
    assert_eq!(manifest["storage"]["prefix"], "vm1/", "{manifest:#}");
    let text = std::fs::read_to_string(dest.join("backup.json")).unwrap();
    assert!(
        !text.contains(&garage.secret_access_key) && !text.contains(&garage.access_key_id),
        "the manifest holds the key: {text}"
    );
    // Restored elsewhere with the same [storage]: every object checked, verify clean.
    let again = s3_scratch(&fake, &garage, "vm1/");
    let out = again.run(&["admin", "restore", &dest_s]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    let verify = again.admin_json(&["verify"]).await;
    assert_eq!(verify["ok"], 4, "{verify:#}");
    // A manifest that counts other objects than the records name: refused.
    let manifest_path = dest.join("backup.json");
    let honest = std::fs::read_to_string(&manifest_path).unwrap();
    let mut doctored: Value = serde_json::from_str(&honest).unwrap();
    doctored["objects"] = 5.into();
    std::fs::write(&manifest_path, doctored.to_string()).unwrap();
    let fourth = s3_scratch(&fake, &garage, "vm1/");
    let mut cmd = crate::bin_util::coverd();
    cmd.arg("--config")
        .arg(fourth.config_path())
        .args(["admin", "restore", &dest_s]);
    let out = crate::bin_util::output_blocking(&mut cmd);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("names 4 objects"), "{stderr}");
    std::fs::write(&manifest_path, honest).unwrap();
    // Under another prefix the records name objects that are not its own: refused.
    let other = s3_scratch(&fake, &garage, "vm2/");
    let out = other.run(&["admin", "restore", &dest_s]).await;
    assert_ne!(out.code, Some(0), "{out:?}");
    assert!(!other.data_dir().join("db").exists());
    // An object gone behind coverd's back: refused, naming the task.
    garage.delete("vm1/bk-2/1.png");
    let third = s3_scratch(&fake, &garage, "vm1/");
    let mut cmd = crate::bin_util::coverd();
    cmd.arg("--config")
        .arg(third.config_path())
        .args(["admin", "restore", &dest_s]);
    let out = crate::bin_util::output_blocking(&mut cmd);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("bk-2") && stderr.contains("does not have"),
        "{stderr}"
    );
}

/// A 3-node Garage cluster (replication factor 3: a write needs 2 of the 3 nodes) started by
/// `scripts/garage-cluster` in a temp dir; `scripts/garage-cluster stop DIR` when dropped, a
/// failing test's unwinding included.
struct Cluster {
    dir: tempfile::TempDir,
    /// `DIR/env`: GARAGE_ENDPOINT (node 1), GARAGE_ENDPOINT_<i>, the bucket, region and key.
    env: HashMap<String, String>,
}

impl Cluster {
    /// Starts the cluster on six free loopback ports below the ephemeral range (where the
    /// other tests' port 0 binds land); returns once the script has written `DIR/env`.
    fn start() -> Cluster {
        let base = (0..100)
            .map(|_| rand::random_range(20_000u16..32_000))
            .find(|base| {
                [0, 1, 10, 11, 20, 21]
                    .iter()
                    .all(|o| std::net::TcpListener::bind(("127.0.0.1", base + o)).is_ok())
            })
            .expect("six free ports for the cluster");
        let dir = tempfile::Builder::new()
            .prefix("coverd-garage-cluster-")
            .tempdir()
            .expect("cluster temp dir");
        // The guard before the script runs: whatever a failed start leaves running is stopped.
        let mut cluster = Cluster {
            dir,
            env: HashMap::new(),
        };
        let out = cluster
            .script()
            .arg("start")
            .arg(cluster.dir.path())
            .env("GARAGE_CLUSTER_PORT", base.to_string())
            .output()
            .expect("run scripts/garage-cluster");
        assert!(
            out.status.success(),
            "scripts/garage-cluster start failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let env = std::fs::read_to_string(cluster.dir.path().join("env")).expect("DIR/env");
        cluster.env = env
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        cluster
    }

    fn var(&self, name: &str) -> &str {
        self.env
            .get(name)
            .unwrap_or_else(|| panic!("no {name} in {:?}", self.env))
    }

    /// The script, without the caller's GARAGE_* variables (they override garage's config).
    fn script(&self) -> Command {
        let mut cmd =
            Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/garage-cluster"));
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("GARAGE_") {
                cmd.env_remove(k);
            }
        }
        cmd.stdin(std::process::Stdio::null());
        cmd
    }

    /// The `[storage]` values for node 1's S3 API.
    fn store(&self) -> S3Store<'_> {
        assert_eq!(self.var("GARAGE_ENDPOINT"), self.var("GARAGE_ENDPOINT_1"));
        S3Store {
            endpoint: self.var("GARAGE_ENDPOINT"),
            bucket: self.var("GARAGE_BUCKET"),
            region: self.var("GARAGE_REGION"),
            access_key_id: self.var("GARAGE_ACCESS_KEY_ID"),
            secret_access_key: self.var("GARAGE_SECRET_ACCESS_KEY"),
        }
    }

    /// A client of node `i`'s S3 API, without retries: what it reads it reads at once. No
    /// idle connections kept: a node's graceful stop waits for its clients to hang up.
    fn client(&self, i: usize) -> AmazonS3 {
        let options = ClientOptions::new()
            .with_timeout(Duration::from_secs(30))
            .with_pool_max_idle_per_host(0);
        AmazonS3Builder::new()
            .with_client_options(options)
            .with_endpoint(self.var(&format!("GARAGE_ENDPOINT_{i}")))
            .with_bucket_name(self.var("GARAGE_BUCKET"))
            .with_region(self.var("GARAGE_REGION"))
            .with_access_key_id(self.var("GARAGE_ACCESS_KEY_ID"))
            .with_secret_access_key(self.var("GARAGE_SECRET_ACCESS_KEY"))
            .with_allow_http(true)
            .with_virtual_hosted_style_request(false)
            .with_retry(RetryConfig {
                max_retries: 0,
                ..RetryConfig::default()
            })
            .build()
            .expect("cluster client")
    }

    /// SIGKILL to node `i` (its pid from `DIR/node<i>.pid`); returns once its S3 port
    /// refuses connections (the process is gone).
    async fn kill_node(&self, i: usize) {
        let pid = std::fs::read_to_string(self.dir.path().join(format!("node{i}.pid")))
            .expect("node pid file");
        let pid = pid.trim();
        let status = Command::new("kill")
            .args(["-KILL", pid])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -KILL {pid} failed");
        let endpoint = self.var(&format!("GARAGE_ENDPOINT_{i}"));
        let addr = endpoint.strip_prefix("http://").unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(addr).await.is_ok() {
            assert!(
                Instant::now() < deadline,
                "node {i} still answers on {addr}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let dir = self.dir.path().to_path_buf();
        match self.script().arg("stop").arg(&dir).output() {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "scripts/garage-cluster stop {} failed ({}): {}",
                dir.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => eprintln!("cannot run scripts/garage-cluster stop: {e}"),
        }
    }
}

/// A 3-node cluster loses node 2 (not the one coverd talks to) while files are on their way
/// to the bucket, multipart WAVs among them: every task still ends downloaded, verify finds
/// every object whole, and each object read through node 3 has the recorded sha256.
#[tokio::test]
async fn a_three_node_cluster_loses_a_node_while_uploads_run() {
    let began = Instant::now();
    let cluster = Cluster::start();
    let cluster_up = began.elapsed();
    let fake = FakeKie::start().await;
    let scratch = Scratch::new();
    let storage = s3_storage_table(&scratch, &cluster.store(), "c/");
    scratch.write_config(&fake.base_url(), "", &storage);
    let d = scratch.serve().await;
    let node3 = cluster.client(3);
    // Key → the bytes served for it.
    let mut want: BTreeMap<String, Bytes> = BTreeMap::new();
    let send_wav = async |id: String, bytes: Bytes| {
        let path = format!("/cluster/{id}.wav");
        fake.files.set(&path, Behaviour::Image(bytes.clone()));
        let body = serde_json::json!({"code": 200, "msg": "success",
            "data": {"task_id": id, "audio_wav_url": fake.files.url(&path)}});
        let (status, text) = d.callback_on("wav", body.to_string()).await.unwrap();
        assert_eq!(status, 200, "{text}");
        (format!("c/{id}/audio.wav"), bytes)
    };
    // Before the kill: three WAVs above the multipart size (two parts each), ten covers.
    for i in 0..3 {
        let (key, bytes) = send_wav(format!("cl-wav-{i}"), wav((9 << 20) + i * 1_000_003)).await;
        want.insert(key, bytes);
    }
    let covers = |range: std::ops::Range<usize>| {
        let (fake, d) = (&fake, &d);
        async move {
            let mut got = Vec::new();
            for i in range {
                let id = format!("cl-cover-{i:02}");
                for (n, bytes) in cover(fake, d, &id, 2).await.into_iter().enumerate() {
                    got.push((format!("c/{id}/{n}.png"), bytes));
                }
            }
            got
        }
    };
    want.extend(covers(0..10).await);
    // Node 2 goes once the first object is in the bucket.
    let deadline = Instant::now() + Duration::from_secs(60);
    let landed = loop {
        let keys = crate::garage::list_keys(&node3, "").await;
        if !keys.is_empty() {
            break keys.len();
        }
        assert!(Instant::now() < deadline, "no upload landed:\n{}", d.logs());
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    cluster.kill_node(2).await;
    // After it: ten more covers and one more multipart WAV, to a cluster of two.
    want.extend(covers(10..20).await);
    let (key, bytes) = send_wav("cl-wav-3".into(), wav((9 << 20) + 7)).await;
    want.insert(key, bytes);
    let tasks = 20 + 4;
    wait_status(&scratch, "every task downloaded", |v| {
        v["tasks"]["downloaded"] == tasks
    })
    .await;
    let verify = scratch.admin_json(&["verify"]).await;
    assert_eq!(verify["ok"], verify["checked"], "{verify:#}");
    assert_eq!(verify["checked"], want.len(), "{verify:#}");
    // What coverd recorded: each file's key and sha256, those of the bytes served.
    let mut recorded = BTreeMap::new();
    for t in scratch.export().await.unwrap() {
        for f in t["files"].as_array().unwrap() {
            assert_eq!(f["state"], "downloaded", "{t:#}");
            let sha256 = f["sha256"].as_str().unwrap().to_string();
            recorded.insert(key_of(&f["location"]), sha256);
        }
    }
    let served: BTreeMap<String, String> = want
        .iter()
        .map(|(k, b)| (k.clone(), sha256_hex(b)))
        .collect();
    assert_eq!(recorded, served);
    // The bucket through node 3: those objects and no other, each with its recorded sha256.
    assert_eq!(
        crate::garage::list_keys(&node3, "").await,
        recorded.keys().cloned().collect::<Vec<_>>()
    );
    for (key, sha256) in &recorded {
        let got = node3
            .get(&ObjectPath::from(key.as_str()))
            .await
            .unwrap_or_else(|e| panic!("get {key} through node 3: {e}"))
            .bytes()
            .await
            .unwrap_or_else(|e| panic!("read {key} through node 3: {e}"));
        assert_eq!(sha256_hex(&got), *sha256, "{key}");
    }
    d.stop().await;
    let bytes: usize = want.values().map(|b| b.len()).sum();
    eprintln!(
        "three-node cluster: {tasks} tasks, {} files, {bytes} bytes, {landed} of them in the bucket when node 2 was killed; all downloaded and verified in {:.1} s ({:.1} s of it starting the cluster)",
        want.len(),
        began.elapsed().as_secs_f64(),
        cluster_up.as_secs_f64()
    );
}

/// Garage killed while a multipart upload is under way (the fetched 64 MiB WAV is whole in
/// `tmp/`, its parts going out), then started again: the upload is retried from the file
/// fetched again, no attempt is used, the task ends `downloaded` and its object verifies.
#[tokio::test]
async fn garage_killed_mid_upload_then_started_again_fails_no_task() {
    let mut garage = Garage::start();
    // What Garage keeps in its data directory before any object (a marker file).
    let empty = garage.data_bytes();
    let fake = FakeKie::start().await;
    let scratch = s3_scratch(&fake, &garage, "mid/");
    let d = scratch.serve().await;
    let big = wav(64 << 20);
    fake.files
        .set("/mid/big.wav", Behaviour::Image(big.clone()));
    let body = serde_json::json!({"code": 200, "msg": "success",
        "data": {"task_id": "mid-wav", "audio_wav_url": fake.files.url("/mid/big.wav")}});
    let (status, _) = d.callback_on("wav", body.to_string()).await.unwrap();
    assert_eq!(status, 200);
    // The upload is under way once Garage holds some of its parts (on disk, before the
    // object exists): eight parts of 8 MiB, each fsynced by Garage.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mid_upload = loop {
        if garage.data_bytes() > empty {
            break garage.get("mid/mid-wav/audio.wav").is_none();
        }
        assert!(tokio::time::Instant::now() < deadline, "no upload began");
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    garage.stop();
    eprintln!(
        "Garage killed {} the upload",
        if mid_upload { "during" } else { "after" }
    );
    if mid_upload {
        d.wait_for_log("uploads paused").await;
        let logs = d.logs();
        assert!(
            logs.contains("refused a part of an upload")
                || logs.contains("refused to complete a multipart upload"),
            "the outage came before the upload began:\n{logs}"
        );
        let status = scratch.admin_json(&["status"]).await;
        assert_eq!(status["tasks"]["failed"], 0, "{status:#}");
    }
    garage.restart();
    wait_status(&scratch, "the WAV downloaded", |v| {
        v["tasks"]["downloaded"] == 1
    })
    .await;
    let show = scratch.admin_json(&["show", "mid-wav"]).await;
    assert_eq!(show["files"][0]["attempts"], 1, "{show:#}");
    assert_eq!(show["files"][0]["sha256"], sha256_hex(&big).as_str());
    assert_eq!(
        sha256_hex(&garage.get("mid/mid-wav/audio.wav").unwrap()),
        sha256_hex(&big)
    );
    let verify = scratch.admin_json(&["verify"]).await;
    assert_eq!(verify["ok"], 1, "{verify:#}");
    d.stop().await;
}
