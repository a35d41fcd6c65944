//! # kd-loss: distillation losses on sparse top-k teacher targets
//!
//! The loss core of phase two (`student-fit`). The teacher cache stores, per distilled
//! position, the teacher's top-k ids and their log-probabilities at T=1; the trainer
//! computes the student's full-vocabulary logits (with candle) and calls
//! [`position_loss`] or [`batch_loss`] for the loss **and** its exact gradient with respect
//! to those logits. Everything here is a pure function on slices, computed in f64 with
//! log-sum-exp throughout, gradients derived analytically (no autograd).
//!
//! ## Definitions
//!
//! The formulas are those of `docs/design.md`, section "Loss definitions", and the tests
//! reproduce its float64 reference values (`tests/reference/loss-cases.json`) to 1e-9. At one position:
//!
//! * teacher top-k S with T=1 log-probs l_i, tail mass r = 1 − Σ_S exp(l_i), vocabulary V,
//!   student logits z, temperature τ, q = softmax(z/τ);
//! * a [`TailPolicy`] fixes the compared support and the distributions P (teacher) and Q
//!   (student) on it: `Bucket` (S ∪ {tail}, teacher tail spread uniformly over the V − k
//!   other tokens, then tempered) or `Renorm` (S only, both renormalised);
//! * a [`Divergence`] D(P, Q): forward KL, reverse KL (Σ Q log(Q/P), not cross-entropy),
//!   generalized JSD(β), skew forward / reverse KL(λ), or centred logit MSE;
//! * hard CE = −log softmax(z)_y at τ = 1 for the token y that actually follows;
//! * total = α·τ²·D + (1 − α)·CE; a batch is the token mean over distilled positions.
//!
//! The module docs of [`position`] give the gradient of every divergence under both tail
//! policies. [`combine_teachers`] averages several teachers into one sparse target.
//! [`sampled`] holds the estimator for sampled targets (N draws from the teacher instead of
//! its top k): unbiased for forward KL at τ = 1, derived in its module docs.
//!
//! ## Example
//!
//! ```
//! use kd_loss::{Divergence, LossConfig, Position, TailPolicy, position_loss};
//!
//! let cfg = LossConfig {
//!     divergence: Divergence::ForwardKl,
//!     temperature: 2.0,
//!     alpha: 0.5,
//!     tail: TailPolicy::Bucket,
//! };
//! cfg.validate()?;
//! let logits = [0.1f32, 2.0, -1.0, 0.5, 0.0];
//! let p = Position {
//!     topk_ids: &[1, 3],
//!     topk_logprobs: &[-0.3f32, -1.9],
//!     student_logits: &logits,
//!     next_token: 1,
//! };
//! let mut grad = vec![0f32; logits.len()];
//! let parts = position_loss(&cfg, &p, Some(&mut grad));
//! assert!(parts.divergence >= 0.0);
//! assert!((parts.total - (0.5 * 4.0 * parts.divergence + 0.5 * parts.hard_ce)).abs() < 1e-12);
//! // Every term is invariant to adding a constant to all logits: the gradient sums to 0.
//! assert!(grad.iter().sum::<f32>().abs() < 1e-6);
//! # Ok::<(), kd_loss::LossError>(())
//! ```

mod batch;
mod combine;
mod config;
mod error;
mod math;
pub mod position;
pub mod sampled;

pub use batch::batch_loss;
pub use combine::combine_teachers;
pub use config::{Divergence, LossConfig, TailPolicy};
pub use error::LossError;
pub use math::Real;
pub use position::{LossParts, Position, position_loss, position_loss_f64};
