//! Several teachers' caches of the same sequences, joined by row id.

use std::collections::HashMap;

use super::RowSource;
use super::error::{Error, Result};
use super::set::{RowView, ShardSet, check_same_tokenizer};

/// Shard sets of several teachers over the same rows, joined by id. Row `i` is row `i` of
/// teacher 0; the other teachers' rows are found through the join (their order may differ).
///
/// Combining the distributions is the loss's job (docs/design.md, "Multi-teacher"); this type
/// only guarantees that every teacher scored the same token sequence with the same tokenizer
/// and exposes each teacher's top-k lists and the weights.
#[derive(Debug)]
pub struct Teachers {
    sets: Vec<ShardSet>,
    weights: Vec<f64>,
    /// `map[j][i]`: row of teacher `j` holding row `i` of teacher 0 (`map[0]` is empty).
    map: Vec<Vec<usize>>,
}

fn index_ids(set: &ShardSet, teacher: usize) -> Result<HashMap<&str, usize>> {
    let mut m = HashMap::with_capacity(set.len());
    for i in 0..set.len() {
        let id = set.row(i).id;
        if m.insert(id, i).is_some() {
            return Err(Error::Mismatch {
                teacher,
                id: Some(id.to_string()),
                field: "id".into(),
                what: "appears twice in this teacher's shards".into(),
            });
        }
    }
    Ok(m)
}

impl ShardSet {
    /// Joins the shard sets of several teachers by row id, with loss weights `weights`
    /// (positive, summing to 1 within 1e-6; [`Error::Config`]).
    ///
    /// Refused with [`Error::Mismatch`] naming the teacher, and the first mismatching row id
    /// in teacher 0's order and field, when a set differs from teacher 0 in
    /// `tokenizer.fingerprint`, `teacher.vocab_size`, row count (`rows`), when an id is
    /// duplicated or missing (`id`), or when a row's `input_ids` or `prompt_len` differ.
    /// Sources and `k` may differ between teachers.
    pub fn zip(sets: Vec<ShardSet>, weights: Vec<f64>) -> Result<Teachers> {
        if sets.is_empty() {
            return Err(Error::config(
                "teachers",
                "at least one shard set is needed",
            ));
        }
        if weights.len() != sets.len() {
            return Err(Error::config(
                "weights",
                format!("{} weights for {} teachers", weights.len(), sets.len()),
            ));
        }
        if let Some(w) = weights.iter().find(|w| !(w.is_finite() && **w > 0.0)) {
            return Err(Error::config("weights", format!("{w} is not positive")));
        }
        let sum: f64 = weights.iter().sum();
        if (sum - 1.0).abs() > 1e-6 {
            return Err(Error::config("weights", format!("sum to {sum}, not 1")));
        }
        let base = &sets[0];
        index_ids(base, 0)?;
        let mut map = vec![Vec::new()];
        for (j, set) in sets.iter().enumerate().skip(1) {
            check_same_tokenizer(base, set, j)?;
            let mismatch = |id: Option<&str>, field: &str, what: String| Error::Mismatch {
                teacher: j,
                id: id.map(str::to_string),
                field: field.into(),
                what,
            };
            if set.len() != base.len() {
                return Err(mismatch(
                    None,
                    "rows",
                    format!("{} rows vs {} for teacher 0", set.len(), base.len()),
                ));
            }
            let ids = index_ids(set, j)?;
            let mut m = Vec::with_capacity(base.len());
            for a in base.rows() {
                let Some(&r) = ids.get(a.id) else {
                    return Err(mismatch(
                        Some(a.id),
                        "id",
                        "missing from this teacher".into(),
                    ));
                };
                let b = set.row(r);
                if a.input_ids != b.input_ids {
                    let at = a
                        .input_ids
                        .iter()
                        .zip(b.input_ids)
                        .position(|(x, y)| x != y)
                        .unwrap_or(a.input_ids.len().min(b.input_ids.len()));
                    return Err(mismatch(
                        Some(a.id),
                        "input_ids",
                        format!(
                            "differ at token {at} (lengths {} vs {})",
                            a.input_ids.len(),
                            b.input_ids.len()
                        ),
                    ));
                }
                if a.prompt_len != b.prompt_len {
                    return Err(mismatch(
                        Some(a.id),
                        "prompt_len",
                        format!("{} vs {}", a.prompt_len, b.prompt_len),
                    ));
                }
                m.push(r);
            }
            map.push(m);
        }
        Ok(Teachers { sets, weights, map })
    }
}

impl Teachers {
    /// The teachers' shard sets, in the order given to [`ShardSet::zip`].
    pub fn sets(&self) -> &[ShardSet] {
        &self.sets
    }

    /// The loss weight of each teacher (sums to 1).
    pub fn weights(&self) -> &[f64] {
        &self.weights
    }

    /// Every teacher's view of row `i` (teacher 0's numbering).
    pub fn row(&self, i: usize) -> Vec<RowView<'_>> {
        (0..self.sets.len()).map(|j| self.view(j, i)).collect()
    }

    /// Hex sha256 over the teachers' data fingerprints and weights, for checkpoints.
    pub fn fingerprint(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for (s, w) in self.sets.iter().zip(&self.weights) {
            h.update(format!("{}\t{w:?}\n", s.fingerprint()).as_bytes());
        }
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl RowSource for Teachers {
    fn len(&self) -> usize {
        self.sets[0].len()
    }

    fn n_teachers(&self) -> usize {
        self.sets.len()
    }

    fn k(&self, teacher: usize) -> usize {
        self.sets[teacher].k()
    }

    fn weight(&self, teacher: usize) -> f64 {
        self.weights[teacher]
    }

    fn view(&self, teacher: usize, i: usize) -> RowView<'_> {
        let r = if teacher == 0 {
            i
        } else {
            self.map[teacher][i]
        };
        self.sets[teacher].row(r)
    }
}
