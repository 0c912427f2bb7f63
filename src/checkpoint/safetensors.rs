//! Reading tensors, or only a rank's slice of them, from safetensors files.
//!
//! The header of every file is parsed and validated up front (offsets inside the file, sizes
//! consistent with shapes and dtypes), then slices are read with positioned reads of exactly the
//! bytes a rank owns. Reading with `pread` rather than through a memory map keeps the untouched
//! rest of a tensor out of the rank's resident memory: a row-parallel slice of a row-major matrix
//! touches a fraction of every row, which through a map would fault in nearly every page.

use std::collections::BTreeMap;
use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use safetensors::Dtype;
use serde::Deserialize;

use crate::checkpoint::WeightSource;
use crate::error::{Error, Result};

/// Largest header we accept; real headers are a few hundred kB at most.
const MAX_HEADER_BYTES: u64 = 100 << 20;

/// Largest extent a tensor's dimensions may describe, in bytes (file offsets are `i64`).
const MAX_EXTENT_BYTES: u64 = i64::MAX as u64;

/// Where one tensor lives and what it is.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    /// Element type as stored.
    pub dtype: Dtype,
    /// Shape as stored.
    pub shape: Vec<usize>,
    file: usize,
    data_start: u64,
}

impl TensorInfo {
    /// Bytes per element of the stored dtype.
    pub fn element_bytes(&self) -> usize {
        self.dtype.bitsize() / 8
    }
}

/// The tensors of a checkpoint directory: a single `model.safetensors` or the shards listed in
/// `model.safetensors.index.json`.
pub struct SafetensorsCheckpoint {
    dir: PathBuf,
    files: Vec<(PathBuf, File)>,
    tensors: BTreeMap<String, TensorInfo>,
}

#[derive(Deserialize)]
struct HeaderEntry {
    dtype: Dtype,
    shape: Vec<usize>,
    data_offsets: (u64, u64),
}

#[derive(Deserialize)]
struct ShardIndex {
    weight_map: BTreeMap<String, String>,
}

impl SafetensorsCheckpoint {
    /// Opens the checkpoint in `dir` and validates every header.
    pub fn open(dir: &Path) -> Result<Self> {
        let index_path = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let file_names: Vec<String> = if index_path.exists() {
            let text =
                std::fs::read_to_string(&index_path).map_err(|e| Error::io(&index_path, e))?;
            let index: ShardIndex = serde_json::from_str(&text).map_err(|e| {
                Error::checkpoint(&index_path, format!("not a valid shard index: {e}"))
            })?;
            let mut names: Vec<String> = index.weight_map.into_values().collect();
            names.sort();
            names.dedup();
            if let Some(bad) = names.iter().find(|n| n.contains('/') || n.contains("..")) {
                return Err(Error::checkpoint(
                    &index_path,
                    format!("shard name `{bad}` leaves the directory"),
                ));
            }
            names
        } else if single.exists() {
            vec!["model.safetensors".to_string()]
        } else {
            return Err(Error::checkpoint(
                dir,
                "no model.safetensors or model.safetensors.index.json in this directory",
            ));
        };
        let mut checkpoint = SafetensorsCheckpoint {
            dir: dir.to_path_buf(),
            files: Vec::new(),
            tensors: BTreeMap::new(),
        };
        for name in file_names {
            checkpoint.add_file(&dir.join(name))?;
        }
        Ok(checkpoint)
    }

