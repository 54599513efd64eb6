//! Dirties guest RAM at a configured rate: the memory-dirtier for migration benchmarks.
//!
//! With `--passes` the final checksum depends only on the arguments (no clock in the
//! data path), so a run that was migrated midway must print the same checksum as one
//! that was not.
#![no_std]
#![no_main]

use ferry_sdk::clock::now_ns;
use ferry_sdk::math::mix;
use ferry_sdk::prelude::*;

ferry_sdk::entry!(main);

const HELP: &str = "\
memtouch: rewrites a working set in guest RAM, pass after pass, at a steady rate.
  --seed N         generator seed (default 1)
  --mib N          working set in MiB (default 16)
  --passes N       rewrite it N times, then print the checksum (default 8)
  --seconds F      run for F seconds of guest time instead of --passes; the
                   checksum then depends on timing
  --rate-mib-s N   write at most N MiB/s, checked every 64 KiB (0 = unthrottled,
                   the default)
The last line is `checksum=<16 hex digits>`; with --passes it depends only on the
arguments.";

/// Words per throttling slice (64 KiB).
const SLICE_WORDS: usize = 64 * 1024 / 8;
/// How far the writer may fall behind its rate before it stops trying to catch up, so
/// that a slow stretch is not followed by a burst far above the rate.
const MAX_DEBT_NS: u64 = 10_000_000;
const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

fn main(args: Args) -> i32 {
    // `run` parses the arguments as it goes.
    ferry_sdk::workload::main(&args, "memtouch", HELP, Ok, |args| run(args))
}

/// A word's next value: depends on its old value, the pass and its index, so a lost
/// (or misplaced) write changes the final checksum.
fn step(word: u64, pass: u64, index: u64) -> u64 {
    mix(word.wrapping_add(GOLDEN.wrapping_mul(pass + 1)) ^ index)
}

enum Stop {
    AfterPasses(u64),
    AfterNs(u64),
}

fn run(args: &Args) -> Result<(), ArgError> {
    args.check(&["seed", "mib", "passes", "seconds", "rate-mib-s"], &[])?;
    let seed: u64 = args.parse_or("seed", 1)?;
    let mib: u64 = args.parse_or("mib", 16)?;
    let rate: u64 = args.parse_or("rate-mib-s", 0)?;
    let stop = match (args.parse::<u64>("passes")?, args.parse::<f64>("seconds")?) {
        (Some(_), Some(_)) => return Err(ArgError::new("give --passes or --seconds, not both")),
        (_, Some(s)) if !(s > 0.0 && s < 1e9) => {
            return Err(ArgError::new(
                "--seconds: must be a positive number of seconds",
            ))
        }
        (_, Some(s)) => Stop::AfterNs((s * 1e9) as u64),
        (passes, None) => Stop::AfterPasses(passes.unwrap_or(8)),
    };
    if mib == 0 {
        return Err(ArgError::new("--mib: must be at least 1"));
    }
    let words = mib
        .checked_mul(1 << 17) // u64 words per MiB
        .and_then(|w| usize::try_from(w).ok())
        .ok_or_else(|| ArgError::new("--mib: too large"))?;

    let mut set: Vec<u64> = Vec::new();
    if set.try_reserve_exact(words).is_err() {
        return Err(ArgError::new(
            "--mib: the working set does not fit in the guest heap",
        ));
    }
    let mut state = seed;
    set.extend((0..words).map(|_| {
        state = state.wrapping_add(GOLDEN);
        mix(state)
    }));

    match stop {
        Stop::AfterPasses(n) => {
            println!("memtouch: seed={seed} mib={mib} passes={n} rate-mib-s={rate}")
        }
        Stop::AfterNs(ns) => println!(
            "memtouch: seed={seed} mib={mib} ms={} rate-mib-s={rate}",
            ns / 1_000_000
        ),
    }
    let start = now_ns();
    let mut throttle = Throttle::new(rate, start);
    let timed = rate != 0 || matches!(stop, Stop::AfterNs(_));
    // A clock read costs two VM exits: unthrottled, --seconds only needs it per MiB.
    let clock_every = if rate != 0 { 1 } else { 16 };
    let mut slices = 0u64;
    let mut pass = 0u64;
    let mut reported = 0u64; // progress lines are printed per tenth of the run
    'run: loop {
        if let Stop::AfterPasses(n) = stop {
            if pass == n {
                break;
            }
        }
        for (s, slice) in set.chunks_mut(SLICE_WORDS).enumerate() {
            let base = (s * SLICE_WORDS) as u64;
            for (i, word) in (base..).zip(slice.iter_mut()) {
                *word = step(*word, pass, i);
            }
            slices += 1;
            if timed && slices % clock_every == 0 {
                let now = throttle.after_slice();
                if let Stop::AfterNs(ns) = stop {
                    if now - start >= ns {
                        println!(
                            "stopped during pass {} after {} ms",
                            pass + 1,
                            (now - start) / 1_000_000
                        );
                        break 'run;
                    }
                }
            }
        }
        pass += 1;
        let tenth = match stop {
            Stop::AfterPasses(n) => pass * 10 / n,
            Stop::AfterNs(ns) => (now_ns() - start) * 10 / ns,
        };
        if tenth > reported {
            reported = tenth;
            match stop {
                Stop::AfterPasses(n) => println!("pass {pass}/{n}"),
                Stop::AfterNs(_) => println!("pass {pass}"),
            }
        }
    }
    let ms = ((now_ns() - start) / 1_000_000).max(1);
    println!(
        "memtouch: {pass} full passes in {ms} ms ({} MiB/s)",
        pass * mib * 1000 / ms
    );
    // FNV-1a over the words.
    let sum = set.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &w| {
        (h ^ w).wrapping_mul(0x100_0000_01b3)
    });
    println!("checksum={sum:016x}");
    Ok(())
}

/// Paces writes to a rate by busy-waiting on the guest clock after each 64 KiB slice.
struct Throttle {
    /// Target rate in MiB/s; 0 = unthrottled.
    rate: u64,
    /// When slice 0 was due (moved forward when the writer falls too far behind).
    base: u64,
    /// Slices written so far.
    slices: u64,
}

impl Throttle {
    fn new(rate_mib_s: u64, now: u64) -> Self {
        Self {
            rate: rate_mib_s,
            base: now,
            slices: 0,
        }
    }

    /// Waits until the slice just written is due; returns the clock.
    fn after_slice(&mut self) -> u64 {
        let now = now_ns();
        if self.rate == 0 {
            return now;
        }
        self.slices += 1;
        // A slice is 1/16 MiB, so it is due 1e9 / 16 / rate ns after the previous one.
        let due = self.base + self.slices * 62_500_000 / self.rate;
        if now > due + MAX_DEBT_NS {
            self.base += now - due - MAX_DEBT_NS;
            return now;
        }
        let mut now = now;
        while now < due {
            core::hint::spin_loop();
            now = now_ns();
        }
        now
    }
}
