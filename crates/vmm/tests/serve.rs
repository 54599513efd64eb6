//! `llm-serve` in a real VM, driven through its message channel with ferry-llm's tiny
//! test model (weights set so that it answers one chosen token after every token): a
//! cancel never takes the other requests down, a stream the host lets go of while open
//! stops its work, a token's text longer than a response slot reaches the host whole,
//! and bad requests are refused one by one while the server carries on.

extern crate alloc;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferry_vmm::devices::channel::{Message, StreamEnd, SubmitError};
use ferry_vmm::{AttachedFiles, HostOptions, Microvm, VmConfig};

/// ferry-llm's GGUF writer and tiny model.
#[path = "../../llm/tests/common/mod.rs"]
mod gguf;
/// The messages `llm-serve` exchanges with the host (ferry-llm's own codec).
#[allow(dead_code)]
#[path = "../../llm/src/serve.rs"]
mod serve;

use serve::{kind, Event, FinishReason, PromptKind, RefusalCode, Request, NO_TOKEN};

const CONFIG: VmConfig = VmConfig::new(128 << 20).with_accel(64 << 20);
const TIMEOUT: Duration = Duration::from_secs(120);

/// Writes ferry-llm's tiny model to `path`, with one more token, spelling `answer`, and
/// weights that make it the most likely after any token: every weight is zero but the
/// output norm's (ones) and the (tied) embedding's, ones, twos for `answer`'s row. So a
/// token's embedding passes the blocks unchanged, and its logits are the rows' sums.
fn tiny_model(path: &Path, answer: &str) {
    let mut vocab = gguf::tiny_vocab();
    let id = vocab.tokens.len();
    vocab.tokens.push(gguf::spell(answer));
    vocab.types.push(1);
    let rows = vocab.tokens.len() as u64;
    let mut w = gguf::tiny_llama();
    w.set("tokenizer.ggml.tokens", gguf::V::Strs(vocab.tokens));
    w.set("tokenizer.ggml.token_type", gguf::V::I32s(vocab.types));
    w.set("llama.context_length", gguf::V::U32(1024));
    w.find_tensor("token_embd.weight").dims = vec![gguf::DIM, rows];
    let (mut bytes, offsets) = w.build_with_offsets();
    let sizes: Vec<u64> = (w.tensors.iter())
        .map(|t| gguf::tensor_bytes(t.code, &t.dims))
        .collect();
    let end = offsets
        .iter()
        .zip(&sizes)
        .map(|(o, s)| o + s)
        .max()
        .unwrap();
    let data = bytes.len() - end as usize;
    bytes[data..].fill(0);
    for (t, &offset) in w.tensors.iter().zip(&offsets) {
        let at = data + offset as usize;
        let f32s: Vec<f32> = match t.name.as_str() {
            "output_norm.weight" => vec![1.0; gguf::DIM as usize],
            "token_embd.weight" => (0..rows as usize)
                .flat_map(|r| [if r == id { 2.0 } else { 1.0 }; gguf::DIM as usize])
                .collect(),
            _ => continue,
        };
        for (i, x) in f32s.iter().enumerate() {
            bytes[at + 4 * i..at + 4 * i + 4].copy_from_slice(&x.to_le_bytes());
        }
    }
    std::fs::write(path, bytes).unwrap();
}

/// A model file answering `answer` in a directory of its own.
fn model_file(test: &str, answer: &str) -> PathBuf {
    let path = ferry_testdata::scratch_dir("serve").join(format!("{test}.gguf"));
    tiny_model(&path, answer);
    path
}

/// An `llm-serve` VM serving `model` with `args`, ready for requests.
struct Server {
    vm: Microvm,
    next: u64,
    /// The events read so far of each stream (a read lets go of those before it).
    seen: HashMap<u64, Vec<Event>>,
}

