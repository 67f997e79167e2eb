//! A checkpoint's safetensors files, memory-mapped and read shard by shard straight
//! into tensors on the device, in the serving's dtype. Each tensor's pages of the
//! mapping are let go once it is copied, so host memory holds at most one tensor's
//! pages of the files besides the model itself (which, on the CPU, is the model).

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, Metadata, TensorInfo};
use safetensors::SafeTensors;
use tch::{Device, Kind, Tensor};

/// Why the weights could not be read.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a safetensors file: {reason}")]
    NotSafetensors { path: PathBuf, reason: String },
    #[error("the checkpoint has no tensor {name} (looked in {files})")]
    Missing { name: String, files: String },
    #[error("tensor {name} in {path} has dtype {dtype:?}, not a float type")]
    NotFloat {
        name: String,
        path: PathBuf,
        dtype: Dtype,
    },
    #[error("tensor {name} has shape {found:?}; the config implies {expected:?}")]
    Shape {
        name: String,
        found: Vec<i64>,
        expected: Vec<i64>,
    },
    #[error("copying {name} to the device: {message}")]
    Device { name: String, message: String },
}

/// One safetensors file's header: where each tensor lies in it.
struct Shard {
    path: PathBuf,
    header_len: usize,
    tensors: HashMap<String, TensorInfo>,
}

/// The checkpoint's tensors by name, across its shards; nothing is read until
/// [`Checkpoint::load`].
pub struct Checkpoint {
    shards: Vec<Shard>,
    /// Tensor name → shard.
    index: HashMap<String, usize>,
}

impl Checkpoint {
    /// Reads the headers of `files` (the `.safetensors` files of the checkpoint).
    pub fn open(files: &[PathBuf]) -> Result<Checkpoint, WeightsError> {
        let mut shards = Vec::with_capacity(files.len());
        let mut index = HashMap::new();
        for path in files {
            let map = map_file(path)?;
            let (header_len, metadata): (usize, Metadata) = SafeTensors::read_metadata(&map)
                .map_err(|e| WeightsError::NotSafetensors {
                    path: path.clone(),
                    reason: format!("{e:?}"),
                })?;
            let tensors: HashMap<String, TensorInfo> = metadata
                .tensors()
                .into_iter()
                .map(|(name, info)| (name, info.clone()))
                .collect();
            for name in tensors.keys() {
                index.insert(name.clone(), shards.len());
            }
            shards.push(Shard {
                path: path.clone(),
                // The data follows the 8-byte length and the JSON header.
                header_len: header_len + 8,
                tensors,
            });
        }
        Ok(Checkpoint { shards, index })
    }

