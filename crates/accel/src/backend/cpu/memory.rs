//! Host memory behind the `cpu` backend's device buffers.
//!
//! A GPU's memory is there before a buffer is allocated in it; host memory is not: the
//! kernel backs each page on first touch, with a fault and a zeroing. A migration's
//! destination writes gigabytes into fresh buffers, and under nested virtualization that
//! first touch runs slower than the link, so it, not the network, would set the pace.
//! [`DeviceMemory`] therefore keeps the memory of freed buffers (zeroed, still backed)
//! for the next ones, and can back memory ahead of time ([`DeviceMemory::prefault`]), as a
//! host does with its device's memory. What it keeps and what buffers use together stay
//! within a limit, the host's accelerator capacity: kept memory is given back before a new
//! mapping would pass it, so fragments cannot pile up beyond what a device would have.

use std::collections::BTreeMap;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// New regions are mapped in multiples of a transparent huge page; what a buffer does
/// not use of one is kept for the next.
#[cfg(not(miri))]
const GRANULE: usize = 2 << 20;
/// Miri interprets every byte a test zeroes or checks: its sizes are 32 times smaller.
#[cfg(miri)]
const GRANULE: usize = 64 << 10;
/// Buffers take whole pages of a region.
const PAGE: usize = 4 << 10;
/// Smaller buffers come from the heap, which recycles its memory itself.
const POOLED_MIN: usize = GRANULE / 16;

/// Host memory for device buffers, shared by the accelerators of one host.
///
/// The default keeps nothing: freed memory goes back to the operating system at once.
#[derive(Clone, Default)]
pub struct DeviceMemory {
    pool: Arc<Mutex<Pool>>,
}

impl std::fmt::Debug for DeviceMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let pool = self.pool();
        f.debug_struct("DeviceMemory")
            .field("kept", &pool.kept)
            .field("keep_limit", &pool.keep_limit)
            .finish()
    }
}

/// Zeroed regions not in use, by address.
#[derive(Default)]
struct Pool {
    free: BTreeMap<usize, Free>,
    /// Sum of the free lengths.
    kept: usize,
    /// Bytes of regions lent to live buffers.
    lent: usize,
    /// Most bytes kept and lent together: freed memory beyond it is unmapped, and kept
    /// memory is unmapped before a new mapping would pass it.
    keep_limit: usize,
}

/// A free region: its length (a multiple of [`PAGE`]) and the mapping it lies in.
///
/// A buffer's slice must lie in one allocation, so regions of different mappings are
/// never merged, even where the kernel placed them side by side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Free {
    len: usize,
    mapping: u64,
}

/// Identifies a new mapping. A counter rather than the base address, which the kernel
/// may hand out again once part of an older mapping is unmapped.
fn new_mapping_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

impl DeviceMemory {
    /// Memory that keeps freed buffers backed for reuse, as long as what buffers use and
    /// what is kept stay within `keep` bytes together.
    pub fn new(keep: u64) -> Self {
        let memory = Self::default();
        memory.pool().keep_limit = usize::try_from(keep).unwrap_or(usize::MAX);
        memory
    }

    /// Backs `bytes` (rounded up to 2 MiB) now, for buffers allocated later; raises the
    /// keep limit to cover it.
    pub fn prefault(&self, bytes: u64) -> std::io::Result<()> {
        let len = usize::try_from(bytes)
            .ok()
            .and_then(|b| b.checked_next_multiple_of(GRANULE))
            .ok_or_else(|| std::io::Error::other("prefault size too large"))?;
        if len == 0 {
            return Ok(());
        }
        let addr = map_region(len).ok_or_else(std::io::Error::last_os_error)?;
        if let Err(e) = populate(addr, len) {
            unmap(addr, len);
            return Err(e);
        }
        let mut pool = self.pool();
        pool.keep_limit = pool.keep_limit.max(pool.lent + pool.kept + len);
        pool.insert(addr, len, new_mapping_id());
        Ok(())
    }

    /// Gives every kept region back to the operating system; returns the bytes released.
    pub fn release_kept(&self) -> u64 {
        let released = self.pool().evict(0);
        unmap_all(&released)
    }

    /// Bytes of freed or prefaulted memory held backed and ready.
    pub fn kept_bytes(&self) -> u64 {
        self.pool().kept as u64
    }

