//! Attached files: read-only host files a VM finds by name and reads by index (see
//! [`ferry_abi::file`]).
//!
//! A file is opened once, its SHA-256 taken, and read with positioned reads for the rest
//! of its life (no mapping: a file truncated behind our back gives a read error, never a
//! SIGBUS). The hash travels with the VM's state, so a snapshot restore or a migration
//! refuses a file whose content is not the one the VM was started with. Files must not
//! be changed while attached; a change of size is caught by every read, a change of
//! content in place by [`AttachedFiles::check_unchanged`], which a migration and a
//! snapshot call before they offer the recorded hash (a destination holding the old
//! content would otherwise fill the VM from it). That check trusts the file's stamp
//! (inode, size, modification and change times) and hashes again only when it moved.

use std::collections::HashMap;
use std::fs::{File, Metadata};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use ferry_abi::file::{valid_name, FileEntry, FileTable, MAX_FILES, NAME_BYTES};
use ferry_accel::files::FileSource;
use ferry_migrate::receive::{printable, MAX_WORKLOAD_NAME};
use sha2::{Digest, Sha256};

/// What a VM's state records of an attached file (enough to find it again and to know it
/// is the same content), as the API shows it too.
pub use ferry_api::FileInfo;

/// Errors attaching files.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// The name is not 1-55 ASCII letters, digits, `.`, `_` or `-`.
    #[error("invalid attached file name '{0}': use 1 to {max} ASCII letters, digits, '.', '_' or '-'", max = NAME_BYTES - 1)]
    InvalidName(String),
    /// Two files with one name.
    #[error("two attached files are named '{0}'")]
    DuplicateName(String),
    /// More than [`MAX_FILES`] files.
    #[error("{0} attached files: at most {MAX_FILES} are allowed")]
    TooMany(usize),
    /// The file cannot be opened.
    #[error("cannot open attached file '{name}' at {}", path.display())]
    Open {
        /// Its name.
        name: String,
        /// Its path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file, once open, failed its opener's check (where it was opened).
    #[error("attached file '{name}' at {} is refused where it was opened", path.display())]
    Refused {
        /// Its name.
        name: String,
        /// Its path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file cannot be read.
    #[error("cannot read attached file '{name}' at {}", path.display())]
    Read {
        /// Its name.
        name: String,
        /// Its path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The path could not travel with the VM: a migration's offer and a snapshot carry
    /// it, and a destination refuses one longer than [`MAX_WORKLOAD_NAME`] bytes or with
    /// control characters.
    #[error("attached file '{name}': its path {path:?} is longer than {MAX_WORKLOAD_NAME} bytes or has control characters, so the VM could not migrate or be restored; give it another path (a link)")]
    UnshowablePath {
        /// Its name.
        name: String,
        /// Its path.
        path: PathBuf,
    },
    /// The path is not a regular file.
    #[error("attached file '{name}': {} is not a regular file", path.display())]
    NotAFile {
        /// Its name.
        name: String,
        /// Its path.
        path: PathBuf,
    },
    /// The file is not the one the VM was started with.
    #[error("attached file '{name}' at {} has changed: the VM was started with {expected_size} bytes, sha256 {expected_sha256}; the file has {found_size} bytes, sha256 {found_sha256}", path.display())]
    Changed {
        /// Its name.
        name: String,
        /// Its path.
        path: PathBuf,
        /// Size recorded.
        expected_size: u64,
        /// Hash recorded.
        expected_sha256: String,
        /// Size found.
        found_size: u64,
        /// Hash found (not taken when the size already differs).
        found_sha256: String,
    },
    /// A file a VM's state records is not at its recorded path as recorded (missing,
    /// unreadable, or other content: which, is not said).
    #[error("attached file '{name}' recorded at {} is missing, unreadable, or not the content recorded: give it where it is (--attach {name}=PATH)", path.display())]
    NotAsRecorded {
        /// Its name.
        name: String,
        /// The path recorded.
        path: PathBuf,
    },
    /// The file changed while it was being hashed.
    #[error("attached file '{name}' at {} changed while it was being hashed", path.display())]
    ChangedWhileHashing {
        /// Its name.
        name: String,
        /// Its path.
        path: PathBuf,
    },
}

/// One attached file, open; clones share the open file.
#[derive(Debug, Clone)]
pub struct AttachedFile {
    info: FileInfo,
    file: Arc<File>,
    /// The open file's stamp when its hash was taken (or checked).
    stamp: FileStamp,
}

/// A file's identity and change times: device, inode, size, modification and change
/// times (seconds, nanoseconds).
type FileStamp = (u64, u64, u64, i64, i64, i64, i64);

/// The most hashes [`hash_cache`] keeps: far more files than a host attaches; past it,
/// it starts again empty (files are hashed again once).
const MAX_CACHED_HASHES: usize = 4096;

/// How recent a file's last change may be for its hash to be cached: a file rewritten
/// within one tick of the file system's clock (up to 2 s on some) keeps its stamp, so a
/// hash taken then may be of bytes the file no longer holds (git's "racily clean").
const RACY_CHANGE: std::time::Duration = std::time::Duration::from_secs(2);

/// The hashes of files hashed in this process, by [`FileStamp`], so a file attached to
/// many VMs (or checked at each migration) is read once.
fn hash_cache() -> &'static Mutex<HashMap<FileStamp, String>> {
    static CACHE: OnceLock<Mutex<HashMap<FileStamp, String>>> = OnceLock::new();
    CACHE.get_or_init(Mutex::default)
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The stamp of a file whose metadata is `meta`.
fn stamp_of(meta: &Metadata) -> FileStamp {
    (
        meta.dev(),
        meta.ino(),
        meta.size(),
        meta.mtime(),
        meta.mtime_nsec(),
        meta.ctime(),
        meta.ctime_nsec(),
    )
}

/// The SHA-256 of the first `meta.size()` bytes of `file` (whose metadata is `meta`),
/// attached as `name` from `path`; from the cache when the file is unchanged since it
/// was last hashed (same stamp: the change time cannot be set back by anyone but the
/// kernel). Refused if the file changed while it was read.
fn sha256_of(name: &str, path: &Path, file: &File, meta: &Metadata) -> Result<String, AttachError> {
    let key = stamp_of(meta);
    if let Some(hash) = hash_cache().lock().expect("hash cache lock").get(&key) {
        return Ok(hash.clone());
    }
    let read_err = |source| AttachError::Read {
        name: name.to_string(),
        path: path.to_path_buf(),
        source,
    };
    // Positioned reads of exactly the recorded size: the file's offset is shared by
    // its clones, and bytes appended meanwhile are not the content recorded.
    let started = std::time::SystemTime::now();
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut offset = 0;
    while offset < meta.size() {
        let n = (meta.size() - offset).min(buf.len() as u64) as usize;
        file.read_exact_at(&mut buf[..n], offset)
            .map_err(read_err)?;
        hasher.update(&buf[..n]);
        offset += n as u64;
    }
    if stamp_of(&file.metadata().map_err(read_err)?) != key {
        return Err(AttachError::ChangedWhileHashing {
            name: name.to_string(),
            path: path.to_path_buf(),
        });
    }
    let hash = hex(&hasher.finalize());
    if !racily_changed(meta, started) {
        remember_hash(key, hash.clone());
    }
    Ok(hash)
}

/// Caches `hash` for files of stamp `key`, within [`MAX_CACHED_HASHES`].
fn remember_hash(key: FileStamp, hash: String) {
    let mut cache = hash_cache().lock().expect("hash cache lock");
    if cache.len() >= MAX_CACHED_HASHES {
        cache.clear();
    }
    cache.insert(key, hash);
}

/// Whether the file whose metadata is `meta` changed so shortly before `hashing` began
/// that another change in the same clock tick would not show in its stamp.
fn racily_changed(meta: &Metadata, hashing: std::time::SystemTime) -> bool {
    let changed = std::time::UNIX_EPOCH
        .checked_add(std::time::Duration::new(
            u64::try_from(meta.ctime()).unwrap_or(0),
            u32::try_from(meta.ctime_nsec()).unwrap_or(0),
        ))
        .unwrap_or(std::time::UNIX_EPOCH);
    hashing
        .duration_since(changed)
        .map_or(true, |age| age < RACY_CHANGE)
}

/// Whether `file` (metadata `meta`, at `path`) holds the content `expected` records;
/// the error names both (a file of another size is refused unread).
fn check_content(
    expected: &FileInfo,
    path: &Path,
    file: &File,
    meta: &Metadata,
) -> Result<(), AttachError> {
    let changed = |found_size, found_sha256| AttachError::Changed {
        name: expected.name.clone(),
        path: path.to_path_buf(),
        expected_size: expected.size,
        expected_sha256: expected.sha256.clone(),
        found_size,
        found_sha256,
    };
    if meta.size() != expected.size {
        return Err(changed(meta.size(), "(not read: its size differs)".into()));
    }
    let found = sha256_of(&expected.name, path, file, meta)?;
    if found != expected.sha256 {
        return Err(changed(meta.size(), found));
    }
    Ok(())
}

/// Opens `path` for file `name` if it is a regular file that passes `check`, and its
/// metadata. What the path names is looked at first without opening it (`O_PATH`):
/// opening some devices acts (a watchdog starts, a tape rewinds on close), and a
/// snapshot may name any path. The regular file found is then opened through that same
/// descriptor, without blocking and never as the daemon's terminal, and checked on the
/// open file, so a path swapped after a check gains nothing.
fn open_regular(
    name: &str,
    path: &Path,
    check: &OpenCheck<'_>,
) -> Result<(File, Metadata), AttachError> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    if !valid_name(name) {
        return Err(AttachError::InvalidName(name.to_string()));
    }
    let (name, path) = (name.to_string(), path.to_path_buf());
    // As the VM's offer will carry it (see `file_offers`).
    if !printable(&path.display().to_string(), MAX_WORKLOAD_NAME) {
        return Err(AttachError::UnshowablePath { name, path });
    }
    let found = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH)
        .open(&path);
    let found = match found {
        Ok(found) => found,
        Err(source) => return Err(AttachError::Open { name, path, source }),
    };
    if let Err(source) = check(&found) {
        return Err(AttachError::Refused { name, path, source });
    }
    match found.metadata() {
        Ok(meta) if meta.is_file() => {}
        Ok(_) => return Err(AttachError::NotAFile { name, path }),
        Err(source) => return Err(AttachError::Read { name, path, source }),
    }
    // The very file looked at, whatever its path names by now.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(format!("/proc/self/fd/{}", found.as_raw_fd()));
    let file = match file {
        Ok(file) => file,
        Err(source) => return Err(AttachError::Open { name, path, source }),
    };
    let meta = match file.metadata() {
        Ok(meta) => meta,
        Err(source) => return Err(AttachError::Read { name, path, source }),
    };
    Ok((file, meta))
}

