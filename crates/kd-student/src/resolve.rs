//! `student-fit`'s settings, resolved: flags over a pipeline file's sections over the
//! defaults, into one complete [`FitConfig`] per stage.
//!
//! A pipeline file's `[fit]` section is the first stage (distillation); an optional
//! `[finetune]` section is a second stage whose keys replace `[fit]`'s (except `mix`, which a
//! stage with `train_on` does not inherit). Unless it says otherwise, the second stage starts
//! from the first stage's export and writes to `<fit.out>-finetune`. Flags ([`Overrides`])
//! replace `[fit]`'s keys, and so the second stage's where `[finetune]` does not give them;
//! `steps` and `positions` apply to every stage run.

use std::path::PathBuf;

use kd_loss::sampled::Estimator;
use kd_loss::{Divergence, LossConfig, TailPolicy};
use serde::Deserialize;

use crate::data::TargetKind;
use crate::fit::{self, FitConfig, Init, TeacherShards, TrainPrecision};
use crate::optim::{AdamWConfig, Decay};

/// A `[fit]` or `[finetune]` section of a pipeline file: every [`FitConfig`] key, each
/// optional (an absent key takes the first stage's value, then the default).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FitSection {
    pub shards: Option<PathBuf>,
    pub out: Option<PathBuf>,
    pub init: Option<Init>,
    pub loss: Option<LossSection>,
    pub steps: Option<u64>,
    pub positions: Option<u64>,
    pub token_budget: Option<usize>,
    pub max_len: Option<usize>,
    pub lr: Option<f64>,
    pub min_lr: Option<f64>,
    pub warmup_steps: Option<u64>,
    pub decay: Option<Decay>,
    pub adamw: Option<AdamWConfig>,
    pub max_grad_norm: Option<f64>,
    pub holdout_fraction: Option<f64>,
    pub seed: Option<u64>,
    pub log_every: Option<u64>,
    pub checkpoint_every: Option<u64>,
    pub logits_chunk: Option<usize>,
    pub grad_accum: Option<u64>,
    pub mix: Option<f64>,
    pub extra_teachers: Option<Vec<TeacherShards>>,
    pub eval_shards: Option<PathBuf>,
    pub eval_every: Option<u64>,
    pub eval_max_rows: Option<usize>,
    pub train_on: Option<kd_shard::Source>,
    pub keep_checkpoints: Option<usize>,
    pub targets: Option<TargetKind>,
    pub estimator: Option<Estimator>,
    pub precision: Option<TrainPrecision>,
    pub auto_layer_positions: Option<usize>,
}

/// A section's `loss` table: each key optional; `divergence` is required once the table is
/// given (by the file or by a loss flag, which defaults it to forward KL).
#[derive(Clone, Copy, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LossSection {
    pub divergence: Option<Divergence>,
    pub temperature: Option<f64>,
    pub alpha: Option<f64>,
    pub tail: Option<TailPolicy>,
}

/// The settings given as flags, each replacing the `[fit]` section's value; the second stage
/// inherits them unless `[finetune]` gives the key itself.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub shards: Option<PathBuf>,
    pub eval_shards: Option<PathBuf>,
    pub out: Option<PathBuf>,
    pub init: Option<Init>,
    pub divergence: Option<Divergence>,
    pub temperature: Option<f64>,
    pub alpha: Option<f64>,
    pub tail: Option<TailPolicy>,
    pub lr: Option<f64>,
    pub min_lr: Option<f64>,
    pub warmup_steps: Option<u64>,
    pub token_budget: Option<usize>,
    pub max_len: Option<usize>,
    pub holdout_fraction: Option<f64>,
    pub seed: Option<u64>,
    pub checkpoint_every: Option<u64>,
    pub targets: Option<TargetKind>,
    pub estimator: Option<Estimator>,
    pub precision: Option<TrainPrecision>,
    pub auto_layer_positions: Option<usize>,
    /// Steps of every stage run (clears `positions`).
    pub steps: Option<u64>,
    /// Distilled positions of every stage run.
    pub positions: Option<u64>,
}

/// Which stages to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StageChoice {
    All,
    Distill,
    Finetune,
}

