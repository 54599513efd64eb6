//! One vCPU: entry setup, the run loop, state save/restore, and the thread that runs it.
//!
//! The thread owns the `VcpuFd`. The VMM talks to it with [`VcpuRequest`]s and hears back
//! [`VcpuEvent`]s. To pause a vCPU that is inside `KVM_RUN`, the VMM sends `Pause` and
//! kicks the thread with a signal until it answers `Paused`: the signal makes `KVM_RUN`
//! return `EINTR`, and the loop checks for requests before every `KVM_RUN`. Re-kicking
//! covers the signal that lands just before the thread enters `KVM_RUN`.

use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::{Arc, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferry_migrate::wire::at_most;
use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Cap, Kvm, VcpuExit, VcpuFd};
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::arch::layout::{RING0_STACK_ADDR, RING0_STACK_TOP};
use crate::arch::regs;
use crate::arch::tables::{vector_name, FaultFrame, FAULT_FRAME_WORDS};
use crate::devices::{PortAction, PortDevices};
use crate::memory::GuestRam;

/// MSRs saved with a vCPU, when the host's KVM lists them. The TSC is what matters for
/// guests reading `rdtsc`; the rest is what a 64-bit guest may have set.
const SAVED_MSRS: [u32; 12] = [
    0x10,        // IA32_TSC
    0x174,       // IA32_SYSENTER_CS
    0x175,       // IA32_SYSENTER_ESP
    0x176,       // IA32_SYSENTER_EIP
    0x1a0,       // IA32_MISC_ENABLE
    0x277,       // IA32_PAT
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // SYSCALL_MASK
    0xc000_0102, // KERNEL_GS_BASE
    0xc000_0103, // TSC_AUX
];

/// DR7's local and global enables of the four breakpoints.
const DR7_BREAKPOINTS_ENABLED: u64 = 0xff;
/// DR7's general-detect bit: a debug exception on any access to the debug registers.
const DR7_GENERAL_DETECT: u64 = 1 << 13;

