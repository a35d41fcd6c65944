//! The atomic shard writer.

use std::path::Path;
use std::sync::Arc;

use arrow::array::{ArrayRef, Float32Array, ListArray, RecordBatch, StringArray, UInt32Array};
use arrow::buffer::{OffsetBuffer, ScalarBuffer};
use arrow::datatypes::{DataType, Field, SchemaRef};
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_writer::ArrowWriterOptions;
use parquet::basic::{Compression, Encoding, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::{
    DEFAULT_CREATED_BY, EnabledStatistics, WriterProperties, WriterVersion,
};
use parquet::schema::types::ColumnPath;

use crate::fsutil::{HashingWriter, safe_join};
use crate::manifest::ShardEntry;
use crate::schema::{
    DrawLayout, LIST_ITEM, LOGPROB_SCALE, META_FORMAT_VERSION, META_LOGPROB_SCALE, META_SAMPLES,
    META_TAIL_SCALE, META_TOP_K, arrow_schema_of, arrow_schema_v2_of,
};
use crate::{DEFAULT_FORMAT_VERSION, Error, FORMAT_VERSION, Result, Row, Source};
use kd_fs::write_atomic;

/// How the values of one family of columns are encoded inside Parquet pages (before zstd).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValueEncoding {
    /// Parquet's dictionary encoding, falling back to PLAIN when the dictionary grows large.
    Dictionary,
    /// PLAIN: values as little-endian bytes.
    Plain,
    /// BYTE_STREAM_SPLIT: byte `i` of every value together (floats and fixed-width ints).
    ByteStreamSplit,
    /// DELTA_BINARY_PACKED: bit-packed deltas (integers only).
    DeltaBinaryPacked,
}

/// Knobs of the Parquet writer. The defaults are the measured best for teacher outputs
/// (see [`WriteOptions::default`]); every setting produces a file any Parquet reader opens.
#[derive(Clone, Debug, PartialEq)]
pub struct WriteOptions {
    /// zstd level, 1..=22.
    pub zstd_level: i32,
    /// zstd level (1..=22) of format 2's lists other than the top-k's: the input ids, the next
    /// token's log-prob, the tail and the draws, a few values per position each.
    pub light_zstd_level: i32,
    /// Rows (sequences) per row group at most.
    pub row_group_rows: usize,
    /// Encoding of the log-prob columns' values (v1: `topk_logprobs` and `token_logprob`;
    /// v2: `topk_logprob_gaps` and `token_logprob_q`).
    pub float_encoding: ValueEncoding,
    /// Encoding of `topk_ids` values.
    pub topk_id_encoding: ValueEncoding,
    /// Encoding of `input_ids` values.
    pub input_id_encoding: ValueEncoding,
    /// Format version to write: 2 (integer log-probs within 1/1024 nats, the default) or 1
    /// (exact f32 log-probs).
    pub format_version: u32,
    /// Sampled targets per position (`kd.samples`; format 2 only); 0 for none.
    pub samples: usize,
}

impl Default for WriteOptions {
    /// The defaults of [`DEFAULT_FORMAT_VERSION`] (format 2).
    fn default() -> Self {
        Self::for_version(DEFAULT_FORMAT_VERSION)
    }
}

impl WriteOptions {
    /// Format 1: zstd level 3, 256 rows per row group, BYTE_STREAM_SPLIT floats, dictionary
    /// ids.
    ///
    /// Measured with `cargo run -p kd-shard --release --example encodings` on
    /// `synth::realistic_rows` (Zipf-like logits over a 49152 vocabulary, k=32, 2000
    /// positions): 224.38 B/position with Parquet's default dictionary encoding everywhere,
    /// 138.15 B/position with BYTE_STREAM_SPLIT floats (full table in the crate docs).
    pub fn v1() -> Self {
        WriteOptions {
            zstd_level: 3,
            light_zstd_level: 19,
            row_group_rows: 256,
            float_encoding: ValueEncoding::ByteStreamSplit,
            topk_id_encoding: ValueEncoding::Dictionary,
            input_id_encoding: ValueEncoding::Dictionary,
            format_version: 1,
            samples: 0,
        }
    }

