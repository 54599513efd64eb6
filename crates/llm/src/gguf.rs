//! The GGUF file format (versions 2 and 3), as written by llama.cpp.
//!
//! Layout (little endian): magic `GGUF`, u32 version, u64 tensor count, u64 metadata
//! count, the metadata key/value pairs, the tensor infos, padding to `general.alignment`
//! (default 32), then the data section. A string is a u64 length and that many UTF-8
//! bytes; an array is a u32 element type, a u64 count and the elements.
//!
//! [`Gguf::parse`] works on a prefix of the file: when the header reaches past the bytes
//! read so far it asks for more with [`GgufError::NeedMore`]. Everything it returns
//! borrows that prefix; nothing is copied, not even the 49152 token strings of a
//! vocabulary.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use ferry_abi::accel::dtype::DType;

/// The four bytes a GGUF file starts with.
pub const MAGIC: [u8; 4] = *b"GGUF";
/// Alignment of the data section and of tensor offsets when the file does not say.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Most dimensions a tensor can have.
pub const MAX_DIMS: usize = 4;

/// Fewest bytes a metadata key/value pair can take (empty key, one-byte value).
const MIN_KV_BYTES: u64 = 8 + 4 + 1;
/// Fewest bytes a tensor info can take (empty name, one dimension).
const MIN_TENSOR_INFO_BYTES: u64 = 8 + 4 + 8 + 4 + 8;
/// Most tensors a file may have (the largest models have a few thousand): each takes
/// more memory parsed than in the file.
pub const MAX_TENSORS: u64 = 1 << 16;
/// Most metadata entries a file may have (models have tens; a vocabulary is one).
pub const MAX_METADATA: u64 = 1 << 16;
/// Smallest read [`GgufError::NeedMore`] suggests.
const MIN_READ: u64 = 64 * 1024;
/// Most characters of a key, tensor name or string value that an error quotes
/// (llama.cpp's tensor names are shorter; a crafted file's can be megabytes).
pub const SHOWN_CHARS: usize = 64;

/// `text` as an error quotes it: its first [`SHOWN_CHARS`] characters, then `…` if it
/// goes on, so that no message grows with the file.
pub fn shown(text: &str) -> String {
    match text.char_indices().nth(SHOWN_CHARS) {
        Some((cut, _)) => {
            let mut s = String::from(&text[..cut]);
            s.push('…');
            s
        }
        None => text.into(),
    }
}

/// A metadata value's type, with its GGUF code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ValueType {
    /// Code 0.
    U8,
    /// Code 1.
    I8,
    /// Code 2.
    U16,
    /// Code 3.
    I16,
    /// Code 4.
    U32,
    /// Code 5.
    I32,
    /// Code 6.
    F32,
    /// Code 7 (one byte).
    Bool,
    /// Code 8.
    Str,
    /// Code 9.
    Array,
    /// Code 10.
    U64,
    /// Code 11.
    I64,
    /// Code 12.
    F64,
}

impl ValueType {
    /// The type with GGUF code `code`, if any.
    pub const fn from_code(code: u32) -> Option<ValueType> {
        Some(match code {
            0 => ValueType::U8,
            1 => ValueType::I8,
            2 => ValueType::U16,
            3 => ValueType::I16,
            4 => ValueType::U32,
            5 => ValueType::I32,
            6 => ValueType::F32,
            7 => ValueType::Bool,
            8 => ValueType::Str,
            9 => ValueType::Array,
            10 => ValueType::U64,
            11 => ValueType::I64,
            12 => ValueType::F64,
            _ => return None,
        })
    }

    /// Its GGUF code.
    pub const fn code(self) -> u32 {
        match self {
            ValueType::U8 => 0,
            ValueType::I8 => 1,
            ValueType::U16 => 2,
            ValueType::I16 => 3,
            ValueType::U32 => 4,
            ValueType::I32 => 5,
            ValueType::F32 => 6,
            ValueType::Bool => 7,
            ValueType::Str => 8,
            ValueType::Array => 9,
            ValueType::U64 => 10,
            ValueType::I64 => 11,
            ValueType::F64 => 12,
        }
    }

    /// Bytes of one value, for the fixed-size types.
    pub const fn fixed_size(self) -> Option<u64> {
        match self {
            ValueType::U8 | ValueType::I8 | ValueType::Bool => Some(1),
            ValueType::U16 | ValueType::I16 => Some(2),
            ValueType::U32 | ValueType::I32 | ValueType::F32 => Some(4),
            ValueType::U64 | ValueType::I64 | ValueType::F64 => Some(8),
            ValueType::Str | ValueType::Array => None,
        }
    }

    /// True for the integer types.
    pub const fn is_integer(self) -> bool {
        matches!(
            self,
            ValueType::U8
                | ValueType::I8
                | ValueType::U16
                | ValueType::I16
                | ValueType::U32
                | ValueType::I32
                | ValueType::U64
                | ValueType::I64
        )
    }
}

