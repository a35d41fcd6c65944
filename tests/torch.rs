//! The PyTorch path (`python/`: `kd_cache.losses`, `kd_cache.torch_data` and
//! `examples/ddp_train.py`) against the project's own: the torch losses reproduce the float64
//! loss oracle, and a 2-process DDP run under `torchrun` (gloo, on the CPU) starts from
//! student-fit's initial weights with student-fit's first batch and its loss, while its ranks
//! see disjoint rows that together cover the epoch. Skipped without torch and transformers,
//! unless `KD_REQUIRE_TORCH=1` (CI).

mod util;

use std::path::Path;

fn has_torch() -> bool {
    util::python_imports_torch("torch, transformers")
}

fn python(args: &[&str]) -> std::process::Output {
    util::python_torch().args(args).output().unwrap()
}

#[test]
fn the_torch_losses_reproduce_the_float64_oracle() {
    if !has_torch() {
        return;
    }
    let o = python(&[
        util::root()
            .join("python/tests/check_losses.py")
            .to_str()
            .unwrap(),
        util::root()
            .join("tests/reference/loss-cases.json")
            .to_str()
            .unwrap(),
    ]);
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["cases"], 62);
    assert!(r["worst_relative_error"].as_f64().unwrap() <= 1e-9, "{r}");
}

/// The batching both trainers are given: the same batches.
const BATCHING: [&str; 6] = ["--token-budget", "256", "--max-len", "256", "--seed", "3"];

/// student-fit's first step on `shards` (its logged loss), and the same initialisation
/// exported untrained (`--steps 0`).
fn student_fit_first_step(
    dir: &Path,
    shards: &Path,
    teacher: &Path,
    name: &str,
    extra: &[&str],
) -> (f64, std::path::PathBuf) {
    let fit = |out: &Path, steps: &str| {
        let mut args = vec![
            "--shards",
            shards.to_str().unwrap(),
            "--init-from-teacher",
            teacher.to_str().unwrap(),
            "--keep-layers",
            "0",
            "--steps",
            steps,
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(&BATCHING);
        args.extend_from_slice(extra);
        util::run_ok("student-fit", &args);
    };
    let (out, init) = (dir.join(name), dir.join(format!("{name}-init")));
    fit(&out, "1");
    fit(&init, "0");
    let first = util::read_jsonl(&out.join("metrics.jsonl"))
        .into_iter()
        .find(|m| m["step"] == 1 && m.get("loss").is_some())
        .expect("a step-1 line");
    (first["loss"].as_f64().unwrap(), init.join("student"))
}

fn torchrun(
    dir: &Path,
    student: &Path,
    shards: &Path,
    name: &str,
    extra: &[&str],
) -> Vec<serde_json::Value> {
    let out = dir.join(name);
    let script = util::root().join("python/examples/ddp_train.py");
    let mut args = vec![
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        script.to_str().unwrap(),
        "--student",
        student.to_str().unwrap(),
        "--cache",
        shards.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--steps",
        "2",
        "--threads",
        "1",
    ];
    args.extend_from_slice(&BATCHING);
    args.extend_from_slice(extra);
    let o = python(&args);
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (0..2)
        .map(|r| {
            serde_json::from_slice(&std::fs::read(out.join(format!("rank-{r}.json"))).unwrap())
                .unwrap()
        })
        .collect()
}

#[test]
fn a_two_process_ddp_run_starts_where_student_fit_does() {
    if !has_torch() {
        return;
    }
    let dir = util::tempdir();
    let teacher = dir.path().join("teacher");
    kd_model::testing::write_tiny_teacher(&teacher, 9).unwrap();
    let rows: Vec<serde_json::Value> = (0..40)
        .map(|i| serde_json::json!({"id": format!("q{i:02}"), "prompt": format!("list {} then {}", i % 6, i * 7 % 17)}))
        .collect();
    let input = dir.path().join("in.jsonl");
    util::write_jsonl(&input, &rows);
    let dump = |out: &str, extra: &[&str]| {
        let out = dir.path().join(out);
        let mut args = vec![
            "--teacher",
            teacher.to_str().unwrap(),
            "--input",
            input.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--max-new-tokens",
            "12",
            "--sampling-temperature",
            "1",
            "--seed",
            "5",
            "--rows-per-shard",
            "16",
            "--no-progress",
        ];
        args.extend_from_slice(extra);
        util::run_ok("teacher-dump", &args);
        out
    };
    let cases: [(&str, &[&str], &[&str], &[&str]); 2] = [
        (
            "topk",
            &["--targets", "top:16"],
            &["--loss-temperature", "2", "--alpha", "0.7"],
            &["--temperature", "2", "--alpha", "0.7"],
        ),
        (
            "sampled",
            &["--targets", "top:4,sample:8"],
            &["--targets", "sampled"],
            &["--targets", "sampled"],
        ),
    ];
    for (name, dump_args, fit_args, torch_args) in cases {
        let shards = dump(&format!("{name}-shards"), dump_args);
        let (loss, init) = student_fit_first_step(dir.path(), &shards, &teacher, name, fit_args);
        let ranks = torchrun(
            dir.path(),
            &init,
            &shards,
            &format!("{name}-ddp"),
            torch_args,
        );
        let first = &ranks[0]["steps"][0];
        assert_eq!(first["batch"], 0, "{name}");
        // On sampled targets student-fit reports the plug-in KL(p̂‖q), whose gradient the
        // unbiased estimate shares.
        let got = first
            .get("plug_in_loss")
            .unwrap_or(&first["loss"])
            .as_f64()
            .unwrap();
        if name == "sampled" {
            assert!(first.get("plug_in_loss").is_some());
        }
        assert!(
            (got - loss).abs() <= 1e-5,
            "{name}: the DDP run's first-batch loss {got} against student-fit's {loss}"
        );
        // Rank 1 trains on the second batch of the same sequence.
        assert_eq!(ranks[1]["steps"][0]["batch"], 1, "{name}");
        let (a, b): (Vec<u64>, Vec<u64>) = (
            serde_json::from_value(ranks[0]["epoch_rows"].clone()).unwrap(),
            serde_json::from_value(ranks[1]["epoch_rows"].clone()).unwrap(),
        );
        assert!(!a.is_empty() && !b.is_empty(), "{name}");
        assert!(
            a.iter().all(|r| !b.contains(r)),
            "{name}: the ranks share rows"
        );
        let mut all: Vec<u64> = a.iter().chain(&b).copied().collect();
        all.sort_unstable();
        let n = ranks[0]["training_rows"].as_u64().unwrap();
        assert_eq!(all.len() as u64, n, "{name}: the epoch is covered once");
        all.dedup();
        assert_eq!(all.len() as u64, n, "{name}");
    }
}
