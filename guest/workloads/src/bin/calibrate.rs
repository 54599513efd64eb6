//! Times the shared calibration loops (`ferry_abi::calibration`) inside the guest, so
//! `ferry bench vm` can compare them with the same loops on the host.
#![no_std]
#![no_main]

use core::hint::black_box;
use ferry_sdk::prelude::*;

use ferry_sdk::abi::calibration;
use ferry_sdk::clock::now_ns;
use ferry_sdk::EXIT_USAGE;

ferry_sdk::entry!(main);

fn main(args: Args) -> i32 {
    let parsed = (|| {
        args.check(&["iterations", "mib", "passes"], &[])?;
        Ok::<_, ferry_sdk::ArgError>((
            args.parse_or("iterations", 200_000_000u64)?,
            args.parse_or("mib", 64usize)?,
            args.parse_or("passes", 10u32)?,
        ))
    })();
    let (iterations, mib, passes) = match parsed {
        Ok(p) => p,
        Err(e) => {
            println!("calibrate: error: {e} (args: --iterations N --mib N --passes N)");
            return EXIT_USAGE;
        }
    };

    let start = now_ns();
    let result = calibration::compute(black_box(iterations));
    let ns = now_ns() - start;
    println!("compute iterations={iterations} ns={ns} result={result:016x}");

    let mut words = vec![1u64; mib << 17];
    let start = now_ns();
    let result = calibration::memory(black_box(&mut words), passes);
    let ns = now_ns() - start;
    println!("memory mib={mib} passes={passes} ns={ns} result={result:016x}");
    0
}
