//! End to end on a tiny random teacher made in the test: dump its top-k with `kd_teacher`,
//! train a random 1-layer student from the shards alone, and check
//! that held-out forward KL to the teacher falls clearly below its value at initialisation.

use candle_core::{DType, Device};
use kd_loss::{Divergence, LossConfig, TailPolicy};
use kd_model::Precision;
use kd_model::trainable::Student;
use kd_student::data::{Batch, BatchConfig, Batcher, ShardSet, Split};
use kd_student::optim::{AdamW, AdamWConfig, Decay, Schedule};
use kd_student::train::{combine_micro_batches, loss_and_grads};
use kd_teacher::dump::{DumpSettings, Mode, RunOptions, dump};

fn held_out_kl(student: &Student, set: &ShardSet, rows: &[usize], cfg: &LossConfig) -> f64 {
    let (mut sum, mut n) = (0.0, 0usize);
    for chunk in rows.chunks(8) {
        let batch = Batch::collect(set, chunk, 256, 0);
        let (loss, _) = loss_and_grads(student, &batch, cfg, 64, false).unwrap();
        sum += loss.divergence * loss.positions as f64;
        n += loss.positions;
    }
    sum / n as f64
}

/// Writes a tiny random teacher (seed `seed`) under `dir/teacher`, dumps `prompts` through it
/// (sampled at T=1, top-`k`, at most `new_tokens` per prompt, one batch of 8) into
/// `dir/shards`, and returns the teacher directory and the opened shard set.
fn tiny_dump(
    dir: &std::path::Path,
    seed: u64,
    prompts: &[String],
    k: usize,
    new_tokens: usize,
) -> (std::path::PathBuf, ShardSet) {
    let teacher_dir = dir.join("teacher");
    kd_model::testing::write_tiny_teacher(&teacher_dir, seed).unwrap();
    let teacher = kd_model::load(&teacher_dir, Precision::Exact, &Device::Cpu).unwrap();
    let lines: String = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            format!(
                "{}\n",
                serde_json::json!({"id": format!("p{i:02}"), "prompt": p})
            )
        })
        .collect();
    let input_path = dir.join("prompts.jsonl");
    std::fs::write(&input_path, lines).unwrap();
    let input = kd_teacher::input::read_jsonl(&input_path, false).unwrap();
    let settings = DumpSettings {
        mode: Mode::Generate,
        top_k: k,
        samples: 0,
        responses_per_prompt: 1,
        max_new_tokens: new_tokens,
        temperature: 1.0,
        top_p: 1.0,
        seed: seed + 1,
        chat_template: true,
        rows_per_shard: 16,
        precision: Precision::Exact,
        dtype: kd_model::Dtype::F32,
    };
    let opts = RunOptions {
        batch_size: 8,
        resume: false,
        part: None,
        progress: false,
        logits_chunk: 64,
        shard_format: kd_shard::DEFAULT_FORMAT_VERSION,
    };
    let shards = dir.join("shards");
    dump(&teacher, &input, &settings, &opts, &shards).unwrap();
    (teacher_dir, ShardSet::open(&shards).unwrap())
}

#[test]
fn forward_kl_training_lowers_held_out_kl_on_a_tiny_teacher() {
    let dir = tempfile::tempdir().unwrap();
    let prompts: Vec<String> = (0..48)
        .map(|i| format!("tell me about {} and {}", i * 7 % 13, i % 5))
        .collect();
    let (_, set) = tiny_dump(dir.path(), 11, &prompts, 16, 24);

    // Phase two sees only the shards.
    let split = Split::by_id_hash(&set, 0.25).unwrap();
    assert!(!split.held_out.is_empty() && split.train.len() > split.held_out.len());
    // A random 1-layer student over the teacher's vocabulary (seeded).
    let mut scfg = kd_model::testing::tiny_config(set.vocab_size() as usize);
    scfg.num_hidden_layers = 1;
    let student = Student::random(&scfg, 9, DType::F32, &Device::Cpu).unwrap();
    let cfg = LossConfig {
        divergence: Divergence::ForwardKl,
        temperature: 1.0,
        alpha: 1.0,
        tail: TailPolicy::Bucket,
    };
    let before = held_out_kl(&student, &set, &split.held_out, &cfg);

    let bcfg = BatchConfig {
        token_budget: 512,
        max_len: 256,
        pad_id: 0,
        seed: 5,
        mix: None,
        max_epochs: None,
    };
    let mut batcher = Batcher::new(&set, &split.train, bcfg).unwrap();
    let mut opt = AdamW::new(student.named_vars(), AdamWConfig::default()).unwrap();
    let steps = 60;
    let sched = Schedule {
        lr: 3e-3,
        min_lr: 3e-4,
        warmup_steps: 5,
        total_steps: steps,
        decay: Decay::Cosine,
    };
    let mut first = None;
    let mut last = 0.0;
    for step in 0..steps {
        let batch = batcher.next_batch(&set).unwrap();
        let (loss, grads) = loss_and_grads(&student, &batch, &cfg, 64, true).unwrap();
        assert!(loss.total.is_finite());
        first.get_or_insert(loss.total);
        last = loss.total;
        opt.step(&grads.unwrap(), sched.lr_at(step), 1.0).unwrap();
    }
    let after = held_out_kl(&student, &set, &split.held_out, &cfg);
    eprintln!(
        "held-out forward KL: {before:.4} at init -> {after:.4} after {steps} steps (train loss {:.4} -> {last:.4})",
        first.unwrap()
    );
    assert!(after < 0.25 * before, "held-out KL {before} -> {after}");
}

#[test]
fn two_accumulated_micro_batches_equal_one_batch_of_both() {
    let dir = tempfile::tempdir().unwrap();
    let prompts: Vec<String> = (0..6).map(|i| "x".repeat(3 + 4 * i)).collect();
    let (teacher_dir, set) = tiny_dump(dir.path(), 5, &prompts, 8, 5);
    let student = Student::from_teacher(&teacher_dir, &[1], DType::F64, &Device::Cpu).unwrap();
    let cfg = LossConfig {
        divergence: Divergence::Jsd { beta: 0.5 },
        temperature: 2.0,
        alpha: 0.6,
        tail: TailPolicy::Bucket,
    };
    // Rows of different lengths, so the two micro-batches have different position counts.
    let (a, b) = ([0usize, 1], [2usize, 3, 4, 5]);
    let run = |rows: &[usize]| {
        let batch = Batch::collect(&set, rows, 256, 0);
        let (l, g) = loss_and_grads(&student, &batch, &cfg, 7, true).unwrap();
        (l, g.unwrap())
    };
    let (whole_loss, whole) = run(&[0, 1, 2, 3, 4, 5]);
    let params = student.named_vars();
    let (acc_loss, acc) = combine_micro_batches(vec![run(&a), run(&b)], &params).unwrap();
    assert_eq!(acc_loss.positions, whole_loss.positions);
    assert!(
        (acc_loss.total - whole_loss.total).abs() < 1e-9,
        "{} vs {}",
        acc_loss.total,
        whole_loss.total
    );
    for (name, var) in &params {
        let x = whole.get(var.as_tensor()).unwrap();
        let y = acc.get(var.as_tensor()).unwrap();
        let diff: f64 = (x - y)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar()
            .unwrap();
        // kd-loss hands ∂L/∂z over rounded to f32, so agreement is to f32 precision.
        let scale: f64 = x
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(
            diff <= 1e-6 * scale.max(1e-3),
            "{name}: accumulated gradient differs by {diff} (scale {scale})"
        );
    }
}
