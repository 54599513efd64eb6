//! Attached files: read-only files the host gives a VM (a model, a dataset), found by
//! name and read at memory speed.
//!
//! The VMM writes a [`FileTable`] at [`FILE_TABLE_ADDR`] (user read-only) before the
//! guest starts: the files' names and sizes, in attach order; a file's index in the table
//! names it in requests. A guest reads a file into its RAM by filling the
//! [`FileRequest`] at [`FILE_REQUEST_ADDR`] (user read/write) and writing
//! [`port::FILE_READ`](crate::port::FILE_READ); the VMM checks every field, copies, and
//! writes [`FileRequest::status`] before the `out` returns. The accelerator loads a file
//! straight into device memory with [`op::LOAD_FILE`](crate::accel::op::LOAD_FILE).
//!
//! One request moves at most [`MAX_READ`] bytes, so a pause (for a snapshot or a
//! migration) never waits long for one; the SDK loops.

/// Guest-physical address of the [`FileTable`] page (user read-only).
pub const FILE_TABLE_ADDR: u64 = 0xa000;
/// Guest-physical address of the [`FileRequest`] page (user read/write).
pub const FILE_REQUEST_ADDR: u64 = 0xb000;
/// [`FileTable::magic`]: "FERRYFT1" little endian.
pub const FILE_TABLE_MAGIC: u64 = u64::from_le_bytes(*b"FERRYFT1");
/// Most files attached to one VM.
pub const MAX_FILES: usize = 63;
/// Bytes of a file name (names are shorter: they end with a NUL in this field).
pub const NAME_BYTES: usize = 56;
/// Most bytes one request (or one LOAD_FILE command) moves.
pub const MAX_READ: u64 = 64 << 20;

/// One attached file, as the guest sees it.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FileEntry {
    /// The name, UTF-8, NUL-padded (at most `NAME_BYTES - 1` bytes).
    pub name: [u8; NAME_BYTES],
    /// Size in bytes.
    pub size: u64,
}

/// The table of attached files.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FileTable {
    /// [`FILE_TABLE_MAGIC`] (0 in a VM whose VMM wrote no table).
    pub magic: u64,
    /// Files in [`Self::files`].
    pub count: u32,
    /// Zero.
    pub reserved: u32,
    /// The first `count` entries are the files, in attach order.
    pub files: [FileEntry; MAX_FILES],
}

const _: () = assert!(core::mem::size_of::<FileTable>() <= crate::PAGE_SIZE as usize);

impl FileEntry {
    /// An unused entry.
    pub const EMPTY: FileEntry = FileEntry {
        name: [0; NAME_BYTES],
        size: 0,
    };

    /// The name's bytes (up to the first NUL).
    pub fn name(&self) -> &[u8] {
        let end = self.name.iter().position(|&b| b == 0).unwrap_or(NAME_BYTES);
        &self.name[..end]
    }
}

impl FileTable {
    /// A table with no files.
    pub const EMPTY: FileTable = FileTable {
        magic: FILE_TABLE_MAGIC,
        count: 0,
        reserved: 0,
        files: [FileEntry::EMPTY; MAX_FILES],
    };

    /// The files (none if `count` is out of range).
    pub fn files(&self) -> &[FileEntry] {
        self.files.get(..self.count as usize).unwrap_or(&[])
    }
}

/// Whether `name` may name an attached file: 1 to `NAME_BYTES - 1` bytes of ASCII
/// letters, digits, `.`, `_` and `-`.
pub fn valid_name(name: &str) -> bool {
    (1..NAME_BYTES).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

/// A read of an attached file into guest RAM, at [`FILE_REQUEST_ADDR`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct FileRequest {
    /// Index of the file in the [`FileTable`].
    pub file: u32,
    /// Written by the VMM: a [`status`] code.
    pub status: u32,
    /// First byte of the file to read.
    pub offset: u64,
    /// Guest address to copy to (at or above [`IMAGE_BASE`](crate::IMAGE_BASE)).
    pub addr: u64,
    /// Bytes to read (at most [`MAX_READ`]).
    pub len: u64,
}

/// Outcomes of a [`FileRequest`].
pub mod status {
    status_codes! {
        /// Not executed (the guest writes this before asking).
        PENDING = 0, "not executed";
        /// Done.
        OK = 1, "ok";
        /// No file with that index.
        BAD_FILE = 2, "no such file";
        /// `offset..offset + len` is not inside the file.
        OUT_OF_BOUNDS = 3, "range outside the file";
        /// The destination is not guest RAM the guest may write.
        BAD_GUEST_RANGE = 4, "bad guest address range";
        /// `len` is above [`MAX_READ`](super::MAX_READ).
        TOO_LONG = 5, "read too long";
        /// The host could not read the file (it changed size, or an I/O error).
        IO_ERROR = 6, "host I/O error";
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_short_plain_ascii() {
        for good in ["model", "train-images.idx3.gz", "a", "A_9"] {
            assert!(valid_name(good), "{good}");
        }
        let long = "x".repeat(NAME_BYTES);
        for bad in ["", "a/b", "a b", "é", "..\0", long.as_str()] {
            assert!(!valid_name(bad), "{bad}");
        }
        assert!(valid_name(&long[1..]));
    }

    #[test]
    fn a_lying_count_shows_no_files() {
        let mut table = FileTable::EMPTY;
        table.count = MAX_FILES as u32 + 1;
        assert!(table.files().is_empty());
        table.count = 1;
        table.files[0].name[..5].copy_from_slice(b"model");
        assert_eq!(table.files()[0].name(), b"model");
    }
}