/// GGML's name for a tensor type code, for codes GGML has (or had).
pub const fn ggml_type_name(code: u32) -> Option<&'static str> {
    Some(match code {
        0 => "f32",
        1 => "f16",
        2 => "q4_0",
        3 => "q4_1",
        4 => "q4_2 (removed)",
        5 => "q4_3 (removed)",
        6 => "q5_0",
        7 => "q5_1",
        8 => "q8_0",
        9 => "q8_1",
        10 => "q2_k",
        11 => "q3_k",
        12 => "q4_k",
        13 => "q5_k",
        14 => "q6_k",
        15 => "q8_k",
        16 => "iq2_xxs",
        17 => "iq2_xs",
        18 => "iq3_xxs",
        19 => "iq1_s",
        20 => "iq4_nl",
        21 => "iq3_s",
        22 => "iq2_s",
        23 => "iq4_xs",
        24 => "i8",
        25 => "i16",
        26 => "i32",
        27 => "i64",
        28 => "f64",
        29 => "iq1_m",
        30 => "bf16",
        31..=33 => "q4_0_x_x (removed)",
        34 => "tq1_0",
        35 => "tq2_0",
        36..=38 => "iq4_nl_x_x (removed)",
        39 => "mxfp4",
        _ => return None,
    })
}

/// A metadata value; strings and arrays borrow the file prefix.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Value<'a> {
    /// An unsigned byte.
    U8(u8),
    /// A signed byte.
    I8(i8),
    /// An unsigned 16-bit integer.
    U16(u16),
    /// A signed 16-bit integer.
    I16(i16),
    /// An unsigned 32-bit integer.
    U32(u32),
    /// A signed 32-bit integer.
    I32(i32),
    /// A single-precision float.
    F32(f32),
    /// A boolean (any nonzero byte is true).
    Bool(bool),
    /// A string's bytes (UTF-8 if the file is well formed; see [`Value::as_str`]).
    Str(&'a [u8]),
    /// An unsigned 64-bit integer.
    U64(u64),
    /// A signed 64-bit integer.
    I64(i64),
    /// A double-precision float.
    F64(f64),
    /// An array of values of one type.
    Array(Array<'a>),
}

impl<'a> Value<'a> {
    /// Its type.
    pub fn value_type(&self) -> ValueType {
        match self {
            Value::U8(_) => ValueType::U8,
            Value::I8(_) => ValueType::I8,
            Value::U16(_) => ValueType::U16,
            Value::I16(_) => ValueType::I16,
            Value::U32(_) => ValueType::U32,
            Value::I32(_) => ValueType::I32,
            Value::F32(_) => ValueType::F32,
            Value::Bool(_) => ValueType::Bool,
            Value::Str(_) => ValueType::Str,
            Value::U64(_) => ValueType::U64,
            Value::I64(_) => ValueType::I64,
            Value::F64(_) => ValueType::F64,
            Value::Array(_) => ValueType::Array,
        }
    }

    /// The value as an i128 if it is an integer of any width or signedness.
    fn as_int(&self) -> Option<i128> {
        Some(match *self {
            Value::U8(v) => v.into(),
            Value::I8(v) => v.into(),
            Value::U16(v) => v.into(),
            Value::I16(v) => v.into(),
            Value::U32(v) => v.into(),
            Value::I32(v) => v.into(),
            Value::U64(v) => v.into(),
            Value::I64(v) => v.into(),
            _ => return None,
        })
    }

    /// Any integer value that fits a u64.
    pub fn as_u64(&self) -> Option<u64> {
        self.as_int().and_then(|v| u64::try_from(v).ok())
    }

    /// Any integer value that fits a u32.
    pub fn as_u32(&self) -> Option<u32> {
        self.as_int().and_then(|v| u32::try_from(v).ok())
    }

    /// Any integer value that fits an i64.
    pub fn as_i64(&self) -> Option<i64> {
        self.as_int().and_then(|v| i64::try_from(v).ok())
    }

    /// A float value (f32, or f64 rounded to f32).
    pub fn as_f32(&self) -> Option<f32> {
        match *self {
            Value::F32(v) => Some(v),
            Value::F64(v) => Some(v as f32),
            _ => None,
        }
    }

    /// A boolean value.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(v) => Some(v),
            _ => None,
        }
    }

    /// A string value that is valid UTF-8.
    pub fn as_str(&self) -> Option<&'a str> {
        match *self {
            Value::Str(b) => core::str::from_utf8(b).ok(),
            _ => None,
        }
    }

    /// An array value.
    pub fn as_array(&self) -> Option<Array<'a>> {
        match *self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// The value as a message quotes it: a number as itself, a string clipped to
/// [`SHOWN_CHARS`] characters, an array as its length and type (never its elements).
impl fmt::Display for Value<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Value::U8(v) => write!(f, "{v}"),
            Value::I8(v) => write!(f, "{v}"),
            Value::U16(v) => write!(f, "{v}"),
            Value::I16(v) => write!(f, "{v}"),
            Value::U32(v) => write!(f, "{v}"),
            Value::I32(v) => write!(f, "{v}"),
            Value::F32(v) => write!(f, "{v}"),
            Value::Bool(v) => write!(f, "{v}"),
            Value::U64(v) => write!(f, "{v}"),
            Value::I64(v) => write!(f, "{v}"),
            Value::F64(v) => write!(f, "{v}"),
            Value::Str(b) => match core::str::from_utf8(b) {
                Ok(s) => write!(f, "{:?}", shown(s)),
                Err(_) => write!(f, "a string of {} bytes that is not UTF-8", b.len()),
            },
            Value::Array(a) => write!(f, "an array of {} {:?}", a.len(), a.elem_type()),
        }
    }
}

