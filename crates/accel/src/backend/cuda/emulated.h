// What kernels.cu needs of CUDA, on the host: the tests compile kernels.cu with the host's
// C++ compiler and this header (`-DFERRY_EMULATED -ffp-contract=off`) and run each kernel
// for one work item after another (see emulator.rs). Every kernel computes its items
// independently, so running them in sequence gives what the GPU's threads give.
// (kernels.cu declares the integer types before including it.)
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define KERNEL extern "C" void
#define DEV static inline

static u64 ferry_current_item;

DEV u64 item_index() { return ferry_current_item; }
// The bits of `from` as a `To` of the same size (what CUDA's __*_as_* intrinsics do).
template <typename To, typename From> DEV To reinterpret_bits(From from) {
    static_assert(sizeof(To) == sizeof(From), "a reinterpretation keeps the size");
    To to;
    memcpy(&to, &from, sizeof to);
    return to;
}
DEV double bits_f64(u64 b) { return reinterpret_bits<double>(b); }
DEV u64 f64_bits(double v) { return reinterpret_bits<u64>(v); }
DEV float bits_f32(u32 b) { return reinterpret_bits<float>(b); }
DEV u32 f32_bits(float v) { return reinterpret_bits<u32>(v); }
// A GPU faults on a misaligned address, and its context is lost; the host does not, so
// the emulator stops here instead of giving a result the GPU would never give.
DEV u64 aligned_address(u64 address, u64 align) {
    if (address % align != 0) {
        fprintf(stderr, "ferry emulated GPU: address %#llx is not aligned to %llu bytes "
                "(a GPU would fault: CUDA_ERROR_MISALIGNED_ADDRESS)\n", address, align);
        abort();
    }
    return address;
}

struct Args;

// Runs `kernel` for items 0..items (the emulator's launch).
extern "C" void ferry_emulate(void (*kernel)(const Args), const Args *args, u64 items);