    /// A zeroed buffer of `words` f32 words; `None` if the host has no memory for it.
    pub(crate) fn alloc(&self, words: usize) -> Option<DeviceBuffer> {
        let bytes = words.checked_mul(4)?;
        if bytes < POOLED_MIN {
            let boxed = bytemuck::allocation::try_zeroed_slice_box::<f32>(words).ok()?;
            return Some(DeviceBuffer(Storage::Heap(boxed)));
        }
        let len = bytes.checked_next_multiple_of(PAGE)?;
        let mapped = len.checked_next_multiple_of(GRANULE)?;
        let reused = self.pool().take(len, mapped);
        let (addr, mapping) = match reused {
            Ok(found) => found,
            Err(evicted) => {
                unmap_all(&evicted);
                let Some(addr) = map_region(mapped) else {
                    self.pool().lent -= len;
                    return None;
                };
                let mapping = new_mapping_id();
                if mapped > len {
                    // Fresh from the kernel: already zero.
                    self.keep(addr + len, mapped - len, mapping, false);
                }
                (addr, mapping)
            }
        };
        Some(DeviceBuffer(Storage::Region {
            addr,
            len,
            words,
            mapping,
            home: self.clone(),
        }))
    }

    fn pool(&self) -> MutexGuard<'_, Pool> {
        // Nothing panics partway through a pool update, so a poisoned lock still guards
        // a consistent pool.
        self.pool.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps a region of `mapping` for later buffers (zeroing it first if `used`: a
    /// buffer's, given back), or unmaps it when the keep limit is reached.
    fn keep(&self, addr: usize, len: usize, mapping: u64, used: bool) {
        let fits = {
            let mut pool = self.pool();
            if used {
                pool.lent -= len;
            }
            pool.lent + pool.kept + len <= pool.keep_limit
        };
        if !fits {
            unmap(addr, len);
            return;
        }
        if used {
            zero_region(addr, len);
        }
        self.pool().insert(addr, len, mapping);
    }
}

impl Pool {
    /// Lends `len` bytes: the smallest free region that fits, split if larger (its address
    /// and mapping), or else the kept regions to unmap first so that a new mapping of
    /// `mapped` bytes stays within the limit.
    fn take(&mut self, len: usize, mapped: usize) -> Result<(usize, u64), Vec<(usize, usize)>> {
        self.lent += len;
        let fitting = self
            .free
            .iter()
            .filter(|&(_, have)| have.len >= len)
            .min_by_key(|&(_, have)| have.len)
            .map(|(&addr, &have)| (addr, have));
        let Some((addr, have)) = fitting else {
            let room = self.keep_limit.saturating_sub(self.lent - len + mapped);
            return Err(self.evict(room));
        };
        self.free.remove(&addr);
        self.kept -= have.len;
        if have.len > len {
            let rest = Free {
                len: have.len - len,
                mapping: have.mapping,
            };
            self.free.insert(addr + len, rest);
            self.kept += rest.len;
        }
        Ok((addr, have.mapping))
    }

    /// Takes kept regions out, largest first, until at most `room` bytes are kept: the
    /// regions, for the caller to unmap once the lock is released.
    fn evict(&mut self, room: usize) -> Vec<(usize, usize)> {
        let mut evicted = Vec::new();
        while self.kept > room {
            let Some((&addr, &free)) = self.free.iter().max_by_key(|&(_, free)| free.len) else {
                break;
            };
            self.free.remove(&addr);
            self.kept -= free.len;
            evicted.push((addr, free.len));
        }
        evicted
    }

    /// Returns a region of `mapping`, merged with free neighbours of the same mapping so
    /// large buffers find room later.
    fn insert(&mut self, mut addr: usize, mut len: usize, mapping: u64) {
        self.kept += len;
        if let Some((&before, &prev)) = self.free.range(..addr).next_back() {
            if prev.mapping == mapping && before + prev.len == addr {
                self.free.remove(&before);
                addr = before;
                len += prev.len;
            }
        }
        if let Some(&next) = self.free.get(&(addr + len)) {
            if next.mapping == mapping {
                self.free.remove(&(addr + len));
                len += next.len;
            }
        }
        self.free.insert(addr, Free { len, mapping });
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        for (&addr, free) in &self.free {
            unmap(addr, free.len);
        }
    }
}

/// One device buffer's words.
pub(crate) struct DeviceBuffer(Storage);

enum Storage {
    Heap(Box<[f32]>),
    /// `words` f32 words at the start of a region of `len` bytes inside one mapping,
    /// which goes back to `home` when dropped.
    Region {
        addr: usize,
        len: usize,
        words: usize,
        mapping: u64,
        home: DeviceMemory,
    },
}

// SAFETY: a region is owned by exactly one `DeviceBuffer` (the pool hands it out once and
// takes it back only on drop), so moving the buffer between threads moves sole ownership
// of plain memory, like a `Box<[f32]>`.
unsafe impl Send for Storage {}
// SAFETY: shared references only give `&[f32]`, which is `Sync`.
unsafe impl Sync for Storage {}

impl Deref for DeviceBuffer {
    type Target = [f32];

