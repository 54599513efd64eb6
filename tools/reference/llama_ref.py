#!/usr/bin/env python3
"""Independent float64 numpy reference for llama-family GGUF models.

Written from the file-format and model descriptions only: its own GGUF reader, its own
dequantizers (F32, F16, Q4_0, Q4_1, Q8_0, Q4_K, Q6_K), its own byte-level BPE tokenizer
and its own transformer forward pass.  Runtime dependency: numpy (plus the `regex`
module for the tokenizer's \\p{L}/\\p{N} classes, needed only for --chat/--text and the
self-test).  The `gguf` pip package is used only by --self-test, to cross-check the
dequantizers.

All arithmetic is float64: dequantized weights are the exact float64 values of the
quantized formulas (d*q+m etc. evaluated in float64 from the f16 scales), and every
matmul accumulates in float64.  See tools/reference/README.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import mmap
import os
import struct
import sys
import time

import numpy as np

# ----------------------------------------------------------------------------------------
# GGUF reader
# ----------------------------------------------------------------------------------------

GGUF_MAGIC = b"GGUF"

# metadata value types
_T_UINT8, _T_INT8, _T_UINT16, _T_INT16, _T_UINT32, _T_INT32, _T_FLOAT32, _T_BOOL, \
    _T_STRING, _T_ARRAY, _T_UINT64, _T_INT64, _T_FLOAT64 = range(13)

_SCALAR_FMT = {
    _T_UINT8: "<B", _T_INT8: "<b", _T_UINT16: "<H", _T_INT16: "<h",
    _T_UINT32: "<I", _T_INT32: "<i", _T_FLOAT32: "<f", _T_BOOL: "<?",
    _T_UINT64: "<Q", _T_INT64: "<q", _T_FLOAT64: "<d",
}
_SCALAR_NP = {
    _T_UINT8: "<u1", _T_INT8: "<i1", _T_UINT16: "<u2", _T_INT16: "<i2",
    _T_UINT32: "<u4", _T_INT32: "<i4", _T_FLOAT32: "<f4", _T_BOOL: "<u1",
    _T_UINT64: "<u8", _T_INT64: "<i8", _T_FLOAT64: "<f8",
}

# ggml tensor types: id -> (name, block size in elements, bytes per block)
GGML_TYPES = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 2 + 16),
    3: ("Q4_1", 32, 2 + 2 + 16),
    8: ("Q8_0", 32, 2 + 32),
    12: ("Q4_K", 256, 2 + 2 + 12 + 128),
    14: ("Q6_K", 256, 128 + 64 + 16 + 2),
}
GGML_TYPE_ID = {v[0]: k for k, v in GGML_TYPES.items()}


class TensorInfo:
    __slots__ = ("name", "dims", "type_id", "offset", "n_elements", "n_bytes")

    def __init__(self, name, dims, type_id, offset):
        self.name = name
        self.dims = dims            # ne[0] first: dims[0] is the contiguous row length
        self.type_id = type_id
        self.offset = offset        # relative to the start of the data section
        self.n_elements = int(np.prod(dims, dtype=np.int64)) if dims else 1
        if type_id in GGML_TYPES:
            _, bs, bb = GGML_TYPES[type_id]
            if self.n_elements % bs:
                raise ValueError(f"{name}: {self.n_elements} elements not a multiple of {bs}")
            self.n_bytes = self.n_elements // bs * bb
        else:
            self.n_bytes = None

    @property
    def type_name(self):
        return GGML_TYPES.get(self.type_id, (f"type{self.type_id}",))[0]


class GGUFFile:
    """Minimal GGUF (v2/v3) reader over an mmap of the file."""

    def __init__(self, path):
        self.path = path
        with open(path, "rb") as f:
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._buf = memoryview(self._mm)
        self._pos = 0
        if self._read(4) != GGUF_MAGIC:
            raise ValueError(f"{path}: not a GGUF file")
        (self.version,) = self._unpack("<I")
        if self.version not in (2, 3):
            raise ValueError(f"{path}: unsupported GGUF version {self.version}")
        n_tensors, n_kv = self._unpack("<QQ")
        self.metadata = {}
        for _ in range(n_kv):
            key = self._read_str()
            (vtype,) = self._unpack("<I")
            self.metadata[key] = self._read_value(vtype)
        self.tensors = {}
        for _ in range(n_tensors):
            name = self._read_str()
            (n_dims,) = self._unpack("<I")
            dims = list(self._unpack("<" + "Q" * n_dims))
            type_id, offset = self._unpack("<IQ")
            self.tensors[name] = TensorInfo(name, dims, type_id, offset)
        align = int(self.metadata.get("general.alignment", 32))
        self.data_start = (self._pos + align - 1) // align * align

    # -- low-level parsing
    def _read(self, n):
        b = self._buf[self._pos:self._pos + n]
        if len(b) != n:
            raise ValueError("truncated GGUF file")
        self._pos += n
        return bytes(b)

    def _unpack(self, fmt):
        size = struct.calcsize(fmt)
        vals = struct.unpack_from(fmt, self._buf, self._pos)
        self._pos += size
        return vals

    def _read_str(self):
        (n,) = self._unpack("<Q")
        return self._read(n).decode("utf-8")

    def _read_value(self, vtype):
        if vtype == _T_STRING:
            return self._read_str()
        if vtype == _T_ARRAY:
            etype, n = self._unpack("<IQ")
            if etype in _SCALAR_NP:
                dt = np.dtype(_SCALAR_NP[etype])
                arr = np.frombuffer(self._buf, dtype=dt, count=n, offset=self._pos).copy()
                self._pos += n * dt.itemsize
                if etype == _T_BOOL:
                    arr = arr.astype(bool)
                return arr.tolist()
            return [self._read_value(etype) for _ in range(n)]
        if vtype in _SCALAR_FMT:
            (v,) = self._unpack(_SCALAR_FMT[vtype])
            return v
        raise ValueError(f"unknown GGUF metadata type {vtype}")

    # -- tensors
    def raw(self, name):
        """Raw bytes of a tensor as a uint8 numpy array (a view on the mmap)."""
        t = self.tensors[name]
        if t.n_bytes is None:
            raise ValueError(f"{name}: unsupported ggml type {t.type_id}")
        start = self.data_start + t.offset
        return np.frombuffer(self._buf, dtype=np.uint8, count=t.n_bytes, offset=start)

    def tensor(self, name):
        """Dequantized tensor as float64, shape reversed from dims (numpy row-major):
        dims [576, 1536] -> array of shape (1536, 576)."""
        t = self.tensors[name]
        flat = dequantize(self.raw(name), t.type_id)
        return flat.reshape(tuple(reversed(t.dims)))


# ----------------------------------------------------------------------------------------
# Dequantizers (ggml-quants.c dequantize_row_*), exact in float64
# ----------------------------------------------------------------------------------------

def _f16(block_bytes):
    """(nb, 2) uint8 -> (nb, 1) float64 (exact conversion of IEEE half)."""
    return np.ascontiguousarray(block_bytes).view("<f2").astype(np.float64)


def _blocks(raw, block_bytes):
    raw = np.asarray(raw, dtype=np.uint8)
    if raw.size % block_bytes:
        raise ValueError("raw size is not a whole number of blocks")
    return raw.reshape(-1, block_bytes)


def dequant_f32(raw):
    return np.ascontiguousarray(raw).view("<f4").astype(np.float64)


def dequant_f16(raw):
    return np.ascontiguousarray(raw).view("<f2").astype(np.float64)


def _nibbles_32(qs):
    """qs (nb, 16) uint8 -> (nb, 32): element j<16 = low nibble of qs[j], j+16 = high."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float64)


