//! `student-fit eval`: a trained student against a shard set, per distilled token, plus a few
//! greedy generations of the student beside the teacher's stored response.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use kd_model::trainable::Student;
use kd_model::{LoadedModel, Precision};
use serde::Serialize;

use crate::data::{RowSource, ShardSet, Split};
use crate::engine::KernelStudent;
use crate::error::Result;
use crate::fit::{EVAL_TOKENS, EvalModel, EvalReport, check_vocab, evaluate};

/// What to evaluate and how.
#[derive(Clone, Debug)]
pub struct EvalOptions {
    /// Where the student runs.
    pub device: Device,
    /// A Hugging Face directory: an export (`OUT/student`) or a checkpoint directory.
    pub student: PathBuf,
    /// The shard set to evaluate on.
    pub shards: PathBuf,
    /// Evaluate only the held-out share of the rows (the split `student-fit` trains with);
    /// none: every row (a separate evaluation dump).
    pub holdout_fraction: Option<f64>,
    /// Evaluate at most this many rows (the first ones in row order).
    pub max_rows: Option<usize>,
    pub max_len: usize,
    pub logits_chunk: usize,
    /// Greedy generations of the student for the first this many evaluated rows.
    pub generations: usize,
    pub max_new_tokens: usize,
    /// Folder for `eval.json` and `generations.jsonl`; none writes nothing.
    pub out: Option<PathBuf>,
}

/// One prompt with the teacher's stored response and the student's greedy one.
#[derive(Clone, Debug, Serialize)]
pub struct Generation {
    pub id: String,
    /// The last user turn of the prompt when it is a chat, else the whole prompt text.
    pub prompt: String,
    pub teacher: String,
    pub student: String,
    /// The student's answer scored against the teacher's (ROUGE-L, end of turn, lengths).
    #[serde(flatten)]
    pub scores: crate::answers::AnswerScores,
}

/// The result of an evaluation (written as `eval.json`, the metrics at top level).
#[derive(Clone, Debug, Serialize)]
pub struct EvalOutput {
    #[serde(flatten)]
    pub report: EvalReport,
    pub student: PathBuf,
    pub shards: PathBuf,
    pub rows: usize,
    /// The generations summarised; absent when none were asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub answers: Option<crate::answers::AnswerSummary>,
    #[serde(skip)]
    pub generations: Vec<Generation>,
}

/// The readable part of a chat prompt: its last user turn (SmolLM2/ChatML markers), or the
/// whole text when it has none.
fn prompt_text(decoded: &str) -> String {
    const USER: &str = "<|im_start|>user\n";
    match decoded.rfind(USER) {
        Some(i) => {
            let rest = &decoded[i + USER.len()..];
            rest.split("<|im_end|>").next().unwrap_or(rest).to_string()
        }
        None => decoded.to_string(),
    }
}

/// Evaluates a student on a shard set and generates from it greedily.
pub fn run_eval(opts: &EvalOptions) -> Result<EvalOutput> {
    let set = ShardSet::open_targets(&opts.shards, Some(crate::data::TargetKind::TopK))?;
    let dev = opts.device.clone();
    let student = Student::from_hf_dir(&opts.student, DType::F32, &dev)?;
    check_vocab(&student, &set)?;
    let mut rows = match opts.holdout_fraction {
        Some(f) => Split::by_id_hash(&set, f)?.held_out,
        None => (0..set.len()).collect(),
    };
    if let Some(m) = opts.max_rows {
        rows.truncate(m);
    }
    let report = match crate::engine::kernels_unsupported(&student.cfg, opts.max_len) {
        None => {
            let mut k = KernelStudent::for_inference(
                &student,
                EVAL_TOKENS,
                opts.max_len,
                opts.logits_chunk,
            )?;
            evaluate(
                &mut EvalModel::Kernels(&mut k),
                &set,
                &rows,
                opts.max_len,
                opts.logits_chunk,
            )?
        }
        Some(_) => evaluate(
            &mut EvalModel::Candle(&student),
            &set,
            &rows,
            opts.max_len,
            opts.logits_chunk,
        )?,
    };
    drop(student);
    let mut generations = Vec::new();
    if opts.generations > 0 {
        let LoadedModel {
            model, tokenizer, ..
        } = kd_model::load(&opts.student, Precision::Exact, &dev)?;
        let picked: Vec<usize> = rows.iter().copied().take(opts.generations).collect();
        let prompts: Vec<(&str, &[u32])> = picked
            .iter()
            .map(|&r| {
                let v = set.view(0, r);
                (v.id, &v.input_ids[..v.prompt_len as usize])
            })
            .collect();
        let stop_ids = tokenizer.stop_ids();
        let engine = kd_generate::engine::Engine {
            model: &model,
            top_k: 1,
            draws: kd_generate::engine::Draws::default(),
            stop_ids: stop_ids.clone(),
            max_new_tokens: opts.max_new_tokens,
            sampling: kd_generate::sampler::SamplingConfig {
                temperature: 0.0,
                top_p: 1.0,
                seed: 0,
            },
            logits_chunk: opts.logits_chunk,
            on_rows_done: None,
            reduce_on_device: !model.device().is_cpu(),
        };
        let mut work = kd_generate::engine::Work::default();
        let gens = engine.generate(&prompts, 8, &mut work)?;
        // An answer: the text before the first end-of-turn token, its length in tokens, and
        // whether it has that token at all.
        let answer = |ids: &[u32]| {
            let stop = ids.iter().position(|t| stop_ids.contains(t));
            let end = stop.unwrap_or(ids.len());
            let text = tokenizer.decode(&ids[..end], false).trim().to_string();
            (text, end, stop.is_some())
        };
        for (&r, g) in picked.iter().zip(gens) {
            let v = set.view(0, r);
            let pl = v.prompt_len as usize;
            let (teacher, teacher_tokens, _) = answer(&v.input_ids[pl..]);
            let (student, student_tokens, ended) = answer(&g.response);
            let scores =
                crate::answers::score(&student, &teacher, student_tokens, teacher_tokens, ended);
            generations.push(Generation {
                id: v.id.to_string(),
                prompt: prompt_text(&tokenizer.decode(&v.input_ids[..pl], false)),
                teacher,
                student,
                scores,
            });
        }
    }
    let out = EvalOutput {
        report,
        student: opts.student.clone(),
        shards: opts.shards.clone(),
        rows: rows.len(),
        answers: crate::answers::summarise(
            &generations.iter().map(|g| g.scores).collect::<Vec<_>>(),
        ),
        generations,
    };
    if let Some(dir) = &opts.out {
        write_outputs(dir, &out)?;
    }
    Ok(out)
}

fn write_outputs(dir: &Path, out: &EvalOutput) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| kd_fs::IoError::new(dir, e))?;
    kd_fs::write_bytes_atomic(&dir.join("eval.json"), &serde_json::to_vec_pretty(out)?)?;
    let mut lines = Vec::new();
    for g in &out.generations {
        serde_json::to_writer(&mut lines, g)?;
        lines.push(b'\n');
    }
    kd_fs::write_bytes_atomic(&dir.join("generations.jsonl"), &lines)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::prompt_text;

    #[test]
    fn prompt_text_takes_the_last_user_turn() {
        let chat = "<|im_start|>system\nBe nice.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n";
        assert_eq!(prompt_text(chat), "Hi there");
        assert_eq!(prompt_text("plain text"), "plain text");
    }
}
