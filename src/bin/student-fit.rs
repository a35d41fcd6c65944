//! `student-fit`: train a student from teacher-logit shards alone (no teacher in memory).

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use kd_distill::cli::{human_bytes, run_main, set_threads};
use kd_distill::pipeline::Pipeline;
use kd_student::fit::{FitConfig, fit};

/// Train a student from teacher-logit shards: the losses of DESIGN.md, AdamW, checkpoints
/// every N steps (atomic), exact resume, held-out evaluation, export to a Hugging Face
/// directory. Settings come from the pipeline's [fit] section; flags override.
#[derive(Parser, Debug)]
#[command(name = "student-fit", version)]
struct Args {
    /// Pipeline file (TOML) with a [fit] section (see pipelines/).
    #[arg(long)]
    pipeline: PathBuf,
    /// Override the number of optimizer steps.
    #[arg(long)]
    steps: Option<u64>,
    /// Override the output folder (checkpoints/, metrics.jsonl, student/).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue from the newest checkpoint in the output folder (refused if the shards or
    /// any setting differ).
    #[arg(long)]
    resume: bool,
    /// CPU threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Print the final summary as JSON.
    #[arg(long)]
    json: bool,
}

fn main() {
    let args = Args::parse();
    run_main(move || {
        set_threads(args.threads);
        let p = Pipeline::read(&args.pipeline)?;
        let table = p
            .fit
            .with_context(|| format!("{}: no [fit] section", args.pipeline.display()))?;
        let mut cfg: FitConfig = toml::Value::Table(table)
            .try_into()
            .with_context(|| format!("{}: invalid [fit] section", args.pipeline.display()))?;
        if let Some(s) = args.steps {
            cfg.steps = s;
        }
        if let Some(o) = args.out {
            cfg.out = o;
        }
        if !args.json {
            eprintln!(
                "student-fit: shards {}, loss {:?}, {} steps -> {}",
                cfg.shards.display(),
                cfg.loss,
                cfg.steps,
                cfg.out.display()
            );
        }
        // First Ctrl-C: checkpoint at the next step boundary and stop; second: stop now.
        ctrlc::set_handler(|| {
            static SEEN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
            if SEEN.swap(true, std::sync::atomic::Ordering::SeqCst) {
                std::process::exit(130);
            }
            eprintln!(
                "interrupt: writing a checkpoint at the next step (Ctrl-C again to stop now)"
            );
            kd_student::fit::request_stop();
        })
        .context("installing the Ctrl-C handler")?;
        let s = fit(&cfg, args.resume, !args.json)?;
        let mut out = std::io::stdout().lock();
        if args.json {
            writeln!(out, "{}", serde_json::to_string_pretty(&s)?)?;
        } else {
            writeln!(
                out,
                "held-out at start: forward KL {:.4}, reverse KL {:.4}, top-1 agreement {:.3}, NLL {:.4}",
                s.initial.forward_kl, s.initial.reverse_kl, s.initial.top1_agreement, s.initial.nll
            )?;
            writeln!(
                out,
                "held-out at end:   forward KL {:.4}, reverse KL {:.4}, top-1 agreement {:.3}, NLL {:.4}",
                s.final_eval.forward_kl,
                s.final_eval.reverse_kl,
                s.final_eval.top1_agreement,
                s.final_eval.nll
            )?;
            writeln!(
                out,
                "{} steps, {:.0} positions/s, checkpoint {}, export {}, peak memory {}",
                s.steps,
                s.positions_per_s,
                s.checkpoint.display(),
                s.export.display(),
                kd_teacher::dump::peak_rss_bytes()
                    .map(human_bytes)
                    .unwrap_or_else(|| "unknown".into())
            )?;
        }
        Ok(())
    })
}