    fn add_file(&mut self, path: &Path) -> Result<()> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let metadata = file.metadata().map_err(|e| Error::io(path, e))?;
        if !metadata.is_file() {
            return Err(Error::checkpoint(
                path,
                "is not a regular file (a shard must be a safetensors file)",
            ));
        }
        let file_len = metadata.len();
        let mut len_bytes = [0u8; 8];
        file.read_exact_at(&mut len_bytes, 0).map_err(|_| {
            Error::checkpoint(
                path,
                "file is shorter than the 8-byte safetensors header length",
            )
        })?;
        let header_len = u64::from_le_bytes(len_bytes);
        if header_len > MAX_HEADER_BYTES || header_len + 8 > file_len {
            return Err(Error::checkpoint(
                path,
                format!("header claims {header_len} bytes but the file holds {file_len}: truncated or not safetensors"),
            ));
        }
        let mut header = vec![0u8; header_len as usize];
        file.read_exact_at(&mut header, 8)
            .map_err(|e| Error::io(path, e))?;
        let entries: BTreeMap<String, serde_json::Value> = serde_json::from_slice(&header)
            .map_err(|e| Error::checkpoint(path, format!("header is not valid JSON: {e}")))?;
        let data_base = 8 + header_len;
        let data_len = file_len - data_base;
        let index = self.files.len();
        let mut infos = Vec::with_capacity(entries.len());
        for (name, value) in entries {
            if name == "__metadata__" {
                continue;
            }
            let entry: HeaderEntry = serde_json::from_value(value).map_err(|e| {
                Error::checkpoint(
                    path,
                    format!("tensor `{name}` has a malformed header entry: {e}"),
                )
            })?;
            let info = validate_entry(path, &name, entry, data_base, data_len, index)?;
            if let Some(other) = self.tensors.get(&name) {
                return Err(Error::checkpoint(
                    path,
                    format!(
                        "tensor `{name}` is also in {}: a tensor must be stored once",
                        self.files[other.file].0.display()
                    ),
                ));
            }
            infos.push((name, info));
        }
        check_no_overlap(path, &infos)?;
        self.tensors.extend(infos);
        self.files.push((path.to_path_buf(), file));
        Ok(())
    }

    /// The directory this checkpoint was read from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Looks up a tensor by its full name.
    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name)
    }

    /// Every tensor, by name.
    pub fn tensors(&self) -> impl Iterator<Item = (&str, &TensorInfo)> {
        self.tensors.iter().map(|(n, i)| (n.as_str(), i))
    }

    /// Reads the block `rows × cols` of a 2-D tensor (or `cols` of a 1-D one, with `rows`
    /// `0..1`), row-major, as raw little-endian bytes of the stored dtype.
    pub fn read_block(
        &self,
        name: &str,
        rows: Range<usize>,
        cols: Range<usize>,
    ) -> Result<Vec<u8>> {
        let info = self.info(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
            dir: self.dir.clone(),
        })?;
        let (n_rows, n_cols) = match info.shape.as_slice() {
            [c] => (1, *c),
            [r, c] => (*r, *c),
            other => {
                return Err(Error::checkpoint(
                    &self.files[info.file].0,
                    format!(
                        "tensor `{name}` has {} dimensions; only 1 and 2 can be sliced",
                        other.len()
                    ),
                ))
            }
        };
        if rows.end > n_rows || cols.end > n_cols || rows.start > rows.end || cols.start > cols.end
        {
            return Err(Error::InvalidInput(format!(
                "slice rows {rows:?} cols {cols:?} is outside tensor `{name}` of shape {:?}",
                info.shape
            )));
        }
        let elem = info.element_bytes();
        let (path, file) = &self.files[info.file];
        let row_bytes = cols.len() * elem;
        let mut out = vec![0u8; rows.len() * row_bytes];
        if cols.len() == n_cols {
            let start = info.data_start + (rows.start * n_cols * elem) as u64;
            file.read_exact_at(&mut out, start)
                .map_err(|e| Error::io(path, e))?;
        } else {
            for (i, row) in rows.enumerate() {
                let start = info.data_start + ((row * n_cols + cols.start) * elem) as u64;
                file.read_exact_at(&mut out[i * row_bytes..(i + 1) * row_bytes], start)
                    .map_err(|e| Error::io(path, e))?;
            }
        }
        Ok(out)
    }

    /// Reads a whole tensor of any rank as raw bytes.
    pub fn read_all(&self, name: &str) -> Result<Vec<u8>> {
        let info = self.info(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
            dir: self.dir.clone(),
        })?;
        let (path, file) = &self.files[info.file];
        let mut out = vec![0u8; info.shape.iter().product::<usize>() * info.element_bytes()];
        file.read_exact_at(&mut out, info.data_start)
            .map_err(|e| Error::io(path, e))?;
        Ok(out)
    }
}

/// The candle dtype of a stored tensor; integer weights are refused.
fn candle_dtype(name: &str, info: &TensorInfo) -> Result<DType> {
    match info.dtype {
        Dtype::F32 => Ok(DType::F32),
        Dtype::F16 => Ok(DType::F16),
        Dtype::BF16 => Ok(DType::BF16),
        Dtype::F64 => Ok(DType::F64),
        other => Err(Error::InvalidInput(format!(
            "tensor `{name}` has dtype {other:?}; weights must be F32, F16, BF16 or F64"
        ))),
    }
}

impl WeightSource for SafetensorsCheckpoint {
    fn location(&self) -> &Path {
        &self.dir
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.info(name).map(|info| info.shape.clone())
    }

    fn names(&self) -> Vec<String> {
        self.tensors.keys().cloned().collect()
    }

