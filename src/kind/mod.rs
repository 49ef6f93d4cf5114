//! The task kinds (SPEC "Task kinds") as data: for each kind, KIE's create and details
//! endpoints, where its callback puts the task id, whether it is called back in stages,
//! whether an unknown create outcome may be resent, and which files it keeps (their names,
//! their types, checked from their own bytes, and which size cap applies). The readings of
//! KIE's callbacks and details answers for each kind are in `kind::read`.
//!
//! Pure data and pure functions: must not do I/O, read configuration (a cap is named by its
//! [`FileType`], the caller looks it up) or decide transitions (`machine` does, from the
//! uniform readings this module gives).

pub mod read;

/// What a task is the result of. Fixed when coverd first learns of the task.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Cover,
    Music,
    Wav,
    Video,
    Stems,
}

/// What a file is, from its own bytes; decides its extension and its size cap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileType {
    /// PNG, JPEG, WebP or GIF (`download.max_image_bytes`).
    Image,
    /// MP3: an ID3 tag or an MPEG audio frame sync (`download.max_audio_bytes`).
    Mp3,
    /// RIFF/WAVE (`download.max_wav_bytes`).
    Wav,
    /// ISO base media with an `ftyp` box (`download.max_video_bytes`).
    Mp4,
}

/// One kind's description.
#[derive(Debug)]
pub struct Description {
    pub kind: Kind,
    /// KIE's create endpoints, under `/api/v1/` (the first is `submit`'s default).
    pub create: &'static [&'static str],
    /// KIE's details endpoint, under `/api/v1/`, asked with `?taskId=`.
    pub details: &'static str,
    /// Where this kind's callback puts the task id, looked at before the other places
    /// ([`read::TASK_ID_PLACES`]).
    pub task_id_place: (Option<&'static str>, &'static str),
    /// Called back in stages (`text`, `first`) before the success callback.
    pub staged: bool,
    /// A create request whose outcome is unknown may be sent again: KIE answers a repeat
    /// with the existing task id (covers only; the others would charge and generate again).
    pub resend_unknown_create: bool,
    /// The directory under the data directory where its files go.
    pub dir: &'static str,
}

const COVER: Description = Description {
    kind: Kind::Cover,
    create: &["suno/cover/generate"],
    details: "suno/cover/record-info",
    task_id_place: (Some("data"), "taskId"),
    staged: false,
    resend_unknown_create: true,
    dir: "images",
};

const MUSIC: Description = Description {
    kind: Kind::Music,
    create: &[
        "generate",
        "generate/extend",
        "generate/upload-cover",
        "generate/upload-extend",
        "generate/add-instrumental",
        "generate/add-vocals",
        "generate/replace-section",
        "generate/mashup",
    ],
    details: "generate/record-info",
    task_id_place: (Some("data"), "task_id"),
    staged: true,
    resend_unknown_create: false,
    dir: "files",
};

const WAV: Description = Description {
    kind: Kind::Wav,
    create: &["wav/generate"],
    details: "wav/record-info",
    task_id_place: (Some("data"), "task_id"),
    staged: false,
    resend_unknown_create: false,
    dir: "files",
};

const VIDEO: Description = Description {
    kind: Kind::Video,
    create: &["mp4/generate"],
    details: "mp4/record-info",
    task_id_place: (Some("data"), "task_id"),
    staged: false,
    resend_unknown_create: false,
    dir: "files",
};

const STEMS: Description = Description {
    kind: Kind::Stems,
    create: &["vocal-removal/generate"],
    details: "vocal-removal/record-info",
    task_id_place: (Some("data"), "task_id"),
    staged: false,
    resend_unknown_create: false,
    dir: "files",
};

/// The stems a separation can make, in the order their files are indexed (SPEC).
pub const STEMS_ORDER: [&str; 14] = [
    "vocal",
    "instrumental",
    "backing_vocals",
    "drums",
    "bass",
    "guitar",
    "piano",
    "keyboard",
    "percussion",
    "strings",
    "synth",
    "fx",
    "brass",
    "woodwinds",
];

impl Kind {
    pub const ALL: [Kind; 5] = [
        Kind::Cover,
        Kind::Music,
        Kind::Wav,
        Kind::Video,
        Kind::Stems,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Cover => "cover",
            Kind::Music => "music",
            Kind::Wav => "wav",
            Kind::Video => "video",
            Kind::Stems => "stems",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// A stable one-byte code, for index keys.
    pub fn code(self) -> u8 {
        match self {
            Kind::Cover => 0,
            Kind::Music => 1,
            Kind::Wav => 2,
            Kind::Video => 3,
            Kind::Stems => 4,
        }
    }

    pub fn describe(self) -> &'static Description {
        match self {
            Kind::Cover => &COVER,
            Kind::Music => &MUSIC,
            Kind::Wav => &WAV,
            Kind::Video => &VIDEO,
            Kind::Stems => &STEMS,
        }
    }
}

