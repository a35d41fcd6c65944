//! `shard-cat`: look inside a teacher-logit cache.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use kd_shard::{Manifest, Row};
use kd_tokenizer::Tokenizer;

use super::human_bytes;

/// Look inside teacher-logit shards: list, print decoded rows with the teacher's top-k, verify,
/// summarise, print the schema, merge the manifests of a --part job.
#[derive(Parser, Debug)]
#[command(name = "shard-cat", version)]
pub struct Args {
    /// Machine-readable JSON output instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Summary of the manifest: teacher, tokenizer, input, settings, shards, totals.
    Ls { dir: PathBuf },
    /// Print the first rows: prompt, response, and per position the actual token and the
    /// teacher's top tokens with probabilities (and the draws of sampled targets, with counts).
    Head {
        dir: PathBuf,
        /// Rows to print.
        #[arg(short = 'n', long, default_value_t = 3)]
        rows: usize,
        #[command(flatten)]
        view: View,
    },
    /// Print the row with this id.
    Show {
        dir: PathBuf,
        id: String,
        #[command(flatten)]
        view: View,
    },
    /// Check hashes, sizes, schema and row invariants against the manifest; exits 1 naming
    /// every bad file.
    Verify {
        dir: PathBuf,
        /// Check hashes, sizes and footers only, without decoding rows.
        #[arg(long)]
        quick: bool,
    },
    /// Rows, tokens, positions, bytes per distilled position, mean tail mass, mean top-1
    /// probability.
    Stats { dir: PathBuf },
    /// The shard and manifest schema (the newest version, 2; `--version 1` for the first).
    Schema {
        #[arg(long, default_value_t = kd_shard::FORMAT_VERSION, value_parser = clap::value_parser!(u32).range(1..=kd_shard::FORMAT_VERSION as i64))]
        version: u32,
    },
    /// Combine the dumps of a `teacher-dump --part I/N` job into one folder with one manifest
    /// (shards are hard-linked, or copied across filesystems).
    Merge {
        /// The part folders, in any order.
        #[arg(required = true)]
        parts: Vec<PathBuf>,
        /// The merged folder (created; must not hold a manifest).
        #[arg(long)]
        out: PathBuf,
    },
    /// Write another cache from a finished one, without the teacher: fewer top-k entries
    /// (the tail mass recomputed from the stored values), the other shard format, or a subset
    /// of the rows. From a format-1 source the rows are exactly those a dump with the new
    /// settings writes. The new manifest has the identity such a dump would have and names
    /// its source in `derived_from`. Sampled targets are kept as they are.
    Derive {
        /// The source cache.
        src: PathBuf,
        /// The new cache's folder (created; must not hold a manifest).
        #[arg(long)]
        out: PathBuf,
        /// Top-k entries per position (at most the source's) [default: the source's].
        #[arg(long)]
        top_k: Option<usize>,
        /// Shard format, 1 or 2 [default: the source's].
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=kd_shard::FORMAT_VERSION as i64))]
        shard_format: Option<u32>,
        /// Keep only the rows whose ids are listed in this file, one per line.
        #[arg(long)]
        ids: Option<PathBuf>,
    },
}

#[derive(clap::Args, Debug)]
pub struct View {
    /// Teacher tokens shown per position.
    #[arg(long, default_value_t = 5)]
    pub top: usize,
    /// Positions shown per row (0 = all).
    #[arg(long, default_value_t = 16)]
    pub positions: usize,
    /// Tokenizer for decoding (tokenizer.json or a GGUF); default: the dump's tokenizer.json.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
}

fn load_tokenizer(dir: &Path, explicit: Option<&Path>) -> anyhow::Result<Option<Tokenizer>> {
    let path = match explicit {
        Some(p) => p.to_path_buf(),
        None => {
            let p = dir.join("tokenizer.json");
            if !p.exists() {
                return Ok(None);
            }
            p
        }
    };
    let tok = if path.extension().is_some_and(|e| e == "gguf") {
        let c = kd_model::loader::read_gguf_header(&path)?;
        Tokenizer::from_gguf(&c).with_context(|| path.display().to_string())?
    } else {
        Tokenizer::from_tokenizer_json(&path).with_context(|| path.display().to_string())?
    };
    Ok(Some(tok))
}

fn manifest(dir: &Path) -> anyhow::Result<Manifest> {
    Ok(kd_shard::read_manifest(&dir.join(kd_shard::MANIFEST_FILE))?)
}