/// A check of a file just opened, before it is read: an error refuses it.
pub type OpenCheck<'a> = dyn Fn(&File) -> std::io::Result<()> + 'a;

/// Where the open `file` is now, as the kernel resolves its descriptor: what was opened,
/// whatever its path named when it was checked (a link swapped in between).
pub fn opened_path(file: &File) -> std::io::Result<PathBuf> {
    use std::os::fd::AsRawFd;
    std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))
}

impl AttachedFile {
    /// Opens `path` as the file `name` and takes its hash.
    pub fn open(name: &str, path: &Path) -> Result<Self, AttachError> {
        Self::open_checked(name, path, &|_| Ok(()))
    }

    /// [`Self::open`], once `check` has passed the open file, before any of it is read
    /// (a caller that confines paths asks where it was opened: [`opened_path`]).
    pub fn open_checked(
        name: &str,
        path: &Path,
        check: &OpenCheck<'_>,
    ) -> Result<Self, AttachError> {
        let (file, meta) = open_regular(name, path, check)?;
        Self::hashed(name, path, file, &meta)
    }

    /// Opens the file `expected` describes at `path`, refusing other content (a file of
    /// another size before reading it).
    pub fn open_expecting(expected: &FileInfo, path: &Path) -> Result<Self, AttachError> {
        Self::open_expecting_checked(expected, path, &|_| Ok(()))
    }

