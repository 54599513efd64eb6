//! Where a VM migrated here finds its attached files: a copy this host already has (in
//! its file store, one a VM listed here uses, or one at the source's path under a folder
//! this host attaches files from), or the bytes the source sends, written into this
//! host's file store and checked against their SHA-256 before the VM may use them.
//!
//! The store (`ferry host serve --file-store DIR`) keeps each file received with a VM
//! that then ran here as `sha256-<hex>`, so a VM that moves away and back, or a second
//! VM with the same model, finds it there. Nothing removes those: they are the host's
//! copy of its VMs' models and datasets, as a GPU host keeps its model cache (and an
//! operator may put files there too). A file is received as `incoming-*.part`, its
//! space allocated up front, and enters the store only once its VM is adopted
//! ([`ReceivedFile::keep`]): a migration that fails, at any point, deletes its files,
//! and part files a stopped daemon left behind are deleted by the next receive.
//!
//! A source names paths, but only those this host would attach anyway are looked at: a
//! peer cannot make this host tell, by how long it takes, whether any other file exists,
//! nor make it hash one.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ferry_migrate::vm::valid_sha256;
use ferry_migrate::FileOffer;
use ferry_vmm::files::AttachedFile;
use ferry_vmm::migration::file_info;
use ferry_vmm::FileInfo;

use crate::AttachPolicy;

/// How part files are named: `incoming-<random>-<index>.part`.
const PART_PREFIX: &str = "incoming-";
const PART_SUFFIX: &str = ".part";
/// A part file this old that no process holds locked was left by a daemon that stopped
/// (its creator locks it at once: the age only covers that instant).
const ABANDONED_AFTER: Duration = Duration::from_secs(60);
/// The most the store leaves free on its file system (less on a small one: 1/20 of it).
const KEEP_FREE_MAX: u64 = 1 << 30;

/// Bytes promised to files of this process created sparse (on file systems that cannot
/// allocate ahead) and not yet written: free space they will take.
static SPARSE_PROMISED: AtomicU64 = AtomicU64::new(0);

/// The file store of one host, and where else it finds copies.
#[derive(Debug, Clone)]
pub struct FileStore {
    dir: PathBuf,
    /// Which source-named paths may be looked at.
    attach: AttachPolicy,
    /// Files this host's VMs use or used (paths this host chose), to find by content.
    local: Vec<FileInfo>,
    /// Bytes left free on the store's file system (`None`: [`keep_free`]'s).
    keep_free: Option<u64>,
    /// In tests, the size of a file system taken to hold only the store's files, in
    /// place of the real one's free space: the margin is then checked with fixed
    /// numbers, whatever others write to or delete from the disk meanwhile.
    #[cfg(test)]
    disk: Option<u64>,
}

/// Why files could not be received into the store.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    /// An offer's hash is not one (it names the stored file).
    #[error("attached file '{name}' has an invalid sha256 '{sha256}'")]
    InvalidSha256 {
        /// The file's name.
        name: String,
        /// What was offered as its hash.
        sha256: String,
    },
    /// The files do not fit, leaving the margin free.
    #[error("the attached files need {} MiB and the file store {} has {} MiB free, of which it leaves {} MiB free", needed.div_ceil(1 << 20), dir.display(), free >> 20, keep >> 20)]
    NoRoom {
        /// The store's folder.
        dir: PathBuf,
        /// Bytes asked for.
        needed: u64,
        /// Bytes free (less those promised to sparse files).
        free: u64,
        /// Bytes the store leaves free.
        keep: u64,
    },
    /// The file system failed.
    #[error("cannot {what} {}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// To what.
        path: PathBuf,
        /// Why it failed.
        source: std::io::Error,
    },
}

/// Why a received file could not be put in the store.
#[derive(Debug, thiserror::Error)]
#[error("cannot move {} into the file store as {}", part.display(), stored.display())]
pub struct KeepError {
    /// The part file (deleted).
    pub part: PathBuf,
    /// Its place in the store.
    pub stored: PathBuf,
    /// Why it failed.
    pub source: std::io::Error,
}

