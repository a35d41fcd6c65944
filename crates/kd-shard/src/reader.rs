//! Reading shards: memory-mapped file, Parquet's Arrow reader, rows out.

use std::fs::File;
use std::path::{Path, PathBuf};

use arrow::array::{Array, ArrayRef, AsArray, ListArray, RecordBatch, StringArray};
use arrow::datatypes::{ArrowPrimitiveType, DataType, Float32Type, UInt32Type};
use bytes::Bytes;
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};

use crate::schema::{
    META_FORMAT_VERSION, META_LOGPROB_SCALE, META_SAMPLES, META_TAIL_SCALE, META_TOP_K,
    check_arrow_schema,
};
use crate::{Error, FORMAT_VERSION, Result, Row, Source};

/// What a shard's footer says about it, without decoding any rows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardMeta {
    /// `kd.format_version` from the Parquet key-value metadata.
    pub format_version: u32,
    /// `kd.top_k` from the Parquet key-value metadata.
    pub k: usize,
    /// Number of rows according to the footer.
    pub rows: u64,
    /// Number of Parquet row groups.
    pub row_groups: usize,
    /// The writer's `created_by` string.
    pub created_by: Option<String>,
    /// `kd.logprob_scale` of a v2 shard (stored integer `q` is the log-prob `-q / scale`);
    /// `None` for v1, which stores f32 log-probs.
    pub logprob_scale: Option<u32>,
    /// `kd.tail_scale` of a v2 shard; `None` for v1.
    pub tail_scale: Option<u32>,
    /// `kd.samples` of a v2 shard: sampled targets per position (0 for none, and for v1).
    pub samples: usize,
    /// How a v2 shard stores its draws (told by its columns); `None` for v1.
    pub(crate) layout: Option<crate::schema::DrawLayout>,
}

/// Rows decoded per Arrow batch; bounds the reader's working memory.
const BATCH_ROWS: usize = 64;

/// Maps `path` read-only into memory.
///
/// This is the crate's only `unsafe`. Mapping a file is sound only while no one truncates or
/// rewrites it in place: a change would alter memory Rust treats as immutable, and a
/// truncation raises SIGBUS. Shards satisfy this by construction: the writer publishes a
/// shard by renaming a complete temporary file over the final name, and a published shard is
/// never opened for writing again (a rewrite replaces the directory entry; an existing map
/// keeps the old inode's bytes). Do not point this reader at files that other programs edit
/// in place.
fn map_file(path: &Path) -> Result<Bytes> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    if len == 0 {
        // Zero-length maps are an error on some platforms; Parquet reports the empty file.
        return Ok(Bytes::new());
    }
    // SAFETY: see the function's documentation: published shards are immutable.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    Ok(Bytes::from_owner(map))
}

/// Runs a call into the Parquet library, turning a panic inside it into [`Error::Corrupt`].
///
/// parquet-rs 60.1 panics on some corrupt pages (an out-of-bounds index in its
/// BYTE_STREAM_SPLIT decoder, found by the `corrupt_shards_never_panic` test), and the promise
/// here is an error naming the file, never a panic. Only Parquet calls run inside: a panic in
/// this crate's own checks is a bug to fix, not to hide (tests/fuzz.rs fails on one). The
/// reader that panicked is not used again. Needs the default `panic = "unwind"`.
fn guard<T>(path: &Path, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => {
            let msg = payload
                .downcast_ref::<&str>()
                .map(|s| (*s).to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_string());
            Err(Error::corrupt(
                path,
                format!("Parquet decoder panicked: {msg}"),
            ))
        }
    }
}

fn kv<'a>(kvs: &'a [parquet::file::metadata::KeyValue], key: &str) -> Option<&'a str> {
    kvs.iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_deref())
}

/// A streaming reader over the rows of one shard: checks the footer, schema and metadata on
/// [`ShardReader::open`], then decodes 64 rows at a time. After the first error
/// the iterator ends.
pub struct ShardReader {
    path: PathBuf,
    meta: ShardMeta,
    batches: ParquetRecordBatchReader,
    current: std::vec::IntoIter<Row>,
    done: bool,
}

impl std::fmt::Debug for ShardReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardReader")
            .field("path", &self.path)
            .field("meta", &self.meta)
            .finish_non_exhaustive()
    }
}

impl ShardReader {
    /// Opens `path`: maps it, parses the footer, checks the schema and the `kd.*` metadata.
    /// A newer format version gives [`Error::UnsupportedVersion`].
    pub fn open(path: &Path) -> Result<ShardReader> {
        let bytes = map_file(path)?;
        Self::open_bytes(path, bytes)
    }

