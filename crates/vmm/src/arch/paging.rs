//! The identity map the VMM builds for the guest: 2 MiB pages everywhere except the first
//! 2 MiB, which use 4 KiB pages so the null page and the VMM's system pages can be
//! protected individually.

use ferry_abi::PAGE_SIZE;

use super::layout::{
    low_page_access, LowPageAccess, LOW_PT_ADDR, PDPT_ADDR, PD_BASE_ADDR, PML4_ADDR,
};

const PRESENT: u64 = 1 << 0;
const WRITABLE: u64 = 1 << 1;
const USER: u64 = 1 << 2;
const HUGE: u64 = 1 << 7;
const TWO_MIB: u64 = 2 << 20;
const ENTRIES: usize = 512;

/// One page-table page to be written at `addr`.
pub struct TablePage {
    /// Guest-physical address of the page.
    pub addr: u64,
    /// Its 512 entries.
    pub entries: Box<[u64; ENTRIES]>,
}

impl TablePage {
    fn new(addr: u64) -> Self {
        Self {
            addr,
            entries: Box::new([0; ENTRIES]),
        }
    }

    /// The page as little-endian bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.entries.iter().flat_map(|e| e.to_le_bytes()).collect()
    }
}

/// Builds the page tables identity-mapping `ram_size` bytes (a multiple of 2 MiB).
///
/// Table entries above the leaves carry USER|WRITABLE so the leaf alone decides access.
pub fn identity_map(ram_size: u64) -> Vec<TablePage> {
    let gibs = ram_size.div_ceil(1 << 30) as usize;
    let mut pml4 = TablePage::new(PML4_ADDR);
    let mut pdpt = TablePage::new(PDPT_ADDR);
    let mut low_pt = TablePage::new(LOW_PT_ADDR);
    pml4.entries[0] = PDPT_ADDR | PRESENT | WRITABLE | USER;

    let mut pages = Vec::with_capacity(gibs + 3);
    for gib in 0..gibs {
        let pd_addr = PD_BASE_ADDR + gib as u64 * PAGE_SIZE;
        pdpt.entries[gib] = pd_addr | PRESENT | WRITABLE | USER;
        let mut pd = TablePage::new(pd_addr);
        for (i, entry) in pd.entries.iter_mut().enumerate() {
            let addr = ((gib * ENTRIES + i) as u64) * TWO_MIB;
            if addr >= ram_size {
                break;
            }
            *entry = if addr == 0 {
                LOW_PT_ADDR | PRESENT | WRITABLE | USER
            } else {
                addr | PRESENT | WRITABLE | USER | HUGE
            };
        }
        pages.push(pd);
    }
    for (i, entry) in low_pt.entries.iter_mut().enumerate() {
        let addr = i as u64 * PAGE_SIZE;
        *entry = match low_page_access(addr) {
            LowPageAccess::None => 0,
            LowPageAccess::Supervisor => addr | PRESENT | WRITABLE,
            LowPageAccess::UserReadOnly => addr | PRESENT | USER,
            LowPageAccess::UserReadWrite => addr | PRESENT | WRITABLE | USER,
        };
    }
    pages.extend([pml4, pdpt, low_pt]);
    pages
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Walks the tables like the MMU would; returns the leaf entry for `addr`.
    fn walk(pages: &[TablePage], addr: u64) -> Option<u64> {
        let table = |a: u64| {
            pages
                .iter()
                .find(|p| p.addr == a & !0xfff & ((1 << 52) - 1))
        };
        let pml4e = table(PML4_ADDR)?.entries[(addr >> 39) as usize & 511];
        if pml4e & PRESENT == 0 {
            return None;
        }
        let pdpte = table(pml4e)?.entries[(addr >> 30) as usize & 511];
        if pdpte & PRESENT == 0 {
            return None;
        }
        let pde = table(pdpte)?.entries[(addr >> 21) as usize & 511];
        if pde & PRESENT == 0 {
            return None;
        }
        if pde & HUGE != 0 {
            return Some(pde);
        }
        let pte = table(pde)?.entries[(addr >> 12) as usize & 511];
        (pte & PRESENT != 0).then_some(pte)
    }

    #[test]
    fn maps_ram_and_nothing_else() {
        let ram = 3 << 30;
        let pages = identity_map(ram);
        for addr in [0x10_0000, 0x20_0000, (1 << 30) + 0x1234, ram - 1] {
            let leaf = walk(&pages, addr).unwrap();
            assert_eq!(leaf & USER, USER, "{addr:#x} must be user accessible");
            let frame = if leaf & HUGE != 0 {
                leaf & !(TWO_MIB - 1)
            } else {
                leaf & !0xfff
            };
            assert_eq!(
                frame & ((1 << 52) - 1),
                addr & !(if leaf & HUGE != 0 { TWO_MIB - 1 } else { 0xfff })
            );
        }
        assert!(walk(&pages, ram).is_none());
        assert!(walk(&pages, 0).is_none(), "null page must fault");
    }

    #[test]
    fn system_pages_are_hidden_from_ring3() {
        let pages = identity_map(64 << 20);
        let pml4 = walk(&pages, PML4_ADDR).unwrap();
        assert_eq!(pml4 & USER, 0);
        let boot = walk(&pages, ferry_abi::BOOT_INFO_ADDR).unwrap();
        assert_eq!(boot & (USER | WRITABLE), USER);
    }
}