/// Runs one `shard-cat` command, writing to `out`.
pub fn run(args: Args, out: &mut dyn Write) -> anyhow::Result<bool> {
    match args.cmd {
        Cmd::Ls { dir } => {
            let m = manifest(&dir)?;
            if args.json {
                writeln!(out, "{}", serde_json::to_string_pretty(&m)?)?;
            } else {
                print_ls(&m, out)?;
            }
        }
        Cmd::Head { dir, rows, view } => {
            let m = manifest(&dir)?;
            let tok = load_tokenizer(&dir, view.tokenizer.as_deref())?;
            let mut shown = 0;
            'outer: for s in &m.shards {
                for row in kd_shard::ShardReader::open(&dir.join(&s.file))? {
                    if shown >= rows {
                        break 'outer;
                    }
                    print_row(&row?, &m, tok.as_ref(), &view, args.json, out)?;
                    shown += 1;
                }
            }
        }
        Cmd::Show { dir, id, view } => {
            let m = manifest(&dir)?;
            let tok = load_tokenizer(&dir, view.tokenizer.as_deref())?;
            for s in &m.shards {
                for row in kd_shard::ShardReader::open(&dir.join(&s.file))? {
                    let row = row?;
                    if row.id == id {
                        print_row(&row, &m, tok.as_ref(), &view, args.json, out)?;
                        return Ok(true);
                    }
                }
            }
            bail!("{}: no row with id `{id}`", dir.display());
        }
        Cmd::Verify { dir, quick } => {
            let r = kd_shard::verify_dir(&dir, !quick)?;
            print_verify(&r, &dir, quick, args.json, out)?;
            return Ok(r.problems.is_empty());
        }
        Cmd::Stats { dir } => {
            let s = kd_shard::stats_dir(&dir)?;
            print_stats(&s, args.json, out)?;
        }
        Cmd::Schema { version } => {
            writeln!(
                out,
                "{}",
                serde_json::to_string_pretty(&kd_shard::schema_json_of(version))?
            )?;
        }
        Cmd::Derive {
            src,
            out: dest,
            top_k,
            shard_format,
            ids,
        } => {
            let ids = match ids {
                Some(p) => Some(
                    std::fs::read_to_string(&p)
                        .with_context(|| format!("reading {}", p.display()))?
                        .lines()
                        .map(str::trim)
                        .filter(|l| !l.is_empty())
                        .map(String::from)
                        .collect(),
                ),
                None => None,
            };
            let opts = kd_shard::DeriveOptions {
                top_k,
                format_version: shard_format,
                ids,
            };
            let m = kd_shard::derive(&src, &dest, &opts)?;
            if args.json {
                writeln!(out, "{}", serde_json::to_string_pretty(&m)?)?;
            } else {
                writeln!(
                    out,
                    "derived {} rows, {} positions (top-{}, format {}) from {} -> {}",
                    m.totals.rows,
                    m.totals.positions,
                    m.top_k(),
                    m.format_version,
                    src.display(),
                    dest.join(kd_shard::MANIFEST_FILE).display()
                )?;
            }
        }
        Cmd::Merge { parts, out: dest } => {
            let m = kd_shard::merge_parts(&parts, &dest)?;
            if args.json {
                writeln!(out, "{}", serde_json::to_string_pretty(&m)?)?;
            } else {
                writeln!(
                    out,
                    "merged {} parts: {} shards, {} rows -> {}",
                    parts.len(),
                    m.shards.len(),
                    m.totals.rows,
                    dest.join(kd_shard::MANIFEST_FILE).display()
                )?;
            }
        }
    }
    Ok(true)
}

/// Prints what `verify` found: the problems on stderr, a line on success.
fn print_verify(
    r: &kd_shard::VerifyReport,
    dir: &Path,
    quick: bool,
    json: bool,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&r)?)?;
    } else {
        for p in &r.problems {
            eprintln!("{}: {}", dir.join(&p.file).display(), p.what);
        }
        if r.problems.is_empty() {
            writeln!(
                out,
                "ok: {} shards, {} rows verified{}",
                r.files_checked,
                r.rows,
                if quick {
                    " (quick: hashes and footers)"
                } else {
                    ""
                }
            )?;
        } else {
            eprintln!("{} problem(s) found in {}", r.problems.len(), dir.display());
        }
    }
    Ok(())
}

