//! The instruction-set features a VM's CPUID shows its guest, compared between hosts.
//!
//! A ring-3 guest runs natively: nothing traps an instruction the destination's CPU
//! lacks. A guest that saw a feature and then moved to a CPU without it would die of an
//! invalid-opcode fault, so the destination refuses such a VM at the handshake instead,
//! naming what it lacks.
//!
//! What a guest saw is the CPU itself: where KVM runs ring 3 natively (PVM), a ring-3
//! `cpuid` can answer from the hardware, whatever CPUID the VMM set. So a VM carries the
//! features of every CPU it has run on ([`native_cpu_features`], joined on each arrival),
//! and a host takes it only if its own CPU has them all. Only features a ring-3 guest can
//! use are compared (instructions and XSAVE state components), not bits that describe
//! the host (the hypervisor bit, OSXSAVE, VMX, speculation controls).

use serde::{Deserialize, Serialize};

/// One output register of a CPUID leaf.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CpuidRegister {
    /// EAX.
    Eax,
    /// EBX.
    Ebx,
    /// ECX.
    Ecx,
    /// EDX.
    Edx,
}

/// The feature bits of one CPUID output register (only the features compared).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuidWord {
    /// Leaf (EAX in).
    pub leaf: u32,
    /// Subleaf (ECX in; 0 where the leaf has none).
    pub subleaf: u32,
    /// Which output register.
    pub register: CpuidRegister,
    /// Its feature bits.
    pub bits: u32,
}

/// A feature a ring-3 guest can use: where CPUID shows it, and its name (Linux's).
struct Feature {
    leaf: u32,
    subleaf: u32,
    register: CpuidRegister,
    bit: u8,
    name: &'static str,
}

const fn feature(
    leaf: u32,
    subleaf: u32,
    register: CpuidRegister,
    bit: u8,
    name: &'static str,
) -> Feature {
    Feature {
        leaf,
        subleaf,
        register,
        bit,
        name,
    }
}

use CpuidRegister::{Eax, Ebx, Ecx, Edx};

/// Every feature compared, grouped by word in CPUID order.
const FEATURES: &[Feature] = &[
    feature(1, 0, Ecx, 0, "sse3"),
    feature(1, 0, Ecx, 1, "pclmulqdq"),
    feature(1, 0, Ecx, 9, "ssse3"),
    feature(1, 0, Ecx, 12, "fma"),
    feature(1, 0, Ecx, 13, "cx16"),
    feature(1, 0, Ecx, 19, "sse4_1"),
    feature(1, 0, Ecx, 20, "sse4_2"),
    feature(1, 0, Ecx, 22, "movbe"),
    feature(1, 0, Ecx, 23, "popcnt"),
    feature(1, 0, Ecx, 25, "aes"),
    feature(1, 0, Ecx, 26, "xsave"),
    feature(1, 0, Ecx, 28, "avx"),
    feature(1, 0, Ecx, 29, "f16c"),
    feature(1, 0, Ecx, 30, "rdrand"),
    feature(1, 0, Edx, 4, "tsc"),
    feature(1, 0, Edx, 8, "cx8"),
    feature(1, 0, Edx, 15, "cmov"),
    feature(1, 0, Edx, 19, "clflush"),
    feature(1, 0, Edx, 23, "mmx"),
    feature(1, 0, Edx, 24, "fxsr"),
    feature(1, 0, Edx, 25, "sse"),
    feature(1, 0, Edx, 26, "sse2"),
    feature(7, 0, Ebx, 0, "fsgsbase"),
    feature(7, 0, Ebx, 3, "bmi1"),
    feature(7, 0, Ebx, 5, "avx2"),
    feature(7, 0, Ebx, 8, "bmi2"),
    feature(7, 0, Ebx, 16, "avx512f"),
    feature(7, 0, Ebx, 17, "avx512dq"),
    feature(7, 0, Ebx, 18, "rdseed"),
    feature(7, 0, Ebx, 19, "adx"),
    feature(7, 0, Ebx, 21, "avx512ifma"),
    feature(7, 0, Ebx, 23, "clflushopt"),
    feature(7, 0, Ebx, 24, "clwb"),
    feature(7, 0, Ebx, 28, "avx512cd"),
    feature(7, 0, Ebx, 29, "sha_ni"),
    feature(7, 0, Ebx, 30, "avx512bw"),
    feature(7, 0, Ebx, 31, "avx512vl"),
    feature(7, 0, Ecx, 1, "avx512vbmi"),
    feature(7, 0, Ecx, 6, "avx512_vbmi2"),
    feature(7, 0, Ecx, 8, "gfni"),
    feature(7, 0, Ecx, 9, "vaes"),
    feature(7, 0, Ecx, 10, "vpclmulqdq"),
    feature(7, 0, Ecx, 11, "avx512_vnni"),
    feature(7, 0, Ecx, 12, "avx512_bitalg"),
    feature(7, 0, Ecx, 14, "avx512_vpopcntdq"),
    feature(7, 0, Ecx, 22, "rdpid"),
    feature(7, 0, Ecx, 27, "movdiri"),
    feature(7, 0, Ecx, 28, "movdir64b"),
    feature(7, 0, Edx, 8, "avx512_vp2intersect"),
    feature(7, 0, Edx, 14, "serialize"),
    feature(7, 0, Edx, 22, "amx_bf16"),
    feature(7, 0, Edx, 23, "avx512_fp16"),
    feature(7, 0, Edx, 24, "amx_tile"),
    feature(7, 0, Edx, 25, "amx_int8"),
    feature(7, 1, Eax, 4, "avx_vnni"),
    feature(7, 1, Eax, 5, "avx512_bf16"),
    // The XSAVE state components the guest may enable in XCR0.
    feature(0xd, 0, Eax, 0, "x87 state"),
    feature(0xd, 0, Eax, 1, "sse state"),
    feature(0xd, 0, Eax, 2, "avx state"),
    feature(0xd, 0, Eax, 5, "avx-512 opmask state"),
    feature(0xd, 0, Eax, 6, "avx-512 zmm_hi256 state"),
    feature(0xd, 0, Eax, 7, "avx-512 hi16_zmm state"),
    feature(0xd, 0, Eax, 9, "pkru state"),
    feature(0xd, 0, Eax, 17, "amx tilecfg state"),
    feature(0xd, 0, Eax, 18, "amx tiledata state"),
    feature(0xd, 1, Eax, 0, "xsaveopt"),
    feature(0xd, 1, Eax, 1, "xsavec"),
    feature(0x8000_0001, 0, Ecx, 0, "lahf_lm"),
    feature(0x8000_0001, 0, Ecx, 5, "abm"),
    feature(0x8000_0001, 0, Ecx, 6, "sse4a"),
    feature(0x8000_0001, 0, Ecx, 8, "3dnowprefetch"),
    feature(0x8000_0001, 0, Ecx, 11, "xop"),
    feature(0x8000_0001, 0, Ecx, 16, "fma4"),
    feature(0x8000_0001, 0, Ecx, 21, "tbm"),
    feature(0x8000_0001, 0, Edx, 11, "syscall"),
    feature(0x8000_0001, 0, Edx, 27, "rdtscp"),
    feature(0x8000_0001, 0, Edx, 29, "lm"),
];

