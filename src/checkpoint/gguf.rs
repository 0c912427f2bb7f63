//! Reading GGUF checkpoints (llama.cpp's single-file format), or only a rank's slice of a tensor.
//!
//! # The format
//!
//! A GGUF file of version 2 or 3 is, with every integer little-endian:
//!
//! ```text
//! "GGUF" | version: u32 | tensor_count: u64 | metadata_count: u64
//! metadata_count x { key: string, value_type: u32, value }
//! tensor_count   x { name: string, n_dims: u32, ne: [u64; n_dims], ggml_type: u32, offset: u64 }
//! zero padding up to a multiple of `general.alignment` (32 when the key is absent)
//! tensor data: tensor i at data_start + offset_i, each offset a multiple of the alignment
//! ```
//!
//! A string is a `u64` byte length followed by UTF-8 bytes (no terminator); an array value is an
//! element type (`u32`), an element count (`u64`) and the elements. Version 1 counted with `u32`
//! and is not read; version 3 only added big-endian files, which announce themselves with a
//! byte-swapped version number and are refused as an unsupported version.
//!
//! `ne[0]` is the fastest-moving dimension, so a PyTorch `[out, in]` matrix is stored with
//! `ne = [in, out]`: `out` rows of `in` elements each ([`GgufTensorInfo::shape`] reverses the
//! dimensions back). A row of a quantized type is `in / block_size` consecutive blocks, each
//! holding `block_size` elements in `type_size` bytes with its own scales. Blocks decode
//! independently, which is what lets a rank that owns a column range of a quantized matrix read
//! and decode only the blocks covering its columns ([`GgufFile::read_f32`]).
//!
//! # Why it is written this way
//!
//! * The file is untrusted. [`GgufFile::open`] parses the whole header and checks every count and
//!   length against the bytes left in the file *before* allocating for it (a header claiming 2^60
//!   tensors or a 2^60-byte string fails at once), and checks every tensor's type, dimensions,
//!   alignment and byte range (inside the file, not overlapping another tensor). Nothing a file
//!   contains can make this module panic.
//! * Tensor data is read with positioned reads (`pread`) of exactly the bytes asked for, as in the
//!   safetensors reader: a memory map would fault in nearly every page of a matrix whose columns
//!   are split across ranks.
//! * Dequantization follows ggml's reference C code and gguf-py's `gguf.quants.dequantize`
//!   operation for operation (f16 scales widened exactly with `half`, the same products and sums
//!   in `f32`, no fused multiply-adds), so the values are bit-identical to gguf-py's. The tests
//!   check this against reference values written by gguf-py (`scripts/make_fixtures.py`).
//!
//! # Tensor names
//!
//! llama.cpp renames tensors (`blk.3.attn_q.weight` for `model.layers.3.self_attn.q_proj.weight`,
//! each architecture with its own table) and, for the `llama` and `granite` architectures,
//! permutes the rows of `q_proj` and `k_proj` for its rotary layout. [`TensorNames`] (and
//! [`hf_tensor_name`], [`gguf_tensor_name`] for the llama family) and [`unpermute_rotary_rows`]
//! undo both; the other transformations of its converter are undone in
//! [`crate::checkpoint::gguf_model`].

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs::File;
use std::io::{BufReader, Read};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use half::f16;

/// The four bytes every GGUF file starts with.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";

/// The tensor-data alignment of a file without a `general.alignment` key.
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// Most dimensions a ggml tensor can have (`GGML_MAX_DIMS`).
const MAX_DIMS: usize = 4;

/// How deep metadata arrays may nest (real files never nest them at all).
const MAX_ARRAY_DEPTH: usize = 4;

/// Largest single read of whole rows; longer row ranges are read in chunks of this size.
const MAX_READ_BYTES: usize = 64 << 20;

/// Fixed header: magic, version, tensor count, metadata count.
const FIXED_HEADER_BYTES: u64 = 4 + 4 + 8 + 8;

/// Fewest bytes a metadata entry can take: an empty key, its type, a one-byte value.
const MIN_METADATA_ENTRY_BYTES: u64 = 8 + 4 + 1;

/// Fewest bytes a tensor-info entry can take: an empty name, `n_dims`, one dim, type, offset.
const MIN_TENSOR_INFO_BYTES: u64 = 8 + 4 + 8 + 4 + 8;

/// Largest ggml block, in elements (the K-quants' super-block).
const MAX_BLOCK_ELEMENTS: usize = 256;

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// What can go wrong while reading a GGUF file. Every variant names the file, and the metadata
/// key or tensor concerned where there is one.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GgufError {
    /// The file could not be opened or read.
    #[error("cannot read GGUF file {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating system's reason.
        source: std::io::Error,
    },
    /// The file does not start with `GGUF`.
    #[error("{} is not a GGUF file: it starts with {found:02x?}, not \"GGUF\"", path.display())]
    BadMagic {
        /// The file.
        path: PathBuf,
        /// Its first four bytes (fewer if the file is shorter).
        found: Vec<u8>,
    },
    /// The file is a GGUF version this reader does not handle (only 2 and 3 are read).
    #[error(
        "{} is GGUF version {version}; only versions 2 and 3 (little-endian) can be read",
        path.display()
    )]
    UnsupportedVersion {
        /// The file.
        path: PathBuf,
        /// The version field as read (a big-endian file shows a byte-swapped number).
        version: u32,
    },
    /// The file ends in the middle of the header.
    #[error("GGUF file {} is truncated: {what}", path.display())]
    Truncated {
        /// The file.
        path: PathBuf,
        /// What was being read when the file ended.
        what: String,
    },
    /// The header is inconsistent: a count or length that cannot fit in the file, an unknown
    /// metadata value type, a duplicate key or tensor name, a bad alignment, overlapping tensors.
    #[error("malformed GGUF file {}: {message}", path.display())]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// One tensor's entry is invalid: dimensions, a row length that is not a whole number of
    /// blocks, a misaligned offset, data outside the file.
    #[error("GGUF file {}: tensor `{tensor}`: {message}", path.display())]
    InvalidTensor {
        /// The file.
        path: PathBuf,
        /// The tensor's name.
        tensor: String,
        /// What is wrong with it.
        message: String,
    },
    /// A tensor's ggml type is unknown (at [`GgufFile::open`]: its size cannot be computed) or
    /// cannot be dequantized by this reader (at [`GgufFile::read_f32`]).
    #[error(
        "GGUF file {}: tensor `{tensor}` has ggml type {ggml_type}, which this reader cannot read \
         (supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K)",
        path.display()
    )]
    UnsupportedType {
        /// The file.
        path: PathBuf,
        /// The tensor's name.
        tensor: String,
        /// Its type.
        ggml_type: GgmlType,
    },
    /// A required metadata key is absent.
    #[error("GGUF file {}: metadata key `{key}` is missing", path.display())]
    MissingKey {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
    },
    /// A metadata key holds a value of the wrong type.
    #[error("GGUF file {}: metadata key `{key}` holds {found}, expected {expected}", path.display())]
    WrongKeyType {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// What the caller wanted.
        expected: &'static str,
        /// What the key holds.
        found: String,
    },
    /// No tensor of that name is in the file.
    #[error("GGUF file {}: no tensor named `{tensor}`", path.display())]
    MissingTensor {
        /// The file.
        path: PathBuf,
        /// The name asked for.
        tensor: String,
    },
    /// The rows or columns asked for are outside the tensor.
    #[error("GGUF file {}: tensor `{tensor}`: {message}", path.display())]
    OutOfRange {
        /// The file.
        path: PathBuf,
        /// The tensor's name.
        tensor: String,
        /// The request and the tensor's extent.
        message: String,
    },
    /// [`unpermute_rotary_rows`] was given a buffer that is not whole heads.
    #[error(
        "cannot un-permute rotary rows: {len} values are not whole heads of {head_dim} rows \
         (an even number) x {cols} columns"
    )]
    InvalidPermutation {
        /// The buffer's length.
        len: usize,
        /// Rows per head.
        head_dim: usize,
        /// Columns per row.
        cols: usize,
    },
}

// ---------------------------------------------------------------------------------------------
// Metadata values
// ---------------------------------------------------------------------------------------------

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    /// `uint8` (type 0).
    U8(u8),
    /// `int8` (type 1).
    I8(i8),
    /// `uint16` (type 2).
    U16(u16),
    /// `int16` (type 3).
    I16(i16),
    /// `uint32` (type 4).
    U32(u32),
    /// `int32` (type 5).
    I32(i32),
    /// `uint64` (type 10).
    U64(u64),
    /// `int64` (type 11).
    I64(i64),
    /// `float32` (type 6).
    F32(f32),
    /// `float64` (type 12).
    F64(f64),
    /// `bool` (type 7): one byte, 0 or 1.
    Bool(bool),
    /// `string` (type 8). Invalid UTF-8 in a value is replaced by U+FFFD.
    String(String),
    /// `array` (type 9) of values of one type.
    Array(Vec<GgufValue>),
}

