//! Transcendental functions built only from IEEE-754 basic operations (`+ - * /`,
//! `sqrt`, `floor`), so that they give the same bits on every host, build and guest: the
//! platform's libm may pick different code paths per CPU (e.g. FMA variants), and Rust
//! never fuses a multiply and an add on its own. Part of the contract because the
//! kernels' results are defined by them (every backend computes these very steps), and
//! because the guest (`no_std`, without libm) samples tokens with the same [`exp`].
//!
//! All work in f64; the kernels round their results to f32, and the errors here (a few
//! f64 ulps) are far below half an f32 ulp.

/// ln 2 rounded to 32 significant bits (so `k·LN2_HI` is exact for |k| < 2^21).
const LN2_HI: f64 = f64::from_bits(0x3fe6_2e42_fee0_0000);
/// ln 2 - LN2_HI.
const LN2_LO: f64 = f64::from_bits(0x3dea_39ef_3579_3c76);
const LOG2_E: f64 = core::f64::consts::LOG2_E;

/// `2^k` for `k` in `-1022..=1023`.
fn pow2(k: i64) -> f64 {
    f64::from_bits(((k + 1023) as u64) << 52)
}

/// `floor(v)` for `|v| < 2^62`, exactly, without libm (whose `floor` is a call on
/// x86-64 targets without SSE4.1: it showed in the profile of every kernel using `exp`).
#[inline(always)]
fn floor(v: f64) -> f64 {
    let t = v as i64 as f64;
    if t > v {
        t - 1.0
    } else {
        t
    }
}

/// `e^x`.
pub fn exp(x: f64) -> f64 {
    if x.is_nan() {
        return x;
    }
    if x > 709.79 {
        return f64::INFINITY;
    }
    if x < -745.2 {
        return 0.0;
    }
    // x = k ln2 + r with |r| <= ln2 / 2 (Cody-Waite).
    let kf = floor(x * LOG2_E + 0.5);
    let r = (x - kf * LN2_HI) - kf * LN2_LO;
    // Taylor series to r^14 / 14!: the first omitted term is below 2e-18 relative.
    let mut p = INV_FACT[14];
    for c in INV_FACT[..14].iter().rev() {
        p = p * r + c;
    }
    // 2^k in two steps, so that neither factor leaves the normal range.
    let k = kf as i64;
    let k1 = k / 2;
    p * pow2(k1) * pow2(k - k1)
}

/// [`exp`] of each of `xs`: the same operations lane by lane, so the same bits, with the
/// `N` chains of dependent multiplies and adds interleaved, which runs them several
/// times faster than one after another (the sampler's softmax over a vocabulary).
pub fn exp_lanes<const N: usize>(xs: [f64; N]) -> [f64; N] {
    if xs.iter().any(|&x| !(-745.2..=709.79).contains(&x)) {
        // NaN or out of range somewhere: the special cases, lane by lane.
        return xs.map(exp);
    }
    let kf = xs.map(|x| floor(x * LOG2_E + 0.5));
    let mut r = [0.0; N];
    for i in 0..N {
        r[i] = (xs[i] - kf[i] * LN2_HI) - kf[i] * LN2_LO;
    }
    let mut p = [INV_FACT[14]; N];
    for c in INV_FACT[..14].iter().rev() {
        for i in 0..N {
            p[i] = p[i] * r[i] + c;
        }
    }
    for i in 0..N {
        let k = kf[i] as i64;
        let k1 = k / 2;
        p[i] = p[i] * pow2(k1) * pow2(k - k1);
    }
    p
}

