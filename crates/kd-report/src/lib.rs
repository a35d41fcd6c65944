//! # kd-report: a distillation study, as results a person can read
//!
//! A study compares ways of training the student (SFT, forward KL, reverse KL, ...) and what
//! the teacher cache costs (top-k, tail policy). The pipeline leaves its evidence in a study
//! folder `DIR`: `DIR/study.json` lists the methods and cost variants and points (relative to
//! `DIR`) to their run folders (`metrics.jsonl`, `summary.json` from `student-fit`), eval
//! folders (`eval.json`, `generations.jsonl`) and dump folders (`manifest.json` from
//! `teacher-dump`). This crate reads all of it and writes `DIR/results/`:
//!
//! | file | content |
//! | --- | --- |
//! | `metrics.csv` | one row per method and per cost variant: final held-out metrics, training positions, seconds, and the answers' ROUGE-L F1, answered share and length ratio when scored |
//! | `results.json` | the whole [`Report`]: the above plus held-out curves, cost table, machine, command |
//! | `results.md` | methods table, plots, cost table, machine and command |
//! | `kl.png`, `top1.png` | held-out forward KL / top-1 agreement against training positions (`kl-1.png`, `kl-2.png`, ... one per student when the methods name several) |
//! | `cost.png` | bytes per position and held-out KL against k (only with a cost study) |
//! | `side-by-side.md` | teacher and student responses to the same held-out prompts |
//!
//! Every file is published atomically (temporary file in `results/`, then rename), so a
//! reader never sees a half-written report. Plots are drawn in pure Rust with a font bundled
//! in the crate: nothing depends on system fonts.
//!
//! Reading is strict where a wrong report would mislead: a missing `eval.json`, a malformed
//! line or a run without evaluation lines is an [`Error`] naming the file (and line). Optional
//! files (`summary.json`, `generations.jsonl`) may be missing; unknown fields are ignored.
//!
//! ```no_run
//! let written = kd_report::write_report(
//!     std::path::Path::new("studies/smollm2"),
//!     &kd_report::Options::default(),
//! )?;
//! for path in written {
//!     println!("{}", path.display());
//! }
//! # Ok::<(), kd_report::Error>(())
//! ```
//!
//! The `study-report` binary is a thin wrapper around [`write_report`].

mod error;
mod fsutil;
pub mod plot;
pub mod render;
pub mod report;
pub mod study;

use std::path::{Path, PathBuf};

pub use error::{Error, Result};
pub use report::{
    CostResult, MethodGenerations, MethodResult, Report, collect, collect_generations,
};
pub use study::{Study, read_study};

/// The folder inside a study folder that receives the report.
pub const RESULTS_DIR: &str = "results";

/// Settings of a report run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// Most prompts shown in `side-by-side.md`.
    pub max_prompts: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options { max_prompts: 6 }
    }
}

/// Reads the study in `dir` and writes its report to `dir/results/` (created if needed),
/// every file atomically. Returns the paths written, in the order written. Nothing is
/// written unless every input could be read.
pub fn write_report(dir: &Path, options: &Options) -> Result<Vec<PathBuf>> {
    let study = read_study(dir)?;
    let report = collect(dir, &study)?;
    let generations = collect_generations(dir, &study)?;

    // Render everything before publishing anything.
    // One pair of curve plots per student: `kl.png` and `top1.png` for a single one,
    // `kl-1.png`, `top1-1.png`, ... in the order of `Report::students` for several.
    let students = report.students();
    let mut curve_files: Vec<(String, Vec<u8>)> = Vec::new();
    let (mut kl_names, mut top1_names) = (Vec::new(), Vec::new());
    for (i, student) in students.iter().enumerate() {
        let suffix = if students.len() > 1 {
            format!("-{}", i + 1)
        } else {
            String::new()
        };
        for (metric, stem, names) in [
            (plot::CurveMetric::ForwardKl, "kl", &mut kl_names),
            (plot::CurveMetric::Top1Agreement, "top1", &mut top1_names),
        ] {
            let name = format!("{stem}{suffix}.png");
            let png = plot::curve_png(&report, metric, student.as_deref(), &name)?;
            names.push(name.clone());
            curve_files.push((name, png));
        }
    }
    let cost = if report.cost.is_empty() {
        None
    } else {
        Some(plot::cost_png(&report)?)
    };
    let links = render::Links {
        kl: kl_names,
        top1: top1_names,
        cost: cost.as_ref().map(|_| "cost.png".into()),
        side_by_side: (!generations.is_empty()).then(|| "side-by-side.md".into()),
    };
    let mut json = serde_json::to_string_pretty(&report).expect("a Report always serialises");
    json.push('\n');
    let mut files: Vec<(String, Vec<u8>)> = vec![
        (
            "metrics.csv".into(),
            render::metrics_csv(&report).into_bytes(),
        ),
        ("results.json".into(), json.into_bytes()),
    ];
    files.extend(curve_files);
    if let Some(cost) = cost {
        files.push(("cost.png".into(), cost));
    }
    files.push((
        "side-by-side.md".into(),
        render::side_by_side_markdown(&report.title, &generations, options.max_prompts)
            .into_bytes(),
    ));
    // Last, so that its links never point to plots that are not there yet.
    files.push((
        "results.md".into(),
        render::results_markdown(&report, &links).into_bytes(),
    ));

    let out_dir = dir.join(RESULTS_DIR);
    std::fs::create_dir_all(&out_dir).map_err(|e| Error::io(&out_dir, e))?;
    let mut written = Vec::with_capacity(files.len());
    for (name, bytes) in files {
        let path = out_dir.join(&name);
        fsutil::write_atomic(&path, &bytes)?;
        written.push(path);
    }
    Ok(written)
}
