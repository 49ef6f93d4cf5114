//! What the log says when an event was recorded on a task: one line per recorded event,
//! whose message names the task and what happened ("task 21ae… downloaded: 2 images,
//! 3.1 MB"; "wav task …" for the kinds other than cover) and whose fields carry the same
//! facts (`task_id`, `task_kind`, `state`, `event`; under journald `TASK_ID=`, `TASK_KIND=`,
//! `STATE=`, `EVENT=`). Level: warning when a task or an image failed
//! (or when the caller says the event reports a failure), info otherwise. Owns the wording
//! of those lines; must not decide anything about a task (that is `machine`).

use tracing::Level;

use crate::model::{EventKind, Task};
use crate::store::Applied;

/// Logs one recorded event of `applied.task` as one line, at `at_least` or higher.
pub fn record(applied: &Applied, at_least: Level) {
    let Some((level, kind, message)) = line(&applied.task, &applied.outcome.notes) else {
        return;
    };
    let level = if at_least < level { at_least } else { level };
    let task_id = applied.task.task_id.as_str();
    let state = applied.task.state.as_str();
    let event = kind.as_str();
    let task_kind = applied.task.kind.as_str();
    if level == Level::WARN || level == Level::ERROR {
        tracing::warn!(task_id, task_kind, state, event, "{message}");
    } else {
        tracing::info!(task_id, task_kind, state, event, "{message}");
    }
}

/// The level, headline kind and message for the notes of one recorded event; `None` when
/// the event left no note.
pub fn line(task: &Task, notes: &[(EventKind, String)]) -> Option<(Level, EventKind, String)> {
    // The outcome first (downloaded, failed), then what led to it, in order.
    let head = notes
        .iter()
        .position(|(k, _)| matches!(k, EventKind::Failed | EventKind::Downloaded))
        .unwrap_or(0);
    let (kind, _) = notes.get(head)?;
    let failed_detail = notes
        .iter()
        .find(|(k, _)| *k == EventKind::Failed)
        .map(|(_, d)| d.as_str());
    let mut parts = vec![phrase(task, &notes[head].0, &notes[head].1)];
    for (i, (k, detail)) in notes.iter().enumerate() {
        // An image failure or a failure callback that failed the task is already in the
        // task's reason.
        let repeated = matches!(k, EventKind::ImageFailed | EventKind::Callback)
            && failed_detail.is_some_and(|f| f.contains(detail.as_str()));
        if i != head && !repeated {
            parts.push(phrase(task, k, detail));
        }
    }
    let level = if notes.iter().any(|(k, _)| {
        matches!(
            k,
            EventKind::Failed | EventKind::ImageFailed | EventKind::Mismatch
        )
    }) {
        Level::WARN
    } else {
        Level::INFO
    };
    // A cover's lines read as before kinds existed; the others name their kind.
    let what = match task.kind {
        crate::model::Kind::Cover => String::new(),
        k => format!("{} ", k.as_str()),
    };
    let message = format!("{what}task {} {}", task.task_id, parts.join("; "));
    Some((level, *kind, message))
}

fn phrase(task: &Task, kind: &EventKind, detail: &str) -> String {
    // Image notes read "image N: …".
    let image = |verb: &str| match detail.split_once(": ") {
        Some((img, rest)) => format!("{img} {verb}: {rest}"),
        None => format!("{detail} ({verb})"),
    };
    match kind {
        EventKind::Submitted => "submitted".into(),
        EventKind::Tracked => format!("tracked: {detail}"),
        EventKind::Callback => format!("callback: {detail}"),
        EventKind::DuplicateCallback => format!("duplicate callback: {detail}"),
        EventKind::Polled => format!("polled: {detail}"),
        EventKind::Received => format!("received: {detail}"),
        EventKind::ImageStored => image("stored"),
        EventKind::ImageRetry => detail.to_string(),
        EventKind::ImageFailed => image("failed"),
        EventKind::Downloaded => {
            let bytes: u64 = task.images.iter().filter_map(|i| i.bytes).sum();
            let n = task.images.len();
            let s = if n == 1 { "" } else { "s" };
            format!("downloaded: {n} image{s}, {}", human_bytes(bytes))
        }
        EventKind::Failed => format!("failed: {detail}"),
        EventKind::Retried => format!("retried: {detail}"),
        EventKind::Ignored => detail.to_string(),
        EventKind::UrlRefreshed => detail.to_string(),
        EventKind::Mismatch => format!("URL mismatch: {detail}"),
    }
}

/// `512 bytes`, `3.1 kB`, `3.1 MB`, `1.2 GB` (decimal units).
pub fn human_bytes(n: u64) -> String {
    const UNITS: [(f64, &str); 3] = [(1e9, "GB"), (1e6, "MB"), (1e3, "kB")];
    for (size, unit) in UNITS {
        if n as f64 >= size {
            return format!("{:.1} {unit}", n as f64 / size);
        }
    }
    format!("{n} bytes")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task() -> Task {
        let mut t = Task::new("t1".into(), None, 0);
        t.images = vec![
            crate::model::Image::pending(0, "https://a/0.png".into(), 0),
            crate::model::Image::pending(1, "https://a/1.png".into(), 0),
        ];
        t.images[0].bytes = Some(2_000_000);
        t.images[1].bytes = Some(1_100_000);
        t
    }

    #[test]
    fn outcome_first_and_failures_once() {
        let t = task();
        let (level, kind, msg) = line(
            &t,
            &[
                (EventKind::ImageStored, "image 1: 1100000 bytes at x".into()),
                (EventKind::Downloaded, "all 2 image(s) stored".into()),
            ],
        )
        .unwrap();
        assert_eq!((level, kind), (Level::INFO, EventKind::Downloaded));
        assert_eq!(
            msg,
            "task t1 downloaded: 2 images, 3.1 MB; image 1 stored: 1100000 bytes at x"
        );
        let (level, _, msg) = line(
            &t,
            &[
                (EventKind::ImageFailed, "image 0: HTTP 404".into()),
                (EventKind::Failed, "image 0: HTTP 404".into()),
            ],
        )
        .unwrap();
        assert_eq!(level, Level::WARN);
        assert_eq!(msg, "task t1 failed: image 0: HTTP 404");
        assert!(line(&t, &[]).is_none());
    }

    #[test]
    fn sizes() {
        assert_eq!(human_bytes(512), "512 bytes");
        assert_eq!(human_bytes(3_100_000), "3.1 MB");
        assert_eq!(human_bytes(1_500), "1.5 kB");
    }
}