/// A stage of a run: `distill` (`[fit]`) or `finetune` (`[finetune]`).
#[derive(Clone, Debug, PartialEq)]
pub struct Stage {
    pub name: &'static str,
    pub config: FitConfig,
}

/// Why the settings do not resolve. `origin` is the pipeline file, or `flags`.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("missing {flag} (or `{key}` in a pipeline's [fit] section)")]
    Missing {
        flag: &'static str,
        key: &'static str,
    },
    #[error("{origin}: no [{section}] section")]
    NoSection {
        origin: String,
        section: &'static str,
    },
    #[error("{origin}: invalid [{section}] section: missing field `{key}`")]
    MissingKey {
        origin: String,
        section: &'static str,
        key: &'static str,
    },
}

/// The pipeline file's sections, as read.
#[derive(Clone, Debug, Default)]
pub struct Sections {
    /// The file, for messages; none when only flags are given.
    pub origin: Option<PathBuf>,
    pub fit: Option<FitSection>,
    pub finetune: Option<FitSection>,
}

/// Resolves the stages `choice` asks for, in order.
pub fn resolve(
    sections: Sections,
    flags: &Overrides,
    choice: StageChoice,
) -> Result<Vec<Stage>, ResolveError> {
    let origin = match &sections.origin {
        Some(p) => p.display().to_string(),
        None => "flags".to_string(),
    };
    let mut base = match (sections.fit, &sections.origin) {
        (Some(s), _) => s,
        (None, None) => FitSection::default(),
        (None, Some(_)) => {
            return Err(ResolveError::NoSection {
                origin,
                section: "fit",
            });
        }
    };
    base.apply(flags);
    let first = base.clone().finish(&origin, "fit")?;
    let mut stages = Vec::new();
    match sections.finetune {
        Some(ft) => {
            let (explicit_out, explicit_init) = (ft.out.is_some(), ft.init.is_some());
            let mut second = base.replaced_by(ft).finish(&origin, "finetune")?;
            if !explicit_out {
                let mut name = first.out.clone().into_os_string();
                name.push("-finetune");
                second.out = name.into();
            }
            if !explicit_init {
                second.init = Init::FromStudent {
                    path: first.out.join("student"),
                };
            }
            stages.push(Stage {
                name: "distill",
                config: first,
            });
            stages.push(Stage {
                name: "finetune",
                config: second,
            });
        }
        None => {
            if choice == StageChoice::Finetune {
                return Err(ResolveError::NoSection {
                    origin,
                    section: "finetune",
                });
            }
            stages.push(Stage {
                name: "distill",
                config: first,
            });
        }
    }
    stages.retain(|s| match choice {
        StageChoice::All => true,
        StageChoice::Distill => s.name == "distill",
        StageChoice::Finetune => s.name == "finetune",
    });
    for s in &mut stages {
        if let Some(n) = flags.steps {
            s.config.steps = n;
            s.config.positions = None;
        }
        if let Some(p) = flags.positions {
            s.config.positions = Some(p);
        }
    }
    Ok(stages)
}

/// Replaces each field of `$base` that `$over` gives.
macro_rules! replace_given {
    ($base:ident, $over:ident; $($f:ident),* $(,)?) => {
        $(if let Some(v) = &$over.$f { $base.$f = Some(v.clone()); })*
    };
}

impl FitSection {
    /// The flags over this section.
    fn apply(&mut self, o: &Overrides) {
        replace_given!(self, o; shards, eval_shards, out, init, lr, min_lr, warmup_steps,
            token_budget, max_len, holdout_fraction, seed, checkpoint_every, targets, estimator,
            precision, auto_layer_positions);
        if o.divergence.is_some()
            || o.temperature.is_some()
            || o.alpha.is_some()
            || o.tail.is_some()
        {
            let loss = self.loss.get_or_insert_with(LossSection::default);
            let flags = LossSection {
                divergence: o.divergence,
                temperature: o.temperature,
                alpha: o.alpha,
                tail: o.tail,
            };
            replace_given!(loss, flags; divergence, temperature, alpha, tail);
            loss.divergence.get_or_insert(Divergence::ForwardKl);
        }
    }

