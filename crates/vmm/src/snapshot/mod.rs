//! The snapshot file: a whole paused VM in one versioned, checksummed file.
//!
//! ```text
//! header   magic "FERRYSNP" | format version u32 | reserved u32 | ram_size u64 | state_len u64
//! state    postcard-encoded MicrovmState (state_len bytes, at most MAX_STATE_LEN)
//! memory   runs of non-zero pages: gpa u64 | pages u64 | pages * 4096 bytes   (ascending)
//! end      gpa = u64::MAX | pages = 0
//! device   non-zero accelerator chunks: buffer u32 | reserved u32 | index u64 | len u64 | data
//! end      buffer = u32::MAX | 0 | 0 | 0
//! trailer  CRC-32 (IEEE) of every byte before it, u32
//! ```
//!
//! All integers are little endian. Zero pages are not stored: guest RAM starts zeroed.
//! A reader checks every field before use and the CRC before the VM is allowed to run,
//! so a truncated, corrupted or foreign file is refused with a reason, never half-loaded.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use ferry_abi::PAGE_SIZE;
use serde::de::DeserializeOwned;
use serde::Serialize;
use vm_memory::{Bytes, GuestAddress};

use ferry_accel::device::Accelerator;
use ferry_accel::dirty::{ChunkId, CHUNK_SIZE};

use crate::memory::{ram_size, GuestRam};

/// File name of the snapshot inside a snapshot directory.
pub const SNAPSHOT_FILE: &str = "vm.snap";
/// Format version this VMM writes and reads.
pub const FORMAT_VERSION: u32 = 3;
const MAGIC: [u8; 8] = *b"FERRYSNP";
const HEADER_LEN: usize = 32;
/// Upper bound on the encoded state, so a corrupt length cannot make us allocate wildly.
pub const MAX_STATE_LEN: u64 = 16 << 20;
/// Pages scanned and written per memory run at most.
const RUN_PAGES: u64 = 64;
const END_MARKER: u64 = u64::MAX;

/// Errors reading or writing a snapshot file.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The file could not be opened, read or written.
    #[error("{}: I/O error", path.display())]
    Io {
        /// The snapshot file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: io::Error,
    },
    /// The file ends early.
    #[error("{}: snapshot is truncated", path.display())]
    Truncated {
        /// The snapshot file.
        path: PathBuf,
    },
    /// Not a Ferry snapshot.
    #[error("{}: not a Ferry snapshot (bad magic)", path.display())]
    BadMagic {
        /// The snapshot file.
        path: PathBuf,
    },
    /// Written by an incompatible version of Ferry.
    #[error("{}: snapshot format version {found} is not supported (this ferry reads version {FORMAT_VERSION})", path.display())]
    UnsupportedVersion {
        /// The snapshot file.
        path: PathBuf,
        /// Version in the file.
        found: u32,
    },
    /// A header or record field is out of range.
    #[error("{}: corrupt snapshot: {what}", path.display())]
    Corrupt {
        /// The snapshot file.
        path: PathBuf,
        /// Which check failed.
        what: String,
    },
    /// The VM state does not decode.
    #[error("{}: corrupt snapshot: VM state does not decode", path.display())]
    BadState {
        /// The snapshot file.
        path: PathBuf,
        /// What the decoder said.
        #[source]
        source: postcard::Error,
    },
    /// The checksum does not match the contents.
    #[error("{}: snapshot checksum mismatch (stored {stored:#010x}, computed {computed:#010x}): the file is corrupted", path.display())]
    Checksum {
        /// The snapshot file.
        path: PathBuf,
        /// CRC in the trailer.
        stored: u32,
        /// CRC of the contents.
        computed: u32,
    },
    /// The VM state could not be encoded.
    #[error("cannot encode the VM state")]
    Encode(#[source] postcard::Error),
}

/// Sizes of a written or read snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotStats {
    /// Guest RAM size.
    pub ram_bytes: u64,
    /// Non-zero pages stored.
    pub pages_stored: u64,
    /// Non-zero accelerator chunks stored.
    pub chunks_stored: u64,
    /// Bytes of the file.
    pub file_bytes: u64,
}

