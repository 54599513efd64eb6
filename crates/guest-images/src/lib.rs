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

#[cfg(test)]
mod tests {
    use super::*;

    fn u16_at(b: &[u8], at: usize) -> u16 {
        u16::from_le_bytes(b[at..at + 2].try_into().unwrap())
    }
    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
    }

    const PT_LOAD: u32 = 1;
    const PT_DYNAMIC: u32 = 2;
    const PT_INTERP: u32 = 3;
    const PF_X: u32 = 1;

    /// What the VMM's loader relies on: a static x86-64 ET_EXEC at or above
    /// IMAGE_BASE, entry inside an executable PT_LOAD, nothing to relocate or interpret.
    #[test]
    fn every_image_is_a_static_x86_64_executable_at_image_base() {
        for image in all() {
            let (name, e) = (image.name, image.elf);
            assert!(e.len() >= 64, "{name}: too short for an ELF header");
            assert_eq!(&e[..4], b"\x7fELF", "{name}: ELF magic");
            assert_eq!(e[4], 2, "{name}: not ELFCLASS64");
            assert_eq!(e[5], 1, "{name}: not little endian");
            assert_eq!(u16_at(e, 16), 2, "{name}: not ET_EXEC");
            assert_eq!(u16_at(e, 18), 62, "{name}: not EM_X86_64");
            let entry = u64_at(e, 24);
            assert!(entry >= ferry_abi::IMAGE_BASE, "{name}: entry {entry:#x}");
            let (phoff, phentsize, phnum) = (
                u64_at(e, 32) as usize,
                usize::from(u16_at(e, 54)),
                usize::from(u16_at(e, 56)),
            );
            assert!(
                phentsize >= 56 && phoff + phnum * phentsize <= e.len(),
                "{name}: phdrs"
            );
            let mut loads = 0;
            let mut entry_is_code = false;
            for ph in (0..phnum).map(|i| &e[phoff + i * phentsize..]) {
                let (kind, flags, vaddr, memsz) =
                    (u32_at(ph, 0), u32_at(ph, 4), u64_at(ph, 16), u64_at(ph, 40));
                assert!(
                    kind != PT_INTERP && kind != PT_DYNAMIC,
                    "{name}: not static"
                );
                if kind == PT_LOAD {
                    loads += 1;
                    assert!(
                        vaddr >= ferry_abi::IMAGE_BASE,
                        "{name}: PT_LOAD at {vaddr:#x}"
                    );
                    entry_is_code |= flags & PF_X != 0 && (vaddr..vaddr + memsz).contains(&entry);
                }
            }
            assert!(loads >= 1, "{name}: no PT_LOAD");
            assert!(entry_is_code, "{name}: entry not in an executable PT_LOAD");
        }
    }

    #[test]
    fn images_are_found_by_name() {
        let names: Vec<_> = all().iter().map(|i| i.name).collect();
        assert_eq!(names, ["hello", "memtouch", "faults", "dirty-pages"]);
        assert!(!find("hello").unwrap().test_only);
        assert!(!find("memtouch").unwrap().test_only);
        assert!(find("faults").unwrap().test_only);
        assert!(find("dirty-pages").unwrap().test_only);
        assert!(find("nope").is_none());
    }
}
