//! Fixtures: a tiny study folder written in the test, in its own temp dir.

use std::path::Path;

use serde_json::{Value, json};

/// Writes `value` as JSON to `dir/rel`, creating folders.
pub fn write_json(dir: &Path, rel: &str, value: &Value) {
    let path = dir.join(rel);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, serde_json::to_string_pretty(value).unwrap()).unwrap();
}

/// Writes one JSON object per line to `dir/rel`, creating folders.
pub fn write_jsonl(dir: &Path, rel: &str, lines: &[Value]) {
    let text: String = lines.iter().map(|v| format!("{v}\n")).collect();
    write_text(dir, rel, &text);
}

/// Writes `text` to `dir/rel`, creating folders.
pub fn write_text(dir: &Path, rel: &str, text: &str) {
    let path = dir.join(rel);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

/// Held-out metrics as `eval.json` and metrics lines write them.
pub fn eval(positions: u64, fkl: f64, rkl: f64, top1: f64, nll: f64) -> Value {
    json!({"positions": positions, "forward_kl": fkl, "reverse_kl": rkl,
           "top1_agreement": top1, "nll": nll, "seconds": 1.5})
}

/// A run's `metrics.jsonl`: an evaluation every 10 steps (410 positions per step) with forward
/// KL `kl[i]` and top-1 agreement `top1[i]`, training lines in between.
pub fn metrics_lines(kl: &[f64], top1: &[f64]) -> Vec<Value> {
    let mut lines = Vec::new();
    for (i, (&k, &t)) in kl.iter().zip(top1).enumerate() {
        let step = 10 * i as u64;
        if i > 0 {
            lines.push(
                json!({"step": step, "loss": 2.1, "divergence": 2.0, "hard_ce": 3.1,
                              "lr": 0.0005, "grad_norm": 0.8, "clipped": false, "positions": 412,
                              "train_positions": step * 410, "positions_per_s": 40.1}),
            );
        }
        lines.push(json!({"step": step, "train_positions": step * 410,
                          "eval": eval(3000, k, k * 0.7, t, k + 1.0)}));
    }
    lines
}

/// The forward KL curve of the `sft` run.
pub const SFT_KL: [f64; 3] = [5.9, 4.1, 3.55];
/// The top-1 curve of the `sft` run.
pub const SFT_TOP1: [f64; 3] = [0.11, 0.3, 0.35];
/// The forward KL curve of the `forward_kl` run.
pub const FKL_KL: [f64; 3] = [5.9, 2.5, 1.875];
/// The top-1 curve of the `forward_kl` run.
pub const FKL_TOP1: [f64; 3] = [0.11, 0.42, 0.5125];

/// Writes a study into `dir`: the initialisation (no run), two trained methods (`sft` with a
/// summary, `forward_kl` without), one cost entry, and generations of both trained methods
/// for three prompts (in opposite orders).
pub fn write_study(dir: &Path) {
    write_json(
        dir,
        "study.json",
        &json!({
            "title": "Distilling a toy teacher into a tiny student",
            "machine": "2-vCPU test box",
            "command": "./pipelines/study.sh",
            "methods": [
                {"name": "init", "label": "initialisation (no training)", "run": null, "eval": "evals/init"},
                {"name": "sft", "label": "SFT on teacher responses (α = 0)", "run": "runs/sft", "eval": "evals/sft"},
                {"name": "forward_kl", "label": "forward KL, top-8 | bucket", "run": "runs/forward_kl", "eval": "evals/forward_kl"}
            ],
            "cost": [
                {"k": 8, "tail": "bucket", "dump": "dumps/train-k8", "dump_seconds": 123.4,
                 "run": "runs/fkl-k8-bucket", "eval": "evals/fkl-k8-bucket"}
            ],
            "notes": "unknown fields are ignored"
        }),
    );
    write_json(
        dir,
        "evals/init/eval.json",
        &eval(3000, 5.8123, 3.91, 0.1134, 6.9),
    );
    write_json(
        dir,
        "evals/sft/eval.json",
        &eval(3000, 3.5, 2.25, 0.3456, 4.5),
    );
    write_json(
        dir,
        "evals/forward_kl/eval.json",
        &eval(3000, 1.8765, 1.3, 0.5123, 2.9),
    );
    write_json(
        dir,
        "evals/fkl-k8-bucket/eval.json",
        &eval(3000, 2.0, 1.4, 0.5, 3.0),
    );

    write_jsonl(
        dir,
        "runs/sft/metrics.jsonl",
        &metrics_lines(&SFT_KL, &SFT_TOP1),
    );
    write_json(
        dir,
        "runs/sft/summary.json",
        &json!({"seconds": 245.0, "positions_per_s": 33.5, "steps": 20, "extra": true}),
    );
    write_jsonl(
        dir,
        "runs/forward_kl/metrics.jsonl",
        &metrics_lines(&FKL_KL, &FKL_TOP1),
    );
    write_jsonl(
        dir,
        "runs/fkl-k8-bucket/metrics.jsonl",
        &metrics_lines(&[5.9, 2.0], &[0.1, 0.5]),
    );
    write_json(
        dir,
        "dumps/train-k8/manifest.json",
        &json!({"format_version": 1,
                "totals": {"rows": 10, "tokens": 900, "positions": 400, "response_tokens": 400, "bytes": 25000}}),
    );

    let prompts = [
        ("seed_task_3", "Name a colour.", "Blue."),
        (
            "seed_task_1",
            "Write `ls` in a fence:\n```sh\nls\n```",
            "```sh\nls\n```",
        ),
        ("seed_task_2", "Say hi.", "Hi!"),
    ];
    for (method, prefix) in [("sft", "SFT says"), ("forward_kl", "FKL says")] {
        let mut lines: Vec<Value> = prompts
            .iter()
            .map(|(id, prompt, teacher)| {
                json!({"id": id, "prompt": prompt, "teacher": teacher,
                       "student": format!("{prefix} {id}"), "tokens": 5})
            })
            .collect();
        if method == "forward_kl" {
            // A different order: side-by-side.md must follow the first method's.
            lines.reverse();
        }
        write_jsonl(dir, &format!("evals/{method}/generations.jsonl"), &lines);
    }
}
