//! Cross-module tests: write, read, verify, stats, corruption.

use std::path::{Path, PathBuf};

use serde_json::json;

use crate::synth::{TINY_VOCAB, tiny_rows};
use crate::*;

const K: usize = 4;

/// What a reader of a shard of format `version` with `k` entries per position gets back.
fn stored(rows: &[Row], k: usize, version: u32) -> Vec<Row> {
    if version >= 2 {
        rows.iter().map(|r| r.as_stored_v2(k)).collect()
    } else {
        rows.to_vec()
    }
}

fn manifest_for(entries: Vec<ShardEntry>) -> Manifest {
    let mut m = Manifest::new(
        "kd-shard-tests 0",
        json!({"architecture": "toy", "vocab_size": TINY_VOCAB, "weights_sha256": "00"}),
        json!({"fingerprint": "toy-tok", "vocab_size": TINY_VOCAB}),
        json!({"path": "in.jsonl", "sha256": "11", "rows": 30}),
        json!({"top_k": K, "temperature": 1.0, "seed": 0}),
        None,
    );
    for e in entries {
        m.push_shard(e);
    }
    m.complete = true;
    m
}

/// A verified directory with two shards (one in a subdirectory) and a manifest.
fn cache_dir() -> (tempfile::TempDir, Manifest) {
    let d = tempfile::tempdir().unwrap();
    let rows = tiny_rows(30, K);
    let a = write_shard(d.path(), "shard-00000.parquet", K, &rows[..18]).unwrap();
    let b = write_shard(d.path(), "sub/shard-00001.parquet", K, &rows[18..]).unwrap();
    let m = manifest_for(vec![a, b]);
    write_manifest_atomic(&d.path().join(MANIFEST_FILE), &m).unwrap();
    (d, m)
}

fn kinds(r: &VerifyReport, file: &str) -> Vec<ProblemKind> {
    r.problems_for(file).map(|p| p.kind).collect()
}