def dequant_q4_0(raw):
    b = _blocks(raw, 18)
    d = _f16(b[:, 0:2])
    q = _nibbles_32(b[:, 2:18]) - 8.0
    return (d * q).reshape(-1)


def dequant_q4_1(raw):
    b = _blocks(raw, 20)
    d = _f16(b[:, 0:2])
    m = _f16(b[:, 2:4])
    q = _nibbles_32(b[:, 4:20])
    return (d * q + m).reshape(-1)


def dequant_q8_0(raw):
    b = _blocks(raw, 34)
    d = _f16(b[:, 0:2])
    q = np.ascontiguousarray(b[:, 2:34]).view(np.int8).astype(np.float64)
    return (d * q).reshape(-1)


def _scale_min_k4(scales):
    """get_scale_min_k4 for j = 0..7: scales (nb, 12) uint8 -> sc (nb, 8), mn (nb, 8)."""
    s = scales.astype(np.int64)
    sc = np.empty((s.shape[0], 8), dtype=np.int64)
    mn = np.empty((s.shape[0], 8), dtype=np.int64)
    sc[:, 0:4] = s[:, 0:4] & 63
    mn[:, 0:4] = s[:, 4:8] & 63
    sc[:, 4:8] = (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)
    mn[:, 4:8] = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return sc.astype(np.float64), mn.astype(np.float64)


def dequant_q4_k(raw):
    b = _blocks(raw, 144)
    nb = b.shape[0]
    d = _f16(b[:, 0:2])
    dmin = _f16(b[:, 2:4])
    sc, mn = _scale_min_k4(b[:, 4:16])
    qs = b[:, 16:144].reshape(nb, 4, 32)          # 4 chunks of 32 bytes -> 64 values each
    lo = (qs & 0x0F).astype(np.float64)           # sub-block 2*c
    hi = (qs >> 4).astype(np.float64)             # sub-block 2*c+1
    q = np.stack([lo, hi], axis=2).reshape(nb, 8, 32)   # sub-block j = 0..7, 32 values
    y = (d * sc)[:, :, None] * q - (dmin * mn)[:, :, None]
    return y.reshape(-1)


