//! Train / held-out splits that do not depend on the seed, the shard layout or the row order.

use sha2::{Digest, Sha256};

use super::RowSource;
use super::error::{Error, Result};

/// Where row `id` falls in `[0, 1)`: the first 8 bytes of sha256(id), big-endian, over 2^64.
/// The same id gets the same score in every run, shard layout and teacher set.
pub fn holdout_score(id: &str) -> f64 {
    let d = Sha256::digest(id.as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    // u64 -> f64 rounds to 53 bits; 2^-64 scaling is exact.
    u64::from_be_bytes(b) as f64 / 18_446_744_073_709_551_616.0
}

/// Whether `id` is held out at `fraction`: `holdout_score(id) < fraction`. Growing `fraction`
/// only moves rows from train to held-out, never back.
pub fn is_held_out(id: &str, fraction: f64) -> bool {
    holdout_score(id) < fraction
}

/// Row indices for training and evaluation, each ascending.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Split {
    /// Rows to train on.
    pub train: Vec<usize>,
    /// Rows to evaluate on.
    pub held_out: Vec<usize>,
}

impl Split {
    /// Splits `src` by [`is_held_out`] on each row's id (teacher 0's), seed-independent.
    /// `fraction` must lie in `[0, 1]` ([`Error::Config`]).
    pub fn by_id_hash<S: RowSource + ?Sized>(src: &S, fraction: f64) -> Result<Split> {
        if !(0.0..=1.0).contains(&fraction) {
            return Err(Error::config(
                "holdout_fraction",
                format!("{fraction} is not in [0, 1]"),
            ));
        }
        let mut s = Split::default();
        for i in 0..src.len() {
            if is_held_out(src.view(0, i).id, fraction) {
                s.held_out.push(i);
            } else {
                s.train.push(i);
            }
        }
        Ok(s)
    }

    /// Every row for training, none held out: use when evaluation reads a separate
    /// [`crate::data::ShardSet`] (check it with [`crate::data::ShardSet::check_compatible`]).
    pub fn all<S: RowSource + ?Sized>(src: &S) -> Split {
        Split {
            train: (0..src.len()).collect(),
            held_out: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn score_is_the_leading_sha256_bytes() {
        // sha256("") = e3b0c44298fc1c14...; 0xe3b0c44298fc1c14 / 2^64 = 0.889415...
        let s = holdout_score("");
        assert!((s - 0xe3b0_c442_98fc_1c14_u64 as f64 / 2f64.powi(64)).abs() < 1e-15);
        assert!((s - 0.889_415).abs() < 1e-6, "{s}");
        assert!(is_held_out("", 0.9) && !is_held_out("", 0.8));
    }
}
