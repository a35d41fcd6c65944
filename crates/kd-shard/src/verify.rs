//! Checking a shard directory against its manifest.

use std::collections::BTreeSet;
use std::path::Path;

use serde::Serialize;

use crate::fsutil::{hash_file, safe_join};
use crate::manifest::{MANIFEST_FILE, Manifest, ShardEntry, Totals, read_manifest};
use crate::reader::ShardReader;
use crate::{Error, Result, Source};

/// The class of a [`Problem`], for programs (tests match on it; people read `what`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProblemKind {
    /// The manifest is inconsistent with itself (fingerprint, totals, duplicates, complete).
    Manifest,
    /// A listed shard's path is not a safe relative path.
    InvalidPath,
    /// A listed shard does not exist.
    Missing,
    /// A shard's size differs from the manifest's `bytes`.
    Size,
    /// A shard's sha256 differs from the manifest's.
    Hash,
    /// A shard cannot be opened or decoded (I/O, Parquet, Arrow, nulls).
    Unreadable,
    /// A shard was written by a newer format version.
    UnsupportedVersion,
    /// A shard's columns, types or `kd.*` metadata are wrong, or its k differs from the manifest.
    Schema,
    /// A row fails [`crate::Row::validate`].
    Row,
    /// A shard's rows/tokens/positions differ from its manifest entry.
    Counts,
    /// A `*.parquet` file in the directory is not listed in the manifest.
    Unlisted,
}

/// One thing wrong with a shard directory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// The file concerned, relative to the directory (`manifest.json` for manifest problems).
    pub file: String,
    /// What class of problem.
    pub kind: ProblemKind,
    /// A sentence for people.
    pub what: String,
}

/// The outcome of [`verify_dir`]: what was checked and every problem found.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct VerifyReport {
    /// Listed shards that existed and were checked.
    pub files_checked: usize,
    /// Rows counted: decoded rows in deep mode, footer row counts otherwise.
    pub rows: u64,
    /// Everything found wrong; empty when the directory is sound.
    pub problems: Vec<Problem>,
}

impl VerifyReport {
    /// True when no problem was found.
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }

    /// Problems concerning `file`.
    pub fn problems_for<'a>(&'a self, file: &'a str) -> impl Iterator<Item = &'a Problem> + 'a {
        self.problems.iter().filter(move |p| p.file == file)
    }

    fn push(&mut self, file: &str, kind: ProblemKind, what: impl Into<String>) {
        self.problems.push(Problem {
            file: file.to_string(),
            kind,
            what: what.into(),
        });
    }
}

/// Row problems reported per shard before the rest are summarised.
const MAX_ROW_PROBLEMS: usize = 5;

fn kind_of(e: &Error) -> ProblemKind {
    match e {
        Error::UnsupportedVersion { .. } => ProblemKind::UnsupportedVersion,
        Error::Schema { .. } => ProblemKind::Schema,
        Error::HashMismatch { .. } => ProblemKind::Hash,
        Error::InvalidPath { .. } => ProblemKind::InvalidPath,
        _ => ProblemKind::Unreadable,
    }
}

/// Verifies the shard directory `dir` against its `manifest.json`.
///
/// Always: the manifest parses (else `Err`), its fingerprint and totals are consistent, every
/// listed shard exists with the listed size and sha256, no unlisted `*.parquet` file lies
/// below `dir`, every shard's footer has the schema of its format version (1 or 2), `kd.top_k` equal to the manifest's
/// `top_k`, and the listed row count. With `deep`, every row is also decoded and checked with
/// [`crate::Row::validate`] against the manifest's k and vocabulary, and the shard's tokens,
/// positions and response tokens are compared with its entry.
///
/// Corrupt input never panics and never stops the check: every problem is collected.
pub fn verify_dir(dir: &Path, deep: bool) -> Result<VerifyReport> {
    let manifest = read_manifest(&dir.join(MANIFEST_FILE))?;
    let mut report = VerifyReport::default();
    check_manifest(&manifest, &mut report);
    let mut listed = BTreeSet::new();
    for entry in &manifest.shards {
        if !listed.insert(entry.file.clone()) {
            continue; // reported by check_manifest
        }
        check_shard(dir, &manifest, entry, deep, &mut report);
    }
    let mut found = Vec::new();
    collect_parquet(dir, "", 0, &mut found, &mut report);
    for f in found {
        if !listed.contains(&f) {
            report.push(&f, ProblemKind::Unlisted, "not listed in manifest.json");
        }
    }
    Ok(report)
}

fn check_manifest(m: &Manifest, report: &mut VerifyReport) {
    let fp = m.compute_fingerprint();
    if m.fingerprint != fp {
        report.push(
            MANIFEST_FILE,
            ProblemKind::Manifest,
            format!(
                "fingerprint {} does not match identity ({fp})",
                m.fingerprint
            ),
        );
    }
    let totals = Totals::of(&m.shards);
    if m.totals != totals {
        report.push(
            MANIFEST_FILE,
            ProblemKind::Manifest,
            format!(
                "totals {:?} differ from the sums over shards {totals:?}",
                m.totals
            ),
        );
    }
    if !m.complete {
        report.push(MANIFEST_FILE, ProblemKind::Manifest, "complete is false");
    }
    let mut seen = BTreeSet::new();
    for s in &m.shards {
        if !seen.insert(&s.file) {
            report.push(
                MANIFEST_FILE,
                ProblemKind::Manifest,
                format!("shard {:?} is listed twice", s.file),
            );
        }
    }
}