/// A part file of the store: locked while its owner lives, deleted when dropped unless
/// moved into the store.
#[derive(Debug)]
struct Part {
    path: PathBuf,
    /// Open for writing; holds the lock that tells a sweep the file is in use.
    file: File,
    /// Bytes of it promised but not allocated (a sparse file not yet written).
    sparse: u64,
    kept: bool,
}

/// A file being received into the store.
#[derive(Debug)]
pub struct IncomingFile {
    info: FileInfo,
    part: Part,
}

/// A received file whose content is the one offered, waiting for its VM to be adopted:
/// [`Self::keep`] moves it into the store; dropped, it is deleted.
#[derive(Debug)]
pub struct ReceivedFile {
    /// Open, known by its place in the store.
    file: AttachedFile,
    part: Part,
}

/// Free bytes (for an unprivileged writer) and total bytes of the file system holding
/// `dir`.
fn space(dir: &Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::other("a NUL in the path"))?;
    let mut stats = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `path` is a NUL-terminated string and `stats` a writable statvfs; statvfs
    // only writes into it, and we read it only on success.
    let rc = unsafe { libc::statvfs(path.as_ptr(), stats.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: statvfs succeeded, so it initialized the struct.
    let stats = unsafe { stats.assume_init() };
    Ok((
        stats.f_bavail.saturating_mul(stats.f_frsize),
        stats.f_blocks.saturating_mul(stats.f_frsize),
    ))
}

/// Bytes the store leaves free on a file system of `total` bytes, for the host's other
/// users of it (its logs, the daemon's own files).
fn keep_free(total: u64) -> u64 {
    (total / 20).min(KEEP_FREE_MAX)
}

/// Gives `file` its `len` bytes, allocated now where the file system can, so that the
/// space checked free is the store's and cannot be promised twice; `false` where the
/// file system cannot, and the file is made sparse instead.
fn allocate(file: &File, len: u64) -> std::io::Result<bool> {
    if len == 0 {
        return Ok(true);
    }
    let off_len = libc::off_t::try_from(len)
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    loop {
        // SAFETY: the descriptor is `file`'s, open for writing; fallocate touches no
        // memory of ours.
        let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, off_len) };
        if rc == 0 {
            return Ok(true);
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EOPNOTSUPP | libc::ENOSYS) => {
                file.set_len(len)?;
                return Ok(false);
            }
            _ => return Err(e),
        }
    }
}

