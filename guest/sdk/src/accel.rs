//! The virtual accelerator: a small tensor API over the command ring of
//! [`abi::accel`](ferry_abi::accel).
//!
//! ```ignore
//! let mut acc = Accel::open()?;
//! let mut x = acc.alloc::<f32>(64, 32)?;
//! let mut w = acc.alloc::<f32>(32, 10)?;
//! let mut y = acc.alloc::<f32>(64, 10)?;
//! acc.rng_fill(&mut x, 1, 0, Distribution::Normal(1.0));
//! acc.rng_fill(&mut w, 2, 0, Distribution::Normal(0.2));
//! acc.matmul(&x, &w, &mut y, Transpose::None);
//! let mut host = [0.0f32; 640];
//! acc.download(&y, &mut host)?; // waits, and reports any earlier device error
//! ```
//!
//! # Model
//!
//! - A [`Tensor`] is a handle: a device buffer id and a `rows × cols` shape of `f32`
//!   (`Tensor<u32>`, alias [`U32Tensor`], holds ids and labels). It is not `Clone`, and
//!   kernels take their outputs as `&mut`, so the borrow checker keeps an output from
//!   aliasing an input (the device allows that only for the in-place kernels, which take
//!   a single `&mut`).
//! - Kernel methods only *queue* a command and return at once; the device runs the ring
//!   in order, asynchronously to the guest. Commands are handed to the device (`head`
//!   advanced, and the doorbell rung, a VM exit, if the device may have run out of work)
//!   in batches of [`SUBMIT_BATCH`], and by [`Accel::flush`], [`Accel::fence`],
//!   [`Accel::sync`] and the transfers.
//! - [`Accel::upload`], [`Accel::download`] and [`Accel::sync`] wait until the device has
//!   completed everything submitted so far (a guest buffer must stay valid until the
//!   device has copied it), and then report the first command that failed, if any.
//!
//! # Errors
//!
//! - **Shape mistakes panic in the guest, before submission**: mismatched inner
//!   dimensions of a matmul, elementwise operands of different sizes, a copy range past a
//!   buffer, zero dimensions, and so on. They are programming errors; the message names
//!   the operation and the shapes.
//! - **Resource errors are returned** by [`Accel::alloc`]: no free buffer id, or more
//!   bytes than the device's capacity (as counted by this SDK).
//! - **Device errors are returned later**: the device writes a status into each command's
//!   slot. The SDK inspects every status before it reuses a slot and when it syncs, keeps
//!   the first failure (its command index, opcode, kernel and status), and returns it from
//!   every later [`Accel::sync`], [`Accel::upload`] and [`Accel::download`]: results
//!   computed after a failed command cannot be trusted.

use crate::abi::accel::dtype::DType;
pub use crate::abi::accel::kernel::RopeStyle;
use crate::abi::accel::kernel::{self, Kernel, MatmulFlags};
use crate::abi::accel::{
    device_status, op, status, Command, RingHeader, ACCEL_ABI_VERSION, COMMAND_ARGS, MAX_BUFFERS,
    RING_MAGIC, RING_REGION_SIZE, RING_SLOTS,
};
use crate::abi::file::MAX_READ;
use crate::abi::{port, PAGE_SIZE};
use crate::files::File;
use crate::rt;
use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::arch::asm;
use core::fmt::{self, Write as _};
use core::marker::PhantomData;
use core::sync::atomic::{fence, AtomicBool, AtomicU32, AtomicU64, Ordering};

/// An element type a device buffer can hold: `f32` or `u32` (both 4 bytes).
pub trait Element: Copy + Default + sealed::Sealed {
    /// Name used in messages.
    const NAME: &'static str;
}

impl Element for f32 {
    const NAME: &'static str = "f32";
}

impl Element for u32 {
    const NAME: &'static str = "u32";
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for u32 {}
}

/// A device buffer of `rows × cols` elements of `T`, row major.
///
/// Freed only by [`Accel::free`]; dropping the handle leaks the buffer until the VM ends.
#[derive(Debug, PartialEq, Eq)]
pub struct Tensor<T: Element = f32> {
    id: u32,
    rows: usize,
    cols: usize,
    /// Elements allocated (at least `rows × cols`).
    allocated: usize,
    elem: PhantomData<T>,
}

/// A device buffer of `u32` (token ids, labels, argmax results).
pub type U32Tensor = Tensor<u32>;

/// A download queued by [`Accel::download_later`]: the memory the device writes into,
/// until [`Accel::collect`] hands it over. Dropped uncollected, the memory is leaked,
/// never freed, as the device may still write into it.
pub struct Pending<T: Element> {
    /// The FENCE after the download.
    fence: u64,
    data: core::mem::ManuallyDrop<Box<[T]>>,
}

/// Device weights in a block format: `rows` rows of `cols` elements in `dtype`, as a GGUF
/// file stores a weight matrix (`cols` is the tensor's first dimension).
///
/// Freed only by [`Accel::free_weights`].
#[derive(Debug, PartialEq, Eq)]
pub struct Weights {
    id: u32,
    rows: usize,
    cols: usize,
    dtype: DType,
    bytes: u64,
}

impl Weights {
    /// Rows (output features of a matrix, tokens of an embedding table).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Elements per row.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The element format.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Bytes of the data.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl<T: Element> Tensor<T> {
    /// The device buffer id.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Number of columns.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.rows * self.cols
    }

    /// Always false: a tensor has at least one element.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Bytes of the buffer.
    pub fn bytes(&self) -> u64 {
        self.len() as u64 * 4
    }

    /// The same buffer seen as `rows × cols` (the element count must not change).
    #[track_caller]
    pub fn reshape(self, rows: usize, cols: usize) -> Self {
        check(
            rows.checked_mul(cols) == Some(self.len()),
            "reshape",
            format_args!("{} cannot be seen as {rows}×{cols}", shape(&self)),
        );
        Self { rows, cols, ..self }
    }

    /// Uses the first `rows` rows of the buffer (at most as many as it was allocated
    /// with): one buffer for batches of varying size.
    #[track_caller]
    pub fn set_rows(&mut self, rows: usize) {
        check(
            rows > 0
                && rows
                    .checked_mul(self.cols)
                    .is_some_and(|n| n <= self.allocated),
            "set_rows",
            format_args!(
                "{rows} rows of {} (allocated {} elements)",
                shape(self),
                self.allocated
            ),
        );
        self.rows = rows;
    }
}

