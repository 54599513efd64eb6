//! The entry points of Ferry's fuzzers: each takes arbitrary bytes, feeds them to one
//! parser or validator of untrusted input, and must return without panicking, hanging or
//! allocating beyond the limits the code promises. `fuzz/` runs them under libFuzzer
//! (nightly); `tests/regressions.rs` replays the inputs kept in `fuzz/regressions/` on
//! stable, so every crash found stays fixed.

use std::io::{Cursor, Read, Write};

/// A fuzz target: arbitrary bytes in, nothing out (it must not panic).
pub type Target = fn(&[u8]);

/// The targets, by name (the name of the fuzzer and of its folder of inputs).
pub const TARGETS: [(&str, Target); 6] = [
    ("wire", wire),
    ("kernel_decode", kernel_decode),
    ("snapshot", snapshot),
    ("gguf", gguf),
    ("api_bodies", api_bodies),
    ("channel", channel),
];

/// A connection that reads the fuzzer's bytes and swallows what is written.
struct Replay(Cursor<Vec<u8>>);

impl Read for Replay {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for Replay {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The migration stream: frames (headers, checksums, LZ4, records) and control
/// messages off the wire, first as an unauthenticated peer's (handshake-sized frames),
/// then as an authenticated one's.
pub fn wire(data: &[u8]) {
    use ferry_migrate::wire::{FrameStream, MAX_HANDSHAKE_FRAME};
    for limited in [true, false] {
        let mut conn = FrameStream::new(Replay(Cursor::new(data.to_vec())), false);
        if limited {
            conn.limit_frames(MAX_HANDSHAKE_FRAME);
        }
        // Each frame is consumed whole or refused; the stream ends at the first error.
        for _ in 0..64 {
            if conn.read().is_err() {
                break;
            }
        }
    }
}

/// The accelerator's LAUNCH validation: kernel id and arguments, and buffer sizes, all
/// from the fuzzer.
pub fn kernel_decode(data: &[u8]) {
    use ferry_abi::accel::kernel::Kernel;
    let words: Vec<u64> = data
        .chunks(8)
        .map(|c| {
            let mut w = [0u8; 8];
            w[..c.len()].copy_from_slice(c);
            u64::from_le_bytes(w)
        })
        .collect();
    let (sizes, args) = words.split_at(words.len().min(4));
    // Buffers 1..=4 exist with the sizes the fuzzer gave (small ones mostly).
    let buffer_len = |id: u32| {
        sizes
            .get((id as usize).wrapping_sub(1))
            .map(|&s| s % (1 << 40))
    };
    let _ = Kernel::decode(args, buffer_len);
}

/// A VM that takes a snapshot's contents and keeps nothing, but decodes the state.
struct Discard;

impl ferry_migrate::MigrationTarget for Discard {
    fn write_ram(&self, _gpa: u64, _data: &[u8]) -> Result<(), ferry_migrate::VmError> {
        Ok(())
    }
    fn sync_buffers(
        &self,
        _table: &[ferry_migrate::DeviceBuffer],
    ) -> Result<(), ferry_migrate::VmError> {
        Ok(())
    }
    fn write_chunk(
        &self,
        _chunk: ferry_migrate::ChunkKey,
        _write: ferry_migrate::ChunkWrite<'_>,
    ) -> Result<(), ferry_migrate::VmError> {
        Ok(())
    }
    fn restore(&self, state: &[u8]) -> Result<(), ferry_migrate::VmError> {
        postcard::from_bytes::<ferry_vmm::MicrovmState>(state)
            .map(drop)
            .map_err(|e| ferry_migrate::VmError::Restore(e.into()))
    }
    fn resume(&self) -> Result<(), ferry_migrate::VmError> {
        Ok(())
    }
}

/// The snapshot file: header, the VM's description, its frames, the trailer and the
/// state, loaded into a VM that keeps nothing.
pub fn snapshot(data: &[u8]) {
    use ferry_migrate::snapshot::SnapshotReader;
    let dir = std::env::temp_dir().join(format!("ferry-fuzz-snapshot-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("vm.snap");
    if std::fs::write(&path, data).is_ok() {
        if let Ok(reader) = SnapshotReader::open(&path) {
            let _ = reader.load_into(&Discard);
        }
    }
    // Each test process has its own folder: left behind, they pile up in /tmp.
    let _ = std::fs::remove_dir_all(&dir);
}

/// A GGUF file's header, and the llama configuration and tokenizer read from it.
pub fn gguf(data: &[u8]) {
    use ferry_llm::gguf::Gguf;
    let Ok(file) = Gguf::parse(data, data.len() as u64) else {
        return;
    };
    if let Ok(model) = ferry_llm::llama::LlamaModel::from_gguf(&file) {
        // The rope factors' bytes, where the table puts them inside the input.
        let factors = model.rope_factors.and_then(|w| {
            let start = usize::try_from(w.offset).ok()?;
            data.get(start..start.checked_add(usize::try_from(w.size).ok()?)?)
        });
        let _ = model.rope_factor_values(factors.unwrap_or_default());
    }
    if let Ok(tokenizer) = ferry_llm::tokenizer::Tokenizer::from_gguf(&file) {
        let _ = tokenizer.encode("Hello, world! <|im_start|>", true);
    }
}

/// The host's and the center's request bodies, parsed and validated as the APIs do.
pub fn api_bodies(data: &[u8]) {
    let _ = serde_json::from_slice::<ferry_api::CreateVm>(data);
    if let Ok(req) = serde_json::from_slice::<ferry_api::MigrateRequest>(data) {
        let _ = ferry_host::migration_options(&req);
    }
    let _ = serde_json::from_slice::<ferry_api::SettleRequest>(data);
    let _ = serde_json::from_slice::<ferry_api::Heartbeat>(data);
    let _ = serde_json::from_slice::<ferry_center::PlaceVm>(data);
    let _ = postcard::from_bytes::<ferry_migrate::VmDescription>(data);
    let _ = serde_json::from_slice::<ferry_api::ChannelMessage>(data);
}

/// A guest's message channel: the bytes are what the guest writes over its channel
/// region between kicks (8-byte offset, 8-byte value, repeated), with the host queuing
/// requests and reading streams in between; and the serving messages decoded as the
/// guest and the gateway decode them.
pub fn channel(data: &[u8]) {
    use ferry_abi::channel::{ChannelHeader, CHANNEL_MAGIC, CHANNEL_VERSION};
    use ferry_vmm::devices::channel::{Channel, Message};
    use std::time::Duration;
    use vm_memory::{Bytes, GuestAddress};

    let _ = ferry_llm::serve::Request::decode(data);
    let _ = ferry_llm::serve::Event::decode(data);
    const REGION: u64 = 0x20_0000;
    let Ok(mem) = ferry_vmm::memory::create_guest_ram(16 << 20) else {
        return;
    };
    let header = ChannelHeader {
        magic: CHANNEL_MAGIC,
        version: CHANNEL_VERSION,
        request_slots: 4,
        request_slot_size: 512,
        response_slots: 4,
        response_slot_size: 256,
        ..ChannelHeader::default()
    };
    let bytes: Vec<u8> = [
        header.magic.to_le_bytes(),
        header.version.to_le_bytes(),
        header.request_slots.to_le_bytes(),
        header.request_slot_size.to_le_bytes(),
        header.response_slots.to_le_bytes(),
        header.response_slot_size.to_le_bytes(),
    ]
    .concat();
    let _ = mem.write_slice(&bytes, GuestAddress(REGION));
    let ch = Channel::new();
    ch.setup(&mem, (REGION >> 12) as u32);
    ch.open();
    let size = header.region_size().unwrap_or(4096);
    for (i, op) in data.chunks(16).enumerate() {
        if op.len() < 16 {
            break;
        }
        let offset = u64::from_le_bytes(op[..8].try_into().unwrap()) % size;
        let value = u64::from_le_bytes(op[8..].try_into().unwrap());
        let _ = mem.write_obj(value, GuestAddress(REGION + (offset & !7)));
        let stream = (i % 3) as u64;
        let _ = ch.submit(
            stream,
            Message {
                kind: 1,
                payload: op.to_vec(),
            },
        );
        ch.kick(&mem, 0);
        // From an index the input picks: reads let go of what came before.
        let _ = ch.read(stream, (value >> 56) as usize % 8, Duration::ZERO);
        if i % 5 == 4 {
            let _ = ch.release(stream);
        }
    }
    let saved = ch.save();
    let restored = Channel::restore(&saved, &mem);
    restored.open();
    restored.kick(&mem, 0);
}
