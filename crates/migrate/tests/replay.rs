//! The engine's command-log replay, with a fake device on each side: a guest thread runs
//! deterministic commands on the source's device (one rewrites a whole buffer every
//! step, faster than pre-copy could resend it; one uploads guest data), and the
//! destination replays what the source logs.

mod memory_vm;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ferry_migrate::replay::CaptureLimits;
use ferry_migrate::vm::{MAX_CHUNK_BYTES, PAGE_SIZE};
use ferry_migrate::{
    migrate_vm, spawn_receiver, CaptureReport, ChunkKey, ChunkPart, ChunkWrite, DeviceBuffer,
    DeviceDigest, DeviceTransfer, LoggedCommand, MigrationError, MigrationOptions, MigrationReport,
    MigrationSource, MigrationTarget, Outcomes, PageSet, ReceiveReport, Secret, TargetFactory,
    VmContents, VmDescription, VmError,
};

const PAGE: u64 = 4096;
const RAM: u64 = 8 << 20;
/// Rewritten whole by every step.
const HOT_BUFFER: u32 = 1;
const HOT_BYTES: u64 = 4 * MAX_CHUNK_BYTES;
/// Written a page at a time by uploads.
const UPLOAD_BUFFER: u32 = 2;
const UPLOAD_BYTES: u64 = 2 * MAX_CHUNK_BYTES + 4096;
/// Written once, before any migration.
const COLD_BUFFER: u32 = 3;
const COLD_BYTES: u64 = MAX_CHUNK_BYTES;

const STEP: u32 = 1;
const UPLOAD: u32 = 2;
const BAD_OPCODE: u32 = 99;
const OK: u32 = 0;

/// One migration at a time: each runs a guest, a source and a destination, and replay's
/// convergence depends on the destination getting the CPU it needs.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn secret() -> Secret {
    Secret::new(b"correct horse battery staple").unwrap()
}

/// Device memory: buffers by id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Device(BTreeMap<u32, Vec<u8>>);

impl Device {
    /// Runs `cmd`; its status.
    fn run(&mut self, cmd: &LoggedCommand) -> u32 {
        let arg = |i: usize| cmd.args.get(i).copied().unwrap_or(0);
        match cmd.opcode {
            STEP => match self.0.get_mut(&(arg(0) as u32)) {
                Some(buffer) => {
                    let seed = arg(1) as u8;
                    for (i, b) in buffer.iter_mut().enumerate() {
                        *b = b.wrapping_mul(167).wrapping_add(seed ^ (i as u8));
                    }
                    OK
                }
                None => BAD_OPCODE,
            },
            UPLOAD => match self.0.get_mut(&(arg(0) as u32)) {
                Some(buffer) => {
                    let at = arg(1) as usize;
                    match buffer.get_mut(at..at + cmd.payload.len()) {
                        Some(range) => {
                            range.copy_from_slice(&cmd.payload);
                            OK
                        }
                        None => BAD_OPCODE,
                    }
                }
                None => BAD_OPCODE,
            },
            _ => BAD_OPCODE,
        }
    }

    /// The chunks `cmd` writes.
    fn writes(&self, cmd: &LoggedCommand) -> Vec<ChunkKey> {
        let buffer = cmd.args[0] as u32;
        let (start, end) = match cmd.opcode {
            STEP => (0, self.0.get(&buffer).map_or(0, |b| b.len() as u64)),
            _ => (cmd.args[1], cmd.args[1] + cmd.payload.len() as u64),
        };
        if end == 0 {
            return Vec::new();
        }
        (start / MAX_CHUNK_BYTES..=(end - 1) / MAX_CHUNK_BYTES)
            .map(|index| ChunkKey { buffer, index })
            .collect()
    }

    /// The bytes of chunk `key` that `cmd` writes, if not all of it.
    fn part(&self, cmd: &LoggedCommand, key: ChunkKey) -> Option<(u32, u32)> {
        if cmd.opcode != UPLOAD {
            return None;
        }
        let start = key.index * MAX_CHUNK_BYTES;
        let len = self.chunk(key)?.len() as u64;
        let a = cmd.args[1].max(start) - start;
        let b = (cmd.args[1] + cmd.payload.len() as u64).min(start + len) - start;
        (a > 0 || b < len).then_some((a as u32, b as u32))
    }

    fn chunk(&self, key: ChunkKey) -> Option<&[u8]> {
        let buffer = self.0.get(&key.buffer)?;
        let start = (key.index * MAX_CHUNK_BYTES) as usize;
        let end = (start + MAX_CHUNK_BYTES as usize).min(buffer.len());
        buffer.get(start..end).filter(|c| !c.is_empty())
    }

    fn chunks(&self) -> Vec<ChunkKey> {
        self.0
            .iter()
            .flat_map(|(&buffer, b)| {
                (0..(b.len() as u64).div_ceil(MAX_CHUNK_BYTES))
                    .map(move |index| ChunkKey { buffer, index })
            })
            .collect()
    }

    fn table(&self) -> Vec<DeviceBuffer> {
        self.0
            .iter()
            .map(|(&id, b)| DeviceBuffer {
                id,
                bytes: b.len() as u64,
            })
            .collect()
    }

