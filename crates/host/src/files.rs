//! Where a VM migrated here finds its attached files: a copy this host already has (in
//! its file store, one a VM listed here uses, or one at the source's path under a folder
//! this host attaches files from), or the bytes the source sends, written into this
//! host's file store and checked against their SHA-256 before the VM may use them.
//!
//! The store (`ferry host serve --file-store DIR`) keeps each file received with a VM
//! that then ran here as `sha256-<hex>`, so a VM that moves away and back, or a second
//! VM with the same model, finds it there. It is a cache, as a GPU host keeps its models:
//! when a receive finds too little room, it evicts the `sha256-<hex>` files that no VM
//! present here uses (running, paused, migrating away, in doubt, being received or
//! created: those of VMs that ended or left are the cache), least recently used first,
//! until the files fit with the margin; only if they still do not is the VM refused. A file's last use
//! is when a VM arriving here last found it there (remembered by this process), else its
//! modification time, set when it entered the store. Each eviction is logged. A store
//! folder belongs to one daemon ([`FileStore::hold`]): another would not see this one's
//! VMs. Nothing else is
//! evicted: no part file, no file an operator put there under another name, none with a
//! name elsewhere too (deleting it would free nothing). A file is received as
//! `incoming-*.part`, its space allocated up front, and enters the store only once its
//! VM is adopted ([`ReceivedFile::keep`]): a migration that fails, at any point, deletes
//! its files, and part files a stopped daemon left behind are deleted by the next
//! receive.
//!
//! A VM being received pins its files' content ([`FileStore::pin`]) before it looks for
//! copies, and one being created the store files it attaches
//! (`FileStore::pin_attached`) before it opens them, until it is listed here, where its
//! state pins them. An eviction moves the file
//! aside (as a locked part file) before it looks at the pins again, and puts it back if a
//! VM pinned it meanwhile: a file a VM found here is never deleted under it, and one that
//! is no longer there when a VM looks is simply not a copy.
//!
//! A source names paths, but only those this host would attach anyway are looked at: a
//! peer cannot make this host tell, by how long it takes, whether any other file exists,
//! nor make it hash one.

use std::collections::{BTreeMap, HashSet};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use ferry_migrate::vm::valid_sha256;
use ferry_migrate::FileOffer;
use ferry_vmm::files::{AttachError, AttachedFile};
use ferry_vmm::migration::file_info;
use ferry_vmm::FileInfo;

use crate::AttachPolicy;

/// How part files are named: `incoming-<random>-<index>.part` (and a file being evicted,
/// for an instant: `incoming-<random>-evicted-<sha256>.part`).
const PART_PREFIX: &str = "incoming-";
const PART_SUFFIX: &str = ".part";
/// How the store names a file it keeps: `sha256-<64 hex>`.
const STORED_PREFIX: &str = "sha256-";
/// A part file this old that no process holds locked was left by a daemon that stopped
/// (its creator locks it at once: the age only covers that instant).
const ABANDONED_AFTER: Duration = Duration::from_secs(60);
/// The most the store leaves free on its file system (less on a small one: 1/20 of it).
const KEEP_FREE_MAX: u64 = 1 << 30;

/// Bytes promised to files of this process created sparse (on file systems that cannot
/// allocate ahead) and not yet written: free space they will take.
static SPARSE_PROMISED: AtomicU64 = AtomicU64::new(0);

/// The content VMs being received pin, by store folder and sha256, with how many pins
/// each: every store of this process on that folder sees them, as it sees its files.
static RECEIVING: Mutex<BTreeMap<(PathBuf, String), usize>> = Mutex::new(BTreeMap::new());

fn receiving() -> MutexGuard<'static, BTreeMap<(PathBuf, String), usize>> {
    RECEIVING.lock().unwrap_or_else(|e| e.into_inner())
}

/// When this process last found each store file's content for an arriving VM, by store
/// folder and sha256. Kept here, not in the file's times: changing those changes its
/// change time, which fails a hash of it under way (a VM arriving, or one leaving
/// checking its files) and makes every user hash it whole again. A restart forgets it:
/// the modification time (when the file entered the store) is the last use then.
static LAST_FOUND: Mutex<BTreeMap<(PathBuf, String), SystemTime>> = Mutex::new(BTreeMap::new());

fn last_found() -> MutexGuard<'static, BTreeMap<(PathBuf, String), SystemTime>> {
    LAST_FOUND.lock().unwrap_or_else(|e| e.into_inner())
}

/// The content the VMs present on a host use (running, paused, migrating away, in
/// doubt), asked at each eviction, as VMs come and go meanwhile; `None` if the host is
/// gone, and then nothing is evicted.
#[derive(Clone)]
struct PresentVms(Arc<dyn Fn() -> Option<HashSet<String>> + Send + Sync>);

