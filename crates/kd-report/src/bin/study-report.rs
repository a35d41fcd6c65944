//! `study-report`: turn a distillation study folder into tables, plots and side-by-side
//! generations under `DIR/results/`.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

/// Write the report of a distillation study: metrics.csv, results.json, results.md, kl.png and
/// top1.png (kl-1.png, top1-1.png, ... one pair per student when the methods name several),
/// cost.png (with a cost study) and side-by-side.md under DIR/results/.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// The study folder: holds study.json, whose paths are relative to this folder.
    #[arg(value_name = "DIR")]
    dir: PathBuf,

    /// Most prompts shown in side-by-side.md, taken in the order of the first method that
    /// has generations.
    #[arg(long, value_name = "N", default_value_t = kd_report::Options::default().max_prompts)]
    max_prompts: usize,
}

fn run(args: Args) -> anyhow::Result<()> {
    let options = kd_report::Options {
        max_prompts: args.max_prompts,
    };
    let written = kd_report::write_report(&args.dir, &options)
        .with_context(|| format!("report of the study in {}", args.dir.display()))?;
    let mut out = std::io::stdout().lock();
    for path in written {
        writeln!(out, "{}", path.display())?;
    }
    out.flush()?;
    Ok(())
}

fn main() {
    let args = Args::parse();
    if let Err(e) = run(args) {
        // A closed pipe (`study-report DIR | head -1`) is not an error.
        let broken_pipe = e.chain().any(|c| {
            c.downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
        });
        if !broken_pipe {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}
