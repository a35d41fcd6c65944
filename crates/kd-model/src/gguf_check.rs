//! A bounds check of a GGUF header, run before candle parses the file.
//!
//! candle's `gguf_file::Content::read` sizes vectors and strings from the counts and lengths
//! the header declares. candle 0.11.1 bounds most of them by the file's size itself, but not
//! all of its arithmetic: a `general.alignment` of 0 divides by zero, four large dimensions
//! overflow the element count, and an empty tensor reaches `slice::from_raw_parts` with an
//! unaligned pointer (a panic or an abort each; the last was found by `tests/fuzz.rs`).
//! Rather than rely on what one candle version checks, [`check`] walks the same header (GGUF
//! v2/v3, see ggml's `docs/gguf.md`) through a buffered reader of fixed size and refuses,
//! before anything is allocated from a header value, every count or length that cannot fit
//! in the bytes left in the file: it never reads a string or an array into memory (keys and
//! tensor names, at most 64 KiB, are read to name them in messages). Its work is linear in
//! the header's size and its memory is constant.
//!
//! Refused with [`Error::BadGguf`]: a wrong magic or a version other than 2 and 3; more
//! metadata entries or tensors than the rest of the file could describe; a string or key
//! longer than the rest of the file (keys also above the spec's 65535 bytes); an array whose
//! count times its element's smallest encoding exceeds the rest of the file; arrays nested
//! deeper than 64; an unknown value type; a `general.alignment` that is not a non-zero
//! multiple of 8 in an integer type; a tensor with more than 4 dimensions, an element count
//! that overflows 64 bits or is not a whole number of blocks, a ggml type candle cannot read,
//! an offset that is not a multiple of the alignment, data that extends past the end of the
//! file, or no elements at all; and a file that ends inside the header.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use candle_core::quantized::GgmlDType;

use crate::error::{Error, Result};

/// What a checked header says about the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GgufLayout {
    /// Format version (2 or 3).
    pub version: u32,
    /// Number of tensors declared.
    pub tensor_count: u64,
    /// Number of metadata key-value pairs declared.
    pub metadata_count: u64,
    /// `general.alignment`, or 32 when absent.
    pub alignment: u64,
    /// Absolute file offset where tensor data starts.
    pub data_offset: u64,
}

/// The spec's upper bound on a key's length in bytes; also applied to tensor names.
const MAX_KEY_LEN: u64 = 65_535;
/// Nesting depth of arrays of arrays accepted (candle refuses deeper than 64).
const MAX_DEPTH: usize = 64;
/// The spec's (and ggml's) bound on a tensor's dimensions.
const MAX_DIMS: u32 = 4;
/// Alignment when `general.alignment` is absent.
const DEFAULT_ALIGNMENT: u64 = 32;
/// Smallest metadata entry: key length, value type, a one-byte value.
const MIN_KV_BYTES: u64 = 8 + 4 + 1;
/// Smallest tensor info: name length, n_dims, ggml type, offset.
const MIN_TENSOR_BYTES: u64 = 8 + 4 + 4 + 8;

/// GGUF metadata value type ids.
const T_U8: u32 = 0;
const T_I8: u32 = 1;
const T_U16: u32 = 2;
const T_I16: u32 = 3;
const T_U32: u32 = 4;
const T_I32: u32 = 5;
const T_F32: u32 = 6;
const T_BOOL: u32 = 7;
const T_STRING: u32 = 8;
const T_ARRAY: u32 = 9;
const T_U64: u32 = 10;
const T_I64: u32 = 11;
const T_F64: u32 = 12;

/// The smallest encoding of one value of type `ty` in bytes, `None` for an unknown type.
fn min_size(ty: u32) -> Option<u64> {
    Some(match ty {
        T_U8 | T_I8 | T_BOOL => 1,
        T_U16 | T_I16 => 2,
        T_U32 | T_I32 | T_F32 => 4,
        T_U64 | T_I64 | T_F64 => 8,
        T_STRING => 8,
        T_ARRAY => 4 + 8,
        _ => return None,
    })
}