impl GgufValue {
    /// The value as a `u64`: any integer type with a non-negative value.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v.into()),
            GgufValue::U16(v) => Some(v.into()),
            GgufValue::U32(v) => Some(v.into()),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) => u64::try_from(v).ok(),
            GgufValue::I16(v) => u64::try_from(v).ok(),
            GgufValue::I32(v) => u64::try_from(v).ok(),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as an `i64`: any integer type whose value fits.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            GgufValue::I8(v) => Some(v.into()),
            GgufValue::I16(v) => Some(v.into()),
            GgufValue::I32(v) => Some(v.into()),
            GgufValue::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// The value as an `f64`: a float, or an integer (converted; exact below 2^53).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(v.into()),
            GgufValue::F64(v) => Some(v),
            GgufValue::U64(v) => Some(v as f64),
            GgufValue::I64(v) => Some(v as f64),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    /// The value as a string slice, if it is a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// The elements, if the value is an array.
    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }

    /// The value, if it is a bool.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// A short description of the value's type for messages (`u32`, `string`, `array of 3`).
    pub fn type_name(&self) -> String {
        match self {
            GgufValue::U8(_) => "u8".into(),
            GgufValue::I8(_) => "i8".into(),
            GgufValue::U16(_) => "u16".into(),
            GgufValue::I16(_) => "i16".into(),
            GgufValue::U32(_) => "u32".into(),
            GgufValue::I32(_) => "i32".into(),
            GgufValue::U64(_) => "u64".into(),
            GgufValue::I64(_) => "i64".into(),
            GgufValue::F32(_) => "f32".into(),
            GgufValue::F64(_) => "f64".into(),
            GgufValue::Bool(_) => "bool".into(),
            GgufValue::String(_) => "string".into(),
            GgufValue::Array(a) => format!("array of {}", a.len()),
        }
    }

    /// A description of the value for error messages: its type, and the value if it is short.
    fn describe(&self) -> String {
        match self {
            GgufValue::Array(_) => self.type_name(),
            GgufValue::String(s) if s.len() > 40 => format!("a string of {} bytes", s.len()),
            GgufValue::String(s) => format!("the string {s:?}"),
            other => format!("{} {other:?}", other.type_name()),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// ggml types
// ---------------------------------------------------------------------------------------------

/// A ggml tensor type, as numbered by `enum ggml_type` in ggml.h.
///
/// Every type ggml defines is known (so that a file holding one can be opened and its other
/// tensors read); [`GgmlType::is_supported`] says which ones [`GgufFile::read_f32`] can
/// dequantize: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    /// 32-bit float (id 0).
    F32,
    /// IEEE half (id 1).
    F16,
    /// 4-bit, blocks of 32: f16 scale (id 2).
    Q4_0,
    /// 4-bit, blocks of 32: f16 scale and minimum (id 3).
    Q4_1,
    /// 5-bit, blocks of 32: f16 scale (id 6).
    Q5_0,
    /// 5-bit, blocks of 32: f16 scale and minimum (id 7).
    Q5_1,
    /// 8-bit, blocks of 32: f16 scale (id 8).
    Q8_0,
    /// 8-bit, blocks of 32: f16 scale and sum, for activations (id 9).
    Q8_1,
    /// 2-bit K-quant, super-blocks of 256 (id 10).
    Q2_K,
    /// 3-bit K-quant, super-blocks of 256 (id 11).
    Q3_K,
    /// 4-bit K-quant, super-blocks of 256 (id 12).
    Q4_K,
    /// 5-bit K-quant, super-blocks of 256 (id 13).
    Q5_K,
    /// 6-bit K-quant, super-blocks of 256 (id 14).
    Q6_K,
    /// 8-bit K-quant, for activations (id 15).
    Q8_K,
    /// i-quant (id 16).
    IQ2_XXS,
    /// i-quant (id 17).
    IQ2_XS,
    /// i-quant (id 18).
    IQ3_XXS,
    /// i-quant (id 19).
    IQ1_S,
    /// i-quant, blocks of 32 (id 20).
    IQ4_NL,
    /// i-quant (id 21).
    IQ3_S,
    /// i-quant (id 22).
    IQ2_S,
    /// i-quant (id 23).
    IQ4_XS,
    /// 8-bit integer (id 24).
    I8,
    /// 16-bit integer (id 25).
    I16,
    /// 32-bit integer (id 26).
    I32,
    /// 64-bit integer (id 27).
    I64,
    /// 64-bit float (id 28).
    F64,
    /// i-quant (id 29).
    IQ1_M,
    /// bfloat16 (id 30).
    BF16,
    /// ternary (id 34).
    TQ1_0,
    /// ternary (id 35).
    TQ2_0,
    /// microscaling fp4, blocks of 32 (id 39).
    MXFP4,
    /// NVIDIA fp4, blocks of 64 (id 40).
    NVFP4,
    /// 1-bit, blocks of 128 (id 41).
    Q1_0,
    /// An id this reader does not know (removed types such as 4, 5 and 31 to 33 included).
    Other(u32),
}

impl GgmlType {
    /// Every known type with its id, elements per block and bytes per block (ggml's
    /// `type_traits`, gguf-py's `GGML_QUANT_SIZES`).
    const TABLE: &'static [(GgmlType, u32, usize, usize)] = &[
        (GgmlType::F32, 0, 1, 4),
        (GgmlType::F16, 1, 1, 2),
        (GgmlType::Q4_0, 2, 32, 18),
        (GgmlType::Q4_1, 3, 32, 20),
        (GgmlType::Q5_0, 6, 32, 22),
        (GgmlType::Q5_1, 7, 32, 24),
        (GgmlType::Q8_0, 8, 32, 34),
        (GgmlType::Q8_1, 9, 32, 40),
        (GgmlType::Q2_K, 10, 256, 84),
        (GgmlType::Q3_K, 11, 256, 110),
        (GgmlType::Q4_K, 12, 256, 144),
        (GgmlType::Q5_K, 13, 256, 176),
        (GgmlType::Q6_K, 14, 256, 210),
        (GgmlType::Q8_K, 15, 256, 292),
        (GgmlType::IQ2_XXS, 16, 256, 66),
        (GgmlType::IQ2_XS, 17, 256, 74),
        (GgmlType::IQ3_XXS, 18, 256, 98),
        (GgmlType::IQ1_S, 19, 256, 50),
        (GgmlType::IQ4_NL, 20, 32, 18),
        (GgmlType::IQ3_S, 21, 256, 110),
        (GgmlType::IQ2_S, 22, 256, 82),
        (GgmlType::IQ4_XS, 23, 256, 136),
        (GgmlType::I8, 24, 1, 1),
        (GgmlType::I16, 25, 1, 2),
        (GgmlType::I32, 26, 1, 4),
        (GgmlType::I64, 27, 1, 8),
        (GgmlType::F64, 28, 1, 8),
        (GgmlType::IQ1_M, 29, 256, 56),
        (GgmlType::BF16, 30, 1, 2),
        (GgmlType::TQ1_0, 34, 256, 54),
        (GgmlType::TQ2_0, 35, 256, 66),
        (GgmlType::MXFP4, 39, 32, 17),
        (GgmlType::NVFP4, 40, 64, 36),
        (GgmlType::Q1_0, 41, 128, 18),
    ];

    /// The type with ggml id `id` ([`GgmlType::Other`] for an unknown id).
    pub fn from_id(id: u32) -> GgmlType {
        Self::TABLE
            .iter()
            .find(|(_, i, _, _)| *i == id)
            .map_or(GgmlType::Other(id), |(t, _, _, _)| *t)
    }

    fn entry(self) -> Option<(u32, usize, usize)> {
        Self::TABLE
            .iter()
            .find(|(t, _, _, _)| *t == self)
            .map(|&(_, id, bs, ts)| (id, bs, ts))
    }

    /// The ggml id.
    pub fn id(self) -> u32 {
        match self {
            GgmlType::Other(id) => id,
            known => known.entry().map_or(u32::MAX, |(id, _, _)| id),
        }
    }

    /// Elements per block (1 for plain number types); `None` for an unknown type.
    pub fn block_size(self) -> Option<usize> {
        self.entry().map(|(_, bs, _)| bs)
    }

    /// Bytes per block; `None` for an unknown type.
    pub fn type_size(self) -> Option<usize> {
        self.entry().map(|(_, _, ts)| ts)
    }

    /// Whether [`GgufFile::read_f32`] can dequantize tensors of this type.
    pub fn is_supported(self) -> bool {
        matches!(
            self,
            GgmlType::F32
                | GgmlType::F16
                | GgmlType::BF16
                | GgmlType::Q4_0
                | GgmlType::Q4_1
                | GgmlType::Q5_0
                | GgmlType::Q5_1
                | GgmlType::Q8_0
                | GgmlType::Q2_K
                | GgmlType::Q3_K
                | GgmlType::Q4_K
                | GgmlType::Q5_K
                | GgmlType::Q6_K
        )
    }

    /// Whether the type is quantized in blocks (rather than one number per element).
    pub fn is_quantized(self) -> bool {
        self.block_size().is_some_and(|bs| bs > 1)
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GgmlType::Other(id) => write!(f, "unknown (id {id})"),
            known => write!(f, "{known:?} (id {})", known.id()),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Tensor infos and the file
// ---------------------------------------------------------------------------------------------

/// One tensor's entry in the header: name, dimensions, type, and where its data lies.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufTensorInfo {
    /// The GGUF name (`blk.0.attn_q.weight`).
    pub name: String,
    /// Dimensions as stored, fastest-moving first (`ne[0]` is the row length).
    pub dims: Vec<u64>,
    /// The element type.
    pub ggml_type: GgmlType,
    /// Absolute byte offset of the data in the file.
    offset: u64,
    /// Bytes of data.
    n_bytes: u64,
    /// Row length (`ne[0]`).
    cols: usize,
    /// Number of rows (the product of the other dimensions).
    rows: usize,
}

impl GgufTensorInfo {
    /// Row-major shape as PyTorch sees it: the dimensions reversed (`[ne1, ne0]` for a 2-D
    /// tensor, which is `[out, in]` for a linear layer's weight).
    pub fn shape(&self) -> Vec<usize> {
        // Each dimension is at most the tensor's element count, checked to fit usize at open.
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }

    /// The number of elements.
    pub fn n_elements(&self) -> usize {
        self.rows * self.cols
    }

    /// Rows of the tensor seen as a matrix `[rows, cols]`: the product of all dimensions but
    /// `ne[0]` (1 for a 1-D tensor). This is the row range [`GgufFile::read_f32`] indexes.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns of the tensor seen as a matrix: `ne[0]`, the row length.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The bytes of the tensor's data in the file (absolute offsets).
    pub fn byte_range(&self) -> Range<u64> {
        self.offset..self.offset + self.n_bytes
    }
}

/// An open GGUF file: its validated header, and positioned reads of its tensors.
pub struct GgufFile {
    path: PathBuf,
    file: File,
    version: u32,
    alignment: u64,
    metadata: BTreeMap<String, GgufValue>,
    tensors: Vec<GgufTensorInfo>,
    by_name: HashMap<String, usize>,
}

impl fmt::Debug for GgufFile {
    // Not derived: the metadata of a real file holds the whole vocabulary.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("architecture", &self.architecture())
            .field("metadata_entries", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish_non_exhaustive()
    }
}

impl GgufFile {
    /// Opens `path` and validates its header: the magic, the version (2 or 3), every count and
    /// length against the size of the file before anything is allocated for it, the metadata
    /// (known value types, no duplicate keys, `general.alignment` a power of two), and every
    /// tensor: a known type, 1 to 4 dimensions, a row length that is a whole number of blocks,
    /// an offset that is a multiple of the alignment, data inside the file and not overlapping
    /// another tensor's. No tensor data is read.
    pub fn open(path: &Path) -> Result<Self, GgufError> {
        let file = File::open(path).map_err(|source| GgufError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let len = file
            .metadata()
            .map_err(|source| GgufError::Io {
                path: path.to_path_buf(),
                source,
            })?
            .len();
        let reader = file.try_clone().map_err(|source| GgufError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let mut h = HeaderReader {
            path,
            reader: BufReader::with_capacity(1 << 16, reader),
            pos: 0,
            len,
            context: String::from("the fixed header"),
        };
        let parsed = h.parse()?;
        let mut by_name = HashMap::with_capacity(parsed.tensors.len());
        for (i, t) in parsed.tensors.iter().enumerate() {
            by_name.insert(t.name.clone(), i);
        }
        Ok(GgufFile {
            path: path.to_path_buf(),
            file,
            version: parsed.version,
            alignment: parsed.alignment,
            metadata: parsed.metadata,
            tensors: parsed.tensors,
            by_name,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The GGUF version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The tensor-data alignment (`general.alignment`, or [`DEFAULT_ALIGNMENT`]).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Every metadata entry, by key.
    pub fn metadata(&self) -> &BTreeMap<String, GgufValue> {
        &self.metadata
    }

    /// The metadata value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    /// `general.architecture` (`llama`, `qwen2`, ...), if present and a string.
    pub fn architecture(&self) -> Option<&str> {
        self.get("general.architecture").and_then(GgufValue::as_str)
    }

    fn wrong_type(&self, key: &str, expected: &'static str, value: &GgufValue) -> GgufError {
        GgufError::WrongKeyType {
            path: self.path.clone(),
            key: key.to_string(),
            expected,
            found: value.describe(),
        }
    }

    fn missing(&self, key: &str) -> GgufError {
        GgufError::MissingKey {
            path: self.path.clone(),
            key: key.to_string(),
        }
    }

    /// The unsigned integer at `key` (any integer type with a non-negative value); `None` if
    /// the key is absent, an error naming the key if it holds anything else.
    pub fn opt_u64_key(&self, key: &str) -> Result<Option<u64>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| self.wrong_type(key, "a non-negative integer", v)),
        }
    }

    /// The unsigned integer at `key`; an error naming the key if it is absent or not one.
    pub fn u64_key(&self, key: &str) -> Result<u64, GgufError> {
        self.opt_u64_key(key)?.ok_or_else(|| self.missing(key))
    }

    /// The number at `key` (a float, or an integer converted); `None` if the key is absent.
    pub fn opt_f64_key(&self, key: &str) -> Result<Option<f64>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.wrong_type(key, "a number", v)),
        }
    }

    /// The number at `key`; an error naming the key if it is absent or not a number.
    pub fn f64_key(&self, key: &str) -> Result<f64, GgufError> {
        self.opt_f64_key(key)?.ok_or_else(|| self.missing(key))
    }

    /// The string at `key`; `None` if the key is absent.
    pub fn opt_str_key(&self, key: &str) -> Result<Option<&str>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| self.wrong_type(key, "a string", v)),
        }
    }

    /// The string at `key`; an error naming the key if it is absent or not a string.
    pub fn str_key(&self, key: &str) -> Result<&str, GgufError> {
        self.opt_str_key(key)?.ok_or_else(|| self.missing(key))
    }

    /// The bool at `key`; `None` if the key is absent.
    pub fn opt_bool_key(&self, key: &str) -> Result<Option<bool>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.wrong_type(key, "a bool", v)),
        }
    }

    /// The array at `key`; `None` if the key is absent.
    pub fn opt_array_key(&self, key: &str) -> Result<Option<&[GgufValue]>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_array()
                .map(Some)
                .ok_or_else(|| self.wrong_type(key, "an array", v)),
        }
    }

    /// The array at `key`; an error naming the key if it is absent or not an array.
    pub fn array_key(&self, key: &str) -> Result<&[GgufValue], GgufError> {
        self.opt_array_key(key)?.ok_or_else(|| self.missing(key))
    }

    /// The tensor called `name`, if present.
    pub fn tensor(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.by_name.get(name).and_then(|&i| self.tensors.get(i))
    }

    /// Every tensor, in the order of the header.
    pub fn tensors(&self) -> impl Iterator<Item = &GgufTensorInfo> {
        self.tensors.iter()
    }

    /// The whole tensor `name`, dequantized to `f32`, row-major in its PyTorch shape.
    pub fn read_tensor_f32(&self, name: &str) -> Result<Vec<f32>, GgufError> {
        let info = self.tensor(name).ok_or_else(|| GgufError::MissingTensor {
            path: self.path.clone(),
            tensor: name.to_string(),
        })?;
        self.read_f32(name, 0..info.rows, 0..info.cols)
    }

    /// Tensor `name`, after checking that rows `rows` and columns `cols` lie inside it.
    fn block_of(
        &self,
        name: &str,
        rows: &Range<usize>,
        cols: &Range<usize>,
    ) -> Result<&GgufTensorInfo, GgufError> {
        let info = self.tensor(name).ok_or_else(|| GgufError::MissingTensor {
            path: self.path.clone(),
            tensor: name.to_string(),
        })?;
        let out_of_range = |message: String| GgufError::OutOfRange {
            path: self.path.clone(),
            tensor: name.to_string(),
            message,
        };
        if rows.start > rows.end || rows.end > info.rows {
            return Err(out_of_range(format!(
                "rows {rows:?} requested, the tensor has {} rows (shape {:?})",
                info.rows,
                info.shape()
            )));
        }
        if cols.start > cols.end || cols.end > info.cols {
            return Err(out_of_range(format!(
                "columns {cols:?} requested, the tensor has {} columns (shape {:?})",
                info.cols,
                info.shape()
            )));
        }
        Ok(info)
    }

    /// Rows `rows` and columns `cols` of tensor `name` in its PyTorch shape (`[out, in]`; a 1-D
    /// tensor is one row; a tensor of more dimensions is `[product of the leading dims, last
    /// dim]`), dequantized to `f32`, row-major: `rows.len() * cols.len()` values.
    ///
    /// Only the bytes of the blocks covering the requested columns of each requested row are
    /// read, with one positioned read per row; when whole rows are asked for, consecutive rows
    /// are read together (in reads of at most 64 MiB). Values are bit-identical to gguf-py's
    /// `gguf.quants.dequantize` of the whole tensor, sliced.
    pub fn read_f32(
        &self,
        name: &str,
        rows: Range<usize>,
        cols: Range<usize>,
    ) -> Result<Vec<f32>, GgufError> {
        let info = self.block_of(name, &rows, &cols)?;
        let ty = info.ggml_type;
        let (Some(bs), Some(ts), true) = (ty.block_size(), ty.type_size(), ty.is_supported())
        else {
            return Err(GgufError::UnsupportedType {
                path: self.path.clone(),
                tensor: name.to_string(),
                ggml_type: ty,
            });
        };
        // Both lengths are bounded by dimensions whose product was checked at open.
        let n_out = rows.len() * cols.len();
        let mut out = Vec::with_capacity(n_out);
        if n_out == 0 {
            return Ok(out);
        }
        let row_bytes = info.cols / bs * ts;
        let first_block = cols.start / bs;
        let end_block = cols.end.div_ceil(bs);
        let skip = cols.start - first_block * bs;
        let io_err = |source| GgufError::Io {
            path: self.path.clone(),
            source,
        };
        if cols.start == 0 && cols.end == info.cols {
            // Whole rows: contiguous, read many rows at once.
            let rows_per_read = (MAX_READ_BYTES / row_bytes.max(1)).max(1);
            let mut buf = vec![0u8; rows_per_read.min(rows.len()) * row_bytes];
            let mut r = rows.start;
            while r < rows.end {
                let n = rows_per_read.min(rows.end - r);
                let bytes = &mut buf[..n * row_bytes];
                self.file
                    .read_exact_at(bytes, info.offset + (r * row_bytes) as u64)
                    .map_err(io_err)?;
                for row in bytes.chunks_exact(row_bytes) {
                    decode_into(ty, row, 0, info.cols, &mut out);
                }
                r += n;
            }
        } else {
            // A column range: per row, only the blocks that cover it.
            let span = (end_block - first_block) * ts;
            let mut buf = vec![0u8; span];
            for r in rows {
                let at = info.offset + (r * row_bytes + first_block * ts) as u64;
                self.file.read_exact_at(&mut buf, at).map_err(io_err)?;
                decode_into(ty, &buf, skip, cols.len(), &mut out);
            }
        }
        Ok(out)
    }

    /// The stored blocks of rows `rows` and columns `cols` of quantized tensor `name`, row
    /// after row, without dequantizing them: `None` when the tensor is not block-quantized or
    /// the columns do not start and end at block boundaries (the caller then reads f32).
    pub fn read_blocks(
        &self,
        name: &str,
        rows: Range<usize>,
        cols: Range<usize>,
    ) -> Result<Option<(GgmlType, Vec<u8>)>, GgufError> {
        let Some(span) = self.block_span(name, &rows, &cols)? else {
            return Ok(None);
        };
        Ok(Some((span.ggml_type, self.read_span(&span)?)))
    }

    /// The stored blocks `span` covers, row after row (see [`GgufFile::block_span`]).
    pub fn read_span(&self, span: &BlockSpan) -> Result<Vec<u8>, GgufError> {
        let mut out = vec![0u8; span.bytes()];
        for (r, dst) in out.chunks_exact_mut(span.row_bytes.max(1)).enumerate() {
            let at = span.first_byte + (r * span.stride) as u64;
            self.file
                .read_exact_at(dst, at)
                .map_err(|source| GgufError::Io {
                    path: self.path.clone(),
                    source,
                })?;
        }
        Ok(out)
    }

    /// What [`GgufFile::read_blocks`] would read of rows `rows` and columns `cols` of tensor
    /// `name`, from the header alone: `None` where it reads nothing (a tensor not quantized in
    /// blocks of a type this reader decodes, or columns off the block boundaries).
    pub fn block_span(
        &self,
        name: &str,
        rows: &Range<usize>,
        cols: &Range<usize>,
    ) -> Result<Option<BlockSpan>, GgufError> {
        let info = self.block_of(name, rows, cols)?;
        let ty = info.ggml_type;
        let (Some(bs), Some(ts)) = (ty.block_size(), ty.type_size()) else {
            return Ok(None);
        };
        let aligned = cols.start.is_multiple_of(bs) && cols.end.is_multiple_of(bs);
        if !ty.is_quantized() || !ty.is_supported() || !aligned {
            return Ok(None);
        }
        Ok(Some(BlockSpan {
            ggml_type: ty,
            rows: rows.len(),
            row_bytes: cols.len() / bs * ts,
            stride: info.cols / bs * ts,
            first_byte: info.offset
                + (rows.start * (info.cols / bs * ts) + cols.start / bs * ts) as u64,
        }))
    }
}

