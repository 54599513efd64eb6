//! Loading a guest ELF image, after checking it fits the machine model.
//!
//! linux-loader does the loading; it checks the header but not where segments go, so the
//! program headers are checked here first: every byte the image asks for must lie between
//! `abi::IMAGE_BASE` and the top of the heap, and the entry must be in an executable
//! segment. An image that fails a check is refused before anything is written.

use std::io::Cursor;

use ferry_abi::{IMAGE_BASE, PAGE_SIZE};
use linux_loader::elf::{
    Elf64_Ehdr, Elf64_Phdr, EM_X86_64, ET_EXEC, PF_X, PT_DYNAMIC, PT_INTERP, PT_LOAD,
};
use linux_loader::loader::{Elf, KernelLoader};
use vm_memory::{ByteValued, GuestAddress};

use crate::memory::GuestRam;

/// Errors loading a guest image.
#[derive(Debug, thiserror::Error)]
pub enum LoadImageError {
    /// Shorter than its headers say.
    #[error("guest image is truncated ({len} bytes)")]
    Truncated {
        /// Bytes in the image.
        len: usize,
    },
    /// Not a little-endian 64-bit x86-64 static executable.
    #[error("guest image is not a 64-bit x86-64 static ELF executable: {reason}")]
    NotAnExecutable {
        /// The first check that failed.
        reason: &'static str,
    },
    /// A segment lies outside the guest's image area.
    #[error(
        "guest image segment at {addr:#x}..{end:#x} lies outside {IMAGE_BASE:#x}..{limit:#x} \
         (link guests at abi::IMAGE_BASE and keep them below the heap)"
    )]
    SegmentOutOfRange {
        /// Segment start.
        addr: u64,
        /// Segment end.
        end: u64,
        /// Highest address an image may use in this VM.
        limit: u64,
    },
    /// The entry point is not inside an executable segment.
    #[error("guest image entry point {entry:#x} is not in an executable segment")]
    BadEntry {
        /// The entry point.
        entry: u64,
    },
    /// linux-loader refused the image or could not write it.
    #[error("loading the guest image failed")]
    Load(#[source] linux_loader::loader::Error),
}

/// Where an image landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadedImage {
    /// Entry point.
    pub entry: u64,
    /// First page-aligned address after the image (the heap starts here).
    pub end: u64,
}

/// Reads a header at `offset`, refusing to read past the end of `image`.
fn read<T: ByteValued + Default>(image: &[u8], offset: u64) -> Result<T, LoadImageError> {
    let bytes = usize::try_from(offset)
        .ok()
        .and_then(|start| image.get(start..start.checked_add(std::mem::size_of::<T>())?))
        .ok_or(LoadImageError::Truncated { len: image.len() })?;
    let mut value = T::default();
    value.as_mut_slice().copy_from_slice(bytes);
    Ok(value)
}

/// Checks `image` and returns its entry and end without writing anything.
/// `limit` is the highest address the image may occupy.
pub fn check_image(image: &[u8], limit: u64) -> Result<LoadedImage, LoadImageError> {
    let not_exec = |reason| LoadImageError::NotAnExecutable { reason };
    let ehdr: Elf64_Ehdr = read(image, 0)?;
    if ehdr.e_ident[..4] != *b"\x7fELF" {
        return Err(not_exec("no ELF magic"));
    }
    if ehdr.e_ident[4] != 2 || ehdr.e_ident[5] != 1 {
        return Err(not_exec("not 64-bit little endian"));
    }
    if ehdr.e_machine != EM_X86_64 {
        return Err(not_exec("not x86-64"));
    }
    if ehdr.e_type != ET_EXEC {
        return Err(not_exec("not ET_EXEC (link with -static -no-pie)"));
    }
    if usize::from(ehdr.e_phentsize) != std::mem::size_of::<Elf64_Phdr>() || ehdr.e_phnum == 0 {
        return Err(not_exec("bad program header table"));
    }

    let mut end = IMAGE_BASE;
    let mut entry_ok = false;
    for i in 0..u64::from(ehdr.e_phnum) {
        let phdr: Elf64_Phdr = read(image, ehdr.e_phoff.saturating_add(i * 56))?;
        if phdr.p_type == PT_INTERP || phdr.p_type == PT_DYNAMIC {
            return Err(not_exec("dynamically linked (link with -static)"));
        }
        // An empty segment is skipped, but only if the loader would write nothing of it
        // either: it copies `p_filesz` bytes to `p_paddr` whatever `p_memsz` says.
        if phdr.p_type != PT_LOAD || (phdr.p_memsz == 0 && phdr.p_filesz == 0) {
            continue;
        }
        let file_end = phdr.p_offset.checked_add(phdr.p_filesz);
        if phdr.p_filesz > phdr.p_memsz || file_end.is_none_or(|e| e > image.len() as u64) {
            return Err(LoadImageError::Truncated { len: image.len() });
        }
        let seg_end = phdr.p_paddr.saturating_add(phdr.p_memsz);
        if phdr.p_paddr < IMAGE_BASE || seg_end > limit || phdr.p_vaddr != phdr.p_paddr {
            return Err(LoadImageError::SegmentOutOfRange {
                addr: phdr.p_paddr,
                end: seg_end,
                limit,
            });
        }
        if phdr.p_flags & PF_X != 0 && (phdr.p_paddr..seg_end).contains(&ehdr.e_entry) {
            entry_ok = true;
        }
        end = end.max(seg_end);
    }
    if !entry_ok {
        return Err(LoadImageError::BadEntry {
            entry: ehdr.e_entry,
        });
    }
    Ok(LoadedImage {
        entry: ehdr.e_entry,
        end: end.next_multiple_of(PAGE_SIZE),
    })
}

