//! The cuda backend where this host allows: NVRTC compiling every kernel of `kernels.cu`
//! (CI installs it from PyPI), and on a GPU every kernel against the cpu backend. Without
//! them each test says loudly that it was skipped (`FERRY_REQUIRE_NVRTC=1`,
//! `FERRY_REQUIRE_GPU=1` make that a failure).

use ferry_accel::backend::cuda::driver::{self, CudaGpu};
use ferry_accel::backend::cuda::{conformance, Gpu, GpuBackend, GpuError, ENTRY_POINTS};
use ferry_accel::backend::Backend;

#[test]
fn every_kernel_compiles_to_ptx_for_hopper_with_nvrtc() {
    let test = "every_kernel_compiles_to_ptx_for_hopper_with_nvrtc";
    if !driver::nvrtc_present() {
        ferry_testdata::missing_nvrtc(
            test,
            "NVRTC (libnvrtc.so) is not on this host: pip install nvidia-cuda-nvrtc-cu12 and put scripts/nvrtc-lib's folder on LD_LIBRARY_PATH",
        );
        return;
    }
    let ptx = driver::compile("sm_90").unwrap_or_else(|e| panic!("{e}"));
    assert!(
        ptx.contains(".target sm_90"),
        "{}",
        &ptx[..400.min(ptx.len())]
    );
    for entry in ENTRY_POINTS {
        assert!(
            ptx.contains(&format!(".entry {entry}(")),
            "no entry point {entry} in the PTX"
        );
    }
    // Multiplies and adds stay separate (--fmad=false): no fused instruction in any
    // kernel, so their bits are the cpu backend's.
    assert!(!ptx.contains("fma.rn"), "a fused multiply-add in the PTX");
}

#[test]
fn every_kernel_agrees_with_the_cpu_backend_on_a_gpu() {
    let test = "every_kernel_agrees_with_the_cpu_backend_on_a_gpu";
    let gpu = match CudaGpu::open() {
        Ok(gpu) => gpu,
        Err(e @ (GpuError::NoDriver | GpuError::NoDevice(_) | GpuError::NoCompiler)) => {
            ferry_testdata::missing_gpu(test, &e.to_string());
            return;
        }
        Err(e) => panic!("{e}"),
    };
    eprintln!("{test}: on {}", gpu.description());
    let gpu = std::sync::Arc::new(gpu);
    let make = || Ok(Box::new(GpuBackend::new(gpu.clone(), "cuda")) as Box<dyn Backend>);
    let cases = conformance::run(&make);
    let failed: Vec<String> = cases
        .iter()
        .filter_map(|c| c.outcome.as_ref().err().map(|e| format!("{}: {e}", c.name)))
        .collect();
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}