/// An array value: its element type, length and the bytes of its elements.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Array<'a> {
    elem: ValueType,
    len: usize,
    data: &'a [u8],
}

impl<'a> Array<'a> {
    /// The element type.
    pub fn elem_type(&self) -> ValueType {
        self.elem
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True if it has no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A view of its elements as strings, if it is an array of strings.
    pub fn strings(&self) -> Option<StrArray<'a>> {
        (self.elem == ValueType::Str).then_some(StrArray {
            len: self.len,
            data: self.data,
        })
    }

    /// A view of its elements as integers, if it is an array of an integer type.
    pub fn ints(&self) -> Option<IntArray<'a>> {
        (self.elem.is_integer()).then_some(IntArray {
            elem: self.elem,
            len: self.len,
            data: self.data,
        })
    }

    /// Its `i`-th element as an f32, if it is an array of f32 or f64.
    pub fn f32_at(&self, i: usize) -> Option<f32> {
        match self.elem {
            ValueType::F32 => read_f32(self.data, i.checked_mul(4)?),
            ValueType::F64 => read_f64(self.data, i.checked_mul(8)?).map(|v| v as f32),
            _ => None,
        }
    }
}

/// An array of strings, borrowed from the file; elements are raw bytes (UTF-8 if the
/// file is well formed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StrArray<'a> {
    len: usize,
    data: &'a [u8],
}

impl<'a> StrArray<'a> {
    /// Number of strings.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True if it has no strings.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The strings in order.
    pub fn iter(&self) -> StrIter<'a> {
        StrIter {
            left: self.len,
            data: self.data,
        }
    }

    /// The `i`-th string (a linear scan: use [`StrArray::iter`] to visit them all).
    pub fn get(&self, i: usize) -> Option<&'a [u8]> {
        self.iter().nth(i)
    }
}

impl<'a> IntoIterator for StrArray<'a> {
    type Item = &'a [u8];
    type IntoIter = StrIter<'a>;
    fn into_iter(self) -> StrIter<'a> {
        self.iter()
    }
}

/// Iterator over the strings of a [`StrArray`].
#[derive(Clone, Debug)]
pub struct StrIter<'a> {
    left: usize,
    data: &'a [u8],
}

impl<'a> Iterator for StrIter<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        if self.left == 0 {
            return None;
        }
        // The parser checked every length; a short buffer just ends the iteration.
        let len = usize::try_from(read_u64(self.data, 0)?).ok()?;
        let rest = self.data.get(8..)?;
        let (s, rest) = rest.split_at_checked(len)?;
        self.data = rest;
        self.left -= 1;
        Some(s)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (0, Some(self.left))
    }
}

/// An array of integers of any GGUF integer type, read as i64 (u64 values above
/// `i64::MAX` read as `None`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IntArray<'a> {
    elem: ValueType,
    len: usize,
    data: &'a [u8],
}

impl<'a> IntArray<'a> {
    /// Number of integers.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True if it has no integers.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The `i`-th integer.
    pub fn get(&self, i: usize) -> Option<i64> {
        if i >= self.len {
            return None;
        }
        let size = usize::try_from(self.elem.fixed_size()?).ok()?;
        let at = i.checked_mul(size)?;
        let b = self.data.get(at..at.checked_add(size)?)?;
        Some(match self.elem {
            ValueType::U8 => i64::from(b[0]),
            ValueType::I8 => i64::from(b[0] as i8),
            ValueType::U16 => i64::from(u16::from_le_bytes(b.try_into().ok()?)),
            ValueType::I16 => i64::from(i16::from_le_bytes(b.try_into().ok()?)),
            ValueType::U32 => i64::from(u32::from_le_bytes(b.try_into().ok()?)),
            ValueType::I32 => i64::from(i32::from_le_bytes(b.try_into().ok()?)),
            ValueType::U64 => i64::try_from(u64::from_le_bytes(b.try_into().ok()?)).ok()?,
            ValueType::I64 => i64::from_le_bytes(b.try_into().ok()?),
            _ => return None,
        })
    }

    /// The integers in order.
    pub fn iter(&self) -> impl Iterator<Item = Option<i64>> + 'a {
        let a = *self;
        (0..a.len).map(move |i| a.get(i))
    }
}

/// A tensor of the file: name, shape, element type and where its data is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TensorInfo<'a> {
    /// Its name, e.g. `blk.0.attn_q.weight`.
    pub name: &'a str,
    /// Number of dimensions (1 to 4).
    pub n_dims: usize,
    /// Its dimensions, `ne[0]` (the contiguous row length) first; unused ones are 1.
    pub ne: [u64; MAX_DIMS],
    /// Element format.
    pub dtype: DType,
    /// Absolute file offset of its data.
    pub offset: u64,
    /// Bytes of its data.
    pub size: u64,
}

impl TensorInfo<'_> {
    /// The dimensions the file gives, `ne[0]` first.
    pub fn dims(&self) -> &[u64] {
        self.ne.get(..self.n_dims).unwrap_or(&self.ne)
    }

    /// The row length `ne[0]`.
    pub fn cols(&self) -> u64 {
        self.ne[0]
    }

    /// Number of rows: the product of `ne[1..]` (1 for a vector).
    pub fn rows(&self) -> u64 {
        // Checked at parse time: the product of all dimensions fits a u64.
        self.ne[1]
            .saturating_mul(self.ne[2])
            .saturating_mul(self.ne[3])
    }

    /// Number of elements.
    pub fn elements(&self) -> u64 {
        self.rows().saturating_mul(self.ne[0])
    }
}

