//! The decoded fixed-stride cache: every row of a shard set as flat native-endian arrays,
//! written once under `DIR/.kd-cache/<fingerprint>/` and memory-mapped afterwards.
//!
//! | file | type | length |
//! | --- | --- | --- |
//! | `offsets.u64` | u64 | `3 * (rows + 1)`: per row boundary `(input_off, pos_off, id_off)` |
//! | `prompt_len.u32` | u32 | `rows` |
//! | `source.u8` | u8 | `rows` (0 generated, 1 scored) |
//! | `ids.u8` | utf8 | all row ids concatenated |
//! | `input_ids.u32` | u32 | total tokens |
//! | `topk_ids.u32` | u32 | total positions × k |
//! | `topk_logprobs.f32` | f32 | total positions × k |
//! | `token_logprob.f32` | f32 | total positions |
//! | `header.json` | json | written last: version, fingerprint, endianness, counts |
//!
//! Row `r` owns `input_ids[in[r]..in[r+1]]` and positions `pos[r]..pos[r+1]` (times `k` for
//! the top-k arrays). Publication is atomic: everything is written into
//! `<fingerprint>.tmp-<pid>-<n>/`, each file fsynced, then the directory is renamed into place and
//! its parent fsynced. A cache is reused when its header matches the shard set's fingerprint,
//! this machine's endianness and the file sizes; its content is not re-hashed (it was
//! validated row by row when it was built from hash-verified shards).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use kd_shard::{Manifest, Row, ShardReader, Source};
use serde::{Deserialize, Serialize};

use super::error::{Error, Result};
use super::map::Mapped;
use super::targets::TargetKind;

/// Layout version of the decoded cache; part of the data fingerprint.
pub const CACHE_VERSION: u32 = 1;
/// The directory below a shard directory that holds decoded caches.
pub const CACHE_DIR: &str = ".kd-cache";

const HEADER: &str = "header.json";

#[derive(Serialize, Deserialize, Debug, PartialEq, Eq)]
struct Header {
    cache_version: u32,
    fingerprint: String,
    endian: String,
    rows: u64,
    tokens: u64,
    positions: u64,
    k: u64,
    id_bytes: u64,
}

fn endian() -> &'static str {
    if cfg!(target_endian = "little") {
        "little"
    } else {
        "big"
    }
}

/// Whether [`crate::data::ShardSet::open`] decoded the shards or reused a cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheStatus {
    /// No usable cache existed; the shards were decoded and a cache published.
    Built,
    /// A matching cache was mapped; no shard was decoded.
    Reused,
}

/// The mapped arrays of one cache directory.
#[derive(Debug)]
pub(crate) struct Cache {
    pub(crate) dir: PathBuf,
    pub(crate) status: CacheStatus,
    pub(crate) k: usize,
    pub(crate) rows: usize,
    pub(crate) offsets: Mapped<u64>,
    pub(crate) prompt_len: Mapped<u32>,
    pub(crate) source: Mapped<u8>,
    pub(crate) ids: Mapped<u8>,
    pub(crate) input_ids: Mapped<u32>,
    pub(crate) topk_ids: Mapped<u32>,
    pub(crate) topk_logprobs: Mapped<f32>,
    pub(crate) token_logprob: Mapped<f32>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |e| Error::io(path, e)
}

fn fsync_dir(dir: &Path) -> Result<()> {
    kd_fs::fsync_dir(dir).map_err(|e| Error::io(&e.path, e.source))
}

impl Cache {
    /// Maps the cache for `fingerprint` below `shard_dir`, building it first when it is absent
    /// or does not match. `shards` are the verified shard paths in manifest order.
    pub(crate) fn open_or_build(
        shard_dir: &Path,
        fingerprint: &str,
        manifest: &Manifest,
        shards: &[PathBuf],
        targets: TargetKind,
    ) -> Result<Cache> {
        let root = shard_dir.join(CACHE_DIR);
        let dir = root.join(fingerprint);
        let k = match targets {
            TargetKind::TopK => manifest.top_k(),
            TargetKind::Sampled => manifest.samples(),
        };
        if dir.join(HEADER).is_file() {
            match Cache::map(&dir, fingerprint, k, CacheStatus::Reused) {
                Ok(c) => return Ok(c),
                Err(_) => {
                    // Unusable (interrupted by hand, other endianness, ...): set it aside and
                    // rebuild. Processes that still map it keep their (deleted) inodes.
                    let stale = root.join(format!("{fingerprint}.stale-{}", std::process::id()));
                    std::fs::rename(&dir, &stale).map_err(io(&dir))?;
                    let _ = std::fs::remove_dir_all(&stale);
                }
            }
        }
        std::fs::create_dir_all(&root).map_err(io(&root))?;
        // Unique per process and per open, so concurrent builders never share a directory.
        static BUILDS: AtomicU64 = AtomicU64::new(0);
        let tmp = root.join(format!(
            "{fingerprint}.tmp-{}-{}",
            std::process::id(),
            BUILDS.fetch_add(1, Ordering::Relaxed)
        ));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
        }
        std::fs::create_dir(&tmp).map_err(io(&tmp))?;
        let built = build(&tmp, fingerprint, manifest, shards, targets);
        if let Err(e) = built {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
        fsync_dir(&tmp)?;
        if let Err(e) = std::fs::rename(&tmp, &dir) {
            let _ = std::fs::remove_dir_all(&tmp);
            // Another process published the same cache first: use theirs.
            if dir.join(HEADER).is_file() {
                return Cache::map(&dir, fingerprint, k, CacheStatus::Built);
            }
            return Err(Error::io(&dir, e));
        }
        fsync_dir(&root)?;
        Cache::map(&dir, fingerprint, k, CacheStatus::Built)
    }

