//! `manifest.json`: identity of a cache, its shards, and the commit point of a dump.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::fsutil::hash_bytes;
use crate::{Error, FORMAT_VERSION, Result};
use kd_fs::write_atomic;

/// The name of the committed manifest in a shard directory.
pub const MANIFEST_FILE: &str = "manifest.json";
/// The progress record rewritten during a dump; `manifest.json` is written last and is the
/// commit point.
pub const PARTIAL_MANIFEST_FILE: &str = "manifest.partial.json";
/// The value of [`Manifest::format`].
pub const FORMAT_NAME: &str = "kd-shard";

/// One shard as listed in the manifest.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ShardEntry {
    /// Path relative to the manifest's directory, `/`-separated, without `..`.
    pub file: String,
    /// Rows (sequences).
    pub rows: u64,
    /// Sum of `input_ids` lengths.
    pub tokens: u64,
    /// Sum of distilled positions, `len - prompt_len` per row.
    pub positions: u64,
    /// Positions of rows whose source is `generated`: the tokens the teacher wrote.
    pub response_tokens: u64,
    /// File size in bytes.
    pub bytes: u64,
    /// Hex sha256 of the whole file.
    pub sha256: String,
}

/// Sums over all shards of a manifest.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub rows: u64,
    pub tokens: u64,
    pub positions: u64,
    pub response_tokens: u64,
    pub bytes: u64,
}

impl Totals {
    /// The sums over `shards`.
    pub fn of(shards: &[ShardEntry]) -> Totals {
        let mut t = Totals::default();
        for s in shards {
            t.add(s);
        }
        t
    }

    /// Adds one shard's counts, saturating at `u64::MAX`: the entries come from a file, and a
    /// manifest whose counts do not fit in 64 bits is caught by verification (its shards
    /// cannot match them), not by an overflow panic.
    pub fn add(&mut self, s: &ShardEntry) {
        self.rows = self.rows.saturating_add(s.rows);
        self.tokens = self.tokens.saturating_add(s.tokens);
        self.positions = self.positions.saturating_add(s.positions);
        self.response_tokens = self.response_tokens.saturating_add(s.response_tokens);
        self.bytes = self.bytes.saturating_add(s.bytes);
    }
}

/// Which slice of a `--part index/count` job a manifest covers.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct PartInfo {
    /// 0-based slice index, `< count`.
    pub index: u32,
    /// Number of slices of the job.
    pub count: u32,
}

/// The content of `manifest.json`.
///
/// Identity is `(format_version, teacher, tokenizer, input, settings)`; its hash is
/// [`Manifest::fingerprint`], which decides whether a resume may continue and whether parts
/// may be merged.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Manifest {
    /// Always [`FORMAT_NAME`].
    pub format: String,
    /// The format version the cache was written in.
    pub format_version: u32,
    /// Name and version of the writing program, e.g. `"teacher-dump 0.1.0"`.
    pub producer: String,
    /// Where the teacher ran (`cpu`, `cuda:0`); not part of the identity. Absent in caches
    /// written before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// Teacher identity (architecture, vocab_size, weights_sha256, ...); must hold `vocab_size`.
    pub teacher: Value,
    /// Tokenizer identity; must hold `fingerprint` and `vocab_size`.
    pub tokenizer: Value,
    /// Input identity: `path`, `sha256`, `rows`.
    pub input: Value,
    /// Every dump setting; must hold `top_k`.
    pub settings: Value,
    /// The slice of a `--part` job, `None` for a whole job.
    pub part: Option<PartInfo>,
    /// [`Manifest::compute_fingerprint`] at the time of writing.
    pub fingerprint: String,
    /// True once every shard of the job (or part) is listed.
    pub complete: bool,
    /// Shards in order.
    pub shards: Vec<ShardEntry>,
    /// Sums over `shards`.
    pub totals: Totals,
    /// The cache this one was derived from by `shard-cat derive` (its path, fingerprint,
    /// format, top-k and rows); not part of the identity. Absent in dumps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub derived_from: Option<Value>,
}

