//! Where a VM migrated here finds its attached files: a copy this host already has (the
//! file at the source's path, or one received before), or the bytes the source sends,
//! written into this host's file store and checked against their SHA-256 before the VM
//! may use them.
//!
//! The store (`ferry host serve --file-store DIR`) keeps each received file as
//! `sha256-<hex>`, so a VM that moves away and back, or a second VM with the same model,
//! finds it there. Nothing removes them: they are the host's copy of its VMs' models and
//! datasets, as a GPU host keeps its model cache.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use ferry_migrate::vm::valid_sha256;
use ferry_migrate::FileOffer;
use ferry_vmm::files::AttachedFile;
use ferry_vmm::migration::file_info;
use ferry_vmm::FileInfo;

/// The file store of one host.
#[derive(Debug, Clone)]
pub struct FileStore {
    dir: PathBuf,
}

/// A file being received into the store.
#[derive(Debug)]
pub struct IncomingFile {
    info: FileInfo,
    part: PathBuf,
    file: File,
}

/// Bytes free for an unprivileged writer in the file system holding `dir`.
fn free_bytes(dir: &Path) -> std::io::Result<u64> {
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
    Ok(stats.f_bavail.saturating_mul(stats.f_frsize))
}

impl FileStore {
    /// The store in `dir` (created when a file first arrives).
    pub fn new(dir: PathBuf) -> Self {
        Self { dir }
    }

    /// Its folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn stored_path(&self, sha256: &str) -> PathBuf {
        self.dir.join(format!("sha256-{sha256}"))
    }

    /// This host's copy of `offer`'s content, if it has one: the store's, or the file at
    /// the source's path (often a shared or identically provisioned folder). Anything
    /// else there (missing, another size, other content) is not a copy.
    pub fn find(&self, offer: &FileOffer) -> Option<AttachedFile> {
        if !valid_sha256(&offer.sha256) {
            return None;
        }
        let candidates = [self.stored_path(&offer.sha256), PathBuf::from(&offer.path)];
        candidates.into_iter().find_map(|path| {
            // Only a regular file of the right size is opened (not a FIFO, not a device).
            let meta = std::fs::metadata(&path).ok()?;
            if !meta.is_file() || meta.len() != offer.size || !path.is_absolute() {
                return None;
            }
            match AttachedFile::open_expecting(&file_info(offer, path.clone()), &path) {
                Ok(file) => Some(file),
                Err(e) => {
                    tracing::debug!(file = %offer.name, "not a copy: {e}");
                    None
                }
            }
        })
    }

    /// Files to receive `offers` into: checks there is room for them all, then creates
    /// each (as a `.part` file until its content is checked).
    pub fn receive(&self, offers: &[&FileOffer]) -> Result<Vec<IncomingFile>, String> {
        if let Some(bad) = offers.iter().find(|o| !valid_sha256(&o.sha256)) {
            return Err(format!(
                "attached file '{}' has an invalid sha256 '{}'",
                bad.name, bad.sha256
            ));
        }
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| format!("cannot create the file store {}: {e}", self.dir.display()))?;
        // The sizes are the peer's: summed without overflow.
        let needed = offers
            .iter()
            .try_fold(0u64, |sum, o| sum.checked_add(o.size))
            .unwrap_or(u64::MAX);
        let free = free_bytes(&self.dir)
            .map_err(|e| format!("cannot tell the free space of {}: {e}", self.dir.display()))?;
        if needed > free {
            return Err(format!(
                "the attached files need {} MiB and the file store {} has {} MiB free",
                needed.div_ceil(1 << 20),
                self.dir.display(),
                free >> 20
            ));
        }
        let mut nonce = [0u8; 8];
        getrandom::fill(&mut nonce).map_err(|e| format!("no random source: {e}"))?;
        let tag = u64::from_le_bytes(nonce);
        offers
            .iter()
            .enumerate()
            .map(|(i, offer)| {
                let part = self.dir.join(format!("incoming-{tag:016x}-{i}.part"));
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(&part)
                    .and_then(|f| f.set_len(offer.size).map(|()| f))
                    .map_err(|e| format!("cannot create {}: {e}", part.display()))?;
                Ok(IncomingFile {
                    info: file_info(offer, part.clone()),
                    part,
                    file,
                })
            })
            .collect()
    }

    /// The received file `incoming`, if its content is the one offered: moved to its
    /// place in the store and opened as an attached file. Otherwise it is deleted.
    pub fn finish(&self, incoming: IncomingFile) -> Result<AttachedFile, String> {
        // On any error `incoming` is dropped, which deletes the part file.
        let file = AttachedFile::open_expecting(&incoming.info, &incoming.part).map_err(|e| {
            format!(
                "attached file '{}' arrived damaged: {e}",
                incoming.info.name
            )
        })?;
        let stored = self.stored_path(&incoming.info.sha256);
        std::fs::rename(&incoming.part, &stored)
            .map_err(|e| format!("cannot store {}: {e}", stored.display()))?;
        Ok(file.moved_to(stored))
    }
}

