// Ferry's accelerator kernels in CUDA C: the `cuda` backend compiles this file with NVRTC
// at start (`--fmad=false`), and the tests compile it with the host's C++ compiler
// (`emulator.rs`, FERRY_EMULATED) and run it on the CPU, one thread after another.
//
// Every output element, row or dot product is computed by one thread, entirely, in a fixed
// sequential order (a MATMUL thread computes a 4×4 tile of them; a QMATMUL output's eight
// lanes are eight threads, their sum a ninth; attention's scores, each head's largest and
// the exponentials are threads of their own, kept in scratch memory for its output's):
// no shared memory, no atomics, no warp reductions. The bits then depend only on the
// data, never on the grid, the GPU's scheduling or the thread count.
// Multiplies and adds are never fused (`--fmad=false` here, `-ffp-contract=off` when
// emulated), and division and square root are IEEE-rounded (NVRTC's defaults), so every
// kernel but MATMUL follows the cpu backend's arithmetic step by step and gives its bits:
// the transcendental functions are the cpu backend's (`cpu/math.rs`), ported.
//
// A kernel takes one argument, `Args`: sixteen 64-bit words (buffer addresses, counts,
// f32 and f64 scalars as their bits), so the host launches every kernel the same way.
// Its first word after the buffers is always the number of work items; surplus threads
// return at once.

typedef unsigned long long u64;
typedef long long i64;
typedef unsigned int u32;
typedef int i32;
typedef unsigned short u16;
typedef short i16;
typedef unsigned char u8;
typedef signed char i8;

#ifdef FERRY_EMULATED
#include "emulated.h"
#else
#define KERNEL extern "C" __global__ void
#define DEV static __device__ __forceinline__
DEV u64 item_index() { return (u64)blockIdx.x * blockDim.x + threadIdx.x; }
DEV double bits_f64(u64 b) { return __longlong_as_double((i64)b); }
DEV u64 f64_bits(double v) { return (u64)__double_as_longlong(v); }
DEV float bits_f32(u32 b) { return __uint_as_float(b); }
DEV u32 f32_bits(float v) { return __float_as_uint(v); }
// A misaligned address faults on the GPU itself (CUDA_ERROR_MISALIGNED_ADDRESS).
DEV u64 aligned_address(u64 address, u64) { return address; }
#endif

struct Args {
    u64 w[16];
};

// Arguments as the host packs them. A buffer's address must suit its element type: the
// GPU faults on a misaligned one, and the emulator stops the process with the address.
#define PTR(T, i) ((T *)aligned_address(a.w[i], alignof(T)))
#define F32(i) bits_f32((u32)a.w[i])
#define F64(i) bits_f64(a.w[i])
#define ITEM(n)                   \
    u64 item = item_index();      \
    if (item >= (n)) return;

// ---- math.rs -------------------------------------------------------------------------

#define LN2_HI_BITS 0x3fe62e42fee00000ULL
#define LN2_LO_BITS 0x3dea39ef35793c76ULL
#define LOG2_E 1.4426950408889634
#define SQRT_2 1.4142135623730951
#define FRAC_PI_2 1.5707963267948966
#define MIN_POSITIVE 2.2250738585072014e-308

DEV double pow2(i64 k) { return bits_f64((u64)(k + 1023) << 52); }

// Rust's `v as i64`: toward zero, saturating, NaN to 0, as the cpu backend converts. A
// GPU's conversion does this itself; in C++ a value out of range is undefined (x86 gives
// the smallest i64, which made the emulator's rotations differ for hostile factors).
DEV i64 to_i64(double v) {
    if (v != v) return 0;
    if (v >= 9223372036854775808.0) return 0x7fffffffffffffffLL;
    if (v < -9223372036854775808.0) return -0x7fffffffffffffffLL - 1;
    return (i64)v;
}

DEV double floor_exact(double v) {
    double t = (double)to_i64(v);
    return t > v ? t - 1.0 : t;
}

DEV double inv_fact(int d) {
    double fact = 1.0;
    for (int i = 1; i <= d; i++) fact *= (double)i;
    return d == 0 ? 1.0 : 1.0 / fact;
}

DEV double exp_f64(double x) {
    if (x != x) return x;
    if (x > 709.79) return bits_f64(0x7ff0000000000000ULL);
    if (x < -745.2) return 0.0;
    double kf = floor_exact(x * LOG2_E + 0.5);
    double r = (x - kf * bits_f64(LN2_HI_BITS)) - kf * bits_f64(LN2_LO_BITS);
    double p = inv_fact(14);
    for (int d = 13; d >= 0; d--) p = p * r + inv_fact(d);
    i64 k = (i64)kf;
    i64 k1 = k / 2;
    return p * pow2(k1) * pow2(k - k1);
}

DEV float exp_f32(float x) {
    if (x != x) return x;
    if (x > 88.72f) return bits_f32(0x7f800000u);
    if (x < -103.98f) return 0.0f;
    const float ln2_hi = 0.6933594f;
    const float ln2_lo = -2.1219444e-4f;
    float t = x * 1.44269504f + 0.5f;
    i32 ti = (i32)t;
    i32 k = (float)ti > t ? ti - 1 : ti;
    float kf = (float)k;
    float r = (x - kf * ln2_hi) - kf * ln2_lo;
    float p = 1.0f / 5040.0f;
    const float c[7] = {1.0f / 720.0f, 1.0f / 120.0f, 1.0f / 24.0f, 1.0f / 6.0f, 0.5f, 1.0f, 1.0f};
    for (int i = 0; i < 7; i++) p = p * r + c[i];
    i32 k1 = k / 2, k2 = k - k / 2;
    return p * bits_f32((u32)(k1 + 127) << 23) * bits_f32((u32)(k2 + 127) << 23);
}

DEV double ln_f64(double x) {
    if (x != x || x < 0.0) return bits_f64(0x7ff8000000000000ULL);
    if (x == 0.0) return bits_f64(0xfff0000000000000ULL);
    if (x == bits_f64(0x7ff0000000000000ULL)) return x;
    i64 bias = 0;
    if (x < MIN_POSITIVE) {
        x = x * pow2(60);
        bias = -60;
    }
    u64 bits = f64_bits(x);
    i64 e = (i64)((bits >> 52) & 0x7ff) - 1023 + bias;
    double m = bits_f64((bits & ((1ULL << 52) - 1)) | (1023ULL << 52));
    if (m > SQRT_2) {
        m *= 0.5;
        e += 1;
    }
    double s = (m - 1.0) / (m + 1.0);
    double s2 = s * s;
    double p = 1.0 / 23.0;
    for (int d = 10; d >= 0; d--) p = p * s2 + 1.0 / (double)(2 * d + 1);
    double lnm = 2.0 * s * p;
    double ef = (double)e;
    return ef * bits_f64(LN2_HI_BITS) + (ef * bits_f64(LN2_LO_BITS) + lnm);
}