def dequant_q6_k(raw):
    b = _blocks(raw, 210)
    nb = b.shape[0]
    ql = b[:, 0:128].reshape(nb, 2, 64).astype(np.int64)
    qh = b[:, 128:192].reshape(nb, 2, 32).astype(np.int64)
    sc = np.ascontiguousarray(b[:, 192:208]).view(np.int8).astype(np.float64).reshape(nb, 2, 8)
    d = _f16(b[:, 208:210]).reshape(nb, 1, 1)
    q1 = (ql[:, :, 0:32] & 0x0F) | (((qh >> 0) & 3) << 4)
    q2 = (ql[:, :, 32:64] & 0x0F) | (((qh >> 2) & 3) << 4)
    q3 = (ql[:, :, 0:32] >> 4) | (((qh >> 4) & 3) << 4)
    q4 = (ql[:, :, 32:64] >> 4) | (((qh >> 6) & 3) << 4)
    q = np.stack([q1, q2, q3, q4], axis=2).astype(np.float64) - 32.0   # (nb, 2, 4, 32)
    # scale index for element l of quarter k in half n: is = l // 16, scale sc[n, is + 2k]
    s = sc.reshape(nb, 2, 4, 2)                                           # [n, k, l//16]
    s = np.repeat(s, 16, axis=3)                                          # (nb, 2, 4, 32)
    y = (d[:, :, :, None] * s) * q
    return y.reshape(-1)


DEQUANT = {
    0: dequant_f32, 1: dequant_f16, 2: dequant_q4_0, 3: dequant_q4_1,
    8: dequant_q8_0, 12: dequant_q4_k, 14: dequant_q6_k,
}


def dequantize(raw, type_id):
    if type_id not in DEQUANT:
        raise ValueError(f"unsupported ggml type {type_id}")
    return DEQUANT[type_id](raw)


# ----------------------------------------------------------------------------------------
# Byte-level BPE tokenizer (GPT-2 style) from GGUF metadata
# ----------------------------------------------------------------------------------------

