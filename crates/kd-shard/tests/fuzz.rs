//! Bounded fuzzing of everything that reads a cache directory: a valid shard and manifest
//! written by the test, then mutated (bytes flipped, truncated, overwritten, huge integers
//! spliced in; for the manifest also JSON-level edits: wrong types, huge and negative
//! numbers, missing fields, `..` paths, absurd counts), go through `read_shard`,
//! `read_shard_meta`, `ShardReader`, `read_manifest`, `verify_dir` and `stats_dir`.
//!
//! Promise checked: no panic in this crate (a panic inside parquet-rs is turned into
//! `Error::Corrupt` by the reader; any other panic fails the test), no hang, every error
//! names its file, and verification reports a problem for every change to a shard's bytes
//! and every change to a manifest's content other than `producer` and `part`.
//!
//! Each property runs 64 cases; `PROPTEST_CASES=20000 cargo test -p kd-shard --test fuzz`
//! runs a long session.

#![cfg(unix)]

use std::cell::Cell;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use kd_shard::synth::TINY_VOCAB;
use kd_shard::{
    Error, MANIFEST_FILE, Manifest, ShardReader, read_manifest, read_shard, read_shard_meta,
    stats_dir, verify_dir, write_manifest_atomic,
};
use proptest::prelude::*;
use proptest::test_runner::Config;
use serde_json::{Value, json};

const K: usize = 3;
const SHARD: &str = "s.parquet";
/// Rows a mutated shard may decode before the test calls it a hang (the valid one has 8).
const MAX_ROWS: usize = 1_000_000;

/// 64 cases per property unless `PROPTEST_CASES` says otherwise.
fn config() -> Config {
    let mut c = Config::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        c.cases = 64;
    }
    c.failure_persistence = None;
    c
}

thread_local! {
    /// Panics on this thread outside third-party crates (which the reader must not catch).
    static OWN_PANICS: Cell<usize> = const { Cell::new(0) };
}

/// Silences panics raised inside dependencies (parquet-rs panics on some corrupt pages; the
/// reader turns them into `Error::Corrupt`) and counts every other panic on its thread.
fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if info
                .location()
                .is_some_and(|l| l.file().contains("/.cargo/registry/"))
            {
                return;
            }
            OWN_PANICS.with(|c| c.set(c.get() + 1));
            prev(info)
        }));
    });
}

fn huge() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(u64::MAX),
        Just(1 << 63),
        Just(1 << 40),
        Just(1 << 32),
        Just(u64::from(u32::MAX)),
        Just(i64::MAX as u64),
        Just(0),
        any::<u64>(),
    ]
}

/// One edit of a valid file; `hot` places it in the hot range (a shard's footer), positions
/// are taken modulo the range.
#[derive(Clone, Debug)]
enum Mutation {
    Flip {
        hot: bool,
        at: usize,
        mask: u8,
    },
    Truncate {
        hot: bool,
        at: usize,
    },
    Overwrite {
        hot: bool,
        at: usize,
        bytes: Vec<u8>,
    },
    Splice {
        hot: bool,
        at: usize,
        value: u64,
        width: usize,
    },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let hot = prop::bool::weighted(0.7);
    prop_oneof![
        4 => (hot, any::<usize>(), 1..=255u8)
            .prop_map(|(hot, at, mask)| Mutation::Flip { hot, at, mask }),
        1 => (hot, any::<usize>()).prop_map(|(hot, at)| Mutation::Truncate { hot, at }),
        2 => (hot, any::<usize>(), prop::collection::vec(any::<u8>(), 1..32))
            .prop_map(|(hot, at, bytes)| Mutation::Overwrite { hot, at, bytes }),
        3 => (hot, any::<usize>(), huge(), prop::sample::select(vec![1usize, 2, 4, 8]))
            .prop_map(|(hot, at, value, width)| Mutation::Splice { hot, at, value, width }),
    ]
}