    /// FNV-1a of each buffer.
    fn digest(&self) -> DeviceDigest {
        DeviceDigest(
            self.0
                .iter()
                .map(|(&id, b)| {
                    let hash = b.iter().fold(0x811c_9dc5u32, |h, &x| {
                        (h ^ u32::from(x)).wrapping_mul(0x0100_0193)
                    });
                    (id, b.len() as u64, hash)
                })
                .collect(),
        )
    }
}

/// The source's capture: base chunks not read, preserved ones, the log.
#[derive(Default)]
struct Capture {
    limits: CaptureLimits,
    unread: BTreeSet<ChunkKey>,
    pool: BTreeMap<ChunkKey, Vec<u8>>,
    pool_bytes: u64,
    log: Vec<LoggedCommand>,
    log_bytes: u64,
    failed: Option<String>,
    report: CaptureReport,
    /// Guest steps since the boundary.
    steps: u64,
}

struct SourceState {
    ram: Vec<u8>,
    dirty_pages: BTreeSet<u64>,
    device: Device,
    /// Dirty chunks, each with the bytes written if only part of it was.
    dirty_chunks: BTreeMap<ChunkKey, Option<(u32, u32)>>,
    /// Device writes are tracked.
    tracking: bool,
    /// RAM writes are tracked.
    ram_tracking: bool,
    capture: Option<Capture>,
    paused: bool,
    throttle: u8,
    step: u64,
    at_pause: Option<(Vec<u8>, Device, u64)>,
}

/// The VM being sent, with its guest thread.
struct Source {
    state: Mutex<SourceState>,
    stop: AtomicBool,
    pauses: AtomicUsize,
    resumes: AtomicUsize,
    /// Base reads wait until the guest ran this many steps past the boundary.
    base_waits_for_steps: u64,
    /// Each pre-copy chunk read takes this long (a slow link: the device dirties memory
    /// faster than pre-copy can resend it).
    chunk_read_delay: Mutex<Duration>,
    /// The device's digest takes this long (a large device memory).
    digest_time: Mutex<Duration>,
    /// The capture overflows once the VM is paused (the tail outgrew the log).
    overflow_in_pause: AtomicBool,
    /// Taking the commands in the pause (the tail) takes this long.
    tail_time: Mutex<Duration>,
}

impl Source {
    fn start(base_waits_for_steps: u64) -> Arc<Self> {
        let mut ram = vec![0u8; RAM as usize];
        for (i, b) in ram[..(64 * PAGE) as usize].iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        let mut device = Device::default();
        device.0.insert(HOT_BUFFER, vec![1; HOT_BYTES as usize]);
        device
            .0
            .insert(UPLOAD_BUFFER, vec![0; UPLOAD_BYTES as usize]);
        device.0.insert(
            COLD_BUFFER,
            (0..COLD_BYTES).map(|i| (i % 13) as u8).collect(),
        );
        let source = Arc::new(Self {
            state: Mutex::new(SourceState {
                ram,
                dirty_pages: BTreeSet::new(),
                device,
                dirty_chunks: BTreeMap::new(),
                tracking: false,
                ram_tracking: false,
                capture: None,
                paused: false,
                throttle: 0,
                step: 0,
                at_pause: None,
            }),
            stop: AtomicBool::new(false),
            pauses: AtomicUsize::new(0),
            resumes: AtomicUsize::new(0),
            base_waits_for_steps,
            chunk_read_delay: Mutex::default(),
            digest_time: Mutex::default(),
            overflow_in_pause: AtomicBool::new(false),
            tail_time: Mutex::default(),
        });
        let guest = source.clone();
        std::thread::spawn(move || {
            while !guest.stop.load(Ordering::SeqCst) {
                let throttle = {
                    let mut s = guest.lock();
                    if !s.paused {
                        s.run_step();
                    }
                    s.throttle
                };
                std::thread::sleep(Duration::from_micros(700 + 100 * u64::from(throttle)));
            }
        });
        source
    }

    fn lock(&self) -> MutexGuard<'_, SourceState> {
        self.state.lock().unwrap()
    }

    fn at_pause(&self) -> (Vec<u8>, Device, u64) {
        self.lock().at_pause.clone().expect("paused once")
    }

    fn running(&self) -> bool {
        !self.lock().paused
    }

    fn steps(&self) -> u64 {
        self.lock().step
    }
}

