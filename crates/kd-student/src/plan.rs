//! The candle engine's memory plan on a GPU: what a step holds at its peak, estimated from
//! the student's shape and the batch settings before the run, and refused when the device
//! has less free memory.

use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::Device;
use kd_model::LlamaConfig;

use crate::engine::Plan;
use crate::error::{Result, refuse};

/// The peak of a candle step for `tokens` tokens in rows of at most `max_len`, head chunks
/// of `chunk` positions. candle's autograd keeps every intermediate of the forward pass until
/// the backward pass is done, so activations are counted per op: for each token and layer,
/// the residual stream and norms (16·hidden), q, k, v with their layout copies and rotations
/// (6·(q + 2·kv)), the MLP (6·intermediate) and the attention scores with their mask, softmax
/// and gradient (4·heads·max_len). `bf16` adds the rounded copies of the weights.
pub fn candle_plan(
    cfg: &LlamaConfig,
    n_params: usize,
    tokens: usize,
    max_len: usize,
    chunk: usize,
    bf16: bool,
) -> Plan {
    let f = 4;
    let (d, ff, nh) = (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_attention_heads,
    );
    let qkv = cfg.q_dim() + 2 * cfg.num_key_value_heads * cfg.head_dim();
    let per_token_layer = 16 * d + 6 * qkv + 6 * ff + 4 * nh * max_len;
    let layer = f * tokens * per_token_layer;
    Plan {
        tokens,
        max_len,
        chunk,
        params_bytes: f * n_params,
        grads_bytes: f * n_params,
        moments_bytes: 2 * f * n_params,
        activations_bytes: layer * cfg.num_hidden_layers,
        // The gradients of one layer's intermediates in flight, and bf16's weight copies.
        backward_bytes: 2 * layer + if bf16 { 2 * n_params } else { 0 },
        // A chunk's logits, their f32 copy, ∂L/∂z and its copy in the products' dtype.
        head_bytes: 4 * f * chunk * cfg.vocab_size,
        attention_scratch_bytes: 0,
    }
}

/// Refuses a plan that needs more than 95% of the device's free memory, naming the settings
/// that shrink it.
pub fn check_fits(plan: &Plan, device: &Device) -> Result<()> {
    let Some((free, _)) = kd_model::memory_info(device) else {
        return Ok(());
    };
    let need = plan.total_bytes();
    if need as f64 > 0.95 * free as f64 {
        refuse!(
            Setting,
            "the memory plan needs {:.2} GB of device memory and {} has {:.2} GB free: lower \
             token_budget ({}), max_len ({}) or logits_chunk ({}), or train a smaller student",
            need as f64 / 1e9,
            kd_model::device_name(device),
            free as f64 / 1e9,
            plan.tokens,
            plan.max_len,
            plan.chunk
        );
    }
    Ok(())
}

static PEAK_IN_USE: AtomicUsize = AtomicUsize::new(0);

/// Records the device memory in use now (a GPU's, after a backward pass: its peak).
pub fn sample_device_memory(device: &Device) {
    if let Some((free, total)) = kd_model::memory_info(device) {
        PEAK_IN_USE.fetch_max(total - free, Ordering::Relaxed);
    }
}

/// The most device memory in use at a sample so far; `None` before any (or on a CPU).
pub fn peak_device_memory() -> Option<usize> {
    match PEAK_IN_USE.load(Ordering::Relaxed) {
        0 => None,
        n => Some(n),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plan_grows_with_the_batch_and_the_chunk_and_fits_a_cpu() {
        let cfg = kd_model::testing::smollm2_student_config();
        let p = candle_plan(&cfg, 1_000_000, 1024, 512, 128, false);
        let more = candle_plan(&cfg, 1_000_000, 2048, 512, 128, false);
        let chunk = candle_plan(&cfg, 1_000_000, 1024, 512, 256, false);
        assert!(more.activations_bytes == 2 * p.activations_bytes);
        assert!(chunk.head_bytes == 2 * p.head_bytes);
        assert!(candle_plan(&cfg, 1_000_000, 1024, 512, 128, true).total_bytes() > p.total_bytes());
        assert_eq!(p.moments_bytes, 8_000_000);
        // No device memory to ask a CPU about: nothing is refused.
        check_fits(&p, &Device::Cpu).unwrap();
        assert_eq!(peak_device_memory(), None);
    }
}