/// `e^x` in f32, for kernels whose results are f32 (softmax weights, SiLU): the range
/// reduction of [`exp`] in f32, then the Taylor series to `r^7/7!` (the first omitted
/// term is below 5e-9 of the result, a tenth of an f32 ulp). About a tenth of [`exp`]'s
/// work.
#[inline]
pub fn exp_f32(x: f32) -> f32 {
    let (low, high) = EXP_F32_RANGE;
    if x.is_nan() {
        return x;
    }
    if x > high {
        return f32::INFINITY;
    }
    if x < low {
        return 0.0;
    }
    let (ln2_hi, ln2_lo) = EXP_F32_LN2;
    let t = x * core::f32::consts::LOG2_E + 0.5;
    let ti = t as i32;
    let k = if ti as f32 > t { ti - 1 } else { ti };
    let kf = k as f32;
    let r = (x - kf * ln2_hi) - kf * ln2_lo;
    let [first, rest @ ..] = EXP_F32_SERIES;
    let mut p = first;
    for c in rest {
        p = p * r + c;
    }
    // 2^k in two steps, so that neither factor leaves the normal range.
    let (k1, k2) = (k / 2, k - k / 2);
    let pow2 = |k: i32| f32::from_bits(((k + 127) as u32) << 23);
    p * pow2(k1) * pow2(k2)
}

/// [`exp_f32`] is infinity above the second and 0 below the first (NaN stays NaN).
pub const EXP_F32_RANGE: (f32, f32) = (-103.98, 88.72);
/// ln 2 split for [`exp_f32`], so that `k·hi` is exact for |k| < 2^8 (9 significant bits).
pub const EXP_F32_LN2: (f32, f32) = (0.693_359_4, -2.121_944_4e-4);
/// [`exp_f32`]'s Taylor coefficients `1/7!` down to `1/0!`, in Horner order.
pub const EXP_F32_SERIES: [f32; 8] = [
    1.0 / 5040.0,
    1.0 / 720.0,
    1.0 / 120.0,
    1.0 / 24.0,
    1.0 / 6.0,
    0.5,
    1.0,
    1.0,
];

/// `1 / d!` for `d` in `0..=18`.
const INV_FACT: [f64; 19] = {
    let mut t = [1.0; 19];
    let mut fact = 1.0;
    let mut d = 1;
    while d < 19 {
        fact *= d as f64;
        t[d] = 1.0 / fact;
        d += 1;
    }
    t
};

/// `(-1)^(d) / (2d + odd)!`: the Taylor coefficients of cos (`odd` 0) and sin (1) in φ².
const fn trig_coef(d: usize, odd: usize) -> f64 {
    let c = INV_FACT[2 * d + odd];
    if d.is_multiple_of(2) {
        c
    } else {
        -c
    }
}

/// The first `N` coefficients [`trig_coef`] gives for `odd`.
const fn trig_coefs<const N: usize>(odd: usize) -> [f64; N] {
    let mut t = [0.0; N];
    let mut d = 0;
    while d < N {
        t[d] = trig_coef(d, odd);
        d += 1;
    }
    t
}

/// Taylor coefficients of cos in φ², to φ^18.
const COS: [f64; 10] = trig_coefs(0);

/// Taylor coefficients of sin/φ in φ², to φ^17.
const SIN: [f64; 9] = trig_coefs(1);

/// Natural logarithm of a positive normal `x` (0 gives -inf, negatives and NaN give NaN).
pub fn ln(x: f64) -> f64 {
    if x.is_nan() || x < 0.0 {
        return f64::NAN;
    }
    if x == 0.0 {
        return f64::NEG_INFINITY;
    }
    if x.is_infinite() {
        return x;
    }
    // Subnormals: scale into the normal range first.
    let (x, bias) = if x < f64::MIN_POSITIVE {
        (x * pow2(60), -60i64)
    } else {
        (x, 0)
    };
    let bits = x.to_bits();
    let mut e = ((bits >> 52) & 0x7ff) as i64 - 1023 + bias;
    let mut m = f64::from_bits((bits & ((1 << 52) - 1)) | (1023 << 52)); // [1, 2)
    if m > core::f64::consts::SQRT_2 {
        m *= 0.5;
        e += 1;
    }
    // ln m = 2 atanh(s), s = (m-1)/(m+1), |s| <= 0.172: 12 odd terms leave < 1e-18.
    let s = (m - 1.0) / (m + 1.0);
    let s2 = s * s;
    let mut p = 1.0 / 23.0;
    for d in (0..11).rev() {
        p = p * s2 + 1.0 / f64::from(2 * d + 1);
    }
    let lnm = 2.0 * s * p;
    let ef = e as f64;
    ef * LN2_HI + (ef * LN2_LO + lnm)
}