DEV double tanh_f64(double x) {
    double a = x < 0.0 ? -x : x;
    if (a != a) return x;
    double t;
    if (a > 22.0) {
        t = 1.0;
    } else if (a < 0.01) {
        double a2 = a * a;
        t = a * (1.0 + a2 * (-1.0 / 3.0 + a2 * (2.0 / 15.0 + a2 * (-17.0 / 315.0))));
    } else {
        t = 1.0 - 2.0 / (exp_f64(2.0 * a) + 1.0);
    }
    return x < 0.0 ? -t : t;
}

// (-1)^d / (2d + odd)!
DEV double trig_coef(int d, int odd) {
    double c = inv_fact(2 * d + odd);
    return d % 2 == 0 ? c : -c;
}

DEV double cos_2pi(double u) {
    double t = 4.0 * u;
    double q = floor_exact(t + 0.5);
    double r = t - q;
    double phi = r * FRAC_PI_2;
    double p2 = phi * phi;
    double c = trig_coef(9, 0);
    for (int k = 8; k >= 0; k--) c = c * p2 + trig_coef(k, 0);
    double s = trig_coef(8, 1);
    for (int k = 7; k >= 0; k--) s = s * p2 + trig_coef(k, 1);
    double sin = s * phi;
    switch (to_i64(q) & 3) {
        case 0: return c;
        case 1: return -sin;
        case 2: return -c;
        default: return sin;
    }
}

// ---- elementwise (ops.rs) -------------------------------------------------------------

// add_bias: x, bias | items, cols
KERNEL ferry_add_bias(const Args a) {
    ITEM(a.w[2]);
    PTR(float, 0)[item] += PTR(const float, 1)[item % a.w[3]];
}

// add: a, b, out | n
KERNEL ferry_add(const Args a) {
    ITEM(a.w[3]);
    PTR(float, 2)[item] = PTR(const float, 0)[item] + PTR(const float, 1)[item];
}

// mul: a, b, out | n
KERNEL ferry_mul(const Args a) {
    ITEM(a.w[3]);
    PTR(float, 2)[item] = PTR(const float, 0)[item] * PTR(const float, 1)[item];
}

// scale: x | n, alpha
KERNEL ferry_scale(const Args a) {
    ITEM(a.w[1]);
    PTR(float, 0)[item] = PTR(float, 0)[item] * F32(2);
}

// axpy: x, y | n, alpha
KERNEL ferry_axpy(const Args a) {
    ITEM(a.w[2]);
    PTR(float, 1)[item] = PTR(float, 1)[item] + F32(3) * PTR(const float, 0)[item];
}

// relu: x, out | n
KERNEL ferry_relu(const Args a) {
    ITEM(a.w[2]);
    float x = PTR(const float, 0)[item];
    PTR(float, 1)[item] = x < 0.0f ? 0.0f : x;
}

// relu_backward: x, grad_out, grad_in | n
KERNEL ferry_relu_backward(const Args a) {
    ITEM(a.w[3]);
    PTR(float, 2)[item] = PTR(const float, 0)[item] > 0.0f ? PTR(const float, 1)[item] : 0.0f;
}

#define GELU_C 0.7978845608028654
#define GELU_A 0.044715

// gelu: x, out | n
KERNEL ferry_gelu(const Args a) {
    ITEM(a.w[2]);
    double x = (double)PTR(const float, 0)[item];
    double t = tanh_f64(GELU_C * (x + GELU_A * x * x * x));
    PTR(float, 1)[item] = (float)(0.5 * x * (1.0 + t));
}

// gelu_backward: x, grad_out, grad_in | n
KERNEL ferry_gelu_backward(const Args a) {
    ITEM(a.w[3]);
    double x = (double)PTR(const float, 0)[item];
    double t = tanh_f64(GELU_C * (x + GELU_A * x * x * x));
    double dinner = GELU_C * (1.0 + 3.0 * GELU_A * x * x);
    double sech2 = 1.0 - t * t;
    double second = sech2 == 0.0 ? 0.0 : 0.5 * x * sech2 * dinner;
    double grad = 0.5 * (1.0 + t) + second;
    PTR(float, 2)[item] = (float)((double)PTR(const float, 1)[item] * grad);
}

// sgd: param, grad | n, lr
KERNEL ferry_sgd(const Args a) {
    ITEM(a.w[2]);
    PTR(float, 0)[item] = PTR(float, 0)[item] - F32(3) * PTR(const float, 1)[item];
}

// adam: param, grad, m, v | n, lr, beta1, beta2, eps, bc1 (f64), bc2 (f64)
KERNEL ferry_adam(const Args a) {
    ITEM(a.w[4]);
    double b1 = (double)F32(6), b2 = (double)F32(7);
    double lr = (double)F32(5), eps = (double)F32(8);
    double bc1 = F64(9), bc2 = F64(10);
    float *p = PTR(float, 0) + item, *m = PTR(float, 2) + item, *v = PTR(float, 3) + item;
    double g = (double)PTR(const float, 1)[item];
    float m1 = (float)(b1 * (double)*m + (1.0 - b1) * g);
    float v1 = (float)(b2 * (double)*v + (1.0 - b2) * g * g);
    double mhat = (double)m1 / bc1;
    double vhat = (double)v1 / bc2;
    *p = (float)((double)*p - lr * mhat / (sqrt(vhat) + eps));
    *m = m1;
    *v = v1;
}

// swiglu: gate, up, out | n
KERNEL ferry_swiglu(const Args a) {
    ITEM(a.w[3]);
    float g = PTR(const float, 0)[item];
    PTR(float, 2)[item] = g / (1.0f + exp_f32(-g)) * PTR(const float, 1)[item];
}

// copy: src, dst | n, src_offset, dst_offset
KERNEL ferry_copy(const Args a) {
    ITEM(a.w[2]);
    PTR(float, 1)[a.w[4] + item] = PTR(const float, 0)[a.w[3] + item];
}

// ---- random fill ------------------------------------------------------------------------