impl Server {
    fn start(model: &Path, args: &[&str]) -> Server {
        let host = HostOptions {
            files: AttachedFiles::open(&[("model".into(), model.to_path_buf())]).unwrap(),
            ..HostOptions::quiet()
        };
        let image = ferry_guest_images::find("llm-serve").unwrap().elf;
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let mut vm = Microvm::boot(CONFIG, image, &args, host).expect("boot");
        vm.resume().unwrap();
        let deadline = Instant::now() + TIMEOUT;
        while !vm.console_tail().contains("llm-serve: ready") {
            assert!(
                vm.wait(Some(Duration::from_millis(20))).is_none(),
                "llm-serve ended:\n{}",
                vm.console_tail()
            );
            assert!(Instant::now() < deadline, "{}", vm.console_tail());
        }
        Server {
            vm,
            next: 1,
            seen: HashMap::new(),
        }
    }

    /// Opens a stream with `request`; returns its id.
    fn submit(&mut self, request: &Request) -> u64 {
        let stream = self.next;
        self.next += 1;
        let message = Message {
            kind: kind::REQUEST,
            payload: request.encode(),
        };
        let deadline = Instant::now() + TIMEOUT;
        // The guest sets its channel up after loading the model: that is before "ready".
        while let Err(e) = self.vm.readout().channel().submit(stream, message.clone()) {
            assert!(Instant::now() < deadline, "submit: {e}");
            std::thread::sleep(Duration::from_millis(5));
        }
        stream
    }

    fn cancel(&self, stream: u64) {
        let cancel = Message {
            kind: kind::CANCEL,
            payload: Vec::new(),
        };
        // The stream may have ended already.
        let _ = self.vm.readout().channel().signal(stream, cancel);
    }

    /// Reads what stream `stream` sent since the last read, waiting until there is
    /// something; panics with the console if the stream ends without a final event.
    fn read(&mut self, stream: u64) {
        let seen = self.seen.entry(stream).or_default();
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let read = (self.vm.readout().channel())
                .read(stream, seen.len(), Duration::from_millis(100))
                .unwrap();
            if !read.events.is_empty() {
                seen.extend(read.events.iter().map(|m| {
                    assert_eq!(m.kind, kind::EVENT);
                    Event::decode(&m.payload).unwrap_or_else(|e| {
                        panic!("stream {stream}: {e} ({} bytes)", m.payload.len())
                    })
                }));
                return;
            }
            if let Some(exit) = self.vm.wait(Some(Duration::ZERO)) {
                panic!(
                    "stream {stream}: the guest ended ({exit:?}):\n{}",
                    self.vm.console_tail()
                );
            }
            assert!(
                read.end == StreamEnd::Open && Instant::now() < deadline,
                "stream {stream} ended {:?} without a final event:\n{}",
                read.end,
                self.vm.console_tail()
            );
        }
    }

    /// Waits until stream `stream` has sent `n` events.
    fn wait_for(&mut self, stream: u64, n: usize) {
        while self.seen.get(&stream).map_or(0, Vec::len) < n {
            self.read(stream);
        }
    }

    /// Every event of `stream`, up to and with the final one.
    fn answer(&mut self, stream: u64) -> Vec<Event> {
        while !(self.seen.get(&stream)).is_some_and(|e| e.last().is_some_and(Event::is_final)) {
            self.read(stream);
        }
        self.seen.remove(&stream).unwrap()
    }
}

/// A raw completion of `prompt`, greedy, of at most `max_tokens` tokens.
fn raw(prompt: &str, max_tokens: u32) -> Request {
    Request {
        prompt: PromptKind::Raw,
        messages: vec![(String::new(), prompt.into())],
        max_tokens,
        max_tokens_asked: true,
        temperature: 0.0,
        top_p: 1.0,
        seed: 1,
        stop: Vec::new(),
    }
}

/// The answer's text and its final event.
fn text_and_end(events: &[Event]) -> (String, Event) {
    let (last, tokens) = events.split_last().unwrap();
    let text = (tokens.iter())
        .map(|e| match e {
            Event::Token { text, .. } => text.as_str(),
            other => panic!("{other:?} before the end"),
        })
        .collect();
    (text, last.clone())
}

