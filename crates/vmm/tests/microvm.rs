//! End-to-end tests of the microVM on real KVM, with the built-in guests.
//!
//! Each test returns early when `/dev/kvm` cannot be opened, after writing the reason
//! straight to stderr (not through the captured `eprintln!`), so a machine without KVM
//! shows it in the test output instead of passing silently.

use std::time::{Duration, Instant};

use ferry_vmm::vcpu::VcpuRunError;
use ferry_vmm::vm::CreateVmError;
use ferry_vmm::{HostOptions, Microvm, RunState, VmConfig, VmExit};
use vm_memory::{Bytes, GuestAddress};

const CONFIG: VmConfig = VmConfig::new(128 << 20);
const TIMEOUT: Duration = Duration::from_secs(60);

fn image(name: &str) -> &'static [u8] {
    ferry_guest_images::find(name)
        .unwrap_or_else(|| panic!("no built-in guest {name}"))
        .elf
}

fn boot(name: &str, args: &[&str]) -> Microvm {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let mut vm = Microvm::boot(CONFIG, image(name), &args, HostOptions::quiet()).expect("boot");
    vm.resume().expect("resume");
    vm
}

fn run_to_end(name: &str, args: &[&str]) -> (VmExit, String) {
    let mut vm = boot(name, args);
    let exit = vm.wait(Some(TIMEOUT)).expect("guest did not end in time");
    (exit, vm.console_tail())
}

fn checksum(console: &str) -> String {
    console
        .lines()
        .find_map(|l| l.strip_prefix("checksum="))
        .unwrap_or_else(|| panic!("no checksum line in:\n{console}"))
        .to_string()
}

#[test]
fn hello_prints_its_arguments_and_exit_code() {
    ferry_testdata::require_kvm!();
    let (exit, console) = run_to_end("hello", &["alpha", "two words", "--exit-code", "7"]);
    assert!(matches!(exit, VmExit::Exited(7)), "{exit:?}");
    assert!(console.contains("hello from a ferry guest"), "{console}");
    assert!(
        console.contains("arg[0]=alpha\narg[1]=two words\n"),
        "{console}"
    );
}

fn expect_fault(mode: &str, vector: u64, needle: &str) {
    let (exit, _) = run_to_end("faults", &[mode]);
    let VmExit::Failed(VcpuRunError::GuestFault(report)) = exit else {
        panic!("{mode}: expected a guest fault, got {exit:?}");
    };
    assert_eq!(report.frame.vector, vector, "{mode}");
    assert_eq!(
        report.frame.cs & 3,
        3,
        "{mode}: the fault is the workload's, in ring 3"
    );
    let text = VcpuRunError::GuestFault(report).to_string();
    assert!(
        text.contains(needle) && text.contains("rip 0x") && text.contains("rax="),
        "{mode}: {text}"
    );
}

#[test]
fn faulting_guests_stop_with_a_report_and_the_host_stays_sound() {
    ferry_testdata::require_kvm!();
    expect_fault(
        "unmapped",
        14,
        "read of address 0x4000000000: page not mapped",
    );
    expect_fault("null", 14, "read of address 0x0: page not mapped");
    expect_fault("invalid-opcode", 6, "#UD invalid opcode");
    expect_fault("divide-by-zero", 0, "#DE divide error");

    let (exit, console) = run_to_end("faults", &["panic"]);
    assert!(matches!(exit, VmExit::Exited(101)), "{exit:?}");
    assert!(
        console.contains("panicked at") && console.contains("deliberate panic"),
        "{console}"
    );

    // The same process still runs VMs normally afterwards.
    let (exit, _) = run_to_end("hello", &[]);
    assert!(matches!(exit, VmExit::Exited(0)), "{exit:?}");
}

const MEMTOUCH: [&str; 6] = ["--mib", "24", "--passes", "120", "--seed", "42"];

