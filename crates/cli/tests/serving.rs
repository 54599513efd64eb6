//! An `llm-serve` VM (SmolLM2) behind the center's OpenAI-compatible gateway: the
//! official `openai` Python client streams an answer while the VM migrates, and gets the
//! text an unmigrated run gives; concurrent clients keep being answered while the VM
//! moves back and forth; bad requests get OpenAI-shaped 4xx errors; a client that hangs
//! up stops the generation.
//!
//! They need the model (`scripts/fetch-model`) and, for the client test, the `openai`
//! Python package (`.ci/run` installs both); without them they say SKIPPED loudly (and
//! fail under FERRY_REQUIRE_MODEL=1).

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

mod common;

use common::{kvm_and_smollm2, kvm_available, report, wait_for, CenterProcess, Daemon};

const TOKEN: &str = "service-token-0123456789";
const PROMPT: &str = "Write a short story about a lighthouse keeper and a storm.";

/// A center with hosts a and b, and an `llm-serve` VM on a.
struct Serving {
    center: CenterProcess,
    a: Daemon,
    b: Daemon,
    vm: String,
}

impl Serving {
    fn start(test: &str, model: &std::path::Path) -> Self {
        let dir = common::empty_dir(&format!("serving-{test}"));
        let center = CenterProcess::start(&dir.join("center.db"), "127.0.0.1:0", TOKEN, &[]);
        let host = |name| {
            Daemon::start_with(
                name,
                &[
                    "--center",
                    &center.url,
                    "--heartbeat-ms",
                    "200",
                    "--accel-capacity",
                    "2G",
                ],
            )
        };
        let (a, b) = (host("a"), host("b"));
        let attach = format!("model={}", model.display());
        let created = a.vm(&[
            "create",
            "llm-serve",
            "--name",
            "smollm2",
            "--memory",
            "256M",
            "--accel-memory",
            "512M",
            "--attach",
            &attach,
            "--",
            "--slots",
            "4",
            "--context",
            "512",
        ]);
        assert_eq!(created["name"], "smollm2", "{created}");
        let vm = created["id"].as_str().unwrap().to_string();
        a.wait_console(&vm, "llm-serve: ready");
        let serving = Self { center, a, b, vm };
        wait_for(
            "the gateway to list the model",
            Duration::from_secs(30),
            || {
                let (status, models) = serving.get("/v1/models");
                (status == 200 && models["data"].to_string().contains(&serving.vm)).then_some(())
            },
        );
        serving
    }

    fn agent() -> ureq::Agent {
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(300)))
            .build()
            .new_agent()
    }

    fn get(&self, path: &str) -> (u16, Value) {
        let mut r = Self::agent()
            .get(format!("{}{path}", self.center.url))
            .header("Authorization", &format!("Bearer {TOKEN}"))
            .call()
            .unwrap();
        let body = r.body_mut().read_to_string().unwrap();
        (
            r.status().as_u16(),
            serde_json::from_str(&body).unwrap_or(Value::Null),
        )
    }

    /// POSTs `body` (raw) to `path` with `token`; the status, headers' Retry-After and
    /// the body as JSON.
    fn post_raw(&self, path: &str, token: &str, body: &str) -> (u16, Option<String>, Value) {
        let mut r = Self::agent()
            .post(format!("{}{path}", self.center.url))
            .header("Authorization", &format!("Bearer {token}"))
            .header("Content-Type", "application/json")
            .send(body)
            .unwrap();
        let retry = r
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_string());
        let text = r.body_mut().read_to_string().unwrap();
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (r.status().as_u16(), retry, value)
    }

    fn chat(&self, body: &Value) -> (u16, Value) {
        let (status, _, v) = self.post_raw("/v1/chat/completions", TOKEN, &body.to_string());
        (status, v)
    }

    fn request(&self, seed: u64, max_tokens: u32) -> Value {
        json!({
            "model": self.vm,
            "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": max_tokens,
            "temperature": 0.8,
            "top_p": 0.95,
            "seed": seed,
        })
    }

    /// The whole answer to `request(seed, max_tokens)`, not streamed.
    fn answer(&self, seed: u64, max_tokens: u32) -> (String, Value) {
        self.complete(&self.request(seed, max_tokens))
    }

    /// The whole answer to `body`, not streamed, and its usage.
    fn complete(&self, body: &Value) -> (String, Value) {
        let (status, v) = self.chat(body);
        assert_eq!(status, 200, "{v}");
        let content = v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string();
        (content, v["usage"].clone())
    }
}