def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) \
        + list(range(ord("\xae"), ord("\xff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


GPT2_PATTERN = (r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+"
                r"|\s+(?!\S)|\s+")


class Tokenizer:
    def __init__(self, meta):
        model = meta.get("tokenizer.ggml.model")
        if model != "gpt2":
            raise ValueError(f"tokenizer model {model!r} not supported (only gpt2 BPE)")
        self.tokens = list(meta["tokenizer.ggml.tokens"])
        self.types = list(meta.get("tokenizer.ggml.token_type", [1] * len(self.tokens)))
        self.pre = meta.get("tokenizer.ggml.pre", "default")
        self.token_to_id = {t: i for i, t in enumerate(self.tokens)}
        self.ranks = {}
        for i, m in enumerate(meta["tokenizer.ggml.merges"]):
            a, b = m.split(" ", 1)
            self.ranks.setdefault((a, b), i)
        # special tokens: control (3) and user-defined (4), matched as whole tokens first
        self.special = sorted((t for t, ty in zip(self.tokens, self.types) if ty in (3, 4)),
                              key=lambda s: (-len(s), s))
        self.byte_enc = bytes_to_unicode()
        self.byte_dec = {v: k for k, v in self.byte_enc.items()}
        self.bos_id = meta.get("tokenizer.ggml.bos_token_id")
        self.eos_id = meta.get("tokenizer.ggml.eos_token_id")
        self._cache = {}
        self._re = None

    def _regexes(self):
        if self._re is None:
            import regex  # third-party `regex` module for \p{..} classes
            if self.pre in ("smollm", "codeshell"):
                digits = regex.compile(r"\p{N}")
            elif self.pre in ("default", "gpt-2", "gpt2"):
                digits = None
            else:
                raise ValueError(f"pre-tokenizer {self.pre!r} not implemented")
            self._re = (digits, regex.compile(GPT2_PATTERN))
        return self._re

    def pretokenize(self, text):
        digits, gpt2 = self._regexes()
        pieces = [text]
        if digits is not None:
            # split into matches and the text between them (like llama.cpp's regex split)
            pieces = []
            last = 0
            for m in digits.finditer(text):
                if m.start() > last:
                    pieces.append(text[last:m.start()])
                pieces.append(m.group())
                last = m.end()
            if last < len(text):
                pieces.append(text[last:])
        words = []
        for p in pieces:
            ws = gpt2.findall(p)
            assert "".join(ws) == p, "pre-tokenizer dropped characters"
            words.extend(ws)
        return words

    def _bpe(self, word):
        if word in self._cache:
            return self._cache[word]
        parts = list(word)
        while len(parts) > 1:
            best, best_i = None, -1
            for i in range(len(parts) - 1):
                r = self.ranks.get((parts[i], parts[i + 1]))
                if r is not None and (best is None or r < best):
                    best, best_i = r, i
            if best is None:
                break
            a, b = parts[best_i], parts[best_i + 1]
            merged, i = [], 0
            while i < len(parts):            # merge every occurrence of the best pair
                if i < len(parts) - 1 and parts[i] == a and parts[i + 1] == b:
                    merged.append(a + b)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        ids = []
        for p in parts:
            if p in self.token_to_id:
                ids.append(self.token_to_id[p])
            else:   # fall back to single-byte tokens; bytes without a token are dropped
                for ch in p:     # (llama.cpp does the same; this vocab lacks a few
                    tid = self.token_to_id.get(ch)   # control bytes, e.g. 0x04)
                    if tid is not None:
                        ids.append(tid)
        self._cache[word] = ids
        return ids

    def _split_special(self, text):
        out, i, start = [], 0, 0
        while i < len(text):
            for s in self.special:
                if text.startswith(s, i):
                    if i > start:
                        out.append((False, text[start:i]))
                    out.append((True, s))
                    i += len(s)
                    start = i
                    break
            else:
                i += 1
        if start < len(text):
            out.append((False, text[start:]))
        return out

    def encode(self, text, parse_special=True):
        ids = []
        segs = self._split_special(text) if parse_special else [(False, text)]
        for is_special, seg in segs:
            if is_special:
                ids.append(self.token_to_id[seg])
                continue
            for w in self.pretokenize(seg):
                mapped = "".join(self.byte_enc[b] for b in w.encode("utf-8"))
                ids.extend(self._bpe(mapped))
        return ids

    def decode_bytes(self, ids, skip_special=True):
        out = bytearray()
        for i in ids:
            t = self.tokens[i]
            if self.types[i] in (3, 4):
                if not skip_special:
                    out += t.encode("utf-8")
                continue
            for ch in t:
                out.append(self.byte_dec[ch])
        return bytes(out)

    def decode(self, ids, skip_special=True):
        return self.decode_bytes(ids, skip_special).decode("utf-8", errors="replace")


# ----------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------

class LlamaModel:
    def __init__(self, gg: GGUFFile, rope_style=None):
        m = gg.metadata
        arch = m["general.architecture"]
        self.arch = arch
        g = lambda k, d=None: m.get(f"{arch}.{k}", d)
        self.n_layer = int(g("block_count"))
        self.n_embd = int(g("embedding_length"))
        self.n_ff = int(g("feed_forward_length"))
        self.n_head = int(g("attention.head_count"))
        self.n_head_kv = int(g("attention.head_count_kv", self.n_head))
        self.head_dim = self.n_embd // self.n_head
        self.rope_dim = int(g("rope.dimension_count", self.head_dim))
        self.rope_base = float(g("rope.freq_base", 10000.0))
        self.eps = float(g("attention.layer_norm_rms_epsilon", 1e-5))
        if rope_style is None:
            rope_style = "adjacent" if arch == "llama" else "half"
        self.rope_style = rope_style
        # weights, dequantized once (float64)
        self.tok_embd = gg.tensor("token_embd.weight")              # (vocab, n_embd)
        self.vocab = self.tok_embd.shape[0]
        self.out_norm = gg.tensor("output_norm.weight")
        self.tied_output = "output.weight" not in gg.tensors
        self.output = self.tok_embd if self.tied_output else gg.tensor("output.weight")
        self.layers = []
        for i in range(self.n_layer):
            p = f"blk.{i}."
            L = {k: gg.tensor(p + k + ".weight") for k in (
                "attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
                "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")}
            # fuse q/k/v and gate/up for fewer BLAS calls (rows are just stacked: exact)
            L["wqkv_t"] = np.ascontiguousarray(
                np.concatenate([L.pop("attn_q"), L.pop("attn_k"), L.pop("attn_v")], axis=0).T)
            L["wgu_t"] = np.ascontiguousarray(
                np.concatenate([L.pop("ffn_gate"), L.pop("ffn_up")], axis=0).T)
            L["wo_t"] = np.ascontiguousarray(L.pop("attn_output").T)
            L["wdown_t"] = np.ascontiguousarray(L.pop("ffn_down").T)
            self.layers.append(L)
        self.output_t = np.ascontiguousarray(self.output.T)
        # rope frequencies: theta_i = pos * base^(-2i/rope_dim) / factor_i, the factors
        # from rope_freqs.weight (Llama 3.1 and later; llama.cpp's freq_factors), else 1
        i = np.arange(self.rope_dim // 2, dtype=np.float64)
        self.inv_freq = self.rope_base ** (-2.0 * i / self.rope_dim)
        if "rope_freqs.weight" in gg.tensors:
            factors = np.asarray(gg.tensor("rope_freqs.weight"), dtype=np.float64).reshape(-1)
            if factors.shape != self.inv_freq.shape:
                raise ValueError(f"rope_freqs.weight has {factors.size} factors, "
                                 f"expected {self.inv_freq.size}")
            self.inv_freq = self.inv_freq / factors
        self.reset()

    def reset(self):
        self.k_cache = [np.zeros((0, self.n_head_kv, self.head_dim)) for _ in range(self.n_layer)]
        self.v_cache = [np.zeros((0, self.n_head_kv, self.head_dim)) for _ in range(self.n_layer)]
        self.n_past = 0

    def rmsnorm(self, x, w):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps) * w

    def rope(self, x, pos):
        """x: (T, H, head_dim), pos: (T,) -> rotated copy."""
        ang = pos[:, None].astype(np.float64) * self.inv_freq[None, :]        # (T, rd/2)
        cos = np.cos(ang)[:, None, :]
        sin = np.sin(ang)[:, None, :]
        y = x.copy()
        rd = self.rope_dim
        if self.rope_style == "adjacent":
            a, b = x[..., 0:rd:2], x[..., 1:rd:2]
            y[..., 0:rd:2] = a * cos - b * sin
            y[..., 1:rd:2] = a * sin + b * cos
        else:  # "half" (NeoX): pairs (i, i + rd/2)
            h = rd // 2
            a, b = x[..., 0:h], x[..., h:rd]
            y[..., 0:h] = a * cos - b * sin
            y[..., h:rd] = a * sin + b * cos
        return y

    def forward(self, tokens, all_logits=False):
        """Feed tokens at positions n_past.. ; returns logits (T, vocab) or (1, vocab)."""
        tokens = np.asarray(tokens, dtype=np.int64)
        T = len(tokens)
        pos = np.arange(self.n_past, self.n_past + T)
        H, KV, D = self.n_head, self.n_head_kv, self.head_dim
        group = H // KV
        x = self.tok_embd[tokens]                                            # (T, E)
        scale = 1.0 / math.sqrt(D)
        for li, L in enumerate(self.layers):
            h = self.rmsnorm(x, L["attn_norm"])
            qkv = h @ L["wqkv_t"]
            q = qkv[:, :H * D].reshape(T, H, D)
            k = qkv[:, H * D:(H + KV) * D].reshape(T, KV, D)
            v = qkv[:, (H + KV) * D:].reshape(T, KV, D)
            q = self.rope(q, pos)
            k = self.rope(k, pos)
            K = self.k_cache[li] = np.concatenate([self.k_cache[li], k], axis=0)  # (S, KV, D)
            V = self.v_cache[li] = np.concatenate([self.v_cache[li], v], axis=0)
            S = K.shape[0]
            kh = np.repeat(K, group, axis=1)                                  # head h -> kv h//group
            vh = np.repeat(V, group, axis=1)
            sc = np.einsum("thd,shd->hts", q, kh) * scale                      # (H, T, S)
            mask = np.arange(S)[None, :] > pos[:, None]                        # causal
            sc = np.where(mask[None], -np.inf, sc)
            sc = sc - sc.max(axis=-1, keepdims=True)
            p = np.exp(sc)
            p /= p.sum(axis=-1, keepdims=True)
            att = np.einsum("hts,shd->thd", p, vh).reshape(T, H * D)
            x = x + att @ L["wo_t"]
            h = self.rmsnorm(x, L["ffn_norm"])
            gu = h @ L["wgu_t"]
            gate, up = gu[:, :self.n_ff], gu[:, self.n_ff:]
            act = gate / (1.0 + np.exp(-gate)) * up                            # silu(g) * u
            x = x + act @ L["wdown_t"]
        self.n_past += T
        if not all_logits:
            x = x[-1:]
        h = self.rmsnorm(x, self.out_norm)
        return h @ self.output_t


# ----------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------

CHAT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def render_chat(question):
    return (f"<|im_start|>system\n{CHAT_SYSTEM}<|im_end|>\n"
            f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n")


def argmax_first(v):
    return int(np.argmax(v))   # numpy returns the first maximum on ties


def top_k(v, k):
    if k <= 0:
        return []
    # stable sort by (-logit, id): deterministic order for equal logits
    idx = np.lexsort((np.arange(v.size), -v))[:k]
    return [[int(i), float(v[i])] for i in idx]


def logits_sha(v):
    return hashlib.sha256(np.ascontiguousarray(v, dtype="<f8").tobytes()).hexdigest()


def make_step(pos, logits, k):
    return {"position": int(pos), "argmax": argmax_first(logits),
            "top": top_k(logits, k), "logits_sha": logits_sha(logits)}


def run(args):
    t0 = time.perf_counter()
    gg = GGUFFile(args.model)
    tok = None
    if args.chat is not None or args.text is not None or args.decode:
        tok = Tokenizer(gg.metadata)
    stop_ids = set()
    if args.chat is not None:
        prompt_text = render_chat(args.chat)
        prompt = tok.encode(prompt_text)
        stop_ids = {tok.eos_id}
        if "<|im_end|>" in tok.token_to_id:
            stop_ids.add(tok.token_to_id["<|im_end|>"])
    elif args.text is not None:
        prompt_text = args.text
        prompt = tok.encode(prompt_text)
    else:
        prompt_text = None
        prompt = [int(t) for t in args.tokens.split(",") if t.strip() != ""]
    if args.stop_at_eos:
        if tok is None:
            tok = Tokenizer(gg.metadata)
        stop_ids.add(tok.eos_id)
        if "<|im_end|>" in tok.token_to_id:
            stop_ids.add(tok.token_to_id["<|im_end|>"])
    if not prompt:
        raise SystemExit("empty prompt")

    model = LlamaModel(gg, rope_style=args.rope)
    for t in prompt:
        if not 0 <= t < model.vocab:
            raise SystemExit(f"token id {t} out of range (vocab {model.vocab})")
    t_load = time.perf_counter()

    out = {
        "model": os.path.basename(args.model),
        "config": {"arch": model.arch, "n_layer": model.n_layer, "n_embd": model.n_embd,
                   "n_head": model.n_head, "n_head_kv": model.n_head_kv,
                   "head_dim": model.head_dim, "n_ff": model.n_ff, "vocab": model.vocab,
                   "rope_base": model.rope_base, "rope_style": model.rope_style,
                   "rms_eps": model.eps, "tied_output": model.tied_output},
        "precision": "float64",
    }
    if prompt_text is not None:
        out["prompt_text"] = prompt_text
    out["prompt_tokens"] = prompt

    logits_rows = []
    steps = []
    generated = []
    stopped = "length"
    lg = model.forward(prompt, all_logits=args.all_positions)
    if args.all_positions:
        out["prompt_steps"] = [make_step(p, lg[p], args.logits_top) for p in range(len(prompt))]
    cur = lg[-1]
    pos = len(prompt) - 1
    while True:
        steps.append(make_step(pos, cur, args.logits_top))
        if args.dump_logits:
            logits_rows.append(cur.copy())
        if len(generated) >= args.generate:
            break
        nxt = argmax_first(cur)
        generated.append(nxt)
        if nxt in stop_ids:
            stopped = "stop_token"
            break
        if len(generated) >= args.generate:
            break
        cur = model.forward([nxt])[-1]
        pos += 1
    t_end = time.perf_counter()

    out["generated"] = generated
    out["stopped"] = stopped
    out["steps"] = steps
    if tok is not None:
        text_ids = [g for g in generated if g not in stop_ids]
        out["text"] = tok.decode(text_ids)
    if args.dump_logits:
        np.save(args.dump_logits, np.stack(logits_rows).astype(np.float64))
        out["dump_logits"] = args.dump_logits
    if args.timing:
        out["timing_s"] = {"load_dequant": round(t_load - t0, 3),
                           "forward": round(t_end - t_load, 3),
                           "total": round(t_end - t0, 3)}
    print(f"[llama_ref] load+dequant {t_load - t0:.2f}s, forward {t_end - t_load:.2f}s "
          f"({len(prompt)} prompt + {len(generated)} generated tokens)", file=sys.stderr)
    json.dump(out, sys.stdout, separators=(",", ":") if args.compact else None,
              indent=None if args.compact else 1)
    sys.stdout.write("\n")


# ----------------------------------------------------------------------------------------
# Self-test
# ----------------------------------------------------------------------------------------

def _random_blocks(type_id, nb, rng):
    _, bs, bb = GGML_TYPES[type_id]
    raw = rng.integers(0, 256, size=(nb, bb), dtype=np.uint8)

    def put_f16(col, lo, hi):
        v = rng.uniform(lo, hi, size=nb).astype(np.float16)
        raw[:, col:col + 2] = v.view(np.uint8).reshape(nb, 2)

    if type_id == 1:
        raw = rng.standard_normal(nb * 8).astype(np.float16).view(np.uint8).reshape(-1, bb)
    elif type_id == 0:
        raw = rng.standard_normal(nb * 8).astype(np.float32).view(np.uint8).reshape(-1, bb)
    elif type_id in (2, 8):
        put_f16(0, -0.1, 0.1)
    elif type_id == 3:
        put_f16(0, -0.1, 0.1)
        put_f16(2, -1.0, 1.0)
    elif type_id == 12:
        put_f16(0, 0.0, 0.01)
        put_f16(2, 0.0, 0.01)
    elif type_id == 14:
        put_f16(208, -0.01, 0.01)
    return raw.reshape(-1)


def self_test(args):
    import gguf
    from gguf import quants as gq
    ok = True

    def compare(label, mine, raw, type_id, shape_ne):
        nonlocal ok
        qt = gguf.GGMLQuantizationType(type_id)
        # gguf wants the raw bytes shaped (rows, bytes per row)
        _, bs, bb = GGML_TYPES[type_id]
        row_bytes = shape_ne[0] // bs * bb
        ref = gq.dequantize(np.asarray(raw).reshape(-1, row_bytes), qt).reshape(-1)
        ref64 = ref.astype(np.float64)
        mine32 = mine.astype(np.float32)
        diff = float(np.max(np.abs(mine - ref64))) if mine.size else 0.0
        scale = float(np.max(np.abs(ref64))) or 1.0
        # gguf computes in float32: ours rounded to float32 must match to ~1 ulp
        n_bitdiff = int(np.count_nonzero(mine32 != ref))
        good = mine.shape == ref64.shape and diff <= 2e-7 * scale
        ok &= good
        print(f"  {'ok ' if good else 'BAD'} {label:34s} {GGML_TYPES[type_id][0]:5s} "
              f"n={mine.size:9d} max|diff|={diff:.3e} (max|x|={scale:.3g}, "
              f"f32-bit-diffs={n_bitdiff})")

    gg = GGUFFile(args.model)
    print(f"GGUF v{gg.version}, {len(gg.tensors)} tensors, {len(gg.metadata)} metadata keys")

    # cross-check our GGUF parser against the gguf package's reader
    rd = gguf.GGUFReader(args.model)
    if len(rd.tensors) != len(gg.tensors):
        print("  BAD tensor count differs from gguf.GGUFReader")
        ok = False
    for t in rd.tensors:
        mt = gg.tensors[t.name]
        if (list(map(int, t.shape)) != mt.dims or int(t.tensor_type) != mt.type_id
                or int(t.data_offset) != gg.data_start + mt.offset):
            print(f"  BAD tensor info mismatch for {t.name}")
            ok = False
    print(f"  ok  tensor directory matches gguf.GGUFReader")

    present = {}
    for name, t in gg.tensors.items():
        present.setdefault(t.type_id, []).append(name)
    if args.self_test_all:
        names = list(gg.tensors)
    else:   # every type present: first, last and a few in between
        names = []
        for tid, ns in sorted(present.items()):
            pick = sorted(set([ns[0], ns[-1]] + ns[:: max(1, len(ns) // 4)]))
            names.extend(pick)
    print(f"dequantizers vs gguf.quants.dequantize on {len(names)} file tensors "
          f"(types present: {', '.join(GGML_TYPES[t][0] for t in sorted(present))}):")
    for name in names:
        t = gg.tensors[name]
        raw = gg.raw(name)
        compare(name, dequantize(raw, t.type_id), raw, t.type_id, t.dims)

    rng = np.random.default_rng(1234)
    print("dequantizers vs gguf.quants.dequantize on random blocks:")
    for tid in sorted(GGML_TYPES):
        _, bs, bb = GGML_TYPES[tid]
        nb = 64 if bs > 1 else 512
        raw = _random_blocks(tid, nb, rng)
        n_el = raw.size // bb * bs
        compare(f"random {nb} blocks", dequantize(raw, tid), raw, tid, [n_el])
        # also fully random bytes (any f16 incl. subnormals), with NaN/inf scales removed
        raw2 = rng.integers(0, 256, size=raw.size, dtype=np.uint8).reshape(-1, bb)
        hi_bytes = {0: [3], 1: [1], 2: [1], 3: [1, 3], 8: [1], 12: [1, 3], 14: [209]}[tid]
        for hb in hi_bytes:
            col = raw2[:, hb::4] if tid == 0 else (raw2[:, hb::2] if tid == 1 else raw2[:, hb])
            fixed = np.where((col & 0x7C) == 0x7C if tid != 0 else (col & 0x7F) == 0x7F,
                             col & 0xBF, col)
            if tid == 0:
                raw2[:, hb::4] = fixed
            elif tid == 1:
                raw2[:, hb::2] = fixed
            else:
                raw2[:, hb] = fixed
        raw2 = raw2.reshape(-1)
        compare("random bytes", dequantize(raw2, tid), raw2, tid, [n_el])

    # exactness: Q4_1 values d*q+m in float64 equal the exact rational value
    b = _blocks(_random_blocks(3, 16, rng), 20)
    from fractions import Fraction
    d = _f16(b[:, 0:2])[:, 0]
    m = _f16(b[:, 2:4])[:, 0]
    y = dequant_q4_1(b.reshape(-1)).reshape(16, 32)
    q = _nibbles_32(b[:, 4:20])
    exact = all(Fraction(float(y[i, j])) == Fraction(float(d[i])) * int(q[i, j]) + Fraction(float(m[i]))
                for i in range(16) for j in range(32))
    print(f"  {'ok ' if exact else 'BAD'} Q4_1 float64 dequant is exact (Fraction check)")
    ok &= exact

    # tokenizer
    tok = Tokenizer(gg.metadata)
    samples = [
        "Hello world", "What is the capital of France?", render_chat("What is 12+34?"),
        "  leading spaces and trailing  \n\n", "tabs\tand\nnewlines\r\n", "1234567890 x99",
        "naïve café — “quotes” 東京 🙂", "it's we're they've I'm you'll he'd", "a  b   c",
        "<|im_start|><|im_end|><|endoftext|> mixed <repo_name>x", "",
    ]
    print("tokenizer round trips:")
    for s in samples:
        ids = tok.encode(s)
        back = tok.decode(ids, skip_special=False)
        good = back == s
        ok &= good
        print(f"  {'ok ' if good else 'BAD'} {s[:40]!r:44s} -> {len(ids)} tokens")
    # known pieces
    checks = {
        "<|im_start|>": [1], "<|im_end|>": [2],
        "12": [tok.token_to_id["1"], tok.token_to_id["2"]],      # digits split individually
    }
    for s, want in checks.items():
        got = tok.encode(s)
        good = got == want
        ok &= good
        print(f"  {'ok ' if good else 'BAD'} encode({s!r}) = {got} (want {want})")
    # every single-byte token round-trips
    no_tok = sorted(b for b, ch in tok.byte_enc.items() if ch not in tok.token_to_id)
    byte_ok = all(tok.decode_bytes(tok.encode(chr(b))) == chr(b).encode("utf-8")
                  for b in range(256) if b >= 0x80 or b not in no_tok)
    print(f"  {'ok ' if byte_ok else 'BAD'} latin-1 characters round-trip "
          f"(bytes without a single-byte token, dropped: {[hex(b) for b in no_tok]})")
    ok &= byte_ok

    print("OK" if ok else "FAILED")
    return 0 if ok else 1


def main(argv=None):
    ap = argparse.ArgumentParser(
        description="Independent float64 numpy reference for llama-family GGUF models "
                    "(own GGUF reader, dequantizers, BPE tokenizer and forward pass). "
                    "Prints one JSON object on stdout.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""JSON output (one object on stdout):
  prompt_tokens  list of prompt token ids
  generated      greedily generated ids (argmax, first maximum on ties); in --chat
                 mode (or with --stop-at-eos) the stop token, if produced, is the last
                 entry and generation ends there ("stopped": "stop_token", else "length")
  steps          one entry per logits vector computed after the prompt:
                 steps[0] = logits after the last prompt token, steps[i] = logits after
                 generated[i-1].  steps[i].argmax == generated[i].  The last generated
                 token is never fed back, so len(steps) == len(generated), except that
                 with --generate 0 there is still one step (the prompt logits):
                 len(steps) == max(1, len(generated)).
                 Each step: {"position": p (position of the token just fed),
                 "argmax": id, "top": [[id, logit], ...] (K entries, logit desc, ties
                 by id), "logits_sha": sha256 of the float64 little-endian logits}
  prompt_steps   (only with --all-positions) the same for every prompt position
  text           (with --chat/--text) decoded generated text, stop token excluded
  config, model, precision, prompt_text, stopped, dump_logits, timing_s (--timing)
--dump-logits F.npy saves the logits of all steps, shape (len(steps), vocab), float64.
Timing is always printed on stderr.""")
    ap.add_argument("model", help="path to the .gguf file")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--tokens", help="comma-separated prompt token ids, e.g. 1,2,3")
    src.add_argument("--chat", metavar="QUESTION",
                     help="render the SmolLM2 ChatML prompt around QUESTION, tokenize it, "
                          "stop at <|im_end|>/eos")
    src.add_argument("--text", help="tokenize TEXT as the prompt (special tokens parsed)")
    src.add_argument("--self-test", action="store_true",
                     help="check dequantizers against the gguf package and the tokenizer "
                          "round trip; prints OK or FAILED (exit 1)")
    ap.add_argument("--self-test-all", action="store_true",
                    help="with --self-test: compare every tensor in the file (slower)")
    ap.add_argument("--generate", type=int, default=0, metavar="N",
                    help="greedily generate up to N tokens (default 0)")
    ap.add_argument("--logits-top", type=int, default=5, metavar="K",
                    help="number of [id, logit] pairs per step (default 5)")
    ap.add_argument("--dump-logits", metavar="FILE.npy",
                    help="save all step logits as a float64 (steps x vocab) .npy")
    ap.add_argument("--all-positions", action="store_true",
                    help="also report logits for every prompt position (prompt_steps)")
    ap.add_argument("--stop-at-eos", action="store_true",
                    help="stop generation at eos/<|im_end|> also in --tokens/--text mode")
    ap.add_argument("--rope", choices=["adjacent", "half"], default=None,
                    help="rotary layout: adjacent pairs (x[2i],x[2i+1]; ggml 'normal', the "
                         "default for arch llama) or half-split (NeoX, pairs (i, i+d/2))")
    ap.add_argument("--decode", action="store_true",
                    help="also decode generated ids to text in --tokens mode")
    ap.add_argument("--timing", action="store_true", help="include timing_s in the JSON")
    ap.add_argument("--compact", action="store_true", help="single-line JSON")
    args = ap.parse_args(argv)
    if args.self_test:
        return self_test(args)
    if args.tokens is None and args.chat is None and args.text is None:
        ap.error("one of --tokens, --chat, --text or --self-test is required")
    if args.generate < 0:
        ap.error("--generate must be >= 0")
    run(args)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (OSError, ValueError) as e:
        # A missing, empty or malformed model file: one line, not a traceback.
        sys.exit(f"llama_ref.py: {e}")