/// The stored quantized blocks of a block of rows and columns of a tensor, as
/// [`GgufFile::block_span`] finds them and [`GgufFile::read_span`] reads them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSpan {
    /// The quantization type.
    pub ggml_type: GgmlType,
    /// Number of rows.
    pub rows: usize,
    /// Bytes of the blocks of one row's columns.
    pub row_bytes: usize,
    /// Bytes of one whole stored row.
    stride: usize,
    /// Absolute offset of the first row's first block of the columns.
    first_byte: u64,
}

impl BlockSpan {
    /// Bytes of every row's blocks: the size of what [`GgufFile::read_blocks`] returns.
    pub fn bytes(&self) -> usize {
        self.rows * self.row_bytes
    }
}

// ---------------------------------------------------------------------------------------------
// Header parsing
// ---------------------------------------------------------------------------------------------

struct ParsedHeader {
    version: u32,
    alignment: u64,
    metadata: BTreeMap<String, GgufValue>,
    tensors: Vec<GgufTensorInfo>,
}

/// A tensor-info entry before validation.
struct RawTensorInfo {
    name: String,
    dims: Vec<u64>,
    type_id: u32,
    offset: u64,
}

/// Sequential reads of the header that know how many bytes the file has left.
struct HeaderReader<'p> {
    path: &'p Path,
    reader: BufReader<File>,
    pos: u64,
    len: u64,
    /// The entry being read, for messages.
    context: String,
}

impl HeaderReader<'_> {
    fn malformed(&self, message: impl Into<String>) -> GgufError {
        GgufError::Malformed {
            path: self.path.to_path_buf(),
            message: message.into(),
        }
    }

    fn invalid_tensor(&self, tensor: &str, message: impl Into<String>) -> GgufError {
        GgufError::InvalidTensor {
            path: self.path.to_path_buf(),
            tensor: tensor.to_string(),
            message: message.into(),
        }
    }

    fn remaining(&self) -> u64 {
        self.len.saturating_sub(self.pos)
    }

    /// Reads exactly `buf.len()` bytes, after checking that the file has them.
    fn fill(&mut self, buf: &mut [u8], what: &str) -> Result<(), GgufError> {
        if (buf.len() as u64) > self.remaining() {
            return Err(GgufError::Truncated {
                path: self.path.to_path_buf(),
                what: format!(
                    "the file ends at byte {} in {} (reading {what}, {} bytes at offset {})",
                    self.len,
                    self.context,
                    buf.len(),
                    self.pos
                ),
            });
        }
        self.reader
            .read_exact(buf)
            .map_err(|source| GgufError::Io {
                path: self.path.to_path_buf(),
                source,
            })?;
        self.pos += buf.len() as u64;
        Ok(())
    }

    fn bytes<const N: usize>(&mut self, what: &str) -> Result<[u8; N], GgufError> {
        let mut buf = [0u8; N];
        self.fill(&mut buf, what)?;
        Ok(buf)
    }

    fn u32(&mut self, what: &str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.bytes(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.bytes(what)?))
    }

    /// A length-prefixed string's bytes; the length is checked against the rest of the file
    /// before anything is allocated.
    fn string_bytes(&mut self, what: &str) -> Result<Vec<u8>, GgufError> {
        let n = self.u64(what)?;
        if n > self.remaining() {
            return Err(self.malformed(format!(
                "{}: {what} claims {n} bytes, but only {} bytes remain in the file",
                self.context,
                self.remaining()
            )));
        }
        // n <= remaining <= file length, which fits in memory's address space on 64-bit.
        let n = usize::try_from(n).map_err(|_| self.malformed(format!("{what} too long")))?;
        let mut buf = vec![0u8; n];
        self.fill(&mut buf, what)?;
        Ok(buf)
    }

    /// A string that must be valid UTF-8 (a key or a tensor name).
    fn name(&mut self, what: &str) -> Result<String, GgufError> {
        let bytes = self.string_bytes(what)?;
        String::from_utf8(bytes).map_err(|e| {
            self.malformed(format!("{}: {what} is not valid UTF-8: {e}", self.context))
        })
    }

    fn parse(&mut self) -> Result<ParsedHeader, GgufError> {
        let mut magic = [0u8; 4];
        let n = (self.len.min(4)) as usize;
        self.fill(&mut magic[..n], "the magic")?;
        if n < 4 || magic != GGUF_MAGIC {
            return Err(GgufError::BadMagic {
                path: self.path.to_path_buf(),
                found: magic[..n].to_vec(),
            });
        }
        let version = self.u32("the version")?;
        if version != 2 && version != 3 {
            return Err(GgufError::UnsupportedVersion {
                path: self.path.to_path_buf(),
                version,
            });
        }
        let n_tensors = self.u64("the tensor count")?;
        let n_metadata = self.u64("the metadata count")?;
        self.check_counts(n_tensors, n_metadata)?;

        let mut metadata = BTreeMap::new();
        for i in 0..n_metadata {
            self.context = format!("metadata entry {i}");
            let key = self.name("the key")?;
            self.context = format!("metadata entry {i} (`{key}`)");
            let value_type = self.u32("the value type")?;
            let value = self.value(value_type, 0)?;
            if metadata.contains_key(&key) {
                return Err(self.malformed(format!("metadata key `{key}` appears twice")));
            }
            metadata.insert(key, value);
        }

        // Bounded by check_counts: at most one entry per MIN_TENSOR_INFO_BYTES of the file.
        let mut raw = Vec::with_capacity((n_tensors as usize).min(1 << 16));
        for i in 0..n_tensors {
            self.context = format!("tensor info {i}");
            raw.push(self.tensor_info()?);
        }

        let alignment = self.alignment(&metadata)?;
        let data_start = self
            .pos
            .div_ceil(alignment)
            .checked_mul(alignment)
            .ok_or_else(|| {
                self.malformed(format!(
                    "data section start overflows with alignment {alignment}"
                ))
            })?;
        let tensors = self.validate_tensors(raw, data_start, alignment)?;
        Ok(ParsedHeader {
            version,
            alignment,
            metadata,
            tensors,
        })
    }

    /// Refuses counts the file cannot possibly hold, before anything is allocated for them.
    fn check_counts(&self, n_tensors: u64, n_metadata: u64) -> Result<(), GgufError> {
        let room = self.len.saturating_sub(FIXED_HEADER_BYTES);
        let tensor_bytes = n_tensors.checked_mul(MIN_TENSOR_INFO_BYTES);
        let metadata_bytes = n_metadata.checked_mul(MIN_METADATA_ENTRY_BYTES);
        let total = tensor_bytes
            .zip(metadata_bytes)
            .and_then(|(a, b)| a.checked_add(b));
        match total {
            Some(t) if t <= room => Ok(()),
            _ => Err(self.malformed(format!(
                "the header claims {n_tensors} tensors and {n_metadata} metadata entries, which \
                 need at least {MIN_TENSOR_INFO_BYTES} and {MIN_METADATA_ENTRY_BYTES} bytes each, \
                 but the file has only {} bytes",
                self.len
            ))),
        }
    }

    /// Fewest bytes one value of metadata type `ty` takes.
    fn min_value_bytes(&self, ty: u32) -> Result<u64, GgufError> {
        Ok(match ty {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            8 => 8,
            9 => 12,
            10..=12 => 8,
            other => {
                return Err(self.malformed(format!(
                    "{}: unknown metadata value type {other}",
                    self.context
                )))
            }
        })
    }

    fn value(&mut self, ty: u32, depth: usize) -> Result<GgufValue, GgufError> {
        Ok(match ty {
            0 => GgufValue::U8(u8::from_le_bytes(self.bytes("a u8 value")?)),
            1 => GgufValue::I8(i8::from_le_bytes(self.bytes("an i8 value")?)),
            2 => GgufValue::U16(u16::from_le_bytes(self.bytes("a u16 value")?)),
            3 => GgufValue::I16(i16::from_le_bytes(self.bytes("an i16 value")?)),
            4 => GgufValue::U32(u32::from_le_bytes(self.bytes("a u32 value")?)),
            5 => GgufValue::I32(i32::from_le_bytes(self.bytes("an i32 value")?)),
            6 => GgufValue::F32(f32::from_le_bytes(self.bytes("an f32 value")?)),
            7 => match self.bytes::<1>("a bool value")? {
                [0] => GgufValue::Bool(false),
                [1] => GgufValue::Bool(true),
                [b] => {
                    return Err(self.malformed(format!(
                        "{}: bool value {b} is neither 0 nor 1",
                        self.context
                    )))
                }
            },
            8 => {
                let bytes = self.string_bytes("a string value")?;
                GgufValue::String(match String::from_utf8(bytes) {
                    Ok(s) => s,
                    Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
                })
            }
            9 => self.array(depth)?,
            10 => GgufValue::U64(u64::from_le_bytes(self.bytes("a u64 value")?)),
            11 => GgufValue::I64(i64::from_le_bytes(self.bytes("an i64 value")?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.bytes("an f64 value")?)),
            other => {
                return Err(self.malformed(format!(
                    "{}: unknown metadata value type {other}",
                    self.context
                )))
            }
        })
    }

    fn array(&mut self, depth: usize) -> Result<GgufValue, GgufError> {
        if depth >= MAX_ARRAY_DEPTH {
            return Err(self.malformed(format!(
                "{}: arrays nested more than {MAX_ARRAY_DEPTH} deep",
                self.context
            )));
        }
        let elem_type = self.u32("an array's element type")?;
        let n = self.u64("an array's length")?;
        let min = self.min_value_bytes(elem_type)?;
        if n.checked_mul(min)
            .is_none_or(|need| need > self.remaining())
        {
            return Err(self.malformed(format!(
                "{}: an array claims {n} elements of type {elem_type} (at least {min} bytes each), \
                 but only {} bytes remain in the file",
                self.context,
                self.remaining()
            )));
        }
        // Grows with what is actually read; the bound above keeps it proportional to the file.
        let mut values = Vec::with_capacity((n as usize).min(1 << 12));
        for _ in 0..n {
            values.push(self.value(elem_type, depth + 1)?);
        }
        Ok(GgufValue::Array(values))
    }

    fn tensor_info(&mut self) -> Result<RawTensorInfo, GgufError> {
        let name = self.name("the tensor name")?;
        self.context = format!("{} (`{name}`)", self.context);
        let n_dims = self.u32("the number of dimensions")?;
        if n_dims == 0 || n_dims as usize > MAX_DIMS {
            return Err(self.invalid_tensor(
                &name,
                format!("{n_dims} dimensions (a ggml tensor has 1 to {MAX_DIMS})"),
            ));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(self.u64("a dimension")?);
        }
        let type_id = self.u32("the ggml type")?;
        let offset = self.u64("the data offset")?;
        Ok(RawTensorInfo {
            name,
            dims,
            type_id,
            offset,
        })
    }

    fn alignment(&self, metadata: &BTreeMap<String, GgufValue>) -> Result<u64, GgufError> {
        let Some(v) = metadata.get("general.alignment") else {
            return Ok(DEFAULT_ALIGNMENT);
        };
        match v.as_u64() {
            Some(a) if a.is_power_of_two() && a <= u64::from(u32::MAX) => Ok(a),
            _ => Err(self.malformed(format!(
                "`general.alignment` is {}, not a power of two",
                v.describe()
            ))),
        }
    }

    fn validate_tensors(
        &self,
        raw: Vec<RawTensorInfo>,
        data_start: u64,
        alignment: u64,
    ) -> Result<Vec<GgufTensorInfo>, GgufError> {
        let mut tensors = Vec::with_capacity(raw.len());
        let mut seen = HashMap::with_capacity(raw.len());
        for t in raw {
            if seen.insert(t.name.clone(), ()).is_some() {
                return Err(self.malformed(format!("tensor name `{}` appears twice", t.name)));
            }
            let ggml_type = GgmlType::from_id(t.type_id);
            let (Some(bs), Some(ts)) = (ggml_type.block_size(), ggml_type.type_size()) else {
                return Err(GgufError::UnsupportedType {
                    path: self.path.to_path_buf(),
                    tensor: t.name,
                    ggml_type,
                });
            };
            let n_elements = t.dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d));
            let Some(n_elements) = n_elements.filter(|&n| n <= i64::MAX as u64) else {
                return Err(self.invalid_tensor(
                    &t.name,
                    format!("dimensions {:?} overflow the element count", t.dims),
                ));
            };
            // An empty tensor (a zero dimension) has no bytes to bound its other dimensions by
            // the file, yet they still size rows and blocks: their extent, zeros counted as
            // one, must be addressable.
            let extent = t
                .dims
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d.max(1)));
            if extent.is_none_or(|e| e > i64::MAX as u64) {
                return Err(self.invalid_tensor(
                    &t.name,
                    format!(
                        "dimensions {:?} span more than 2^63 elements (zero dimensions aside)",
                        t.dims
                    ),
                ));
            }
            let ne0 = t.dims[0];
            if ne0 % bs as u64 != 0 {
                return Err(self.invalid_tensor(
                    &t.name,
                    format!(
                        "row length ne[0] = {ne0} is not a multiple of the {ggml_type:?} block \
                         size {bs}"
                    ),
                ));
            }
            // n_elements / bs <= 2^63 / 1 and ts <= 292: checked anyway.
            let n_bytes = (n_elements / bs as u64).checked_mul(ts as u64);
            let start = data_start.checked_add(t.offset);
            let end = start.zip(n_bytes).and_then(|(s, n)| s.checked_add(n));
            let (Some(n_bytes), Some(start), Some(end)) = (n_bytes, start, end) else {
                return Err(self.invalid_tensor(&t.name, "data range overflows"));
            };
            if t.offset % alignment != 0 {
                return Err(self.invalid_tensor(
                    &t.name,
                    format!(
                        "data offset {} is not a multiple of the alignment {alignment}",
                        t.offset
                    ),
                ));
            }
            if end > self.len {
                return Err(self.invalid_tensor(
                    &t.name,
                    format!(
                        "data bytes {start}..{end} ({n_bytes} bytes of {ggml_type:?} for \
                         dimensions {:?}) lie outside the file ({} bytes)",
                        t.dims, self.len
                    ),
                ));
            }
            // Everything is now bounded by the file length, which fits in usize on the 64-bit
            // targets this crate runs on; refuse otherwise instead of truncating.
            let too_big = || self.invalid_tensor(&t.name, "too large for this platform");
            let cols = usize::try_from(ne0).map_err(|_| too_big())?;
            let n_elem = usize::try_from(n_elements).map_err(|_| too_big())?;
            let rows = match n_elem.checked_div(cols) {
                Some(rows) => rows,
                // ne[0] = 0: no elements, but the other dimensions still give the row count.
                None => t.dims[1..]
                    .iter()
                    .try_fold(1usize, |acc, &d| acc.checked_mul(usize::try_from(d).ok()?))
                    .ok_or_else(too_big)?,
            };
            tensors.push(GgufTensorInfo {
                name: t.name,
                dims: t.dims,
                ggml_type,
                offset: start,
                n_bytes,
                cols,
                rows,
            });
        }
        let mut order: Vec<&GgufTensorInfo> = tensors.iter().filter(|t| t.n_bytes > 0).collect();
        order.sort_by_key(|t| t.offset);
        for pair in order.windows(2) {
            if let [a, b] = pair {
                if a.offset + a.n_bytes > b.offset {
                    return Err(self.malformed(format!(
                        "the data of tensors `{}` (bytes {:?}) and `{}` (bytes {:?}) overlap",
                        a.name,
                        a.byte_range(),
                        b.name,
                        b.byte_range()
                    )));
                }
            }
        }
        Ok(tensors)
    }
}

