//! Rotary position embeddings in every form a model file gives them, and their frequencies.
//!
//! A Hugging Face `config.json` written by `transformers` 4.x holds a top-level `rope_theta`
//! and an optional `rope_scaling` object (`{"rope_type"|"type": …, "factor": …}`); one written
//! by 5.x holds `rope_parameters` (`{"rope_theta": …, "rope_type": …, …}`) instead. A GGUF
//! file holds `{arch}.rope.freq_base`, `{arch}.rope.scaling.*` and, for Llama 3.x, the
//! per-frequency divisors as the tensor `rope_freqs.weight`. [`parse_hf`] and [`parse_gguf`]
//! read all of these, and refuse, naming the key, any scaling type or parameter they do not
//! implement: a RoPE left at a default it does not have moves log-probs by up to a nat
//! without any error.
//!
//! The frequencies follow `transformers` 5.24 (`modeling_rope_utils.py`), checked against
//! values it computed (`tests/data/rope_reference.json`).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The most positions a model may declare: [`crate::Llama`] and [`crate::Student`] precompute
/// RoPE tables for every position (`max_position_embeddings × head_dim/2` cos/sin pairs), so
/// this bounds what a config file can make the loader allocate. 2^20 covers every released
/// llama-family context length up to 1M tokens.
pub const MAX_POSITIONS: usize = 1 << 20;

/// How RoPE's frequencies differ from the plain `theta^(-2i/head_dim)`. Serialized as the
/// `rope_scaling` object of a `transformers` 4.x `config.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rope_type", rename_all = "lowercase")]
pub enum RopeScaling {
    /// Every frequency divided by `factor` (positions interpolated).
    Linear { factor: f64 },
    /// Dynamic NTK: the base grows only once a sequence is longer than
    /// `max_position_embeddings`. Within it, which is all the model accepts, this is plain RoPE.
    Dynamic { factor: f64 },
    /// Llama 3.1's smooth interpolation between scaled low and unscaled high frequencies.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
    /// YaRN: a ramp between interpolated and extrapolated frequencies, and an attention factor
    /// applied to cos and sin.
    Yarn {
        factor: f64,
        original_max_position_embeddings: usize,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        attention_factor: Option<f64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        beta_fast: Option<f64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        beta_slow: Option<f64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mscale: Option<f64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mscale_all_dim: Option<f64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        truncate: Option<bool>,
    },
    /// Explicit per-frequency divisors: GGUF's `rope_freqs.weight`, in which llama.cpp stores
    /// Llama 3.x's scaling.
    Freqs { factors: Vec<f32> },
}

/// A RoPE setting a loader refused: the key (a JSON path or GGUF key) and why.
#[derive(Debug)]
pub struct Refused {
    pub key: String,
    pub what: String,
}

fn refuse(key: impl Into<String>, what: impl Into<String>) -> Refused {
    Refused {
        key: key.into(),
        what: what.into(),
    }
}