impl Drop for Source {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

impl SourceState {
    /// One guest step: a device command (a whole-buffer rewrite, or every fourth an
    /// upload of a page of guest data) and a RAM write.
    fn run_step(&mut self) {
        let step = self.step;
        self.step += 1;
        let cmd = if step % 4 == 3 {
            let at = (step * PAGE) % (UPLOAD_BYTES - PAGE);
            LoggedCommand {
                opcode: UPLOAD,
                args: vec![u64::from(UPLOAD_BUFFER), at],
                payload: (0..PAGE).map(|i| (i as u8) ^ (step as u8)).collect(),
                status: OK,
            }
        } else {
            LoggedCommand {
                opcode: STEP,
                args: vec![u64::from(HOT_BUFFER), step],
                payload: Vec::new(),
                status: OK,
            }
        };
        let writes = self.device.writes(&cmd);
        if let Some(c) = self.capture.as_mut() {
            c.steps += 1;
        }
        if let Some(c) = self.capture.as_mut().filter(|c| c.failed.is_none()) {
            for &key in &writes {
                if c.unread.contains(&key) && !c.pool.contains_key(&key) {
                    let data = self.device.chunk(key).unwrap().to_vec();
                    if c.pool_bytes + data.len() as u64 > c.limits.pool_bytes {
                        c.failed = Some(format!(
                            "the side pool would exceed {} bytes",
                            c.limits.pool_bytes
                        ));
                        break;
                    }
                    c.pool_bytes += data.len() as u64;
                    c.report.pool_peak_bytes = c.report.pool_peak_bytes.max(c.pool_bytes);
                    c.report.chunks_preserved += 1;
                    c.pool.insert(key, data);
                }
            }
        }
        let status = self.device.run(&cmd);
        if self.tracking {
            for key in writes {
                let part = self.device.part(&cmd, key);
                let span = self.dirty_chunks.entry(key).or_insert(part);
                *span = match (*span, part) {
                    (Some((a, b)), Some((c, d))) => Some((a.min(c), b.max(d))),
                    _ => None,
                };
            }
        }
        if let Some(c) = self.capture.as_mut().filter(|c| c.failed.is_none()) {
            c.log_bytes += cmd.weight();
            if c.log_bytes > c.limits.log_bytes {
                c.failed = Some("the log overflowed".into());
            } else {
                c.report.commands_logged += 1;
                c.log.push(LoggedCommand { status, ..cmd });
            }
        }
        let page = 64 + step % (RAM / PAGE - 64);
        let at = (page * PAGE) as usize;
        self.ram[at..at + 8].copy_from_slice(&step.to_le_bytes());
        if self.ram_tracking {
            self.dirty_pages.insert(page);
        }
    }
}

fn capture_error(why: &str) -> VmError {
    VmError::Capture(why.to_string().into())
}

impl VmContents for Source {
    fn describe(&self) -> VmDescription {
        VmDescription {
            name: "replaying".into(),
            ram_size: RAM,
            vcpus: 1,
            accel_memory: 8 << 20,
            abi_version: 1,
            state_version: 1,
            backend_kind: "fake".into(),
            kernel_version: 1,
            microkernel: "fake".into(),
            extra: Vec::new(),
            files: Vec::new(),
            cpu_features: Vec::new(),
        }
    }

    fn populated_chunks(&self) -> Vec<ChunkKey> {
        self.lock().device.chunks()
    }

    fn device_buffers(&self) -> Vec<DeviceBuffer> {
        self.lock().device.table()
    }

    fn read_ram(&self, gpa: u64, out: &mut [u8]) -> Result<(), VmError> {
        let s = self.lock();
        out.copy_from_slice(&s.ram[gpa as usize..gpa as usize + out.len()]);
        Ok(())
    }

    fn read_chunk(&self, chunk: ChunkKey, out: &mut Vec<u8>) -> Option<u64> {
        std::thread::sleep(*self.chunk_read_delay.lock().unwrap());
        let s = self.lock();
        let data = s.device.chunk(chunk)?;
        out.clear();
        out.extend_from_slice(data);
        Some(s.device.0[&chunk.buffer].len() as u64)
    }

    fn save_state(&self) -> Result<Vec<u8>, VmError> {
        Ok(format!("step {}", self.lock().step).into_bytes())
    }

    fn read_base_chunk(&self, chunk: ChunkKey, out: &mut Vec<u8>) -> Result<bool, VmError> {
        let waited = Instant::now();
        loop {
            let mut guard = self.lock();
            let steps = guard.capture.as_ref().map_or(0, |c| c.steps);
            if steps < self.base_waits_for_steps && waited.elapsed() < Duration::from_secs(5) {
                drop(guard);
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            let s = &mut *guard;
            let c = s.capture.as_mut().ok_or_else(|| capture_error("none"))?;
            if let Some(why) = &c.failed {
                return Err(capture_error(why));
            }
            if !c.unread.remove(&chunk) {
                return Ok(false);
            }
            let data = match c.pool.remove(&chunk) {
                Some(data) => {
                    c.pool_bytes -= data.len() as u64;
                    data
                }
                None => s.device.chunk(chunk).unwrap().to_vec(),
            };
            *out = data;
            return Ok(true);
        }
    }
}

impl MigrationSource for Source {
    fn start_device_tracking(&self) -> Result<(), VmError> {
        let mut s = self.lock();
        s.tracking = true;
        s.dirty_chunks.clear();
        Ok(())
    }

    fn start_ram_tracking(&self) -> Result<(), VmError> {
        let mut s = self.lock();
        s.ram_tracking = true;
        s.dirty_pages.clear();
        Ok(())
    }

    fn stop_tracking(&self) {
        let mut s = self.lock();
        s.tracking = false;
        s.ram_tracking = false;
    }

