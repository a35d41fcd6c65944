//! `student-fit` end to end on a tiny teacher made in the test: a run killed with SIGKILL and
//! resumed ends with the same weights (byte-identical) as an uninterrupted run; the export
//! directory has what `transformers` needs; held-out KL falls.

mod util;

use std::path::Path;
use std::time::{Duration, Instant};

fn pipeline(dir: &Path, shards: &Path, teacher: &Path, out: &Path) -> std::path::PathBuf {
    let text = format!(
        r#"
[fit]
shards = "{}"
out = "{}"
init = {{ from_teacher = {{ path = "{}", keep_layers = [0] }} }}
loss = {{ divergence = {{ kind = "forward_kl" }}, temperature = 2.0, alpha = 0.7 }}
steps = 30
token_budget = 384
max_len = 256
lr = 3e-3
min_lr = 3e-4
warmup_steps = 3
decay = "cosine"
max_grad_norm = 1.0
holdout_fraction = 0.25
seed = 4
log_every = 1
checkpoint_every = 5
logits_chunk = 64
"#,
        shards.display(),
        out.display(),
        teacher.display()
    );
    let p = dir.join(format!(
        "fit-{}.toml",
        out.file_name().unwrap().to_string_lossy()
    ));
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn killed_and_resumed_run_equals_an_uninterrupted_one() {
    let (dir, teacher, input) = tiny_teacher_and_input();
    let shards = dir.path().join("shards");
    util::run_ok(
        "teacher-dump",
        &[
            "--teacher",
            teacher.to_str().unwrap(),
            "--input",
            input.to_str().unwrap(),
            "--out",
            shards.to_str().unwrap(),
            "--top-k",
            "16",
            "--max-new-tokens",
            "16",
            "--temperature",
            "1.0",
            "--seed",
            "2",
            "--rows-per-shard",
            "10",
            "--no-progress",
        ],
    );

    let a = dir.path().join("a");
    let pa = pipeline(dir.path(), &shards, &teacher, &a);
    let summary = util::run_ok(
        "student-fit",
        &["--pipeline", pa.to_str().unwrap(), "--json"],
    );
    let s: serde_json::Value = serde_json::from_str(&summary).unwrap();
    let (before, after) = (
        s["initial"]["forward_kl"].as_f64().unwrap(),
        s["final_eval"]["forward_kl"].as_f64().unwrap(),
    );
    assert!(after < before, "held-out forward KL {before} -> {after}");
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "generation_config.json",
    ] {
        assert!(a.join("student").join(f).exists(), "export lacks {f}");
    }
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(a.join("student/config.json")).unwrap()).unwrap();
    assert_eq!(config["architectures"][0], "LlamaForCausalLM");
    assert_eq!(config["num_hidden_layers"], 1);
    // Names, shapes and dtypes as Python's `safetensors` reads them (scripts/check_export.py).
    let has_py = std::process::Command::new("python3")
        .args(["-c", "import safetensors, numpy"])
        .status()
        .is_ok_and(|s| s.success());
    if has_py {
        let script = util::root().join("scripts/check_export.py");
        let out = std::process::Command::new("python3")
            .arg(&script)
            .arg(a.join("student"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "check_export.py: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    } else if std::env::var("KD_REQUIRE_SAFETENSORS").is_ok_and(|v| v == "1") {
        panic!("KD_REQUIRE_SAFETENSORS=1 but Python safetensors/numpy are missing");
    } else {
        eprintln!("skipped: Python safetensors/numpy not installed (export names not checked)");
    }

    // `logits` runs on the kernel engine's forward pass on the CPU and on candle's elsewhere:
    // the same log-probs; a CUDA device in a binary without CUDA is refused by name.
    let logits = |extra: &[&str]| -> serde_json::Value {
        let student = a.join("student");
        let args = [
            &[
                "logits",
                "--student",
                student.to_str().unwrap(),
                "--ids",
                "1,40,2,5",
            ],
            extra,
        ]
        .concat();
        serde_json::from_str(&util::run_ok("student-fit", &args)).unwrap()
    };
    let cpu = logits(&["--device", "cpu"]);
    assert_eq!(cpu["logprobs"].as_array().unwrap().len(), 4);
    assert_eq!(logits(&[]), cpu);
    if !cfg!(feature = "cuda") {
        let student = a.join("student");
        let o = util::run(
            "student-fit",
            &[
                "logits",
                "--student",
                student.to_str().unwrap(),
                "--ids",
                "1",
                "--device",
                "cuda",
            ],
        );
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && err.contains("built without CUDA"),
            "{err}"
        );
    }
    // With torch and transformers (KD_PYTHON names an interpreter that has them), the export
    // gives transformers' log-probs within 1e-4 nats at every position and token.
    let py = std::env::var("KD_PYTHON").unwrap_or_else(|_| "python3".into());
    let has_torch = std::process::Command::new(&py)
        .args(["-c", "import torch, transformers"])
        .status()
        .is_ok_and(|s| s.success());
    if has_torch {
        let ours = util::run_ok(
            "student-fit",
            &[
                "logits",
                "--student",
                a.join("student").to_str().unwrap(),
                "--ids",
                "1,40,80,120,160,200,240,2,5,77",
            ],
        );
        let f = dir.path().join("ours.json");
        std::fs::write(&f, ours).unwrap();
        let out = std::process::Command::new(&py)
            .arg(util::root().join("scripts/check_export.py"))
            .arg(a.join("student"))
            .arg("--ours")
            .arg(&f)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "check_export.py --ours: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("{}", String::from_utf8_lossy(&out.stdout).trim());
    } else {
        eprintln!("skipped: {py} lacks torch/transformers (logits not compared)");
    }

    // Same run, killed after its second checkpoint, then resumed.
    let b = dir.path().join("b");
    let pb = pipeline(dir.path(), &shards, &teacher, &b);
    kill_at_checkpoint(&["--pipeline", pb.to_str().unwrap(), "--json"], &b, 10);
    assert!(
        !b.join("student").exists() || !b.join("checkpoints/step-00000030").exists(),
        "the run was not interrupted"
    );
    // A different setting is refused, naming it.
    let text = std::fs::read_to_string(&pb)
        .unwrap()
        .replace("lr = 3e-3", "lr = 1e-3");
    let pc = dir.path().join("changed.toml");
    std::fs::write(&pc, text).unwrap();
    let refused = util::run(
        "student-fit",
        &["--pipeline", pc.to_str().unwrap(), "--resume"],
    );
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("`lr`"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    util::run_ok(
        "student-fit",
        &["--pipeline", pb.to_str().unwrap(), "--resume", "--json"],
    );
    let wa = std::fs::read(a.join("checkpoints/step-00000030/model.safetensors")).unwrap();
    let wb = std::fs::read(b.join("checkpoints/step-00000030/model.safetensors")).unwrap();
    assert!(
        wa == wb,
        "resumed weights differ from the uninterrupted run"
    );
    let oa = std::fs::read(a.join("checkpoints/step-00000030/optimizer.safetensors")).unwrap();
    let ob = std::fs::read(b.join("checkpoints/step-00000030/optimizer.safetensors")).unwrap();
    assert!(oa == ob, "resumed optimizer state differs");
    // No temporary checkpoint directory survives.
    for e in std::fs::read_dir(b.join("checkpoints")).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        assert!(name.starts_with("step-"), "stray {name}");
    }
    // Every step's logged loss equals the uninterrupted run's (the resumed run repeats the
    // steps after its checkpoint: the last line of each step counts).
    assert_eq!(step_losses(&a), step_losses(&b), "logged losses differ");

    // Ctrl-C: a checkpoint at the next step boundary, a clear message, then an exact resume.
    let c = dir.path().join("c");
    let pc = pipeline(dir.path(), &shards, &teacher, &c);
    let child = std::process::Command::new(util::bin("student-fit"))
        .args(["--pipeline", pc.to_str().unwrap()])
        .env("RAYON_NUM_THREADS", "2")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while step_losses(&c).len() < 7 {
        assert!(t0.elapsed() < Duration::from_secs(60), "no progress");
        std::thread::sleep(Duration::from_millis(5));
    }
    let sent = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "an interrupted run exits non-zero");
    assert!(err.contains("interrupted at step"), "{err}");
    let resumable = latest_step(&c);
    assert!(
        (7..30).contains(&resumable),
        "checkpoint at step {resumable}"
    );
    util::run_ok(
        "student-fit",
        &["--pipeline", pc.to_str().unwrap(), "--resume", "--json"],
    );
    let wc = std::fs::read(c.join("checkpoints/step-00000030/model.safetensors")).unwrap();
    assert!(wa == wc, "weights after Ctrl-C and resume differ");
    assert_eq!(step_losses(&a), step_losses(&c), "logged losses differ");
}