// ---------------------------------------------------------------------------------------------
// Dequantization
// ---------------------------------------------------------------------------------------------

/// Decodes `bytes` (whole blocks of `ty`) and appends elements `skip .. skip + take` of them to
/// `out`. `ty` must be a supported type; `bytes` must hold the blocks covering those elements.
pub(crate) fn decode_into(
    ty: GgmlType,
    bytes: &[u8],
    skip: usize,
    take: usize,
    out: &mut Vec<f32>,
) {
    match ty {
        GgmlType::F32 => out.extend(
            bytes[skip * 4..(skip + take) * 4]
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        ),
        GgmlType::F16 => out.extend(
            bytes[skip * 2..(skip + take) * 2]
                .chunks_exact(2)
                .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()),
        ),
        GgmlType::BF16 => out.extend(
            bytes[skip * 2..(skip + take) * 2]
                .chunks_exact(2)
                .map(|b| bf16_to_f32([b[0], b[1]])),
        ),
        GgmlType::Q4_0 => decode_blocks(bytes, skip, take, out, dequant_q4_0),
        GgmlType::Q4_1 => decode_blocks(bytes, skip, take, out, dequant_q4_1),
        GgmlType::Q5_0 => decode_blocks(bytes, skip, take, out, dequant_q5_0),
        GgmlType::Q5_1 => decode_blocks(bytes, skip, take, out, dequant_q5_1),
        GgmlType::Q8_0 => decode_blocks(bytes, skip, take, out, dequant_q8_0),
        GgmlType::Q2_K => decode_blocks(bytes, skip, take, out, dequant_q2_k),
        GgmlType::Q3_K => decode_blocks(bytes, skip, take, out, dequant_q3_k),
        GgmlType::Q4_K => decode_blocks(bytes, skip, take, out, dequant_q4_k),
        GgmlType::Q5_K => decode_blocks(bytes, skip, take, out, dequant_q5_k),
        GgmlType::Q6_K => decode_blocks(bytes, skip, take, out, dequant_q6_k),
        // read_f32 checks is_supported() first.
        _ => {}
    }
}

/// Runs `dequant` over the `TS`-byte blocks of `bytes`, appending elements `skip .. skip + take`
/// of the decoded sequence to `out`.
fn decode_blocks<const TS: usize, const BS: usize>(
    bytes: &[u8],
    skip: usize,
    take: usize,
    out: &mut Vec<f32>,
    dequant: fn(&[u8; TS], &mut [f32; BS]),
) {
    const { assert!(BS <= MAX_BLOCK_ELEMENTS) };
    let mut scratch = [0f32; BS];
    let end = skip + take;
    for (i, chunk) in bytes.chunks_exact(TS).enumerate() {
        let (lo, hi) = (i * BS, (i + 1) * BS);
        if hi <= skip {
            continue;
        }
        if lo >= end {
            break;
        }
        let Ok(block) = <&[u8; TS]>::try_from(chunk) else {
            break; // chunks_exact yields exactly TS bytes
        };
        dequant(block, &mut scratch);
        out.extend_from_slice(&scratch[skip.max(lo) - lo..end.min(hi) - lo]);
    }
}

/// The f16 at `b[i..i + 2]`, widened exactly.
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// bfloat16 is the top half of an f32.
fn bf16_to_f32(b: [u8; 2]) -> f32 {
    f32::from_bits(u32::from(u16::from_le_bytes(b)) << 16)
}

/// Q4_0, 32 elements in 18 bytes: `d: f16 | qs: [u8; 16]`.
/// Element `j < 16` is the low nibble of `qs[j]`, element `j + 16` its high nibble;
/// value = `d * (q - 8)`.
fn dequant_q4_0(b: &[u8; 18], y: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    let qs = &b[2..18];
    for j in 0..16 {
        y[j] = d * ((qs[j] & 0x0F) as i32 - 8) as f32;
        y[j + 16] = d * ((qs[j] >> 4) as i32 - 8) as f32;
    }
}

/// Q4_1, 32 elements in 20 bytes: `d: f16 | m: f16 | qs: [u8; 16]` (nibbles as in Q4_0);
/// value = `d * q + m`.
fn dequant_q4_1(b: &[u8; 20], y: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qs = &b[4..20];
    for j in 0..16 {
        y[j] = d * (qs[j] & 0x0F) as f32 + m;
        y[j + 16] = d * (qs[j] >> 4) as f32 + m;
    }
}

/// The 5-bit values of a Q5_0/Q5_1 block: low nibbles from `qs` as in Q4_0, the fifth bit of
/// element `j` is bit `j` of the little-endian `u32` `qh`.
fn q5_values(qh: &[u8], qs: &[u8]) -> [u8; 32] {
    let qh = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
    let mut q = [0u8; 32];
    for j in 0..16 {
        let hi0 = ((qh >> j) & 1) as u8;
        let hi1 = ((qh >> (j + 16)) & 1) as u8;
        q[j] = (qs[j] & 0x0F) | (hi0 << 4);
        q[j + 16] = (qs[j] >> 4) | (hi1 << 4);
    }
    q
}

/// Q5_0, 32 elements in 22 bytes: `d: f16 | qh: [u8; 4] | qs: [u8; 16]`; value = `d * (q - 16)`.
fn dequant_q5_0(b: &[u8; 22], y: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    let q = q5_values(&b[2..6], &b[6..22]);
    for (y, &q) in y.iter_mut().zip(&q) {
        *y = d * (q as i32 - 16) as f32;
    }
}

/// Q5_1, 32 elements in 24 bytes: `d: f16 | m: f16 | qh: [u8; 4] | qs: [u8; 16]`;
/// value = `d * q + m`.
fn dequant_q5_1(b: &[u8; 24], y: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let q = q5_values(&b[4..8], &b[8..24]);
    for (y, &q) in y.iter_mut().zip(&q) {
        *y = d * q as f32 + m;
    }
}

/// Q8_0, 32 elements in 34 bytes: `d: f16 | qs: [i8; 32]`; value = `qs[j] * d`.
fn dequant_q8_0(b: &[u8; 34], y: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    for (y, &q) in y.iter_mut().zip(&b[2..34]) {
        *y = (q as i8) as f32 * d;
    }
}

/// Q2_K, 256 elements in 84 bytes: `scales: [u8; 16] | qs: [u8; 64] | d: f16 | dmin: f16`.
/// Sixteen sub-blocks of 16 elements; sub-block `i` has scale `scales[i] & 0xF` and minimum
/// `scales[i] >> 4`. Element `e = 128 n + 32 s + l` (`n < 2`, `s < 4`, `l < 32`) is bits
/// `2s..2s + 2` of `qs[32 n + l]`; value = `(d * sc) * q - dmin * m`.
fn dequant_q2_k(b: &[u8; 84], y: &mut [f32; 256]) {
    let scales = &b[0..16];
    let qs = &b[16..80];
    let d = f16_at(b, 80);
    let dmin = f16_at(b, 82);
    for (e, y) in y.iter_mut().enumerate() {
        let (n, s, l) = (e / 128, (e / 32) % 4, e % 32);
        let sc = scales[e / 16];
        let dl = d * (sc & 0x0F) as f32;
        let ml = dmin * (sc >> 4) as f32;
        let q = (qs[32 * n + l] >> (2 * s)) & 3;
        *y = dl * q as f32 - ml;
    }
}

/// The sixteen 6-bit scales of a Q3_K block, minus 32. Scale `i` has its low 4 bits in nibble
/// `i / 8` of `scales[i % 8]` and its high 2 bits at bits `2 (i / 4)` of `scales[8 + i % 4]`.
fn q3_k_scales(s: &[u8]) -> [i8; 16] {
    let mut out = [0i8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        let low = (s[i % 8] >> (4 * (i / 8))) & 0x0F;
        let high = (s[8 + i % 4] >> (2 * (i / 4))) & 0x03;
        *o = ((low | (high << 4)) as i8).wrapping_sub(32);
    }
    out
}

/// Q3_K, 256 elements in 110 bytes: `hmask: [u8; 32] | qs: [u8; 64] | scales: [u8; 12] | d: f16`.
/// Sixteen sub-blocks of 16 elements with signed 6-bit scales ([`q3_k_scales`]). Element
/// `e = 128 n + 32 s + l` has low bits `2s..2s + 2` of `qs[32 n + l]` and high bit `e / 32` of
/// `hmask[l]`; q = low - 4 when that bit is clear, low when it is set;
/// value = `(d * scale) * q`.
fn dequant_q3_k(b: &[u8; 110], y: &mut [f32; 256]) {
    let hmask = &b[0..32];
    let qs = &b[32..96];
    let scales = q3_k_scales(&b[96..108]);
    let d = f16_at(b, 108);
    for (e, y) in y.iter_mut().enumerate() {
        let (n, s, l) = (e / 128, (e / 32) % 4, e % 32);
        let dl = d * scales[e / 16] as f32;
        let low = ((qs[32 * n + l] >> (2 * s)) & 3) as i8;
        let high_set = (hmask[l] >> (e / 32)) & 1 == 1;
        let q = if high_set { low } else { low - 4 };
        *y = dl * q as f32;
    }
}