/// Which MATMUL operands are stored transposed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transpose {
    /// `c = a · b`.
    None,
    /// `c = aᵀ · b` (`a` stored `k×m`).
    A,
    /// `c = a · bᵀ` (`b` stored `n×k`).
    B,
    /// `c = aᵀ · bᵀ`.
    Both,
}

impl Transpose {
    fn a(self) -> bool {
        matches!(self, Transpose::A | Transpose::Both)
    }

    fn b(self) -> bool {
        matches!(self, Transpose::B | Transpose::Both)
    }
}

/// What [`Accel::rng_fill`] draws from.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Distribution {
    /// Uniform in `[-scale, scale)`.
    Uniform(f32),
    /// Normal with mean 0 and this standard deviation.
    Normal(f32),
}

/// Adam hyper-parameters for [`Accel::adam`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Adam {
    /// Learning rate.
    pub lr: f32,
    /// Decay of the first moment.
    pub beta1: f32,
    /// Decay of the second moment.
    pub beta2: f32,
    /// Added to the root of the second moment.
    pub eps: f32,
}

impl Adam {
    /// The usual defaults (β1 0.9, β2 0.999, ε 1e-8) with learning rate `lr`.
    pub fn new(lr: f32) -> Self {
        Self {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        }
    }
}

/// A command the device completed with an error status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CommandFailure {
    /// Index of the command since the ring was created (0 = the first command).
    pub index: u64,
    /// Its [`op`] code.
    pub opcode: u32,
    /// Its kernel id, for a LAUNCH.
    pub kernel: Option<u64>,
    /// The [`status`] code the device wrote.
    pub status: u32,
}

/// Why the accelerator could not be used or a command failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AccelError {
    /// The boot info has no accelerator ring.
    NoAccelerator,
    /// [`Accel::open`] was already called in this guest.
    AlreadyOpen,
    /// The ring header is not what this SDK speaks; the text says why.
    BadRing(String),
    /// The device stopped serving the ring ([`device_status::RING_INVALID`]).
    RingInvalid {
        /// Commands the SDK has submitted.
        head: u64,
        /// Commands the device has completed.
        tail: u64,
    },
    /// All [`MAX_BUFFERS`] buffer ids are in use.
    OutOfIds,
    /// An allocation would exceed the device memory capacity.
    OutOfMemory {
        /// Bytes asked for.
        requested: u64,
        /// Bytes allocated through this SDK already.
        allocated: u64,
        /// The device's capacity in bytes.
        capacity: u64,
    },
    /// The first command the device failed.
    Command(CommandFailure),
}

impl fmt::Display for AccelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AccelError::NoAccelerator => {
                f.write_str("this VM has no accelerator (start it with --accel-memory)")
            }
            AccelError::AlreadyOpen => f.write_str("the accelerator is already open"),
            AccelError::BadRing(why) => write!(f, "unusable accelerator ring: {why}"),
            AccelError::RingInvalid { head, tail } => write!(
                f,
                "the device reports the ring invalid (head {head}, tail {tail})"
            ),
            AccelError::OutOfIds => write!(f, "all {MAX_BUFFERS} accelerator buffer ids in use"),
            AccelError::OutOfMemory {
                requested,
                allocated,
                capacity,
            } => write!(
                f,
                "out of accelerator memory: {requested} more bytes requested, {allocated} of \
                 {capacity} allocated (raise --accel-memory)"
            ),
            AccelError::Command(c) => {
                write!(f, "command {} ({}", c.index, op_name(c.opcode))?;
                if let Some(k) = c.kernel {
                    write!(f, " {}", kernel_name(k))?;
                }
                write!(
                    f,
                    ") failed: {} (status {})",
                    status::name(c.status),
                    c.status
                )
            }
        }
    }
}

/// Name of an [`op`] code, for messages.
pub fn op_name(opcode: u32) -> &'static str {
    match opcode {
        op::ALLOC => "alloc",
        op::FREE => "free",
        op::UPLOAD => "upload",
        op::DOWNLOAD => "download",
        op::LAUNCH => "launch",
        op::FENCE => "fence",
        op::LOAD_FILE => "load_file",
        _ => "unknown opcode",
    }
}

/// Name of a [`kernel`] id, for messages.
pub fn kernel_name(id: u64) -> &'static str {
    kernel::name(id).unwrap_or("unknown kernel")
}

/// Commands written before [`Accel::flush`] publishes them: the device waits at most for
/// the guest to write 64, a few microseconds. A busy device is not rung (see `flush`);
/// when every batch rang, 64 rather than 16 took a SmolLM2 token's doorbells from 35 to
/// 11 and gave 2–19% more tokens/s.
pub const SUBMIT_BATCH: u64 = 64;

/// Fences whose place in the ring [`Accel::wait_fence`] remembers, to wait for that
/// place rather than for the device to be idle.
const FENCES_KEPT: usize = 16;

/// Commands a guest with a full ring waits to have completed before it writes more: half
/// the ring, one wait (a VM exit) per 128 commands rather than one each; the device still
/// has the other half to run meanwhile.
const ROOM_WANTED: u64 = RING_SLOTS / 2;

/// Set by the first [`Accel::open`]: the ring has a single producer.
static OPENED: AtomicBool = AtomicBool::new(false);

/// The guest's side of the accelerator: the ring producer, buffer ids, error tracking.
pub struct Accel {
    /// The header fields the guest and the device share.
    head: &'static AtomicU64,
    tail: &'static AtomicU64,
    completed_fence: &'static AtomicU64,
    device_status: &'static AtomicU32,
    /// The first of the [`RING_SLOTS`] command slots.
    slots: *mut Command,
    /// The device memory capacity in bytes (fixed for the VM's life).
    capacity: u64,
    /// Commands written into the ring.
    submitted: u64,
    /// Commands published to the device: the `head` we stored last.
    published: u64,
    /// Commands whose status has been inspected.
    checked: u64,
    /// The last FENCE value submitted.
    fence: u64,
    /// `ends[v % FENCES_KEPT]`: the `tail` once FENCE `v` has completed, for the last
    /// [`FENCES_KEPT`] fences.
    fence_ends: [u64; FENCES_KEPT],
    /// The first failed command seen.
    failure: Option<CommandFailure>,
    /// Freed buffer ids, reused before new ones.
    free_ids: Vec<u32>,
    /// The next never-used buffer id.
    next_id: u32,
    /// Bytes allocated through this handle.
    allocated: u64,
}