impl FileType {
    /// The type of a file from its first bytes (at least 12 are needed to tell them all
    /// apart), with the extension it is stored under; `None` for anything else, an empty
    /// body included.
    pub fn sniff(head: &[u8]) -> Option<(FileType, &'static str)> {
        if head.starts_with(b"\x89PNG\r\n\x1a\n") {
            Some((FileType::Image, "png"))
        } else if head.starts_with(&[0xff, 0xd8, 0xff]) {
            Some((FileType::Image, "jpg"))
        } else if head.len() >= 12 && &head[..4] == b"RIFF" && &head[8..12] == b"WEBP" {
            Some((FileType::Image, "webp"))
        } else if head.starts_with(b"GIF87a") || head.starts_with(b"GIF89a") {
            Some((FileType::Image, "gif"))
        } else if head.len() >= 12 && &head[..4] == b"RIFF" && &head[8..12] == b"WAVE" {
            Some((FileType::Wav, "wav"))
        } else if head.len() >= 8 && &head[4..8] == b"ftyp" {
            Some((FileType::Mp4, "mp4"))
        } else if head.starts_with(b"ID3") || is_mpeg_audio_frame(head) {
            Some((FileType::Mp3, "mp3"))
        } else {
            None
        }
    }
}

/// An MPEG audio frame header: 11 sync bits, a valid version, layer III (what MP3 is), a
/// bitrate index other than "free" or "bad", a sample rate index other than "reserved".
fn is_mpeg_audio_frame(head: &[u8]) -> bool {
    let [a, b, c, ..] = head else {
        return false;
    };
    let sync = *a == 0xff && b & 0xe0 == 0xe0;
    let version_ok = (b >> 3) & 0b11 != 0b01;
    let layer_iii = (b >> 1) & 0b11 == 0b01;
    let bitrate = c >> 4;
    let rate = (c >> 2) & 0b11;
    sync && version_ok && layer_iii && bitrate != 0 && bitrate != 0b1111 && rate != 0b11
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_codes_are_distinct_and_round_trip() {
        for k in Kind::ALL {
            assert_eq!(Kind::parse(k.as_str()), Some(k));
            assert_eq!(k.describe().kind, k);
            assert!(!k.describe().create.is_empty());
        }
        let mut codes: Vec<u8> = Kind::ALL.iter().map(|k| k.code()).collect();
        codes.dedup();
        assert_eq!(codes.len(), Kind::ALL.len());
        assert_eq!(Kind::parse("Cover"), None);
        // Only a cover's unknown create outcome may be sent again (SPEC "Task kinds").
        let resend: Vec<Kind> = Kind::ALL
            .into_iter()
            .filter(|k| k.describe().resend_unknown_create)
            .collect();
        assert_eq!(resend, [Kind::Cover]);
    }

    #[test]
    fn every_type_is_told_from_its_own_bytes() {
        // (first bytes, expected type and extension)
        type Case<'a> = (&'a [u8], Option<(FileType, &'a str)>);
        let cases: [Case<'_>; 12] = [
            (b"\x89PNG\r\n\x1a\n....", Some((FileType::Image, "png"))),
            (b"\xff\xd8\xff\xe0..JFIF", Some((FileType::Image, "jpg"))),
            (b"RIFF\x10\0\0\0WEBPVP8 ", Some((FileType::Image, "webp"))),
            (b"GIF89a......", Some((FileType::Image, "gif"))),
            (b"RIFF\x10\0\0\0WAVEfmt ", Some((FileType::Wav, "wav"))),
            (b"\0\0\0\x20ftypisom", Some((FileType::Mp4, "mp4"))),
            (b"ID3\x04\0\0\0\0\0\0", Some((FileType::Mp3, "mp3"))),
            // MPEG-1 layer III, 128 kb/s, 44.1 kHz.
            (b"\xff\xfb\x90\x64\0\0", Some((FileType::Mp3, "mp3"))),
            // Layer I and a "bad" bitrate are not MP3.
            (b"\xff\xff\x90\x64\0\0", None),
            (b"\xff\xfb\xf0\x64\0\0", None),
            (b"", None),
            (b"<html><body>", None),
        ];
        for (head, expected) in cases {
            assert_eq!(FileType::sniff(head), expected, "{head:?}");
        }
    }

    #[test]
    fn stems_are_listed_once() {
        let mut s = STEMS_ORDER.to_vec();
        s.sort_unstable();
        s.dedup();
        assert_eq!(s.len(), STEMS_ORDER.len());
    }
}
