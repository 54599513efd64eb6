//! Kernels: one declarative table from which everything about a kernel is derived.
//!
//! Each entry of `kernels!` below gives a kernel's id, its name, its arguments in
//! command order (each with a [`Param`] kind that says how the raw `u64` is decoded and
//! checked) and a block that declares which byte ranges of which buffers it reads and
//! writes, after any constraint of its own. From that one entry come:
//!
//! - the id constant (`MATMUL`, ...) and [`name`], used by the guest SDK;
//! - the variant of [`Kernel`], whose fields are the decoded arguments, and
//!   [`Kernel::encode`], which the SDK uses to fill a LAUNCH command (and
//!   [`Kernel::encode_with`], the same with buffer addresses, which the cuda backend
//!   passes on);
//! - [`Kernel::decode`], the device's validation of a LAUNCH command;
//! - [`Kernel::access`], the exact read and write sets the device's dirty tracking and a
//!   backend rely on.
//!
//! A backend matches on [`Kernel`] and the compiler makes it cover every kernel.
//!
//! # Validation
//!
//! A launch is `[kernel id, arguments...]`; missing trailing arguments read as 0 and
//! arguments a kernel does not declare are ignored. Checks are made in this order, and
//! the first failing one gives the status:
//!
//! 1. the kernel id ([`status::BAD_KERNEL`]);
//! 2. buffer ids: in range and allocated ([`status::BAD_BUFFER`]);
//! 3. dimensions: non-zero ([`status::BAD_SHAPE`]);
//! 4. the other arguments: flags, enumerations, element formats, f32 scalars (finite,
//!    bits in the low 32 bits, the high ones zero) ([`status::BAD_ARGUMENT`]);
//! 5. the kernel's own block: shapes whose element or byte counts overflow, that a
//!    format cannot hold, that ask for more work than [`MAX_LAUNCH_WORK`], attend over
//!    more than [`MAX_POSITIONS`], or have rows longer than [`MAX_ROW`] or heads wider
//!    than [`MAX_HEAD_DIM`] ([`status::BAD_SHAPE`]), and constraints on scalars
//!    ([`status::BAD_ARGUMENT`]);
//! 6. every declared range lies inside its buffer ([`status::OUT_OF_BOUNDS`]);
//! 7. a buffer the kernel writes appears in no other argument ([`status::BAD_ARGUMENT`]);
//!    in-place kernels declare the buffer once, as updated.
//!
//! Data-dependent conditions (an embedding id beyond the vocabulary, a label beyond the
//! classes) can only be found while running: the entry declares them too
//! ([`Access::indices`]), and every backend checks them before it writes anything.
//!
//! Buffers are ids; counts are elements; matrices are row major; f32 and u32 elements are
//! 4 bytes, little endian. Weights in a [`DType`] block format are rows of whole blocks.

use core::ops::Range;

use super::dtype::DType;
use super::{status, COMMAND_ARGS, MAX_BUFFERS};

/// A buffer id as the guest names it (1..=[`MAX_BUFFERS`]).
pub type BufferId = u32;

/// Bytes of one f32 or u32 element.
pub const ELEM_BYTES: u64 = 4;

/// Most work one launch may ask for, in multiply-adds: a minute or two of one CPU
/// thread. A device pauses (for a switchover, a snapshot, a throttle) only between
/// commands, and a matrix product or an attention sized from two buffers grows with their
/// product: unbounded, one launch of a hostile guest would hold its VM for hours. (A stop
/// or a shutdown abandons the kernel in flight where the backend can: the cpu one.) The
/// workloads' launches stay far below it (a prompt is read in batches).
pub const MAX_LAUNCH_WORK: u64 = 1 << 40;

/// What one attention score costs besides its products, in multiply-adds (its
/// exponential and bookkeeping, measured at about that on the cpu backend).
const SCORE_WORK: u64 = 1024;

/// What one attention score of heads `head_dim` wide costs on the backend that does the
/// most for it: the cpu backend's products and [`SCORE_WORK`], or the cuda backend's,
/// which computes a head's scores again in each thread of its output (the width
/// squared). One count for all: a launch one backend takes, every backend takes, so a
/// VM that migrates to another kind of host is refused nothing it ran before.
fn score_work(head_dim: u64) -> u64 {
    (head_dim + SCORE_WORK).max(head_dim.saturating_mul(head_dim))
}

/// Whether an attention of `rows` query rows of `heads` heads `head_dim` wide over
/// `positions` cached positions is within [`MAX_LAUNCH_WORK`] on every backend: a guest
/// reads a long prompt in pieces this bound takes.
pub fn attention_within_work(rows: u64, heads: u64, positions: u64, head_dim: u64) -> bool {
    within_launch_work(&[rows, heads, positions, score_work(head_dim)])
}

/// Most positions one attention attends over (a context of 4 M tokens, beyond any
/// model's): a backend keeps a score per position for each query row and head it works
/// on at once.
pub const MAX_POSITIONS: usize = 1 << 22;

/// Most columns of one SOFTMAX or CROSS_ENTROPY row, and inputs of a QMATMUL: a backend
/// keeps an f64 per column for each row it works on at once (32 MiB a thread at most),
/// or a QMATMUL row prepared (about 3 bytes an input), host memory outside the device's.
/// Also the longest run one GPU thread sums alone, which no abort can cut short: the
/// columns of a SUM_ROWS, LAYER_NORM, RMS_NORM or ARGMAX row, the rows of a SUM_COLS
/// column, and CROSS_ENTROPY's rows (its mean loss). 16 times the largest vocabulary
/// (about 2^18), and as long as the longest context, whose attention scores a row may
/// hold.
pub const MAX_ROW: usize = MAX_POSITIONS;