fn list_dir(p: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(p)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

#[test]
fn round_trip() {
    let d = tempfile::tempdir().unwrap();
    let rows = tiny_rows(25, K);
    let e = write_shard(d.path(), "a/b/shard.parquet", K, &rows).unwrap();
    let path = d.path().join("a/b/shard.parquet");
    assert_eq!(
        read_shard(&path).unwrap(),
        stored(&rows, K, DEFAULT_FORMAT_VERSION)
    );
    // Format 2: every decoded log-prob within 1/1024 nats of the written one (the next
    // token's never above it), and each position's tail mass the written one's.
    write_shard_with(d.path(), "v2.parquet", K, &rows, &WriteOptions::v2()).unwrap();
    let v2 = read_shard(&d.path().join("v2.parquet")).unwrap();
    assert_eq!(v2, stored(&rows, K, 2));
    let tail = |lps: &[f32]| 1.0 - lps.iter().map(|&l| f64::from(l).exp()).sum::<f64>();
    for (a, b) in v2.iter().zip(&rows) {
        for (x, y) in a.topk_logprobs.iter().zip(&b.topk_logprobs) {
            assert!((x - y).abs() <= 1.0 / 1024.0 + 1e-6, "{x} vs {y}");
        }
        for (x, y) in a.token_logprob.iter().zip(&b.token_logprob) {
            assert!((x - y).abs() <= 1.0 / 1024.0 + 1e-6, "{x} vs {y}");
        }
        for (x, y) in a.topk_logprobs.chunks(K).zip(b.topk_logprobs.chunks(K)) {
            let (tx, ty) = (tail(x), tail(y));
            assert!((tx - ty).abs() <= 1e-6 + 1e-5 * ty, "tail {tx} vs {ty}");
        }
    }
    assert_eq!(e.file, "a/b/shard.parquet");
    assert_eq!(e.rows, 25);
    assert_eq!(
        e.tokens,
        rows.iter().map(|r| r.input_ids.len() as u64).sum::<u64>()
    );
    assert_eq!(
        e.positions,
        rows.iter().map(|r| r.n_pos() as u64).sum::<u64>()
    );
    assert_eq!(
        e.response_tokens,
        rows.iter()
            .filter(|r| r.source == Source::Generated)
            .map(|r| r.n_pos() as u64)
            .sum::<u64>()
    );
    assert_eq!(e.bytes, std::fs::metadata(&path).unwrap().len());
    assert_eq!(e.sha256, hash_file(&path).unwrap());
    let meta = read_shard_meta(&path).unwrap();
    assert_eq!(meta.k, K);
    assert_eq!(meta.rows, 25);
    assert_eq!(meta.format_version, DEFAULT_FORMAT_VERSION);
    assert_eq!(meta.created_by.as_deref(), Some(created_by().as_str()));
}

#[test]
fn round_trip_many_row_groups_and_options() {
    let d = tempfile::tempdir().unwrap();
    let rows = tiny_rows(40, 3);
    for (i, (enc, version)) in [
        (ValueEncoding::Dictionary, 1),
        (ValueEncoding::Plain, 1),
        (ValueEncoding::ByteStreamSplit, 1),
        (ValueEncoding::Dictionary, 2),
        (ValueEncoding::Plain, 2),
        (ValueEncoding::ByteStreamSplit, 2),
        (ValueEncoding::DeltaBinaryPacked, 2),
    ]
    .into_iter()
    .enumerate()
    {
        let opts = WriteOptions {
            format_version: version,
            row_group_rows: 7,
            zstd_level: 1,
            light_zstd_level: 1,
            float_encoding: enc,
            topk_id_encoding: if enc == ValueEncoding::Dictionary {
                ValueEncoding::DeltaBinaryPacked
            } else {
                enc
            },
            input_id_encoding: enc,
            samples: 0,
        };
        let name = format!("s{i}.parquet");
        write_shard_with(d.path(), &name, 3, &rows, &opts).unwrap();
        let path = d.path().join(&name);
        assert_eq!(read_shard_meta(&path).unwrap().row_groups, 6);
        assert_eq!(
            read_shard(&path).unwrap(),
            stored(&rows, 3, version),
            "{enc:?} v{version}"
        );
    }
}

#[test]
fn empty_shard_round_trips() {
    let d = tempfile::tempdir().unwrap();
    let e = write_shard(d.path(), "empty.parquet", K, &[]).unwrap();
    assert_eq!((e.rows, e.positions), (0, 0));
    assert!(
        read_shard(&d.path().join("empty.parquet"))
            .unwrap()
            .is_empty()
    );
}

#[test]
fn realistic_rows_round_trip() {
    let cfg = synth::RealisticConfig {
        vocab: 5000,
        k: 16,
        rows: 3,
        prompt_len: 7,
        positions_per_row: 40,
        seed: 3,
    };
    let rows = synth::realistic_rows(&cfg);
    let d = tempfile::tempdir().unwrap();
    write_shard(d.path(), "r.parquet", 16, &rows).unwrap();
    assert_eq!(
        read_shard(&d.path().join("r.parquet")).unwrap(),
        stored(&rows, 16, DEFAULT_FORMAT_VERSION)
    );
}

#[test]
fn writing_is_deterministic() {
    let rows = tiny_rows(30, K);
    let d1 = tempfile::tempdir().unwrap();
    let d2 = tempfile::tempdir().unwrap();
    let e1 = write_shard(d1.path(), "s.parquet", K, &rows).unwrap();
    let e2 = write_shard(d2.path(), "s.parquet", K, &rows).unwrap();
    assert_eq!(e1, e2);
    let b1 = std::fs::read(d1.path().join("s.parquet")).unwrap();
    let b2 = std::fs::read(d2.path().join("s.parquet")).unwrap();
    assert!(b1 == b2, "same rows gave different bytes");
    // Rewriting in place (a resumed dump redoing a shard) gives the same file too.
    let e3 = write_shard(d1.path(), "s.parquet", K, &rows).unwrap();
    assert_eq!(e1, e3);
}

#[test]
fn atomic_publish_leaves_no_tmp_file() {
    let d = tempfile::tempdir().unwrap();
    write_shard(d.path(), "s.parquet", K, &tiny_rows(5, K)).unwrap();
    assert_eq!(list_dir(d.path()), ["s.parquet"]);
    assert!(!kd_fs::tmp_path(&d.path().join("s.parquet")).exists());
    // A rejected row publishes nothing and leaves nothing behind.
    let mut rows = tiny_rows(5, K);
    let bad = rows.iter().position(|r| r.n_pos() > 0).unwrap();
    rows[bad].topk_logprobs[0] = f32::NAN;
    match write_shard(d.path(), "t.parquet", K, &rows) {
        Err(Error::InvalidRow { index, path, .. }) => {
            assert_eq!(index, bad);
            assert_eq!(path, d.path().join("t.parquet"));
        }
        r => panic!("expected InvalidRow, got {r:?}"),
    }
    assert_eq!(list_dir(d.path()), ["s.parquet"]);
    assert!(matches!(
        write_shard(d.path(), "../escape.parquet", K, &tiny_rows(1, K)),
        Err(Error::InvalidPath { .. })
    ));
}

#[test]
fn shard_is_self_describing() {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let d = tempfile::tempdir().unwrap();
    write_shard_with(
        d.path(),
        "s.parquet",
        K,
        &tiny_rows(3, K),
        &WriteOptions::v2(),
    )
    .unwrap();
    let r = SerializedFileReader::new(std::fs::File::open(d.path().join("s.parquet")).unwrap())
        .unwrap();
    let kv = r.metadata().file_metadata().key_value_metadata().unwrap();
    let get = |k: &str| kv.iter().find(|e| e.key == k).and_then(|e| e.value.clone());
    assert_eq!(get(META_FORMAT_VERSION).as_deref(), Some("2"));
    assert_eq!(get(META_TOP_K).as_deref(), Some("4"));
    assert_eq!(get(META_LOGPROB_SCALE).as_deref(), Some("1024"));
    assert_eq!(get(META_TAIL_SCALE).as_deref(), Some("1048576"));
}

#[test]
fn verify_accepts_good_dir_and_stats_add_up() {
    let (d, m) = cache_dir();
    for deep in [false, true] {
        let r = verify_dir(d.path(), deep).unwrap();
        assert!(r.is_ok(), "{:?}", r.problems);
        assert_eq!(r.files_checked, 2);
        assert_eq!(r.rows, 30);
    }
    let s = stats_dir(d.path()).unwrap();
    assert_eq!(s.files, 2);
    assert_eq!(s.rows, m.totals.rows);
    assert_eq!(s.tokens, m.totals.tokens);
    assert_eq!(s.positions, m.totals.positions);
    assert_eq!(s.response_tokens, m.totals.response_tokens);
    assert_eq!(s.bytes, m.totals.bytes);
    // Where the bytes go: every column of the format, and the rest of the files, summing to
    // the files' bytes.
    assert_eq!(s.bytes_by_column.values().sum::<u64>(), s.bytes);
    for col in crate::schema::columns_of(m.format_version).iter().take(7) {
        assert!(s.bytes_by_column[*col] > 0, "{col}");
    }
    assert!(s.bytes_by_column[FILE_OVERHEAD] > 0);
    assert_eq!(s.k, K);
    assert!(
        (s.bytes_per_position - m.totals.bytes as f64 / m.totals.positions as f64).abs() < 1e-9
    );
    assert!(s.mean_tail_mass > 0.0 && s.mean_tail_mass < 1.0);
    assert!(s.mean_top1_prob > 0.0 && s.mean_top1_prob <= 1.0);
    assert!(s.mean_token_logprob < 0.0);
    let by: u64 = s.by_source.values().map(|x| x.positions).sum();
    assert_eq!(by, s.positions);
    assert_eq!(s.by_source["generated"].positions, s.response_tokens);
    // Reference: the means recomputed directly from the rows as stored (f64, tolerance 1e-9).
    let rows = stored(&tiny_rows(30, K), K, DEFAULT_FORMAT_VERSION);
    let n: usize = rows.iter().map(Row::n_pos).sum();
    let top1: f64 = rows
        .iter()
        .flat_map(|r| r.topk_logprobs.chunks(K).map(|c| f64::from(c[0]).exp()))
        .sum::<f64>()
        / n as f64;
    assert!((s.mean_top1_prob - top1).abs() < 1e-9);
}

#[test]
fn flipped_byte_is_reported_for_that_shard() {
    let (d, m) = cache_dir();
    let p = d.path().join(&m.shards[1].file);
    let mut bytes = std::fs::read(&p).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&p, bytes).unwrap();
    let r = verify_dir(d.path(), true).unwrap();
    assert!(kinds(&r, &m.shards[1].file).contains(&ProblemKind::Hash));
    assert!(kinds(&r, &m.shards[0].file).is_empty());
    assert!(r.problems.iter().all(|p| p.file == m.shards[1].file));
}

