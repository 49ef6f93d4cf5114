//! What a record-info answer means for a task still waiting for its result: the pure
//! reading shared by the poll fallback (`poll`) and the confirmation of callbacks
//! (`download`), next to the reading of KIE's replies (`wire`). Owns the verdict (a final
//! result, or not yet and whether the failure may clear soon) and how long "not found"
//! means "not created yet"; must not do I/O or decide transitions (`machine` applies the
//! `Report`).

use super::{CoverStatus, Details, KieError};
use crate::kind::read::Reading;
use crate::machine::Report;
use crate::model::Millis;

/// How a poll whose record-info call failed starts its detail.
pub const RECORD_INFO_FAILED: &str = "record-info failed";
/// How long "record not found" counts as "not created yet" rather than "no such task".
const NOT_FOUND_GRACE_MS: Millis = 15 * 60_000;

/// What a record-info answer means for a task still waiting for its result.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// KIE has a final result: images (never empty), or a failure with KIE's reason.
    Done(Report),
    /// No result yet: ask again later. `transient`: an error that may clear soon (network,
    /// 429, 455, 5xx), rather than "pending" or "generating".
    Pending { detail: String, transient: bool },
}

/// Reads one record-info answer the same way for the poller and for the confirmation of a
/// callback (`download`). `waited_ms`: how long ago the task was submitted (or its callback
/// arrived); "not found" means "not created yet" only for a while.
pub fn interpret(_task_id: &str, answer: Result<Details, KieError>, waited_ms: Millis) -> Verdict {
    let pending = |detail: String| Verdict::Pending {
        detail,
        transient: false,
    };
    match answer {
        Ok(Details::Other(reading)) => match reading {
            Reading::Success { files } => Verdict::Done(Report::Success { files }),
            Reading::Failure { reason } => Verdict::Done(Report::Failure { reason }),
            Reading::Pending {
                unknown: Some(status),
                ..
            } => pending(format!(
                "record-info: status {status}, which coverd does not know; taken as pending"
            )),
            Reading::Pending { stage, .. } => pending(format!(
                "record-info: {}",
                stage.as_deref().unwrap_or("pending")
            )),
        },
        Ok(Details::Cover(info)) => match info.status {
            CoverStatus::Success if !info.images.is_empty() => {
                Verdict::Done(Report::images(info.images))
            }
            CoverStatus::Success => pending("record-info reports success but no images yet".into()),
            CoverStatus::Failed => {
                let code = info
                    .error_code
                    .map(|c| c.to_string())
                    .unwrap_or_else(|| "?".into());
                let msg = info
                    .error_message
                    .unwrap_or_else(|| "generation failed".into());
                Verdict::Done(Report::Failure {
                    reason: format!("KIE code {code}: {msg}"),
                })
            }
            CoverStatus::Pending | CoverStatus::Generating => {
                pending(format!("record-info: {:?}", info.status).to_lowercase())
            }
        },
        Err(KieError::NotFound) if waited_ms < NOT_FOUND_GRACE_MS => {
            pending("record-info: not found yet".into())
        }
        Err(KieError::NotFound) => Verdict::Done(Report::Failure {
            reason: format!(
                "KIE has no record of this task {} minutes after it was submitted; check the task id",
                NOT_FOUND_GRACE_MS / 60_000
            ),
        }),
        // Said once, as a warning, with the event that records it.
        Err(e) => Verdict::Pending {
            transient: e.is_transient(),
            detail: format!("{RECORD_INFO_FAILED}: {e}"),
        },
    }
}
