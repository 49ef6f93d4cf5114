//! KIE's webhook signature (kie-api.md "Signature"): Base64 of HMAC-SHA256 over
//! `<taskId>.<timestamp>`, keyed with the UTF-8 bytes of the configured key. Owns the
//! verification only; must not read headers, bodies or configuration itself.

use std::time::Duration;

use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Length of an HMAC-SHA256 tag in bytes.
const TAG_BYTES: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("missing X-Webhook-Timestamp or X-Webhook-Signature header")]
    Missing,
    #[error("X-Webhook-Timestamp is not a Unix time in seconds")]
    BadTimestamp,
    #[error(
        "X-Webhook-Timestamp is {skew_secs}s away from this server's clock (tolerance {tolerance_secs}s)"
    )]
    Stale { skew_secs: i64, tolerance_secs: u64 },
    #[error("X-Webhook-Signature is not Base64 of a 32-byte HMAC-SHA256")]
    Malformed,
    #[error("X-Webhook-Signature does not match")]
    Mismatch,
}

/// Checks one delivery's signature. `now_secs` is the server's Unix time.
pub fn verify(
    key: &[u8],
    task_id: &str,
    timestamp: Option<&str>,
    signature: Option<&str>,
    now_secs: i64,
    tolerance: Duration,
) -> Result<(), SignatureError> {
    let (Some(timestamp), Some(signature)) = (timestamp, signature) else {
        return Err(SignatureError::Missing);
    };
    let (timestamp, signature) = (timestamp.trim(), signature.trim());
    if timestamp.is_empty() || signature.is_empty() {
        return Err(SignatureError::Missing);
    }
    let ts: i64 = timestamp
        .parse()
        .map_err(|_| SignatureError::BadTimestamp)?;
    let skew = now_secs.saturating_sub(ts);
    if skew.unsigned_abs() > tolerance.as_secs() {
        return Err(SignatureError::Stale {
            skew_secs: skew,
            tolerance_secs: tolerance.as_secs(),
        });
    }
    let tag = base64::engine::general_purpose::STANDARD
        .decode(signature)
        .map_err(|_| SignatureError::Malformed)?;
    if tag.len() != TAG_BYTES {
        return Err(SignatureError::Malformed);
    }
    let mut mac = HmacSha256::new_from_slice(key).map_err(|_| SignatureError::Mismatch)?;
    mac.update(task_id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.as_bytes());
    mac.verify_slice(&tag).map_err(|_| SignatureError::Mismatch)
}

/// The signature KIE would send; for tests and for tools that replay deliveries.
pub fn sign(key: &[u8], task_id: &str, timestamp: &str) -> String {
    // HMAC accepts keys of any length; `new_from_slice` cannot fail for it.
    let mut mac = HmacSha256::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
    mac.update(task_id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &[u8] = b"webhook-secret";
    const NOW: i64 = 1_795_775_581;
    const TOL: Duration = Duration::from_secs(300);

    fn check(ts: Option<&str>, sig: Option<&str>) -> Result<(), SignatureError> {
        verify(KEY, "task1", ts, sig, NOW, TOL)
    }

    #[test]
    fn cases() {
        let now = NOW.to_string();
        let good = sign(KEY, "task1", &now);
        let old = (NOW - 301).to_string();
        let old_sig = sign(KEY, "task1", &old);
        let edge = (NOW + 300).to_string();
        let edge_sig = sign(KEY, "task1", &edge);
        let other_task = sign(KEY, "task2", &now);
        let other_key = sign(b"other", "task1", &now);
        let short = base64::engine::general_purpose::STANDARD.encode([0u8; 16]);
        // (timestamp, signature, expected)
        type Row<'a> = (Option<&'a str>, Option<&'a str>, Result<(), SignatureError>);
        let table: Vec<Row<'_>> = vec![
            (Some(&now), Some(&good), Ok(())),
            (Some(&edge), Some(&edge_sig), Ok(())),
            (None, Some(&good), Err(SignatureError::Missing)),
            (Some(&now), None, Err(SignatureError::Missing)),
            (Some(&now), Some(""), Err(SignatureError::Missing)),
            (
                Some("yesterday"),
                Some(&good),
                Err(SignatureError::BadTimestamp),
            ),
            (
                Some(&old),
                Some(&old_sig),
                Err(SignatureError::Stale {
                    skew_secs: 301,
                    tolerance_secs: 300,
                }),
            ),
            (
                Some(&now),
                Some("!!!not base64"),
                Err(SignatureError::Malformed),
            ),
            (Some(&now), Some(&short), Err(SignatureError::Malformed)),
            (Some(&now), Some(&other_task), Err(SignatureError::Mismatch)),
            (Some(&now), Some(&other_key), Err(SignatureError::Mismatch)),
        ];
        for (ts, sig, want) in table {
            assert_eq!(check(ts, sig), want, "ts={ts:?} sig={sig:?}");
        }
    }
}