/// Starts `student-fit args`, and kills it (SIGKILL) once its checkpoint of step `step`
/// under `out` is published.
fn kill_at_checkpoint(args: &[&str], out: &Path, step: u64) {
    let mut child = util::spawn("student-fit", args);
    let t0 = Instant::now();
    let state = out.join(format!("checkpoints/step-{step:08}/state.json"));
    while !state.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no checkpoint appeared"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
}

/// The candle engine, still the reference: a run killed with SIGKILL and resumed ends
/// bit-identical to an uninterrupted one on the same engine, and the two engines' training
/// curves agree (held-out forward KL after the same 30 steps within 1%).
#[test]
fn the_candle_engine_resumes_exactly_and_agrees_with_the_kernel_engine() {
    let (dir, teacher, shards) = tiny_setup();
    let run = |name: &str, engine: &str| -> (std::path::PathBuf, serde_json::Value) {
        let out = dir.path().join(name);
        let p = pipeline(dir.path(), &shards, &teacher, &out);
        let s = util::run_ok(
            "student-fit",
            &[
                "--pipeline",
                p.to_str().unwrap(),
                "--engine",
                engine,
                "--json",
            ],
        );
        (out, serde_json::from_str(&s).unwrap())
    };
    let (k, sk) = run("kernels", "kernels");
    let (c, sc) = run("candle", "candle");
    assert_eq!(sk["engine"], "kernels");
    assert_eq!(sc["engine"], "candle");
    // Without CUDA in the binary, `--device auto` (the default) trains on the CPU, and
    // summary.json says so.
    if !cfg!(feature = "cuda") {
        assert_eq!(sk["device"], "cpu");
        let file: serde_json::Value =
            serde_json::from_slice(&std::fs::read(k.join("summary.json")).unwrap()).unwrap();
        assert_eq!(file["device"], "cpu");
    }
    let (fk, fc) = (
        sk["final_eval"]["forward_kl"].as_f64().unwrap(),
        sc["final_eval"]["forward_kl"].as_f64().unwrap(),
    );
    let (ik, ic) = (
        sk["initial"]["forward_kl"].as_f64().unwrap(),
        sc["initial"]["forward_kl"].as_f64().unwrap(),
    );
    eprintln!("held-out forward KL: kernels {ik:.5} -> {fk:.5}, candle {ic:.5} -> {fc:.5}");
    assert!(((ik - ic) / ic).abs() < 1e-5, "initial evaluations differ");
    assert!(fk < ik && ((fk - fc) / fc).abs() < 0.01, "{fk} vs {fc}");
    assert!(
        k.join("checkpoints/step-00000030/model.safetensors")
            .exists()
    );

    let b = dir.path().join("candle-killed");
    let pb = pipeline(dir.path(), &shards, &teacher, &b);
    let args = [
        "--pipeline",
        pb.to_str().unwrap(),
        "--engine",
        "candle",
        "--json",
    ];
    kill_at_checkpoint(&args, &b, 10);
    let resumed = [&args[..], &["--resume"]].concat();
    util::run_ok("student-fit", &resumed);

    // bf16 products (f32 master weights) pick the candle engine by themselves and train
    // close to the f32 run without equalling it; the kernel engine refuses them.
    let h = dir.path().join("bf16");
    let ph = pipeline(dir.path(), &shards, &teacher, &h);
    let s = util::run_ok(
        "student-fit",
        &[
            "--pipeline",
            ph.to_str().unwrap(),
            "--precision",
            "bf16",
            "--json",
        ],
    );
    let sh: serde_json::Value = serde_json::from_str(&s).unwrap();
    assert_eq!(sh["engine"], "candle");
    assert_eq!(sh["precision"], "bf16");
    assert_eq!(sc["precision"], "f32");
    let fh = sh["final_eval"]["forward_kl"].as_f64().unwrap();
    eprintln!("held-out forward KL after bf16 products: {fh:.5} (f32 {fc:.5})");
    assert!(fh != fc && ((fh - fc) / fc).abs() < 0.05, "{fh} vs {fc}");
    let o = util::run(
        "student-fit",
        &[
            "--pipeline",
            ph.to_str().unwrap(),
            "--out",
            dir.path().join("bf16-kernels").to_str().unwrap(),
            "--precision",
            "bf16",
            "--engine",
            "kernels",
        ],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("--precision bf16"),
        "{err}"
    );
    for f in ["model.safetensors", "optimizer.safetensors"] {
        let wa = std::fs::read(c.join("checkpoints/step-00000030").join(f)).unwrap();
        let wb = std::fs::read(b.join("checkpoints/step-00000030").join(f)).unwrap();
        assert!(wa == wb, "{f}: the resumed candle run differs");
    }
    assert_eq!(step_losses(&c), step_losses(&b), "logged losses differ");
}

/// Step → loss of a run's metrics.jsonl (training lines; the last line of a step wins).
fn step_losses(out: &Path) -> std::collections::BTreeMap<u64, f64> {
    let Ok(text) = std::fs::read_to_string(out.join("metrics.jsonl")) else {
        return Default::default();
    };
    text.lines()
        .filter(|l| l.ends_with('}'))
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| Some((v["step"].as_u64()?, v.get("loss")?.as_f64()?)))
        .collect()
}

/// The newest checkpoint's step.
fn latest_step(out: &Path) -> u64 {
    let ck = kd_student::fit::latest_checkpoint(out).expect("a checkpoint");
    ck.file_name().unwrap().to_string_lossy()[5..]
        .parse()
        .unwrap()
}