/// Applies `muts` to `good`; `hot` is the byte range hot edits land in.
fn apply(good: &[u8], hot: std::ops::Range<usize>, muts: &[Mutation]) -> Vec<u8> {
    let mut v = good.to_vec();
    for m in muts {
        if v.is_empty() {
            break;
        }
        let len = v.len();
        let pos = |h: bool, at: usize| {
            let (start, end) = (hot.start.min(len - 1), hot.end.min(len));
            if h && end > start {
                start + at % (end - start)
            } else {
                at % len
            }
        };
        match m {
            Mutation::Flip { hot, at, mask } => v[pos(*hot, *at)] ^= mask,
            Mutation::Truncate { hot, at } => v.truncate(pos(*hot, *at)),
            Mutation::Overwrite { hot, at, bytes } => {
                let i = pos(*hot, *at);
                let n = bytes.len().min(len - i);
                v[i..i + n].copy_from_slice(&bytes[..n]);
            }
            Mutation::Splice {
                hot,
                at,
                value,
                width,
            } => {
                let i = pos(*hot, *at);
                let n = (*width).min(len - i);
                v[i..i + n].copy_from_slice(&value.to_le_bytes()[..n]);
            }
        }
    }
    v
}

/// A verified cache directory: one shard of 8 rows and its manifest.
struct Cache {
    dir: tempfile::TempDir,
    shard: Vec<u8>,
    manifest: Vec<u8>,
    good: Manifest,
}

impl Cache {
    fn new() -> Cache {
        Cache::of_version(kd_shard::DEFAULT_FORMAT_VERSION)
    }