    /// Format 2: as format 1 with integer log-probs, top-k ids and input ids, all
    /// BYTE_STREAM_SPLIT.
    ///
    /// Measured with `cargo run -p kd-shard --release --example encodings out/quickstart`
    /// (a format-1 dump) on the quickstart's 3680 positions at k = 32, all rows in one file,
    /// and on 20000 synthetic positions (`synth::realistic_rows`); the figures are in
    /// docs/performance.md.
    pub fn v2() -> Self {
        WriteOptions {
            topk_id_encoding: ValueEncoding::ByteStreamSplit,
            input_id_encoding: ValueEncoding::ByteStreamSplit,
            format_version: 2,
            ..Self::v1()
        }
    }

    /// The defaults of format `version` (1 or 2).
    pub fn for_version(version: u32) -> Self {
        Self::for_version_with_samples(version, 0)
    }

    /// The defaults of format `version` holding `samples` sampled targets per position.
    pub fn for_version_with_samples(version: u32, samples: usize) -> Self {
        if version >= 2 {
            WriteOptions {
                format_version: version,
                samples,
                ..Self::v2()
            }
        } else {
            WriteOptions {
                samples,
                ..Self::v1()
            }
        }
    }
}

/// The `created_by` string of every shard: fixed per library version, so output is
/// reproducible (no timestamps are written anywhere).
pub fn created_by() -> String {
    format!(
        "kd-shard version {} (build {DEFAULT_CREATED_BY})",
        env!("CARGO_PKG_VERSION")
    )
}

fn item_path(col: &str) -> ColumnPath {
    ColumnPath::new(vec![
        col.to_string(),
        "list".to_string(),
        LIST_ITEM.to_string(),
    ])
}

fn apply_encoding(
    mut b: parquet::file::properties::WriterPropertiesBuilder,
    col: &str,
    enc: ValueEncoding,
) -> parquet::file::properties::WriterPropertiesBuilder {
    let path = item_path(col);
    match enc {
        ValueEncoding::Dictionary => b.set_column_dictionary_enabled(path, true),
        ValueEncoding::Plain => {
            b = b.set_column_dictionary_enabled(path.clone(), false);
            b.set_column_encoding(path, Encoding::PLAIN)
        }
        ValueEncoding::ByteStreamSplit => {
            b = b.set_column_dictionary_enabled(path.clone(), false);
            b.set_column_encoding(path, Encoding::BYTE_STREAM_SPLIT)
        }
        ValueEncoding::DeltaBinaryPacked => {
            b = b.set_column_dictionary_enabled(path.clone(), false);
            b.set_column_encoding(path, Encoding::DELTA_BINARY_PACKED)
        }
    }
}

/// The `kd.*` key-value metadata of a shard of format `version`.
fn kd_metadata(k: usize, version: u32, samples: usize) -> Vec<(String, String)> {
    let mut v = vec![
        (META_FORMAT_VERSION.to_string(), version.to_string()),
        (META_TOP_K.to_string(), k.to_string()),
    ];
    if version >= 2 {
        v.push((META_LOGPROB_SCALE.to_string(), LOGPROB_SCALE.to_string()));
        v.push((META_TAIL_SCALE.to_string(), crate::TAIL_SCALE.to_string()));
        v.push((META_SAMPLES.to_string(), samples.to_string()));
    }
    v
}

