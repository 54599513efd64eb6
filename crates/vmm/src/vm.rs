//! One microVM: KVM VM, guest RAM, port devices and vCPU threads, with its lifecycle
//! (boot, run, pause, resume, save, restore) as explicit states.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_abi::accel::RING_REGION_SIZE;
use ferry_abi::file::{FileTable, FILE_TABLE_ADDR};
use ferry_abi::{
    encode_args, BootInfo, ABI_VERSION, ARGS_CAPACITY, BOOT_INFO_ADDR, BOOT_INFO_MAGIC, STACK_SIZE,
};
use ferry_accel::backend::{self, Backend, DeviceMemory};
use ferry_accel::device::{AccelState, AccelStateError, Accelerator, BusyClock, DeviceTracker};
use ferry_migrate::cpu::{joined, native_cpu_features};
use ferry_migrate::wire::at_most;
use ferry_migrate::CpuidWord;
use kvm_ioctls::{Kvm, VmFd};
use serde::{Deserialize, Serialize};
use vm_memory::{ByteValued, Bytes, GuestAddress};

use crate::arch;
use crate::devices::channel::Channel;
use crate::devices::console::{ConsoleSink, ConsoleTail};
use crate::devices::{DeviceStates, PortDevices};
use crate::files::{AttachError, AttachedFiles, FileInfo};
use crate::loader::{load_image, LoadImageError, LoadedImage};
use crate::memory::{
    self, create_guest_ram, register_ram, DirtyLog, GuestRam, MemoryError, PageSet,
};
use crate::priority::{self, at_guest_priority, Lifted, Preempting};
use crate::snapshot::{SnapshotError, SnapshotStats};
use crate::vcpu::{Vcpu, VcpuEvent, VcpuHandle, VcpuRunError, VcpuState, VcpuStateError};

/// Least heap a guest gets; an image leaving less is refused.
const MIN_HEAP: u64 = 1 << 20;
/// Largest accelerator memory profile.
pub const MAX_ACCEL_MEMORY: u64 = 64 << 30;

/// The shape of a VM: what must match between a snapshot and the VM restoring it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    /// Bytes of guest RAM.
    pub ram_size: u64,
    /// Number of vCPUs (1 for now).
    pub vcpus: u8,
    /// Bytes of accelerator memory (the profile); 0 for a VM without an accelerator.
    pub accel_memory: u64,
}

impl VmConfig {
    /// A single-vCPU VM with `ram_size` bytes of RAM and no accelerator.
    pub const fn new(ram_size: u64) -> Self {
        Self {
            ram_size,
            vcpus: 1,
            accel_memory: 0,
        }
    }

    /// The same VM with an accelerator of `bytes` of device memory.
    pub const fn with_accel(self, bytes: u64) -> Self {
        Self {
            accel_memory: bytes,
            ..self
        }
    }

    /// Refuses a shape no VM can have: vCPUs other than one, a RAM size the memory
    /// layout cannot hold, device memory not whole pages or above [`MAX_ACCEL_MEMORY`].
    pub fn validate(&self) -> Result<(), CreateVmError> {
        if self.vcpus != 1 {
            return Err(CreateVmError::UnsupportedVcpus(self.vcpus));
        }
        memory::validate_ram_size(self.ram_size)?;
        if !self.accel_memory.is_multiple_of(ferry_abi::PAGE_SIZE)
            || self.accel_memory > MAX_ACCEL_MEMORY
        {
            return Err(CreateVmError::AccelMemory(self.accel_memory));
        }
        Ok(())
    }
}

/// What a pause is for, which sets what it does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PauseKind {
    /// One the host waits on (a switchover, a snapshot): requests sent meanwhile are
    /// refused, as the VM's state may become another host's, and the VM's threads are
    /// lifted to the caller's priority until they stop, so the kernel in flight ends at it.
    Waited,
    /// A migration throttle's: the VM runs on here, so requests are queued, and its
    /// threads keep the guest's priority. The throttle is there to leave the CPU to the
    /// host's other work (the copy, a destination's replay beside it): lifted, the kernel
    /// in flight would take that CPU first, and a throttle could not slow the VM.
    Throttle,
}