fn check_shard(
    dir: &Path,
    m: &Manifest,
    entry: &ShardEntry,
    deep: bool,
    report: &mut VerifyReport,
) {
    let name = entry.file.as_str();
    let path = match safe_join(dir, name) {
        Ok(p) => p,
        Err(e) => return report.push(name, ProblemKind::InvalidPath, e.to_string()),
    };
    let md = match std::fs::metadata(&path) {
        Ok(md) => md,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return report.push(
                name,
                ProblemKind::Missing,
                "listed in manifest.json but missing",
            );
        }
        Err(e) => return report.push(name, ProblemKind::Unreadable, e.to_string()),
    };
    if !md.is_file() {
        return report.push(name, ProblemKind::Unreadable, "not a regular file");
    }
    report.files_checked += 1;
    if md.len() != entry.bytes {
        report.push(
            name,
            ProblemKind::Size,
            format!("size {} bytes, manifest says {}", md.len(), entry.bytes),
        );
    }
    match hash_file(&path) {
        Ok(h) if h == entry.sha256 => {}
        Ok(h) => report.push(
            name,
            ProblemKind::Hash,
            format!("sha256 {h}, manifest says {}", entry.sha256),
        ),
        Err(e) => report.push(name, ProblemKind::Unreadable, e.to_string()),
    }
    let reader = match ShardReader::open(&path) {
        Ok(r) => r,
        Err(e) => return report.push(name, kind_of(&e), e.to_string()),
    };
    let meta = reader.meta().clone();
    let k = m.top_k();
    if meta.k != k {
        report.push(
            name,
            ProblemKind::Schema,
            format!("kd.top_k is {}, manifest settings.top_k is {k}", meta.k),
        );
    }
    let n = m.samples();
    if meta.samples != n {
        report.push(
            name,
            ProblemKind::Schema,
            format!(
                "kd.samples is {}, manifest settings.samples is {n}",
                meta.samples
            ),
        );
    }
    if meta.rows != entry.rows {
        report.push(
            name,
            ProblemKind::Counts,
            format!(
                "footer has {} rows, manifest says {}",
                meta.rows, entry.rows
            ),
        );
    }
    if !deep {
        // Footer counts come from the file: saturate rather than overflow.
        report.rows = report.rows.saturating_add(meta.rows);
        return;
    }
    let vocab = m.vocab_size();
    let (mut rows, mut tokens, mut positions, mut response) = (0u64, 0u64, 0u64, 0u64);
    let mut bad_rows = 0usize;
    let mut decoded_all = true;
    for (index, row) in reader.enumerate() {
        let row = match row {
            Ok(r) => r,
            Err(e) => {
                report.push(name, kind_of(&e), e.to_string());
                decoded_all = false;
                break;
            }
        };
        rows += 1;
        tokens += row.input_ids.len() as u64;
        positions += row.n_pos() as u64;
        if row.source == Source::Generated {
            response += row.n_pos() as u64;
        }
        if let Err(what) = row.validate_targets(k, n, vocab) {
            bad_rows += 1;
            if bad_rows <= MAX_ROW_PROBLEMS {
                report.push(
                    name,
                    ProblemKind::Row,
                    format!("row {index} (id {:?}): {what}", row.id),
                );
            }
        }
    }
    if bad_rows > MAX_ROW_PROBLEMS {
        report.push(
            name,
            ProblemKind::Row,
            format!("{} more invalid rows", bad_rows - MAX_ROW_PROBLEMS),
        );
    }
    report.rows = report.rows.saturating_add(rows);
    if decoded_all {
        for (what, got, want) in [
            ("rows", rows, entry.rows),
            ("tokens", tokens, entry.tokens),
            ("positions", positions, entry.positions),
            ("response_tokens", response, entry.response_tokens),
        ] {
            if got != want {
                report.push(
                    name,
                    ProblemKind::Counts,
                    format!("{what}: file has {got}, manifest says {want}"),
                );
            }
        }
    }
}

/// Directory depth below which unlisted shards are searched.
const MAX_DEPTH: usize = 8;

/// Collects `*.parquet` regular files below `dir` as `/`-separated relative paths. Symbolic
/// links are not followed.
fn collect_parquet(
    dir: &Path,
    prefix: &str,
    depth: usize,
    out: &mut Vec<String>,
    report: &mut VerifyReport,
) {
    let here = if prefix.is_empty() {
        dir.to_path_buf()
    } else {
        dir.join(prefix)
    };
    let entries = match std::fs::read_dir(&here) {
        Ok(e) => e,
        Err(e) => {
            let shown = if prefix.is_empty() { "." } else { prefix };
            return report.push(shown, ProblemKind::Unreadable, format!("cannot list: {e}"));
        }
    };
    let mut names: Vec<_> = entries.filter_map(|e| e.ok()).collect();
    names.sort_by_key(|e| e.file_name());
    for e in names {
        let Some(name) = e.file_name().to_str().map(str::to_string) else {
            continue;
        };
        let rel = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}/{name}")
        };
        let Ok(ft) = e.file_type() else { continue };
        if ft.is_dir() && depth < MAX_DEPTH {
            collect_parquet(dir, &rel, depth + 1, out, report);
        } else if ft.is_file() && name.ends_with(".parquet") {
            out.push(rel);
        }
    }
}