#[test]
fn truncated_shard_is_a_typed_error_naming_the_file() {
    let (d, m) = cache_dir();
    let p = d.path().join(&m.shards[0].file);
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 100]).unwrap();
    match read_shard(&p) {
        Err(Error::Parquet { path, .. }) => assert_eq!(path, p),
        r => panic!("expected Parquet error, got {r:?}"),
    }
    let r = verify_dir(d.path(), false).unwrap();
    let k = kinds(&r, &m.shards[0].file);
    assert!(k.contains(&ProblemKind::Size), "{k:?}");
    assert!(k.contains(&ProblemKind::Hash), "{k:?}");
    assert!(k.contains(&ProblemKind::Unreadable), "{k:?}");
    std::fs::write(&p, b"").unwrap();
    assert!(matches!(read_shard(&p), Err(Error::Parquet { .. })));
}

#[test]
fn missing_and_unlisted_shards_are_reported() {
    let (d, m) = cache_dir();
    std::fs::remove_file(d.path().join(&m.shards[1].file)).unwrap();
    std::fs::write(d.path().join("stray.parquet"), b"x").unwrap();
    std::fs::copy(
        d.path().join(&m.shards[0].file),
        d.path().join("sub/extra.parquet"),
    )
    .unwrap();
    let r = verify_dir(d.path(), true).unwrap();
    assert_eq!(kinds(&r, &m.shards[1].file), [ProblemKind::Missing]);
    assert_eq!(kinds(&r, "stray.parquet"), [ProblemKind::Unlisted]);
    assert_eq!(kinds(&r, "sub/extra.parquet"), [ProblemKind::Unlisted]);
    assert!(kinds(&r, &m.shards[0].file).is_empty());
    assert_eq!(r.files_checked, 1);
    // A missing shard is an I/O error naming it for readers and stats.
    match stats_dir(d.path()) {
        Err(Error::Io { path, .. }) => assert_eq!(path, d.path().join(&m.shards[1].file)),
        r => panic!("expected Io, got {r:?}"),
    }
}

#[test]
fn newer_manifest_version_is_refused() {
    let (d, m) = cache_dir();
    let mp = d.path().join(MANIFEST_FILE);
    let mut v = serde_json::to_value(&m).unwrap();
    v["format_version"] = json!(FORMAT_VERSION + 1);
    std::fs::write(&mp, serde_json::to_string_pretty(&v).unwrap()).unwrap();
    match verify_dir(d.path(), true) {
        Err(Error::UnsupportedVersion {
            path,
            found,
            supported: FORMAT_VERSION,
        }) => assert_eq!((path, found), (mp.clone(), FORMAT_VERSION + 1)),
        r => panic!("expected UnsupportedVersion, got {r:?}"),
    }
    assert!(matches!(
        stats_dir(d.path()),
        Err(Error::UnsupportedVersion { .. })
    ));
}

/// Writes a Parquet file with the canonical schema but chosen `kd.*` metadata.
fn write_raw(path: &Path, schema: arrow::datatypes::SchemaRef, kv: &[(&str, &str)]) {
    use parquet::arrow::ArrowWriter;
    use parquet::file::metadata::KeyValue;
    use parquet::file::properties::WriterProperties;
    let props = WriterProperties::builder()
        .set_key_value_metadata(Some(
            kv.iter()
                .map(|(k, v)| KeyValue::new(k.to_string(), v.to_string()))
                .collect(),
        ))
        .build();
    let f = std::fs::File::create(path).unwrap();
    let mut w = ArrowWriter::try_new(f, schema.clone(), Some(props)).unwrap();
    w.write(&arrow::array::RecordBatch::new_empty(schema))
        .unwrap();
    w.close().unwrap();
}