/// How a pause went.
#[derive(Debug, Clone, Copy)]
pub struct Paused {
    /// When the VM stopped making progress: its device had ended the command in flight
    /// (the vCPUs ran beside it), and its vCPUs were then stopped.
    pub stopped_at: Instant,
    /// How long the pause took from its call: mostly the device's command in flight.
    pub took: Duration,
}

/// What this host gives a VM, which is not part of its state: where its console goes,
/// how many threads its accelerator backend may use and at what priority its threads run.
pub struct HostOptions {
    /// Console output.
    pub console: ConsoleSink,
    /// Accelerator backend threads (results do not depend on it).
    pub accel_threads: usize,
    /// Host memory for the accelerator's buffers, shared by the host's VMs.
    pub device_memory: DeviceMemory,
    /// Nice value (0-19) of the VM's threads: vCPUs, the accelerator's device and
    /// compute threads. A host daemon runs them below its own threads, so busy guests
    /// cannot starve its API or a migration's copy.
    pub guest_nice: i32,
    /// The read-only files attached to the VM (its state records their names, sizes and
    /// hashes; a restored VM must be given the same content).
    pub files: AttachedFiles,
    /// The accelerator backend kind of VMs booted here (`backend::resolve` gives it).
    pub backend: &'static str,
}

impl HostOptions {
    /// Console kept in memory only; accelerator threads = available cores.
    pub fn quiet() -> Self {
        Self {
            console: ConsoleSink::None,
            accel_threads: default_accel_threads(),
            device_memory: DeviceMemory::default(),
            guest_nice: 0,
            files: AttachedFiles::default(),
            backend: backend::CPU,
        }
    }

    /// Console on stdout; accelerator threads = available cores.
    pub fn stdout() -> Self {
        Self {
            console: ConsoleSink::Stdout,
            ..Self::quiet()
        }
    }
}

/// Available host cores.
pub fn default_accel_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Version of [`MicrovmState`]'s encoding: raise it with any change to that type or the
/// types inside it (migrations compare it at the handshake).
/// 2: the message channel in [`DeviceStates`].
/// 3: a channel stream keeps only what its reader has not let go of.
/// 4: a queued channel request is an opening, a control message or a release notice.
pub const STATE_VERSION: u32 = 4;

/// A whole paused VM, less its RAM: what a snapshot (and later a migration) carries.
#[derive(Debug, Serialize, Deserialize)]
pub struct MicrovmState {
    /// ABI version the guest was started with.
    pub abi_version: u32,
    /// VM shape.
    pub config: VmConfig,
    /// One state per vCPU (the config counts them in a `u8`).
    #[serde(deserialize_with = "at_most::<_, _, { u8::MAX as usize }>")]
    pub vcpus: Vec<VcpuState>,
    /// Port devices.
    pub devices: DeviceStates,
    /// The accelerator, if the VM has one (buffer contents travel separately).
    pub accel: Option<AccelState>,
    /// The attached files (their contents are the host's to provide).
    #[serde(deserialize_with = "at_most::<_, _, { ferry_abi::file::MAX_FILES }>")]
    pub files: Vec<FileInfo>,
}

/// Where a VM is in its life.
#[derive(Debug)]
pub enum RunState {
    /// vCPUs out of `KVM_RUN`, state consistent: can be saved or resumed.
    Paused,
    /// vCPUs running the guest.
    Running,
    /// The guest ended with this code.
    Exited(i32),
    /// The guest cannot continue.
    Failed,
}

/// How a guest ended.
#[derive(Debug)]
pub enum VmExit {
    /// The guest wrote this code to the exit port.
    Exited(i32),
    /// The guest faulted or KVM failed.
    Failed(VcpuRunError),
}

impl std::fmt::Display for VmExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmExit::Exited(code) => write!(f, "exited with code {code}"),
            VmExit::Failed(e) => write!(f, "failed: {e}"),
        }
    }
}

