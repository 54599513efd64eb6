//! Element formats of device tensors: plain f32, and the GGML block formats that GGUF
//! model files store their weights in (the codes are GGML's type ids, so a GGUF tensor's
//! type is its `DType` code).
//!
//! A block format packs `block_elems` consecutive elements of a row into `block_bytes`
//! bytes (little endian): scales as IEEE half floats, quantized values as packed integers.
//! A row of `cols` elements is `cols / block_elems` blocks back to back, so `cols` must be
//! a multiple of `block_elems`.

/// A tensor element format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE single precision.
    F32,
    /// IEEE half precision.
    F16,
    /// Blocks of 32: f16 scale `d`, 16 bytes of 4-bit `q`; `x = d·(q - 8)`.
    Q4_0,
    /// Blocks of 32: f16 scale `d`, f16 minimum `m`, 16 bytes of 4-bit `q`; `x = d·q + m`.
    Q4_1,
    /// Blocks of 32: f16 scale `d`, 32 signed bytes `q`; `x = d·q`.
    Q8_0,
    /// Super-blocks of 256: f16 `d`, f16 `dmin`, 12 bytes of eight 6-bit scales and
    /// minimums, 128 bytes of 4-bit `q`; sub-block `j` has `x = d·sc_j·q - dmin·m_j`.
    Q4K,
    /// Super-blocks of 256: 128 bytes of low 4 bits, 64 bytes of high 2 bits, sixteen
    /// signed 8-bit scales, f16 `d`; `x = d·sc·(q - 32)`.
    Q6K,
}

impl DType {
    /// Every format, in code order.
    pub const ALL: [DType; 7] = [
        DType::F32,
        DType::F16,
        DType::Q4_0,
        DType::Q4_1,
        DType::Q8_0,
        DType::Q4K,
        DType::Q6K,
    ];

    /// The format with GGML type id `code`, if it is one of ours.
    pub const fn from_code(code: u64) -> Option<DType> {
        Some(match code {
            0 => DType::F32,
            1 => DType::F16,
            2 => DType::Q4_0,
            3 => DType::Q4_1,
            8 => DType::Q8_0,
            12 => DType::Q4K,
            14 => DType::Q6K,
            _ => return None,
        })
    }

    /// Its GGML type id.
    pub const fn code(self) -> u64 {
        match self {
            DType::F32 => 0,
            DType::F16 => 1,
            DType::Q4_0 => 2,
            DType::Q4_1 => 3,
            DType::Q8_0 => 8,
            DType::Q4K => 12,
            DType::Q6K => 14,
        }
    }

    /// GGML's name for it ("q4_1", ...).
    pub const fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::Q4_0 => "q4_0",
            DType::Q4_1 => "q4_1",
            DType::Q8_0 => "q8_0",
            DType::Q4K => "q4_k",
            DType::Q6K => "q6_k",
        }
    }

    /// Elements per block.
    pub const fn block_elems(self) -> u64 {
        match self {
            DType::F32 | DType::F16 => 1,
            DType::Q4_0 | DType::Q4_1 | DType::Q8_0 => 32,
            DType::Q4K | DType::Q6K => 256,
        }
    }

    /// Bytes per block.
    pub const fn block_bytes(self) -> u64 {
        match self {
            DType::F32 => 4,
            DType::F16 => 2,
            DType::Q4_0 => 18,
            DType::Q4_1 => 20,
            DType::Q8_0 => 34,
            DType::Q4K => 144,
            DType::Q6K => 210,
        }
    }

    /// Bytes of a row of `cols` elements; `None` if `cols` is not a whole number of
    /// blocks or the size overflows.
    pub const fn row_bytes(self, cols: u64) -> Option<u64> {
        if !cols.is_multiple_of(self.block_elems()) {
            return None;
        }
        (cols / self.block_elems()).checked_mul(self.block_bytes())
    }

    /// Bytes of `rows` rows of `cols` elements, as [`DType::row_bytes`].
    pub const fn bytes(self, rows: u64, cols: u64) -> Option<u64> {
        match self.row_bytes(cols) {
            Some(row) => row.checked_mul(rows),
            None => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_unknown_codes_are_refused() {
        for d in DType::ALL {
            assert_eq!(DType::from_code(d.code()), Some(d));
        }
        for code in [4, 5, 6, 7, 9, 10, 11, 13, 15, 30, u64::MAX] {
            assert_eq!(DType::from_code(code), None, "{code}");
        }
    }

    #[test]
    fn row_sizes_follow_the_block_layout() {
        // SmolLM2-135M: a 576-wide Q4_1 row is 18 blocks of 20 bytes.
        assert_eq!(DType::Q4_1.row_bytes(576), Some(360));
        assert_eq!(DType::Q8_0.bytes(49152, 576), Some(30_081_024));
        assert_eq!(DType::Q6K.row_bytes(512), Some(420));
        assert_eq!(DType::Q4K.row_bytes(576), None);
        assert_eq!(DType::F16.row_bytes(3), Some(6));
        assert_eq!(DType::Q4_0.bytes(u64::MAX, 32), None);
    }
}