DEV u64 mix64(u64 z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

DEV u64 rotl(u64 v, int s) { return (v << s) | (v >> (64 - s)); }

// rng_fill: out | n, seed, counter, distribution (0 uniform, 1 normal), scale
KERNEL ferry_rng_fill(const Args a) {
    ITEM(a.w[1]);
    const u64 golden = 0x9e3779b97f4a7c15ULL;
    u64 counter = a.w[3] + item;
    u64 key = mix64(a.w[2] ^ 0x6a09e667f3bcc909ULL);
    u64 h1 = mix64(mix64((counter * golden) ^ key) + key);
    u64 h2 = mix64(h1 ^ rotl(key, 32) ^ golden);
    float scale = F32(5);
    float value;
    if (a.w[4] == 0) {
        float u = (float)(h1 >> 40) * (1.0f / 16777216.0f);
        value = (2.0f * u - 1.0f) * scale;
    } else {
        double u1 = (double)((h1 >> 11) + 1) * (1.0 / 9007199254740992.0);
        double u2 = (double)(h2 >> 11) * (1.0 / 9007199254740992.0);
        double z = sqrt(-2.0 * ln_f64(u1)) * cos_2pi(u2);
        value = (float)(z * (double)scale);
    }
    PTR(float, 0)[item] = value;
}

// ---- rows --------------------------------------------------------------------------------

// The maximum of a row, ignoring NaN.
DEV float row_max(const float *row, u64 cols) {
    float m = bits_f32(0xff800000u);
    for (u64 c = 0; c < cols; c++)
        if (row[c] > m) m = row[c];
    return m;
}

// softmax: x, out | rows, cols
KERNEL ferry_softmax(const Args a) {
    ITEM(a.w[2]);
    u64 cols = a.w[3];
    const float *row = PTR(const float, 0) + item * cols;
    float *o = PTR(float, 1) + item * cols;
    double max = (double)row_max(row, cols);
    double sum = 0.0;
    for (u64 c = 0; c < cols; c++) sum += exp_f64((double)row[c] - max);
    for (u64 c = 0; c < cols; c++) o[c] = (float)(exp_f64((double)row[c] - max) / sum);
}

// cross_entropy_rows: logits, labels, grad, row_loss (f64 scratch) | rows, cols
KERNEL ferry_cross_entropy_rows(const Args a) {
    ITEM(a.w[4]);
    u64 rows = a.w[4], cols = a.w[5];
    const float *row = PTR(const float, 0) + item * cols;
    float *g = PTR(float, 2) + item * cols;
    u64 label = PTR(const u32, 1)[item];
    double inv_rows = 1.0 / (double)rows;
    double max = (double)row_max(row, cols);
    double sum = 0.0;
    for (u64 c = 0; c < cols; c++) sum += exp_f64((double)row[c] - max);
    PTR(double, 3)[item] = max + ln_f64(sum) - (double)row[label];
    for (u64 c = 0; c < cols; c++) {
        double p = exp_f64((double)row[c] - max) / sum - (c == label ? 1.0 : 0.0);
        g[c] = (float)(p * inv_rows);
    }
}

// cross_entropy_mean: row_loss (f64 scratch), loss | 1, rows
KERNEL ferry_cross_entropy_mean(const Args a) {
    ITEM(a.w[2]);
    u64 rows = a.w[3];
    double sum = -0.0;
    for (u64 r = 0; r < rows; r++) sum += PTR(const double, 0)[r];
    PTR(float, 1)[0] = (float)(sum * (1.0 / (double)rows));
}

// sum_rows: x, out | rows, cols
KERNEL ferry_sum_rows(const Args a) {
    ITEM(a.w[2]);
    u64 cols = a.w[3];
    const float *row = PTR(const float, 0) + item * cols;
    double sum = -0.0;
    for (u64 c = 0; c < cols; c++) sum += (double)row[c];
    PTR(float, 1)[item] = (float)sum;
}

#define SUM_ROW_CHUNK 256

// sum_cols: x, out | cols, rows (partial sums over chunks of 256 rows, added in order)
KERNEL ferry_sum_cols(const Args a) {
    ITEM(a.w[2]);
    u64 cols = a.w[2], rows = a.w[3];
    const float *x = PTR(const float, 0);
    double acc = 0.0;
    for (u64 first = 0; first < rows; first += SUM_ROW_CHUNK) {
        double partial = 0.0;
        u64 end = first + SUM_ROW_CHUNK < rows ? first + SUM_ROW_CHUNK : rows;
        for (u64 r = first; r < end; r++) partial += (double)x[r * cols + item];
        acc += partial;
    }
    PTR(float, 1)[item] = (float)acc;
}

// A row's mean and 1/sqrt(variance + eps), in f64 (layer_norm's statistics).
DEV void layer_norm_stats(const float *row, u64 cols, double eps, double *mean, double *inv) {
    double sum = -0.0;
    for (u64 c = 0; c < cols; c++) sum += (double)row[c];
    double m = sum / (double)cols;
    double sq = -0.0;
    for (u64 c = 0; c < cols; c++) sq += ((double)row[c] - m) * ((double)row[c] - m);
    double var = sq / (double)cols;
    *mean = m;
    *inv = 1.0 / sqrt(var + eps);
}

// A row's 1/sqrt(mean square + eps), in f64 (rms_norm's scale).
DEV double rms_norm_scale(const float *row, u64 cols, double eps) {
    double sum = -0.0;
    for (u64 c = 0; c < cols; c++) sum += (double)row[c] * (double)row[c];
    double mean = sum / (double)cols;
    return 1.0 / sqrt(mean + eps);
}

// layer_norm: x, gamma, beta, out | rows, cols, eps
KERNEL ferry_layer_norm(const Args a) {
    ITEM(a.w[4]);
    u64 cols = a.w[5];
    const float *row = PTR(const float, 0) + item * cols;
    const float *gamma = PTR(const float, 1), *beta = PTR(const float, 2);
    float *o = PTR(float, 3) + item * cols;
    double mean, inv;
    layer_norm_stats(row, cols, (double)F32(6), &mean, &inv);
    for (u64 c = 0; c < cols; c++) {
        double norm = ((double)row[c] - mean) * inv;
        o[c] = (float)(norm * (double)gamma[c] + (double)beta[c]);
    }
}

// rms_norm: x, weight, out | rows, cols, eps
KERNEL ferry_rms_norm(const Args a) {
    ITEM(a.w[3]);
    u64 cols = a.w[4];
    const float *row = PTR(const float, 0) + item * cols;
    const float *w = PTR(const float, 1);
    float *o = PTR(float, 2) + item * cols;
    double inv = rms_norm_scale(row, cols, (double)F32(5));
    for (u64 c = 0; c < cols; c++) o[c] = (float)((double)row[c] * inv * (double)w[c]);
}

// The norms of few rows (a decode step's one), in two steps with the same bits: a thread
// per row for its statistics (in f64, kept in scratch), then a thread per element.

// layer_norm_stats: x, stats (f64: mean, 1/sqrt(var + eps) per row) | rows, cols, eps
KERNEL ferry_layer_norm_stats(const Args a) {
    ITEM(a.w[2]);
    u64 cols = a.w[3];
    double *stats = PTR(double, 1) + 2 * item;
    layer_norm_stats(PTR(const float, 0) + item * cols, cols, (double)F32(4), &stats[0],
                     &stats[1]);
}

// layer_norm_apply: x, gamma, beta, stats, out | items (rows·cols), cols
KERNEL ferry_layer_norm_apply(const Args a) {
    ITEM(a.w[5]);
    u64 cols = a.w[6];
    u64 r = item / cols, c = item % cols;
    const double *stats = PTR(const double, 3) + 2 * r;
    double norm = ((double)PTR(const float, 0)[item] - stats[0]) * stats[1];
    PTR(float, 4)[item] =
        (float)(norm * (double)PTR(const float, 1)[c] + (double)PTR(const float, 2)[c]);
}

// rms_norm_inv: x, invs (f64: 1/sqrt(mean square + eps) per row) | rows, cols, eps
KERNEL ferry_rms_norm_inv(const Args a) {
    ITEM(a.w[2]);
    u64 cols = a.w[3];
    PTR(double, 1)[item] = rms_norm_scale(PTR(const float, 0) + item * cols, cols, (double)F32(4));
}

// rms_norm_apply: x, weight, invs, out | items (rows·cols), cols
KERNEL ferry_rms_norm_apply(const Args a) {
    ITEM(a.w[4]);
    u64 cols = a.w[5];
    u64 r = item / cols, c = item % cols;
    PTR(float, 3)[item] = (float)((double)PTR(const float, 0)[item] * PTR(const double, 2)[r] *
                                  (double)PTR(const float, 1)[c]);
}

// argmax: x, out (u32) | rows, cols: the first maximum, or the first NaN
KERNEL ferry_argmax(const Args a) {
    ITEM(a.w[2]);
    u64 cols = a.w[3];
    const float *row = PTR(const float, 0) + item * cols;
    u64 best = 0;
    for (u64 c = 1; c < cols; c++) {
        if (row[best] != row[best]) break;
        if (row[c] != row[c] || row[c] > row[best]) best = c;
    }
    PTR(u32, 1)[item] = (u32)best;
}

// argmax_chunks: x, bests (u32) | items (rows·chunks), cols, chunk, chunks
// ferry_argmax's rule within each chunk of `chunk` columns of a row: its first maximum, or
// its first NaN.
KERNEL ferry_argmax_chunks(const Args a) {
    ITEM(a.w[2]);
    u64 cols = a.w[3], chunk = a.w[4], chunks = a.w[5];
    u64 first = item % chunks * chunk;
    u64 end = first + chunk < cols ? first + chunk : cols;
    const float *row = PTR(const float, 0) + item / chunks * cols;
    u64 best = first;
    for (u64 c = first + 1; c < end; c++) {
        if (row[best] != row[best]) break;
        if (row[c] != row[c] || row[c] > row[best]) best = c;
    }
    PTR(u32, 1)[item] = (u32)best;
}

// argmax_pick: x, bests, out (u32) | rows, cols, chunks
// The same rule over the chunks' picks, in order: the row's first maximum (a later chunk's
// equal one is not greater) or its first NaN (the first chunk with one picks it, and ends
// the walk), as ferry_argmax finds in one pass.
KERNEL ferry_argmax_pick(const Args a) {
    ITEM(a.w[3]);
    u64 cols = a.w[4], chunks = a.w[5];
    const float *row = PTR(const float, 0) + item * cols;
    const u32 *bests = PTR(const u32, 1) + item * chunks;
    u64 best = bests[0];
    for (u64 k = 1; k < chunks; k++) {
        if (row[best] != row[best]) break;
        u64 c = bests[k];
        if (row[c] != row[c] || row[c] > row[best]) best = c;
    }
    PTR(u32, 2)[item] = (u32)best;
}

// rope: x, factors | items (rows·heads·half), heads, head_dim, pos, base,
// style (0 adjacent, 1 half)
KERNEL ferry_rope(const Args a) {
    ITEM(a.w[2]);
    u64 heads = a.w[3], head_dim = a.w[4], pos = a.w[5];
    u64 half = head_dim / 2;
    u64 i = item % half, head = item / half;
    u64 r = head / heads;
    double ln_base = ln_f64((double)F32(6));
    double turns = exp_f64(-((double)(2 * i)) / (double)head_dim * ln_base) /
                   (2.0 * 3.141592653589793) / (double)PTR(const float, 1)[i];
    double p = (double)(pos + r);
    double cos = cos_2pi(p * turns), sin = cos_2pi(p * turns - 0.25);
    float *h = PTR(float, 0) + head * head_dim;
    u64 ia = a.w[7] == 0 ? 2 * i : i;
    u64 ib = a.w[7] == 0 ? 2 * i + 1 : i + half;
    double x0 = (double)h[ia], x1 = (double)h[ib];
    h[ia] = (float)(x0 * cos - x1 * sin);
    h[ib] = (float)(x0 * sin + x1 * cos);
}

// ---- attention -------------------------------------------------------------------------

// attention_decode: q, k_cache, v_cache, out | items (heads·head_dim), heads, head_dim, len
// One thread per output element: it recomputes its head's scores (in f64, as the cpu
// backend does per head) and sums its own column of values.
KERNEL ferry_attention_decode(const Args a) {
    ITEM(a.w[4]);
    u64 heads = a.w[5], hd = a.w[6], len = a.w[7];
    u64 h = item / hd, d = item % hd;
    u64 stride = heads * hd;
    const float *q = PTR(const float, 0) + h * hd;
    const float *kc = PTR(const float, 1), *vc = PTR(const float, 2);
    double scale = 1.0 / sqrt((double)hd);
    double max = bits_f64(0xfff0000000000000ULL);
    for (u64 p = 0; p < len; p++) {
        const float *k = kc + p * stride + h * hd;
        double dot = -0.0;
        for (u64 e = 0; e < hd; e++) dot += (double)q[e] * (double)k[e];
        double s = dot * scale;
        if (s > max) max = s;
    }
    double sum = 0.0, acc = 0.0;
    for (u64 p = 0; p < len; p++) {
        const float *k = kc + p * stride + h * hd;
        double dot = -0.0;
        for (u64 e = 0; e < hd; e++) dot += (double)q[e] * (double)k[e];
        double w = exp_f64(dot * scale - max);
        sum += w;
        acc += w * (double)vc[p * stride + h * hd + d];
    }
    PTR(float, 3)[item] = (float)(acc / sum);
}

// The split attentions below give the bits of the fused ones above (each score, exponential
// and sum is the same expression, taken in the same order), with each score computed once,
// by a thread of its own, instead of again in every thread of its head's output: the fused
// kernels remain for heads whose scores would take too much scratch memory.

// attention_decode_scores: q, k_cache, scores | items (heads·len), heads, head_dim, len
// One thread per (head, position): its scaled score, in f64.
KERNEL ferry_attention_decode_scores(const Args a) {
    ITEM(a.w[3]);
    u64 heads = a.w[4], hd = a.w[5], len = a.w[6];
    u64 h = item / len, p = item % len;
    const float *q = PTR(const float, 0) + h * hd;
    const float *k = PTR(const float, 1) + p * heads * hd + h * hd;
    double scale = 1.0 / sqrt((double)hd);
    double dot = -0.0;
    for (u64 e = 0; e < hd; e++) dot += (double)q[e] * (double)k[e];
    PTR(double, 2)[item] = dot * scale;
}

// attention_decode_max: scores, maxes | items (heads), len
// One thread per head: its largest score, in position order.
KERNEL ferry_attention_decode_max(const Args a) {
    ITEM(a.w[2]);
    u64 len = a.w[3];
    const double *s = PTR(const double, 0) + item * len;
    double max = bits_f64(0xfff0000000000000ULL);
    for (u64 p = 0; p < len; p++)
        if (s[p] > max) max = s[p];
    PTR(double, 1)[item] = max;
}

// attention_decode_exps: scores, maxes, exps | items (heads·len), len
// One thread per (head, position): exp(score - the head's largest score).
KERNEL ferry_attention_decode_exps(const Args a) {
    ITEM(a.w[3]);
    u64 len = a.w[4];
    PTR(double, 2)[item] = exp_f64(PTR(const double, 0)[item] - PTR(const double, 1)[item / len]);
}

// attention_decode_values: exps, v_cache, out | items (heads·head_dim), heads, head_dim, len
// One thread per output element: the sum of its head's exponentials and of its column of
// values weighted by them, in position order.
KERNEL ferry_attention_decode_values(const Args a) {
    ITEM(a.w[3]);
    u64 heads = a.w[4], hd = a.w[5], len = a.w[6];
    u64 h = item / hd, d = item % hd;
    const double *w = PTR(const double, 0) + h * len;
    const float *vc = PTR(const float, 1);
    double sum = 0.0, acc = 0.0;
    for (u64 p = 0; p < len; p++) {
        sum += w[p];
        acc += w[p] * (double)vc[p * heads * hd + h * hd + d];
    }
    PTR(float, 2)[item] = (float)(acc / sum);
}

// a · b in eight f32 lanes, summed in a fixed order, the tail last (ops.rs's dot8).
DEV float dot8(const float *a, const float *b, u64 n) {
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    u64 done = n / 8 * 8;
    for (u64 i = 0; i < done; i += 8)
        for (int l = 0; l < 8; l++) acc[l] += a[i + l] * b[i + l];
    float tail = -0.0f;
    for (u64 i = done; i < n; i++) tail += a[i] * b[i];
    return ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7])) +
           tail;
}

