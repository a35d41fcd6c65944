//! The training-side shard loader.
//!
//! [`ShardSet::open`] verifies a committed shard directory (manifest, fingerprint, every
//! shard's size and sha256) and serves its rows as zero-copy [`RowView`]s from a
//! memory-mapped, fixed-stride cache decoded once under `DIR/.kd-cache/<fingerprint>/`.
//! [`Split`] separates held-out rows by a hash of their id; [`Batcher`] shuffles by
//! `(seed, epoch)`, packs rows to a token budget and resumes from a [`LoaderPosition`];
//! [`Batch`] is plain vectors a trainer turns into tensors. [`ShardSet::zip`] joins several
//! teachers' sets of the same rows into [`Teachers`].

mod batcher;
mod cache;
mod error;
mod map;
mod multi;
mod set;
mod split;
mod synth;
mod targets;

pub use batcher::{Batch, BatchConfig, Batcher, LoaderPosition, Targets};
pub use cache::{CACHE_DIR, CACHE_VERSION, CacheStatus};
pub use error::{Error, Result};
pub use multi::Teachers;
pub use set::{RowView, ShardSet};
pub use split::{Split, holdout_score, is_held_out};
pub use synth::synthetic_batch;
pub use targets::TargetKind;

/// Rows that a [`Batcher`] and [`Batch::collect`] can read: one shard set, or several
/// teachers joined by id. Row numbering is teacher 0's.
pub trait RowSource {
    /// Number of rows.
    fn len(&self) -> usize;
    /// Whether there are no rows.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Number of teachers (1 for a [`ShardSet`]).
    fn n_teachers(&self) -> usize;
    /// Loss weight of teacher `teacher` (the weights sum to 1).
    fn weight(&self, _teacher: usize) -> f64 {
        1.0
    }
    /// Top-k entries per position of teacher `teacher`.
    fn k(&self, teacher: usize) -> usize;
    /// Row `i` as teacher `teacher` stored it; the same `input_ids` for every teacher.
    fn view(&self, teacher: usize, i: usize) -> RowView<'_>;
    /// Sequence length of row `i`.
    fn row_len(&self, i: usize) -> usize {
        self.view(0, i).input_ids.len()
    }
}

impl RowSource for ShardSet {
    fn len(&self) -> usize {
        ShardSet::len(self)
    }

    fn n_teachers(&self) -> usize {
        1
    }

    fn k(&self, _teacher: usize) -> usize {
        ShardSet::k(self)
    }

    fn view(&self, _teacher: usize, i: usize) -> RowView<'_> {
        self.row(i)
    }

    fn row_len(&self, i: usize) -> usize {
        ShardSet::row_len(self, i)
    }
}
