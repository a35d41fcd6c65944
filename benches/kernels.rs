//! The exact weight-product kernel alone, on the real teacher's matrix shapes, against
//! candle's f32 matmul on the same dequantized weights (the GEMM of candle's exact path) in
//! the same invocation; on an AVX-512 CPU the AVX2 kernel too. Reports GFLOP/s per shape for a decode-sized batch (8 rows) and a
//! prefill-sized one (256 rows).
//!
//! On a CPU with AMX, BF16 matrices of TinyLlama-1.1B's shapes are also multiplied both ways
//! the kernels hold them: packed into panels, and read in place as the file stores their rows
//! (the same bits; the bench asserts it).
//!
//! Run: `cargo bench --bench kernels`. Writes `target/bench/kernels.json`.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use kd_model::kernels::{
    Level, PanelMatrix, RawMatrix, SharedBytes, amx, level, prefer_avx2, supported,
};

/// Seconds per call: the median of `reps` timed calls after one warm-up.
fn time(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut v: Vec<f64> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    v.sort_by(f64::total_cmp);
    v[reps / 2]
}

/// Uniform values in [-0.5, 0.5) from a xorshift generator seeded with `seed`.
fn uniform(mut seed: u64) -> impl FnMut() -> f32 {
    move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    }
}

fn main() {
    if !supported() {
        eprintln!("this CPU has neither AVX-512F nor AVX2+FMA: the kernels do not run here");
        return;
    }
    // On an AVX-512 CPU the AVX2 kernels are measured too (same values, narrower vectors).
    let with_avx2 = level() == Some(Level::Avx512);
    let dev = Device::Cpu;
    // SmolLM2-135M: q+k+v stacked, o, gate+up stacked, down, and the output head (Q8_0 in
    // the released GGUF).
    let shapes = [
        ("qkv", 960, 576, GgmlDType::Q4_1),
        ("o", 576, 576, GgmlDType::Q4_1),
        ("gate+up", 3072, 576, GgmlDType::Q4_1),
        ("down", 576, 1536, GgmlDType::Q4_1),
        ("output head", 49152, 576, GgmlDType::Q8_0),
        // The same product from f32 panels: what expanding the blocks costs.
        ("gate+up f32", 3072, 576, GgmlDType::F32),
    ];
    println!(
        "{:<12} {:>5} {:>12} {:>10} {:>12} {:>8}",
        "matrix", "rows", "ours GFLOP/s", "ours AVX2", "candle f32", "ratio"
    );
    let mut json = Vec::new();
    let mut rnd = uniform(1);
    for (name, rows, cols, dt) in shapes {
        let w: Vec<f32> = (0..rows * cols).map(|_| rnd()).collect();
        let q = QTensor::quantize(&Tensor::from_vec(w, (rows, cols), &dev).unwrap(), dt).unwrap();
        let ours = PanelMatrix::from_qtensor(&q).unwrap();
        let dense_t = q.dequantize(&dev).unwrap().t().unwrap();
        for n in [8usize, 256] {
            let x: Vec<f32> = (0..n * cols).map(|_| rnd()).collect();
            let xt = Tensor::from_vec(x.clone(), (n, cols), &dev).unwrap();
            let mut y = vec![0f32; n * rows];
            let reps = if rows * n > 1 << 22 { 5 } else { 21 };
            let t_ours = time(reps, || ours.matmul_into(&x, n, &mut y));
            let t_avx2 = with_avx2.then(|| {
                prefer_avx2(true);
                let t = time(reps, || ours.matmul_into(&x, n, &mut y));
                prefer_avx2(false);
                t
            });
            let t_candle = time(reps, || {
                std::hint::black_box(xt.matmul(&dense_t).unwrap());
            });
            let flop = 2.0 * (rows * cols * n) as f64;
            let (g_ours, g_candle) = (flop / t_ours / 1e9, flop / t_candle / 1e9);
            let g_avx2 = t_avx2.map(|t| flop / t / 1e9);
            println!(
                "{name:<12} {n:>5} {g_ours:>12.1} {:>10} {g_candle:>12.1} {:>7.2}x",
                g_avx2.map_or("-".to_string(), |g| format!("{g:.1}")),
                g_ours / g_candle
            );
            json.push(serde_json::json!({
                "matrix": name, "rows_in": n, "shape": [rows, cols], "dtype": format!("{dt:?}"),
                "ours_gflops": g_ours, "ours_avx2_gflops": g_avx2, "candle_f32_gflops": g_candle,
            }));
        }
    }
    if amx() {
        in_place_rows(&mut json);
    }
    let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(
        out.join("kernels.json"),
        serde_json::to_string_pretty(&json).unwrap(),
    )
    .unwrap();
}