/// Checks that a saved vCPU state leaves the VMM's ring 0 as the VMM set it up: the same
/// control registers, descriptor tables and task register as at entry, no way into
/// ring 0 other than the VMM's fault stubs (SYSENTER off, as SYSCALL is by EFER; no
/// debug breakpoints), code at ring 3 but while in those stubs, and only the MSRs this
/// VMM saves. A guest at ring 3 can change none of these, so a state that does was not
/// saved by a VMM.
fn owned_state_is_ours(state: &VcpuState) -> Result<(), String> {
    use crate::arch::tables::{KERNEL_CODE_SELECTOR, USER_CODE_SELECTOR};
    let s = &state.sregs;
    let entry = regs::entry_sregs(*s);
    let control = [
        ("CR0", s.cr0, entry.cr0),
        ("CR3", s.cr3, entry.cr3),
        ("CR4", s.cr4, entry.cr4),
        ("EFER", s.efer, entry.efer),
        ("GDT base", s.gdt.base, entry.gdt.base),
        ("GDT limit", s.gdt.limit.into(), entry.gdt.limit.into()),
        ("IDT base", s.idt.base, entry.idt.base),
        ("IDT limit", s.idt.limit.into(), entry.idt.limit.into()),
        ("TR base", s.tr.base, entry.tr.base),
        (
            "TR selector",
            s.tr.selector.into(),
            entry.tr.selector.into(),
        ),
        // It bounds the I/O permission bitmap read from the TSS page.
        ("TR limit", s.tr.limit.into(), entry.tr.limit.into()),
    ];
    if let Some((what, got, want)) = control.iter().find(|(_, got, want)| got != want) {
        return Err(format!("{what} is {got:#x}, not {want:#x}"));
    }
    // KVM takes an LDT present and usable as loaded whatever its selector: its call gates
    // would lead into ring 0.
    if s.ldt.unusable == 0 && (s.ldt.selector != 0 || s.ldt.present != 0) {
        return Err("an LDT is loaded".into());
    }
    // Ring 0 runs only the fault stubs (a pause may land in them): at one of their
    // instructions, on the ring-0 stack within the frame they build (their pushes could
    // otherwise write over the code ahead of them).
    let frame_bottom = RING0_STACK_TOP - (FAULT_FRAME_WORDS * 8) as u64;
    let in_stubs = crate::arch::tables::fault_stub_instructions().contains(&state.regs.rip)
        && (frame_bottom..=RING0_STACK_TOP).contains(&state.regs.rsp);
    let code_ok = match (s.cs.selector, s.cs.dpl) {
        (USER_CODE_SELECTOR, 3) => s.ss.dpl == 3,
        (KERNEL_CODE_SELECTOR, 0) => in_stubs && s.ss.dpl == 0,
        _ => false,
    };
    // KVM loads a code segment's hidden part as given, not from the GDT, whose code
    // segments are both 64-bit: one in compatibility mode (L clear) adds its base to every
    // fetch, so the stubs' addresses would run code from anywhere in guest RAM at ring 0.
    const CODE_TYPE: u8 = 0x8;
    let cs = &s.cs;
    if cs.l != 1 || cs.db != 0 || cs.s != 1 || cs.present != 1 || cs.type_ & CODE_TYPE == 0 {
        return Err(format!(
            "the code segment is not a present 64-bit one (L {}, D {}, S {}, P {}, type {:#x})",
            cs.l, cs.db, cs.s, cs.present, cs.type_
        ));
    }
    // Only ring 0 writes debug registers: an enabled breakpoint (or the trap on their
    // access) was not set by a guest, and would stop ring 0 where the file says.
    let dr7 = state.debug_regs.dr7;
    if dr7 & (DR7_BREAKPOINTS_ENABLED | DR7_GENERAL_DETECT) != 0 {
        return Err(format!("debug breakpoints are enabled (DR7 {dr7:#x})"));
    }
    // System management mode runs its own code at ring 0's privilege.
    let smi = &state.vcpu_events.smi;
    if smi.smm != 0 || smi.pending != 0 {
        return Err("system management mode is entered or pending".into());
    }
    if !code_ok {
        return Err(format!(
            "code selector {:#x} at privilege {} (stack at {}), rip {:#x}",
            s.cs.selector, s.cs.dpl, s.ss.dpl, state.regs.rip
        ));
    }
    for msr in &state.msrs {
        if !SAVED_MSRS.contains(&msr.index) {
            return Err(format!("MSR {:#x} is not one this VMM saves", msr.index));
        }
        // SYSENTER with a code selector would enter ring 0 where it says.
        if msr.index == 0x174 && msr.data != 0 {
            return Err(format!(
                "SYSENTER is enabled (code selector {:#x})",
                msr.data
            ));
        }
    }
    Ok(())
}

/// Size of `struct kvm_xsave`: the only XSAVE layout this VMM saves and restores.
const KVM_XSAVE_SIZE: i32 = 4096;

/// Everything KVM holds for one vCPU, in a form that serializes.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// CPUID the vCPU was created with (restored first: it shapes XSAVE and MSRs).
    #[serde(deserialize_with = "at_most::<_, _, KVM_MAX_CPUID_ENTRIES>")]
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Multiprocessing state.
    pub mp_state: kvm_mp_state,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
    /// x87/SSE/AVX state.
    pub xsave: kvm_xsave,
    /// Extended control registers (XCR0).
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debug_regs: kvm_debugregs,
    /// The MSRs of `SAVED_MSRS` this host supports.
    #[serde(deserialize_with = "at_most::<_, _, { SAVED_MSRS.len() }>")]
    pub msrs: Vec<kvm_msr_entry>,
    /// Pending exceptions and interrupt shadow (restored last).
    pub vcpu_events: kvm_vcpu_events,
}

