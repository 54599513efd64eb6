//! A [`Gpu`] on the CPU, to check the cuda backend where there is no GPU: `kernels.cu`
//! compiled by the host's C++ compiler (with `emulated.h`, multiplies and adds never
//! fused, and any flags in `FERRY_EMULATOR_CXXFLAGS`) and loaded with `dlopen`; each
//! launch runs its work items one after another, on one thread, so it is slow. Memory is
//! host memory, an allocation per buffer; addresses are host pointers.

use std::collections::HashMap;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::{Args, Gpu, GpuError, Launch, ENTRY_POINTS, KERNELS_CU};

type Entry = unsafe extern "C" fn(Args);
type Emulate = unsafe extern "C" fn(Entry, *const Args, u64);

/// Host memory standing for device memory (u64 words: aligned for every element type).
pub struct HostMemory(Mutex<Vec<u64>>, u64);

impl HostMemory {
    fn bytes(&self) -> u64 {
        self.1
    }
}

/// Launches run one at a time (the kernels share the emulation's item counter), and
/// copies wait for them (kernels write memory through raw addresses).
static RUNNING: Mutex<()> = Mutex::new(());

/// Why the emulated GPU could not be built ([`Emulator::build`]).
#[derive(Debug, thiserror::Error)]
pub enum EmulatorError {
    /// The folder for its sources and library could not be made.
    #[error("cannot create {}", path.display())]
    CreateDir {
        /// The folder.
        path: PathBuf,
        /// The error making it.
        #[source]
        source: std::io::Error,
    },
    /// A source file could not be written.
    #[error("cannot write {}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The error writing it.
        #[source]
        source: std::io::Error,
    },
    /// The C++ compiler (`$CXX`, else `c++`) could not be run.
    #[error("cannot run the C++ compiler {compiler}")]
    RunCompiler {
        /// The compiler's command.
        compiler: String,
        /// The error running it.
        #[source]
        source: std::io::Error,
    },
    /// `kernels.cu` did not compile as C++.
    #[error("kernels.cu does not compile as C++:\n{stderr}")]
    Compile {
        /// What the compiler said.
        stderr: String,
    },
    /// The compiled library could not be loaded.
    #[error("cannot load the emulated kernels {}", path.display())]
    Load {
        /// The library.
        path: PathBuf,
    },
    /// An entry point is missing from the library.
    #[error("no symbol {0} in the emulated kernels")]
    NoSymbol(&'static str),
}

/// `kernels.cu` on the CPU.
#[derive(Clone)]
pub struct Emulator {
    entries: HashMap<&'static str, Entry>,
    emulate: Emulate,
}

// SAFETY: the entry points are plain functions of their argument; `RUNNING` serializes
// launches, which share the library's item counter.
unsafe impl Send for Emulator {}
// SAFETY: as above.
unsafe impl Sync for Emulator {}

impl Emulator {
    /// Compiles `kernels.cu` into `dir` and loads it.
    pub fn build(dir: &Path) -> Result<Self, EmulatorError> {
        let write = |name: &str, text: &str| {
            let path = dir.join(name);
            std::fs::write(&path, text).map_err(|source| EmulatorError::Write { path, source })
        };
        write("kernels.cpp", KERNELS_CU)?;
        write("emulated.h", include_str!("emulated.h"))?;
        let source = dir.join("kernels.cpp");
        let library = dir.join("kernels.so");
        let compiler = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
        // Flags of the caller's (`scripts/emulator-asan` adds AddressSanitizer's) come
        // first, so the flags the bits depend on, after them, win.
        let extra = std::env::var("FERRY_EMULATOR_CXXFLAGS").unwrap_or_default();
        let out = std::process::Command::new(&compiler)
            .args(extra.split_whitespace())
            .args([
                "-DFERRY_EMULATED",
                "-O2",
                "-ffp-contract=off",
                "-fno-fast-math",
            ])
            .args(["-shared", "-fPIC", "-Wall", "-Werror", "-o"])
            .arg(&library)
            .arg(&source)
            .output()
            .map_err(|source| EmulatorError::RunCompiler {
                compiler: compiler.clone(),
                source,
            })?;
        if !out.status.success() {
            return Err(EmulatorError::Compile {
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        let load_failed = || EmulatorError::Load {
            path: library.clone(),
        };
        let path = CString::new(library.as_os_str().as_bytes()).map_err(|_| load_failed())?;
        // SAFETY: loads a library we just built; its initializers are the compiler's.
        let handle = unsafe { libc::dlopen(path.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if handle.is_null() {
            return Err(load_failed());
        }
        let symbol = |name: &'static str| -> Result<*mut libc::c_void, EmulatorError> {
            let c = CString::new(name).map_err(|_| EmulatorError::NoSymbol(name))?;
            // SAFETY: `handle` is a loaded library; `c` a NUL-terminated name.
            let s = unsafe { libc::dlsym(handle, c.as_ptr()) };
            if s.is_null() {
                Err(EmulatorError::NoSymbol(name))
            } else {
                Ok(s)
            }
        };
        let mut entries = HashMap::new();
        for &entry in ENTRY_POINTS {
            let s = symbol(entry)?;
            // SAFETY: every entry point of kernels.cu is `extern "C" void (const Args)`.
            entries.insert(entry, unsafe {
                std::mem::transmute::<*mut libc::c_void, Entry>(s)
            });
        }
        let s = symbol("ferry_emulate")?;
        // SAFETY: declared in emulated.h with this signature.
        let emulate = unsafe { std::mem::transmute::<*mut libc::c_void, Emulate>(s) };
        Ok(Self { entries, emulate })
    }
}

impl Gpu for Emulator {
    type Memory = HostMemory;

    fn description(&self) -> String {
        "emulated on the CPU".into()
    }

    fn alloc(&self, bytes: u64) -> Result<HostMemory, GpuError> {
        Ok(HostMemory(
            Mutex::new(vec![0u64; bytes.div_ceil(8) as usize]),
            bytes,
        ))
    }

    fn address(&self, memory: &HostMemory) -> u64 {
        // The Vec never grows: its buffer stays where it is.
        memory.0.lock().expect("memory lock").as_ptr() as u64
    }

    fn write(&self, memory: &HostMemory, offset: u64, data: &[u8]) -> Result<(), GpuError> {
        assert!(offset + data.len() as u64 <= memory.bytes());
        // Never while a kernel writes through its raw addresses.
        let _no_kernel = RUNNING.lock().unwrap_or_else(|e| e.into_inner());
        let mut words = memory.0.lock().expect("memory lock");
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut words);
        bytes[offset as usize..][..data.len()].copy_from_slice(data);
        Ok(())
    }

    fn read(&self, memory: &HostMemory, offset: u64, out: &mut [u8]) -> Result<(), GpuError> {
        assert!(offset + out.len() as u64 <= memory.bytes());
        let _no_kernel = RUNNING.lock().unwrap_or_else(|e| e.into_inner());
        let words = memory.0.lock().expect("memory lock");
        let bytes: &[u8] = bytemuck::cast_slice(&words);
        out.copy_from_slice(&bytes[offset as usize..][..out.len()]);
        Ok(())
    }

    fn launch(&self, launch: &Launch, _writes: &[&HostMemory]) -> Result<(), GpuError> {
        let entry = self.entries[launch.entry];
        let _one_at_a_time = RUNNING.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: the addresses in `args` are of live HostMemory the backend holds, and
        // the device validated every range the kernel touches.
        unsafe { (self.emulate)(entry, &launch.args, launch.items) };
        Ok(())
    }
}
