//! Accelerator backends end to end, on KVM: VMs on the cuda backend's kernels (emulated
//! on the CPU with `FERRY_CUDA_EMULATOR=1`: this machine has no GPU) give the cpu
//! backend's answers where the kernels promise its bits, migrate between hosts that have
//! their backend, and are refused by a host that has not, with a message naming both.

mod common;

use common::*;

/// What a host with the emulated cuda backend gets.
const EMULATED: [(&str, &str); 1] = [("FERRY_CUDA_EMULATOR", "1")];

#[test]
fn llm_chat_on_the_cuda_kernels_answers_as_on_the_cpu_backend() {
    let test = "llm_chat_on_the_cuda_kernels_answers_as_on_the_cpu_backend";
    let Some(model) = kvm_and_smollm2(test) else {
        return;
    };
    let run = |backend: &str, env: &[(&str, &str)]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args(["run", "--backend", backend, "--accel-memory", "512M"])
            .arg("--attach")
            .arg(format!("model={}", model.display()))
            .args([
                "llm-chat",
                "--",
                "--prompt",
                "What is the capital of France?",
            ])
            .args(["--max-tokens", "6"])
            .envs(env.iter().copied())
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        (text(&out.stdout), text(&out.stderr))
    };
    let (cpu, _) = run("cpu", &[]);
    let (cuda, said) = run("cuda", &EMULATED);
    assert!(
        said.contains("accelerator backend cuda-emulated"),
        "the backend is not said: {said}"
    );
    // Every kernel llm-chat runs (quantized products, norms, rotary embeddings,
    // attention) gives the cpu backend's bits: the same tokens.
    assert_eq!(
        checksum(&cuda),
        checksum(&cpu),
        "cpu:\n{cpu}\ncuda:\n{cuda}"
    );
}

#[test]
fn a_cuda_vm_migrates_between_cuda_hosts_and_a_cpu_only_host_refuses_it() {
    let test = "a_cuda_vm_migrates_between_cuda_hosts_and_a_cpu_only_host_refuses_it";
    if !kvm_available(test) {
        return;
    }
    let cuda = ["--backend", "cuda"];
    let a = Daemon::start_env("a", &cuda, &EMULATED);
    let b = Daemon::start_env("b", &cuda, &EMULATED);
    let c = Daemon::start("c");
    let args = "--steps 3000 --print-every 10 --hidden 64 --batch 32";
    let moved = a.create("mlp-train", "64M", args);
    let unmoved = a.create("mlp-train", "64M", args);
    let info: serde_json::Value = host_api(&a).get("/v1/host").unwrap();
    assert_eq!(info["backend"], "cuda-emulated", "{info}");
    a.wait_console(&moved, "step=30 ");
    // A host without the VM's backend refuses it at the handshake, naming both.
    let refused = a.migrate(&moved, &c.migration, &[]);
    assert!(!refused.status.success());
    let why = text(&refused.stderr);
    assert!(
        why.contains("cuda-emulated") && why.contains("cpu"),
        "the refusal does not name both backends: {why}"
    );
    assert_eq!(a.show(&moved)["state"], "running", "the VM runs on at a");
    let out = a.migrate(&moved, &b.migration, &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        b.checksum_at_exit(&moved),
        a.checksum_at_exit(&unmoved),
        "the migrated run differs from the unmigrated one"
    );
}