impl std::fmt::Debug for PresentVms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PresentVms(..)")
    }
}

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
    /// What the host's VMs use, which no eviction deletes.
    present: PresentVms,
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
    /// The files do not fit, leaving the margin free, even with the store's files that
    /// no VM here uses evicted (as far as that would make room).
    #[error("the attached files need {} MiB and the file store {} has {} MiB free, of which it leaves {} MiB free; it evicted {} MiB of files no VM here uses, evicting the {} MiB more of them would not make room, and VMs here use {} MiB of its files", needed.div_ceil(1 << 20), dir.display(), free >> 20, keep >> 20, evicted >> 20, unused >> 20, pinned >> 20)]
    NoRoom {
        /// The store's folder.
        dir: PathBuf,
        /// Bytes asked for.
        needed: u64,
        /// Bytes free (less those promised to sparse files).
        free: u64,
        /// Bytes the store leaves free.
        keep: u64,
        /// Bytes freed by evicting store files no VM here uses, before giving up.
        evicted: u64,
        /// Bytes of store files no VM here uses left: too few to make room.
        unused: u64,
        /// Bytes of store files VMs here use: never evicted.
        pinned: u64,
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

/// The file a daemon holds locked for as long as it serves its store folder.
const DAEMON_LOCK: &str = ".ferry-daemon.lock";

/// A daemon's hold on its store folder ([`FileStore::hold`]), let go when dropped.
#[derive(Debug)]
pub struct StoreHold {
    _lock: File,
}

/// Why a daemon could not take its store folder.
#[derive(Debug, thiserror::Error)]
pub enum HoldError {
    /// Another daemon serves it: it would not see this one's VMs, and could evict
    /// their files.
    #[error("the file store {} is in use by another ferry daemon: give each daemon a --file-store of its own", dir.display())]
    InUse {
        /// The store's folder.
        dir: PathBuf,
    },
    /// Another user could change what it holds: the store's copies are run by VMs
    /// without a check that another user put them there.
    #[error("the file store {} is not safe to use: {why}; give --file-store a folder of the daemon's own user that no one else may write to", dir.display())]
    NotPrivate {
        /// The folder refused (the store's, or the one holding it).
        dir: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// The file system failed.
    #[error("cannot {what} {}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// Where.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Why a received file was not taken ([`FileStore::finish`]); it is deleted.
#[derive(Debug, thiserror::Error)]
pub enum FinishError {
    /// Its content is not the one offered.
    #[error("attached file '{name}' arrived damaged")]
    Damaged {
        /// The file's name in the VM.
        name: String,
        /// How it differs.
        #[source]
        source: Box<AttachError>,
    },
    /// It could not be checked.
    #[error("cannot check the received attached file '{name}'")]
    Check {
        /// The file's name in the VM.
        name: String,
        /// Why.
        #[source]
        source: Box<AttachError>,
    },
}

/// Received bytes could not be written to a file's part file ([`IncomingFile::write_at`]).
#[derive(Debug, thiserror::Error)]
#[error("cannot write {}", part.display())]
pub struct PartWriteError {
    /// The part file.
    pub part: PathBuf,
    /// Why.
    #[source]
    pub source: std::io::Error,
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

/// The pin that keeps a VM's files in the store while the VM is being received
/// ([`FileStore::pin`]) or created (`FileStore::pin_attached`); dropped, it lets them
/// go.
#[derive(Debug)]
pub struct ReceivingPin {
    dir: PathBuf,
    sha256: Vec<String>,
}

impl ReceivingPin {
    /// Whether `path` names a store file it pins.
    pub(crate) fn pins(&self, path: &Path) -> bool {
        let stored = path
            .file_name()
            .and_then(|n| n.to_str()?.strip_prefix(STORED_PREFIX));
        let in_store = || path.parent() == std::fs::canonicalize(&self.dir).ok().as_deref();
        stored.is_some_and(|sha| self.sha256.iter().any(|s| s == sha)) && in_store()
    }
}

/// A store file eviction may delete: named by its content, a regular file, its only
/// name.
#[derive(Debug)]
struct StoreFile {
    path: PathBuf,
    sha256: String,
    /// Its length, for the log.
    size: u64,
    /// Bytes allocated to it: what deleting it frees.
    bytes: u64,
    /// Its last use: when it entered the store, or was last found for a VM here.
    used: SystemTime,
    /// Device and inode: only the file chosen is deleted, not a copy put there since.
    id: (u64, u64),
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

/// Opens the store's entry `path` for reading (and locking) as it is: a link there is not
/// followed, and a FIFO put in a file's place since it was listed is opened without
/// waiting for a writer that never comes.
fn open_entry(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
}

/// Refuses store folder `dir` unless only this daemon's user can change what it holds:
/// `dir` is a folder (not a link) of that user that no one else may write to, in a
/// folder of that user's or root's that no one else may write to, or only to add their
/// own entries (sticky, as /tmp and /var/tmp are). A folder another user made first at
/// the default path (in /var/tmp) would let them put the files VMs run on.
fn private_folder(dir: &Path) -> Result<(), HoldError> {
    let failed = |source| HoldError::Io {
        what: "look at",
        path: dir.to_path_buf(),
        source,
    };
    // SAFETY: geteuid has no preconditions and cannot fail.
    let user = unsafe { libc::geteuid() };
    let refused = |dir: &Path, why: String| HoldError::NotPrivate {
        dir: dir.to_path_buf(),
        why,
    };
    let meta = std::fs::symlink_metadata(dir).map_err(failed)?;
    if !meta.is_dir() {
        return Err(refused(dir, "it is not a folder (a link?)".into()));
    }
    if meta.uid() != user {
        return Err(refused(
            dir,
            format!(
                "it belongs to user {}, not to this daemon's ({user})",
                meta.uid()
            ),
        ));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(refused(
            dir,
            format!("others may write to it (mode {:o})", meta.mode() & 0o7777),
        ));
    }
    let parent = std::fs::canonicalize(dir)
        .map_err(failed)?
        .parent()
        .map(Path::to_path_buf);
    if let Some(parent) = parent {
        let meta = std::fs::metadata(&parent).map_err(failed)?;
        if meta.uid() != user && meta.uid() != 0 {
            return Err(refused(
                &parent,
                format!("the folder holding it belongs to user {}", meta.uid()),
            ));
        }
        if meta.mode() & 0o022 != 0 && meta.mode() & 0o1000 == 0 {
            return Err(refused(
                &parent,
                format!(
                    "others may rename or replace what the folder holding it holds (mode {:o})",
                    meta.mode() & 0o7777
                ),
            ));
        }
    }
    Ok(())
}

/// Refuses the open `file` unless it is the file `other` has open.
fn same_file(file: &File, other: &File) -> std::io::Result<()> {
    let (a, b) = (file.metadata()?, other.metadata()?);
    if (a.dev(), a.ino()) == (b.dev(), b.ino()) {
        return Ok(());
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::PermissionDenied,
        "it is not the file written: something replaced it",
    ))
}

/// Refuses the open `file` unless `path` names it itself: a regular file, not a link
/// to one.
fn named_by(file: &File, path: &Path) -> std::io::Result<()> {
    let (named, opened) = (std::fs::symlink_metadata(path)?, file.metadata()?);
    if named.is_file() && (named.dev(), named.ino()) == (opened.dev(), opened.ino()) {
        return Ok(());
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::PermissionDenied,
        "a link, not a file of the store",
    ))
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
            // No host: no VM uses anything.
            present: PresentVms(Arc::new(|| Some(HashSet::new()))),
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
    /// ended or left lately: a VM coming back finds its files where it left them), and
    /// evicting none that its present VMs use.
    pub(crate) fn of_host(host: &Arc<crate::Host>) -> Self {
        let local = host
            .vms()
            .listed
            .values()
            .flat_map(|vm| vm.files.iter().cloned())
            .collect();
        // Weak: a store kept by a migration that outlives its host keeps nothing alive.
        let weak = Arc::downgrade(host);
        let present = PresentVms(Arc::new(move || {
            let host = weak.upgrade()?;
            let live = host.live_vms();
            Some(
                live.iter()
                    .flat_map(|vm| vm.files.iter().map(|f| f.sha256.clone()))
                    .collect(),
            )
        }));
        Self {
            present,
            ..Self::new(host.config.file_store.clone(), host.config.attach.clone()).knowing(local)
        }
    }

    /// Takes store folder `dir` (creating it) for this daemon, for as long as the hold
    /// lives; fails if another daemon holds it.
    pub fn hold(dir: &Path) -> Result<StoreHold, HoldError> {
        use std::os::unix::fs::OpenOptionsExt;
        let failed = |what, path: &Path| {
            let path = path.to_path_buf();
            move |source| HoldError::Io { what, path, source }
        };
        use std::os::unix::fs::DirBuilderExt;
        (std::fs::DirBuilder::new().recursive(true).mode(0o700))
            .create(dir)
            .map_err(failed("create the file store", dir))?;
        private_folder(dir)?;
        let path = dir.join(DAEMON_LOCK);
        // A link there is not followed: the daemon (often root) would create a file
        // wherever it leads, in a folder others may write to (the default is in /var/tmp).
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NOCTTY)
            .open(&path)
            .map_err(failed("open", &path))?;
        match try_lock(&lock) {
            Ok(()) => Ok(StoreHold { _lock: lock }),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Err(HoldError::InUse {
                dir: dir.to_path_buf(),
            }),
            Err(e) => Err(failed("lock", &path)(e)),
        }
    }

    /// Its folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn stored_path(&self, sha256: &str) -> PathBuf {
        self.dir.join(format!("{STORED_PREFIX}{sha256}"))
    }

    /// Keeps the store's copies of `offers`' content from eviction until the pin is
    /// dropped: a VM being received takes it before it looks for its files, and holds it
    /// until it is listed here.
    pub fn pin(&self, offers: &[FileOffer]) -> ReceivingPin {
        self.pin_content(offers.iter().map(|o| o.sha256.clone()).collect())
    }

    /// [`Self::pin`] for a VM being created: keeps those of `paths` (canonical, as a
    /// create request's are admitted) that are this store's files from eviction until
    /// the pin is dropped. Taken before they are opened, held until the VM is listed.
    pub(crate) fn pin_attached(&self, paths: &[&Path]) -> ReceivingPin {
        // A store not made yet holds no file.
        let Ok(dir) = std::fs::canonicalize(&self.dir) else {
            return self.pin_content(Vec::new());
        };
        let stored = |path: &&Path| {
            let sha256 = path.file_name()?.to_str()?.strip_prefix(STORED_PREFIX)?;
            (path.parent() == Some(dir.as_path()) && valid_sha256(sha256))
                .then(|| sha256.to_string())
        };
        self.pin_content(paths.iter().filter_map(stored).collect())
    }

    /// Pins the store's files of content `sha256` (see [`Self::pin`]).
    fn pin_content(&self, sha256: Vec<String>) -> ReceivingPin {
        let mut pins = receiving();
        for sha in &sha256 {
            *pins.entry((self.dir.clone(), sha.clone())).or_default() += 1;
        }
        ReceivingPin {
            dir: self.dir.clone(),
            sha256,
        }
    }

    /// Tests: evicts every store file no VM uses, as a receive that needs all the room
    /// does; the bytes freed.
    #[cfg(test)]
    pub(crate) fn evict_unused(&self) -> u64 {
        let pinned = self.pinned();
        self.stored_files()
            .iter()
            .filter(|f| pinned.as_ref().is_some_and(|p| !p.contains(&f.sha256)))
            .map(|f| self.evict(f, 0))
            .sum()
    }

    /// The content no eviction may delete now, `None` if the host is gone: the files of
    /// VMs being received or created, then those of VMs present. In that order: a VM lets go of its
    /// pin only once it is listed, so one that moves from the first to the second
    /// meanwhile is seen in either.
    fn pinned(&self) -> Option<HashSet<String>> {
        let mut pinned: HashSet<String> = receiving()
            .keys()
            .filter(|(dir, _)| *dir == self.dir)
            .map(|(_, sha)| sha.clone())
            .collect();
        pinned.extend((self.present.0)()?);
        Some(pinned)
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
        // The source's path, admitted once (admitted twice, a link swapped meanwhile could
        // make the answers differ and leave it unchecked), is checked where it was
        // opened: a link swapped in since would make this host hash a file outside.
        let admitted = self.admitted(offer);
        let stored = self.stored_path(&offer.sha256);
        let found = self.candidates(offer, admitted.clone()).find_map(|path| {
            let info = file_info(offer, path.clone());
            let opened = if admitted.as_ref() == Some(&path) {
                AttachedFile::open_expecting_checked(&info, &path, &|f| self.attach.check_open(f))
            } else if path == stored {
                // Likewise, the store's name must still be the file itself, not a link
                // swapped in since, to a file anywhere.
                AttachedFile::open_expecting_checked(&info, &path, &|f| named_by(f, &path))
            } else {
                // A path this host chose (a VM here uses it).
                AttachedFile::open_expecting(&info, &path)
            };
            match opened {
                Ok(file) => Some(file),
                Err(e) => {
                    tracing::debug!(file = %offer.name, "not a copy: {e}");
                    None
                }
            }
        })?;
        // Checked first: a damaged copy is not made the last to go.
        if found.info().path == stored {
            last_found().insert((self.dir.clone(), offer.sha256.clone()), SystemTime::now());
        }
        Some(found)
    }

    /// The files [`Self::find`] hashes for `offer`, in turn (each only if those before
    /// it were not copies): the store's, those VMs here use or used, and `admitted` (the
    /// source's path, where this host attaches files from); only regular files of its
    /// size (not a FIFO, not a device), and each file once, however many paths name it
    /// (N VMs here sharing a model list it N times, and the store's copy is often one of
    /// them: a damaged copy would be read whole N + 1 times). The store's name is not
    /// followed: a link there is not a file of the store, and would make this host look
    /// outside the folders it attaches files from.
    fn candidates<'a>(
        &'a self,
        offer: &'a FileOffer,
        admitted: Option<PathBuf>,
    ) -> impl Iterator<Item = PathBuf> + 'a {
        let local = self
            .local
            .iter()
            .filter(|f| f.sha256 == offer.sha256 && f.size == offer.size)
            .map(|f| f.path.clone());
        let mut seen = HashSet::new();
        let stored = self.stored_path(&offer.sha256);
        std::iter::once(stored.clone())
            .chain(local)
            .chain(admitted)
            .filter(move |path| {
                let meta = if *path == stored {
                    std::fs::symlink_metadata(path)
                } else {
                    std::fs::metadata(path)
                };
                meta.is_ok_and(|meta| {
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
        let mut nonce = [0u8; 8];
        getrandom::fill(&mut nonce).map_err(|e| ReceiveError::Io {
            what: "name the files of",
            path: self.dir.clone(),
            source: std::io::Error::other(e.to_string()),
        })?;
        let tag = u64::from_le_bytes(nonce);
        self.make_room(needed, tag)?;
        // On an error, those created are dropped: deleted.
        let files = offers
            .iter()
            .enumerate()
            .map(|(i, offer)| self.create_part(tag, i, offer))
            .collect::<Result<Vec<_>, _>>()?;
        // Again with the space taken: of sessions that passed the first check together,
        // the last to allocate sees the others' files, and evicts more, or gives up if
        // it ate the margin.
        self.make_room(0, tag)?;
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
                let meta = match entry?.metadata() {
                    Ok(meta) => meta,
                    // Evicted by another receive meanwhile.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e),
                };
                used = used.saturating_add(meta.blocks().saturating_mul(512));
            }
            return Ok((total.saturating_sub(used), total));
        }
        space(&self.dir)
    }

    /// Bytes free (less those promised to sparse files) and bytes the store leaves free.
    fn room(&self) -> Result<(u64, u64), ReceiveError> {
        let (free, total) = self.space().map_err(|source| ReceiveError::Io {
            what: "tell the free space of",
            path: self.dir.clone(),
            source,
        })?;
        let free = free.saturating_sub(SPARSE_PROMISED.load(Ordering::SeqCst));
        Ok((free, self.keep_free.unwrap_or_else(|| keep_free(total))))
    }

    /// Makes room for `needed` more bytes with the store's margin left free, evicting
    /// store files no VM here uses, least recently used first, as far as needed; refuses
    /// if even that would leave too little (and then evicts none: a VM that cannot fit
    /// does not empty the cache).
    fn make_room(&self, needed: u64, tag: u64) -> Result<(), ReceiveError> {
        let fits = |(free, keep): (u64, u64)| needed.saturating_add(keep) <= free;
        let mut room = self.room()?;
        if fits(room) {
            return Ok(());
        }
        let pinned = self.pinned();
        let (mut unused, in_use): (Vec<StoreFile>, Vec<StoreFile>) =
            self.stored_files().into_iter().partition(|file| {
                pinned
                    .as_ref()
                    .is_some_and(|pinned| !pinned.contains(&file.sha256))
            });
        let total = |files: &[StoreFile]| {
            files
                .iter()
                .fold(0u64, |sum, f| sum.saturating_add(f.bytes))
        };
        let mut evicted = 0u64;
        if fits((room.0.saturating_add(total(&unused)), room.1)) {
            unused.sort_by(|a, b| (a.used, &a.path).cmp(&(b.used, &b.path)));
            for file in std::mem::take(&mut unused) {
                evicted = evicted.saturating_add(self.evict(&file, tag));
                room = self.room()?;
                if fits(room) {
                    return Ok(());
                }
            }
        }
        Err(ReceiveError::NoRoom {
            dir: self.dir.clone(),
            needed,
            free: room.0,
            keep: room.1,
            evicted,
            unused: total(&unused),
            pinned: total(&in_use),
        })
    }

    /// The store's files that eviction may delete: named `sha256-<hex>` (no part file,
    /// nothing an operator put there under another name), regular (no link), and with
    /// no other name (deleting one with another frees nothing).
    fn stored_files(&self) -> Vec<StoreFile> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let found = last_found().clone();
        entries
            .flatten()
            .filter_map(|entry| {
                let name = entry.file_name();
                let sha256 = name.to_str()?.strip_prefix(STORED_PREFIX)?;
                if !valid_sha256(sha256) {
                    return None;
                }
                // Not followed: a link is not a file of the store.
                let meta = entry.metadata().ok()?;
                if !meta.is_file() || meta.nlink() != 1 {
                    return None;
                }
                let modified = meta.modified().ok()?;
                let used = found
                    .get(&(self.dir.clone(), sha256.to_string()))
                    .map_or(modified, |&at| at.max(modified));
                Some(StoreFile {
                    path: entry.path(),
                    sha256: sha256.to_string(),
                    size: meta.len(),
                    bytes: meta.blocks().saturating_mul(512),
                    used,
                    id: (meta.dev(), meta.ino()),
                })
            })
            .collect()
    }

    /// Deletes `file` unless a VM pinned its content since it was chosen; the bytes
    /// freed (none if it is kept, or already gone: another receive evicted it). It is
    /// moved aside first, locked, as a part file (a sweep leaves it; a daemon that stops
    /// meanwhile leaves it to the next sweep): a VM that pins the content after it looks
    /// again here finds no copy, and one that pinned it before gets it back at its place.
    fn evict(&self, file: &StoreFile, tag: u64) -> u64 {
        // A name of its own: a sweep that opened an earlier eviction's aside file, and
        // locks it once that one is put back, must not find this one under the name.
        let aside = self.dir.join(format!(
            "{PART_PREFIX}{tag:016x}-evicted-{}{PART_SUFFIX}",
            file.sha256
        ));
        let failed = |what: &str, e: std::io::Error| {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(file = %file.path.display(), "cannot evict from the file store: cannot {what}: {e}");
            }
            0
        };
        let open = match open_entry(&file.path) {
            Ok(open) => open,
            Err(e) => return failed("open it", e),
        };
        // Another receive holds it: that one evicts it.
        if try_lock(&open).is_err() {
            return 0;
        }
        // A regular file: a FIFO put there since may have been given the freed inode.
        let ours = |meta: std::fs::Metadata| meta.is_file() && (meta.dev(), meta.ino()) == file.id;
        // A copy kept under the name since it was chosen is not the file chosen.
        if !open.metadata().is_ok_and(ours) {
            return 0;
        }
        if let Err(e) = std::fs::rename(&file.path, &aside) {
            return failed("move it aside", e);
        }
        let pinned = self
            .pinned()
            .is_none_or(|pinned| pinned.contains(&file.sha256));
        if pinned || !std::fs::symlink_metadata(&aside).is_ok_and(ours) {
            put_back(&aside, &file.path);
            return 0;
        }
        if let Err(e) = std::fs::remove_file(&aside) {
            put_back(&aside, &file.path);
            return failed("delete it", e);
        }
        last_found().remove(&(self.dir.clone(), file.sha256.clone()));
        let unused_for = file.used.elapsed().unwrap_or_default();
        tracing::info!(
            file = %file.path.display(),
            size_mib = file.size.div_ceil(1 << 20),
            unused_for = ?Duration::from_secs(unused_for.as_secs()),
            "evicted from the file store: no VM here uses it, and a migration needs the room"
        );
        file.bytes
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
            let Ok(file) = open_entry(&path) else {
                continue;
            };
            // Deleted while locked, and still the file the name gives: no owner can
            // appear meanwhile.
            let same = |named: std::fs::Metadata, open: std::fs::Metadata| {
                (named.dev(), named.ino()) == (open.dev(), open.ino())
            };
            let still_named = || {
                std::fs::symlink_metadata(&path)
                    .and_then(|named| Ok(same(named, file.metadata()?)))
                    .unwrap_or(false)
            };
            if try_lock(&file).is_ok() && still_named() && std::fs::remove_file(&path).is_ok() {
                tracing::info!(file = %path.display(), "deleted a file left by a migration that never ended");
            }
        }
    }

    /// The received file `incoming`, if its content is the one offered, opened as an
    /// attached file known by its place in the store, where [`ReceivedFile::keep`] puts
    /// it once its VM is adopted. Otherwise it is deleted.
    pub fn finish(&self, incoming: IncomingFile) -> Result<ReceivedFile, FinishError> {
        let IncomingFile { info, mut part } = incoming;
        // Written whole, or deleted below: no longer space to come.
        part.settle();
        // On an error `part` is dropped, which deletes the file. The file checked (and
        // then kept) must be the one written: a part file replaced meanwhile, by a link
        // or another file with the right content, is not.
        let file =
            AttachedFile::open_expecting_checked(&info, &part.path, &|f| same_file(f, &part.file))
                .map_err(|e| {
                    let (name, source) = (info.name.clone(), Box::new(e));
                    match *source {
                        AttachError::Changed { .. } => FinishError::Damaged { name, source },
                        _ => FinishError::Check { name, source },
                    }
                })?;
        Ok(ReceivedFile {
            file: file.moved_to(self.stored_path(&info.sha256)),
            part,
        })
    }
}