impl IncomingFile {
    /// Writes received bytes (the engine checked the range against the offer).
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), String> {
        self.file
            .write_all_at(data, offset)
            .map_err(|e| format!("cannot write {}: {e}", self.part.display()))
    }
}

impl Drop for IncomingFile {
    /// A file not finished (the migration failed) is deleted.
    fn drop(&mut self) {
        if self.part.exists() {
            let _ = std::fs::remove_file(&self.part);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn files_are_found_received_checked_and_kept() {
        let d = dir("a");
        let store = FileStore::new(d.join("store"));
        let content = b"weights and biases".to_vec();
        let source_path = d.join("model.gguf");
        let o = offer("model", &content, &source_path);
        // Nothing yet.
        assert!(store.find(&o).is_none());
        // The same content at the source's path is a copy; other content is not.
        std::fs::write(&source_path, &content).unwrap();
        assert_eq!(store.find(&o).unwrap().info().path, source_path);
        std::fs::write(&source_path, b"weights and BIASES").unwrap();
        assert!(store.find(&o).is_none());
        std::fs::remove_file(&source_path).unwrap();

        // Received in two pieces, out of order, checked, moved into the store.
        let incoming = store.receive(&[&o]).unwrap().pop().unwrap();
        incoming.write_at(8, &content[8..]).unwrap();
        incoming.write_at(0, &content[..8]).unwrap();
        let file = store.finish(incoming).unwrap();
        assert_eq!(
            file.info().path,
            store.dir().join(format!("sha256-{}", o.sha256))
        );
        let mut back = vec![0u8; content.len()];
        file.read_at(0, &mut back).unwrap();
        assert_eq!(back, content);
        // Now the store has it.
        assert!(store.find(&o).is_some());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn damaged_files_and_hostile_offers_are_refused() {
        let d = dir("b");
        let store = FileStore::new(d.join("store"));
        let content = vec![7u8; 1000];
        let o = offer("data", &content, Path::new("/nonexistent"));
        let incoming = store.receive(&[&o]).unwrap().pop().unwrap();
        incoming.write_at(0, &content[..999]).unwrap(); // the last byte stays zero
        let part = incoming.part.clone();
        let err = store.finish(incoming).unwrap_err();
        assert!(err.contains("arrived damaged"), "{err}");
        assert!(!part.exists(), "a damaged file is deleted");
        // A hash that would be a path, and more bytes than any disk has.
        let mut evil = o.clone();
        evil.sha256 = "../../etc/passwd".into();
        assert!(store.find(&evil).is_none());
        assert!(store
            .receive(&[&evil])
            .unwrap_err()
            .contains("invalid sha256"));
        let mut huge = o.clone();
        huge.size = u64::MAX / 2;
        assert!(store.receive(&[&huge]).unwrap_err().contains("MiB free"));
        // A failed migration's files are deleted with it.
        let incoming = store.receive(&[&o]).unwrap().pop().unwrap();
        let part = incoming.part.clone();
        assert!(part.exists());
        drop(incoming);
        assert!(!part.exists());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