    fn read(&self, name: &str, block: Option<(Range<usize>, Range<usize>)>) -> Result<Tensor> {
        let info = self.info(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
            dir: self.dir.clone(),
        })?;
        let dtype = candle_dtype(name, info)?;
        let (bytes, shape) = match block {
            None => (self.read_all(name)?, info.shape.clone()),
            Some((rows, cols)) => {
                let shape = if info.shape.len() == 2 {
                    vec![rows.len(), cols.len()]
                } else {
                    vec![cols.len()]
                };
                (self.read_block(name, rows, cols)?, shape)
            }
        };
        Ok(Tensor::from_raw_buffer(
            &bytes,
            dtype,
            &shape,
            &Device::Cpu,
        )?)
    }
}

/// Refuses a file whose tensors share bytes: each must own its `data_offsets` range.
fn check_no_overlap(path: &Path, infos: &[(String, TensorInfo)]) -> Result<()> {
    let mut spans: Vec<(u64, u64, &str)> = infos
        .iter()
        .map(|(name, info)| {
            // Sizes were checked against the file, so these cannot overflow.
            let bytes = info.shape.iter().product::<usize>() * info.element_bytes();
            (
                info.data_start,
                info.data_start + bytes as u64,
                name.as_str(),
            )
        })
        .filter(|(start, end, _)| end > start)
        .collect();
    spans.sort_unstable();
    for pair in spans.windows(2) {
        if let [(a_start, a_end, a), (b_start, b_end, b)] = pair {
            if b_start < a_end {
                return Err(Error::checkpoint(
                    path,
                    format!(
                        "the data of tensors `{a}` (bytes {a_start}..{a_end}) and `{b}` (bytes \
                         {b_start}..{b_end}) overlap"
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Checks one header entry against the file: dtype readable, size matching the shape, data
/// inside the file, dimensions whose extent (zero dimensions counted as one) fits a file
/// offset, so that no block of the tensor can overflow an offset computation.
fn validate_entry(
    path: &Path,
    name: &str,
    entry: HeaderEntry,
    data_base: u64,
    data_len: u64,
    file: usize,
) -> Result<TensorInfo> {
    if !matches!(
        entry.dtype,
        Dtype::F32
            | Dtype::F16
            | Dtype::BF16
            | Dtype::F64
            | Dtype::I64
            | Dtype::I32
            | Dtype::U8
            | Dtype::BOOL
    ) {
        return Err(Error::checkpoint(
            path,
            format!(
                "tensor `{name}` has dtype {:?}, which cannot be loaded",
                entry.dtype
            ),
        ));
    }
    let (start, end) = entry.data_offsets;
    let elem_bytes = (entry.dtype.bitsize() / 8) as u64;
    let extent = entry
        .shape
        .iter()
        .try_fold(elem_bytes, |acc, &d| acc.checked_mul((d as u64).max(1)))
        .filter(|&e| e <= MAX_EXTENT_BYTES);
    if extent.is_none() {
        return Err(Error::checkpoint(
            path,
            format!(
                "tensor `{name}` has an absurd shape {:?}: its dimensions span more than 2^63 \
                 bytes of {:?}",
                entry.shape, entry.dtype
            ),
        ));
    }
    let numel = entry
        .shape
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
        .ok_or_else(|| {
            Error::checkpoint(
                path,
                format!("tensor `{name}` has an absurd shape {:?}", entry.shape),
            )
        })?;
    let expected = numel
        .checked_mul((entry.dtype.bitsize() / 8) as u64)
        .ok_or_else(|| {
            Error::checkpoint(
                path,
                format!("tensor `{name}` has an absurd shape {:?}", entry.shape),
            )
        })?;
    if end < start || end - start != expected {
        return Err(Error::checkpoint(
            path,
            format!(
                "tensor `{name}` spans bytes {start}..{end} but shape {:?} of {:?} needs {expected} bytes",
                entry.shape, entry.dtype
            ),
        ));
    }
    if end > data_len {
        return Err(Error::checkpoint(
            path,
            format!("file is truncated: tensor `{name}` needs data up to byte {end} but the data section holds {data_len}"),
        ));
    }
    Ok(TensorInfo {
        dtype: entry.dtype,
        shape: entry.shape,
        file,
        data_start: data_base + start,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_checkpoint(dir: &Path, tensors: &[(&str, Vec<usize>, Vec<f32>)]) {
        let mut header = serde_json::Map::new();
        let mut data = Vec::new();
        for (name, shape, values) in tensors {
            let start = data.len();
            for v in values {
                data.extend_from_slice(&v.to_le_bytes());
            }
            header.insert(
                name.to_string(),
                serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [start, data.len()]}),
            );
        }
        let header = serde_json::to_vec(&header).unwrap();
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(&header);
        bytes.extend_from_slice(&data);
        std::fs::write(dir.join("model.safetensors"), bytes).unwrap();
    }

    fn floats(bytes: &[u8]) -> Vec<f32> {
        bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }

    #[test]
    fn a_block_of_a_matrix_reads_exactly_those_elements() {
        let dir = tempfile::tempdir().unwrap();
        let values: Vec<f32> = (0..12).map(|v| v as f32).collect();
        write_checkpoint(dir.path(), &[("w", vec![3, 4], values)]);
        let ckpt = SafetensorsCheckpoint::open(dir.path()).unwrap();
        assert_eq!(
            floats(&ckpt.read_block("w", 1..3, 1..3).unwrap()),
            vec![5.0, 6.0, 9.0, 10.0]
        );
        assert_eq!(
            floats(&ckpt.read_block("w", 2..3, 0..4).unwrap()),
            vec![8.0, 9.0, 10.0, 11.0]
        );
    }

    #[test]
    fn truncated_file_is_refused_with_the_tensor_named() {
        let dir = tempfile::tempdir().unwrap();
        write_checkpoint(dir.path(), &[("w", vec![4, 4], vec![1.0; 16])]);
        let path = dir.path().join("model.safetensors");
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 5]).unwrap();
        let err = SafetensorsCheckpoint::open(dir.path())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("truncated") && err.contains("`w`"), "{err}");
    }

    #[test]
    fn header_claiming_more_than_the_file_is_refused_without_allocating() {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = (u64::MAX / 2).to_le_bytes().to_vec();
        bytes.extend_from_slice(b"{}");
        std::fs::write(dir.path().join("model.safetensors"), bytes).unwrap();
        let err = SafetensorsCheckpoint::open(dir.path())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("header claims"), "{err}");
    }

    #[test]
    fn size_inconsistent_with_shape_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let header = br#"{"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,12]}}"#;
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header);
        bytes.extend_from_slice(&[0u8; 16]);
        std::fs::write(dir.path().join("model.safetensors"), bytes).unwrap();
        let err = SafetensorsCheckpoint::open(dir.path())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("needs 16 bytes"), "{err}");
    }

    fn write_header(dir: &Path, file: &str, header: &str, data_bytes: usize) {
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend(std::iter::repeat_n(0u8, data_bytes));
        std::fs::write(dir.join(file), bytes).unwrap();
    }

    fn open_err(dir: &Path) -> String {
        SafetensorsCheckpoint::open(dir).err().unwrap().to_string()
    }

    #[test]
    fn overlapping_tensors_are_refused_with_both_named() {
        let dir = tempfile::tempdir().unwrap();
        write_header(
            dir.path(),
            "model.safetensors",
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
            12,
        );
        let err = open_err(dir.path());
        assert!(
            err.contains("overlap") && err.contains("`a`") && err.contains("`b`"),
            "{err}"
        );
    }

    /// Fuzz crash (`tests/fixtures/fuzz/safetensors_header/crash-empty-tensor-huge-dim`): an
    /// empty tensor `[0, 2^62]` passed validation (0 elements, 0 bytes), then a column block
    /// of it overflowed `cols * element size` in `read_block`.
    #[test]
    fn an_empty_tensor_with_a_huge_dimension_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        write_header(
            dir.path(),
            "model.safetensors",
            r#"{"w":{"dtype":"F32","shape":[0,4611686018427387904],"data_offsets":[0,0]}}"#,
            0,
        );
        let err = open_err(dir.path());
        assert!(err.contains("absurd shape") && err.contains("`w`"), "{err}");
        // Empty tensors of sane shapes are still fine, and read as nothing.
        write_header(
            dir.path(),
            "model.safetensors",
            r#"{"w":{"dtype":"F32","shape":[0,1024],"data_offsets":[0,0]}}"#,
            0,
        );
        let ckpt = SafetensorsCheckpoint::open(dir.path()).unwrap();
        assert!(ckpt.read_block("w", 0..0, 3..900).unwrap().is_empty());
    }

    #[test]
    fn a_shard_that_is_not_a_file_or_a_tensor_in_two_shards_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let header = r#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#;
        write_header(dir.path(), "a.safetensors", header, 4);
        write_header(dir.path(), "b.safetensors", header, 4);
        let index = |map: &str| {
            std::fs::write(
                dir.path().join("model.safetensors.index.json"),
                format!(r#"{{"weight_map":{map}}}"#),
            )
            .unwrap()
        };
        index(r#"{"w":"a.safetensors","x":"b.safetensors"}"#);
        let err = open_err(dir.path());
        assert!(
            err.contains("`w` is also in") && err.contains("a.safetensors"),
            "{err}"
        );
        index(r#"{"w":"."}"#);
        let err = open_err(dir.path());
        assert!(err.contains("not a regular file"), "{err}");
    }

    #[test]
    fn missing_directory_contents_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let err = SafetensorsCheckpoint::open(dir.path())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("no model.safetensors"), "{err}");
    }
}
