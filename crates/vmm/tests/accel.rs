//! AI workloads on the virtual accelerator, in real VMs: determinism across backend
//! thread counts, learning, and snapshot/restore in the middle of training.

use std::time::Duration;

use ferry_vmm::devices::console::last_field;
use ferry_vmm::{HostOptions, Microvm, VmConfig, VmExit};

const CONFIG: VmConfig = VmConfig::new(128 << 20).with_accel(256 << 20);
const TIMEOUT: Duration = Duration::from_secs(120);
const MLP: [&str; 6] = ["--steps", "300", "--print-every", "50", "--seed", "3"];
const LLM: [&str; 4] = ["--tokens", "24", "--weights-mib", "8"];

fn boot(name: &str, args: &[&str], threads: usize) -> Microvm {
    let image = ferry_guest_images::find(name).expect("built-in guest").elf;
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let host = HostOptions {
        accel_threads: threads,
        ..HostOptions::quiet()
    };
    let mut vm = Microvm::boot(CONFIG, image, &args, host).expect("boot");
    vm.resume().unwrap();
    vm
}

fn finish(mut vm: Microvm) -> String {
    let exit = vm.wait(Some(TIMEOUT)).expect("guest did not end in time");
    let console = vm.console_tail();
    assert!(matches!(exit, VmExit::Exited(0)), "{exit:?}\n{console}");
    console
}

/// The value of the last `key=value` the guest printed.
fn value<'a>(console: &'a str, key: &str) -> &'a str {
    last_field(console, key).unwrap_or_else(|| panic!("no {key}= in:\n{console}"))
}

fn losses(console: &str) -> Vec<f64> {
    console
        .lines()
        .filter(|l| l.starts_with("step="))
        .filter_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("loss=")))
        .map(|v| v.parse().unwrap())
        .collect()
}

#[test]
fn checksums_are_bit_identical_with_1_2_and_4_backend_threads() {
    ferry_testdata::require_kvm!();
    for (name, args) in [("mlp-train", &MLP[..]), ("llm-decode", &LLM[..])] {
        let sums: Vec<String> = [1, 2, 4]
            .iter()
            .map(|&t| value(&finish(boot(name, args, t)), "checksum").to_string())
            .collect();
        assert!(sums.iter().all(|s| *s == sums[0]), "{name}: {sums:?}");
    }
}

#[test]
fn mlp_train_learns() {
    ferry_testdata::require_kvm!();
    let console = finish(boot("mlp-train", &MLP, 2));
    let curve = losses(&console);
    let first = curve[0];
    let last: f64 = value(&console, "loss").parse().unwrap();
    // ln(10) ≈ 2.3 for 10 classes at random; the teacher task is learnable, so 300 Adam
    // steps must cut the loss to under a quarter of where it started.
    assert!(first > 1.5, "initial loss {first} is suspiciously low");
    assert!(
        last < first / 4.0,
        "loss went from {first} to {last}: not learning\n{console}"
    );
    assert!(last.is_finite());
}

#[test]
fn snapshot_mid_training_restores_to_the_same_checksum() {
    ferry_testdata::require_kvm!();
    let straight = value(&finish(boot("mlp-train", &MLP, 2)), "checksum").to_string();
    // Past the first step (the device holds the dataset and weights) and mid-run: points
    // the guest says it reached, as a time could find it not started yet under load.
    for (i, at) in ["step=1 ", "step=150 "].into_iter().enumerate() {
        let mut vm = boot("mlp-train", &MLP, 2);
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        while !vm.console_tail().contains(at) {
            assert!(std::time::Instant::now() < deadline, "never printed {at:?}");
            std::thread::sleep(Duration::from_millis(1));
        }
        vm.pause().expect("still training at the snapshot point");
        assert!(
            !vm.console_tail().contains("checksum="),
            "snapshot after the end"
        );
        let path = ferry_testdata::scratch_dir("accel-test").join(format!("mlp-{i}.snap"));
        let stats = vm.save(&path).unwrap();
        assert!(
            stats.chunks_stored > 0,
            "device memory must be in the snapshot"
        );
        drop(vm);
        // A different thread count on the restoring side changes nothing.
        let host = HostOptions {
            accel_threads: 1,
            ..HostOptions::quiet()
        };
        let (mut restored, _) = Microvm::restore(&path, host).unwrap();
        restored.resume().unwrap();
        assert_eq!(
            value(&finish(restored), "checksum"),
            straight,
            "snapshot after {at:?}"
        );
        std::fs::remove_file(path).unwrap();
    }
}

#[test]
fn llm_decode_produces_tokens() {
    ferry_testdata::require_kvm!();
    let console = finish(boot("llm-decode", &LLM, 2));
    assert_eq!(value(&console, "tokens"), "24", "{console}");
    assert_eq!(value(&console, "checksum").len(), 16);
}