/// ggml's `get_scale_min_k4`: the eight 6-bit scales and minimums of a Q4_K/Q5_K block, packed
/// in 12 bytes. For `j < 4`: scale `s[j] & 63`, minimum `s[j + 4] & 63`. For `j >= 4`: scale
/// `(s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4)`, minimum `(s[j + 4] >> 4) | ((s[j] >> 6) << 4)`.
fn get_scale_min_k4(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// Q4_K, 256 elements in 144 bytes: `d: f16 | dmin: f16 | scales: [u8; 12] | qs: [u8; 128]`.
/// Eight sub-blocks of 32 elements with 6-bit scale and minimum ([`get_scale_min_k4`]).
/// Element `e = 64 c + 32 h + l` (`c < 4`, `h < 2`, `l < 32`) is nibble `h` of `qs[32 c + l]`;
/// value = `(d * sc) * q - dmin * m` for its sub-block `e / 32`.
fn dequant_q4_k(b: &[u8; 144], y: &mut [f32; 256]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let scales = &b[4..16];
    let qs = &b[16..144];
    for (sub, y) in y.chunks_exact_mut(32).enumerate() {
        let (sc, m) = get_scale_min_k4(sub, scales);
        let d1 = d * sc as f32;
        let m1 = dmin * m as f32;
        let (c, h) = (sub / 2, sub % 2);
        for (l, y) in y.iter_mut().enumerate() {
            let q = (qs[32 * c + l] >> (4 * h)) & 0x0F;
            *y = d1 * q as f32 - m1;
        }
    }
}

/// Q5_K, 256 elements in 176 bytes:
/// `d: f16 | dmin: f16 | scales: [u8; 12] | qh: [u8; 32] | qs: [u8; 128]`.
/// As Q4_K, plus a fifth bit for element `e`: bit `e / 32` of `qh[e % 32]`.
fn dequant_q5_k(b: &[u8; 176], y: &mut [f32; 256]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let scales = &b[4..16];
    let qh = &b[16..48];
    let qs = &b[48..176];
    for (sub, y) in y.chunks_exact_mut(32).enumerate() {
        let (sc, m) = get_scale_min_k4(sub, scales);
        let d1 = d * sc as f32;
        let m1 = dmin * m as f32;
        let (c, h) = (sub / 2, sub % 2);
        for (l, y) in y.iter_mut().enumerate() {
            let low = (qs[32 * c + l] >> (4 * h)) & 0x0F;
            let high = (qh[l] >> sub) & 1;
            *y = d1 * (low | (high << 4)) as f32 - m1;
        }
    }
}

/// Q6_K, 256 elements in 210 bytes: `ql: [u8; 128] | qh: [u8; 64] | scales: [i8; 16] | d: f16`.
/// Element `e = 128 n + 32 s + l` (`n < 2`, `s < 4`, `l < 32`) has low 4 bits from nibble
/// `s / 2` of `ql[64 n + 32 (s % 2) + l]` and high 2 bits at bits `2s` of `qh[32 n + l]`;
/// value = `(d * scales[e / 16]) * (q - 32)`.
fn dequant_q6_k(b: &[u8; 210], y: &mut [f32; 256]) {
    let ql = &b[0..128];
    let qh = &b[128..192];
    let scales = &b[192..208];
    let d = f16_at(b, 208);
    for (e, y) in y.iter_mut().enumerate() {
        let (n, s, l) = (e / 128, (e / 32) % 4, e % 32);
        let low = (ql[64 * n + 32 * (s % 2) + l] >> (4 * (s / 2))) & 0x0F;
        let high = (qh[32 * n + l] >> (2 * s)) & 3;
        let q = (low | (high << 4)) as i8 - 32;
        let dl = d * (scales[e / 16] as i8) as f32;
        *y = dl * q as f32;
    }
}

// ---------------------------------------------------------------------------------------------
// Tensor names per architecture and the rotary permutation
// ---------------------------------------------------------------------------------------------

/// One per-layer tensor: its GGUF name inside `blk.N.`, its Hugging Face name inside
/// `model.layers.N.`, and whether it is a norm (or a linear layer): a `.bias` may sit beside
/// the `.weight` where the architecture's norms (or linear layers) have biases.
type LayerName = (&'static str, &'static str, bool);

/// A norm, in a [`LayerName`].
const NORM: bool = true;
/// A linear layer, in a [`LayerName`].
const LINEAR: bool = false;

/// Attention projections.
const ATTENTION: [LayerName; 4] = [
    ("attn_q", "self_attn.q_proj", LINEAR),
    ("attn_k", "self_attn.k_proj", LINEAR),
    ("attn_v", "self_attn.v_proj", LINEAR),
    ("attn_output", "self_attn.o_proj", LINEAR),
];

/// A gated MLP's three projections.
const GATED_MLP: [LayerName; 3] = [
    ("ffn_gate", "mlp.gate_proj", LINEAR),
    ("ffn_up", "mlp.up_proj", LINEAR),
    ("ffn_down", "mlp.down_proj", LINEAR),
];

/// A norm before attention and one before the MLP (the llama family's RMSNorms).
const PRE_NORMS: [LayerName; 2] = [
    ("attn_norm", "input_layernorm", NORM),
    ("ffn_norm", "post_attention_layernorm", NORM),
];

/// A norm of each query and key head (Qwen3, Gemma 3), or of the whole projections (OLMo 2).
const QK_NORMS: [LayerName; 2] = [
    ("attn_q_norm", "self_attn.q_norm", NORM),
    ("attn_k_norm", "self_attn.k_norm", NORM),
];

/// Gemma 2/3: a norm before and after attention and MLP; llama.cpp's `ffn_norm` is the norm
/// *before* the MLP (`pre_feedforward_layernorm`), `post_attention_norm` the one after attention.
const SANDWICH_NORMS: [LayerName; 4] = [
    ("attn_norm", "input_layernorm", NORM),
    ("post_attention_norm", "post_attention_layernorm", NORM),
    ("ffn_norm", "pre_feedforward_layernorm", NORM),
    ("post_ffw_norm", "post_feedforward_layernorm", NORM),
];

/// OLMo 2: norms after attention and MLP only.
const POST_NORMS: [LayerName; 2] = [
    ("post_attention_norm", "post_attention_layernorm", NORM),
    ("post_ffw_norm", "post_feedforward_layernorm", NORM),
];

/// Phi-3: q, k and v fused in `attn_qkv`, and `ffn_up` holding the gate rows then the up rows
/// (transformers' `gate_up_proj`, in the same order).
const PHI3_FUSED: [LayerName; 4] = [
    ("attn_qkv", "self_attn.qkv_proj", LINEAR),
    ("attn_output", "self_attn.o_proj", LINEAR),
    ("ffn_up", "mlp.gate_up_proj", LINEAR),
    ("ffn_down", "mlp.down_proj", LINEAR),
];

/// StarCoder2's plain MLP (`c_fc`, `c_proj`).
const PLAIN_MLP: [LayerName; 2] = [
    ("ffn_up", "mlp.c_fc", LINEAR),
    ("ffn_down", "mlp.c_proj", LINEAR),
];

/// Qwen3-MoE's router (its experts are stacked, see [`crate::checkpoint::gguf_model`]).
const QWEN_MOE_ROUTER: [LayerName; 1] = [("ffn_gate_inp", "mlp.gate", LINEAR)];

/// Mixtral's router, in a `llama` file with experts.
const MIXTRAL_ROUTER: [LayerName; 1] = [("ffn_gate_inp", "block_sparse_moe.gate", LINEAR)];

/// Whole-model tensors: GGUF name, Hugging Face name, whether a `.bias` may sit beside the
/// `.weight` (the final norm of architectures with LayerNorm biases, see [`TensorNames`]).
const GLOBAL_NAMES: [(&str, &str, bool); 3] = [
    ("token_embd", "model.embed_tokens", false),
    ("output_norm", "model.norm", true),
    ("output", "lm_head", false),
];

/// How one GGUF architecture names its tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TensorNames {
    /// The per-layer tables of the architecture, searched in order.
    layers: &'static [&'static [LayerName]],
    /// Whether linear layers may have biases (qwen2's q/k/v, StarCoder2's, Phi-3's).
    linear_bias: bool,
    /// Whether norms have biases (StarCoder2's LayerNorms, `output_norm.bias` included).
    norm_bias: bool,
}

impl TensorNames {
    /// The tensor names of GGUF `general.architecture` `arch`, for the architectures whose
    /// tensors map one to one onto a Hugging Face checkpoint's; `None` for any other.
    pub fn of(arch: &str) -> Option<Self> {
        let layers: &'static [&'static [LayerName]] = match arch {
            "llama" | "mistral" | "qwen2" | "granite" => TensorNames::LLAMA.layers,
            "qwen3" => &[&ATTENTION, &GATED_MLP, &PRE_NORMS, &QK_NORMS],
            "qwen3moe" => &[
                &ATTENTION,
                &GATED_MLP,
                &PRE_NORMS,
                &QK_NORMS,
                &QWEN_MOE_ROUTER,
            ],
            "gemma2" => &[&ATTENTION, &GATED_MLP, &SANDWICH_NORMS],
            "gemma3" => &[&ATTENTION, &GATED_MLP, &SANDWICH_NORMS, &QK_NORMS],
            "phi3" => &[&PHI3_FUSED, &PRE_NORMS],
            "starcoder2" => &[&ATTENTION, &PLAIN_MLP, &PRE_NORMS],
            "olmo2" => &[&ATTENTION, &GATED_MLP, &POST_NORMS, &QK_NORMS],
            _ => return None,
        };
        Some(TensorNames {
            layers,
            linear_bias: !matches!(arch, "gemma2" | "gemma3" | "olmo2"),
            norm_bias: arch == "starcoder2",
        })
    }

    /// The llama family's names (`llama`, `mistral`, `qwen2`, `granite`; Mixtral's router in a
    /// `llama` file with experts, whose stacked experts [`crate::checkpoint::gguf_model`]
    /// names).
    pub const LLAMA: TensorNames = TensorNames {
        layers: &[&ATTENTION, &GATED_MLP, &PRE_NORMS, &MIXTRAL_ROUTER],
        linear_bias: true,
        norm_bias: false,
    };

    /// The Hugging Face name of GGUF tensor `gguf_name`; `None` for a tensor with no Hugging
    /// Face counterpart (`rope_freqs.weight`, `rope_factors_long.weight`, another
    /// architecture's tensors).
    pub fn hf_name(&self, gguf_name: &str) -> Option<String> {
        self.rename(gguf_name, ("blk.", "model.layers."), |(gguf, hf)| {
            (gguf, hf)
        })
    }

    /// The GGUF name of Hugging Face tensor `hf_name`: the inverse of [`TensorNames::hf_name`].
    pub fn gguf_name(&self, hf_name: &str) -> Option<String> {
        self.rename(hf_name, ("model.layers.", "blk."), |(gguf, hf)| (hf, gguf))
    }

    /// Translates a tensor name through the layer and global tables: `layers` is the (source,
    /// target) prefix of per-layer names, `direction` orders a (GGUF, HF) pair as (source,
    /// target).
    fn rename(
        &self,
        name: &str,
        layers: (&str, &str),
        direction: fn((&'static str, &'static str)) -> (&'static str, &'static str),
    ) -> Option<String> {
        let (stem, bias) = split_suffix(name)?;
        let suffix = if bias { "bias" } else { "weight" };
        if let Some(rest) = stem.strip_prefix(layers.0) {
            let (layer, part) = rest.split_once('.')?;
            let layer = parse_layer(layer)?;
            let target =
                (self.layers.iter().flat_map(|t| t.iter())).find_map(|&(gguf, hf, norm)| {
                    let (from, to) = direction((gguf, hf));
                    let may_have_bias = if norm {
                        self.norm_bias
                    } else {
                        self.linear_bias
                    };
                    (from == part && (!bias || may_have_bias)).then_some(to)
                })?;
            return Some(format!("{}{layer}.{target}.{suffix}", layers.1));
        }
        let target = GLOBAL_NAMES.iter().find_map(|&(gguf, hf, has_bias)| {
            let (from, to) = direction((gguf, hf));
            (from == stem && (!bias || (has_bias && self.norm_bias))).then_some(to)
        })?;
        Some(format!("{target}.{suffix}"))
    }
}

/// A layer index written canonically (decimal digits, no sign, no leading zero).
fn parse_layer(s: &str) -> Option<usize> {
    let n: usize = s.parse().ok()?;
    (n.to_string() == s).then_some(n)
}

/// Splits `stem.weight` / `stem.bias` into the stem and whether it is a bias.
fn split_suffix(name: &str) -> Option<(&str, bool)> {
    if let Some(stem) = name.strip_suffix(".weight") {
        Some((stem, false))
    } else {
        name.strip_suffix(".bias").map(|stem| (stem, true))
    }
}

/// The Hugging Face name of a llama-family GGUF tensor (llama, mistral, qwen2, granite):
///
/// | GGUF | Hugging Face |
/// |---|---|
/// | `token_embd.weight` | `model.embed_tokens.weight` |
/// | `output_norm.weight` | `model.norm.weight` |
/// | `output.weight` | `lm_head.weight` |
/// | `blk.N.attn_q/attn_k/attn_v/attn_output.{weight,bias}` | `model.layers.N.self_attn.{q,k,v,o}_proj.{weight,bias}` |
/// | `blk.N.ffn_gate/ffn_up/ffn_down.{weight,bias}` | `model.layers.N.mlp.{gate,up,down}_proj.{weight,bias}` |
/// | `blk.N.attn_norm.weight` | `model.layers.N.input_layernorm.weight` |
/// | `blk.N.ffn_norm.weight` | `model.layers.N.post_attention_layernorm.weight` |
/// | `blk.N.ffn_gate_inp.weight` (Mixtral's router) | `model.layers.N.block_sparse_moe.gate.weight` |
///
/// `None` for anything else (`rope_freqs.weight`, other architectures' tensors). The other
/// architectures' names: [`TensorNames::of`].
pub fn hf_tensor_name(gguf_name: &str) -> Option<String> {
    TensorNames::LLAMA.hf_name(gguf_name)
}

/// The GGUF name of a Hugging Face llama-family tensor name: the inverse of [`hf_tensor_name`].
pub fn gguf_tensor_name(hf_name: &str) -> Option<String> {
    TensorNames::LLAMA.gguf_name(hf_name)
}

