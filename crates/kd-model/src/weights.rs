//! Weight files read in place: GGUF and safetensors files memory-mapped, each tensor a slice of
//! its file's map in the file's own type. The CPU kernels pack their panels straight from
//! these slices, so no f32 copy of a weight exists unless a type has no panel format; the
//! pages of a tensor are handed back to the kernel once it is packed, and the files' sha256
//! is computed over the same maps while they are packed. BF16 matrices multiplied on AMX
//! tiles are not packed at all: the kernels keep reading them from the map, which they hold
//! on to, so the file's pages are the only copy of those weights.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use memmap2::{Mmap, UncheckedAdvice};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::kernels::{RawMatrix, SharedBytes};

/// Read-only maps of a model's weight files.
pub struct WeightFiles {
    files: Vec<(PathBuf, Arc<Mmap>)>,
    /// The same maps, as the kernels hold on to them.
    shared: Vec<SharedBytes>,
}

/// One tensor: its type, its shape (row-major, outermost first) and its bytes in the file.
#[derive(Clone)]
pub struct RawTensor<'a> {
    pub name: String,
    pub dtype: GgmlDType,
    pub dims: Vec<usize>,
    pub bytes: &'a [u8],
}

impl WeightFiles {
    /// Maps `paths` read-only.
    pub fn open(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        for p in paths {
            let f = std::fs::File::open(p).map_err(|source| Error::Io {
                path: p.clone(),
                source,
            })?;
            // SAFETY: the map is read-only and private; a file changed underneath while it is
            // loaded gives wrong weights, which the sha256 computed from the same map records.
            let map = unsafe { Mmap::map(&f) }.map_err(|source| Error::Io {
                path: p.clone(),
                source,
            })?;
            files.push((p.clone(), Arc::new(map)));
        }
        let shared = files
            .iter()
            .map(|(_, m)| m.clone() as SharedBytes)
            .collect();
        Ok(Self { files, shared })
    }

    /// The number of files.
    pub fn len(&self) -> usize {
        self.files.len()
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// File `i`'s bytes.
    pub fn bytes(&self, i: usize) -> &[u8] {
        &self.files[i].1
    }

    /// File `i`'s path.
    pub fn path(&self, i: usize) -> &Path {
        &self.files[i].0
    }

    /// The index of the file whose map holds `bytes`.
    fn index_of(&self, bytes: &[u8]) -> Option<usize> {
        let at = bytes.as_ptr() as usize;
        self.files.iter().position(|(_, m)| {
            let base = m.as_ptr() as usize;
            at >= base && at + bytes.len() <= base + m.len()
        })
    }

    /// The file whose map holds `bytes` (for error messages).
    pub fn path_of(&self, bytes: &[u8]) -> &Path {
        self.index_of(bytes)
            .map_or(Path::new("<weights>"), |i| &self.files[i].0)
    }

    /// A 2-D tensor as a matrix for the kernels; with `in_place`, offered with its map, so
    /// that they may keep reading it there ([`RawMatrix::reads_in_place`]).
    pub fn matrix<'a>(&'a self, t: &RawTensor<'a>, in_place: bool) -> RawMatrix<'a> {
        RawMatrix {
            map: self
                .index_of(t.bytes)
                .filter(|_| in_place)
                .map(|i| &self.shared[i]),
            ..t.matrix()
        }
    }

    /// Hands the pages under `bytes` (a slice of one of the maps) back to the kernel, so that
    /// a packed tensor no longer counts in the process's memory. The bytes stay readable: a
    /// later read faults them in again from the file.
    pub fn release(&self, bytes: &[u8]) {
        let page = 4096;
        for (_, map) in &self.files {
            let base = map.as_ptr() as usize;
            let at = bytes.as_ptr() as usize;
            if at < base || at + bytes.len() > base + map.len() {
                continue;
            }
            let start = (at - base).div_ceil(page) * page;
            let end = (at - base + bytes.len()) / page * page;
            if end > start {
                // SAFETY: the map is private and never written, so dropping its pages loses
                // nothing: they are read again from the file when touched.
                let _ = unsafe {
                    map.unchecked_advise_range(UncheckedAdvice::DontNeed, start, end - start)
                };
            }
            return;
        }
    }

    /// Each file's sha256 (lowercase hex), read from the maps in 64 MiB steps whose pages
    /// are released as they are hashed, unless `keep` (the weights are read in place, and
    /// hashing has just brought their pages in).
    pub fn sha256_each(&self, keep: bool) -> Vec<String> {
        self.files
            .iter()
            .map(|(_, map)| {
                let mut h = Sha256::new();
                for chunk in map.chunks(64 << 20) {
                    h.update(chunk);
                    if !keep {
                        self.release(chunk);
                    }
                }
                h.finalize().iter().map(|b| format!("{b:02x}")).collect()
            })
            .collect()
    }
}

impl RawTensor<'_> {
    /// The tensor as a candle quantized tensor (a copy of its bytes).
    pub fn qtensor(&self, device: &Device) -> candle_core::Result<QTensor> {
        candle_core::quantized::ggml_file::qtensor_from_ggml(
            self.dtype,
            self.bytes,
            self.dims.clone(),
            device,
        )
    }

    /// The tensor's values as an f32 tensor.
    pub fn dense(&self, device: &Device) -> candle_core::Result<Tensor> {
        self.qtensor(&Device::Cpu)?.dequantize(device)
    }

    /// The tensor in `dtype` on `device`: straight from the file's bytes when it stores that
    /// dtype, otherwise dequantized to f32 (on the CPU, one tensor at a time) and rounded once.
    pub fn typed(&self, dtype: candle_core::DType, device: &Device) -> candle_core::Result<Tensor> {
        use candle_core::DType;
        let stored = match self.dtype {
            GgmlDType::F32 => Some(DType::F32),
            GgmlDType::F16 => Some(DType::F16),
            GgmlDType::BF16 => Some(DType::BF16),
            _ => None,
        };
        if stored == Some(dtype) {
            return Tensor::from_raw_buffer(self.bytes, dtype, &self.dims, device);
        }
        self.dense(&Device::Cpu)?.to_dtype(dtype)?.to_device(device)
    }

    /// The tensor's values as f32.
    pub fn f32_values(&self) -> candle_core::Result<Vec<f32>> {
        self.dense(&Device::Cpu)?.flatten_all()?.to_vec1()
    }
}

impl<'a> RawTensor<'a> {
    /// A 2-D tensor as a matrix for the kernels.
    pub fn matrix(&self) -> RawMatrix<'a> {
        RawMatrix {
            dtype: self.dtype,
            rows: self.dims[0],
            cols: self.dims[1],
            bytes: self.bytes,
            map: None,
        }
    }
}

/// The GGML type that holds a safetensors dtype's values in the same bytes.
pub fn ggml_type_of(dtype: safetensors::Dtype) -> Option<GgmlDType> {
    match dtype {
        safetensors::Dtype::F32 => Some(GgmlDType::F32),
        safetensors::Dtype::F16 => Some(GgmlDType::F16),
        safetensors::Dtype::BF16 => Some(GgmlDType::BF16),
        _ => None,
    }
}