/// Takes `file`'s lock, or fails at once if another open file holds it.
fn try_lock(file: &File) -> std::io::Result<()> {
    // SAFETY: the descriptor is `file`'s; flock touches no memory of ours.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

impl FileStore {
    /// The store in `dir` (created when a file first arrives); a source's path is looked
    /// at only where `attach` would let a create request attach it.
    pub fn new(dir: PathBuf, attach: AttachPolicy) -> Self {
        Self {
            dir,
            attach,
            local: Vec::new(),
            keep_free: None,
            #[cfg(test)]
            disk: None,
        }
    }

    /// Also finds content in `files` (those of this host's VMs: paths it chose).
    pub fn knowing(mut self, files: Vec<FileInfo>) -> Self {
        self.local = files;
        self
    }

    /// Leaves `bytes` free on the store's file system (instead of 1/20 of it, at most
    /// 1 GiB).
    pub fn keeping_free(mut self, bytes: u64) -> Self {
        self.keep_free = Some(bytes);
        self
    }

    /// `host`'s store, knowing the files of the VMs it lists (running, and those that
    /// ended or left lately: a VM coming back finds its files where it left them).
    pub(crate) fn of_host(host: &crate::Host) -> Self {
        let local = host
            .vms()
            .listed
            .values()
            .flat_map(|vm| vm.files.iter().cloned())
            .collect();
        Self::new(host.config.file_store.clone(), host.config.attach.clone()).knowing(local)
    }

    /// Its folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn stored_path(&self, sha256: &str) -> PathBuf {
        self.dir.join(format!("sha256-{sha256}"))
    }

    /// The source's path for `offer`, if this host attaches files from there (often an
    /// identically provisioned folder). Any other is refused before the file system is
    /// asked.
    fn admitted(&self, offer: &FileOffer) -> Option<PathBuf> {
        let path = Path::new(&offer.path);
        if !path.is_absolute() {
            return None;
        }
        self.attach.admit(path).ok()
    }

    /// This host's copy of `offer`'s content, if it has one: the store's, a file one of
    /// its VMs uses or used, or the file at the source's path where this host attaches
    /// files from. Anything else there (missing, another size, other content) is not a
    /// copy.
    pub fn find(&self, offer: &FileOffer) -> Option<AttachedFile> {
        if !valid_sha256(&offer.sha256) {
            return None;
        }
        self.candidates(offer).find_map(|path| {
            match AttachedFile::open_expecting(&file_info(offer, path.clone()), &path) {
                Ok(file) => Some(file),
                Err(e) => {
                    tracing::debug!(file = %offer.name, "not a copy: {e}");
                    None
                }
            }
        })
    }

    /// The files [`Self::find`] hashes for `offer`, in turn (each only if those before
    /// it were not copies): only regular files of its size (not a FIFO, not a device),
    /// and each file once, however many paths name it (N VMs here sharing a model list
    /// it N times, and the store's copy is often one of them: a damaged copy would be
    /// read whole N + 1 times).
    fn candidates<'a>(&'a self, offer: &'a FileOffer) -> impl Iterator<Item = PathBuf> + 'a {
        let local = self
            .local
            .iter()
            .filter(|f| f.sha256 == offer.sha256 && f.size == offer.size)
            .map(|f| f.path.clone());
        let mut seen = HashSet::new();
        std::iter::once(self.stored_path(&offer.sha256))
            .chain(local)
            .chain(std::iter::once_with(|| self.admitted(offer)).flatten())
            .filter(move |path| {
                std::fs::metadata(path).is_ok_and(|meta| {
                    meta.is_file()
                        && meta.len() == offer.size
                        && seen.insert((meta.dev(), meta.ino()))
                })
            })
    }

    /// Files to receive `offers` into, their space allocated (with the store's margin
    /// left free), as part files until their content is checked and their VM adopted.
    pub fn receive(&self, offers: &[&FileOffer]) -> Result<Vec<IncomingFile>, ReceiveError> {
        if let Some(bad) = offers.iter().find(|o| !valid_sha256(&o.sha256)) {
            return Err(ReceiveError::InvalidSha256 {
                name: bad.name.clone(),
                sha256: bad.sha256.clone(),
            });
        }
        // Nothing to hold room for: a VM without files to receive is not refused for
        // the store's margin.
        if offers.is_empty() {
            return Ok(Vec::new());
        }
        std::fs::create_dir_all(&self.dir).map_err(|source| ReceiveError::Io {
            what: "create the file store",
            path: self.dir.clone(),
            source,
        })?;
        self.sweep_abandoned();
        // The sizes are the peer's: summed without overflow.
        let needed = offers
            .iter()
            .try_fold(0u64, |sum, o| sum.checked_add(o.size))
            .unwrap_or(u64::MAX);
        self.check_room(needed)?;
        let mut nonce = [0u8; 8];
        getrandom::fill(&mut nonce).map_err(|e| ReceiveError::Io {
            what: "name the files of",
            path: self.dir.clone(),
            source: std::io::Error::other(e.to_string()),
        })?;
        let tag = u64::from_le_bytes(nonce);
        // On an error, those created are dropped: deleted.
        let files = offers
            .iter()
            .enumerate()
            .map(|(i, offer)| self.create_part(tag, i, offer))
            .collect::<Result<Vec<_>, _>>()?;
        // Again with the space taken: of sessions that passed the first check together,
        // the last to allocate sees the others' files, and gives up if it ate the margin.
        self.check_room(0)?;
        Ok(files)
    }

    /// Free bytes (for an unprivileged writer) and total bytes of the store's file
    /// system.
    fn space(&self) -> std::io::Result<(u64, u64)> {
        #[cfg(test)]
        if let Some(total) = self.disk {
            // The bytes allocated to the store's files are all that is used.
            let mut used = 0u64;
            for entry in std::fs::read_dir(&self.dir)? {
                used = used.saturating_add(entry?.metadata()?.blocks().saturating_mul(512));
            }
            return Ok((total.saturating_sub(used), total));
        }
        space(&self.dir)
    }

    /// Refuses `needed` more bytes unless the store's margin stays free.
    fn check_room(&self, needed: u64) -> Result<(), ReceiveError> {
        let (free, total) = self.space().map_err(|source| ReceiveError::Io {
            what: "tell the free space of",
            path: self.dir.clone(),
            source,
        })?;
        let free = free.saturating_sub(SPARSE_PROMISED.load(Ordering::SeqCst));
        let keep = self.keep_free.unwrap_or_else(|| keep_free(total));
        if needed.saturating_add(keep) > free {
            return Err(ReceiveError::NoRoom {
                dir: self.dir.clone(),
                needed,
                free,
                keep,
            });
        }
        Ok(())
    }

    /// Part file `i` of the receive `tag`, for `offer`: locked and allocated.
    fn create_part(
        &self,
        tag: u64,
        i: usize,
        offer: &FileOffer,
    ) -> Result<IncomingFile, ReceiveError> {
        let path = self
            .dir
            .join(format!("{PART_PREFIX}{tag:016x}-{i}{PART_SUFFIX}"));
        let failed = |what, path: &Path| {
            let path = path.to_path_buf();
            move |source| ReceiveError::Io { what, path, source }
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(failed("create", &path))?;
        // From here on, a failure drops `part`, which deletes the file.
        let mut part = Part {
            path,
            file,
            sparse: 0,
            kept: false,
        };
        try_lock(&part.file).map_err(failed("lock", &part.path))?;
        if !allocate(&part.file, offer.size).map_err(failed("allocate", &part.path))? {
            tracing::warn!(
                store = %self.dir.display(),
                "the file store's file system cannot allocate files ahead (no fallocate): \
                 received files are created sparse, and only this daemon counts the space \
                 they will take"
            );
            SPARSE_PROMISED.fetch_add(offer.size, Ordering::SeqCst);
            part.sparse = offer.size;
        }
        Ok(IncomingFile {
            info: file_info(offer, part.path.clone()),
            part,
        })
    }

    /// Deletes the part files of migrations whose daemon stopped (no process holds
    /// their lock): their VM was never adopted.
    fn sweep_abandoned(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let is_part = name
                .to_str()
                .is_some_and(|n| n.starts_with(PART_PREFIX) && n.ends_with(PART_SUFFIX));
            let old = || {
                entry.metadata().is_ok_and(|m| {
                    m.is_file()
                        && m.modified()
                            .ok()
                            .and_then(|t| t.elapsed().ok())
                            .is_some_and(|age| age >= ABANDONED_AFTER)
                })
            };
            if !is_part || !old() {
                continue;
            }
            let path = entry.path();
            let Ok(file) = File::open(&path) else {
                continue;
            };
            // Deleted while locked: no owner can appear meanwhile.
            if try_lock(&file).is_ok() && std::fs::remove_file(&path).is_ok() {
                tracing::info!(file = %path.display(), "deleted a file left by a migration that never ended");
            }
        }
    }

    /// The received file `incoming`, if its content is the one offered, opened as an
    /// attached file known by its place in the store, where [`ReceivedFile::keep`] puts
    /// it once its VM is adopted. Otherwise it is deleted.
    pub fn finish(&self, incoming: IncomingFile) -> Result<ReceivedFile, String> {
        let IncomingFile { info, mut part } = incoming;
        // Written whole, or deleted below: no longer space to come.
        part.settle();
        // On an error `part` is dropped, which deletes the file.
        let file = AttachedFile::open_expecting(&info, &part.path)
            .map_err(|e| format!("attached file '{}' arrived damaged: {e}", info.name))?;
        Ok(ReceivedFile {
            file: file.moved_to(self.stored_path(&info.sha256)),
            part,
        })
    }
}

