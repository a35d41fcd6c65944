//! Summary statistics of a shard directory.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use crate::manifest::{MANIFEST_FILE, read_manifest};
use crate::reader::ShardReader;
use crate::{Result, Row};

/// Statistics of the rows of one source (`generated` or `scored`).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct SourceStats {
    pub rows: u64,
    pub tokens: u64,
    pub positions: u64,
    /// Mean over positions of `max(0, 1 - Σ exp(topk_logprobs))`.
    pub mean_tail_mass: f64,
    /// Mean over positions of `exp(topk_logprobs[0])`.
    pub mean_top1_prob: f64,
    /// Mean over positions of `token_logprob` (nats).
    pub mean_token_logprob: f64,
}

/// Statistics of a whole shard directory; see [`stats_dir`].
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Stats {
    /// Shards listed in the manifest.
    pub files: usize,
    /// Entries per position.
    pub k: usize,
    /// Teacher vocabulary size.
    pub vocab_size: u32,
    pub rows: u64,
    pub tokens: u64,
    pub positions: u64,
    /// Positions of `generated` rows.
    pub response_tokens: u64,
    /// Bytes of all shard files.
    pub bytes: u64,
    /// `bytes / positions` (0 without positions).
    pub bytes_per_position: f64,
    /// `bytes / (positions · (k + samples))`: bytes per stored (id, log-prob) entry, a
    /// top-k entry or a draw, everything in the files included (0 without positions).
    pub bytes_per_entry: f64,
    /// Sampled targets (draws) per position; 0 for a top-k cache.
    pub samples: usize,
    /// Mean over positions of the number of distinct ids drawn (0 without samples).
    pub mean_distinct_samples: f64,
    /// Mean over positions of the teacher's probability mass on the distinct ids drawn.
    pub mean_sampled_mass: f64,
    /// The manifest's format version (1: f32 log-probs; 2: integer log-probs).
    pub format_version: u32,
    /// Mean over positions of `max(0, 1 - Σ exp(topk_logprobs))`: probability mass outside the top k.
    pub mean_tail_mass: f64,
    /// Mean over positions of the top-1 probability.
    pub mean_top1_prob: f64,
    /// Mean over positions of the teacher log-prob of the actual next token (nats).
    pub mean_token_logprob: f64,
    /// The same statistics per source, keyed `generated` / `scored`.
    pub by_source: BTreeMap<String, SourceStats>,
    /// Where the bytes go: each column's compressed bytes over every shard (from the Parquet
    /// metadata), and under [`FILE_OVERHEAD`] the rest of the files (footers, page headers).
    pub bytes_by_column: BTreeMap<String, u64>,
}

/// The key of [`Stats::bytes_by_column`] for the bytes outside the column chunks.
pub const FILE_OVERHEAD: &str = "(footers and headers)";

#[derive(Default)]
struct Acc {
    rows: u64,
    tokens: u64,
    positions: u64,
    tail: f64,
    top1: f64,
    token_lp: f64,
    distinct: f64,
    sampled_mass: f64,
}

impl Acc {
    fn add(&mut self, r: &Row, k: usize, n: usize) {
        self.rows += 1;
        self.tokens += r.input_ids.len() as u64;
        self.positions += r.n_pos() as u64;
        if n > 0 {
            for j in 0..r.n_pos() {
                let c = r.sample_counts(j, n);
                self.distinct += c.len() as f64;
                self.sampled_mass += c.iter().map(|t| f64::from(t.2).exp()).sum::<f64>();
            }
        }
        if k == 0 {
            self.token_lp += r.token_logprob.iter().map(|l| f64::from(*l)).sum::<f64>();
            return;
        }
        for lps in r.topk_logprobs.chunks_exact(k) {
            let mass: f64 = lps.iter().map(|l| f64::from(*l).exp()).sum();
            self.tail += (1.0 - mass).max(0.0);
            self.top1 += f64::from(lps[0]).exp();
        }
        self.token_lp += r.token_logprob.iter().map(|l| f64::from(*l)).sum::<f64>();
    }

    fn means(&self) -> (f64, f64, f64) {
        if self.positions == 0 {
            return (0.0, 0.0, 0.0);
        }
        let n = self.positions as f64;
        (self.tail / n, self.top1 / n, self.token_lp / n)
    }

    fn sample_means(&self) -> (f64, f64) {
        if self.positions == 0 {
            return (0.0, 0.0);
        }
        let n = self.positions as f64;
        (self.distinct / n, self.sampled_mass / n)
    }
}