    /// [`Self::open_expecting`], once `check` has passed the open file, before any of it
    /// is read (see [`Self::open_checked`]).
    pub fn open_expecting_checked(
        expected: &FileInfo,
        path: &Path,
        check: &OpenCheck<'_>,
    ) -> Result<Self, AttachError> {
        let (file, meta) = open_regular(&expected.name, path, check)?;
        check_content(expected, path, &file, &meta)?;
        Ok(Self {
            info: FileInfo {
                path: path.to_path_buf(),
                ..expected.clone()
            },
            file: Arc::new(file),
            stamp: stamp_of(&meta),
        })
    }

    /// The open regular file `file` at `path` (with metadata `meta`) as `name`, hashed.
    fn hashed(name: &str, path: &Path, file: File, meta: &Metadata) -> Result<Self, AttachError> {
        let sha256 = sha256_of(name, path, &file, meta)?;
        Ok(Self {
            info: FileInfo {
                name: name.to_string(),
                size: meta.size(),
                sha256,
                path: path.to_path_buf(),
            },
            file: Arc::new(file),
            stamp: stamp_of(meta),
        })
    }

    /// Refuses the file if its content is no longer the one recorded (changed in place
    /// since it was attached); hashes it again only if its stamp moved.
    pub fn check_unchanged(&self) -> Result<(), AttachError> {
        let meta = self.file.metadata().map_err(|source| AttachError::Read {
            name: self.info.name.clone(),
            path: self.info.path.clone(),
            source,
        })?;
        if stamp_of(&meta) == self.stamp {
            return Ok(());
        }
        check_content(&self.info, &self.info.path, &self.file, &meta)
    }