/// BF16 products on AMX tiles at TinyLlama-1.1B's shapes, from a weight file as a teacher's
/// are: each shape copied until the copies outgrow the CPU's caches (1.2 GB), written to a
/// temporary file and mapped; one pass multiplies every copy. Rows read in place from the map
/// against the same rows packed into panels (the baseline), in GB/s of weights read.
fn in_place_rows(json: &mut Vec<serde_json::Value>) {
    println!(
        "\nBF16 on AMX tiles {:<8} {:>5} {:>12} {:>14} {:>8}",
        "matrix", "rows", "panels GB/s", "in place GB/s", "ratio"
    );
    let mut rnd = uniform(7);
    for (name, rows, cols) in [
        ("qkv", 2560, 2048),
        ("gate+up", 11264, 2048),
        ("down", 2048, 5632),
        ("head", 32000, 2048),
    ] {
        let one = rows * cols * 2;
        let copies = (1_200_000_000usize).div_ceil(one);
        let mut file = tempfile::tempfile().unwrap();
        for _ in 0..copies {
            let bytes: Vec<u8> = (0..rows * cols)
                .flat_map(|_| ((rnd().to_bits() >> 16) as u16).to_le_bytes())
                .collect();
            std::io::Write::write_all(&mut file, &bytes).unwrap();
        }
        // SAFETY: the temporary file is private to this process and not written again.
        let map: SharedBytes = std::sync::Arc::new(unsafe { memmap2::Mmap::map(&file) }.unwrap());
        let data: &[u8] = map.as_ref().as_ref();
        let build = |place: bool| -> Vec<PanelMatrix> {
            (0..copies)
                .map(|c| {
                    let raw = RawMatrix {
                        dtype: GgmlDType::BF16,
                        rows,
                        cols,
                        bytes: &data[c * one..(c + 1) * one],
                        map: place.then_some(&map),
                    };
                    PanelMatrix::stack_raw(&[raw]).unwrap()
                })
                .collect()
        };
        let (packed, in_place) = (build(false), build(true));
        assert!(in_place.iter().all(|m| m.bytes_in_place() == one));
        for n in [8usize, 256] {
            let x: Vec<f32> = (0..n * cols).map(|_| rnd()).collect();
            let (mut a, mut b) = (vec![0f32; n * rows], vec![0f32; n * rows]);
            let reps = if n > 8 { 3 } else { 7 };
            let pass = |ms: &[PanelMatrix], y: &mut [f32]| {
                for m in ms {
                    m.matmul_into(&x, n, y);
                }
            };
            let t_packed = time(reps, || pass(&packed, &mut a));
            let t_place = time(reps, || pass(&in_place, &mut b));
            assert!(a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()));
            let gb = (copies * one) as f64 / 1e9;
            println!(
                "{:<26} {n:>5} {:>12.1} {:>14.1} {:>7.2}x",
                name,
                gb / t_packed,
                gb / t_place,
                t_packed / t_place
            );
            let flop = 2.0 * (copies * rows * cols * n) as f64;
            json.push(serde_json::json!({
                "matrix": format!("bf16 {name}"), "rows_in": n, "shape": [rows, cols],
                "copies": copies, "panels_gflops": flop / t_packed / 1e9,
                "in_place_gflops": flop / t_place / 1e9,
            }));
        }
    }
}