    fn take_dirty_pages(&self) -> Result<PageSet, VmError> {
        let mut s = self.lock();
        if !s.ram_tracking {
            return Err(VmError::DirtyLog("RAM pages taken untracked".into()));
        }
        let mut set = PageSet::empty(RAM / PAGE);
        for page in std::mem::take(&mut s.dirty_pages) {
            set.insert(page);
        }
        Ok(set)
    }

    fn take_dirty_chunks(&self) -> Vec<ChunkKey> {
        std::mem::take(&mut self.lock().dirty_chunks)
            .into_keys()
            .collect()
    }

    fn take_dirty_parts(&self) -> Vec<ChunkPart> {
        std::mem::take(&mut self.lock().dirty_chunks)
            .into_iter()
            .map(|(key, bytes)| ChunkPart { key, bytes })
            .collect()
    }

    fn set_throttle(&self, percent: u8) {
        self.lock().throttle = percent;
    }

    fn pause(&self) -> Result<Instant, VmError> {
        // As strict as a host: a VM held for a switchover is not paused again before it
        // was resumed.
        let mut s = self.lock();
        let at = memory_vm::pause_once(&mut s.paused, &self.pauses)?;
        s.at_pause = Some((s.ram.clone(), s.device.clone(), s.step));
        Ok(at)
    }

    fn resume(&self) -> Result<(), VmError> {
        memory_vm::resume_once(&mut self.lock().paused, &self.resumes)
    }

    fn start_capture(
        &self,
        limits: CaptureLimits,
        since: Option<&[ChunkKey]>,
    ) -> Result<(Vec<DeviceBuffer>, Vec<ChunkKey>), VmError> {
        let mut s = self.lock();
        let all: BTreeSet<ChunkKey> = s.device.chunks().into_iter().collect();
        let base: BTreeSet<ChunkKey> = match since {
            None => all,
            Some(pending) => {
                let mut base: BTreeSet<ChunkKey> =
                    std::mem::take(&mut s.dirty_chunks).into_keys().collect();
                base.extend(pending.iter().copied());
                base.intersection(&all).copied().collect()
            }
        };
        let chunks = base.iter().copied().collect();
        s.capture = Some(Capture {
            limits,
            unread: base,
            ..Capture::default()
        });
        Ok((s.device.table(), chunks))
    }

    fn take_commands(&self) -> Result<Vec<LoggedCommand>, VmError> {
        if self.lock().paused {
            std::thread::sleep(*self.tail_time.lock().unwrap());
        }
        let mut s = self.lock();
        let paused = s.paused;
        let c = s.capture.as_mut().ok_or_else(|| capture_error("none"))?;
        if paused && self.overflow_in_pause.swap(false, Ordering::SeqCst) {
            c.failed = Some("injected: the log overflowed just before the pause".into());
        }
        if let Some(why) = &c.failed {
            return Err(capture_error(why));
        }
        c.log_bytes = 0;
        Ok(std::mem::take(&mut c.log))
    }

    fn stop_capture(&self) -> Option<CaptureReport> {
        self.lock().capture.take().map(|c| c.report)
    }

    fn device_digest(&self) -> Result<DeviceDigest, VmError> {
        std::thread::sleep(self.device_digest_estimate());
        Ok(self.lock().device.digest())
    }

    fn device_digest_estimate(&self) -> Duration {
        *self.digest_time.lock().unwrap()
    }
}

/// How a destination replays.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Replayer {
    Faithful,
    /// Its device drifts: the first replay changes one byte of the hot buffer, and the
    /// difference lasts (a step maps each byte one-to-one). Changing it again at every
    /// replay could undo it: 32 steps multiply a difference by 167^32, 1 mod 256.
    Drifting,
    /// Takes this long per command.
    Slow(Duration),
}

struct Target {
    ram: Mutex<Vec<u8>>,
    device: Mutex<Device>,
    state: Mutex<Option<Vec<u8>>>,
    replayer: Replayer,
    replayed: AtomicUsize,
    /// Whether a drifting replayer has drifted yet.
    drifted: AtomicBool,
    /// Told when the first commands arrive.
    replaying: Mutex<Option<Sender<()>>>,
}

impl MigrationTarget for Target {
    fn write_ram(&self, gpa: u64, data: &[u8]) -> Result<(), VmError> {
        self.ram.lock().unwrap()[gpa as usize..gpa as usize + data.len()].copy_from_slice(data);
        Ok(())
    }

    fn sync_buffers(&self, table: &[DeviceBuffer]) -> Result<(), VmError> {
        let mut device = self.device.lock().unwrap();
        device.0.retain(|id, b| {
            table
                .iter()
                .any(|t| t.id == *id && t.bytes == b.len() as u64)
        });
        for t in table {
            device
                .0
                .entry(t.id)
                .or_insert_with(|| vec![0; t.bytes as usize]);
        }
        Ok(())
    }