impl IncomingFile {
    /// Writes received bytes (the engine checked the range against the offer).
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), String> {
        self.part
            .file
            .write_all_at(data, offset)
            .map_err(|e| format!("cannot write {}: {e}", self.part.path.display()))
    }
}

impl ReceivedFile {
    /// The open file.
    pub fn file(&self) -> &AttachedFile {
        &self.file
    }

    /// Moves the file into the store (its VM runs here now). A copy already there has
    /// the same content; the VMs that use it keep their open file.
    pub fn keep(mut self) -> Result<(), KeepError> {
        let stored = self.file.info().path.clone();
        std::fs::rename(&self.part.path, &stored).map_err(|source| KeepError {
            part: self.part.path.clone(),
            stored,
            source,
        })?;
        self.part.kept = true;
        Ok(())
    }
}

impl Part {
    /// Its bytes are written: none is still to be taken from the free space.
    fn settle(&mut self) {
        SPARSE_PROMISED.fetch_sub(std::mem::take(&mut self.sparse), Ordering::SeqCst);
    }
}

impl Drop for Part {
    /// A file not kept (its migration failed) is deleted.
    fn drop(&mut self) {
        self.settle();
        if !self.kept {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::AttachDir;

    fn sha(bytes: &[u8]) -> String {
        use sha2::{Digest, Sha256};
        Sha256::digest(bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ferry-store-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn offer(name: &str, content: &[u8], path: &Path) -> FileOffer {
        FileOffer {
            name: name.into(),
            size: content.len() as u64,
            sha256: sha(content),
            path: path.display().to_string(),
        }
    }

    /// A store in `d`/store attaching files from `d`/attach.
    fn store_in(d: &Path) -> FileStore {
        let attach = d.join("attach");
        std::fs::create_dir_all(&attach).unwrap();
        FileStore::new(
            d.join("store"),
            AttachPolicy::Under(vec![AttachDir::new(&attach).unwrap()]),
        )
    }

    /// The names in `dir`, sorted.
    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn files_are_found_received_checked_and_kept_once_adopted() {
        let d = dir("a");
        let store = store_in(&d);
        let content = b"weights and biases".to_vec();
        let source_path = d.join("attach").join("model.gguf");
        let o = offer("model", &content, &source_path);
        // Nothing yet.
        assert!(store.find(&o).is_none());
        // The same content at the source's path, in a folder this host attaches files
        // from, is a copy; other content is not.
        std::fs::write(&source_path, &content).unwrap();
        assert_eq!(store.find(&o).unwrap().info().path, source_path);
        std::fs::write(&source_path, b"weights and BIASES").unwrap();
        assert!(store.find(&o).is_none());
        std::fs::remove_file(&source_path).unwrap();

        // Received in two pieces, out of order, checked.
        let incoming = store.receive(&[&o]).unwrap().pop().unwrap();
        incoming.write_at(8, &content[8..]).unwrap();
        incoming.write_at(0, &content[..8]).unwrap();
        let received = store.finish(incoming).unwrap();
        let stored = store.dir().join(format!("sha256-{}", o.sha256));
        assert_eq!(received.file().info().path, stored);
        let mut back = vec![0u8; content.len()];
        received.file().read_at(0, &mut back).unwrap();
        assert_eq!(back, content);
        // Not in the store before its VM is adopted; there once it is.
        assert!(!stored.exists());
        assert!(store.find(&o).is_none());
        received.keep().unwrap();
        assert_eq!(names(store.dir()), [format!("sha256-{}", o.sha256)]);
        assert_eq!(store.find(&o).unwrap().info().path, stored);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn files_of_a_migration_that_never_completes_are_all_deleted() {
        let d = dir("pending");
        let store = store_in(&d);
        let contents: Vec<Vec<u8>> = (0..63u8).map(|i| vec![i; 4096 + usize::from(i)]).collect();
        let offers: Vec<FileOffer> = contents
            .iter()
            .enumerate()
            .map(|(i, c)| offer(&format!("f{i}"), c, Path::new("/nonexistent")))
            .collect();
        let refs: Vec<&FileOffer> = offers.iter().collect();
        // Sent whole and checked (the first round is done), then the migration fails.
        let received: Vec<ReceivedFile> = store
            .receive(&refs)
            .unwrap()
            .into_iter()
            .zip(&contents)
            .map(|(incoming, content)| {
                incoming.write_at(0, content).unwrap();
                store.finish(incoming).unwrap()
            })
            .collect();
        assert_eq!(names(store.dir()).len(), 63);
        assert!(offers.iter().all(|o| store.find(o).is_none()));
        drop(received);
        assert_eq!(names(store.dir()), Vec::<String>::new());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn the_destination_looks_only_where_it_would_attach_files_from() {
        let d = dir("paths");
        let store = store_in(&d);
        let content = b"a dataset".to_vec();
        // The same content where the source says it is, outside the attach folders: not
        // looked at (its existence, size and hash are this host's secret).
        let outside = d.join("secret.key");
        std::fs::write(&outside, &content).unwrap();
        let o = offer("data", &content, &outside);
        assert!(store.find(&o).is_none());
        // Nor through a link inside the folder, nor with `..`, nor relative.
        let link = d.join("attach").join("link");
        std::os::unix::fs::symlink(&outside, &link).unwrap();
        let dotdot = d.join("attach").join("..").join("secret.key");
        for path in [link.clone(), dotdot, PathBuf::from("secret.key")] {
            assert!(
                store.find(&offer("data", &content, &path)).is_none(),
                "{path:?}"
            );
        }
        // A file a VM here uses (a path this host chose) is found by its content.
        let known = FileInfo {
            name: "data".into(),
            size: content.len() as u64,
            sha256: o.sha256.clone(),
            path: outside.clone(),
        };
        let knowing = store.clone().knowing(vec![known]);
        assert_eq!(
            knowing
                .find(&offer("data", &content, Path::new("/elsewhere")))
                .unwrap()
                .info()
                .path,
            outside
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn space_is_allocated_when_files_are_created_and_the_margin_kept() {
        let d = dir("space");
        const SIZE: u64 = 12 << 20;
        let o = offer("big", b"", Path::new("/nonexistent"));
        let o = FileOffer { size: SIZE, ..o };
        // A file system of 20 MiB holding only the store's files, of which it leaves
        // 1 MiB free (1/20): room for one file and half of another. Its free space is
        // what the store's files leave, not the real disk's, which others change.
        let mut store = store_in(&d);
        store.disk = Some(20 << 20);
        let first = store.receive(&[&o]).unwrap();
        // Taken now, on the real disk, not promised: a sparse file would have no blocks.
        // (Where the file system cannot allocate ahead, the store counts the bytes
        // promised to the file instead, below.)
        let probe = File::create(d.join("probe")).unwrap();
        if allocate(&probe, 4096).unwrap() {
            let meta = std::fs::metadata(&first[0].part.path).unwrap();
            assert!(meta.blocks() * 512 >= SIZE, "{} blocks", meta.blocks());
        } else {
            eprintln!("the temporary folder's file system cannot allocate ahead");
        }
        // So a second session, which alone would fit, sees the first's file.
        let err = store.receive(&[&o]).unwrap_err();
        match &err {
            ReceiveError::NoRoom {
                needed, free, keep, ..
            } => {
                assert_eq!((*needed, *keep), (SIZE, 1 << 20), "{err}");
                assert!(*free <= (20 << 20) - SIZE, "{err}");
            }
            _ => panic!("{err}"),
        }
        assert!(err.to_string().contains("leaves 1 MiB free"), "{err}");
        // Once the first is gone, its space is free again.
        drop(first);
        assert_eq!(names(store.dir()), Vec::<String>::new());
        drop(store.receive(&[&o]).unwrap());
        // A margin of its own.
        let err = store.keeping_free(9 << 20).receive(&[&o]).unwrap_err();
        assert!(matches!(err, ReceiveError::NoRoom { .. }), "{err}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_file_named_by_many_paths_is_hashed_once() {
        let d = dir("paths-many");
        let store = store_in(&d);
        let content = b"a model".to_vec();
        let o = offer("model", &content, Path::new("/elsewhere"));
        // A damaged copy (the size right, the content not), named by a VM's path, a
        // link to it, a second name of the same file, and the store's.
        let model = d.join("model.gguf");
        std::fs::write(&model, b"a modeL").unwrap();
        let link = d.join("link");
        std::os::unix::fs::symlink(&model, &link).unwrap();
        let hard = d.join("hard");
        std::fs::hard_link(&model, &hard).unwrap();
        std::fs::create_dir_all(store.dir()).unwrap();
        let stored = store.stored_path(&o.sha256);
        std::fs::hard_link(&model, &stored).unwrap();
        let listed = |path: &Path| FileInfo {
            name: "model".into(),
            size: content.len() as u64,
            sha256: o.sha256.clone(),
            path: path.to_path_buf(),
        };
        // Three VMs use it by the same path, two by others.
        let mut files = vec![listed(&model), listed(&model), listed(&model)];
        files.extend([listed(&link), listed(&hard)]);
        let knowing = store.clone().knowing(files.clone());
        assert_eq!(
            knowing.candidates(&o).collect::<Vec<_>>(),
            std::slice::from_ref(&stored)
        );
        assert!(knowing.find(&o).is_none());
        // Another file with that content is another copy, looked at too.
        let other = d.join("other.gguf");
        std::fs::write(&other, b"a modeL").unwrap();
        files.push(listed(&other));
        let knowing = store.knowing(files);
        assert_eq!(knowing.candidates(&o).collect::<Vec<_>>(), [stored, other]);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn part_files_no_process_holds_are_deleted_and_others_kept() {
        let d = dir("sweep");
        let store = store_in(&d);
        std::fs::create_dir_all(store.dir()).unwrap();
        let long_ago = std::time::SystemTime::now() - ABANDONED_AFTER * 2;
        let part = |name: &str| {
            let path = store.dir().join(name);
            let file = File::create(&path).unwrap();
            file.set_modified(long_ago).unwrap();
            file
        };
        // A stopped daemon's (nobody holds its lock).
        drop(part("incoming-00000000000000aa-0.part"));
        // A live migration's, received long ago: its owner holds the lock.
        let live = part("incoming-00000000000000bb-0.part");
        try_lock(&live).unwrap();
        // Just created: its creator is about to lock it.
        File::create(store.dir().join("incoming-00000000000000cc-0.part")).unwrap();
        // Not a part file.
        drop(part("sha256-operator-placed"));
        // The next receive sweeps.
        let incoming = store
            .receive(&[&offer("data", b"data", Path::new("/nonexistent"))])
            .unwrap();
        let ours = incoming[0].part.path.file_name().unwrap().to_str().unwrap();
        let mut left = names(store.dir());
        left.retain(|n| n != ours);
        assert_eq!(
            left,
            [
                "incoming-00000000000000bb-0.part",
                "incoming-00000000000000cc-0.part",
                "sha256-operator-placed"
            ]
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn damaged_files_and_hostile_offers_are_refused() {
        let d = dir("b");
        let store = store_in(&d);
        let content = vec![7u8; 1000];
        let o = offer("data", &content, Path::new("/nonexistent"));
        let incoming = store.receive(&[&o]).unwrap().pop().unwrap();
        incoming.write_at(0, &content[..999]).unwrap(); // the last byte stays zero
        let part = incoming.part.path.clone();
        let err = store.finish(incoming).unwrap_err();
        assert!(err.contains("arrived damaged"), "{err}");
        assert!(!part.exists(), "a damaged file is deleted");
        // A hash that would be a path, and more bytes than any disk has.
        let mut evil = o.clone();
        evil.sha256 = "../../etc/passwd".into();
        assert!(store.find(&evil).is_none());
        let err = store.receive(&[&evil]).unwrap_err();
        assert!(err.to_string().contains("invalid sha256"), "{err}");
        let mut huge = o.clone();
        huge.size = u64::MAX / 2;
        let err = store.receive(&[&huge]).unwrap_err();
        assert!(err.to_string().contains("MiB free"), "{err}");
        // A failed migration's files are deleted with it.
        let incoming = store.receive(&[&o]).unwrap().pop().unwrap();
        let part = incoming.part.path.clone();
        assert!(part.exists());
        drop(incoming);
        assert!(!part.exists());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
