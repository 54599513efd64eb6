//! The priority of a VM's kernel threads while the host pauses it: lifted for a pause the
//! host waits on, left at the guest's for a migration throttle's. Its own test binary:
//! the kernel threads of other tests' VMs would run in the same process.

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::time::{Duration, Instant};

use ferry_vmm::{HostOptions, Microvm, VmConfig};

const CONFIG: VmConfig = VmConfig::new(128 << 20).with_accel(256 << 20);
const TIMEOUT: Duration = Duration::from_secs(120);

/// The nice values of this process's accelerator kernel threads.
fn kernel_thread_nices() -> Vec<i32> {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter(|task| {
            std::fs::read_to_string(task.path().join("comm"))
                .is_ok_and(|name| name.starts_with("ferry-accel-"))
        })
        .filter_map(|task| task.file_name().to_str()?.parse::<libc::id_t>().ok())
        // SAFETY: getpriority only reads a thread's nice value.
        .map(|tid| unsafe { libc::getpriority(libc::PRIO_PROCESS, tid) })
        .collect()
}

/// The lowest nice value any kernel thread had while `pause` ran, sampled as fast as a
/// thread reads /proc, over `times` pauses of `vm` (resumed after each).
fn lowest_nice_while<E: std::fmt::Debug>(
    vm: &mut Microvm,
    times: usize,
    pause: fn(&mut Microvm) -> Result<Duration, E>,
) -> i32 {
    let sampling = AtomicBool::new(true);
    let lowest = AtomicI32::new(i32::MAX);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            while sampling.load(Ordering::Relaxed) {
                for nice in kernel_thread_nices() {
                    lowest.fetch_min(nice, Ordering::Relaxed);
                }
            }
        });
        for _ in 0..times {
            pause(vm).unwrap();
            vm.resume().unwrap();
            // A step's worth of kernels between pauses, so most find one in flight.
            std::thread::sleep(Duration::from_millis(20));
        }
        sampling.store(false, Ordering::Relaxed);
    });
    lowest.into_inner()
}

#[test]
fn a_throttles_pause_leaves_the_kernels_at_the_guests_priority_and_a_waited_one_lifts_them() {
    ferry_testdata::require_kvm!();
    // SAFETY: geteuid only reads this process's credentials.
    if unsafe { libc::geteuid() } != 0 {
        ferry_testdata::cannot_run_here(
            "a_throttles_pause_leaves_the_kernels_at_the_guests_priority_and_a_waited_one_lifts_them",
            "lifting a thread's priority needs root (CAP_SYS_NICE)",
        );
        return;
    }
    const GUEST_NICE: i32 = 10;
    let image = ferry_guest_images::find("mlp-train")
        .expect("built-in guest")
        .elf;
    let args = "--steps 1000000 --hidden 1024 --batch 256 --inputs 512 --print-every 1";
    let args: Vec<String> = args.split(' ').map(str::to_string).collect();
    let host = HostOptions {
        accel_threads: 2,
        guest_nice: GUEST_NICE,
        ..HostOptions::quiet()
    };
    let mut vm = Microvm::boot(CONFIG, image, &args, host).expect("boot");
    vm.resume().unwrap();
    let training = Instant::now();
    while !vm.console_tail().contains("step=") {
        assert!(training.elapsed() < TIMEOUT, "{}", vm.console_tail());
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        kernel_thread_nices(),
        [GUEST_NICE; 2],
        "the kernels' priority"
    );
    // A throttle leaves the CPU to the host's other work: lifted, the kernel in flight
    // would take it first.
    let throttled = lowest_nice_while(&mut vm, 20, Microvm::pause_for_throttle);
    assert_eq!(
        throttled, GUEST_NICE,
        "a throttle's pause lifted the kernels"
    );
    // A pause the host waits on lifts them to the caller's priority (what the sampler
    // can see, so the line above is not true by construction).
    let waited = lowest_nice_while(&mut vm, 20, Microvm::pause);
    // SAFETY: getpriority on the calling thread only reads its nice value.
    let ours = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
    assert_eq!(waited, ours, "a waited pause did not lift the kernels");
    assert_eq!(
        kernel_thread_nices(),
        [GUEST_NICE; 2],
        "put back after the pause"
    );
}
