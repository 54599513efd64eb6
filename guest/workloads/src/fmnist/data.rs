//! The Fashion-MNIST files: gzip (RFC 1952) around IDX, decoded and validated without
//! panicking on any input. Every error is a sentence about the data, for the caller to
//! prefix with the file's name.

use alloc::collections::TryReserveError;
use ferry_sdk::prelude::*;
use miniz_oxide::inflate::core::{decompress, inflate_flags, DecompressorOxide};
use miniz_oxide::inflate::TINFLStatus;

/// Pixels per image side.
pub const SIDE: u32 = 28;
/// Pixels per image.
pub const PIXELS: usize = (SIDE * SIDE) as usize;
/// Classes (labels are 0..CLASSES).
pub const CLASSES: usize = 10;

/// IDX magic of an image file: unsigned bytes, 3 dimensions (count, rows, cols).
const IMAGES_MAGIC: u32 = 0x0000_0803;
/// IDX magic of a label file: unsigned bytes, 1 dimension (count).
const LABELS_MAGIC: u32 = 0x0000_0801;
/// Bytes before the pixels of an image file (magic, count, rows, cols).
pub const IMAGES_HEADER: usize = 16;
/// Bytes before the labels of a label file (magic, count).
pub const LABELS_HEADER: usize = 8;

/// The largest decompressed file accepted (Fashion-MNIST's largest is 45 MiB).
const MAX_INFLATED: usize = 1 << 30;
/// The least room the output is given or grown by.
const MIN_ROOM: usize = 64 << 10;

/// True if `bytes` start with the gzip magic 1f 8b.
pub fn is_gzip(bytes: &[u8]) -> bool {
    bytes.starts_with(&[0x1f, 0x8b])
}

/// Decompresses a gzip file: one or more members, each checked against its CRC-32 and
/// length; nothing may follow the last member.
pub fn gunzip(data: &[u8]) -> Result<Vec<u8>, String> {
    // The last member's ISIZE (length mod 2^32) is the whole output's length in a
    // single-member file, the usual one: it sizes the output once, up front (one more
    // byte lets the inflater end without asking for room). It is only a hint: bounded by
    // what the input can inflate to (deflate expands at most 1032:1), and when it cannot
    // be had (a lying ISIZE, a small guest) the output grows as it needs instead.
    let hint = match data.len() {
        n if n >= 18 => le32(&data[n - 4..]) as usize,
        _ => 0,
    };
    let first = hint
        .saturating_add(1)
        .min(data.len().saturating_mul(1032))
        .clamp(MIN_ROOM, MAX_INFLATED);
    let mut out = Vec::new();
    if grow(&mut out, first).is_err() {
        more_room(&mut out, 0)?;
    }
    // `out` keeps its room between members (zeroed once, written over), so that
    // members never pay again for room the ones before them made.
    let mut len = 0;
    let mut pos = 0;
    while pos < data.len() {
        if pos > 0 && !is_gzip(&data[pos..]) {
            return Err(format!(
                "{} bytes of trailing garbage after the gzip data (at byte {pos})",
                data.len() - pos
            ));
        }
        pos = member(data, pos, &mut out, &mut len)?;
    }
    out.truncate(len);
    Ok(out)
}