/// Why a GGUF file was refused. The keys and tensor names it holds are [`shown`]: a
/// crafted file's megabyte name makes no megabyte message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GgufError {
    /// The header goes on past the prefix given: read at least `bytes` leading bytes of
    /// the file (a guess that may be larger than strictly needed) and parse again.
    NeedMore {
        /// Leading bytes to read; never more than the file size.
        bytes: u64,
    },
    /// The file does not start with `GGUF`.
    BadMagic {
        /// Its first bytes.
        found: [u8; 4],
    },
    /// A version other than 2 and 3.
    UnsupportedVersion {
        /// The version field.
        version: u32,
    },
    /// Part of the header would end past the end of the file.
    Truncated {
        /// Which part.
        what: &'static str,
        /// The file offset it would end at.
        end: u64,
        /// The file's size.
        file_size: u64,
    },
    /// More tensors or metadata entries than this parser takes ([`MAX_TENSORS`],
    /// [`MAX_METADATA`]), whatever the file's size.
    OverLimit {
        /// What is counted.
        what: &'static str,
        /// The count given.
        count: u64,
        /// The most taken.
        limit: u64,
    },
    /// More tensors or metadata entries (or array elements) than the file can hold.
    TooMany {
        /// What is counted.
        what: &'static str,
        /// The count given.
        count: u64,
        /// Bytes left in the file for them.
        room: u64,
    },
    /// A key or tensor name that is not UTF-8.
    InvalidUtf8 {
        /// What it names.
        what: &'static str,
    },
    /// A metadata value type code GGUF does not have.
    UnknownValueType {
        /// The key.
        key: String,
        /// The code.
        code: u32,
    },
    /// An array of arrays (llama.cpp does not write them).
    NestedArray {
        /// The key.
        key: String,
    },
    /// A key that appears twice.
    DuplicateKey {
        /// The key.
        key: String,
    },
    /// `general.alignment` is not a nonzero power of two that fits a u32.
    BadAlignment {
        /// Its value, as read.
        value: String,
    },
    /// A tensor with no dimensions or more than four.
    BadDims {
        /// The tensor.
        tensor: String,
        /// The count given.
        n_dims: u32,
    },
    /// A tensor with a zero dimension, or whose element count overflows.
    BadShape {
        /// The tensor.
        tensor: String,
        /// Its dimensions.
        dims: Vec<u64>,
    },
    /// A tensor whose element type is not one of [`DType`].
    UnsupportedType {
        /// The tensor.
        tensor: String,
        /// The GGML type code.
        code: u32,
    },
    /// A tensor whose row length is not a whole number of blocks of its type.
    PartialBlock {
        /// The tensor.
        tensor: String,
        /// Its row length `ne[0]`.
        cols: u64,
        /// Its type's block length.
        block: u64,
    },
    /// A tensor whose offset is not a multiple of the alignment.
    MisalignedOffset {
        /// The tensor.
        tensor: String,
        /// Its offset, relative to the data section.
        offset: u64,
        /// The alignment.
        alignment: u64,
    },
    /// A tensor whose data ends past the end of the file (a truncated file).
    DataPastEnd {
        /// The tensor.
        tensor: String,
        /// Absolute file offset of its data.
        offset: u64,
        /// Bytes of its data.
        size: u64,
        /// The file's size.
        file_size: u64,
    },
    /// A tensor name that appears twice.
    DuplicateTensor {
        /// The tensor.
        tensor: String,
    },
    /// Two tensors whose data overlap.
    Overlap {
        /// The first one (lower offset).
        first: String,
        /// The second one.
        second: String,
    },
}

