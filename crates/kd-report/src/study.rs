//! The input side: `study.json` and the files it points to (run metrics, run summaries,
//! evaluations, generations, dump manifests). Unknown fields in every file are ignored, so
//! the writers can add fields without breaking the report.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::fsutil::{read_text, read_text_optional};
use crate::{Error, Result};

/// The study description file inside a study folder.
pub const STUDY_FILE: &str = "study.json";
/// A run folder's training log, one JSON object per line.
pub const METRICS_FILE: &str = "metrics.jsonl";
/// A run folder's optional end-of-run summary.
pub const SUMMARY_FILE: &str = "summary.json";
/// An eval folder's held-out metrics.
pub const EVAL_FILE: &str = "eval.json";
/// An eval folder's optional sampled generations, one JSON object per line.
pub const GENERATIONS_FILE: &str = "generations.jsonl";
/// A dump folder's manifest.
pub const MANIFEST_FILE: &str = "manifest.json";

/// `DIR/study.json`: what was compared, where each result lives (paths relative to `DIR`),
/// and where it ran.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Study {
    /// One-line title of the study, used as the report's heading.
    pub title: String,
    /// The machine the study ran on, in words.
    pub machine: String,
    /// The command that reproduces the study.
    pub command: String,
    /// The methods compared, in the order they are reported.
    #[serde(default)]
    pub methods: Vec<MethodSpec>,
    /// The cost study: one entry per (k, tail) dump variant.
    #[serde(default)]
    pub cost: Vec<CostSpec>,
}

/// One method of the study: a training run (or none, for the initialisation) and its
/// held-out evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MethodSpec {
    /// Short identifier (`forward_kl`), used in `metrics.csv`.
    pub name: String,
    /// Human label (`forward KL`), used in tables, legends and headings.
    pub label: String,
    /// The run folder holding `metrics.jsonl`; `None` for a method without training.
    #[serde(default)]
    pub run: Option<PathBuf>,
    /// The eval folder holding `eval.json` (and optionally `generations.jsonl`).
    pub eval: PathBuf,
    /// The student this method trains, in words (`6 of 30 layers`), when the study compares
    /// several: the report gives each student its own table and plots.
    #[serde(default)]
    pub student: Option<String>,
}

/// One entry of the cost study: a dump with top-`k` targets and a tail policy, and the run
/// trained from it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CostSpec {
    /// Number of teacher log-probs kept per position.
    pub k: u32,
    /// How the tail mass beyond the top-k was treated (`bucket`, `renormalise`, ...).
    pub tail: String,
    /// The dump folder holding `manifest.json`.
    pub dump: PathBuf,
    /// Wall-clock seconds the teacher dump took.
    pub dump_seconds: f64,
    /// The run folder trained from this dump; `None` if no run is reported.
    #[serde(default)]
    pub run: Option<PathBuf>,
    /// The eval folder holding `eval.json`.
    pub eval: PathBuf,
    /// Identifier in `metrics.csv`; default `k<k>-<tail>`.
    #[serde(default)]
    pub name: Option<String>,
    /// What the cache holds, in words (`sample:12`); default `top-<k>, <tail> tail`.
    #[serde(default)]
    pub label: Option<String>,
    /// The line of the cost plot this entry belongs to; default `<tail> tail`.
    #[serde(default)]
    pub series: Option<String>,
    /// A remark shown in the cost table (for example the tail mass of a near-full cache).
    #[serde(default)]
    pub note: Option<String>,
}

/// What a user sees of a student's greedy answers to the held-out prompts (the `answers`
/// object of `eval.json`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AnswerMetrics {
    /// Answers scored.
    pub count: u64,
    /// Mean ROUGE-L F1 against the teacher's answers.
    pub rouge_l_f1: f64,
    /// Share of answers that are non-empty and end with an end-of-turn token in the limit.
    pub answered_share: f64,
    /// Mean answer length in tokens.
    pub mean_tokens: f64,
    /// Mean length of the teacher's answers to the same prompts.
    pub teacher_mean_tokens: f64,
    /// `mean_tokens / teacher_mean_tokens`; none when the teacher's answers are all empty.
    #[serde(default)]
    pub length_ratio: Option<f64>,
}

/// Held-out metrics of one evaluation (`eval.json`, or the `eval` object of a metrics line).
/// KL and NLL are in nats per distilled position.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EvalMetrics {
    /// Number of held-out positions evaluated.
    pub positions: u64,
    /// KL(teacher ‖ student), nats per position.
    pub forward_kl: f64,
    /// KL(student ‖ teacher), nats per position.
    pub reverse_kl: f64,
    /// Fraction of positions where the student's argmax is the teacher's argmax.
    pub top1_agreement: f64,
    /// Student negative log-likelihood of the reference token, nats per position.
    pub nll: f64,
    /// The student's greedy answers scored, when the evaluation generated them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answers: Option<AnswerMetrics>,
}