    /// This section (the first stage) with every key of `over` (the second) replacing its
    /// own. A second stage that trains on one source does not inherit `mix`.
    fn replaced_by(mut self, over: FitSection) -> FitSection {
        if over.train_on.is_some() {
            self.mix = None;
        }
        replace_given!(self, over; shards, out, init, loss, steps, positions, token_budget,
            max_len, lr, min_lr, warmup_steps, decay, adamw, max_grad_norm, holdout_fraction,
            seed, log_every, checkpoint_every, logits_chunk, grad_accum, mix, extra_teachers,
            eval_shards, eval_every, eval_max_rows, train_on, keep_checkpoints, targets,
            estimator, precision, auto_layer_positions);
        self
    }

    /// The complete settings: every key not given takes its default.
    fn finish(self, origin: &str, section: &'static str) -> Result<FitConfig, ResolveError> {
        let missing = |flag, key| ResolveError::Missing { flag, key };
        let shards = self.shards.ok_or(missing("--shards", "shards"))?;
        let out = self.out.ok_or(missing("--out", "out"))?;
        let init = self.init.ok_or(missing(
            "--init-from-teacher with --keep-layers or --drop-layers, or --init-from-student",
            "init",
        ))?;
        // The defaults are FitConfig's own (its serde defaults), so a key left out of a
        // section and a key left out of a parsed FitConfig mean the same.
        let defaults = fit::default_loss();
        let loss = match self.loss {
            None => defaults,
            Some(l) => LossConfig {
                divergence: l.divergence.ok_or_else(|| ResolveError::MissingKey {
                    origin: origin.to_string(),
                    section,
                    key: "loss.divergence",
                })?,
                temperature: l.temperature.unwrap_or(defaults.temperature),
                alpha: l.alpha.unwrap_or(defaults.alpha),
                tail: l.tail.unwrap_or(defaults.tail),
            },
        };
        Ok(FitConfig {
            shards,
            out,
            init,
            loss,
            steps: self.steps.unwrap_or_else(fit::default_steps),
            positions: self.positions,
            token_budget: self.token_budget.unwrap_or_else(fit::default_token_budget),
            max_len: self.max_len.unwrap_or_else(fit::default_max_len),
            lr: self.lr.unwrap_or_else(fit::default_lr),
            min_lr: self.min_lr.unwrap_or_else(fit::default_min_lr),
            warmup_steps: self.warmup_steps.unwrap_or_else(fit::default_warmup_steps),
            decay: self.decay.unwrap_or_else(fit::default_decay),
            adamw: self.adamw.unwrap_or_default(),
            max_grad_norm: self
                .max_grad_norm
                .unwrap_or_else(fit::default_max_grad_norm),
            holdout_fraction: self
                .holdout_fraction
                .unwrap_or_else(fit::default_holdout_fraction),
            seed: self.seed.unwrap_or_default(),
            log_every: self.log_every.unwrap_or_else(fit::default_log_every),
            checkpoint_every: self
                .checkpoint_every
                .unwrap_or_else(fit::default_checkpoint_every),
            logits_chunk: self.logits_chunk.unwrap_or_else(fit::default_logits_chunk),
            grad_accum: self.grad_accum.unwrap_or_else(fit::one),
            mix: self.mix,
            extra_teachers: self.extra_teachers.unwrap_or_default(),
            eval_shards: self.eval_shards,
            eval_every: self.eval_every.unwrap_or_default(),
            eval_max_rows: self.eval_max_rows,
            train_on: self.train_on,
            keep_checkpoints: self.keep_checkpoints,
            targets: self.targets,
            estimator: self.estimator.unwrap_or_default(),
            precision: self.precision.unwrap_or_default(),
            auto_layer_positions: self
                .auto_layer_positions
                .unwrap_or_else(fit::default_auto_layer_positions),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn section(toml_text: &str) -> FitSection {
        toml::from_str(toml_text).unwrap()
    }

    fn required() -> Overrides {
        Overrides {
            shards: Some("s".into()),
            out: Some("o".into()),
            init: Some(Init::FromStudent { path: "st".into() }),
            ..Overrides::default()
        }
    }

    #[test]
    fn absent_keys_take_the_defaults_serde_gives() {
        let stages = resolve(Sections::default(), &required(), StageChoice::All).unwrap();
        let parsed: FitConfig = toml::from_str(
            "shards = \"s\"\nout = \"o\"\ninit = { from_student = { path = \"st\" } }\n",
        )
        .unwrap();
        assert_eq!(stages.len(), 1);
        assert_eq!(stages[0].config, parsed);
    }

    #[test]
    fn flags_replace_the_file_and_loss_flags_keep_its_other_loss_keys() {
        let fit = section(
            "shards = \"file\"\nout = \"o\"\ninit = { from_student = { path = \"st\" } }\n\
             lr = 1e-3\nloss = { divergence = { kind = \"reverse_kl\" }, temperature = 2.0 }\n",
        );
        let flags = Overrides {
            shards: Some("flag".into()),
            alpha: Some(0.5),
            ..Overrides::default()
        };
        let s = Sections {
            origin: Some("p.toml".into()),
            fit: Some(fit),
            finetune: None,
        };
        let c = &resolve(s, &flags, StageChoice::All).unwrap()[0].config;
        assert_eq!(c.shards, PathBuf::from("flag"));
        assert_eq!(c.lr, 1e-3);
        assert_eq!(c.loss.divergence, Divergence::ReverseKl);
        assert_eq!((c.loss.temperature, c.loss.alpha), (2.0, 0.5));
    }

    #[test]
    fn a_second_stage_inherits_starts_from_the_first_export_and_drops_mix_with_train_on() {
        let fit = section(
            "shards = \"s\"\nout = \"run\"\ninit = { from_student = { path = \"st\" } }\n\
             mix = 0.7\nlr = 1e-3\nloss = { divergence = { kind = \"jsd\", beta = 0.5 }, alpha = 0.9 }\n",
        );
        let ft = section(
            "train_on = \"scored\"\nloss = { divergence = { kind = \"forward_kl\" }, alpha = 0.0 }\n",
        );
        let s = Sections {
            origin: Some("p.toml".into()),
            fit: Some(fit),
            finetune: Some(ft),
        };
        let flags = Overrides {
            steps: Some(7),
            ..Overrides::default()
        };
        let stages = resolve(s, &flags, StageChoice::All).unwrap();
        let (a, b) = (&stages[0].config, &stages[1].config);
        assert_eq!(a.mix, Some(0.7));
        assert_eq!(b.mix, None);
        assert_eq!(b.lr, 1e-3);
        // The `loss` table is replaced whole: the first stage's alpha does not leak.
        assert_eq!(
            (b.loss.divergence, b.loss.alpha),
            (Divergence::ForwardKl, 0.0)
        );
        assert_eq!(b.out, PathBuf::from("run-finetune"));
        assert_eq!(
            b.init,
            Init::FromStudent {
                path: PathBuf::from("run/student")
            }
        );
        assert_eq!((a.steps, b.steps), (7, 7));
    }

    #[test]
    fn what_is_missing_is_named() {
        let e = resolve(Sections::default(), &Overrides::default(), StageChoice::All);
        assert!(e.unwrap_err().to_string().contains("missing --shards"));
        let s = Sections {
            origin: Some("p.toml".into()),
            fit: Some(section("loss = { temperature = 2.0 }\n")),
            finetune: None,
        };
        let e = resolve(s, &required(), StageChoice::All)
            .unwrap_err()
            .to_string();
        assert!(e.contains("p.toml") && e.contains("loss.divergence"), "{e}");
        let s = Sections {
            origin: Some("p.toml".into()),
            fit: None,
            finetune: None,
        };
        let e = resolve(s, &required(), StageChoice::All)
            .unwrap_err()
            .to_string();
        assert_eq!(e, "p.toml: no [fit] section");
        let e = resolve(Sections::default(), &required(), StageChoice::Finetune).unwrap_err();
        assert_eq!(e.to_string(), "flags: no [finetune] section");
    }
}