/// Inverse frequencies `[head_dim/2]` in f64 and the factor cos and sin are multiplied by.
pub fn frequencies(theta: f64, head_dim: usize, scaling: Option<&RopeScaling>) -> (Vec<f64>, f64) {
    let dim = head_dim as f64;
    let plain: Vec<f64> = (0..head_dim / 2)
        .map(|i| 1.0 / theta.powf(2.0 * i as f64 / dim))
        .collect();
    match scaling {
        None | Some(RopeScaling::Dynamic { .. }) => (plain, 1.0),
        Some(RopeScaling::Linear { factor }) => (plain.iter().map(|f| f / factor).collect(), 1.0),
        Some(RopeScaling::Freqs { factors }) => (
            plain
                .iter()
                .zip(factors)
                .map(|(f, &d)| f / d as f64)
                .collect(),
            1.0,
        ),
        Some(&RopeScaling::Llama3 {
            factor,
            low_freq_factor: low,
            high_freq_factor: high,
            original_max_position_embeddings: orig,
        }) => {
            let orig = orig as f64;
            let (low_wavelen, high_wavelen) = (orig / low, orig / high);
            let inv = plain
                .iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / factor
                    } else {
                        let s = (orig / wavelen - low) / (high - low);
                        (1.0 - s) * f / factor + s * f
                    }
                })
                .collect();
            (inv, 1.0)
        }
        Some(&RopeScaling::Yarn {
            factor,
            original_max_position_embeddings: orig,
            attention_factor,
            beta_fast,
            beta_slow,
            mscale,
            mscale_all_dim,
            truncate,
        }) => {
            let get_mscale = |scale: f64, m: f64| {
                if scale <= 1.0 {
                    1.0
                } else {
                    0.1 * m * scale.ln() + 1.0
                }
            };
            // Python truthiness: 0 and None both mean "not given".
            let nz = |x: Option<f64>| x.filter(|v| *v != 0.0);
            let attn = attention_factor.unwrap_or_else(|| match (nz(mscale), nz(mscale_all_dim)) {
                (Some(m), Some(ma)) => get_mscale(factor, m) / get_mscale(factor, ma),
                _ => get_mscale(factor, 1.0),
            });
            let beta_fast = nz(beta_fast).unwrap_or(32.0);
            let beta_slow = nz(beta_slow).unwrap_or(1.0);
            let corr = |rot: f64| {
                dim * (orig as f64 / (rot * 2.0 * std::f64::consts::PI)).ln() / (2.0 * theta.ln())
            };
            let (mut low, mut high) = (corr(beta_fast), corr(beta_slow));
            if truncate.unwrap_or(true) {
                low = low.floor();
                high = high.ceil();
            }
            let low = low.max(0.0);
            let mut high = high.min(dim - 1.0);
            if low == high {
                high += 0.001;
            }
            let inv = plain
                .iter()
                .enumerate()
                .map(|(i, &f)| {
                    let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                    let extrapolation = 1.0 - ramp;
                    (f / factor) * (1.0 - extrapolation) + f * extrapolation
                })
                .collect();
            (inv, attn)
        }
    }
}

/// What `transformers` calls RoPE's `partial_rotary_factor`: only 1 is implemented.
fn check_partial(v: Option<&Value>, key: &str) -> Result<(), Refused> {
    match v {
        None | Some(Value::Null) => Ok(()),
        Some(x) if x.as_f64() == Some(1.0) => Ok(()),
        Some(x) => Err(refuse(
            key,
            format!("partial rotary embeddings ({x}) are not implemented (only 1.0)"),
        )),
    }
}

/// The RoPE base and scaling of a Hugging Face `config.json` (`top` is its top-level object),
/// read as `transformers` 5.24 reads both its own and 4.x files: `rope_scaling`, when it is an
/// object, takes precedence over `rope_parameters`; `rope_theta` inside the object over the
/// top-level one; 10000 when neither gives one.
pub fn parse_hf(
    top: &Map<String, Value>,
    max_position_embeddings: usize,
) -> Result<(f64, Option<RopeScaling>), Refused> {
    let (name, params) = match (top.get("rope_scaling"), top.get("rope_parameters")) {
        (Some(Value::Object(m)), _) => ("rope_scaling", Some(m)),
        (Some(v), _) if !v.is_null() => {
            return Err(refuse("rope_scaling", "must be an object or null"));
        }
        (_, Some(Value::Object(m))) => ("rope_parameters", Some(m)),
        (_, Some(v)) if !v.is_null() => {
            return Err(refuse("rope_parameters", "must be an object or null"));
        }
        _ => ("rope_parameters", None),
    };
    check_partial(top.get("partial_rotary_factor"), "partial_rotary_factor")?;
    let num = |key: &str, v: &Value| -> Result<f64, Refused> {
        v.as_f64()
            .filter(|x| x.is_finite())
            .ok_or_else(|| refuse(key, format!("expected a finite number, found {v}")))
    };
    let top_theta = match top.get("rope_theta") {
        None | Some(Value::Null) => None,
        Some(v) => Some(num("rope_theta", v)?),
    };
    let Some(p) = params else {
        let theta = top_theta.unwrap_or(10000.0);
        check_theta(theta, "rope_theta")?;
        return Ok((theta, None));
    };
    let key = |k: &str| format!("{name}.{k}");
    if p.values().any(Value::is_object) {
        return Err(refuse(
            name,
            "RoPE parameters per layer type are not implemented (one set for all layers only)",
        ));
    }
    let theta = match p.get("rope_theta") {
        None | Some(Value::Null) => top_theta.unwrap_or(10000.0),
        Some(v) => num(&key("rope_theta"), v)?,
    };
    check_theta(theta, &key("rope_theta"))?;
    check_partial(
        p.get("partial_rotary_factor"),
        &key("partial_rotary_factor"),
    )?;
    let rope_type = match p.get("rope_type").or_else(|| p.get("type")) {
        None | Some(Value::Null) => "default".to_string(),
        Some(Value::String(s)) => s.clone(),
        Some(v) => {
            return Err(refuse(
                key("rope_type"),
                format!("expected a string, found {v}"),
            ));
        }
    };
    let params = Params {
        top,
        p,
        name,
        rope_type: &rope_type,
        max_position_embeddings,
    };
    params.check_keys()?;
    Ok((theta, params.scaling()?))
}