    fn open_bytes(path: &Path, bytes: Bytes) -> Result<ShardReader> {
        let builder = guard(path, || {
            ParquetRecordBatchReaderBuilder::try_new(bytes).map_err(|e| Error::parquet(path, e))
        })?;
        let md = builder.metadata().clone();
        let fmd = md.file_metadata();
        let kvs: &[_] = fmd.key_value_metadata().map_or(&[], |v| v.as_slice());
        let version_s = kv(kvs, META_FORMAT_VERSION).ok_or_else(|| {
            Error::schema(
                path,
                format!("missing Parquet metadata key {META_FORMAT_VERSION}"),
            )
        })?;
        let format_version: u32 = version_s.trim().parse().map_err(|_| {
            Error::schema(
                path,
                format!("{META_FORMAT_VERSION} = {version_s:?} is not an integer"),
            )
        })?;
        if format_version > FORMAT_VERSION {
            return Err(Error::UnsupportedVersion {
                path: path.to_path_buf(),
                found: format_version,
                supported: FORMAT_VERSION,
            });
        }
        if format_version == 0 {
            return Err(Error::schema(path, format!("{META_FORMAT_VERSION} is 0")));
        }
        let k_s = kv(kvs, META_TOP_K).ok_or_else(|| {
            Error::schema(path, format!("missing Parquet metadata key {META_TOP_K}"))
        })?;
        let k: usize = k_s.trim().parse().map_err(|_| {
            Error::schema(
                path,
                format!("{META_TOP_K} = {k_s:?} is not a non-negative integer"),
            )
        })?;
        let positive = |key: &str| -> Result<u32> {
            let s = kv(kvs, key).ok_or_else(|| {
                Error::schema(path, format!("missing Parquet metadata key {key}"))
            })?;
            match s.trim().parse::<u32>() {
                Ok(v) if v > 0 => Ok(v),
                _ => Err(Error::schema(
                    path,
                    format!("{key} = {s:?} is not a positive integer"),
                )),
            }
        };
        let (logprob_scale, tail_scale) = if format_version >= 2 {
            (
                Some(positive(META_LOGPROB_SCALE)?),
                Some(positive(META_TAIL_SCALE)?),
            )
        } else {
            (None, None)
        };
        let samples: usize = if format_version >= 2 {
            let s = kv(kvs, META_SAMPLES).ok_or_else(|| {
                Error::schema(path, format!("missing Parquet metadata key {META_SAMPLES}"))
            })?;
            s.trim().parse().map_err(|_| {
                Error::schema(
                    path,
                    format!("{META_SAMPLES} = {s:?} is not a non-negative integer"),
                )
            })?
        } else {
            0
        };
        if k == 0 && samples == 0 {
            return Err(Error::schema(
                path,
                format!(
                    "{META_TOP_K} = {k_s:?} is not a positive integer (and there are no sampled targets)"
                ),
            ));
        }
        let layout = check_arrow_schema(path, builder.schema(), format_version)?;
        let rows = u64::try_from(fmd.num_rows())
            .map_err(|_| Error::corrupt(path, format!("negative row count {}", fmd.num_rows())))?;
        let meta = ShardMeta {
            format_version,
            k,
            rows,
            row_groups: md.num_row_groups(),
            created_by: fmd.created_by().map(str::to_string),
            logprob_scale,
            tail_scale,
            samples,
            layout,
        };
        let batches = guard(path, || {
            builder
                .with_batch_size(BATCH_ROWS)
                .build()
                .map_err(|e| Error::parquet(path, e))
        })?;
        Ok(ShardReader {
            path: path.to_path_buf(),
            meta,
            batches,
            current: Vec::new().into_iter(),
            done: false,
        })
    }

    /// The footer's facts about this shard.
    pub fn meta(&self) -> &ShardMeta {
        &self.meta
    }

    /// The shard's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Iterator for ShardReader {
    type Item = Result<Row>;

    fn next(&mut self) -> Option<Result<Row>> {
        loop {
            if let Some(r) = self.current.next() {
                return Some(Ok(r));
            }
            if self.done {
                return None;
            }
            let (path, batches) = (&self.path, &mut self.batches);
            let batch = guard(path, || match batches.next() {
                None => Ok(None),
                Some(Err(source)) => Err(Error::Arrow {
                    path: path.clone(),
                    source,
                }),
                Some(Ok(b)) => Ok(Some(b)),
            })
            .and_then(|b| b.map(|b| decode_batch(path, &b, &self.meta)).transpose());
            match batch {
                Ok(Some(rows)) => self.current = rows.into_iter(),
                Ok(None) => {
                    self.done = true;
                    return None;
                }
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
            }
        }
    }
}