#[test]
fn shard_metadata_and_schema_are_checked() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("v3.parquet");
    write_raw(
        &p,
        arrow_schema_v2(),
        &[(META_FORMAT_VERSION, "3"), (META_TOP_K, "4")],
    );
    match read_shard(&p) {
        Err(Error::UnsupportedVersion {
            path,
            found: 3,
            supported: 2,
        }) => assert_eq!(path, p),
        r => panic!("expected UnsupportedVersion, got {r:?}"),
    }
    // A v2 shard needs its log-prob scale, a positive integer, and the v2 columns.
    let v2 = |scale: Option<&'static str>| {
        let mut kv = vec![
            (META_FORMAT_VERSION, "2"),
            (META_TOP_K, "4"),
            (META_TAIL_SCALE, "1048576"),
            (META_SAMPLES, "0"),
        ];
        kv.extend(scale.map(|s| (META_LOGPROB_SCALE, s)));
        kv
    };
    for (schema, scale, ok) in [
        (arrow_schema_v2(), None, false),
        (arrow_schema_v2(), Some("0"), false),
        (arrow_schema(), Some("1024"), false),
        (arrow_schema_v2(), Some("1024"), true),
    ] {
        write_raw(&p, schema, &v2(scale));
        match read_shard(&p) {
            Ok(rows) => assert!(ok && rows.is_empty(), "{scale:?}"),
            Err(e) => assert!(!ok && matches!(e, Error::Schema { .. }), "{scale:?}: {e:?}"),
        }
    }
    write_raw(&p, arrow_schema(), &[(META_FORMAT_VERSION, "1")]);
    assert!(matches!(read_shard(&p), Err(Error::Schema { .. })));
    write_raw(
        &p,
        arrow_schema(),
        &[(META_FORMAT_VERSION, "1"), (META_TOP_K, "x")],
    );
    assert!(matches!(read_shard(&p), Err(Error::Schema { .. })));
    let fewer = arrow::datatypes::Schema::new(arrow_schema().fields()[..6].to_vec());
    write_raw(
        &p,
        std::sync::Arc::new(fewer),
        &[(META_FORMAT_VERSION, "1"), (META_TOP_K, "4")],
    );
    match read_shard(&p) {
        Err(Error::Schema { path, .. }) => assert_eq!(path, p),
        r => panic!("expected Schema, got {r:?}"),
    }
    write_raw(
        &p,
        arrow_schema(),
        &[(META_FORMAT_VERSION, "1"), (META_TOP_K, "4")],
    );
    assert!(read_shard(&p).unwrap().is_empty());
}

#[test]
fn deep_verify_checks_rows_k_and_counts() {
    let (d, mut m) = cache_dir();
    // A smaller vocabulary makes rows invalid (ids out of range): found only in deep mode.
    m.teacher["vocab_size"] = json!(50);
    m.shards[0].tokens += 1;
    m.recompute_totals();
    m.fingerprint = m.compute_fingerprint();
    write_manifest_atomic(&d.path().join(MANIFEST_FILE), &m).unwrap();
    assert!(verify_dir(d.path(), false).unwrap().is_ok());
    let r = verify_dir(d.path(), true).unwrap();
    let k0 = kinds(&r, &m.shards[0].file);
    assert!(k0.contains(&ProblemKind::Row), "{k0:?}");
    assert!(k0.contains(&ProblemKind::Counts), "{k0:?}");
    // Row problems are capped per shard.
    assert!(k0.iter().filter(|k| **k == ProblemKind::Row).count() <= 6);
    // k differs from the manifest; the fingerprint and totals are stale.
    m.settings["top_k"] = json!(5);
    m.totals.rows += 1;
    write_manifest_atomic(&d.path().join(MANIFEST_FILE), &m).unwrap();
    let r = verify_dir(d.path(), false).unwrap();
    assert!(kinds(&r, &m.shards[1].file).contains(&ProblemKind::Schema));
    assert_eq!(
        kinds(&r, MANIFEST_FILE),
        [ProblemKind::Manifest, ProblemKind::Manifest]
    );
}

#[test]
fn merged_part_directories_verify() {
    let d = tempfile::tempdir().unwrap();
    let rows = tiny_rows(12, K);
    let mut parts = Vec::new();
    for i in 0..3u32 {
        let mut m = manifest_for(vec![]);
        m.part = Some(PartInfo { index: i, count: 3 });
        let file = format!("part-{i}/shard-00000.parquet");
        let chunk = &rows[i as usize * 4..(i as usize + 1) * 4];
        m.push_shard(write_shard(d.path(), &file, K, chunk).unwrap());
        parts.push(m);
    }
    parts.reverse();
    let merged = merge_manifests(&parts).unwrap();
    write_manifest_atomic(&d.path().join(MANIFEST_FILE), &merged).unwrap();
    let r = verify_dir(d.path(), true).unwrap();
    assert!(r.is_ok(), "{:?}", r.problems);
    assert_eq!(r.rows, 12);
    let mut all = Vec::new();
    for s in &merged.shards {
        all.extend(read_shard(&d.path().join(&s.file)).unwrap());
    }
    assert_eq!(all, stored(&rows, K, DEFAULT_FORMAT_VERSION));
}