    fn write_chunk(&self, chunk: ChunkKey, write: ChunkWrite<'_>) -> Result<(), VmError> {
        let (offset, data) = match write {
            ChunkWrite::Part { offset, data } => (offset, data),
            whole => (0, whole.whole(chunk)?),
        };
        let mut device = self.device.lock().unwrap();
        let buffer = device
            .0
            .get_mut(&chunk.buffer)
            .ok_or_else(|| VmError::SyncBuffers("no such buffer".into()))?;
        let start = (chunk.index * MAX_CHUNK_BYTES + offset) as usize;
        buffer[start..start + data.len()].copy_from_slice(data);
        Ok(())
    }

    fn restore(&self, state: &[u8]) -> Result<(), VmError> {
        *self.state.lock().unwrap() = Some(state.to_vec());
        Ok(())
    }

    fn resume(&self) -> Result<(), VmError> {
        Ok(())
    }

    fn can_replay(&self) -> bool {
        true
    }

    fn replay(&self, commands: Vec<LoggedCommand>, _deadline: Instant) -> Result<(), VmError> {
        if let Some(tell) = self.replaying.lock().unwrap().take() {
            let _ = tell.send(());
            // Give the test the time to cut the connection before this round ends.
            std::thread::sleep(Duration::from_millis(200));
        }
        let mut device = self.device.lock().unwrap();
        for cmd in &commands {
            if let Replayer::Slow(each) = self.replayer {
                std::thread::sleep(each);
            }
            let status = device.run(cmd);
            if status != cmd.status {
                return Err(VmError::Replay(
                    format!("status {status}, the source's {}", cmd.status).into(),
                ));
            }
        }
        if self.replayer == Replayer::Drifting && !self.drifted.swap(true, Ordering::SeqCst) {
            if let Some(b) = device.0.get_mut(&HOT_BUFFER) {
                b[7] ^= 1;
            }
        }
        self.replayed.fetch_add(commands.len(), Ordering::SeqCst);
        Ok(())
    }

    fn device_digest(&self) -> Result<DeviceDigest, VmError> {
        Ok(self.device.lock().unwrap().digest())
    }
}

struct Factory {
    replayer: Replayer,
    adopted: Mutex<Sender<Target>>,
    replaying: Mutex<Option<Sender<()>>>,
}

impl TargetFactory for Factory {
    type Target = Target;

    fn prepare(&self, vm: &VmDescription) -> Result<Target, VmError> {
        Ok(Target {
            ram: Mutex::new(vec![0; vm.ram_size as usize]),
            device: Mutex::default(),
            state: Mutex::default(),
            replayer: self.replayer,
            replayed: AtomicUsize::new(0),
            drifted: AtomicBool::new(false),
            replaying: Mutex::new(self.replaying.lock().unwrap().take()),
        })
    }

    fn adopt(&self, target: Target, _report: ReceiveReport) {
        let _ = self.adopted.lock().unwrap().send(target);
    }
}

struct Destination {
    addr: String,
    adopted: Receiver<Target>,
    replaying: Receiver<()>,
    _receiving: ferry_migrate::Receiving,
}

impl Destination {
    fn start(replayer: Replayer) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (tx, adopted) = channel();
        let (tell, replaying) = channel();
        let factory = Arc::new(Factory {
            replayer,
            adopted: Mutex::new(tx),
            replaying: Mutex::new(Some(tell)),
        });
        let receiving =
            spawn_receiver(listener, secret(), None, factory, Outcomes::default()).unwrap();
        Self {
            addr,
            adopted,
            replaying,
            _receiving: receiving,
        }
    }

    fn adopted(&self) -> Target {
        self.adopted
            .recv_timeout(Duration::from_secs(20))
            .expect("the destination adopted the VM")
    }

    fn nothing_adopted(&self) -> bool {
        self.adopted
            .recv_timeout(Duration::from_millis(300))
            .is_err()
    }
}

fn options(device: DeviceTransfer) -> MigrationOptions {
    MigrationOptions {
        device,
        max_precopy: Duration::from_secs(20),
        ..MigrationOptions::default()
    }
}

/// Options for a replay that must reach its switchover: a pause target this debug build,
/// sharing the machine's cores with the guest and both ends, always converges to (the
/// tests are of what moves, not of how fast).
fn reaching_switchover() -> MigrationOptions {
    MigrationOptions {
        downtime_target: Duration::from_millis(250),
        ..options(DeviceTransfer::Replay)
    }
}

/// Options for a replay that must reach its switchover at its first decision, even on a
/// loaded machine: a target it surely meets (one that gave way to pre-copy would move
/// the VM without the digest or the tail a test is about).
fn surely_reaching_switchover() -> MigrationOptions {
    MigrationOptions {
        downtime_target: Duration::from_secs(2),
        ..reaching_switchover()
    }
}

fn migrate(
    source: &Source,
    addr: &str,
    options: &MigrationOptions,
) -> Result<MigrationReport, MigrationError> {
    migrate_vm(source, addr, &secret(), options, &mut |_| {})
}

/// Migrates `source` to `dest`, which must adopt it holding exactly what the source held
/// at its pause; returns the report and the VM adopted.
fn migrate_whole(
    source: &Source,
    dest: &Destination,
    options: &MigrationOptions,
) -> (MigrationReport, Target) {
    let report = migrate(source, &dest.addr, options).unwrap();
    let target = dest.adopted();
    assert_moved_whole(source, &target);
    (report, target)
}