#[test]
fn cancelling_whole_decode_groups_leaves_the_others_served() {
    ferry_testdata::require_kvm!();
    let model = model_file("cancel", "ab");
    // One sequence per decode group: a cancel taken while one group's token is sent
    // empties the groups after it, in the same step.
    let mut server = Server::start(
        &model,
        &["--slots", "8", "--batch", "1", "--context", "1024"],
    );
    for round in 0..3 {
        let streams: Vec<u64> = (0..8).map(|_| server.submit(&raw("hello", 1000))).collect();
        // Every sequence well past its prompt, decoding.
        for &s in &streams {
            server.wait_for(s, 10);
        }
        // The others cancelled one by one, last slot first, at times that have nothing
        // to do with the guest's steps: each lands at a random point of one, and then
        // empties the group of its sequence if that comes later in the step.
        for &s in streams[1..].iter().rev() {
            std::thread::sleep(Duration::from_micros(700));
            server.cancel(s);
        }
        let (text, end) = text_and_end(&server.answer(streams[0]));
        assert_eq!(text, "ab".repeat(1000), "round {round}");
        assert_eq!(
            end,
            Event::Done {
                reason: FinishReason::Length,
                prompt_tokens: 1,
                completion_tokens: 1000
            },
            "round {round}"
        );
        for &s in &streams[1..] {
            let answer = server.answer(s);
            assert!(
                matches!(
                    answer.last(),
                    Some(Event::Done {
                        reason: FinishReason::Cancelled,
                        ..
                    })
                ),
                "round {round}: {answer:?}"
            );
        }
    }
}

#[test]
fn a_token_longer_than_a_response_slot_reaches_the_host_whole() {
    ferry_testdata::require_kvm!();
    // 600 bytes of two-byte characters: more than a response slot (512 bytes) holds.
    let long = "é".repeat(300);
    let model = model_file("long-token", &long);
    let mut server = Server::start(&model, &["--slots", "2"]);
    let stream = server.submit(&raw("hello", 4));
    let answer = server.answer(stream);
    let (text, end) = text_and_end(&answer);
    assert_eq!(text, long.repeat(4));
    assert_eq!(
        end,
        Event::Done {
            reason: FinishReason::Length,
            prompt_tokens: 1,
            completion_tokens: 4
        }
    );
    // Each token in two events: its id, then the rest of its text.
    let ids: Vec<u32> = (answer.iter())
        .filter_map(|e| match e {
            Event::Token { id, .. } => Some(*id),
            _ => None,
        })
        .collect();
    let id = gguf::tiny_vocab().tokens.len() as u32;
    assert_eq!(ids, [id, NO_TOKEN].repeat(4));
}

#[test]
fn streams_let_go_of_while_open_stop_their_work_and_leave_no_request_behind() {
    ferry_testdata::require_kvm!();
    let model = model_file("released", "ab");
    let mut server = Server::start(&model, &["--slots", "1", "--context", "1024"]);
    // The one slot busy with a long answer.
    let long = server.submit(&raw("hello", 1000));
    server.wait_for(long, 10);
    // Streams let go of at once: the host forgets each and tells the guest, which drops
    // its request. Before it was told, 64 of them filled the guest's queue for good and
    // every later request was refused as busy.
    for _ in 0..64 {
        let left = server.submit(&raw("hello", 500));
        server.vm.readout().channel().release(left).unwrap();
    }
    let next = server.submit(&raw("hello", 4));
    // The long answer let go of mid-way: the guest stops it and serves the next.
    server.vm.readout().channel().release(long).unwrap();
    let (text, end) = text_and_end(&server.answer(next));
    assert_eq!(text, "ab".repeat(4));
    assert_eq!(
        end,
        Event::Done {
            reason: FinishReason::Length,
            prompt_tokens: 1,
            completion_tokens: 4
        }
    );
    let console = server.vm.console_tail();
    let stopped = console
        .lines()
        .find_map(|l| {
            l.strip_prefix(&format!(
                "llm-serve: request {long} ended (cancelled): 1 prompt tokens, "
            ))
        })
        .unwrap_or_else(|| panic!("the long answer did not stop:\n{console}"));
    let generated: u32 = stopped.split(' ').next().unwrap().parse().unwrap();
    assert!((10..1000).contains(&generated), "{stopped}");
    // Only those two were served: the released requests never were.
    assert!(
        console.contains(&format!(
            "request {next} ended (length): 1 prompt tokens, 4 generated (2 served)"
        )),
        "{console}"
    );

    // A stream opened by anything but a request is answered, not held open for ever.
    let stream = server.next;
    server.next += 1;
    let odd = Message {
        kind: 99,
        payload: Vec::new(),
    };
    server.vm.readout().channel().submit(stream, odd).unwrap();
    assert!(matches!(
        &server.answer(stream)[..],
        [Event::Error {
            code: RefusalCode::InvalidRequest,
            ..
        }]
    ));
    assert!(
        server.vm.wait(Some(Duration::ZERO)).is_none(),
        "the guest runs on"
    );
}