    fn deref(&self) -> &[f32] {
        match &self.0 {
            Storage::Heap(boxed) => boxed,
            // SAFETY: the region lies inside one mapping (one allocation), is mapped
            // readable and writable, at least `words * 4` bytes long, page-aligned (so
            // f32-aligned), owned by this buffer alone, and stays mapped until the
            // buffer is dropped.
            Storage::Region { addr, words, .. } => unsafe {
                std::slice::from_raw_parts(*addr as *const f32, *words)
            },
        }
    }
}

impl DerefMut for DeviceBuffer {
    fn deref_mut(&mut self) -> &mut [f32] {
        match &mut self.0 {
            Storage::Heap(boxed) => boxed,
            // SAFETY: as for `deref`; `&mut self` makes this the only reference.
            Storage::Region { addr, words, .. } => unsafe {
                std::slice::from_raw_parts_mut(*addr as *mut f32, *words)
            },
        }
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        if let Storage::Region {
            addr,
            len,
            mapping,
            home,
            ..
        } = &self.0
        {
            home.keep(*addr, *len, *mapping, true);
        }
    }
}

// The only system calls of the module. Each works on a region this module mapped and
// owns exclusively at that moment.
#[cfg(not(miri))]
mod os {
    use super::{GRANULE, PAGE};

    /// A fresh mapping of `len` bytes of private anonymous read-write memory, with `flags`
    /// besides, at `addr` (0: where the kernel chooses); `None` if the kernel refuses.
    /// `flags` may not hold `MAP_FIXED`: it never replaces an existing mapping.
    pub(super) fn map_anonymous(addr: usize, len: usize, flags: libc::c_int) -> Option<usize> {
        assert_eq!(flags & libc::MAP_FIXED, 0, "MAP_FIXED replaces mappings");
        // SAFETY: without MAP_FIXED a new anonymous mapping touches no existing memory (the
        // kernel picks another address, or with MAP_FIXED_NOREPLACE fails).
        let raw = unsafe {
            libc::mmap(
                addr as *mut libc::c_void,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | flags,
                -1,
                0,
            )
        };
        (raw != libc::MAP_FAILED).then_some(raw as usize)
    }