impl fmt::Display for GgufError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GgufError::NeedMore { bytes } => {
                write!(f, "GGUF header continues: read the first {bytes} bytes and retry")
            }
            GgufError::BadMagic { found } => {
                write!(f, "not a GGUF file (starts with {found:02x?}, not \"GGUF\")")
            }
            GgufError::UnsupportedVersion { version } => {
                write!(f, "unsupported GGUF version {version} (2 and 3 are supported)")?;
                if matches!(version.swap_bytes(), 2 | 3) {
                    write!(f, "; a big-endian GGUF file?")?;
                }
                Ok(())
            }
            GgufError::Truncated { what, end, file_size } => write!(
                f,
                "truncated GGUF file: {what} would end at byte {end}, the file has {file_size}"
            ),
            GgufError::OverLimit { what, count, limit } => write!(
                f,
                "GGUF claims {count} {what}, more than the {limit} this reader takes"
            ),
            GgufError::TooMany { what, count, room } => write!(
                f,
                "GGUF claims {count} {what}, more than the {room} bytes left in the file can hold"
            ),
            GgufError::InvalidUtf8 { what } => write!(f, "GGUF {what} is not valid UTF-8"),
            GgufError::UnknownValueType { key, code } => {
                write!(f, "GGUF metadata {key:?} has unknown value type {code}")
            }
            GgufError::NestedArray { key } => {
                write!(f, "GGUF metadata {key:?} is an array of arrays (not supported)")
            }
            GgufError::DuplicateKey { key } => write!(f, "GGUF metadata key {key:?} appears twice"),
            GgufError::BadAlignment { value } => write!(
                f,
                "general.alignment {value} is not a nonzero power of two that fits a u32"
            ),
            GgufError::BadDims { tensor, n_dims } => write!(
                f,
                "tensor {tensor:?} has {n_dims} dimensions (1 to {MAX_DIMS} are allowed)"
            ),
            GgufError::BadShape { tensor, dims } => write!(
                f,
                "tensor {tensor:?} has shape {dims:?}: a zero dimension or too many elements"
            ),
            GgufError::UnsupportedType { tensor, code } => match ggml_type_name(*code) {
                Some(name) => write!(
                    f,
                    "tensor {tensor:?} has GGML type {code} ({name}), which is not supported"
                ),
                None => write!(f, "tensor {tensor:?} has unknown GGML type {code}"),
            },
            GgufError::PartialBlock { tensor, cols, block } => write!(
                f,
                "tensor {tensor:?} has rows of {cols} elements, not a multiple of its block of {block}"
            ),
            GgufError::MisalignedOffset { tensor, offset, alignment } => write!(
                f,
                "tensor {tensor:?} has data offset {offset}, not a multiple of the alignment {alignment}"
            ),
            GgufError::DataPastEnd { tensor, offset, size, file_size } => write!(
                f,
                "truncated GGUF file: tensor {tensor:?} needs bytes {offset}..{} ({size} bytes), the file has {file_size}",
                offset.saturating_add(*size)
            ),
            GgufError::DuplicateTensor { tensor } => write!(f, "tensor {tensor:?} appears twice"),
            GgufError::Overlap { first, second } => {
                write!(f, "the data of tensors {first:?} and {second:?} overlap")
            }
        }
    }
}

/// A parsed GGUF header: metadata and tensor table, borrowing the file prefix.
#[derive(Clone, Debug)]
pub struct Gguf<'a> {
    version: u32,
    kvs: Vec<(&'a str, Value<'a>)>,
    /// Indices into `kvs`, sorted by key.
    by_key: Vec<u32>,
    tensors: Vec<TensorInfo<'a>>,
    /// Indices into `tensors`, sorted by name.
    by_name: Vec<u32>,
    alignment: u64,
    header_len: u64,
    data_offset: u64,
    file_size: u64,
}

