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

/// Stops the sampler when dropped, a panic in the pauses included (the scope would wait
/// for it for ever).
struct StopSampling<'a>(&'a AtomicBool);

impl Drop for StopSampling<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Relaxed);
    }
}

/// The lowest nice value any kernel thread had while `pause` ran, sampled as fast as a
/// thread reads /proc: over `times` pauses of `vm` (resumed after each), or fewer if one
/// showed nice `enough` already.
fn lowest_nice_while<E: std::fmt::Debug>(
    vm: &mut Microvm,
    times: usize,
    enough: i32,
    pause: fn(&mut Microvm) -> Result<ferry_vmm::Paused, E>,
) -> i32 {
    let sampling = AtomicBool::new(true);
    let lowest = AtomicI32::new(i32::MAX);
    std::thread::scope(|scope| {
        let _stop = StopSampling(&sampling);
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
            if lowest.load(Ordering::Relaxed) <= enough {
                break;
            }
            // A step's worth of kernels between pauses, so most find one in flight.
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    lowest.into_inner()
}

/// This thread's nice value.
fn own_nice() -> i32 {
    // SAFETY: getpriority on the calling thread only reads its nice value.
    unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) }
}

/// Whether this process may raise a thread's priority (CAP_SYS_NICE, which root in a
/// container may lack): a thread lowered to `nice` tries to go back.
fn may_raise_priority(nice: i32) -> bool {
    let ours = own_nice();
    ours < nice
        && std::thread::spawn(move || {
            // SAFETY: setpriority on the calling thread changes only its nice value.
            unsafe {
                libc::setpriority(libc::PRIO_PROCESS, 0, nice) == 0
                    && libc::setpriority(libc::PRIO_PROCESS, 0, ours) == 0
            }
        })
        .join()
        .unwrap_or(false)
}

#[test]
fn a_throttles_pause_leaves_the_kernels_at_the_guests_priority_and_a_waited_one_lifts_them() {
    ferry_testdata::require_kvm!();
    const GUEST_NICE: i32 = 10;
    if !may_raise_priority(GUEST_NICE) {
        ferry_testdata::cannot_run_here(
            "a_throttles_pause_leaves_the_kernels_at_the_guests_priority_and_a_waited_one_lifts_them",
            "this process may not raise a thread's priority (CAP_SYS_NICE), or runs at nice 10 or above already",
        );
        return;
    }
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
    let throttled = lowest_nice_while(&mut vm, 20, i32::MIN, Microvm::pause_for_throttle);
    assert_eq!(
        throttled, GUEST_NICE,
        "a throttle's pause lifted the kernels"
    );
    // A pause the host waits on lifts them to the caller's priority (what the sampler
    // can see, so the line above is not true by construction). Paused until it is seen,
    // a few hundred times at most: a pause that finds no kernel in flight is too short.
    let ours = own_nice();
    let waited = lowest_nice_while(&mut vm, 300, ours, Microvm::pause);
    assert_eq!(waited, ours, "a waited pause did not lift the kernels");
    assert_eq!(
        kernel_thread_nices(),
        [GUEST_NICE; 2],
        "put back after the pause"
    );
}
