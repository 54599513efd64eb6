//! Every input kept in `fuzz/regressions/<target>/` (crashes the fuzzers found, fixed
//! since, and a few seeds) runs through its target on stable: none may panic.

use std::path::Path;

#[test]
fn kept_fuzz_inputs_run_through_their_targets_without_a_panic() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/regressions");
    for (name, target) in ferry_fuzz_targets::TARGETS {
        // Every target keeps some: a folder renamed or emptied would pass unseen.
        let dir = root.join(name);
        let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| {
            panic!("no kept inputs of target {name} at {}: {e}", dir.display())
        });
        let mut ran = 0;
        for entry in entries {
            let path = entry.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            eprintln!("{name}: {}", path.display());
            target(&data);
            ran += 1;
        }
        assert!(
            ran > 0,
            "no kept inputs of target {name} in {}",
            dir.display()
        );
    }
}

#[test]
fn empty_and_tiny_inputs_are_refused_quietly() {
    for (_, target) in ferry_fuzz_targets::TARGETS {
        for data in [&b""[..], b"\0", b"FY", b"GGUF", b"FERRYSNP", b"{}"] {
            target(data);
        }
    }
}