impl<'a> Gguf<'a> {
    /// Parses the header of a file of `file_size` bytes from its first bytes `prefix`.
    ///
    /// Returns [`GgufError::NeedMore`] when the header reaches past `prefix` but fits in
    /// the file; a `prefix` longer than `file_size` is cut to `file_size`.
    pub fn parse(prefix: &'a [u8], file_size: u64) -> Result<Gguf<'a>, GgufError> {
        let buf = match usize::try_from(file_size) {
            Ok(n) if n < prefix.len() => &prefix[..n],
            _ => prefix,
        };
        let mut r = Reader {
            buf,
            pos: 0,
            file_size,
        };
        let magic = r.array::<4>("magic")?;
        if magic != MAGIC {
            return Err(GgufError::BadMagic { found: magic });
        }
        let version = r.u32("version")?;
        if version != 2 && version != 3 {
            return Err(GgufError::UnsupportedVersion { version });
        }
        let tensor_count = r.u64("tensor count")?;
        let kv_count = r.u64("metadata count")?;
        for (count, limit, what) in [
            (kv_count, MAX_METADATA, "metadata entries"),
            (tensor_count, MAX_TENSORS, "tensors"),
        ] {
            if count > limit {
                return Err(GgufError::OverLimit { what, count, limit });
            }
        }
        r.check_count(kv_count, MIN_KV_BYTES, "metadata entries")?;
        r.check_count(tensor_count, MIN_TENSOR_INFO_BYTES, "tensors")?;

        let mut kvs = Vec::new();
        for _ in 0..kv_count {
            let key = r.text("metadata key")?;
            let code = r.u32("metadata value type")?;
            let ty = ValueType::from_code(code).ok_or_else(|| GgufError::UnknownValueType {
                key: shown(key),
                code,
            })?;
            let value = r.value(ty, key)?;
            kvs.push((key, value));
        }
        let by_key = sorted_indices(kvs.len(), |i| key_of(&kvs, i))
            .map_err(|key| GgufError::DuplicateKey { key: shown(key) })?;
        let mut gguf = Gguf {
            version,
            kvs,
            by_key,
            tensors: Vec::new(),
            by_name: Vec::new(),
            alignment: DEFAULT_ALIGNMENT,
            header_len: 0,
            data_offset: 0,
            file_size,
        };
        if let Some(v) = gguf.get("general.alignment") {
            gguf.alignment = match v.as_u32() {
                Some(a) if a.is_power_of_two() => u64::from(a),
                _ => {
                    let value = match v.as_i64() {
                        Some(n) => alloc::format!("{n}"),
                        None => alloc::format!("of type {:?}", v.value_type()),
                    };
                    return Err(GgufError::BadAlignment { value });
                }
            };
        }

        // The tensor infos: offsets stay relative until the data section is known.
        let mut tensors = Vec::new();
        for _ in 0..tensor_count {
            let name = r.text("tensor name")?;
            let n_dims = r.u32("tensor dimension count")?;
            if n_dims == 0 || n_dims as usize > MAX_DIMS {
                return Err(GgufError::BadDims {
                    tensor: shown(name),
                    n_dims,
                });
            }
            let mut ne = [1u64; MAX_DIMS];
            for d in ne.iter_mut().take(n_dims as usize) {
                *d = r.u64("tensor dimensions")?;
            }
            let code = r.u32("tensor type")?;
            let offset = r.u64("tensor offset")?;
            let dims = &ne[..n_dims as usize];
            let elements = dims.iter().try_fold(1u64, |acc, &d| match d {
                0 => None,
                d => acc.checked_mul(d),
            });
            if elements.is_none() {
                return Err(GgufError::BadShape {
                    tensor: shown(name),
                    dims: dims.into(),
                });
            }
            let dtype =
                DType::from_code(u64::from(code)).ok_or_else(|| GgufError::UnsupportedType {
                    tensor: shown(name),
                    code,
                })?;
            let rows = ne[1] * ne[2] * ne[3]; // no overflow: the full product fits
            let size = match dtype.bytes(rows, ne[0]) {
                Some(size) => size,
                None if ne[0] % dtype.block_elems() != 0 => {
                    return Err(GgufError::PartialBlock {
                        tensor: shown(name),
                        cols: ne[0],
                        block: dtype.block_elems(),
                    })
                }
                None => {
                    return Err(GgufError::BadShape {
                        tensor: shown(name),
                        dims: dims.into(),
                    })
                }
            };
            if offset % gguf.alignment != 0 {
                return Err(GgufError::MisalignedOffset {
                    tensor: shown(name),
                    offset,
                    alignment: gguf.alignment,
                });
            }
            tensors.push(TensorInfo {
                name,
                n_dims: n_dims as usize,
                ne,
                dtype,
                offset,
                size,
            });
        }
        let header_len = r.pos as u64;
        let data_offset =
            header_len
                .checked_next_multiple_of(gguf.alignment)
                .ok_or(GgufError::Truncated {
                    what: "padding before the data section",
                    end: u64::MAX,
                    file_size,
                })?;
        for t in &mut tensors {
            let past_end = |offset| GgufError::DataPastEnd {
                tensor: shown(t.name),
                offset,
                size: t.size,
                file_size,
            };
            let offset = data_offset
                .checked_add(t.offset)
                .ok_or_else(|| past_end(u64::MAX))?;
            match offset.checked_add(t.size) {
                Some(end) if end <= file_size => t.offset = offset,
                _ => return Err(past_end(offset)),
            }
        }
        let by_name =
            sorted_indices(tensors.len(), |i| name_of(&tensors, i)).map_err(|tensor| {
                GgufError::DuplicateTensor {
                    tensor: shown(tensor),
                }
            })?;
        let mut by_offset: Vec<&TensorInfo<'_>> = tensors.iter().collect();
        by_offset.sort_unstable_by_key(|t| t.offset);
        for w in by_offset.windows(2) {
            // Ends fit a u64: checked above.
            if w[0].offset + w[0].size > w[1].offset {
                return Err(GgufError::Overlap {
                    first: shown(w[0].name),
                    second: shown(w[1].name),
                });
            }
        }
        gguf.tensors = tensors;
        gguf.by_name = by_name;
        gguf.header_len = header_len;
        gguf.data_offset = data_offset;
        Ok(gguf)
    }

    /// The format version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The alignment of the data section and tensor offsets.
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Bytes of the header (up to the end of the tensor infos, before padding): the
    /// prefix needed to parse the file.
    pub fn header_len(&self) -> u64 {
        self.header_len
    }

    /// Absolute file offset of the data section.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// The file size given to [`Gguf::parse`].
    pub fn file_size(&self) -> u64 {
        self.file_size
    }

    /// The metadata, in file order.
    pub fn metadata(&self) -> impl Iterator<Item = (&'a str, Value<'a>)> + '_ {
        self.kvs.iter().copied()
    }

    /// The value of metadata `key`.
    pub fn get(&self, key: &str) -> Option<Value<'a>> {
        let i = self
            .by_key
            .binary_search_by(|&i| key_of(&self.kvs, i).cmp(key))
            .ok()?;
        let i = *self.by_key.get(i)? as usize;
        self.kvs.get(i).map(|kv| kv.1)
    }

    /// Metadata `key` as a u32, from any integer type whose value fits.
    pub fn get_u32(&self, key: &str) -> Option<u32> {
        self.get(key)?.as_u32()
    }

    /// Metadata `key` as a u64, from any integer type whose value fits.
    pub fn get_u64(&self, key: &str) -> Option<u64> {
        self.get(key)?.as_u64()
    }

    /// Metadata `key` as an i64, from any integer type whose value fits.
    pub fn get_i64(&self, key: &str) -> Option<i64> {
        self.get(key)?.as_i64()
    }

    /// Metadata `key` as an f32 (from f32 or f64).
    pub fn get_f32(&self, key: &str) -> Option<f32> {
        self.get(key)?.as_f32()
    }

    /// Metadata `key` as a bool.
    pub fn get_bool(&self, key: &str) -> Option<bool> {
        self.get(key)?.as_bool()
    }

    /// Metadata `key` as a UTF-8 string.
    pub fn get_str(&self, key: &str) -> Option<&'a str> {
        self.get(key)?.as_str()
    }

    /// Metadata `key` as an array.
    pub fn get_array(&self, key: &str) -> Option<Array<'a>> {
        self.get(key)?.as_array()
    }

    /// Metadata `key` as an array of strings.
    pub fn get_str_array(&self, key: &str) -> Option<StrArray<'a>> {
        self.get_array(key)?.strings()
    }

    /// Metadata `key` as an array of integers.
    pub fn get_int_array(&self, key: &str) -> Option<IntArray<'a>> {
        self.get_array(key)?.ints()
    }

    /// The tensors, in file order.
    pub fn tensors(&self) -> &[TensorInfo<'a>] {
        &self.tensors
    }

    /// The tensor named `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo<'a>> {
        let i = self
            .by_name
            .binary_search_by(|&i| name_of(&self.tensors, i).cmp(name))
            .ok()?;
        self.tensors.get(*self.by_name.get(i)? as usize)
    }
}

