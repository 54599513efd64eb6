//! The GGUF parser on synthetic files: what it reads, and every way it refuses a file.

mod common;

use common::*;
use ferry_abi::accel::dtype::DType;
use ferry_llm::gguf::{Gguf, GgufError, ValueType};
use ferry_llm::{ChatTemplate, LlamaModel, Tokenizer};

fn parse(bytes: &[u8]) -> Result<Gguf<'_>, GgufError> {
    Gguf::parse(bytes, bytes.len() as u64)
}

fn small() -> Writer {
    Writer::new()
        .kv("general.architecture", s("llama"))
        .kv("u8", V::U8(7))
        .kv("i8", V::I8(-7))
        .kv("u16", V::U16(700))
        .kv("i16", V::I16(-700))
        .kv("u32", V::U32(70000))
        .kv("i32", V::I32(-70000))
        .kv("i32pos", V::I32(42))
        .kv("u64", V::U64(1 << 40))
        .kv("i64", V::I64(-(1 << 40)))
        .kv("f32", V::F32(1.5))
        .kv("f64", V::F64(2.25))
        .kv("bool", V::Bool(true))
        .kv("str", s("héllo"))
        .kv("strs", V::Strs(vec!["a".into(), "".into(), "ccc".into()]))
        .kv("i32s", V::I32s(vec![1, -2, 3]))
        .kv("f32s", V::F32s(vec![0.5, -1.0]))
        .kv(
            "bad_utf8",
            V::Raw(8, [2u64.to_le_bytes().as_slice(), &[0xff, 0xfe]].concat()),
        )
        .tensor("a", &[4, 3], 0)
        .tensor("b", &[64], 8)
        .tensor("c", &[32, 2, 1, 2], 3)
}

#[test]
fn reads_metadata_and_tensors() {
    let (bytes, offsets) = small().build_with_offsets();
    let g = parse(&bytes).unwrap();
    assert_eq!(g.version(), 3);
    assert_eq!(g.alignment(), 32);
    assert_eq!(g.data_offset() % 32, 0);
    assert!(g.header_len() <= g.data_offset() && g.data_offset() < g.header_len() + 32);
    assert_eq!(g.metadata().count(), 18);
    assert_eq!(g.metadata().next().unwrap().0, "general.architecture");

    assert_eq!(g.get_str("general.architecture"), Some("llama"));
    assert_eq!(g.get_u32("u8"), Some(7));
    assert_eq!(g.get_u32("i8"), None);
    assert_eq!(g.get_i64("i8"), Some(-7));
    assert_eq!(g.get_u32("u16"), Some(700));
    assert_eq!(g.get_i64("i16"), Some(-700));
    assert_eq!(g.get_u32("u32"), Some(70000));
    assert_eq!(g.get_u32("i32"), None);
    assert_eq!(g.get_u32("i32pos"), Some(42));
    assert_eq!(g.get_u64("i32pos"), Some(42));
    assert_eq!(g.get_u32("u64"), None);
    assert_eq!(g.get_u64("u64"), Some(1 << 40));
    assert_eq!(g.get_i64("i64"), Some(-(1 << 40)));
    assert_eq!(g.get_f32("f32"), Some(1.5));
    assert_eq!(g.get_f32("f64"), Some(2.25));
    assert_eq!(g.get_f32("u32"), None);
    assert_eq!(g.get_bool("bool"), Some(true));
    assert_eq!(g.get_bool("u8"), None);
    assert_eq!(g.get_str("str"), Some("héllo"));
    assert_eq!(g.get_str("bad_utf8"), None);
    assert_eq!(g.get("bad_utf8").unwrap().value_type(), ValueType::Str);
    assert_eq!(g.get("missing"), None);

    let strs = g.get_str_array("strs").unwrap();
    assert_eq!(strs.len(), 3);
    assert_eq!(strs.iter().collect::<Vec<_>>(), [&b"a"[..], b"", b"ccc"]);
    assert_eq!(strs.get(2), Some(&b"ccc"[..]));
    assert_eq!(strs.get(3), None);
    assert!(g.get_str_array("i32s").is_none());
    let ints = g.get_int_array("i32s").unwrap();
    assert_eq!(
        ints.iter().collect::<Vec<_>>(),
        [Some(1), Some(-2), Some(3)]
    );
    assert_eq!(ints.get(3), None);
    let f = g.get_array("f32s").unwrap();
    assert_eq!((f.len(), f.elem_type()), (2, ValueType::F32));
    assert_eq!((f.f32_at(1), f.f32_at(2)), (Some(-1.0), None));

    assert_eq!(g.tensors().len(), 3);
    let a = g.tensor("a").unwrap();
    assert_eq!(
        (a.dims(), a.cols(), a.rows(), a.dtype),
        (&[4, 3][..], 4, 3, DType::F32)
    );
    assert_eq!(a.offset, g.data_offset() + offsets[0]);
    assert_eq!(a.size, 48);
    let b = g.tensor("b").unwrap();
    assert_eq!(
        (b.dtype, b.size, b.offset),
        (DType::Q8_0, 68, g.data_offset() + offsets[1])
    );
    let c = g.tensor("c").unwrap();
    assert_eq!(
        (c.dims(), c.rows(), c.elements(), c.size),
        (&[32, 2, 1, 2][..], 4, 128, 80)
    );
    assert!(g.tensor("d").is_none());
    // The data is where the offsets say.
    assert_eq!(bytes[a.offset as usize..][..4], [0, 1, 2, 3]);
}