/// One RoPE parameter object (`rope_scaling` or `rope_parameters`) of a given type.
struct Params<'a> {
    top: &'a Map<String, Value>,
    p: &'a Map<String, Value>,
    /// `rope_scaling` or `rope_parameters`, for messages.
    name: &'a str,
    rope_type: &'a str,
    max_position_embeddings: usize,
}

impl Params<'_> {
    fn key(&self, k: &str) -> String {
        format!("{}.{k}", self.name)
    }

    /// Refuses a type this loader does not implement, and a key its type does not have.
    fn check_keys(&self) -> Result<(), Refused> {
        let allowed: &[&str] = match self.rope_type {
            "default" => &[],
            "linear" | "dynamic" => &["factor"],
            "llama3" => &[
                "factor",
                "low_freq_factor",
                "high_freq_factor",
                "original_max_position_embeddings",
            ],
            "yarn" => &[
                "factor",
                "original_max_position_embeddings",
                "attention_factor",
                "beta_fast",
                "beta_slow",
                "mscale",
                "mscale_all_dim",
                "truncate",
            ],
            other => {
                return Err(refuse(
                    self.key("rope_type"),
                    format!(
                        "RoPE type `{other}` is not implemented (implemented: default, linear, \
                         dynamic, llama3, yarn)"
                    ),
                ));
            }
        };
        for k in self.p.keys() {
            let common = ["rope_type", "type", "rope_theta", "partial_rotary_factor"];
            if !common.contains(&k.as_str()) && !allowed.contains(&k.as_str()) {
                return Err(refuse(
                    self.key(k),
                    format!(
                        "not a parameter of RoPE type `{}` that this loader implements",
                        self.rope_type
                    ),
                ));
            }
        }
        Ok(())
    }

    fn get(&self, k: &str) -> Option<&Value> {
        self.p.get(k).filter(|v| !v.is_null())
    }

    fn num(&self, k: &str, v: &Value) -> Result<f64, Refused> {
        v.as_f64()
            .filter(|x| x.is_finite())
            .ok_or_else(|| refuse(self.key(k), format!("expected a finite number, found {v}")))
    }

    /// A number the type requires.
    fn req(&self, k: &str) -> Result<f64, Refused> {
        let v = self.get(k).ok_or_else(|| {
            refuse(
                self.key(k),
                format!("required by RoPE type `{}`", self.rope_type),
            )
        })?;
        self.num(k, v)
    }

    fn opt(&self, k: &str) -> Result<Option<f64>, Refused> {
        self.get(k).map(|v| self.num(k, v)).transpose()
    }

    /// A required number that must be positive.
    fn positive(&self, k: &str) -> Result<f64, Refused> {
        let x = self.req(k)?;
        if x > 0.0 {
            Ok(x)
        } else {
            Err(refuse(self.key(k), format!("must be positive, found {x}")))
        }
    }

    /// `transformers` gives a top-level `original_max_position_embeddings` precedence, then
    /// the object's, then `max_position_embeddings`.
    fn original(&self) -> Result<usize, Refused> {
        let (k, v) = match (
            self.top.get("original_max_position_embeddings"),
            self.get("original_max_position_embeddings"),
        ) {
            (Some(v), _) if !v.is_null() => ("original_max_position_embeddings".to_string(), v),
            (_, Some(v)) => (self.key("original_max_position_embeddings"), v),
            _ => return Ok(self.max_position_embeddings),
        };
        v.as_u64()
            .filter(|&n| n > 0 && n <= MAX_POSITIONS as u64)
            .map(|n| n as usize)
            .ok_or_else(|| refuse(k, format!("expected a positive integer, found {v}")))
    }

    /// The scaling of this type (none for `default`); the keys are checked.
    fn scaling(&self) -> Result<Option<RopeScaling>, Refused> {
        Ok(match self.rope_type {
            "default" => None,
            "linear" => Some(RopeScaling::Linear {
                factor: self.positive("factor")?,
            }),
            "dynamic" => Some(RopeScaling::Dynamic {
                factor: self.positive("factor")?,
            }),
            "llama3" => {
                let low = self.positive("low_freq_factor")?;
                let high = self.positive("high_freq_factor")?;
                if high <= low {
                    return Err(refuse(
                        self.key("high_freq_factor"),
                        format!("must exceed low_freq_factor ({high} <= {low})"),
                    ));
                }
                Some(RopeScaling::Llama3 {
                    factor: self.positive("factor")?,
                    low_freq_factor: low,
                    high_freq_factor: high,
                    original_max_position_embeddings: self.original()?,
                })
            }
            "yarn" => {
                let orig = self.original()?;
                let factor = match self.opt("factor")? {
                    Some(f) if f > 0.0 => f,
                    Some(f) => {
                        return Err(refuse(
                            self.key("factor"),
                            format!("must be positive, found {f}"),
                        ));
                    }
                    None => self.max_position_embeddings as f64 / orig as f64,
                };
                let truncate = match self.get("truncate") {
                    None => None,
                    Some(Value::Bool(b)) => Some(*b),
                    Some(v) => {
                        return Err(refuse(
                            self.key("truncate"),
                            format!("expected a boolean, found {v}"),
                        ));
                    }
                };
                Some(RopeScaling::Yarn {
                    factor,
                    original_max_position_embeddings: orig,
                    attention_factor: self.opt("attention_factor")?,
                    beta_fast: self.opt("beta_fast")?,
                    beta_slow: self.opt("beta_slow")?,
                    mscale: self.opt("mscale")?,
                    mscale_all_dim: self.opt("mscale_all_dim")?,
                    truncate,
                })
            }
            _ => unreachable!("refused by check_keys"),
        })
    }
}

