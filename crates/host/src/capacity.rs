//! What a host has promised: VM memory (RAM + accelerator) and accelerator memory,
//! reserved before a VM is created or received and given back when it ends or leaves.
//!
//! A [`Reservation`] is taken under the ledger's lock, so two concurrent creations or
//! incoming migrations can never both fit into room there is only for one; dropping it
//! gives the room back, so no error path can leak it.

use std::sync::{Arc, Mutex, MutexGuard};

/// Amounts of the two kinds of memory a host hands out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Amount {
    /// VM memory: guest RAM plus accelerator memory, bytes.
    pub memory: u64,
    /// Accelerator memory, bytes (also counted in `memory`).
    pub accel: u64,
}

impl Amount {
    /// What a VM of `ram` bytes of RAM and `accel` bytes of accelerator memory needs.
    pub fn for_vm(ram: u64, accel: u64) -> Self {
        Self {
            memory: ram.saturating_add(accel),
            accel,
        }
    }
}

/// Why a reservation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReserveError {
    /// Not enough accelerator memory left.
    #[error("not enough accelerator memory: the VM needs {} MiB, {} MiB of {} MiB are free", .wanted >> 20, .free >> 20, .capacity >> 20)]
    Accel {
        /// Bytes asked for.
        wanted: u64,
        /// Bytes free.
        free: u64,
        /// Bytes in all.
        capacity: u64,
    },
    /// Not enough VM memory left.
    #[error("not enough memory: the VM needs {} MiB, {} MiB of {} MiB are free", .wanted >> 20, .free >> 20, .capacity >> 20)]
    Memory {
        /// Bytes asked for.
        wanted: u64,
        /// Bytes free.
        free: u64,
        /// Bytes in all.
        capacity: u64,
    },
}

struct Books {
    capacity: Amount,
    held: Amount,
}

/// A host's capacity and what is reserved of it.
#[derive(Clone)]
pub struct Ledger(Arc<Mutex<Books>>);

impl Ledger {
    /// A ledger of `capacity` with nothing reserved.
    pub fn new(capacity: Amount) -> Self {
        Self(Arc::new(Mutex::new(Books {
            capacity,
            held: Amount::default(),
        })))
    }

    fn books(&self) -> MutexGuard<'_, Books> {
        // Every update is two plain additions or subtractions: whole even after a panic.
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Reserves `amount` if it fits in what is left.
    pub fn reserve(&self, amount: Amount) -> Result<Reservation, ReserveError> {
        let mut books = self.books();
        let (cap, held) = (books.capacity, books.held);
        if held.accel.saturating_add(amount.accel) > cap.accel {
            return Err(ReserveError::Accel {
                wanted: amount.accel,
                free: cap.accel.saturating_sub(held.accel),
                capacity: cap.accel,
            });
        }
        if held.memory.saturating_add(amount.memory) > cap.memory {
            return Err(ReserveError::Memory {
                wanted: amount.memory,
                free: cap.memory.saturating_sub(held.memory),
                capacity: cap.memory,
            });
        }
        books.held.memory += amount.memory;
        books.held.accel += amount.accel;
        Ok(Reservation {
            ledger: self.clone(),
            amount,
        })
    }

    /// What is reserved now.
    pub fn held(&self) -> Amount {
        self.books().held
    }

    /// The capacity.
    pub fn capacity(&self) -> Amount {
        self.books().capacity
    }
}

/// Room reserved in a [`Ledger`], given back when dropped.
pub struct Reservation {
    ledger: Ledger,
    amount: Amount,
}

impl Reservation {
    /// What it holds.
    pub fn amount(&self) -> Amount {
        self.amount
    }
}

impl std::fmt::Debug for Reservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Reservation({:?})", self.amount)
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut books = self.ledger.books();
        books.held.memory -= self.amount.memory;
        books.held.accel -= self.amount.accel;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn reservations_fit_the_capacity_and_come_back_when_dropped() {
        let ledger = Ledger::new(Amount {
            memory: 1024 * MIB,
            accel: 512 * MIB,
        });
        let a = ledger
            .reserve(Amount::for_vm(256 * MIB, 256 * MIB))
            .unwrap();
        let b = ledger
            .reserve(Amount::for_vm(256 * MIB, 256 * MIB))
            .unwrap();
        assert_eq!(ledger.held(), Amount::for_vm(512 * MIB, 512 * MIB));
        // The accelerator is full although VM memory is not.
        let refused = ledger.reserve(Amount::for_vm(64 * MIB, 4096)).unwrap_err();
        assert!(
            matches!(refused, ReserveError::Accel { free: 0, .. }),
            "{refused}"
        );
        // VM memory runs out too.
        let refused = ledger.reserve(Amount::for_vm(64 * MIB, 0)).unwrap_err();
        assert!(
            matches!(refused, ReserveError::Memory { free: 0, .. }),
            "{refused}"
        );
        drop(a);
        assert_eq!(ledger.held(), Amount::for_vm(256 * MIB, 256 * MIB));
        let c = ledger
            .reserve(Amount::for_vm(256 * MIB, 256 * MIB))
            .unwrap();
        drop((b, c));
        assert_eq!(ledger.held(), Amount::default());
    }

    #[test]
    fn concurrent_reservations_never_overcommit() {
        // Sixteen threads race for room for ten VMs: exactly ten win.
        let ledger = Ledger::new(Amount {
            memory: 10 * 64 * MIB,
            accel: 0,
        });
        let barrier = std::sync::Barrier::new(16);
        let won: Vec<Option<Reservation>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..16)
                .map(|_| {
                    scope.spawn(|| {
                        barrier.wait();
                        ledger.reserve(Amount::for_vm(64 * MIB, 0)).ok()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(won.iter().flatten().count(), 10);
        assert_eq!(ledger.held().memory, 10 * 64 * MIB);
        drop(won);
        assert_eq!(ledger.held().memory, 0);
    }
}