fn writer_properties(k: usize, opts: &WriteOptions, path: &Path) -> Result<WriterProperties> {
    let level = ZstdLevel::try_new(opts.zstd_level).map_err(|e| Error::parquet(path, e))?;
    // Format 2 leaves out the column chunks' min/max statistics and the offset index (one
    // page per column chunk, nothing to skip): nothing reads them, and in a shard of a few
    // thousand positions they weigh ~0.5 B/position.
    let v2 = opts.format_version >= 2;
    let statistics = match v2 {
        false => EnabledStatistics::Chunk,
        true => EnabledStatistics::None,
    };
    let mut b = WriterProperties::builder()
        .set_writer_version(WriterVersion::PARQUET_1_0)
        .set_created_by(created_by())
        .set_compression(Compression::ZSTD(level))
        .set_max_row_group_row_count(Some(opts.row_group_rows.max(1)))
        .set_statistics_enabled(statistics)
        .set_offset_index_disabled(v2)
        .set_key_value_metadata(Some(
            kd_metadata(k, opts.format_version, opts.samples)
                .into_iter()
                .map(|(k, v)| KeyValue::new(k, v))
                .collect(),
        ));
    if opts.format_version >= 2 {
        for col in [
            "topk_logprob_gaps",
            "token_logprob_q",
            "sample_logprob_q",
            "sample_logprob_gaps",
            "sample_token_count",
        ] {
            b = apply_encoding(b, col, opts.float_encoding);
        }
        b = apply_encoding(b, "sample_ids", opts.topk_id_encoding);
        // One value per row, or per position of a cache without top-k: a dictionary page
        // costs more than it saves.
        for col in ["id", "source", "prompt_len"] {
            b = b.set_column_dictionary_enabled(ColumnPath::new(vec![col.to_string()]), false);
        }
        b = apply_encoding(b, "tail_logmass_q", opts.float_encoding);
        // Every list but the top-k's holds a few values per position: a slow zstd level
        // (`light_zstd_level`) costs little time there.
        let light =
            ZstdLevel::try_new(opts.light_zstd_level).map_err(|e| Error::parquet(path, e))?;
        for col in [
            "input_ids",
            "token_logprob_q",
            "tail_logmass_q",
            "sample_ids",
            "sample_logprob_q",
            "sample_logprob_gaps",
            "sample_counts",
            "sample_token_count",
        ] {
            b = b.set_column_compression(item_path(col), Compression::ZSTD(light));
        }
    } else {
        b = apply_encoding(b, "topk_logprobs", opts.float_encoding);
        b = apply_encoding(b, "token_logprob", opts.float_encoding);
    }
    b = apply_encoding(b, "topk_ids", opts.topk_id_encoding);
    b = apply_encoding(b, "input_ids", opts.input_id_encoding);
    Ok(b.build())
}

/// i32 offsets for lists of the given lengths, or `None` if they exceed i32.
fn offsets<'a>(lens: impl Iterator<Item = usize> + 'a) -> Option<OffsetBuffer<i32>> {
    let mut v = vec![0i32];
    let mut acc: i32 = 0;
    for l in lens {
        acc = acc.checked_add(i32::try_from(l).ok()?)?;
        v.push(acc);
    }
    Some(OffsetBuffer::new(ScalarBuffer::from(v)))
}

fn list_array(dt: DataType, offs: OffsetBuffer<i32>, values: ArrayRef) -> ArrayRef {
    let field = Arc::new(Field::new(LIST_ITEM, dt, false));
    Arc::new(ListArray::new(field, offs, values, None))
}

/// Largest number of list values one batch may hold (Arrow `List` uses i32 offsets).
const MAX_BATCH_VALUES: usize = i32::MAX as usize;

/// Splits `rows` into batches of at most `max_rows` rows whose top-k lists fit i32 offsets.
fn batch_ranges(rows: &[Row], max_rows: usize) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut vals = 0usize;
    for (i, r) in rows.iter().enumerate() {
        let n = r
            .topk_ids
            .len()
            .max(r.input_ids.len())
            .max(r.sample_ids.len());
        if i > start && (i - start >= max_rows || vals + n > MAX_BATCH_VALUES) {
            out.push(start..i);
            start = i;
            vals = 0;
        }
        vals += n;
    }
    if start < rows.len() {
        out.push(start..rows.len());
    }
    out
}

/// A `list<uint32>` column with one list per slice.
fn u32_lists<'a>(lists: impl Iterator<Item = &'a [u32]> + Clone) -> Option<ArrayRef> {
    Some(list_array(
        DataType::UInt32,
        offsets(lists.clone().map(<[u32]>::len))?,
        Arc::new(UInt32Array::from_iter_values(lists.flatten().copied())),
    ))
}

/// A `list<float32>` column with one list per slice.
fn f32_lists<'a>(lists: impl Iterator<Item = &'a [f32]> + Clone) -> Option<ArrayRef> {
    Some(list_array(
        DataType::Float32,
        offsets(lists.clone().map(<[f32]>::len))?,
        Arc::new(Float32Array::from_iter_values(lists.flatten().copied())),
    ))
}