    /// Maps `len` bytes (a multiple of [`GRANULE`]) of private anonymous memory aligned to
    /// [`GRANULE`], backed by huge pages where the kernel allows.
    pub(super) fn map_region(len: usize) -> Option<usize> {
        let over = len.checked_add(GRANULE)?;
        let start = map_anonymous(0, over, libc::MAP_NORESERVE)?;
        let addr = start.next_multiple_of(GRANULE);
        let head = addr - start;
        let tail = over - head - len;
        // SAFETY: the head and tail lie inside the mapping just made and outside the aligned
        // region returned; MADV_HUGEPAGE only changes how the region is backed (a failure,
        // THP off, leaves small pages).
        unsafe {
            if head > 0 {
                libc::munmap(start as *mut libc::c_void, head);
            }
            if tail > 0 {
                libc::munmap((addr + len) as *mut libc::c_void, tail);
            }
            libc::madvise(addr as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
        }
        Some(addr)
    }

    /// Backs every page of a region now.
    pub(super) fn populate(addr: usize, len: usize) -> std::io::Result<()> {
        // SAFETY: the region is mapped and ours; populating writes nothing visible (the pages
        // read as zero either way).
        let ok =
            unsafe { libc::madvise(addr as *mut libc::c_void, len, libc::MADV_POPULATE_WRITE) };
        if ok == 0 {
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EINVAL) {
            // Out of memory, say: a clear error rather than an OOM kill while touching.
            return Err(err);
        }
        // Kernels before 5.14 do not know MADV_POPULATE_WRITE: touch each page.
        for page in (addr..addr + len).step_by(PAGE) {
            // SAFETY: inside the region; writing zero over zero changes nothing.
            unsafe { std::ptr::write_volatile(page as *mut u8, 0) };
        }
        Ok(())
    }

    /// Makes a region read as zero again, keeping what is backed backed: resident pages are
    /// cleared, the rest (never touched, or swapped out) dropped so they fault in as zero.
    pub(super) fn zero_region(addr: usize, len: usize) {
        let mut resident = vec![0u8; len / PAGE];
        // SAFETY: the region is mapped and page-aligned; `resident` has a byte per page.
        let ok = unsafe { libc::mincore(addr as *mut libc::c_void, len, resident.as_mut_ptr()) };
        if ok != 0 {
            // Cannot tell: clear it all.
            // SAFETY: the region is mapped writable and owned by the caller.
            unsafe { std::ptr::write_bytes(addr as *mut u8, 0, len) };
            return;
        }
        let mut page = 0;
        while page < resident.len() {
            let is_resident = resident[page] & 1 == 1;
            let run = resident[page..]
                .iter()
                .take_while(|&&r| (r & 1 == 1) == is_resident)
                .count();
            let (start, bytes) = (addr + page * PAGE, run * PAGE);
            // SAFETY: [start, start + bytes) is inside the region, which is mapped writable
            // and owned by the caller; MADV_DONTNEED on private anonymous memory makes the
            // pages read as zero.
            unsafe {
                if is_resident {
                    std::ptr::write_bytes(start as *mut u8, 0, bytes);
                } else {
                    libc::madvise(start as *mut libc::c_void, bytes, libc::MADV_DONTNEED);
                }
            }
            page += run;
        }
    }

    pub(super) fn unmap(addr: usize, len: usize) {
        // SAFETY: the region was mapped by this module and nothing refers to it any more.
        unsafe { libc::munmap(addr as *mut libc::c_void, len) };
    }
}

// Miri runs no system calls: under it each mapping is one heap allocation, so Miri checks
// that every buffer's slice lies inside one mapping, that nothing is used once its whole
// mapping is unmapped, and that every mapping is unmapped in the end:
// `MIRIFLAGS=-Zmiri-permissive-provenance cargo +nightly miri test -p ferry-accel --lib
// backend::cpu::memory` (permissive: the pool keeps addresses as integers).
#[cfg(miri)]
mod os {
    use super::GRANULE;
    use std::alloc::Layout;
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    /// Each mapping's base, with its length and the bytes of it still mapped.
    static MAPPINGS: Mutex<BTreeMap<usize, (usize, usize)>> = Mutex::new(BTreeMap::new());

    /// Only where the "kernel" chooses: Miri cannot place an allocation.
    #[cfg(test)]
    pub(super) fn map_anonymous(addr: usize, len: usize, _flags: libc::c_int) -> Option<usize> {
        if addr != 0 {
            return None;
        }
        allocate(len, std::mem::align_of::<f32>())
    }

    pub(super) fn map_region(len: usize) -> Option<usize> {
        allocate(len, GRANULE)
    }

    fn allocate(len: usize, align: usize) -> Option<usize> {
        // Beyond what a test maps: refused, as the kernel refuses an address space's worth.
        if len == 0 || len > 1 << 30 {
            return None;
        }
        let layout = Layout::from_size_align(len, align).ok()?;
        // SAFETY: the layout has a nonzero size.
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        if raw.is_null() {
            return None;
        }
        let addr = raw.expose_provenance();
        MAPPINGS.lock().unwrap().insert(addr, (len, len));
        Some(addr)
    }

    pub(super) fn populate(_addr: usize, _len: usize) -> std::io::Result<()> {
        Ok(())
    }

    pub(super) fn zero_region(addr: usize, len: usize) {
        // SAFETY: the region is mapped writable and owned by the caller.
        unsafe { std::ptr::write_bytes(std::ptr::with_exposed_provenance_mut::<u8>(addr), 0, len) };
    }

