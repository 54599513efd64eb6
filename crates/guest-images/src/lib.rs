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

/// The ELF for `workload`: a built-in name, or a path (anything with a `/` or naming a
/// file). The error names the built-in workloads.
pub fn resolve(workload: &str) -> Result<std::borrow::Cow<'static, [u8]>, String> {
    if let Some(image) = find(workload) {
        return Ok(std::borrow::Cow::Borrowed(image.elf));
    }
    let path = std::path::Path::new(workload);
    if workload.contains('/') || path.exists() {
        return std::fs::read(path)
            .map(std::borrow::Cow::Owned)
            .map_err(|e| format!("cannot read guest image {workload}: {e}"));
    }
    let names: Vec<&str> = ALL
        .iter()
        .filter(|i| !i.test_only)
        .map(|i| i.name)
        .collect();
    Err(format!(
        "no workload named '{workload}' (built in: {}; or give a path to a guest ELF)",
        names.join(", ")
    ))
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
}