/// Decodes the gzip member at `start` into `out` from byte `len` on, growing `out` when
/// it needs room and moving `len` past the member's bytes; returns where the next member
/// starts.
fn member(data: &[u8], start: usize, out: &mut Vec<u8>, len: &mut usize) -> Result<usize, String> {
    const FHCRC: u8 = 2;
    const FEXTRA: u8 = 4;
    const FNAME: u8 = 8;
    const FCOMMENT: u8 = 16;
    let truncated_header = || format!("truncated gzip header at byte {start}");
    let h = data.get(start..start + 10).ok_or_else(truncated_header)?;
    if h[2] != 8 {
        return Err(format!(
            "gzip compression method {} is not deflate (8)",
            h[2]
        ));
    }
    let flags = h[3];
    if flags & 0xe0 != 0 {
        return Err(format!(
            "gzip header has reserved flag bits set ({flags:#04x})"
        ));
    }
    let mut pos = start + 10;
    if flags & FEXTRA != 0 {
        let xlen = data.get(pos..pos + 2).ok_or_else(truncated_header)?;
        pos += 2 + usize::from(u16::from_le_bytes([xlen[0], xlen[1]]));
    }
    for flag in [FNAME, FCOMMENT] {
        if flags & flag != 0 {
            let rest = data.get(pos..).ok_or_else(truncated_header)?;
            let nul = rest
                .iter()
                .position(|&b| b == 0)
                .ok_or_else(truncated_header)?;
            pos += nul + 1;
        }
    }
    if flags & FHCRC != 0 {
        let stored = data.get(pos..pos + 2).ok_or_else(truncated_header)?;
        let stored = u16::from_le_bytes([stored[0], stored[1]]);
        if stored != crc32(&data[start..pos]) as u16 {
            return Err("gzip header CRC mismatch".into());
        }
        pos += 2;
    }
    if pos > data.len() {
        return Err(truncated_header());
    }

    // Inflate into `out[base..]`, growing it when the stream needs more room: the member
    // starts a stream of its own, which cannot refer back to the members before it.
    let base = *len;
    let mut out_pos = base;
    if out.len() == base {
        more_room(out, base)?;
    }
    let mut inflater = Box::<DecompressorOxide>::default();
    let flags = inflate_flags::TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF;
    loop {
        let (status, consumed, produced) = decompress(
            &mut inflater,
            &data[pos..],
            &mut out[base..],
            out_pos - base,
            flags,
        );
        pos += consumed;
        out_pos += produced;
        match status {
            TINFLStatus::Done => break,
            TINFLStatus::HasMoreOutput => {
                if out.len() >= MAX_INFLATED {
                    return Err(format!(
                        "decompresses to more than {} MiB",
                        MAX_INFLATED >> 20
                    ));
                }
                more_room(out, out_pos)?;
            }
            TINFLStatus::FailedCannotMakeProgress | TINFLStatus::NeedsMoreInput => {
                return Err(format!(
                    "truncated gzip data: the compressed stream ends early (after {} \
                     bytes, {} decompressed)",
                    data.len(),
                    out_pos - base
                ));
            }
            _ => {
                return Err(format!(
                    "corrupt gzip data: invalid deflate stream near byte {pos}"
                ));
            }
        }
    }
    *len = out_pos;
    let trailer = data.get(pos..pos + 8).ok_or_else(|| {
        format!("truncated gzip data: the trailer (CRC-32 and length) is missing at byte {pos}")
    })?;
    let inflated = &out[base..out_pos];
    let crc = crc32(inflated);
    if crc != le32(&trailer[..4]) {
        return Err(format!(
            "gzip CRC-32 mismatch (data {crc:#010x}, trailer {:#010x}): the data is corrupt",
            le32(&trailer[..4])
        ));
    }
    if inflated.len() as u32 != le32(&trailer[4..]) {
        return Err(format!(
            "gzip length mismatch ({} bytes decompressed, trailer says {} mod 2^32)",
            inflated.len(),
            le32(&trailer[4..])
        ));
    }
    Ok(pos + 8)
}

/// Grows the full output `out` (of which `used` bytes are written): to twice its size
/// if memory allows, else by as little as still helps; fails only when the output has
/// outgrown this guest's memory.
fn more_room(out: &mut Vec<u8>, used: usize) -> Result<(), String> {
    let now = out.len();
    let doubled = now.saturating_mul(2).clamp(MIN_ROOM, MAX_INFLATED);
    let least = now
        .saturating_add((now / 16).max(MIN_ROOM))
        .min(MAX_INFLATED);
    if grow(out, doubled).is_ok() || grow(out, least).is_ok() {
        return Ok(());
    }
    Err(format!(
        "decompressing runs out of guest memory after {} MiB of output (raise --memory)",
        used >> 20
    ))
}