/// Reads the footer of `path` (schema, `kd.*` metadata, row count) without decoding rows.
pub fn read_shard_meta(path: &Path) -> Result<ShardMeta> {
    Ok(ShardReader::open(path)?.meta)
}

/// Reads every row of the shard at `path` into memory; see [`ShardReader`] for streaming.
///
/// The file is memory-mapped (published shards are never rewritten) and decoded with
/// Parquet's Arrow reader. Corrupt or foreign files give an error naming `path`, never a
/// panic.
pub fn read_shard(path: &Path) -> Result<Vec<Row>> {
    ShardReader::open(path)?.collect()
}

fn utf8_column(path: &Path, name: &str, col: &ArrayRef) -> Result<StringArray> {
    let arr = if matches!(col.data_type(), DataType::Utf8) {
        col.clone()
    } else {
        arrow::compute::cast(col, &DataType::Utf8).map_err(|source| Error::Arrow {
            path: path.to_path_buf(),
            source,
        })?
    };
    arr.as_string_opt::<i32>()
        .cloned()
        .ok_or_else(|| Error::schema(path, format!("column {name} is not utf8")))
}

struct ListCol<'a, T: ArrowPrimitiveType> {
    offsets: &'a [i32],
    values: &'a [T::Native],
}

impl<'a, T: ArrowPrimitiveType> ListCol<'a, T> {
    fn new(path: &Path, name: &str, col: &'a ArrayRef) -> Result<Self> {
        let list: &ListArray = col
            .as_list_opt::<i32>()
            .ok_or_else(|| Error::schema(path, format!("column {name} is not a list")))?;
        if list.null_count() > 0 {
            return Err(Error::corrupt(
                path,
                format!("column {name} has null lists"),
            ));
        }
        let values = list
            .values()
            .as_primitive_opt::<T>()
            .ok_or_else(|| Error::schema(path, format!("column {name} has the wrong item type")))?;
        if values.null_count() > 0 {
            return Err(Error::corrupt(
                path,
                format!("column {name} has null items"),
            ));
        }
        Ok(ListCol {
            offsets: list.value_offsets(),
            values: values.values(),
        })
    }

    fn get(&self, path: &Path, name: &str, i: usize) -> Result<Vec<T::Native>> {
        let bad = || Error::corrupt(path, format!("column {name}: bad list offsets at row {i}"));
        let a = *self.offsets.get(i).ok_or_else(bad)?;
        let b = *self.offsets.get(i + 1).ok_or_else(bad)?;
        let a = usize::try_from(a).map_err(|_| bad())?;
        let b = usize::try_from(b).map_err(|_| bad())?;
        self.values.get(a..b).map(<[_]>::to_vec).ok_or_else(bad)
    }
}

