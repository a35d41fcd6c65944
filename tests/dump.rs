//! End-to-end tests of `teacher-dump` and `shard-cat` on a tiny random teacher (2 layers,
//! the 300-token test vocabulary with the ChatML template) written by each test into its own
//! temp dir, over small JSONL inputs the tests write too.

mod util;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use kd_shard::{MANIFEST_FILE, Manifest, PARTIAL_MANIFEST_FILE, Row, Source};
use serde_json::{Value, json};

/// Largest allowed |difference| between two dumps' log-probs that should agree up to float
/// rounding (different batch sizes pad and reduce differently), in nats.
const LOGPROB_TOL: f32 = 1e-4;

/// Log-probabilities kept per position in these tests.
const TOP_K: usize = 16;

/// The lock file a running dump holds in its output folder.
const LOCK_FILE: &str = ".teacher-dump.lock";

/// One test's temp dir with a tiny random teacher in it.
struct Case {
    tmp: tempfile::TempDir,
    teacher: PathBuf,
}

impl Case {
    /// The tiny teacher of `kd_model::testing`. Its distributions are sharp (mean top-1
    /// probability ≈ 0.97): fine where only the plumbing matters.
    fn new() -> Case {
        let tmp = util::tempdir();
        let teacher = tmp.path().join("teacher");
        kd_model::testing::write_tiny_teacher(&teacher, 7).expect("tiny teacher");
        Case { tmp, teacher }
    }

    /// The same tiny teacher with its (tied) embeddings halved, which softens its
    /// distributions (mean top-1 probability ≈ 0.6, some rows stop early at `<|im_end|>`):
    /// for tests about sampling and batching, where the sharp teacher almost never leaves
    /// its top-1 token and every row runs to the same length.
    fn soft() -> Case {
        use kd_model::testing::{random_weights, tiny_config, write_hf_dir};
        let tmp = util::tempdir();
        let teacher = tmp.path().join("teacher");
        let tok = kd_tokenizer::Tokenizer::tiny_for_tests();
        let cfg = tiny_config(tok.vocab_size());
        let mut w = random_weights(&cfg, 7).expect("random weights");
        let name = "model.embed_tokens.weight";
        let halved = w[name].affine(0.5, 0.0).expect("scale");
        w.insert(name.to_string(), halved);
        write_hf_dir(&teacher, &cfg, &w, &tok).expect("soft teacher");
        Case { tmp, teacher }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    /// Writes `rows` as JSONL to `name` in the temp dir.
    fn input(&self, name: &str, rows: &[Value]) -> PathBuf {
        let p = self.path(name);
        util::write_jsonl(&p, rows);
        p
    }

    /// `teacher-dump` arguments: the teacher, `input`, `out`, `--no-progress`, then `extra`;
    /// `--top-k 16 --max-new-tokens 12 --rows-per-shard 4` unless `extra` sets them (clap
    /// refuses a repeated flag).
    fn args(&self, input: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
        let mut a: Vec<String> = [
            "--teacher",
            s(&self.teacher),
            "--input",
            s(input),
            "--out",
            s(out),
            "--no-progress",
        ]
        .map(String::from)
        .to_vec();
        for (flag, default) in [
            ("--top-k", "16"),
            ("--max-new-tokens", "12"),
            ("--rows-per-shard", "4"),
        ] {
            let set = extra.contains(&flag) || (flag == "--top-k" && extra.contains(&"--targets"));
            if !set {
                a.extend([flag.to_string(), default.to_string()]);
            }
        }
        a.extend(extra.iter().map(|x| x.to_string()));
        a
    }

    fn run(&self, input: &Path, out: &Path, extra: &[&str]) -> Output {
        let a = self.args(input, out, extra);
        util::run("teacher-dump", &strs(&a))
    }

    /// Runs a dump that must succeed; returns its stdout.
    fn dump(&self, input: &Path, out: &Path, extra: &[&str]) -> String {
        let a = self.args(input, out, extra);
        util::run_ok("teacher-dump", &strs(&a))
    }

    /// Runs a dump that must fail; returns its stderr.
    fn dump_fails(&self, input: &Path, out: &Path, extra: &[&str]) -> String {
        let o = self.run(input, out, extra);
        assert!(
            !o.status.success(),
            "teacher-dump {extra:?} should have failed; stdout:\n{}",
            String::from_utf8_lossy(&o.stdout)
        );
        String::from_utf8(o.stderr).expect("utf-8 stderr")
    }

    fn spawn(&self, input: &Path, out: &Path, extra: &[&str]) -> std::process::Child {
        let a = self.args(input, out, extra);
        util::spawn("teacher-dump", &strs(&a))
    }
}

fn s(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// `n` records mixing the three input shapes: `prompt`, `messages` (with a system turn),
/// `instruction` + `input`, and an `instruction` without an id (its id is a content hash).
fn prompts(n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| match i % 4 {
            0 => json!({"id": format!("p{i:02}"), "prompt": format!("Name {} colours of the sea.", i + 1)}),
            1 => json!({"id": format!("m{i:02}"), "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": format!("What is {i} plus {i}?")},
            ]}),
            2 => json!({"id": i, "instruction": "Translate to French.", "input": format!("The cat number {i} sleeps.")}),
            _ => json!({"instruction": format!("Write a haiku about rain, take {i}.")}),
        })
        .collect()
}