/// Appends the canonical JSON of `v`: object keys sorted by their UTF-8 bytes, no whitespace,
/// serde_json's number and string formatting. Independent of serde_json's map ordering.
pub fn canonical_json(v: &Value, out: &mut String) {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                canonical_json(&m[k], out);
            }
            out.push('}');
        }
        Value::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical_json(x, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// Short JSON rendering of a value for messages; `<absent>` for a missing one.
fn show(v: Option<&Value>) -> String {
    match v {
        None => "<absent>".to_string(),
        Some(v) => {
            let mut s = String::new();
            canonical_json(v, &mut s);
            if s.len() > 80 {
                let cut = (0..=77).rev().find(|i| s.is_char_boundary(*i)).unwrap_or(0);
                s.truncate(cut);
                s.push_str("...");
            }
            s
        }
    }
}

/// First difference between `a` and `b` below `path`: `(field path, "a vs b")`.
fn diff_value(path: &str, a: Option<&Value>, b: Option<&Value>) -> Option<(String, String)> {
    match (a, b) {
        (Some(Value::Object(ma)), Some(Value::Object(mb))) => {
            let keys: BTreeSet<&String> = ma.keys().chain(mb.keys()).collect();
            keys.into_iter().find_map(|k| {
                diff_value(
                    &format!("{path}.{k}"),
                    ma.get(k.as_str()),
                    mb.get(k.as_str()),
                )
            })
        }
        (Some(Value::Array(xa)), Some(Value::Array(xb))) => (0..xa.len().max(xb.len()))
            .find_map(|i| diff_value(&format!("{path}[{i}]"), xa.get(i), xb.get(i))),
        (a, b) if a == b => None,
        (a, b) => Some((path.to_string(), format!("{} vs {}", show(a), show(b)))),
    }
}

impl Manifest {
    /// A new, incomplete manifest without shards, with its fingerprint computed.
    pub fn new(
        producer: impl Into<String>,
        teacher: Value,
        tokenizer: Value,
        input: Value,
        settings: Value,
        part: Option<PartInfo>,
    ) -> Manifest {
        let mut m = Manifest {
            format: FORMAT_NAME.to_string(),
            format_version: crate::DEFAULT_FORMAT_VERSION,
            producer: producer.into(),
            teacher,
            tokenizer,
            input,
            settings,
            part,
            device: None,
            derived_from: None,
            fingerprint: String::new(),
            complete: false,
            shards: Vec::new(),
            totals: Totals::default(),
        };
        m.fingerprint = m.compute_fingerprint();
        m
    }

    /// The canonical JSON of the identity `{format_version, teacher, tokenizer, input, settings}`.
    pub fn identity_json(&self) -> String {
        let v = serde_json::json!({
            "format_version": self.format_version,
            "teacher": self.teacher,
            "tokenizer": self.tokenizer,
            "input": self.input,
            "settings": self.settings,
        });
        let mut s = String::new();
        canonical_json(&v, &mut s);
        s
    }

    /// Hex sha256 of [`Manifest::identity_json`]; independent of key order and whitespace.
    pub fn compute_fingerprint(&self) -> String {
        hash_bytes(self.identity_json().as_bytes())
    }

    fn diff_identity_field(&self, other: &Manifest) -> Option<(String, String)> {
        if self.format_version != other.format_version {
            return Some((
                "format_version".to_string(),
                format!("{} vs {}", self.format_version, other.format_version),
            ));
        }
        [
            ("teacher", &self.teacher, &other.teacher),
            ("tokenizer", &self.tokenizer, &other.tokenizer),
            ("input", &self.input, &other.input),
            ("settings", &self.settings, &other.settings),
        ]
        .into_iter()
        .find_map(|(name, a, b)| diff_value(name, Some(a), Some(b)))
    }

    /// The first differing identity field, as `"settings.top_k: 32 vs 20"` (self's value
    /// first), or `None` when format_version, teacher, tokenizer, input and settings are
    /// equal. Object keys are visited in sorted order. `part` is not identity: callers that
    /// resume a part compare it themselves.
    pub fn diff_identity(&self, other: &Manifest) -> Option<String> {
        self.diff_identity_field(other)
            .map(|(field, what)| format!("{field}: {what}"))
    }

    /// Like [`Manifest::diff_identity`] but as [`Error::Identity`], for `?`.
    pub fn check_same_identity(&self, other: &Manifest) -> Result<()> {
        match self.diff_identity_field(other) {
            None => Ok(()),
            Some((field, what)) => Err(Error::Identity { field, what }),
        }
    }

    /// `settings.top_k`; 0 if absent (which [`Manifest::check_fields`] rejects).
    pub fn top_k(&self) -> usize {
        self.settings
            .get("top_k")
            .and_then(Value::as_u64)
            .and_then(|k| usize::try_from(k).ok())
            .unwrap_or(0)
    }

    /// `settings.samples`: sampled targets per position; 0 if absent (a top-k cache).
    pub fn samples(&self) -> usize {
        self.settings
            .get("samples")
            .and_then(Value::as_u64)
            .and_then(|k| usize::try_from(k).ok())
            .unwrap_or(0)
    }

    /// `teacher.vocab_size`; 0 if absent (which [`Manifest::check_fields`] rejects).
    pub fn vocab_size(&self) -> u32 {
        self.teacher
            .get("vocab_size")
            .and_then(Value::as_u64)
            .and_then(|v| u32::try_from(v).ok())
            .unwrap_or(0)
    }

    /// Appends a shard and updates the totals.
    pub fn push_shard(&mut self, entry: ShardEntry) {
        self.totals.add(&entry);
        self.shards.push(entry);
    }

    /// Recomputes `totals` from `shards`.
    pub fn recompute_totals(&mut self) {
        self.totals = Totals::of(&self.shards);
    }

    /// Checks the fields this format requires beyond JSON shape: `format`, the required
    /// identity keys with positive integer / string values, and a valid `part`.
    /// Returns the first problem.
    pub fn check_fields(&self) -> std::result::Result<(), String> {
        if self.format != FORMAT_NAME {
            return Err(format!(
                "format is {:?}, expected {FORMAT_NAME:?}",
                self.format
            ));
        }
        if self.format_version == 0 {
            return Err("format_version must be at least 1".to_string());
        }
        let pos_int = |v: &Value, obj: &str, key: &str| -> std::result::Result<(), String> {
            match v.get(key).and_then(Value::as_u64) {
                Some(n) if n > 0 && n <= u64::from(u32::MAX) => Ok(()),
                _ => Err(format!("{obj}.{key} must be a positive integer")),
            }
        };
        for (name, v) in [
            ("teacher", &self.teacher),
            ("tokenizer", &self.tokenizer),
            ("input", &self.input),
            ("settings", &self.settings),
        ] {
            if !v.is_object() {
                return Err(format!("{name} must be an object"));
            }
        }
        pos_int(&self.teacher, "teacher", "vocab_size")?;
        pos_int(&self.tokenizer, "tokenizer", "vocab_size")?;
        let non_neg = |key: &str| match self.settings.get(key) {
            None => Ok(0),
            Some(v) => match v.as_u64() {
                Some(n) if n <= u64::from(u32::MAX) => Ok(n),
                _ => Err(format!("settings.{key} must be a non-negative integer")),
            },
        };
        if self.settings.get("top_k").is_none() {
            return Err("settings.top_k must be a positive integer".to_string());
        }
        let (k, n) = (non_neg("top_k")?, non_neg("samples")?);
        if k == 0 && n == 0 {
            return Err(
                "settings.top_k must be a positive integer (or settings.samples positive)"
                    .to_string(),
            );
        }
        if n > 0 && self.format_version < 2 {
            return Err(format!(
                "settings.samples is {n} but format {} cannot hold sampled targets",
                self.format_version
            ));
        }
        if !self
            .tokenizer
            .get("fingerprint")
            .is_some_and(Value::is_string)
        {
            return Err("tokenizer.fingerprint must be a string".to_string());
        }
        if let Some(p) = self.part
            && (p.count == 0 || p.index >= p.count)
        {
            return Err(format!("part {}/{} is out of range", p.index, p.count));
        }
        Ok(())
    }
}

/// Writes `m` as pretty JSON to `path` atomically (temporary file, fsync, rename, directory
/// fsync): readers see the old manifest or the new one, never a mix. Refuses a manifest
/// failing [`Manifest::check_fields`] with [`Error::Schema`].
pub fn write_manifest_atomic(path: &Path, m: &Manifest) -> Result<()> {
    m.check_fields().map_err(|what| Error::schema(path, what))?;
    let mut text = serde_json::to_string_pretty(m).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })?;
    text.push('\n');
    write_atomic(path, |mut w| {
        w.write_all(text.as_bytes())
            .map_err(|e| Error::io(path, e))?;
        Ok((w, ()))
    })
}