/// `teacher-dump` with `--top-k 16` (unless `extra` gives `--targets`), 12 new tokens and 16
/// rows per shard, then `extra`.
fn dump(teacher: &Path, input: &Path, out: &Path, extra: &[&str]) {
    let top: &[&str] = if extra.contains(&"--targets") {
        &[]
    } else {
        &["--top-k", "16"]
    };
    let mut args = vec![
        "--teacher",
        teacher.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(top);
    args.extend_from_slice(&[
        "--max-new-tokens",
        "12",
        "--rows-per-shard",
        "16",
        "--no-progress",
    ]);
    args.extend_from_slice(extra);
    util::run_ok("teacher-dump", &args);
}

#[test]
fn two_stages_on_a_mixed_dump_then_eval() {
    let dir = util::tempdir();
    let teacher = dir.path().join("teacher");
    kd_model::testing::write_tiny_teacher(&teacher, 21).unwrap();
    // 30 prompts to generate from and 14 real responses to score, in one mixed dump.
    let mut rows: Vec<serde_json::Value> = (0..30)
        .map(|i| serde_json::json!({"id": format!("g{i:02}"), "prompt": format!("list {} and {}", i % 7, i * 5 % 13)}))
        .collect();
    rows.extend((0..14).map(|i| serde_json::json!({"id": format!("s{i:02}"), "prompt": format!("say {i}"), "response": format!("{i} and {} again", i + 1)})));
    let input = dir.path().join("in.jsonl");
    util::write_jsonl(&input, &rows);
    let shards = dir.path().join("shards");
    dump(&teacher, &input, &shards, &["--mixed"]);
    let set = kd_student::data::ShardSet::open(&shards).unwrap();
    let scored = set
        .rows()
        .filter(|r| r.source == kd_shard::Source::Scored)
        .count();
    assert_eq!((set.len(), scored), (44, 14), "mixed dump rows");
    for r in set.rows() {
        assert_eq!(
            r.source == kd_shard::Source::Scored,
            r.id.starts_with('s'),
            "{}",
            r.id
        );
    }

    let out = dir.path().join("st");
    let text = std::fs::read_to_string(pipeline(dir.path(), &shards, &teacher, &out))
        .unwrap()
        .replace("steps = 30", "steps = 12\nmix = 0.7\neval_every = 4")
        + "\n[finetune]\nloss = { divergence = { kind = \"forward_kl\" }, alpha = 0.0 }\nsteps = 6\nlr = 1e-3\ntrain_on = \"scored\"\nmix = 0.5\n";
    // `mix` needs both kinds; a scored-only stage must not mix.
    let p = dir.path().join("two.toml");
    std::fs::write(&p, text.replace("mix = 0.5\n", "")).unwrap();
    let both: serde_json::Value = serde_json::from_str(&util::run_ok(
        "student-fit",
        &["--pipeline", p.to_str().unwrap(), "--json"],
    ))
    .unwrap();
    let stages = both.as_array().expect("one summary per stage");
    assert_eq!(stages.len(), 2);
    assert_eq!(stages[0]["stage"], "distill");
    assert_eq!(stages[1]["stage"], "finetune");
    let (s1, s2) = (&stages[0]["summary"], &stages[1]["summary"]);
    // Stage two starts from stage one's export: same weights, same held-out rows.
    let (end1, start2) = (
        s1["final_eval"]["forward_kl"].as_f64().unwrap(),
        s2["initial"]["forward_kl"].as_f64().unwrap(),
    );
    assert!(
        (end1 - start2).abs() < 1e-9 * end1.abs().max(1.0),
        "stage two starts at {start2}, stage one ended at {end1}"
    );
    assert!(end1 < s1["initial"]["forward_kl"].as_f64().unwrap());
    let ft = dir.path().join("st-finetune");
    assert!(ft.join("student/model.safetensors").exists());
    // Stage one evaluated every 4 steps: at 0, 4, 8 and 12.
    let evals: Vec<u64> = util::read_jsonl(&out.join("metrics.jsonl"))
        .iter()
        .filter(|v| v.get("eval").is_some())
        .map(|v| v["step"].as_u64().unwrap())
        .collect();
    assert_eq!(evals, [0, 4, 8, 12]);
    // Stage two trained on scored rows only, with hard cross-entropy: its divergence part is
    // not in the loss.
    for v in util::read_jsonl(&ft.join("metrics.jsonl")) {
        if let Some(l) = v.get("loss") {
            assert_eq!(
                l.as_f64(),
                v["hard_ce"].as_f64(),
                "alpha = 0 is hard CE only"
            );
        }
    }

    // `student-fit eval` on the same held-out rows reproduces the run's final figures.
    let ev = dir.path().join("ev");
    let r: serde_json::Value = serde_json::from_str(&util::run_ok(
        "student-fit",
        &[
            "eval",
            "--student",
            out.join("student").to_str().unwrap(),
            "--shards",
            shards.to_str().unwrap(),
            "--holdout-fraction",
            "0.25",
            "--max-len",
            "256",
            "--generations",
            "3",
            "--max-new-tokens",
            "8",
            "--out",
            ev.to_str().unwrap(),
            "--json",
        ],
    ))
    .unwrap();
    for m in ["forward_kl", "reverse_kl", "top1_agreement", "nll"] {
        let (x, y) = (
            r[m].as_f64().unwrap(),
            s1["final_eval"][m].as_f64().unwrap(),
        );
        assert!((x - y).abs() < 1e-9 * y.abs().max(1.0), "{m}: {x} vs {y}");
    }
    let gens = util::read_jsonl(&ev.join("generations.jsonl"));
    assert_eq!(gens.len(), 3);
    // The first held-out rows, in row order, each with the teacher's and the student's text.
    let held: Vec<String> = set
        .rows()
        .filter(|r| kd_student::data::is_held_out(r.id, 0.25))
        .take(3)
        .map(|r| r.id.to_string())
        .collect();
    let ids: Vec<String> = gens
        .iter()
        .map(|g| g["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, held);
    for g in &gens {
        for f in ["prompt", "teacher", "student"] {
            assert!(g[f].is_string(), "{g}");
        }
    }
    let on_disk: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ev.join("eval.json")).unwrap()).unwrap();
    assert_eq!(on_disk["forward_kl"], r["forward_kl"]);
    // Each answer is scored from its own texts, and eval.json's `answers` summarises them.
    let (mut rouge, mut answered) = (0.0, 0.0);
    for g in &gens {
        let f = kd_student::answers::rouge_l_f1(
            g["student"].as_str().unwrap(),
            g["teacher"].as_str().unwrap(),
        );
        assert_eq!(g["rouge_l_f1"].as_f64().unwrap(), f, "{g}");
        let (ended, tokens) = (
            g["ended"].as_bool().unwrap(),
            g["student_tokens"].as_u64().unwrap(),
        );
        // An answer without end-of-turn used the whole limit of 8 new tokens.
        assert!(tokens <= 8 && (ended || tokens == 8), "{g}");
        rouge += f / 3.0;
        answered += f64::from(u8::from(
            ended && !g["student"].as_str().unwrap().trim().is_empty(),
        )) / 3.0;
    }
    let a = &on_disk["answers"];
    assert_eq!(a["count"], 3);
    assert!(
        (a["rouge_l_f1"].as_f64().unwrap() - rouge).abs() < 1e-12,
        "{a}"
    );
    assert!(
        (a["answered_share"].as_f64().unwrap() - answered).abs() < 1e-12,
        "{a}"
    );
    // A student with another vocabulary is refused, naming both sizes.
    let other = dir.path().join("other");
    let cfg = kd_model::testing::tiny_config(304);
    let w = kd_model::testing::random_weights(&cfg, 3).unwrap();
    kd_model::testing::write_hf_dir(&other, &cfg, &w, &kd_tokenizer::Tokenizer::tiny_for_tests())
        .unwrap();
    let refused = util::run(
        "student-fit",
        &[
            "eval",
            "--student",
            other.to_str().unwrap(),
            "--shards",
            shards.to_str().unwrap(),
        ],
    );
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("vocabulary"), "{err}");
}

#[test]
fn two_teachers_are_distilled_as_their_mixture() {
    let dir = util::tempdir();
    let (ta, tb) = (dir.path().join("ta"), dir.path().join("tb"));
    kd_model::testing::write_tiny_teacher(&ta, 21).unwrap();
    kd_model::testing::write_tiny_teacher(&tb, 22).unwrap();
    // Both teachers score the same texts, so their rows hold the same tokens.
    let rows: Vec<serde_json::Value> = (0..32)
        .map(|i| serde_json::json!({"id": format!("r{i:02}"), "prompt": format!("add {} to {}", i % 5, i * 7 % 9), "response": format!("it is {} or so", i * 3 % 17)}))
        .collect();
    let input = dir.path().join("in.jsonl");
    util::write_jsonl(&input, &rows);
    let (sa, sb) = (dir.path().join("sa"), dir.path().join("sb"));
    dump(&ta, &input, &sa, &["--score"]);
    dump(&tb, &input, &sb, &["--score"]);
    let base = std::fs::read_to_string(pipeline(dir.path(), &sa, &ta, &dir.path().join("one")))
        .unwrap()
        .replace("steps = 30", "steps = 10");
    let single = dir.path().join("single.toml");
    std::fs::write(&single, &base).unwrap();
    let two = dir.path().join("two.toml");
    std::fs::write(
        &two,
        base.replace(
            "[fit]\n",
            &format!(
                "[fit]\nextra_teachers = [{{ shards = \"{}\", weight = 0.5 }}]\n",
                sb.display()
            ),
        )
        .replace("/one\"", "/two\""),
    )
    .unwrap();
    let parse = |s: String| serde_json::from_str::<serde_json::Value>(&s).unwrap();
    let s1 = parse(util::run_ok(
        "student-fit",
        &["--pipeline", single.to_str().unwrap(), "--json"],
    ));
    let s2 = parse(util::run_ok(
        "student-fit",
        &["--pipeline", two.to_str().unwrap(), "--json"],
    ));
    let kl = |s: &serde_json::Value, at: &str| s[at]["forward_kl"].as_f64().unwrap();
    // The same student at the start is farther from or nearer to the mixture than to teacher
    // A alone: the targets differ.
    assert!(
        (kl(&s1, "initial") - kl(&s2, "initial")).abs() > 1e-3,
        "mixture targets equal teacher A's"
    );
    assert!(kl(&s2, "final_eval") < kl(&s2, "initial"));

    // A teacher over other rows is refused, naming the field.
    let other_rows: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            let mut r = r.clone();
            r["id"] = format!("x{}", r["id"].as_str().unwrap()).into();
            r
        })
        .collect();
    let other_in = dir.path().join("other.jsonl");
    util::write_jsonl(&other_in, &other_rows);
    let sc = dir.path().join("sc");
    dump(&tb, &other_in, &sc, &["--score"]);
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        std::fs::read_to_string(&two)
            .unwrap()
            .replace(sb.to_str().unwrap(), sc.to_str().unwrap()),
    )
    .unwrap();
    let refused = util::run("student-fit", &["--pipeline", bad.to_str().unwrap()]);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("id") && err.contains("r00"), "{err}");
}