/// Kernel methods whose operands all have the same number of elements `n`: the inputs,
/// then the output (the kernel's argument names).
macro_rules! elementwise {
    ($(
        $(#[doc = $doc:literal])*
        fn $method:ident($($input:ident),+ => $output:ident) = $Variant:ident;
    )+) => {$(
        $(#[doc = $doc])*
        #[track_caller]
        pub fn $method(&mut self, $($input: &Tensor,)+ $output: &mut Tensor) {
            same_len(stringify!($method), &[$($input,)+ $output]);
            self.launch(Kernel::$Variant {
                $($input: $input.id,)+
                $output: $output.id,
                n: $output.len(),
            });
        }
    )+};
}

impl fmt::Debug for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Accel")
            .field("capacity", &self.capacity)
            .field("allocated", &self.allocated)
            .field("submitted", &self.submitted)
            .field("failure", &self.failure)
            .finish_non_exhaustive()
    }
}

impl Accel {
    /// Opens the accelerator ring named by the boot info; fails if the VM has none, the
    /// ring is not one this SDK speaks, or it was opened already.
    pub fn open() -> Result<Accel, AccelError> {
        let info = rt::boot_info();
        let addr = info.accel_ring;
        if addr == 0 {
            return Err(AccelError::NoAccelerator);
        }
        if addr % PAGE_SIZE != 0
            || addr
                .checked_add(RING_REGION_SIZE)
                .is_none_or(|end| end > info.ram_size)
        {
            return Err(AccelError::BadRing(format!(
                "ring at {addr:#x} is not a page-aligned range of guest RAM ({:#x} bytes)",
                info.ram_size
            )));
        }
        if OPENED.swap(true, Ordering::AcqRel) {
            return Err(AccelError::AlreadyOpen);
        }
        let header = addr as *mut RingHeader;
        // SAFETY: guest RAM is identity mapped and the VMM placed a ring region of
        // RING_REGION_SIZE bytes at this page-aligned address (checked to lie in RAM);
        // the ring header is written by the VMM before we start, so these reads race
        // with nothing.
        let (magic, version, slots, capacity) = unsafe {
            (
                (&raw const (*header).magic).read_volatile(),
                (&raw const (*header).version).read_volatile(),
                (&raw const (*header).slots).read_volatile(),
                (&raw const (*header).capacity).read_volatile(),
            )
        };
        if magic != RING_MAGIC {
            return Err(AccelError::BadRing(format!(
                "magic is {magic:#010x}, expected {RING_MAGIC:#010x}"
            )));
        }
        if version != ACCEL_ABI_VERSION {
            return Err(AccelError::BadRing(format!(
                "version is {version}, this guest speaks {ACCEL_ABI_VERSION}"
            )));
        }
        if u64::from(slots) != RING_SLOTS {
            return Err(AccelError::BadRing(format!(
                "{slots} slots, expected {RING_SLOTS}"
            )));
        }
        // SAFETY: the fields lie in the header page (see above) and are naturally aligned
        // (the header is page aligned and `repr(C)`). The device accesses them
        // concurrently, so we only ever touch them atomically; only this handle (OPENED)
        // writes `head`.
        let (head, tail, completed_fence, device_status) = unsafe {
            (
                AtomicU64::from_ptr(&raw mut (*header).head),
                AtomicU64::from_ptr(&raw mut (*header).tail),
                AtomicU64::from_ptr(&raw mut (*header).completed_fence),
                AtomicU32::from_ptr(&raw mut (*header).device_status),
            )
        };
        let submitted = head.load(Ordering::Acquire);
        let acc = Accel {
            head,
            tail,
            completed_fence,
            device_status,
            // SAFETY: the slots follow the header page inside the ring region.
            slots: unsafe { header.cast::<u8>().add(PAGE_SIZE as usize).cast() },
            capacity,
            submitted,
            published: submitted,
            checked: tail.load(Ordering::Acquire).min(submitted),
            fence: completed_fence.load(Ordering::Acquire),
            fence_ends: [0; FENCES_KEPT],
            failure: None,
            free_ids: Vec::new(),
            next_id: 1,
            allocated: 0,
        };
        if acc.device_status.load(Ordering::Acquire) != device_status::OK {
            return Err(acc.ring_invalid());
        }
        Ok(acc)
    }

    /// Device memory capacity in bytes (the VM's `--accel-memory`).
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Bytes allocated through this handle and not freed.
    pub fn allocated(&self) -> u64 {
        self.allocated
    }

    /// Commands submitted so far.
    pub fn submitted(&self) -> u64 {
        self.submitted
    }

    // ---- buffers and transfers ------------------------------------------------------

    /// Allocates a zero-filled `rows × cols` buffer of `T`; a size too large to count is
    /// [`AccelError::OutOfMemory`] like any size past the capacity.
    ///
    /// # Panics
    /// If `rows` or `cols` is zero.
    #[track_caller]
    pub fn alloc<T: Element>(&mut self, rows: usize, cols: usize) -> Result<Tensor<T>, AccelError> {
        check(
            rows > 0 && cols > 0,
            "alloc",
            format_args!("bad shape {rows}×{cols}"),
        );
        // Saturated, a size past u64 is more than any device holds; one that fits the
        // capacity has `rows * cols` elements within usize.
        let bytes = (rows as u64).saturating_mul(cols as u64).saturating_mul(4);
        let id = self.alloc_bytes(bytes)?;
        Ok(Tensor {
            id,
            rows,
            cols,
            allocated: rows * cols,
            elem: PhantomData,
        })
    }

    /// Allocates a zero-filled buffer of `bytes` (a multiple of 4) and returns its id.
    fn alloc_bytes(&mut self, bytes: u64) -> Result<u32, AccelError> {
        if bytes > self.capacity - self.allocated.min(self.capacity) {
            return Err(AccelError::OutOfMemory {
                requested: bytes,
                allocated: self.allocated,
                capacity: self.capacity,
            });
        }
        let id = match self.free_ids.pop() {
            Some(id) => id,
            None if u64::from(self.next_id) <= MAX_BUFFERS => {
                self.next_id += 1;
                self.next_id - 1
            }
            None => return Err(AccelError::OutOfIds),
        };
        self.submit(op::ALLOC, &[u64::from(id), bytes]);
        self.allocated += bytes;
        Ok(id)
    }

