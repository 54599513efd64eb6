//! The `main` most workloads have: `--help`, options parsed from the arguments, a run
//! whose failure ends the guest with one line naming the workload and an exit code.
//!
//! ```ignore
//! fn main(args: Args) -> i32 {
//!     ferry_sdk::workload::main(&args, "mlp-train", HELP, Config::parse, train)
//! }
//! ```

use crate::accel::AccelError;
use crate::args::{ArgError, Args};
use crate::println;
use crate::rt::EXIT_USAGE;
use alloc::string::String;

/// Exit code of a run that failed for a reason other than its arguments.
pub const EXIT_FAILURE: i32 = 1;

/// Why a run failed: it decides the last line and the exit code.
#[derive(Debug)]
pub enum Failure {
    /// The arguments do not fit (found only once the data is loaded): `<name>: error:
    /// <why> (see --help)`, [`EXIT_USAGE`].
    Usage(ArgError),
    /// Bad data, a missing file and the like: `<name>: error: <why>`, [`EXIT_FAILURE`].
    Other(String),
    /// The accelerator failed: `<name>: accelerator error: <why>`, [`EXIT_FAILURE`].
    Accel(AccelError),
}

impl From<ArgError> for Failure {
    fn from(e: ArgError) -> Self {
        Failure::Usage(e)
    }
}

impl From<AccelError> for Failure {
    fn from(e: AccelError) -> Self {
        Failure::Accel(e)
    }
}

/// The options `parse` makes of `args`; or, as `Err`, the exit code after printing
/// `help` (for `--help`, code 0) or why the arguments are bad ([`EXIT_USAGE`]).
pub fn options<'a, T>(
    args: &'a Args,
    name: &str,
    help: &str,
    parse: impl FnOnce(&'a Args) -> Result<T, ArgError>,
) -> Result<T, i32> {
    if args.wants_help() {
        println!("{help}");
        return Err(0);
    }
    parse(args).map_err(|e| usage_error(name, &e))
}

/// A whole `main`: [`options`], then `run` with them; the exit code is 0 when `run`
/// succeeds, else the one its [`Failure`] gives, after a line that says why.
pub fn main<'a, T, E: Into<Failure>>(
    args: &'a Args,
    name: &str,
    help: &str,
    parse: impl FnOnce(&'a Args) -> Result<T, ArgError>,
    run: impl FnOnce(&T) -> Result<(), E>,
) -> i32 {
    let options = match options(args, name, help, parse) {
        Ok(o) => o,
        Err(code) => return code,
    };
    match run(&options).map_err(Into::into) {
        Ok(()) => 0,
        Err(Failure::Usage(e)) => usage_error(name, &e),
        Err(Failure::Other(e)) => {
            println!("{name}: error: {e}");
            EXIT_FAILURE
        }
        Err(Failure::Accel(e)) => {
            println!("{name}: accelerator error: {e}");
            EXIT_FAILURE
        }
    }
}

fn usage_error(name: &str, e: &ArgError) -> i32 {
    println!("{name}: error: {e} (see --help)");
    EXIT_USAGE
}