/// One point of a held-out curve: an evaluation line of `metrics.jsonl`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CurvePoint {
    /// Optimizer step at which the evaluation ran.
    pub step: u64,
    /// Distilled positions trained on before the evaluation.
    pub train_positions: u64,
    /// KL(teacher ‖ student), nats per position.
    pub forward_kl: f64,
    /// KL(student ‖ teacher), nats per position.
    pub reverse_kl: f64,
    /// Top-1 agreement with the teacher, a fraction.
    pub top1_agreement: f64,
    /// Student NLL, nats per position.
    pub nll: f64,
}

/// `summary.json` of a run (only the fields the report uses).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RunSummary {
    /// Wall-clock training seconds.
    pub seconds: f64,
    /// Mean training throughput, distilled positions per second.
    pub positions_per_s: f64,
    /// Optimizer steps taken.
    pub steps: u64,
}

/// The `totals` object of a dump manifest.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DumpTotals {
    /// Sequences dumped.
    pub rows: u64,
    /// Tokens in all sequences (prompt and response).
    pub tokens: u64,
    /// Distilled positions (each holds top-k teacher log-probs).
    pub positions: u64,
    /// Response tokens generated by the teacher.
    pub response_tokens: u64,
    /// Bytes of all shards on disk.
    pub bytes: u64,
}

/// One line of `generations.jsonl`: a held-out prompt, the teacher's and the student's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Generation {
    /// Stable prompt id; matches across methods.
    pub id: String,
    /// The prompt as shown to both models.
    pub prompt: String,
    /// The teacher's response.
    pub teacher: String,
    /// The student's response.
    pub student: String,
    /// ROUGE-L F1 of the student's response against the teacher's, when scored.
    #[serde(default)]
    pub rouge_l_f1: Option<f64>,
    /// Whether the student's response ended with an end-of-turn token, when known.
    #[serde(default)]
    pub ended: Option<bool>,
}

/// Reads `dir/study.json`.
pub fn read_study(dir: &Path) -> Result<Study> {
    read_json(&dir.join(STUDY_FILE))
}

/// Reads an eval folder's `eval.json`.
pub fn read_eval(eval_dir: &Path) -> Result<EvalMetrics> {
    read_json(&eval_dir.join(EVAL_FILE))
}

/// Reads a run folder's `summary.json`, or `None` when the run has none.
pub fn read_summary(run_dir: &Path) -> Result<Option<RunSummary>> {
    let path = run_dir.join(SUMMARY_FILE);
    match read_text_optional(&path)? {
        None => Ok(None),
        Some(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| Error::json(&path, &e)),
    }
}

/// Reads the `totals` of a dump folder's `manifest.json`.
pub fn read_dump_totals(dump_dir: &Path) -> Result<DumpTotals> {
    #[derive(Deserialize)]
    struct Manifest {
        totals: DumpTotals,
    }
    let m: Manifest = read_json(&dump_dir.join(MANIFEST_FILE))?;
    Ok(m.totals)
}

/// The fields of a `metrics.jsonl` line the report uses; training lines have no `eval`.
#[derive(Deserialize)]
struct MetricsLine {
    step: Option<u64>,
    train_positions: Option<u64>,
    eval: Option<EvalMetrics>,
}

/// Reads the held-out curve from a run folder's `metrics.jsonl`: one point per evaluation
/// line, in file order. Training lines are checked to be JSON objects and otherwise skipped;
/// blank lines are skipped, and so are truncated lines (valid JSON cut short, what a run
/// killed mid-write leaves before `student-fit` resumes it). Any other malformed line is an
/// [`Error::JsonLine`].
///
/// A resumed run may log a step again: a point whose step is not after the previous point's
/// replaces every earlier point from that step on, so the curve is the one of the final
/// history. Fails with [`Error::NoEvalLines`] when the file has no evaluation line.
pub fn read_curve(run_dir: &Path) -> Result<Vec<CurvePoint>> {
    let path = run_dir.join(METRICS_FILE);
    let text = read_text(&path)?;
    let mut curve: Vec<CurvePoint> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value = match serde_json::from_str(line) {
            Ok(v) => v,
            // A run killed mid-write leaves a prefix of a line; student-fit ends it and goes on.
            Err(e) if e.is_eof() => continue,
            Err(e) => return Err(Error::json_line(&path, line_no, &e)),
        };
        if !value.is_object() {
            return Err(Error::JsonLine {
                path,
                line: line_no,
                message: "expected a JSON object".into(),
            });
        }
        let m: MetricsLine =
            serde_json::from_value(value).map_err(|e| Error::json_line(&path, line_no, &e))?;
        let Some(eval) = m.eval else { continue };
        let missing = |field: &str| Error::JsonLine {
            path: path.clone(),
            line: line_no,
            message: format!("evaluation line without `{field}`"),
        };
        let point = CurvePoint {
            step: m.step.ok_or_else(|| missing("step"))?,
            train_positions: m
                .train_positions
                .ok_or_else(|| missing("train_positions"))?,
            forward_kl: eval.forward_kl,
            reverse_kl: eval.reverse_kl,
            top1_agreement: eval.top1_agreement,
            nll: eval.nll,
        };
        while curve.last().is_some_and(|p| p.step >= point.step) {
            curve.pop();
        }
        curve.push(point);
    }
    if curve.is_empty() {
        return Err(Error::NoEvalLines { path });
    }
    Ok(curve)
}

