//! The engine with its logits reduced where they are ([`Engine::reduce_on_device`], what a
//! GPU runs) captures what it captures from whole rows on the host: the same responses, top-k
//! ids and sampled targets, log-probs within float rounding of the log-sum-exp.

use candle_core::Device;
use kd_generate::engine::{Capture, Draws, Engine, Work};
use kd_generate::sampler::SamplingConfig;
use kd_model::{Kernels, Precision, load_with};

fn engine(model: &kd_model::Llama, top_k: usize, draws: u32, reduce: bool) -> Engine<'_> {
    Engine {
        model,
        top_k,
        draws: Draws { n: draws, seed: 11 },
        stop_ids: vec![],
        max_new_tokens: 9,
        sampling: SamplingConfig {
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
        },
        logits_chunk: 5,
        on_rows_done: None,
        reduce_on_device: reduce,
    }
}

fn same_capture(a: &Capture, b: &Capture) {
    assert_eq!(a.topk_ids, b.topk_ids);
    assert_eq!(a.sample_ids, b.sample_ids);
    for (x, y) in a.sample_logprobs.iter().zip(&b.sample_logprobs) {
        assert!((x - y).abs() <= 1e-5, "{x} vs {y}");
    }
    assert_eq!(a.topk_logprobs.len(), b.topk_logprobs.len());
    assert_eq!(a.token_logprob.len(), b.token_logprob.len());
    let pairs = a
        .topk_logprobs
        .iter()
        .zip(&b.topk_logprobs)
        .chain(a.token_logprob.iter().zip(&b.token_logprob));
    for (x, y) in pairs {
        assert!((x - y).abs() <= 1e-5, "{x} vs {y}");
    }
}

#[test]
fn reduced_logits_capture_what_whole_rows_capture() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("teacher");
    kd_model::testing::write_tiny_teacher(&dir, 3).unwrap();
    let m = load_with(&dir, Precision::Exact, &Device::Cpu, Kernels::Candle).unwrap();
    let prompts: Vec<Vec<u32>> = vec![vec![5, 9, 2], vec![7], vec![11, 3, 3, 8, 1], vec![4, 4]];
    let rows: Vec<(&str, &[u32])> = ["a", "b", "c", "d"]
        .into_iter()
        .zip(prompts.iter().map(|p| p.as_slice()))
        .collect();
    for (k, n) in [(1, 0), (4, 0), (16, 0), (4, 7), (0, 5)] {
        let mut work = Work::default();
        let host = engine(&m.model, k, n, false)
            .generate(&rows, 3, &mut work)
            .unwrap();
        let dev = engine(&m.model, k, n, true)
            .generate(&rows, 3, &mut work)
            .unwrap();
        for (h, d) in host.iter().zip(&dev) {
            assert_eq!(h.response, d.response, "k {k}");
            assert_eq!(h.stop, d.stop);
            same_capture(&h.capture, &d.capture);
        }
        let scored: Vec<(&str, &[u32], &[u32])> = rows
            .iter()
            .zip(&host)
            .map(|((id, p), g)| (*id, *p, g.response.as_slice()))
            .collect();
        let host_s = engine(&m.model, k, n, false)
            .score(&scored, 2, &mut work)
            .unwrap();
        let dev_s = engine(&m.model, k, n, true)
            .score(&scored, 2, &mut work)
            .unwrap();
        for ((h, d), g) in host_s.iter().zip(&dev_s).zip(&host) {
            same_capture(h, d);
            // Scoring the greedy responses gives back what generating them captured.
            same_capture(h, &g.capture);
        }
    }
}