/// `quantized` holds format 2's integers, whose draws go into the columns of `layout`, `n`
/// draws per position.
fn record_batch(
    schema: &SchemaRef,
    rows: &[Row],
    quantized: Option<(&[crate::v2::Encoded], DrawLayout, usize)>,
    path: &Path,
) -> Result<RecordBatch> {
    let id: ArrayRef = Arc::new(StringArray::from_iter_values(rows.iter().map(|r| &r.id)));
    let source: ArrayRef = Arc::new(StringArray::from_iter_values(
        rows.iter().map(|r| r.source.as_str()),
    ));
    let prompt_len: ArrayRef = Arc::new(UInt32Array::from_iter_values(
        rows.iter().map(|r| r.prompt_len),
    ));
    let mut columns = vec![
        Some(id),
        Some(source),
        u32_lists(rows.iter().map(|r| r.input_ids.as_slice())),
        Some(prompt_len),
        u32_lists(rows.iter().map(|r| r.topk_ids.as_slice())),
    ];
    match quantized {
        None => {
            columns.push(f32_lists(rows.iter().map(|r| r.topk_logprobs.as_slice())));
            columns.push(f32_lists(rows.iter().map(|r| r.token_logprob.as_slice())));
        }
        Some((q, layout, n)) => {
            columns.push(u32_lists(q.iter().map(|r| r.gaps.as_slice())));
            columns.push(u32_lists(q.iter().map(|r| r.token_q.as_slice())));
            columns.push(u32_lists(q.iter().map(|r| r.tail.as_slice())));
            match layout {
                DrawLayout::TokenFirst => {
                    let t: Vec<crate::v2::TokenFirst> = q
                        .iter()
                        .zip(rows)
                        .map(|(e, r)| crate::v2::token_first(e, r.targets(), n))
                        .collect();
                    columns.push(u32_lists(t.iter().map(|t| t.ids.as_slice())));
                    columns.push(u32_lists(t.iter().map(|t| t.gaps.as_slice())));
                    columns.push(u32_lists(t.iter().map(|t| t.counts.as_slice())));
                    columns.push(u32_lists(t.iter().map(|t| t.token_count.as_slice())));
                }
                DrawLayout::ById => {
                    columns.push(u32_lists(q.iter().map(|r| r.sample_ids.as_slice())));
                    columns.push(u32_lists(q.iter().map(|r| r.sample_q.as_slice())));
                    columns.push(u32_lists(q.iter().map(|r| r.sample_counts.as_slice())));
                }
                DrawLayout::Repeats => {
                    // Every draw with its repeats (empty lists in a cache without draws).
                    let expanded: Vec<(Vec<u32>, Vec<u32>)> = q
                        .iter()
                        .map(|e| {
                            crate::v2::expand_draws(&e.sample_ids, &e.sample_q, &e.sample_counts)
                        })
                        .collect::<Option<_>>()
                        .expect("encoded draws expand");
                    columns.push(u32_lists(expanded.iter().map(|e| e.0.as_slice())));
                    columns.push(u32_lists(expanded.iter().map(|e| e.1.as_slice())));
                }
            }
        }
    }
    finish_batch(schema, columns, path)
}

fn finish_batch(
    schema: &SchemaRef,
    columns: Vec<Option<ArrayRef>>,
    path: &Path,
) -> Result<RecordBatch> {
    let too_big = || Error::corrupt(path, "list values exceed i32 offsets in one batch");
    let columns = columns
        .into_iter()
        .collect::<Option<Vec<ArrayRef>>>()
        .ok_or_else(too_big)?;
    RecordBatch::try_new(schema.clone(), columns).map_err(|source| Error::Arrow {
        path: path.to_path_buf(),
        source,
    })
}

/// Tests write sampled shards in the layouts of earlier versions.
#[cfg(test)]
pub(crate) mod legacy {
    use std::cell::Cell;

    use crate::schema::DrawLayout;

    thread_local!(static LAYOUT: Cell<Option<DrawLayout>> = const { Cell::new(None) });

    pub(crate) fn layout() -> Option<DrawLayout> {
        LAYOUT.with(Cell::get)
    }

    /// Runs `f` with this thread's sampled shards written in `layout`.
    pub(crate) fn with_layout<T>(layout: DrawLayout, f: impl FnOnce() -> T) -> T {
        LAYOUT.with(|l| l.set(Some(layout)));
        let out = f();
        LAYOUT.with(|l| l.set(None));
        out
    }
}

/// Writes one shard atomically with [`WriteOptions::default`]; see [`write_shard_with`].
pub fn write_shard(dir: &Path, file_name: &str, k: usize, rows: &[Row]) -> Result<ShardEntry> {
    write_shard_with(dir, file_name, k, rows, &WriteOptions::default())
}