    /// Releases a buffer; its id may be handed out again.
    pub fn free<T: Element>(&mut self, t: Tensor<T>) {
        self.release(t.id, t.allocated as u64 * 4);
    }

    fn release(&mut self, id: u32, bytes: u64) {
        self.submit(op::FREE, &[u64::from(id)]);
        self.allocated -= bytes;
        self.free_ids.push(id);
    }

    /// Allocates zero-filled weights of `rows` rows of `cols` elements in `dtype` (a GGUF
    /// tensor's shape: `cols` is its first dimension); a size too large to count is
    /// [`AccelError::OutOfMemory`] like any size past the capacity.
    ///
    /// # Panics
    /// If a dimension is zero, or `cols` is not a whole number of `dtype` blocks.
    #[track_caller]
    pub fn alloc_weights(
        &mut self,
        rows: usize,
        cols: usize,
        dtype: DType,
    ) -> Result<Weights, AccelError> {
        check(
            rows > 0 && cols > 0 && cols as u64 % dtype.block_elems() == 0,
            "alloc_weights",
            format_args!("bad shape {rows}×{cols} for {}", dtype.name()),
        );
        // Whole blocks: `None` is an overflow, more than any device holds.
        let bytes = dtype.bytes(rows as u64, cols as u64).unwrap_or(u64::MAX);
        // Buffers are whole 4-byte words.
        let words = bytes.checked_next_multiple_of(4).unwrap_or(u64::MAX);
        let id = self.alloc_bytes(words)?;
        Ok(Weights {
            id,
            rows,
            cols,
            dtype,
            bytes,
        })
    }

    /// Releases weights.
    pub fn free_weights(&mut self, w: Weights) {
        self.release(w.id, w.bytes.next_multiple_of(4));
    }

    /// Queues loading `w` whole from `file` at byte `offset` (a GGUF tensor's data), in
    /// commands of at most [`MAX_READ`] bytes. Errors come with the next sync.
    pub fn load_weights(&mut self, w: &mut Weights, file: &File, offset: u64) {
        self.load(w.id, 0, w.bytes, file, offset);
    }

    /// Queues loading all of `t`'s bytes from `file` at byte `offset` (f32 or u32 data in
    /// the file's byte order, little endian). Errors come with the next sync.
    pub fn load_file<T: Element>(&mut self, t: &mut Tensor<T>, file: &File, offset: u64) {
        self.load(t.id, 0, t.bytes(), file, offset);
    }

    /// Queues loading `len` bytes of `file` from byte `offset` into `t` from byte
    /// `at`. Errors come with the next sync.
    ///
    /// # Panics
    /// If the bytes do not fit in `t`.
    #[track_caller]
    pub fn load_file_at<T: Element>(
        &mut self,
        t: &mut Tensor<T>,
        at: u64,
        file: &File,
        offset: u64,
        len: u64,
    ) {
        check(
            at.checked_add(len).is_some_and(|end| end <= t.bytes()),
            "load_file_at",
            format_args!("bytes {at}..+{len} outside {}", shape(t)),
        );
        self.load(t.id, at, len, file, offset);
    }

    fn load(&mut self, id: u32, at: u64, len: u64, file: &File, offset: u64) {
        let mut done = 0;
        while done < len {
            let n = (len - done).min(MAX_READ);
            self.submit(
                op::LOAD_FILE,
                &[
                    u64::from(id),
                    at + done,
                    u64::from(file.index()),
                    offset.saturating_add(done),
                    n,
                ],
            );
            done += n;
        }
    }

    /// Copies `data` (exactly `t.len()` elements) into `t`, and waits until the device has
    /// done so; returns the first device error so far.
    #[track_caller]
    pub fn upload<T: Element>(&mut self, t: &mut Tensor<T>, data: &[T]) -> Result<(), AccelError> {
        check(
            data.len() == t.len(),
            "upload",
            format_args!("{} elements into {}", data.len(), shape(t)),
        );
        self.upload_at(t, 0, data)
    }

    /// Copies `data` into `t` from element `offset` on, and waits until the device has
    /// done so; returns the first device error so far.
    #[track_caller]
    pub fn upload_at<T: Element>(
        &mut self,
        t: &mut Tensor<T>,
        offset: usize,
        data: &[T],
    ) -> Result<(), AccelError> {
        check_range(t, offset, data.len(), "upload");
        self.transfer(op::UPLOAD, t.id, offset, data.as_ptr() as u64, data.len())
    }

    /// Copies `t` (exactly `out.len()` elements) into `out`, waiting for all work so far;
    /// returns the first device error so far.
    #[track_caller]
    pub fn download<T: Element>(&mut self, t: &Tensor<T>, out: &mut [T]) -> Result<(), AccelError> {
        check(
            out.len() == t.len(),
            "download",
            format_args!("{} into {} elements", shape(t), out.len()),
        );
        self.download_at(t, 0, out)
    }

    /// Copies `out.len()` elements of `t` from element `offset` on into `out`, waiting
    /// for all work so far; returns the first device error so far.
    #[track_caller]
    pub fn download_at<T: Element>(
        &mut self,
        t: &Tensor<T>,
        offset: usize,
        out: &mut [T],
    ) -> Result<(), AccelError> {
        check_range(t, offset, out.len(), "download");
        self.transfer(
            op::DOWNLOAD,
            t.id,
            offset,
            out.as_mut_ptr() as u64,
            out.len(),
        )
    }

    /// Queues a DOWNLOAD of `t` behind the work queued so far, into memory the returned
    /// [`Pending`] owns, and a FENCE after it: the work queued next runs meanwhile, and
    /// [`Accel::collect`] waits for the download alone (the device runs commands in order).
    #[track_caller]
    pub fn download_later<T: Element>(&mut self, t: &Tensor<T>) -> Pending<T> {
        let mut data = alloc::vec![T::default(); t.len()].into_boxed_slice();
        if !data.is_empty() {
            let (addr, bytes) = (data.as_mut_ptr() as u64, data.len() as u64 * 4);
            self.submit(op::DOWNLOAD, &[u64::from(t.id), 0, addr, bytes]);
        }
        let fence = self.fence();
        Pending {
            fence,
            data: core::mem::ManuallyDrop::new(data),
        }
    }

