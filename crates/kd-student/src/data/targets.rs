//! Which targets of a cache the loader serves.

use kd_shard::Manifest;

/// Which of a cache's targets a [`super::ShardSet`] serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TargetKind {
    /// The teacher's top k (`settings.top_k`).
    TopK,
    /// The draws of `--targets sample:N`, served as plug-in targets: per position the
    /// distinct ids drawn with log-prob ln(c/N) (c draws of N), padded to N entries with
    /// ids that were not drawn at log-prob `-inf`. Forward KL at τ = 1 against them has the
    /// gradient q − c/N, unbiased for the full-vocabulary gradient q − p
    /// ([`kd_loss::sampled`]).
    Sampled,
}

impl TargetKind {
    /// The kind a cache serves by default: its top-k when it has one, else its draws.
    pub fn default_for(m: &Manifest) -> TargetKind {
        if m.top_k() > 0 {
            TargetKind::TopK
        } else {
            TargetKind::Sampled
        }
    }
}

impl std::fmt::Display for TargetKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TargetKind::TopK => "top-k",
            TargetKind::Sampled => "sampled",
        })
    }
}