/// The destination holds exactly what the source held at its pause.
fn assert_moved_whole(source: &Source, target: &Target) {
    let (ram, device, step) = source.at_pause();
    assert!(step > 0);
    assert_eq!(*target.device.lock().unwrap(), device, "device memory");
    assert!(*target.ram.lock().unwrap() == ram, "guest RAM");
    assert_eq!(
        target.state.lock().unwrap().as_deref(),
        Some(format!("step {step}").as_bytes())
    );
}

#[test]
fn replay_moves_a_device_that_rewrites_itself_every_step_bit_for_bit() {
    let _serial = serial();
    // The base is read once the guest ran two steps past the boundary: commands follow.
    let source = Source::start(2);
    std::thread::sleep(Duration::from_millis(20));
    let dest = Destination::start(Replayer::Faithful);
    // A loaded machine may slow rounds of replay down for a while: this is of what
    // moves, so the pause target is one it meets however slow.
    let (report, target) = migrate_whole(&source, &dest, &surely_reaching_switchover());
    assert_eq!(report.device_transfer, "replay", "{:?}", report.replay);
    let replay = report.replay.expect("a replay report");
    assert!(replay.fell_back.is_none());
    assert!(replay.base_bytes >= HOT_BYTES + COLD_BYTES, "{replay:?}");
    assert!(replay.commands > 0 && replay.capture.commands_logged >= replay.commands);
    assert_eq!(
        target.replayed.load(Ordering::SeqCst) as u64,
        replay.commands,
        "every command sent was replayed once"
    );
    // After the base, no round resent a device chunk: the commands carried the device.
    assert!(report.round_log[1..].iter().all(|r| r.chunks == 0));
    assert!(report.round_log[1..].iter().any(|r| r.commands > 0));
    assert!(
        report.max_throttle_pct <= 30,
        "at most a light throttle while replay catches up"
    );
    assert!(
        !source.running(),
        "a migrated VM stays paused at the source"
    );
}

#[test]
fn auto_turns_to_replay_when_the_device_outruns_precopy_and_sends_only_what_changed() {
    let _serial = serial();
    // The base is read once the guest ran two steps past the boundary, so commands
    // follow it however the guest thread is scheduled.
    let source = Source::start(2);
    // 20 ms a chunk: about 12 MiB/s, while the hot buffer is rewritten every step.
    *source.chunk_read_delay.lock().unwrap() = Duration::from_millis(20);
    let dest = Destination::start(Replayer::Faithful);
    let mut options = options(DeviceTransfer::Auto);
    options.allow_longer_pause = true;
    let (report, _) = migrate_whole(&source, &dest, &options);
    assert!(
        report.device_transfer.starts_with("replay"),
        "{}",
        report.device_transfer
    );
    // Round 0 was pre-copy's: every chunk that holds data. Round 1, replay's base, sent
    // only the chunks changed since (not the cold buffer), and commands followed.
    let total = (HOT_BYTES + UPLOAD_BYTES + COLD_BYTES).div_ceil(MAX_CHUNK_BYTES);
    let (first, base) = (&report.round_log[0], &report.round_log[1]);
    assert!(first.chunks > HOT_BYTES / MAX_CHUNK_BYTES && first.commands == 0);
    assert!(
        base.commands == 0 && base.chunks + base.zero_chunks < total,
        "{base:?}"
    );
    let replay = report.replay.as_ref().unwrap();
    // Its bytes less the RAM the guest dirtied meanwhile (more in a release build, whose
    // guest runs faster): the changed buffers and record headers, not the cold buffer.
    let device_bytes = replay.base_bytes - base.pages * PAGE_SIZE;
    assert!(
        device_bytes < HOT_BYTES + UPLOAD_BYTES + COLD_BYTES / 2,
        "{replay:?} {base:?}"
    );
    assert!(
        report.round_log[2..].iter().any(|r| r.commands > 0),
        "{replay:?} {:?}",
        report.round_log
    );
}

#[test]
fn a_digest_that_differs_aborts_the_switchover_and_the_vm_runs_on_at_the_source() {
    let _serial = serial();
    let source = Source::start(0);
    let dest = Destination::start(Replayer::Drifting);
    let err = migrate(&source, &dest.addr, &surely_reaching_switchover())
        .expect_err("a drifting replay must not switch over");
    let text = ferry_migrate::error_chain(&err);
    assert!(
        text.contains("replayed device memory differs") && text.contains("buffer 1"),
        "{text}"
    );
    assert!(source.running(), "the VM runs on at the source");
    assert_eq!(source.resumes.load(Ordering::SeqCst), 1);
    assert!(dest.nothing_adopted());
    let before = source.steps();
    std::thread::sleep(Duration::from_millis(30));
    assert!(source.steps() > before, "and makes progress");
}