/// The most feature words an offer may carry: far more than [`cpu_features`] makes
/// (a word per CPUID register that shows a compared feature).
pub const MAX_CPUID_WORDS: usize = 256;

/// The feature words of a CPUID that `read(leaf, subleaf, register)` answers, keeping only
/// the bits of the features compared (0 for a leaf it lacks).
pub fn cpu_features(read: impl Fn(u32, u32, CpuidRegister) -> u32) -> Vec<CpuidWord> {
    let mut words: Vec<CpuidWord> = Vec::new();
    for f in FEATURES {
        let same =
            |w: &&mut CpuidWord| (w.leaf, w.subleaf, w.register) == (f.leaf, f.subleaf, f.register);
        let word = match words.iter_mut().find(|w| same(w)) {
            Some(word) => word,
            None => {
                words.push(CpuidWord {
                    leaf: f.leaf,
                    subleaf: f.subleaf,
                    register: f.register,
                    bits: 0,
                });
                words.last_mut().expect("just pushed")
            }
        };
        word.bits |= read(f.leaf, f.subleaf, f.register) & (1 << f.bit);
    }
    words
}

/// The features of the CPU this runs on, as its `cpuid` instruction answers.
#[cfg(target_arch = "x86_64")]
pub fn native_cpu_features() -> &'static [CpuidWord] {
    // Read once: under a hypervisor each `cpuid` is an exit.
    static NATIVE: std::sync::LazyLock<Vec<CpuidWord>> = std::sync::LazyLock::new(read_cpuid);
    &NATIVE
}

/// The features this CPU's `cpuid` instruction answers.
#[cfg(target_arch = "x86_64")]
fn read_cpuid() -> Vec<CpuidWord> {
    // A safe function in newer Rust, an unsafe one in the oldest this builds with.
    #[allow(unused_unsafe)]
    fn __cpuid_count(leaf: u32, subleaf: u32) -> std::arch::x86_64::CpuidResult {
        // SAFETY: every x86-64 CPU has `cpuid`, which reads and writes registers only.
        unsafe { std::arch::x86_64::__cpuid_count(leaf, subleaf) }
    }
    // A leaf above the CPU's highest answers another leaf's data: read as 0.
    let max_basic = __cpuid_count(0, 0).eax;
    let max_extended = __cpuid_count(0x8000_0000, 0).eax;
    cpu_features(|leaf, subleaf, register| {
        let max = if leaf >= 0x8000_0000 {
            max_extended
        } else {
            max_basic
        };
        if leaf > max {
            return 0;
        }
        let out = __cpuid_count(leaf, subleaf);
        match register {
            CpuidRegister::Eax => out.eax,
            CpuidRegister::Ebx => out.ebx,
            CpuidRegister::Ecx => out.ecx,
            CpuidRegister::Edx => out.edx,
        }
    })
}