fn manifest(dir: &Path) -> Manifest {
    kd_shard::read_manifest(&dir.join(MANIFEST_FILE))
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

/// Every row of the dump in `dir`, in manifest order.
fn rows(dir: &Path) -> Vec<Row> {
    manifest(dir)
        .shards
        .iter()
        .flat_map(|s| {
            kd_shard::read_shard(&dir.join(&s.file)).unwrap_or_else(|e| panic!("{}: {e}", s.file))
        })
        .collect()
}

/// `id -> response tokens` (the ids after the prompt).
fn responses(dir: &Path) -> BTreeMap<String, Vec<u32>> {
    rows(dir)
        .into_iter()
        .map(|r| {
            let resp = r.targets().to_vec();
            (r.id, resp)
        })
        .collect()
}

/// Names of the files directly in `dir`.
fn file_names(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

/// Asserts that the dumps in `a` and `b` list the same shards (names, sizes, sha256) and that
/// every shard file, and the manifest itself, is byte-identical.
fn assert_same_bytes(a: &Path, b: &Path) {
    let (ma, mb) = (manifest(a), manifest(b));
    assert_eq!(ma.shards, mb.shards, "shard lists of {a:?} and {b:?}");
    for sh in &ma.shards {
        let (x, y) = (
            std::fs::read(a.join(&sh.file)).unwrap(),
            std::fs::read(b.join(&sh.file)).unwrap(),
        );
        assert!(x == y, "{} differs between {a:?} and {b:?}", sh.file);
        assert_eq!(kd_shard::hash_bytes(&x), sh.sha256, "{} sha256", sh.file);
    }
    assert_eq!(
        std::fs::read_to_string(a.join(MANIFEST_FILE)).unwrap(),
        std::fs::read_to_string(b.join(MANIFEST_FILE)).unwrap(),
        "manifest.json of {a:?} and {b:?}"
    );
}

/// Asserts a finished dump left no temporary file, partial manifest or lock behind.
fn assert_clean(dir: &Path) {
    let names = file_names(dir);
    assert!(
        !names.iter().any(|n| n.contains(".tmp-")),
        "temporary files left in {dir:?}: {names:?}"
    );
    assert!(!names.contains(PARTIAL_MANIFEST_FILE), "{names:?}");
    assert!(!names.contains(LOCK_FILE), "{names:?}");
    assert!(names.contains(MANIFEST_FILE), "{names:?}");
}

/// Compares two rows whose response tokens must be equal and whose log-probs may differ by
/// float rounding: token_logprob and each rank's top-k log-prob within [`LOGPROB_TOL`]; top-k
/// ids equal except where a log-prob ties with another within the tolerance (the order of
/// tied tokens is arbitrary). Returns the largest difference seen and the number of ranks
/// whose ids differ.
fn assert_rows_close(a: &Row, b: &Row) -> (f32, usize) {
    assert_eq!(a.id, b.id);
    assert_eq!(a.source, b.source, "{}", a.id);
    assert_eq!(a.prompt_len, b.prompt_len, "{}: prompt_len", a.id);
    assert_eq!(a.input_ids, b.input_ids, "{}: input_ids", a.id);
    let (mut max_diff, mut swapped) = (0f32, 0usize);
    for (i, (x, y)) in a.token_logprob.iter().zip(&b.token_logprob).enumerate() {
        let d = (x - y).abs();
        assert!(d <= LOGPROB_TOL, "{}: token_logprob[{i}] {x} vs {y}", a.id);
        max_diff = max_diff.max(d);
    }
    let k = TOP_K;
    assert_eq!(a.topk_ids.len(), a.n_pos() * k, "{}", a.id);
    for pos in 0..a.n_pos() {
        let (ia, ib) = (
            &a.topk_ids[pos * k..(pos + 1) * k],
            &b.topk_ids[pos * k..(pos + 1) * k],
        );
        let (la, lb) = (
            &a.topk_logprobs[pos * k..(pos + 1) * k],
            &b.topk_logprobs[pos * k..(pos + 1) * k],
        );
        for j in 0..k {
            let d = (la[j] - lb[j]).abs();
            assert!(
                d <= LOGPROB_TOL,
                "{} position {pos} rank {j}: {} vs {}",
                a.id,
                la[j],
                lb[j]
            );
            max_diff = max_diff.max(d);
            if ia[j] == ib[j] {
                continue;
            }
            swapped += 1;
            // b's token at rank j must tie (within tolerance) with rank j in a: either it is
            // elsewhere in a's top-k with a close log-prob, or it fell off a's list where the
            // last kept log-prob is close.
            let ok = match ia.iter().position(|&t| t == ib[j]) {
                Some(j2) => (la[j2] - la[j]).abs() <= 2.0 * LOGPROB_TOL,
                None => (la[k - 1] - la[j]).abs() <= 2.0 * LOGPROB_TOL,
            };
            assert!(
                ok,
                "{} position {pos} rank {j}: id {} vs {} without a tie ({:?} vs {:?})",
                a.id, ia[j], ib[j], la, lb
            );
        }
    }
    (max_diff, swapped)
}

#[test]
fn greedy_batch_size_does_not_change_the_dump() {
    let c = Case::soft();
    let input = c.input("in.jsonl", &prompts(20));
    let (b1, b8) = (c.path("b1"), c.path("b8"));
    // 8 rows per shard so that a batch of 8 really decodes 8 rows together (batches never
    // cross shards); 20 rows end with a partial shard and a partial batch.
    let common = ["--max-new-tokens", "16", "--rows-per-shard", "8"];
    c.dump(&input, &b1, &[&common[..], &["--batch-size", "1"]].concat());
    c.dump(&input, &b8, &[&common[..], &["--batch-size", "8"]].concat());
    let (r1, r8) = (rows(&b1), rows(&b8));
    assert_eq!(r1.len(), 20);
    assert_eq!(r8.len(), 20);
    assert!(
        r1.iter().any(|r| r.n_pos() < 16),
        "no row stopped early, so no row left a batch before the others"
    );
    let (mut max_diff, mut swapped, mut positions) = (0f32, 0usize, 0usize);
    for (a, b) in r1.iter().zip(&r8) {
        assert_eq!(a.source, Source::Generated);
        assert!(a.n_pos() >= 1 && a.n_pos() <= 16, "{}: {}", a.id, a.n_pos());
        let (d, sw) = assert_rows_close(a, b);
        max_diff = max_diff.max(d);
        swapped += sw;
        positions += a.n_pos();
    }
    eprintln!(
        "batch 1 vs 8: {positions} positions, max |Δ log-prob| {max_diff:.2e} nats, {swapped} tied top-k ranks swapped"
    );
    // The CPU kernels compute each sequence alone, in a fixed order: nothing differs at all.
    if kd_model::kernels::supported() {
        assert_eq!(
            (max_diff, swapped),
            (0.0, 0),
            "batch size changed a CPU-kernel dump"
        );
    }
    // Float rounding may change compressed sizes, but not the counts.
    let (t1, t8) = (manifest(&b1).totals, manifest(&b8).totals);
    assert_eq!(
        (t1.rows, t1.tokens, t1.positions, t1.response_tokens),
        (t8.rows, t8.tokens, t8.positions, t8.response_tokens)
    );
}

#[test]
fn sampling_is_reproducible_per_prompt() {
    let c = Case::soft();
    let rows_in = prompts(16);
    let input = c.input("in.jsonl", &rows_in);
    let sampled = [
        "--temperature",
        "0.8",
        "--top-p",
        "0.9",
        "--max-new-tokens",
        "16",
    ];
    let with = |extra: &[&'static str]| [&sampled[..], extra].concat();
    let (a, a2, b1, shuf, other) = (
        c.path("a"),
        c.path("a2"),
        c.path("b1"),
        c.path("shuffled"),
        c.path("seed6"),
    );
    c.dump(&input, &a, &with(&["--seed", "5", "--batch-size", "4"]));
    c.dump(&input, &a2, &with(&["--seed", "5", "--batch-size", "4"]));
    assert_same_bytes(&a, &a2);

    // Sampling happened: somewhere the chosen token is not the teacher's top-1.
    let ra = rows(&a);
    let not_argmax = ra
        .iter()
        .flat_map(|r| (0..r.n_pos()).map(move |p| (r, p)))
        .filter(|(r, p)| r.targets()[*p] != r.topk_ids[p * TOP_K])
        .count();
    assert!(
        not_argmax > 0,
        "T=0.8 sampling always picked the top-1 token"
    );

    c.dump(&input, &b1, &with(&["--seed", "5", "--batch-size", "1"]));
    for (x, y) in ra.iter().zip(&rows(&b1)) {
        assert_rows_close(x, y);
    }

    // The same records in another order: every id gets the same response.
    let mut reordered = rows_in.clone();
    reordered.reverse();
    reordered.swap(0, 5);
    let input_shuf = c.input("shuffled.jsonl", &reordered);
    c.dump(
        &input_shuf,
        &shuf,
        &with(&["--seed", "5", "--batch-size", "4"]),
    );
    let want = responses(&a);
    assert_eq!(want.len(), 16);
    assert_eq!(responses(&shuf), want, "responses by id after shuffling");

    c.dump(&input, &other, &with(&["--seed", "6", "--batch-size", "4"]));
    let got = responses(&other);
    let changed = want.iter().filter(|(id, r)| got[*id] != **r).count();
    assert!(changed > 0, "seed 6 gave the same 16 responses as seed 5");
}

/// `--targets top:16,sample:12`: every position holds 12 draws whose log-probs are the
/// teacher's (they agree with its top-k where both hold an id), whose frequencies follow the
/// teacher's distribution, and which do not depend on the batch size or on the top-k beside
/// them; `sample:N` alone stores no top-k; format 1 and malformed specs are refused;
/// `shard-cat` shows, verifies and summarises them.
#[test]
fn sampled_targets_follow_the_teacher_and_do_not_depend_on_batching() {
    let c = Case::soft();
    let input = c.input("in.jsonl", &prompts(12));
    let (both, b1, only) = (c.path("both"), c.path("both-b1"), c.path("only"));
    let common = ["--max-new-tokens", "12", "--seed", "3"];
    let with = |extra: &[&'static str]| [&common[..], extra].concat();
    c.dump(
        &input,
        &both,
        &with(&["--targets", "top:16,sample:12", "--batch-size", "4"]),
    );
    c.dump(
        &input,
        &b1,
        &with(&["--targets", "sample:12,top:16", "--batch-size", "1"]),
    );
    c.dump(
        &input,
        &only,
        &with(&["--targets", "sample:12", "--batch-size", "4"]),
    );
    let m = manifest(&both);
    assert_eq!((m.top_k(), m.samples()), (16, 12));
    assert_eq!(
        (manifest(&only).top_k(), manifest(&only).samples()),
        (0, 12)
    );
    let (rb, r1, ro) = (rows(&both), rows(&b1), rows(&only));
    let (mut positions, mut top1_draws, mut top1_mass, mut checked) = (0usize, 0usize, 0f64, 0);
    for ((a, b), o) in rb.iter().zip(&r1).zip(&ro) {
        assert_eq!(a.sample_ids.len(), 12 * a.n_pos(), "{}", a.id);
        assert!(o.topk_ids.is_empty() && o.topk_logprobs.is_empty());
        // Draws are a function of (seed, id, position) and the teacher's distribution.
        assert_eq!(a.input_ids, o.input_ids);
        assert_eq!(
            a.sample_ids, o.sample_ids,
            "{}: top-k beside the draws changed them",
            a.id
        );
        if kd_model::kernels::supported() {
            assert_eq!(
                a.sample_ids, b.sample_ids,
                "{}: batch size changed the draws",
                a.id
            );
        }
        for j in 0..a.n_pos() {
            let top = &a.topk_ids[j * TOP_K..(j + 1) * TOP_K];
            let counts = a.sample_counts(j, 12);
            assert_eq!(counts.iter().map(|c| c.1).sum::<u32>(), 12);
            for (id, _, lp) in &counts {
                if let Some(r) = top.iter().position(|t| t == id) {
                    let d = (lp - a.topk_logprobs[j * TOP_K + r]).abs();
                    assert!(
                        d <= 2.0 / 1024.0 + 1e-6,
                        "{}: draw {id} log-prob off by {d}",
                        a.id
                    );
                    checked += 1;
                }
            }
            top1_draws += counts
                .iter()
                .find(|c| c.0 == top[0])
                .map_or(0, |c| c.1 as usize);
            top1_mass += f64::from(a.topk_logprobs[j * TOP_K]).exp();
            positions += 1;
        }
    }
    assert!(
        checked > positions,
        "too few draws inside the top-k to compare"
    );
    // The share of draws landing on the teacher's top-1 estimates its mean probability: the
    // standard error is at most sqrt(0.25 / draws).
    let (share, mean) = (
        top1_draws as f64 / (12 * positions) as f64,
        top1_mass / positions as f64,
    );
    let se = (0.25 / (12 * positions) as f64).sqrt();
    eprintln!(
        "{positions} positions: top-1 share of draws {share:.4}, mean top-1 probability {mean:.4}"
    );
    assert!(
        (share - mean).abs() < 5.0 * se,
        "{share} vs {mean} (5 se = {})",
        5.0 * se
    );

    // shard-cat: verify, stats and head know the draws.
    let o = shard_cat(&["verify", s(&only)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stats = String::from_utf8(shard_cat(&["stats", s(&both)]).stdout).unwrap();
    assert!(stats.contains("draws per position     12"), "{stats}");
    assert!(stats.contains("(a top-k entry or a draw)"), "{stats}");
    let head = String::from_utf8(shard_cat(&["head", s(&only), "--rows", "1"]).stdout).unwrap();
    assert!(
        head.contains("12 draws from the teacher") && head.contains(" ×"),
        "{head}"
    );
    let json = shard_cat(&["--json", "head", s(&both), "--rows", "1"]);
    let v: Value = serde_json::from_slice(&json.stdout).unwrap();
    let drawn: u64 = v["positions"][0]["samples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["count"].as_u64().unwrap())
        .sum();
    assert_eq!(drawn, 12);

    let err = c.dump_fails(
        &input,
        &c.path("v1"),
        &["--targets", "sample:4", "--shard-format", "1"],
    );
    assert!(err.contains("format 1") && err.contains("sampled"), "{err}");
    for bad in ["top:4,top:5", "sample:0", "sample", "most:3"] {
        let err = c.dump_fails(&input, &c.path("bad"), &["--targets", bad]);
        assert!(err.contains("--targets"), "{bad}: {err}");
    }
}

/// `--samples 3`: three sampled responses per prompt, rows `ID#0..ID#2` in input order, each
/// reproducible whatever the batch size (its own stream), not all alike; refused when greedy
/// or scoring.
#[test]
fn several_responses_per_prompt_are_rows_of_their_own() {
    let c = Case::soft();
    let rows_in = prompts(4);
    let input = c.input("in.jsonl", &rows_in);
    let (a, b) = (c.path("a"), c.path("b"));
    let common = ["--samples", "3", "--temperature", "1.0", "--seed", "9"];
    c.dump(&input, &a, &[&common[..], &["--batch-size", "4"]].concat());
    c.dump(&input, &b, &[&common[..], &["--batch-size", "1"]].concat());
    let ra = rows(&a);
    assert_eq!(ra.len(), 12);
    let ids: Vec<&str> = ra.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(&ids[..3], &["p00#0", "p00#1", "p00#2"]);
    assert_eq!(&ids[3..6], &["m01#0", "m01#1", "m01#2"]);
    assert_eq!(
        responses(&a),
        responses(&b),
        "batch size changed a response"
    );
    let differ = ra
        .chunks(3)
        .filter(|g| g[0].input_ids != g[1].input_ids || g[1].input_ids != g[2].input_ids)
        .count();
    assert!(
        differ >= 2,
        "only {differ} of 4 prompts got differing responses"
    );
    assert_eq!(manifest(&a).settings["responses_per_prompt"], 3);
    let err = c.dump_fails(&input, &c.path("greedy"), &["--samples", "3"]);
    assert!(err.contains("temperature"), "{err}");
    let err = c.dump_fails(
        &input,
        &c.path("scored"),
        &["--samples", "2", "--temperature", "1", "--score"],
    );
    assert!(err.contains("responses_per_prompt"), "{err}");
}

/// `--device`: the device is printed and recorded in the manifest (not in its identity, so a
/// resume on another device goes on); `cuda` in a binary built without it is refused by name
/// before any work, and a name that is no device is refused by clap.
#[test]
fn the_device_is_recorded_and_a_missing_one_refused_by_name() {
    let c = Case::soft();
    let input = c.input("in.jsonl", &prompts(2));
    let out = c.path("cpu");
    let o = c.run(&input, &out, &["--device", "cpu"]);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("device: cpu"));
    let text = std::fs::read_to_string(out.join("manifest.json")).unwrap();
    let m: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(m["device"], "cpu");
    let plain = c.path("auto");
    c.dump(&input, &plain, &[]);
    assert_eq!(manifest(&out).fingerprint, manifest(&plain).fingerprint);
    if !cfg!(feature = "cuda") {
        let err = c.dump_fails(&input, &c.path("gpu"), &["--device", "cuda:1"]);
        assert!(
            err.contains("--device cuda:1") && err.contains("built without CUDA"),
            "{err}"
        );
        assert!(!c.path("gpu").join("manifest.json").exists());
    }
    let err = c.dump_fails(&input, &c.path("bad"), &["--device", "gpu"]);
    assert!(err.contains("expected cpu, cuda, cuda:N or auto"), "{err}");
}

/// `--dtype bf16|f16`: the teacher computes in half precision on candle's path (here on the
/// CPU, as it would on a GPU), the dtype is printed and recorded in the settings, so the
/// cache's identity differs from an exact one and a resume across dtypes is refused; its
/// log-probs stay near the exact ones. f32 leaves the manifest as it was.
#[test]
fn a_half_precision_dump_records_its_dtype_and_stays_near_the_exact_one() {
    let c = Case::soft();
    let input = c.input("in.jsonl", &prompts(3));
    let exact = c.path("exact");
    c.dump(&input, &exact, &[]);
    assert!(manifest(&exact).settings.get("dtype").is_none());
    let f32_out = c.path("f32");
    c.dump(&input, &f32_out, &["--dtype", "f32"]);
    assert_eq!(manifest(&f32_out).fingerprint, manifest(&exact).fingerprint);
    for dtype in ["bf16", "f16"] {
        let out = c.path(dtype);
        let o = c.run(&input, &out, &["--dtype", dtype]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{err}");
        assert!(err.contains(&format!("Exact {dtype} on candle")), "{err}");
        let m = manifest(&out);
        assert_eq!(m.settings["dtype"], dtype);
        assert_ne!(m.fingerprint, manifest(&exact).fingerprint);
        // Positions correspond while the two greedy responses agree.
        let (a, b) = (rows(&exact), rows(&out));
        let mut worst = 0f32;
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x.prompt_len, y.prompt_len);
            let p = x.prompt_len as usize;
            let same = (p..x.input_ids.len().min(y.input_ids.len()))
                .take_while(|&t| x.input_ids[t] == y.input_ids[t])
                .count();
            for j in 0..same {
                worst = worst.max((x.token_logprob[j] - y.token_logprob[j]).abs());
            }
        }
        // bf16 keeps 8 significant bits, f16 11: measured 0.11 and 0.018 nats here.
        let bound = if dtype == "bf16" { 0.25 } else { 0.05 };
        assert!(worst > 0.0 && worst < bound, "{dtype}: worst {worst} nats");
    }
    let err = c.dump_fails(&input, &exact, &["--dtype", "bf16", "--resume"]);
    assert!(err.contains("settings.dtype"), "{err}");
    let err = c.dump_fails(&input, &c.path("bad"), &["--dtype", "fp8"]);
    assert!(err.contains("expected f32, bf16 or f16"), "{err}");
}

/// `shard-cat derive`: top-4 in format 2 derived from a top-16 format-1 dump is the top-4
/// format-2 dump of the same rows, shard for shard and byte for byte, with the same identity;
/// a subset of rows gets its own identity; asking for more entries than the source holds, or
/// a destination that already holds a cache, is refused.
#[test]
fn a_derived_cache_is_the_dump_its_settings_would_write() {
    let c = Case::soft();
    let input = c.input("in.jsonl", &prompts(6));
    let (wide, narrow) = (c.path("k16-v1"), c.path("k4"));
    c.dump(&input, &wide, &["--top-k", "16", "--shard-format", "1"]);
    c.dump(&input, &narrow, &["--top-k", "4"]);
    let derived = c.path("derived");
    let derive = |extra: &[&str]| {
        let a = [&["derive", s(&wide)], extra].concat();
        util::run("shard-cat", &a)
    };
    let o = derive(&["--out", s(&derived), "--top-k", "4", "--shard-format", "2"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (m, d) = (manifest(&narrow), manifest(&derived));
    assert_eq!(d.fingerprint, m.fingerprint);
    assert_eq!(
        d.shards, m.shards,
        "the same shards, byte for byte (sha256)"
    );
    assert_eq!(rows(&derived), rows(&narrow));
    let from = d.derived_from.as_ref().expect("derived_from");
    assert_eq!(from["top_k"], 16);
    assert_eq!(from["fingerprint"], manifest(&wide).fingerprint.as_str());
    util::run_ok("shard-cat", &["verify", s(&derived)]);

    let ids = c.path("ids.txt");
    let keep: Vec<String> = rows(&narrow).iter().take(2).map(|r| r.id.clone()).collect();
    std::fs::write(&ids, keep.join("\n")).unwrap();
    let subset = c.path("subset");
    let o = derive(&["--out", s(&subset), "--ids", s(&ids)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got: Vec<String> = rows(&subset).iter().map(|r| r.id.clone()).collect();
    assert_eq!(got, keep);
    assert_eq!(manifest(&subset).input["selected_rows"], 2);
    assert_ne!(manifest(&subset).fingerprint, manifest(&wide).fingerprint);

    for (extra, want) in [
        (
            vec!["--out", s(&c.path("more")), "--top-k", "32"],
            "1 to 16",
        ),
        (vec!["--out", s(&derived)], "already holds a manifest"),
    ] {
        let o = derive(&extra);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(want), "{err}");
    }
}

/// The renamed flags: `--responses-per-prompt` and `--sampling-temperature` make the dump the
/// former `--samples` and `--temperature` made, and a former name still works, with a note.
#[test]
fn renamed_flags_dump_what_the_former_names_did() {
    let c = Case::soft();
    let input = c.input("in.jsonl", &prompts(2));
    let (old, new) = (c.path("old"), c.path("new"));
    let o = c.run(
        &input,
        &old,
        &["--samples", "2", "--temperature", "1.0", "--seed", "3"],
    );
    assert!(o.status.success());
    let note = String::from_utf8_lossy(&o.stderr);
    assert!(
        note.contains("--samples is now --responses-per-prompt")
            && note.contains("--temperature is now --sampling-temperature"),
        "{note}"
    );
    let o = c.run(
        &input,
        &new,
        &[
            "--responses-per-prompt",
            "2",
            "--sampling-temperature",
            "1.0",
            "--seed",
            "3",
        ],
    );
    assert!(o.status.success());
    assert!(!String::from_utf8_lossy(&o.stderr).contains("note:"));
    assert_eq!(responses(&old), responses(&new));
    assert_eq!(manifest(&old).settings, manifest(&new).settings);
    let err = c.dump_fails(
        &input,
        &c.path("both"),
        &["--samples", "2", "--responses-per-prompt", "2"],
    );
    assert!(err.contains("cannot be used with"), "{err}");
}

/// Starts a 40-row dump (10 shards), kills it with SIGKILL once its partial manifest lists
/// `at_least` shards, and returns the output folder.
fn killed_dump(c: &Case, input: &Path, name: &str, extra: &[&str], at_least: usize) -> PathBuf {
    let out = c.path(name);
    let mut child = c.spawn(input, &out, extra);
    let partial = out.join(PARTIAL_MANIFEST_FILE);
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the dump ended ({status}) before {at_least} shards were seen: make it longer");
        }
        // The partial manifest is replaced atomically; a read may still miss it between checks.
        if let Ok(m) = kd_shard::read_manifest(&partial)
            && m.shards.len() >= at_least
        {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no partial manifest with {at_least} shards after 2 minutes"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap(); // SIGKILL on unix
    child.wait().unwrap();
    assert!(
        !out.join(MANIFEST_FILE).exists(),
        "{name}: the dump finished before SIGKILL reached it: make it longer"
    );
    out
}

#[test]
fn sigkill_then_resume_gives_the_uninterrupted_dump() {
    let c = Case::soft();
    let input = c.input("in.jsonl", &prompts(40));
    // Batch size 1 and up to 96 new tokens: ~50 ms per shard, so that the poller below sees
    // the partial manifest and kills the dump well before its last shard.
    let extra = ["--max-new-tokens", "96", "--batch-size", "1"];
    let whole = c.path("whole");
    c.dump(&input, &whole, &extra);
    assert_eq!(manifest(&whole).shards.len(), 10);
    assert_clean(&whole);

    for at_least in [1, 4] {
        let name = format!("killed-{at_least}");
        let out = killed_dump(&c, &input, &name, &extra, at_least);
        let m = kd_shard::read_manifest(&out.join(PARTIAL_MANIFEST_FILE)).unwrap();
        assert!(!m.complete);
        let published = m.shards.len();
        assert!((at_least..10).contains(&published), "{published} shards");
        // A killed dump leaves its lock file behind, unlocked.
        assert!(out.join(LOCK_FILE).exists());
        if at_least == 1 {
            // Without --resume the folder is refused.
            let err = c.dump_fails(&input, &out, &extra);
            assert!(err.contains("--resume"), "{err}");
            // A resume with another setting is refused, naming it.
            let err = c.dump_fails(
                &input,
                &out,
                &[&extra[..], &["--resume", "--top-k", "8"]].concat(),
            );
            assert!(err.contains("settings.top_k"), "{err}");
            let err = c.dump_fails(
                &input,
                &out,
                &[&extra[..], &["--resume", "--seed", "3"]].concat(),
            );
            assert!(err.contains("settings.seed"), "{err}");
        }
        // (After the second kill no refused run comes first: the resume itself must take the
        // stale lock file.)
        // A stray temporary file, as a writer killed mid-shard leaves (planted now: the refused
        // runs above may already clean up).
        std::fs::write(out.join("shard-00009.parquet.tmp-4242"), b"half a shard").unwrap();
        // Resume (refused runs must not have touched the published shards).
        let summary: Value = serde_json::from_str(&c.dump(
            &input,
            &out,
            &[&extra[..], &["--resume", "--json"]].concat(),
        ))
        .expect("--json summary");
        assert_eq!(summary["shards_reused"], json!(published), "{summary}");
        assert_eq!(
            summary["shards_written"],
            json!(10 - published),
            "{summary}"
        );
        assert_eq!(summary["rows"], json!(40));
        assert_same_bytes(&whole, &out);
        assert_clean(&out);
    }
}

/// Regression: a run refused after taking the folder lock (no `--resume`, or a resume with
/// other settings) used to leave `.teacher-dump.lock` behind in a finished cache.
#[test]
fn refused_runs_leave_a_finished_dump_as_it_was() {
    let c = Case::new();
    let input = c.input("in.jsonl", &prompts(12));
    let out = c.path("out");
    c.dump(&input, &out, &[]);
    assert_clean(&out);
    let files = file_names(&out);
    let manifest_bytes = std::fs::read(out.join(MANIFEST_FILE)).unwrap();

    let err = c.dump_fails(&input, &out, &[]);
    assert!(err.contains("--resume"), "{err}");
    assert_eq!(file_names(&out), files, "after a run without --resume");
    let err = c.dump_fails(&input, &out, &["--resume", "--max-new-tokens", "13"]);
    assert!(err.contains("settings.max_new_tokens"), "{err}");
    assert_eq!(
        file_names(&out),
        files,
        "after a resume with other settings"
    );

    // A resume of the finished dump reuses every shard and rewrites the same manifest.
    let summary: Value =
        serde_json::from_str(&c.dump(&input, &out, &["--resume", "--json"])).unwrap();
    assert_eq!(summary["shards_reused"], json!(3), "{summary}");
    assert_eq!(summary["shards_written"], json!(0), "{summary}");
    assert_eq!(
        std::fs::read(out.join(MANIFEST_FILE)).unwrap(),
        manifest_bytes
    );
    assert_eq!(file_names(&out), files);
}

fn shard_cat(args: &[&str]) -> Output {
    util::run("shard-cat", args)
}

/// Runs `shard-cat verify` (text, then JSON) on `dir`, which must fail; returns its stderr
/// and the JSON problems as `(file, kind)`.
fn verify_fails(dir: &Path) -> (String, Vec<(String, String)>) {
    let o = shard_cat(&["verify", s(dir)]);
    assert!(!o.status.success(), "verify passed on {dir:?}");
    let stderr = String::from_utf8(o.stderr).unwrap();
    let o = shard_cat(&["--json", "verify", s(dir)]);
    assert_eq!(o.status.code(), Some(1));
    let report: Value = serde_json::from_slice(&o.stdout).expect("verify --json");
    let problems = report["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["file"].as_str().unwrap().to_string(),
                p["kind"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    (stderr, problems)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn verify_names_the_corrupt_missing_or_unlisted_shard() {
    let c = Case::new();
    let input = c.input("in.jsonl", &prompts(12));
    let good = c.path("good");
    c.dump(&input, &good, &[]);
    let out = util::run_ok("shard-cat", &["verify", s(&good)]);
    assert!(out.contains("ok: 3 shards, 12 rows"), "{out}");
    let victim = "shard-00001.parquet";

    let case = |name: &str, damage: &dyn Fn(&Path)| -> (PathBuf, String, Vec<(String, String)>) {
        let d = c.path(name);
        copy_dir(&good, &d);
        damage(&d);
        let (stderr, problems) = verify_fails(&d);
        (d, stderr, problems)
    };

    // One byte flipped in the middle.
    let (d, stderr, problems) = case("flipped", &|d| {
        let p = d.join(victim);
        let mut b = std::fs::read(&p).unwrap();
        let mid = b.len() / 2;
        b[mid] ^= 0x55;
        std::fs::write(&p, b).unwrap();
    });
    assert!(stderr.contains(s(&d.join(victim))), "{stderr}");
    assert!(
        problems.contains(&(victim.into(), "hash".into())),
        "{problems:?}"
    );
    assert!(problems.iter().all(|(f, _)| f == victim), "{problems:?}");

    // Truncated.
    let (d, stderr, problems) = case("truncated", &|d| {
        let p = d.join(victim);
        let b = std::fs::read(&p).unwrap();
        std::fs::write(&p, &b[..b.len() - 100]).unwrap();
    });
    assert!(stderr.contains(s(&d.join(victim))), "{stderr}");
    assert!(
        problems.contains(&(victim.into(), "size".into())),
        "{problems:?}"
    );
    assert!(
        problems.contains(&(victim.into(), "hash".into())),
        "{problems:?}"
    );

    // Deleted.
    let (d, stderr, problems) = case("deleted", &|d| {
        std::fs::remove_file(d.join(victim)).unwrap()
    });
    assert!(stderr.contains(s(&d.join(victim))), "{stderr}");
    assert!(stderr.contains("missing"), "{stderr}");
    assert_eq!(problems, vec![(victim.into(), "missing".into())]);

    // An extra, unlisted shard (a valid one, copied under another name).
    let extra = "shard-00099.parquet";
    let (d, stderr, problems) = case("extra", &|d| {
        std::fs::copy(d.join(victim), d.join(extra)).unwrap();
    });
    assert!(stderr.contains(s(&d.join(extra))), "{stderr}");
    assert_eq!(problems, vec![(extra.into(), "unlisted".into())]);

    // The original is still sound (the damage was done to copies).
    util::run_ok("shard-cat", &["verify", s(&good)]);
}

#[test]
fn parts_merge_into_the_whole_dump() {
    let c = Case::soft();
    let input = c.input("in.jsonl", &prompts(18));
    let (whole, p0, p1, merged) = (c.path("whole"), c.path("p0"), c.path("p1"), c.path("m"));
    c.dump(&input, &whole, &[]);
    c.dump(&input, &p0, &["--part", "0/2"]);
    c.dump(&input, &p1, &["--part", "1/2"]);
    assert_eq!(manifest(&p0).totals.rows, 9);
    assert_eq!(manifest(&p1).totals.rows, 9);
    // While another process holds the destination, a merge is refused naming the lock.
    std::fs::create_dir_all(&merged).unwrap();
    let held = kd_fs::FolderLock::take(&merged, ".shard-cat-merge.lock").unwrap();
    let o = util::run("shard-cat", &["merge", "--out", s(&merged), s(&p1), s(&p0)]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(".shard-cat-merge.lock"), "{err}");
    drop(held);
    // Parts given out of order.
    util::run_ok("shard-cat", &["merge", "--out", s(&merged), s(&p1), s(&p0)]);
    assert!(!merged.join(".shard-cat-merge.lock").exists());
    let m = manifest(&merged);
    assert!(m.complete);
    assert_eq!(m.part, None);
    assert_eq!(m.totals.rows, 18);
    assert_eq!(m.shards.len(), 6, "3 shards per part of 9 rows");
    assert_eq!(
        m.fingerprint,
        manifest(&whole).fingerprint,
        "a merged job has the identity of the whole job"
    );
    util::run_ok("shard-cat", &["verify", s(&merged)]);
    let set = |d: &Path| -> BTreeSet<(String, Vec<u32>)> {
        rows(d).into_iter().map(|r| (r.id, r.input_ids)).collect()
    };
    let want = set(&whole);
    assert_eq!(want.len(), 18);
    assert_eq!(set(&merged), want);
    // Merged rows are in input order, as in the whole dump.
    let ids = |d: &Path| -> Vec<String> { rows(d).into_iter().map(|r| r.id).collect() };
    assert_eq!(ids(&merged), ids(&whole));
}

/// The cluster recipe run locally (`pipelines/cluster/run-local.sh`: three slices of
/// `dump-part.sh` side by side, then `merge.sh`, the scripts the Slurm array and the
/// Kubernetes Indexed Job run) gives the single-process dump: the same rows in the same
/// order with the same values, and the same identity. Run again, it leaves the finished
/// slices as they are.
#[test]
fn the_cluster_recipe_run_locally_equals_the_single_dump() {
    let c = Case::soft();
    let input = c.input("in.jsonl", &prompts(22));
    let (whole, job) = (c.path("whole"), c.path("job"));
    c.dump(&input, &whole, &[]);
    let bin_dir = util::bin("teacher-dump").parent().unwrap().to_path_buf();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let script = util::root().join("pipelines/cluster/run-local.sh");
    let run = || {
        std::process::Command::new("bash")
            .arg(&script)
            .env("PATH", &path)
            .env("N", "3")
            .env("TEACHER", &c.teacher)
            .env("INPUT", &input)
            .env("OUT", &job)
            .env(
                "DUMP_ARGS",
                "--top-k 16 --max-new-tokens 12 --rows-per-shard 4",
            )
            .output()
            .unwrap()
    };
    let o = run();
    assert!(
        o.status.success(),
        "run-local.sh: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let merged = job.join("merged");
    let (m, w) = (manifest(&merged), manifest(&whole));
    assert_eq!(m.fingerprint, w.fingerprint);
    assert_eq!(m.totals.rows, 22);
    for i in 0..3 {
        assert_eq!(
            manifest(&job.join(format!("part-{i}"))).part.unwrap().count,
            3
        );
    }
    let (rm, rw) = (rows(&merged), rows(&whole));
    assert_eq!(rm.len(), rw.len());
    for (a, b) in rm.iter().zip(&rw) {
        if kd_model::kernels::supported() {
            // Each sequence is computed alone, whatever else is in its batch.
            assert_eq!(a, b, "{}", a.id);
        } else {
            assert_rows_close(a, b);
        }
    }
    // Rerun: the finished slices are kept, and the merge is refused (its folder exists).
    let before = std::fs::read(job.join("part-1/manifest.json")).unwrap();
    let o = run();
    assert!(String::from_utf8_lossy(&o.stdout).contains("already complete"));
    assert_eq!(
        std::fs::read(job.join("part-1/manifest.json")).unwrap(),
        before
    );
    assert!(
        !o.status.success(),
        "a second merge into {} ran",
        merged.display()
    );
    assert_eq!(manifest(&merged).fingerprint, w.fingerprint);
}

#[test]
fn a_second_dump_into_a_locked_folder_fails() {
    let c = Case::new();
    // ~2 s of work; it is killed as soon as the second dump has been refused.
    let input = c.input("in.jsonl", &prompts(80));
    let out = c.path("out");
    let mut first = c.spawn(
        &input,
        &out,
        &["--max-new-tokens", "160", "--batch-size", "1"],
    );
    // tokenizer.json is written once the lock is held.
    let start = Instant::now();
    while !out.join("tokenizer.json").exists() {
        if let Some(status) = first.try_wait().unwrap() {
            panic!("the first dump ended early ({status})");
        }
        assert!(start.elapsed() < Duration::from_secs(60), "no lock taken");
        std::thread::sleep(Duration::from_millis(5));
    }
    let err = c.dump_fails(&input, &out, &["--resume"]);
    let still_running = first.try_wait().unwrap().is_none();
    first.kill().unwrap();
    first.wait().unwrap();
    assert!(
        still_running,
        "the first dump finished before the second tried the lock: make it longer"
    );
    assert!(err.contains("another teacher-dump"), "{err}");
    assert!(err.contains(LOCK_FILE), "{err}");
}

#[test]
fn bad_input_lines_are_named() {
    let c = Case::new();
    let out = c.path("out");
    let good = || prompts(6).iter().map(|v| v.to_string()).collect::<Vec<_>>();
    let write = |name: &str, lines: &[Vec<u8>]| -> PathBuf {
        let p = c.path(name);
        let mut b = Vec::new();
        for l in lines {
            b.extend_from_slice(l);
            b.push(b'\n');
        }
        std::fs::write(&p, b).unwrap();
        p
    };
    let with_line = |name: &str, at: usize, bad: &[u8]| -> PathBuf {
        let mut lines: Vec<Vec<u8>> = good().into_iter().map(String::into_bytes).collect();
        lines.insert(at - 1, bad.to_vec());
        write(name, &lines)
    };

    // Malformed JSON on line 3.
    let p = with_line("json.jsonl", 3, br#"{"id": "x", "prompt": "unterminated"#);
    let err = c.dump_fails(&p, &out, &[]);
    assert!(err.contains(&format!("{}:3:", s(&p))), "{err}");
    assert!(err.contains("invalid JSON"), "{err}");

    // Invalid UTF-8 on line 2.
    let p = with_line("utf8.jsonl", 2, b"{\"id\": \"u\", \"prompt\": \"caf\xe9\"}");
    let err = c.dump_fails(&p, &out, &[]);
    assert!(err.contains(&format!("{}:2:", s(&p))), "{err}");
    assert!(err.contains("UTF-8"), "{err}");

    // A record with none of prompt / messages / instruction on line 4.
    let p = with_line("field.jsonl", 4, br#"{"id": "q", "question": "why?"}"#);
    let err = c.dump_fails(&p, &out, &[]);
    assert!(err.contains(&format!("{}:4:", s(&p))), "{err}");
    assert!(
        err.contains("missing field") && err.contains("`prompt`"),
        "{err}"
    );
    // Nothing was created by the refused runs.
    assert!(!out.exists(), "a refused input created {out:?}");

    // --skip-bad-lines: all three bad lines skipped and reported, the rest dumped.
    let mut lines: Vec<Vec<u8>> = good().into_iter().map(String::into_bytes).collect();
    lines.insert(1, b"{\"id\": \"u\", \"prompt\": \"caf\xe9\"}".to_vec());
    lines.insert(2, br#"{"id": "x", "prompt": "unterminated"#.to_vec());
    lines.insert(3, br#"{"id": "q", "question": "why?"}"#.to_vec());
    let p = write("mixed.jsonl", &lines);
    let o = c.run(&p, &out, &["--skip-bad-lines", "--json"]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    for line in [2, 3, 4] {
        assert!(
            stderr.contains(&format!("skipped {}:{line}:", s(&p))),
            "line {line}: {stderr}"
        );
    }
    let summary: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(summary["skipped_lines"], json!(3));
    assert_eq!(summary["rows"], json!(6));
    assert_eq!(manifest(&out).input["skipped_lines"], json!(3));

    // An empty file (blank lines only).
    let p = write("empty.jsonl", &[b"".to_vec(), b"   ".to_vec()]);
    let err = c.dump_fails(&p, &c.path("out-empty"), &[]);
    assert!(err.contains(s(&p)) && err.contains("no records"), "{err}");

    // top_k above the 300-token vocabulary.
    let p = c.input("ok.jsonl", &prompts(4));
    let err = c.dump_fails(&p, &c.path("out-k"), &["--top-k", "301"]);
    assert!(err.contains("top_k") && err.contains("300"), "{err}");

    // Scoring rows that have no response names the first such row.
    let err = c.dump_fails(&p, &c.path("out-score"), &["--score"]);
    assert!(err.contains("row `p00` (line 1)"), "{err}");

    // A prompt longer than the teacher's context (256 tokens): refused up front, naming the
    // row, its line and the counts (the rule: never truncated silently).
    let mut long = prompts(3);
    long.insert(1, json!({"id": "long", "prompt": "word ".repeat(100)}));
    let p = c.input("long.jsonl", &long);
    let out_long = c.path("out-long");
    let err = c.dump_fails(&p, &out_long, &[]);
    assert!(
        err.contains(&format!("{}: row `long` (line 2)", s(&p))) && err.contains("context of 256"),
        "{err}"
    );
    assert!(!out_long.exists(), "a refused input created {out_long:?}");
}

#[test]
fn scoring_teacher_forces_the_given_responses() {
    let c = Case::soft();
    let recs = vec![
        json!({"id": "a", "prompt": "Say hello.", "response": "Hello there, the sea is blue."}),
        json!({"id": "b", "messages": [
            {"role": "user", "content": "What is 2 plus 2?"},
            {"role": "assistant", "content": "It is 4."},
        ]}),
        json!({"id": "c", "instruction": "Translate to French.", "input": "The cat sleeps.",
               "response": "Le chat dort."}),
        json!({"id": "d", "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Name a colour."},
        ], "response": "Red."}),
        json!({"id": "e", "prompt": "Count.", "response": "one two three four five six seven"}),
    ];
    let texts = [
        "Hello there, the sea is blue.",
        "It is 4.",
        "Le chat dort.",
        "Red.",
        "one two three four five six seven",
    ];
    let input = c.input("in.jsonl", &recs);
    let out = c.path("out");
    c.dump(
        &input,
        &out,
        &["--score", "--rows-per-shard", "2", "--batch-size", "3"],
    );
    let m = manifest(&out);
    assert_eq!(m.settings["mode"], json!("score"));
    assert_eq!(m.totals.rows, 5);
    assert_eq!(
        m.totals.response_tokens, 0,
        "scored rows have no teacher-written tokens"
    );
    let tok = kd_tokenizer::Tokenizer::from_tokenizer_json(&out.join("tokenizer.json")).unwrap();
    let im_end = 2;
    let rs = rows(&out);
    assert_eq!(rs.len(), 5);
    let mut in_topk = 0;
    for (r, text) in rs.iter().zip(texts) {
        assert_eq!(r.source, Source::Scored, "{}", r.id);
        let p = r.prompt_len as usize;
        assert_eq!(p + r.n_pos(), r.input_ids.len(), "{}", r.id);
        assert_eq!(r.token_logprob.len(), r.n_pos());
        assert_eq!(r.topk_ids.len(), r.n_pos() * TOP_K);
        // The response is the given text followed by the end of the assistant turn.
        let resp = r.targets();
        assert_eq!(*resp.last().unwrap(), im_end, "{}", r.id);
        assert_eq!(tok.decode(&resp[..resp.len() - 1], false), text, "{}", r.id);
        for (j, &next) in resp.iter().enumerate() {
            let ids = &r.topk_ids[j * TOP_K..(j + 1) * TOP_K];
            let lps = &r.topk_logprobs[j * TOP_K..(j + 1) * TOP_K];
            assert!(
                lps.windows(2).all(|w| w[0] >= w[1]),
                "{}: top-k at {j} not sorted",
                r.id
            );
            assert!(r.token_logprob[j] <= 0.0);
            match ids.iter().position(|&t| t == next) {
                // The same f64 log-softmax value, rounded to f32 once.
                Some(at) => {
                    assert_eq!(r.token_logprob[j], lps[at], "{} position {j}", r.id);
                    in_topk += 1;
                }
                None => assert!(
                    r.token_logprob[j] <= lps[TOP_K - 1],
                    "{} position {j}: token outside the top-k is more likely than its last",
                    r.id
                ),
            }
        }
    }
    assert!(in_topk > 0, "no scored token was in the top-{TOP_K}");
}

#[test]
fn shard_cat_head_stats_ls_and_schema() {
    let c = Case::new();
    let input = c.input("in.jsonl", &prompts(12));
    let dir = c.path("out");
    // Long responses, so that printing every position overflows a pipe's buffer (below).
    c.dump(&input, &dir, &["--max-new-tokens", "96"]);
    let m = manifest(&dir);

    let head = util::run_ok("shard-cat", &["head", s(&dir), "-n", "2"]);
    assert_eq!(head.matches("── id ").count(), 2, "{head}");
    assert!(head.contains("prompt:\n"), "{head}");
    // Decoded text from the dump's tokenizer.json, not raw ids.
    assert!(head.contains("Name 1 colours of the sea."), "{head}");
    assert!(head.contains("response:\n"), "{head}");
    assert!(!head.contains("ids only"), "{head}");
    // Per-position lines: position, token, probability, then the top tokens.
    let prob_lines = head
        .lines()
        .filter(|l| l.contains(" | ") && l.trim_start().starts_with(|ch: char| ch.is_ascii_digit()))
        .count();
    assert!(prob_lines >= 2, "{head}");
    assert!(head.contains("0."), "{head}");

    // A closed pipe is not an error: shard-cat's own status and stderr, through `head -1`.
    // The whole output is more than twice what a pipe holds (64 KiB) plus what `head` reads
    // ahead, so shard-cat is still writing when `head` exits.
    let all = [
        "head",
        s(&dir),
        "-n",
        "1000",
        "--positions",
        "0",
        "--top",
        "16",
    ];
    let full = util::run_ok("shard-cat", &all);
    assert!(full.len() > 128 << 10, "{} bytes", full.len());
    let status_file = c.path("status");
    let o = std::process::Command::new("sh")
        .arg("-c")
        .arg(r#"{ "$1" head "$2" -n 1000 --positions 0 --top 16; echo $? >"$3"; } | head -1"#)
        .args(["sh", s(&util::bin("shard-cat")), s(&dir), s(&status_file)])
        .env("RAYON_NUM_THREADS", "2")
        .output()
        .unwrap();
    assert!(o.status.success());
    assert_eq!(String::from_utf8_lossy(&o.stdout).lines().count(), 1);
    assert_eq!(
        String::from_utf8_lossy(&o.stderr),
        "",
        "stderr through a closed pipe"
    );
    assert_eq!(std::fs::read_to_string(&status_file).unwrap().trim(), "0");

    let stats: Value =
        serde_json::from_str(&util::run_ok("shard-cat", &["stats", "--json", s(&dir)])).unwrap();
    assert_eq!(stats["rows"], json!(m.totals.rows));
    assert_eq!(stats["positions"], json!(m.totals.positions));
    assert_eq!(stats["tokens"], json!(m.totals.tokens));
    assert_eq!(stats["k"], json!(TOP_K));
    assert_eq!(m.totals.rows, 12);

    let ls = util::run_ok("shard-cat", &["ls", s(&dir)]);
    assert_eq!(m.shards.len(), 3);
    for sh in &m.shards {
        assert!(ls.contains(&sh.file), "{} not in:\n{ls}", sh.file);
    }

    let schema: Value =
        serde_json::from_str(&util::run_ok("shard-cat", &["schema"])).expect("schema is JSON");
    assert_eq!(schema["format"], json!("kd-shard"));
}

/// Python that reads every shard listed in a manifest with pyarrow and prints
/// `{"rows", "tokens", "positions"}`.
const PYARROW_SUMS: &str = r#"
import json, sys
import pyarrow.parquet as pq
d = sys.argv[1]
m = json.load(open(d + "/manifest.json"))
rows = tokens = positions = 0
for s in m["shards"]:
    t = pq.read_table(d + "/" + s["file"])
    ids = t.column("input_ids").to_pylist()
    pl = t.column("prompt_len").to_pylist()
    rows += t.num_rows
    tokens += sum(len(x) for x in ids)
    positions += sum(len(x) - p for x, p in zip(ids, pl))
print(json.dumps({"rows": rows, "tokens": tokens, "positions": positions}))
"#;

/// Whether `python3` imports `modules`; without them a test skips with a note, unless
/// `KD_REQUIRE_PYARROW=1` (CI), which makes their absence a failure.
fn python_has(modules: &str) -> bool {
    let import = format!("import {modules}");
    let has = std::process::Command::new("python3")
        .args(["-c", &import])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has {
        if std::env::var("KD_REQUIRE_PYARROW").is_ok_and(|v| v == "1") {
            panic!("KD_REQUIRE_PYARROW=1 but `python3 -c '{import}'` fails");
        }
        eprintln!("skipped: python3 cannot {import}");
    }
    has
}

#[test]
fn pyarrow_reads_the_shards() {
    if !python_has("pyarrow.parquet") {
        return;
    }
    let c = Case::new();
    let input = c.input("in.jsonl", &prompts(14));
    let dir = c.path("out");
    c.dump(&input, &dir, &[]);
    let o = std::process::Command::new("python3")
        .args(["-c", PYARROW_SUMS, s(&dir)])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got: Value = serde_json::from_slice(&o.stdout).unwrap();
    let t = manifest(&dir).totals;
    assert_eq!(got["rows"], json!(t.rows));
    assert_eq!(got["tokens"], json!(t.tokens));
    assert_eq!(got["positions"], json!(t.positions));
    assert_eq!(t.rows, 14);
}

/// A dump aborted (no cleanup, like SIGKILL) at each dangerous moment: a shard fully written
/// under its temporary name, a shard published but not yet in the manifest, the partial
/// manifest and the final manifest written but not yet renamed. Each time, nothing published
/// is damaged, and `--resume` ends with the uninterrupted dump's bytes and no stray file.
#[test]
fn aborts_at_every_publication_step_then_resume_gives_the_same_dump() {
    let c = Case::soft();
    let input = c.input("in.jsonl", &prompts(12));
    let extra = ["--temperature", "1.0", "--seed", "4"];
    let whole = c.path("whole");
    c.dump(&input, &whole, &extra);
    assert_eq!(manifest(&whole).shards.len(), 3);
    for point in [
        "before-rename:shard-00001.parquet",
        "after-shard:1",
        "before-rename:manifest.partial.json",
        "before-rename:manifest.json",
    ] {
        let out = c.path(&point.replace(':', "-"));
        let a = c.args(&input, &out, &extra);
        let o = std::process::Command::new(util::bin("teacher-dump"))
            .args(strs(&a))
            .env("KD_CRASH_AT", point)
            .env("RAYON_NUM_THREADS", "2")
            .output()
            .unwrap();
        assert!(!o.status.success(), "{point}: the dump did not stop");
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("aborting"),
            "{point}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        // Every published shard is already the final one.
        for name in file_names(&out) {
            if name.ends_with(".parquet") {
                let (x, y) = (
                    std::fs::read(out.join(&name)).unwrap(),
                    std::fs::read(whole.join(&name)).unwrap(),
                );
                assert!(x == y, "{point}: published {name} differs");
            }
        }
        assert!(!out.join(MANIFEST_FILE).exists(), "{point}");
        c.dump(&input, &out, &[&extra[..], &["--resume"]].concat());
        assert_same_bytes(&whole, &out);
        assert_clean(&out);
    }
}

/// Disk full: every file the dump writes is capped (RLIMIT_FSIZE, so a write past the cap
/// fails with EFBIG as on a full disk). The dump stops with an error naming the shard, leaves
/// no temporary file, and a later `--resume` with room completes the same dump.
#[test]
fn a_full_disk_stops_the_dump_naming_the_file_and_loses_nothing() {
    let c = Case::soft();
    let input = c.input("in.jsonl", &prompts(12));
    let extra = [
        "--temperature",
        "1.0",
        "--seed",
        "4",
        "--rows-per-shard",
        "6",
        "--max-new-tokens",
        "48",
    ];
    let whole = c.path("whole");
    c.dump(&input, &whole, &extra);
    let m = manifest(&whole);
    // Room for the tokenizer files and the manifests, not for the shards.
    let cap = m.shards.iter().map(|s| s.bytes).min().unwrap() / 2;
    let biggest_small_file = ["tokenizer.json", "tokenizer_config.json"]
        .iter()
        .map(|f| std::fs::metadata(whole.join(f)).unwrap().len())
        .max()
        .unwrap();
    assert!(
        cap > biggest_small_file,
        "shards too small for this test: cap {cap}, tokenizer file {biggest_small_file}"
    );
    let out = c.path("full");
    let a = c.args(&input, &out, &extra);
    let mut cmd = std::process::Command::new(util::bin("teacher-dump"));
    cmd.args(strs(&a)).env("RAYON_NUM_THREADS", "2");
    util::limit_file_size(&mut cmd, cap);
    let o = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("shard-00000.parquet"), "{err}");
    assert!(err.to_lowercase().contains("too large"), "{err}");
    let names = file_names(&out);
    assert!(!names.iter().any(|n| n.contains(".tmp-")), "{names:?}");
    c.dump(&input, &out, &[&extra[..], &["--resume"]].concat());
    assert_same_bytes(&whole, &out);
    assert_clean(&out);
}

/// Every corruption `shard-cat verify` names is refused by `student-fit` too, with an error
/// naming the file and the problem (never a panic); so are a manifest copied from another
/// dump and a manifest from a future format version.
#[test]
fn damaged_caches_are_refused_by_verify_and_student_fit() {
    let c = Case::soft();
    let input = c.input("in.jsonl", &prompts(12));
    let good = c.path("good");
    c.dump(&input, &good, &[]);
    let other = c.path("other");
    c.dump(&input, &other, &["--top-k", "8"]);
    let victim = "shard-00001.parquet";
    type Damage<'a> = Box<dyn Fn(&Path) + 'a>;
    let cases: Vec<(&str, Damage, &str, &str)> = vec![
        (
            "flipped",
            Box::new(|d: &Path| {
                let p = d.join(victim);
                let mut b = std::fs::read(&p).unwrap();
                let mid = b.len() / 2;
                b[mid] ^= 0x55;
                std::fs::write(&p, b).unwrap();
            }),
            victim,
            "sha256 mismatch",
        ),
        (
            "truncated",
            Box::new(|d: &Path| {
                let p = d.join(victim);
                let b = std::fs::read(&p).unwrap();
                std::fs::write(&p, &b[..b.len() / 2]).unwrap();
            }),
            victim,
            "size mismatch",
        ),
        (
            "missing",
            Box::new(|d: &Path| std::fs::remove_file(d.join(victim)).unwrap()),
            victim,
            "No such file",
        ),
        (
            "unlisted",
            Box::new(|d: &Path| {
                std::fs::copy(d.join(victim), d.join("shard-00099.parquet")).unwrap();
            }),
            "shard-00099.parquet",
            "does not list",
        ),
        (
            "foreign-manifest",
            Box::new(|d: &Path| {
                std::fs::copy(other.join(MANIFEST_FILE), d.join(MANIFEST_FILE)).unwrap();
            }),
            "shard-00000.parquet",
            "mismatch",
        ),
        (
            "future-version",
            Box::new(|d: &Path| {
                let p = d.join(MANIFEST_FILE);
                let mut v: Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
                v["format_version"] = json!(kd_shard::FORMAT_VERSION + 1);
                std::fs::write(&p, serde_json::to_vec(&v).unwrap()).unwrap();
            }),
            MANIFEST_FILE,
            "version",
        ),
    ];
    for (name, damage, file, what) in cases {
        let d = c.path(name);
        copy_dir(&good, &d);
        damage(&d);
        let o = shard_cat(&["verify", s(&d)]);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "verify {name}: {stderr}");
        assert!(stderr.contains(file), "verify {name}: {stderr}");
        let o = util::run(
            "student-fit",
            &[
                "eval",
                "--student",
                s(&c.teacher),
                "--shards",
                s(&d),
                "--generations",
                "0",
            ],
        );
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "student-fit {name}: {err}");
        assert!(!err.contains("panicked"), "student-fit {name}: {err}");
        assert!(
            err.contains(&d.join(file).display().to_string()) && err.contains(what),
            "student-fit {name}: expected {file} and {what:?} in: {err}"
        );
    }
    // The undamaged cache evaluates.
    util::run_ok(
        "student-fit",
        &[
            "eval",
            "--student",
            s(&c.teacher),
            "--shards",
            s(&good),
            "--generations",
            "0",
        ],
    );
}

/// The Python package (`python/`, `kd_cache`) decodes every format as the Rust reader does:
/// format 1, format 2 with its tail shift, draws with counts; and it checks the shards'
/// hashes. The script prints each row's decoded values; they must equal the Rust reader's
/// within float rounding (Python decodes in f64, the reader stores f32).
#[test]
fn the_python_package_reads_every_format_as_the_reader_does() {
    if !python_has("pyarrow.parquet, numpy") {
        return;
    }
    let c = Case::soft();
    let input = c.input("in.jsonl", &prompts(5));
    let script = r#"
import json, sys
import kd_cache
rows = []
for r in kd_cache.Cache(sys.argv[1]).rows():
    d = {"id": r["id"], "topk_ids": r["topk_ids"].ravel().tolist(),
         "topk_logprobs": r["topk_logprobs"].ravel().tolist(),
         "token_logprob": r["token_logprob"].tolist()}
    if "sample_ids" in r:
        d["sample_ids"] = r["sample_ids"].ravel().tolist()
        d["sample_logprobs"] = r["sample_logprobs"].ravel().tolist()
    rows.append(d)
print(json.dumps(rows))
"#;
    let cases: [(&str, &[&str]); 3] = [
        ("v1", &["--shard-format", "1"]),
        ("v2", &[]),
        (
            "draws",
            &["--targets", "top:4,sample:6", "--sampling-temperature", "1"],
        ),
    ];
    for (name, extra) in cases {
        let dir = c.path(name);
        c.dump(&input, &dir, extra);
        let o = read_with_kd_cache(script, &dir);
        assert!(
            o.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let got: Vec<Value> = serde_json::from_slice(&o.stdout).unwrap();
        let want = rows(&dir);
        assert_eq!(got.len(), want.len());
        let mut worst = 0f64;
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(g["id"], w.id.as_str());
            assert_eq!(g["topk_ids"], json!(w.topk_ids));
            let close = |key: &str, xs: &[f32], worst: &mut f64| {
                let ys: Vec<f64> = serde_json::from_value(g[key].clone()).unwrap();
                assert_eq!(ys.len(), xs.len(), "{name} {key}");
                for (y, x) in ys.iter().zip(xs) {
                    *worst = worst.max((y - f64::from(*x)).abs());
                }
            };
            close("topk_logprobs", &w.topk_logprobs, &mut worst);
            close("token_logprob", &w.token_logprob, &mut worst);
            if !w.sample_ids.is_empty() {
                assert_eq!(g["sample_ids"], json!(w.sample_ids));
                close("sample_logprobs", &w.sample_logprobs, &mut worst);
            }
        }
        assert!(
            worst < 1e-5,
            "{name}: the Python decoding is {worst} nats from the reader's"
        );
    }
    // A shard that does not match its manifest's hash is refused, naming the file.
    let dir = c.path("v2");
    let shard = dir.join(&manifest(&dir).shards[0].file);
    let mut bytes = std::fs::read(&shard).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&shard, bytes).unwrap();
    let o = read_with_kd_cache(script, &dir);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("sha256"), "{err}");
}

/// Runs `script` with the repository's `python/` package importable and the cache `dir` as
/// its argument.
fn read_with_kd_cache(script: &str, dir: &Path) -> Output {
    std::process::Command::new("python3")
        .env("PYTHONPATH", util::root().join("python"))
        .args(["-c", script, s(dir)])
        .output()
        .unwrap()
}