    /// The values of a [`Accel::download_later`], once the device has written them;
    /// the first device error so far.
    pub fn collect<T: Element>(&mut self, mut pending: Pending<T>) -> Result<Box<[T]>, AccelError> {
        self.wait_fence(pending.fence)?;
        // SAFETY: taken once, from a `Pending` consumed here: nothing uses it after.
        Ok(unsafe { core::mem::ManuallyDrop::take(&mut pending.data) })
    }

    /// Submits an UPLOAD or DOWNLOAD of `len` elements and waits for it: the guest
    /// memory at `addr` (identity mapped, so the pointer is the guest-physical address)
    /// is borrowed by the caller until we return.
    fn transfer(
        &mut self,
        opcode: u32,
        id: u32,
        offset: usize,
        addr: u64,
        len: usize,
    ) -> Result<(), AccelError> {
        if len > 0 {
            let (offset, bytes) = (offset as u64 * 4, len as u64 * 4);
            self.submit(opcode, &[u64::from(id), offset, addr, bytes]);
        }
        self.sync()
    }

    // ---- completion -----------------------------------------------------------------

    /// Submits a FENCE and returns its value, for [`Accel::wait_fence`].
    pub fn fence(&mut self) -> u64 {
        self.fence += 1;
        self.submit(op::FENCE, &[self.fence]);
        self.fence_ends[self.fence as usize % FENCES_KEPT] = self.submitted;
        self.flush();
        self.fence
    }

    /// Waits until the device has passed FENCE `value` (and so every command before it);
    /// returns the first device error so far.
    pub fn wait_fence(&mut self, value: u64) -> Result<(), AccelError> {
        // Where the fence lies in the ring, if it is one of the last few: the VMM then
        // lets us go as soon as it has run, not once the work queued after it has too.
        let until = (value <= self.fence && self.fence - value < FENCES_KEPT as u64)
            .then(|| self.fence_ends[value as usize % FENCES_KEPT]);
        while self.completed_fence.load(Ordering::Acquire) < value {
            self.wait_once(until)?;
        }
        self.check_completed();
        match self.failure {
            Some(f) => Err(AccelError::Command(f)),
            None => Ok(()),
        }
    }

    /// Waits until every command submitted so far has completed; returns the first
    /// device error so far (sticky: once a command failed, every later sync reports it).
    pub fn sync(&mut self) -> Result<(), AccelError> {
        let value = self.fence();
        self.wait_fence(value)
    }

    /// Sleeps in the VMM until the device is idle or its `tail` has reached `until`, for
    /// at most about a millisecond (ten with `until`).
    fn wait_once(&mut self, until: Option<u64>) -> Result<(), AccelError> {
        if self.device_status.load(Ordering::Acquire) != device_status::OK {
            return Err(self.ring_invalid());
        }
        // SAFETY: a 32-bit `out` to the ACCEL_WAIT port; no `nomem`, so the compiler also
        // assumes the device may have written memory meanwhile.
        unsafe {
            // The low 32 bits: a tail whose low bits are 0 waits for idleness, as none.
            asm!("out dx, eax", in("dx") port::ACCEL_WAIT, in("eax") until.unwrap_or(0) as u32,
                 options(nostack, preserves_flags));
        }
        Ok(())
    }

    fn ring_invalid(&self) -> AccelError {
        AccelError::RingInvalid {
            head: self.submitted,
            tail: self.tail.load(Ordering::Acquire),
        }
    }

    /// Inspects the status of every command the device has completed since the last
    /// call, keeping the first failure.
    fn check_completed(&mut self) {
        let tail = self.tail.load(Ordering::Acquire).min(self.submitted);
        while self.checked < tail {
            // SAFETY: the index is reduced modulo RING_SLOTS, so the slot lies in the
            // ring region; the device has completed it (`tail` passed it, read with
            // Acquire) and will not touch it again until we resubmit it.
            let slot = unsafe { self.slots.add((self.checked % RING_SLOTS) as usize) };
            // SAFETY: as above.
            let cmd_status = unsafe { (&raw const (*slot).status).read_volatile() };
            if cmd_status != status::OK && self.failure.is_none() {
                // SAFETY: as above.
                let (opcode, first_arg) = unsafe {
                    (
                        (&raw const (*slot).opcode).read_volatile(),
                        (&raw const (*slot).args[0]).read_volatile(),
                    )
                };
                self.failure = Some(CommandFailure {
                    index: self.checked,
                    opcode,
                    kernel: (opcode == op::LAUNCH).then_some(first_arg),
                    status: cmd_status,
                });
            }
            self.checked += 1;
        }
    }

    // ---- submission -----------------------------------------------------------------

    /// Writes one command into the next slot (waiting for room if the ring is full), and
    /// publishes the batch it ends ([`Accel::flush`]).
    ///
    /// # Panics
    /// If the device declares the ring invalid while we wait for room.
    fn submit(&mut self, opcode: u32, args: &[u64]) {
        assert!(args.len() <= COMMAND_ARGS, "accel: too many arguments");
        while self
            .submitted
            .saturating_sub(self.tail.load(Ordering::Acquire))
            >= RING_SLOTS
        {
            self.flush();
            let room = self.submitted - RING_SLOTS + ROOM_WANTED;
            if let Err(e) = self.wait_once(Some(room)) {
                panic!("accel: {e}");
            }
        }
        // The slot we are about to overwrite held command `submitted - RING_SLOTS`, which
        // `tail` has passed: read its status first.
        self.check_completed();
        let mut cmd = Command {
            opcode,
            status: status::PENDING,
            args: [0; COMMAND_ARGS],
        };
        cmd.args[..args.len()].copy_from_slice(args);
        // SAFETY: the slot index is reduced modulo RING_SLOTS, so it lies in the ring
        // region; the device has completed the command that used it last (checked above)
        // and does not read it before we advance `head`.
        unsafe {
            self.slots
                .add((self.submitted % RING_SLOTS) as usize)
                .write_volatile(cmd);
        }
        self.submitted += 1;
        if self.submitted - self.published >= SUBMIT_BATCH {
            self.flush();
        }
    }