impl IncomingFile {
    /// Writes received bytes (the engine checked the range against the offer).
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), PartWriteError> {
        self.part
            .file
            .write_all_at(data, offset)
            .map_err(|source| PartWriteError {
                part: self.part.path.clone(),
                source,
            })
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
        // Used now: the last to be evicted. Marked before it has its name, so no VM
        // that finds it there sees its times change while it hashes it.
        if let Err(e) = self.part.file.set_modified(SystemTime::now()) {
            tracing::debug!(file = %self.part.path.display(), "cannot mark a received file used: {e}");
        }
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

impl Drop for ReceivingPin {
    fn drop(&mut self) {
        let mut pins = receiving();
        for sha in self.sha256.drain(..) {
            let key = (self.dir.clone(), sha);
            if let Some(count) = pins.get_mut(&key) {
                *count -= 1;
                if *count == 0 {
                    pins.remove(&key);
                }
            }
        }
    }
}

/// Gives the file moved `aside` its name in the store back, unless a copy took the name
/// meanwhile (it has the same content: then `aside` is deleted, as a link never replaces
/// a name).
fn put_back(aside: &Path, stored: &Path) {
    let restored = match std::fs::hard_link(aside, stored) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(true),
        // A file system without links: the name is taken back, whatever has it now.
        Err(_) => std::fs::rename(aside, stored).map(|()| false),
    };
    match restored {
        Ok(linked) => {
            if linked {
                let _ = std::fs::remove_file(aside);
            }
        }
        Err(e) => {
            tracing::warn!(file = %stored.display(), "a file of the file store a VM uses could not be put back: {e}");
        }
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
pub(crate) mod tests {
    use super::*;
    use crate::AttachDir;

    /// The hex SHA-256 of `bytes`, as a store file is named.
    pub(crate) fn sha(bytes: &[u8]) -> String {
        use sha2::{Digest, Sha256};
        ferry_vmm::files::hex(&Sha256::digest(bytes))
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
            knowing
                .candidates(&o, knowing.admitted(&o))
                .collect::<Vec<_>>(),
            std::slice::from_ref(&stored)
        );
        assert!(knowing.find(&o).is_none());
        // Another file with that content is another copy, looked at too.
        let other = d.join("other.gguf");
        std::fs::write(&other, b"a modeL").unwrap();
        files.push(listed(&other));
        let knowing = store.knowing(files);
        assert_eq!(
            knowing
                .candidates(&o, knowing.admitted(&o))
                .collect::<Vec<_>>(),
            [stored, other]
        );
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
        assert!(matches!(err, FinishError::Damaged { .. }), "{err:?}");
        let err = ferry_migrate::error_chain(&err);
        assert!(
            err.starts_with("attached file 'data' arrived damaged: "),
            "{err}"
        );
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

    /// Puts content `tag` (`mib` MiB of it) in `store` as its copy, last used `ago` ago;
    /// its offer.
    fn stored(store: &FileStore, tag: u8, mib: usize, ago: Duration) -> FileOffer {
        let content = vec![tag; mib << 20];
        let o = offer(&format!("f{tag}"), &content, Path::new("/nonexistent"));
        std::fs::create_dir_all(store.dir()).unwrap();
        let path = store.stored_path(&o.sha256);
        std::fs::write(&path, &content).unwrap();
        set_used(&path, ago);
        o
    }

    /// Sets the last use of the file at `path` to `ago` ago.
    fn set_used(path: &Path, ago: Duration) {
        let file = File::options().write(true).open(path).unwrap();
        file.set_modified(SystemTime::now() - ago).unwrap();
    }

    /// How long ago the file at `path` was last used.
    fn used_ago(path: &Path) -> Duration {
        let modified = std::fs::metadata(path).unwrap().modified().unwrap();
        modified.elapsed().unwrap_or_default()
    }

    /// The store's file for `o`.
    fn name_of(o: &FileOffer) -> String {
        format!("sha256-{}", o.sha256)
    }

    /// `names` sorted.
    fn sorted(mut names: Vec<String>) -> Vec<String> {
        names.sort();
        names
    }

    /// The names in `dir` that are not part files.
    fn stored_names(dir: &Path) -> Vec<String> {
        let mut left = names(dir);
        left.retain(|n| !n.ends_with(PART_SUFFIX));
        left
    }

    const DAY: Duration = Duration::from_secs(24 * 60 * 60);

    /// VMs present on a host, whose files a test changes.
    fn present_vms(store: &mut FileStore) -> Arc<Mutex<HashSet<String>>> {
        let present = Arc::new(Mutex::new(HashSet::new()));
        let asked = present.clone();
        store.present = PresentVms(Arc::new(move || Some(asked.lock().unwrap().clone())));
        present
    }

    #[test]
    fn a_full_store_evicts_the_files_no_vm_uses_least_recently_used_first() {
        let d = dir("evict");
        // 20 MiB, of which 1 MiB is left free; 16 MiB held by four files no VM uses.
        let mut store = store_in(&d);
        store.disk = Some(20 << 20);
        let a = stored(&store, 1, 4, 3 * DAY);
        let b = stored(&store, 2, 4, DAY);
        let c = stored(&store, 3, 4, 2 * DAY);
        let e = stored(&store, 4, 4, 4 * DAY);
        // 8 MiB more need two to go: the two least recently used.
        let content = vec![9u8; 8 << 20];
        let o = offer("new", &content, Path::new("/nonexistent"));
        let incoming = store.receive(&[&o]).unwrap().pop().unwrap();
        assert_eq!(
            stored_names(store.dir()),
            sorted(vec![name_of(&b), name_of(&c)])
        );
        assert!(store.find(&a).is_none() && store.find(&e).is_none());
        // The file arrives and is kept with the others.
        incoming.write_at(0, &content).unwrap();
        store.finish(incoming).unwrap().keep().unwrap();
        assert_eq!(
            names(store.dir()),
            sorted(vec![name_of(&b), name_of(&c), name_of(&o)])
        );
        assert_eq!(
            store.find(&o).unwrap().info().path,
            store.stored_path(&o.sha256)
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn files_vms_here_use_are_never_evicted_and_the_refusal_says_so() {
        let d = dir("pinned");
        let mut store = store_in(&d);
        store.disk = Some(20 << 20);
        let present = present_vms(&mut store);
        // The oldest is a running VM's, the next a VM's being received; the newest is
        // no VM's.
        let running = stored(&store, 1, 4, 3 * DAY);
        let arriving = stored(&store, 2, 4, 2 * DAY);
        let unused = stored(&store, 3, 4, DAY);
        present.lock().unwrap().insert(running.sha256.clone());
        let pin = store.pin(std::slice::from_ref(&arriving));
        // 10 MiB more: the one no VM uses goes, though it was used last.
        let o = FileOffer {
            size: 10 << 20,
            ..offer("new", b"", Path::new("/nonexistent"))
        };
        drop(store.receive(&[&o]).unwrap());
        assert_eq!(
            stored_names(store.dir()),
            sorted(vec![name_of(&running), name_of(&arriving)])
        );
        assert!(store.find(&unused).is_none());
        // 14 MiB more would need theirs: refused, and they stay.
        let big = FileOffer {
            size: 14 << 20,
            ..o.clone()
        };
        let err = store.receive(&[&big]).unwrap_err();
        match &err {
            ReceiveError::NoRoom {
                evicted,
                unused,
                pinned,
                ..
            } => {
                assert_eq!((*evicted, *unused), (0, 0), "{err}");
                assert!(*pinned >= 8 << 20, "{err}");
            }
            _ => panic!("{err}"),
        }
        assert!(
            err.to_string()
                .contains("it evicted 0 MiB of files no VM here uses")
                && err.to_string().contains("VMs here use 8 MiB of its files"),
            "{err}"
        );
        assert_eq!(
            stored_names(store.dir()),
            sorted(vec![name_of(&running), name_of(&arriving)])
        );
        // Pins are those at the eviction: once the VMs are gone, the older goes.
        present.lock().unwrap().clear();
        drop(pin);
        drop(store.receive(&[&big]).unwrap());
        assert_eq!(stored_names(store.dir()), [name_of(&arriving)]);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_file_found_or_kept_here_is_evicted_after_older_ones_and_its_times_stay() {
        let d = dir("touch");
        let mut store = store_in(&d);
        store.disk = Some(20 << 20);
        let found = stored(&store, 1, 4, 3 * DAY);
        let older = stored(&store, 2, 4, 2 * DAY);
        let newer = stored(&store, 3, 4, DAY);
        let path = store.stored_path(&found.sha256);
        let times = |path: &Path| {
            let meta = std::fs::metadata(path).unwrap();
            (meta.modified().unwrap(), meta.ctime(), meta.ctime_nsec())
        };
        let before = times(&path);
        // A VM arriving finds the oldest: it is used now.
        assert_eq!(store.find(&found).unwrap().info().path, path);
        // Its times stay: a VM hashing it meanwhile would find it changed, and each of
        // its users would hash it whole again.
        assert_eq!(times(&path), before);
        // 10 MiB more: the least recently used goes, not the one found.
        let content = vec![9u8; 10 << 20];
        let o = offer("new", &content, Path::new("/nonexistent"));
        let incoming = store.receive(&[&o]).unwrap().pop().unwrap();
        assert_eq!(
            stored_names(store.dir()),
            sorted(vec![name_of(&found), name_of(&newer)])
        );
        assert!(store.find(&older).is_none());
        // A file kept is used now, whenever it was written.
        incoming.write_at(0, &content).unwrap();
        let received = store.finish(incoming).unwrap();
        set_used(&received.part.path, 5 * DAY);
        received.keep().unwrap();
        assert!(used_ago(&store.stored_path(&o.sha256)) < Duration::from_secs(60));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn only_files_named_by_their_content_are_evicted() {
        let d = dir("names");
        // 40 MiB, of which 2 MiB is left free.
        let mut store = store_in(&d);
        store.disk = Some(40 << 20);
        let evictable = stored(&store, 1, 4, DAY);
        // Put there by an operator (old, no VM uses them), or another receive's.
        let hex = sha(b"other");
        let others = [
            "sha256-operator-placed".to_string(),
            "model.gguf".to_string(),
            format!("sha256-{}", hex.to_uppercase()),
            format!("sha256-{hex}.bak"),
            "incoming-00000000000000aa-0.part".to_string(),
        ];
        for name in &others {
            std::fs::write(store.dir().join(name), vec![7u8; 4 << 20]).unwrap();
            set_used(&store.dir().join(name), 10 * DAY);
        }
        let live_part = File::open(store.dir().join(&others[4])).unwrap();
        try_lock(&live_part).unwrap();
        // A store file with another name too, and a link to a file outside.
        let linked = stored(&store, 2, 4, 10 * DAY);
        std::fs::hard_link(store.stored_path(&linked.sha256), d.join("linked")).unwrap();
        std::fs::write(d.join("target"), vec![3u8; 4 << 20]).unwrap();
        set_used(&d.join("target"), 10 * DAY);
        std::os::unix::fs::symlink(d.join("target"), store.stored_path(&sha(b"target"))).unwrap();
        let everything = names(store.dir());
        // 28 MiB used, 12 free: 16 MiB more would need more than the evictable file.
        let o = FileOffer {
            size: 16 << 20,
            ..offer("new", b"", Path::new("/nonexistent"))
        };
        let err = store.receive(&[&o]).unwrap_err();
        assert!(matches!(err, ReceiveError::NoRoom { .. }), "{err}");
        assert!(err.to_string().contains("the 4 MiB more"), "{err}");
        assert_eq!(names(store.dir()), everything);
        // 13 MiB more: it goes, and only it.
        let o = FileOffer {
            size: 13 << 20,
            ..o
        };
        let incoming = store.receive(&[&o]).unwrap();
        let mut left = everything.clone();
        left.retain(|n| *n != name_of(&evictable));
        let mut now = names(store.dir());
        now.retain(|n| n != incoming[0].part.path.file_name().unwrap().to_str().unwrap());
        assert_eq!(now, left);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_file_pinned_after_it_was_chosen_is_put_back() {
        let d = dir("put-back");
        let store = store_in(&d);
        let o = stored(&store, 1, 1, DAY);
        let chosen = store.stored_files().pop().unwrap();
        // A VM arriving pins it, then finds it, between the choice and the deletion.
        let pin = store.pin(std::slice::from_ref(&o));
        let copy = store.find(&o).unwrap();
        assert_eq!(store.evict(&chosen, 1), 0);
        assert_eq!(names(store.dir()), [name_of(&o)]);
        assert_eq!(copy.info().path, store.stored_path(&o.sha256));
        // Unpinned, it goes; gone, it is not evicted twice.
        drop(pin);
        assert_eq!(store.evict(&chosen, 1), chosen.bytes);
        assert_eq!(store.evict(&chosen, 1), 0);
        assert_eq!(names(store.dir()), Vec::<String>::new());
        assert!(store.find(&o).is_none());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_store_folder_others_could_change_is_refused() {
        use std::os::unix::fs::{chown, PermissionsExt};
        let d = dir("private");
        let not_private = |store: &Path| match FileStore::hold(store) {
            Err(e @ HoldError::NotPrivate { .. }) => e.to_string(),
            other => panic!("{store:?} taken: {:?}", other.map(|_| ())),
        };
        // Made here: for this user alone.
        let made = d.join("made").join("files");
        drop(FileStore::hold(&made).unwrap());
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!((mode(&made), mode(made.parent().unwrap())), (0o700, 0o700));
        // One others may write to, or in a folder others may rename it in.
        let open = d.join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(not_private(&open).contains("others may write to it (mode 777)"));
        let inside = open.join("files");
        std::fs::create_dir(&inside).unwrap();
        std::fs::set_permissions(&inside, std::fs::Permissions::from_mode(0o700)).unwrap();
        assert!(not_private(&inside).contains("the folder holding it holds (mode 777)"));
        // In a sticky folder (as /var/tmp), taken.
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).unwrap();
        drop(FileStore::hold(&inside).unwrap());
        // A link to a folder of the user's.
        let link = d.join("link");
        std::os::unix::fs::symlink(&made, &link).unwrap();
        assert!(not_private(&link).contains("not a folder"));
        // Made first by another user (only root can make one here).
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            let theirs = d.join("theirs");
            std::fs::create_dir(&theirs).unwrap();
            chown(&theirs, Some(65534), Some(65534)).unwrap();
            assert!(not_private(&theirs).contains("belongs to user 65534"));
        }
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_file_swapped_for_a_fifo_or_a_link_after_it_was_chosen_is_left_at_once() {
        let d = dir("swapped");
        let store = store_in(&d);
        let o = stored(&store, 2, 1, DAY);
        let chosen = store.stored_files().pop().unwrap();
        let path = store.stored_path(&o.sha256);
        // Another process puts a FIFO at its name (opened for reading, it would wait for
        // a writer for ever), then a link to a file elsewhere.
        let outside = d.join("outside");
        std::fs::write(&outside, b"not the store's").unwrap();
        let swaps: [&dyn Fn(); 2] = [
            &|| {
                std::fs::remove_file(&path).unwrap();
                // It may be given the deleted file's inode: an inode is not enough to
                // tell it from the file chosen.
                ferry_testdata::make_fifo(&path);
            },
            &|| {
                std::fs::remove_file(&path).unwrap();
                std::os::unix::fs::symlink(&outside, &path).unwrap();
            },
        ];
        for swap in swaps {
            swap();
            let (tx, rx) = std::sync::mpsc::channel();
            let evicting = store.clone();
            let file = StoreFile {
                path: chosen.path.clone(),
                sha256: chosen.sha256.clone(),
                ..chosen
            };
            std::thread::spawn(move || tx.send(evicting.evict(&file, 3)).unwrap());
            let freed = rx.recv_timeout(Duration::from_secs(5));
            if freed.is_err() {
                // Lets the stuck eviction go before failing.
                use std::os::unix::fs::OpenOptionsExt;
                let _ = OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_NONBLOCK)
                    .open(&path);
                panic!("the eviction hung on what replaced the file");
            }
            assert_eq!(freed.unwrap(), 0);
            assert!(std::fs::symlink_metadata(&path).is_ok(), "left in place");
        }
        assert_eq!(std::fs::read(&outside).unwrap(), b"not the store's");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn receives_evicting_at_once_both_get_room() {
        let d = dir("evict-race");
        for round in 0..10u8 {
            let mut store = store_in(&d);
            store.disk = Some(20 << 20);
            let _ = std::fs::remove_dir_all(store.dir());
            // Four files no VM uses, 16 MiB: receives of 7 MiB need one gone each, and
            // three for both, which may pick the same one.
            for i in 0..4 {
                stored(&store, round * 4 + i, 4, DAY * u32::from(i + 1));
            }
            let threads: Vec<_> = (0..2u8)
                .map(|i| {
                    let store = store.clone();
                    std::thread::spawn(move || {
                        let o = FileOffer {
                            size: 7 << 20,
                            ..offer(&format!("new{i}"), &[i], Path::new("/nonexistent"))
                        };
                        store.receive(&[&o])
                    })
                })
                .collect();
            let received: Vec<_> = threads
                .into_iter()
                .map(|t| t.join().unwrap().unwrap())
                .collect();
            assert!(stored_names(store.dir()).len() <= 1, "round {round}");
            drop(received);
        }
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_create_pins_only_the_store_files_it_attaches() {
        let d = dir("create-pin");
        let store = store_in(&d);
        let attached = stored(&store, 1, 1, DAY);
        let other = stored(&store, 2, 1, DAY);
        // The same name outside the store, and a file of the store not named by content,
        // are not the store's files.
        let elsewhere = d.join("attach").join(name_of(&other));
        std::fs::copy(store.stored_path(&other.sha256), &elsewhere).unwrap();
        let named = store.dir().join("model.bin");
        std::fs::write(&named, b"not named by content").unwrap();
        let path = std::fs::canonicalize(store.stored_path(&attached.sha256)).unwrap();
        let pin = store.pin_attached(&[&path, &elsewhere, &named]);
        assert_eq!(pin.sha256, std::slice::from_ref(&attached.sha256));
        assert_eq!(store.evict_unused(), 1 << 20);
        assert_eq!(
            stored_names(store.dir()),
            sorted(vec![name_of(&attached), "model.bin".into()])
        );
        drop(pin);
        assert_eq!(store.evict_unused(), 1 << 20);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