// attention (causal, grouped-query): q, k_cache, v_cache, out |
//   items (rows·heads·head_dim), heads, kv_heads, head_dim, pos
KERNEL ferry_attention(const Args a) {
    ITEM(a.w[4]);
    u64 heads = a.w[5], kv_heads = a.w[6], hd = a.w[7], pos = a.w[8];
    u64 i = item / hd, d = item % hd;
    u64 r = i / heads, h = i % heads;
    u64 len = pos + r + 1;
    u64 kvh = h / (heads / kv_heads);
    u64 kv_stride = kv_heads * hd;
    const float *q = PTR(const float, 0) + i * hd;
    const float *kc = PTR(const float, 1), *vc = PTR(const float, 2);
    float scale = (float)(1.0 / sqrt((double)hd));
    float max = bits_f32(0xff800000u);
    for (u64 p = 0; p < len; p++) {
        float score = dot8(q, kc + p * kv_stride + kvh * hd, hd) * scale;
        max = score > max ? score : max;
    }
    double sum = 0.0;
    for (u64 p = 0; p < len; p++) {
        float score = dot8(q, kc + p * kv_stride + kvh * hd, hd) * scale;
        sum += (double)exp_f32(score - max);
    }
    float acc = 0.0f;
    for (u64 p = 0; p < len; p++) {
        float score = dot8(q, kc + p * kv_stride + kvh * hd, hd) * scale;
        float w = (float)((double)exp_f32(score - max) / sum);
        acc += w * vc[p * kv_stride + kvh * hd + d];
    }
    PTR(float, 3)[item] = acc;
}