fn check_theta(theta: f64, key: &str) -> Result<(), Refused> {
    if theta > 1.0 && theta.is_finite() {
        Ok(())
    } else {
        Err(refuse(
            key,
            format!("must be a finite number above 1, found {theta}"),
        ))
    }
}

/// The `rope_theta`, `rope_scaling` and `rope_parameters` entries of a `config.json` that both
/// `transformers` 4.x (top-level `rope_theta`, `rope_scaling`) and 5.x (`rope_parameters`,
/// or `rope_scaling` when given) read as the same function. `Freqs` has no `config.json`
/// form and is refused.
pub fn hf_entries(
    theta: f64,
    scaling: Option<&RopeScaling>,
) -> Result<Map<String, Value>, Refused> {
    let mut out = Map::new();
    out.insert("rope_theta".into(), theta.into());
    let mut params = Map::new();
    match scaling {
        None => {
            out.insert("rope_scaling".into(), Value::Null);
            params.insert("rope_type".into(), "default".into());
        }
        Some(RopeScaling::Freqs { .. }) => {
            return Err(refuse(
                "rope_freqs.weight",
                "explicit RoPE frequency factors have no config.json form",
            ));
        }
        Some(s) => {
            let v = serde_json::to_value(s).expect("RoPE scaling serializes");
            out.insert("rope_scaling".into(), v.clone());
            if let Value::Object(m) = v {
                params.extend(m);
            }
        }
    }
    params.insert("rope_theta".into(), theta.into());
    out.insert("rope_parameters".into(), Value::Object(params));
    Ok(out)
}

