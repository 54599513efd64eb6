//! VMs in memory for the engine's tests and benches: [`StillVm`], paused (it dirties
//! nothing), to send or save, and [`MemoryVm`], to receive or load into.

#![allow(dead_code)] // each test binary uses its own part

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use ferry_migrate::vm::PAGE_SIZE;
use ferry_migrate::{
    ChunkKey, ChunkOrigin, ChunkWrite, DeviceBuffer, MigrationSource, MigrationTarget, PageSet,
    VmContents, VmDescription, VmError,
};

/// A VM of `ram_size` bytes of RAM and `accel_memory` bytes of device memory.
pub fn description(name: &str, ram_size: u64, accel_memory: u64) -> VmDescription {
    VmDescription {
        name: name.into(),
        ram_size,
        vcpus: 1,
        accel_memory,
        abi_version: 1,
        state_version: 1,
        backend_kind: if accel_memory > 0 { "cpu" } else { "" }.into(),
        kernel_version: u32::from(accel_memory > 0),
        microkernel: String::new(),
        extra: Vec::new(),
        files: Vec::new(),
        cpu_features: Vec::new(),
    }
}

/// A VM that never changes: its RAM, its device chunks (of the buffers in its table) and
/// its state.
pub struct StillVm {
    /// What it says of itself.
    pub description: VmDescription,
    /// Guest RAM.
    pub ram: Vec<u8>,
    /// The device buffer table.
    pub buffers: Vec<DeviceBuffer>,
    /// The chunks that may hold data (a chunk may be all zeros).
    pub chunks: BTreeMap<ChunkKey, Vec<u8>>,
    /// The state it saves.
    pub state: Vec<u8>,
    /// Whether the engine paused it (and did not resume it).
    pub paused: AtomicBool,
}

impl StillVm {
    /// A VM with `ram` (of the description's size) and no device memory yet.
    pub fn new(description: VmDescription, ram: Vec<u8>) -> Self {
        assert_eq!(ram.len() as u64, description.ram_size);
        Self {
            description,
            ram,
            buffers: Vec::new(),
            chunks: BTreeMap::new(),
            state: b"final state".to_vec(),
            paused: AtomicBool::new(false),
        }
    }

    /// Adds device buffer `id` of `bytes`, with `chunks` (index, contents).
    pub fn with_buffer(mut self, id: u32, bytes: u64, chunks: Vec<(u64, Vec<u8>)>) -> Self {
        self.buffers.push(DeviceBuffer { id, bytes });
        for (index, data) in chunks {
            self.chunks.insert(ChunkKey { buffer: id, index }, data);
        }
        self
    }
}

impl VmContents for StillVm {
    fn describe(&self) -> VmDescription {
        self.description.clone()
    }
    fn populated_chunks(&self) -> Vec<ChunkKey> {
        self.chunks.keys().copied().collect()
    }
    fn device_buffers(&self) -> Vec<DeviceBuffer> {
        self.buffers.clone()
    }
    fn read_ram(&self, gpa: u64, out: &mut [u8]) -> Result<(), VmError> {
        out.copy_from_slice(&self.ram[gpa as usize..][..out.len()]);
        Ok(())
    }
    fn read_chunk(&self, chunk: ChunkKey, out: &mut Vec<u8>) -> Option<u64> {
        let buffer = self.buffers.iter().find(|b| b.id == chunk.buffer)?;
        out.clone_from(self.chunks.get(&chunk)?);
        Some(buffer.bytes)
    }
    fn save_state(&self) -> Result<Vec<u8>, VmError> {
        Ok(self.state.clone())
    }
}

impl MigrationSource for StillVm {
    fn start_device_tracking(&self) -> Result<(), VmError> {
        Ok(())
    }
    fn start_ram_tracking(&self) -> Result<(), VmError> {
        Ok(())
    }
    fn stop_tracking(&self) {}
    fn take_dirty_pages(&self) -> Result<PageSet, VmError> {
        Ok(PageSet::empty(self.description.ram_size / PAGE_SIZE))
    }
    fn take_dirty_chunks(&self) -> Vec<ChunkKey> {
        Vec::new()
    }
    fn set_throttle(&self, _percent: u8) {}
    fn pause(&self) -> Result<Instant, VmError> {
        self.paused.store(true, Ordering::SeqCst);
        Ok(Instant::now())
    }
    fn resume(&self) -> Result<(), VmError> {
        self.paused.store(false, Ordering::SeqCst);
        Ok(())
    }
}

