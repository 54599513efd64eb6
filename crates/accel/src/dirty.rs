//! Exact dirty tracking of device memory.
//!
//! The device knows every byte it writes (each command declares its write ranges), so no
//! page protection or guessing is needed: after a command runs, the chunks it wrote are
//! marked. A buffer created while tracking is marked whole, so a buffer freed and
//! re-created under the same id is never left stale on a migration destination.
//!
//! Chunk size: 64 KiB. A decode step appends one row per layer to the KV cache, so it
//! dirties one chunk per cache instead of the whole cache (which is what keeps a
//! read-mostly inference VM's rounds small: at 256 KiB a SmolLM2 token dirtied 15 MiB, at
//! 64 KiB 4 MiB, and a serving VM's moves sent 90 instead of 160 MiB); yet 4 GiB of
//! device memory is only 64 Ki chunks, so a take scans 8 KiB of bitmap and a wire header
//! (~24 bytes) costs under 0.04% of the chunk it describes.

use std::collections::BTreeMap;
use std::ops::Range;

use ferry_migrate::PageSet;

use crate::backend::BufferId;

/// Bytes of device memory per dirty-tracking chunk (see the module's notes).
pub const CHUNK_SIZE: u64 = 64 * 1024;

/// One chunk of one buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ChunkId {
    /// The buffer.
    pub buffer: BufferId,
    /// Chunk index within the buffer (byte offset / [`CHUNK_SIZE`]).
    pub index: u64,
}

/// Number of chunks covering `bytes`.
pub fn chunk_count(bytes: u64) -> u64 {
    bytes.div_ceil(CHUNK_SIZE)
}

/// Dirty chunks of the buffers of one device: a set of chunk indices per buffer (the
/// engine's [`PageSet`], with chunks for pages).
#[derive(Debug, Default)]
pub struct DirtyChunks {
    tracking: bool,
    bitmaps: BTreeMap<BufferId, PageSet>,
}

impl DirtyChunks {
    /// Tracking from the start (for a set that is never taken: what was ever written).
    pub fn started() -> Self {
        Self {
            tracking: true,
            bitmaps: BTreeMap::new(),
        }
    }

    /// Starts tracking; nothing is dirty until the next write.
    pub fn start(&mut self) {
        self.tracking = true;
        self.bitmaps.clear();
    }

    /// Stops tracking and forgets what was dirty.
    pub fn stop(&mut self) {
        self.tracking = false;
        self.bitmaps.clear();
    }

    /// Records a write of `range` bytes of buffer `id` (of `buffer_bytes` bytes).
    pub fn mark(&mut self, id: BufferId, buffer_bytes: u64, range: Range<u64>) {
        if !self.tracking || range.is_empty() {
            return;
        }
        let chunks = self
            .bitmaps
            .entry(id)
            .or_insert_with(|| PageSet::empty(chunk_count(buffer_bytes)));
        let last = (range.end.min(buffer_bytes).saturating_sub(1)) / CHUNK_SIZE;
        chunks.insert_range(range.start / CHUNK_SIZE..last + 1);
    }

    /// Marks a whole buffer (created while tracking).
    pub fn mark_all(&mut self, id: BufferId, buffer_bytes: u64) {
        self.mark(id, buffer_bytes, 0..buffer_bytes);
    }

    /// Forgets a freed buffer.
    pub fn forget(&mut self, id: BufferId) {
        self.bitmaps.remove(&id);
    }

    /// The chunks written since the last take (or start), in (buffer, index) order, and
    /// clears them.
    pub fn take(&mut self) -> Vec<ChunkId> {
        let chunks = self.marked();
        self.bitmaps.values_mut().for_each(PageSet::clear);
        chunks
    }

    /// The chunks written since the last take (or start), in (buffer, index) order.
    pub fn marked(&self) -> Vec<ChunkId> {
        self.bitmaps
            .iter()
            .flat_map(|(&buffer, chunks)| {
                chunks.pages().map(move |index| ChunkId { buffer, index })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_exactly_the_chunks_a_range_touches() {
        let mut dirty = DirtyChunks::default();
        dirty.mark(1, 10 * CHUNK_SIZE, 0..4); // not tracking yet: ignored
        dirty.start();
        assert!(dirty.take().is_empty());
        dirty.mark(1, 10 * CHUNK_SIZE, CHUNK_SIZE - 4..CHUNK_SIZE + 4);
        dirty.mark(2, 100, 0..100);
        dirty.mark(1, 10 * CHUNK_SIZE, 5 * CHUNK_SIZE..5 * CHUNK_SIZE); // empty
        let taken = dirty.take();
        assert_eq!(
            taken,
            vec![
                ChunkId {
                    buffer: 1,
                    index: 0
                },
                ChunkId {
                    buffer: 1,
                    index: 1
                },
                ChunkId {
                    buffer: 2,
                    index: 0
                },
            ]
        );
        assert!(dirty.take().is_empty(), "a take clears");
    }

    #[test]
    fn whole_buffer_and_forget() {
        let mut dirty = DirtyChunks::default();
        dirty.start();
        dirty.mark_all(7, 3 * CHUNK_SIZE + 1);
        assert_eq!(dirty.take().len(), 4);
        dirty.mark_all(7, 3 * CHUNK_SIZE);
        dirty.forget(7);
        assert!(dirty.take().is_empty());
    }
}