#[test]
fn a_side_pool_that_overflows_gives_way_to_precopy_and_the_vm_still_moves_whole() {
    let _serial = serial();
    // The base is read only after two steps rewrote the hot buffer: its four chunks
    // must be preserved, and the pool holds one.
    let source = Source::start(2);
    let dest = Destination::start(Replayer::Faithful);
    let mut options = options(DeviceTransfer::Replay);
    options.capture.pool_bytes = MAX_CHUNK_BYTES;
    options.allow_longer_pause = true;
    let (report, _) = migrate_whole(&source, &dest, &options);
    assert_eq!(report.device_transfer, "replay, then precopy");
    let replay = report.replay.unwrap();
    let why = replay.fell_back.unwrap();
    assert!(why.contains("side pool"), "{why}");
    assert_eq!(replay.capture.pool_peak_bytes, MAX_CHUNK_BYTES);
}

#[test]
fn a_digest_longer_than_the_pause_target_gives_way_to_precopy_before_the_pause() {
    let _serial = serial();
    let source = Source::start(0);
    // A device memory whose digest alone would outlast the pause target.
    *source.digest_time.lock().unwrap() = Duration::from_millis(1500);
    let dest = Destination::start(Replayer::Faithful);
    let (report, _) = migrate_whole(&source, &dest, &reaching_switchover());
    assert_eq!(report.device_transfer, "replay, then precopy");
    let replay = report.replay.unwrap();
    let why = replay.fell_back.unwrap();
    assert!(why.contains("digesting the device memory"), "{why}");
    // Given way before it began: no base was sent only to be sent again.
    assert_eq!(replay.base_bytes, 0, "{why}");
    assert!(
        report.downtime_ms < 1000.0,
        "paused {} ms",
        report.downtime_ms
    );
}

#[test]
fn a_longer_pause_allowed_replays_and_counts_the_digest_in_the_pause() {
    let _serial = serial();
    let source = Source::start(0);
    // Longer than the target: no round can bring the pause below the digest.
    *source.digest_time.lock().unwrap() = Duration::from_millis(2500);
    let dest = Destination::start(Replayer::Faithful);
    let mut options = surely_reaching_switchover();
    options.allow_longer_pause = true;
    let (report, _) = migrate_whole(&source, &dest, &options);
    assert_eq!(report.device_transfer, "replay", "{:?}", report.replay);
    assert!(
        report.downtime_ms >= 2500.0,
        "paused {} ms",
        report.downtime_ms
    );
}

#[test]
fn a_tail_lost_in_the_pause_gives_way_to_precopy_and_the_vm_still_moves_whole() {
    let _serial = serial();
    let source = Source::start(0);
    source.overflow_in_pause.store(true, Ordering::SeqCst);
    let dest = Destination::start(Replayer::Faithful);
    let mut options = surely_reaching_switchover();
    options.allow_longer_pause = true;
    let (report, _) = migrate_whole(&source, &dest, &options);
    assert_eq!(report.device_transfer, "replay, then precopy");
    let why = report.replay.unwrap().fell_back.unwrap();
    assert!(why.contains("overflowed just before the pause"), "{why}");
    // Paused for the tail, then resumed for pre-copy, then paused for good.
    assert_eq!(source.pauses.load(Ordering::SeqCst), 2);
    assert_eq!(source.resumes.load(Ordering::SeqCst), 1);
    assert!(
        !source.running(),
        "a migrated VM stays paused at the source"
    );
}

#[test]
fn a_tail_lost_past_the_switchover_deadline_fails_as_the_deadline_and_the_vm_runs_on() {
    let _serial = serial();
    let source = Source::start(0);
    source.overflow_in_pause.store(true, Ordering::SeqCst);
    // Past the pause target (2 s) and its margin (1 s), with room for a late watchdog.
    *source.tail_time.lock().unwrap() = Duration::from_millis(4000);
    let dest = Destination::start(Replayer::Faithful);
    let err = migrate(&source, &dest.addr, &surely_reaching_switchover())
        .expect_err("the deadline passed before the VM could resume for pre-copy");
    assert!(
        matches!(
            err,
            MigrationError::SwitchoverDeadline {
                deadline_ms: 3000,
                target_ms: 2000
            }
        ),
        "{}",
        ferry_migrate::error_chain(&err)
    );
    assert!(source.running(), "the VM runs on at the source");
    assert_eq!(source.resumes.load(Ordering::SeqCst), 1);
    assert!(dest.nothing_adopted());
}

#[test]
fn a_destination_that_falls_behind_gives_way_to_precopy() {
    let _serial = serial();
    let source = Source::start(0);
    // 8 ms per command while the source runs one every 0.7 ms or so, and every 3.7 ms
    // at the most throttle replay takes (30%): with 3 ms a throttled source let the
    // destination keep up now and then, and replay moved the VM.
    let dest = Destination::start(Replayer::Slow(Duration::from_millis(8)));
    let mut options = options(DeviceTransfer::Replay);
    options.allow_longer_pause = true;
    // Rounds of replay longer than the I/O timeout are waited for (the source allows
    // four times what it took to run them), not taken for a dead peer.
    options.io_timeout = Duration::from_millis(400);
    let started = Instant::now();
    let (report, _) = migrate_whole(&source, &dest, &options);
    let why = report.replay.unwrap().fell_back.unwrap();
    assert!(
        why.contains("falls behind") || why.contains("did not converge"),
        "{why}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "it never loops for ever"
    );
}