/// Widest head of ROPE and ATTENTION_DECODE: a backend keeps tables of a head's width
/// (16 bytes a pair of elements at most: 8 MiB a thread) for each head it works on at
/// once, host memory outside the device's. 4096 times the widest head of a real model
/// (256).
pub const MAX_HEAD_DIM: usize = 1 << 20;

/// How one argument of a kernel is decoded from its raw `u64` and encoded back.
pub trait Param {
    /// The decoded value.
    type Value: Copy + core::fmt::Debug + PartialEq;
    /// Which validation step rejects a bad value (see the module docs): 0 buffers,
    /// 1 dimensions, 2 the rest.
    const STEP: u8;
    /// Decodes and checks `raw`; `buffer_len` gives an allocated buffer's byte length.
    fn decode(raw: u64, buffer_len: &dyn Fn(BufferId) -> Option<u64>) -> Result<Self::Value, u32>;
    /// The raw argument for `value`.
    fn encode(value: Self::Value) -> u64;
    /// The raw argument for `value`, a buffer id replaced by `buffer(id)` (see
    /// [`Kernel::encode_with`]).
    fn encode_with(value: Self::Value, _buffer: &dyn Fn(BufferId) -> u64) -> u64 {
        Self::encode(value)
    }
}

/// An allocated buffer's id.
pub struct Buffer;

impl Param for Buffer {
    type Value = BufferId;
    const STEP: u8 = 0;
    fn decode(raw: u64, buffer_len: &dyn Fn(BufferId) -> Option<u64>) -> Result<BufferId, u32> {
        if !(1..=MAX_BUFFERS).contains(&raw) {
            return Err(status::BAD_BUFFER);
        }
        let id = raw as BufferId;
        buffer_len(id).map(|_| id).ok_or(status::BAD_BUFFER)
    }
    fn encode(value: BufferId) -> u64 {
        u64::from(value)
    }
    fn encode_with(value: BufferId, buffer: &dyn Fn(BufferId) -> u64) -> u64 {
        buffer(value)
    }
}

/// A non-zero dimension or count.
pub struct Dim;

impl Param for Dim {
    type Value = usize;
    const STEP: u8 = 1;
    fn decode(raw: u64, _: &dyn Fn(BufferId) -> Option<u64>) -> Result<usize, u32> {
        match usize::try_from(raw) {
            Ok(0) | Err(_) => Err(status::BAD_SHAPE),
            Ok(d) => Ok(d),
        }
    }
    fn encode(value: usize) -> u64 {
        value as u64
    }
}

/// An element offset into a buffer (may be 0); the range it starts is bounds-checked.
pub struct Offset;

impl Param for Offset {
    type Value = usize;
    const STEP: u8 = 2;
    fn decode(raw: u64, _: &dyn Fn(BufferId) -> Option<u64>) -> Result<usize, u32> {
        usize::try_from(raw).map_err(|_| status::OUT_OF_BOUNDS)
    }
    fn encode(value: usize) -> u64 {
        value as u64
    }
}

/// A position in a sequence (may be 0).
pub struct Position;

impl Param for Position {
    type Value = usize;
    const STEP: u8 = 2;
    fn decode(raw: u64, _: &dyn Fn(BufferId) -> Option<u64>) -> Result<usize, u32> {
        usize::try_from(raw).map_err(|_| status::BAD_ARGUMENT)
    }
    fn encode(value: usize) -> u64 {
        value as u64
    }
}

/// A raw 64-bit word (seeds, counters, step numbers).
pub struct Word;

impl Param for Word {
    type Value = u64;
    const STEP: u8 = 2;
    fn decode(raw: u64, _: &dyn Fn(BufferId) -> Option<u64>) -> Result<u64, u32> {
        Ok(raw)
    }
    fn encode(value: u64) -> u64 {
        value
    }
}

/// A finite f32: its bits in the low 32 bits of the argument, the high ones zero.
pub struct Scalar;

impl Param for Scalar {
    type Value = f32;
    const STEP: u8 = 2;
    fn decode(raw: u64, _: &dyn Fn(BufferId) -> Option<u64>) -> Result<f32, u32> {
        let bits = u32::try_from(raw).map_err(|_| status::BAD_ARGUMENT)?;
        let value = f32::from_bits(bits);
        if value.is_finite() {
            Ok(value)
        } else {
            Err(status::BAD_ARGUMENT)
        }
    }
    fn encode(value: f32) -> u64 {
        u64::from(value.to_bits())
    }
}

impl Param for DType {
    type Value = DType;
    const STEP: u8 = 2;
    fn decode(raw: u64, _: &dyn Fn(BufferId) -> Option<u64>) -> Result<DType, u32> {
        DType::from_code(raw).ok_or(status::BAD_ARGUMENT)
    }
    fn encode(value: DType) -> u64 {
        value.code()
    }
}

/// MATMUL flag: `a` is stored transposed.
pub const TRANSPOSE_A: u64 = 1;
/// MATMUL flag: `b` is stored transposed.
pub const TRANSPOSE_B: u64 = 2;
/// MATMUL flag: add to `c` instead of overwriting it.
pub const ACCUMULATE: u64 = 4;

/// The flags of [`MATMUL`]: [`TRANSPOSE_A`], [`TRANSPOSE_B`], [`ACCUMULATE`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MatmulFlags {
    /// `a` is stored transposed (`k×m`).
    pub transpose_a: bool,
    /// `b` is stored transposed (`n×k`).
    pub transpose_b: bool,
    /// `c += ...` instead of `c = ...`.
    pub accumulate: bool,
}