/// A GGUF metadata value as f64, if it is a number.
pub type GgufNumber<'a> = &'a dyn Fn(&str) -> Option<Result<f64, String>>;

/// The RoPE base and scaling of a GGUF header: `{arch}.rope.freq_base` (10000 when absent),
/// `{arch}.rope.scaling.type` `none` or `linear` with `{arch}.rope.scaling.factor` (or the
/// older `{arch}.rope.scale_linear`), and the divisors of `rope_freqs.weight` when the file
/// has that tensor. Any other `{arch}.rope.*` key, a `yarn` scaling and a
/// `{arch}.rope.dimension_count` other than the head size are refused.
pub fn parse_gguf(
    arch: &str,
    keys: &[&str],
    number: GgufNumber,
    string: &dyn Fn(&str) -> Option<String>,
    head_dim: usize,
    freqs: Option<Vec<f32>>,
) -> Result<(f64, Option<RopeScaling>), Refused> {
    let p = format!("{arch}.rope.");
    let k = |s: &str| format!("{p}{s}");
    let known = [
        "freq_base",
        "dimension_count",
        "scaling.type",
        "scaling.factor",
        "scale_linear",
        // Informational: the context the model was trained at, and whether it was fine-tuned
        // at the scaled length. Neither enters the function for the types implemented.
        "scaling.original_context_length",
        "scaling.finetuned",
    ];
    for key in keys {
        if let Some(rest) = key.strip_prefix(&p)
            && !known.contains(&rest)
        {
            return Err(refuse(
                *key,
                "a RoPE setting this loader does not implement",
            ));
        }
    }
    let num = |key: String| -> Result<Option<f64>, Refused> {
        match number(&key) {
            None => Ok(None),
            Some(Ok(x)) if x.is_finite() => Ok(Some(x)),
            Some(Ok(x)) => Err(refuse(key, format!("expected a finite number, found {x}"))),
            Some(Err(e)) => Err(refuse(key, e)),
        }
    };
    let theta = num(k("freq_base"))?.unwrap_or(10000.0);
    check_theta(theta, &k("freq_base"))?;
    if let Some(n) = num(k("dimension_count"))?
        && n != head_dim as f64
    {
        return Err(refuse(
            k("dimension_count"),
            format!("partial rotary embeddings ({n} of {head_dim} dimensions) are not implemented"),
        ));
    }
    let ty = string(&k("scaling.type")).unwrap_or_else(|| "none".into());
    let linear = match ty.as_str() {
        "none" => match num(k("scale_linear"))? {
            Some(f) if f != 1.0 => Some(f),
            _ => None,
        },
        "linear" => Some(
            num(k("scaling.factor"))?
                .ok_or_else(|| refuse(k("scaling.factor"), "required by linear scaling"))?,
        ),
        other => {
            return Err(refuse(
                k("scaling.type"),
                format!(
                    "RoPE scaling `{other}` is not implemented for GGUF (implemented: none, linear)"
                ),
            ));
        }
    };
    if let Some(f) = linear
        && !(f > 0.0)
    {
        return Err(refuse(
            k("scaling.factor"),
            format!("must be positive, found {f}"),
        ));
    }
    let scaling = match (linear, freqs) {
        (Some(_), Some(_)) => {
            return Err(refuse(
                "rope_freqs.weight",
                "frequency factors together with linear scaling are not implemented",
            ));
        }
        (Some(factor), None) => Some(RopeScaling::Linear { factor }),
        (None, Some(factors)) => {
            if factors.len() != head_dim / 2 {
                return Err(refuse(
                    "rope_freqs.weight",
                    format!(
                        "has {} factors, expected head_dim/2 = {}",
                        factors.len(),
                        head_dim / 2
                    ),
                ));
            }
            if let Some(bad) = factors.iter().find(|f| !(f.is_finite() && **f > 0.0)) {
                return Err(refuse(
                    "rope_freqs.weight",
                    format!("factor {bad} is not a positive number"),
                ));
            }
            Some(RopeScaling::Freqs { factors })
        }
        (None, None) => None,
    };
    Ok((theta, scaling))
}
