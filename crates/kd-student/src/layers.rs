//! Which teacher layers a student cut from the teacher keeps: a list, or `auto:N`, chosen by
//! measurement on the cache.
//!
//! `auto:N` removes layers greedily: at each step every remaining layer is taken out in turn,
//! the cut model (the teacher's embeddings, the remaining layers in order, its final norm and
//! head, exactly what `--init-from-teacher` builds) is run on a sample of the cache's
//! training rows, and the layer whose removal gives the lowest forward KL against the cache
//! (bucket tail, τ = 1, the metric held-out evaluation reports) goes. It stops at N layers.
//!
//! Each cut model shares the layers before the removed one with the current model, so the
//! residual stream entering every layer of the current model is kept, and a candidate runs
//! only the layers after the one it removes, then the head on the distilled positions.

use std::path::Path;
use std::str::FromStr;
use std::time::Instant;

use kd_model::cpu::CpuLlama;
use serde::{Deserialize, Serialize};

use crate::data::{Batch, RowSource};
use crate::error::{Result, error, refuse};
use crate::train::PositionTargets;

/// Distilled positions `auto:N` scores each candidate on, by default.
pub const DEFAULT_AUTO_POSITIONS: usize = 1024;

/// Teacher layers, as given: a list, or `auto:N` (chosen on the cache).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LayerPick {
    List(Vec<usize>),
    Auto(usize),
}

impl FromStr for LayerPick {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(n) = s.strip_prefix("auto:") {
            return match n.parse::<usize>() {
                Ok(n) if n > 0 => Ok(LayerPick::Auto(n)),
                _ => Err(format!(
                    "`{s}`: auto:N needs a number of layers N ≥ 1, e.g. auto:15"
                )),
            };
        }
        s.split(',')
            .map(|x| {
                x.trim()
                    .parse::<usize>()
                    .map_err(|_| format!("`{s}`: expected layer numbers such as 0,6,12 or auto:N"))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(LayerPick::List)
    }
}

impl Serialize for LayerPick {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            LayerPick::List(v) => v.serialize(s),
            LayerPick::Auto(n) => s.serialize_str(&format!("auto:{n}")),
        }
    }
}

impl<'de> Deserialize<'de> for LayerPick {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Form {
            List(Vec<usize>),
            Text(String),
        }
        match Form::deserialize(d)? {
            Form::List(v) => Ok(LayerPick::List(v)),
            Form::Text(t) => match t.parse::<LayerPick>() {
                Ok(LayerPick::Auto(n)) => Ok(LayerPick::Auto(n)),
                Ok(LayerPick::List(_)) => Err(serde::de::Error::custom(format!(
                    "`{t}`: give the layers as a list, e.g. [0, 6, 12], or \"auto:N\""
                ))),
                Err(e) => Err(serde::de::Error::custom(e)),
            },
        }
    }
}

/// What the layer choice measured (`summary.json`'s `layer_choice`, and `layer_choice.json`
/// in the run's folder, which a run with the same request reuses).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LayerChoice {
    /// What was asked: teacher, layers kept, rows and sample.
    pub request: ChoiceRequest,
    /// The teacher's layers, in order, that the student keeps.
    pub kept: Vec<usize>,
    /// The teacher's layer count.
    pub teacher_layers: usize,
    /// Rows and distilled positions every candidate was scored on (training rows, in row
    /// order).
    pub rows: usize,
    pub positions: usize,
    /// Forward KL of the whole teacher against the cache on those positions.
    pub teacher_forward_kl: f64,
    /// The removals in order: the layer taken out and every candidate's forward KL.
    pub removals: Vec<Removal>,
    pub seconds: f64,
}

/// What a choice depends on; a saved choice is reused only for the same request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChoiceRequest {
    pub teacher: String,
    pub keep: usize,
    /// Fingerprint of the cache the rows come from.
    pub shards_fingerprint: String,
    pub positions: usize,
    pub max_len: usize,
    /// sha256 of the sampled rows' indices, in order (the training split decides them).
    pub rows_sha256: String,
}

/// One greedy step.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Removal {
    /// The layer removed (the teacher's numbering).
    pub layer: usize,
    /// Forward KL of the model without it.
    pub forward_kl: f64,
    /// Every layer that was a candidate.
    pub candidates: Vec<Candidate>,
}

