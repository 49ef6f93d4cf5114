//! A stored file's identity, [`Slot`] (kind, task, name, expected type), and the paths of
//! the data directory built from it (`task_dir`, `file_path`): built from a valid task id and
//! the kind's file names, never from a place a record holds. Must not do I/O.

use crate::fetch::Ext;
use crate::model::{FileType, Image, Kind};

/// The directory of a task's files, relative to the data directory: `images/<task_id>` for a
/// cover, `files/<task_id>` for the others.
pub fn task_dir(kind: Kind, task_id: &str) -> String {
    format!("{}/{task_id}", kind.describe().dir)
}

/// Where a file is stored, relative to the data directory: `images/<task_id>/<index>.<ext>`
/// for a cover image, `files/<task_id>/<name>.<ext>` for the others (SPEC "Data directory").
/// The one place that builds it: `install` writes there, and restore accepts a record only
/// if its path is exactly this.
pub fn file_path(kind: Kind, task_id: &str, name: &str, ext: Ext) -> String {
    format!("{}/{name}.{}", task_dir(kind, task_id), ext.as_str())
}
/// Where one file of a task goes: its kind's directory, the task's directory in it, its
/// name without extension and the type its bytes must be. Built from the kind's rules (a
/// record's name is checked against them), never from a path a record holds.
#[derive(Debug, Clone)]
pub struct Slot {
    kind: Kind,
    task_id: String,
    name: String,
    expect: FileType,
}

impl Slot {
    /// The slot of file `image` of task `task_id` of `kind`; `Err` (why) for an invalid task
    /// id or a name the kind does not give.
    pub fn of(kind: Kind, task_id: &str, image: &Image) -> Result<Slot, String> {
        if !crate::model::valid_task_id(task_id) {
            return Err(format!("{task_id:?} is not a valid task id"));
        }
        if !kind.file_name_ok(image.index, &image.name) {
            return Err(format!(
                "file {} is named {:?}, not a name a {} task gives its files",
                image.index,
                image.name,
                kind.as_str()
            ));
        }
        Ok(Slot {
            kind,
            task_id: task_id.to_string(),
            name: image.name.clone(),
            expect: image.expect,
        })
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    pub fn task_id(&self) -> &str {
        &self.task_id
    }

    /// The task's directory, relative to the data directory.
    pub fn dir(&self) -> String {
        task_dir(self.kind, &self.task_id)
    }

    /// The file's path with `ext`, relative to the data directory.
    pub fn path(&self, ext: Ext) -> String {
        file_path(self.kind, &self.task_id, &self.name, ext)
    }

    /// The file's name in its directory with `ext`.
    pub fn file_name(&self, ext: Ext) -> String {
        format!("{}.{}", self.name, ext.as_str())
    }

    /// The extensions a file of this slot may have (those of its type).
    pub fn exts(&self) -> impl Iterator<Item = Ext> + use<> {
        self.expect.exts()
    }
}