    /// Frees a mapping once all of it is unmapped.
    pub(super) fn unmap(addr: usize, len: usize) {
        let mut mappings = MAPPINGS.lock().unwrap();
        let (&base, &mut (whole, ref mut mapped)) = mappings
            .range_mut(..=addr)
            .next_back()
            .filter(|(&base, &mut (whole, _))| addr + len <= base + whole)
            .expect("unmapping what was not mapped");
        *mapped -= len;
        if *mapped == 0 {
            mappings.remove(&base);
            let layout = Layout::from_size_align(whole, GRANULE).unwrap();
            // SAFETY: allocated by `allocate` with this size; every part is unmapped.
            unsafe { std::alloc::dealloc(std::ptr::with_exposed_provenance_mut(base), layout) };
        }
    }
}

use os::{map_region, populate, unmap, zero_region};

/// Unmaps regions taken out of a pool; returns their bytes.
fn unmap_all(regions: &[(usize, usize)]) -> u64 {
    regions
        .iter()
        .map(|&(addr, len)| {
            unmap(addr, len);
            len as u64
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::os::map_anonymous;
    use super::*;

    /// A MiB, scaled with [`GRANULE`] under Miri.
    const MIB: usize = GRANULE / 2;

    fn words(bytes: usize) -> usize {
        bytes / 4
    }

    #[test]
    fn small_buffers_come_from_the_heap_zeroed() {
        let memory = DeviceMemory::new(64 * MIB as u64);
        let mut b = memory.alloc(words(POOLED_MIN) - 1).unwrap();
        assert!(b.iter().all(|&w| w == 0.0));
        b[3] = 1.0;
        drop(b);
        assert_eq!(memory.kept_bytes(), 0, "heap buffers are not kept");
    }

    #[test]
    fn freed_memory_is_kept_zeroed_and_reused() {
        let memory = DeviceMemory::new(64 * MIB as u64);
        let mut b = memory.alloc(words(5 * MIB)).unwrap();
        assert_eq!(b.len(), words(5 * MIB));
        assert_eq!(
            memory.kept_bytes(),
            MIB as u64,
            "the rest of the 6 MiB mapped is kept"
        );
        let addr = b.as_ptr() as usize;
        b.iter_mut().step_by(1000).for_each(|w| *w = 7.0);
        drop(b);
        assert_eq!(memory.kept_bytes(), 6 * MIB as u64, "merged back whole");
        let again = memory.alloc(words(6 * MIB)).unwrap();
        assert_eq!(again.as_ptr() as usize, addr, "the kept region is reused");
        assert!(again.iter().all(|&w| w == 0.0), "and reads as zero");
        assert_eq!(memory.kept_bytes(), 0);
        // A buffer of a few pages takes just those pages.
        drop(again);
        let small = memory.alloc(words(POOLED_MIN)).unwrap();
        assert_eq!(small.as_ptr() as usize, addr);
        assert_eq!(memory.kept_bytes(), (6 * MIB - POOLED_MIN) as u64);
    }

    #[test]
    fn without_a_keep_limit_nothing_is_kept() {
        let memory = DeviceMemory::default();
        drop(memory.alloc(words(4 * MIB)).unwrap());
        assert_eq!(memory.kept_bytes(), 0);
    }

    #[test]
    fn the_keep_limit_bounds_what_is_kept() {
        let memory = DeviceMemory::new(4 * MIB as u64);
        let a = memory.alloc(words(4 * MIB)).unwrap();
        let b = memory.alloc(words(4 * MIB)).unwrap();
        assert_eq!(memory.kept_bytes(), 0);
        drop(a);
        drop(b);
        assert_eq!(memory.kept_bytes(), 4 * MIB as u64);
    }

    #[test]
    fn kept_memory_is_given_back_before_a_new_mapping_would_pass_the_limit() {
        let memory = DeviceMemory::new(8 * MIB as u64);
        drop(memory.alloc(words(3 * MIB)).unwrap());
        assert_eq!(
            memory.kept_bytes(),
            4 * MIB as u64,
            "a 4 MiB mapping, kept whole"
        );
        // 5 MiB does not fit in what is kept: a 6 MiB mapping beside the 4 kept would pass
        // the 8 MiB limit, so the kept mapping goes first.
        let big = memory.alloc(words(5 * MIB)).unwrap();
        assert_eq!(
            memory.kept_bytes(),
            MIB as u64,
            "only the new mapping's rest is kept"
        );
        assert!(big.iter().all(|&w| w == 0.0));
        // Lent and kept together stay within the limit as buffers come and go.
        let small = memory.alloc(words(2 * MIB)).unwrap();
        assert_eq!(
            memory.kept_bytes(),
            MIB as u64,
            "6 mapped + 2 new: the 1 kept stays"
        );
        drop(big);
        drop(small);
        assert_eq!(memory.kept_bytes(), 8 * MIB as u64);
        assert_eq!(memory.release_kept(), 8 * MIB as u64);
        assert_eq!(memory.kept_bytes(), 0, "all given back");
        let again = memory.alloc(words(MIB)).unwrap();
        assert!(again.iter().all(|&w| w == 0.0), "and the pool still lends");
    }

    #[test]
    fn prefaulted_memory_is_split_and_merged_back() {
        let memory = DeviceMemory::new(0);
        memory.prefault(10 * MIB as u64).unwrap();
        assert_eq!(memory.kept_bytes(), 10 * MIB as u64);
        let a = memory.alloc(words(4 * MIB)).unwrap();
        let b = memory.alloc(words(6 * MIB)).unwrap();
        assert_eq!(memory.kept_bytes(), 0);
        assert_eq!(
            b.as_ptr() as usize,
            a.as_ptr() as usize + 4 * MIB,
            "both come from the one prefaulted region"
        );
        drop(a);
        drop(b);
        // Merged again: one buffer of the whole size fits without a new mapping.
        let whole = memory.alloc(words(10 * MIB)).unwrap();
        assert_eq!(memory.kept_bytes(), 0);
        assert!(whole.iter().all(|&w| w == 0.0));
    }

    /// Maps `len` bytes at exactly `addr` by a mapping of its own; `false` if the
    /// address is taken (or the kernel does not honour `MAP_FIXED_NOREPLACE`).
    fn map_at(addr: usize, len: usize) -> bool {
        let Some(mapped) = map_anonymous(addr, len, libc::MAP_FIXED_NOREPLACE) else {
            return false;
        };
        if mapped != addr {
            unmap(mapped, len);
            return false;
        }
        true
    }

    /// Two separate mappings that lie side by side, each `GRANULE` long.
    fn adjacent_mappings() -> usize {
        for _ in 0..100 {
            let base = map_region(2 * GRANULE).unwrap();
            // Free the range, then map its halves separately; another test's mapping
            // may slip into the hole, hence the retries.
            unmap(base, 2 * GRANULE);
            if map_at(base, GRANULE) {
                if map_at(base + GRANULE, GRANULE) {
                    return base;
                }
                unmap(base, GRANULE);
            }
        }
        panic!("could not place two mappings side by side");
    }

    #[test]
    #[cfg_attr(miri, ignore = "Miri cannot place two mappings side by side")]
    fn regions_of_separate_mappings_are_not_merged() {
        let memory = DeviceMemory::new(64 * MIB as u64);
        let base = adjacent_mappings();
        {
            let mut pool = memory.pool();
            pool.insert(base, GRANULE, new_mapping_id());
            pool.insert(base + GRANULE, GRANULE, new_mapping_id());
            assert_eq!(pool.free.len(), 2, "kept apart though adjacent");
        }
        // A buffer spanning both would be a slice across two allocations.
        let big = memory.alloc(words(2 * GRANULE)).unwrap();
        let at = big.as_ptr() as usize;
        assert!(
            at + 2 * GRANULE <= base || at >= base + 2 * GRANULE,
            "a buffer larger than either mapping gets a fresh one"
        );
        assert!(big.iter().all(|&w| w == 0.0));
        assert_eq!(memory.kept_bytes(), 2 * GRANULE as u64);
        // Each still serves buffers that fit in it.
        let small = memory.alloc(words(GRANULE)).unwrap();
        assert!([base, base + GRANULE].contains(&(small.as_ptr() as usize)));
        assert_eq!(memory.kept_bytes(), GRANULE as u64);
        drop(small);
        assert_eq!(memory.pool().free.len(), 2, "still apart after reuse");
    }

    #[test]
    fn a_buffer_the_host_cannot_map_is_refused() {
        // 4 EiB: beyond any address space.
        assert!(DeviceMemory::default().alloc(1 << 60).is_none());
        assert!(DeviceMemory::default().alloc(usize::MAX / 2).is_none());
    }
}