// attention_scores: q, k_cache, scores | items (rows·heads·span), heads, kv_heads,
//   head_dim, pos, span (pos + rows: the longest row's length)
// One thread per (row, head, position) within the row's causal length: its scaled score.
KERNEL ferry_attention_scores(const Args a) {
    ITEM(a.w[3]);
    u64 heads = a.w[4], kv_heads = a.w[5], hd = a.w[6], pos = a.w[7], span = a.w[8];
    u64 i = item / span, p = item % span;
    if (p > pos + i / heads) return;
    u64 kvh = i % heads / (heads / kv_heads);
    const float *q = PTR(const float, 0) + i * hd;
    const float *k = PTR(const float, 1) + p * kv_heads * hd + kvh * hd;
    float scale = (float)(1.0 / sqrt((double)hd));
    PTR(float, 2)[item] = dot8(q, k, hd) * scale;
}

// attention_max: scores, maxes | items (rows·heads), heads, pos, span
// One thread per (row, head): the largest of its row's scores, in position order.
KERNEL ferry_attention_max(const Args a) {
    ITEM(a.w[2]);
    u64 heads = a.w[3], pos = a.w[4], span = a.w[5];
    u64 len = pos + item / heads + 1;
    const float *s = PTR(const float, 0) + item * span;
    float max = bits_f32(0xff800000u);
    for (u64 p = 0; p < len; p++) max = s[p] > max ? s[p] : max;
    PTR(float, 1)[item] = max;
}

// attention_exps: scores, maxes, exps | items (rows·heads·span), heads, pos, span
// One thread per (row, head, position) within the row's causal length: exp(score - the
// largest of its row's scores).
KERNEL ferry_attention_exps(const Args a) {
    ITEM(a.w[3]);
    u64 heads = a.w[4], pos = a.w[5], span = a.w[6];
    u64 i = item / span, p = item % span;
    if (p > pos + i / heads) return;
    PTR(float, 2)[item] = exp_f32(PTR(const float, 0)[item] - PTR(const float, 1)[i]);
}