impl Serving {
    /// Runs `work` while `clients` clients keep sending requests (seeds `seed..`, each
    /// of `tokens` tokens) and check every answer against its answer before `work`
    /// began; returns how many answers were checked, and what `work` returned.
    fn under_load<R: Send>(
        &self,
        clients: u64,
        seed: u64,
        tokens: u32,
        work: impl FnOnce() -> R + Send,
    ) -> (u32, R) {
        // Half the clients sample, half take the most likely tokens (picked on the device
        // for all the sequences decoded together).
        let bodies: Vec<Value> = (0..clients)
            .map(|c| {
                let mut body = self.request(seed + c, tokens);
                if c % 2 == 1 {
                    body["temperature"] = json!(0.0);
                }
                body
            })
            .collect();
        let references: Vec<String> = bodies.iter().map(|b| self.complete(b).0).collect();
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|scope| {
            let running: Vec<_> = (0..clients)
                .map(|c| {
                    let (stop, references, body) = (&stop, &references, &bodies[c as usize]);
                    scope.spawn(move || {
                        let mut checked = 0;
                        while !stop.load(std::sync::atomic::Ordering::Relaxed) || checked == 0 {
                            let (status, v) = self.chat(body);
                            assert_eq!(status, 200, "client {c}: {v}");
                            let content = v["choices"][0]["message"]["content"].as_str();
                            assert_eq!(
                                content,
                                Some(references[c as usize].as_str()),
                                "client {c}"
                            );
                            checked += 1;
                        }
                        checked
                    })
                })
                .collect();
            let result = work();
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            let answers = running.into_iter().map(|c| c.join().unwrap()).sum();
            (answers, result)
        })
    }
}

/// The official client streaming one chat completion, printing each piece as a JSON
/// string on its own line, then `FINISH <reason>`.
const CLIENT: &str = r#"
import json, sys, openai
url, token, model, prompt, seed, max_tokens = sys.argv[1:7]
client = openai.OpenAI(base_url=url + "/v1", api_key=token, max_retries=0, timeout=300)
stream = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": prompt}], stream=True,
    max_tokens=int(max_tokens), temperature=0.8, top_p=0.95, seed=int(seed))
for chunk in stream:
    choice = chunk.choices[0]
    if choice.delta.content:
        print(json.dumps(choice.delta.content), flush=True)
    if choice.finish_reason:
        print("FINISH", choice.finish_reason, flush=True)
"#;

fn has_openai(test: &str) -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import openai"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        ferry_testdata::missing_tool(
            test,
            "python3 with the openai package is missing (pip install openai)",
        );
    }
    ok
}