/// Errors setting up a vCPU or moving its state.
#[derive(Debug, thiserror::Error)]
pub enum VcpuStateError {
    /// `ioctl` named by `what` failed.
    #[error("{what} failed")]
    Ioctl {
        /// The KVM call.
        what: &'static str,
        /// What KVM said.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM handled fewer MSRs than asked.
    #[error("KVM {what} handled {done} of {wanted} MSRs (first unhandled: {first:#x})")]
    MsrCount {
        /// `KVM_GET_MSRS` or `KVM_SET_MSRS`.
        what: &'static str,
        /// How many it handled.
        done: usize,
        /// How many were asked.
        wanted: usize,
        /// Index of the first MSR it did not handle.
        first: u32,
    },
    /// State the VMM owns (ring 0's tables and entry points) is not the VMM's own (a
    /// forged snapshot).
    #[error("the vCPU state would change what the VMM owns: {0}")]
    NotOurs(String),
    /// Too many CPUID entries or MSRs to fit KVM's tables (bad snapshot).
    #[error("too many {what} entries ({count})")]
    TooMany {
        /// CPUID or MSR.
        what: &'static str,
        /// Entries in the state.
        count: usize,
    },
    /// The host's XSAVE area is larger than `struct kvm_xsave` (e.g. AMX).
    #[error("host XSAVE area is {size} bytes; only {KVM_XSAVE_SIZE} is supported")]
    XsaveTooLarge {
        /// Size KVM requires.
        size: i32,
    },
    /// The vCPU thread is gone.
    #[error("the vCPU thread is gone")]
    ThreadGone,
    /// A state was asked of a running vCPU.
    #[error("the vCPU must be paused to save its state")]
    NotPaused,
}

fn ioctl<T>(what: &'static str, r: Result<T, kvm_ioctls::Error>) -> Result<T, VcpuStateError> {
    r.map_err(|source| VcpuStateError::Ioctl { what, source })
}

/// Why a vCPU stopped running the guest for good.
#[derive(Debug, thiserror::Error)]
pub enum VcpuRunError {
    /// `KVM_RUN` itself failed.
    #[error("KVM_RUN failed")]
    Run(#[source] kvm_ioctls::Error),
    /// The guest took an exception; the fault stub reported it.
    #[error("guest fault: {0}")]
    GuestFault(Box<FaultReport>),
    /// The guest faulted while handling a fault (no usable report).
    #[error("guest triple fault (KVM_EXIT_SHUTDOWN)\n{0}")]
    TripleFault(Box<RegisterDump>),
    /// Ring-3 code wrote the port reserved for the VMM's fault stubs.
    #[error("guest wrote the reserved fault port from ring 3\n{0}")]
    SpoofedFault(Box<RegisterDump>),
    /// A fault was reported but its frame is not where the stub leaves it.
    #[error("guest fault with an unreadable fault frame\n{0}")]
    BadFaultFrame(Box<RegisterDump>),
    /// An exit this VMM does not handle.
    #[error("unexpected VM exit: {0}")]
    UnexpectedExit(String),
    /// Registers could not be read to build a report.
    #[error("cannot read vCPU registers for the fault report")]
    Registers(#[source] VcpuStateError),
    /// The VMM's own vCPU thread panicked (a bug in the VMM, not the guest's doing).
    #[error("the VMM's vCPU thread panicked: {0}")]
    Panicked(String),
}

/// The registers of a stopped vCPU, for error reports.
#[derive(Debug, Clone)]
pub struct RegisterDump {
    regs: kvm_regs,
    cr2: u64,
    cpl: u8,
}

impl std::fmt::Display for RegisterDump {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let r = &self.regs;
        writeln!(
            f,
            "  rip={:#018x} rsp={:#018x} rflags={:#x} cpl={} cr2={:#x}",
            r.rip, r.rsp, r.rflags, self.cpl, self.cr2
        )?;
        let named = [
            ("rax", r.rax),
            ("rbx", r.rbx),
            ("rcx", r.rcx),
            ("rdx", r.rdx),
            ("rsi", r.rsi),
            ("rdi", r.rdi),
            ("rbp", r.rbp),
            ("r8", r.r8),
            ("r9", r.r9),
            ("r10", r.r10),
            ("r11", r.r11),
            ("r12", r.r12),
            ("r13", r.r13),
            ("r14", r.r14),
            ("r15", r.r15),
        ];
        write_named(f, &named)
    }
}

fn write_named(f: &mut std::fmt::Formatter<'_>, regs: &[(&str, u64)]) -> std::fmt::Result {
    for row in regs.chunks(4) {
        write!(f, " ")?;
        for (name, value) in row {
            write!(f, " {name:>3}={value:#018x}")?;
        }
        writeln!(f)?;
    }
    Ok(())
}

/// An exception taken by the guest, as its fault stub saved it.
#[derive(Debug, Clone)]
pub struct FaultReport {
    /// The saved frame.
    pub frame: FaultFrame,
    /// CR2 (the faulting address, for page faults).
    pub cr2: u64,
}

impl std::fmt::Display for FaultReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let fr = &self.frame;
        writeln!(
            f,
            "{} (vector {}, error code {:#x}) at rip {:#x} in ring {}",
            vector_name(fr.vector),
            fr.vector,
            fr.error_code,
            fr.rip,
            fr.cs & 3
        )?;
        if fr.vector == 14 {
            let access = match (fr.error_code & 0x10 != 0, fr.error_code & 0x2 != 0) {
                (true, _) => "instruction fetch",
                (false, true) => "write",
                (false, false) => "read",
            };
            let why = if fr.error_code & 1 != 0 {
                "protection violation"
            } else {
                "page not mapped"
            };
            writeln!(f, "  {access} of address {:#x}: {why}", self.cr2)?;
        }
        writeln!(f, "  rsp={:#018x} rflags={:#x}", fr.rsp, fr.rflags)?;
        write_named(f, &fr.named_gprs())
    }
}