/// Undoes llama.cpp's rotary row permutation of `q_proj` / `k_proj`, in place.
///
/// For the `llama` architecture (not qwen2, which is stored unpermuted), llama.cpp's
/// `convert_hf_to_gguf.py` (`LlamaModel.permute`) reshapes the HF weight to
/// `[n_head, 2, head_dim / 2, in]` and swaps axes 1 and 2, so that within each head of
/// `head_dim` rows, **GGUF row `2 i + j` holds HF row `j * head_dim / 2 + i`** (`i < head_dim / 2`,
/// `j < 2`): the two halves that HF's `rotate_half` pairs up become interleaved. Transformers'
/// GGUF loader undoes it with `reverse_permute`, which is what this does.
///
/// `data` is a row-major `[rows, cols]` buffer of whole heads in GGUF order (any run of whole
/// heads, for example one rank's heads); on return its rows are in HF order. `head_dim` must be
/// even and `data.len()` a multiple of `head_dim * cols`, otherwise
/// [`GgufError::InvalidPermutation`] is returned and `data` is untouched. A bias (one value
/// per row) is un-permuted with `cols = 1`.
pub fn unpermute_rotary_rows(
    data: &mut [f32],
    head_dim: usize,
    cols: usize,
) -> Result<(), GgufError> {
    let invalid = || GgufError::InvalidPermutation {
        len: data.len(),
        head_dim,
        cols,
    };
    if head_dim == 0 || !head_dim.is_multiple_of(2) {
        return Err(invalid());
    }
    let head_len = head_dim.checked_mul(cols).ok_or_else(invalid)?;
    if head_len == 0 || data.is_empty() {
        return if data.is_empty() {
            Ok(())
        } else {
            Err(invalid())
        };
    }
    if !data.len().is_multiple_of(head_len) {
        return Err(invalid());
    }
    let half = head_dim / 2;
    let mut scratch = vec![0f32; head_len];
    for head in data.chunks_exact_mut(head_len) {
        for i in 0..half {
            for j in 0..2 {
                let src = (2 * i + j) * cols;
                let dst = (j * half + i) * cols;
                scratch[dst..dst + cols].copy_from_slice(&head[src..src + cols]);
            }
        }
        head.copy_from_slice(&scratch);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    // ---- fixtures --------------------------------------------------------------------------

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/gguf")
            .join(name)
    }

    fn quant_types() -> GgufFile {
        GgufFile::open(&fixture("quant_types.gguf")).unwrap()
    }

    /// The F32 tensors of a safetensors file: name -> (shape, values).
    fn load_reference(path: &Path) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
        let bytes = std::fs::read(path).unwrap();
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
        let data = &bytes[8 + n..];
        let mut out = BTreeMap::new();
        for (name, entry) in header.as_object().unwrap() {
            if name == "__metadata__" {
                continue;
            }
            assert_eq!(entry["dtype"], "F32", "{name}");
            let shape: Vec<usize> = entry["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap() as usize)
                .collect();
            let offsets = entry["data_offsets"].as_array().unwrap();
            let (a, b) = (
                offsets[0].as_u64().unwrap() as usize,
                offsets[1].as_u64().unwrap() as usize,
            );
            let values = data[a..b]
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            out.insert(name.clone(), (shape, values));
        }
        out
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// `rows x cols` of a row-major matrix with `width` columns.
    fn slice(full: &[f32], width: usize, rows: Range<usize>, cols: Range<usize>) -> Vec<f32> {
        rows.flat_map(|r| full[r * width + cols.start..r * width + cols.end].to_vec())
            .collect()
    }

    // ---- a GGUF writer for hand-made (and broken) files -------------------------------------

    /// Builds GGUF bytes piece by piece; every count is written as given, so a test can lie.
    struct Builder {
        version: u32,
        n_tensors: Option<u64>,
        n_kv: Option<u64>,
        kv: Vec<u8>,
        kv_count: u64,
        infos: Vec<u8>,
        info_count: u64,
        data: Vec<u8>,
        alignment: usize,
    }

    fn put_str(buf: &mut Vec<u8>, s: &str) {
        buf.extend((s.len() as u64).to_le_bytes());
        buf.extend(s.as_bytes());
    }

    impl Builder {
        fn new() -> Self {
            Builder {
                version: 3,
                n_tensors: None,
                n_kv: None,
                kv: Vec::new(),
                kv_count: 0,
                infos: Vec::new(),
                info_count: 0,
                data: Vec::new(),
                alignment: 32,
            }
        }

        /// A metadata entry with raw value bytes.
        fn kv_raw(mut self, key: &str, ty: u32, value: &[u8]) -> Self {
            put_str(&mut self.kv, key);
            self.kv.extend(ty.to_le_bytes());
            self.kv.extend(value);
            self.kv_count += 1;
            self
        }

        fn kv_u32(self, key: &str, v: u32) -> Self {
            self.kv_raw(key, 4, &v.to_le_bytes())
        }

        fn kv_str(self, key: &str, v: &str) -> Self {
            let mut b = Vec::new();
            put_str(&mut b, v);
            self.kv_raw(key, 8, &b)
        }

        /// A tensor entry with explicit offset (relative to the data section).
        fn tensor_at(mut self, name: &str, dims: &[u64], ty: u32, offset: u64) -> Self {
            put_str(&mut self.infos, name);
            self.infos.extend((dims.len() as u32).to_le_bytes());
            for d in dims {
                self.infos.extend(d.to_le_bytes());
            }
            self.infos.extend(ty.to_le_bytes());
            self.infos.extend(offset.to_le_bytes());
            self.info_count += 1;
            self
        }

        /// A tensor whose data (`bytes`) is appended to the data section, aligned.
        fn tensor(mut self, name: &str, dims: &[u64], ty: u32, bytes: &[u8]) -> Self {
            let pad = self.data.len().div_ceil(self.alignment) * self.alignment;
            self.data.resize(pad, 0);
            let offset = self.data.len() as u64;
            self.data.extend(bytes);
            self.tensor_at(name, dims, ty, offset)
        }

        fn f32_tensor(self, name: &str, dims: &[u64], values: &[f32]) -> Self {
            let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            self.tensor(name, dims, 0, &bytes)
        }

        fn build(&self) -> Vec<u8> {
            let mut out = Vec::new();
            out.extend(GGUF_MAGIC);
            out.extend(self.version.to_le_bytes());
            out.extend(self.n_tensors.unwrap_or(self.info_count).to_le_bytes());
            out.extend(self.n_kv.unwrap_or(self.kv_count).to_le_bytes());
            out.extend(&self.kv);
            out.extend(&self.infos);
            if !self.data.is_empty() {
                let pad = out.len().div_ceil(self.alignment) * self.alignment;
                out.resize(pad, 0);
                out.extend(&self.data);
            }
            out
        }
    }

    fn open_bytes(bytes: &[u8]) -> Result<GgufFile, GgufError> {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(bytes).unwrap();
        f.flush().unwrap();
        GgufFile::open(f.path())
    }

    /// A small valid file: metadata of several types and two F32 tensors, the second ending
    /// exactly at the end of the file.
    fn small_valid() -> Builder {
        let mut array = Vec::new();
        array.extend(8u32.to_le_bytes()); // array of strings
        array.extend(2u64.to_le_bytes());
        put_str(&mut array, "ab");
        put_str(&mut array, "c");
        Builder::new()
            .kv_str("general.architecture", "llama")
            .kv_u32("llama.block_count", 2)
            .kv_raw("tokens", 9, &array)
            .f32_tensor("a", &[4, 2], &[1., 2., 3., 4., 5., 6., 7., 8.])
            .f32_tensor("b", &[3], &[-1., -2., -3.])
    }

    // ---- dequantization against gguf-py ------------------------------------------------------

    #[test]
    fn every_supported_type_matches_gguf_py_dequantize_bit_for_bit() {
        let file = quant_types();
        let reference = load_reference(&fixture("quant_types_reference.safetensors"));
        assert_eq!(file.tensors().count(), reference.len());
        for t in file.tensors() {
            let (shape, expected) = &reference[&t.name];
            assert_eq!(&t.shape(), shape, "{}", t.name);
            let got = file.read_tensor_f32(&t.name).unwrap();
            assert_eq!(got.len(), expected.len(), "{}", t.name);
            let mismatch = bits(&got)
                .iter()
                .zip(bits(expected))
                .position(|(a, b)| *a != b);
            assert_eq!(
                mismatch, None,
                "{} ({:?}) differs from gguf-py",
                t.name, t.ggml_type
            );
        }
    }

    #[test]
    fn the_fixture_covers_every_supported_type_and_reads_them_all() {
        let file = quant_types();
        let present: Vec<GgmlType> = file.tensors().map(|t| t.ggml_type).collect();
        for ty in [
            GgmlType::F32,
            GgmlType::F16,
            GgmlType::BF16,
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q5_0,
            GgmlType::Q5_1,
            GgmlType::Q8_0,
            GgmlType::Q2_K,
            GgmlType::Q3_K,
            GgmlType::Q4_K,
            GgmlType::Q5_K,
            GgmlType::Q6_K,
        ] {
            assert!(ty.is_supported(), "{ty}");
            assert!(present.contains(&ty), "no {ty} tensor in the fixture");
        }
    }

    #[test]
    fn q4_0_and_q8_0_blocks_decode_as_computed_by_hand() {
        // Q4_0: d = 0.5 (f16 0x3800); qs[j] = j | (15 - j) << 4.
        let mut b = [0u8; 18];
        b[..2].copy_from_slice(&0x3800u16.to_le_bytes());
        for j in 0..16 {
            b[2 + j] = j as u8 | ((15 - j as u8) << 4);
        }
        let mut y = [0f32; 32];
        dequant_q4_0(&b, &mut y);
        for j in 0..16 {
            assert_eq!(y[j], 0.5 * (j as f32 - 8.0));
            assert_eq!(y[j + 16], 0.5 * (7.0 - j as f32));
        }
        // Q8_0: d = -2 (f16 0xC000); qs = -128, -1, 0, 1, 127, ...
        let mut b = [0u8; 34];
        b[..2].copy_from_slice(&0xC000u16.to_le_bytes());
        for (k, q) in [-128i8, -1, 0, 1, 127].iter().enumerate() {
            b[2 + k] = *q as u8;
        }
        let mut y = [0f32; 32];
        dequant_q8_0(&b, &mut y);
        assert_eq!(&y[..5], &[256.0, 2.0, -0.0, -2.0, -254.0]);
    }

    #[test]
    fn shapes_are_the_stored_dims_reversed() {
        let file = quant_types();
        let t = file.tensor("q4_k").unwrap();
        assert_eq!(t.dims, vec![512, 4]);
        assert_eq!(t.shape(), vec![4, 512]);
        assert_eq!((t.rows(), t.cols(), t.n_elements()), (4, 512, 2048));
        assert_eq!(t.ggml_type, GgmlType::Q4_K);
        assert_eq!(t.byte_range().end - t.byte_range().start, 2 * 4 * 144);
        let t = file.tensor("f32_1d").unwrap();
        assert_eq!(
            (t.dims.clone(), t.shape(), t.rows(), t.cols()),
            (vec![64], vec![64], 1, 64)
        );
        let t = file.tensor("q8_0_3d").unwrap();
        assert_eq!(t.dims, vec![64, 3, 2]);
        assert_eq!(t.shape(), vec![2, 3, 64]);
        assert_eq!((t.rows(), t.cols()), (6, 64));
    }

    #[test]
    fn row_and_column_blocks_equal_the_same_slice_of_a_full_read() {
        let file = quant_types();
        for t in file.tensors() {
            let (rows, cols) = (t.rows(), t.cols());
            let full = file.read_tensor_f32(&t.name).unwrap();
            let mut requests = vec![
                (0..rows, 0..cols),
                (rows / 2..rows, 0..cols),
                (0..rows, 5..6),
                (0..rows, cols - 1..cols),
                (rows - 1..rows, 31..33),
                (0..rows.min(2), 17..cols - 9),
                (0..rows, 0..cols / 2),
                (0..rows, cols / 2..cols),
                (0..rows, 32..64),
            ];
            if cols > 256 {
                requests.push((1..rows, 250..300)); // across a K-quant super-block boundary
                requests.push((0..rows, 256..512));
                requests.push((0..rows, 100..400));
            }
            for (r, c) in requests {
                let got = file.read_f32(&t.name, r.clone(), c.clone()).unwrap();
                let want = slice(&full, cols, r.clone(), c.clone());
                assert_eq!(bits(&got), bits(&want), "{} rows {r:?} cols {c:?}", t.name);
            }
            assert!(file.read_f32(&t.name, 1..1, 0..cols).unwrap().is_empty());
            assert!(file.read_f32(&t.name, 0..rows, 7..7).unwrap().is_empty());
        }
    }

    #[test]
    fn a_block_span_sizes_from_the_header_what_read_blocks_returns() {
        let file = quant_types();
        for t in file.tensors() {
            let (rows, cols) = (t.rows(), t.cols());
            let block = t.ggml_type.block_size().unwrap();
            for (r, c) in [
                (0..rows, 0..cols),
                (rows / 2..rows, 0..cols),
                (0..rows, block..cols),
                (0..rows, 5..cols),
                (1..rows, 0..cols - 1),
            ] {
                let span = file.block_span(&t.name, &r, &c).unwrap();
                let read = file.read_blocks(&t.name, r.clone(), c.clone()).unwrap();
                let case = format!("{} ({}) rows {r:?} cols {c:?}", t.name, t.ggml_type);
                assert_eq!(
                    span.map(|s| (s.ggml_type, s.bytes())),
                    read.as_ref().map(|(ty, b)| (*ty, b.len())),
                    "{case}"
                );
                let (bs, ts) = (block, t.ggml_type.type_size().unwrap());
                let whole = t.ggml_type.is_quantized() && c.start % bs == 0 && c.end % bs == 0;
                let expected = whole.then(|| r.len() * c.len() / bs * ts);
                assert_eq!(span.map(|s| s.bytes()), expected, "{case}");
            }
        }
    }

    #[test]
    fn a_column_block_reads_only_the_blocks_that_cover_it() {
        // 3 rows x 128 columns of Q8_0: four 34-byte blocks per row.
        let mut rows_bytes = Vec::new();
        for r in 0..3usize {
            for b in 0..4usize {
                rows_bytes.extend(0x3C00u16.to_le_bytes()); // d = 1
                rows_bytes.extend((0..32).map(|i| (r * 100 + b * 32 + i) as u8));
            }
        }
        let bytes = Builder::new()
            .tensor("w", &[128, 3], 8, &rows_bytes)
            .build();
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&bytes).unwrap();
        let file = GgufFile::open(f.path()).unwrap();
        let expected = file.read_f32("w", 0..3, 40..90).unwrap();

        // Overwrite blocks 0 and 3 of every row with NaN scales and garbage.
        let start = file.tensor("w").unwrap().byte_range().start as usize;
        let mut corrupted = bytes.clone();
        for r in 0..3 {
            for b in [0, 3] {
                let at = start + r * 4 * 34 + b * 34;
                corrupted[at..at + 34].fill(0xFF);
            }
        }
        f.as_file().write_all_at(&corrupted, 0).unwrap();
        assert_eq!(file.read_f32("w", 0..3, 40..90).unwrap(), expected);
        assert!(file.read_f32("w", 0..1, 0..1).unwrap()[0].is_nan());
        for (k, v) in expected.iter().enumerate() {
            let (r, c) = (k / 50, 40 + k % 50);
            assert_eq!(*v, ((r * 100 + c) as u8 as i8) as f32);
        }
    }

    // ---- metadata ----------------------------------------------------------------------------

    #[test]
    fn metadata_of_every_value_type_is_read_exactly() {
        let file = quant_types();
        let v = |k: &str| file.get(k).unwrap().clone();
        assert_eq!(v("test.u8"), GgufValue::U8(200));
        assert_eq!(v("test.i8"), GgufValue::I8(-100));
        assert_eq!(v("test.u16"), GgufValue::U16(60000));
        assert_eq!(v("test.i16"), GgufValue::I16(-30000));
        assert_eq!(v("test.u32"), GgufValue::U32(4_000_000_000));
        assert_eq!(v("test.i32"), GgufValue::I32(-2_000_000_000));
        assert_eq!(v("test.u64"), GgufValue::U64((1 << 63) + 5));
        assert_eq!(v("test.i64"), GgufValue::I64(-(1 << 62)));
        assert_eq!(v("test.f32"), GgufValue::F32(0.1));
        assert_eq!(v("test.f64"), GgufValue::F64(0.1));
        assert_eq!(v("test.bool"), GgufValue::Bool(true));
        assert_eq!(
            v("test.string"),
            GgufValue::String("h\u{e9}llo \u{2713}".into())
        );
        assert_eq!(
            v("test.array_i32"),
            GgufValue::Array(vec![
                GgufValue::I32(1),
                GgufValue::I32(-2),
                GgufValue::I32(3)
            ])
        );
        assert_eq!(
            v("test.array_str"),
            GgufValue::Array(vec![
                GgufValue::String("a".into()),
                GgufValue::String("bc".into()),
                GgufValue::String(String::new()),
            ])
        );
        assert_eq!(
            v("test.array_nested"),
            GgufValue::Array(vec![
                GgufValue::Array(vec![GgufValue::I32(1), GgufValue::I32(2)]),
                GgufValue::Array(vec![GgufValue::I32(3)]),
            ])
        );
        assert_eq!(file.architecture(), Some("quanttest"));
        assert_eq!(file.alignment(), 64);
        assert_eq!(file.version(), 3);
        for t in file.tensors() {
            assert_eq!(t.byte_range().start % 64, 0, "{}", t.name);
        }
    }

    #[test]
    fn value_conversions_follow_the_documented_rules() {
        assert_eq!(GgufValue::I32(5).as_u64(), Some(5));
        assert_eq!(GgufValue::I32(-5).as_u64(), None);
        assert_eq!(GgufValue::U64(u64::MAX).as_i64(), None);
        assert_eq!(GgufValue::U16(7).as_f64(), Some(7.0));
        assert_eq!(GgufValue::F32(0.5).as_f64(), Some(0.5));
        assert_eq!(GgufValue::F32(0.5).as_u64(), None);
        assert_eq!(GgufValue::Bool(true).as_u64(), None);
        assert_eq!(GgufValue::Bool(true).as_bool(), Some(true));
        assert_eq!(GgufValue::String("x".into()).as_str(), Some("x"));
        assert_eq!(GgufValue::U8(1).as_str(), None);
        assert_eq!(GgufValue::Array(vec![]).as_array(), Some(&[][..]));
    }

    #[test]
    fn typed_getters_return_values_and_errors_that_name_the_key() {
        let file = quant_types();
        assert_eq!(file.u64_key("test.u32").unwrap(), 4_000_000_000);
        assert_eq!(file.f64_key("test.f32").unwrap(), f64::from(0.1f32));
        assert_eq!(file.f64_key("test.i16").unwrap(), -30000.0);
        assert_eq!(file.str_key("general.architecture").unwrap(), "quanttest");
        assert_eq!(file.opt_u64_key("absent").unwrap(), None);
        assert_eq!(file.opt_str_key("absent").unwrap(), None);
        assert_eq!(file.opt_bool_key("test.bool").unwrap(), Some(true));
        assert_eq!(file.array_key("test.array_i32").unwrap().len(), 3);

        let e = file.u64_key("absent.key").unwrap_err();
        assert!(
            matches!(&e, GgufError::MissingKey { key, .. } if key == "absent.key"),
            "{e}"
        );
        assert!(e.to_string().contains("absent.key") && e.to_string().contains("quant_types.gguf"));
        let e = file.u64_key("test.i8").unwrap_err();
        assert!(
            matches!(&e, GgufError::WrongKeyType { key, found, .. } if key == "test.i8" && found == "i8 I8(-100)"),
            "{e}"
        );
        let e = file.str_key("test.u8").unwrap_err();
        assert!(
            matches!(&e, GgufError::WrongKeyType { key, .. } if key == "test.u8"),
            "{e}"
        );
        let e = file.f64_key("test.string").unwrap_err();
        assert!(
            matches!(&e, GgufError::WrongKeyType { key, .. } if key == "test.string"),
            "{e}"
        );
    }

    #[test]
    fn the_tiny_llama_fixture_has_llama_metadata_and_hf_mappable_tensors() {
        let file = GgufFile::open(&fixture("tiny_llama_q8_0.gguf")).unwrap();
        assert_eq!(file.architecture(), Some("llama"));
        assert_eq!(file.u64_key("llama.block_count").unwrap(), 2);
        assert_eq!(file.u64_key("llama.embedding_length").unwrap(), 72);
        assert_eq!(file.u64_key("llama.feed_forward_length").unwrap(), 96);
        assert_eq!(file.u64_key("llama.attention.head_count").unwrap(), 9);
        assert_eq!(file.u64_key("llama.attention.head_count_kv").unwrap(), 3);
        assert_eq!(file.u64_key("llama.context_length").unwrap(), 128);
        assert_eq!(file.f64_key("llama.rope.freq_base").unwrap(), 100000.0);
        assert_eq!(
            file.f64_key("llama.attention.layer_norm_rms_epsilon")
                .unwrap(),
            f64::from(1e-5f32)
        );
        assert_eq!(file.u64_key("general.alignment").unwrap(), 32);
        assert_eq!(file.str_key("tokenizer.ggml.model").unwrap(), "gpt2");
        assert_eq!(file.array_key("tokenizer.ggml.tokens").unwrap().len(), 300);
        assert_eq!(
            file.array_key("tokenizer.ggml.token_type").unwrap().len(),
            300
        );
        assert_eq!(file.u64_key("tokenizer.ggml.eos_token_id").unwrap(), 0);
        assert!(file
            .str_key("tokenizer.chat_template")
            .unwrap()
            .contains("<|im_start|>"));
        assert!(
            file.tensor("output.weight").is_none(),
            "tied embeddings: no output.weight"
        );

        let mut names = 0;
        for t in file.tensors() {
            let hf = hf_tensor_name(&t.name).unwrap_or_else(|| panic!("{}", t.name));
            assert_eq!(gguf_tensor_name(&hf).as_deref(), Some(t.name.as_str()));
            let expected = match (t.dims.len(), t.cols() % 32) {
                (1, _) => GgmlType::F32,
                (_, 0) => GgmlType::Q8_0,
                _ => GgmlType::F16,
            };
            assert_eq!(t.ggml_type, expected, "{}", t.name);
            let values = file.read_tensor_f32(&t.name).unwrap();
            assert!(values.iter().all(|v| v.is_finite()), "{}", t.name);
            names += 1;
        }
        assert_eq!(names, 2 + 2 * 9);
        assert_eq!(
            file.tensor("blk.1.attn_k.weight").unwrap().shape(),
            vec![24, 72]
        );
        assert_eq!(
            file.tensor("blk.0.ffn_down.weight").unwrap().shape(),
            vec![72, 96]
        );
    }

    // ---- malformed files ---------------------------------------------------------------------

    #[test]
    fn a_hand_built_file_opens_and_reads() {
        let file = open_bytes(&small_valid().build()).unwrap();
        assert_eq!(file.str_key("general.architecture").unwrap(), "llama");
        assert_eq!(
            file.read_tensor_f32("a").unwrap(),
            vec![1., 2., 3., 4., 5., 6., 7., 8.]
        );
        assert_eq!(file.read_f32("a", 1..2, 1..3).unwrap(), vec![6., 7.]);
        assert_eq!(file.read_f32("b", 0..1, 1..3).unwrap(), vec![-2., -3.]);
        let names: Vec<&str> = file.tensors().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
    }

    #[test]
    fn versions_2_and_3_open_and_others_are_refused() {
        for version in [2, 3] {
            let mut b = small_valid();
            b.version = version;
            assert_eq!(open_bytes(&b.build()).unwrap().version(), version);
        }
        for version in [0, 1, 4, 3 << 24] {
            let mut b = small_valid();
            b.version = version;
            let e = open_bytes(&b.build()).unwrap_err();
            assert!(
                matches!(e, GgufError::UnsupportedVersion { version: v, .. } if v == version),
                "{e}"
            );
        }
    }

    #[test]
    fn a_file_without_the_magic_is_bad_magic() {
        let mut bytes = small_valid().build();
        bytes[..4].copy_from_slice(b"GGML");
        let e = open_bytes(&bytes).unwrap_err();
        assert!(
            matches!(&e, GgufError::BadMagic { found, .. } if found == b"GGML"),
            "{e}"
        );
        for short in [&b""[..], b"GG"] {
            let e = open_bytes(short).unwrap_err();
            assert!(matches!(e, GgufError::BadMagic { .. }), "{e}");
        }
    }

    #[test]
    fn a_truncated_fixed_header_is_truncated() {
        let bytes = small_valid().build();
        let e = open_bytes(&bytes[..10]).unwrap_err();
        assert!(matches!(e, GgufError::Truncated { .. }), "{e}");
    }

    #[test]
    fn every_truncation_of_a_valid_file_fails_without_panicking() {
        let bytes = small_valid().build();
        let header_end = bytes.len() - 32 - 12; // before the data section (padding included)
        for len in 0..bytes.len() {
            let e = open_bytes(&bytes[..len]).unwrap_err();
            match e {
                GgufError::BadMagic { .. } => assert!(len < 4),
                GgufError::Truncated { .. } | GgufError::Malformed { .. } => {
                    assert!(len < header_end, "{len}: {e}")
                }
                GgufError::InvalidTensor { .. } => assert!(len >= 24, "{len}: {e}"),
                other => panic!("cut at {len}: unexpected {other}"),
            }
        }
    }

    #[test]
    fn absurd_counts_fail_fast_without_allocating() {
        let mut b = small_valid();
        b.n_tensors = Some(1 << 60);
        let e = open_bytes(&b.build()).unwrap_err();
        assert!(
            matches!(&e, GgufError::Malformed { message, .. } if message.contains("1152921504606846976 tensors")),
            "{e}"
        );
        let mut b = small_valid();
        b.n_kv = Some(u64::MAX);
        let e = open_bytes(&b.build()).unwrap_err();
        assert!(matches!(e, GgufError::Malformed { .. }), "{e}");
    }

    /// Fuzz crash (`tests/fixtures/fuzz/gguf_reader/crash-empty-tensor-huge-row`): a tensor
    /// with `ne = [~2^64, 0]` has no elements and no bytes, so it passed every check against
    /// the file, but its row length overflowed block arithmetic (`read_blocks`' row bytes).
    #[test]
    fn an_empty_tensor_with_a_huge_dimension_is_refused() {
        for dims in [
            vec![u64::MAX - (1 << 49), 0],
            vec![0, u64::MAX],
            vec![1 << 40, 0, 1 << 24],
        ] {
            let b = Builder::new().tensor_at("e", &dims, 8, 0);
            let e = open_bytes(&b.build()).unwrap_err();
            assert!(
                matches!(&e, GgufError::InvalidTensor { tensor, message, .. }
                    if tensor == "e" && message.contains("2^63")),
                "{dims:?}: {e}"
            );
        }
        // A sane empty tensor is still accepted, and reads as nothing.
        let b = Builder::new()
            .f32_tensor("x", &[2], &[1.0, 2.0])
            .tensor_at("e", &[64, 0], 8, 0);
        let file = open_bytes(&b.build()).unwrap();
        assert_eq!(
            file.tensor("e").map(|t| (t.rows(), t.cols())),
            Some((0, 64))
        );
        assert!(file.read_tensor_f32("e").unwrap().is_empty());
        assert_eq!(
            file.read_blocks("e", 0..0, 0..64)
                .unwrap()
                .map(|(_, b)| b.len()),
            Some(0)
        );
    }

    #[test]
    fn an_absurd_string_length_fails_fast_without_allocating() {
        let mut b = Builder::new();
        b.kv.extend((1u64 << 60).to_le_bytes()); // key length 2^60
        b.kv.extend([0u8; 64]);
        b.kv_count = 1;
        let e = open_bytes(&b.build()).unwrap_err();
        assert!(
            matches!(&e, GgufError::Malformed { message, .. } if message.contains("claims 1152921504606846976 bytes")),
            "{e}"
        );
        // The same in a string value.
        let mut value = (1u64 << 60).to_le_bytes().to_vec();
        value.extend([b'x'; 16]);
        let e = open_bytes(&Builder::new().kv_raw("k", 8, &value).build()).unwrap_err();
        assert!(matches!(e, GgufError::Malformed { .. }), "{e}");
    }

    #[test]
    fn an_absurd_array_length_fails_fast_without_allocating() {
        for elem_type in [0u32, 8, 9, 10] {
            let mut value = elem_type.to_le_bytes().to_vec();
            value.extend((1u64 << 60).to_le_bytes());
            value.extend([0u8; 64]);
            let e = open_bytes(&Builder::new().kv_raw("k", 9, &value).build()).unwrap_err();
            assert!(
                matches!(&e, GgufError::Malformed { message, .. } if message.contains("1152921504606846976 elements")),
                "{e}"
            );
        }
    }

    #[test]
    fn bad_metadata_is_malformed() {
        let cases: Vec<(&str, Builder)> = vec![
            (
                "unknown value type",
                Builder::new().kv_raw("k", 13, &[0; 8]),
            ),
            ("bool 2", Builder::new().kv_raw("k", 7, &[2])),
            (
                "duplicate key",
                Builder::new().kv_u32("k", 1).kv_u32("k", 2),
            ),
            (
                "invalid UTF-8 key",
                Builder::new().kv_raw("\u{0}", 4, &[0; 4]),
            ),
            (
                "arrays nested too deep",
                Builder::new().kv_raw("k", 9, &{
                    let mut v = Vec::new();
                    for _ in 0..6 {
                        v.extend(9u32.to_le_bytes());
                        v.extend(1u64.to_le_bytes());
                    }
                    v.extend(4u32.to_le_bytes());
                    v.extend(1u64.to_le_bytes());
                    v.extend(7u32.to_le_bytes());
                    v
                }),
            ),
            (
                "alignment 48",
                Builder::new().kv_u32("general.alignment", 48),
            ),
            ("alignment 0", Builder::new().kv_u32("general.alignment", 0)),
            (
                "alignment string",
                Builder::new().kv_str("general.alignment", "32"),
            ),
        ];
        for (what, b) in cases {
            let mut bytes = b.build();
            if what == "invalid UTF-8 key" {
                let at = 24 + 8; // the one-byte key
                bytes[at] = 0xFF;
            }
            let e = open_bytes(&bytes).unwrap_err();
            assert!(matches!(e, GgufError::Malformed { .. }), "{what}: {e}");
        }
    }

    #[test]
    fn a_custom_alignment_places_the_data_section() {
        let mut b = Builder::new().kv_u32("general.alignment", 256);
        b.alignment = 256;
        let b = b.f32_tensor("x", &[2], &[1.5, 2.5]);
        let file = open_bytes(&b.build()).unwrap();
        assert_eq!(file.alignment(), 256);
        assert_eq!(file.tensor("x").unwrap().byte_range().start % 256, 0);
        assert_eq!(file.read_tensor_f32("x").unwrap(), vec![1.5, 2.5]);
    }

    #[test]
    fn tensor_data_outside_the_file_is_an_invalid_tensor() {
        let b = small_valid().tensor_at("far", &[8], 0, 1 << 20);
        let e = open_bytes(&b.build()).unwrap_err();
        assert!(
            matches!(&e, GgufError::InvalidTensor { tensor, message, .. } if tensor == "far" && message.contains("outside the file")),
            "{e}"
        );
        let b = small_valid().tensor_at("wrap", &[8], 0, u64::MAX - 31);
        let e = open_bytes(&b.build()).unwrap_err();
        assert!(
            matches!(&e, GgufError::InvalidTensor { tensor, .. } if tensor == "wrap"),
            "{e}"
        );
        let b = small_valid().tensor_at("huge", &[1 << 40, 1 << 40], 0, 0);
        let e = open_bytes(&b.build()).unwrap_err();
        assert!(
            matches!(&e, GgufError::InvalidTensor { tensor, .. } if tensor == "huge"),
            "{e}"
        );
    }

    #[test]
    fn an_unknown_type_id_is_unsupported_at_open() {
        let b = small_valid().tensor("odd", &[32], 99, &[0; 64]);
        let e = open_bytes(&b.build()).unwrap_err();
        assert!(
            matches!(&e, GgufError::UnsupportedType { tensor, ggml_type: GgmlType::Other(99), .. } if tensor == "odd"),
            "{e}"
        );
    }

    #[test]
    fn a_known_but_unsupported_type_opens_and_fails_only_when_read() {
        let b = small_valid().tensor("iq", &[256, 2], 16, &[0; 2 * 66]);
        let file = open_bytes(&b.build()).unwrap();
        assert_eq!(file.tensor("iq").unwrap().ggml_type, GgmlType::IQ2_XXS);
        let e = file.read_f32("iq", 0..1, 0..256).unwrap_err();
        assert!(
            matches!(&e, GgufError::UnsupportedType { tensor, ggml_type: GgmlType::IQ2_XXS, .. } if tensor == "iq"),
            "{e}"
        );
        assert_eq!(file.read_tensor_f32("a").unwrap().len(), 8);
    }

    #[test]
    fn a_row_length_that_is_not_whole_blocks_is_an_invalid_tensor() {
        let b = small_valid().tensor("q", &[48, 2], 2, &[0; 2 * 18 + 18]);
        let e = open_bytes(&b.build()).unwrap_err();
        assert!(
            matches!(&e, GgufError::InvalidTensor { tensor, message, .. } if tensor == "q" && message.contains("block size 32")),
            "{e}"
        );
        let b = small_valid().tensor("k", &[128], 12, &[0; 144]);
        let e = open_bytes(&b.build()).unwrap_err();
        assert!(
            matches!(&e, GgufError::InvalidTensor { tensor, .. } if tensor == "k"),
            "{e}"
        );
    }

    #[test]
    fn misaligned_and_overlapping_tensors_are_refused() {
        let mut b = small_valid();
        let data_len = b.data.len() as u64;
        b.data.extend([0u8; 64]);
        let e = open_bytes(&b.tensor_at("mis", &[2], 0, data_len + 8).build()).unwrap_err();
        assert!(
            matches!(&e, GgufError::InvalidTensor { tensor, message, .. } if tensor == "mis" && message.contains("alignment")),
            "{e}"
        );
        let e = open_bytes(&small_valid().tensor_at("over", &[4], 0, 0).build()).unwrap_err();
        assert!(
            matches!(&e, GgufError::Malformed { message, .. } if message.contains("overlap")),
            "{e}"
        );
    }

    #[test]
    fn bad_tensor_entries_are_refused() {
        let e = open_bytes(&small_valid().tensor_at("dims0", &[], 0, 0).build()).unwrap_err();
        assert!(
            matches!(&e, GgufError::InvalidTensor { tensor, .. } if tensor == "dims0"),
            "{e}"
        );
        let e = open_bytes(&small_valid().tensor_at("dims5", &[1; 5], 0, 0).build()).unwrap_err();
        assert!(
            matches!(&e, GgufError::InvalidTensor { tensor, .. } if tensor == "dims5"),
            "{e}"
        );
        let b = small_valid().f32_tensor("a", &[1], &[0.0]);
        let e = open_bytes(&b.build()).unwrap_err();
        assert!(
            matches!(&e, GgufError::Malformed { message, .. } if message.contains("`a` appears twice")),
            "{e}"
        );
    }

    #[test]
    fn requests_outside_a_tensor_are_errors_not_panics() {
        let file = open_bytes(&small_valid().build()).unwrap();
        #[allow(clippy::reversed_empty_ranges)]
        for (rows, cols) in [(0..3, 0..4), (0..1, 0..5), (2..1, 0..1), (0..1, 3..2)] {
            let e = file.read_f32("a", rows.clone(), cols.clone()).unwrap_err();
            assert!(
                matches!(&e, GgufError::OutOfRange { tensor, .. } if tensor == "a"),
                "{rows:?} {cols:?}: {e}"
            );
        }
        let e = file.read_f32("nope", 0..1, 0..1).unwrap_err();
        assert!(
            matches!(&e, GgufError::MissingTensor { tensor, .. } if tensor == "nope"),
            "{e}"
        );
    }

    // ---- names and the rotary permutation ----------------------------------------------------

    #[test]
    fn llama_tensor_names_map_to_hugging_face_names_and_back() {
        let pairs = [
            ("token_embd.weight", "model.embed_tokens.weight"),
            ("output_norm.weight", "model.norm.weight"),
            ("output.weight", "lm_head.weight"),
            (
                "blk.3.attn_q.weight",
                "model.layers.3.self_attn.q_proj.weight",
            ),
            (
                "blk.3.attn_k.weight",
                "model.layers.3.self_attn.k_proj.weight",
            ),
            (
                "blk.3.attn_v.weight",
                "model.layers.3.self_attn.v_proj.weight",
            ),
            (
                "blk.12.attn_output.weight",
                "model.layers.12.self_attn.o_proj.weight",
            ),
            (
                "blk.0.ffn_gate.weight",
                "model.layers.0.mlp.gate_proj.weight",
            ),
            ("blk.0.ffn_up.weight", "model.layers.0.mlp.up_proj.weight"),
            (
                "blk.0.ffn_down.weight",
                "model.layers.0.mlp.down_proj.weight",
            ),
            (
                "blk.7.attn_norm.weight",
                "model.layers.7.input_layernorm.weight",
            ),
            (
                "blk.7.ffn_norm.weight",
                "model.layers.7.post_attention_layernorm.weight",
            ),
            ("blk.1.attn_q.bias", "model.layers.1.self_attn.q_proj.bias"),
            ("blk.1.attn_k.bias", "model.layers.1.self_attn.k_proj.bias"),
            ("blk.1.attn_v.bias", "model.layers.1.self_attn.v_proj.bias"),
        ];
        for (gguf, hf) in pairs {
            assert_eq!(hf_tensor_name(gguf).as_deref(), Some(hf), "{gguf}");
            assert_eq!(gguf_tensor_name(hf).as_deref(), Some(gguf), "{hf}");
        }
        for unused in [
            "rope_freqs.weight",
            "blk.0.attn_norm.bias",
            "output.bias",
            "blk.01.attn_q.weight",
            "blk.-1.attn_q.weight",
            "blk.x.attn_q.weight",
            "blk.0.attn_q",
            "blk.0.ffn_gate_exps.weight",
            "token_embd",
        ] {
            assert_eq!(hf_tensor_name(unused), None, "{unused}");
        }
        for unused in [
            "model.rotary_emb.inv_freq",
            "lm_head.bias",
            "model.layers.0.mlp.weight",
        ] {
            assert_eq!(gguf_tensor_name(unused), None, "{unused}");
        }
    }

    #[test]
    fn each_architecture_s_tensor_names_map_to_hugging_face_names_and_back() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "qwen3",
                "blk.2.attn_q_norm.weight",
                "model.layers.2.self_attn.q_norm.weight",
            ),
            (
                "qwen3",
                "blk.2.attn_k_norm.weight",
                "model.layers.2.self_attn.k_norm.weight",
            ),
            (
                "gemma2",
                "blk.0.attn_norm.weight",
                "model.layers.0.input_layernorm.weight",
            ),
            (
                "gemma2",
                "blk.0.post_attention_norm.weight",
                "model.layers.0.post_attention_layernorm.weight",
            ),
            (
                "gemma2",
                "blk.0.ffn_norm.weight",
                "model.layers.0.pre_feedforward_layernorm.weight",
            ),
            (
                "gemma3",
                "blk.5.post_ffw_norm.weight",
                "model.layers.5.post_feedforward_layernorm.weight",
            ),
            (
                "gemma3",
                "blk.5.attn_k_norm.weight",
                "model.layers.5.self_attn.k_norm.weight",
            ),
            (
                "phi3",
                "blk.1.attn_qkv.weight",
                "model.layers.1.self_attn.qkv_proj.weight",
            ),
            (
                "phi3",
                "blk.1.ffn_up.weight",
                "model.layers.1.mlp.gate_up_proj.weight",
            ),
            (
                "phi3",
                "blk.1.ffn_norm.weight",
                "model.layers.1.post_attention_layernorm.weight",
            ),
            (
                "granite",
                "blk.1.attn_q.weight",
                "model.layers.1.self_attn.q_proj.weight",
            ),
            (
                "starcoder2",
                "blk.0.ffn_up.bias",
                "model.layers.0.mlp.c_fc.bias",
            ),
            (
                "starcoder2",
                "blk.0.ffn_down.weight",
                "model.layers.0.mlp.c_proj.weight",
            ),
            (
                "starcoder2",
                "blk.0.attn_norm.bias",
                "model.layers.0.input_layernorm.bias",
            ),
            ("starcoder2", "output_norm.bias", "model.norm.bias"),
            (
                "olmo2",
                "blk.1.post_attention_norm.weight",
                "model.layers.1.post_attention_layernorm.weight",
            ),
            (
                "olmo2",
                "blk.1.attn_q_norm.weight",
                "model.layers.1.self_attn.q_norm.weight",
            ),
            ("olmo2", "output.weight", "lm_head.weight"),
        ];
        for (arch, gguf, hf) in cases {
            let names = TensorNames::of(arch).unwrap();
            assert_eq!(names.hf_name(gguf).as_deref(), Some(*hf), "{arch}: {gguf}");
            assert_eq!(names.gguf_name(hf).as_deref(), Some(*gguf), "{arch}: {hf}");
        }
        // What an architecture does not have maps to nothing.
        let absent: &[(&str, &str)] = &[
            ("llama", "output_norm.bias"),
            ("gemma2", "blk.0.attn_q.bias"),
            ("gemma2", "blk.0.attn_q_norm.weight"),
            ("phi3", "blk.0.attn_q.weight"),
            ("phi3", "blk.0.ffn_gate.weight"),
            ("olmo2", "blk.0.attn_norm.weight"),
            ("olmo2", "blk.0.ffn_norm.weight"),
            ("qwen3", "rope_freqs.weight"),
            ("phi3", "rope_factors_long.weight"),
        ];
        for (arch, gguf) in absent {
            assert_eq!(
                TensorNames::of(arch).unwrap().hf_name(gguf),
                None,
                "{arch}: {gguf}"
            );
        }
        assert_eq!(TensorNames::of("gpt2"), None);
        assert_eq!(TensorNames::of("llama"), Some(TensorNames::LLAMA));
    }

    #[test]
    fn unpermuting_rotary_rows_matches_a_hand_computed_example() {
        // Two heads of head_dim 4, two columns. Within a head, GGUF row 2i + j holds HF row
        // 2j + i: GGUF rows (0, 1, 2, 3) are HF rows (0, 2, 1, 3).
        let gguf_rows: [[f32; 2]; 8] = [
            [0.0, 0.5],   // head 0: HF row 0
            [2.0, 2.5],   //         HF row 2
            [1.0, 1.5],   //         HF row 1
            [3.0, 3.5],   //         HF row 3
            [10.0, 10.5], // head 1: HF row 0
            [12.0, 12.5], //         HF row 2
            [11.0, 11.5], //         HF row 1
            [13.0, 13.5], //         HF row 3
        ];
        let mut data: Vec<f32> = gguf_rows.iter().flatten().copied().collect();
        unpermute_rotary_rows(&mut data, 4, 2).unwrap();
        assert_eq!(
            data,
            vec![
                0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 10.0, 10.5, 11.0, 11.5, 12.0, 12.5, 13.0,
                13.5
            ]
        );
        // head_dim 8, one column: GGUF order is HF rows 0 4 1 5 2 6 3 7.
        let mut data = vec![0., 4., 1., 5., 2., 6., 3., 7.];
        unpermute_rotary_rows(&mut data, 8, 1).unwrap();
        assert_eq!(data, vec![0., 1., 2., 3., 4., 5., 6., 7.]);
    }

    #[test]
    fn unpermuting_inverts_llama_cpp_permute() {
        // llama.cpp: w.reshape(n_head, 2, hd / 2, cols).swapaxes(1, 2).reshape(w.shape)
        let (n_head, hd, cols) = (3, 8, 5);
        let hf: Vec<f32> = (0..n_head * hd * cols).map(|v| v as f32).collect();
        let mut permuted = vec![0f32; hf.len()];
        for h in 0..n_head {
            for i in 0..hd / 2 {
                for j in 0..2 {
                    for c in 0..cols {
                        // destination index (h, i, j) of the swapped array, source (h, j, i)
                        let dst = ((h * hd) + i * 2 + j) * cols + c;
                        let src = ((h * hd) + j * (hd / 2) + i) * cols + c;
                        permuted[dst] = hf[src];
                    }
                }
            }
        }
        assert_ne!(permuted, hf);
        unpermute_rotary_rows(&mut permuted, hd, cols).unwrap();
        assert_eq!(permuted, hf);
    }

    #[test]
    fn unpermuting_partial_heads_is_an_error_and_leaves_the_data() {
        let mut data = vec![1.0f32; 12];
        for (hd, cols) in [(8, 1), (3, 1), (0, 1), (4, 5)] {
            let e = unpermute_rotary_rows(&mut data, hd, cols).unwrap_err();
            assert!(
                matches!(e, GgufError::InvalidPermutation { len: 12, .. }),
                "{e}"
            );
        }
        assert_eq!(data, vec![1.0; 12]);
        unpermute_rotary_rows(&mut [], 4, 0).unwrap();
    }
}