/// Extends `v` with zeros to `len` bytes; `Err` (not an abort) when memory runs out.
fn grow(v: &mut Vec<u8>, len: usize) -> Result<(), TryReserveError> {
    if len > v.len() {
        v.try_reserve_exact(len - v.len())?;
        v.resize(len, 0);
    }
    Ok(())
}

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// CRC-32 (IEEE, as gzip uses), eight bytes at a time ("slicing by 8").
fn crc32(bytes: &[u8]) -> u32 {
    const TABLES: [[u32; 256]; 8] = {
        let mut t = [[0u32; 256]; 8];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    0xedb8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
                k += 1;
            }
            t[0][i] = c;
            i += 1;
        }
        let mut s = 1;
        while s < 8 {
            let mut i = 0;
            while i < 256 {
                let prev = t[s - 1][i];
                t[s][i] = (prev >> 8) ^ t[0][(prev & 0xff) as usize];
                i += 1;
            }
            s += 1;
        }
        t
    };
    let t = &TABLES;
    let mut c = !0u32;
    let mut chunks = bytes.chunks_exact(8);
    for b in &mut chunks {
        let lo = c ^ le32(&b[..4]);
        c = t[7][(lo & 0xff) as usize]
            ^ t[6][((lo >> 8) & 0xff) as usize]
            ^ t[5][((lo >> 16) & 0xff) as usize]
            ^ t[4][(lo >> 24) as usize]
            ^ t[3][b[4] as usize]
            ^ t[2][b[5] as usize]
            ^ t[1][b[6] as usize]
            ^ t[0][b[7] as usize];
    }
    for &b in chunks.remainder() {
        c = (c >> 8) ^ t[0][((c ^ u32::from(b)) & 0xff) as usize];
    }
    !c
}

/// Checks the IDX magic at the start of `bytes`.
fn check_magic(bytes: &[u8], want: u32, header: usize, what: &str) -> Result<(), String> {
    if bytes.len() < header {
        return Err(format!(
            "too short for an IDX {what} header ({} bytes, need {header})",
            bytes.len()
        ));
    }
    let magic = be32(bytes);
    if magic != want {
        let hint = match magic {
            IMAGES_MAGIC => " (that is an image file)",
            LABELS_MAGIC => " (that is a label file)",
            _ => "",
        };
        return Err(format!(
            "bad IDX magic {magic:#010x}{hint}: expected {want:#010x} for {what}"
        ));
    }
    Ok(())
}

/// Checks that `bytes` is an IDX file of 28×28 images whose count matches its size;
/// returns the count (the pixels are `bytes[IMAGES_HEADER..]`, one byte each, row major).
pub fn check_images(bytes: &[u8]) -> Result<usize, String> {
    check_magic(
        bytes,
        IMAGES_MAGIC,
        IMAGES_HEADER,
        "images (u8, 3 dimensions)",
    )?;
    let (count, rows, cols) = (be32(&bytes[4..]), be32(&bytes[8..]), be32(&bytes[12..]));
    if (rows, cols) != (SIDE, SIDE) {
        return Err(format!("images are {rows}×{cols}, expected {SIDE}×{SIDE}"));
    }
    if count == 0 {
        return Err("the header says 0 images".into());
    }
    let have = bytes.len() - IMAGES_HEADER;
    let want = (count as u64) * PIXELS as u64;
    if have as u64 != want {
        return Err(format!(
            "the header says {count} images ({want} bytes of pixels) but the file holds \
             {have} bytes of pixels{}",
            whole(have, PIXELS, "images")
        ));
    }
    Ok(count as usize)
}

/// Checks that `bytes` is an IDX label file whose count matches its size and whose labels
/// are all classes; returns the count (the labels are `bytes[LABELS_HEADER..]`).
pub fn check_labels(bytes: &[u8]) -> Result<usize, String> {
    check_magic(
        bytes,
        LABELS_MAGIC,
        LABELS_HEADER,
        "labels (u8, 1 dimension)",
    )?;
    let count = be32(&bytes[4..]);
    if count == 0 {
        return Err("the header says 0 labels".into());
    }
    let labels = &bytes[LABELS_HEADER..];
    if labels.len() as u64 != u64::from(count) {
        return Err(format!(
            "the header says {count} labels but the file holds {}",
            labels.len()
        ));
    }
    if let Some(i) = labels.iter().position(|&l| usize::from(l) >= CLASSES) {
        return Err(format!(
            "label {} at index {i} is not a class (0..{})",
            labels[i],
            CLASSES - 1
        ));
    }
    Ok(count as usize)
}

/// " (N whole images)" when `have` bytes hold some, for the size message.
fn whole(have: usize, each: usize, what: &str) -> String {
    if have % each == 0 {
        format!(" ({} {what})", have / each)
    } else {
        format!(" ({:.2} {what})", have as f64 / each as f64)
    }
}