/// What one `KVM_RUN` exit asks of the run loop.
/// Most exits a pause handles to complete the access the guest was in (pieces of one
/// string access): beyond, the state is saved mid-access.
const MAX_FINISHING_EXITS: usize = 64;

enum Step {
    Continue,
    Exit(i32),
    Fault,
    Shutdown,
    Unexpected(String),
}

/// A vCPU and what it needs to handle exits.
pub struct Vcpu {
    index: usize,
    fd: VcpuFd,
    devices: Arc<PortDevices>,
    memory: GuestRam,
}

impl Vcpu {
    /// Creates vCPU `index` of `vm`.
    pub fn new(
        vm: &kvm_ioctls::VmFd,
        index: usize,
        devices: Arc<PortDevices>,
        memory: GuestRam,
    ) -> Result<Self, VcpuStateError> {
        let fd = ioctl("KVM_CREATE_VCPU", vm.create_vcpu(index as u64))?;
        Ok(Self {
            index,
            fd,
            devices,
            memory,
        })
    }

    /// Sets the entry state: the host's supported CPUID, long mode in ring 3 at `entry`.
    pub fn configure_entry(
        &self,
        kvm: &Kvm,
        entry: u64,
        stack_top: u64,
    ) -> Result<(), VcpuStateError> {
        let cpuid = ioctl(
            "KVM_GET_SUPPORTED_CPUID",
            kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES),
        )?;
        ioctl("KVM_SET_CPUID2", self.fd.set_cpuid2(&cpuid))?;
        ioctl(
            "KVM_SET_REGS",
            self.fd.set_regs(&regs::entry_regs(entry, stack_top)),
        )?;
        let sregs = ioctl("KVM_GET_SREGS", self.fd.get_sregs())?;
        ioctl(
            "KVM_SET_SREGS",
            self.fd.set_sregs(&regs::entry_sregs(sregs)),
        )?;
        ioctl("KVM_SET_FPU", self.fd.set_fpu(&regs::entry_fpu()))
    }

    fn saved_msr_indices(kvm: &Kvm) -> Result<Vec<u32>, VcpuStateError> {
        let supported = ioctl("KVM_GET_MSR_INDEX_LIST", kvm.get_msr_index_list())?;
        Ok(SAVED_MSRS
            .into_iter()
            .filter(|i| supported.as_slice().contains(i))
            .collect())
    }

    fn check_xsave_size(kvm: &Kvm) -> Result<(), VcpuStateError> {
        let size = kvm.check_extension_int(Cap::Xsave2);
        if size > KVM_XSAVE_SIZE {
            return Err(VcpuStateError::XsaveTooLarge { size });
        }
        Ok(())
    }

    /// Saves the vCPU state. The vCPU must be out of `KVM_RUN` (paused).
    ///
    /// Order as Firecracker does it: MP state first, vCPU events last, so that nothing
    /// read later is disturbed by the reads before it.
    pub fn save_state(&self, kvm: &Kvm) -> Result<VcpuState, VcpuStateError> {
        Self::check_xsave_size(kvm)?;
        let mp_state = ioctl("KVM_GET_MP_STATE", self.fd.get_mp_state())?;
        let regs = ioctl("KVM_GET_REGS", self.fd.get_regs())?;
        let sregs = ioctl("KVM_GET_SREGS", self.fd.get_sregs())?;
        let xsave = ioctl("KVM_GET_XSAVE", self.fd.get_xsave())?;
        let xcrs = ioctl("KVM_GET_XCRS", self.fd.get_xcrs())?;
        let debug_regs = ioctl("KVM_GET_DEBUGREGS", self.fd.get_debug_regs())?;
        let cpuid = ioctl("KVM_GET_CPUID2", self.fd.get_cpuid2(KVM_MAX_CPUID_ENTRIES))?;
        let indices = Self::saved_msr_indices(kvm)?;
        let entries: Vec<kvm_msr_entry> = indices
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| VcpuStateError::TooMany {
            what: "MSR",
            count: entries.len(),
        })?;
        let done = ioctl("KVM_GET_MSRS", self.fd.get_msrs(&mut msrs))?;
        if done != entries.len() {
            return Err(VcpuStateError::MsrCount {
                what: "KVM_GET_MSRS",
                done,
                wanted: entries.len(),
                first: entries[done].index,
            });
        }
        let vcpu_events = ioctl("KVM_GET_VCPU_EVENTS", self.fd.get_vcpu_events())?;
        Ok(VcpuState {
            cpuid: cpuid.as_slice().to_vec(),
            mp_state,
            regs,
            sregs,
            xsave,
            xcrs,
            debug_regs,
            msrs: msrs.as_slice().to_vec(),
            vcpu_events,
        })
    }

    /// Restores a saved state into this (fresh) vCPU.
    ///
    /// CPUID first (it decides which XSAVE features and MSRs exist), then MP state,
    /// registers, XSAVE, XCRs, debug registers, MSRs, and vCPU events last.
    pub fn restore_state(&self, kvm: &Kvm, state: &VcpuState) -> Result<(), VcpuStateError> {
        owned_state_is_ours(state).map_err(VcpuStateError::NotOurs)?;
        Self::check_xsave_size(kvm)?;
        let cpuid = CpuId::from_entries(&state.cpuid).map_err(|_| VcpuStateError::TooMany {
            what: "CPUID",
            count: state.cpuid.len(),
        })?;
        ioctl("KVM_SET_CPUID2", self.fd.set_cpuid2(&cpuid))?;
        ioctl("KVM_SET_MP_STATE", self.fd.set_mp_state(state.mp_state))?;
        ioctl("KVM_SET_REGS", self.fd.set_regs(&state.regs))?;
        ioctl("KVM_SET_SREGS", self.fd.set_sregs(&state.sregs))?;
        // SAFETY: check_xsave_size ensured KVM's XSAVE area is no larger than the
        // `kvm_xsave` struct it reads from, so the kernel stays inside `state.xsave`.
        ioctl("KVM_SET_XSAVE", unsafe { self.fd.set_xsave(&state.xsave) })?;
        ioctl("KVM_SET_XCRS", self.fd.set_xcrs(&state.xcrs))?;
        ioctl(
            "KVM_SET_DEBUGREGS",
            self.fd.set_debug_regs(&state.debug_regs),
        )?;
        let msrs = Msrs::from_entries(&state.msrs).map_err(|_| VcpuStateError::TooMany {
            what: "MSR",
            count: state.msrs.len(),
        })?;
        let done = ioctl("KVM_SET_MSRS", self.fd.set_msrs(&msrs))?;
        if done != state.msrs.len() {
            return Err(VcpuStateError::MsrCount {
                what: "KVM_SET_MSRS",
                done,
                wanted: state.msrs.len(),
                first: state.msrs[done].index,
            });
        }
        ioctl(
            "KVM_SET_VCPU_EVENTS",
            self.fd.set_vcpu_events(&state.vcpu_events),
        )
    }

    fn register_dump(&self) -> Result<RegisterDump, VcpuRunError> {
        let regs = ioctl("KVM_GET_REGS", self.fd.get_regs()).map_err(VcpuRunError::Registers)?;
        let sregs = ioctl("KVM_GET_SREGS", self.fd.get_sregs()).map_err(VcpuRunError::Registers)?;
        Ok(RegisterDump {
            regs,
            cr2: sregs.cr2,
            cpl: sregs.cs.dpl,
        })
    }

    /// Builds the error for a write to the fault port, reading the stub's frame.
    fn fault_error(&self) -> VcpuRunError {
        let dump = match self.register_dump() {
            Ok(dump) => dump,
            Err(e) => return e,
        };
        if dump.cpl != 0 {
            return VcpuRunError::SpoofedFault(Box::new(dump));
        }
        let rsp = dump.regs.rsp;
        let frame_end = rsp.checked_add((FAULT_FRAME_WORDS * 8) as u64);
        if rsp < RING0_STACK_ADDR || frame_end.is_none_or(|end| end > RING0_STACK_TOP) {
            return VcpuRunError::BadFaultFrame(Box::new(dump));
        }
        let mut words = [0u64; FAULT_FRAME_WORDS];
        for (i, word) in words.iter_mut().enumerate() {
            match self
                .memory
                .read_obj::<u64>(GuestAddress(rsp + 8 * i as u64))
            {
                Ok(value) => *word = value,
                Err(_) => return VcpuRunError::BadFaultFrame(Box::new(dump)),
            }
        }
        VcpuRunError::GuestFault(Box::new(FaultReport {
            frame: FaultFrame::from_words(&words),
            cr2: dump.cr2,
        }))
    }

    /// Runs the guest until the next exit and handles it. `Ok(Some(code))` when the
    /// guest asked to exit.
    fn run_once(&mut self) -> Result<Option<i32>, VcpuRunError> {
        self.enter().map(|(exit, _)| exit)
    }

    /// Completes the port access the last exit handed to this thread, without running
    /// further guest instructions (`immediate_exit`): KVM finishes an access (steps
    /// past an OUT, puts an IN's value in its register) only when next entered, and its
    /// pending part is in no state userspace can save, so a state saved before would
    /// have the guest write the port again or lose what it read. A string access may
    /// exit again for its next piece; those are handled, a bounded number of them.
    fn finish_exit(&mut self) -> Result<Option<i32>, VcpuRunError> {
        for _ in 0..MAX_FINISHING_EXITS {
            self.fd.set_kvm_immediate_exit(1);
            let entered = self.enter();
            self.fd.set_kvm_immediate_exit(0);
            match entered? {
                (None, false) => continue,
                (exit, _) => return Ok(exit),
            }
        }
        Ok(None)
    }

    /// One `KVM_RUN` and its exit handled: the guest's exit code if it asked to exit,
    /// and whether the run was interrupted before any exit.
    fn enter(&mut self) -> Result<(Option<i32>, bool), VcpuRunError> {
        let mut interrupted = false;
        let step = match self.fd.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                match self.devices.io_out(&self.memory, port, data) {
                    PortAction::Continue => Step::Continue,
                    PortAction::Exit(code) => Step::Exit(code),
                    PortAction::FaultReported => Step::Fault,
                }
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                self.devices.io_in(self.index, port, data);
                Step::Continue
            }
            Ok(VcpuExit::Intr) => Step::Continue,
            Ok(VcpuExit::Shutdown) => Step::Shutdown,
            Ok(other) => Step::Unexpected(format!("{other:?}")),
            // A kick (pause request) or a spurious wake-up: go check the requests.
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                interrupted = true;
                Step::Continue
            }
            Err(e) => return Err(VcpuRunError::Run(e)),
        };
        match step {
            Step::Continue => Ok((None, interrupted)),
            Step::Exit(code) => Ok((Some(code), interrupted)),
            Step::Fault => Err(self.fault_error()),
            Step::Shutdown => Err(VcpuRunError::TripleFault(Box::new(self.register_dump()?))),
            Step::Unexpected(what) => Err(VcpuRunError::UnexpectedExit(what)),
        }
    }
}