    fn map(dir: &Path, fingerprint: &str, k: usize, status: CacheStatus) -> Result<Cache> {
        let hp = dir.join(HEADER);
        let text = std::fs::read_to_string(&hp).map_err(io(&hp))?;
        let h: Header = serde_json::from_str(&text).map_err(|e| Error::Cache {
            path: hp.clone(),
            what: e.to_string(),
        })?;
        let bad = |what: String| Error::Cache {
            path: hp.clone(),
            what,
        };
        if h.cache_version != CACHE_VERSION || h.fingerprint != fingerprint || h.endian != endian()
        {
            return Err(bad(format!(
                "made for version {} / {} / {} endian, need {CACHE_VERSION} / {fingerprint} / {}",
                h.cache_version,
                h.fingerprint,
                h.endian,
                endian()
            )));
        }
        if h.k != k as u64 {
            return Err(bad(format!("k is {}, manifest says {k}", h.k)));
        }
        let us = |v: u64| usize::try_from(v).map_err(|_| bad(format!("{v} overflows usize")));
        let (rows, tokens, positions) = (us(h.rows)?, us(h.tokens)?, us(h.positions)?);
        let f = |name: &str| dir.join(name);
        let c = Cache {
            dir: dir.to_path_buf(),
            status,
            k,
            rows,
            offsets: Mapped::open(&f("offsets.u64"), 3 * (rows + 1))?,
            prompt_len: Mapped::open(&f("prompt_len.u32"), rows)?,
            source: Mapped::open(&f("source.u8"), rows)?,
            ids: Mapped::open(&f("ids.u8"), us(h.id_bytes)?)?,
            input_ids: Mapped::open(&f("input_ids.u32"), tokens)?,
            topk_ids: Mapped::open(&f("topk_ids.u32"), positions * k)?,
            topk_logprobs: Mapped::open(&f("topk_logprobs.f32"), positions * k)?,
            token_logprob: Mapped::open(&f("token_logprob.f32"), positions)?,
        };
        // Cheap structural check of the index so that slicing can never go out of bounds.
        let o = c.offsets.as_slice();
        let ok = o[..3] == [0, 0, 0]
            && o[3 * rows..] == [tokens as u64, positions as u64, h.id_bytes]
            && o.chunks_exact(3)
                .zip(o.chunks_exact(3).skip(1))
                .zip(c.prompt_len.as_slice())
                .all(|((a, b), &pl)| {
                    b[0] >= a[0]
                        && b[1] >= a[1]
                        && b[2] >= a[2]
                        && pl >= 1
                        && b[0] - a[0] == b[1] - a[1] + u64::from(pl)
                });
        if !ok {
            return Err(bad("row index is inconsistent".into()));
        }
        Ok(c)
    }
}

struct Out {
    path: PathBuf,
    w: BufWriter<File>,
}

impl Out {
    fn new(dir: &Path, name: &str) -> Result<Out> {
        let path = dir.join(name);
        let f = File::create(&path).map_err(io(&path))?;
        Ok(Out {
            w: BufWriter::with_capacity(1 << 20, f),
            path,
        })
    }

    fn put(&mut self, bytes: &[u8]) -> Result<()> {
        self.w.write_all(bytes).map_err(io(&self.path))
    }

    fn u32s(&mut self, v: &[u32]) -> Result<()> {
        let mut buf = Vec::with_capacity(v.len() * 4);
        v.iter()
            .for_each(|x| buf.extend_from_slice(&x.to_ne_bytes()));
        self.put(&buf)
    }

    fn f32s(&mut self, v: &[f32]) -> Result<()> {
        let mut buf = Vec::with_capacity(v.len() * 4);
        v.iter()
            .for_each(|x| buf.extend_from_slice(&x.to_ne_bytes()));
        self.put(&buf)
    }

    fn finish(self) -> Result<()> {
        let f = self
            .w
            .into_inner()
            .map_err(|e| Error::io(&self.path, e.into_error()))?;
        f.sync_all().map_err(io(&self.path))
    }
}

