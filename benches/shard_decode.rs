//! Decoding speed of the cache, format 2 against format 1: distilled positions per second
//! read back by `kd_shard::read_shard` (memory map, Parquet decoding, v2's integer log-probs
//! turned back into f32) from the same rows written both ways (`synth::realistic_rows`:
//! 49152-token vocabulary, k = 32, 20 000 positions in 80 rows, one shard), plus the bytes of
//! each file. Both formats are timed in the same invocation, alternately, best of 7.
//!
//! Run: `cargo bench --bench shard_decode`.

use std::time::Instant;

use kd_shard::synth::{RealisticConfig, realistic_rows};
use kd_shard::{WriteOptions, read_shard, write_shard_with};

fn main() {
    let cfg = RealisticConfig {
        rows: 80,
        positions_per_row: 250,
        ..RealisticConfig::default()
    };
    let rows = realistic_rows(&cfg);
    let positions: usize = rows.iter().map(|r| r.n_pos()).sum();
    let dir = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    for version in [1u32, 2] {
        let name = format!("v{version}.parquet");
        let e = write_shard_with(
            dir.path(),
            &name,
            cfg.k,
            &rows,
            &WriteOptions::for_version(version),
        )
        .unwrap();
        files.push((version, dir.path().join(name), e.bytes));
    }
    let mut best = [f64::MAX; 2];
    for _ in 0..7 {
        for (i, (_, path, _)) in files.iter().enumerate() {
            let t = Instant::now();
            let back = read_shard(path).unwrap();
            let s = t.elapsed().as_secs_f64();
            assert_eq!(back.len(), rows.len());
            best[i] = best[i].min(s);
        }
    }
    println!("{positions} positions, k = {}, best of 7 reads", cfg.k);
    println!("{:<8} {:>14} {:>12}", "format", "positions/s", "B/position");
    for (i, (v, _, bytes)) in files.iter().enumerate() {
        println!(
            "v{v:<7} {:>14.0} {:>12.1}",
            positions as f64 / best[i],
            *bytes as f64 / positions as f64
        );
    }
    println!("v2 / v1 decoding speed: {:.2}×", best[0] / best[1]);
}