/// What the VMM asks of a vCPU thread.
#[derive(Debug)]
pub enum VcpuRequest {
    /// Leave `KVM_RUN` and wait.
    Pause,
    /// Run again.
    Resume,
    /// Reply with the vCPU state (paused only).
    SaveState,
    /// End the thread.
    Stop,
}

/// What a vCPU thread tells the VMM.
#[derive(Debug)]
pub enum VcpuEvent {
    /// Out of `KVM_RUN`, waiting.
    Paused,
    /// The state asked for with [`VcpuRequest::SaveState`].
    State(Box<Result<VcpuState, VcpuStateError>>),
    /// The guest ended with this code; the thread has ended.
    Exited(i32),
    /// The guest cannot continue; the thread has ended.
    Failed(VcpuRunError),
}

/// Signal used to kick a vCPU thread out of `KVM_RUN`.
fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Nothing to do: being delivered is what makes KVM_RUN return EINTR.
}

/// The VMM's side of a running vCPU thread.
pub struct VcpuHandle {
    thread: Option<JoinHandle<()>>,
    /// The thread's Linux id.
    tid: libc::pid_t,
    requests: Sender<VcpuRequest>,
    events: Receiver<VcpuEvent>,
}

impl VcpuHandle {
    /// Starts the thread for `vcpu`, paused.
    pub fn spawn(vcpu: Vcpu, kvm: Arc<Kvm>) -> std::io::Result<Self> {
        static HANDLER: Once = Once::new();
        HANDLER.call_once(|| {
            register_signal_handler(kick_signal(), on_kick)
                .expect("register the vCPU kick signal handler");
        });
        let (requests, request_rx) = mpsc::channel();
        let (event_tx, events) = mpsc::channel();
        let (tid_tx, tid_rx) = mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{}", vcpu.index))
            .spawn(move || {
                // SAFETY: gettid has no preconditions and touches no memory.
                let _ = tid_tx.send(unsafe { libc::gettid() });
                let ends = event_tx.clone();
                reporting_panics(&ends, || vcpu_thread(vcpu, &kvm, request_rx, event_tx));
            })?;
        let tid = tid_rx
            .recv()
            .map_err(|_| std::io::Error::other("the vCPU thread ended as it started"))?;
        Ok(Self {
            thread: Some(thread),
            tid,
            requests,
            events,
        })
    }

