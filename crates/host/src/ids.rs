//! VM ids, `NAME-vmN`: unique in the cluster for good. A VM keeps its id when it moves,
//! and the center and the gateway know VMs by it, so a host never gives an id twice,
//! not even after its daemon restarts (an evacuated host, restarted after its patch,
//! would otherwise name a new VM as one it moved away). The counter is reserved ahead in
//! blocks, in a file of the host's file store: each daemon's run starts where the ids
//! reserved by the one before it end.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The file, in a host's file store, that holds the first VM id its next run may give.
pub const VM_IDS: &str = "vm-ids";

/// Ids reserved at once: a write of the file every this many creates, at most.
const BLOCK: u64 = 1024;

/// Why the record of the VM ids given could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum IdRecordError {
    /// Reading or writing the file failed.
    #[error("cannot {what} the record of VM ids given, {}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file holds no count: it is not a record this host wrote.
    #[error("the record of VM ids given, {}, holds no count of ids ({found:?}); move it aside only if no VM this host created runs anywhere", path.display())]
    NotACount {
        /// The file.
        path: PathBuf,
        /// What it holds (its first bytes).
        found: String,
    },
}

/// The ids given so far and reserved.
struct Counter {
    /// The next id's number.
    next: u64,
    /// The first number not reserved: the next run starts there.
    reserved: u64,
}

/// A host's VM ids: the counter, and the file it is reserved in.
pub(crate) struct VmIds {
    path: PathBuf,
    counter: Mutex<Counter>,
    /// Held while the file is written (never the counter's lock), so that reservations
    /// are written in order.
    writing: Mutex<()>,
}

