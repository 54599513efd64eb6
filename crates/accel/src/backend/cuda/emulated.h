// What kernels.cu needs of CUDA, on the host: the tests compile kernels.cu with the host's
// C++ compiler and this header (`-DFERRY_EMULATED -ffp-contract=off`) and run each kernel
// for one work item after another (see emulator.rs). Every kernel computes its items
// independently, so running them in sequence gives what the GPU's threads give.
// (kernels.cu declares the integer types before including it.)
#include <math.h>
#include <string.h>

#define KERNEL extern "C" void
#define DEV static inline

static u64 ferry_current_item;

DEV u64 item_index() { return ferry_current_item; }
DEV double bits_f64(u64 b) {
    double v;
    memcpy(&v, &b, 8);
    return v;
}
DEV u64 f64_bits(double v) {
    u64 b;
    memcpy(&b, &v, 8);
    return b;
}
DEV float bits_f32(u32 b) {
    float v;
    memcpy(&v, &b, 4);
    return v;
}
DEV u32 f32_bits(float v) {
    u32 b;
    memcpy(&b, &v, 4);
    return b;
}

struct Args;

// Runs `kernel` for items 0..items (the emulator's launch).
extern "C" void ferry_emulate(void (*kernel)(const Args), const Args *args, u64 items);