/// Reads an eval folder's `generations.jsonl`, or `None` when it has none. Blank lines are
/// skipped.
pub fn read_generations(eval_dir: &Path) -> Result<Option<Vec<Generation>>> {
    let path = eval_dir.join(GENERATIONS_FILE);
    let Some(text) = read_text_optional(&path)? else {
        return Ok(None);
    };
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let g = serde_json::from_str(line).map_err(|e| Error::json_line(&path, i + 1, &e))?;
        out.push(g);
    }
    Ok(Some(out))
}

/// Reads and parses a whole JSON file.
fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = read_text(path)?;
    serde_json::from_str(&text).map_err(|e| Error::json(path, &e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_dir(metrics: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(METRICS_FILE), metrics).unwrap();
        dir
    }

    const EVAL: &str = r#""eval": {"positions": 10, "forward_kl": 2.0, "reverse_kl": 1.0, "top1_agreement": 0.5, "nll": 3.0}"#;

    #[test]
    fn curve_skips_training_lines_and_ignores_unknown_fields() {
        let dir = run_dir(&format!(
            "{{\"step\": 0, \"train_positions\": 0, \"extra\": [1], {EVAL}}}\n\
             {{\"step\": 1, \"loss\": 2.1, \"clipped\": false}}\n\n\
             {{\"step\": 2, \"train_positions\": 80, {EVAL}}}\n"
        ));
        let c = read_curve(dir.path()).unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!((c[1].step, c[1].train_positions), (2, 80));
        assert_eq!(c[1].top1_agreement, 0.5);
    }

    #[test]
    fn resumed_run_keeps_the_final_history() {
        let dir = run_dir(&format!(
            "{{\"step\": 0, \"train_positions\": 0, {EVAL}}}\n\
             {{\"step\": 10, \"train_positions\": 100, {EVAL}}}\n\
             {{\"step\": 20, \"train_positions\": 200, {EVAL}}}\n\
             {{\"step\": 10, \"train_positions\": 101, {EVAL}}}\n"
        ));
        let steps: Vec<_> = read_curve(dir.path())
            .unwrap()
            .iter()
            .map(|p| (p.step, p.train_positions))
            .collect();
        assert_eq!(steps, [(0, 0), (10, 101)]);
    }

    #[test]
    fn killed_and_resumed_run_leaves_a_truncated_line_that_is_skipped() {
        let dir = run_dir(&format!(
            "{{\"step\": 0, \"train_positions\": 0, {EVAL}}}\n\
             {{\"step\": 1, \"loss\": 2.1, \"grad_n\n\
             {{\"step\": 2, \"train_positions\": 80, {EVAL}}}\n"
        ));
        assert_eq!(read_curve(dir.path()).unwrap().len(), 2);
    }

    #[test]
    fn curve_errors_name_file_and_line() {
        let dir = run_dir(&format!(
            "{{\"step\": 0, \"train_positions\": 0, {EVAL}}}\n[1, 2]\n"
        ));
        let r = read_curve(dir.path());
        assert!(matches!(r, Err(Error::JsonLine { line: 2, .. })), "{r:?}");

        let dir = run_dir(&format!("{{\"step\": 3, {EVAL}}}\n"));
        let r = read_curve(dir.path());
        assert!(matches!(r, Err(Error::JsonLine { line: 1, .. })), "{r:?}");

        let dir = run_dir("{\"step\": 1, \"loss\": 2.0}\n");
        assert!(matches!(
            read_curve(dir.path()),
            Err(Error::NoEvalLines { .. })
        ));
    }

    #[test]
    fn optional_files_may_be_missing_but_required_ones_may_not() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_summary(dir.path()).unwrap(), None);
        assert_eq!(read_generations(dir.path()).unwrap(), None);
        assert!(matches!(read_eval(dir.path()), Err(Error::Io { .. })));
        assert!(matches!(read_curve(dir.path()), Err(Error::Io { .. })));
    }
}