/// Checks `image` and writes its segments into guest RAM.
pub fn load_image(mem: &GuestRam, image: &[u8], limit: u64) -> Result<LoadedImage, LoadImageError> {
    let loaded = check_image(image, limit)?;
    Elf::load(
        mem,
        None,
        &mut Cursor::new(image),
        Some(GuestAddress(IMAGE_BASE)),
    )
    .map_err(LoadImageError::Load)?;
    Ok(loaded)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_refused() {
        assert!(matches!(
            check_image(b"", 1 << 30),
            Err(LoadImageError::Truncated { .. })
        ));
        let mut not_elf = vec![0u8; 4096];
        not_elf[..4].copy_from_slice(b"MZ\0\0");
        assert!(matches!(
            check_image(&not_elf, 1 << 30),
            Err(LoadImageError::NotAnExecutable { .. })
        ));
    }

    #[test]
    fn sample_images_pass_and_misplaced_segments_fail() {
        for image in ferry_guest_images::all() {
            let loaded = check_image(image.elf, 1 << 30).unwrap();
            assert!(
                loaded.entry >= IMAGE_BASE && loaded.end > loaded.entry,
                "{}",
                image.name
            );
            // Too little room for the image: refused, not truncated silently.
            assert!(matches!(
                check_image(image.elf, IMAGE_BASE + PAGE_SIZE),
                Err(LoadImageError::SegmentOutOfRange { .. })
            ));
        }
    }

    /// A copy of the hello image with its first program header passed through `patch`.
    fn patched_hello(patch: impl Fn(&mut [u8])) -> Vec<u8> {
        patched_header(0, patch)
    }

    /// A copy of the hello image with program header `i` passed through `patch`.
    fn patched_header(i: usize, patch: impl Fn(&mut [u8])) -> Vec<u8> {
        let mut elf = ferry_guest_images::find("hello").unwrap().elf.to_vec();
        let phoff = u64::from_le_bytes(elf[32..40].try_into().unwrap()) as usize + i * 56;
        patch(&mut elf[phoff..phoff + 56]);
        elf
    }

    #[test]
    fn dynamic_and_inconsistent_images_are_refused() {
        let dynamic = patched_hello(|ph| ph[..4].copy_from_slice(&PT_INTERP.to_le_bytes()));
        let err = check_image(&dynamic, 1 << 30).unwrap_err();
        assert!(err.to_string().contains("dynamically linked"), "{err}");

        // First PT_LOAD claims file bytes beyond the end of the image.
        let past_end = patched_hello(|ph| ph[8..16].copy_from_slice(&(1u64 << 40).to_le_bytes()));
        assert!(matches!(
            check_image(&past_end, 1 << 30),
            Err(LoadImageError::Truncated { .. })
        ));

        // First PT_LOAD moved into the VMM's system pages.
        let low = patched_hello(|ph| {
            ph[16..24].copy_from_slice(&0x1000u64.to_le_bytes());
            ph[24..32].copy_from_slice(&0x1000u64.to_le_bytes());
        });
        assert!(matches!(
            check_image(&low, 1 << 30),
            Err(LoadImageError::SegmentOutOfRange { .. })
        ));

        // The data segment (the third) moved there with no memory size but its file
        // bytes, which the loader would still copy.
        let empty_low = patched_header(2, |ph| {
            ph[16..24].copy_from_slice(&0x1000u64.to_le_bytes());
            ph[24..32].copy_from_slice(&0x1000u64.to_le_bytes());
            ph[40..48].copy_from_slice(&0u64.to_le_bytes());
        });
        assert!(check_image(&empty_low, 1 << 30).is_err());
    }
}
