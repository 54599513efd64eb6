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

impl ChunkId {
    /// Chunk `index` of `buffer`.
    pub const fn new(buffer: BufferId, index: u64) -> Self {
        Self { buffer, index }
    }
}

/// Number of chunks covering `bytes`.
pub fn chunk_count(bytes: u64) -> u64 {
    bytes.div_ceil(CHUNK_SIZE)
}

/// Dirty chunks of the buffers of one device: a set of chunk indices per buffer (the
/// engine's [`PageSet`], with chunks for pages), and for a chunk written only in part
/// since the last take, the span of bytes written (so a migration sends a KV cache's new
/// row, not its chunk).
#[derive(Debug)]
pub struct DirtyChunks {
    tracking: bool,
    bitmaps: BTreeMap<BufferId, PageSet>,
    /// Bytes `(start, end)` written of the dirty chunks written only in part.
    extents: BTreeMap<ChunkId, (u32, u32)>,
    /// Whether extents are kept (not for a set only ever listed).
    exact: bool,
}

impl Default for DirtyChunks {
    /// Not tracking; extents kept once it tracks.
    fn default() -> Self {
        Self {
            tracking: false,
            bitmaps: BTreeMap::new(),
            extents: BTreeMap::new(),
            exact: true,
        }
    }
}

impl DirtyChunks {
    /// Tracking from the start, chunks only (for a set that is never taken: what was
    /// ever written).
    pub fn started() -> Self {
        Self {
            tracking: true,
            exact: false,
            ..Self::default()
        }
    }

    /// Starts tracking; nothing is dirty until the next write.
    pub fn start(&mut self) {
        self.tracking = true;
        self.bitmaps.clear();
        self.extents.clear();
    }

    /// Stops tracking and forgets what was dirty.
    pub fn stop(&mut self) {
        self.tracking = false;
        self.bitmaps.clear();
        self.extents.clear();
    }

    /// Records a write of `range` bytes of buffer `id` (of `buffer_bytes` bytes).
    pub fn mark(&mut self, id: BufferId, buffer_bytes: u64, range: Range<u64>) {
        let end = range.end.min(buffer_bytes);
        if !self.tracking || range.start >= end {
            return;
        }
        let chunks = self
            .bitmaps
            .entry(id)
            .or_insert_with(|| PageSet::empty(chunk_count(buffer_bytes)));
        let (first, last) = (range.start / CHUNK_SIZE, (end - 1) / CHUNK_SIZE);
        if self.exact {
            // Only the first and the last chunk can be written in part.
            for index in [first, last] {
                let chunk = ChunkId { buffer: id, index };
                let start = index * CHUNK_SIZE;
                let len = CHUNK_SIZE.min(buffer_bytes - start);
                let a = (range.start.max(start) - start) as u32;
                let b = (end.min(start + len) - start) as u32;
                let whole = a == 0 && u64::from(b) == len;
                if whole {
                    self.extents.remove(&chunk);
                } else if !chunks.contains(index) {
                    self.extents.insert(chunk, (a, b));
                } else if let Some(span) = self.extents.get_mut(&chunk) {
                    *span = (span.0.min(a), span.1.max(b));
                }
            }
            if last > first + 1 {
                let middle = ChunkId {
                    buffer: id,
                    index: first + 1,
                }..ChunkId {
                    buffer: id,
                    index: last,
                };
                let written: Vec<ChunkId> = self.extents.range(middle).map(|(&c, _)| c).collect();
                for chunk in written {
                    self.extents.remove(&chunk);
                }
            }
        }
        chunks.insert_range(first..last + 1);
    }

    /// Marks a whole buffer (created while tracking).
    pub fn mark_all(&mut self, id: BufferId, buffer_bytes: u64) {
        self.mark(id, buffer_bytes, 0..buffer_bytes);
    }

    /// Forgets a freed buffer.
    pub fn forget(&mut self, id: BufferId) {
        self.bitmaps.remove(&id);
        let chunks = ChunkId {
            buffer: id,
            index: 0,
        }..=ChunkId {
            buffer: id,
            index: u64::MAX,
        };
        let stale: Vec<ChunkId> = self.extents.range(chunks).map(|(&c, _)| c).collect();
        for chunk in stale {
            self.extents.remove(&chunk);
        }
    }

    /// The chunks written since the last take (or start), in (buffer, index) order, and
    /// clears them.
    pub fn take(&mut self) -> Vec<ChunkId> {
        self.take_parts().into_iter().map(|(c, _)| c).collect()
    }

    /// The chunks written since the last take (or start), in (buffer, index) order, each
    /// with the bytes written if only part of it was, and clears them.
    pub fn take_parts(&mut self) -> Vec<(ChunkId, Option<(u32, u32)>)> {
        let mut extents = std::mem::take(&mut self.extents);
        let parts = self
            .marked()
            .into_iter()
            .map(|c| (c, extents.remove(&c)))
            .collect();
        self.bitmaps.values_mut().for_each(PageSet::clear);
        parts
    }

    /// Whether `chunk` was written since the last take (or start).
    pub fn contains(&self, chunk: ChunkId) -> bool {
        self.bitmaps
            .get(&chunk.buffer)
            .is_some_and(|chunks| chunks.contains(chunk.index))
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
            vec![ChunkId::new(1, 0), ChunkId::new(1, 1), ChunkId::new(2, 0),]
        );
        assert!(dirty.take().is_empty(), "a take clears");
    }

    #[test]
    fn a_chunk_written_in_part_keeps_the_span_written_until_written_whole() {
        let chunk = |index| ChunkId::new(1, index);
        let mut dirty = DirtyChunks::default();
        dirty.start();
        let bytes = 4 * CHUNK_SIZE + 100;
        // Two rows of chunk 0, and one across chunks 1 and 2.
        dirty.mark(1, bytes, 1000..1100);
        dirty.mark(1, bytes, 300..400);
        dirty.mark(1, bytes, 2 * CHUNK_SIZE - 8..2 * CHUNK_SIZE + 8);
        // The short last chunk, whole.
        dirty.mark(1, bytes, 4 * CHUNK_SIZE..bytes);
        assert_eq!(
            dirty.take_parts(),
            vec![
                (chunk(0), Some((300, 1100))),
                (chunk(1), Some((CHUNK_SIZE as u32 - 8, CHUNK_SIZE as u32))),
                (chunk(2), Some((0, 8))),
                (chunk(4), None),
            ]
        );
        // A part, then the whole chunk, then a part again: whole.
        dirty.mark(1, bytes, 10..20);
        dirty.mark(1, bytes, 0..3 * CHUNK_SIZE);
        dirty.mark(1, bytes, 30..40);
        assert_eq!(
            dirty.take_parts(),
            vec![(chunk(0), None), (chunk(1), None), (chunk(2), None)]
        );
        // A freed buffer's spans go with it; a set only listed keeps none.
        dirty.mark(1, bytes, 10..20);
        dirty.forget(1);
        assert!(dirty.take_parts().is_empty());
        let mut written = DirtyChunks::started();
        written.mark(1, bytes, 10..20);
        assert!(written.extents.is_empty());
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