/// A VM being received or loaded: what it was given, and whether it runs.
#[derive(Default)]
pub struct MemoryVm {
    /// Guest RAM.
    pub ram: Mutex<Vec<u8>>,
    /// The device buffer table.
    pub buffers: Mutex<Vec<DeviceBuffer>>,
    /// The chunks written.
    pub chunks: Mutex<BTreeMap<ChunkKey, Vec<u8>>>,
    /// The origins kept of the chunks written (pieces of attached files).
    pub origins: Mutex<BTreeMap<ChunkKey, ChunkOrigin>>,
    /// The attached files received, by offer index.
    pub files: Mutex<BTreeMap<u32, Vec<u8>>>,
    /// The state it was restored from, once restored.
    pub state: Mutex<Option<Vec<u8>>>,
    /// Whether it was resumed.
    pub running: AtomicBool,
}

impl MemoryVm {
    /// An empty VM of `ram_size` bytes of RAM.
    pub fn new(ram_size: u64) -> Self {
        Self {
            ram: Mutex::new(vec![0; ram_size as usize]),
            ..Self::default()
        }
    }
}

impl MigrationTarget for MemoryVm {
    fn write_ram(&self, gpa: u64, data: &[u8]) -> Result<(), VmError> {
        self.ram.lock().unwrap()[gpa as usize..][..data.len()].copy_from_slice(data);
        Ok(())
    }
    fn sync_buffers(&self, table: &[DeviceBuffer]) -> Result<(), VmError> {
        *self.buffers.lock().unwrap() = table.to_vec();
        Ok(())
    }
    fn write_chunk(&self, chunk: ChunkKey, write: ChunkWrite<'_>) -> Result<(), VmError> {
        let mut origins = self.origins.lock().unwrap();
        match write {
            ChunkWrite::FilePiece { origin, .. } => origins.insert(chunk, origin),
            _ => origins.remove(&chunk),
        };
        let data = write.whole(chunk)?;
        self.chunks.lock().unwrap().insert(chunk, data.to_vec());
        Ok(())
    }
    fn receive_files(&self, files: &[u32]) -> Result<(), VmError> {
        let mut received = self.files.lock().unwrap();
        for &f in files {
            received.insert(f, Vec::new());
        }
        Ok(())
    }
    fn write_file(&self, file: u32, offset: u64, data: &[u8]) -> Result<(), VmError> {
        let mut files = self.files.lock().unwrap();
        let Some(f) = files.get_mut(&file) else {
            return Err(VmError::WriteFile {
                file,
                offset,
                source: "not being received".into(),
            });
        };
        let end = offset as usize + data.len();
        if f.len() < end {
            f.resize(end, 0);
        }
        f[offset as usize..end].copy_from_slice(data);
        Ok(())
    }
    fn read_local_file(&self, file: u32, offset: u64, out: &mut [u8]) -> Result<(), VmError> {
        let files = self.files.lock().unwrap();
        let bytes = files
            .get(&file)
            .and_then(|f| f.get(offset as usize..offset as usize + out.len()));
        out.copy_from_slice(bytes.ok_or_else(|| VmError::ReadFile {
            file,
            offset,
            source: "not here".into(),
        })?);
        Ok(())
    }
    fn restore(&self, state: &[u8]) -> Result<(), VmError> {
        *self.state.lock().unwrap() = Some(state.to_vec());
        Ok(())
    }
    fn resume(&self) -> Result<(), VmError> {
        self.running.store(true, Ordering::SeqCst);
        Ok(())
    }
}

/// A fake source's pause, as strict as a host's: a VM held (`paused`) is not paused
/// again before it was resumed. Counts it in `pauses`.
pub fn pause_once(paused: &mut bool, pauses: &AtomicUsize) -> Result<Instant, VmError> {
    if std::mem::replace(paused, true) {
        return Err(VmError::Pause("already paused".into()));
    }
    pauses.fetch_add(1, Ordering::SeqCst);
    Ok(Instant::now())
}

/// A fake source's resume, refused for a VM that runs. Counts it in `resumes`.
pub fn resume_once(paused: &mut bool, resumes: &AtomicUsize) -> Result<(), VmError> {
    if !std::mem::replace(paused, false) {
        return Err(VmError::Resume("resumed while running".into()));
    }
    resumes.fetch_add(1, Ordering::SeqCst);
    Ok(())
}