const DEVICE_END: u32 = u32::MAX;

/// Passes bytes through while computing their CRC.
struct Crc<T> {
    inner: T,
    hasher: crc32fast::Hasher,
    bytes: u64,
}

impl<T> Crc<T> {
    fn new(inner: T) -> Self {
        Self {
            inner,
            hasher: crc32fast::Hasher::new(),
            bytes: 0,
        }
    }
}

impl<W: Write> Write for Crc<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl<R: Read> Read for Crc<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

/// Writes `state` and the non-zero pages of `mem` to `path`, atomically: the file
/// appears (renamed from a temporary) only once complete and synced.
pub fn write_snapshot<S: Serialize>(
    path: &Path,
    state: &S,
    mem: &GuestRam,
    accel: Option<&Accelerator>,
) -> Result<SnapshotStats, SnapshotError> {
    let io_err = |source| SnapshotError::Io {
        path: path.to_owned(),
        source,
    };
    let state_bytes = postcard::to_stdvec(state).map_err(SnapshotError::Encode)?;
    let ram_bytes = ram_size(mem);
    let tmp = path.with_extension("snap.partial");
    let file = File::create(&tmp).map_err(io_err)?;
    let out = Crc::new(BufWriter::with_capacity(1 << 20, file));

    let write_all = |out: &mut Crc<BufWriter<File>>| -> io::Result<(u64, u64)> {
        out.write_all(&MAGIC)?;
        out.write_all(&FORMAT_VERSION.to_le_bytes())?;
        out.write_all(&0u32.to_le_bytes())?;
        out.write_all(&ram_bytes.to_le_bytes())?;
        out.write_all(&(state_bytes.len() as u64).to_le_bytes())?;
        out.write_all(&state_bytes)?;

        let zero = [0u8; PAGE_SIZE as usize];
        let mut chunk = vec![0u8; (RUN_PAGES * PAGE_SIZE) as usize];
        let mut pages_stored = 0;
        let mut addr = 0;
        while addr < ram_bytes {
            let len = ((ram_bytes - addr) as usize).min(chunk.len());
            let chunk = &mut chunk[..len];
            mem.read_slice(chunk, GuestAddress(addr))
                .map_err(io::Error::other)?;
            let pages: Vec<&[u8]> = chunk.chunks(PAGE_SIZE as usize).collect();
            let mut i = 0;
            while i < pages.len() {
                if pages[i] == zero {
                    i += 1;
                    continue;
                }
                let start = i;
                while i < pages.len() && pages[i] != zero {
                    i += 1;
                }
                let run = (i - start) as u64;
                out.write_all(&(addr + start as u64 * PAGE_SIZE).to_le_bytes())?;
                out.write_all(&run.to_le_bytes())?;
                out.write_all(&chunk[start * PAGE_SIZE as usize..i * PAGE_SIZE as usize])?;
                pages_stored += run;
            }
            addr += len as u64;
        }
        out.write_all(&END_MARKER.to_le_bytes())?;
        out.write_all(&0u64.to_le_bytes())?;

        let mut chunks_stored = 0;
        if let Some(accel) = accel {
            let mut data = Vec::with_capacity(CHUNK_SIZE as usize);
            // A chunk never written is zero, like a restored device's fresh buffers.
            for chunk in accel.written_chunks() {
                if accel.read_chunk(chunk, &mut data).is_none() || data.iter().all(|&b| b == 0) {
                    continue;
                }
                out.write_all(&chunk.buffer.to_le_bytes())?;
                out.write_all(&0u32.to_le_bytes())?;
                out.write_all(&chunk.index.to_le_bytes())?;
                out.write_all(&(data.len() as u64).to_le_bytes())?;
                out.write_all(&data)?;
                chunks_stored += 1;
            }
        }
        out.write_all(&DEVICE_END.to_le_bytes())?;
        out.write_all(&[0u8; 20])?;
        Ok((pages_stored, chunks_stored))
    };
    let finish = |mut out: Crc<BufWriter<File>>| -> io::Result<(u64, u64, u64)> {
        let (pages_stored, chunks_stored) = write_all(&mut out)?;
        let crc = out.hasher.clone().finalize();
        let mut file = out.inner.into_inner().map_err(|e| e.into_error())?;
        file.write_all(&crc.to_le_bytes())?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        Ok((pages_stored, chunks_stored, out.bytes + 4))
    };
    let (pages_stored, chunks_stored, file_bytes) = finish(out).map_err(|e| {
        // A snapshot that could not be written whole leaves nothing behind (a full disk
        // gets its space back).
        let _ = std::fs::remove_file(&tmp);
        io_err(e)
    })?;
    Ok(SnapshotStats {
        ram_bytes,
        pages_stored,
        chunks_stored,
        file_bytes,
    })
}