/// Errors creating a VM (boot or restore).
#[derive(Debug, thiserror::Error)]
pub enum CreateVmError {
    /// `/dev/kvm` could not be opened.
    #[error("cannot open /dev/kvm (is KVM available, and may this user read and write it?)")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// KVM refused to create a VM.
    #[error("KVM_CREATE_VM failed")]
    CreateVm(#[source] kvm_ioctls::Error),
    /// Only single-vCPU VMs exist yet.
    #[error("{0} vCPUs requested: this version runs single-vCPU VMs only")]
    UnsupportedVcpus(u8),
    /// Guest RAM.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The guest image.
    #[error(transparent)]
    Image(#[from] LoadImageError),
    /// Arguments too long for the boot-info page.
    #[error("guest arguments do not fit the boot-info page ({ARGS_CAPACITY} bytes, NUL-separated) or contain a NUL byte")]
    ArgsTooLong,
    /// Writing the system pages or boot info failed.
    #[error("cannot write the boot pages into guest RAM")]
    WriteBootPages(#[source] vm_memory::GuestMemoryError),
    /// Setting up or restoring a vCPU failed.
    #[error("vCPU setup failed")]
    Vcpu(#[source] VcpuStateError),
    /// The vCPU thread could not start.
    #[error("cannot start the vCPU thread")]
    SpawnVcpu(#[source] std::io::Error),
    /// The snapshot could not be read.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// The accelerator profile is out of range.
    #[error("accelerator memory {0} bytes is invalid: it must be a multiple of 4 KiB, at most {max} GiB", max = MAX_ACCEL_MEMORY >> 30)]
    AccelMemory(u64),
    /// The accelerator could not be created or restored.
    #[error("cannot set up the accelerator")]
    Accel(#[source] AccelStateError),
    /// The accelerator device thread could not start.
    #[error("cannot start the accelerator thread")]
    SpawnAccel(#[source] std::io::Error),
    /// The snapshot's state does not describe a VM this VMM can build.
    #[error("snapshot is incompatible: {0}")]
    Incompatible(String),
    /// This host has not the accelerator backend the VM needs.
    #[error(transparent)]
    Backend(#[from] backend::BackendUnavailable),
    /// The attached files could not be opened, or are not the VM's.
    #[error("attached files")]
    Files(#[source] AttachError),
    /// The files given are not the ones the VM was started with.
    #[error("the attached files do not match the VM's: {0}")]
    FilesDiffer(String),
}

/// Errors pausing, resuming or saving a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmControlError {
    /// The operation needs another run state.
    #[error("the VM is {state:?}; {op} needs it {needs}")]
    WrongState {
        /// The operation.
        op: &'static str,
        /// Current state.
        state: String,
        /// What it needs.
        needs: &'static str,
    },
    /// A vCPU did not cooperate.
    #[error(transparent)]
    Vcpu(#[from] VcpuStateError),
    /// Writing the snapshot failed.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// Dirty-page tracking failed.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The accelerator's memory was torn by a replay cut short; no guest may run on it,
    /// and no snapshot or migration may keep it.
    #[error("the VM cannot run or be saved: its accelerator is torn")]
    AcceleratorTorn(#[source] ferry_accel::replay::TornMemory),
}

/// A VM being filled before it first runs (the receiving side of a migration, or a
/// snapshot restore): RAM and accelerator exist and take contents; the vCPUs and port
/// devices come from the final state in [`IncomingVm::finish`].
pub struct IncomingVm {
    kvm: Arc<Kvm>,
    vm: VmFd,
    memory: GuestRam,
    config: VmConfig,
    accel: Option<Accelerator>,
    host: HostOptions,
    /// The CPU features its guest has seen before it came here.
    cpu_seen: Vec<CpuidWord>,
}

impl IncomingVm {
    /// RAM and (if `config` has one) an accelerator on backend `backend_kind`, empty,
    /// for a VM whose guest has seen the CPU features `cpu_seen`.
    pub fn new(
        config: VmConfig,
        backend_kind: Option<&str>,
        cpu_seen: &[CpuidWord],
        host: HostOptions,
    ) -> Result<Self, CreateVmError> {
        if let Some(why) = ferry_migrate::cpu::refusal(cpu_seen, native_cpu_features()) {
            return Err(CreateVmError::Incompatible(why));
        }
        let (kvm, vm, memory) = open_vm(&config)?;
        let accel = match (config.accel_memory, backend_kind) {
            (0, None) => None,
            (capacity, Some(kind)) if capacity > 0 => {
                Some(at_guest_priority(host.guest_nice, || {
                    let backend = create_backend(kind, &host)?;
                    let empty = AccelState {
                        backend_kind: backend.kind().to_string(),
                        kernel_version: backend.kernel_version(),
                        capacity,
                        // Where a booted VM's ring is; the real one comes with the
                        // device's final state.
                        ring_gpa: ring_gpa(config.ram_size),
                        tail: 0,
                        buffers: Vec::new(),
                    };
                    Accelerator::restore(
                        memory.clone(),
                        &empty,
                        backend,
                        Arc::new(host.files.clone()),
                    )
                    .map_err(CreateVmError::Accel)
                })?)
            }
            _ => return Err(accel_disagrees()),
        };
        Ok(Self {
            kvm,
            vm,
            memory,
            config,
            accel,
            host,
            cpu_seen: cpu_seen.to_vec(),
        })
    }

    /// Guest RAM to fill.
    pub fn memory(&self) -> &GuestRam {
        &self.memory
    }

    /// The accelerator to fill (paused; sync its buffer table first).
    pub fn accel(&self) -> Option<&Accelerator> {
        self.accel.as_ref()
    }

    /// The attached files it was made with.
    pub fn files(&self) -> &AttachedFiles {
        &self.host.files
    }

    /// Gives the VM its attached files, once they are all on this host (before
    /// [`Self::finish`], which checks them against the VM's state).
    pub fn attach_files(&mut self, files: AttachedFiles) {
        if let Some(accel) = &self.accel {
            accel.set_files(Arc::new(files.clone()));
        }
        self.host.files = files;
    }

    /// The VM, paused, with vCPUs and devices from `state`. Every check (ABI, shape, the
    /// device's buffer table, KVM accepting the vCPU state) happens here.
    pub fn finish(self, state: &MicrovmState) -> Result<Microvm, CreateVmError> {
        if state.abi_version != ABI_VERSION {
            return Err(CreateVmError::Incompatible(format!(
                "guest ABI version {} (this ferry runs version {ABI_VERSION})",
                state.abi_version
            )));
        }
        if state.config != self.config || state.vcpus.len() != usize::from(state.config.vcpus) {
            return Err(CreateVmError::Incompatible(
                "VM state disagrees with the VM shape".into(),
            ));
        }
        if let Some(why) = self.host.files.mismatch(&state.files) {
            return Err(CreateVmError::FilesDiffer(why));
        }
        match (&self.accel, &state.accel) {
            (Some(accel), Some(saved)) => accel.apply_state(saved).map_err(CreateVmError::Accel)?,
            (None, None) => {}
            _ => return Err(accel_disagrees()),
        }
        // The VMM's own pages as the VMM writes them, whatever the state's RAM held there
        // (a snapshot is a file: its page tables, GDT, IDT, TSS and stubs are not trusted).
        arch::write_system_pages(&self.memory, self.config.ram_size)
            .map_err(CreateVmError::WriteBootPages)?;
        let (kvm, guest_nice) = (self.kvm, self.host.guest_nice);
        let devices = Arc::new(PortDevices::restore(
            self.host.console,
            &state.devices,
            (state.vcpus.len(), &self.memory),
            self.accel,
            self.host.files,
        ));
        let mut vcpus = Vec::with_capacity(state.vcpus.len());
        for (index, vcpu_state) in state.vcpus.iter().enumerate() {
            let vcpu = Vcpu::new(&self.vm, index, devices.clone(), self.memory.clone())
                .map_err(CreateVmError::Vcpu)?;
            vcpu.restore_state(&kvm, vcpu_state)
                .map_err(CreateVmError::Vcpu)?;
            let handle = at_guest_priority(guest_nice, || VcpuHandle::spawn(vcpu, kvm.clone()));
            vcpus.push(handle.map_err(CreateVmError::SpawnVcpu)?);
        }
        // From here on its guest may see this CPU too.
        let cpu_features = joined(&self.cpu_seen, native_cpu_features());
        Ok(Microvm::paused(
            vcpus,
            devices,
            self.vm,
            self.memory,
            self.config,
            cpu_features,
            guest_nice,
        ))
    }
}

/// A microVM on KVM.
pub struct Microvm {
    // Field order is drop order: vCPU threads end before the VM fd and RAM go away.
    vcpus: Vec<VcpuHandle>,
    devices: Arc<PortDevices>,
    /// Shared with [`VmTracker`]s, which read its dirty log while a migration runs.
    vm: Arc<VmFd>,
    memory: GuestRam,
    config: VmConfig,
    /// The CPU features its guest has seen (what its destinations must have).
    cpu_features: Vec<CpuidWord>,
    /// The nice value its threads run at.
    guest_nice: i32,
    state: RunState,
    exit: Option<VmExit>,
}

/// A page of the ABI (boot info, file table) as guest memory sees it.
#[derive(Clone, Copy)]
#[repr(transparent)]
struct AbiPage<T>(T);

// SAFETY: BootInfo is repr(C) with only integer fields and no padding (the abi crate
// asserts it is exactly one page), so every byte pattern is a valid value.
unsafe impl ByteValued for AbiPage<BootInfo> {}

// SAFETY: FileTable is repr(C) with only integer fields and byte arrays and no padding
// (u64, u32, u32, then entries of 56 bytes and a u64), so every byte pattern is valid.
unsafe impl ByteValued for AbiPage<FileTable> {}

/// A VM shape and an accelerator state that do not go together.
fn accel_disagrees() -> CreateVmError {
    CreateVmError::Incompatible("accelerator state disagrees with the VM shape".into())
}

/// A backend of `kind` on this host, or the error naming what it has.
fn create_backend(kind: &str, host: &HostOptions) -> Result<Box<dyn Backend>, CreateVmError> {
    Ok(backend::create(
        kind,
        host.accel_threads,
        &host.device_memory,
    )?)
}

fn open_vm(config: &VmConfig) -> Result<(Arc<Kvm>, VmFd, GuestRam), CreateVmError> {
    config.validate()?;
    let kvm = Kvm::new().map_err(CreateVmError::OpenKvm)?;
    let vm = kvm.create_vm().map_err(CreateVmError::CreateVm)?;
    let memory = create_guest_ram(config.ram_size)?;
    register_ram(&vm, &memory, false)?;
    Ok((Arc::new(kvm), vm, memory))
}

/// What other threads read of a VM without its control, holding none of its memory: the
/// console's tail and the accelerator's load (both still readable once the VM is gone).
#[derive(Clone)]
pub struct VmReadout {
    console: ConsoleTail,
    accel_busy: Option<BusyClock>,
    channel: Channel,
}

impl VmReadout {
    /// Console output kept so far (the last 64 KiB).
    pub fn console_tail(&self) -> String {
        self.console.text()
    }

    /// Time the accelerator has spent executing commands (zero without one).
    pub fn accel_busy_time(&self) -> Duration {
        self.accel_busy
            .as_ref()
            .map_or(Duration::ZERO, BusyClock::busy_time)
    }

    /// The VM's message channel.
    pub fn channel(&self) -> &Channel {
        &self.channel
    }
}

/// What a migration tracks of a running VM from its own threads, without its control:
/// dirty RAM pages, RAM contents, and the accelerator's [`DeviceTracker`]. It keeps the
/// VM's RAM and KVM VM alive while it exists.
#[derive(Clone)]
pub struct VmTracker {
    vm: Arc<VmFd>,
    memory: GuestRam,
    accel: Option<DeviceTracker>,
}

impl VmTracker {
    fn dirty_log(&self) -> DirtyLog<'_> {
        DirtyLog::new(&self.vm, &self.memory)
    }

    /// Guest RAM.
    pub fn memory(&self) -> &GuestRam {
        &self.memory
    }

    /// The accelerator's tracker, if the VM has one.
    pub fn accel(&self) -> Option<&DeviceTracker> {
        self.accel.as_ref()
    }

    /// Starts dirty-page tracking of guest RAM.
    pub fn start_dirty_log(&self) -> Result<(), VmControlError> {
        Ok(self.dirty_log().start()?)
    }

    /// Stops dirty-page tracking.
    pub fn stop_dirty_log(&self) -> Result<(), VmControlError> {
        Ok(self.dirty_log().stop()?)
    }

    /// Pages written since the last take (or since tracking started), and clears them.
    pub fn take_dirty_pages(&self) -> Result<PageSet, VmControlError> {
        Ok(self.dirty_log().take()?)
    }
}

/// Where the accelerator ring of a VM with `ram_size` bytes of RAM sits: just below the
/// stack (the heap ends below it).
fn ring_gpa(ram_size: u64) -> u64 {
    ram_size - STACK_SIZE - RING_REGION_SIZE
}

impl Microvm {
    /// Builds a VM running `image` with `args`, paused before its first instruction.
    pub fn boot(
        config: VmConfig,
        image: &[u8],
        args: &[String],
        host: HostOptions,
    ) -> Result<Self, CreateVmError> {
        let (kvm, vm, memory) = open_vm(&config)?;
        let stack_top = config.ram_size;
        let ring_gpa = ring_gpa(config.ram_size);
        let heap_end = if config.accel_memory > 0 {
            ring_gpa
        } else {
            stack_top - STACK_SIZE
        };
        let LoadedImage { entry, end } = load_image(&memory, image, heap_end - MIN_HEAP)?;

        let mut boot = AbiPage(BootInfo::EMPTY);
        let (argc, args_len) = encode_args(args.iter().map(String::as_str), &mut boot.0.args)
            .ok_or(CreateVmError::ArgsTooLong)?;
        boot.0.magic = BOOT_INFO_MAGIC;
        boot.0.abi_version = ABI_VERSION;
        boot.0.argc = argc;
        boot.0.args_len = args_len;
        boot.0.ram_size = config.ram_size;
        boot.0.heap_start = end;
        boot.0.heap_end = heap_end;
        boot.0.stack_top = stack_top;
        let accel = if config.accel_memory > 0 {
            boot.0.accel_ring = ring_gpa;
            let accel = at_guest_priority(host.guest_nice, || {
                let backend = create_backend(host.backend, &host)?;
                let files = Arc::new(host.files.clone());
                Accelerator::boot(
                    memory.clone(),
                    ring_gpa,
                    config.accel_memory,
                    backend,
                    files,
                )
                .map_err(CreateVmError::SpawnAccel)
            })?;
            Some(accel)
        } else {
            None
        };
        arch::write_system_pages(&memory, config.ram_size)
            .map_err(CreateVmError::WriteBootPages)?;
        memory
            .write_obj(boot, GuestAddress(BOOT_INFO_ADDR))
            .map_err(CreateVmError::WriteBootPages)?;
        memory
            .write_obj(AbiPage(host.files.table()), GuestAddress(FILE_TABLE_ADDR))
            .map_err(CreateVmError::WriteBootPages)?;

        let devices = Arc::new(PortDevices::new(
            host.console,
            usize::from(config.vcpus),
            accel,
            host.files,
        ));
        let vcpu =
            Vcpu::new(&vm, 0, devices.clone(), memory.clone()).map_err(CreateVmError::Vcpu)?;
        vcpu.configure_entry(&kvm, entry, stack_top)
            .map_err(CreateVmError::Vcpu)?;
        let handle = at_guest_priority(host.guest_nice, || VcpuHandle::spawn(vcpu, kvm.clone()))
            .map_err(CreateVmError::SpawnVcpu)?;
        Ok(Self::paused(
            vec![handle],
            devices,
            vm,
            memory,
            config,
            native_cpu_features().to_vec(),
            host.guest_nice,
        ))
    }

    /// Rebuilds a VM from a snapshot file, paused. Every check (format, checksum, sizes,
    /// KVM accepting the vCPU state, the attached files' content) happens before the VM
    /// can run. Attached files come from `host.files`, or when that is empty from the
    /// paths the snapshot recorded.
    pub fn restore(path: &Path, host: HostOptions) -> Result<(Self, SnapshotStats), CreateVmError> {
        crate::snapshot::restore(path, host)
    }

    /// A freshly built VM, paused, before its vCPUs first run.
    fn paused(
        vcpus: Vec<VcpuHandle>,
        devices: Arc<PortDevices>,
        vm: VmFd,
        memory: GuestRam,
        config: VmConfig,
        cpu_features: Vec<CpuidWord>,
        guest_nice: i32,
    ) -> Self {
        if devices.accel.is_some() {
            for vcpu in &vcpus {
                priority::woken_without_preempting(vcpu.tid());
            }
        }
        Self {
            vcpus,
            devices,
            vm: Arc::new(vm),
            memory,
            config,
            cpu_features,
            guest_nice,
            state: RunState::Paused,
            exit: None,
        }
    }

    /// The VM's shape.
    pub fn config(&self) -> VmConfig {
        self.config
    }

    /// The CPU features its guest has seen: those of every CPU it has run on.
    pub fn cpu_features(&self) -> &[CpuidWord] {
        &self.cpu_features
    }

    /// Guest RAM (writes through it are tracked as dirty).
    pub fn memory(&self) -> &GuestRam {
        &self.memory
    }

    /// Current run state.
    pub fn run_state(&self) -> &RunState {
        &self.state
    }

    /// What other threads read of the VM without its control: console and load.
    pub fn readout(&self) -> VmReadout {
        VmReadout {
            console: self.devices.console.tail_handle(),
            accel_busy: self.devices.accel.as_ref().map(Accelerator::busy_clock),
            channel: self.devices.channel.clone(),
        }
    }

    /// What a migration tracks of the VM from its own threads while the VM runs.
    pub fn tracker(&self) -> VmTracker {
        VmTracker {
            vm: self.vm.clone(),
            memory: self.memory.clone(),
            accel: self.devices.accel.as_ref().map(Accelerator::tracker),
        }
    }

    /// Console output kept so far (the last 64 KiB).
    pub fn console_tail(&self) -> String {
        self.devices.console.tail_text()
    }

    /// Time the accelerator has spent executing commands here (zero without one).
    pub fn accel_busy_time(&self) -> Duration {
        self.devices
            .accel
            .as_ref()
            .map_or(Duration::ZERO, Accelerator::busy_time)
    }

    /// Guest clock now, in ns.
    pub fn guest_time_ns(&self) -> u64 {
        self.devices.clock.now_ns()
    }

    fn wrong_state(&self, op: &'static str, needs: &'static str) -> VmControlError {
        VmControlError::WrongState {
            op,
            state: format!("{:?}", self.state),
            needs,
        }
    }

    /// Runs a paused VM; one whose accelerator a replay tore stays paused, whole
    /// ([`VmControlError::AcceleratorTorn`]).
    pub fn resume(&mut self) -> Result<(), VmControlError> {
        if !matches!(self.state, RunState::Paused) {
            return Err(self.wrong_state("resume", "paused"));
        }
        // The device first: a torn one leaves the whole VM paused, clock included.
        if let Some(accel) = &self.devices.accel {
            accel.resume().map_err(VmControlError::AcceleratorTorn)?;
        }
        self.devices.clock.start();
        self.devices.channel.open();
        for vcpu in &self.vcpus {
            vcpu.resume()?;
        }
        self.state = RunState::Running;
        Ok(())
    }

    /// Pauses a running VM: the accelerator at a command boundary, then the vCPUs at
    /// whatever instruction they are on. If the guest ended meanwhile, the VM is
    /// `Exited`/`Failed` instead.
    pub fn pause(&mut self) -> Result<Paused, VmControlError> {
        self.pause_with(PauseKind::Waited)
    }

    /// Pauses a running VM for a migration's throttle: as [`Self::pause`] does, but its
    /// channel goes on queueing requests (the VM runs on here, and no other host takes
    /// its state before [`Self::refuse_requests`]), and its threads keep the guest's
    /// priority: the throttle leaves the CPU to the host's other work.
    pub fn pause_for_throttle(&mut self) -> Result<Paused, VmControlError> {
        self.pause_with(PauseKind::Throttle)
    }

    /// Refuses the requests sent to a VM paused by [`Self::pause_for_throttle`]
    /// from now on (until it resumes), as [`Self::pause`] would have: its state may
    /// become another host's.
    pub fn refuse_requests(&self) {
        self.devices.channel.pause();
    }

    fn pause_with(&mut self, kind: PauseKind) -> Result<Paused, VmControlError> {
        if !matches!(self.state, RunState::Running) {
            return Err(self.wrong_state("pause", "running"));
        }
        let started = Instant::now();
        let waited = kind == PauseKind::Waited;
        // The device first, to its command boundary, while the vCPUs run on: the command
        // in flight is the VM's progress, so the VM stops only once it ended. A vCPU
        // waiting for it is let go then; one that queues more waits behind it, as it
        // would without a pause, and they run at the resume (here or on another host).
        if let Some(accel) = &self.devices.accel {
            let _lifted = waited.then(|| Lifted::to_callers(accel.host_threads(), self.guest_nice));
            accel.pause();
        }
        let stopped_at = Instant::now();
        // From here on the VM's state may become another host's: requests queued later
        // would be lost with this copy, so they are refused (to be sent again). Not
        // before: a request refused is part of the pause.
        if waited {
            self.devices.channel.pause();
        }
        let vcpus = || self.vcpus.iter().map(VcpuHandle::tid);
        let _lifted = waited.then(|| Lifted::to_callers(vcpus(), self.guest_nice));
        let _preempting = Preempting::vcpus(vcpus());
        // A vCPU that cannot be stopped (its thread gone) fails the pause: the device and
        // the channel run again (vCPUs stopped before it stay stopped).
        let running_again = || {
            self.devices.channel.open();
            if let Some(accel) = &self.devices.accel {
                let _ = accel.resume();
            }
        };
        for vcpu in &self.vcpus {
            let event = vcpu.pause().inspect_err(|_| running_again())?;
            match event {
                VcpuEvent::Paused => {}
                event => {
                    self.record_end(event);
                    return Err(self.wrong_state("pause", "running"));
                }
            }
        }
        self.devices.clock.stop();
        self.state = RunState::Paused;
        Ok(Paused {
            stopped_at,
            took: started.elapsed(),
        })
    }

    /// Ends the accelerator for good without waiting for its command in flight (see
    /// [`Accelerator::abort`]): only for a VM about to be dropped, whose device work no one
    /// will read (its pause then waits for no kernel). Dropping the VM does it too.
    pub fn abort_accel(&self) {
        if let Some(accel) = &self.devices.accel {
            // As a pause does: a guest run at a low priority does not stretch the wait.
            let _lifted = Lifted::to_callers(self.host_threads(), self.guest_nice);
            let _preempting = Preempting::vcpus(self.vcpus.iter().map(VcpuHandle::tid));
            accel.abort();
        }
    }

    /// The Linux ids of the host threads the VM runs on: vCPUs and accelerator kernels.
    fn host_threads(&self) -> Vec<libc::pid_t> {
        let mut tids: Vec<libc::pid_t> = self.vcpus.iter().map(VcpuHandle::tid).collect();
        if let Some(accel) = &self.devices.accel {
            tids.extend(accel.host_threads());
        }
        tids
    }

    fn record_end(&mut self, event: VcpuEvent) {
        self.devices.clock.stop();
        self.devices.channel.end();
        let exit = match event {
            VcpuEvent::Exited(code) => VmExit::Exited(code),
            VcpuEvent::Failed(e) => VmExit::Failed(e),
            other => unreachable!("not an end event: {other:?}"),
        };
        self.state = match exit {
            VmExit::Exited(code) => RunState::Exited(code),
            VmExit::Failed(_) => RunState::Failed,
        };
        self.exit = Some(exit);
    }

    /// Waits until the guest ends, at most `timeout` (`None`: forever). Returns how it
    /// ended, or `None` if it is still running at the timeout.
    pub fn wait(&mut self, timeout: Option<Duration>) -> Option<VmExit> {
        if let Some(exit) = self.exit.take() {
            return Some(exit);
        }
        if !matches!(self.state, RunState::Running) {
            return None;
        }
        let event = self.vcpus[0].wait_end(timeout)?;
        self.record_end(event);
        self.exit.take()
    }

    /// The complete state of a paused VM, less RAM.
    pub fn save_state(&self) -> Result<MicrovmState, VmControlError> {
        if !matches!(self.state, RunState::Paused) {
            return Err(self.wrong_state("save", "paused"));
        }
        let vcpus = self
            .vcpus
            .iter()
            .map(VcpuHandle::save_state)
            .collect::<Result<_, _>>()?;
        Ok(MicrovmState {
            abi_version: ABI_VERSION,
            config: self.config,
            vcpus,
            devices: self.devices.save(),
            accel: self
                .devices
                .accel
                .as_ref()
                .map(Accelerator::save_state)
                .transpose()
                .map_err(VmControlError::AcceleratorTorn)?,
            files: self.devices.files.infos(),
        })
    }

    /// Saves a paused VM to a snapshot file, atomically.
    pub fn save(&self, path: &Path) -> Result<SnapshotStats, VmControlError> {
        crate::snapshot::save(self, path)
    }

    /// The VM's accelerator, if it has one (dirty chunks, chunk reads and writes).
    pub fn accel(&self) -> Option<&Accelerator> {
        self.devices.accel.as_ref()
    }

    /// The VM's attached files.
    pub fn files(&self) -> &AttachedFiles {
        &self.devices.files
    }
}