#[test]
fn a_vm_whose_accelerator_a_replay_tore_stays_paused_and_says_why() {
    use ferry_abi::accel::{op, status};
    use ferry_accel::replay::ReplayError;
    use ferry_migrate::replay::LoggedCommand;
    use ferry_vmm::vm::VmControlError;
    use std::time::Instant;

    ferry_testdata::require_kvm!();
    const BYTES: u64 = 192 << 20;
    let image = ferry_guest_images::find("mlp-train")
        .expect("built-in guest")
        .elf;
    let mut vm = Microvm::boot(CONFIG, image, &[], HostOptions::quiet()).expect("boot");
    let accel = vm.accel().expect("an accelerator");
    let far = Instant::now() + TIMEOUT;
    let alloc = LoggedCommand {
        opcode: op::ALLOC,
        args: vec![900, BYTES],
        payload: Vec::new(),
        status: status::OK,
    };
    accel
        .replay(vec![alloc], far)
        .expect("the allocation replays");
    // An upload cut at its deadline tears the memory. A deadline passed before the
    // device starts it tears nothing (`OutOfTime`), nor does one after its end: tried
    // again until one lands inside, however a loaded machine delays the device.
    let mut torn = None;
    for ms in [1, 2, 4, 8, 16, 32].repeat(8) {
        let upload = LoggedCommand {
            opcode: op::UPLOAD,
            args: vec![900, 0, 0, BYTES],
            payload: vec![0x5a; BYTES as usize],
            status: status::OK,
        };
        match accel.replay(vec![upload], Instant::now() + Duration::from_millis(ms)) {
            Err(ReplayError::DeadlinePassed { index, opcode }) => {
                torn = Some((index, opcode));
                break;
            }
            Err(ReplayError::OutOfTime { .. }) | Ok(()) => continue,
            other => panic!("a {BYTES}-byte upload with {ms} ms to run: {other:?}"),
        }
    }
    assert_eq!(torn, Some((0, op::UPLOAD)), "no replay was cut mid-upload");
    match vm.resume() {
        Err(VmControlError::AcceleratorTorn(t)) => assert_eq!((t.index, t.opcode), (0, op::UPLOAD)),
        other => panic!("a VM on a torn accelerator resumed: {other:?}"),
    }
    // Still paused, not half-running: a second try says the same.
    assert!(matches!(
        vm.resume(),
        Err(VmControlError::AcceleratorTorn(_))
    ));
    // Nor can its state be kept, by a snapshot or a migration onwards.
    assert!(matches!(
        vm.save_state(),
        Err(VmControlError::AcceleratorTorn(_))
    ));
}

#[test]
fn a_snapshot_is_restored_only_where_the_device_gives_the_same_bits() {
    use ferry_vmm::vm::CreateVmError;
    ferry_testdata::require_kvm!();
    let image = ferry_guest_images::find("mlp-train")
        .expect("built-in guest")
        .elf;
    // Booted paused: its device exists before the guest runs.
    let vm = Microvm::boot(CONFIG, image, &[], HostOptions::quiet()).expect("boot");
    let paused = ferry_vmm::migration::PausedVm::new(&vm).unwrap();
    // The cpu backend's MATMUL bits depend on the microkernel: the snapshot names it.
    assert_eq!(
        paused.description.microkernel,
        ferry_accel::backend::cpu::gemm_microkernel()
    );
    let path = ferry_testdata::scratch_dir("accel-test").join("described.snap");
    let restored = |describe: &dyn Fn(&mut ferry_migrate::VmDescription)| {
        let mut paused = ferry_vmm::migration::PausedVm::new(&vm).unwrap();
        describe(&mut paused.description);
        ferry_vmm::snapshot::save_paused(&paused, &path).unwrap();
        Microvm::restore(&path, HostOptions::quiet()).map(|_| ())
    };
    restored(&|_| ()).expect("a snapshot of this host's device restores here");
    // Saved where the microkernel differs (another CPU), or before ferry recorded it: the
    // results would drift from an unmoved run, so it is refused by name.
    for (microkernel, named) in [("x86_64-other", "x86_64-other"), ("", "unrecorded")] {
        let err = restored(&|d| d.microkernel = microkernel.into()).expect_err("restored");
        assert!(
            matches!(err, CreateVmError::Incompatible(ref why)
                if why.contains(&format!("matmul microkernel {named} "))),
            "{err}"
        );
    }
    // Another kernel library: refused before anything is loaded, not at the end.
    let err = restored(&|d| d.kernel_version += 1).expect_err("restored");
    assert!(
        matches!(err, CreateVmError::Incompatible(ref why) if why.contains("kernel library")),
        "{err}"
    );
    std::fs::remove_file(path).unwrap();
}