#[test]
fn version_2_and_custom_alignment() {
    let mut w = small();
    w.version = 2;
    w.alignment = 64;
    w.set("general.alignment", V::U32(64));
    let bytes = w.build();
    let g = parse(&bytes).unwrap();
    assert_eq!(
        (g.version(), g.alignment(), g.data_offset() % 64),
        (2, 64, 0)
    );
    for t in g.tensors() {
        assert_eq!((t.offset - g.data_offset()) % 64, 0);
    }
}

#[test]
fn refuses_bad_headers() {
    let good = small().build();
    let mut bad = good.clone();
    bad[0] = b'g';
    assert_eq!(
        parse(&bad).unwrap_err(),
        GgufError::BadMagic { found: *b"gGUF" }
    );
    for version in [0u32, 1, 4, 0x0300_0000] {
        let mut bad = good.clone();
        bad[4..8].copy_from_slice(&version.to_le_bytes());
        let err = parse(&bad).unwrap_err();
        assert_eq!(err, GgufError::UnsupportedVersion { version });
        if version == 0x0300_0000 {
            assert!(err.to_string().contains("big-endian"), "{err}");
        }
    }
    // Huge counts are refused before anything is allocated for them: past what the file
    // can hold, and past what the parser takes in a file that could hold them (parsed,
    // each takes several times its bytes).
    for (at, what, limit) in [
        (8, "tensors", ferry_llm::gguf::MAX_TENSORS),
        (16, "metadata entries", ferry_llm::gguf::MAX_METADATA),
    ] {
        let mut bad = good.clone();
        bad[at..at + 8].copy_from_slice(&(limit - 1).to_le_bytes());
        match parse(&bad).unwrap_err() {
            GgufError::TooMany { what: w, count, .. } => assert_eq!((w, count), (what, limit - 1)),
            e => panic!("{e}"),
        }
        bad[at..at + 8].copy_from_slice(&(limit + 1).to_le_bytes());
        let err = Gguf::parse(&bad, 1 << 40).unwrap_err();
        assert_eq!(
            err,
            GgufError::OverLimit {
                what,
                count: limit + 1,
                limit
            }
        );
        assert!(err.to_string().contains("this reader takes"), "{err}");
    }
    // A key length past the end of the file.
    let mut bad = good.clone();
    bad[24..32].copy_from_slice(&(1u64 << 62).to_le_bytes());
    assert!(matches!(
        parse(&bad).unwrap_err(),
        GgufError::Truncated {
            what: "metadata key",
            ..
        }
    ));
    // A string value length past the end of the file.
    let w = Writer::new().kv("k", V::Raw(8, u64::MAX.to_le_bytes().to_vec()));
    assert!(matches!(
        parse(&w.build()).unwrap_err(),
        GgufError::Truncated { .. }
    ));
    // Arrays that claim more elements than the file holds.
    for elem in [4u32, 8] {
        let raw = [elem.to_le_bytes().as_slice(), &(u64::MAX / 2).to_le_bytes()].concat();
        let w = Writer::new().kv("k", V::Raw(9, raw));
        assert!(matches!(
            parse(&w.build()).unwrap_err(),
            GgufError::TooMany { .. }
        ));
    }
    // Unknown value types, nested arrays, bad keys, duplicates.
    let w = Writer::new().kv("k", V::Raw(13, vec![]));
    assert_eq!(
        parse(&w.build()).unwrap_err(),
        GgufError::UnknownValueType {
            key: "k".into(),
            code: 13
        }
    );
    let raw = [99u32.to_le_bytes().as_slice(), &0u64.to_le_bytes()].concat();
    let w = Writer::new().kv("k", V::Raw(9, raw));
    assert!(matches!(
        parse(&w.build()).unwrap_err(),
        GgufError::UnknownValueType { code: 99, .. }
    ));
    let raw = [9u32.to_le_bytes().as_slice(), &1u64.to_le_bytes()].concat();
    let w = Writer::new().kv("k", V::Raw(9, raw));
    assert_eq!(
        parse(&w.build()).unwrap_err(),
        GgufError::NestedArray { key: "k".into() }
    );
    let w = Writer::new().kv("\u{1F600}", V::U8(1));
    let mut bad = w.build();
    bad[32] = 0xff; // inside the key
    assert_eq!(
        parse(&bad).unwrap_err(),
        GgufError::InvalidUtf8 {
            what: "metadata key"
        }
    );
    let w = Writer::new()
        .kv("k", V::U8(1))
        .kv("j", V::U8(1))
        .kv("k", V::U8(2));
    assert_eq!(
        parse(&w.build()).unwrap_err(),
        GgufError::DuplicateKey { key: "k".into() }
    );
    for a in [V::U32(0), V::U32(48), V::I32(-32), V::U64(1 << 40), s("32")] {
        let w = Writer::new().kv("general.alignment", a.clone());
        assert!(
            matches!(
                parse(&w.build()).unwrap_err(),
                GgufError::BadAlignment { .. }
            ),
            "{a:?}"
        );
    }
}