    fn send(&self, request: VcpuRequest) -> Result<(), VcpuStateError> {
        self.requests
            .send(request)
            .map_err(|_| VcpuStateError::ThreadGone)
    }

    /// The thread's Linux id.
    pub fn tid(&self) -> libc::pid_t {
        self.tid
    }

    /// Asks the thread to run.
    pub fn resume(&self) -> Result<(), VcpuStateError> {
        self.send(VcpuRequest::Resume)
    }

    /// Asks the thread to pause, kicking it until it answers. Returns the event that
    /// ended the wait: `Paused`, or `Exited`/`Failed` if the guest ended first.
    pub fn pause(&self) -> Result<VcpuEvent, VcpuStateError> {
        if self.send(VcpuRequest::Pause).is_err() {
            // The thread ended on its own (the guest exited a moment ago): its end is
            // the answer, not lost with it.
            return std::iter::from_fn(|| self.events.try_recv().ok())
                .find(|e| matches!(e, VcpuEvent::Exited(_) | VcpuEvent::Failed(_)))
                .ok_or(VcpuStateError::ThreadGone);
        }
        loop {
            self.kick();
            match self.events.recv_timeout(Duration::from_millis(1)) {
                Ok(event) => return Ok(event),
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => return Err(VcpuStateError::ThreadGone),
            }
        }
    }

