//! Hostile guests on real KVM, written as raw machine code: ring-3 state a guest may
//! leave behind (segment registers, flags, port accesses of every width) must not stop
//! its VM from being snapshotted and restored, nor upset the host.

use std::time::Duration;

use ferry_vmm::{HostOptions, Microvm, VmConfig, VmExit};
use vm_memory::{Bytes, GuestAddress};

const CONFIG: VmConfig = VmConfig::new(64 << 20);
const TIMEOUT: Duration = Duration::from_secs(30);
/// Where the code is loaded (abi::IMAGE_BASE).
const CODE_AT: u64 = 0x10_0000;
/// The word the guest polls; the host sets it once the VM is restored.
const FLAG_AT: u64 = 0x20_0000;

/// A static ELF whose one segment (read, write, execute) holds `code` at [`CODE_AT`].
fn elf(code: &[u8]) -> Vec<u8> {
    const OFFSET: usize = 0x1000;
    let mut image = vec![0u8; OFFSET];
    let put = |image: &mut Vec<u8>, at: usize, bytes: &[u8]| {
        image[at..at + bytes.len()].copy_from_slice(bytes);
    };
    put(&mut image, 0, b"\x7fELF\x02\x01\x01");
    put(&mut image, 16, &2u16.to_le_bytes()); // ET_EXEC
    put(&mut image, 18, &62u16.to_le_bytes()); // EM_X86_64
    put(&mut image, 20, &1u32.to_le_bytes());
    put(&mut image, 24, &CODE_AT.to_le_bytes()); // entry
    put(&mut image, 32, &64u64.to_le_bytes()); // phoff
    put(&mut image, 52, &64u16.to_le_bytes()); // ehsize
    put(&mut image, 54, &56u16.to_le_bytes()); // phentsize
    put(&mut image, 56, &1u16.to_le_bytes()); // phnum
    let ph = 64;
    put(&mut image, ph, &1u32.to_le_bytes()); // PT_LOAD
    put(&mut image, ph + 4, &7u32.to_le_bytes()); // R W X
    put(&mut image, ph + 8, &(OFFSET as u64).to_le_bytes());
    put(&mut image, ph + 16, &CODE_AT.to_le_bytes());
    put(&mut image, ph + 24, &CODE_AT.to_le_bytes());
    put(&mut image, ph + 32, &(code.len() as u64).to_le_bytes());
    put(&mut image, ph + 40, &(code.len() as u64).to_le_bytes());
    put(&mut image, ph + 48, &0x1000u64.to_le_bytes());
    image.extend_from_slice(code);
    image
}

/// The end of every guest here: exit with code 42.
const EXIT_42: [u8; 12] = [
    0xb8, 42, 0, 0, 0, // mov eax, 42
    0x66, 0xba, 0x10, 0x05, // mov dx, port::EXIT
    0xef, // out dx, eax
    0xeb, 0xfe, // jmp $
];

/// `prologue`, then a loop polling [`FLAG_AT`] until it is non-zero, then exit 42.
fn poll_then_exit(prologue: &[u8]) -> Vec<u8> {
    let mut code = prologue.to_vec();
    let poll = [
        0x48, 0x8b, 0x04, 0x25, 0x00, 0x00, 0x20, 0x00, // mov rax, [FLAG_AT]
        0x48, 0x85, 0xc0, // test rax, rax
        0x74, 0xf3, // jz poll
    ];
    code.extend_from_slice(&poll);
    code.extend_from_slice(&EXIT_42);
    code
}

/// Boots `code` and returns how it ended and its console.
fn run(code: &[u8]) -> (VmExit, String) {
    let mut vm = Microvm::boot(CONFIG, &elf(code), &[], HostOptions::quiet()).expect("boot");
    vm.resume().unwrap();
    let exit = vm.wait(Some(TIMEOUT)).expect("guest ended");
    (exit, vm.console_tail())
}

/// Boots `code`, lets it run, snapshots it, restores it, lets it finish: it must exit 42.
fn survives_snapshot_and_restore(code: &[u8], file: &str) {
    let image = elf(code);
    let mut vm = Microvm::boot(CONFIG, &image, &[], HostOptions::quiet()).expect("boot");
    vm.resume().unwrap();
    std::thread::sleep(Duration::from_millis(30));
    vm.pause().expect("the guest runs until told to stop");
    let path = ferry_testdata::scratch_dir("vmm-hostile").join(file);
    vm.save(&path).expect("save");
    drop(vm);
    let (mut restored, _) = Microvm::restore(&path, HostOptions::quiet()).expect("restore");
    restored
        .memory()
        .write_obj(1u64, GuestAddress(FLAG_AT))
        .unwrap();
    restored.resume().unwrap();
    let exit = restored.wait(Some(TIMEOUT)).expect("restored guest ended");
    assert!(matches!(exit, VmExit::Exited(42)), "{exit:?}");
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn a_guest_with_null_data_segments_and_odd_flags_is_snapshotted_and_restored() {
    ferry_testdata::require_kvm!();
    survives_snapshot_and_restore(&poll_then_exit(&[]), "plain");
    let prologue = [
        0x31, 0xc0, // xor eax, eax
        0x8e, 0xd8, // mov ds, eax
        0x8e, 0xc0, // mov es, eax
        0x8e, 0xe0, // mov fs, eax
        0x8e, 0xe8, // mov gs, eax
        0x9c, // pushfq
        0x48, 0x81, 0x0c, 0x24, 0x00, 0x44, 0x04, 0x00, // or qword [rsp], NT|AC|DF
        0x9d, // popfq
    ];
    survives_snapshot_and_restore(&poll_then_exit(&prologue), "segments");
}

#[test]
fn port_accesses_of_every_width_to_every_device_port_leave_the_guest_running() {
    ferry_testdata::require_kvm!();
    // For each port 0x500..0x540 (the ABI's and the gaps between them): out and in of a
    // byte, a word and a double word of all-ones, but the fault port (a report that
    // stops the VM) and the 32-bit exit. Nothing may stop the guest or the host.
    let mut code = vec![0xb9, 0x00, 0x05, 0x00, 0x00]; // mov ecx, 0x500
    code.extend_from_slice(&[
        0x89, 0xca, // 0: mov edx, ecx
        0xb8, 0xff, 0xff, 0xff, 0xff, // 2: mov eax, -1
        0x81, 0xfa, 0x18, 0x05, 0x00, 0x00, // 7: cmp edx, port::FAULT
        0x74, 0x15, // 13: je next
        0xee, // 15: out dx, al
        0x66, 0xef, // 16: out dx, ax
        0xec, // 18: in al, dx
        0x66, 0xed, // 19: in ax, dx
        0xed, // 21: in eax, dx
        0x81, 0xfa, 0x10, 0x05, 0x00, 0x00, // 22: cmp edx, port::EXIT
        0x74, 0x06, // 28: je next
        0xb8, 0xff, 0xff, 0xff, 0xff, // 30: mov eax, -1
        0xef, // 35: out dx, eax
        0xff, 0xc1, // 36 next: inc ecx
        0x81, 0xf9, 0x40, 0x05, 0x00, 0x00, // 38: cmp ecx, 0x540
        0x72, 0xd2, // 44: jb 0
    ]);
    code.extend_from_slice(&EXIT_42);
    let (exit, console) = run(&code);
    assert!(matches!(exit, VmExit::Exited(42)), "{exit:?}\n{console}");
}