// attention_values: exps, v_cache, out | items (rows·heads·head_dim), heads, kv_heads,
//   head_dim, pos, span
// One thread per output element: the sum of its row's exponentials, then its column of
// values weighted by each over that sum, in position order.
KERNEL ferry_attention_values(const Args a) {
    ITEM(a.w[3]);
    u64 heads = a.w[4], kv_heads = a.w[5], hd = a.w[6], pos = a.w[7], span = a.w[8];
    u64 i = item / hd, d = item % hd;
    u64 len = pos + i / heads + 1;
    u64 kvh = i % heads / (heads / kv_heads);
    u64 kv_stride = kv_heads * hd;
    const float *e = PTR(const float, 0) + i * span;
    const float *vc = PTR(const float, 1);
    double sum = 0.0;
    for (u64 p = 0; p < len; p++) sum += (double)e[p];
    float acc = 0.0f;
    for (u64 p = 0; p < len; p++) {
        float w = (float)((double)e[p] / sum);
        acc += w * vc[p * kv_stride + kvh * hd + d];
    }
    PTR(float, 2)[item] = acc;
}

// ---- MATMUL ----------------------------------------------------------------------------

// matmul: a, b, c | items (m·n), m, n, k, transpose_a, transpose_b, accumulate
// One thread per element of c, its dot product accumulated in f32 in depth order (not
// the cpu backend's blocking: close to it, not its bits).
KERNEL ferry_matmul(const Args a) {
    ITEM(a.w[3]);
    u64 m = a.w[4], n = a.w[5], k = a.w[6];
    u64 i = item / n, j = item % n;
    const float *A = PTR(const float, 0), *B = PTR(const float, 1);
    float acc = 0.0f;
    for (u64 kk = 0; kk < k; kk++) {
        float av = a.w[7] ? A[kk * m + i] : A[i * k + kk];
        float bv = a.w[8] ? B[j * k + kk] : B[kk * n + j];
        acc += av * bv;
    }
    float *c = PTR(float, 2) + item;
    *c = a.w[9] ? *c + acc : acc;
}

// matmul_tiled: a, b, c | items (⌈m/4⌉·⌈n/4⌉), m, n, k, transpose_a, transpose_b,
// accumulate. The same arithmetic as ferry_matmul (each element of c accumulated in f32 in
// depth order, so the same bits), a 4×4 tile of c per thread: each value of a and b
// loaded serves four products instead of one.
KERNEL ferry_matmul_tiled(const Args a) {
    ITEM(a.w[3]);
    u64 m = a.w[4], n = a.w[5], k = a.w[6];
    u64 tiles_n = (n + 3) / 4;
    u64 i0 = item / tiles_n * 4, j0 = item % tiles_n * 4;
    const float *A = PTR(const float, 0), *B = PTR(const float, 1);
    float acc[4][4] = {{0, 0, 0, 0}, {0, 0, 0, 0}, {0, 0, 0, 0}, {0, 0, 0, 0}};
    for (u64 kk = 0; kk < k; kk++) {
        float av[4], bv[4];
        for (int t = 0; t < 4; t++) {
            u64 i = i0 + t < m ? i0 + t : m - 1, j = j0 + t < n ? j0 + t : n - 1;
            av[t] = a.w[7] ? A[kk * m + i] : A[i * k + kk];
            bv[t] = a.w[8] ? B[j * k + kk] : B[kk * n + j];
        }
        for (int ti = 0; ti < 4; ti++)
            for (int tj = 0; tj < 4; tj++) acc[ti][tj] += av[ti] * bv[tj];
    }
    for (int ti = 0; ti < 4 && i0 + ti < m; ti++)
        for (int tj = 0; tj < 4 && j0 + tj < n; tj++) {
            float *c = PTR(float, 2) + (i0 + ti) * n + j0 + tj;
            *c = a.w[9] ? *c + acc[ti][tj] : acc[ti][tj];
        }
}

// matmul_split: a, b, partials | items (splits·m·n), m, n, k, transpose_a, transpose_b,
// depth per split. For products with few outputs and a long depth (a decode step's
// matrix-vector products): each thread accumulates one output over one slice of the depth,
// in depth order, into its partial; matmul_split_sum adds an output's partials in slice
// order. The slices depend only on the shape, so the bits do too.
KERNEL ferry_matmul_split(const Args a) {
    ITEM(a.w[3]);
    u64 m = a.w[4], n = a.w[5], k = a.w[6], depth = a.w[9];
    u64 outputs = m * n, split = item / outputs, o = item % outputs;
    u64 i = o / n, j = o % n;
    const float *A = PTR(const float, 0), *B = PTR(const float, 1);
    u64 from = split * depth, to = from + depth < k ? from + depth : k;
    float acc = 0.0f;
    for (u64 kk = from; kk < to; kk++) {
        float av = a.w[7] ? A[kk * m + i] : A[i * k + kk];
        float bv = a.w[8] ? B[j * k + kk] : B[kk * n + j];
        acc += av * bv;
    }
    PTR(float, 2)[item] = acc;
}

// matmul_split_sum: partials, c | items (m·n), splits, accumulate
KERNEL ferry_matmul_split_sum(const Args a) {
    ITEM(a.w[2]);
    u64 splits = a.w[3];
    const float *partials = PTR(const float, 0);
    float acc = 0.0f;
    for (u64 s = 0; s < splits; s++) acc += partials[s * a.w[2] + item];
    float *c = PTR(float, 1) + item;
    *c = a.w[4] ? *c + acc : acc;
}

// ---- GGML block formats (quant.rs) ----------------------------------------------------------

DEV float f16_to_f32(u16 h) {
    u32 sign = (u32)(h & 0x8000) << 16;
    u32 exp = (h >> 10) & 0x1f;
    u32 man = h & 0x3ff;
    if (exp == 0) {
        if (man == 0) return bits_f32(sign);
        float v = (float)man * (1.0f / 16777216.0f);
        return sign ? -v : v;
    }
    if (exp == 31) return bits_f32(sign | 0x7f800000u | (man << 13));
    return bits_f32(sign | ((exp + 112) << 23) | (man << 13));
}

DEV float half_at(const u8 *b, u64 at) { return f16_to_f32((u16)(b[at] | (b[at + 1] << 8))); }

DEV float f32_at(const u8 *b, u64 at) {
    return bits_f32((u32)b[at] | ((u32)b[at + 1] << 8) | ((u32)b[at + 2] << 16) |
                    ((u32)b[at + 3] << 24));
}

#define INPUT_BLOCK 32
#define INPUT_MAX 32767.0f