impl Param for MatmulFlags {
    type Value = MatmulFlags;
    const STEP: u8 = 2;
    fn decode(raw: u64, _: &dyn Fn(BufferId) -> Option<u64>) -> Result<MatmulFlags, u32> {
        if raw & !(TRANSPOSE_A | TRANSPOSE_B | ACCUMULATE) != 0 {
            return Err(status::BAD_ARGUMENT);
        }
        Ok(MatmulFlags {
            transpose_a: raw & TRANSPOSE_A != 0,
            transpose_b: raw & TRANSPOSE_B != 0,
            accumulate: raw & ACCUMULATE != 0,
        })
    }
    fn encode(value: MatmulFlags) -> u64 {
        (if value.transpose_a { TRANSPOSE_A } else { 0 })
            | (if value.transpose_b { TRANSPOSE_B } else { 0 })
            | (if value.accumulate { ACCUMULATE } else { 0 })
    }
}

/// Implements [`Param`] for an enumeration from the code of each variant, so that decode
/// and encode agree; any other code is [`status::BAD_ARGUMENT`].
macro_rules! enum_param {
    ($Enum:ident { $($Variant:ident = $code:literal),+ }) => {
        impl Param for $Enum {
            type Value = $Enum;
            const STEP: u8 = 2;
            fn decode(raw: u64, _: &dyn Fn(BufferId) -> Option<u64>) -> Result<$Enum, u32> {
                match raw {
                    $($code => Ok($Enum::$Variant),)+
                    _ => Err(status::BAD_ARGUMENT),
                }
            }
            fn encode(value: $Enum) -> u64 {
                match value {
                    $($Enum::$Variant => $code,)+
                }
            }
        }
    };
}

/// What [`RNG_FILL`] draws from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Distribution {
    /// Uniform in `[-scale, scale)` (argument 0).
    Uniform,
    /// Normal with mean 0 and standard deviation `scale` (argument 1).
    Normal,
}

enum_param!(Distribution { Uniform = 0, Normal = 1 });

/// Which elements of a head [`ROPE`] rotates together.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeStyle {
    /// Pairs `(x[2i], x[2i+1])` (argument 0; GGUF llama models, GPT-J).
    Adjacent,
    /// Pairs `(x[i], x[i + d/2])` (argument 1; GPT-NeoX, Hugging Face llama).
    HalfSplit,
}

enum_param!(RopeStyle { Adjacent = 0, HalfSplit = 1 });

/// How a kernel uses a buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Only read.
    Read,
    /// Only written (overwritten whole in the declared range).
    Write,
    /// Read and written in place.
    Update,
}

/// One buffer range a kernel touches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BufferAccess {
    /// The buffer.
    pub buffer: BufferId,
    /// How.
    pub mode: Mode,
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
}

impl BufferAccess {
    /// The byte range.
    pub fn bytes(&self) -> Range<u64> {
        self.start..self.end
    }
}

/// Most buffers one kernel names.
pub const MAX_KERNEL_BUFFERS: usize = 6;

/// A condition on a kernel's data that only the data can show: the first `count` u32 of
/// `buffer` (which the kernel reads) must each be below `bound`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Indices {
    /// The buffer of u32 indices.
    pub buffer: BufferId,
    /// How many, from its start.
    pub count: usize,
    /// What each must be below.
    pub bound: usize,
    /// What an index past the bound is, for a person ("embedding id beyond the
    /// vocabulary").
    pub what: &'static str,
}

/// The buffer ranges a kernel reads and writes, as its table entry declares them, and
/// the indices among them that its data must keep in bounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Access {
    entries: [BufferAccess; MAX_KERNEL_BUFFERS],
    len: usize,
    indices: Option<Indices>,
}

impl Default for Access {
    fn default() -> Self {
        const NONE: BufferAccess = BufferAccess {
            buffer: 0,
            mode: Mode::Read,
            start: 0,
            end: 0,
        };
        Access {
            entries: [NONE; MAX_KERNEL_BUFFERS],
            len: 0,
            indices: None,
        }
    }
}

impl Access {
    fn push(&mut self, buffer: BufferId, mode: Mode, bytes: Range<u64>) -> Result<(), u32> {
        let slot = self.entries.get_mut(self.len).ok_or(status::BAD_ARGUMENT)?;
        *slot = BufferAccess {
            buffer,
            mode,
            start: bytes.start,
            end: bytes.end,
        };
        self.len += 1;
        Ok(())
    }

    /// Declares that `buffer`'s `bytes` are read.
    pub fn read(&mut self, buffer: BufferId, bytes: Range<u64>) -> Result<(), u32> {
        self.push(buffer, Mode::Read, bytes)
    }

    /// Declares that `buffer`'s `bytes` are written (and not read).
    pub fn write(&mut self, buffer: BufferId, bytes: Range<u64>) -> Result<(), u32> {
        self.push(buffer, Mode::Write, bytes)
    }

    /// Declares that `buffer`'s `bytes` are read and written in place.
    pub fn update(&mut self, buffer: BufferId, bytes: Range<u64>) -> Result<(), u32> {
        self.push(buffer, Mode::Update, bytes)
    }

    /// Declares that the first `count` u32 of `buffer` (read, so declared with
    /// [`Self::read`] too) must be below `bound`: `what` names one that is not.
    fn read_indices(
        &mut self,
        buffer: BufferId,
        count: usize,
        bound: usize,
        what: &'static str,
    ) -> Result<(), u32> {
        self.read(buffer, elems(count)?)?;
        self.indices = Some(Indices {
            buffer,
            count,
            bound,
            what,
        });
        Ok(())
    }

    /// The condition on the kernel's data, if it has one: its indices' bound.
    pub fn indices(&self) -> Option<Indices> {
        self.indices
    }

    /// Declares `inputs` read and `output` written, `n` elements from the start of each.
    fn elementwise(&mut self, n: usize, inputs: &[BufferId], output: BufferId) -> Result<(), u32> {
        let r = elems(product(n, 1)?)?;
        for &input in inputs {
            self.read(input, r.clone())?;
        }
        self.write(output, r)
    }

    /// Every declared range, in declaration order.
    pub fn entries(&self) -> &[BufferAccess] {
        &self.entries[..self.len]
    }