#[test]
fn auto_keeps_precopy_for_a_destination_that_cannot_replay_and_replay_is_refused_there() {
    let _serial = serial();
    // A destination without replay (the default of a target): auto pre-copies, replay
    // is refused at the handshake, before anything is sent.
    struct Plain(Target);
    impl MigrationTarget for Plain {
        fn write_ram(&self, gpa: u64, data: &[u8]) -> Result<(), VmError> {
            self.0.write_ram(gpa, data)
        }
        fn sync_buffers(&self, table: &[DeviceBuffer]) -> Result<(), VmError> {
            self.0.sync_buffers(table)
        }
        fn write_chunk(&self, chunk: ChunkKey, write: ChunkWrite<'_>) -> Result<(), VmError> {
            self.0.write_chunk(chunk, write)
        }
        fn restore(&self, state: &[u8]) -> Result<(), VmError> {
            self.0.restore(state)
        }
        fn resume(&self) -> Result<(), VmError> {
            Ok(())
        }
    }
    struct PlainFactory(Factory);
    impl TargetFactory for PlainFactory {
        type Target = Plain;
        fn prepare(&self, vm: &VmDescription) -> Result<Plain, VmError> {
            self.0.prepare(vm).map(Plain)
        }
        fn adopt(&self, target: Plain, report: ReceiveReport) {
            self.0.adopt(target.0, report);
        }
    }
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (tx, adopted) = channel();
    let factory = Arc::new(PlainFactory(Factory {
        replayer: Replayer::Faithful,
        adopted: Mutex::new(tx),
        replaying: Mutex::new(None),
    }));
    let _receiving =
        spawn_receiver(listener, secret(), None, factory, Outcomes::default()).unwrap();
    let source = Source::start(0);
    match migrate(&source, &addr, &options(DeviceTransfer::Replay)) {
        Err(MigrationError::Refused(why)) => assert!(why.contains("cannot replay"), "{why}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(source.running());
    let mut options = options(DeviceTransfer::Auto);
    options.allow_longer_pause = true;
    // After round 0, the guest runs some uploads before the engine takes the dirty set
    // again (a loaded machine could otherwise starve its thread until the pause).
    let mut after_round_0 = |p: &ferry_migrate::Progress| {
        if p.round == 0 {
            let goal = source.steps() + 8;
            let deadline = Instant::now() + Duration::from_secs(5);
            while source.steps() < goal && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    };
    let report = migrate_vm(&*source, &addr, &secret(), &options, &mut after_round_0).unwrap();
    assert_eq!(report.device_transfer, "precopy");
    assert!(report.replay.is_none());
    // The uploads wrote a page of a chunk: pre-copy sent that page, not the chunk.
    assert!(
        report.round_log.iter().any(|r| r.chunk_parts > 0),
        "{:?}",
        report.round_log
    );
    let target = adopted.recv_timeout(Duration::from_secs(20)).unwrap();
    assert_moved_whole(&source, &target);
}

/// A TCP relay between source and destination that can be cut.
struct Relay {
    addr: String,
    sockets: Arc<Mutex<Vec<TcpStream>>>,
}

impl Relay {
    fn to(upstream: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let sockets: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let kept = sockets.clone();
        let upstream = upstream.to_string();
        std::thread::spawn(move || {
            for down in listener.incoming().flatten() {
                let Ok(up) = TcpStream::connect(&upstream) else {
                    continue;
                };
                let mut all = kept.lock().unwrap();
                all.push(down.try_clone().unwrap());
                all.push(up.try_clone().unwrap());
                drop(all);
                for (mut from, mut to) in [
                    (down.try_clone().unwrap(), up.try_clone().unwrap()),
                    (up, down),
                ] {
                    std::thread::spawn(move || {
                        let mut buf = vec![0u8; 64 << 10];
                        while let Ok(n) = from.read(&mut buf) {
                            if n == 0 || to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = to.shutdown(Shutdown::Both);
                    });
                }
            }
        });
        Self { addr, sockets }
    }

    fn cut(&self) {
        for socket in self.sockets.lock().unwrap().iter() {
            let _ = socket.shutdown(Shutdown::Both);
        }
    }
}

#[test]
fn a_destination_cut_off_mid_replay_leaves_the_vm_running_on_the_source() {
    let _serial = serial();
    let source = Source::start(0);
    let dest = Destination::start(Replayer::Faithful);
    let relay = Relay::to(&dest.addr);
    let migrating = std::thread::scope(|scope| {
        let migration =
            scope.spawn(|| migrate(&source, &relay.addr, &options(DeviceTransfer::Replay)));
        dest.replaying
            .recv_timeout(Duration::from_secs(20))
            .expect("the destination began replaying");
        relay.cut();
        migration.join().unwrap()
    });
    let err = migrating.expect_err("a cut migration fails");
    assert!(
        !matches!(err, MigrationError::InDoubt { .. }),
        "cut before the switchover: {err}"
    );
    assert!(source.running(), "the VM runs on at the source: {err}");
    assert!(dest.nothing_adopted());
    // The capture ended with the migration: the next one starts a fresh one.
    assert!(source.lock().capture.is_none());
}