/// A tiny teacher, a 40-row dump of it and the folder they live in.
/// A temp dir with the tiny teacher (seed 21) and 40 short prompts: `(dir, teacher, input)`.
fn tiny_teacher_and_input() -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let dir = util::tempdir();
    let teacher = dir.path().join("teacher");
    kd_model::testing::write_tiny_teacher(&teacher, 21).unwrap();
    let rows: Vec<serde_json::Value> = (0..40)
        .map(|i| serde_json::json!({"id": format!("r{i:02}"), "prompt": format!("count {} then {}", i % 9, i * 3 % 11)}))
        .collect();
    let input = dir.path().join("in.jsonl");
    util::write_jsonl(&input, &rows);
    (dir, teacher, input)
}

fn tiny_setup() -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let (dir, teacher, input) = tiny_teacher_and_input();
    let shards = dir.path().join("shards");
    dump(
        &teacher,
        &input,
        &shards,
        &["--temperature", "1.0", "--seed", "2"],
    );
    (dir, teacher, shards)
}

/// `student-fit` with the environment variable `KD_CRASH_AT=point` (an abort, as SIGKILL
/// leaves things) and optionally every file capped at `fsize` bytes (a full disk).
fn fit_with_fault(p: &Path, crash: Option<&str>, fsize: Option<u64>) -> std::process::Output {
    let mut cmd = std::process::Command::new(util::bin("student-fit"));
    cmd.args(["--pipeline", p.to_str().unwrap()])
        .env("RAYON_NUM_THREADS", "2");
    if let Some(c) = crash {
        cmd.env("KD_CRASH_AT", c);
    }
    if let Some(cap) = fsize {
        util::limit_file_size(&mut cmd, cap);
    }
    cmd.output().unwrap()
}

/// Aborts mid-step (gradients computed, update not applied), during a checkpoint write and
/// during the export, and a full disk while writing a checkpoint: each resumed run ends with
/// the uninterrupted run's weights and losses, and no temporary directory survives.
#[test]
fn aborts_and_a_full_disk_then_resume_equal_the_uninterrupted_run() {
    let (dir, teacher, shards) = tiny_setup();
    let a = dir.path().join("a");
    let pa = pipeline(dir.path(), &shards, &teacher, &a);
    util::run_ok(
        "student-fit",
        &["--pipeline", pa.to_str().unwrap(), "--json"],
    );
    let final_weights = |out: &Path| {
        std::fs::read(out.join("checkpoints/step-00000030/model.safetensors")).unwrap()
    };
    let wa = final_weights(&a);
    let model_bytes = wa.len() as u64;
    for (name, crash, fsize) in [
        ("mid-step", Some("before-update:12"), None),
        ("checkpoint", Some("checkpoint-before-rename:10"), None),
        ("export", Some("export-before-rename:student"), None),
        ("disk-full", None, Some(model_bytes / 2)),
    ] {
        let out = dir.path().join(name);
        let p = pipeline(dir.path(), &shards, &teacher, &out);
        let o = fit_with_fault(&p, crash, fsize);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{name}: the run did not stop");
        if fsize.is_some() {
            assert_eq!(o.status.code(), Some(1), "{name}: {err}");
            assert!(err.contains("model.safetensors"), "{name}: {err}");
            assert!(err.contains("step-00000005"), "{name}: {err}");
        }
        // Published checkpoints are complete: each holds the uninterrupted run's bytes.
        if let Ok(rd) = std::fs::read_dir(out.join("checkpoints")) {
            for e in rd {
                let e = e.unwrap();
                let n = e.file_name().to_string_lossy().into_owned();
                if n.starts_with("step-") {
                    let x = std::fs::read(e.path().join("model.safetensors")).unwrap();
                    let y = std::fs::read(a.join("checkpoints").join(&n).join("model.safetensors"))
                        .unwrap();
                    assert!(x == y, "{name}: published {n} differs");
                }
            }
        }
        util::run_ok(
            "student-fit",
            &["--pipeline", p.to_str().unwrap(), "--resume", "--json"],
        );
        assert!(final_weights(&out) == wa, "{name}: resumed weights differ");
        assert_eq!(
            step_losses(&a),
            step_losses(&out),
            "{name}: logged losses differ"
        );
        let export_a = std::fs::read(a.join("student/model.safetensors")).unwrap();
        let export_b = std::fs::read(out.join("student/model.safetensors")).unwrap();
        assert!(export_a == export_b, "{name}: export differs");
        for d in [out.clone(), out.join("checkpoints")] {
            for e in std::fs::read_dir(&d).unwrap() {
                let n = e.unwrap().file_name().to_string_lossy().into_owned();
                assert!(
                    !n.starts_with(".tmp-"),
                    "{name}: stray {n} in {}",
                    d.display()
                );
            }
        }
    }
}