    /// Publishes the commands written so far (advances `head` over them), ringing the
    /// doorbell if the device may have run out of work. Queued kernels are published in
    /// batches of [`SUBMIT_BATCH`], and [`Accel::fence`], [`Accel::sync`] and the
    /// transfers flush; call this to start the device on a shorter tail of work before
    /// doing something else for a while.
    pub fn flush(&mut self) {
        if self.published == self.submitted {
            return;
        }
        // Release: the commands (and any guest data an UPLOAD names) are visible before
        // the new head.
        self.head.store(self.submitted, Ordering::Release);
        let before = core::mem::replace(&mut self.published, self.submitted);
        // A device that has yet to complete what it had reads `head` again after that
        // (with a fence between its `tail` and that read, as here between our `head` and
        // `tail`): no doorbell, which is a VM exit, while it is busy.
        fence(Ordering::SeqCst);
        if self.tail.load(Ordering::Acquire) < before {
            return;
        }
        // SAFETY: a 32-bit `out` to the doorbell port; no `nomem`, so every store before
        // it is made before the device is told to look.
        unsafe {
            asm!("out dx, eax", in("dx") port::ACCEL_DOORBELL, in("eax") 0u32,
                 options(nostack, preserves_flags));
        }
    }

    fn launch(&mut self, kernel: Kernel) {
        self.submit(op::LAUNCH, &kernel.encode());
    }

    // ---- kernels (queued; see the module docs for errors) ---------------------------

    /// `c = op(a) · op(b)`, with `op` transposing the operands `t` names.
    #[track_caller]
    pub fn matmul(&mut self, a: &Tensor, b: &Tensor, c: &mut Tensor, t: Transpose) {
        self.matmul_flags(a, b, c, t, false);
    }

    /// `c += op(a) · op(b)`.
    #[track_caller]
    pub fn matmul_accumulate(&mut self, a: &Tensor, b: &Tensor, c: &mut Tensor, t: Transpose) {
        self.matmul_flags(a, b, c, t, true);
    }

    #[track_caller]
    fn matmul_flags(
        &mut self,
        a: &Tensor,
        b: &Tensor,
        c: &mut Tensor,
        t: Transpose,
        accumulate: bool,
    ) {
        let (m, ka) = if t.a() {
            (a.cols, a.rows)
        } else {
            (a.rows, a.cols)
        };
        let (kb, n) = if t.b() {
            (b.cols, b.rows)
        } else {
            (b.rows, b.cols)
        };
        check(
            ka == kb && c.rows == m && c.cols == n,
            "matmul",
            format_args!(
                "a {} and b {} (transpose {t:?}) give {m}×{ka} · {kb}×{n}, into c {}",
                shape(a),
                shape(b),
                shape(c)
            ),
        );
        self.launch(Kernel::Matmul {
            a: a.id,
            b: b.id,
            c: c.id,
            m,
            n,
            k: ka,
            flags: MatmulFlags {
                transpose_a: t.a(),
                transpose_b: t.b(),
                accumulate,
            },
        });
    }

    /// In place `x[r][c] += bias[c]`.
    #[track_caller]
    pub fn add_bias(&mut self, x: &mut Tensor, bias: &Tensor) {
        per_column("add_bias", "bias", bias, x);
        self.launch(Kernel::AddBias {
            x: x.id,
            bias: bias.id,
            rows: x.rows,
            cols: x.cols,
        });
    }

    elementwise! {
        /// `out = a + b` (elementwise).
        fn add(a, b => out) = Add;
        /// `out = a * b` (elementwise).
        fn mul(a, b => out) = Mul;
    }

    /// In place `x *= alpha`.
    pub fn scale(&mut self, x: &mut Tensor, alpha: f32) {
        self.launch(Kernel::Scale {
            x: x.id,
            n: x.len(),
            alpha,
        });
    }

    /// In place `y += alpha * x`.
    #[track_caller]
    pub fn axpy(&mut self, alpha: f32, x: &Tensor, y: &mut Tensor) {
        same_len("axpy", &[x, y]);
        self.launch(Kernel::Axpy {
            x: x.id,
            y: y.id,
            n: x.len(),
            alpha,
        });
    }

    elementwise! {
        /// `out = max(x, 0)`.
        fn relu(x => out) = Relu;
        /// `grad_in = grad_out * (x > 0)`.
        fn relu_backward(x, grad_out => grad_in) = ReluBackward;
        /// `out = gelu(x)` (tanh approximation).
        fn gelu(x => out) = Gelu;
        /// `grad_in = grad_out * gelu'(x)`.
        fn gelu_backward(x, grad_out => grad_in) = GeluBackward;
    }

    /// Row-wise softmax of `x` into `out` (same shape).
    #[track_caller]
    pub fn softmax(&mut self, x: &Tensor, out: &mut Tensor) {
        same_shape("softmax", x, out);
        self.launch(Kernel::Softmax {
            x: x.id,
            out: out.id,
            rows: x.rows,
            cols: x.cols,
        });
    }

    /// Mean cross-entropy of the row-wise softmax of `logits` against `labels` (one per
    /// row) into `loss[0]`, and its gradient `(softmax - onehot) / rows` into `grad`.
    #[track_caller]
    pub fn cross_entropy(
        &mut self,
        logits: &Tensor,
        labels: &U32Tensor,
        grad: &mut Tensor,
        loss: &mut Tensor,
    ) {
        same_shape("cross_entropy", logits, grad);
        check(
            labels.len() == logits.rows,
            "cross_entropy",
            format_args!("labels {} for logits {}", shape(labels), shape(logits)),
        );
        self.launch(Kernel::CrossEntropy {
            logits: logits.id,
            labels: labels.id,
            grad: grad.id,
            loss: loss.id,
            rows: logits.rows,
            cols: logits.cols,
        });
    }

    /// `out[r] = Σ_c x[r][c]` (`out` has `x.rows()` elements).
    #[track_caller]
    pub fn sum_rows(&mut self, x: &Tensor, out: &mut Tensor) {
        let kernel = |x, out, rows, cols| Kernel::SumRows { x, out, rows, cols };
        self.reduce("sum_rows", x, out, x.rows, kernel);
    }

    /// `out[c] = Σ_r x[r][c]` (`out` has `x.cols()` elements; the bias gradient).
    #[track_caller]
    pub fn sum_cols(&mut self, x: &Tensor, out: &mut Tensor) {
        let kernel = |x, out, rows, cols| Kernel::SumCols { x, out, rows, cols };
        self.reduce("sum_cols", x, out, x.cols, kernel);
    }