/// Hyperbolic tangent.
pub fn tanh(x: f64) -> f64 {
    let a = x.abs();
    if a.is_nan() {
        return x;
    }
    let t = if a > 22.0 {
        1.0
    } else if a < 0.01 {
        // x - x^3/3 + 2x^5/15 - 17x^7/315: the next term is < 3e-18 relative.
        let a2 = a * a;
        a * (1.0 + a2 * (-1.0 / 3.0 + a2 * (2.0 / 15.0 + a2 * (-17.0 / 315.0))))
    } else {
        1.0 - 2.0 / (exp(2.0 * a) + 1.0)
    };
    if x < 0.0 {
        -t
    } else {
        t
    }
}

/// `cos(2π·u)` for a finite `u` (exact argument reduction while `4u` is below 2^52).
pub fn cos_2pi(u: f64) -> f64 {
    // 4u = q + r exactly, |r| <= 1/2; then 2πu = qπ/2 + rπ/2 with |rπ/2| <= π/4.
    let t = 4.0 * u;
    let q = floor(t + 0.5);
    let r = t - q;
    let phi = r * core::f64::consts::FRAC_PI_2;
    let p2 = phi * phi;
    // Taylor series to φ^18 and φ^17: remainders below 1e-18.
    let mut c = COS[9];
    for k in COS[..9].iter().rev() {
        c = c * p2 + k;
    }
    let mut s = SIN[8];
    for k in SIN[..8].iter().rev() {
        s = s * p2 + k;
    }
    let sin = s * phi;
    match (q as i64) & 3 {
        0 => c,
        1 => -sin,
        2 => -c,
        _ => sin,
    }
}

