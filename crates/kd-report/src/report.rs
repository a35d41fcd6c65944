//! The report's data model: everything read from a study folder, resolved and checked, ready
//! to be rendered. It is also what `results.json` holds.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::study::{
    CostSpec, CurvePoint, DumpTotals, EvalMetrics, Generation, MANIFEST_FILE, MethodSpec, Study,
    read_curve, read_dump_totals, read_eval, read_generations, read_summary,
};
use crate::{Error, Result};

/// Version of the `results.json` layout; bumped when a field changes meaning or goes away.
pub const RESULTS_FORMAT_VERSION: u32 = 1;

/// A whole study, read and resolved. Serialised as `results.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// [`RESULTS_FORMAT_VERSION`] at the time of writing.
    pub format_version: u32,
    /// The study's title.
    pub title: String,
    /// The machine the study ran on, in words.
    pub machine: String,
    /// The command that reproduces the study.
    pub command: String,
    /// One entry per method, in `study.json` order.
    pub methods: Vec<MethodResult>,
    /// One entry per cost-study variant, in `study.json` order.
    pub cost: Vec<CostResult>,
}

/// The outcome of one method: final held-out metrics, training effort and the held-out curve.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MethodResult {
    /// Short identifier from `study.json`.
    pub name: String,
    /// Human label from `study.json`.
    pub label: String,
    /// The student trained, when the study compares several.
    #[serde(default)]
    pub student: Option<String>,
    /// Final held-out metrics (`eval.json`).
    pub eval: EvalMetrics,
    /// Distilled positions trained on: the last evaluation line's `train_positions`, 0 without
    /// a run.
    pub train_positions: u64,
    /// Wall-clock training seconds from the run's `summary.json`; `None` without a run or
    /// without a summary.
    pub train_seconds: Option<f64>,
    /// Held-out curve from the run's evaluation lines; empty without a run.
    pub curve: Vec<CurvePoint>,
}

/// The outcome of one cost-study variant: what the dump cost and what the student reached.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CostResult {
    /// Identifier in `metrics.csv`: the study's, else `k<k>-<tail>`.
    pub name: String,
    /// Human label: the study's, else `top-<k>, <tail> tail`.
    pub label: String,
    /// The line of the cost plot: the study's, else `<tail> tail`.
    pub series: String,
    /// A remark from the study, shown in the cost table.
    #[serde(default)]
    pub note: Option<String>,
    /// Teacher log-probs kept per position.
    pub k: u32,
    /// Tail policy.
    pub tail: String,
    /// The dump manifest's totals.
    pub dump: DumpTotals,
    /// Shard bytes per distilled position (`totals.bytes / totals.positions`).
    pub bytes_per_position: f64,
    /// Wall-clock seconds of the teacher dump.
    pub dump_seconds: f64,
    /// Final held-out metrics of the student trained from this dump.
    pub eval: EvalMetrics,
    /// Distilled positions trained on (as for [`MethodResult::train_positions`]).
    pub train_positions: u64,
    /// Wall-clock training seconds, if the run has a summary.
    pub train_seconds: Option<f64>,
    /// Held-out curve of the run; empty without a run.
    pub curve: Vec<CurvePoint>,
}

/// The sampled generations of one method, for the side-by-side comparison.
#[derive(Debug, Clone, PartialEq)]
pub struct MethodGenerations {
    /// Human label of the method.
    pub label: String,
    /// The method's `generations.jsonl`, in file order.
    pub generations: Vec<Generation>,
}

/// What a run folder contributes: curve, trained positions and seconds.
struct RunResult {
    curve: Vec<CurvePoint>,
    train_positions: u64,
    train_seconds: Option<f64>,
}

fn read_run(dir: &Path, run: Option<&Path>) -> Result<RunResult> {
    let Some(run) = run else {
        return Ok(RunResult {
            curve: Vec::new(),
            train_positions: 0,
            train_seconds: None,
        });
    };
    let run_dir = dir.join(run);
    let curve = read_curve(&run_dir)?;
    let summary = read_summary(&run_dir)?;
    Ok(RunResult {
        train_positions: curve.last().map_or(0, |p| p.train_positions),
        train_seconds: summary.map(|s| s.seconds),
        curve,
    })
}

fn method_result(dir: &Path, m: &MethodSpec) -> Result<MethodResult> {
    let eval = read_eval(&dir.join(&m.eval))?;
    let run = read_run(dir, m.run.as_deref())?;
    Ok(MethodResult {
        name: m.name.clone(),
        label: m.label.clone(),
        student: m.student.clone(),
        eval,
        train_positions: run.train_positions,
        train_seconds: run.train_seconds,
        curve: run.curve,
    })
}

fn cost_result(dir: &Path, c: &CostSpec) -> Result<CostResult> {
    let dump_dir = dir.join(&c.dump);
    let dump = read_dump_totals(&dump_dir)?;
    if dump.positions == 0 {
        return Err(Error::Invalid {
            path: dump_dir.join(MANIFEST_FILE),
            what: "totals.positions is 0: no bytes per position".into(),
        });
    }
    let eval = read_eval(&dir.join(&c.eval))?;
    let run = read_run(dir, c.run.as_deref())?;
    Ok(CostResult {
        name: c
            .name
            .clone()
            .unwrap_or_else(|| format!("k{}-{}", c.k, c.tail)),
        label: c
            .label
            .clone()
            .unwrap_or_else(|| format!("top-{}, {} tail", c.k, c.tail)),
        series: c
            .series
            .clone()
            .unwrap_or_else(|| format!("{} tail", c.tail)),
        note: c.note.clone(),
        k: c.k,
        tail: c.tail.clone(),
        bytes_per_position: dump.bytes as f64 / dump.positions as f64,
        dump,
        dump_seconds: c.dump_seconds,
        eval,
        train_positions: run.train_positions,
        train_seconds: run.train_seconds,
        curve: run.curve,
    })
}

/// Reads every file `study` points to (paths relative to `dir`) and assembles the report.
/// Fails on the first missing or malformed required file, naming it.
pub fn collect(dir: &Path, study: &Study) -> Result<Report> {
    Ok(Report {
        format_version: RESULTS_FORMAT_VERSION,
        title: study.title.clone(),
        machine: study.machine.clone(),
        command: study.command.clone(),
        methods: study
            .methods
            .iter()
            .map(|m| method_result(dir, m))
            .collect::<Result<_>>()?,
        cost: study
            .cost
            .iter()
            .map(|c| cost_result(dir, c))
            .collect::<Result<_>>()?,
    })
}

impl Report {
    /// The students compared, in the order the methods first name them (`None` for methods
    /// that name none); one entry when the study trains a single student.
    pub fn students(&self) -> Vec<Option<String>> {
        let mut out: Vec<Option<String>> = Vec::new();
        for m in &self.methods {
            if !out.contains(&m.student) {
                out.push(m.student.clone());
            }
        }
        if out.is_empty() {
            out.push(None);
        }
        out
    }
}

/// Reads the generations of every method that has a `generations.jsonl`, in study order.
/// Cost-study variants are not included.
pub fn collect_generations(dir: &Path, study: &Study) -> Result<Vec<MethodGenerations>> {
    let mut out = Vec::new();
    for m in &study.methods {
        if let Some(generations) = read_generations(&dir.join(&m.eval))? {
            out.push(MethodGenerations {
                label: match &m.student {
                    Some(s) => format!("{s}: {}", m.label),
                    None => m.label.clone(),
                },
                generations,
            });
        }
    }
    Ok(out)
}