// The input rows of a QMATMUL with a block format, prepared as quant.rs's `prepare`:
// per block of 32 elements, 16-bit integers, one scale and eight lane sums.
// qprepare: x, q (i16), d (f32), sums (8 f32 per block) | blocks
KERNEL ferry_qprepare(const Args a) {
    ITEM(a.w[4]);
    const float *b = PTR(const float, 0) + item * INPUT_BLOCK;
    float *t = PTR(float, 3) + item * 8;
    for (int l = 0; l < 8; l++) {
        float s = 0.0f;
        for (int g = 0; g < 4; g++) s += b[8 * g + l];
        t[l] = s;
    }
    float amax = 0.0f;
    for (int i = 0; i < INPUT_BLOCK; i++) {
        float v = b[i] < 0.0f ? -b[i] : b[i];
        // f32::max: a NaN never wins.
        if (v > amax || amax != amax) amax = v != v ? amax : v;
    }
    float inv = amax > 0.0f ? INPUT_MAX / amax : 0.0f;
    PTR(float, 2)[item] = amax / INPUT_MAX;
    i16 *q = PTR(i16, 1) + item * INPUT_BLOCK;
    for (int i = 0; i < INPUT_BLOCK; i++) {
        float r = (b[i] * inv + 12582912.0f) - 12582912.0f;
        if (r != r) {
            q[i] = 0;
        } else {
            r = r < -INPUT_MAX ? -INPUT_MAX : (r > INPUT_MAX ? INPUT_MAX : r);
            q[i] = (i16)r;
        }
    }
}

DEV float lane_sum(const float *acc) {
    return ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
}

