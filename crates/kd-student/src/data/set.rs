//! [`ShardSet`]: a verified shard directory with its decoded, memory-mapped cache.

use std::path::{Component, Path, PathBuf};

use kd_shard::{MANIFEST_FILE, Manifest, Row, Source, Totals, hash_file};
use rayon::prelude::*;
use sha2::{Digest, Sha256};

use super::cache::{CACHE_VERSION, Cache, CacheStatus};
use super::error::{Error, Result};
use super::targets::TargetKind;

/// One cached row, borrowed from the memory maps (no copy).
///
/// Same position convention as [`kd_shard::Row`]: position `j` (0-based) is distilled
/// position `t = prompt_len - 1 + j`, predicts `input_ids[t + 1]` and owns
/// `topk_*[j*k .. (j+1)*k]` and `token_logprob[j]`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RowView<'a> {
    /// Stable id of the prompt or document.
    pub id: &'a str,
    /// Whether the response was generated or scored.
    pub source: Source,
    /// The whole sequence: prompt, then response.
    pub input_ids: &'a [u32],
    /// Leading tokens that are not distilled (at least 1).
    pub prompt_len: u32,
    /// `n_pos * k` teacher top-k ids, position-major.
    pub topk_ids: &'a [u32],
    /// `n_pos * k` teacher log-probabilities at T=1, aligned with `topk_ids`.
    pub topk_logprobs: &'a [f32],
    /// `n_pos` teacher log-probabilities of the token that actually follows.
    pub token_logprob: &'a [f32],
}

impl RowView<'_> {
    /// Number of distilled positions, `input_ids.len() - prompt_len`.
    pub fn n_pos(&self) -> usize {
        self.token_logprob.len()
    }

    /// An owned copy, equal to the row the shard holds.
    pub fn to_row(&self) -> Row {
        Row {
            id: self.id.to_string(),
            source: self.source,
            input_ids: self.input_ids.to_vec(),
            prompt_len: self.prompt_len,
            topk_ids: self.topk_ids.to_vec(),
            topk_logprobs: self.topk_logprobs.to_vec(),
            token_logprob: self.token_logprob.to_vec(),
            sample_ids: Vec::new(),
            sample_logprobs: Vec::new(),
        }
    }
}

/// A committed, verified shard directory whose rows are served from a memory-mapped cache.
///
/// Rows are numbered `0..len()` in manifest shard order, then row order within a shard.
#[derive(Debug)]
pub struct ShardSet {
    dir: PathBuf,
    targets: TargetKind,
    manifest: Manifest,
    fingerprint: String,
    tokenizer_fingerprint: String,
    cache: Cache,
}

fn shard_path(dir: &Path, manifest_path: &Path, i: usize, file: &str) -> Result<PathBuf> {
    let rel = Path::new(file);
    let ok = !file.is_empty()
        && !file.contains('\\')
        && rel.components().all(|c| matches!(c, Component::Normal(_)));
    if !ok {
        return Err(Error::Manifest {
            path: manifest_path.to_path_buf(),
            field: format!("shards[{i}].file"),
            what: format!("{file:?} is not a plain relative path below the directory"),
        });
    }
    Ok(dir.join(rel))
}

impl ShardSet {
    /// Opens the shard directory `dir`.
    ///
    /// Checks, in order: `manifest.json` parses with the v1 shape ([`Error::Shard`]), is
    /// `complete` ([`Error::Incomplete`]), its fingerprint recomputes ([`Error::Fingerprint`])
    /// and its totals add up ([`Error::Manifest`]); every shard has the recorded size
    /// ([`Error::ShardSize`]) and sha256 ([`Error::ShardHash`]), hashed in parallel, the
    /// first failure in manifest order reported. Then maps the cache
    /// `dir/.kd-cache/<fingerprint>/`, decoding the shards into it first when it is missing
    /// (every row checked with [`Row::validate`], [`Error::InvalidRow`]).
    pub fn open(dir: impl AsRef<Path>) -> Result<ShardSet> {
        Self::open_targets(dir, None)
    }