#[test]
fn refuses_bad_tensors() {
    let err = |w: Writer| parse(&w.build()).unwrap_err();
    for n_dims in [0u32, 5] {
        let mut bytes = Writer::new().tensor("t", &[4], 0).build();
        // Header (24) + name (8 + 1), then n_dims.
        bytes[33..37].copy_from_slice(&n_dims.to_le_bytes());
        assert_eq!(
            parse(&bytes).unwrap_err(),
            GgufError::BadDims {
                tensor: "t".into(),
                n_dims
            }
        );
    }
    assert!(matches!(
        err(Writer::new().tensor("t", &[4, 0], 0)),
        GgufError::BadShape { .. }
    ));
    assert!(matches!(
        err(Writer::new().tensor("t", &[1 << 32, 1 << 32], 0)),
        GgufError::BadShape { .. }
    ));
    // Fits u64 as elements, but not as bytes.
    assert!(matches!(
        err(Writer::new().tensor("t", &[1 << 32, 1 << 31], 0)),
        GgufError::BadShape { .. }
    ));
    for (code, name) in [
        (6u32, Some("q5_0")),
        (7, Some("q5_1")),
        (10, Some("q2_k")),
        (30, Some("bf16")),
        (1000, None),
    ] {
        let e = err(Writer::new().tensor("blk.0.attn_q.weight", &[32], code));
        assert_eq!(
            e,
            GgufError::UnsupportedType {
                tensor: "blk.0.attn_q.weight".into(),
                code
            }
        );
        let msg = e.to_string();
        assert!(msg.contains("blk.0.attn_q.weight"), "{msg}");
        if let Some(name) = name {
            assert!(msg.contains(name), "{msg}");
        }
    }
    assert_eq!(
        err(Writer::new().tensor("q", &[48, 2], 8)),
        GgufError::PartialBlock {
            tensor: "q".into(),
            cols: 48,
            block: 32
        }
    );
    let mut w = Writer::new().tensor("a", &[4], 0);
    w.tensors[0].offset = Some(16);
    assert_eq!(
        err(w),
        GgufError::MisalignedOffset {
            tensor: "a".into(),
            offset: 16,
            alignment: 32
        }
    );
    let w = Writer::new().tensor("a", &[4], 0).tensor("a", &[4], 0);
    assert_eq!(err(w), GgufError::DuplicateTensor { tensor: "a".into() });
    let mut w = Writer::new().tensor("a", &[16], 0).tensor("b", &[4], 0);
    w.tensors[1].offset = Some(32);
    w.tensors[0].offset = Some(0);
    let mut w2 = w.clone();
    w2.tensors[0].dims = vec![4];
    parse(&w2.build()).unwrap();
    w.tensors[1].offset = Some(32); // a is 64 bytes: [0, 64) overlaps [32, 48)
    assert_eq!(
        err(w),
        GgufError::Overlap {
            first: "a".into(),
            second: "b".into()
        }
    );
    let mut bytes = Writer::new().tensor("t", &[4], 0).build();
    bytes[32] = 0xC3; // the name "t" becomes a lone UTF-8 lead byte
    assert_eq!(
        parse(&bytes).unwrap_err(),
        GgufError::InvalidUtf8 {
            what: "tensor name"
        }
    );
}

