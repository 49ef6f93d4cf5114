//! Failures in words (sled's copies of an I/O error) and a write failure reported until it
//! is gone.

use super::open;
use crate::store::{StoreError, describe, describe_io};

/// sled hands out copies of its stored I/O error made from `Debug` text; they reach
/// `/healthz` and the logs in words.
#[test]
fn io_errors_are_described_in_words() {
    let original = sled::Error::Io(std::io::Error::from_raw_os_error(28));
    let copy = original.clone();
    assert!(copy.to_string().contains("Os {"), "sled's copy: {copy}");
    for e in [original, copy] {
        assert_eq!(describe(&e), "No space left on device (os error 28)");
        let text = StoreError::Io(e).to_string();
        assert!(!text.contains("Os {") && !text.contains("kind:"), "{text}");
    }
    let plain = std::io::Error::other("a message of our own");
    assert_eq!(describe_io(&plain), "a message of our own");
}

#[tokio::test]
async fn a_write_failure_is_reported_until_it_is_gone() {
    let (_d, store) = open();
    assert_eq!(store.write_failure(), None);
    store.inject_write_failures(true);
    assert!(store.write_failure().unwrap().contains("injected"));
    assert!(store.check_health().await.is_err());
    let woken = {
        let store = store.clone();
        tokio::spawn(async move { store.writable().await })
    };
    store.inject_write_failures(false);
    woken.await.unwrap();
    assert_eq!(store.write_failure(), None);
    assert!(!store.needs_reopen());
    store.check_health().await.unwrap();
}