    /// [`ShardSet::open`] serving the targets `kind` ([`TargetKind::default_for`] the
    /// manifest when `None`); [`Error::Manifest`] naming `settings.top_k` or
    /// `settings.samples` when the cache holds no such targets.
    pub fn open_targets(dir: impl AsRef<Path>, kind: Option<TargetKind>) -> Result<ShardSet> {
        let dir = dir.as_ref().to_path_buf();
        let mpath = dir.join(MANIFEST_FILE);
        let manifest = kd_shard::read_manifest(&mpath)?;
        let targets = kind.unwrap_or_else(|| TargetKind::default_for(&manifest));
        let missing = match targets {
            TargetKind::TopK if manifest.top_k() == 0 => Some(("settings.top_k", "top-k")),
            TargetKind::Sampled if manifest.samples() == 0 => Some(("settings.samples", "sampled")),
            _ => None,
        };
        if let Some((field, what)) = missing {
            return Err(Error::Manifest {
                path: mpath,
                field: field.into(),
                what: format!(
                    "the cache holds no {what} targets (dump them with teacher-dump --targets)"
                ),
            });
        }
        if !manifest.complete {
            return Err(Error::Incomplete { path: mpath });
        }
        let computed = manifest.compute_fingerprint();
        if computed != manifest.fingerprint {
            return Err(Error::Fingerprint {
                path: mpath,
                recorded: manifest.fingerprint.clone(),
                computed,
            });
        }
        if Totals::of(&manifest.shards) != manifest.totals {
            return Err(Error::Manifest {
                path: mpath,
                field: "totals".into(),
                what: "do not equal the sum over shards".into(),
            });
        }
        let paths = manifest
            .shards
            .iter()
            .enumerate()
            .map(|(i, s)| shard_path(&dir, &mpath, i, &s.file))
            .collect::<Result<Vec<_>>>()?;
        let checks: Vec<Result<()>> = manifest
            .shards
            .par_iter()
            .zip(paths.par_iter())
            .map(|(s, p)| {
                let actual = std::fs::metadata(p).map_err(|e| Error::io(p, e))?.len();
                if actual != s.bytes {
                    return Err(Error::ShardSize {
                        path: p.clone(),
                        expected: s.bytes,
                        actual,
                    });
                }
                let actual = hash_file(p)?;
                if actual != s.sha256 {
                    return Err(Error::ShardHash {
                        path: p.clone(),
                        expected: s.sha256.clone(),
                        actual,
                    });
                }
                Ok(())
            })
            .collect();
        checks.into_iter().collect::<Result<()>>()?;
        // A shard lying beside the listed ones is a sign of a mixed-up folder.
        let listed: std::collections::HashSet<&Path> = paths.iter().map(|p| p.as_path()).collect();
        let mut unlisted: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map_err(|e| Error::io(&dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.extension().is_some_and(|x| x == "parquet") && !listed.contains(p.as_path())
            })
            .collect();
        unlisted.sort();
        if let Some(path) = unlisted.into_iter().next() {
            return Err(Error::Unlisted { path });
        }
        let tokenizer_fingerprint = manifest
            .tokenizer
            .get("fingerprint")
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_string();
        let fingerprint = data_fingerprint(&manifest, targets);
        let cache = Cache::open_or_build(&dir, &fingerprint, &manifest, &paths, targets)?;
        if cache.rows as u64 != manifest.totals.rows {
            return Err(Error::Cache {
                path: cache.dir.clone(),
                what: format!(
                    "{} rows, manifest says {}",
                    cache.rows, manifest.totals.rows
                ),
            });
        }
        Ok(ShardSet {
            dir,
            targets,
            manifest,
            fingerprint,
            tokenizer_fingerprint,
            cache,
        })
    }

    /// The shard directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The verified manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Target entries per position: `settings.top_k`, or `settings.samples` for
    /// [`TargetKind::Sampled`].
    pub fn k(&self) -> usize {
        self.cache.k
    }

    /// Which targets this set serves.
    pub fn targets(&self) -> TargetKind {
        self.targets
    }

    /// The teacher's vocabulary size (`teacher.vocab_size`).
    pub fn vocab_size(&self) -> u32 {
        self.manifest.vocab_size()
    }

