//! Loader throughput: distilled positions per second handed to a trainer.
//!
//! Data: `kd_shard::synth::realistic_rows` (49152 vocabulary, k = 32, 64 rows of 64 prompt +
//! 250 response tokens = 16000 positions) written as 4 shards with a manifest.
//!
//! * `cache_batches`: one epoch of [`Batcher`] batches (budget 4096 tokens, max_len 512)
//!   gathered from the memory-mapped cache — what the trainer pays per epoch.
//! * `parquet_read_shard` (baseline): decoding the same rows straight from the Parquet shards
//!   with `kd_shard::read_shard` — what a loader without the cache would pay per epoch,
//!   before even building batches.
//!
//! Run with `cargo bench -p kd-student`; a table of both figures is printed at the end.

use std::hint::black_box;
use std::path::Path;
use std::time::Instant;

use criterion::{Criterion, Throughput, criterion_group};
use kd_shard::synth::{RealisticConfig, realistic_rows};
use kd_shard::{MANIFEST_FILE, Manifest, read_shard, write_manifest_atomic, write_shard};
use kd_student::data::{BatchConfig, Batcher, ShardSet};
use serde_json::json;

const SHARDS: usize = 4;

fn make_set(dir: &Path) -> u64 {
    let cfg = RealisticConfig {
        rows: 64,
        ..RealisticConfig::default()
    };
    let rows = realistic_rows(&cfg);
    let mut m = Manifest::new(
        "kd-student bench",
        json!({"architecture": "synthetic", "vocab_size": cfg.vocab}),
        json!({"fingerprint": "synthetic", "vocab_size": cfg.vocab}),
        json!({"path": "synthetic", "sha256": "00", "rows": cfg.rows}),
        json!({"top_k": cfg.k}),
        None,
    );
    for (i, chunk) in rows.chunks(rows.len() / SHARDS).enumerate() {
        m.push_shard(write_shard(dir, &format!("shard-{i:05}.parquet"), cfg.k, chunk).unwrap());
    }
    m.complete = true;
    write_manifest_atomic(&dir.join(MANIFEST_FILE), &m).unwrap();
    m.totals.positions
}

fn epoch_from_cache(set: &ShardSet) -> usize {
    let cfg = BatchConfig {
        token_budget: 4096,
        max_len: 512,
        max_epochs: Some(1),
        ..BatchConfig::default()
    };
    let all: Vec<usize> = (0..set.len()).collect();
    let mut b = Batcher::new(set, &all, cfg).unwrap();
    let mut n = 0;
    while let Some(batch) = b.next_batch(set) {
        n += black_box(&batch).n_pos();
    }
    n
}

fn epoch_from_parquet(dir: &Path) -> usize {
    (0..SHARDS)
        .map(|i| {
            let rows = read_shard(&dir.join(format!("shard-{i:05}.parquet"))).unwrap();
            black_box(&rows).iter().map(|r| r.n_pos()).sum::<usize>()
        })
        .sum()
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let positions = make_set(dir.path());
    let t0 = Instant::now();
    let set = ShardSet::open(dir.path()).unwrap();
    let first_open = t0.elapsed();
    assert_eq!(epoch_from_cache(&set) as u64, positions);
    assert_eq!(epoch_from_parquet(dir.path()) as u64, positions);

    let mut g = c.benchmark_group("loader");
    g.throughput(Throughput::Elements(positions));
    g.bench_function("cache_batches", |b| b.iter(|| epoch_from_cache(&set)));
    g.bench_function("parquet_read_shard", |b| {
        b.iter(|| epoch_from_parquet(dir.path()))
    });
    g.finish();

    // A plain table a person can compare across machines (median of 20 epochs each).
    let median = |f: &dyn Fn() -> usize| {
        let mut t: Vec<f64> = (0..20)
            .map(|_| {
                let s = Instant::now();
                black_box(f());
                s.elapsed().as_secs_f64()
            })
            .collect();
        t.sort_by(f64::total_cmp);
        t[10]
    };
    let cache = median(&|| epoch_from_cache(&set));
    let parquet = median(&|| epoch_from_parquet(dir.path()));
    let t1 = Instant::now();
    drop(ShardSet::open(dir.path()).unwrap());
    let reopen = t1.elapsed();
    println!("\n{positions} distilled positions, k = 32, {SHARDS} shards");
    println!("| path | s / epoch | positions / s |");
    println!("| --- | ---: | ---: |");
    println!(
        "| mmap cache -> Batch (Batcher) | {cache:.5} | {:.3e} |",
        positions as f64 / cache
    );
    println!(
        "| baseline: kd_shard::read_shard | {parquet:.5} | {:.3e} |",
        positions as f64 / parquet
    );
    println!("speed-up: {:.1}x", parquet / cache);
    println!(
        "first open (verify + decode into cache): {:.3} s; reopen (verify + map): {:.3} s",
        first_open.as_secs_f64(),
        reopen.as_secs_f64()
    );
}

criterion_group!(benches, bench);

fn main() {
    benches();
    criterion::Criterion::default()
        .configure_from_args()
        .final_summary();
}
