//! Listing the backends for a heartbeat never waits for a GPU being opened. Its own test
//! binary: it sets `FERRY_CUDA_EMULATOR` for the process, and opens the "GPU" once.

use std::time::{Duration, Instant};

use ferry_accel::backend::{available, available_now, probe_gpu, CPU};

#[test]
fn the_backends_known_now_never_wait_for_a_gpu_being_opened() {
    // The emulated GPU: opening it compiles its kernels with the host's C++ compiler,
    // which takes seconds, as a real driver's start does.
    std::env::set_var("FERRY_CUDA_EMULATOR", "1");
    probe_gpu();
    let asked = Instant::now();
    let now = available_now();
    assert!(
        asked.elapsed() < Duration::from_millis(200),
        "{:?}",
        asked.elapsed()
    );
    assert_eq!(
        now,
        [CPU],
        "the GPU was listed before it could have been opened"
    );
    // Waits for the probe's opening, then both agree.
    let all = available();
    assert_eq!(all, [CPU, "cuda-emulated"]);
    assert_eq!(available_now(), all);
}