/// A layer's score at one step.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Candidate {
    pub layer: usize,
    /// Forward KL of the current model without this layer.
    pub forward_kl: f64,
    /// Mean angular distance, `arccos(cos(x, x′)) / π`, between the residual stream at the
    /// distilled positions before and after this layer in the current model: how much the
    /// layer turns the stream (a cheap proxy; small means little changes without it).
    pub angular_distance: f64,
}

/// The sample's rows prepared for the cut models: token lists, where each distilled
/// position's hidden state lies, and the targets.
struct Group {
    batch: Batch,
    targets: PositionTargets,
    lens: Vec<usize>,
    /// Row of each distilled position in the ragged `[Σ len, hidden]` stream.
    at: Vec<usize>,
    /// The residual stream entering each layer of the current model, and after its last.
    streams: Vec<Vec<f32>>,
}

/// Training rows `rows`, in order, until they hold `positions` distilled positions: the
/// sample a choice scores on, and its positions.
pub fn sample<S: RowSource + ?Sized>(
    src: &S,
    rows: &[usize],
    positions: usize,
    max_len: usize,
) -> (Vec<usize>, usize) {
    let mut sample = Vec::new();
    let mut n_pos = 0;
    for &r in rows {
        if n_pos >= positions {
            break;
        }
        // A row's distilled positions, as `Batch::collect` cuts it to `max_len`.
        let n = src
            .row_len(r)
            .min(max_len)
            .saturating_sub(src.view(0, r).prompt_len as usize);
        if n > 0 {
            n_pos += n;
            sample.push(r);
        }
    }
    (sample, n_pos)
}