    /// Its record.
    pub fn info(&self) -> &FileInfo {
        &self.info
    }

    /// The same open file, now known under `path` (it was renamed there).
    pub fn moved_to(mut self, path: PathBuf) -> Self {
        self.info.path = path;
        self
    }

    /// Fills `out` from byte `offset`; an error if the file no longer has those bytes.
    pub fn read_at(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        self.file.read_exact_at(out, offset)
    }
}

/// Checks the names of the files a VM is given: at most [`MAX_FILES`], each unique.
pub fn check_names(names: &[&str]) -> Result<(), AttachError> {
    if names.len() > MAX_FILES {
        return Err(AttachError::TooMany(names.len()));
    }
    for (i, name) in names.iter().enumerate() {
        if names[..i].contains(name) {
            return Err(AttachError::DuplicateName(name.to_string()));
        }
    }
    Ok(())
}

/// A VM's attached files, in attach order (an index names a file); cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct AttachedFiles(Arc<[AttachedFile]>);

impl AttachedFiles {
    /// The files `files`, checked: at most [`MAX_FILES`], names unique.
    pub fn new(files: Vec<AttachedFile>) -> Result<Self, AttachError> {
        let names: Vec<&str> = files.iter().map(|f| f.info.name.as_str()).collect();
        check_names(&names)?;
        Ok(Self(files.into()))
    }

    /// Opens each `(name, path)`, once their count and names are known to be right (a
    /// list of thousands would otherwise hold thousands of descriptors first).
    pub fn open(specs: &[(String, PathBuf)]) -> Result<Self, AttachError> {
        Self::open_checked(specs, &|_| Ok(()))
    }