    /// In place `param -= lr * grad`.
    #[track_caller]
    pub fn sgd(&mut self, param: &mut Tensor, grad: &Tensor, lr: f32) {
        same_len("sgd", &[param, grad]);
        self.launch(Kernel::Sgd {
            param: param.id,
            grad: grad.id,
            n: param.len(),
            lr,
        });
    }

    /// Adam update in place of `param` and its moments `m` and `v`; `step` counts from 1.
    #[track_caller]
    pub fn adam(
        &mut self,
        param: &mut Tensor,
        grad: &Tensor,
        m: &mut Tensor,
        v: &mut Tensor,
        hp: &Adam,
        step: u64,
    ) {
        same_len("adam", &[param, grad, m, v]);
        check(
            step >= 1,
            "adam",
            format_args!("step {step} (counts from 1)"),
        );
        self.launch(Kernel::Adam {
            param: param.id,
            grad: grad.id,
            m: m.id,
            v: v.id,
            n: param.len(),
            lr: hp.lr,
            beta1: hp.beta1,
            beta2: hp.beta2,
            eps: hp.eps,
            step,
        });
    }

    /// `out[i] = table[ids[i]]`: one `table.cols()`-wide row per id; `out` is
    /// `ids.len() × table.cols()` elements.
    #[track_caller]
    pub fn embedding(&mut self, table: &Tensor, ids: &U32Tensor, out: &mut Tensor) {
        check(
            out.len() == ids.len() * table.cols,
            "embedding",
            format_args!(
                "{} ids of table {} into out {}",
                ids.len(),
                shape(table),
                shape(out)
            ),
        );
        self.launch(Kernel::Embedding {
            table: table.id,
            ids: ids.id,
            out: out.id,
            count: ids.len(),
            dim: table.cols,
            vocab: table.rows,
        });
    }

    /// Row-wise layer norm of `x` into `out` (same shape), with per-column `gamma`, `beta`.
    #[track_caller]
    pub fn layer_norm(
        &mut self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        out: &mut Tensor,
        eps: f32,
    ) {
        same_shape("layer_norm", x, out);
        check(
            gamma.len() == x.cols && beta.len() == x.cols,
            "layer_norm",
            format_args!(
                "gamma {} and beta {} for x {}",
                shape(gamma),
                shape(beta),
                shape(x)
            ),
        );
        self.launch(Kernel::LayerNorm {
            x: x.id,
            gamma: gamma.id,
            beta: beta.id,
            out: out.id,
            rows: x.rows,
            cols: x.cols,
            eps,
        });
    }

    /// Copies `n` elements from `src` (from element `src_offset`) into `dst` (from
    /// element `dst_offset`).
    #[track_caller]
    pub fn copy<T: Element>(
        &mut self,
        src: &Tensor<T>,
        src_offset: usize,
        dst: &mut Tensor<T>,
        dst_offset: usize,
        n: usize,
    ) {
        check(n > 0, "copy", format_args!("zero elements"));
        check_range(src, src_offset, n, "copy from");
        check_range(dst, dst_offset, n, "copy into");
        self.launch(Kernel::Copy {
            src: src.id,
            src_offset,
            dst: dst.id,
            dst_offset,
            n,
        });
    }

    /// Fills `out` with counter-based random numbers: element `i` depends only on
    /// `(seed, counter + i)`.
    pub fn rng_fill(&mut self, out: &mut Tensor, seed: u64, counter: u64, dist: Distribution) {
        let (distribution, scale) = match dist {
            Distribution::Uniform(s) => (kernel::Distribution::Uniform, s),
            Distribution::Normal(s) => (kernel::Distribution::Normal, s),
        };
        self.launch(Kernel::RngFill {
            out: out.id,
            n: out.len(),
            seed,
            counter,
            distribution,
            scale,
        });
    }

    /// One decode step of multi-head attention: for each of `heads` heads of `q` (one
    /// query, `heads × head_dim` elements), `out = softmax(q · Kᵀ / √head_dim) · V` over
    /// the first `len` positions of the caches (`[positions × heads × head_dim]`).
    #[track_caller]
    pub fn attention_decode(
        &mut self,
        q: &Tensor,
        k_cache: &Tensor,
        v_cache: &Tensor,
        out: &mut Tensor,
        heads: usize,
        len: usize,
    ) {
        let width = q.len();
        check(
            heads > 0 && width % heads == 0 && out.len() == width && len > 0,
            "attention_decode",
            format_args!(
                "q {} with {heads} heads into out {}, {len} positions",
                shape(q),
                shape(out)
            ),
        );
        for cache in [k_cache, v_cache] {
            check(
                len.checked_mul(width).is_some_and(|n| n <= cache.len()),
                "attention_decode",
                format_args!(
                    "{len} positions of width {width} do not fit cache {}",
                    shape(cache)
                ),
            );
        }
        self.launch(Kernel::AttentionDecode {
            q: q.id,
            k_cache: k_cache.id,
            v_cache: v_cache.id,
            out: out.id,
            heads,
            head_dim: width / heads,
            len,
        });
    }

    /// `out = x · wᵀ`: each row of `x` (`m × w.cols()`) times the weights' rows, into
    /// `out` (`m × w.rows()`). With the token embedding table as `w`, the tied output
    /// projection.
    #[track_caller]
    pub fn qmatmul(&mut self, w: &Weights, x: &Tensor, out: &mut Tensor) {
        check(
            x.cols == w.cols && out.rows == x.rows && out.cols == w.rows,
            "qmatmul",
            format_args!(
                "x {} times weights {}×{} {} into out {}",
                shape(x),
                w.rows,
                w.cols,
                w.dtype.name(),
                shape(out)
            ),
        );
        self.launch(Kernel::QMatmul {
            w: w.id,
            x: x.id,
            out: out.id,
            n: w.rows,
            k: w.cols,
            m: x.rows,
            dtype: w.dtype,
        });
    }

    /// `out[i] = table[ids[i]]` dequantized: `out` is `ids.len() × table.cols()`.
    #[track_caller]
    pub fn qembedding(&mut self, table: &Weights, ids: &U32Tensor, out: &mut Tensor) {
        check(
            out.len() == ids.len() * table.cols,
            "qembedding",
            format_args!(
                "{} ids of a {}×{} table into out {}",
                ids.len(),
                table.rows,
                table.cols,
                shape(out)
            ),
        );
        self.launch(Kernel::QEmbedding {
            table: table.id,
            ids: ids.id,
            out: out.id,
            count: ids.len(),
            dim: table.cols,
            vocab: table.rows,
            dtype: table.dtype,
        });
    }

