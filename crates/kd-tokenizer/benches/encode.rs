//! Our tokenizer against the Hugging Face `tokenizers` crate (pure-Rust build, the one candle
//! already depends on) on the real tokenizers of `scripts/fetch_tokenizers.sh`: encoding
//! throughput (MB/s, median of 5) over the bundled prompts and every string of them both
//! ways, and whether the ids agree on every line.
//!
//! Run: `cargo bench -p kd-tokenizer --bench encode`.

use std::path::Path;
use std::time::Instant;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    // Every string field of the prompt files, one per line of the corpus.
    let mut lines = Vec::new();
    for f in ["self-instruct-seed-tasks.jsonl", "quickstart-mixed.jsonl"] {
        let text = std::fs::read_to_string(root.join("data/prompts").join(f)).unwrap();
        for l in text.lines() {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let mut stack = vec![v];
            while let Some(v) = stack.pop() {
                match v {
                    serde_json::Value::String(s) if !s.is_empty() => lines.push(s),
                    serde_json::Value::Array(a) => stack.extend(a),
                    serde_json::Value::Object(m) => stack.extend(m.into_iter().map(|(_, v)| v)),
                    _ => {}
                }
            }
        }
    }
    let bytes: usize = lines.iter().map(String::len).sum();
    println!(
        "corpus: {} strings, {bytes} bytes (data/prompts)",
        lines.len()
    );
    println!("| tokenizer | ours MB/s | `tokenizers` MB/s | ratio | strings with equal ids |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    for family in ["llama2", "llama3", "qwen3"] {
        let path = root
            .join("data/tokenizers")
            .join(family)
            .join("tokenizer.json");
        if !path.exists() {
            println!("| {family} | skipped: run scripts/fetch_tokenizers.sh | | | |");
            continue;
        }
        let ours = kd_tokenizer::Tokenizer::from_tokenizer_json(&path).unwrap();
        let theirs = tokenizers::Tokenizer::from_file(&path).unwrap();
        let equal = lines
            .iter()
            .filter(|s| ours.encode(s, true) == theirs.encode(s.as_str(), false).unwrap().get_ids())
            .count();
        let run = |f: &dyn Fn(&str) -> usize| {
            median(
                (0..5)
                    .map(|_| {
                        let t = Instant::now();
                        let n: usize = lines.iter().map(|s| f(s)).sum();
                        std::hint::black_box(n);
                        bytes as f64 / t.elapsed().as_secs_f64() / 1e6
                    })
                    .collect(),
            )
        };
        let a = run(&|s| ours.encode(s, true).len());
        let b = run(&|s| theirs.encode(s, false).unwrap().len());
        println!(
            "| {family} | {a:.1} | {b:.1} | {:.2} | {equal}/{} |",
            a / b,
            lines.len()
        );
    }
}
