//! The VM's attached files as the device reads them (LOAD_FILE): the VMM owns the files
//! and hands the device this view of them.

use std::sync::Arc;

/// Read access to a VM's attached files, by their index in the guest's file table.
pub trait FileSource: Send + Sync {
    /// Size of file `file`; `None` if there is no such file.
    fn file_len(&self, file: u32) -> Option<u64>;
    /// Fills `out` with the bytes of `file` from `offset` (the caller checked the range
    /// against [`FileSource::file_len`]); an error if the file cannot be read whole, as
    /// when it shrank since it was attached.
    fn read_file(&self, file: u32, offset: u64, out: &mut [u8]) -> std::io::Result<()>;
}

/// A VM with no attached files.
#[derive(Debug, Default)]
pub struct NoFiles;

impl FileSource for NoFiles {
    fn file_len(&self, _: u32) -> Option<u64> {
        None
    }

    fn read_file(&self, file: u32, _: u64, _: &mut [u8]) -> std::io::Result<()> {
        Err(std::io::Error::other(format!("no attached file {file}")))
    }
}

/// No files, as the shared handle the device keeps.
pub fn no_files() -> Arc<dyn FileSource> {
    Arc::new(NoFiles)
}
