//! `shard-cat`: list, print, verify and summarise teacher-logit shards.

use clap::Parser;
use kd_distill::cli::{run_main, shard_cat};

fn main() {
    let args = shard_cat::Args::parse();
    run_main(move || {
        let stdout = std::io::stdout();
        let mut out = std::io::BufWriter::new(stdout.lock());
        let ok = shard_cat::run(args, &mut out)?;
        std::io::Write::flush(&mut out)?;
        if !ok {
            std::process::exit(1);
        }
        Ok(())
    })
}