    /// `tokenizer.fingerprint` of the manifest: sets with different values cannot be mixed.
    pub fn tokenizer_fingerprint(&self) -> &str {
        &self.tokenizer_fingerprint
    }

    /// Hex sha256 identifying this data for checkpoints: the manifest fingerprint, every
    /// shard's file name and sha256 in order, and the cache layout version. Equal
    /// fingerprints mean byte-identical shards.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Whether this open decoded the shards or reused a published cache.
    pub fn cache_status(&self) -> CacheStatus {
        self.cache.status
    }

    /// The directory holding the decoded cache.
    pub fn cache_dir(&self) -> &Path {
        &self.cache.dir
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.cache.rows
    }

    /// Whether the set holds no rows.
    pub fn is_empty(&self) -> bool {
        self.cache.rows == 0
    }

    /// Row `i` as slices of the maps. Panics if `i >= len()`.
    #[inline]
    pub fn row(&self, i: usize) -> RowView<'_> {
        let c = &self.cache;
        let o = &c.offsets.as_slice()[3 * i..3 * i + 6];
        let (i0, i1) = (o[0] as usize, o[3] as usize);
        let (p0, p1) = (o[1] as usize, o[4] as usize);
        let (d0, d1) = (o[2] as usize, o[5] as usize);
        let k = c.k;
        RowView {
            // The ids were written from `String`s; a damaged file yields "" rather than a panic.
            id: std::str::from_utf8(&c.ids.as_slice()[d0..d1]).unwrap_or_default(),
            source: if c.source.as_slice()[i] == 0 {
                Source::Generated
            } else {
                Source::Scored
            },
            input_ids: &c.input_ids.as_slice()[i0..i1],
            prompt_len: c.prompt_len.as_slice()[i],
            topk_ids: &c.topk_ids.as_slice()[p0 * k..p1 * k],
            topk_logprobs: &c.topk_logprobs.as_slice()[p0 * k..p1 * k],
            token_logprob: &c.token_logprob.as_slice()[p0..p1],
        }
    }

    /// Sequence length of row `i` without building a view.
    #[inline]
    pub fn row_len(&self, i: usize) -> usize {
        let o = self.cache.offsets.as_slice();
        (o[3 * i + 3] - o[3 * i]) as usize
    }

    /// All rows in order.
    pub fn rows(&self) -> impl ExactSizeIterator<Item = RowView<'_>> + '_ {
        (0..self.len()).map(|i| self.row(i))
    }

    /// Refuses `other` as an evaluation set for this one unless both use the same tokenizer
    /// and vocabulary ([`Error::Mismatch`] naming the field; `teacher` is 1 for `other`).
    pub fn check_compatible(&self, other: &ShardSet) -> Result<()> {
        check_same_tokenizer(self, other, 1)
    }
}

pub(crate) fn check_same_tokenizer(a: &ShardSet, b: &ShardSet, teacher: usize) -> Result<()> {
    let mismatch = |field: &str, what: String| Error::Mismatch {
        teacher,
        id: None,
        field: field.into(),
        what,
    };
    if a.tokenizer_fingerprint() != b.tokenizer_fingerprint() {
        return Err(mismatch(
            "tokenizer.fingerprint",
            format!(
                "{:?} vs {:?}",
                a.tokenizer_fingerprint(),
                b.tokenizer_fingerprint()
            ),
        ));
    }
    if a.vocab_size() != b.vocab_size() {
        return Err(mismatch(
            "teacher.vocab_size",
            format!("{} vs {}", a.vocab_size(), b.vocab_size()),
        ));
    }
    Ok(())
}

fn data_fingerprint(m: &Manifest, targets: TargetKind) -> String {
    let mut h = Sha256::new();
    h.update(format!("kd-student cache v{CACHE_VERSION}\n{}\n", m.fingerprint).as_bytes());
    if targets == TargetKind::Sampled {
        h.update(b"targets sampled\n");
    }
    for s in &m.shards {
        h.update(format!("{}\t{}\n", s.file, s.sha256).as_bytes());
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}