/// Prints a cache's statistics, one per line (or as JSON).
fn print_stats(s: &kd_shard::Stats, json: bool, out: &mut dyn Write) -> anyhow::Result<()> {
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&s)?)?;
    } else {
        writeln!(out, "shards                 {}", s.files)?;
        writeln!(out, "rows                   {}", s.rows)?;
        writeln!(out, "tokens                 {}", s.tokens)?;
        writeln!(out, "distilled positions    {}", s.positions)?;
        writeln!(out, "teacher-written tokens {}", s.response_tokens)?;
        writeln!(out, "top-k                  {}", s.k)?;
        if s.samples > 0 {
            writeln!(out, "draws per position     {}", s.samples)?;
            writeln!(
                out,
                "distinct ids drawn     {:.2} per position, holding {:.4} of the teacher's mass",
                s.mean_distinct_samples, s.mean_sampled_mass
            )?;
        }
        writeln!(
            out,
            "bytes                  {} ({})",
            s.bytes,
            human_bytes(s.bytes)
        )?;
        writeln!(out, "bytes per position     {:.1}", s.bytes_per_position)?;
        writeln!(
            out,
            "bytes per entry        {:.2}{}",
            s.bytes_per_entry,
            if s.samples > 0 {
                " (a top-k entry or a draw)"
            } else {
                ""
            }
        )?;
        writeln!(
            out,
            "format version         {}{}",
            s.format_version,
            if s.format_version >= 2 {
                " (log-probs in steps of 1/1024 nats)"
            } else {
                " (f32 log-probs)"
            }
        )?;
        if s.k > 0 {
            writeln!(out, "mean tail mass         {:.4}", s.mean_tail_mass)?;
            writeln!(out, "mean top-1 probability {:.4}", s.mean_top1_prob)?;
        }
        writeln!(
            out,
            "mean token log-prob    {:.4} nats",
            s.mean_token_logprob
        )?;
        writeln!(out, "bytes per position by column")?;
        let per = |b: u64| b as f64 / s.positions.max(1) as f64;
        for (col, b) in &s.bytes_by_column {
            writeln!(out, "  {col:<22} {:8.2}", per(*b))?;
        }
        for (src, ss) in &s.by_source {
            let mut line = format!("  {src:<10} rows {} positions {}", ss.rows, ss.positions);
            if s.k > 0 {
                line += &format!(
                    " tail {:.4} top-1 {:.4}",
                    ss.mean_tail_mass, ss.mean_top1_prob
                );
            }
            writeln!(out, "{line}")?;
        }
    }
    Ok(())
}

fn print_ls(m: &Manifest, out: &mut dyn Write) -> anyhow::Result<()> {
    let short = |v: &serde_json::Value| {
        v.as_str()
            .map(|s| s.chars().take(12).collect::<String>())
            .unwrap_or_default()
    };
    writeln!(
        out,
        "format     {} v{} by {}",
        m.format, m.format_version, m.producer
    )?;
    writeln!(
        out,
        "teacher    {} ({} params, sha256 {}…)",
        m.teacher["file"].as_str().unwrap_or("?"),
        m.teacher["n_params"],
        short(&m.teacher["weights_sha256"])
    )?;
    writeln!(
        out,
        "tokenizer  vocab {} fingerprint {}…",
        m.tokenizer["vocab_size"],
        short(&m.tokenizer["fingerprint"])
    )?;
    writeln!(
        out,
        "input      {} ({} rows, sha256 {}…)",
        m.input["file"].as_str().unwrap_or("?"),
        m.input["rows"],
        short(&m.input["sha256"])
    )?;
    writeln!(out, "settings   {}", m.settings)?;
    if let Some(p) = m.part {
        writeln!(out, "part       {}/{}", p.index, p.count)?;
    }
    writeln!(
        out,
        "complete   {}   fingerprint {}…",
        m.complete,
        &m.fingerprint[..m.fingerprint.len().min(12)]
    )?;
    writeln!(
        out,
        "{:<32} {:>6} {:>9} {:>10}  sha256",
        "shard", "rows", "positions", "bytes"
    )?;
    for s in &m.shards {
        writeln!(
            out,
            "{:<32} {:>6} {:>9} {:>10}  {}…",
            s.file,
            s.rows,
            s.positions,
            s.bytes,
            &s.sha256[..s.sha256.len().min(12)]
        )?;
    }
    let t = &m.totals;
    writeln!(
        out,
        "total: {} rows, {} tokens, {} positions, {} ({:.1} bytes/position)",
        t.rows,
        t.tokens,
        t.positions,
        human_bytes(t.bytes),
        if t.positions > 0 {
            t.bytes as f64 / t.positions as f64
        } else {
            0.0
        }
    )?;
    Ok(())
}