DEV void q4k_scale_min(int j, const u8 *s, u8 *sc, u8 *mn) {
    if (j < 4) {
        *sc = s[j] & 63;
        *mn = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 0xf) | ((s[j - 4] >> 6) << 4);
        *mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

DEV i32 q6k_value(const u8 *ql, const u8 *qh, int quarter, int l) {
    u8 low;
    switch (quarter) {
        case 0: low = ql[l] & 0xf; break;
        case 1: low = ql[l + 32] & 0xf; break;
        case 2: low = ql[l] >> 4; break;
        default: low = ql[l + 32] >> 4; break;
    }
    u8 high = (qh[l] >> (2 * quarter)) & 3;
    return (i32)(low | (high << 4)) - 32;
}

// dtype codes (abi/src/accel/dtype.rs)
#define DT_F32 0
#define DT_F16 1
#define DT_Q4_0 2
#define DT_Q4_1 3
#define DT_Q8_0 8
#define DT_Q4K 12
#define DT_Q6K 14

// Lane `l` (0..8) of one weight row times one input row, as quant.rs's dot_* accumulate
// it for `dtype`: the lanes never mix until `lane_sum`, so computing one lane alone gives
// the bits it has in the interleaved loop.
DEV float lane_acc(u64 dtype, const u8 *row, u64 k, const float *x, const i16 *q,
                   const float *dx, const float *sums, int l) {
    float acc = 0.0f;
    if (dtype == DT_F32 || dtype == DT_F16) {
        u64 done = k / 8 * 8;
        for (u64 i = l; i < done; i += 8) {
            float w = dtype == DT_F32 ? f32_at(row, 4 * i) : half_at(row, 2 * i);
            acc += w * x[i];
        }
        return acc;
    }
    // Lane l's four elements of a block of 32: 2l, 2l+1, 16+2l, 17+2l.
    i32 w[4];
    int at[4] = {2 * l, 2 * l + 1, 16 + 2 * l, 17 + 2 * l};
    if (dtype == DT_Q8_0 || dtype == DT_Q4_0 || dtype == DT_Q4_1) {
        u64 bytes = dtype == DT_Q8_0 ? 34 : (dtype == DT_Q4_0 ? 18 : 20);
        for (u64 i = 0; i < k / 32; i++) {
            const u8 *b = row + i * bytes;
            const i16 *qb = q + 32 * i;
            for (int e = 0; e < 4; e++) {
                int j = at[e];
                if (dtype == DT_Q8_0)
                    w[e] = (i32)(i8)b[2 + j];
                else if (dtype == DT_Q4_0)
                    w[e] = (i32)(j < 16 ? (b[2 + j] & 0xf) : (b[2 + j - 16] >> 4)) - 8;
                else
                    w[e] = j < 16 ? (b[4 + j] & 0xf) : (b[4 + j - 16] >> 4);
            }
            i32 lo = w[0] * (i32)qb[at[0]] + w[1] * (i32)qb[at[1]];
            i32 hi = w[2] * (i32)qb[at[2]] + w[3] * (i32)qb[at[3]];
            float f = (float)(lo + hi);
            if (dtype == DT_Q4_1)
                acc += half_at(b, 0) * dx[i] * f + half_at(b, 2) * sums[8 * i + l];
            else
                acc += half_at(b, 0) * dx[i] * f;
        }
        return acc;
    }
    if (dtype == DT_Q4K) {
        for (u64 sb = 0; sb < k / 256; sb++) {
            const u8 *b = row + sb * 144;
            float d = half_at(b, 0), dmin = half_at(b, 2);
            for (int j = 0; j < 4; j++) {
                const u8 *bytes = b + 16 + 32 * j;
                for (int sub = 0; sub < 2; sub++) {
                    u64 blk = 8 * sb + 2 * j + sub;
                    const i16 *qb = q + 32 * blk;
                    u8 sc, mn;
                    q4k_scale_min(2 * j + sub, b + 4, &sc, &mn);
                    for (int e = 0; e < 4; e++) w[e] = (bytes[at[e]] >> (4 * sub)) & 0xf;
                    i32 lo = w[0] * (i32)qb[at[0]] + w[1] * (i32)qb[at[1]];
                    i32 hi = w[2] * (i32)qb[at[2]] + w[3] * (i32)qb[at[3]];
                    float scale = d * (float)sc * dx[blk];
                    acc += scale * (float)(lo + hi) + -(dmin * (float)mn) * sums[8 * blk + l];
                }
            }
        }
        return acc;
    }
    // Q6_K: sub-blocks of 16, each with its own scale, each lane two elements of each.
    for (u64 sb = 0; sb < k / 256; sb++) {
        const u8 *b = row + sb * 210;
        float d = half_at(b, 208);
        for (int h = 0; h < 2; h++) {
            const u8 *ql = b + 64 * h, *qh = b + 128 + 32 * h, *sc = b + 192 + 8 * h;
            for (int quarter = 0; quarter < 4; quarter++) {
                u64 blk = 8 * sb + 4 * h + quarter;
                const i16 *qb = q + 32 * blk;
                for (int hq = 0; hq < 2; hq++) {
                    int e0 = 16 * hq + 2 * l;
                    i32 v = q6k_value(ql, qh, quarter, e0) * (i32)qb[e0] +
                            q6k_value(ql, qh, quarter, e0 + 1) * (i32)qb[e0 + 1];
                    acc += d * (float)(i8)sc[hq + 2 * quarter] * dx[blk] * (float)v;
                }
            }
        }
    }
    return acc;
}

// The dot product from its eight lanes: their fixed-order sum, then (f32 and f16
// weights) the elements after the last whole group of eight, in order.
DEV float dot_from_lanes(u64 dtype, const float *lanes, const u8 *row, u64 k, const float *x) {
    float sum = lane_sum(lanes);
    if (dtype != DT_F32 && dtype != DT_F16) return sum;
    float tail = 0.0f;
    for (u64 i = k / 8 * 8; i < k; i++)
        tail += (dtype == DT_F32 ? f32_at(row, 4 * i) : half_at(row, 2 * i)) * x[i];
    return sum + tail;
}

DEV u64 row_bytes_of(u64 dtype, u64 k) {
    return dtype == DT_F32    ? 4 * k
           : dtype == DT_F16  ? 2 * k
           : dtype == DT_Q4_0 ? k / 32 * 18
           : dtype == DT_Q4_1 ? k / 32 * 20
           : dtype == DT_Q8_0 ? k / 32 * 34
           : dtype == DT_Q4K  ? k / 256 * 144
                              : k / 256 * 210;
}

// qmatmul: w, x, out, q (i16), d, sums | items (m·n), n, k, dtype
// One thread per output: its eight lanes, then their sum.
KERNEL ferry_qmatmul(const Args a) {
    ITEM(a.w[6]);
    u64 n = a.w[7], k = a.w[8], dtype = a.w[9];
    u64 r = item / n, i = item % n;
    u64 blocks = k / 32;
    const u8 *row = PTR(const u8, 0) + i * row_bytes_of(dtype, k);
    const float *x = PTR(const float, 1) + r * k;
    float lanes[8];
    for (int l = 0; l < 8; l++)
        lanes[l] = lane_acc(dtype, row, k, x, PTR(const i16, 3) + r * k,
                            PTR(const float, 4) + r * blocks, PTR(const float, 5) + r * blocks * 8,
                            l);
    PTR(float, 2)[item] = dot_from_lanes(dtype, lanes, row, k, x);
}

// qmatmul_lanes: w, x, lanes (8 f32 per output), q (i16), d, sums | items (m·n·8), n, k,
// dtype. One thread per lane of an output: eight times the threads of ferry_qmatmul (a
// decode step's matrix–vector products have too few outputs to fill a GPU otherwise).
KERNEL ferry_qmatmul_lanes(const Args a) {
    ITEM(a.w[6]);
    u64 n = a.w[7], k = a.w[8], dtype = a.w[9];
    u64 output = item / 8;
    int l = (int)(item % 8);
    u64 r = output / n, i = output % n;
    u64 blocks = k / 32;
    PTR(float, 2)[item] =
        lane_acc(dtype, PTR(const u8, 0) + i * row_bytes_of(dtype, k), k,
                 PTR(const float, 1) + r * k, PTR(const i16, 3) + r * k,
                 PTR(const float, 4) + r * blocks, PTR(const float, 5) + r * blocks * 8, l);
}

// qmatmul_sum: w, x, out, lanes | items (m·n), n, k, dtype
KERNEL ferry_qmatmul_sum(const Args a) {
    ITEM(a.w[4]);
    u64 n = a.w[5], k = a.w[6], dtype = a.w[7];
    u64 r = item / n, i = item % n;
    PTR(float, 2)[item] =
        dot_from_lanes(dtype, PTR(const float, 3) + 8 * item,
                       PTR(const u8, 0) + i * row_bytes_of(dtype, k), k,
                       PTR(const float, 1) + r * k);
}

// Element e of a row in `dtype`, dequantized as quant.rs's dequant_row.
DEV float dequant(u64 dtype, const u8 *row, u64 e) {
    switch (dtype) {
        case DT_F32: return f32_at(row, 4 * e);
        case DT_F16: return half_at(row, 2 * e);
        case DT_Q8_0: {
            const u8 *b = row + e / 32 * 34;
            return half_at(b, 0) * (float)(i8)b[2 + e % 32];
        }
        case DT_Q4_0:
        case DT_Q4_1: {
            u64 bytes = dtype == DT_Q4_1 ? 20 : 18;
            const u8 *b = row + e / 32 * bytes;
            const u8 *q = b + (dtype == DT_Q4_1 ? 4 : 2);
            u64 j = e % 32;
            float v = (float)(j < 16 ? (q[j] & 0xf) : (q[j - 16] >> 4));
            if (dtype == DT_Q4_1) return half_at(b, 0) * v + half_at(b, 2);
            return half_at(b, 0) * (v - 8.0f);
        }
        case DT_Q4K: {
            const u8 *b = row + e / 256 * 144;
            u64 o = e % 256, j = o / 64, sub = (o % 64) / 32, l = o % 32;
            u8 sc, mn;
            q4k_scale_min((int)(2 * j + sub), b + 4, &sc, &mn);
            float d1 = half_at(b, 0) * (float)sc, m1 = half_at(b, 2) * (float)mn;
            return d1 * (float)((b[16 + 32 * j + l] >> (4 * sub)) & 0xf) - m1;
        }
        default: {
            const u8 *b = row + e / 256 * 210;
            u64 o = e % 256, h = o / 128, quarter = (o % 128) / 32, l = o % 32;
            float scale = half_at(b, 208) * (float)(i8)b[192 + 8 * h + l / 16 + 2 * quarter];
            return scale * (float)q6k_value(b + 64 * h, b + 128 + 32 * h, (int)quarter, (int)l);
        }
    }
}

// qembedding: table, ids (u32), out | items (count·dim), dim, row_bytes, dtype
KERNEL ferry_qembedding(const Args a) {
    ITEM(a.w[3]);
    u64 dim = a.w[4], row_bytes = a.w[5];
    u64 i = item / dim, e = item % dim;
    const u8 *row = PTR(const u8, 0) + (u64)PTR(const u32, 1)[i] * row_bytes;
    PTR(float, 2)[item] = dequant(a.w[6], row, e);
}

#ifdef FERRY_EMULATED
extern "C" void ferry_emulate(void (*kernel)(const Args), const Args *args, u64 items) {
    for (u64 i = 0; i < items; i++) {
        ferry_current_item = i;
        kernel(*args);
    }
}
#endif
