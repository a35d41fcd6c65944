//! GFLOP/s of the packed f32 product on a training step's shapes (packing excluded): the
//! layers' products over a 1024-token batch, and the output head's three over a chunk of 128
//! positions. `cargo run --release -p kd-model --example gemm_rate`.

fn main() {
    for (n, out, inn) in [
        (1024, 3072, 576),
        (1024, 576, 1536),
        (576, 1024, 1024),
        (128, 49152, 576),
        (128, 576, 49152),
        (49152, 576, 128),
    ] {
        let r = kd_model::testing::packed_product_gflops(n, out, inn, false);
        println!("{n}x{inn} · ({out}x{inn})ᵀ: {r:.1} GFLOP/s");
    }
}