/// Silences the default panic message for panics raised inside the parquet crate, which the
/// reader turns into `Error::Corrupt`; every other panic is still printed.
fn quiet_parquet_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if info
                .location()
                .is_some_and(|l| l.file().contains("parquet-"))
            {
                return;
            }
            prev(info)
        }));
    });
}

/// Regression guard for "corrupt input must not panic": truncations at many lengths and
/// single-byte flips across the whole file go through `read_shard` and `verify_dir`, which
/// must return (errors or problems), never panic.
#[cfg(unix)]
#[test]
fn corrupt_shards_never_panic() {
    quiet_parquet_panics();
    let d = tempfile::tempdir().unwrap();
    let rows = tiny_rows(6, 3);
    let entry = write_shard(d.path(), "s.parquet", 3, &rows).unwrap();
    let p = d.path().join("s.parquet");
    let good = std::fs::read(&p).unwrap();
    let mut m = manifest_for(vec![entry]);
    m.settings["top_k"] = json!(3);
    m.fingerprint = m.compute_fingerprint();
    write_manifest_atomic(&d.path().join(MANIFEST_FILE), &m).unwrap();
    // Corrupt the file in place (pwrite / set_len): rewriting it from scratch thousands of
    // times makes ext4 flush on every close and turns seconds into minutes.
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    let caught = std::cell::Cell::new(0usize);
    let check = |what: &str| -> bool {
        let read = read_shard(&p);
        // Informational only: how often the parquet crate panicked and the reader recovered.
        if matches!(&read, Err(Error::Corrupt { what, .. }) if what.contains("panicked")) {
            caught.set(caught.get() + 1);
        }
        let read_ok = read.is_ok();
        let r = verify_dir(d.path(), true).unwrap();
        assert!(!r.is_ok() || what.is_empty(), "{what}: passed verification");
        read_ok
    };
    assert!(check(""));
    let mut lens: Vec<usize> = (0..good.len()).step_by(3).collect();
    lens.extend(good.len().saturating_sub(40)..good.len());
    lens.sort_unstable();
    lens.dedup();
    for &len in lens.iter().rev() {
        f.set_len(len as u64).unwrap();
        assert!(
            !check(&format!("truncation to {len}")),
            "truncation to {len} bytes read fine"
        );
    }
    std::os::unix::fs::FileExt::write_all_at(&f, &good, 0).unwrap();
    assert!(check(""));
    let mut decoded_despite_flip = 0;
    for i in 0..good.len() {
        for mask in [0x01u8, 0x80, 0xff] {
            std::os::unix::fs::FileExt::write_all_at(&f, &[good[i] ^ mask], i as u64).unwrap();
            if check(&format!("flip {mask:#04x} at {i}")) {
                decoded_despite_flip += 1;
            }
        }
        std::os::unix::fs::FileExt::write_all_at(&f, &good[i..i + 1], i as u64).unwrap();
    }
    // Some flips (e.g. in float payloads or statistics) still decode; the hash catches them.
    eprintln!(
        "{} of {} single-byte flips still decoded; all failed verification; \
         {} parquet panics turned into Error::Corrupt",
        decoded_despite_flip,
        good.len() * 3,
        caught.get()
    );
}

fn python_with_pyarrow() -> Option<PathBuf> {
    let py = std::env::var_os("PYTHON").map_or_else(|| PathBuf::from("python3"), PathBuf::from);
    let ok = std::process::Command::new(&py)
        .args(["-c", "import pyarrow.parquet"])
        .output()
        .is_ok_and(|o| o.status.success());
    ok.then_some(py)
}

/// Interop: pyarrow reads a shard with the expected types, metadata and values.
/// python3 with pyarrow, or `None` after printing that `test` is skipped; fails instead when
/// `KD_REQUIRE_PYARROW=1`.
fn pyarrow_or_skip(test: &str) -> Option<PathBuf> {
    let py = python_with_pyarrow();
    if py.is_none() {
        assert!(
            std::env::var_os("KD_REQUIRE_PYARROW").is_none(),
            "KD_REQUIRE_PYARROW is set but python3 with pyarrow is not available"
        );
        eprintln!("SKIPPED {test}: python3 with pyarrow not found (pip install pyarrow)");
    }
    py
}

