//! Real workloads moving live between `ferry host serve` daemons: SmolLM2 answering a
//! question, migrated in the middle of its answer (the model file sent, then found in
//! place on the way back) and snapshotted mid-answer, and Fashion-MNIST training migrated
//! mid-epoch. Each prints exactly what an unmigrated run prints: the same text,
//! accuracies and checksums.
//!
//! They need the model (`scripts/fetch-model`) and the dataset package; without them
//! they say SKIPPED loudly (and fail under FERRY_REQUIRE_MODEL=1 / FERRY_REQUIRE_DATASET=1).

use serde_json::Value;

mod common;

use common::{
    ferry, kvm_and_smollm2, kvm_available, report, run_console, text, workload_args, Daemon,
};

/// The answer `llm-chat` streamed: between its prompt line and its summary line.
fn answer(console: &str) -> &str {
    let start = console
        .find("llm-chat: prompt of")
        .and_then(|at| console[at..].find('\n').map(|nl| at + nl + 1))
        .unwrap_or_else(|| panic!("no prompt line in:\n{console}"));
    let end = console[start..]
        .find("\nllm-chat: ")
        .map_or(console.len(), |at| start + at);
    &console[start..end]
}

fn line<'a>(console: &'a str, prefix: &str) -> &'a str {
    console
        .lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no {prefix} line in:\n{console}"))
}

/// SmolLM2 attached as `llm-chat` finds it, and its size; `None` (said loudly) without
/// KVM or the model.
fn smollm2_attached(test: &str) -> Option<([String; 1], u64)> {
    let model = kvm_and_smollm2(test)?;
    let size = std::fs::metadata(&model).unwrap().len();
    Some(([format!("model={}", model.display())], size))
}

#[test]
fn a_model_answering_moves_mid_answer_and_back_with_the_unmigrated_text() {
    let Some((files, size)) =
        smollm2_attached("a_model_answering_moves_mid_answer_and_back_with_the_unmigrated_text")
    else {
        return;
    };
    let args = [
        "--prompt",
        "Write a long story about a lighthouse keeper and a storm.",
        "--max-tokens",
        "384",
    ];
    let expected = run_console(["llm-chat", "256M", "512M"], &files, &args);
    let want = answer(&expected);
    // Long enough (seconds) to move twice while it answers, on a busy 2-core machine.
    assert!(want.len() > 1000, "a long answer: {want:?}");
    // Points in the answer the VM must have reached before each move.
    let mark = |fraction: f64| {
        let mut at = (want.len() as f64 * fraction) as usize;
        while !want.is_char_boundary(at) {
            at += 1;
        }
        want[..at]
            .rsplit(' ')
            .next()
            .filter(|w| w.len() > 3)
            .map_or_else(
                || want[at.saturating_sub(12)..at].to_string(),
                |_| want[at.saturating_sub(24)..at].to_string(),
            )
    };

    let (a, b) = (Daemon::start("a"), Daemon::start("b"));
    let id = a.create_with(["llm-chat", "256M", "512M"], &files, &args);
    a.wait_console(&id, &mark(0.05));
    // Host b has no copy: --files send moves the model with the first round.
    let there = report(&a.migrate(&id, &b.migration, &["--files", "send"]));
    assert_eq!(there["files_sent"], 1, "{there}");
    assert_eq!(there["file_bytes"].as_u64(), Some(size), "{there}");
    assert!(there["bytes_sent"].as_u64().unwrap() > size, "{there}");
    b.wait_console(&id, &mark(0.2));
    // Host a still has the model where the VM found it: nothing to send back.
    let back = report(&b.migrate(&id, &a.migration, &[]));
    assert_eq!(
        (back["files_sent"].as_u64(), back["files_reused"].as_u64()),
        (Some(0), Some(1)),
        "{back}"
    );
    // The weights went as bytes the first time (the file was on its way); back on a,
    // which has the file, each chunk of weights goes as the piece of the file it holds.
    assert_eq!(there["chunks_from_files"], 0, "{there}");
    let from_files = back["chunks_from_files"].as_u64().unwrap();
    assert!(
        from_files * ferry_accel::dirty::CHUNK_SIZE > size / 2,
        "{back}"
    );
    let sent = |r: &Value| r["bytes_sent"].as_u64().unwrap();
    assert!(sent(&back) + size < sent(&there), "{there}\n{back}");
    let console = a.console_at_exit(&id);
    assert_eq!(answer(&console), want, "the migrated answer differs");
    assert_eq!(line(&console, "checksum="), line(&expected, "checksum="));
}

