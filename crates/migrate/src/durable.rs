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
/// Temporaries that saves of `path` which died left behind are removed first.
pub fn create_temporary(path: &Path) -> io::Result<(PathBuf, File)> {
    static SAVES: AtomicU64 = AtomicU64::new(0);
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    remove_abandoned_temporaries(path, &name);
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

/// How long a temporary is left untouched before a save may take it for abandoned: a
/// save in progress writes to its temporary all along.
const ABANDONED_AFTER: std::time::Duration = std::time::Duration::from_secs(600);

/// Removes the temporaries of saves of `path` (named `name`) that a process which died
/// mid-save left behind (a snapshot's holds the guest's memory: gigabytes each): files
/// of this user whose process is gone and which nothing wrote for [`ABANDONED_AFTER`].
/// Best effort: what cannot be read or removed stays.
fn remove_abandoned_temporaries(path: &Path, name: &str) {
    let folder = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let Ok(entries) = std::fs::read_dir(folder) else {
        return;
    };
    let prefix = format!(".{name}.");
    let me = std::process::id();
    // SAFETY: getuid cannot fail.
    let uid = unsafe { libc::getuid() };
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(pid) = file_name
            .to_str()
            .and_then(|n| n.strip_prefix(&prefix))
            .and_then(|rest| rest.strip_suffix(".partial"))
            .and_then(|rest| rest.split_once('.'))
            .filter(|(_, save)| save.parse::<u64>().is_ok())
            .and_then(|(pid, _)| pid.parse::<i32>().ok())
            .filter(|&pid| pid > 0 && pid as u32 != me)
        else {
            continue;
        };
        // Not followed: a link, or another user's file, is not ours to remove.
        let Ok(meta) = std::fs::symlink_metadata(entry.path()) else {
            continue;
        };
        use std::os::unix::fs::MetadataExt;
        let quiet = meta
            .modified()
            .ok()
            .and_then(|m| m.elapsed().ok())
            .is_some_and(|idle| idle >= ABANDONED_AFTER);
        // SAFETY: signal 0 only asks whether the process exists.
        let gone = unsafe { libc::kill(pid, 0) } == -1
            && io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
        if meta.is_file() && meta.uid() == uid && quiet && gone {
            match std::fs::remove_file(entry.path()) {
                Ok(()) => tracing::info!(
                    "removed {}: a save that process {pid} left unfinished",
                    entry.path().display()
                ),
                Err(e) => tracing::debug!("cannot remove {}: {e}", entry.path().display()),
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_save_removes_only_the_quiet_temporaries_of_dead_saves_of_its_own_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.snap");
        // A process that has ended: its pid names no process now.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let long_ago = std::time::SystemTime::now() - ABANDONED_AFTER * 2;
        let leftover = |name: String, old: bool| {
            let at = dir.path().join(name);
            let file = File::create(&at).unwrap();
            if old {
                file.set_modified(long_ago).unwrap();
            }
            at
        };
        let abandoned = leftover(format!(".vm.snap.{dead}.3.partial"), true);
        let recent = leftover(format!(".vm.snap.{dead}.4.partial"), false);
        let alive = leftover(
            format!(".vm.snap.{}.5.partial", std::os::unix::process::parent_id()),
            true,
        );
        let other_path = leftover(format!(".other.snap.{dead}.6.partial"), true);
        let not_a_save = leftover(format!(".vm.snap.{dead}.x.partial"), true);
        let link = dir.path().join(format!(".vm.snap.{dead}.7.partial"));
        std::os::unix::fs::symlink(&abandoned, &link).unwrap();

        replace(&path, b"state").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"state");
        assert!(
            !abandoned.exists(),
            "the dead save's quiet temporary is left"
        );
        for kept in [&recent, &alive, &other_path, &not_a_save] {
            assert!(kept.exists(), "{} was removed", kept.display());
        }
        assert!(
            std::fs::symlink_metadata(&link).is_ok(),
            "the link was removed"
        );
    }
}