    /// A cache whose shard is written in format `version`; a format-2 shard also holds 3
    /// sampled targets per position, so the fuzzing covers those columns too.
    fn of_version(version: u32) -> Cache {
        let dir = tempfile::tempdir().unwrap();
        let n = if version >= 2 { 3 } else { 0 };
        let entry = kd_shard::write_shard_with(
            dir.path(),
            SHARD,
            K,
            &kd_shard::synth::tiny_rows_with_samples(8, K, n),
            &kd_shard::WriteOptions::for_version_with_samples(version, n),
        )
        .unwrap();
        let mut m = Manifest::new(
            "kd-shard-fuzz 0",
            json!({"architecture": "toy", "vocab_size": TINY_VOCAB, "weights_sha256": "00"}),
            json!({"fingerprint": "toy-tok", "vocab_size": TINY_VOCAB}),
            json!({"path": "in.jsonl", "sha256": "11", "rows": 8}),
            json!({"top_k": K, "samples": n, "temperature": 1.0, "seed": 0}),
            None,
        );
        m.format_version = version;
        m.fingerprint = m.compute_fingerprint();
        m.push_shard(entry);
        m.complete = true;
        let mp = dir.path().join(MANIFEST_FILE);
        write_manifest_atomic(&mp, &m).unwrap();
        let r = verify_dir(dir.path(), true).unwrap();
        assert!(r.is_ok(), "{:?}", r.problems);
        Cache {
            shard: std::fs::read(dir.path().join(SHARD)).unwrap(),
            manifest: std::fs::read(&mp).unwrap(),
            good: read_manifest(&mp).unwrap(),
            dir,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The shard's Parquet footer (metadata, length, magic): where edits matter most.
    fn footer(&self) -> std::ops::Range<usize> {
        let n = self.shard.len();
        let meta_len = u32::from_le_bytes(self.shard[n - 8..n - 4].try_into().unwrap()) as usize;
        n - 8 - meta_len..n
    }
}

/// Replaces the content of `path` in place (no truncate-to-zero or rename: on ext4 those
/// flush on close, which turns seconds into minutes). No map of the file may be alive.
fn overwrite(path: &Path, bytes: &[u8]) {
    let f = File::options().write(true).open(path).unwrap();
    f.set_len(bytes.len() as u64).unwrap();
    f.write_all_at(bytes, 0).unwrap();
}

/// `Err` must name `path`.
fn names<T>(path: &Path, r: &Result<T, Error>) -> Result<(), TestCaseError> {
    if let Err(e) = r {
        let msg = e.to_string();
        prop_assert!(
            msg.contains(&path.display().to_string()),
            "error does not name {}: {msg}",
            path.display()
        );
    }
    Ok(())
}

#[derive(Clone, Debug)]
enum ShardInput {
    Mutated(Vec<Mutation>),
    Random(Vec<u8>),
    /// Random bytes between Parquet magics, to get past the first check.
    RandomBetweenMagic(Vec<u8>),
}

fn shard_input() -> impl Strategy<Value = ShardInput> {
    prop_oneof![
        8 => prop::collection::vec(mutation(), 1..6).prop_map(ShardInput::Mutated),
        1 => prop::collection::vec(any::<u8>(), 0..2048).prop_map(ShardInput::Random),
        1 => prop::collection::vec(any::<u8>(), 0..512).prop_map(ShardInput::RandomBetweenMagic),
    ]
}

/// The shard caches of format 1 and format 2: every mutation runs against one of them.
fn shard_cache(v2: bool) -> &'static std::sync::Mutex<Cache> {
    static C: [std::sync::OnceLock<std::sync::Mutex<Cache>>; 2] =
        [std::sync::OnceLock::new(), std::sync::OnceLock::new()];
    C[v2 as usize].get_or_init(|| std::sync::Mutex::new(Cache::of_version(1 + v2 as u32)))
}

proptest! {
    #![proptest_config(config())]

    /// A mutated shard: every reader returns (rows or an error naming the shard), and both
    /// verification depths report a problem unless the bytes are unchanged.
    #[test]
    fn mutated_shard_is_an_error_or_a_problem(input in shard_input(), v2 in any::<bool>()) {
        install_panic_hook();
        let c = shard_cache(v2).lock().unwrap_or_else(|e| e.into_inner());
        let p = c.path(SHARD);
        let bytes = match &input {
            ShardInput::Mutated(m) => apply(&c.shard, c.footer(), m),
            ShardInput::Random(b) => b.clone(),
            ShardInput::RandomBetweenMagic(b) => [&b"PAR1"[..], b, b"PAR1"].concat(),
        };
        overwrite(&p, &bytes);
        let own = OWN_PANICS.with(Cell::get);

        names(&p, &read_shard(&p))?;
        names(&p, &read_shard_meta(&p))?;
        let opened = ShardReader::open(&p);
        names(&p, &opened)?;
        if let Ok(reader) = opened {
            let mut n = 0;
            for row in reader {
                names(&p, &row)?;
                n += 1;
                prop_assert!(n <= MAX_ROWS, "more than {MAX_ROWS} rows: a hang?");
            }
        }
        for deep in [false, true] {
            let r = verify_dir(c.dir.path(), deep).unwrap();
            if bytes != c.shard {
                prop_assert!(!r.is_ok(), "deep={deep}: a changed shard passed verification");
                prop_assert!(r.problems.iter().all(|pr| pr.file == SHARD), "{:?}", r.problems);
            } else {
                prop_assert!(r.is_ok(), "{:?}", r.problems);
            }
        }
        names(c.dir.path(), &stats_dir(c.dir.path()))?;
        prop_assert_eq!(OWN_PANICS.with(Cell::get), own, "a panic in kd-shard was caught");
        overwrite(&p, &c.shard);
    }
}

/// A JSON-level edit of `manifest.json`.
#[derive(Clone, Debug)]
enum JsonEdit {
    /// Sets the field at a JSON pointer (its parent must exist).
    Set(&'static str, Value),
    /// Removes the field at a JSON pointer.
    Remove(&'static str),
    /// Lists the shard `copies` times with `rows` rows each (duplicates, absurd totals).
    RepeatShard { copies: usize, rows: u64 },
}

const POINTERS: &[&str] = &[
    "/format",
    "/format_version",
    "/producer",
    "/teacher",
    "/teacher/vocab_size",
    "/tokenizer/vocab_size",
    "/tokenizer/fingerprint",
    "/input/rows",
    "/settings/top_k",
    "/part",
    "/fingerprint",
    "/complete",
    "/shards",
    "/shards/0",
    "/shards/0/file",
    "/shards/0/rows",
    "/shards/0/tokens",
    "/shards/0/positions",
    "/shards/0/response_tokens",
    "/shards/0/bytes",
    "/shards/0/sha256",
    "/totals",
    "/totals/rows",
    "/totals/bytes",
];

/// JSON nested `depth` arrays deep, beyond serde_json's recursion limit of 128.
fn nested(depth: usize) -> Value {
    (0..depth).fold(json!(0), |v, _| json!([v]))
}

fn json_value() -> impl Strategy<Value = Value> {
    let paths = prop::sample::select(vec![
        "..",
        "../s.parquet",
        "/etc/passwd",
        "a/../../s.parquet",
        "",
        "./s.parquet",
        "sub/",
        "a\\b",
        "manifest.json",
        "s.parquet",
        "missing.parquet",
    ]);
    prop_oneof![
        huge().prop_map(|n| json!(n)),
        any::<i64>().prop_map(|n| json!(n)),
        Just(json!(-1)),
        Just(json!(1e300)),
        Just(json!(-0.5)),
        Just(json!(1.8446744073709552e19)),
        paths.prop_map(|s| json!(s)),
        Just(json!(null)),
        Just(json!(true)),
        Just(json!([])),
        Just(json!({})),
        Just(json!({"index": 3, "count": 2})),
        Just(json!({"index": 0, "count": 0})),
        Just(nested(200)),
    ]
}

fn json_edit() -> impl Strategy<Value = JsonEdit> {
    let ptr = prop::sample::select(POINTERS.to_vec());
    prop_oneof![
        6 => (ptr.clone(), json_value()).prop_map(|(p, v)| JsonEdit::Set(p, v)),
        2 => ptr.prop_map(JsonEdit::Remove),
        1 => (0..2000usize, huge()).prop_map(|(copies, rows)| JsonEdit::RepeatShard { copies, rows }),
    ]
}

fn edit_json(v: &mut Value, e: &JsonEdit) {
    let split = |p: &str| {
        let i = p.rfind('/').unwrap();
        (p[..i].to_string(), p[i + 1..].to_string())
    };
    match e {
        JsonEdit::Set(p, x) => {
            let (parent, key) = split(p);
            match v.pointer_mut(&parent) {
                Some(Value::Object(o)) => {
                    o.insert(key, x.clone());
                }
                Some(Value::Array(a)) => {
                    if let Some(slot) = key.parse::<usize>().ok().and_then(|i| a.get_mut(i)) {
                        *slot = x.clone();
                    }
                }
                _ => {}
            }
        }
        JsonEdit::Remove(p) => {
            let (parent, key) = split(p);
            if let Some(Value::Object(o)) = v.pointer_mut(&parent) {
                o.remove(&key);
            }
        }
        JsonEdit::RepeatShard { copies, rows } => {
            let mut s = match v.pointer("/shards/0") {
                Some(s @ Value::Object(_)) => s.clone(),
                _ => json!({}),
            };
            s["rows"] = json!(rows);
            v["shards"] = Value::Array(vec![s; *copies]);
        }
    }
}

#[derive(Clone, Debug)]
enum ManifestInput {
    Bytes(Vec<Mutation>),
    Json(Vec<JsonEdit>),
    Random(Vec<u8>),
}

fn manifest_input() -> impl Strategy<Value = ManifestInput> {
    prop_oneof![
        4 => prop::collection::vec(mutation(), 1..4).prop_map(ManifestInput::Bytes),
        5 => prop::collection::vec(json_edit(), 1..4).prop_map(ManifestInput::Json),
        1 => prop::collection::vec(any::<u8>(), 0..512).prop_map(ManifestInput::Random),
    ]
}

fn manifest_cache() -> &'static std::sync::Mutex<Cache> {
    static C: std::sync::OnceLock<std::sync::Mutex<Cache>> = std::sync::OnceLock::new();
    C.get_or_init(|| std::sync::Mutex::new(Cache::new()))
}

proptest! {
    #![proptest_config(config())]

    /// A mutated manifest: `read_manifest`, `verify_dir` and `stats_dir` return (errors name
    /// the file), and verification reports a problem whenever the manifest parses to
    /// something other than the original (`producer` and `part` aside: they are not checked
    /// against anything).
    #[test]
    fn mutated_manifest_is_an_error_or_a_problem(input in manifest_input()) {
        install_panic_hook();
        let c = manifest_cache().lock().unwrap_or_else(|e| e.into_inner());
        let p = c.path(MANIFEST_FILE);
        let bytes = match &input {
            ManifestInput::Bytes(m) => apply(&c.manifest, 0..c.manifest.len(), m),
            ManifestInput::Json(edits) => {
                let mut v: Value = serde_json::from_slice(&c.manifest).unwrap();
                for e in edits {
                    edit_json(&mut v, e);
                }
                serde_json::to_vec_pretty(&v).unwrap()
            }
            ManifestInput::Random(b) => b.clone(),
        };
        overwrite(&p, &bytes);
        let own = OWN_PANICS.with(Cell::get);

        let read = read_manifest(&p);
        names(&p, &read)?;
        for deep in [false, true] {
            let r = verify_dir(c.dir.path(), deep);
            names(&p, &r)?;
            prop_assert_eq!(r.is_ok(), read.is_ok());
            if let (Ok(m), Ok(report)) = (&read, &r) {
                let same = Manifest {
                    producer: c.good.producer.clone(),
                    part: c.good.part,
                    ..m.clone()
                } == c.good;
                prop_assert_eq!(
                    report.is_ok(),
                    same,
                    "deep={}: changed={} but problems={:?}",
                    deep,
                    !same,
                    report.problems
                );
            }
        }
        names(c.dir.path(), &stats_dir(c.dir.path()))?;
        prop_assert_eq!(OWN_PANICS.with(Cell::get), own, "a panic in kd-shard was caught");
        overwrite(&p, &c.manifest);
    }
}

/// Regression: `Totals::add` summed manifest counts with `+=`, so two shard entries of
/// 2^63 rows (or bytes) overflowed and `verify_dir` / `stats_dir` panicked.
#[test]
fn overflowing_manifest_counts_are_problems_not_panics() {
    let c = Cache::new();
    let mut v: Value = serde_json::from_slice(&c.manifest).unwrap();
    edit_json(
        &mut v,
        &JsonEdit::RepeatShard {
            copies: 3,
            rows: 1 << 63,
        },
    );
    v["shards"][1]["bytes"] = json!(u64::MAX);
    let p = c.path(MANIFEST_FILE);
    overwrite(&p, &serde_json::to_vec(&v).unwrap());
    for deep in [false, true] {
        let r = verify_dir(c.dir.path(), deep).unwrap();
        assert!(!r.is_ok());
    }
    let _ = stats_dir(c.dir.path());
}

/// A manifest nested deeper than serde_json's recursion limit is a JSON error naming the file.
#[test]
fn deeply_nested_manifest_is_a_json_error() {
    let c = Cache::new();
    let p = c.path(MANIFEST_FILE);
    let deep = format!(
        "{{\"format\":\"kd-shard\",\"teacher\":{}0{}}}",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    overwrite(&p, deep.as_bytes());
    match read_manifest(&p) {
        Err(e @ Error::Json { .. }) => assert!(e.to_string().contains(&p.display().to_string())),
        other => panic!("expected Error::Json, got {other:?}"),
    }
}

/// Regression: an absolute shard path in the manifest gave `InvalidPath` for
/// `dir.join("/etc/passwd")`, which is `/etc/passwd`: `stats_dir`'s error did not name the
/// cache directory (found by `mutated_manifest_is_an_error_or_a_problem`).
#[test]
fn absolute_shard_path_error_names_the_cache() {
    let c = Cache::new();
    let mut v: Value = serde_json::from_slice(&c.manifest).unwrap();
    v["shards"][0]["file"] = json!("/etc/passwd");
    overwrite(&c.path(MANIFEST_FILE), &serde_json::to_vec(&v).unwrap());
    match stats_dir(c.dir.path()) {
        Err(e @ Error::InvalidPath { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains(&c.dir.path().display().to_string()), "{msg}");
            assert!(msg.contains("\"/etc/passwd\""), "{msg}");
        }
        other => panic!("expected InvalidPath, got {other:?}"),
    }
    let r = verify_dir(c.dir.path(), false).unwrap();
    assert!(
        r.problems_for("/etc/passwd").count() > 0,
        "{:?}",
        r.problems
    );
}