/// `base^n` for an integer `n`, by squaring (deterministic, no libm).
pub fn powu(base: f64, mut n: u64) -> f64 {
    let mut result = 1.0;
    let mut b = base;
    while n > 0 {
        if n & 1 == 1 {
            result *= b;
        }
        b *= b;
        n >>= 1;
    }
    result
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;

    fn rel(a: f64, b: f64) -> f64 {
        if a == b {
            0.0
        } else {
            ((a - b) / b).abs()
        }
    }

    /// The largest [`rel`] error of `f` against `reference` at `from`, `from + step`, ...
    /// below `to`, and at each of `extra`.
    fn worst_rel(
        f: fn(f64) -> f64,
        reference: fn(f64) -> f64,
        (from, to, step): (f64, f64, f64),
        extra: &[f64],
    ) -> f64 {
        let mut worst: f64 = 0.0;
        let mut x = from;
        while x < to {
            worst = worst.max(rel(f(x), reference(x)));
            x += step;
        }
        for &x in extra {
            worst = worst.max(rel(f(x), reference(x)));
        }
        worst
    }

    #[test]
    fn exp_matches_std() {
        // Results in the normal range (below, subnormals keep fewer significant bits).
        let worst = worst_rel(
            exp,
            f64::exp,
            (-708.0, 709.0, 0.0137),
            &[0.0, 1e-300, -1e-300, 1e-10, -0.5, 0.5, 0.3465, -0.3466],
        );
        assert!(worst < 1e-14, "exp relative error {worst:e}");
        for x in [-710.0, -730.0, -744.0] {
            assert!(
                (exp(x) - x.exp()).abs() <= 1e-15 * x.exp() + 2.0 * 4.9e-324,
                "{x}"
            );
        }
        assert_eq!(exp(f64::INFINITY), f64::INFINITY);
        assert_eq!(exp(f64::NEG_INFINITY), 0.0);
        assert_eq!(exp(1000.0), f64::INFINITY);
        assert_eq!(exp(-1000.0), 0.0);
        assert!(exp(f64::NAN).is_nan());
    }

    #[test]
    fn exp_lanes_gives_exps_bits() {
        let mut xs = std::vec![-745.2, 709.79, -745.3, 709.8, f64::NAN, f64::INFINITY, -0.0];
        let mut x = -760.0;
        while x < 720.0 {
            xs.push(x);
            x += 0.731;
        }
        for four in xs.windows(4) {
            let four: [f64; 4] = four.try_into().unwrap();
            let lanes = exp_lanes(four);
            for (x, e) in four.iter().zip(lanes) {
                assert_eq!(e.to_bits(), exp(*x).to_bits(), "exp({x})");
            }
        }
    }

    #[test]
    fn exp_f32_matches_std() {
        let mut worst: f64 = 0.0;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = f64::from(x).exp();
            worst = worst.max(rel(f64::from(exp_f32(x)), want));
            x += 0.0037;
        }
        for x in [0.0f32, -0.0, 1e-30, -0.3465, 0.3466, -1e-8, 88.0, -87.3] {
            worst = worst.max(rel(f64::from(exp_f32(x)), f64::from(x).exp()));
        }
        // Within two f32 ulps.
        assert!(worst < 2.5e-7, "exp_f32 relative error {worst:e}");
        assert_eq!(exp_f32(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(-200.0), 0.0);
        assert!(exp_f32(f32::NAN).is_nan());
        // A subnormal result (about 12 significant bits left) keeps its scale.
        let tiny = exp_f32(-95.0);
        assert!(tiny > 0.0 && rel(f64::from(tiny), (-95f64).exp()) < 1e-3);
    }

    #[test]
    fn ln_matches_std() {
        let mut worst: f64 = 0.0;
        let mut x = 1e-300;
        while x < 1e300 {
            worst = worst.max((ln(x) - x.ln()).abs() / x.ln().abs().max(1.0));
            x *= 1.0173;
        }
        for x in [
            1.0,
            2.0,
            0.5,
            1.414,
            1.415,
            0.7,
            f64::MIN_POSITIVE / 8.0,
            1.0 - 1e-16,
        ] {
            worst = worst.max((ln(x) - x.ln()).abs() / x.ln().abs().max(1e-16));
        }
        assert!(worst < 1e-15, "ln error {worst:e}");
        assert_eq!(ln(0.0), f64::NEG_INFINITY);
        assert!(ln(-1.0).is_nan());
    }

    #[test]
    fn tanh_matches_std() {
        let worst = worst_rel(
            tanh,
            f64::tanh,
            (-30.0, 30.0, 0.00731),
            &[1e-30, -1e-8, 0.0099, 0.01, 0.0101, 21.9, 22.1],
        );
        assert!(worst < 1e-13, "tanh relative error {worst:e}");
        assert_eq!(tanh(f64::INFINITY), 1.0);
        assert_eq!(tanh(f64::NEG_INFINITY), -1.0);
    }

    #[test]
    fn cos_matches_std() {
        let mut worst: f64 = 0.0;
        for i in 0..100_000 {
            let u = f64::from(i) / 100_000.0;
            worst = worst.max((cos_2pi(u) - (2.0 * core::f64::consts::PI * u).cos()).abs());
        }
        assert!(worst < 1e-15, "cos absolute error {worst:e}");
    }

    #[test]
    fn powu_matches_std() {
        assert_eq!(powu(0.9, 0), 1.0);
        assert!(rel(powu(0.9, 10), 0.9f64.powi(10)) < 1e-15);
        assert!(rel(powu(0.999, 1000), 0.999f64.powi(1000)) < 1e-13);
        assert_eq!(powu(0.999, u64::MAX), 0.0);
    }
}