/// A learning rate that makes the loss blow up: the run stops with an error naming the step
/// and the last good checkpoint, and that checkpoint is intact and resumable.
#[test]
fn a_loss_that_turns_infinite_stops_the_run_keeping_the_last_checkpoint() {
    let (dir, teacher, shards) = tiny_setup();
    let out = dir.path().join("boom");
    let text = std::fs::read_to_string(pipeline(dir.path(), &shards, &teacher, &out))
        .unwrap()
        .replace("lr = 3e-3", "lr = 1e30")
        .replace("min_lr = 3e-4", "min_lr = 1e29")
        .replace("max_grad_norm = 1.0", "max_grad_norm = 1e30");
    let p = dir.path().join("boom.toml");
    std::fs::write(&p, text).unwrap();
    let o = util::run("student-fit", &["--pipeline", p.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("loss became"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let last = kd_student::fit::latest_checkpoint(&out);
    match &last {
        Some(ck) => {
            assert!(err.contains(&ck.display().to_string()), "{err}");
            kd_model::trainable::Student::from_hf_dir(
                ck,
                candle_core::DType::F32,
                &candle_core::Device::Cpu,
            )
            .expect("the last good checkpoint loads");
        }
        None => assert!(err.contains("last good checkpoint: none"), "{err}"),
    }

    // A NaN at step 7 (injected): the run stops before applying it, names step 5's
    // checkpoint, which is intact; a resume finishes the run.
    let out = dir.path().join("nan");
    let p = pipeline(dir.path(), &shards, &teacher, &out);
    let o = std::process::Command::new(util::bin("student-fit"))
        .args(["--pipeline", p.to_str().unwrap()])
        .env("KD_FAULT", "nan-loss:7")
        .env("RAYON_NUM_THREADS", "2")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("loss became NaN at step 7") && err.contains("step-00000005"),
        "{err}"
    );
    assert_eq!(latest_step(&out), 5);
    assert!(
        !step_losses(&out).contains_key(&8),
        "the NaN step was applied"
    );
    util::run_ok(
        "student-fit",
        &["--pipeline", p.to_str().unwrap(), "--resume", "--json"],
    );
    assert_eq!(latest_step(&out), 30);

    // keep_checkpoints = 2: only the two newest survive.
    let out = dir.path().join("keep");
    let text = std::fs::read_to_string(pipeline(dir.path(), &shards, &teacher, &out))
        .unwrap()
        .replace(
            "logits_chunk = 64",
            "logits_chunk = 64\nkeep_checkpoints = 2",
        );
    let p = dir.path().join("keep.toml");
    std::fs::write(&p, text).unwrap();
    util::run_ok("student-fit", &["--pipeline", p.to_str().unwrap()]);
    let mut kept: Vec<String> = std::fs::read_dir(out.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    kept.sort();
    assert_eq!(kept, ["step-00000025", "step-00000030"]);
}

/// Runs a binary to completion while sampling its anonymous resident memory (`RssAnon`:
/// heap and stacks; not the memory-mapped cache, whose pages the kernel can drop) every
/// 5 ms; returns the peak in bytes.
fn peak_anon_bytes(name: &str, args: &[&str]) -> u64 {
    let mut child = std::process::Command::new(util::bin(name))
        .args(args)
        .env("RAYON_NUM_THREADS", "2")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let status = format!("/proc/{}/status", child.id());
    let mut peak = 0u64;
    loop {
        if let Ok(text) = std::fs::read_to_string(&status)
            && let Some(kb) = text
                .lines()
                .find(|l| l.starts_with("RssAnon:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        {
            peak = peak.max(kb * 1024);
        }
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{name} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    peak
}

/// Memory follows the batch settings, not the data: dumping and evaluating 10× the rows
/// (~25 MB of top-64 log-probs instead of ~2.5 MB) raises neither tool's peak anonymous memory
/// by more than a few megabytes.
#[test]
fn memory_is_bounded_by_the_batch_settings_not_the_data() {
    let dir = util::tempdir();
    let teacher = dir.path().join("teacher");
    kd_model::testing::write_tiny_teacher(&teacher, 21).unwrap();
    let mut peaks = Vec::new();
    for n in [100usize, 1000] {
        let rows: Vec<serde_json::Value> = (0..n)
            .map(|i| serde_json::json!({"id": format!("r{i:05}"), "prompt": format!("count {} then {}", i % 9, i * 3 % 11)}))
            .collect();
        let input = dir.path().join(format!("in-{n}.jsonl"));
        util::write_jsonl(&input, &rows);
        let shards = dir.path().join(format!("shards-{n}"));
        let dump_peak = peak_anon_bytes(
            "teacher-dump",
            &[
                "--teacher",
                teacher.to_str().unwrap(),
                "--input",
                input.to_str().unwrap(),
                "--out",
                shards.to_str().unwrap(),
                "--top-k",
                "64",
                "--max-new-tokens",
                "48",
                "--temperature",
                "1.0",
                "--rows-per-shard",
                "50",
                "--no-progress",
            ],
        );
        let eval_peak = peak_anon_bytes(
            "student-fit",
            &[
                "eval",
                "--student",
                teacher.to_str().unwrap(),
                "--shards",
                shards.to_str().unwrap(),
                "--generations",
                "0",
            ],
        );
        let m = kd_shard::read_manifest(&shards.join("manifest.json")).unwrap();
        eprintln!(
            "{n} rows, {} positions, {} shard bytes: peak anonymous memory teacher-dump {:.1} MB, student-fit eval {:.1} MB",
            m.totals.positions,
            m.totals.bytes,
            dump_peak as f64 / 1e6,
            eval_peak as f64 / 1e6
        );
        peaks.push((dump_peak, eval_peak, m.totals.positions));
    }
    let (small, big) = (peaks[0], peaks[1]);
    assert!(
        big.2 >= 8 * small.2,
        "the big dump is not ~10× the small one"
    );
    let slack = 12_000_000;
    assert!(
        big.0 < small.0 + slack,
        "teacher-dump: {small:?} -> {big:?}"
    );
    assert!(
        big.1 < small.1 + slack,
        "student-fit eval: {small:?} -> {big:?}"
    );
}

/// A student with random (seeded) weights of the architecture in a config.json: the same
/// seed gives the same start, another seed another one, and training lowers held-out KL.
#[test]
fn random_initialisation_from_a_config_is_seeded() {
    let (dir, teacher, shards) = tiny_setup();
    let run = |name: &str, seed: u64| -> serde_json::Value {
        let out = dir.path().join(name);
        let text = std::fs::read_to_string(pipeline(dir.path(), &shards, &teacher, &out))
            .unwrap()
            .replace(
                &format!(
                    "init = {{ from_teacher = {{ path = \"{}\", keep_layers = [0] }} }}",
                    teacher.display()
                ),
                &format!(
                    "init = {{ random = {{ config = \"{}\", seed = {seed} }} }}",
                    teacher.join("config.json").display()
                ),
            )
            .replace("steps = 30", "steps = 10");
        let p = dir.path().join(format!("{name}.toml"));
        std::fs::write(&p, text).unwrap();
        serde_json::from_str(&util::run_ok(
            "student-fit",
            &["--pipeline", p.to_str().unwrap(), "--json"],
        ))
        .unwrap()
    };
    let kl = |s: &serde_json::Value, at: &str| s[at]["forward_kl"].as_f64().unwrap();
    let (a, b, c) = (run("r1", 1), run("r1b", 1), run("r2", 2));
    assert_eq!(kl(&a, "initial"), kl(&b, "initial"));
    assert_ne!(kl(&a, "initial"), kl(&c, "initial"));
    assert!(kl(&a, "final_eval") < kl(&a, "initial"));

    // `--init-from-teacher … --keep-layers …` overrides the file's initialisation: the start
    // equals that of a pipeline that says the same.
    let with_flag: serde_json::Value = serde_json::from_str(&util::run_ok(
        "student-fit",
        &[
            "--pipeline",
            dir.path().join("r1.toml").to_str().unwrap(),
            "--out",
            dir.path().join("flag").to_str().unwrap(),
            "--init-from-teacher",
            teacher.to_str().unwrap(),
            "--keep-layers",
            "0",
            "--steps",
            "1",
            "--json",
        ],
    ))
    .unwrap();
    let in_file: serde_json::Value = serde_json::from_str(&util::run_ok(
        "student-fit",
        &[
            "--pipeline",
            pipeline(dir.path(), &shards, &teacher, &dir.path().join("file"))
                .to_str()
                .unwrap(),
            "--steps",
            "1",
            "--json",
        ],
    ))
    .unwrap();
    assert_eq!(kl(&with_flag, "initial"), kl(&in_file, "initial"));
    assert_ne!(kl(&with_flag, "initial"), kl(&a, "initial"));
}

/// Rows whose prompt fills `max_len` have nothing to distil; a batch made only of such rows
/// is skipped (deterministically), not trained on and not a crash.
#[test]
fn batches_without_distilled_positions_are_skipped() {
    let dir = util::tempdir();
    let teacher = dir.path().join("teacher");
    kd_model::testing::write_tiny_teacher(&teacher, 21).unwrap();
    let rows: Vec<serde_json::Value> = (0..24)
        .map(|i| {
            let prompt = if i % 3 == 0 {
                "a long prompt ".repeat(16)
            } else {
                format!("say {i}")
            };
            serde_json::json!({"id": format!("r{i:02}"), "prompt": prompt})
        })
        .collect();
    let input = dir.path().join("in.jsonl");
    util::write_jsonl(&input, &rows);
    let shards = dir.path().join("shards");
    dump(&teacher, &input, &shards, &[]);
    let out = dir.path().join("out");
    let text = std::fs::read_to_string(pipeline(dir.path(), &shards, &teacher, &out))
        .unwrap()
        .replace("token_budget = 384", "token_budget = 110")
        .replace("max_len = 256", "max_len = 110")
        .replace("steps = 30", "steps = 12");
    let p = dir.path().join("short.toml");
    std::fs::write(&p, text).unwrap();
    let s: serde_json::Value = serde_json::from_str(&util::run_ok(
        "student-fit",
        &["--pipeline", p.to_str().unwrap(), "--json"],
    ))
    .unwrap();
    assert_eq!(s["steps"], 12);
    for v in util::read_jsonl(&out.join("metrics.jsonl")) {
        if let Some(n) = v.get("positions").and_then(|n| n.as_u64()) {
            assert!(n > 0, "an empty step was taken: {v}");
        }
    }
}

/// A Qwen3 teacher (per-head q/k norms, explicit head size, untied head) is distilled into a
/// one-layer Qwen3 student: the dump, the run and the export work as for llama, the export
/// is a Qwen3 directory, and both the teacher loader and the student read it as the same
/// function.
#[test]
fn a_qwen3_teacher_is_distilled_into_a_smaller_qwen3() {
    use kd_model::{Arch, Kernels, Precision};
    let dir = util::tempdir();
    let teacher = dir.path().join("teacher");
    let tok = kd_tokenizer::Tokenizer::tiny_for_tests();
    let mut cfg = kd_model::testing::tiny_config(tok.vocab_size());
    cfg.arch = Arch::Qwen3;
    cfg.head_dim = Some(16);
    cfg.tie_word_embeddings = false;
    let w = kd_model::testing::random_weights(&cfg, 8).unwrap();
    kd_model::testing::write_hf_dir(&teacher, &cfg, &w, &tok).unwrap();
    let rows: Vec<serde_json::Value> = (0..24)
        .map(|i| serde_json::json!({"id": format!("q{i:02}"), "prompt": format!("sum {} and {}", i % 7, i * 5 % 13)}))
        .collect();
    let input = dir.path().join("in.jsonl");
    util::write_jsonl(&input, &rows);
    let shards = dir.path().join("shards");
    dump(&teacher, &input, &shards, &[]);
    let out = dir.path().join("qwen-student");
    let p = pipeline(dir.path(), &shards, &teacher, &out);
    util::run_ok("student-fit", &["--pipeline", p.to_str().unwrap()]);
    let export = out.join("student");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(export.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(config["model_type"], "qwen3");
    assert_eq!(config["architectures"][0], "Qwen3ForCausalLM");
    assert_eq!(config["num_hidden_layers"], 1);
    assert_eq!(config["head_dim"], 16);
    let s =
        kd_model::Student::from_hf_dir(&export, candle_core::DType::F32, &candle_core::Device::Cpu)
            .unwrap();
    assert_eq!(s.cfg.arch, Arch::Qwen3);
    let m = kd_model::load_with(
        &export,
        Precision::Exact,
        &candle_core::Device::Cpu,
        Kernels::Auto,
    )
    .unwrap();
    let ids: Vec<u32> = (7..40).collect();
    let want = kd_model::testing::batch_logits(&m.model, &[&ids]);
    let (t, lengths) = s.batch(&[&ids]).unwrap();
    let h = s.forward(&t, &lengths).unwrap().squeeze(0).unwrap();
    let got: Vec<Vec<f32>> = s.logits(&h).unwrap().to_vec2().unwrap();
    let d = kd_model::testing::max_logprob_diff(&got, &want[0]);
    assert!(
        d < 1e-4,
        "export read by the teacher loader and the student differ by {d}"
    );
}

/// One `student-fit` per output folder: while another process holds the folder, a run is
/// refused naming the lock, exits non-zero and leaves the folder alone; a lock file left by a
/// killed run (not held) does not stop the next run.
#[test]
fn a_second_run_into_the_same_folder_is_refused() {
    let (dir, teacher, shards) = tiny_setup();
    let out = dir.path().join("locked");
    let p = pipeline(dir.path(), &shards, &teacher, &out);
    std::fs::create_dir_all(&out).unwrap();
    let held = kd_fs::FolderLock::take(&out, kd_student::fit::LOCK_FILE).unwrap();
    let o = util::run("student-fit", &["--pipeline", p.to_str().unwrap()]);
    assert!(!o.status.success(), "a second run was not refused");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(".student-fit.lock"), "{err}");
    assert!(
        !out.join("metrics.jsonl").exists(),
        "the refused run wrote metrics"
    );
    drop(held);
    // What SIGKILL leaves: the file, unlocked.
    std::fs::write(out.join(kd_student::fit::LOCK_FILE), b"").unwrap();
    util::run_ok("student-fit", &["--pipeline", p.to_str().unwrap()]);
    assert!(out.join("student/config.json").exists());
    assert!(
        !out.join(kd_student::fit::LOCK_FILE).exists(),
        "the lock outlived the run"
    );
}

/// Sampled targets end to end: a `top:16,sample:12` dump trains on its draws (plug-in
/// targets whose probabilities are the counts over 12), evaluates its held-out rows against
/// the top-k, and held-out forward KL falls; losses without an unbiased estimate are refused
/// unless asked for by name, infinite ones always; a draws-only cache refuses a held-out
/// evaluation it cannot do.
#[test]
fn sampled_targets_train_with_the_unbiased_estimator() {
    let (dir, teacher, input) = tiny_teacher_and_input();
    let (both, only) = (dir.path().join("both"), dir.path().join("only"));
    for (out, targets) in [(&both, "top:16,sample:12"), (&only, "sample:12")] {
        let extra = ["--targets", targets, "--temperature", "1.0", "--seed", "2"];
        dump(&teacher, &input, out, &extra);
    }

    // The loader's plug-in targets: counts over 12, padded with never-drawn ids at -inf.
    let set = kd_student::data::ShardSet::open_targets(
        &both,
        Some(kd_student::data::TargetKind::Sampled),
    )
    .unwrap();
    assert_eq!(set.k(), 12);
    let shard_rows = kd_shard::read_shard(&both.join("shard-00000.parquet")).unwrap();
    for (view, row) in set.rows().zip(&shard_rows) {
        assert_eq!(view.id, row.id);
        for j in 0..view.n_pos() {
            let ids = &view.topk_ids[j * 12..(j + 1) * 12];
            let lps = &view.topk_logprobs[j * 12..(j + 1) * 12];
            let mass: f64 = lps.iter().map(|&l| f64::from(l).exp()).sum();
            assert!((mass - 1.0).abs() < 1e-6, "plug-in mass {mass}");
            for (id, c, _) in row.sample_counts(j, 12) {
                let r = ids.iter().position(|&i| i == id).expect("drawn id kept");
                assert!((f64::from(lps[r]).exp() - f64::from(c) / 12.0).abs() < 1e-6);
            }
            let drawn = row.sample_counts(j, 12).len();
            assert!(lps[drawn..].iter().all(|l| *l == f32::NEG_INFINITY));
        }
    }
    // The default for a cache with both kinds is its top-k.
    let top = kd_student::data::ShardSet::open(&both).unwrap();
    assert_eq!(
        (top.targets(), top.k()),
        (kd_student::data::TargetKind::TopK, 16)
    );

    let with = |out: &Path, shards: &Path, loss: &str, extra: &str| {
        let p = pipeline(dir.path(), shards, &teacher, out);
        let text = std::fs::read_to_string(&p).unwrap().replace(
            r#"loss = { divergence = { kind = "forward_kl" }, temperature = 2.0, alpha = 0.7 }"#,
            &format!("loss = {loss}\n{extra}"),
        );
        std::fs::write(&p, text).unwrap();
        p
    };
    let fkl = r#"{ divergence = { kind = "forward_kl" }, temperature = 1.0, alpha = 1.0 }"#;
    let a = dir.path().join("a");
    let pa = with(&a, &both, fkl, r#"targets = "sampled""#);
    let summary = util::run_ok(
        "student-fit",
        &["--pipeline", pa.to_str().unwrap(), "--json"],
    );
    let s: serde_json::Value = serde_json::from_str(&summary).unwrap();
    let (before, after) = (
        s["initial"]["forward_kl"].as_f64().unwrap(),
        s["final_eval"]["forward_kl"].as_f64().unwrap(),
    );
    assert!(
        after < before,
        "held-out forward KL (against the top-k) {before} -> {after}"
    );
    assert!(
        s["initial"]["reverse_kl"].as_f64().unwrap().is_finite(),
        "evaluation used the top-k"
    );

    let refused = |p: &Path| {
        let o = util::run("student-fit", &["--pipeline", p.to_str().unwrap()]);
        assert!(!o.status.success());
        String::from_utf8(o.stderr).unwrap()
    };
    let jsd = r#"{ divergence = { kind = "jsd", beta = 0.5 }, temperature = 1.0, alpha = 1.0 }"#;
    let e = refused(&with(
        &dir.path().join("b"),
        &both,
        jsd,
        r#"targets = "sampled""#,
    ));
    assert!(e.contains("plug_in") && e.contains("unbiased"), "{e}");
    let hot = r#"{ divergence = { kind = "forward_kl" }, temperature = 2.0, alpha = 1.0 }"#;
    let e = refused(&with(&dir.path().join("c"), &only, hot, ""));
    assert!(e.contains("temperature 2"), "{e}");
    let rkl = r#"{ divergence = { kind = "reverse_kl" }, temperature = 1.0, alpha = 1.0 }"#;
    let e = refused(&with(
        &dir.path().join("d"),
        &only,
        rkl,
        r#"estimator = "plug_in""#,
    ));
    assert!(e.contains("infinite"), "{e}");
    let e = refused(&with(&dir.path().join("e"), &only, fkl, ""));
    assert!(
        e.contains("held-out evaluation needs the teacher's top-k"),
        "{e}"
    );
    // Without held-out rows, a draws-only cache trains.
    let f = dir.path().join("f");
    let pf = with(&f, &only, fkl, "");
    let text = std::fs::read_to_string(&pf)
        .unwrap()
        .replace("holdout_fraction = 0.25", "holdout_fraction = 0.0")
        .replace("steps = 30", "steps = 4");
    std::fs::write(&pf, text).unwrap();
    util::run_ok("student-fit", &["--pipeline", pf.to_str().unwrap()]);
    assert!(f.join("student/model.safetensors").exists());
}

/// `student-fit` from flags alone gives the same run as the equivalent pipeline file, and
/// `--print-config` writes a pipeline file that gives it again; missing required settings
/// are named.
#[test]
fn flags_alone_equal_the_pipeline_file() {
    let (dir, teacher, shards) = tiny_setup();
    let t = teacher.to_str().unwrap();
    let a = dir.path().join("a");
    let text = format!(
        r#"
[fit]
shards = "{}"
out = "{}"
init = {{ from_teacher = {{ path = "{t}", keep_layers = [0] }} }}
loss = {{ divergence = {{ kind = "jsd", beta = 0.5 }}, temperature = 2.0, alpha = 0.7 }}
steps = 6
token_budget = 384
max_len = 256
lr = 3e-3
holdout_fraction = 0.25
"#,
        shards.display(),
        a.display()
    );
    let pa = dir.path().join("a.toml");
    std::fs::write(&pa, text).unwrap();
    let run = |args: &[&str]| -> serde_json::Value {
        let mut all = args.to_vec();
        all.push("--json");
        serde_json::from_str(&util::run_ok("student-fit", &all)).unwrap()
    };
    let from_file = run(&["--pipeline", pa.to_str().unwrap()]);
    let b = dir.path().join("b");
    let flags = [
        "--shards",
        shards.to_str().unwrap(),
        "--out",
        b.to_str().unwrap(),
        "--init-from-teacher",
        t,
        "--keep-layers",
        "0",
        "--loss",
        "jsd",
        "--beta",
        "0.5",
        "--temperature",
        "2",
        "--alpha",
        "0.7",
        "--steps",
        "6",
        "--token-budget",
        "384",
        "--max-len",
        "256",
        "--lr",
        "3e-3",
        "--holdout-fraction",
        "0.25",
    ];
    let from_flags = run(&flags);
    for key in [
        "initial",
        "final_eval",
        "last_train_loss",
        "train_positions",
        "steps",
    ] {
        assert_eq!(from_file[key], from_flags[key], "{key}");
    }
    assert_eq!(
        std::fs::read(a.join("student/model.safetensors")).unwrap(),
        std::fs::read(b.join("student/model.safetensors")).unwrap()
    );

    // The printed configuration is a pipeline file for the same run.
    let printed = util::run_ok("student-fit", &[&flags[..], &["--print-config"]].concat());
    assert!(printed.starts_with("[fit]"), "{printed}");
    assert!(!b.join("checkpoints/step-00000007").exists());
    let c = dir.path().join("c");
    let pc = dir.path().join("c.toml");
    std::fs::write(
        &pc,
        printed.replace(b.to_str().unwrap(), c.to_str().unwrap()),
    )
    .unwrap();
    let from_printed = run(&["--pipeline", pc.to_str().unwrap()]);
    for key in ["initial", "final_eval", "last_train_loss"] {
        assert_eq!(from_printed[key], from_flags[key], "{key}");
    }

    let o = util::run("student-fit", &["--steps", "2"]);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("missing --shards"), "{e}");
    let o = util::run(
        "student-fit",
        &[
            "--shards",
            shards.to_str().unwrap(),
            "--out",
            c.to_str().unwrap(),
        ],
    );
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("--init-from-teacher"), "{e}");

    // The loss temperature's flag is --loss-temperature; the former --temperature still
    // sets it, with a note.
    let base = [
        "--shards",
        shards.to_str().unwrap(),
        "--out",
        c.to_str().unwrap(),
        "--init-from-student",
        c.to_str().unwrap(),
        "--print-config",
    ];
    let new = util::run_ok(
        "student-fit",
        &[&base[..], &["--loss-temperature", "3.0"]].concat(),
    );
    assert!(new.contains("temperature = 3.0"), "{new}");
    let o = util::run(
        "student-fit",
        &[&base[..], &["--temperature", "3.0"]].concat(),
    );
    assert!(o.status.success());
    assert_eq!(String::from_utf8_lossy(&o.stdout), new);
    let note = String::from_utf8_lossy(&o.stderr);
    assert!(
        note.contains("--temperature is now --loss-temperature"),
        "{note}"
    );
}

/// `--positions N` trains on at least N distilled positions: the fewest steps whose batches
/// reach N (the step before falls short), the same steps for every loss on the same shards,
/// and the schedule over those steps.
#[test]
fn a_positions_budget_takes_the_steps_its_batches_need() {
    let (dir, teacher, shards) = tiny_setup();
    let run = |name: &str, loss: &str, positions: u64| {
        let out = dir.path().join(name);
        let p = pipeline(dir.path(), &shards, &teacher, &out);
        let text = std::fs::read_to_string(&p).unwrap();
        let text = text
            .replace(
                "kind = \"forward_kl\" }, temperature = 2.0, alpha = 0.7",
                &format!("kind = \"{loss}\" }}"),
            )
            .replace("steps = 30", &format!("positions = {positions}"));
        assert!(
            text.contains("positions =") && text.contains(loss),
            "{text}"
        );
        std::fs::write(&p, text).unwrap();
        let summary: serde_json::Value = serde_json::from_str(&util::run_ok(
            "student-fit",
            &["--pipeline", p.to_str().unwrap(), "--json"],
        ))
        .unwrap();
        (summary, util::read_jsonl(&out.join("metrics.jsonl")))
    };
    let (fkl, lines) = run("fkl", "forward_kl", 300);
    let steps = fkl["steps"].as_u64().unwrap();
    let trained = fkl["train_positions"].as_u64().unwrap();
    assert!(steps >= 2 && trained >= 300, "{fkl}");
    // The positions after each step: the last step crossed the budget, the one before did not.
    let after: Vec<u64> = lines
        .iter()
        .filter(|l| l.get("loss").is_some())
        .map(|l| l["train_positions"].as_u64().unwrap())
        .collect();
    assert_eq!(after.len() as u64, steps);
    assert_eq!(*after.last().unwrap(), trained);
    assert!(after[after.len() - 2] < 300, "{after:?}");
    // The cosine schedule ends at min_lr on the last of those steps.
    let lrs: Vec<f64> = lines
        .iter()
        .filter_map(|l| l.get("lr").and_then(|v| v.as_f64()))
        .collect();
    assert!(lrs[lrs.len() - 1] < lrs[1], "{lrs:?}");
    // Another loss on the same shards trains on the same batches.
    let (rkl, _) = run("rkl", "reverse_kl", 300);
    assert_eq!(rkl["steps"], fkl["steps"]);
    assert_eq!(rkl["train_positions"], fkl["train_positions"]);
    // A smaller budget takes fewer steps.
    let (small, _) = run("small", "forward_kl", 100);
    assert!(small["steps"].as_u64().unwrap() < steps, "{small}");
}

/// `student-fit export --gguf`: a trained student written as GGUF in each type reloads
/// through `teacher-dump --teacher FILE.gguf` with the student's log-probs (f32 within 1e-4
/// nats of the Hugging Face export, f16 within 2e-2; the quantized types' error is printed),
/// and Python's `gguf` package reads its metadata and tensors (skipped without it unless
/// `KD_REQUIRE_GGUF=1`).
#[test]
fn gguf_export_reloads_with_the_students_logprobs() {
    let (dir, teacher, shards) = tiny_setup();
    let a = dir.path().join("a");
    let p = pipeline(dir.path(), &shards, &teacher, &a);
    util::run_ok(
        "student-fit",
        &["--pipeline", p.to_str().unwrap(), "--steps", "5"],
    );
    let student = a.join("student");
    let input = dir.path().join("in.jsonl");
    let score = |model: &Path, out: &Path| -> Vec<kd_shard::Row> {
        util::run_ok(
            "teacher-dump",
            &[
                "--teacher",
                model.to_str().unwrap(),
                "--input",
                input.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
                "--limit",
                "6",
                "--max-new-tokens",
                "8",
                "--top-k",
                "4",
                "--shard-format",
                "1",
                "--no-progress",
            ],
        );
        kd_shard::read_shard(&out.join("shard-00000.parquet")).unwrap()
    };
    let want = score(&student, &dir.path().join("hf-dump"));
    for (ty, tol) in [
        ("f32", 1e-4f32),
        ("f16", 2e-2),
        ("q8_0", f32::INFINITY),
        ("q4_0", f32::INFINITY),
    ] {
        let gguf = dir.path().join(format!("s-{ty}.gguf"));
        let out = util::run_ok(
            "student-fit",
            &[
                "export",
                "--student",
                student.to_str().unwrap(),
                "--gguf",
                gguf.to_str().unwrap(),
                "--type",
                ty,
            ],
        );
        assert!(out.contains("wrote"), "{out}");
        let got = score(&gguf, &dir.path().join(format!("dump-{ty}")));
        let (mut max, mut same_top1, mut n) = (0f32, 0usize, 0usize);
        for (g, w) in got.iter().zip(&want) {
            // Greedy generation may part ways once a quantized model picks another token:
            // compare the positions up to the first difference.
            let same = g
                .input_ids
                .iter()
                .zip(&w.input_ids)
                .take_while(|(x, y)| x == y)
                .count();
            let upto = same.saturating_sub(w.prompt_len as usize).min(w.n_pos());
            for j in 0..upto {
                max = max.max((g.token_logprob[j] - w.token_logprob[j]).abs());
                same_top1 += usize::from(g.topk_ids[j * 4] == w.topk_ids[j * 4]);
                n += 1;
            }
        }
        eprintln!(
            "{ty}: {n} positions, max |Δ log-prob| {max:.2e}, top-1 agreement {same_top1}/{n}"
        );
        assert!(n > 0 && max.is_finite() && max <= tol, "{ty}: {max}");
        if ty == "f32" {
            for (g, w) in got.iter().zip(&want) {
                assert_eq!(
                    g.input_ids, w.input_ids,
                    "{}: f32 generated otherwise",
                    g.id
                );
            }
        }
    }

    let has_gguf = std::process::Command::new("python3")
        .args(["-c", "import gguf"])
        .status()
        .is_ok_and(|s| s.success());
    if !has_gguf {
        if std::env::var("KD_REQUIRE_GGUF").as_deref() == Ok("1") {
            panic!("KD_REQUIRE_GGUF=1 but Python gguf is missing");
        }
        eprintln!("skipped: Python gguf not installed");
        return;
    }
    let script = r#"
import json, sys
from gguf import GGUFReader
r = GGUFReader(sys.argv[1])
def val(name):
    f = r.fields[name]
    if len(f.types) == 1 and f.types[0].name == "STRING":
        return bytes(f.parts[f.data[0]]).decode()
    return f.parts[f.data[0]].tolist()[0]
print(json.dumps({
    "arch": val("general.architecture"),
    "blocks": val("llama.block_count"),
    "template": "tokenizer.chat_template" in r.fields,
    "tokens": len(r.fields["tokenizer.ggml.tokens"].data),
    "tensors": {t.name: [t.tensor_type.name, [int(x) for x in t.shape]] for t in r.tensors},
}))
"#;
    let o = std::process::Command::new("python3")
        .args(["-c", script])
        .arg(dir.path().join("s-q8_0.gguf"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["arch"], "llama");
    assert_eq!(v["blocks"], 1);
    assert_eq!(v["template"], true);
    assert_eq!(
        v["tokens"],
        kd_tokenizer::Tokenizer::tiny_for_tests().vocab_size()
    );
    assert_eq!(v["tensors"]["blk.0.attn_q.weight"][0], "Q8_0");
    assert_eq!(v["tensors"]["blk.0.attn_norm.weight"][0], "F32");
}

/// `--keep-layers auto:N` scores every cut exactly: each candidate's forward KL, at the first
/// step and after a removal, is the evaluation of a student built without those layers on the
/// same rows; the lowest goes. The choice is recorded in summary.json and the export's
/// config.json, a second run with the same request reuses it, and `--drop-layers auto:M`
/// chooses the same layers.
#[test]
fn auto_layers_are_chosen_by_the_forward_kl_of_each_cut() {
    use kd_student::fit::{EvalModel, evaluate};
    let dir = util::tempdir();
    let teacher = dir.path().join("teacher");
    let tok = kd_tokenizer::Tokenizer::tiny_for_tests();
    let mut cfg = kd_model::testing::tiny_config(tok.vocab_size());
    cfg.num_hidden_layers = 4;
    let w = kd_model::testing::random_weights(&cfg, 5).unwrap();
    kd_model::testing::write_hf_dir(&teacher, &cfg, &w, &tok).unwrap();
    let rows: Vec<serde_json::Value> = (0..30)
        .map(|i| serde_json::json!({"id": format!("r{i:02}"), "prompt": format!("say {} and {}", i % 7, i * 5 % 13)}))
        .collect();
    let input = dir.path().join("in.jsonl");
    util::write_jsonl(&input, &rows);
    let shards = dir.path().join("shards");
    dump(&teacher, &input, &shards, &[]);

    let fit = |out: &str, flag: &str, value: &str| -> (serde_json::Value, String) {
        let o = util::run(
            "student-fit",
            &[
                "--shards",
                shards.to_str().unwrap(),
                "--init-from-teacher",
                teacher.to_str().unwrap(),
                flag,
                value,
                "--steps",
                "1",
                "--out",
                dir.path().join(out).to_str().unwrap(),
            ],
        );
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let summary = std::fs::read(dir.path().join(out).join("summary.json")).unwrap();
        (
            serde_json::from_slice(&summary).unwrap(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let (s, _) = fit("a", "--keep-layers", "auto:2");
    let choice = &s["layer_choice"];
    let kept: Vec<usize> = serde_json::from_value(choice["kept"].clone()).unwrap();
    assert_eq!(kept.len(), 2);
    assert_eq!(s["teacher_layers"], choice["kept"]);
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("a/student/config.json")).unwrap())
            .unwrap();
    assert_eq!(config["kd_teacher_layers"], choice["kept"]);
    assert_eq!(config["num_hidden_layers"], 2);

    // The rows the choice scored on, and each cut evaluated on them by a student built from
    // the teacher's layers.
    let set = kd_student::data::ShardSet::open(&shards).unwrap();
    let split =
        kd_student::data::Split::by_id_hash(&set, kd_student::fit::DEFAULT_HOLDOUT_FRACTION)
            .unwrap();
    let max_len = kd_student::fit::DEFAULT_MAX_LEN;
    let (sample, positions) = kd_student::layers::sample(
        &set,
        &split.train,
        kd_student::layers::DEFAULT_AUTO_POSITIONS,
        max_len,
    );
    assert_eq!(choice["positions"], positions);
    let cut_kl = |without: &[usize]| -> f64 {
        let keep: Vec<usize> = (0..4).filter(|l| !without.contains(l)).collect();
        let student = kd_model::Student::from_teacher(
            &teacher,
            &keep,
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )
        .unwrap();
        evaluate(&mut EvalModel::Candle(&student), &set, &sample, max_len, 64)
            .unwrap()
            .forward_kl
    };
    let removals = choice["removals"].as_array().unwrap();
    assert_eq!(removals.len(), 2);
    let mut removed = Vec::new();
    for (step, r) in removals.iter().enumerate() {
        let cands = r["candidates"].as_array().unwrap();
        assert_eq!(cands.len(), 4 - step);
        let mut best = (usize::MAX, f64::INFINITY);
        for c in cands {
            let layer = c["layer"].as_u64().unwrap() as usize;
            let kl = c["forward_kl"].as_f64().unwrap();
            let mut without = removed.clone();
            without.push(layer);
            let exact = cut_kl(&without);
            assert!(
                (kl - exact).abs() <= 1e-4 * exact.abs().max(1.0),
                "step {step}, without layer {layer}: {kl} against {exact}"
            );
            if kl < best.1 {
                best = (layer, kl);
            }
        }
        assert_eq!(r["layer"].as_u64().unwrap() as usize, best.0);
        removed.push(best.0);
    }
    let expect: Vec<usize> = (0..4).filter(|l| !removed.contains(l)).collect();
    assert_eq!(kept, expect);

    // The same request again (auto:2 of 4 layers, said as layers to drop) reuses the choice.
    let (again, log) = fit("a", "--drop-layers", "auto:2");
    assert!(log.contains("chosen earlier"), "{log}");
    assert_eq!(again["teacher_layers"], choice["kept"]);
    // A fresh folder chooses anew, and the same.
    let (fresh, log) = fit("b", "--drop-layers", "auto:2");
    assert!(!log.contains("chosen earlier"), "{log}");
    assert_eq!(fresh["layer_choice"]["kept"], choice["kept"]);
}