/// Runs memtouch, snapshots it `at` after start, restores it in a new VM and returns the
/// checksum the restored VM prints.
fn snapshot_and_restore(at: Duration, file: &str) -> String {
    let mut vm = boot("memtouch", &MEMTOUCH);
    std::thread::sleep(at);
    vm.pause()
        .expect("the guest must still be running at the snapshot point");
    assert!(
        !vm.console_tail().contains("checksum="),
        "snapshot taken after the end"
    );
    let saved_at = vm.guest_time_ns();
    let path = ferry_testdata::scratch_dir("vmm-test").join(file);
    vm.save(&path).expect("save");
    drop(vm);

    let (mut restored, stats) = Microvm::restore(&path, HostOptions::quiet()).expect("restore");
    assert!(stats.pages_stored > 0);
    assert_eq!(
        restored.guest_time_ns(),
        saved_at,
        "the clock continues from the save"
    );
    restored.resume().unwrap();
    let exit = restored
        .wait(Some(TIMEOUT))
        .expect("restored guest did not end");
    assert!(matches!(exit, VmExit::Exited(0)), "{exit:?}");
    assert!(
        restored.guest_time_ns() >= saved_at,
        "the guest clock went backwards"
    );
    std::fs::remove_file(&path).unwrap();
    checksum(&restored.console_tail())
}

#[test]
fn memtouch_snapshotted_and_restored_matches_a_straight_run() {
    ferry_testdata::require_kvm!();
    let (exit, console) = run_to_end("memtouch", &MEMTOUCH);
    assert!(matches!(exit, VmExit::Exited(0)), "{exit:?}");
    let straight = checksum(&console);
    for (i, ms) in [0u64, 15, 80, 200].into_iter().enumerate() {
        let restored = snapshot_and_restore(Duration::from_millis(ms), &format!("equiv-{i}.snap"));
        assert_eq!(restored, straight, "snapshot at {ms} ms");
    }
}

#[test]
fn pausing_and_resuming_repeatedly_changes_nothing() {
    ferry_testdata::require_kvm!();
    let (_, console) = run_to_end("memtouch", &MEMTOUCH);
    let straight = checksum(&console);
    let mut vm = boot("memtouch", &MEMTOUCH);
    let mut pauses = 0;
    while pauses < 50 {
        std::thread::sleep(Duration::from_millis(2));
        if vm.pause().is_err() {
            break; // the guest ended between two pauses
        }
        pauses += 1;
        vm.resume().unwrap();
    }
    assert!(
        pauses > 5,
        "only {pauses} pauses landed while the guest ran"
    );
    let exit = vm.wait(Some(TIMEOUT)).expect("guest did not end");
    assert!(matches!(exit, VmExit::Exited(0)), "{exit:?}");
    assert_eq!(checksum(&vm.console_tail()), straight);
}

#[test]
fn a_pause_just_after_the_guest_exited_finds_it_exited() {
    ferry_testdata::require_kvm!();
    let mut vm = boot("hello", &["--exit-code", "3"]);
    // Nobody waits: the exit is only in the vCPU thread's last word. A pause that lands
    // while the guest still runs (a loaded machine) is let go, and tried again.
    let deadline = Instant::now() + TIMEOUT;
    let refused = loop {
        std::thread::sleep(Duration::from_millis(20));
        match vm.pause() {
            Ok(_) => vm.resume().unwrap(),
            Err(refused) => break refused,
        }
        assert!(Instant::now() < deadline, "the guest never ended");
    };
    assert!(
        matches!(vm.run_state(), RunState::Exited(3)),
        "{:?}, after {refused}",
        vm.run_state()
    );
    assert!(matches!(vm.wait(Some(TIMEOUT)), Some(VmExit::Exited(3))));
}

#[test]
fn a_pause_counts_from_the_end_of_the_devices_command_in_flight() {
    ferry_testdata::require_kvm!();
    // Kernels of several milliseconds (on one thread, whatever the machine), so that a
    // pause finds one in flight.
    let args = "--steps 1000000 --hidden 2048 --batch 256 --inputs 512 --print-every 1";
    let args: Vec<String> = args.split(' ').map(str::to_string).collect();
    let config = CONFIG.with_accel(256 << 20);
    let host = HostOptions {
        accel_threads: 1,
        ..HostOptions::quiet()
    };
    let mut vm = Microvm::boot(config, image("mlp-train"), &args, host).expect("boot");
    vm.resume().unwrap();
    let started = Instant::now();
    while !vm.console_tail().contains("step=") {
        assert!(started.elapsed() < TIMEOUT, "{}", vm.console_tail());
        std::thread::sleep(Duration::from_millis(10));
    }
    // The VM runs while its device ends the command in flight (that is progress), and
    // stops after: the stop a pause reports (where a migration's downtime starts) is
    // then a few kicks before it returns, whatever the kernel took.
    let mut seen = Vec::new();
    let found = (0..100).any(|_| {
        let called = Instant::now();
        let paused = vm.pause().unwrap();
        vm.resume().unwrap();
        let draining = paused.stopped_at.duration_since(called);
        let stopping = paused.took.saturating_sub(draining);
        seen.push((draining, stopping));
        std::thread::sleep(Duration::from_millis(3));
        draining >= Duration::from_millis(5) && stopping < draining
    });
    assert!(
        found,
        "no pause stopped the VM once a kernel of 5 ms or more had ended: (waited for the device, then stopping) {seen:?}"
    );
}