/// Accumulates [`Stats`] from rows, for callers that hold rows rather than a directory.
#[derive(Default)]
pub struct StatsBuilder {
    k: usize,
    n: usize,
    all: Acc,
    by_source: BTreeMap<&'static str, Acc>,
}

impl StatsBuilder {
    /// A builder for rows with `k` top-k entries per position.
    pub fn new(k: usize) -> StatsBuilder {
        Self::with_samples(k, 0)
    }

    /// A builder for rows with `k` top-k entries and `n` draws per position.
    pub fn with_samples(k: usize, n: usize) -> StatsBuilder {
        StatsBuilder {
            k,
            n,
            ..Default::default()
        }
    }

    /// Adds one row.
    pub fn add(&mut self, r: &Row) {
        self.all.add(r, self.k, self.n);
        self.by_source
            .entry(r.source.as_str())
            .or_default()
            .add(r, self.k, self.n);
    }

    /// The statistics so far, with `files`, `bytes` and `vocab_size` supplied by the caller.
    pub fn finish(&self, files: usize, bytes: u64, vocab_size: u32) -> Stats {
        let (tail, top1, tok) = self.all.means();
        let by_source = self
            .by_source
            .iter()
            .map(|(name, a)| {
                let (tail, top1, tok) = a.means();
                (
                    name.to_string(),
                    SourceStats {
                        rows: a.rows,
                        tokens: a.tokens,
                        positions: a.positions,
                        mean_tail_mass: tail,
                        mean_top1_prob: top1,
                        mean_token_logprob: tok,
                    },
                )
            })
            .collect();
        Stats {
            files,
            k: self.k,
            vocab_size,
            rows: self.all.rows,
            tokens: self.all.tokens,
            positions: self.all.positions,
            response_tokens: self.by_source.get("generated").map_or(0, |a| a.positions),
            bytes,
            bytes_per_position: if self.all.positions == 0 {
                0.0
            } else {
                bytes as f64 / self.all.positions as f64
            },
            bytes_per_entry: if self.all.positions == 0 || self.k + self.n == 0 {
                0.0
            } else {
                bytes as f64 / (self.all.positions as f64 * (self.k + self.n) as f64)
            },
            samples: self.n,
            mean_distinct_samples: self.all.sample_means().0,
            mean_sampled_mass: self.all.sample_means().1,
            format_version: crate::DEFAULT_FORMAT_VERSION,
            mean_tail_mass: tail,
            mean_top1_prob: top1,
            mean_token_logprob: tok,
            by_source,
            bytes_by_column: BTreeMap::new(),
        }
    }
}

/// Reads every shard listed in `dir/manifest.json` and summarises it. Fails on the first
/// unreadable shard (use [`crate::verify_dir`] to list every problem).
pub fn stats_dir(dir: &Path) -> Result<Stats> {
    let m = read_manifest(&dir.join(MANIFEST_FILE))?;
    let mut b = StatsBuilder::with_samples(m.top_k(), m.samples());
    for s in &m.shards {
        let path = crate::fsutil::safe_join(dir, &s.file)?;
        for row in ShardReader::open(&path)? {
            b.add(&row?);
        }
    }
    let bytes = crate::manifest::Totals::of(&m.shards).bytes;
    let mut s = b.finish(m.shards.len(), bytes, m.vocab_size());
    s.format_version = m.format_version;
    for sh in &m.shards {
        let path = crate::fsutil::safe_join(dir, &sh.file)?;
        add_column_bytes(&path, &mut s.bytes_by_column)?;
    }
    let in_columns: u64 = s.bytes_by_column.values().sum();
    s.bytes_by_column
        .insert(FILE_OVERHEAD.to_string(), bytes.saturating_sub(in_columns));
    Ok(s)
}

/// Adds each column's compressed bytes in the shard `path` (its row groups' column chunks)
/// to `acc`, keyed by the column's name.
fn add_column_bytes(path: &Path, acc: &mut BTreeMap<String, u64>) -> Result<()> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let f = std::fs::File::open(path).map_err(|e| crate::Error::io(path, e))?;
    let r = SerializedFileReader::new(f).map_err(|e| crate::Error::parquet(path, e))?;
    for rg in r.metadata().row_groups() {
        for c in rg.columns() {
            let name = c.column_path().parts().first().cloned().unwrap_or_default();
            *acc.entry(name).or_default() += c.compressed_size().max(0) as u64;
        }
    }
    Ok(())
}
