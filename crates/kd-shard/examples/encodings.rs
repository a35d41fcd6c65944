//! Measures bytes per distilled position of shards written with different format versions and
//! Parquet value encodings, on realistic synthetic teacher output
//! (`kd_shard::synth::realistic_rows`: Zipf-like logits over a 49152 vocabulary, k=32) or on
//! the rows of a real cache.
//!
//! Run: `cargo run -p kd-shard --release --example encodings [positions | SHARD_DIR]`
//! (default 2000 synthetic positions; the lib.rs table also quotes 20000).

use kd_shard::synth::{RealisticConfig, realistic_rows};
use kd_shard::{StatsBuilder, ValueEncoding as E, WriteOptions, write_shard_with};
use parquet::file::reader::{FileReader, SerializedFileReader};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let arg = std::env::args().nth(1);
    let dir_arg = arg
        .as_deref()
        .map(std::path::Path::new)
        .filter(|p| p.is_dir());
    let positions: usize = match (&arg, dir_arg) {
        (Some(s), None) => s.parse()?,
        _ => 2000,
    };
    let per_row = 250;
    let mut cfg = RealisticConfig {
        rows: positions.div_ceil(per_row),
        positions_per_row: per_row,
        ..RealisticConfig::default()
    };
    let t = std::time::Instant::now();
    let rows = match dir_arg {
        Some(d) => {
            let m = kd_shard::read_manifest(&d.join(kd_shard::MANIFEST_FILE))?;
            cfg.k = m.settings["top_k"]
                .as_u64()
                .ok_or("manifest without top_k")? as usize;
            cfg.vocab = m.teacher["vocab_size"].as_u64().unwrap_or(0) as u32;
            let mut rows = Vec::new();
            for s in &m.shards {
                rows.extend(kd_shard::read_shard(&d.join(&s.file))?);
            }
            rows
        }
        None => realistic_rows(&cfg),
    };
    let mut sb = StatsBuilder::new(cfg.k);
    rows.iter().for_each(|r| sb.add(r));
    let st = sb.finish(1, 0, cfg.vocab);
    println!(
        "{} rows, {} positions, k={}, vocab={} (generated in {:.1}s): mean top-1 p {:.3}, mean tail mass {:.4}, mean token logprob {:.3}",
        st.rows,
        st.positions,
        cfg.k,
        cfg.vocab,
        t.elapsed().as_secs_f64(),
        st.mean_top1_prob,
        st.mean_tail_mass,
        st.mean_token_logprob
    );
    let dir = tempfile::tempdir()?;
    let variants: &[(&str, E, E, E, i32, u32)] = &[
        (
            "dictionary everywhere (parquet default)",
            E::Dictionary,
            E::Dictionary,
            E::Dictionary,
            3,
            1,
        ),
        ("plain everywhere", E::Plain, E::Plain, E::Plain, 3, 1),
        (
            "BSS floats, dictionary ids",
            E::ByteStreamSplit,
            E::Dictionary,
            E::Dictionary,
            3,
            1,
        ),
        (
            "BSS floats, plain ids",
            E::ByteStreamSplit,
            E::Plain,
            E::Plain,
            3,
            1,
        ),
        (
            "BSS floats, delta ids",
            E::ByteStreamSplit,
            E::DeltaBinaryPacked,
            E::DeltaBinaryPacked,
            3,
            1,
        ),
        (
            "BSS floats, BSS ids",
            E::ByteStreamSplit,
            E::ByteStreamSplit,
            E::ByteStreamSplit,
            3,
            1,
        ),
        (
            "dictionary floats, delta ids",
            E::Dictionary,
            E::DeltaBinaryPacked,
            E::DeltaBinaryPacked,
            3,
            1,
        ),
        (
            "BSS floats, dictionary ids, zstd 9",
            E::ByteStreamSplit,
            E::Dictionary,
            E::Dictionary,
            9,
            1,
        ),
        (
            "v2: BSS log-prob integers, dictionary ids",
            E::ByteStreamSplit,
            E::Dictionary,
            E::Dictionary,
            3,
            2,
        ),
        (
            "v2: BSS log-prob integers, dictionary ids, zstd 9",
            E::ByteStreamSplit,
            E::Dictionary,
            E::Dictionary,
            9,
            2,
        ),
        (
            "v2: BSS log-prob integers, BSS ids",
            E::ByteStreamSplit,
            E::ByteStreamSplit,
            E::Dictionary,
            3,
            2,
        ),
        (
            "v2: BSS log-prob integers, BSS ids, zstd 9",
            E::ByteStreamSplit,
            E::ByteStreamSplit,
            E::Dictionary,
            9,
            2,
        ),
        (
            "v2: delta log-prob integers, dictionary ids",
            E::DeltaBinaryPacked,
            E::Dictionary,
            E::Dictionary,
            3,
            2,
        ),
        (
            "v2: plain log-prob integers, plain ids",
            E::Plain,
            E::Plain,
            E::Dictionary,
            3,
            2,
        ),
        (
            "default WriteOptions",
            WriteOptions::default().float_encoding,
            WriteOptions::default().topk_id_encoding,
            WriteOptions::default().input_id_encoding,
            WriteOptions::default().zstd_level,
            WriteOptions::default().format_version,
        ),
    ];
    println!(
        "{:<42} {:>9} {:>10} {:>10} {:>10} {:>10} {:>9}",
        "encoding", "B/pos", "topk_ids", "topk_lps", "token_lp", "input_ids", "write ms"
    );
    for (i, (name, fl, tid, iid, level, version)) in variants.iter().enumerate() {
        let opts = WriteOptions {
            zstd_level: *level,
            float_encoding: *fl,
            topk_id_encoding: *tid,
            input_id_encoding: *iid,
            format_version: *version,
            ..WriteOptions::default()
        };
        let file = format!("v{i}.parquet");
        let t = std::time::Instant::now();
        let e = write_shard_with(dir.path(), &file, cfg.k, &rows, &opts)?;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        let back = kd_shard::read_shard(&dir.path().join(&file))?;
        if *version == 1 {
            assert_eq!(back, rows);
        } else {
            let worst = back
                .iter()
                .zip(&rows)
                .flat_map(|(a, b)| a.topk_logprobs.iter().zip(&b.topk_logprobs))
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(worst <= 1.0 / 1024.0 + 1e-6, "{name}: error {worst}");
        }
        let r = SerializedFileReader::new(std::fs::File::open(dir.path().join(&file))?)?;
        let mut col = std::collections::BTreeMap::<String, i64>::new();
        for rg in r.metadata().row_groups() {
            for c in rg.columns() {
                *col.entry(c.column_path().parts()[0].clone()).or_default() += c.compressed_size();
            }
        }
        let per = |c: &str| col.get(c).copied().unwrap_or(0) as f64 / e.positions as f64;
        println!(
            "{:<42} {:>9.2} {:>10.2} {:>10.2} {:>10.2} {:>10.2} {:>9.1}",
            name,
            e.bytes as f64 / e.positions as f64,
            per("topk_ids"),
            per("topk_logprobs") + per("topk_logprob_gaps"),
            per("token_logprob") + per("token_logprob_q"),
            per("input_ids"),
            ms
        );
    }
    println!(
        "(per-column figures: compressed column-chunk bytes per position; raw = 32*4 + 32*4 + 4 = 260 B/pos)"
    );
    Ok(())
}