/// Runs `script` with the shard path as its argument; its stdout parsed as JSON.
fn run_python(py: &Path, script: &str, path: &Path) -> serde_json::Value {
    let out = std::process::Command::new(py)
        .args(["-c", script])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pyarrow failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Skips (with a message) when python3 or pyarrow is missing, unless
/// `KD_REQUIRE_PYARROW=1`, where it fails.
#[test]
fn pyarrow_reads_shard() {
    let Some(py) = pyarrow_or_skip("pyarrow_reads_shard") else {
        return;
    };
    let d = tempfile::tempdir().unwrap();
    let rows = tiny_rows(9, K);
    write_shard_with(d.path(), "s.parquet", K, &rows, &WriteOptions::v1()).unwrap();
    let script = r#"
import json, sys
import pyarrow.parquet as pq
t = pq.read_table(sys.argv[1])
def kd(meta):
    return {k.decode(): v.decode() for k, v in (meta or {}).items() if k.decode().startswith("kd.")}
md = kd(t.schema.metadata)
assert md == kd(pq.read_metadata(sys.argv[1]).metadata), "file and Arrow metadata differ"
print(json.dumps({
    "rows": t.num_rows,
    "columns": t.column_names,
    "types": [str(f.type) for f in t.schema],
    "nullable": [f.nullable for f in t.schema],
    "meta": md,
    "id": t.column("id")[8].as_py(),
    "source": t.column("source")[8].as_py(),
    "input_ids": t.column("input_ids")[8].as_py(),
    "prompt_len": t.column("prompt_len")[8].as_py(),
    "topk_ids": t.column("topk_ids")[8].as_py(),
    "topk_logprobs": t.column("topk_logprobs")[8].as_py(),
    "token_logprob": t.column("token_logprob")[8].as_py(),
}))
"#;
    let v = run_python(&py, script, &d.path().join("s.parquet"));
    assert_eq!(v["rows"], 9);
    assert_eq!(v["columns"], json!(COLUMNS));
    assert_eq!(
        v["types"],
        json!([
            "string",
            "string",
            "list<element: uint32 not null>",
            "uint32",
            "list<element: uint32 not null>",
            "list<element: float not null>",
            "list<element: float not null>"
        ])
    );
    assert_eq!(v["nullable"], json!(vec![false; 7]));
    assert_eq!(
        v["meta"],
        json!({"kd.format_version": "1", "kd.top_k": "4"})
    );
    let r = &rows[8];
    assert_eq!(v["id"], r.id.as_str());
    assert_eq!(v["source"], r.source.as_str());
    assert_eq!(v["input_ids"], json!(r.input_ids));
    assert_eq!(v["prompt_len"], r.prompt_len);
    assert_eq!(v["topk_ids"], json!(r.topk_ids));
    // Python floats are f64; f32 -> f64 -> f32 is exact.
    let lps: Vec<f32> = serde_json::from_value(v["topk_logprobs"].clone()).unwrap();
    assert_eq!(lps, r.topk_logprobs);
    let tl: Vec<f32> = serde_json::from_value(v["token_logprob"].clone()).unwrap();
    assert_eq!(tl, r.token_logprob);
}

/// pyarrow reads a v2 shard and decodes its log-probs with nothing but the formula of
/// `schemas/shard-v2.json` (`-cumsum(gaps within a position) / S`, `-q / S`): each within
/// 1/1024 nats of the values written. Skips like [`pyarrow_reads_shard`].
#[test]
fn pyarrow_decodes_a_v2_shard_with_the_documented_formula() {
    let Some(py) = pyarrow_or_skip("pyarrow_decodes_a_v2_shard") else {
        return;
    };
    let d = tempfile::tempdir().unwrap();
    let rows = crate::synth::tiny_rows_with_samples(9, K, 5);
    let opts = WriteOptions::for_version_with_samples(2, 5);
    write_shard_with(d.path(), "s.parquet", K, &rows, &opts).unwrap();
    let script = r#"
import json, math, sys
from itertools import accumulate
import pyarrow.parquet as pq
t = pq.read_table(sys.argv[1])
md = {k.decode(): v.decode() for k, v in t.schema.metadata.items() if k.decode().startswith("kd.")}
k, S, T = int(md["kd.top_k"]), int(md["kd.logprob_scale"]), int(md["kd.tail_scale"])
out = []
cols = [t.column(c).to_pylist() for c in ("input_ids", "prompt_len", "topk_logprob_gaps", "token_logprob_q", "tail_logmass_q", "sample_ids", "sample_logprob_gaps", "sample_counts", "sample_token_count")]
n = int(md["kd.samples"])
for ids, prompt_len, gaps, q, tails, sid, sgaps, counts, tcounts in zip(*cols):
    lps, shifts = [], []
    for j, tq in zip(range(0, len(gaps), k), tails):
        lp = [-c / S for c in accumulate(gaps[j:j + k])]
        tail = 0.0 if tq == 4294967295 else math.exp(-tq / T)
        shift = math.log((1 - tail) / sum(math.exp(x) for x in lp))
        lps += [x + shift for x in lp]
        shifts.append(shift)
    # Draws: the next token's count, then the other ids until the counts make n.
    draws, at = [], 0
    for j, (tc, tq) in enumerate(zip(tcounts, q)):
        pos = [(ids[prompt_len + j], -tq / S, tc)] if tc else []
        total, acc = tc, 0
        while total < n:
            acc += sgaps[at]
            pos.append((sid[at], -acc / S, counts[at]))
            total += counts[at]
            at += 1
        draws += [lp for _, lp, c in sorted(pos) for _ in range(c)]
    out.append({"topk_logprobs": lps, "token_logprob": [-x / S + s for x, s in zip(q, shifts)],
                "sample_logprobs": draws})
print(json.dumps({"meta": md, "columns": t.column_names, "rows": out}))
"#;
    let v = run_python(&py, script, &d.path().join("s.parquet"));
    assert_eq!(
        v["meta"],
        json!({"kd.format_version": "2", "kd.top_k": "4", "kd.logprob_scale": "1024", "kd.tail_scale": "1048576", "kd.samples": "5"})
    );
    assert_eq!(v["columns"], json!(COLUMNS_V2));
    let got = v["rows"].as_array().unwrap();
    assert_eq!(got.len(), rows.len());
    let mut worst = 0f64;
    for (g, r) in got.iter().zip(&rows) {
        let lps: Vec<f64> = serde_json::from_value(g["topk_logprobs"].clone()).unwrap();
        let tl: Vec<f64> = serde_json::from_value(g["token_logprob"].clone()).unwrap();
        let sl: Vec<f64> = serde_json::from_value(g["sample_logprobs"].clone()).unwrap();
        assert_eq!(lps.len(), r.topk_logprobs.len());
        assert_eq!(tl.len(), r.token_logprob.len());
        assert_eq!(sl.len(), r.sample_logprobs.len());
        assert_eq!(sl.len(), 5 * r.n_pos());
        for (a, b) in lps
            .iter()
            .zip(&r.topk_logprobs)
            .chain(tl.iter().zip(&r.token_logprob))
            .chain(sl.iter().zip(&r.sample_logprobs))
        {
            worst = worst.max((a - f64::from(*b)).abs());
        }
    }
    assert!(worst <= 1.0 / 1024.0 + 1e-6, "worst error {worst}");
    assert!(worst > 0.0, "the values are quantized");
}

/// `schemas/manifest-v1.schema.json` lists exactly the fields `Manifest` serialises.
#[test]
fn manifest_json_schema_matches_struct() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../schemas/manifest-v1.schema.json");
    let schema: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let (_, mut m) = {
        let mut m = manifest_for(vec![]);
        m.part = Some(PartInfo { index: 0, count: 1 });
        m.push_shard(ShardEntry {
            file: "a.parquet".into(),
            rows: 1,
            tokens: 2,
            positions: 1,
            response_tokens: 1,
            bytes: 3,
            sha256: "0".repeat(64),
        });
        ((), serde_json::to_value(&m).unwrap())
    };
    let keys = |v: &serde_json::Value| {
        let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    };
    let strs = |v: &serde_json::Value| {
        let mut k: Vec<String> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect();
        k.sort();
        k
    };
    assert_eq!(strs(&schema["required"]), keys(&m));
    // Every required field, and the optional `device` and `derived_from` when recorded.
    let o = m.as_object_mut().unwrap();
    o.insert("device".into(), "cpu".into());
    o.insert("derived_from".into(), json!({"top_k": 32}));
    assert_eq!(keys(&schema["properties"]), keys(&m));
    let defs = &schema["$defs"];
    assert_eq!(strs(&defs["shard"]["required"]), keys(&m["shards"][0]));
    assert_eq!(keys(&defs["shard"]["properties"]), keys(&m["shards"][0]));
    assert_eq!(strs(&defs["totals"]["required"]), keys(&m["totals"]));
    assert_eq!(strs(&defs["part"]["required"]), keys(&m["part"]));
    assert_eq!(
        schema["properties"]["format_version"]["maximum"],
        FORMAT_VERSION
    );
}