/// The indices `0..count` sorted by `name`, for binary search; `Err` with a name that two
/// of them share.
fn sorted_indices<'k>(count: usize, name: impl Fn(u32) -> &'k str) -> Result<Vec<u32>, &'k str> {
    let mut sorted: Vec<u32> = (0..count as u32).collect();
    sorted.sort_unstable_by(|&a, &b| name(a).cmp(name(b)));
    match sorted.windows(2).find(|w| name(w[0]) == name(w[1])) {
        Some(w) => Err(name(w[0])),
        None => Ok(sorted),
    }
}

fn key_of<'k>(kvs: &[(&'k str, Value<'_>)], i: u32) -> &'k str {
    kvs.get(i as usize).map_or("", |kv| kv.0)
}

fn name_of<'k>(tensors: &[TensorInfo<'k>], i: u32) -> &'k str {
    tensors.get(i as usize).map_or("", |t| t.name)
}

fn read_u64(data: &[u8], at: usize) -> Option<u64> {
    let b = data.get(at..at.checked_add(8)?)?;
    Some(u64::from_le_bytes(b.try_into().ok()?))
}

fn read_f32(data: &[u8], at: usize) -> Option<f32> {
    let b = data.get(at..at.checked_add(4)?)?;
    Some(f32::from_le_bytes(b.try_into().ok()?))
}

fn read_f64(data: &[u8], at: usize) -> Option<f64> {
    Some(f64::from_bits(read_u64(data, at)?))
}

/// A cursor over the file prefix that knows the file size.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    file_size: u64,
}

impl<'a> Reader<'a> {
    /// Bytes of the file after the cursor.
    fn room(&self) -> u64 {
        self.file_size.saturating_sub(self.pos as u64)
    }

    /// Refuses `count` items of at least `min_bytes` each if the file cannot hold them.
    fn check_count(&self, count: u64, min_bytes: u64, what: &'static str) -> Result<(), GgufError> {
        let room = self.room();
        if count > room / min_bytes {
            return Err(GgufError::TooMany { what, count, room });
        }
        Ok(())
    }

