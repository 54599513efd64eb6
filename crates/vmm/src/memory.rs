//! Guest RAM and its dirty tracking.
//!
//! A page is dirty when the guest wrote it (KVM's dirty log) or when the VMM or a device
//! wrote it through the [`GuestRam`] API (vm-memory's [`AtomicBitmap`]). The migration
//! engine needs the union of both: a page written by a device DMA and missed here would
//! silently differ on the destination.

use ferry_abi::PAGE_SIZE;
pub use ferry_migrate::PageSet;
use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MmapRegion};

use crate::arch::layout::{MAX_RAM_SIZE, MIN_RAM_SIZE, RAM_ALIGN};

/// Guest RAM: one region from address 0, with a bitmap of pages the VMM wrote.
pub type GuestRam = GuestMemoryMmap<AtomicBitmap>;

/// KVM memory slot holding guest RAM.
const RAM_SLOT: u32 = 0;

/// Errors creating or registering guest RAM.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The requested size is out of range or misaligned.
    #[error(
        "guest RAM size {size} bytes is invalid: it must be a multiple of 2 MiB between {} MiB and {} GiB",
        MIN_RAM_SIZE >> 20,
        MAX_RAM_SIZE >> 30
    )]
    InvalidSize {
        /// The size asked for.
        size: u64,
    },
    /// The host could not map the memory.
    #[error("cannot map {size} bytes of guest RAM")]
    Map {
        /// The size asked for.
        size: u64,
        /// What the mapping reported.
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    /// KVM refused the memory slot.
    #[error("KVM refused the guest RAM slot")]
    SetSlot(#[source] kvm_ioctls::Error),
    /// KVM could not return the dirty log.
    #[error("KVM_GET_DIRTY_LOG failed")]
    GetDirtyLog(#[source] kvm_ioctls::Error),
}

/// Checks a guest RAM size against what the machine model supports.
pub fn validate_ram_size(size: u64) -> Result<(), MemoryError> {
    if (MIN_RAM_SIZE..=MAX_RAM_SIZE).contains(&size) && size.is_multiple_of(RAM_ALIGN) {
        Ok(())
    } else {
        Err(MemoryError::InvalidSize { size })
    }
}

/// Maps `size` bytes of anonymous guest RAM (pages are allocated on first touch).
pub fn create_guest_ram(size: u64) -> Result<GuestRam, MemoryError> {
    validate_ram_size(size)?;
    GuestRam::from_ranges(&[(GuestAddress(0), size as usize)])
        .map_err(|source| MemoryError::Map { size, source })
}

/// Bytes of guest RAM.
pub fn ram_size(mem: &GuestRam) -> u64 {
    mem.iter().map(|r| r.len()).sum()
}

/// Registers guest RAM with KVM as slot 0, with or without dirty logging.
pub fn register_ram(vm: &VmFd, mem: &GuestRam, log_dirty: bool) -> Result<(), MemoryError> {
    let region = mem.iter().next().expect("guest RAM has one region");
    let host_addr = mem
        .get_host_address(GuestAddress(0))
        .expect("address 0 is inside guest RAM");
    let slot = kvm_userspace_memory_region {
        slot: RAM_SLOT,
        flags: if log_dirty {
            KVM_MEM_LOG_DIRTY_PAGES
        } else {
            0
        },
        guest_phys_addr: 0,
        memory_size: region.len(),
        userspace_addr: host_addr as u64,
    };
    // SAFETY: the mapping behind `host_addr` is owned by `mem`, which every Microvm keeps
    // alive for as long as its VmFd exists, and is `memory_size` bytes long.
    unsafe { vm.set_user_memory_region(slot) }.map_err(MemoryError::SetSlot)
}

/// The bitmap of pages written through the [`GuestRam`] API (by the VMM or devices).
fn vmm_write_bitmap(mem: &GuestRam) -> &AtomicBitmap {
    let region: &MmapRegion<AtomicBitmap> = mem.iter().next().expect("guest RAM has one region");
    region.bitmap()
}

/// Pages of guest RAM the host has ever backed (in memory or swapped out). The others
/// were never touched, by the guest or the VMM, and read as zero: a migration's first
/// round reads only these rather than faulting in every page of a mostly empty RAM.
pub fn populated_pages(mem: &GuestRam) -> std::io::Result<PageSet> {
    use std::os::unix::fs::FileExt;
    // /proc/self/pagemap: one little-endian u64 per virtual page of this process.
    const PRESENT: u64 = 1 << 63;
    const SWAPPED: u64 = 1 << 62;
    const ENTRIES_PER_READ: u64 = 64 << 10;
    let region = mem.iter().next().expect("guest RAM has one region");
    let first_page = region.as_ptr() as u64 / PAGE_SIZE;
    let mut set = PageSet::empty(ram_size(mem) / PAGE_SIZE);
    let pagemap = std::fs::File::open("/proc/self/pagemap")?;
    let mut raw = vec![0u8; (ENTRIES_PER_READ * 8) as usize];
    let mut page = 0;
    while page < set.span() {
        let n = (set.span() - page).min(ENTRIES_PER_READ);
        let bytes = &mut raw[..(n * 8) as usize];
        pagemap.read_exact_at(bytes, (first_page + page) * 8)?;
        for (i, entry) in bytes.chunks_exact(8).enumerate() {
            let entry = u64::from_le_bytes(entry.try_into().expect("8 bytes"));
            if entry & (PRESENT | SWAPPED) != 0 {
                set.insert(page + i as u64);
            }
        }
        page += n;
    }
    Ok(set)
}

/// Dirty-page tracking over guest RAM: KVM's log of guest writes plus the bitmap of
/// VMM/device writes, taken and cleared together.
pub struct DirtyLog<'a> {
    vm: &'a VmFd,
    mem: &'a GuestRam,
}

impl<'a> DirtyLog<'a> {
    /// Tracking over `mem`, registered with `vm`.
    pub fn new(vm: &'a VmFd, mem: &'a GuestRam) -> Self {
        Self { vm, mem }
    }

    /// Starts logging; the first [`Self::take`] reports writes from now on.
    pub fn start(&self) -> Result<(), MemoryError> {
        register_ram(self.vm, self.mem, true)?;
        self.take_vmm_writes();
        Ok(())
    }

    /// Stops logging (guest writes run at full speed again).
    pub fn stop(&self) -> Result<(), MemoryError> {
        register_ram(self.vm, self.mem, false)
    }

    /// The pages written since the last take (or since [`Self::start`]), and clears them.
    pub fn take(&self) -> Result<PageSet, MemoryError> {
        let size = ram_size(self.mem);
        let guest = self
            .vm
            .get_dirty_log(RAM_SLOT, size as usize)
            .map_err(MemoryError::GetDirtyLog)?;
        let mut dirty = PageSet::from_words(guest, size / PAGE_SIZE);
        dirty.union_with(&self.take_vmm_writes());
        Ok(dirty)
    }

    fn take_vmm_writes(&self) -> PageSet {
        let size = ram_size(self.mem);
        let words = vmm_write_bitmap(self.mem).get_and_reset();
        PageSet::from_words(words, size / PAGE_SIZE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn populated_pages_are_those_touched() {
        let mem = create_guest_ram(MIN_RAM_SIZE).unwrap();
        let untouched = populated_pages(&mem).unwrap();
        assert!(untouched.count() < 8, "fresh RAM is (almost) all unbacked");
        mem.write_obj(7u64, GuestAddress(5 * PAGE_SIZE + 8))
            .unwrap();
        let mut buf = [0u8; 4];
        mem.read_slice(&mut buf, GuestAddress(9 * PAGE_SIZE))
            .unwrap();
        let touched = populated_pages(&mem).unwrap();
        assert!(
            touched.contains_addr(5 * PAGE_SIZE),
            "a written page is populated"
        );
        assert!(
            touched.contains_addr(9 * PAGE_SIZE),
            "so is one read (the zero page)"
        );
        assert!(
            !touched.contains_addr(MIN_RAM_SIZE - PAGE_SIZE),
            "the rest is not"
        );
    }

    #[test]
    fn ram_size_is_validated() {
        assert!(validate_ram_size(64 << 20).is_ok());
        assert!(validate_ram_size((64 << 20) + 4096).is_err());
        assert!(validate_ram_size(2 << 20).is_err());
        assert!(validate_ram_size(MAX_RAM_SIZE + RAM_ALIGN).is_err());
    }

    #[test]
    fn dirty_pages_set_operations() {
        let mut a = PageSet::empty((1 << 20) / PAGE_SIZE);
        assert!(a.is_empty());
        let mut words = vec![0u64; 4];
        words[0] = 0b1010;
        words[3] = 1 << 63;
        let b = PageSet::from_words(words, 256);
        a.union_with(&b);
        assert_eq!(a.pages().collect::<Vec<_>>(), vec![1, 3, 255]);
        assert!(a.contains_addr(3 * PAGE_SIZE + 17));
        assert!(!a.contains_addr(2 * PAGE_SIZE));
        assert!(!a.contains_addr(1 << 40));
        assert_eq!(PageSet::all(100).count(), 100);
    }

    #[test]
    fn vmm_writes_are_tracked_through_the_bitmap() {
        let mem = create_guest_ram(16 << 20).unwrap();
        vmm_write_bitmap(&mem).get_and_reset();
        mem.write_obj(7u64, GuestAddress(5 * PAGE_SIZE + 8))
            .unwrap();
        let words = vmm_write_bitmap(&mem).get_and_reset();
        let set = PageSet::from_words(words, (16 << 20) / PAGE_SIZE);
        assert_eq!(set.pages().collect::<Vec<_>>(), vec![5]);
    }
}