/// A snapshot file being read: header and state first, then memory.
pub struct SnapshotReader {
    path: PathBuf,
    input: Crc<BufReader<File>>,
    ram_size: u64,
}

impl SnapshotReader {
    fn err(&self, e: io::Error) -> SnapshotError {
        read_err(&self.path, e)
    }

    fn corrupt(&self, what: String) -> SnapshotError {
        SnapshotError::Corrupt {
            path: self.path.clone(),
            what,
        }
    }

    /// Opens `path`, checks the header and decodes the state.
    pub fn open<S: DeserializeOwned>(path: &Path) -> Result<(Self, S), SnapshotError> {
        let file = File::open(path).map_err(|source| SnapshotError::Io {
            path: path.to_owned(),
            source,
        })?;
        let mut reader = Self {
            path: path.to_owned(),
            input: Crc::new(BufReader::with_capacity(1 << 20, file)),
            ram_size: 0,
        };
        let mut header = [0u8; HEADER_LEN];
        reader
            .input
            .read_exact(&mut header)
            .map_err(|e| reader.err(e))?;
        if header[..8] != MAGIC {
            return Err(SnapshotError::BadMagic {
                path: path.to_owned(),
            });
        }
        let word32 =
            |at: usize| u32::from_le_bytes(header[at..at + 4].try_into().expect("4 bytes"));
        let word64 =
            |at: usize| u64::from_le_bytes(header[at..at + 8].try_into().expect("8 bytes"));
        let version = word32(8);
        if version != FORMAT_VERSION {
            return Err(SnapshotError::UnsupportedVersion {
                path: path.to_owned(),
                found: version,
            });
        }
        reader.ram_size = word64(16);
        if let Err(e) = crate::memory::validate_ram_size(reader.ram_size) {
            return Err(reader.corrupt(e.to_string()));
        }
        let state_len = word64(24);
        if state_len > MAX_STATE_LEN {
            return Err(reader.corrupt(format!("state length {state_len} exceeds {MAX_STATE_LEN}")));
        }
        let mut state_bytes = vec![0u8; state_len as usize];
        reader
            .input
            .read_exact(&mut state_bytes)
            .map_err(|e| reader.err(e))?;
        let state =
            postcard::from_bytes(&state_bytes).map_err(|source| SnapshotError::BadState {
                path: path.to_owned(),
                source,
            })?;
        Ok((reader, state))
    }

    /// Guest RAM size recorded in the header.
    pub fn ram_size(&self) -> u64 {
        self.ram_size
    }

