//! AdamW with its state in the open, so a checkpoint can hold it and a resumed run continues
//! bit for bit; learning-rate schedules; global-norm gradient clipping.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

/// AdamW hyperparameters (decoupled weight decay, Loshchilov & Hutter).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// Whether a parameter gets weight decay: norms and biases do not.
pub fn decays(name: &str) -> bool {
    !(name.contains("norm") || name.ends_with(".bias"))
}

/// Learning-rate schedule: linear warmup from 0, then cosine or linear decay to `min_lr`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Schedule {
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
    pub decay: Decay,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decay {
    Cosine,
    Linear,
    Constant,
}

impl Schedule {
    /// Learning rate for optimizer step `step` (0-based).
    pub fn lr_at(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = self.total_steps.saturating_sub(self.warmup_steps).max(1);
        let frac = ((step - self.warmup_steps) as f64 / span as f64).min(1.0);
        let f = match self.decay {
            Decay::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * frac).cos()),
            Decay::Linear => 1.0 - frac,
            Decay::Constant => 1.0,
        };
        self.min_lr + (self.lr - self.min_lr) * f
    }
}

/// AdamW over named parameters. Moments are f32 tensors on the parameters' device.
pub struct AdamW {
    pub cfg: AdamWConfig,
    params: Vec<(String, Var)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Optimizer steps taken.
    pub step: u64,
}

/// What one [`AdamW::step`] did.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct StepInfo {
    /// Global L2 norm of the gradients before clipping.
    pub grad_norm: f64,
    pub lr: f64,
    pub clipped: bool,
}

impl AdamW {
    pub fn new(params: Vec<(String, Var)>, cfg: AdamWConfig) -> candle_core::Result<Self> {
        let m = params
            .iter()
            .map(|(_, p)| p.as_tensor().zeros_like())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let v = m.clone();
        Ok(Self {
            cfg,
            params,
            m,
            v,
            step: 0,
        })
    }

    pub fn params(&self) -> &[(String, Var)] {
        &self.params
    }

    /// Global L2 norm of the gradients in `grads` (missing gradients count as zero).
    pub fn grad_norm(&self, grads: &GradStore) -> candle_core::Result<f64> {
        let mut sq = 0f64;
        for (_, p) in &self.params {
            if let Some(g) = grads.get(p.as_tensor()) {
                sq += g
                    .to_dtype(DType::F64)?
                    .sqr()?
                    .sum_all()?
                    .to_scalar::<f64>()?;
            }
        }
        Ok(sq.sqrt())
    }