/// Reads and checks a manifest. Refuses `format != "kd-shard"` ([`Error::Schema`]) and a
/// `format_version` above [`FORMAT_VERSION`] ([`Error::UnsupportedVersion`], checked before
/// the rest of the shape so newer manifests are named as such); JSON errors
/// ([`Error::Json`]) carry the line and column.
pub fn read_manifest(path: &Path) -> Result<Manifest> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let json_err = |source| Error::Json {
        path: path.to_path_buf(),
        source,
    };
    let v: Value = serde_json::from_str(&text).map_err(json_err)?;
    if v.get("format").and_then(Value::as_str) != Some(FORMAT_NAME) {
        return Err(Error::schema(
            path,
            format!(
                "format is {}, expected {FORMAT_NAME:?}",
                show(v.get("format"))
            ),
        ));
    }
    let found = v
        .get("format_version")
        .and_then(Value::as_u64)
        .ok_or_else(|| Error::schema(path, "format_version is missing or not an integer"))?;
    if found > u64::from(FORMAT_VERSION) {
        return Err(Error::UnsupportedVersion {
            path: path.to_path_buf(),
            found: u32::try_from(found).unwrap_or(u32::MAX),
            supported: FORMAT_VERSION,
        });
    }
    let m: Manifest = serde_json::from_str(&text).map_err(json_err)?;
    m.check_fields().map_err(|what| Error::schema(path, what))?;
    Ok(m)
}

