//! Typed errors: invalid loss settings and malformed per-position inputs.

/// Why a [`LossConfig`](crate::LossConfig), a [`Position`](crate::Position) or a teacher
/// list for [`combine_teachers`](crate::combine_teachers) was rejected. Each variant names
/// the offending field.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LossError {
    /// `temperature` must be finite and > 0.
    #[error("temperature must be finite and > 0, got {value}")]
    Temperature { value: f64 },
    /// `alpha` must lie in [0, 1].
    #[error("alpha must lie in [0, 1], got {value}")]
    Alpha { value: f64 },
    /// JSD `beta` must lie in the open interval (0, 1).
    #[error("jsd beta must lie in (0, 1), got {value}")]
    JsdBeta { value: f64 },
    /// Skew KL `lambda` must lie in [0, 1).
    #[error("skew lambda must lie in [0, 1), got {value}")]
    SkewLambda { value: f64 },
    /// `topk_ids` and `topk_logprobs` have different lengths.
    #[error("topk_ids has {ids} entries but topk_logprobs has {logprobs}")]
    LengthMismatch { ids: usize, logprobs: usize },
    /// The vocabulary (length of `student_logits`, or `vocab_size`) is empty.
    #[error("vocabulary is empty")]
    EmptyVocab,
    /// A top-k id is not below the vocabulary size.
    #[error("topk id {id} is out of range for vocabulary size {vocab_size}")]
    IdOutOfRange { id: u32, vocab_size: usize },
    /// A top-k id appears twice.
    #[error("topk id {id} appears more than once")]
    DuplicateId { id: u32 },
    /// A teacher log-prob is NaN or > 0 (`-inf`, probability zero, is allowed).
    #[error("topk_logprobs[{index}] = {value} is not a log-probability (NaN or > 0)")]
    Logprob { index: usize, value: f64 },
    /// Every teacher log-prob is `-inf` (or there are none): no teacher distribution on S.
    #[error("topk_logprobs has no finite entry")]
    NoFiniteLogprob,
    /// `next_token` is not below the vocabulary size.
    #[error("next_token {id} is out of range for vocabulary size {vocab_size}")]
    NextTokenOutOfRange { id: u32, vocab_size: usize },
    /// The gradient buffer does not have the expected length.
    #[error("gradient buffer has {got} entries, expected {expected}")]
    GradLength { expected: usize, got: usize },
    /// Positions in one batch with a gradient buffer must share one vocabulary size.
    #[error("position {index} has vocabulary {got}, the batch has {expected}")]
    VocabMismatch {
        index: usize,
        expected: usize,
        got: usize,
    },
    /// [`combine_teachers`](crate::combine_teachers) got no teacher.
    #[error("no teachers to combine")]
    NoTeachers,
    /// A teacher weight is negative or not finite.
    #[error("teacher {index} has weight {value}; weights must be finite and >= 0")]
    TeacherWeight { index: usize, value: f64 },
    /// Teacher weights do not sum to 1 (within 1e-6).
    #[error("teacher weights sum to {sum}, expected 1")]
    WeightSum { sum: f64 },
    /// A teacher's top-k is malformed; `source` says how.
    #[error("teacher {index}: {source}")]
    Teacher {
        index: usize,
        #[source]
        source: Box<LossError>,
    },
}
