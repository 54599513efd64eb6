//! Kernel launches as the device and its backends see them.
//!
//! Everything about a kernel (id, arguments, validation, read and write sets, the bounds
//! of its indices) is one entry of the ABI's declarative table,
//! [`ferry_abi::accel::kernel`], which the guest SDK builds launches from too; this module
//! re-exports it for the device and backends.

pub use ferry_abi::accel::dtype::DType;
pub use ferry_abi::accel::kernel::{
    Access, BufferAccess, Distribution, Indices, Kernel, MatmulFlags, Mode, RopeStyle,
};
