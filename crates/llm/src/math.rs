//! `e^x` from IEEE basic operations only (`core` has no `exp` without `std`), so that it
//! gives the same bits on every host, build and guest. The approach of the accelerator's
//! CPU backend (`crates/accel/src/backend/cpu/math.rs`), without `floor`, which `core`
//! lacks at our minimum Rust version.

/// ln 2 rounded to 32 significant bits (so `k·LN2_HI` is exact for |k| < 2^21).
const LN2_HI: f64 = f64::from_bits(0x3fe6_2e42_fee0_0000);
/// ln 2 - LN2_HI.
const LN2_LO: f64 = f64::from_bits(0x3dea_39ef_3579_3c76);
const LOG2_E: f64 = core::f64::consts::LOG2_E;

/// `1 / d!` for `d` in `0..=14`.
const INV_FACT: [f64; 15] = {
    let mut t = [1.0; 15];
    let mut fact = 1.0;
    let mut d = 1;
    while d < 15 {
        fact *= d as f64;
        t[d] = 1.0 / fact;
        d += 1;
    }
    t
};

/// `2^k` for `k` in `-1022..=1023`.
fn pow2(k: i64) -> f64 {
    f64::from_bits(((k + 1023) as u64) << 52)
}

/// `e^x`, to a few ulps.
pub(crate) fn exp(x: f64) -> f64 {
    if x.is_nan() {
        return x;
    }
    if x > 709.78 {
        return f64::INFINITY;
    }
    if x < -745.2 {
        return 0.0;
    }
    // x = k ln2 + r with |r| <= ln2 / 2 (Cody-Waite); k rounded half away from zero
    // (|x·log2 e| < 1076, so the casts are exact).
    let t = x * LOG2_E;
    let k = if t >= 0.0 {
        (t + 0.5) as i64
    } else {
        (t - 0.5) as i64
    };
    let kf = k as f64;
    let r = (x - kf * LN2_HI) - kf * LN2_LO;
    // Taylor series to r^14 / 14!: the first omitted term is below 2e-18 relative.
    let mut p = INV_FACT[14];
    for c in INV_FACT[..14].iter().rev() {
        p = p * r + c;
    }
    // 2^k in two steps, so that neither factor leaves the normal range.
    let k1 = k / 2;
    p * pow2(k1) * pow2(k - k1)
}

#[cfg(test)]
mod tests {
    use super::exp;

    #[test]
    fn exp_matches_std_closely() {
        let mut x = -750.0;
        while x < 712.0 {
            let (a, b) = (exp(x), x.exp());
            if b == 0.0 || b.is_infinite() {
                assert!(a == b || (a - b).abs() <= b * 1e-12, "{x}: {a} vs {b}");
            } else if b > f64::MIN_POSITIVE {
                assert!(((a - b) / b).abs() < 1e-14, "{x}: {a} vs {b}");
            }
            x += 0.37;
        }
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(f64::NEG_INFINITY), 0.0);
        assert!(exp(f64::NAN).is_nan());
    }
}
