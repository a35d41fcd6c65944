//! The gradient comparison catches a wrong backward pass: with one backward term switched off
//! in turn, the kernel engine's gradients no longer match candle autograd's. (Its own test
//! binary: the switch is process-wide.)

#[path = "util/engine.rs"]
mod engine_util;

use engine_util::{synthetic_batch, worst_group};
use kd_loss::{Divergence, LossConfig, TailPolicy};
use kd_student::engine::ops::{Sabotage, sabotage};

#[test]
fn a_sabotaged_backward_term_fails_the_gradient_comparison() {
    let cfg = kd_model::testing::tiny_config(150);
    let batch = synthetic_batch(cfg.vocab_size, &[20, 12], 2, 6, 5);
    let loss = LossConfig {
        divergence: Divergence::ForwardKl,
        temperature: 1.0,
        alpha: 1.0,
        tail: TailPolicy::Bucket,
    };
    let (_, honest, ..) = worst_group(&cfg, 1, &batch, &loss, 8);
    assert!(honest < 2e-4, "the honest engine differs by {honest:.2e}");
    for s in [
        Sabotage::RmsNormScale,
        Sabotage::SiluDerivative,
        Sabotage::SoftmaxRowSum,
    ] {
        sabotage(s);
        let (name, worst, ..) = worst_group(&cfg, 1, &batch, &loss, 8);
        sabotage(Sabotage::None);
        eprintln!("{s:?}: worst group {name} differs by {worst:.2e}");
        assert!(worst > 1e-2, "{s:?} went unnoticed (worst {worst:.2e})");
    }
}
