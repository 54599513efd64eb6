//! The VM's attached files (a model, a dataset): found by name, read into RAM, or loaded
//! straight into device memory with [`Accel::load_file`](crate::accel::Accel::load_file).
//!
//! ```ignore
//! let model = ferry_sdk::files::open("model")?;
//! let mut header = vec![0u8; 4096.min(model.size() as usize)];
//! model.read_at(0, &mut header)?;
//! ```
//!
//! The host validates every request; a read fails with [`FileError`] rather than
//! returning wrong bytes.

use crate::abi::file::{self, FileRequest, FileTable, FILE_REQUEST_ADDR, FILE_TABLE_ADDR};
use crate::abi::file::{FILE_TABLE_MAGIC, MAX_READ};
use crate::abi::port;
use alloc::string::String;
use alloc::vec::Vec;
use core::arch::asm;
use core::fmt;

/// Most bytes one read request asks for: the VMM copies a request whole on the vCPU's
/// thread, and a pause (a migration's switchover) waits for it: from the host's page
/// cache 4 MiB took 0.2 ms on a test machine, where [`MAX_READ`] took 13.
const READ_PIECE: usize = 4 << 20;
const _: () = assert!(READ_PIECE as u64 <= MAX_READ);

/// An attached file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct File {
    index: u32,
    size: u64,
    name: &'static str,
}

/// Why a file could not be found or read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FileError {
    /// No file of that name is attached.
    NotFound(String),
    /// The host refused or failed a read: the [`file::status`] code.
    Read {
        /// The file.
        name: &'static str,
        /// First byte asked for.
        offset: u64,
        /// Bytes asked for.
        len: u64,
        /// The status the host wrote.
        status: u32,
    },
    /// The bytes asked for do not fit in this guest's memory.
    TooLarge {
        /// The file.
        name: &'static str,
        /// Bytes asked for.
        len: u64,
    },
}

impl fmt::Display for FileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FileError::NotFound(name) => {
                write!(f, "no file named '{name}' is attached")?;
                let names: Vec<&str> = list().map(|f| f.name).collect();
                if names.is_empty() {
                    write!(
                        f,
                        " (this VM has no attached files; attach one with --attach {name}=PATH)"
                    )
                } else {
                    write!(f, " (attached: {})", names.join(", "))
                }
            }
            FileError::Read {
                name,
                offset,
                len,
                status,
            } => write!(
                f,
                "reading {len} bytes at {offset} of '{name}' failed: {}",
                file::status::name(*status)
            ),
            FileError::TooLarge { name, len } => {
                write!(f, "{len} bytes of '{name}' do not fit in guest memory")
            }
        }
    }
}

/// The table the VMM wrote (empty if it wrote none).
fn table() -> &'static FileTable {
    // SAFETY: the file-table page is mapped user read-only at this fixed address by every
    // VMM of this ABI version and never written while the guest runs.
    let table = unsafe { &*(FILE_TABLE_ADDR as *const FileTable) };
    static EMPTY: FileTable = FileTable {
        count: 0,
        ..FileTable::EMPTY
    };
    if table.magic == FILE_TABLE_MAGIC {
        table
    } else {
        &EMPTY
    }
}

/// Every attached file, in attach order.
pub fn list() -> impl Iterator<Item = File> {
    table().files().iter().enumerate().filter_map(|(i, entry)| {
        let name = core::str::from_utf8(entry.name()).ok()?;
        Some(File {
            index: i as u32,
            size: entry.size,
            name,
        })
    })
}

/// The attached file called `name`.
pub fn open(name: &str) -> Result<File, FileError> {
    list()
        .find(|f| f.name == name)
        .ok_or_else(|| FileError::NotFound(name.into()))
}

impl File {
    /// Its name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Its size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Its index in the file table (what device commands name it by).
    pub fn index(&self) -> u32 {
        self.index
    }

    /// Fills `buf` with the bytes from `offset` on.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), FileError> {
        let mut done = 0usize;
        while done < buf.len() {
            let n = (buf.len() - done).min(READ_PIECE);
            let at = offset + done as u64;
            let piece = &mut buf[done..done + n];
            let req = FileRequest {
                file: self.index,
                status: file::status::PENDING,
                offset: at,
                addr: piece.as_mut_ptr() as u64,
                len: n as u64,
            };
            let page = FILE_REQUEST_ADDR as *mut FileRequest;
            // SAFETY: the request page is mapped user read/write at this fixed address and
            // only this function uses it (the guest is single-threaded). The `out` makes the
            // VMM copy into `piece`, which we borrow mutably, and write the status; without
            // `nomem` the compiler assumes memory changed across it.
            let status = unsafe {
                page.write_volatile(req);
                asm!("out dx, eax", in("dx") port::FILE_READ, in("eax") 0u32,
                     options(nostack, preserves_flags));
                (&raw const (*page).status).read_volatile()
            };
            if status != file::status::OK {
                return Err(FileError::Read {
                    name: self.name,
                    offset: at,
                    len: n as u64,
                    status,
                });
            }
            done += n;
        }
        Ok(())
    }

    /// The bytes `offset..offset + len`.
    pub fn read_vec(&self, offset: u64, len: usize) -> Result<Vec<u8>, FileError> {
        let mut buf = Vec::new();
        buf.try_reserve_exact(len)
            .map_err(|_| FileError::TooLarge {
                name: self.name,
                len: len as u64,
            })?;
        buf.resize(len, 0);
        self.read_at(offset, &mut buf)?;
        Ok(buf)
    }

    /// The whole file.
    pub fn read_all(&self) -> Result<Vec<u8>, FileError> {
        let len = usize::try_from(self.size).map_err(|_| FileError::TooLarge {
            name: self.name,
            len: self.size,
        })?;
        self.read_vec(0, len)
    }
}