    /// Whether the checkpoint has `name`.
    pub fn has(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// The shape of `name`.
    pub fn shape(&self, name: &str) -> Result<Vec<i64>, WeightsError> {
        let (_, info) = self.find(name)?;
        Ok(info.shape.iter().map(|&d| d as i64).collect())
    }

    fn find(&self, name: &str) -> Result<(&Shard, &TensorInfo), WeightsError> {
        let shard = self
            .index
            .get(name)
            .map(|&i| &self.shards[i])
            .ok_or_else(|| WeightsError::Missing {
                name: name.to_string(),
                files: self
                    .shards
                    .iter()
                    .map(|s| s.path.file_name().unwrap_or_default().to_string_lossy())
                    .collect::<Vec<_>>()
                    .join(", "),
            })?;
        Ok((shard, &shard.tensors[name]))
    }

    /// Reads the tensors `names` onto `device` as `kind`, one shard at a time.
    pub fn load(
        &self,
        names: &[String],
        kind: Kind,
        device: Device,
    ) -> Result<HashMap<String, Tensor>, WeightsError> {
        for name in names {
            self.find(name)?;
        }
        let mut out = HashMap::with_capacity(names.len());
        for (i, shard) in self.shards.iter().enumerate() {
            let wanted: Vec<&String> = names.iter().filter(|n| self.index[*n] == i).collect();
            if wanted.is_empty() {
                continue;
            }
            let map = map_file(&shard.path)?;
            for name in wanted {
                let info = &shard.tensors[name];
                let tensor = read_tensor(&map, shard, name, info, kind, device)?;
                out.insert(name.clone(), tensor);
                // The tensor has its own copy: its pages of the file need not stay
                // resident until the shard's end (the load's peak would be twice
                // the weights). Safety: nothing refers into the mapping now, and a
                // read-only file mapping's dropped pages read back from the file.
                let (start, end) = info.data_offsets;
                let _ = unsafe {
                    map.unchecked_advise_range(
                        memmap2::UncheckedAdvice::DontNeed,
                        shard.header_len + start,
                        end - start,
                    )
                };
            }
            // The mapping ends here: its pages are no longer the process's.
            drop(map);
        }
        Ok(out)
    }
}

fn map_file(path: &Path) -> Result<memmap2::Mmap, WeightsError> {
    let io = |source| WeightsError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(io)?;
    // Safety: the cache's blobs are written once, verified, and never changed in
    // place (a refetch writes a new file and renames it), so the mapping's bytes
    // do not change under us.
    unsafe { memmap2::Mmap::map(&file) }.map_err(io)
}

fn kind_of(dtype: Dtype) -> Option<Kind> {
    match dtype {
        Dtype::F32 => Some(Kind::Float),
        Dtype::F16 => Some(Kind::Half),
        Dtype::BF16 => Some(Kind::BFloat16),
        Dtype::F64 => Some(Kind::Double),
        _ => None,
    }
}

fn read_tensor(
    map: &[u8],
    shard: &Shard,
    name: &str,
    info: &TensorInfo,
    kind: Kind,
    device: Device,
) -> Result<Tensor, WeightsError> {
    let not_safetensors = |reason: String| WeightsError::NotSafetensors {
        path: shard.path.clone(),
        reason,
    };
    let source_kind = kind_of(info.dtype).ok_or_else(|| WeightsError::NotFloat {
        name: name.to_string(),
        path: shard.path.clone(),
        dtype: info.dtype,
    })?;
    let (start, end) = info.data_offsets;
    let (start, end) = (shard.header_len + start, shard.header_len + end);
    let bytes = map
        .get(start..end)
        .ok_or_else(|| not_safetensors(format!("{name} lies past the end of the file")))?;
    let shape: Vec<i64> = info.shape.iter().map(|&d| d as i64).collect();
    let elements: usize = info.shape.iter().product();
    let size = info.dtype.size();
    if elements * size != bytes.len() {
        return Err(not_safetensors(format!(
            "{name} has {} bytes for shape {shape:?}",
            bytes.len()
        )));
    }
    // Tensors are read in place from the mapping; one the writer left unaligned
    // for its dtype is copied into an aligned buffer first.
    let aligned: Vec<u64>;
    let data = if (bytes.as_ptr() as usize).is_multiple_of(size) {
        bytes.as_ptr()
    } else {
        let mut buffer = vec![0u64; bytes.len().div_ceil(8)];
        // Safety: the buffer holds at least bytes.len() bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), buffer.as_mut_ptr().cast(), bytes.len())
        };
        aligned = buffer;
        aligned.as_ptr().cast()
    };
    let strides = contiguous_strides(&shape);
    let device_error = |e: tch::TchError| WeightsError::Device {
        name: name.to_string(),
        message: e.to_string(),
    };
    // Safety: `data` points at `elements * size` readable bytes that outlive
    // `source`, which is dropped at the end of this function; the copy below owns
    // its own memory.
    let source = unsafe { Tensor::f_from_blob(data, &shape, &strides, source_kind, Device::Cpu) }
        .map_err(device_error)?;
    let mut target = Tensor::f_empty(&shape, (kind, device)).map_err(device_error)?;
    target.f_copy_(&source).map_err(device_error)?;
    Ok(target)
}

fn contiguous_strides(shape: &[i64]) -> Vec<i64> {
    let mut strides = vec![1i64; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1];
    }
    strides
}