#[test]
fn a_model_answering_is_snapshotted_mid_answer_and_restored_with_the_unmigrated_text() {
    let Some((files, size)) = smollm2_attached(
        "a_model_answering_is_snapshotted_mid_answer_and_restored_with_the_unmigrated_text",
    ) else {
        return;
    };
    let args = [
        "--prompt",
        "Tell me about lighthouses.",
        "--max-tokens",
        "160",
    ];
    let started = std::time::Instant::now();
    let shape = ["llm-chat", "256M", "512M"];
    let expected = run_console(shape, &files, &args);
    let took = started.elapsed();
    let want = answer(&expected);

    // Snapshot at a third of an unmigrated run's time: the weights are loaded within its
    // first tenth, and the answer takes most of the rest, so the run being faster or
    // slower than the first (other tests share the cores) still leaves it mid-answer.
    let dir = tempfile::tempdir().unwrap();
    let snapshot_dir = dir.path().to_str().unwrap();
    let at_ms = (took.as_millis() / 3).to_string();
    let snapshot = ["--snapshot-at-ms", &at_ms, "--snapshot-dir", snapshot_dir];
    let saved = ferry(&workload_args("run", shape, &files, &snapshot, &args));
    assert!(saved.status.success(), "{}", text(&saved.stderr));
    let said = text(&saved.stderr);
    assert!(
        said.contains("device chunks named in attached files"),
        "{said}"
    );
    let stored = std::fs::metadata(dir.path().join("vm.snap")).unwrap().len();
    // The weights are named as the pieces of the model file they are, not copied.
    assert!(
        stored < size / 2,
        "{stored} bytes stored for a {size}-byte model"
    );
    // Another file given for the model is refused before anything is loaded.
    let wrong = format!("model={}", dir.path().join("vm.snap").display());
    let refused = ferry(&["restore", snapshot_dir, "--attach", &wrong]);
    let why = text(&refused.stderr);
    assert!(
        !refused.status.success() && why.contains("was given"),
        "{why}"
    );
    // The model found elsewhere (as on another machine) is read from there.
    let moved = dir.path().join("moved.gguf");
    let model = files[0].strip_prefix("model=").unwrap();
    // A copy, not a second link: a link changes the shared model's ctime, and a test
    // beside this one hashing it to attach it takes that for the file changing.
    std::fs::copy(model, &moved).unwrap();
    let moved = format!("model={}", moved.display());
    let restored = ferry(&["restore", snapshot_dir, "--attach", &moved]);
    assert!(restored.status.success(), "{}", text(&restored.stderr));
    let console = text(&saved.stdout) + &text(&restored.stdout);
    assert_eq!(answer(&console), want, "the restored answer differs");
    assert_eq!(line(&console, "checksum="), line(&expected, "checksum="));
}

#[test]
fn training_on_fashion_mnist_moves_mid_epoch_and_back_by_replay_with_the_unmigrated_results() {
    let test =
        "training_on_fashion_mnist_moves_mid_epoch_and_back_by_replay_with_the_unmigrated_results";
    if !kvm_available(test) {
        return;
    }
    let Some(dir) = ferry_testdata::fashion_mnist(test) else {
        return;
    };
    let files: Vec<String> = ferry_testdata::fashion_mnist_files(&dir)
        .into_iter()
        .map(|(name, path)| format!("{name}={}", path.display()))
        .collect();
    // 375 steps an epoch: moved at step 50 and back at 100, it must not end during a move
    // on a machine busy with the other tests (with 187 it once ran 324 steps during the
    // first move's pre-copy and ended there).
    let args = ["--limit", "24000", "--epochs", "2", "--log-every", "25"];
    let expected = run_console(["fmnist-train", "512M", "256M"], &files, &args);
    let (a, b) = (Daemon::start("a"), Daemon::start("b"));
    let id = a.create_with(["fmnist-train", "512M", "256M"], &files, &args);
    a.wait_console(&id, "step=50 ");
    // The dataset is where b looks for it (the same paths): only the VM moves.
    let r = report(&a.migrate(&id, &b.migration, &[]));
    assert_eq!(r["files_reused"], 4, "{r}");
    // And back by replaying its device's commands (a real training step's).
    b.wait_console(&id, "step=100 ");
    let r = report(&b.migrate(&id, &a.migration, &common::BY_REPLAY));
    assert_eq!(r["device_transfer"], "replay", "{r}");
    // Every command logged after the boundary was sent.
    assert_eq!(
        r["replay"]["commands"], r["replay"]["capture"]["commands_logged"],
        "{r}"
    );
    let console = a.console_at_exit(&id);
    let results = |c: &str| -> Vec<String> {
        c.lines()
            .filter(|l| {
                l.starts_with("epoch ") || l.starts_with("test_acc=") || l.starts_with("checksum=")
            })
            // "(took N s)" is the clock's.
            .map(|l| l.split(" (took").next().unwrap().to_string())
            .collect()
    };
    assert_eq!(results(&console), results(&expected));
    assert_eq!(results(&console).len(), 4, "{console}");
}

#[test]
fn the_model_demo_moves_an_answer_and_finds_it_identical() {
    let test = "the_model_demo_moves_an_answer_and_finds_it_identical";
    let Some(model) = kvm_and_smollm2(test) else {
        return;
    };
    let model = model.display().to_string();
    let out = common::ferry(&[
        "demo",
        "--json",
        "--model",
        &model,
        "--max-tokens",
        "64",
        "--files",
        "send",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let result: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(result["workload"], "llm-chat", "{result}");
    assert_eq!(result["identical"], true, "{result}");
    assert_eq!(result["report"]["files_sent"], 1, "{result}");
    // 40% of 64 tokens of about four characters: 102.
    assert!(
        result["migrated_at_chars"].as_u64().unwrap() >= 102,
        "{result}"
    );
}