/// No x86 features where there is no x86 `cpuid` (such a host runs no x86 guest).
#[cfg(not(target_arch = "x86_64"))]
pub fn native_cpu_features() -> &'static [CpuidWord] {
    &[]
}

/// The bits `words` show in register `register` of leaf `leaf`, `subleaf`.
fn bits(words: &[CpuidWord], leaf: u32, subleaf: u32, register: CpuidRegister) -> u32 {
    words
        .iter()
        .filter(|w| (w.leaf, w.subleaf, w.register) == (leaf, subleaf, register))
        .fold(0, |bits, w| bits | w.bits)
}

/// Whether `words` show feature `f`.
fn shows(words: &[CpuidWord], f: &Feature) -> bool {
    bits(words, f.leaf, f.subleaf, f.register) & (1 << f.bit) != 0
}

/// `seen` with the features of `more` added: what a guest has seen once it also ran
/// where `more` describes.
pub fn joined(seen: &[CpuidWord], more: &[CpuidWord]) -> Vec<CpuidWord> {
    cpu_features(|leaf, subleaf, register| {
        bits(seen, leaf, subleaf, register) | bits(more, leaf, subleaf, register)
    })
}

/// The names of the features `offered` shows that `local` lacks, in CPUID order. Other
/// bits are not compared; an `offered` that names no words lacks nothing.
pub fn missing_features(offered: &[CpuidWord], local: &[CpuidWord]) -> Vec<&'static str> {
    FEATURES
        .iter()
        .filter(|f| shows(offered, f) && !shows(local, f))
        .map(|f| f.name)
        .collect()
}

/// Why a VM that has seen `offered` cannot run where the CPU has `local`, if it cannot.
pub fn refusal(offered: &[CpuidWord], local: &[CpuidWord]) -> Option<String> {
    let missing = missing_features(offered, local);
    (!missing.is_empty()).then(|| {
        format!(
            "the VM's guest has seen {} on the CPUs it ran on, which this host's CPU lacks: \
             it would fault on them here",
            missing.join(", ")
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CPUID answering `bits` for every register it is asked.
    fn all(bits: u32) -> Vec<CpuidWord> {
        cpu_features(|_, _, _| bits)
    }

    #[test]
    fn only_named_bits_are_kept_and_compared() {
        let full = all(u32::MAX);
        let none = all(0);
        assert_eq!(full.len(), none.len());
        assert!(missing_features(&none, &full).is_empty());
        assert!(missing_features(&full, &full).is_empty());
        let missing = missing_features(&full, &none);
        assert_eq!(missing.len(), FEATURES.len());
        // Leaf 1 ECX bit 27 (OSXSAVE) and bit 31 (hypervisor) describe the host, not
        // the guest's instructions: they are not kept.
        let leaf1_ecx = full
            .iter()
            .find(|w| (w.leaf, w.subleaf, w.register) == (1, 0, Ecx))
            .unwrap();
        assert_eq!(leaf1_ecx.bits & (1 << 27 | 1 << 31), 0);
        // Every feature names a distinct bit.
        for (i, a) in FEATURES.iter().enumerate() {
            assert!(FEATURES[i + 1..]
                .iter()
                .all(|b| (a.leaf, a.subleaf, a.register, a.bit)
                    != (b.leaf, b.subleaf, b.register, b.bit)));
        }
    }

    #[test]
    fn this_cpu_has_what_every_x86_64_cpu_has_and_joins_add() {
        let native = native_cpu_features().to_vec();
        let names = |words: &[CpuidWord]| missing_features(words, &[]);
        for baseline in ["sse", "sse2", "lm", "x87 state", "sse state"] {
            assert!(names(&native).contains(&baseline), "{baseline}: {native:?}");
        }
        let avx512 = cpu_features(|leaf, _, register| {
            if (leaf, register) == (7, Ebx) {
                1 << 16
            } else {
                0
            }
        });
        let both = joined(&native, &avx512);
        assert!(names(&both).contains(&"avx512f"));
        assert!(missing_features(&native, &both).is_empty());
        assert!(missing_features(&avx512, &both).is_empty());
        assert_eq!(joined(&native, &[]), native);
    }

    #[test]
    fn a_feature_the_local_cpu_lacks_is_named() {
        // A host with AVX2 but no AVX-512, and a VM started where AVX-512 was.
        let local = cpu_features(|leaf, subleaf, register| match (leaf, subleaf, register) {
            (7, 0, Ebx) => 1 << 5,
            (1, 0, Ecx) => 1 << 28,
            _ => 0,
        });
        let offered = cpu_features(|leaf, subleaf, register| match (leaf, subleaf, register) {
            (7, 0, Ebx) => 1 << 5 | 1 << 16 | 1 << 30,
            (1, 0, Ecx) => 1 << 28,
            _ => 0,
        });
        assert_eq!(missing_features(&offered, &local), ["avx512f", "avx512bw"]);
        assert!(missing_features(&local, &offered).is_empty());
        // A peer that describes no CPU features lacks nothing.
        assert!(missing_features(&[], &local).is_empty());
    }
}
