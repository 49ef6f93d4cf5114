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

/// Where complete cover images live, relative to the data directory.
pub const IMAGES_DIR: &str = "images";
/// Where the complete files of the other kinds live, relative to the data directory.
pub const FILES_DIR: &str = "files";

/// Longest file URL a task holds (`model` re-exports it as the task's limit).
pub const MAX_URL_BYTES: usize = 4096;

/// What a task is the result of. Fixed when coverd first learns of the task.
#[cfg_attr(test, derive(serde::Serialize))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Cover,
    Music,
    Wav,
    Video,
    Stems,
}

/// What a file is, from its own bytes; decides its extension and its size cap.
#[cfg_attr(test, derive(serde::Serialize))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
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
    dir: IMAGES_DIR,
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
    dir: FILES_DIR,
};

const WAV: Description = Description {
    kind: Kind::Wav,
    create: &["wav/generate"],
    details: "wav/record-info",
    task_id_place: (Some("data"), "task_id"),
    staged: false,
    resend_unknown_create: false,
    dir: FILES_DIR,
};

const VIDEO: Description = Description {
    kind: Kind::Video,
    create: &["mp4/generate"],
    details: "mp4/record-info",
    task_id_place: (Some("data"), "task_id"),
    staged: false,
    resend_unknown_create: false,
    dir: FILES_DIR,
};

const STEMS: Description = Description {
    kind: Kind::Stems,
    create: &["vocal-removal/generate"],
    details: "vocal-removal/record-info",
    task_id_place: (Some("data"), "task_id"),
    staged: false,
    resend_unknown_create: false,
    dir: FILES_DIR,
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

    /// Whether `name` is a name this kind gives its file `index` (SPEC "Task kinds"): a
    /// cover image's index, `track-<i>`, `audio`, `video`, or a stem of the list. A record's
    /// name is checked by this before any path is built from it.
    pub fn file_name_ok(self, index: u32, name: &str) -> bool {
        match self {
            Kind::Cover => name == index.to_string(),
            Kind::Music => name.strip_prefix("track-").is_some_and(|n| {
                n.parse::<u32>()
                    .is_ok_and(|i| i.to_string() == n && (i as usize) < read::MAX_FILES)
            }),
            Kind::Wav => name == "audio",
            Kind::Video => name == "video",
            Kind::Stems => STEMS_ORDER.contains(&name),
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

/// A stored file's type and extension, from its own bytes (never from Content-Type, the URL
/// or anything else KIE sent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ext {
    Png,
    Jpg,
    Webp,
    Gif,
    Mp3,
    Wav,
    Mp4,
}

impl Ext {
    /// Every type, images first (in the order they were added: a file's old extensions are
    /// looked for in this order).
    pub const ALL: [Ext; 7] = [
        Ext::Png,
        Ext::Jpg,
        Ext::Webp,
        Ext::Gif,
        Ext::Mp3,
        Ext::Wav,
        Ext::Mp4,
    ];

    /// The type of a file from its first bytes (at least 12 are needed to tell them all
    /// apart); `None` for anything else, an empty body included.
    pub fn sniff(head: &[u8]) -> Option<Ext> {
        if head.starts_with(b"\x89PNG\r\n\x1a\n") {
            Some(Ext::Png)
        } else if head.starts_with(&[0xff, 0xd8, 0xff]) {
            Some(Ext::Jpg)
        } else if head.len() >= 12 && &head[..4] == b"RIFF" && &head[8..12] == b"WEBP" {
            Some(Ext::Webp)
        } else if head.starts_with(b"GIF87a") || head.starts_with(b"GIF89a") {
            Some(Ext::Gif)
        } else if head.len() >= 12 && &head[..4] == b"RIFF" && &head[8..12] == b"WAVE" {
            Some(Ext::Wav)
        } else if head.len() >= 8 && &head[4..8] == b"ftyp" {
            Some(Ext::Mp4)
        } else if head.starts_with(b"ID3") || is_mpeg_audio_frame(head) {
            Some(Ext::Mp3)
        } else {
            None
        }
    }

    /// The file extension.
    pub fn as_str(self) -> &'static str {
        match self {
            Ext::Png => "png",
            Ext::Jpg => "jpg",
            Ext::Webp => "webp",
            Ext::Gif => "gif",
            Ext::Mp3 => "mp3",
            Ext::Wav => "wav",
            Ext::Mp4 => "mp4",
        }
    }

    /// What kind of file this is, for the size cap and the expected type.
    pub fn file_type(self) -> FileType {
        match self {
            Ext::Png | Ext::Jpg | Ext::Webp | Ext::Gif => FileType::Image,
            Ext::Mp3 => FileType::Mp3,
            Ext::Wav => FileType::Wav,
            Ext::Mp4 => FileType::Mp4,
        }
    }

    /// The media type shown in a file entry's `media_type`.
    pub fn media_type(self) -> &'static str {
        match self {
            Ext::Png => "image/png",
            Ext::Jpg => "image/jpeg",
            Ext::Webp => "image/webp",
            Ext::Gif => "image/gif",
            Ext::Mp3 => "audio/mpeg",
            Ext::Wav => "audio/wav",
            Ext::Mp4 => "video/mp4",
        }
    }

    pub fn parse(s: &str) -> Option<Ext> {
        Ext::ALL.into_iter().find(|e| e.as_str() == s)
    }
}

impl FileType {
    /// The extensions a file of this type may be stored under.
    pub fn exts(self) -> impl Iterator<Item = Ext> {
        Ext::ALL.into_iter().filter(move |e| e.file_type() == self)
    }

    /// How messages name it ("not an image", "not an MP3").
    pub fn describe(self) -> &'static str {
        match self {
            FileType::Image => "an image",
            FileType::Mp3 => "an MP3",
            FileType::Wav => "a WAV",
            FileType::Mp4 => "an MP4",
        }
    }

    /// Its short name in messages ("image larger than …").
    pub fn noun(self) -> &'static str {
        match self {
            FileType::Image => "image",
            FileType::Mp3 => "MP3",
            FileType::Wav => "WAV",
            FileType::Mp4 => "MP4",
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
            let found = Ext::sniff(head).map(|e| (e.file_type(), e.as_str()));
            assert_eq!(found, expected, "{head:?}");
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
