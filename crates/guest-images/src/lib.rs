//! The Ferry guest programs, built from `guest/` by this crate's build script and
//! embedded in the binary as static ELF images.
//!
//! Samples are for users (`hello`, `memtouch`); `test_only` images exist for the
//! VMM's tests (faults, dirty-page tracking).

use std::fmt;

/// A guest image built from guest/workloads.
pub struct GuestImage {
    /// Name of the guest, as in `ferry run NAME`.
    pub name: &'static str,
    /// One line on what it does.
    pub summary: &'static str,
    /// The static ELF image, linked at `ferry_abi::IMAGE_BASE`.
    pub elf: &'static [u8],
    /// True for guests that exist for tests rather than for users.
    pub test_only: bool,
}

impl fmt::Debug for GuestImage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GuestImage")
            .field("name", &self.name)
            .field("summary", &self.summary)
            .field("elf_len", &self.elf.len())
            .field("test_only", &self.test_only)
            .finish()
    }
}

include!(concat!(env!("OUT_DIR"), "/images.rs"));

/// Every guest image.
pub fn all() -> &'static [GuestImage] {
    ALL
}

/// The guest image called `name`.
pub fn find(name: &str) -> Option<&'static GuestImage> {
    ALL.iter().find(|image| image.name == name)
}

/// The largest guest ELF read from a file (the built-in ones are under 1 MiB): a path
/// naming a device, a pipe or a model file is refused before it is read.
pub const MAX_IMAGE_BYTES: u64 = 64 << 20;

/// Why a workload has no guest image ([`resolve`]).
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// No built-in guest has the name, and it is no path.
    #[error(
        "no workload named '{workload}' (built in: {}; or give a path to a guest ELF)",
        user_images().join(", ")
    )]
    NotFound {
        /// The name asked for.
        workload: String,
    },
    /// The file named could not be read, or is no regular file of a guest image's size.
    #[error("cannot read guest image {}", path.display())]
    Read {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The names of the built-in guests for users (not the tests').
fn user_images() -> Vec<&'static str> {
    ALL.iter()
        .filter(|i| !i.test_only)
        .map(|i| i.name)
        .collect()
}

/// The ELF for `workload`: a built-in name, or a path (anything with a `/` or naming a
/// file) to a regular file of at most [`MAX_IMAGE_BYTES`]. The error names the built-in
/// workloads.
pub fn resolve(workload: &str) -> Result<std::borrow::Cow<'static, [u8]>, ImageError> {
    if let Some(image) = find(workload) {
        return Ok(std::borrow::Cow::Borrowed(image.elf));
    }
    let path = std::path::Path::new(workload);
    if workload.contains('/') || path.exists() {
        return read_file(path);
    }
    Err(not_found(workload))
}

/// The guest ELF in the file at `path`, read as [`resolve`] reads a path: a regular file
/// of at most [`MAX_IMAGE_BYTES`].
pub fn read_file(path: &std::path::Path) -> Result<std::borrow::Cow<'static, [u8]>, ImageError> {
    read_checked(path, |_| Ok(()))
        .map(std::borrow::Cow::Owned)
        .map_err(|source| ImageError::Read {
            path: path.to_owned(),
            source,
        })
}

/// Why `workload` names no guest: no built-in one has the name (the error names those
/// there are).
pub fn not_found(workload: &str) -> ImageError {
    ImageError::NotFound {
        workload: workload.to_string(),
    }
}

/// The guest ELF in the regular file at `path`, if it holds at most [`MAX_IMAGE_BYTES`]:
/// opened without blocking (a FIFO would wait for a writer) and checked on the open file,
/// and the read stops there whatever the file grew to since. `check` passes the open file
/// first: a caller that confines paths asks where it was opened, since a link swapped in
/// after the path was checked leads elsewhere.
pub fn read_checked(
    path: &std::path::Path,
    check: impl FnOnce(&std::fs::File) -> std::io::Result<()>,
) -> std::io::Result<Vec<u8>> {
    use std::io::{Error, ErrorKind, Read};
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    check(&file)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(Error::new(ErrorKind::InvalidInput, "not a regular file"));
    }
    let too_large = || {
        Error::new(
            ErrorKind::InvalidInput,
            format!("larger than {} MiB", MAX_IMAGE_BYTES >> 20),
        )
    };
    if meta.len() > MAX_IMAGE_BYTES {
        return Err(too_large());
    }
    let mut image = Vec::with_capacity(meta.len() as usize);
    file.take(MAX_IMAGE_BYTES + 1).read_to_end(&mut image)?;
    if image.len() as u64 > MAX_IMAGE_BYTES {
        return Err(too_large());
    }
    Ok(image)
}

#[cfg(test)]
mod tests {
    use super::*;

    // That every image is an executable the VMM accepts is checked by ferry-vmm's loader
    // tests, with the loader's own checks.

    #[test]
    fn images_are_found_by_name() {
        let names: Vec<_> = all().iter().map(|i| i.name).collect();
        assert_eq!(
            names,
            [
                "hello",
                "memtouch",
                "mlp-train",
                "llm-decode",
                "llm-chat",
                "llm-serve",
                "fmnist-train",
                "calibrate",
                "faults",
                "dirty-pages",
                "files",
                "channel-abuse"
            ]
        );
        assert!(!find("hello").unwrap().test_only);
        assert!(!find("memtouch").unwrap().test_only);
        assert!(!find("mlp-train").unwrap().test_only);
        assert!(!find("llm-decode").unwrap().test_only);
        assert!(find("faults").unwrap().test_only);
        assert!(find("dirty-pages").unwrap().test_only);
        assert!(find("files").unwrap().test_only);
        assert!(find("nope").is_none());
        assert!(all().iter().all(|i| i.elf.starts_with(b"\x7fELF")));
    }

    #[test]
    fn only_a_regular_file_of_a_guest_images_size_is_read() {
        let err = resolve("/dev/zero").unwrap_err();
        let ImageError::Read { source, .. } = &err else {
            panic!("{err:?}")
        };
        assert_eq!(source.to_string(), "not a regular file");
        let dir = std::env::temp_dir().join(format!("ferry-images-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let large = dir.join("large.elf");
        let file = std::fs::File::create(&large).unwrap();
        file.set_len(MAX_IMAGE_BYTES + 1).unwrap();
        let err = resolve(large.to_str().unwrap()).unwrap_err();
        let ImageError::Read { source, .. } = &err else {
            panic!("{err:?}")
        };
        assert_eq!(source.to_string(), "larger than 64 MiB");
        // A name that is no path names the built-in guests for users, not the tests'.
        let err = resolve("no-such-guest").unwrap_err().to_string();
        assert!(
            err.contains("'no-such-guest'") && err.contains("llm-chat"),
            "{err}"
        );
        assert!(!err.contains("channel-abuse"), "{err}");
        file.set_len(4096).unwrap();
        assert_eq!(resolve(large.to_str().unwrap()).unwrap().len(), 4096);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