#[test]
fn bad_requests_are_refused_one_by_one_while_the_others_are_served() {
    ferry_testdata::require_kvm!();
    let model = model_file("refuse", "ab");
    let mut server = Server::start(&model, &["--slots", "2"]);
    let good = server.submit(&raw("hello", 200));
    let sampled = |temperature, top_p| Request {
        temperature,
        top_p,
        ..raw("hello", 4)
    };
    let mut two = raw("hello", 4);
    two.messages.push((String::new(), "world".into()));
    let bad = [
        // Out of range even where no sampler would run (greedy).
        (
            sampled(-1.0, 1.0),
            "temperature -1 is not a finite number >= 0",
        ),
        (
            sampled(f32::NAN, 1.0),
            "temperature NaN is not a finite number >= 0",
        ),
        (sampled(0.0, 1.5), "top_p 1.5 is not in [0, 1]"),
        (sampled(0.7, f32::NAN), "top_p NaN is not in [0, 1]"),
        (two, "a raw prompt is one text, not 2 messages"),
    ];
    for (request, message) in bad {
        let stream = server.submit(&request);
        assert_eq!(
            server.answer(stream),
            [Event::Error {
                code: RefusalCode::InvalidRequest,
                message: message.into()
            }]
        );
    }
    let (text, end) = text_and_end(&server.answer(good));
    assert_eq!(text, "ab".repeat(200));
    assert_eq!(
        end,
        Event::Done {
            reason: FinishReason::Length,
            prompt_tokens: 1,
            completion_tokens: 200
        }
    );
}

#[test]
fn a_pause_the_vm_runs_on_after_queues_requests_and_one_that_may_move_it_refuses_them() {
    ferry_testdata::require_kvm!();
    let model = model_file("paused", "ab");
    let mut server = Server::start(&model, &["--slots", "2"]);
    let request = |prompt: &str| Message {
        kind: kind::REQUEST,
        payload: raw(prompt, 8).encode(),
    };
    // A throttle's pause: a request sent meanwhile is queued, and answered once the VM
    // runs again.
    server.vm.pause_for_throttle().unwrap();
    let readout = server.vm.readout();
    let channel = readout.channel();
    channel.submit(100, request("hello")).unwrap();
    // A switchover taking that pause over: from then on, requests are refused.
    server.vm.refuse_requests();
    assert!(matches!(
        channel.submit(101, request("hello")),
        Err(SubmitError::Paused)
    ));
    server.vm.resume().unwrap();
    let (text, _) = text_and_end(&server.answer(100));
    assert_eq!(text, "ab".repeat(8));
    // A plain pause (its state may become another host's) refuses them at once.
    server.vm.pause().unwrap();
    assert!(matches!(
        channel.submit(102, request("hello")),
        Err(SubmitError::Paused)
    ));
    server.vm.resume().unwrap();
}