/// The spec's name of value type `ty`, for messages.
fn type_name(ty: u32) -> &'static str {
    match ty {
        T_U8 => "u8",
        T_I8 => "i8",
        T_U16 => "u16",
        T_I16 => "i16",
        T_U32 => "u32",
        T_I32 => "i32",
        T_F32 => "f32",
        T_BOOL => "bool",
        T_STRING => "string",
        T_ARRAY => "array",
        T_U64 => "u64",
        T_I64 => "i64",
        T_F64 => "f64",
        _ => "unknown",
    }
}

/// The ggml tensor types candle reads (its `GgmlDType::from_u32`, which is private).
fn ggml_type(t: u32) -> Option<GgmlDType> {
    Some(match t {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        9 => GgmlDType::Q8_1,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        15 => GgmlDType::Q8K,
        30 => GgmlDType::BF16,
        _ => return None,
    })
}

/// A buffered reader that knows the file's length and where it is.
struct Cursor<'a> {
    path: &'a Path,
    r: BufReader<File>,
    pos: u64,
    len: u64,
}

impl Cursor<'_> {
    fn bad(&self, what: impl Into<String>) -> Error {
        Error::BadGguf {
            path: self.path.to_path_buf(),
            what: what.into(),
        }
    }

    fn remaining(&self) -> u64 {
        self.len.saturating_sub(self.pos)
    }

    /// Fills `buf`, refusing (without reading) when the file has fewer bytes left.
    fn read(&mut self, buf: &mut [u8], what: &dyn Fn() -> String) -> Result<()> {
        let n = buf.len() as u64;
        if n > self.remaining() {
            return Err(self.bad(format!(
                "{} at byte {}: needs {n} bytes, the file ends after {}",
                what(),
                self.pos,
                self.remaining()
            )));
        }
        self.r.read_exact(buf).map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => {
                self.bad(format!("{}: the file ended while reading it", what()))
            }
            _ => Error::Io {
                path: self.path.to_path_buf(),
                source: e,
            },
        })?;
        self.pos += n;
        Ok(())
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32> {
        let mut b = [0u8; 4];
        self.read(&mut b, what)?;
        Ok(u32::from_le_bytes(b))
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64> {
        let mut b = [0u8; 8];
        self.read(&mut b, what)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Moves `n` bytes forward, refusing when fewer are left.
    fn skip(&mut self, n: u64, what: &dyn Fn() -> String) -> Result<()> {
        if n > self.remaining() {
            return Err(self.bad(format!(
                "{} at byte {}: needs {n} bytes, the file ends after {}",
                what(),
                self.pos,
                self.remaining()
            )));
        }
        // `n` fits in i64: it is at most the file's length.
        self.r.seek_relative(n as i64).map_err(|source| Error::Io {
            path: self.path.to_path_buf(),
            source,
        })?;
        self.pos += n;
        Ok(())
    }

    /// A string's length prefix, checked against the rest of the file.
    fn string_len(&mut self, what: &dyn Fn() -> String) -> Result<u64> {
        let n = self.u64(&|| format!("{}: length", what()))?;
        if n > self.remaining() {
            return Err(self.bad(format!(
                "{}: string of {n} bytes at byte {}, but only {} bytes remain in the file",
                what(),
                self.pos,
                self.remaining()
            )));
        }
        Ok(n)
    }

    /// A key or tensor name (at most [`MAX_KEY_LEN`] bytes), read lossily for messages.
    fn short_string(&mut self, what: &dyn Fn() -> String) -> Result<String> {
        let n = self.string_len(what)?;
        if n > MAX_KEY_LEN {
            return Err(self.bad(format!(
                "{}: {n} bytes long, more than the {MAX_KEY_LEN} bytes allowed",
                what()
            )));
        }
        let mut buf = vec![0u8; n as usize];
        self.read(&mut buf, what)?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }

    /// Skips one value of type `ty`, checking every length inside it.
    fn skip_value(&mut self, ty: u32, depth: usize, what: &dyn Fn() -> String) -> Result<()> {
        match ty {
            T_STRING => {
                let n = self.string_len(what)?;
                self.skip(n, what)
            }
            T_ARRAY => {
                if depth >= MAX_DEPTH {
                    return Err(
                        self.bad(format!("{}: arrays nested deeper than {MAX_DEPTH}", what()))
                    );
                }
                let ety = self.u32(&|| format!("{}: array element type", what()))?;
                let count = self.u64(&|| format!("{}: array length", what()))?;
                let min = min_size(ety).ok_or_else(|| {
                    self.bad(format!("{}: unknown array element type {ety}", what()))
                })?;
                let need = count.checked_mul(min);
                if need.is_none_or(|need| need > self.remaining()) {
                    return Err(self.bad(format!(
                        "{}: array of {count} {} elements needs at least {} bytes, but only {} \
                         remain in the file",
                        what(),
                        type_name(ety),
                        need.map_or_else(|| "2^64 or more".to_string(), |n| n.to_string()),
                        self.remaining()
                    )));
                }
                if matches!(ety, T_STRING | T_ARRAY) {
                    for i in 0..count {
                        self.skip_value(ety, depth + 1, &|| format!("{}[{i}]", what()))?;
                    }
                    Ok(())
                } else {
                    // Fixed-size elements: `need` bytes exactly.
                    self.skip(count * min, what)
                }
            }
            _ => match min_size(ty) {
                Some(n) => self.skip(n, what),
                None => Err(self.bad(format!("{}: unknown value type {ty}", what()))),
            },
        }
    }

    /// Reads the value of `general.alignment`, an integer type (the spec says u32; candle
    /// also takes u8, u16 and non-negative i8, i16, i32, so this does too).
    fn alignment(&mut self, ty: u32, what: &dyn Fn() -> String) -> Result<u64> {
        let v: i64 = match ty {
            T_U8 | T_I8 => {
                let mut b = [0u8; 1];
                self.read(&mut b, what)?;
                if ty == T_U8 {
                    i64::from(b[0])
                } else {
                    i64::from(b[0] as i8)
                }
            }
            T_U16 | T_I16 => {
                let mut b = [0u8; 2];
                self.read(&mut b, what)?;
                if ty == T_U16 {
                    i64::from(u16::from_le_bytes(b))
                } else {
                    i64::from(i16::from_le_bytes(b))
                }
            }
            T_U32 => i64::from(self.u32(what)?),
            T_I32 => i64::from(self.u32(what)? as i32),
            _ => {
                return Err(self.bad(format!(
                    "{}: value type {} ({ty}), expected an integer (u32)",
                    what(),
                    type_name(ty)
                )));
            }
        };
        if v <= 0 || v % 8 != 0 {
            return Err(self.bad(format!("{}: {v} is not a positive multiple of 8", what())));
        }
        Ok(v as u64)
    }
}

/// Checks that the GGUF header of `path` is consistent with the file's size; see the module
/// documentation for what is refused. Allocates at most 64 KiB whatever the file says.
pub fn check(path: &Path) -> Result<GgufLayout> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let f = File::open(path).map_err(io)?;
    let len = f.metadata().map_err(io)?.len();
    let mut c = Cursor {
        path,
        r: BufReader::with_capacity(64 * 1024, f),
        pos: 0,
        len,
    };
    let mut magic = [0u8; 4];
    c.read(&mut magic, &|| "magic".to_string())?;
    if &magic != b"GGUF" {
        return Err(c.bad(format!(
            "magic is {magic:02x?}, expected \"GGUF\" (47 47 55 46)"
        )));
    }
    let version = c.u32(&|| "version".to_string())?;
    if !matches!(version, 2 | 3) {
        return Err(c.bad(format!("version {version} (only 2 and 3 are read)")));
    }
    let tensor_count = c.u64(&|| "tensor_count".to_string())?;
    let metadata_count = c.u64(&|| "metadata_kv_count".to_string())?;
    let need = metadata_count
        .checked_mul(MIN_KV_BYTES)
        .and_then(|a| tensor_count.checked_mul(MIN_TENSOR_BYTES)?.checked_add(a));
    if need.is_none_or(|need| need > c.remaining()) {
        return Err(c.bad(format!(
            "the header declares {metadata_count} metadata entries and {tensor_count} tensors, \
             which need at least {} bytes, but only {} remain in the file",
            need.map_or_else(|| "2^64 or more".to_string(), |n| n.to_string()),
            c.remaining()
        )));
    }

    let mut alignment = DEFAULT_ALIGNMENT;
    for i in 0..metadata_count {
        let key = c.short_string(&|| format!("metadata entry {i}: key"))?;
        let what = || format!("metadata `{key}`");
        let ty = c.u32(&|| format!("{}: value type", what()))?;
        if key == "general.alignment" {
            alignment = c.alignment(ty, &what)?;
        } else {
            c.skip_value(ty, 0, &what)?;
        }
    }

    // The tensor whose data ends last: (end relative to the data section, name).
    let mut last: Option<(u64, String)> = None;
    for i in 0..tensor_count {
        let name = c.short_string(&|| format!("tensor {i}: name"))?;
        let what = || format!("tensor `{name}`");
        let n_dims = c.u32(&|| format!("{}: n_dims", what()))?;
        if n_dims > MAX_DIMS {
            return Err(c.bad(format!(
                "{}: {n_dims} dimensions, at most {MAX_DIMS} are allowed",
                what()
            )));
        }
        let mut elems: u64 = 1;
        let mut dims = Vec::with_capacity(n_dims as usize);
        for d in 0..n_dims {
            let dim = c.u64(&|| format!("{}: dimension {d}", what()))?;
            dims.push(dim);
            elems = elems.checked_mul(dim).ok_or_else(|| {
                c.bad(format!(
                    "{}: dimensions {dims:?} overflow a 64-bit element count",
                    what()
                ))
            })?;
        }
        if elems == 0 {
            // candle reads an empty tensor through a dangling, unaligned pointer
            // (`slice::from_raw_parts` on an empty `Vec<u8>`: undefined behaviour, an abort in
            // debug builds), and llama.cpp divides by the dimensions; no model has one.
            return Err(c.bad(format!("{}: dimensions {dims:?} hold no elements", what())));
        }
        let ty = c.u32(&|| format!("{}: ggml type", what()))?;
        let dtype = ggml_type(ty)
            .ok_or_else(|| c.bad(format!("{}: ggml type {ty} is not supported", what())))?;
        let offset = c.u64(&|| format!("{}: offset", what()))?;
        if !offset.is_multiple_of(alignment) {
            return Err(c.bad(format!(
                "{}: data offset {offset} is not a multiple of the alignment {alignment}",
                what()
            )));
        }
        let block = dtype.block_size() as u64;
        if !elems.is_multiple_of(block) {
            return Err(c.bad(format!(
                "{}: {elems} elements are not a whole number of {dtype:?} blocks of {block}",
                what()
            )));
        }
        let end = (elems / block)
            .checked_mul(dtype.type_size() as u64)
            .and_then(|bytes| offset.checked_add(bytes))
            .ok_or_else(|| {
                c.bad(format!(
                    "{}: {dtype:?} data of shape {dims:?} at offset {offset} overflows a 64-bit \
                     file offset",
                    what()
                ))
            })?;
        if last.as_ref().is_none_or(|(e, _)| end > *e) {
            last = Some((end, name.clone()));
        }
    }

    let data_offset = c
        .pos
        .div_ceil(alignment)
        .checked_mul(alignment)
        .ok_or_else(|| c.bad("the data section's offset overflows"))?;
    if let Some((end, name)) = last {
        let abs = data_offset.checked_add(end);
        if abs.is_none_or(|abs| abs > len) {
            return Err(c.bad(format!(
                "tensor `{name}`: data ends at byte {}, past the end of the file ({len} bytes)",
                abs.map_or_else(|| "2^64 or more".to_string(), |n| n.to_string()),
            )));
        }
    }
    Ok(GgufLayout {
        version,
        tensor_count,
        metadata_count,
        alignment,
        data_offset,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A GGUF v3 header with the given metadata (key, type, encoded value) and tensor infos.
    fn header(kvs: &[(&str, u32, Vec<u8>)], tensors: &[(&str, &[u64], u32, u64)]) -> Vec<u8> {
        let s = |out: &mut Vec<u8>, t: &str| {
            out.extend((t.len() as u64).to_le_bytes());
            out.extend(t.as_bytes());
        };
        let mut out = b"GGUF".to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend((tensors.len() as u64).to_le_bytes());
        out.extend((kvs.len() as u64).to_le_bytes());
        for (k, ty, v) in kvs {
            s(&mut out, k);
            out.extend(ty.to_le_bytes());
            out.extend(v);
        }
        for (name, dims, ty, off) in tensors {
            s(&mut out, name);
            out.extend((dims.len() as u32).to_le_bytes());
            for d in *dims {
                out.extend(d.to_le_bytes());
            }
            out.extend(ty.to_le_bytes());
            out.extend(off.to_le_bytes());
        }
        out
    }

    fn run(bytes: &[u8]) -> Result<GgufLayout> {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("t.gguf");
        std::fs::write(&p, bytes).unwrap();
        check(&p)
    }

    fn pad_to(mut v: Vec<u8>, n: usize) -> Vec<u8> {
        v.resize(n, 0);
        v
    }

    #[test]
    fn accepts_a_consistent_header_and_finds_the_data() {
        let h = header(
            &[("general.alignment", T_U32, 64u32.to_le_bytes().to_vec())],
            &[("w", &[4, 2], 0, 0), ("b", &[4], 0, 64)],
        );
        let data_offset = h.len().div_ceil(64) * 64;
        let l = run(&pad_to(h, data_offset + 64 + 16)).unwrap();
        assert_eq!(l.alignment, 64);
        assert_eq!(l.data_offset, data_offset as u64);
        assert_eq!((l.tensor_count, l.metadata_count), (2, 1));
    }

    #[test]
    fn refuses_what_candle_would_trip_over() {
        let bad = |bytes: Vec<u8>, needle: &str| match run(&bytes) {
            Err(Error::BadGguf { what, .. }) => {
                assert!(what.contains(needle), "{what:?} lacks {needle:?}")
            }
            other => panic!("expected BadGguf ({needle}), got {other:?}"),
        };
        // Alignment 0 makes candle divide by zero.
        bad(
            header(
                &[("general.alignment", T_U32, 0u32.to_le_bytes().to_vec())],
                &[],
            ),
            "multiple of 8",
        );
        // Four dimensions of 2^16 overflow candle's usize element count.
        bad(
            pad_to(header(&[], &[("w", &[1 << 16; 4], 0, 0)]), 4096),
            "overflow",
        );
        bad(
            pad_to(header(&[], &[("w", &[1; 5], 0, 0)]), 4096),
            "5 dimensions",
        );
        // Regression: an empty tensor reached candle's `from_raw_parts` on an unaligned
        // dangling pointer and aborted the process (found by tests/fuzz.rs).
        bad(
            pad_to(header(&[], &[("w", &[8, 0], 0, 0)]), 4096),
            "no elements",
        );
        bad(
            pad_to(header(&[], &[("w", &[8], 0, 0)]), 64),
            "past the end",
        );
        bad(
            pad_to(header(&[], &[("w", &[8], 0, 4)]), 4096),
            "multiple of the alignment",
        );
        bad(
            pad_to(header(&[], &[("w", &[8], 4, 0)]), 4096),
            "ggml type 4",
        );
        bad(
            pad_to(header(&[], &[("w", &[8], 2, 0)]), 4096),
            "whole number",
        );
        bad(
            header(&[("k", 13, vec![0; 8])], &[]),
            "unknown value type 13",
        );
        bad(header(&[("k", T_BOOL, vec![])], &[]), "the file ends");
        let mut v = b"GGUF".to_vec();
        v.extend(1u32.to_le_bytes());
        bad(pad_to(v, 64), "version 1");
        bad(b"GGML\x03\0\0\0".to_vec(), "magic");
    }

    #[test]
    fn nested_arrays_are_walked_and_bounded() {
        // [[1u8, 2u8], []] is fine.
        let mut v = T_ARRAY.to_le_bytes().to_vec();
        v.extend(2u64.to_le_bytes());
        v.extend(T_U8.to_le_bytes());
        v.extend(2u64.to_le_bytes());
        v.extend([1, 2]);
        v.extend(T_U8.to_le_bytes());
        v.extend(0u64.to_le_bytes());
        run(&header(&[("a", T_ARRAY, v)], &[])).unwrap();
        // 100 nested levels are refused without recursing 100 deep.
        let mut v = Vec::new();
        for _ in 0..100 {
            v.extend(T_ARRAY.to_le_bytes());
            v.extend(1u64.to_le_bytes());
        }
        v.extend(T_U8.to_le_bytes());
        v.extend(0u64.to_le_bytes());
        assert!(matches!(
            run(&header(&[("a", T_ARRAY, v)], &[])),
            Err(Error::BadGguf { what, .. }) if what.contains("nested deeper")
        ));
    }
}