    /// Row-wise RMS norm of `x` into `out` (same shape), scaled by `weight` (`x.cols()`).
    #[track_caller]
    pub fn rms_norm(&mut self, x: &Tensor, weight: &Tensor, out: &mut Tensor, eps: f32) {
        same_shape("rms_norm", x, out);
        per_column("rms_norm", "weight", weight, x);
        self.launch(Kernel::RmsNorm {
            x: x.id,
            weight: weight.id,
            out: out.id,
            rows: x.rows,
            cols: x.cols,
            eps,
        });
    }

    /// In place rotary embedding of `x`: one row per token (row `r` at position
    /// `pos + r`), `heads` heads per row, each pair's frequency divided by its element of
    /// `factors` (half a head: ones for plain rope).
    #[track_caller]
    pub fn rope(
        &mut self,
        x: &mut Tensor,
        factors: &Tensor,
        heads: usize,
        pos: usize,
        base: f32,
        style: RopeStyle,
    ) {
        check(
            heads > 0
                && x.cols % heads == 0
                && (x.cols / heads) % 2 == 0
                && factors.len() == x.cols / heads / 2,
            "rope",
            format_args!(
                "x {} with {heads} heads, factors {}",
                shape(x),
                shape(factors)
            ),
        );
        self.launch(Kernel::Rope {
            x: x.id,
            factors: factors.id,
            rows: x.rows,
            heads,
            head_dim: x.cols / heads,
            pos,
            base,
            style,
        });
    }

    elementwise! {
        /// `out = silu(gate) · up`, elementwise.
        fn swiglu(gate, up => out) = Swiglu;
    }

    /// Causal grouped-query attention of the queries `q` (one row per token, row `r` at
    /// position `pos + r`, `heads` heads) over the first `pos + q.rows()` positions of the
    /// caches (one row per position, `kv_heads` heads), into `out` (shaped as `q`).
    #[track_caller]
    pub fn attention(
        &mut self,
        q: &Tensor,
        k_cache: &Tensor,
        v_cache: &Tensor,
        out: &mut Tensor,
        (heads, kv_heads): (usize, usize),
        pos: usize,
    ) {
        let ok = heads > 0
            && kv_heads > 0
            && q.cols % heads == 0
            && heads % kv_heads == 0
            && k_cache.cols == kv_heads * (q.cols / heads)
            && v_cache.cols == k_cache.cols
            && pos + q.rows <= k_cache.rows.min(v_cache.rows);
        check(
            ok,
            "attention",
            format_args!(
                "q {} ({heads} heads) at {pos} over caches {} and {} ({kv_heads} heads)",
                shape(q),
                shape(k_cache),
                shape(v_cache)
            ),
        );
        same_shape("attention", q, out);
        self.launch(Kernel::Attention {
            q: q.id,
            k_cache: k_cache.id,
            v_cache: v_cache.id,
            out: out.id,
            rows: q.rows,
            heads,
            kv_heads,
            head_dim: q.cols / heads,
            pos,
        });
    }

    /// `out[r] = argmax_c x[r][c]` (the first maximum; `out` has `x.rows()` elements).
    #[track_caller]
    pub fn argmax(&mut self, x: &Tensor, out: &mut U32Tensor) {
        let kernel = |x, out, rows, cols| Kernel::Argmax { x, out, rows, cols };
        self.reduce("argmax", x, out, x.rows, kernel);
    }

    /// Launches the reduction `kernel(x, out, rows, cols)` of `x` into `out`, which must
    /// have `len` elements.
    #[track_caller]
    fn reduce<T: Element>(
        &mut self,
        what: &str,
        x: &Tensor,
        out: &mut Tensor<T>,
        len: usize,
        kernel: fn(u32, u32, usize, usize) -> Kernel,
    ) {
        check(
            out.len() == len,
            what,
            format_args!("x {} into out {}", shape(x), shape(out)),
        );
        self.launch(kernel(x.id, out.id, x.rows, x.cols));
    }
}

// ---- helpers ----------------------------------------------------------------------------

/// A tensor's `rows×cols dtype #id`, for messages.
struct Shape {
    rows: usize,
    cols: usize,
    dtype: &'static str,
    id: u32,
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}×{} {} #{}", self.rows, self.cols, self.dtype, self.id)
    }
}

fn shape<T: Element>(t: &Tensor<T>) -> Shape {
    Shape {
        rows: t.rows,
        cols: t.cols,
        dtype: T::NAME,
        id: t.id,
    }
}

/// Panics with a message naming the operation unless `ok`.
#[track_caller]
fn check(ok: bool, what: &str, why: fmt::Arguments<'_>) {
    if !ok {
        panic!("accel: {what}: {why}");
    }
}

#[track_caller]
fn check_range<T: Element>(t: &Tensor<T>, offset: usize, n: usize, what: &str) {
    check(
        offset.checked_add(n).is_some_and(|end| end <= t.len()),
        what,
        format_args!("elements {offset}..+{n} outside {}", shape(t)),
    );
}

#[track_caller]
fn same_len(what: &str, ts: &[&Tensor]) {
    let n = ts[0].len();
    if ts.iter().any(|t| t.len() != n) {
        let mut shapes = String::new();
        for t in ts {
            if !shapes.is_empty() {
                shapes.push_str(", ");
            }
            let _ = write!(shapes, "{}", shape(t));
        }
        check(
            false,
            what,
            format_args!("operands differ in size: {shapes}"),
        );
    }
}

/// Panics unless the vector `v` (called `name` in the message) has one element per column
/// of `x`.
#[track_caller]
fn per_column(what: &str, name: &str, v: &Tensor, x: &Tensor) {
    check(
        v.len() == x.cols,
        what,
        format_args!("{name} {} for x {}", shape(v), shape(x)),
    );
}

#[track_caller]
fn same_shape(what: &str, a: &Tensor, b: &Tensor) {
    check(
        a.rows == b.rows && a.cols == b.cols,
        what,
        format_args!("shapes differ: {} and {}", shape(a), shape(b)),
    );
}