    /// [`Self::open`], each file passing `check` before it is read
    /// ([`AttachedFile::open_checked`]).
    pub fn open_checked(
        specs: &[(String, PathBuf)],
        check: &OpenCheck<'_>,
    ) -> Result<Self, AttachError> {
        let names: Vec<&str> = specs.iter().map(|(name, _)| name.as_str()).collect();
        check_names(&names)?;
        let files = specs
            .iter()
            .map(|(name, path)| AttachedFile::open_checked(name, path, check))
            .collect::<Result<Vec<_>, _>>()?;
        Self::new(files)
    }

    /// Reopens the files a VM's state records, each at its recorded path, refusing any
    /// whose content changed. The paths come from a file (a snapshot) that may name any
    /// host file: a refusal says nothing of what is there (not whether it exists, nor
    /// its size or hash), so it cannot be used to learn a file's hash and then attach it.
    pub fn reopen(infos: &[FileInfo]) -> Result<Self, AttachError> {
        // Before any is opened, as [`Self::open`] does: a state may list thousands.
        let names: Vec<&str> = infos.iter().map(|info| info.name.as_str()).collect();
        check_names(&names)?;
        let files = infos
            .iter()
            .map(|info| {
                AttachedFile::open_expecting(info, &info.path).map_err(|_| {
                    AttachError::NotAsRecorded {
                        name: info.name.clone(),
                        path: info.path.clone(),
                    }
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Self::new(files)
    }

    /// The files.
    pub fn files(&self) -> &[AttachedFile] {
        &self.0
    }

    /// Refuses the files if one changed since it was attached (see
    /// [`AttachedFile::check_unchanged`]).
    pub fn check_unchanged(&self) -> Result<(), AttachError> {
        self.0.iter().try_for_each(AttachedFile::check_unchanged)
    }

    /// Their records.
    pub fn infos(&self) -> Vec<FileInfo> {
        self.0.iter().map(|f| f.info.clone()).collect()
    }

    /// Total bytes.
    pub fn total_bytes(&self) -> u64 {
        self.0.iter().map(|f| f.info.size).sum()
    }

    /// The table the guest finds at [`ferry_abi::file::FILE_TABLE_ADDR`].
    pub fn table(&self) -> FileTable {
        let mut table = FileTable::EMPTY;
        table.count = self.0.len() as u32;
        for (entry, file) in table.files.iter_mut().zip(self.0.iter()) {
            let name = file.info.name.as_bytes();
            *entry = FileEntry {
                size: file.info.size,
                ..FileEntry::EMPTY
            };
            // `valid_name` keeps names shorter than the field.
            entry.name[..name.len()].copy_from_slice(name);
        }
        table
    }

    /// Why these files are not the ones `expected` records (by position), if they are not.
    pub fn mismatch(&self, expected: &[FileInfo]) -> Option<String> {
        let ours = self.infos();
        if ours.len() != expected.len() {
            return Some(format!(
                "the VM has {} attached files, {} were given",
                expected.len(),
                ours.len()
            ));
        }
        ours.iter().zip(expected).enumerate().find_map(|(i, (o, e))| {
            (o.name != e.name || o.size != e.size || o.sha256 != e.sha256).then(|| {
                format!(
                    "attached file {i} is '{}' ({} bytes, sha256 {}), but '{}' ({} bytes, sha256 {}) was given",
                    e.name,
                    e.size,
                    e.sha256,
                    o.name,
                    o.size,
                    o.sha256
                )
            })
        })
    }
}

impl FileSource for AttachedFiles {
    fn file_len(&self, file: u32) -> Option<u64> {
        self.0.get(file as usize).map(|f| f.info.size)
    }

    fn read_file(&self, file: u32, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        match self.0.get(file as usize) {
            Some(f) => f.read_at(offset, out),
            None => Err(std::io::Error::other(format!("no attached file {file}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_file(tag: &str, content: &[u8]) -> PathBuf {
        let path = std::env::temp_dir().join(format!(
            "ferry-files-{}-{tag}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::write(&path, content).unwrap();
        path
    }

    #[test]
    fn a_file_changed_within_a_clock_tick_of_its_hash_is_not_cached_and_the_cache_is_bounded() {
        let path = temp_file("racy", b"just written");
        let file = AttachedFile::open("racy", &path).unwrap();
        let key = stamp_of(&std::fs::metadata(&path).unwrap());
        // Its stamp would not show a rewrite in the same tick: hashed again next time.
        assert!(!hash_cache().lock().unwrap().contains_key(&key));
        assert_eq!(file.info().sha256, hex(&Sha256::digest(b"just written")));
        // Hashed long enough after its last change, it would be.
        let meta = std::fs::metadata(&path).unwrap();
        assert!(racily_changed(&meta, std::time::SystemTime::now()));
        assert!(!racily_changed(
            &meta,
            std::time::SystemTime::now() + RACY_CHANGE
        ));
        // However many files are hashed, the cache holds at most its bound.
        for i in 0..=MAX_CACHED_HASHES as u64 {
            remember_hash((u64::MAX, i, 0, 0, 0, 0, 0), String::new());
        }
        assert!(hash_cache().lock().unwrap().len() <= MAX_CACHED_HASHES);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn attach_hash_read_and_refuse_changes() {
        let path = temp_file("a", b"hello, attached world");
        let file = AttachedFile::open("greeting", &path).unwrap();
        assert_eq!(file.info().size, 21);
        // As `printf 'hello, attached world' | sha256sum` prints it.
        assert_eq!(
            file.info().sha256,
            "5a498fc1ee3f7357f5e8e3fd1ba2f9ce754e25f69951714b05bddabb7c9d1ab1"
        );
        let mut buf = [0u8; 8];
        file.read_at(7, &mut buf).unwrap();
        assert_eq!(&buf, b"attached");
        assert!(
            file.read_at(20, &mut buf).is_err(),
            "reads past the end fail"
        );

        let files = AttachedFiles::new(vec![file]).unwrap();
        let table = files.table();
        assert_eq!(table.files()[0].name(), b"greeting");
        assert_eq!(table.files()[0].size, 21);
        let infos = files.infos();
        assert_eq!(files.mismatch(&infos), None);

        // Same size, other content; shorter; gone: each reopen is refused alike, saying
        // nothing of what is at the recorded path (its hash would let a forged record
        // attach it).
        std::fs::write(&path, b"HELLO, attached world").unwrap();
        let found = hex(&Sha256::digest(b"HELLO, attached world"));
        let mut said = Vec::new();
        for then in [Some(&b"short"[..]), None] {
            let err = AttachedFiles::reopen(&infos).unwrap_err();
            assert!(matches!(err, AttachError::NotAsRecorded { .. }), "{err}");
            assert!(!err.to_string().contains(&found), "{err}");
            said.push(err.to_string());
            match then {
                Some(bytes) => std::fs::write(&path, bytes).unwrap(),
                None => std::fs::remove_file(&path).unwrap(),
            }
        }
        let gone = AttachedFiles::reopen(&infos).unwrap_err().to_string();
        assert!(said.iter().all(|s| *s == gone), "{said:?} {gone}");
        // A state listing a thousand files is refused before any is looked for.
        let many = vec![infos[0].clone(); 1000];
        let err = AttachedFiles::reopen(&many).unwrap_err();
        assert!(matches!(err, AttachError::TooMany(1000)), "{err}");
        // The same file given explicitly is checked with the details an operator needs.
        std::fs::write(&path, b"HELLO, attached world").unwrap();
        let err = AttachedFile::open_expecting(&infos[0], &path).unwrap_err();
        assert!(err.to_string().contains(&found), "{err}");
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_file_changed_in_place_after_attach_is_refused() {
        let path = temp_file("inplace", b"the weights, version 1");
        let files = AttachedFiles::open(&[("model".into(), path.clone())]).unwrap();
        files.check_unchanged().unwrap();
        // Timestamps tick coarsely (a kernel tick): a rewrite within the tick of the
        // attach would keep the stamp, so each step moves the mtime as a later write would.
        let set_mtime = |secs| {
            let file = std::fs::File::options().write(true).open(&path).unwrap();
            file.set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
                .unwrap();
        };
        // Touched, same content: hashed again, and accepted.
        set_mtime(1_000_000);
        files.check_unchanged().unwrap();
        // Rewritten in place with the same size: refused, naming the file and both hashes.
        std::fs::write(&path, b"the weights, version 2").unwrap();
        set_mtime(2_000_000);
        let err = files.check_unchanged().unwrap_err();
        assert!(
            matches!(&err, AttachError::Changed { name, found_size: 22, .. } if name == "model"),
            "{err}"
        );
        assert!(err.to_string().contains("has changed"), "{err}");
        assert!(err.to_string().contains(&files.infos()[0].sha256), "{err}");
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_file_that_grows_or_shrinks_while_hashed_is_refused() {
        let path = temp_file("grows", b"0123456789");
        let (file, meta) = open_regular("grows", &path, &|_| Ok(())).unwrap();
        // The size and stamp as attach saw them, then bytes appended before the read.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .and_then(|mut f| std::io::Write::write_all(&mut f, b"appended"))
            .unwrap();
        let err = sha256_of("grows", &path, &file, &meta).unwrap_err();
        assert!(
            matches!(err, AttachError::ChangedWhileHashing { .. }),
            "{err}"
        );
        // Shorter than the size recorded: a read error, not the hash of fewer bytes.
        let (file, meta) = open_regular("grows", &path, &|_| Ok(())).unwrap();
        std::fs::write(&path, b"short").unwrap();
        let err = sha256_of("grows", &path, &file, &meta).unwrap_err();
        assert!(matches!(err, AttachError::Read { .. }), "{err}");
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn names_counts_and_kinds_are_checked() {
        let path = temp_file("b", b"x");
        assert!(matches!(
            AttachedFile::open("bad name", &path),
            Err(AttachError::InvalidName(_))
        ));
        assert!(matches!(
            AttachedFile::open("dir", &std::env::temp_dir()),
            Err(AttachError::NotAFile { .. })
        ));
        // A path no migration or snapshot could carry (a destination refuses it).
        let tabbed = temp_file("tab\tbed", b"x");
        assert!(matches!(
            AttachedFile::open("tabbed", &tabbed),
            Err(AttachError::UnshowablePath { .. })
        ));
        std::fs::remove_file(&tabbed).unwrap();
        // A FIFO is refused at once, not waited on for a writer, and without being opened:
        // opening some devices acts (a watchdog starts), and a snapshot may name any path.
        let fifo = temp_file("fifo", b"");
        std::fs::remove_file(&fifo).unwrap();
        ferry_testdata::make_fifo(&fifo);
        let c_path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: plain system calls on a descriptor of our own and a NUL-terminated path.
        let watch = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        assert!(watch >= 0);
        // SAFETY: as above.
        let added = unsafe { libc::inotify_add_watch(watch, c_path.as_ptr(), libc::IN_OPEN) };
        assert!(added >= 0);
        assert!(matches!(
            AttachedFile::open("fifo", &fifo),
            Err(AttachError::NotAFile { .. })
        ));
        let mut events = [0u8; 256];
        // SAFETY: reads into a buffer of ours, of its length; the descriptor is ours.
        let read = unsafe { libc::read(watch, events.as_mut_ptr().cast(), events.len()) };
        // SAFETY: closes the descriptor made above, used no more.
        unsafe { libc::close(watch) };
        assert_eq!(read, -1, "the FIFO was opened");
        std::fs::remove_file(&fifo).unwrap();
        let two = vec![
            AttachedFile::open("same", &path).unwrap(),
            AttachedFile::open("same", &path).unwrap(),
        ];
        assert!(matches!(
            AttachedFiles::new(two),
            Err(AttachError::DuplicateName(_))
        ));
        let many: Vec<_> = (0..=MAX_FILES)
            .map(|i| AttachedFile::open(&format!("f{i}"), &path).unwrap())
            .collect();
        assert!(matches!(
            AttachedFiles::new(many),
            Err(AttachError::TooMany(64))
        ));
        std::fs::remove_file(&path).unwrap();
    }
}