fn tok_text(tok: Option<&Tokenizer>, id: u32) -> String {
    match tok {
        Some(t) => format!("{:?}", t.token_text(id)),
        None => format!("#{id}"),
    }
}

fn print_row(
    row: &Row,
    m: &Manifest,
    tok: Option<&Tokenizer>,
    view: &View,
    json: bool,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let p = row.prompt_len as usize;
    let n_pos = row.n_pos();
    let shown = if view.positions == 0 {
        n_pos
    } else {
        view.positions.min(n_pos)
    };
    let (k, n) = (m.top_k(), m.samples());
    let top = view.top.min(k);
    if json {
        let positions: Vec<_> = (0..shown)
            .map(|i| {
                let t = p - 1 + i;
                let next = row.input_ids[t + 1];
                let tops: Vec<_> = (0..top)
                    .map(|j| {
                        let id = row.topk_ids[i * k + j];
                        serde_json::json!({"id": id, "text": tok.map(|t| t.token_text(id)),
                            "prob": f64::from(row.topk_logprobs[i * k + j]).exp()})
                    })
                    .collect();
                let drawn: Vec<_> = if n > 0 {
                    row.sample_counts(i, n)
                        .into_iter()
                        .map(|(id, c, lp)| {
                            serde_json::json!({"id": id, "text": tok.map(|t| t.token_text(id)),
                                "count": c, "prob": f64::from(lp).exp()})
                        })
                        .collect()
                } else {
                    Vec::new()
                };
                let mut v = serde_json::json!({"t": t, "token": next,
                    "text": tok.map(|t| t.token_text(next)),
                    "logprob": row.token_logprob[i], "top": tops});
                if n > 0 {
                    v["samples"] = serde_json::json!(drawn);
                }
                v
            })
            .collect();
        let v = serde_json::json!({
            "id": row.id, "source": row.source.as_str(), "prompt_len": p, "len": row.input_ids.len(),
            "prompt": tok.map(|t| t.decode(&row.input_ids[..p], false)),
            "response": tok.map(|t| t.decode(&row.input_ids[p..], false)),
            "positions": positions,
        });
        writeln!(out, "{v}")?;
        return Ok(());
    }
    writeln!(
        out,
        "── id {}  ({}, prompt {} tokens, {} distilled positions)",
        row.id,
        row.source.as_str(),
        p,
        n_pos
    )?;
    if let Some(t) = tok {
        writeln!(
            out,
            "prompt:\n{}",
            t.decode(&row.input_ids[..p], false).trim_end()
        )?;
        writeln!(out, "response:\n{}", t.decode(&row.input_ids[p..], false))?;
    } else {
        writeln!(
            out,
            "(no tokenizer.json beside the shards: ids only; pass --tokenizer)"
        )?;
        writeln!(out, "prompt ids: {:?}", &row.input_ids[..p])?;
        writeln!(out, "response ids: {:?}", &row.input_ids[p..])?;
    }
    let header = match (k, n) {
        (_, 0) => format!("teacher top-{top}"),
        (0, n) => format!("{n} draws from the teacher: token ×count (teacher prob)"),
        (_, n) => format!("teacher top-{top} | {n} draws: token ×count (teacher prob)"),
    };
    writeln!(
        out,
        "positions: actual next token (teacher prob) | {header}"
    )?;
    for i in 0..shown {
        let t = p - 1 + i;
        let next = row.input_ids[t + 1];
        let mut line = format!(
            "  {:>4} {:<18} {:>6.3} |",
            t,
            tok_text(tok, next),
            f64::from(row.token_logprob[i]).exp()
        );
        for j in 0..top {
            let id = row.topk_ids[i * k + j];
            line.push_str(&format!(
                " {} {:.3}",
                tok_text(tok, id),
                f64::from(row.topk_logprobs[i * k + j]).exp()
            ));
        }
        if n > 0 {
            if k > 0 {
                line.push_str(" |");
            }
            for (id, c, lp) in row.sample_counts(i, n) {
                line.push_str(&format!(
                    " {} ×{c} ({:.3})",
                    tok_text(tok, id),
                    f64::from(lp).exp()
                ));
            }
        }
        writeln!(out, "{line}")?;
    }
    if shown < n_pos {
        writeln!(
            out,
            "  … {} more positions (--positions 0 shows all)",
            n_pos - shown
        )?;
    }
    Ok(())
}