    /// Reads the memory runs into `mem` (fresh, zeroed, of [`Self::ram_size`] bytes) and
    /// the accelerator chunks into `accel` (restored from the state, paused), and checks
    /// the trailer. Until this returns `Ok`, neither may run.
    pub fn read_contents_into(
        mut self,
        mem: &GuestRam,
        accel: Option<&Accelerator>,
    ) -> Result<SnapshotStats, SnapshotError> {
        if ram_size(mem) != self.ram_size {
            return Err(self.corrupt(format!(
                "RAM size {} does not match the VM's {}",
                self.ram_size,
                ram_size(mem)
            )));
        }
        let mut buf = vec![0u8; (RUN_PAGES * PAGE_SIZE) as usize];
        let mut next_free = 0u64;
        let mut pages_stored = 0;
        loop {
            let mut record = [0u8; 16];
            self.input
                .read_exact(&mut record)
                .map_err(|e| self.err(e))?;
            let gpa = u64::from_le_bytes(record[..8].try_into().expect("8 bytes"));
            let pages = u64::from_le_bytes(record[8..].try_into().expect("8 bytes"));
            if gpa == END_MARKER && pages == 0 {
                break;
            }
            let end = pages
                .checked_mul(PAGE_SIZE)
                .and_then(|len| gpa.checked_add(len));
            let valid = gpa % PAGE_SIZE == 0
                && (1..=RUN_PAGES).contains(&pages)
                && gpa >= next_free
                && end.is_some_and(|end| end <= self.ram_size);
            if !valid {
                return Err(self.corrupt(format!(
                    "memory run of {pages} pages at {gpa:#x} is out of order or outside {:#x} bytes of RAM",
                    self.ram_size
                )));
            }
            let data = &mut buf[..(pages * PAGE_SIZE) as usize];
            self.input.read_exact(data).map_err(|e| self.err(e))?;
            mem.write_slice(data, GuestAddress(gpa))
                .map_err(|e| self.corrupt(e.to_string()))?;
            next_free = gpa + pages * PAGE_SIZE;
            pages_stored += pages;
        }
        let chunks_stored = self.read_chunks_into(accel)?;
        let computed = self.input.hasher.clone().finalize();
        let bytes_before_crc = self.input.bytes;
        let mut rest = self.input.inner;
        let mut stored = [0u8; 4];
        rest.read_exact(&mut stored)
            .map_err(|e| read_err(&self.path, e))?;
        let stored = u32::from_le_bytes(stored);
        if stored != computed {
            return Err(SnapshotError::Checksum {
                path: self.path,
                stored,
                computed,
            });
        }
        let mut extra = [0u8; 1];
        if rest.read(&mut extra).map_err(|e| read_err(&self.path, e))? != 0 {
            return Err(SnapshotError::Corrupt {
                path: self.path,
                what: "data after the trailer".into(),
            });
        }
        Ok(SnapshotStats {
            ram_bytes: self.ram_size,
            pages_stored,
            chunks_stored,
            file_bytes: bytes_before_crc + 4,
        })
    }

    /// Reads the device section; every chunk must fit the restored buffer table.
    fn read_chunks_into(&mut self, accel: Option<&Accelerator>) -> Result<u64, SnapshotError> {
        let mut data = Vec::with_capacity(CHUNK_SIZE as usize);
        let mut previous: Option<ChunkId> = None;
        let mut chunks = 0;
        loop {
            let mut record = [0u8; 24];
            self.input
                .read_exact(&mut record)
                .map_err(|e| self.err(e))?;
            let buffer = u32::from_le_bytes(record[..4].try_into().expect("4 bytes"));
            let index = u64::from_le_bytes(record[8..16].try_into().expect("8 bytes"));
            let len = u64::from_le_bytes(record[16..24].try_into().expect("8 bytes"));
            if buffer == DEVICE_END {
                return Ok(chunks);
            }
            let chunk = ChunkId { buffer, index };
            let Some(accel) = accel.filter(|_| len <= CHUNK_SIZE && previous < Some(chunk)) else {
                return Err(self.corrupt(format!(
                    "accelerator chunk {index} of buffer {buffer} ({len} bytes) is out of order, too long, or the VM has no accelerator"
                )));
            };
            data.resize(len as usize, 0);
            self.input.read_exact(&mut data).map_err(|e| self.err(e))?;
            accel
                .write_chunk(chunk, &data)
                .map_err(|e| self.corrupt(e.to_string()))?;
            previous = Some(chunk);
            chunks += 1;
        }
    }
}