impl VmIds {
    /// The ids of a run of the host whose file store is `store`: from where the earlier
    /// run's reservation ends (1 for a new host), with a first block reserved.
    pub(crate) fn open(store: &Path) -> Result<Self, IdRecordError> {
        let path = store.join(VM_IDS);
        let first = match std::fs::read(&path) {
            Ok(bytes) => parse_count(&bytes).ok_or_else(|| IdRecordError::NotACount {
                path: path.clone(),
                found: String::from_utf8_lossy(&bytes[..bytes.len().min(40)]).into_owned(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 1,
            Err(source) => {
                return Err(IdRecordError::Io {
                    what: "read",
                    path,
                    source,
                })
            }
        };
        let ids = Self {
            path,
            counter: Mutex::new(Counter {
                next: first,
                reserved: first,
            }),
            writing: Mutex::default(),
        };
        ids.try_reserve_ahead()?;
        Ok(ids)
    }

    /// Reserves the next block once half of the reserved ids are given: called before
    /// an id is taken, outside other locks (it may write the file). A write that fails
    /// (a full disk) is logged, not the create's failure: past the reserved ids,
    /// [`Self::fresh`] gives ids no later run gives.
    pub(crate) fn reserve_ahead(&self) {
        if let Err(e) = self.try_reserve_ahead() {
            tracing::warn!(
                "{}; VM ids get a random tail until it is written",
                ferry_migrate::error_chain(&e)
            );
        }
    }

    /// [`Self::reserve_ahead`], or why the record could not be written.
    fn try_reserve_ahead(&self) -> Result<(), IdRecordError> {
        let room = |c: &Counter| c.next.saturating_add(BLOCK / 2) <= c.reserved;
        // Nearly every create: room left, and no wait behind another's write.
        if room(&self.counter()) {
            return Ok(());
        }
        let _writing = self.writing.lock().unwrap_or_else(|e| e.into_inner());
        let reserved = {
            let counter = self.counter();
            // Reserved by another create meanwhile.
            if room(&counter) {
                return Ok(());
            }
            counter.reserved.saturating_add(BLOCK)
        };
        ferry_migrate::durable::replace(&self.path, format!("{reserved}\n").as_bytes()).map_err(
            |source| IdRecordError::Io {
                what: "write",
                path: self.path.clone(),
                source,
            },
        )?;
        self.counter().reserved = reserved;
        Ok(())
    }

    /// The next id `NAME-vmN` of host `name` that is not `taken` (a VM that came back
    /// may have one). Past the reserved ids (more creates at once than a block holds,
    /// or a failed reservation), the id gets a random tail: it is never an id a later
    /// run gives.
    pub(crate) fn fresh(&self, name: &str, taken: impl Fn(&str) -> bool) -> String {
        let mut counter = self.counter();
        loop {
            let n = counter.next;
            // A record's count is bounded far below the end ([`MAX_COUNT`]).
            counter.next = n.saturating_add(1);
            let id = if n < counter.reserved {
                format!("{name}-vm{n}")
            } else {
                let mut tail = [0u8; 4];
                getrandom::fill(&mut tail).expect("the OS random source");
                format!("{name}-vm{n}-{:08x}", u32::from_le_bytes(tail))
            };
            if !taken(&id) {
                return id;
            }
        }
    }

    fn counter(&self) -> std::sync::MutexGuard<'_, Counter> {
        // Each update is one assignment: whole after a panic.
        self.counter.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The largest count a record may hold: more ids than any host gives, yet far enough
/// from `u64::MAX` that counting on from it never wraps to ids given before.
const MAX_COUNT: u64 = 1 << 62;

/// The count a record holds: a positive decimal number (at most [`MAX_COUNT`]) and a
/// newline.
fn parse_count(bytes: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(bytes).ok()?;
    text.trim_end_matches('\n')
        .parse::<u64>()
        .ok()
        .filter(|&n| (1..=MAX_COUNT).contains(&n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restarted_host_gives_no_id_its_earlier_run_gave() {
        let store = ferry_testdata::scratch_dir("vm-ids").join("restarts");
        std::fs::create_dir_all(&store).unwrap();
        let free = |_: &str| false;
        let first = VmIds::open(&store).unwrap();
        let given: Vec<String> = (0..3).map(|_| first.fresh("a", free)).collect();
        assert_eq!(given, ["a-vm1", "a-vm2", "a-vm3"]);
        drop(first);
        let second = VmIds::open(&store).unwrap();
        assert_eq!(second.fresh("a", free), format!("a-vm{}", 1 + BLOCK));
        // Half a block given: the next block is reserved before it runs out.
        for _ in 0..BLOCK / 2 {
            second.reserve_ahead();
            second.fresh("a", free);
        }
        second.reserve_ahead();
        drop(second);
        let third = VmIds::open(&store).unwrap();
        assert_eq!(third.fresh("a", free), format!("a-vm{}", 1 + 3 * BLOCK));
    }

    #[test]
    fn ids_past_the_reserved_ones_and_taken_ones_are_not_given() {
        let store = ferry_testdata::scratch_dir("vm-ids").join("past");
        std::fs::create_dir_all(&store).unwrap();
        let ids = VmIds::open(&store).unwrap();
        let back = ["b-vm1", "b-vm3"];
        let taken = |id: &str| back.contains(&id);
        assert_eq!(ids.fresh("b", taken), "b-vm2");
        assert_eq!(ids.fresh("b", taken), "b-vm4");
        // Without reserving ahead, past the block: a random tail, not the next run's id.
        ids.counter().next = BLOCK + 1;
        let past = ids.fresh("b", |_| false);
        let tail = past.strip_prefix(&format!("b-vm{}-", BLOCK + 1));
        assert!(
            tail.is_some_and(|t| t.len() == 8 && t.chars().all(|c| c.is_ascii_hexdigit())),
            "{past}"
        );
        assert!(ferry_api::valid_vm_id(&past), "{past}");
    }

    #[test]
    fn a_record_that_holds_no_count_is_refused_not_counted_from_one() {
        let store = ferry_testdata::scratch_dir("vm-ids").join("garbage");
        std::fs::create_dir_all(&store).unwrap();
        let near_the_end = format!("{}\n", u64::MAX - 3);
        for garbage in [
            &b"x\n"[..],
            b"0\n",
            b"",
            b"-5\n",
            b"\xff",
            near_the_end.as_bytes(),
        ] {
            std::fs::write(store.join(VM_IDS), garbage).unwrap();
            let err = VmIds::open(&store).err().expect("refused");
            assert!(matches!(err, IdRecordError::NotACount { .. }), "{err}");
        }
    }

    #[test]
    fn a_reservation_that_cannot_be_written_leaves_ids_to_give() {
        let store = ferry_testdata::scratch_dir("vm-ids").join("unwritable");
        std::fs::create_dir_all(&store).unwrap();
        let ids = VmIds::open(&store).unwrap();
        // The record can no longer be replaced (a folder, with a file, where it was).
        let record = store.join(VM_IDS);
        std::fs::remove_file(&record).unwrap();
        std::fs::create_dir_all(record.join("in-the-way")).unwrap();
        ids.counter().next = BLOCK;
        ids.reserve_ahead();
        let free = |_: &str| false;
        assert_eq!(ids.fresh("c", free), format!("c-vm{BLOCK}"));
        assert!(ids
            .fresh("c", free)
            .starts_with(&format!("c-vm{}-", BLOCK + 1)));
    }
}