/// Merges the manifests of a `--part i/N` job into one whole-job manifest.
///
/// All parts must share identity ([`Error::Identity`] names the first differing field) and
/// cover `0..N` exactly once ([`Error::PartCoverage`]); no shard file may be listed twice.
/// The result has `part: None`, shards concatenated in part order (their `file` fields must
/// already be relative to the merged manifest's directory), recomputed totals and
/// fingerprint, the first part's producer, and is complete only if every part is.
pub fn merge_manifests(parts: &[Manifest]) -> Result<Manifest> {
    let cov = |what: String| Error::PartCoverage { what };
    let first = parts
        .first()
        .ok_or_else(|| cov("no parts to merge".to_string()))?;
    let count = first
        .part
        .ok_or_else(|| {
            cov("part 0 of the list has no part info (not a --part manifest)".to_string())
        })?
        .count;
    let mut by_index: BTreeMap<u32, &Manifest> = BTreeMap::new();
    for (i, m) in parts.iter().enumerate() {
        let p = m
            .part
            .ok_or_else(|| cov(format!("manifest {i} of the list has no part info")))?;
        if p.count != count {
            return Err(cov(format!(
                "manifest {i} is part {}/{}, others are of {count}",
                p.index, p.count
            )));
        }
        if p.index >= count {
            return Err(cov(format!(
                "part index {} is not below count {count}",
                p.index
            )));
        }
        first.check_same_identity(m)?;
        if by_index.insert(p.index, m).is_some() {
            return Err(cov(format!("part {}/{count} appears twice", p.index)));
        }
    }
    let missing: Vec<u32> = (0..count).filter(|i| !by_index.contains_key(i)).collect();
    if !missing.is_empty() {
        return Err(cov(format!("parts {missing:?} of {count} are missing")));
    }
    let mut merged = Manifest::new(
        first.producer.clone(),
        first.teacher.clone(),
        first.tokenizer.clone(),
        first.input.clone(),
        first.settings.clone(),
        None,
    );
    merged.format_version = first.format_version;
    // The parts' device when they agree; parts run on different devices record none.
    merged.device = first.device.clone().filter(|d| {
        by_index
            .values()
            .all(|m| m.device.as_deref() == Some(d.as_str()))
    });
    let mut seen = BTreeSet::new();
    for m in by_index.values() {
        for s in &m.shards {
            if !seen.insert(s.file.clone()) {
                return Err(cov(format!(
                    "shard file {:?} is listed by more than one part",
                    s.file
                )));
            }
            merged.push_shard(s.clone());
        }
    }
    merged.complete = by_index.values().all(|m| m.complete);
    merged.fingerprint = merged.compute_fingerprint();
    Ok(merged)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    pub(crate) fn sample(part: Option<PartInfo>) -> Manifest {
        Manifest::new(
            "teacher-dump 0.1.0",
            json!({"architecture": "llama", "vocab_size": 300, "weights_sha256": "ab"}),
            json!({"fingerprint": "cd", "vocab_size": 300}),
            json!({"path": "data/in.jsonl", "sha256": "ef", "rows": 10}),
            json!({"top_k": 4, "temperature": 1.0, "seed": 7, "chat_template": true}),
            part,
        )
    }

    fn entry(file: &str, rows: u64) -> ShardEntry {
        ShardEntry {
            file: file.to_string(),
            rows,
            tokens: rows * 10,
            positions: rows * 6,
            response_tokens: rows * 6,
            bytes: 1000 + rows,
            sha256: "00".repeat(32),
        }
    }

    #[test]
    fn fingerprint_ignores_key_order_and_non_identity_fields() {
        let a = sample(None);
        let mut b = sample(None);
        b.settings = json!({"chat_template": true, "seed": 7, "temperature": 1.0, "top_k": 4});
        b.producer = "other 9".into();
        b.push_shard(entry("x.parquet", 3));
        assert_eq!(a.compute_fingerprint(), b.compute_fingerprint());
        assert_eq!(a.fingerprint, a.compute_fingerprint());
        assert_eq!(a.fingerprint.len(), 64);
        b.settings["seed"] = json!(8);
        assert_ne!(a.compute_fingerprint(), b.compute_fingerprint());
    }

    #[test]
    fn canonical_json_sorts_nested_keys() {
        let mut s = String::new();
        canonical_json(
            &json!({"b": [1, {"z": null, "a": "x\"y"}], "a": 1.5}),
            &mut s,
        );
        assert_eq!(s, r#"{"a":1.5,"b":[1,{"a":"x\"y","z":null}]}"#);
    }

    #[test]
    fn diff_identity_names_the_field() {
        let a = sample(None);
        assert_eq!(a.diff_identity(&sample(None)), None);
        let mut b = sample(None);
        b.settings["top_k"] = json!(20);
        assert_eq!(a.diff_identity(&b).unwrap(), "settings.top_k: 4 vs 20");
        let mut b = sample(None);
        b.teacher.as_object_mut().unwrap().remove("weights_sha256");
        assert_eq!(
            a.diff_identity(&b).unwrap(),
            "teacher.weights_sha256: \"ab\" vs <absent>"
        );
        let mut b = sample(None);
        b.input["rows"] = json!(11);
        b.settings["top_k"] = json!(20);
        // Fields are visited teacher, tokenizer, input, settings: input comes first.
        assert!(
            a.diff_identity(&b)
                .unwrap()
                .starts_with("input.rows: 10 vs 11")
        );
        let mut b = sample(None);
        b.settings["stop"] = json!(["a", "b"]);
        let mut c = b.clone();
        c.settings["stop"] = json!(["a", "c"]);
        assert_eq!(
            b.diff_identity(&c).unwrap(),
            "settings.stop[1]: \"b\" vs \"c\""
        );
        assert!(matches!(
            b.check_same_identity(&c),
            Err(Error::Identity { field, .. }) if field == "settings.stop[1]"
        ));
        // part is not identity.
        assert_eq!(
            sample(Some(PartInfo { index: 0, count: 2 }))
                .diff_identity(&sample(Some(PartInfo { index: 1, count: 2 }))),
            None
        );
    }

    #[test]
    fn accessors_read_settings() {
        let m = sample(None);
        assert_eq!(m.top_k(), 4);
        assert_eq!(m.vocab_size(), 300);
        m.check_fields().unwrap();
        let mut bad = m.clone();
        bad.settings.as_object_mut().unwrap().remove("top_k");
        assert_eq!(bad.top_k(), 0);
        assert!(bad.check_fields().is_err());
        let mut bad = m.clone();
        bad.tokenizer.as_object_mut().unwrap().remove("fingerprint");
        assert!(bad.check_fields().is_err());
        let mut bad = m;
        bad.part = Some(PartInfo { index: 2, count: 2 });
        assert!(bad.check_fields().is_err());
    }

    #[test]
    fn manifest_round_trips_through_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join(MANIFEST_FILE);
        let mut m = sample(Some(PartInfo { index: 1, count: 3 }));
        m.push_shard(entry("part-1/shard-00000.parquet", 5));
        m.complete = true;
        write_manifest_atomic(&p, &m).unwrap();
        assert_eq!(read_manifest(&p).unwrap(), m);
        let names: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from(MANIFEST_FILE)]);
    }

    #[test]
    fn read_manifest_refuses_newer_version() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join(MANIFEST_FILE);
        let mut v = serde_json::to_value(sample(None)).unwrap();
        v["format_version"] = json!(FORMAT_VERSION + 1);
        // A newer manifest may have a different shape: the version is checked first.
        v.as_object_mut().unwrap().remove("shards");
        std::fs::write(&p, v.to_string()).unwrap();
        match read_manifest(&p) {
            Err(Error::UnsupportedVersion {
                path,
                found,
                supported,
            }) => {
                assert_eq!(path, p);
                assert_eq!((found, supported), (FORMAT_VERSION + 1, FORMAT_VERSION));
            }
            other => panic!("expected UnsupportedVersion, got {other:?}"),
        }
    }

    #[test]
    fn read_manifest_errors_are_typed() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join(MANIFEST_FILE);
        assert!(matches!(read_manifest(&p), Err(Error::Io { .. })));
        std::fs::write(&p, "{\n  \"format\": \"kd-shard\",\n  oops\n}").unwrap();
        match read_manifest(&p) {
            Err(e @ Error::Json { .. }) => {
                let Error::Json { source, .. } = &e else {
                    unreachable!()
                };
                assert_eq!(source.line(), 3);
            }
            other => panic!("expected Json, got {other:?}"),
        }
        let mut v = serde_json::to_value(sample(None)).unwrap();
        v["format"] = json!("other");
        std::fs::write(&p, v.to_string()).unwrap();
        assert!(matches!(read_manifest(&p), Err(Error::Schema { .. })));
        let mut v = serde_json::to_value(sample(None)).unwrap();
        v.as_object_mut().unwrap().remove("totals");
        std::fs::write(&p, v.to_string()).unwrap();
        assert!(matches!(read_manifest(&p), Err(Error::Json { .. })));
    }

    fn part(i: u32, n: u32, files: &[&str]) -> Manifest {
        let mut m = sample(Some(PartInfo { index: i, count: n }));
        for f in files {
            m.push_shard(entry(f, 2));
        }
        m.complete = true;
        m
    }

    #[test]
    fn merge_concatenates_in_part_order() {
        let p0 = part(0, 3, &["p0/a.parquet", "p0/b.parquet"]);
        let p1 = part(1, 3, &["p1/a.parquet"]);
        let p2 = part(2, 3, &[]);
        let m = merge_manifests(&[p2.clone(), p0.clone(), p1.clone()]).unwrap();
        let files: Vec<_> = m.shards.iter().map(|s| s.file.as_str()).collect();
        assert_eq!(files, ["p0/a.parquet", "p0/b.parquet", "p1/a.parquet"]);
        assert_eq!(m.part, None);
        assert!(m.complete);
        assert_eq!(m.totals, Totals::of(&m.shards));
        assert_eq!(m.totals.rows, 6);
        assert_eq!(m.fingerprint, m.compute_fingerprint());
        assert_eq!(m.fingerprint, p0.fingerprint);
        let mut p1i = p1.clone();
        p1i.complete = false;
        assert!(
            !merge_manifests(&[p0.clone(), p1i, p2.clone()])
                .unwrap()
                .complete
        );
    }

    #[test]
    fn merge_checks_coverage_and_identity() {
        let p0 = part(0, 3, &["a.parquet"]);
        let p1 = part(1, 3, &["b.parquet"]);
        let p2 = part(2, 3, &["c.parquet"]);
        let cov = |r: Result<Manifest>| matches!(r, Err(Error::PartCoverage { .. }));
        assert!(cov(merge_manifests(&[])));
        assert!(
            cov(merge_manifests(&[p0.clone(), p1.clone()])),
            "missing part 2"
        );
        assert!(cov(merge_manifests(&[
            p0.clone(),
            p1.clone(),
            p1.clone(),
            p2.clone()
        ])));
        assert!(cov(merge_manifests(&[
            p0.clone(),
            part(1, 4, &[]),
            p2.clone()
        ])));
        assert!(cov(merge_manifests(&[
            p0.clone(),
            sample(None),
            p2.clone()
        ])));
        let dup = part(2, 3, &["a.parquet"]);
        assert!(cov(merge_manifests(&[p0.clone(), p1.clone(), dup])));
        let mut other = p1.clone();
        other.settings["top_k"] = json!(8);
        match merge_manifests(&[p0, other, p2]) {
            Err(Error::Identity { field, what }) => {
                assert_eq!(field, "settings.top_k");
                assert_eq!(what, "4 vs 8");
            }
            r => panic!("expected Identity, got {r:?}"),
        }
    }
}