/// Polls the console until a line starting with `prefix` appears.
fn wait_for_line(vm: &Microvm, prefix: &str) -> String {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Some(line) = vm.console_tail().lines().find(|l| l.starts_with(prefix)) {
            return line.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "no '{prefix}' line: {}",
            vm.console_tail()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn addresses(line: &str) -> Vec<u64> {
    line.split_whitespace()
        .filter_map(|w| w.split('=').next_back())
        .filter_map(|w| u64::from_str_radix(w.strip_prefix("0x")?, 16).ok())
        .collect()
}

#[test]
fn dirty_log_reports_every_written_page_and_only_newer_ones_later() {
    ferry_testdata::require_kvm!();
    let args: Vec<String> = ["--pages", "16"].iter().map(|s| s.to_string()).collect();
    let mut vm = Microvm::boot(CONFIG, image("dirty-pages"), &args, HostOptions::quiet()).unwrap();
    vm.tracker().start_dirty_log().unwrap();
    vm.resume().unwrap();

    let flag = addresses(&wait_for_line(&vm, "waiting flag="))[0];
    vm.pause().unwrap();
    let phase1 = addresses(&wait_for_line(&vm, "phase1 "));
    assert_eq!(phase1.len(), 16);
    let dirty = vm.tracker().take_dirty_pages().unwrap();
    for addr in &phase1 {
        assert!(
            dirty.contains_addr(*addr),
            "phase-1 page {addr:#x} missing from the dirty log"
        );
    }
    assert!(
        vm.tracker().take_dirty_pages().unwrap().is_empty(),
        "nothing ran since the last take"
    );

    // A VMM write (like a device DMA) must be reported too.
    vm.memory().write_obj(1u64, GuestAddress(flag)).unwrap();
    vm.resume().unwrap();
    let exit = vm.wait(Some(TIMEOUT)).expect("guest did not end");
    assert!(matches!(exit, VmExit::Exited(0)), "{exit:?}");
    let phase2 = addresses(&wait_for_line(&vm, "phase2 "));
    assert_eq!(phase2.len(), 16);
    let dirty = vm.tracker().take_dirty_pages().unwrap();
    assert!(
        dirty.contains_addr(flag),
        "the VMM's write to the flag page is missing"
    );
    for addr in &phase2 {
        assert!(
            dirty.contains_addr(*addr),
            "phase-2 page {addr:#x} missing from the dirty log"
        );
    }
    for addr in &phase1 {
        assert!(
            !dirty.contains_addr(*addr),
            "phase-1 page {addr:#x} reported again"
        );
    }
    vm.tracker().stop_dirty_log().unwrap();
}

#[test]
fn corrupted_snapshots_of_a_real_vm_are_refused() {
    ferry_testdata::require_kvm!();
    let mut vm = boot("memtouch", &["--mib", "8", "--passes", "100000"]);
    std::thread::sleep(Duration::from_millis(20));
    vm.pause().unwrap();
    let path = ferry_testdata::scratch_dir("vmm-test").join("corrupt.snap");
    vm.save(&path).unwrap();
    let good = std::fs::read(&path).unwrap();

    let mut flipped = good.clone();
    let at = good.len() - 10_000;
    flipped[at] ^= 0x40;
    std::fs::write(&path, &flipped).unwrap();
    let err = Microvm::restore(&path, HostOptions::quiet())
        .err()
        .expect("flipped byte accepted");
    // The checksum of the frame holding that page catches it.
    let chain = ferry_migrate::error_chain(&err);
    assert!(chain.contains("checksum mismatch"), "{chain}");

    std::fs::write(&path, &good[..good.len() / 3]).unwrap();
    let err = Microvm::restore(&path, HostOptions::quiet())
        .err()
        .expect("truncated file accepted");
    assert!(
        matches!(err, CreateVmError::Snapshot(_)) && err.to_string().contains("truncated"),
        "{err}"
    );

    let mut versioned = good.clone();
    versioned[8] = 99;
    std::fs::write(&path, &versioned).unwrap();
    let err = Microvm::restore(&path, HostOptions::quiet())
        .err()
        .expect("wrong version accepted");
    assert!(
        err.to_string().contains("version 99 is not supported"),
        "{err}"
    );

    // A description this host cannot take is refused by name before anything is loaded.
    let described = |describe: &dyn Fn(&mut ferry_migrate::VmDescription)| {
        let mut paused = ferry_vmm::migration::PausedVm::new(&vm).unwrap();
        describe(&mut paused.description);
        ferry_vmm::snapshot::save_paused(&paused, &path).unwrap();
        Microvm::restore(&path, HostOptions::quiet())
            .err()
            .expect("a description this host cannot take accepted")
    };
    // A VM state of another version.
    let err = described(&|d| d.state_version += 1);
    assert!(
        matches!(err, CreateVmError::Incompatible(ref why) if why.contains("VM state format v")),
        "{err}"
    );

    // A state that would change what the VMM owns is refused: ring-0 code outside the
    // fault stubs, SYSENTER turned on, another page table root.
    let forged = |forge: &dyn Fn(&mut ferry_vmm::vcpu::VcpuState)| {
        let mut paused = ferry_vmm::migration::PausedVm::new(&vm).unwrap();
        forge(&mut paused.state.vcpus[0]);
        ferry_vmm::snapshot::save_paused(&paused, &path).unwrap();
        let err = Microvm::restore(&path, HostOptions::quiet())
            .err()
            .expect("a forged vCPU state accepted");
        ferry_migrate::error_chain(&err)
    };
    let chain = forged(&|v| {
        v.sregs.cs.selector = 0x08;
        v.sregs.cs.dpl = 0;
        v.sregs.ss.dpl = 0;
    });
    assert!(chain.contains("would change what the VMM owns"), "{chain}");
    let chain = forged(&|v| {
        let mut entry = kvm_bindings::kvm_msr_entry {
            index: 0x174,
            data: 0x08,
            ..Default::default()
        };
        match v.msrs.iter_mut().find(|m| m.index == 0x174) {
            Some(m) => m.data = entry.data,
            None => v.msrs.push(std::mem::take(&mut entry)),
        }
    });
    assert!(chain.contains("SYSENTER"), "{chain}");
    let chain = forged(&|v| v.sregs.cr3 = 0x20_0000);
    assert!(chain.contains("CR3"), "{chain}");
    // Ring 0 anywhere but at a stub's instruction on the stubs' stack: in the page after
    // the stubs (RAM the snapshot wrote), in the middle of an instruction, or at the
    // common handler with a stack whose pushes would write over the code ahead.
    let ring0 = |rip: u64, rsp: u64| {
        move |v: &mut ferry_vmm::vcpu::VcpuState| {
            v.sregs.cs.selector = 0x08;
            v.sregs.cs.dpl = 0;
            v.sregs.ss.dpl = 0;
            v.regs.rip = rip;
            v.regs.rsp = rsp;
        }
    };
    let stubs = ferry_vmm::arch::tables::fault_stub_instructions();
    let (first, common) = (stubs[0], 0x4000 + 32 * 16);
    assert!(stubs.contains(&common));
    for (rip, rsp) in [(0x5000, 0x7f80), (first + 1, 0x7f80), (common, 0x4210)] {
        let chain = forged(&ring0(rip, rsp));
        assert!(
            chain.contains("code selector"),
            "{rip:#x} {rsp:#x}: {chain}"
        );
    }
    // The stubs' first instruction, but in a compatibility-mode code segment whose base
    // would move every fetch into RAM the snapshot wrote; and a 64-bit one at ring 3
    // turned into compatibility mode.
    let chain = forged(&|v| {
        ring0(first, 0x7f80)(v);
        v.sregs.cs.l = 0;
        v.sregs.cs.db = 1;
        v.sregs.cs.base = 0x10_0000 - 0x4000;
    });
    assert!(chain.contains("not a present 64-bit one"), "{chain}");
    let chain = forged(&|v| v.sregs.cs.l = 0);
    assert!(chain.contains("not a present 64-bit one"), "{chain}");
    // A task register whose limit reaches past the TSS (its I/O bitmap read beyond).
    let chain = forged(&|v| v.sregs.tr.limit = 0xffff);
    assert!(chain.contains("TR limit"), "{chain}");
    // An LDT loaded with a null selector (KVM takes it as loaded), and system management
    // mode.
    let chain = forged(&|v| {
        v.sregs.ldt.selector = 0;
        v.sregs.ldt.unusable = 0;
        v.sregs.ldt.present = 1;
    });
    assert!(chain.contains("an LDT is loaded"), "{chain}");
    let chain = forged(&|v| v.vcpu_events.smi.smm = 1);
    assert!(chain.contains("system management mode"), "{chain}");
    // A breakpoint enabled on ring 0's stubs (global enable of DR0), and the trap on
    // debug register access.
    for dr7 in [0x402, 0x2400] {
        let chain = forged(&|v| {
            v.debug_regs.db[0] = 0x4000;
            v.debug_regs.dr7 = dr7;
        });
        assert!(chain.contains("debug breakpoints"), "{dr7:#x}: {chain}");
    }
    // A VM whose guest has seen every feature of the extended leaf (AMD's XOP, FMA4 and
    // TBM with the others: no current CPU has them all): its guest could fault on one
    // here.
    let extended = ferry_migrate::cpu::cpu_features(
        |leaf, _, _| {
            if leaf == 0x8000_0001 {
                u32::MAX
            } else {
                0
            }
        },
    );
    let err = described(&|d| {
        assert_eq!(d.cpu_features, vm.cpu_features());
        d.cpu_features = ferry_migrate::cpu::joined(&d.cpu_features, &extended);
    });
    assert!(
        matches!(err, CreateVmError::Incompatible(ref why) if why.contains("fma4")),
        "{err}"
    );
    // A VM started here has seen this CPU's features, and nothing else.
    assert!(vm.cpu_features().iter().any(|w| w.bits != 0));
    assert_eq!(vm.cpu_features(), ferry_migrate::cpu::native_cpu_features());

    // The VMM's pages, written over in the file, are the VMM's own again once restored.
    let pml4 = 0x1_0000u64;
    let ours: u64 = vm.memory().read_obj(GuestAddress(pml4)).unwrap();
    vm.memory().write_obj(!ours, GuestAddress(pml4)).unwrap();
    vm.save(&path).unwrap();
    vm.memory().write_obj(ours, GuestAddress(pml4)).unwrap();
    let (restored, _) = Microvm::restore(&path, HostOptions::quiet()).unwrap();
    // As the VMM writes it: the processor's accessed and dirty bits are not set yet.
    let accessed_dirty = 0x60;
    let entry: u64 = restored.memory().read_obj(GuestAddress(pml4)).unwrap();
    assert_eq!(entry, ours & !accessed_dirty);
    drop(restored);

    // The untouched file still restores and runs.
    std::fs::write(&path, &good).unwrap();
    let (mut restored, _) = Microvm::restore(&path, HostOptions::quiet()).unwrap();
    restored.resume().unwrap();
    assert!(
        restored.wait(Some(Duration::from_millis(50))).is_none(),
        "restored VM stopped early"
    );
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn a_paused_vcpu_has_finished_the_port_write_it_exited_on() {
    ferry_testdata::require_kvm!();
    // It kicks its channel for ever: most pauses land while the host handles an `out`.
    let mut vm = boot("channel-abuse", &[]);
    wait_for_line(&vm, "channel-abuse: set up");
    let mut at_an_out = 0;
    for _ in 0..40 {
        std::thread::sleep(Duration::from_millis(3));
        vm.pause().unwrap();
        let state = vm.save_state().unwrap();
        let rip = state.vcpus[0].regs.rip;
        let mut opcode = [0u8; 1];
        vm.memory()
            .read_slice(&mut opcode, GuestAddress(rip))
            .unwrap();
        // OUT imm8/DX, of a byte or more: KVM steps past it only when it is run again,
        // so a state saved before that would have the destination write the port twice.
        if matches!(opcode[0], 0xe6 | 0xe7 | 0xee | 0xef) {
            at_an_out += 1;
        }
        vm.resume().unwrap();
    }
    assert_eq!(at_an_out, 0, "states saved pointing at an unfinished out");
}