    /// The ranges written (written or updated).
    pub fn writes(&self) -> impl Iterator<Item = (BufferId, Range<u64>)> + '_ {
        self.entries()
            .iter()
            .filter(|e| e.mode != Mode::Read)
            .map(|e| (e.buffer, e.bytes()))
    }

    /// The buffers read (read or updated), without repeats, in declaration order.
    pub fn reads(&self) -> impl Iterator<Item = BufferId> + '_ {
        let entries = self.entries();
        entries.iter().enumerate().filter_map(move |(i, e)| {
            let first = !entries[..i].iter().any(|o| o.buffer == e.buffer);
            (e.mode != Mode::Write && first).then_some(e.buffer)
        })
    }

    /// Checks steps 6 and 7 of the module docs against the buffers' byte lengths.
    fn check(&self, buffer_len: &dyn Fn(BufferId) -> Option<u64>) -> Result<(), u32> {
        for e in self.entries() {
            // Step 2 checked existence; a buffer gone since reads as empty.
            if e.end > buffer_len(e.buffer).unwrap_or(0) {
                return Err(status::OUT_OF_BOUNDS);
            }
        }
        for (i, e) in self.entries().iter().enumerate() {
            let elsewhere = self
                .entries()
                .iter()
                .enumerate()
                .any(|(j, o)| j != i && o.buffer == e.buffer);
            if e.mode != Mode::Read && elsewhere {
                return Err(status::BAD_ARGUMENT);
            }
        }
        Ok(())
    }
}

/// `a * b` as an element count whose byte size fits in a u64.
pub fn product(a: usize, b: usize) -> Result<usize, u32> {
    let n = a.checked_mul(b).ok_or(status::BAD_SHAPE)?;
    (n as u64)
        .checked_mul(ELEM_BYTES)
        .ok_or(status::BAD_SHAPE)?;
    Ok(n)
}

/// `a * b * c` as an element count, as [`product`].
pub fn product3(a: usize, b: usize, c: usize) -> Result<usize, u32> {
    product(product(a, b)?, c)
}

/// Byte range of the first `n` elements.
pub fn elems(n: usize) -> Result<Range<u64>, u32> {
    let end = (n as u64)
        .checked_mul(ELEM_BYTES)
        .ok_or(status::BAD_SHAPE)?;
    Ok(0..end)
}

/// Byte range of `n` elements from element `offset`.
pub fn elems_at(offset: usize, n: usize) -> Result<Range<u64>, u32> {
    let start = (offset as u64)
        .checked_mul(ELEM_BYTES)
        .ok_or(status::OUT_OF_BOUNDS)?;
    let end = (offset as u64)
        .checked_add(n as u64)
        .and_then(|e| e.checked_mul(ELEM_BYTES))
        .ok_or(status::OUT_OF_BOUNDS)?;
    Ok(start..end)
}

/// Byte range of `rows` rows of `cols` elements in `dtype` (`cols` whole blocks).
pub fn blocks(dtype: DType, rows: usize, cols: usize) -> Result<Range<u64>, u32> {
    dtype
        .bytes(rows as u64, cols as u64)
        .map(|end| 0..end)
        .ok_or(status::BAD_SHAPE)
}

/// Fails with [`status::BAD_ARGUMENT`] unless `ok`.
fn require(ok: bool) -> Result<(), u32> {
    if ok {
        Ok(())
    } else {
        Err(status::BAD_ARGUMENT)
    }
}

/// Fails with [`status::BAD_SHAPE`] when `factors` multiply to more than
/// [`MAX_LAUNCH_WORK`].
fn require_work(factors: &[u64]) -> Result<(), u32> {
    require_shape(within_launch_work(factors))
}

/// Whether work of the product of `factors` (multiply-adds, or their equal) is within
/// [`MAX_LAUNCH_WORK`]: the table's count, and a backend's own where it does more.
pub fn within_launch_work(factors: &[u64]) -> bool {
    let work = factors.iter().try_fold(1u64, |w, &f| w.checked_mul(f));
    work.is_some_and(|w| w <= MAX_LAUNCH_WORK)
}

/// Fails with [`status::BAD_SHAPE`] unless `ok`.
fn require_shape(ok: bool) -> Result<(), u32> {
    if ok {
        Ok(())
    } else {
        Err(status::BAD_SHAPE)
    }
}

/// Keeps the error of the earliest validation step (the first argument among equals).
fn keep_first(first: &mut Option<(u8, u32)>, step: u8, code: u32) {
    if first.is_none_or(|(s, _)| step < s) {
        *first = Some((step, code));
    }
}

/// The raw argument `i` (0 = the kernel id), 0 when missing.
fn arg(args: &[u64], i: usize) -> u64 {
    args.get(i).copied().unwrap_or(0)
}