#[test]
fn data_past_the_end_names_the_tensor() {
    let bytes = small().build();
    let g = parse(&bytes).unwrap();
    let c = *g.tensor("c").unwrap();
    let size = bytes.len() as u64 - 1;
    match Gguf::parse(&bytes, size).unwrap_err() {
        GgufError::DataPastEnd {
            tensor,
            offset,
            size: s,
            file_size,
        } => {
            assert_eq!(
                (tensor.as_str(), offset, s, file_size),
                ("c", c.offset, c.size, size)
            );
        }
        e => panic!("{e}"),
    }
    let e = Gguf::parse(&bytes[..size as usize], size).unwrap_err();
    assert!(
        e.to_string().contains("truncated") && e.to_string().contains("\"c\""),
        "{e}"
    );
    let mut w = small();
    w.tensors[2].offset = Some(!31);
    assert!(matches!(
        parse(&w.build()).unwrap_err(),
        GgufError::DataPastEnd { .. }
    ));
}

/// Every cut of a valid file: a prefix asks for more (never panics, never lies), and a
/// file truncated there is refused.
#[test]
fn every_cut_point() {
    let bytes = tiny_llama().build();
    let header = parse(&bytes).unwrap().header_len() as usize;
    let full = bytes.len() as u64;
    for cut in 0..bytes.len() {
        match Gguf::parse(&bytes[..cut], full) {
            Ok(g) => assert!(cut >= header, "{cut}: {}", g.header_len()),
            Err(GgufError::NeedMore { bytes: n }) => {
                assert!(cut < header, "{cut}");
                assert!(n > cut as u64 && n <= full, "{cut}: {n}");
            }
            Err(e) => panic!("cut {cut}: {e}"),
        }
        match Gguf::parse(&bytes[..cut], cut as u64) {
            Ok(_) => panic!("a file cut at {cut} of {full} bytes was accepted"),
            Err(GgufError::NeedMore { .. }) => panic!("NeedMore with the whole file, cut {cut}"),
            Err(_) => {}
        }
    }
}

/// The caller's loop: read what NeedMore asks for until the header parses.
#[test]
fn need_more_loop_converges() {
    let bytes = tiny_llama().build();
    let mut have = 16usize;
    let mut rounds = 0;
    let g = loop {
        rounds += 1;
        match Gguf::parse(&bytes[..have], bytes.len() as u64) {
            Ok(g) => break g,
            Err(GgufError::NeedMore { bytes: n }) => have = n as usize,
            Err(e) => panic!("{e}"),
        }
    };
    assert!(rounds <= 3, "{rounds}");
    assert_eq!(g.tensors().len(), 2 + 9 * LAYERS as usize);
}

/// A deterministic fuzz loop: mutated files never make the parser (or anything built on
/// it) panic.
#[test]
fn mutations_never_panic() {
    let base = tiny_llama().build();
    let header = parse(&base).unwrap().header_len() as usize;
    let mut state = 0x1234_5678_9abc_def0u64;
    let mut rnd = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut accepted = 0;
    for i in 0..3000 {
        let mut bytes = base.clone();
        let edits = 1 + rnd() % 4;
        for _ in 0..edits {
            let at = (rnd() as usize) % header;
            bytes[at] = match rnd() % 4 {
                0 => rnd() as u8,
                1 => 0xff,
                2 => 0,
                _ => bytes[at] ^ (1 << (rnd() % 8)),
            };
        }
        let size = if i % 7 == 0 {
            (rnd() as usize) % bytes.len()
        } else {
            bytes.len()
        };
        let file = &bytes[..size];
        let prefix = &file[..(rnd() as usize % (size + 1)).max(size * (i % 2))];
        for p in [prefix, file] {
            if let Ok(g) = Gguf::parse(p, size as u64) {
                accepted += 1;
                let _ = LlamaModel::from_gguf(&g).map(|m| m.weight_bytes());
                let _ = ChatTemplate::from_gguf(&g).map(|t| t.render(&[], true));
                if let Ok(tok) = Tokenizer::from_gguf(&g) {
                    let ids = tok.encode("<|im_start|>hello world 12 <tool>", true);
                    let _ = tok.decode(&ids);
                    let _ = tok.decode(&[u32::MAX, 0, 5]);
                }
            }
        }
    }
    assert!(accepted > 100, "{accepted}");
}
