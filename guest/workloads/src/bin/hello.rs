//! Prints a greeting and its arguments; `--exit-code N` picks the exit code.
#![no_std]
#![no_main]

use ferry_sdk::prelude::*;
use ferry_sdk::EXIT_USAGE;

ferry_sdk::entry!(main);

fn main(args: Args) -> i32 {
    println!("hello from a ferry guest");
    for (i, arg) in args.iter().enumerate() {
        println!("arg[{i}]={arg}");
    }
    match args.parse_or("exit-code", 0) {
        Ok(code) => code,
        Err(e) => {
            println!("error: {e}");
            EXIT_USAGE
        }
    }
}