    /// Asks a paused thread for its vCPU state.
    pub fn save_state(&self) -> Result<VcpuState, VcpuStateError> {
        self.send(VcpuRequest::SaveState)?;
        loop {
            match self.events.recv() {
                Ok(VcpuEvent::State(state)) => return *state,
                Ok(_) => continue,
                Err(_) => return Err(VcpuStateError::ThreadGone),
            }
        }
    }

    /// Waits for the guest to end, at most `timeout` (forever if `None`). Returns the
    /// `Exited`/`Failed` event, or `None` on timeout.
    pub fn wait_end(&self, timeout: Option<Duration>) -> Option<VcpuEvent> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            let event = match deadline {
                None => self.events.recv().ok()?,
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    match self.events.recv_timeout(left) {
                        Ok(event) => event,
                        Err(RecvTimeoutError::Timeout) => return None,
                        Err(RecvTimeoutError::Disconnected) => return None,
                    }
                }
            };
            if matches!(event, VcpuEvent::Exited(_) | VcpuEvent::Failed(_)) {
                return Some(event);
            }
        }
    }

    fn kick(&self) {
        if let Some(thread) = &self.thread {
            // The thread may have just ended: nothing to kick then.
            let _ = thread.kill(kick_signal());
        }
    }
}

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        let _ = self.requests.send(VcpuRequest::Stop);
        if let Some(thread) = self.thread.take() {
            // Kicked until it ends, as a pause is: a kick that lands between the thread's
            // look at its requests and its entry into the guest is spent on neither.
            while !thread.is_finished() {
                let _ = thread.kill(kick_signal());
                std::thread::sleep(Duration::from_millis(1));
            }
            let _ = thread.join();
        }
    }
}