fn read_err(path: &Path, e: io::Error) -> SnapshotError {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        SnapshotError::Truncated {
            path: path.to_owned(),
        }
    } else {
        SnapshotError::Io {
            path: path.to_owned(),
            source: e,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_ram;

    const RAM: u64 = 16 << 20;

    fn sample(dir: &Path) -> (PathBuf, GuestRam) {
        let mem = create_guest_ram(RAM).unwrap();
        mem.write_slice(&[0xab; 5000], GuestAddress(0x10_0000))
            .unwrap();
        mem.write_obj(0x1234_5678u64, GuestAddress(RAM - 8))
            .unwrap();
        let path = dir.join(SNAPSHOT_FILE);
        let stats = write_snapshot(&path, &"state".to_string(), &mem, None).unwrap();
        assert_eq!(stats.pages_stored, 3, "two pages of 0xab and the last page");
        (path, mem)
    }

    fn read_back(path: &Path) -> Result<(String, GuestRam), SnapshotError> {
        let (reader, state): (_, String) = SnapshotReader::open(path)?;
        let mem = create_guest_ram(reader.ram_size()).unwrap();
        reader.read_contents_into(&mem, None)?;
        Ok((state, mem))
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("ferry-snapshot-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn round_trip_restores_memory_and_state() {
        let dir = temp_dir("round-trip");
        let (path, mem) = sample(&dir);
        let (state, restored) = read_back(&path).unwrap();
        assert_eq!(state, "state");
        let mut a = vec![0u8; RAM as usize];
        let mut b = vec![0u8; RAM as usize];
        mem.read_slice(&mut a, GuestAddress(0)).unwrap();
        restored.read_slice(&mut b, GuestAddress(0)).unwrap();
        assert!(a == b);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn truncated_snapshot_is_refused_at_every_length() {
        let dir = temp_dir("truncated");
        let (path, _) = sample(&dir);
        let bytes = std::fs::read(&path).unwrap();
        for len in [
            0,
            7,
            HEADER_LEN,
            HEADER_LEN + 3,
            bytes.len() / 2,
            bytes.len() - 5,
            bytes.len() - 1,
        ] {
            std::fs::write(&path, &bytes[..len]).unwrap();
            let err = read_back(&path).unwrap_err();
            assert!(
                matches!(
                    err,
                    SnapshotError::Truncated { .. } | SnapshotError::BadState { .. }
                ),
                "length {len}: {err}"
            );
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn flipped_byte_is_refused() {
        let dir = temp_dir("flipped");
        let (path, _) = sample(&dir);
        let bytes = std::fs::read(&path).unwrap();
        // One in the state, one in page data, one in the CRC itself.
        for at in [HEADER_LEN + 1, bytes.len() - 4096, bytes.len() - 2] {
            let mut bad = bytes.clone();
            bad[at] ^= 0x01;
            std::fs::write(&path, &bad).unwrap();
            let err = read_back(&path).unwrap_err();
            assert!(
                matches!(
                    err,
                    SnapshotError::Checksum { .. } | SnapshotError::BadState { .. }
                ),
                "byte {at}: {err}"
            );
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn wrong_magic_version_and_ranges_are_refused() {
        let dir = temp_dir("header");
        let (path, _) = sample(&dir);
        let bytes = std::fs::read(&path).unwrap();

        let mut bad = bytes.clone();
        bad[0] = b'X';
        std::fs::write(&path, &bad).unwrap();
        assert!(matches!(
            read_back(&path),
            Err(SnapshotError::BadMagic { .. })
        ));

        let mut bad = bytes.clone();
        bad[8..12].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
        std::fs::write(&path, &bad).unwrap();
        let err = read_back(&path).unwrap_err();
        assert!(
            matches!(err, SnapshotError::UnsupportedVersion { found, .. } if found == FORMAT_VERSION + 1)
        );
        assert!(err.to_string().contains("version"));

        let mut bad = bytes.clone();
        bad[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
        std::fs::write(&path, &bad).unwrap();
        assert!(matches!(
            read_back(&path),
            Err(SnapshotError::Corrupt { .. })
        ));

        // First memory run moved past the end of RAM.
        let state_len = u64::from_le_bytes(bytes[24..32].try_into().unwrap()) as usize;
        let run = HEADER_LEN + state_len;
        let mut bad = bytes.clone();
        bad[run..run + 8].copy_from_slice(&RAM.to_le_bytes());
        std::fs::write(&path, &bad).unwrap();
        assert!(matches!(
            read_back(&path),
            Err(SnapshotError::Corrupt { .. })
        ));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
