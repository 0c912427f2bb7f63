//! Hand-made GGUF files for unit tests: metadata of a few value types and F32 tensors of any
//! shape, written to a temporary file and opened.

use std::io::Write;

use crate::checkpoint::gguf::GgufFile;

/// A metadata value of a hand-made file.
pub(crate) enum V<'a> {
    U32(u32),
    F32(f32),
    Str(&'a str),
    Bools(&'a [bool]),
    Strs(&'a [&'a str]),
    I32s(&'a [i32]),
}

impl<'a> V<'a> {
    /// A copy of the value (the slices borrowed alike).
    pub(crate) fn copy(&self) -> V<'a> {
        match self {
            V::U32(x) => V::U32(*x),
            V::F32(x) => V::F32(*x),
            V::Str(s) => V::Str(s),
            V::Bools(b) => V::Bools(b),
            V::Strs(s) => V::Strs(s),
            V::I32s(s) => V::I32s(s),
        }
    }
}

/// An F32 tensor of a hand-made file: its name, PyTorch shape and row-major values.
pub(crate) struct Tensor {
    name: String,
    shape: Vec<usize>,
    values: Vec<f32>,
}

impl Tensor {
    /// A tensor of `shape` holding `values`.
    pub(crate) fn new(name: &str, shape: &[usize], values: Vec<f32>) -> Self {
        assert_eq!(shape.iter().product::<usize>(), values.len(), "{name}");
        Tensor {
            name: name.to_string(),
            shape: shape.to_vec(),
            values,
        }
    }

    /// A 1-D tensor.
    pub(crate) fn vector(name: &str, values: &[f32]) -> Self {
        Tensor::new(name, &[values.len()], values.to_vec())
    }
}

fn put_str(buf: &mut Vec<u8>, s: &str) {
    buf.extend((s.len() as u64).to_le_bytes());
    buf.extend(s.as_bytes());
}

/// A GGUF file with metadata `kv` and `tensors`, written and opened.
pub(crate) fn gguf_file(
    kv: &[(&str, V)],
    tensors: &[Tensor],
) -> (tempfile::NamedTempFile, GgufFile) {
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((kv.len() as u64).to_le_bytes());
    for (key, value) in kv {
        put_str(&mut out, key);
        match value {
            V::U32(v) => {
                out.extend(4u32.to_le_bytes());
                out.extend(v.to_le_bytes());
            }
            V::F32(v) => {
                out.extend(6u32.to_le_bytes());
                out.extend(v.to_le_bytes());
            }
            V::Str(s) => {
                out.extend(8u32.to_le_bytes());
                put_str(&mut out, s);
            }
            V::Bools(flags) => {
                out.extend(9u32.to_le_bytes());
                out.extend(7u32.to_le_bytes());
                out.extend((flags.len() as u64).to_le_bytes());
                out.extend(flags.iter().map(|&f| f as u8));
            }
            V::Strs(strings) => {
                out.extend(9u32.to_le_bytes());
                out.extend(8u32.to_le_bytes());
                out.extend((strings.len() as u64).to_le_bytes());
                for s in *strings {
                    put_str(&mut out, s);
                }
            }
            V::I32s(values) => {
                out.extend(9u32.to_le_bytes());
                out.extend(5u32.to_le_bytes());
                out.extend((values.len() as u64).to_le_bytes());
                for v in *values {
                    out.extend(v.to_le_bytes());
                }
            }
        }
    }
    let mut data = Vec::new();
    for t in tensors {
        put_str(&mut out, &t.name);
        out.extend((t.shape.len() as u32).to_le_bytes());
        // GGUF lists the dimensions fastest-moving first.
        for d in t.shape.iter().rev() {
            out.extend((*d as u64).to_le_bytes());
        }
        out.extend(0u32.to_le_bytes());
        data.resize(data.len().div_ceil(32) * 32, 0);
        out.extend((data.len() as u64).to_le_bytes());
        data.extend(t.values.iter().flat_map(|v| v.to_le_bytes()));
    }
    out.resize(out.len().div_ceil(32) * 32, 0);
    out.extend(data);
    let mut tmp = tempfile::NamedTempFile::new().unwrap();
    tmp.write_all(&out).unwrap();
    tmp.flush().unwrap();
    let opened = GgufFile::open(tmp.path()).unwrap();
    (tmp, opened)
}