macro_rules! kernels {
    ($(
        $(#[doc = $doc:literal])*
        $CONST:ident = $id:literal, $name:literal, $Variant:ident {
            $( $(#[doc = $fdoc:literal])* $field:ident : $P:ty ),+ $(,)?
        } => |$io:ident| $access:block
    )+) => {
        $(
            $(#[doc = $doc])*
            pub const $CONST: u64 = $id;
        )+

        // A kernel's id and arguments fit one command, or the table does not compile
        // (`encode` would panic at run time).
        $(
            const _: () = assert!(
                [$(stringify!($field)),+].len() < COMMAND_ARGS,
                concat!("kernel ", $name, " has more arguments than a command holds")
            );
        )+

        /// Every kernel's id and name, in id order.
        pub const KERNELS: &[(u64, &str)] = &[$(($id, $name)),+];

        /// The name of kernel `id` ("matmul", ...), if there is one.
        pub fn name(id: u64) -> Option<&'static str> {
            match id {
                $($id => Some($name),)+
                _ => None,
            }
        }

        /// A kernel launch with its arguments decoded (see the module docs).
        #[derive(Clone, Copy, Debug, PartialEq)]
        pub enum Kernel {
            $(
                $(#[doc = $doc])*
                $Variant {
                    $( $(#[doc = $fdoc])* $field: <$P as Param>::Value, )+
                },
            )+
        }

        impl Kernel {
            /// Its kernel id.
            pub fn id(&self) -> u64 {
                match self {
                    $(Kernel::$Variant { .. } => $id,)+
                }
            }

            /// Its name.
            pub fn name(&self) -> &'static str {
                match self {
                    $(Kernel::$Variant { .. } => $name,)+
                }
            }

            /// The LAUNCH arguments: the kernel id, then each argument in order.
            pub fn encode(&self) -> [u64; COMMAND_ARGS] {
                self.encode_with(&|id| u64::from(id))
            }

            /// The LAUNCH arguments ([`Kernel::encode`]) with each buffer id replaced by
            /// `buffer(id)`: a backend whose kernels take their arguments in this order
            /// passes them on as they are, its buffers' addresses in place of the ids.
            pub fn encode_with(&self, buffer: &dyn Fn(BufferId) -> u64) -> [u64; COMMAND_ARGS] {
                let mut out = [0u64; COMMAND_ARGS];
                match *self {
                    $(Kernel::$Variant { $($field),+ } => {
                        let raw = [$id, $(<$P as Param>::encode_with($field, buffer)),+];
                        out[..raw.len()].copy_from_slice(&raw);
                    })+
                }
                out
            }

            /// Steps 1 to 4 of the module docs.
            fn decode_arguments(
                args: &[u64],
                buffer_len: &dyn Fn(BufferId) -> Option<u64>,
            ) -> Result<Kernel, u32> {
                let mut first: Option<(u8, u32)> = None;
                match arg(args, 0) {
                    $($id => {
                        let mut slot = 0usize;
                        $(
                            slot += 1;
                            let $field = match <$P as Param>::decode(arg(args, slot), buffer_len) {
                                Ok(v) => Some(v),
                                Err(code) => {
                                    keep_first(&mut first, <$P as Param>::STEP, code);
                                    None
                                }
                            };
                        )+
                        let _ = slot;
                        match ($($field,)+) {
                            ($(Some($field),)+) => Ok(Kernel::$Variant { $($field),+ }),
                            _ => Err(first.map_or(status::BAD_ARGUMENT, |(_, code)| code)),
                        }
                    })+
                    _ => Err(status::BAD_KERNEL),
                }
            }

            /// The buffer ranges it reads and writes (step 5 of the module docs: shapes
            /// that overflow and the kernel's own constraints fail here).
            pub fn access(&self) -> Result<Access, u32> {
                match *self {
                    $(
                        #[allow(unused_variables)]
                        Kernel::$Variant { $($field),+ } => {
                            let mut $io = Access::default();
                            let declared: Result<(), u32> = $access;
                            declared?;
                            Ok($io)
                        }
                    )+
                }
            }
        }
    };
}

impl Kernel {
    /// Validates a LAUNCH command: `args[0]` is the kernel id, the rest its arguments.
    /// `buffer_len` gives the byte length of an allocated buffer, `None` for an id that
    /// is not allocated. Returns the kernel and what it reads and writes, or the
    /// [`status`] code of the first failed check. Never panics.
    pub fn decode(
        args: &[u64],
        buffer_len: impl Fn(BufferId) -> Option<u64>,
    ) -> Result<(Kernel, Access), u32> {
        let kernel = Kernel::decode_arguments(args, &buffer_len)?;
        let access = kernel.access()?;
        access.check(&buffer_len)?;
        Ok((kernel, access))
    }
}

kernels! {
    /// `c[m×n] = op(a)·op(b)` (`+=` with [`ACCUMULATE`]): `op(a)` is `m×k` (`a` stored
    /// `k×m` with [`TRANSPOSE_A`]), `op(b)` is `k×n` (`b` stored `n×k` with
    /// [`TRANSPOSE_B`]).
    MATMUL = 1, "matmul", Matmul {
        /// Left operand.
        a: Buffer,
        /// Right operand.
        b: Buffer,
        /// Result, `m×n`.
        c: Buffer,
        /// Rows of the result.
        m: Dim,
        /// Columns of the result.
        n: Dim,
        /// Inner dimension.
        k: Dim,
        /// Transposes and accumulation.
        flags: MatmulFlags,
    } => |io| {
        let (mk, kn, mn) = (product(m, k)?, product(k, n)?, product(m, n)?);
        require_work(&[m as u64, n as u64, k as u64])?;
        io.read(a, elems(mk)?)?;
        io.read(b, elems(kn)?)?;
        if flags.accumulate {
            io.update(c, elems(mn)?)
        } else {
            io.write(c, elems(mn)?)
        }
    }

    /// In place `x[r][c] += bias[c]`.
    ADD_BIAS = 2, "add_bias", AddBias {
        /// Matrix `rows×cols`, updated in place.
        x: Buffer,
        /// Row vector of `cols`.
        bias: Buffer,
        /// Rows of `x`.
        rows: Dim,
        /// Columns of `x`.
        cols: Dim,
    } => |io| {
        io.update(x, elems(product(rows, cols)?)?)?;
        io.read(bias, elems(cols)?)
    }

    /// `out = a + b` (elementwise).
    ADD = 3, "add", Add {
        /// First input.
        a: Buffer,
        /// Second input.
        b: Buffer,
        /// Output.
        out: Buffer,
        /// Elements.
        n: Dim,
    } => |io| { io.elementwise(n, &[a, b], out) }

    /// `out = a * b` (elementwise).
    MUL = 4, "mul", Mul {
        /// First input.
        a: Buffer,
        /// Second input.
        b: Buffer,
        /// Output.
        out: Buffer,
        /// Elements.
        n: Dim,
    } => |io| { io.elementwise(n, &[a, b], out) }

    /// In place `x *= alpha`.
    SCALE = 5, "scale", Scale {
        /// Updated in place.
        x: Buffer,
        /// Elements.
        n: Dim,
        /// Factor.
        alpha: Scalar,
    } => |io| {
        io.update(x, elems(product(n, 1)?)?)
    }

    /// In place `y += alpha * x`.
    AXPY = 6, "axpy", Axpy {
        /// Input.
        x: Buffer,
        /// Updated in place.
        y: Buffer,
        /// Elements.
        n: Dim,
        /// Factor.
        alpha: Scalar,
    } => |io| {
        let r = elems(product(n, 1)?)?;
        io.read(x, r.clone())?;
        io.update(y, r)
    }

    /// `out = max(x, 0)`.
    RELU = 7, "relu", Relu {
        /// Input.
        x: Buffer,
        /// Output.
        out: Buffer,
        /// Elements.
        n: Dim,
    } => |io| { io.elementwise(n, &[x], out) }

    /// `grad_in = grad_out * (x > 0)`.
    RELU_BACKWARD = 8, "relu_backward", ReluBackward {
        /// Forward input.
        x: Buffer,
        /// Gradient of the output.
        grad_out: Buffer,
        /// Gradient of the input (output).
        grad_in: Buffer,
        /// Elements.
        n: Dim,
    } => |io| { io.elementwise(n, &[x, grad_out], grad_in) }

    /// `out = gelu(x)` (tanh approximation).
    GELU = 9, "gelu", Gelu {
        /// Input.
        x: Buffer,
        /// Output.
        out: Buffer,
        /// Elements.
        n: Dim,
    } => |io| { io.elementwise(n, &[x], out) }

    /// `grad_in = grad_out * gelu'(x)`.
    GELU_BACKWARD = 10, "gelu_backward", GeluBackward {
        /// Forward input.
        x: Buffer,
        /// Gradient of the output.
        grad_out: Buffer,
        /// Gradient of the input (output).
        grad_in: Buffer,
        /// Elements.
        n: Dim,
    } => |io| { io.elementwise(n, &[x, grad_out], grad_in) }

    /// Row-wise softmax of `x` (`rows×cols`) into `out`.
    SOFTMAX = 11, "softmax", Softmax {
        /// Input.
        x: Buffer,
        /// Output.
        out: Buffer,
        /// Rows.
        rows: Dim,
        /// Columns.
        cols: Dim,
    } => |io| {
        let n = product(rows, cols)?;
        require_shape(cols <= MAX_ROW)?;
        io.elementwise(n, &[x], out)
    }

    /// Mean cross-entropy of the row-wise softmax of `logits` against `labels` (u32, one
    /// per row) into `loss[0]`, and `grad = (softmax - onehot) / rows`.
    CROSS_ENTROPY = 12, "cross_entropy", CrossEntropy {
        /// Input `rows×cols`.
        logits: Buffer,
        /// `rows` u32 class indices.
        labels: Buffer,
        /// Output `rows×cols`.
        grad: Buffer,
        /// Output: one element, the mean loss.
        loss: Buffer,
        /// Rows (samples).
        rows: Dim,
        /// Columns (classes).
        cols: Dim,
    } => |io| {
        let r = elems(product(rows, cols)?)?;
        // Labels are u32, so this also lets every class be named.
        require_shape(cols <= MAX_ROW && rows <= MAX_ROW)?;
        io.read(logits, r.clone())?;
        io.read_indices(labels, rows, cols, "cross-entropy label beyond the classes")?;
        io.write(grad, r)?;
        io.write(loss, elems(1)?)
    }

    /// `out[r] = Σ_c x[r][c]`.
    SUM_ROWS = 13, "sum_rows", SumRows {
        /// Input `rows×cols`.
        x: Buffer,
        /// Output of `rows`.
        out: Buffer,
        /// Rows.
        rows: Dim,
        /// Columns.
        cols: Dim,
    } => |io| {
        require_shape(cols <= MAX_ROW)?;
        io.read(x, elems(product(rows, cols)?)?)?;
        io.write(out, elems(rows)?)
    }

    /// `out[c] = Σ_r x[r][c]`.
    SUM_COLS = 14, "sum_cols", SumCols {
        /// Input `rows×cols`.
        x: Buffer,
        /// Output of `cols`.
        out: Buffer,
        /// Rows.
        rows: Dim,
        /// Columns.
        cols: Dim,
    } => |io| {
        require_shape(rows <= MAX_ROW)?;
        io.read(x, elems(product(rows, cols)?)?)?;
        io.write(out, elems(cols)?)
    }

    /// In place `param -= lr * grad`.
    SGD = 15, "sgd", Sgd {
        /// Updated in place.
        param: Buffer,
        /// Gradient.
        grad: Buffer,
        /// Elements.
        n: Dim,
        /// Learning rate.
        lr: Scalar,
    } => |io| {
        let r = elems(product(n, 1)?)?;
        io.update(param, r.clone())?;
        io.read(grad, r)
    }

    /// Adam update in place of `param`, `m`, `v`; `step` (from 1) drives bias correction;
    /// betas in `[0, 1)`, `eps > 0`.
    ADAM = 16, "adam", Adam {
        /// Updated in place.
        param: Buffer,
        /// Gradient.
        grad: Buffer,
        /// First moment, updated in place.
        m: Buffer,
        /// Second moment, updated in place.
        v: Buffer,
        /// Elements.
        n: Dim,
        /// Learning rate.
        lr: Scalar,
        /// First moment decay.
        beta1: Scalar,
        /// Second moment decay.
        beta2: Scalar,
        /// Denominator term.
        eps: Scalar,
        /// Step number, from 1.
        step: Word,
    } => |io| {
        let r = elems(product(n, 1)?)?;
        let decay = 0.0..1.0;
        require(decay.contains(&beta1) && decay.contains(&beta2) && eps > 0.0 && step > 0)?;
        io.update(param, r.clone())?;
        io.read(grad, r.clone())?;
        io.update(m, r.clone())?;
        io.update(v, r)
    }

    /// `out[i] = table[ids[i]]` (`dim` wide): f32 rows picked by u32 ids `< vocab`.
    EMBEDDING = 17, "embedding", Embedding {
        /// `vocab×dim` table.
        table: Buffer,
        /// `count` u32 ids.
        ids: Buffer,
        /// Output `count×dim`.
        out: Buffer,
        /// Ids to look up.
        count: Dim,
        /// Row width.
        dim: Dim,
        /// Rows of the table.
        vocab: Dim,
    } => |io| {
        let (out_elems, table_elems) = (product(count, dim)?, product(vocab, dim)?);
        io.read(table, elems(table_elems)?)?;
        io.read_indices(ids, count, vocab, "embedding id beyond the vocabulary")?;
        io.write(out, elems(out_elems)?)
    }

    /// Row-wise layer norm: `(x - mean) / √(var + eps) · gamma + beta`; `eps > 0`.
    LAYER_NORM = 18, "layer_norm", LayerNorm {
        /// Input `rows×cols`.
        x: Buffer,
        /// Scale, `cols`.
        gamma: Buffer,
        /// Shift, `cols`.
        beta: Buffer,
        /// Output `rows×cols`.
        out: Buffer,
        /// Rows.
        rows: Dim,
        /// Columns.
        cols: Dim,
        /// Variance term.
        eps: Scalar,
    } => |io| {
        let r = elems(product(rows, cols)?)?;
        require(eps > 0.0)?;
        require_shape(cols <= MAX_ROW)?;
        io.read(x, r.clone())?;
        io.read(gamma, elems(cols)?)?;
        io.read(beta, elems(cols)?)?;
        io.write(out, r)
    }

    /// Copies `n` elements from `src` (from element `src_offset`) into another buffer
    /// `dst` (from element `dst_offset`).
    COPY = 19, "copy", Copy {
        /// Source.
        src: Buffer,
        /// First source element.
        src_offset: Offset,
        /// Destination.
        dst: Buffer,
        /// First destination element.
        dst_offset: Offset,
        /// Elements.
        n: Dim,
    } => |io| {
        let n = product(n, 1)?;
        io.read(src, elems_at(src_offset, n)?)?;
        io.write(dst, elems_at(dst_offset, n)?)
    }

    /// Counter-based random fill: element `i` depends only on `(seed, counter + i)`;
    /// `scale >= 0` is the uniform half-width or the normal standard deviation.
    RNG_FILL = 20, "rng_fill", RngFill {
        /// Output.
        out: Buffer,
        /// Elements.
        n: Dim,
        /// Stream seed.
        seed: Word,
        /// Counter of element 0 (wraps).
        counter: Word,
        /// Distribution.
        distribution: Distribution,
        /// Half-width or standard deviation.
        scale: Scalar,
    } => |io| {
        let r = elems(product(n, 1)?)?;
        require(scale >= 0.0)?;
        io.write(out, r)
    }

    /// One decode step of attention: for each head, `out = softmax(q·Kᵀ/√head_dim)·V` over
    /// the first `len` cached positions; caches are `[positions × heads × head_dim]`.
    ATTENTION_DECODE = 21, "attention_decode", AttentionDecode {
        /// Queries `heads×head_dim`.
        q: Buffer,
        /// Keys.
        k_cache: Buffer,
        /// Values.
        v_cache: Buffer,
        /// Output `heads×head_dim`.
        out: Buffer,
        /// Heads.
        heads: Dim,
        /// Width of one head.
        head_dim: Dim,
        /// Cached positions attended to.
        len: Dim,
    } => |io| {
        let (row, cache) = (product(heads, head_dim)?, product3(len, heads, head_dim)?);
        require_shape(len <= MAX_POSITIONS && head_dim <= MAX_HEAD_DIM)?;
        // As ATTENTION's one query row: buffer sizes alone let a guest with a large
        // device ask for hours (thousands of heads over millions of positions).
        require_shape(attention_within_work(1, heads as u64, len as u64, head_dim as u64))?;
        io.read(q, elems(row)?)?;
        io.read(k_cache, elems(cache)?)?;
        io.read(v_cache, elems(cache)?)?;
        io.write(out, elems(row)?)
    }

    /// `out[r] = argmax_c x[r][c]` as u32 (the first maximum; a NaN counts as the maximum).
    ARGMAX = 22, "argmax", Argmax {
        /// Input `rows×cols`.
        x: Buffer,
        /// Output: `rows` u32.
        out: Buffer,
        /// Rows.
        rows: Dim,
        /// Columns.
        cols: Dim,
    } => |io| {
        let r = elems(product(rows, cols)?)?;
        // (Indices are u32: MAX_ROW is far below their bound.)
        require_shape(cols <= MAX_ROW)?;
        io.read(x, r)?;
        io.write(out, elems(rows)?)
    }

    /// `out[m×n] = x[m×k]·Wᵀ` for weights `w` of `n` rows of `k` elements in `dtype` (a
    /// GGUF weight matrix as stored: `k` a whole number of blocks). With `m = 1` a
    /// matrix–vector product (decoding), else one row per token (a prompt). Also the
    /// tied output projection, with the token embedding table as `w`. For the block
    /// formats each row of `x` is first rounded to 16-bit integers with one scale per 32
    /// elements (`max|x| / 32767`), so that a block's products are exact integers; f32 and
    /// f16 weights take `x` as it is.
    QMATMUL = 23, "qmatmul", QMatmul {
        /// Weights, `n` rows of `k` elements in `dtype`.
        w: Buffer,
        /// Input `m×k` (f32).
        x: Buffer,
        /// Output `m×n` (f32).
        out: Buffer,
        /// Output features (rows of `w`).
        n: Dim,
        /// Input features (columns of `w`).
        k: Dim,
        /// Rows of `x`.
        m: Dim,
        /// Format of `w`.
        dtype: DType,
    } => |io| {
        let (mk, mn) = (product(m, k)?, product(m, n)?);
        // A backend prepares rows of `x` (16-bit integers and scales) in host scratch.
        require_shape(k <= MAX_ROW)?;
        require_work(&[m as u64, n as u64, k as u64])?;
        io.read(w, blocks(dtype, n, k)?)?;
        io.read(x, elems(mk)?)?;
        io.write(out, elems(mn)?)
    }

    /// `out[i] = table[ids[i]]` dequantized to f32 (`dim` wide): rows of a `vocab×dim`
    /// table in `dtype` picked by u32 ids `< vocab` (a GGUF token embedding).
    QEMBEDDING = 24, "qembedding", QEmbedding {
        /// Table, `vocab` rows of `dim` elements in `dtype`.
        table: Buffer,
        /// `count` u32 ids.
        ids: Buffer,
        /// Output `count×dim` (f32).
        out: Buffer,
        /// Ids to look up.
        count: Dim,
        /// Row width.
        dim: Dim,
        /// Rows of the table.
        vocab: Dim,
        /// Format of the table.
        dtype: DType,
    } => |io| {
        let out_elems = product(count, dim)?;
        io.read(table, blocks(dtype, vocab, dim)?)?;
        io.read_indices(ids, count, vocab, "embedding id beyond the vocabulary")?;
        io.write(out, elems(out_elems)?)
    }

    /// Row-wise RMS norm: `out = x / √(mean(x²) + eps) · weight`; `eps > 0`.
    RMS_NORM = 25, "rms_norm", RmsNorm {
        /// Input `rows×cols`.
        x: Buffer,
        /// Scale, `cols`.
        weight: Buffer,
        /// Output `rows×cols`.
        out: Buffer,
        /// Rows.
        rows: Dim,
        /// Columns.
        cols: Dim,
        /// Mean-square term.
        eps: Scalar,
    } => |io| {
        let r = elems(product(rows, cols)?)?;
        require(eps > 0.0)?;
        require_shape(cols <= MAX_ROW)?;
        io.read(x, r.clone())?;
        io.read(weight, elems(cols)?)?;
        io.write(out, r)
    }

    /// In place rotary position embedding of `x` (`rows × heads × head_dim`), row `r` at
    /// position `pos + r`: each pair of a head (chosen by `style`) at pair index `i` is
    /// rotated by `(pos + r) · base^(-2i/head_dim) / factors[i]`. `head_dim` even,
    /// `base > 1`. Factors are data, not checked: one that is not a positive finite
    /// number gives what IEEE arithmetic gives (NaN, or no rotation), never an error.
    ROPE = 26, "rope", Rope {
        /// Queries or keys, updated in place.
        x: Buffer,
        /// `head_dim / 2` f32 divisors of the pairs' frequencies: ones for plain rope,
        /// a GGUF's `rope_freqs.weight` for Llama 3.1 and later.
        factors: Buffer,
        /// Rows (consecutive positions).
        rows: Dim,
        /// Heads per row.
        heads: Dim,
        /// Width of one head.
        head_dim: Dim,
        /// Position of row 0.
        pos: Position,
        /// Frequency base (10000 in the original, `rope.freq_base` in GGUF).
        base: Scalar,
        /// Which elements pair up.
        style: RopeStyle,
    } => |io| {
        let n = product3(rows, heads, head_dim)?;
        require_shape(head_dim % 2 == 0 && head_dim <= MAX_HEAD_DIM)?;
        require(base > 1.0 && pos.checked_add(rows).is_some())?;
        io.update(x, elems(n)?)?;
        io.read(factors, elems(head_dim / 2)?)
    }

    /// `out = silu(gate) · up` elementwise, `silu(g) = g / (1 + e^-g)` (the llama MLP).
    SWIGLU = 27, "swiglu", Swiglu {
        /// Gate projection.
        gate: Buffer,
        /// Up projection.
        up: Buffer,
        /// Output.
        out: Buffer,
        /// Elements.
        n: Dim,
    } => |io| { io.elementwise(n, &[gate, up], out) }

    /// Causal grouped-query attention over a KV cache: query row `r` (position
    /// `pos + r`) of head `h` attends to cached positions `0..=pos + r` of KV head
    /// `h / (heads / kv_heads)`: `out = softmax(q·Kᵀ/√head_dim)·V`. Queries and output
    /// are `rows × heads × head_dim`; caches `[positions × kv_heads × head_dim]` holding
    /// at least `pos + rows` positions. `heads` a multiple of `kv_heads`.
    ATTENTION = 28, "attention", Attention {
        /// Queries.
        q: Buffer,
        /// Keys.
        k_cache: Buffer,
        /// Values.
        v_cache: Buffer,
        /// Output.
        out: Buffer,
        /// Query rows (consecutive positions).
        rows: Dim,
        /// Query heads.
        heads: Dim,
        /// Key/value heads.
        kv_heads: Dim,
        /// Width of one head.
        head_dim: Dim,
        /// Position of query row 0.
        pos: Position,
    } => |io| {
        let qn = product3(rows, heads, head_dim)?;
        let positions = pos.checked_add(rows).ok_or(status::BAD_SHAPE)?;
        let cache = product3(positions, kv_heads, head_dim)?;
        require_shape(heads % kv_heads == 0 && positions <= MAX_POSITIONS)?;
        require_shape(attention_within_work(
            rows as u64,
            heads as u64,
            positions as u64,
            head_dim as u64,
        ))?;
        io.read(q, elems(qn)?)?;
        io.read(k_cache, elems(cache)?)?;
        io.read(v_cache, elems(cache)?)?;
        io.write(out, elems(qn)?)
    }
}

#[cfg(test)]
mod tests;