/// sha256 of row indices, in order (little-endian u64s).
pub fn rows_sha256(rows: &[usize]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for &r in rows {
        h.update((r as u64).to_le_bytes());
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// The choice saved at `path` when it answers `request`.
pub fn saved(path: &Path, request: &ChoiceRequest) -> Option<LayerChoice> {
    let text = std::fs::read(path).ok()?;
    let c: LayerChoice = serde_json::from_slice(&text).ok()?;
    (c.request == *request).then_some(c)
}

/// Chooses `request.keep` of `model`'s layers on the rows `sample` of `src` (see [`sample`]),
/// greedily by forward KL against the cache, with the head's logits `chunk` positions at a
/// time.
pub fn choose<S: RowSource + ?Sized>(
    model: &CpuLlama,
    src: &S,
    sample: &[usize],
    request: ChoiceRequest,
    chunk: usize,
    progress: bool,
) -> Result<LayerChoice> {
    let start = Instant::now();
    let total = model.layers.len();
    let (keep, max_len) = (request.keep, request.max_len);
    if keep == 0 || keep > total {
        refuse!(
            Setting,
            "keep_layers = \"auto:{keep}\": the teacher has {total} layers; choose 1 to {total}"
        );
    }
    let cfg = &model.cfg;
    let (d, v) = (cfg.hidden_size, cfg.vocab_size);
    if sample.is_empty() {
        refuse!(
            Setting,
            "keep_layers = \"auto:{keep}\": the training rows have no distilled positions to choose layers on"
        );
    }
    let mut current: Vec<usize> = (0..total).collect();
    let mut groups = Vec::new();
    let (mut tokens, mut n_pos) = (0, 0);
    for rows in crate::fit::eval_groups(src, sample, max_len) {
        let batch = Batch::collect(src, rows, max_len, 0);
        let targets = PositionTargets::of(&batch, v)?;
        let lens: Vec<usize> = batch.lengths.iter().map(|&l| l as usize).collect();
        let mut offs = vec![0];
        for l in &lens {
            offs.push(offs.last().unwrap() + l);
        }
        let at = batch
            .pos_row
            .iter()
            .zip(&batch.pos_t)
            .map(|(&r, &t)| offs[r as usize] + t as usize)
            .collect();
        tokens += offs[lens.len()];
        n_pos += batch.n_pos();
        groups.push(Group {
            batch,
            targets,
            lens,
            at,
            streams: Vec::new(),
        });
    }
    if progress {
        let held = (total + 1) * tokens * d * 4;
        eprintln!(
            "choosing {keep} of the teacher's {total} layers by forward KL on {n_pos} positions \
             ({} rows, {tokens} tokens); holds {:.0} MB of hidden states",
            sample.len(),
            held as f64 / 1e6
        );
    }
    let ids = |g: &Group| -> Vec<Vec<u32>> {
        let l = g.batch.seq_len;
        g.lens
            .iter()
            .enumerate()
            .map(|(i, &n)| g.batch.input_ids[i * l..i * l + n].to_vec())
            .collect()
    };
    for g in &mut groups {
        let toks = ids(g);
        let refs: Vec<&[u32]> = toks.iter().map(|t| t.as_slice()).collect();
        let x = model.embed(&refs);
        g.streams = through(model, &g.lens, x, &current);
    }
    let lasts: Vec<&[f32]> = groups.iter().map(|g| g.streams[total].as_slice()).collect();
    let teacher_forward_kl = mean_kl(model, &groups, &lasts, chunk, d, v)?;
    let mut removals = Vec::new();
    while current.len() > keep {
        let mut candidates = Vec::with_capacity(current.len());
        for k in 0..current.len() {
            let mut outs = Vec::with_capacity(groups.len());
            for g in &groups {
                let mut x = g.streams[k].clone();
                model.run_layers(&g.lens, &mut x, &current[k + 1..], |_, _| {});
                outs.push(x);
            }
            let lasts: Vec<&[f32]> = outs.iter().map(|x| x.as_slice()).collect();
            let kl = mean_kl(model, &groups, &lasts, chunk, d, v)?;
            candidates.push(Candidate {
                layer: current[k],
                forward_kl: kl,
                angular_distance: angular_distance(&groups, k, d),
            });
        }
        let (k, best) = candidates
            .iter()
            .enumerate()
            .min_by(|a, b| a.1.forward_kl.total_cmp(&b.1.forward_kl))
            .expect("a candidate");
        let (layer, forward_kl) = (best.layer, best.forward_kl);
        current.remove(k);
        for g in &mut groups {
            let x = g.streams[k].clone();
            g.streams.truncate(k);
            g.streams.extend(through(model, &g.lens, x, &current[k..]));
        }
        if progress {
            eprintln!(
                "  removed layer {layer:>3}: forward KL {forward_kl:.4} with {} layers ({:.0} s)",
                current.len(),
                start.elapsed().as_secs_f64()
            );
        }
        removals.push(Removal {
            layer,
            forward_kl,
            candidates,
        });
    }
    Ok(LayerChoice {
        request,
        kept: current,
        teacher_layers: total,
        rows: sample.len(),
        positions: n_pos,
        teacher_forward_kl,
        removals,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Mean over the groups' distilled positions of the angle, as a share of π, between the
/// streams entering and leaving layer `k` of the current model.
fn angular_distance(groups: &[Group], k: usize, d: usize) -> f64 {
    let (mut sum, mut n) = (0.0, 0usize);
    for g in groups {
        let (a, b) = (&g.streams[k], &g.streams[k + 1]);
        for &r in &g.at {
            let (x, y) = (&a[r * d..(r + 1) * d], &b[r * d..(r + 1) * d]);
            let dot = |p: &[f32], q: &[f32]| -> f64 {
                p.iter().zip(q).map(|(&u, &v)| u as f64 * v as f64).sum()
            };
            let c = dot(x, y) / (dot(x, x) * dot(y, y)).sqrt().max(f64::MIN_POSITIVE);
            sum += c.clamp(-1.0, 1.0).acos() / std::f64::consts::PI;
            n += 1;
        }
    }
    sum / n.max(1) as f64
}

/// `x` and the streams after each of `layers` in turn: `layers.len() + 1` streams.
fn through(model: &CpuLlama, lens: &[usize], x: Vec<f32>, layers: &[usize]) -> Vec<Vec<f32>> {
    let mut out = vec![x.clone()];
    let mut x = x;
    model.run_layers(lens, &mut x, layers, |_, s| out.push(s.to_vec()));
    out
}

/// Forward KL (bucket tail, τ = 1) against the cache, averaged over the groups' distilled
/// positions, of the residual streams `lasts` (one per group) that leave the last layer.
fn mean_kl(
    model: &CpuLlama,
    groups: &[Group],
    lasts: &[&[f32]],
    chunk: usize,
    d: usize,
    v: usize,
) -> Result<f64> {
    let fwd = crate::fit::EVAL_FORWARD_KL;
    let (mut sum, mut n) = (0.0, 0usize);
    for (g, x) in groups.iter().zip(lasts) {
        for s in (0..g.at.len()).step_by(chunk.max(1)) {
            let len = chunk.max(1).min(g.at.len() - s);
            let mut rows = Vec::with_capacity(len * d);
            for &r in &g.at[s..s + len] {
                rows.extend_from_slice(&x[r * d..(r + 1) * d]);
            }
            let z = model.logits(&model.final_norm(&rows), len);
            let positions = g.targets.positions(&g.batch, s, &z, v);
            let (m, _) = kd_loss::batch_loss(&fwd, &positions, None);
            if !m.divergence.is_finite() {
                return Err(error!(
                    Training,
                    "choosing layers: the forward KL of a cut model is not finite"
                ));
            }
            sum += m.divergence * len as f64;
            n += len;
        }
    }
    Ok(sum / n.max(1) as f64)
}

/// Resolves `pick` against a teacher of `total` layers: `drop` removes the listed layers, or
/// `auto:M` keeps `total − M`; `auto:N` must keep 1 to `total` layers.
pub fn keep_count(pick: &LayerPick, drop: bool, total: usize, path: &Path) -> Result<LayerPick> {
    Ok(match (pick, drop) {
        (LayerPick::Auto(n), false) if *n > total => refuse!(
            Setting,
            "{}: keep_layers = \"auto:{n}\": the teacher has {total} layers; choose 1 to {total}",
            path.display()
        ),
        (p, false) => p.clone(),
        (LayerPick::Auto(m), true) => {
            if *m >= total {
                refuse!(
                    Setting,
                    "{}: drop_layers = \"auto:{m}\" leaves no layer of the teacher's {total}",
                    path.display()
                );
            }
            LayerPick::Auto(total - m)
        }
        (LayerPick::List(l), true) => {
            if let Some(bad) = l.iter().find(|&&i| i >= total) {
                refuse!(
                    Setting,
                    "{}: drop_layers names layer {bad}; the teacher has layers 0 to {}",
                    path.display(),
                    total - 1
                );
            }
            let kept: Vec<usize> = (0..total).filter(|i| !l.contains(i)).collect();
            if kept.is_empty() {
                refuse!(
                    Setting,
                    "{}: drop_layers leaves no layer of the teacher's {total}",
                    path.display()
                );
            }
            LayerPick::List(kept)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::LayerPick;
    use crate::fit::Init;

    #[test]
    fn layers_are_a_list_or_auto_in_flags_and_in_files() {
        assert_eq!("auto:15".parse(), Ok(LayerPick::Auto(15)));
        assert_eq!("0, 6,12".parse(), Ok(LayerPick::List(vec![0, 6, 12])));
        for bad in ["auto:0", "auto:x", "0,six", ""] {
            assert!(bad.parse::<LayerPick>().is_err(), "{bad}");
        }
        let init: Init =
            toml::from_str("from_teacher = { path = \"t.gguf\", keep_layers = \"auto:6\" }")
                .unwrap();
        let Init::FromTeacher { keep_layers, .. } = &init else {
            panic!("{init:?}")
        };
        assert_eq!(keep_layers, &Some(LayerPick::Auto(6)));
        let json = serde_json::to_value(&init).unwrap();
        assert_eq!(json["from_teacher"]["keep_layers"], "auto:6");
        assert_eq!(serde_json::from_value::<Init>(json).unwrap(), init);
        let list: Init =
            toml::from_str("from_teacher = { path = \"t.gguf\", drop_layers = [3, 4] }").unwrap();
        assert_eq!(
            serde_json::to_value(&list).unwrap()["from_teacher"]["drop_layers"],
            serde_json::json!([3, 4])
        );
        let err = toml::from_str::<Init>("from_teacher = { path = \"t\", keep_layers = \"1,2\" }")
            .unwrap_err();
        assert!(err.to_string().contains("as a list"), "{err}");
    }
}
