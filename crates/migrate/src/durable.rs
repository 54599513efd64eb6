//! Files replaced whole and durably: written beside their place under a name of their
//! own, synced, renamed into place, and the folder synced, so a crash or a power loss
//! leaves the old file or the new one, never a mix.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Replaces the file at `path` with `bytes`, durably (see the module docs); on failure
/// the file is as it was and no temporary is left.
pub fn replace(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let (tmp, mut file) = create_temporary(path)?;
    let written = file
        .write_all(bytes)
        .and_then(|()| file.sync_all())
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    sync_folder_of(path)
}

/// Creates the temporary that a save of `path` writes, beside it, with a name no other save
/// uses (its process and a count), so saves of one path at once do not remove or rename
/// each other's. Made anew, readable by its owner only (a snapshot holds the guest's memory): a
/// file or link found at the name is never opened or followed, the next name is tried.
pub fn create_temporary(path: &Path) -> io::Result<(PathBuf, File)> {
    static SAVES: AtomicU64 = AtomicU64::new(0);
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let mut tries = 0;
    loop {
        let save = SAVES.fetch_add(1, Ordering::Relaxed);
        let tmp = path.with_file_name(format!(".{name}.{}.{save}.partial", std::process::id()));
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
        {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && tries < 64 => tries += 1,
            opened => return opened.map(|file| (tmp, file)),
        }
    }
}

/// Syncs the folder holding `path` (its entries: a file created or renamed there). A
/// file system that cannot sync a folder (some network and shared-folder ones say
/// EINVAL) has nothing better to offer: that is not a failure.
pub fn sync_folder_of(path: &Path) -> io::Result<()> {
    let folder = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    match File::open(folder)?.sync_all() {
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOTSUP)) => Ok(()),
        other => other,
    }
}