/// Sampled targets round-trip through format 2 (log-probs within 1/1024, ids exact), with
/// and without top-k entries beside them; format 1 refuses them; a shard without
/// `kd.samples` or with a sampled list of the wrong length is refused naming the file.
#[test]
fn sampled_targets_round_trip_in_format_2() {
    let d = tempfile::tempdir().unwrap();
    for (k, n) in [(K, 6), (0, 12)] {
        let rows = crate::synth::tiny_rows_with_samples(11, k, n);
        for r in &rows {
            r.validate_targets(k, n, TINY_VOCAB).unwrap();
            assert_eq!(r.sample_ids.len(), n * r.n_pos());
        }
        let name = format!("k{k}n{n}.parquet");
        let opts = WriteOptions::for_version_with_samples(2, n);
        write_shard_with(d.path(), &name, k, &rows, &opts).unwrap();
        let path = d.path().join(&name);
        let meta = read_shard_meta(&path).unwrap();
        assert_eq!((meta.k, meta.samples), (k, n));
        let back = read_shard(&path).unwrap();
        let stored: Vec<Row> = rows.iter().map(|r| r.as_stored_v2(k)).collect();
        assert_eq!(back, stored);
        for (a, b) in back.iter().zip(&rows) {
            assert_eq!(a.sample_ids, b.sample_ids);
            for (x, y) in a.sample_logprobs.iter().zip(&b.sample_logprobs) {
                assert!(x <= y && y - x < 1.0 / 1024.0 + 1e-6, "{x} vs {y}");
            }
        }
        // Written without declaring the samples, the rows are refused before any file exists.
        let r = write_shard_with(
            d.path(),
            "bad.parquet",
            k.max(1),
            &rows,
            &WriteOptions::v2(),
        );
        assert!(matches!(r, Err(Error::InvalidRow { .. })), "{r:?}");
        assert!(!d.path().join("bad.parquet").exists());
    }
    let rows = crate::synth::tiny_rows_with_samples(3, K, 4);
    let opts = WriteOptions {
        samples: 4,
        ..WriteOptions::v1()
    };
    let r = write_shard_with(d.path(), "v1.parquet", K, &rows, &opts);
    assert!(
        matches!(&r, Err(Error::Schema { what, .. }) if what.contains("sampled")),
        "{r:?}"
    );
    // Unsorted draws, or one id with two log-probs, are invalid rows.
    let mut bad = rows[1].clone();
    bad.sample_ids.swap(0, 3);
    if bad.sample_ids[0] != bad.sample_ids[3] {
        assert!(
            bad.validate_targets(K, 4, TINY_VOCAB)
                .unwrap_err()
                .contains("sorted")
        );
    }
    let mut bad = rows[1].clone();
    bad.sample_ids[1] = bad.sample_ids[0];
    bad.sample_logprobs[1] = bad.sample_logprobs[0] - 0.5;
    assert!(bad.validate_targets(K, 4, TINY_VOCAB).is_err());
}

