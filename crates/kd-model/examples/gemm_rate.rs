//! GFLOP/s of the packed f32 product on a training step's shapes (packing excluded):
//! `cargo run --release -p kd-model --example gemm_rate`.
use kd_model::kernels::PackedF32;
use std::time::Instant;

fn main() {
    for (n, out, inn) in [
        (1024, 3072, 576),
        (1024, 576, 1536),
        (576, 1024, 1024),
        (128, 49152, 576),
        (128, 576, 49152),
        (49152, 576, 128),
    ] {
        let x: Vec<f32> = (0..n * inn)
            .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
            .collect();
        let w: Vec<f32> = (0..out * inn)
            .map(|i| ((i * 104729) % 1000) as f32 / 1000.0 - 0.5)
            .collect();
        let mut y = vec![0f32; n * out];
        let mut pk = PackedF32::new();
        let mut best = f64::MAX;
        pk.pack(&w, out, inn, false);
        for _ in 0..7 {
            let t = Instant::now();
            pk.matmul_into(&x, n, &mut y, false);
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!(
            "{n}x{inn} · ({out}x{inn})ᵀ: {:.1} GFLOP/s",
            2.0 * (n * out * inn) as f64 / best / 1e9
        );
    }
}