    /// One update with learning rate `lr`, after clipping the global gradient norm to
    /// `max_grad_norm` (if positive).
    pub fn step(
        &mut self,
        grads: &GradStore,
        lr: f64,
        max_grad_norm: f64,
    ) -> candle_core::Result<StepInfo> {
        let grad_norm = self.grad_norm(grads)?;
        let clip = max_grad_norm > 0.0 && grad_norm > max_grad_norm;
        let scale = if clip {
            max_grad_norm / (grad_norm + 1e-6)
        } else {
            1.0
        };
        self.step += 1;
        let t = self.step as i32;
        let (b1, b2) = (self.cfg.beta1, self.cfg.beta2);
        let bc1 = 1.0 - b1.powi(t);
        let bc2 = 1.0 - b2.powi(t);
        for (i, (name, p)) in self.params.iter().enumerate() {
            let Some(g) = grads.get(p.as_tensor()) else {
                continue;
            };
            let g = (g * scale)?;
            let m = ((&self.m[i] * b1)? + (&g * (1.0 - b1))?)?;
            let v = ((&self.v[i] * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let update = ((&m / bc1)? / ((&v / bc2)?.sqrt()? + self.cfg.eps)?)?;
            let wd = if decays(name) {
                self.cfg.weight_decay
            } else {
                0.0
            };
            let theta = p.as_tensor();
            let next = ((theta * (1.0 - lr * wd))? - (update * lr)?)?;
            p.set(&next)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(StepInfo {
            grad_norm,
            lr,
            clipped: clip,
        })
    }

    /// Writes the moments as safetensors (`m.NAME`, `v.NAME`); the step count goes in the
    /// checkpoint's JSON.
    pub fn save_state(&self, path: &Path) -> candle_core::Result<()> {
        let mut map: BTreeMap<String, Tensor> = BTreeMap::new();
        for (i, (name, _)) in self.params.iter().enumerate() {
            map.insert(format!("m.{name}"), self.m[i].clone());
            map.insert(format!("v.{name}"), self.v[i].clone());
        }
        let map: std::collections::HashMap<String, Tensor> = map.into_iter().collect();
        candle_core::safetensors::save(&map, path)
    }

    /// Restores moments saved by [`AdamW::save_state`] and the step count. Every parameter
    /// must be present with its shape.
    pub fn load_state(&mut self, path: &Path, step: u64) -> candle_core::Result<()> {
        let dev = self
            .params
            .first()
            .map(|(_, p)| p.device().clone())
            .unwrap_or(candle_core::Device::Cpu);
        let map = candle_core::safetensors::load(path, &dev)?;
        for (i, (name, p)) in self.params.iter().enumerate() {
            for (slot, key) in [
                (&mut self.m[i], format!("m.{name}")),
                (&mut self.v[i], format!("v.{name}")),
            ] {
                let t = map.get(&key).ok_or_else(|| {
                    candle_core::Error::Msg(format!("{}: missing `{key}`", path.display()))
                })?;
                if t.dims() != p.dims() {
                    candle_core::bail!(
                        "{}: `{key}` has shape {:?}, expected {:?}",
                        path.display(),
                        t.dims(),
                        p.dims()
                    );
                }
                *slot = t.to_dtype(p.dtype())?;
            }
        }
        self.step = step;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn quad_grads(p: &Var) -> GradStore {
        // loss = Σ (p - 3)², gradient 2(p - 3)
        let loss = (p.as_tensor() - 3.0)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap();
        loss.backward().unwrap()
    }

    #[test]
    fn matches_a_hand_written_adamw_step() {
        let p = Var::from_slice(&[1.0f32, -2.0], 2, &Device::Cpu).unwrap();
        let cfg = AdamWConfig {
            weight_decay: 0.1,
            ..Default::default()
        };
        let mut opt = AdamW::new(vec![("w".into(), p.clone())], cfg.clone()).unwrap();
        let g = quad_grads(&p);
        opt.step(&g, 0.01, 0.0).unwrap();
        let got: Vec<f32> = p.as_tensor().to_vec1().unwrap();
        for (x0, got) in [1.0f64, -2.0].iter().zip(got) {
            let g = 2.0 * (x0 - 3.0);
            let m = (1.0 - cfg.beta1) * g / (1.0 - cfg.beta1);
            let v = (1.0 - cfg.beta2) * g * g / (1.0 - cfg.beta2);
            let want = x0 * (1.0 - 0.01 * 0.1) - 0.01 * m / (v.sqrt() + cfg.eps);
            assert!((got as f64 - want).abs() < 1e-6, "{got} vs {want}");
        }
    }

    #[test]
    fn norms_are_not_decayed_and_clipping_bounds_the_norm() {
        assert!(decays("model.layers.0.mlp.up_proj.weight"));
        assert!(!decays("model.layers.0.input_layernorm.weight"));
        assert!(!decays("model.norm.weight"));
        let p = Var::from_slice(&[100.0f32, 100.0], 2, &Device::Cpu).unwrap();
        let mut opt = AdamW::new(vec![("w".into(), p.clone())], AdamWConfig::default()).unwrap();
        let info = opt.step(&quad_grads(&p), 0.01, 1.0).unwrap();
        assert!(info.clipped && info.grad_norm > 1.0);
    }

    #[test]
    fn saved_state_resumes_bit_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let run = |split: Option<usize>| -> Vec<f32> {
            let p = Var::from_slice(&[0.5f32, -1.5, 2.0], 3, &Device::Cpu).unwrap();
            let mut opt =
                AdamW::new(vec![("w".into(), p.clone())], AdamWConfig::default()).unwrap();
            for s in 0..10 {
                if split == Some(s) {
                    let path = dir.path().join("opt.safetensors");
                    opt.save_state(&path).unwrap();
                    let values = p.as_tensor().clone();
                    let q = Var::from_tensor(&values).unwrap();
                    let mut fresh =
                        AdamW::new(vec![("w".into(), q.clone())], AdamWConfig::default()).unwrap();
                    fresh.load_state(&path, opt.step).unwrap();
                    return {
                        let mut o = fresh;
                        for _ in s..10 {
                            o.step(&quad_grads(&q), 0.05, 1.0).unwrap();
                        }
                        q.as_tensor().to_vec1().unwrap()
                    };
                }
                opt.step(&quad_grads(&p), 0.05, 1.0).unwrap();
            }
            p.as_tensor().to_vec1().unwrap()
        };
        assert_eq!(run(None), run(Some(4)));
    }

    #[test]
    fn schedule_warms_up_then_decays_to_min() {
        let s = Schedule {
            lr: 1e-3,
            min_lr: 1e-5,
            warmup_steps: 10,
            total_steps: 110,
            decay: Decay::Cosine,
        };
        assert!((s.lr_at(0) - 1e-4).abs() < 1e-12);
        assert!((s.lr_at(9) - 1e-3).abs() < 1e-12);
        assert!((s.lr_at(60) - (1e-5 + (1e-3 - 1e-5) * 0.5)).abs() < 1e-9);
        assert!((s.lr_at(500) - 1e-5).abs() < 1e-12);
    }
}