/// Writes `rows` as the shard `dir/file_name` and returns its manifest entry.
///
/// Every row is checked with [`Row::validate_targets`] (`k` top-k entries and `opts.samples`
/// draws per position; ids unchecked against a vocabulary: the
/// writer does not know it) before anything is written. The data goes to
/// `<final>.tmp-<pid>` in the same directory, is fsynced, renamed over the final name, and the
/// directory is fsynced: a reader sees no file or the whole file, never a prefix. `file_name`
/// must be relative without `..` and may contain `/` (missing directories are created).
/// Identical `rows`, `k` and options give byte-identical files.
pub fn write_shard_with(
    dir: &Path,
    file_name: &str,
    k: usize,
    rows: &[Row],
    opts: &WriteOptions,
) -> Result<ShardEntry> {
    let path = safe_join(dir, file_name)?;
    let mut entry = ShardEntry {
        file: file_name.to_string(),
        rows: rows.len() as u64,
        tokens: 0,
        positions: 0,
        response_tokens: 0,
        bytes: 0,
        sha256: String::new(),
    };
    if opts.samples > 0 && opts.format_version < 2 {
        return Err(Error::schema(
            &path,
            format!(
                "format {} cannot hold sampled targets; write format 2",
                opts.format_version
            ),
        ));
    }
    for (index, r) in rows.iter().enumerate() {
        r.validate_targets(k, opts.samples, u32::MAX)
            .map_err(|what| Error::InvalidRow {
                path: path.clone(),
                index,
                id: r.id.clone(),
                what,
            })?;
        entry.tokens += r.input_ids.len() as u64;
        entry.positions += r.n_pos() as u64;
        if r.source == Source::Generated {
            entry.response_tokens += r.n_pos() as u64;
        }
    }
    let version = opts.format_version;
    if version == 0 || version > FORMAT_VERSION {
        return Err(Error::UnsupportedVersion {
            path: path.clone(),
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    let quantized = if version >= 2 {
        let mut q = Vec::with_capacity(rows.len());
        for (index, r) in rows.iter().enumerate() {
            q.push(
                crate::v2::encode_row(r, k).map_err(|what| Error::InvalidRow {
                    path: path.clone(),
                    index,
                    id: r.id.clone(),
                    what,
                })?,
            );
        }
        Some(q)
    } else {
        None
    };
    let props = writer_properties(k, opts, &path)?;
    // The draws' columns only where there are draws: a top-k cache keeps the columns it had.
    let layout = match opts.samples {
        0 => DrawLayout::Repeats,
        _ => DrawLayout::TokenFirst,
    };
    #[cfg(test)]
    let layout = match (opts.samples, legacy::layout()) {
        (1.., Some(l)) => l,
        _ => layout,
    };
    let schema = match version {
        1 => arrow_schema_of(1),
        _ => arrow_schema_v2_of(layout),
    };
    // The kd.* keys also go into the Arrow schema's metadata. Format 2 leaves out the
    // embedded Arrow schema (ARROW:schema, ~1.7 kB a file): every column's type follows from
    // its Parquet type, and readers show the file's key-value metadata in its place.
    let schema = Arc::new(
        schema.as_ref().clone().with_metadata(
            kd_metadata(k, version, opts.samples)
                .into_iter()
                .collect::<std::collections::BTreeMap<_, _>>(),
        ),
    );
    let options = ArrowWriterOptions::new()
        .with_properties(props)
        .with_skip_arrow_metadata(version >= 2);
    let (sha, bytes) = write_atomic::<_, Error>(&path, |file| {
        let pq = |e| Error::parquet(&path, e);
        let mut w =
            ArrowWriter::try_new_with_options(HashingWriter::new(file), schema.clone(), options)
                .map_err(pq)?;
        for range in batch_ranges(rows, opts.row_group_rows.max(1)) {
            let q = quantized
                .as_deref()
                .map(|q| (&q[range.clone()], layout, opts.samples));
            w.write(&record_batch(&schema, &rows[range], q, &path)?)
                .map_err(pq)?;
        }
        let (file, sha, bytes) = w.into_inner().map_err(pq)?.finish();
        Ok((file, (sha, bytes)))
    })?;
    entry.sha256 = sha;
    entry.bytes = bytes;
    Ok(entry)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_ranges_respect_row_limit() {
        let r = crate::synth::tiny_rows(7, 3);
        let ranges = batch_ranges(&r, 3);
        assert_eq!(ranges, vec![0..3, 3..6, 6..7]);
        assert!(batch_ranges(&[], 3).is_empty());
    }

    #[test]
    fn created_by_is_fixed() {
        assert!(created_by().starts_with("kd-shard version "));
        assert_eq!(created_by(), created_by());
    }
}