/// One position's draws as plug-in targets of width `n` (see [`TargetKind::Sampled`]):
/// distinct ids by count, descending, with log-prob ln(c/n), then ids not drawn at `-inf`.
fn plug_in(ids: &[u32], logprobs: &[f32], n: usize, out_ids: &mut Vec<u32>, out_lp: &mut Vec<f32>) {
    let mut counts = kd_shard::counts_of(ids, logprobs);
    counts.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let lps = kd_loss::sampled::plug_in_logprobs(
        &counts.iter().map(|c| c.1).collect::<Vec<_>>(),
        n as u32,
    );
    out_ids.extend(counts.iter().map(|c| c.0));
    out_lp.extend(lps);
    let mut pad = 0u32;
    for _ in counts.len()..n {
        while counts.iter().any(|c| c.0 == pad) {
            pad += 1;
        }
        out_ids.push(pad);
        out_lp.push(f32::NEG_INFINITY);
        pad += 1;
    }
}

/// Decodes every shard once (streaming, 64 rows at a time) into the files of `dir`, checking
/// each row with [`Row::validate_targets`] and each shard's row count against the manifest;
/// for [`TargetKind::Sampled`] the draws become plug-in targets ([`plug_in`]).
fn build(
    dir: &Path,
    fingerprint: &str,
    m: &Manifest,
    shards: &[PathBuf],
    targets: TargetKind,
) -> Result<()> {
    let (top_k, samples) = (m.top_k(), m.samples());
    let k = match targets {
        TargetKind::TopK => top_k,
        TargetKind::Sampled => samples,
    };
    let vocab = m.vocab_size();
    let (mut plug_ids, mut plug_lps) = (Vec::new(), Vec::new());
    let mut offsets = Out::new(dir, "offsets.u64")?;
    let mut prompt_len = Out::new(dir, "prompt_len.u32")?;
    let mut source = Out::new(dir, "source.u8")?;
    let mut ids = Out::new(dir, "ids.u8")?;
    let mut input_ids = Out::new(dir, "input_ids.u32")?;
    let mut topk_ids = Out::new(dir, "topk_ids.u32")?;
    let mut topk_lp = Out::new(dir, "topk_logprobs.f32")?;
    let mut token_lp = Out::new(dir, "token_logprob.f32")?;
    let (mut n_in, mut n_pos, mut n_id, mut rows) = (0u64, 0u64, 0u64, 0u64);
    let put_offsets = |o: &mut Out, a: u64, b: u64, c: u64| {
        let mut buf = [0u8; 24];
        buf[..8].copy_from_slice(&a.to_ne_bytes());
        buf[8..16].copy_from_slice(&b.to_ne_bytes());
        buf[16..].copy_from_slice(&c.to_ne_bytes());
        o.put(&buf)
    };
    put_offsets(&mut offsets, 0, 0, 0)?;
    for (entry, path) in m.shards.iter().zip(shards) {
        let mut in_shard = 0u64;
        for (index, row) in ShardReader::open(path)?.enumerate() {
            let row: Row = row?;
            row.validate_targets(top_k, samples, vocab)
                .map_err(|what| Error::InvalidRow {
                    path: path.clone(),
                    index,
                    id: row.id.clone(),
                    what,
                })?;
            prompt_len.put(&row.prompt_len.to_ne_bytes())?;
            source.put(&[match row.source {
                Source::Generated => 0u8,
                Source::Scored => 1u8,
            }])?;
            ids.put(row.id.as_bytes())?;
            input_ids.u32s(&row.input_ids)?;
            match targets {
                TargetKind::TopK => {
                    topk_ids.u32s(&row.topk_ids)?;
                    topk_lp.f32s(&row.topk_logprobs)?;
                }
                TargetKind::Sampled => {
                    plug_ids.clear();
                    plug_lps.clear();
                    for (ids, lps) in row
                        .sample_ids
                        .chunks_exact(k)
                        .zip(row.sample_logprobs.chunks_exact(k))
                    {
                        plug_in(ids, lps, k, &mut plug_ids, &mut plug_lps);
                    }
                    topk_ids.u32s(&plug_ids)?;
                    topk_lp.f32s(&plug_lps)?;
                }
            }
            token_lp.f32s(&row.token_logprob)?;
            n_in += row.input_ids.len() as u64;
            n_pos += row.n_pos() as u64;
            n_id += row.id.len() as u64;
            put_offsets(&mut offsets, n_in, n_pos, n_id)?;
            in_shard += 1;
        }
        if in_shard != entry.rows {
            return Err(Error::Manifest {
                path: path.clone(),
                field: format!("shards[{}].rows", entry.file),
                what: format!("manifest says {} rows, shard has {in_shard}", entry.rows),
            });
        }
        rows += in_shard;
    }
    for o in [
        offsets, prompt_len, source, ids, input_ids, topk_ids, topk_lp, token_lp,
    ] {
        o.finish()?;
    }
    let header = Header {
        cache_version: CACHE_VERSION,
        fingerprint: fingerprint.to_string(),
        endian: endian().to_string(),
        rows,
        tokens: n_in,
        positions: n_pos,
        k: k as u64,
        id_bytes: n_id,
    };
    let mut h = Out::new(dir, HEADER)?;
    let text = serde_json::to_string_pretty(&header).expect("header serializes");
    h.put(text.as_bytes())?;
    h.finish()
}