/// `Row::sample_counts` groups one position's draws into distinct ids with counts.
#[test]
fn sample_counts_group_repeats() {
    let c = counts_of(&[3, 3, 7, 9, 9, 9], &[-0.5, -0.5, -2.0, -0.1, -0.1, -0.1]);
    assert_eq!(c, vec![(3, 2, -0.5), (7, 1, -2.0), (9, 3, -0.1)]);
}

/// Draws are stored as the next token's count and the other distinct ids with a count each;
/// shards written before that, with each distinct id (`sample_counts`, ascending ids) or with
/// every draw and its repeats (no `sample_counts`), read back to the same rows.
#[test]
fn draws_are_stored_distinct_and_shards_with_repeats_still_read() {
    use crate::schema::DrawLayout;
    let d = tempfile::tempdir().unwrap();
    let (k, n) = (3, 12);
    let rows = crate::synth::tiny_rows_with_samples(7, k, n);
    let repeats: usize = rows
        .iter()
        .map(|r| r.sample_ids.windows(2).filter(|w| w[0] == w[1]).count())
        .sum();
    assert!(repeats > 0, "the fixture draws some ids more than once");
    // Distinct (position, id) pairs that are the position's next token.
    let tokens: usize = rows
        .iter()
        .map(|r| {
            (0..r.n_pos())
                .filter(|&j| r.sample_ids[j * n..(j + 1) * n].contains(&r.targets()[j]))
                .count()
        })
        .sum();
    assert!(tokens > 0, "the fixture draws some next tokens");
    let opts = WriteOptions::for_version_with_samples(2, n);
    write_shard_with(d.path(), "new.parquet", k, &rows, &opts).unwrap();
    for (layout, name) in [
        (DrawLayout::Repeats, "old.parquet"),
        (DrawLayout::ById, "by-id.parquet"),
    ] {
        crate::writer::legacy::with_layout(layout, || {
            write_shard_with(d.path(), name, k, &rows, &opts).unwrap()
        });
    }
    let new_rows = read_shard(&d.path().join("new.parquet")).unwrap();
    assert_eq!(new_rows, stored(&rows, k, 2));
    for name in ["old.parquet", "by-id.parquet"] {
        assert_eq!(
            read_shard(&d.path().join(name)).unwrap(),
            new_rows,
            "{name}"
        );
    }
    // Each layout stores fewer sampled entries: one per distinct id, then without the next
    // token's.
    let count = |name: &str| {
        let f = std::fs::File::open(d.path().join(name)).unwrap();
        let b = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(f).unwrap();
        let names: Vec<String> = b
            .schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        let mut total = 0;
        for batch in b.build().unwrap() {
            let batch = batch.unwrap();
            let c = batch
                .column(8)
                .as_any()
                .downcast_ref::<arrow::array::ListArray>()
                .unwrap();
            total += c.values().len();
        }
        (names, total)
    };
    let names_of = |l: DrawLayout| {
        l.columns()
            .into_iter()
            .map(String::from)
            .collect::<Vec<_>>()
    };
    let all: usize = rows.iter().map(|r| r.sample_ids.len()).sum();
    assert_eq!(count("old.parquet"), (names_of(DrawLayout::Repeats), all));
    assert_eq!(
        count("by-id.parquet"),
        (names_of(DrawLayout::ById), all - repeats)
    );
    let new = (names_of(DrawLayout::TokenFirst), all - repeats - tokens);
    assert_eq!(count("new.parquet"), new);
}

/// A next token drawn with a log-prob other than its `token_logprob` (not what a teacher
/// writes, but a valid row) stays among the other draws, and the row reads back exactly;
/// token-first columns whose counts do not add up are refused naming the file.
#[test]
fn draws_of_a_next_token_with_another_log_prob_are_kept_apart() {
    let d = tempfile::tempdir().unwrap();
    let (k, n) = (0, 12);
    let mut rows = crate::synth::tiny_rows_with_samples(5, k, n);
    let r = rows.iter_mut().find(|r| r.n_pos() > 0).unwrap();
    let next = r.targets()[0];
    assert!(
        r.sample_ids[..n].contains(&next),
        "position 0 draws its next token"
    );
    r.token_logprob[0] -= 0.25;
    let opts = WriteOptions::for_version_with_samples(2, n);
    write_shard_with(d.path(), "s.parquet", k, &rows, &opts).unwrap();
    let back = read_shard(&d.path().join("s.parquet")).unwrap();
    assert_eq!(back, stored(&rows, k, 2));

    // The same draws decoded from hand-made columns: a count short, an id stored twice.
    let t = crate::v2::TokenFirst {
        token_count: vec![2],
        ids: vec![5],
        gaps: vec![900],
        counts: vec![1],
    };
    let (ids, q) = crate::v2::expand_token_first(&t, &[9], &[100], 3).unwrap();
    assert_eq!((ids, q), (vec![5, 9, 9], vec![900, 100, 100]));
    let short = crate::v2::expand_token_first(&t, &[9], &[100], 4).unwrap_err();
    assert!(short.contains("3 of 4"), "{short}");
    let twice = crate::v2::expand_token_first(&t, &[5], &[100], 3).unwrap_err();
    assert!(twice.contains("twice"), "{twice}");
    let unused = crate::v2::expand_token_first(&t, &[9], &[100], 2).unwrap_err();
    assert!(unused.contains("0 used"), "{unused}");
    let over = crate::v2::TokenFirst {
        counts: vec![2],
        ..t
    };
    let over = crate::v2::expand_token_first(&over, &[9], &[100], 3).unwrap_err();
    assert!(over.contains("sum to 4"), "{over}");
}