#[test]
fn the_openai_client_streams_an_answer_across_a_live_migration_unchanged() {
    let test = "the_openai_client_streams_an_answer_across_a_live_migration_unchanged";
    if !kvm_available(test) || !has_openai(test) {
        return;
    }
    let Some(model) = ferry_testdata::smollm2(test) else {
        return;
    };
    let s = Serving::start(test, &model);
    let (want, usage) = s.answer(11, 160);
    assert!(want.len() > 200, "a long answer: {want:?}");

    // The client names the model by the name the VM was given.
    let mut client = Command::new("python3")
        .args([
            "-c",
            CLIENT,
            &s.center.url,
            TOKEN,
            "smollm2",
            PROMPT,
            "11",
            "160",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(client.stdout.take().unwrap()).lines();
    let mut got = String::new();
    let mut pieces = 0;
    let mut finish = None;
    let mut moved = None;
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(reason) = line.strip_prefix("FINISH ") {
            finish = Some(reason.to_string());
            continue;
        }
        got.push_str(&serde_json::from_str::<String>(&line).unwrap());
        pieces += 1;
        if pieces == 15 {
            // Mid-answer: the VM moves to b while the client keeps reading.
            moved = Some(report(&s.a.migrate(&s.vm, &s.b.migration, &[])));
        }
    }
    let mut stderr = String::new();
    client
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(client.wait().unwrap().success(), "client failed: {stderr}");
    let moved = moved.expect("the answer was long enough to migrate in the middle");
    assert!(moved["downtime_ms"].as_f64().is_some(), "{moved}");
    assert_eq!(
        got, want,
        "the streamed text differs from the unmigrated answer"
    );
    let expected_finish = if usage["completion_tokens"] == 160 {
        "length"
    } else {
        "stop"
    };
    assert_eq!(finish.as_deref(), Some(expected_finish));
    // The VM answers on b now, through the same address.
    assert_eq!(s.answer(11, 160).0, want);
    let vm_on_b = s.b.show(&s.vm);
    assert_eq!(vm_on_b["state"], "running", "{vm_on_b}");
}

#[test]
fn concurrent_clients_lose_nothing_while_the_vm_moves_back_and_forth() {
    let test = "concurrent_clients_lose_nothing_while_the_vm_moves_back_and_forth";
    let Some(model) = kvm_and_smollm2(test) else {
        return;
    };
    let s = Serving::start(test, &model);
    let (answers, moves) = s.under_load(8, 100, 24, || {
        let mut moves = Vec::new();
        for i in 0..10 {
            let (from, to) = if i % 2 == 0 {
                (&s.a, &s.b)
            } else {
                (&s.b, &s.a)
            };
            std::thread::sleep(Duration::from_millis(300));
            moves.push(report(&from.migrate(&s.vm, &to.migration, &[])));
        }
        moves
    });
    assert_eq!(moves.len(), 10);
    assert!(answers >= 8, "every client was answered: {answers}");
    eprintln!("{answers} answers checked across 10 migrations, none failed");

    // Every answer has ended, so the KV caches hold nothing a migration must send (4
    // slots × 30 layers × keys and values: 240 caches, each written in at least one
    // chunk by an answer, 60 a slot): what is left is the rest of the device's memory
    // not sent as the model file's pieces (the activations and the like), which took 34,
    // 52 and 60 chunks in three runs. So fewer than 90: one slot's caches left over,
    // with the fewest of the rest, would be 94. The guest empties an ended answer's cache
    // just after sending its end, which a client may read first: a move begun at once
    // can still find the caches, so it is made again, up to 4 times.
    let mut idle = Value::Null;
    for i in 0..4 {
        let (from, to) = if i % 2 == 0 {
            (&s.a, &s.b)
        } else {
            (&s.b, &s.a)
        };
        idle = report(&from.migrate(&s.vm, &to.migration, &[]));
        let chunks = idle["round_log"][0]["chunks"].as_u64().unwrap();
        eprintln!("idle move {i} sent {chunks} device chunks in its first round");
        if chunks < 90 {
            return;
        }
    }
    panic!("every move of the idle server sent 90 device chunks or more: {idle}");
}

#[test]
fn bad_requests_get_openai_errors_and_a_hung_up_client_stops_its_generation() {
    let test = "bad_requests_get_openai_errors_and_a_hung_up_client_stops_its_generation";
    let Some(model) = kvm_and_smollm2(test) else {
        return;
    };
    let s = Serving::start(test, &model);
    let path = "/v1/chat/completions";
    let base = s.request(1, 8);
    let with = |field: &str, value: Value| {
        let mut b = base.clone();
        b[field] = value;
        b.to_string()
    };
    let long = "lighthouse ".repeat(700);
    for (what, body, status, code) in [
        (
            "malformed JSON",
            "{\"model\": ".to_string(),
            400,
            "invalid_request_body",
        ),
        (
            "unknown model",
            with("model", json!("nope")),
            404,
            "model_not_found",
        ),
        (
            "unknown field",
            with("frequency_penalty_x", json!(1)),
            400,
            "invalid_request_body",
        ),
        (
            "max_tokens 0",
            with("max_tokens", json!(0)),
            400,
            "invalid_value",
        ),
        (
            "max_tokens too big",
            with("max_tokens", json!(100000)),
            400,
            "invalid_value",
        ),
        (
            "temperature",
            with("temperature", json!(7)),
            400,
            "invalid_value",
        ),
        (
            "prompt longer than the context",
            with("messages", json!([{"role": "user", "content": long}])),
            400,
            "context_length_exceeded",
        ),
        (
            "max_tokens past what the context leaves",
            with("max_tokens", json!(500)),
            400,
            "context_length_exceeded",
        ),
        (
            "a body over the 256 KiB limit",
            " ".repeat(ferry_center::gateway::MAX_BODY_BYTES + 64),
            413,
            "request_too_large",
        ),
    ] {
        let (got, _, v) = s.post_raw(path, TOKEN, &body);
        assert_eq!(got, status, "{what}: {v}");
        assert_eq!(v["error"]["code"], code, "{what}: {v}");
        assert!(
            v["error"]["message"].as_str().unwrap().len() > 5,
            "{what}: {v}"
        );
        assert!(v["error"]["type"].is_string(), "{what}: {v}");
        if code == "context_length_exceeded" {
            // In OpenAI's words, which clients' wrappers look for.
            let message = v["error"]["message"].as_str().unwrap();
            assert!(message.contains("maximum context length is"), "{what}: {v}");
        }
    }
    let (status, _, v) = s.post_raw(path, "wrong-token-0123456789", &base.to_string());
    assert_eq!(status, 401, "{v}");
    assert_eq!(v["error"]["code"], "invalid_api_key", "{v}");
    // A wrong method: refused by the router itself, in OpenAI's shape all the same.
    let mut r = Serving::agent()
        .get(format!("{}{path}", s.center.url))
        .header("Authorization", &format!("Bearer {TOKEN}"))
        .call()
        .unwrap();
    let v: Value = serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap();
    assert_eq!(r.status().as_u16(), 405, "{v}");
    assert_eq!(v["error"]["code"], "method_not_allowed", "{v}");

    // A streaming client that reads a few events and hangs up.
    let mut body = s.request(5, 400);
    body["stream"] = json!(true);
    let mut r = Serving::agent()
        .post(format!("{}{path}", s.center.url))
        .header("Authorization", &format!("Bearer {TOKEN}"))
        .send(body.to_string())
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let mut reader = BufReader::new(r.body_mut().as_reader());
    let mut events = 0;
    let mut line = String::new();
    while events < 5 {
        line.clear();
        reader.read_line(&mut line).unwrap();
        if line.starts_with("data: {") {
            events += 1;
        }
    }
    drop(reader);
    drop(r);
    s.a.wait_console(&s.vm, "ended (cancelled)");
    let console = s.a.show(&s.vm)["console_tail"]
        .as_str()
        .unwrap()
        .to_string();
    let line = console
        .lines()
        .find(|l| l.contains("ended (cancelled)"))
        .unwrap();
    let generated: u32 = line
        .split(" prompt tokens, ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .unwrap()
        .parse()
        .unwrap();
    assert!(generated < 400, "the generation stopped early: {line}");
    // And the server still answers.
    assert_eq!(s.chat(&s.request(1, 8)).0, 200);

    // A prompt longer than the context is refused at once while every slot is busy: the
    // guest checks a request as it arrives, not when a slot frees (then the gateway had
    // begun the stream, and its client got a 200 with the error inside, much later).
    let busy: Vec<_> = (0..4)
        .map(|seed| {
            let mut body = s.request(10 + seed, 400);
            body["stream"] = json!(true);
            let r = Serving::agent()
                .post(format!("{}{path}", s.center.url))
                .header("Authorization", &format!("Bearer {TOKEN}"))
                .send(body.to_string())
                .unwrap();
            assert_eq!(r.status().as_u16(), 200);
            let mut reader = BufReader::new(r.into_body().into_reader());
            // Its first token: its slot is taken.
            let mut line = String::new();
            while !(line.starts_with("data: {") && line.contains("\"content\"")) {
                line.clear();
                reader.read_line(&mut line).unwrap();
            }
            reader
        })
        .collect();
    let mut too_long = serde_json::from_str::<Value>(&with(
        "messages",
        json!([{"role": "user", "content": long}]),
    ))
    .unwrap();
    too_long["stream"] = json!(true);
    let (got, _, v) = s.post_raw(path, TOKEN, &too_long.to_string());
    assert_eq!(got, 400, "refused only once a slot freed: {v}");
    assert_eq!(v["error"]["code"], "context_length_exceeded", "{v}");
    drop(busy);
}

/// Host a, its API, and a `channel-abuse` VM on it whose channel is set up.
fn garbage_writing_guest() -> (Daemon, ferry_client::ApiClient, String) {
    let a = Daemon::start("a");
    let api = common::host_api(&a);
    let id = a.create_with(["channel-abuse", "64M", "0"], &[], &[]);
    a.wait_console(&id, "channel-abuse: set up");
    (a, api, id)
}

#[test]
fn a_guest_writing_garbage_to_its_channel_cannot_crash_or_stall_its_host() {
    let test = "a_guest_writing_garbage_to_its_channel_cannot_crash_or_stall_its_host";
    if !kvm_available(test) {
        return;
    }
    let (a, api, id) = garbage_writing_guest();
    let started = std::time::Instant::now();
    let mut stream = 0u64;
    let (mut accepted, mut events) = (0, 0);
    while started.elapsed() < Duration::from_secs(3) {
        stream += 1;
        let call = std::time::Instant::now();
        let message = json!({"stream": stream % 4, "kind": 1, "payload": "aGVsbG8="});
        match api.post::<_, Value>(&format!("/v1/vms/{id}/streams"), &message) {
            Ok(_) => accepted += 1,
            Err(e) => {
                let e = e.api().cloned().unwrap();
                assert!(
                    [409, 429, 503].contains(&e.status),
                    "a refusal, not a failure: {e:?}"
                );
            }
        }
        for s in 0..4 {
            match api.get::<Value>(&format!("/v1/vms/{id}/streams/{s}?from=0&wait_ms=50")) {
                Ok(chunk) => {
                    let n = chunk["events"].as_array().unwrap().len();
                    // The guest's garbage is kept within a stream's bound (96 KiB).
                    assert!(chunk.to_string().len() < 200 << 10, "{n} events");
                    events += n;
                }
                Err(e) => {
                    let e = e.api().cloned().unwrap();
                    assert_eq!(e.status, 404, "{e:?}");
                }
            }
        }
        let _: Value = api.get("/v1/host").unwrap();
        assert!(
            call.elapsed() < Duration::from_secs(2),
            "the host answered slowly: {:?}",
            call.elapsed()
        );
    }
    assert!(accepted > 0, "some requests were queued");
    // The guest keeps running (its kicks are answered), and the host stops it cleanly.
    a.wait_console(&id, "round 2000 ");
    assert_eq!(a.show(&id)["state"], "running");
    let (rss, _) = common::footprint(a.child.id());
    assert!(
        rss < 512 << 20,
        "the host's memory stayed bounded: {} MiB",
        rss >> 20
    );
    let _: Value = api.delete(&format!("/v1/vms/{id}")).unwrap();
    eprintln!("{accepted} requests queued, {events} garbage events read, host fine");
}

#[test]
fn hundreds_of_waiting_stream_reads_do_not_starve_the_rest_of_the_host_api() {
    let test = "hundreds_of_waiting_stream_reads_do_not_starve_the_rest_of_the_host_api";
    if !kvm_available(test) {
        return;
    }
    let (_a, api, id) = garbage_writing_guest();
    // A stream the guest never answers (its garbage goes to streams 0 to 3).
    let message = json!({"stream": 1000, "kind": 1, "payload": "aGVsbG8="});
    wait_for("the request queued", Duration::from_secs(10), || {
        api.post::<_, Value>(&format!("/v1/vms/{id}/streams"), &message)
            .ok()
    });
    // Sent again (as after a lost answer), it is refused as already there.
    let again = api
        .post::<_, Value>(&format!("/v1/vms/{id}/streams"), &message)
        .unwrap_err()
        .api()
        .cloned()
        .unwrap();
    assert_eq!(
        (again.status, again.code.as_deref()),
        (409, Some("stream_exists"))
    );
    // More reads waiting 10 s than the runtime has blocking threads (512).
    let readers: Vec<_> = (0..600)
        .map(|_| {
            let (api, path) = (
                api.clone(),
                format!("/v1/vms/{id}/streams/1000?from=0&wait_ms=10000"),
            );
            std::thread::spawn(move || {
                let started = std::time::Instant::now();
                let chunk: Value = api.get(&path).unwrap();
                assert_eq!(chunk["events"].as_array().unwrap().len(), 0, "{chunk}");
                started.elapsed()
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(2));
    let call = std::time::Instant::now();
    let _: Value = api.get("/v1/host").unwrap();
    let _: Value = api.get(&format!("/v1/vms/{id}")).unwrap();
    let answered_in = call.elapsed();
    let waits: Vec<Duration> = readers.into_iter().map(|r| r.join().unwrap()).collect();
    let waited = waits
        .iter()
        .filter(|w| **w >= Duration::from_secs(9))
        .count();
    eprintln!("600 reads: {waited} waited 10 s; the host answered in {answered_in:?} meanwhile");
    assert!(
        answered_in < Duration::from_secs(2),
        "the host API answered in {answered_in:?} while reads waited"
    );
    assert!((200..=256).contains(&waited), "{waited} reads waited 10 s");
    // A stream let go of while a read waits on it: the read ends then, not 10 s later.
    let waiting = {
        let (api, path) = (
            api.clone(),
            format!("/v1/vms/{id}/streams/1000?from=0&wait_ms=10000"),
        );
        std::thread::spawn(move || {
            let read = api.get::<Value>(&path);
            (read, std::time::Instant::now())
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let _: Value = api.delete(&format!("/v1/vms/{id}/streams/1000")).unwrap();
    let released = std::time::Instant::now();
    let (read, ended) = waiting.join().unwrap();
    let gone = read.unwrap_err().api().cloned().unwrap();
    assert_eq!(gone.status, 404, "{gone:?}");
    let after = ended.saturating_duration_since(released);
    assert!(
        after < Duration::from_secs(3),
        "the read ended {after:?} after its stream was let go of"
    );
    let _: Value = api.delete(&format!("/v1/vms/{id}")).unwrap();
}

#[test]
fn maintenance_under_load_moves_the_serving_vm_with_no_failed_request() {
    let test = "maintenance_under_load_moves_the_serving_vm_with_no_failed_request";
    let Some(model) = kvm_and_smollm2(test) else {
        return;
    };
    let s = Serving::start(test, &model);
    let (answers, op) = s.under_load(4, 200, 16, || {
        std::thread::sleep(Duration::from_millis(500));
        let (status, _, op) = s.post_raw("/v1/hosts/a/maintenance", TOKEN, "{}");
        assert!(status < 300, "{op}");
        let op = wait_for("the evacuation", Duration::from_secs(120), || {
            let (_, now) = s.get(&format!("/v1/operations/{}", op["id"]));
            (now["state"] != "running").then_some(now)
        });
        std::thread::sleep(Duration::from_millis(500));
        op
    });
    assert_eq!(op["state"], "done", "{op}");
    assert_eq!(s.b.show(&s.vm)["state"], "running");
    eprintln!("{answers} answers checked while host a was emptied, none failed");
}

#[test]
fn a_thousand_concurrent_requests_meet_a_bounded_queue() {
    let test = "a_thousand_concurrent_requests_meet_a_bounded_queue";
    let Some(model) = kvm_and_smollm2(test) else {
        return;
    };
    let s = Serving::start(test, &model);
    let body = s.request(3, 2).to_string();
    let outcomes: Vec<(u16, Option<String>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..1000)
            .map(|_| {
                let (s, body) = (&s, &body);
                std::thread::Builder::new()
                    .stack_size(256 << 10)
                    .spawn_scoped(scope, move || {
                        let (status, retry, _) = s.post_raw("/v1/chat/completions", TOKEN, body);
                        (status, retry)
                    })
                    .unwrap()
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let served = outcomes.iter().filter(|(s, _)| *s == 200).count();
    let refused: Vec<_> = outcomes.iter().filter(|(s, _)| *s != 200).collect();
    assert!(served > 0, "some were served");
    assert_eq!(served + refused.len(), 1000);
    for (status, retry) in &refused {
        assert!([429, 503].contains(status), "refused with {status}");
        assert_eq!(retry.as_deref(), Some("1"), "Retry-After on {status}");
    }
    let (rss, threads) = common::footprint(s.center.child.0.id());
    assert!(rss < 256 << 20, "the center's memory: {} MiB", rss >> 20);
    // The relays are gone, and the gateway serves as before.
    let (status, _) = s.chat(&s.request(3, 2));
    assert_eq!(status, 200);
    eprintln!(
        "1000 concurrent: {served} served, {} refused with Retry-After; center {} MiB, {threads} threads",
        refused.len(),
        rss >> 20
    );
}