fn vcpu_thread(
    mut vcpu: Vcpu,
    kvm: &Kvm,
    requests: Receiver<VcpuRequest>,
    events: Sender<VcpuEvent>,
) {
    let mut running = false;
    loop {
        let request = if running {
            match requests.try_recv() {
                Ok(request) => Some(request),
                Err(TryRecvError::Empty) => None,
                Err(TryRecvError::Disconnected) => return,
            }
        } else {
            match requests.recv() {
                Ok(request) => Some(request),
                Err(_) => return,
            }
        };
        let reply = match request {
            None => None,
            Some(VcpuRequest::Stop) => return,
            Some(VcpuRequest::Pause) if running => {
                running = false;
                if sent_end(&events, vcpu.finish_exit()) {
                    return;
                }
                Some(VcpuEvent::Paused)
            }
            Some(VcpuRequest::Pause) => Some(VcpuEvent::Paused),
            // Nobody waits for a resume: no reply.
            Some(VcpuRequest::Resume) => {
                running = true;
                None
            }
            Some(VcpuRequest::SaveState) if running => {
                Some(VcpuEvent::State(Box::new(Err(VcpuStateError::NotPaused))))
            }
            Some(VcpuRequest::SaveState) => Some(VcpuEvent::State(Box::new(vcpu.save_state(kvm)))),
        };
        if let Some(event) = reply {
            if events.send(event).is_err() {
                return;
            }
        }
        if !running {
            continue;
        }
        if sent_end(&events, vcpu.run_once()) {
            return;
        }
    }
}

/// Runs a vCPU thread's `body`, reporting a panic in it as the guest's failure: without
/// the report a pause waiting on the thread learnt only that it was gone, and the VM was
/// left "running" with its other vCPUs paused.
fn reporting_panics(events: &Sender<VcpuEvent>, body: impl FnOnce()) {
    if let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)) {
        let message = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".into());
        let _ = events.send(VcpuEvent::Failed(VcpuRunError::Panicked(message)));
    }
}

/// Sends the guest's end if `ran` (a run's outcome) is one; whether it was.
fn sent_end(events: &Sender<VcpuEvent>, ran: Result<Option<i32>, VcpuRunError>) -> bool {
    let end = match ran {
        Ok(None) => return false,
        Ok(Some(code)) => VcpuEvent::Exited(code),
        Err(e) => VcpuEvent::Failed(e),
    };
    let _ = events.send(end);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_on_a_vcpu_thread_is_reported_as_the_guests_failure() {
        let (events, ended) = mpsc::channel();
        let thread = std::thread::spawn(move || {
            reporting_panics(&events, || panic!("a port handler's bug"));
        });
        thread.join().expect("the panic was caught");
        match ended.try_recv() {
            Ok(VcpuEvent::Failed(VcpuRunError::Panicked(message))) => {
                assert_eq!(message, "a port handler's bug");
            }
            other => panic!("not a failure: {other:?}"),
        }
        // A thread that ends as it should reports nothing more.
        let (events, ended) = mpsc::channel();
        reporting_panics(&events, || {});
        assert!(ended.try_recv().is_err());
    }
}