/// Converts one record batch (whose schema was checked at open) into rows: v1's f32
/// log-probs as stored, v2's integers decoded ([`crate::v2`]).
fn decode_batch(path: &Path, b: &RecordBatch, meta: &ShardMeta) -> Result<Vec<Row>> {
    use crate::schema::DrawLayout;
    let scales = meta.logprob_scale.zip(meta.tail_scale);
    let names = match meta.layout {
        Some(l) => l.columns(),
        None => crate::schema::columns_of(meta.format_version).to_vec(),
    };
    if b.num_columns() != names.len() {
        return Err(Error::schema(
            path,
            format!(
                "batch has {} columns, expected {}",
                b.num_columns(),
                names.len()
            ),
        ));
    }
    for (i, c) in b.columns().iter().enumerate() {
        if c.null_count() > 0 {
            return Err(Error::corrupt(
                path,
                format!("column {} has nulls", names[i]),
            ));
        }
    }
    let ids = utf8_column(path, "id", b.column(0))?;
    let sources = utf8_column(path, "source", b.column(1))?;
    let input_ids = ListCol::<UInt32Type>::new(path, "input_ids", b.column(2))?;
    let prompt_len = b
        .column(3)
        .as_primitive_opt::<UInt32Type>()
        .ok_or_else(|| Error::schema(path, "column prompt_len is not uint32"))?;
    let topk_ids = ListCol::<UInt32Type>::new(path, "topk_ids", b.column(4))?;
    enum LogProbs<'a> {
        F32(ListCol<'a, Float32Type>, ListCol<'a, Float32Type>),
        Int(
            ListCol<'a, UInt32Type>,
            ListCol<'a, UInt32Type>,
            ListCol<'a, UInt32Type>,
            (u32, u32),
            // The draws' columns from `sample_ids` on, as many as the layout has.
            Vec<ListCol<'a, UInt32Type>>,
        ),
    }
    let lps = match scales {
        None => LogProbs::F32(
            ListCol::new(path, names[5], b.column(5))?,
            ListCol::new(path, names[6], b.column(6))?,
        ),
        Some(s) => LogProbs::Int(
            ListCol::new(path, names[5], b.column(5))?,
            ListCol::new(path, names[6], b.column(6))?,
            ListCol::new(path, names[7], b.column(7))?,
            s,
            (8..names.len())
                .map(|c| ListCol::new(path, names[c], b.column(c)))
                .collect::<Result<_>>()?,
        ),
    };
    let mut rows = Vec::with_capacity(b.num_rows());
    for i in 0..b.num_rows() {
        let s = sources.value(i);
        let source = Source::parse(s).ok_or_else(|| {
            Error::corrupt(path, format!("row {i} of batch: unknown source {s:?}"))
        })?;
        let input = input_ids.get(path, "input_ids", i)?;
        let prompt = prompt_len.value(i);
        let (topk_logprobs, token_logprob, sample_ids, sample_logprobs) = match &lps {
            LogProbs::F32(a, b) => (
                a.get(path, names[5], i)?,
                b.get(path, names[6], i)?,
                Vec::new(),
                Vec::new(),
            ),
            LogProbs::Int(a, b, t, (scale, tail_scale), draws) => {
                let gaps = a.get(path, names[5], i)?;
                let q = b.get(path, names[6], i)?;
                let tail = t.get(path, names[7], i)?;
                // One list per draw column of the layout (their number was checked above).
                let mut lists = draws
                    .iter()
                    .enumerate()
                    .map(|(c, col)| col.get(path, names[8 + c], i))
                    .collect::<Result<Vec<_>>>()?
                    .into_iter();
                let mut next = || lists.next().unwrap_or_default();
                let corrupt =
                    |what: String| Error::corrupt(path, format!("row {i} of batch: {what}"));
                let (sample_ids, sample_q) = match meta.layout {
                    Some(DrawLayout::TokenFirst) => {
                        let t = crate::v2::TokenFirst {
                            ids: next(),
                            gaps: next(),
                            counts: next(),
                            token_count: next(),
                        };
                        let targets = input.get(prompt as usize..).unwrap_or_default();
                        crate::v2::expand_token_first(&t, targets, &q, meta.samples)
                            .map_err(corrupt)?
                    }
                    Some(DrawLayout::ById) => {
                        let (ids, sq, counts) = (next(), next(), next());
                        crate::v2::expand_draws(&ids, &sq, &counts).ok_or_else(|| {
                            corrupt(format!(
                                "{} distinct sampled ids, {} log-probs and {} counts (each at least 1)",
                                ids.len(),
                                sq.len(),
                                counts.len()
                            ))
                        })?
                    }
                    _ => (next(), next()),
                };
                if sample_q.len() != sample_ids.len() {
                    return Err(corrupt(format!(
                        "{} sampled log-probs for {} sampled ids",
                        sample_q.len(),
                        sample_ids.len()
                    )));
                }
                if tail.len() != q.len() || tail.len().checked_mul(meta.k) != Some(gaps.len()) {
                    return Err(corrupt(format!(
                        "{} tail entries for {} top-k entries (k = {}) and {} positions",
                        tail.len(),
                        gaps.len(),
                        meta.k,
                        q.len()
                    )));
                }
                let (topk, token) =
                    crate::v2::decode(&gaps, &q, &tail, meta.k, *scale, *tail_scale);
                let sample_lps = crate::v2::decode_samples(&sample_q, *scale);
                (topk, token, sample_ids, sample_lps)
            }
        };
        rows.push(Row {
            id: ids.value(i).to_string(),
            source,
            input_ids: input,
            prompt_len: prompt,
            topk_ids: topk_ids.get(path, "topk_ids", i)?,
            topk_logprobs,
            token_logprob,
            sample_ids,
            sample_logprobs,
        });
    }
    Ok(rows)
}