    /// The next `n` bytes.
    fn take(&mut self, n: u64, what: &'static str) -> Result<&'a [u8], GgufError> {
        let pos = self.pos as u64;
        let end = pos.saturating_add(n);
        if end > self.file_size {
            return Err(GgufError::Truncated {
                what,
                end,
                file_size: self.file_size,
            });
        }
        let have = self.buf.len() as u64;
        if end > have {
            let guess = have.saturating_mul(2).max(MIN_READ).min(self.file_size);
            return Err(GgufError::NeedMore {
                bytes: end.max(guess),
            });
        }
        // end <= buf.len(): a usize, and the range is in bounds.
        let e = end as usize;
        let s = self.buf.get(self.pos..e).ok_or(GgufError::Truncated {
            what,
            end,
            file_size: self.file_size,
        })?;
        self.pos = e;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], GgufError> {
        let b = self.take(N as u64, what)?;
        <[u8; N]>::try_from(b).map_err(|_| GgufError::Truncated {
            what,
            end: self.pos as u64,
            file_size: self.file_size,
        })
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &'static str) -> Result<&'a [u8], GgufError> {
        let len = self.u64(what)?;
        self.take(len, what)
    }

    /// A string that must be UTF-8 (a key or a name).
    fn text(&mut self, what: &'static str) -> Result<&'a str, GgufError> {
        let bytes = self.string(what)?;
        core::str::from_utf8(bytes).map_err(|_| GgufError::InvalidUtf8 { what })
    }

    /// A value of type `ty` (the value of metadata `key`).
    fn value(&mut self, ty: ValueType, key: &str) -> Result<Value<'a>, GgufError> {
        const W: &str = "metadata value";
        Ok(match ty {
            ValueType::U8 => Value::U8(u8::from_le_bytes(self.array(W)?)),
            ValueType::I8 => Value::I8(i8::from_le_bytes(self.array(W)?)),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.array(W)?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.array(W)?)),
            ValueType::U32 => Value::U32(u32::from_le_bytes(self.array(W)?)),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.array(W)?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.array(W)?)),
            ValueType::Bool => Value::Bool(self.array::<1>(W)?[0] != 0),
            ValueType::Str => Value::Str(self.string(W)?),
            ValueType::U64 => Value::U64(u64::from_le_bytes(self.array(W)?)),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.array(W)?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.array(W)?)),
            ValueType::Array => {
                const A: &str = "metadata array";
                let code = self.u32(A)?;
                let elem =
                    ValueType::from_code(code).ok_or_else(|| GgufError::UnknownValueType {
                        key: shown(key),
                        code,
                    })?;
                let count = self.u64(A)?;
                let start = self.pos;
                match elem {
                    ValueType::Array => return Err(GgufError::NestedArray { key: shown(key) }),
                    ValueType::Str => {
                        self.check_count(count, 8, "array strings")?;
                        for _ in 0..count {
                            self.string(A)?;
                        }
                    }
                    _ => {
                        let size = elem.fixed_size().unwrap_or(1);
                        self.check_count(count, size, "array elements")?;
                        self.take(count * size, A)?; // no overflow: count <= room / size
                    }
                }
                let len = usize::try_from(count).map_err(|_| GgufError::TooMany {
                    what: "array elements",
                    count,
                    room: self.room(),
                })?;
                Value::Array(Array {
                    elem,
                    len,
                    data: self.buf.get(start..self.pos).unwrap_or(&[]),
                })
            }
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use alloc::format;
    use alloc::vec;

    /// A GGUF v3 header: `kvs` (key, type code, value bytes), then `tensors` (name, the
    /// bytes after it).
    pub(crate) fn file(kvs: &[(&str, u32, &[u8])], tensors: &[(&str, &[u8])]) -> Vec<u8> {
        let mut out = Vec::from(MAGIC);
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(kvs.len() as u64).to_le_bytes());
        let text = |out: &mut Vec<u8>, s: &str| {
            out.extend_from_slice(&(s.len() as u64).to_le_bytes());
            out.extend_from_slice(s.as_bytes());
        };
        for (key, code, value) in kvs {
            text(&mut out, key);
            out.extend_from_slice(&code.to_le_bytes());
            out.extend_from_slice(value);
        }
        for (name, rest) in tensors {
            text(&mut out, name);
            out.extend_from_slice(rest);
        }
        out
    }

    /// The bytes of a string value.
    pub(crate) fn string(s: &str) -> Vec<u8> {
        [&(s.len() as u64).to_le_bytes()[..], s.as_bytes()].concat()
    }

    /// The message of the error parsing `bytes` gives.
    fn message(bytes: &[u8]) -> String {
        match Gguf::parse(bytes, bytes.len() as u64) {
            Ok(_) => panic!("a bad file parsed"),
            Err(e) => format!("{e}"),
        }
    }

    #[test]
    fn a_megabyte_tensor_name_makes_a_short_message() {
        let name: String = core::iter::repeat_n('\u{1}', 1 << 20).collect();
        let bytes = file(&[], &[(&name, &0u32.to_le_bytes())]);
        let m = message(&bytes);
        assert!(m.len() < 1024, "{} bytes: {}", m.len(), &m[..200]);
        assert!(m.starts_with("tensor \"\\u{1}"), "{m}");
        assert!(
            m.ends_with("…\" has 0 dimensions (1 to 4 are allowed)"),
            "{m}"
        );
        // Two such names in one message (overlapping data).
        let one_dim = [
            &1u32.to_le_bytes()[..],
            &32u64.to_le_bytes(),
            &0u32.to_le_bytes(),
        ];
        let tensor = [&one_dim.concat()[..], &0u64.to_le_bytes()].concat();
        let other: String = core::iter::repeat_n('\u{1}', (1 << 20) + 1).collect();
        let mut bytes = file(&[], &[(&name, &tensor), (&other, &tensor)]);
        bytes.resize(bytes.len() + 4096, 0);
        let m = message(&bytes);
        assert!(m.len() < 1024, "{} bytes: {}", m.len(), &m[..200]);
        assert!(m.contains(" overlap"), "{m}");
    }

    #[test]
    fn a_megabyte_key_makes_a_short_message() {
        let key: String = core::iter::repeat_n('\u{1}', 1 << 20).collect();
        for bytes in [
            file(&[(&key, 99, &[])], &[]),
            file(&[(&key, 9, &[9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])], &[]),
            file(&[(&key, 0, &[1]), (&key, 0, &[2])], &[]),
        ] {
            let m = message(&bytes);
            assert!(m.len() < 1024, "{} bytes: {}", m.len(), &m[..200]);
            assert!(m.contains("…\""), "{m}");
        }
    }

    #[test]
    fn a_value_shows_its_type_and_length_not_its_bytes() {
        let long = vec![1u8; 1 << 20];
        let long = Value::Str(&long);
        let m = format!("{long}");
        assert!(m.len() < 1024 && m.ends_with("…\""), "{m}");
        assert_eq!(format!("{}", Value::Str(b"linear")), "\"linear\"");
        assert_eq!(
            format!("{}", Value::Str(&[0xff, 0xfe])),
            "a string of 2 bytes that is not UTF-8"
        );
        let data = vec![0u8; 4 << 20];
        let array = Value::Array(Array {
            elem: ValueType::U32,
            len: 1 << 20,
            data: &data,
        });
        assert_eq!(format!("{array}"), "an array of 1048576 U32");
        assert_eq!(format!("{}", Value::U32(64)), "64");
    }
}
