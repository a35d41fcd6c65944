//! Exact f32 CPU kernels for the teacher pass and the trainer (AVX-512, or AVX2 with FMA and
//! F16C): weight panels in their files' formats, the products over them, and the dispatch
//! between instruction sets.
//!
//! [`PanelMatrix`] keeps a weight matrix in its file's type, repacked into panels of 16
//! output rows: F32, F16 and BF16 as they are; Q4_0, Q4_1 and Q8_0 with, for every 32-column
//! block, the 16 rows' scales and offsets as f32 vectors, then the quants transposed so that
//! one 16-byte load holds one column of the 16 rows; Q4_K, Q5_K and Q6_K by 256-column
//! super-blocks (the rows' super-block scales, then per 32-column sub-block the 6-bit scales
//! and the quants, low bits and high bits apart). The product expands each column to the very
//! f32 values candle's `dequantize` produces (the same operations in the same order, e.g.
//! `q·d + m` for Q4_1, `(d·sc)·q − dmin·m` for Q4_K) and accumulates with fused multiply-adds
//! against broadcast activations. No activation is quantized: the result equals a product
//! with the dequantized f32 matrix up to summation order, while reading the weights in about
//! their files' size. Types without a panel format (Q5_0, Q5_1, Q2_K, Q3_K) are expanded to
//! f32, with a note.
//!
//! Every output element is accumulated over the columns in one fixed order, whatever the
//! number of input rows and however they are grouped, so a row's result does not depend on
//! which other rows share its batch: batch 1 and batch 8 give bit-identical values.
//!
//! On a CPU with AMX-BF16 (and an OS that grants the tiles), BF16 panels are multiplied on the
//! tiles instead: each f32 activation is split into three bf16 parts whose sum is exactly the
//! activation, and `tdpbf16ps` multiplies them by the stored weights with f32 sums, so the
//! product is still exact in f32 and still independent of the batch; it agrees with the
//! vector kernels within f32 rounding, not bit for bit (the sums run in another order).
//! `KD_NO_AMX=1`, or [`allow_amx`]`(false)`, keeps the vector kernels.
//!
//! With AMX, BF16 matrices may also be left unpacked (where the caller offers the weight
//! file's map, [`RawMatrix::map`]): a segment reads 16 rows at a time straight from the map,
//! as the tiles' first operand, with the activations' parts as the second. Each element is the same sequence of `tdpbf16ps`
//! products as from BF16 panels, so both give the same bits; without the tiles (AMX refused
//! after loading), such a segment expands its rows to f32 panels per product and gives the
//! vector kernels' bits.

use candle_core::quantized::{GgmlDType, QTensor};
use rayon::prelude::*;

mod rng;
pub use rng::Rng;

#[cfg(target_arch = "x86_64")]
mod amx;

/// Output rows per panel (one AVX-512 vector of f32, two AVX2 ones).
const PANEL: usize = 16;
/// Columns per block (the GGUF block size).
const QK: usize = 32;
/// Input rows multiplied together by one kernel call.
const MAX_B: usize = 8;
/// Input rows of one AVX-512 call on f32 panels: 12 rows × 2 panels keep 24 of the 32 vector
/// registers accumulating, so every weight vector loaded serves 12 rows (8 for quantized
/// panels, whose expansion needs registers of its own). Each output is still one chain of
/// multiply-adds in the order of its columns, so the bits do not depend on the row count.
const F32_MAX_B: usize = 12;
/// Input rows kept in cache while every panel of a task passes over them: 264 for inputs of
/// at most 1024 columns (≤ 1.1 MB), 132 up to 2048 columns, 64 above. The larger blocks
/// stream a large matrix (the 49152-row output head) from memory fewer times; multiples of
/// 12 (and of 8 and 4) leave no short kernel call inside a block.
pub static TMPXB: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
fn x_block(cols: usize) -> usize {
    let t = TMPXB.load(std::sync::atomic::Ordering::Relaxed);
    if t > 0 {
        return t;
    }
    match cols {
        0..=1024 => 264,
        1025..=2048 => 132,
        _ => 64,
    }
}
/// From this many input rows on, quantized panels are expanded to f32 once per row block.
const EXPAND_MIN_ROWS: usize = 16;

/// Which instruction set the kernels use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Avx512,
    /// AVX2 with FMA and F16C: the same values for weight products, about half the vector
    /// width.
    Avx2,
}

static PREFER_AVX2: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn detected() -> Option<Level> {
    static LEVEL: std::sync::OnceLock<Option<Level>> = std::sync::OnceLock::new();
    *LEVEL.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return Some(Level::Avx512);
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
                && std::arch::is_x86_feature_detected!("f16c")
            {
                return Some(Level::Avx2);
            }
        }
        None
    })
}

/// The instruction set the kernels run with on this CPU, if any.
pub fn level() -> Option<Level> {
    match detected() {
        Some(Level::Avx512) if PREFER_AVX2.load(std::sync::atomic::Ordering::Relaxed) => {
            Some(Level::Avx2)
        }
        d => d,
    }
}

/// Runs the AVX2 kernels even on a CPU with AVX-512, for the whole process (to compare the
/// two). Takes effect for products started afterwards.
pub fn prefer_avx2(on: bool) {
    PREFER_AVX2.store(on, std::sync::atomic::Ordering::Relaxed);
}

static NO_AMX: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether BF16 panels are multiplied on AMX tiles (AVX-512 with AMX-BF16, and the OS grants
/// the tile state; see the `amx` module). Their products then agree with the vector
/// kernels' within f32 rounding, not bit for bit. `KD_NO_AMX=1` in the environment, or
/// [`allow_amx`]`(false)`, keeps every product on the vector kernels.
pub fn amx() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static ENV_OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let env_off =
            *ENV_OFF.get_or_init(|| std::env::var_os("KD_NO_AMX").is_some_and(|v| v == "1"));
        level() == Some(Level::Avx512)
            && !env_off
            && !NO_AMX.load(std::sync::atomic::Ordering::Relaxed)
            && amx::detected()
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Allows (the default) or forbids AMX products for the whole process; takes effect for
/// products started afterwards.
pub fn allow_amx(on: bool) {
    NO_AMX.store(!on, std::sync::atomic::Ordering::Relaxed);
}

/// Whether this CPU runs these kernels (AVX-512F, or AVX2 with FMA and F16C).
pub fn supported() -> bool {
    level().is_some()
}

/// How a panel holds its weights: the GGUF quantization it came from, or 16/32-bit floats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PanelFormat {
    Q40,
    Q41,
    Q80,
    F32,
    F16,
    BF16,
    Q4K,
    Q5K,
    Q6K,
}

/// K-quant panel layout, per 16 rows × 256 columns (one GGUF super-block per row): a header
/// with the rows' super-block scales as f32 (`d`, and `dmin` for Q4_K/Q5_K), then for each of
/// the eight 32-column sub-blocks its 16 rows' 6-bit scales and minimums (Q6_K: the two
/// 16-column scales) as bytes, the low four bits of the quants in column pairs (i, i + 16)
/// as Q4_1 keeps them, and the quants' high bits (Q5_K: one, Q6_K: two per column).
const K_SUBS: usize = 8;
const fn k_header(f: PanelFormat) -> usize {
    match f {
        PanelFormat::Q6K => 4 * PANEL,
        _ => 8 * PANEL,
    }
}
const fn k_sub(f: PanelFormat) -> usize {
    2 * PANEL
        + PANEL * QK / 2
        + match f {
            PanelFormat::Q5K => 4 * PANEL,
            PanelFormat::Q6K => 8 * PANEL,
            _ => 0,
        }
}

impl PanelFormat {
    /// Bytes of one 16-row × 32-column block in panel layout (K-quants: an eighth of a
    /// 256-column super-block, header included).
    const fn block_bytes(self) -> usize {
        match self {
            PanelFormat::Q40 => 4 * PANEL + PANEL * QK / 2,
            PanelFormat::Q41 => 8 * PANEL + PANEL * QK / 2,
            PanelFormat::Q80 => 4 * PANEL + PANEL * QK,
            PanelFormat::F32 => 4 * PANEL * QK,
            PanelFormat::F16 | PanelFormat::BF16 => 2 * PANEL * QK,
            PanelFormat::Q4K | PanelFormat::Q5K | PanelFormat::Q6K => {
                (k_header(self) + K_SUBS * k_sub(self)) / K_SUBS
            }
        }
    }

    /// Bytes of one 16-row super-block (K-quants), or of one block (the others).
    const fn superblock_bytes(self) -> usize {
        self.block_bytes() * self.blocks_per_superblock()
    }

    /// 32-column blocks per super-block: 8 for K-quants, else 1.
    const fn blocks_per_superblock(self) -> usize {
        match self {
            PanelFormat::Q4K | PanelFormat::Q5K | PanelFormat::Q6K => K_SUBS,
            _ => 1,
        }
    }

    /// Columns of one GGUF block and its bytes, per row.
    const fn ggml_block(self) -> (usize, usize) {
        match self {
            PanelFormat::Q40 => (32, 18),
            PanelFormat::Q41 => (32, 20),
            PanelFormat::Q80 => (32, 34),
            PanelFormat::F32 => (1, 4),
            PanelFormat::F16 | PanelFormat::BF16 => (1, 2),
            PanelFormat::Q4K => (256, 144),
            PanelFormat::Q5K => (256, 176),
            PanelFormat::Q6K => (256, 210),
        }
    }

    /// Whether the format keeps floats (any width), so that a row need not fill whole blocks.
    const fn is_float(self) -> bool {
        matches!(
            self,
            PanelFormat::F32 | PanelFormat::F16 | PanelFormat::BF16
        )
    }

    /// The panel format for a GGML type, if there is one; other types are expanded to f32.
    pub fn of_ggml(dt: GgmlDType) -> Option<Self> {
        Some(match dt {
            GgmlDType::Q4_0 => PanelFormat::Q40,
            GgmlDType::Q4_1 => PanelFormat::Q41,
            GgmlDType::Q8_0 => PanelFormat::Q80,
            GgmlDType::F32 => PanelFormat::F32,
            GgmlDType::F16 => PanelFormat::F16,
            GgmlDType::BF16 => PanelFormat::BF16,
            GgmlDType::Q4K => PanelFormat::Q4K,
            GgmlDType::Q5K => PanelFormat::Q5K,
            GgmlDType::Q6K => PanelFormat::Q6K,
            _ => return None,
        })
    }

    /// Whether a `cols`-wide row of this format can be panelled.
    fn fits(self, cols: usize) -> bool {
        self.is_float() || cols % self.ggml_block().0 == 0
    }

    /// Bytes of a `[rows, cols]` matrix in panel layout.
    pub fn panel_bytes(self, rows: usize, cols: usize) -> usize {
        rows.div_ceil(PANEL) * cols.div_ceil(QK) * self.block_bytes()
    }

    const fn of_code(f: u8) -> PanelFormat {
        match f {
            0 => PanelFormat::Q40,
            1 => PanelFormat::Q41,
            2 => PanelFormat::Q80,
            3 => PanelFormat::F32,
            4 => PanelFormat::F16,
            5 => PanelFormat::BF16,
            6 => PanelFormat::Q4K,
            7 => PanelFormat::Q5K,
            _ => PanelFormat::Q6K,
        }
    }
}

/// Bytes that outlive any matrix reading them in place: a weight file's map.
pub type SharedBytes = std::sync::Arc<dyn AsRef<[u8]> + Send + Sync>;

/// A weight matrix as a file stores it: `rows` rows of `cols` values in a GGML type's bytes
/// (GGUF blocks, or little-endian F32/F16/BF16 as safetensors also stores them).
#[derive(Clone, Copy)]
pub struct RawMatrix<'a> {
    pub dtype: GgmlDType,
    pub rows: usize,
    pub cols: usize,
    pub bytes: &'a [u8],
    /// The map that `bytes` lie in, when the matrix may keep reading them there instead of
    /// holding a packed copy (see [`RawMatrix::reads_in_place`]).
    pub map: Option<&'a SharedBytes>,
}

impl RawMatrix<'_> {
    /// Bytes of one row in the file.
    fn row_bytes(&self) -> usize {
        self.cols / self.dtype.block_size() * self.dtype.type_size()
    }

    /// Whether [`PanelMatrix::stack_raw`] reads this matrix from its map rather than packing
    /// it: BF16 rows in whole 16-row tiles and 32-column blocks, a map given, and AMX tiles
    /// to multiply them on. The caller must keep such bytes mapped (not release their pages).
    pub fn reads_in_place(&self) -> bool {
        self.dtype == GgmlDType::BF16
            && self.rows % PANEL == 0
            && self.cols % QK == 0
            && self.rows * self.cols * 2 == self.bytes.len()
            && self.map.is_some_and(|m| {
                let base = m.as_ref().as_ref().as_ptr() as usize;
                let at = self.bytes.as_ptr() as usize;
                at >= base && at + self.bytes.len() <= base + m.as_ref().as_ref().len()
            })
            && amx()
    }
}

/// A `[rows, cols]` weight matrix in panel layout; see the module documentation. Matrices
/// stacked from parts of different formats (q, k and v of a Q4_K_M file) keep one segment of
/// rows per format run, each in its own bytes.
pub struct PanelMatrix {
    rows: usize,
    cols: usize,
    segments: Vec<Segment>,
}

/// Consecutive rows `row0..row0 + rows` of a [`PanelMatrix`] in one format.
struct Segment {
    format: PanelFormat,
    row0: usize,
    rows: usize,
    /// Blocks per row: `cols / 32`, rounded up for float formats (zero weights pad the tail).
    blocks: usize,
    data: Storage,
}

/// Where a segment's weights are: its own panels, or BF16 rows read in place from a map.
enum Storage {
    Panels(Vec<u8>),
    Rows {
        map: SharedBytes,
        start: usize,
        len: usize,
    },
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Storage::Panels(v) => v,
            Storage::Rows { map, start, len } => &map.as_ref().as_ref()[*start..*start + *len],
        }
    }

    fn is_rows(&self) -> bool {
        matches!(self, Storage::Rows { .. })
    }
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    half::f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

fn bf16_at(b: &[u8], at: usize) -> f32 {
    half::bf16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// The 6-bit scale and minimum of sub-block `j` of a Q4_K/Q5_K super-block (GGML's
/// `get_scale_min_k4`).
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Writes row `r` (0..16) of one panel group: `src` holds the row in the file's bytes.
fn pack_row(format: PanelFormat, cols: usize, blocks: usize, src: &[u8], r: usize, dst: &mut [u8]) {
    let bb = format.block_bytes();
    let put_f32 =
        |dst: &mut [u8], at: usize, v: f32| dst[at..at + 4].copy_from_slice(&v.to_le_bytes());
    match format {
        PanelFormat::F32 | PanelFormat::F16 => {
            let w = if format == PanelFormat::F32 { 4 } else { 2 };
            for c in 0..cols {
                let (j, i) = (c / QK, c % QK);
                let at = j * bb + w * (i * PANEL + r);
                dst[at..at + w].copy_from_slice(&src[c * w..(c + 1) * w]);
            }
        }
        // Column pairs (2i, 2i + 1) side by side per row, as AMX tiles read them.
        PanelFormat::BF16 => {
            for c in 0..cols {
                let (j, i) = (c / QK, c % QK);
                let at = j * bb + 2 * ((i / 2) * 2 * PANEL + 2 * r + i % 2);
                dst[at..at + 2].copy_from_slice(&src[2 * c..2 * c + 2]);
            }
        }
        PanelFormat::Q40 | PanelFormat::Q41 | PanelFormat::Q80 => {
            let (offset_at, quants) = match format {
                PanelFormat::Q41 => (Some(4 * PANEL), 8 * PANEL),
                _ => (None, 4 * PANEL),
            };
            let nq = if format == PanelFormat::Q80 {
                QK
            } else {
                QK / 2
            };
            let gb = format.ggml_block().1;
            for j in 0..blocks {
                let src = &src[j * gb..(j + 1) * gb];
                let dst = &mut dst[j * bb..(j + 1) * bb];
                put_f32(dst, 4 * r, f16_at(src, 0));
                if let Some(at) = offset_at {
                    put_f32(dst, at + 4 * r, f16_at(src, 2));
                }
                for (i, &q) in src[src.len() - nq..].iter().enumerate() {
                    dst[quants + i * PANEL + r] = q;
                }
            }
        }
        PanelFormat::Q4K | PanelFormat::Q5K | PanelFormat::Q6K => {
            let gb = format.ggml_block().1;
            let sbb = format.superblock_bytes();
            let (head, sub) = (k_header(format), k_sub(format));
            for t in 0..blocks / K_SUBS {
                let src = &src[t * gb..(t + 1) * gb];
                let sb = &mut dst[t * sbb..(t + 1) * sbb];
                // The 256 quants as unsigned integers, and each sub-block's two scale bytes.
                let mut q = [0u8; 256];
                let mut scales = [[0u8; 2]; K_SUBS];
                match format {
                    PanelFormat::Q6K => {
                        let (ql, qh, sc) = (&src[..128], &src[128..192], &src[192..208]);
                        put_f32(sb, 4 * r, f16_at(src, 208));
                        for h in 0..2 {
                            for l in 0..32 {
                                let (a, b, hb) =
                                    (ql[64 * h + l], ql[64 * h + l + 32], qh[32 * h + l]);
                                let n = 128 * h + l;
                                q[n] = (a & 0xF) | ((hb & 3) << 4);
                                q[n + 32] = (b & 0xF) | (((hb >> 2) & 3) << 4);
                                q[n + 64] = (a >> 4) | (((hb >> 4) & 3) << 4);
                                q[n + 96] = (b >> 4) | (((hb >> 6) & 3) << 4);
                            }
                        }
                        for (s, pair) in scales.iter_mut().enumerate() {
                            *pair = [sc[2 * s], sc[2 * s + 1]];
                        }
                    }
                    _ => {
                        put_f32(sb, 4 * r, f16_at(src, 0));
                        put_f32(sb, 4 * PANEL + 4 * r, f16_at(src, 2));
                        let sc = &src[4..16];
                        let (qh, qs) = if format == PanelFormat::Q5K {
                            (Some(&src[16..48]), &src[48..176])
                        } else {
                            (None, &src[16..144])
                        };
                        for (s, pair) in scales.iter_mut().enumerate() {
                            let (d, m) = scale_min_k4(s, sc);
                            *pair = [d, m];
                            for l in 0..32 {
                                let byte = qs[32 * (s / 2) + l];
                                let nib = if s % 2 == 0 { byte & 0xF } else { byte >> 4 };
                                let high = qh.map_or(0, |qh| (qh[l] >> s) & 1);
                                q[32 * s + l] = nib | (high << 4);
                            }
                        }
                    }
                }
                for (s, pair) in scales.iter().enumerate() {
                    let d = &mut sb[head + s * sub..head + (s + 1) * sub];
                    d[r] = pair[0];
                    d[PANEL + r] = pair[1];
                    let qs = &q[32 * s..32 * (s + 1)];
                    for i in 0..QK / 2 {
                        d[2 * PANEL + i * PANEL + r] = (qs[i] & 0xF) | ((qs[i + 16] & 0xF) << 4);
                    }
                    let hi = 2 * PANEL + PANEL * QK / 2;
                    match format {
                        // Pair i's two high bits at bits 2·(i / 4) of byte i % 4.
                        PanelFormat::Q5K => {
                            for i in 0..QK / 2 {
                                let h = (qs[i] >> 4) | ((qs[i + 16] >> 4) << 1);
                                d[hi + (i % 4) * PANEL + r] |= h << (2 * (i / 4));
                            }
                        }
                        // Pair i's four high bits at bits 4·(i / 8) of byte i % 8.
                        PanelFormat::Q6K => {
                            for i in 0..QK / 2 {
                                let h = (qs[i] >> 4) | ((qs[i + 16] >> 4) << 2);
                                d[hi + (i % 8) * PANEL + r] |= h << (4 * (i / 8));
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
    }
}

/// Asks Linux to back the whole 2 MiB pages inside `buf` with transparent huge pages, before
/// they are first written. A teacher's panels are streamed from memory at every decoding
/// step, and on 2 MiB pages the products miss the TLB less (a 1.1B bf16 dump's generation ran
/// 1.04–1.08× faster than on 4 KiB pages, in interleaved runs on a 2-core Xeon).
fn huge_pages(buf: &mut [u8]) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let at = buf.as_mut_ptr() as usize;
        let start = at.div_ceil(HUGE) * HUGE;
        let end = (at + buf.len()) / HUGE * HUGE;
        if end > start {
            // SAFETY: the range lies inside `buf`; MADV_HUGEPAGE changes only how its pages
            // are backed, never their contents.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
        }
    }
}

/// Notes, once per type and process, that a GGML type without a panel format is expanded.
fn note_expanded(dt: GgmlDType) {
    static SEEN: std::sync::Mutex<Vec<GgmlDType>> = std::sync::Mutex::new(Vec::new());
    let mut seen = SEEN.lock().unwrap_or_else(|e| e.into_inner());
    if !seen.contains(&dt) {
        seen.push(dt);
        eprintln!(
            "note: {dt:?} weights have no panel format here; they are expanded to f32 \
             ({:.1}× their size in memory)",
            32.0 / (dt.type_size() as f64 * 8.0 / dt.block_size() as f64)
        );
    }
}

impl Segment {
    /// Packs rows of one format; `row(i)` gives row i's bytes in the file's layout.
    fn pack<'a>(
        format: PanelFormat,
        row0: usize,
        rows: usize,
        cols: usize,
        row: impl Fn(usize) -> &'a [u8] + Sync,
    ) -> Self {
        let blocks = cols.div_ceil(QK);
        let gbytes = blocks * format.block_bytes();
        let mut data = vec![0u8; rows.div_ceil(PANEL) * gbytes];
        huge_pages(&mut data);
        if gbytes > 0 {
            data.par_chunks_mut(gbytes)
                .enumerate()
                .for_each(|(g, dst)| {
                    for r in 0..PANEL.min(rows - g * PANEL) {
                        pack_row(format, cols, blocks, row(g * PANEL + r), r, dst);
                    }
                });
        }
        Self {
            format,
            row0,
            rows,
            blocks,
            data: Storage::Panels(data),
        }
    }

    /// A BF16 matrix read in place; `m.reads_in_place()` held.
    fn in_place(m: &RawMatrix<'_>, row0: usize) -> Self {
        let map = m.map.expect("a map");
        let start = m.bytes.as_ptr() as usize - map.as_ref().as_ref().as_ptr() as usize;
        Self {
            format: PanelFormat::BF16,
            row0,
            rows: m.rows,
            blocks: m.cols / QK,
            data: Storage::Rows {
                map: map.clone(),
                start,
                len: m.bytes.len(),
            },
        }
    }
}

impl PanelMatrix {
    /// Repacks a 2-D tensor; see [`PanelMatrix::stack_raw`].
    pub fn from_qtensor(t: &QTensor) -> candle_core::Result<Self> {
        Self::stack(&[t])
    }

    /// An f32 matrix, row-major `[rows, cols]`. Columns past `cols` in the last block, and
    /// rows past `rows` in the last panel, hold zero weights.
    pub fn from_f32(w: &[f32], rows: usize, cols: usize) -> Self {
        assert_eq!(w.len(), rows * cols, "weight shape");
        // SAFETY: any initialised f32 storage is valid as bytes, with a smaller alignment.
        let bytes = unsafe { std::slice::from_raw_parts(w.as_ptr() as *const u8, w.len() * 4) };
        let seg = Segment::pack(PanelFormat::F32, 0, rows, cols, |r| {
            &bytes[r * cols * 4..(r + 1) * cols * 4]
        });
        Self {
            rows,
            cols,
            segments: vec![seg],
        }
    }

    /// Stacks matrices with the same number of columns along the rows (e.g. q, k and v into
    /// one product), each kept in its own format; see [`PanelMatrix::stack_raw`].
    pub fn stack(parts: &[&QTensor]) -> candle_core::Result<Self> {
        let mut data = Vec::with_capacity(parts.len());
        for p in parts {
            let &[rows, cols] = p.shape().dims() else {
                candle_core::bail!("a weight matrix must be 2-D, found {:?}", p.shape());
            };
            data.push((p.dtype(), rows, cols, p.data()?));
        }
        let raw: Vec<RawMatrix> = data
            .iter()
            .map(|(dtype, rows, cols, bytes)| RawMatrix {
                dtype: *dtype,
                rows: *rows,
                cols: *cols,
                bytes,
                map: None,
            })
            .collect();
        Self::stack_raw(&raw)
    }

    /// Stacks matrices in their files' bytes along the rows. Each part keeps its blocks when
    /// its type has a panel format (F32, F16, BF16, Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K) and
    /// its rows fill whole blocks; any other part is dequantized by candle and kept in f32
    /// (noted once per type). Neighbouring parts of one format share a segment, except parts
    /// read in place ([`RawMatrix::reads_in_place`]), which are a segment each.
    pub fn stack_raw(parts: &[RawMatrix<'_>]) -> candle_core::Result<Self> {
        let cols = parts.first().map_or(0, |p| p.cols);
        let mut rows = 0;
        let mut segments: Vec<Segment> = Vec::new();
        let mut i = 0;
        while i < parts.len() {
            let p = &parts[i];
            if p.cols != cols {
                candle_core::bail!("stacked matrices differ in columns");
            }
            let expected = p.rows * p.row_bytes();
            if p.cols % p.dtype.block_size() != 0 || p.bytes.len() != expected {
                candle_core::bail!(
                    "{} bytes for a {}x{} {:?} matrix",
                    p.bytes.len(),
                    p.rows,
                    cols,
                    p.dtype
                );
            }
            if p.reads_in_place() {
                segments.push(Segment::in_place(p, rows));
                rows += p.rows;
                i += 1;
                continue;
            }
            let format = PanelFormat::of_ggml(p.dtype).filter(|f| f.fits(cols));
            let Some(format) = format else {
                note_expanded(p.dtype);
                let q = candle_core::quantized::ggml_file::qtensor_from_ggml(
                    p.dtype,
                    p.bytes,
                    vec![p.rows, cols],
                    &candle_core::Device::Cpu,
                )?;
                let w: Vec<f32> = q
                    .dequantize(&candle_core::Device::Cpu)?
                    .flatten_all()?
                    .to_vec1()?;
                let mut seg = Self::from_f32(&w, p.rows, cols).segments.remove(0);
                seg.row0 = rows;
                rows += p.rows;
                segments.push(seg);
                i += 1;
                continue;
            };
            // This part and the following parts of the same format, as one run of rows.
            let mut run = vec![p];
            while let Some(q) = parts.get(i + run.len()) {
                if q.cols != cols
                    || PanelFormat::of_ggml(q.dtype) != Some(format)
                    || q.reads_in_place()
                {
                    break;
                }
                if q.bytes.len() != q.rows * q.row_bytes() {
                    break; // the loop's next round reports it
                }
                run.push(q);
            }
            let n: usize = run.iter().map(|q| q.rows).sum();
            let rb = p.row_bytes();
            let starts: Vec<usize> = run
                .iter()
                .scan(0, |acc, q| {
                    let s = *acc;
                    *acc += q.rows;
                    Some(s)
                })
                .collect();
            let row = |r: usize| {
                let k = starts.partition_point(|&s| s <= r) - 1;
                let local = r - starts[k];
                &run[k].bytes[local * rb..(local + 1) * rb]
            };
            segments.push(Segment::pack(format, rows, n, cols, row));
            rows += n;
            i += run.len();
        }
        Ok(Self {
            rows,
            cols,
            segments,
        })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The format of the first segment (of every row, unless the matrix was stacked from
    /// parts of several formats).
    pub fn format(&self) -> PanelFormat {
        self.segments.first().map_or(PanelFormat::F32, |s| s.format)
    }

    /// The formats of the segments, in row order.
    pub fn formats(&self) -> Vec<PanelFormat> {
        self.segments.iter().map(|s| s.format).collect()
    }

    /// Each segment's format and bytes.
    pub fn format_bytes(&self) -> Vec<(PanelFormat, usize)> {
        self.segments
            .iter()
            .map(|s| (s.format, s.data.bytes().len()))
            .collect()
    }

    /// Bytes of the weights: the panels', and those read in place from a map.
    pub fn bytes(&self) -> usize {
        self.segments.iter().map(|s| s.data.bytes().len()).sum()
    }

    /// Bytes read in place from a map (part of [`PanelMatrix::bytes`]).
    pub fn bytes_in_place(&self) -> usize {
        self.segments
            .iter()
            .filter(|s| s.data.is_rows())
            .map(|s| s.data.bytes().len())
            .sum()
    }

    fn view<'a>(&'a self, s: &'a Segment) -> PanelView<'a> {
        let in_rows = s.data.is_rows();
        PanelView {
            format: s.format,
            rows: s.rows,
            cols: self.cols,
            blocks: s.blocks,
            group_bytes: if in_rows {
                PANEL * self.cols * 2
            } else {
                s.blocks * s.format.block_bytes()
            },
            data: s.data.bytes(),
            y_stride: self.rows,
            y_col0: s.row0,
            in_rows,
        }
    }

    /// `y = x · Wᵀ` for `x` `[n, cols]` row-major; `y` is `[n, rows]` row-major. Runs on the
    /// rayon pool, split over output rows.
    pub fn matmul_into(&self, x: &[f32], n: usize, y: &mut [f32]) {
        for s in &self.segments {
            self.view(s).par_matmul(x, n, y, false);
        }
    }

    /// Allocating form of [`PanelMatrix::matmul_into`].
    pub fn matmul(&self, x: &[f32], n: usize) -> Vec<f32> {
        let mut y = vec![0f32; n * self.rows];
        self.matmul_into(x, n, &mut y);
        y
    }

    /// Row `r` as f32: the values `dequantize` gives (an embedding lookup).
    pub fn row_into(&self, r: usize, out: &mut [f32]) {
        assert!(
            r < self.rows && out.len() == self.cols,
            "row {r} of {}",
            self.rows
        );
        let s = self
            .segments
            .iter()
            .find(|s| (s.row0..s.row0 + s.rows).contains(&r))
            .expect("every row lies in a segment");
        let local = r - s.row0;
        if s.data.is_rows() {
            let row = &s.data.bytes()[local * self.cols * 2..];
            for (c, o) in out.iter_mut().enumerate() {
                *o = bf16_at(row, 2 * c);
            }
            return;
        }
        let (g, i) = (local / PANEL, local % PANEL);
        let gb = s.blocks * s.format.block_bytes();
        let panel = &s.data.bytes()[g * gb..(g + 1) * gb];
        if s.format == PanelFormat::F32 {
            for (c, o) in out.iter_mut().enumerate() {
                let at = (c / QK) * s.format.block_bytes() + 4 * ((c % QK) * PANEL + i);
                *o = f32::from_le_bytes(panel[at..at + 4].try_into().unwrap());
            }
            return;
        }
        let mut buf = vec![0f32; s.blocks * QK * PANEL];
        expand_panel(s.format, panel, s.blocks, &mut buf);
        for (c, o) in out.iter_mut().enumerate() {
            *o = buf[(c / QK) * QK * PANEL + (c % QK) * PANEL + i];
        }
    }
}

/// Expands one panel group (`blocks` blocks of `format`) into f32 panel layout in `dst`.
fn expand_panel(format: PanelFormat, src: &[u8], blocks: usize, dst: &mut [f32]) {
    assert!(
        supported(),
        "panel products need AVX-512F or AVX2 with FMA and F16C"
    );
    assert!(src.len() >= blocks * format.block_bytes() && dst.len() >= blocks * QK * PANEL);
    // SAFETY: the sizes were checked above, and so were the CPU's features.
    unsafe {
        if level() == Some(Level::Avx2) {
            avx2::expand_panel(format, src.as_ptr(), blocks, dst)
        } else {
            simd::expand_panel(format, src.as_ptr(), blocks, dst)
        }
    }
}

/// Expands 16 BF16 rows as a file stores them (`cols` values each, a multiple of 32) into
/// one f32 panel in `dst`: the values [`expand_panel`] gives for the same rows' BF16 panel.
fn expand_bf16_rows(src: &[u8], cols: usize, dst: &mut [f32]) {
    for (r, row) in src.chunks_exact(2 * cols).enumerate() {
        for c in 0..cols {
            dst[(c / QK) * QK * PANEL + (c % QK) * PANEL + r] = bf16_at(row, 2 * c);
        }
    }
}

/// An f32 matrix packed into panel layout in a buffer reused from one product to the next.
///
/// The training engine multiplies by weights that change every step, by their transposes and
/// by activations, so it packs on every product: the three shapes of a training step,
/// `X·Wᵀ`, `dY·W` and `dYᵀ·X`, are all `x · Mᵀ` products with `M` packed from a row-major
/// source or from its transpose. Packing reads and writes the matrix once; the product that
/// follows does `2·rows` multiply-adds per packed value.
#[derive(Default)]
pub struct PackedF32 {
    data: Vec<f32>,
    rows: usize,
    cols: usize,
}

impl PackedF32 {
    pub fn new() -> Self {
        Self::default()
    }

    /// Floats of one panel (16 rows) of a matrix with `cols` columns.
    fn panel_floats(cols: usize) -> usize {
        cols.div_ceil(QK) * QK * PANEL
    }

    /// Floats this buffer needs for a `[rows, cols]` matrix.
    pub fn floats_for(rows: usize, cols: usize) -> usize {
        rows.div_ceil(PANEL) * Self::panel_floats(cols)
    }

    /// Reserves room for a `[rows, cols]` matrix, so that packing it later allocates nothing.
    pub fn reserve(&mut self, rows: usize, cols: usize) {
        let need = Self::floats_for(rows, cols);
        self.data.reserve(need.saturating_sub(self.data.len()));
    }

    /// Bytes held.
    pub fn capacity_bytes(&self) -> usize {
        self.data.capacity() * 4
    }

    /// Packs `M [rows, cols]` from `src`: row-major `M` (`src[r·cols + c]`), or with
    /// `transposed` row-major `Mᵀ` (`src[c·rows + r]`, a `[cols, rows]` matrix).
    pub fn pack(&mut self, src: &[f32], rows: usize, cols: usize, transposed: bool) {
        self.pack_with(src, rows, cols, transposed, true);
    }

    /// [`PackedF32::pack`] on the calling thread.
    pub fn pack_serial(&mut self, src: &[f32], rows: usize, cols: usize, transposed: bool) {
        self.pack_with(src, rows, cols, transposed, false);
    }

    fn pack_with(&mut self, src: &[f32], rows: usize, cols: usize, transposed: bool, par: bool) {
        assert_eq!(src.len(), rows * cols, "matrix shape");
        let pf = Self::panel_floats(cols);
        self.data.clear();
        self.data.resize(rows.div_ceil(PANEL) * pf, 0.0);
        (self.rows, self.cols) = (rows, cols);
        if rows == 0 || cols == 0 {
            return;
        }
        let one = |(g, panel): (usize, &mut [f32])| {
            let r0 = g * PANEL;
            let nr = (rows - r0).min(PANEL);
            if transposed {
                for c in 0..cols {
                    let at = (c / QK) * QK * PANEL + (c % QK) * PANEL;
                    panel[at..at + nr].copy_from_slice(&src[c * rows + r0..][..nr]);
                }
            } else {
                for r in 0..nr {
                    let row = &src[(r0 + r) * cols..][..cols];
                    for (c, &x) in row.iter().enumerate() {
                        panel[(c / QK) * QK * PANEL + (c % QK) * PANEL + r] = x;
                    }
                }
            }
        };
        if par {
            self.data.par_chunks_mut(pf).enumerate().for_each(one);
        } else {
            self.data.chunks_mut(pf).enumerate().for_each(one);
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    fn view(&self) -> PanelView<'_> {
        PanelView::f32(
            &self.data,
            self.rows,
            self.cols,
            Self::panel_floats(self.cols),
        )
    }

    /// `y = x · Mᵀ` (or `y += x · Mᵀ` with `acc`) for `x` `[n, cols]`, `y` `[n, rows]`, on
    /// the rayon pool. Each output element is summed over the columns in one fixed order.
    pub fn matmul_into(&self, x: &[f32], n: usize, y: &mut [f32], acc: bool) {
        self.view().par_matmul(x, n, y, acc);
    }

    /// [`PackedF32::matmul_into`] on the calling thread (for callers that are already
    /// parallel), with the same values.
    pub fn matmul_serial(&self, x: &[f32], n: usize, y: &mut [f32], acc: bool) {
        self.view().matmul_serial(x, n, y, acc);
    }
}

/// A panel-layout matrix over borrowed storage, whose panels may sit further apart than
/// their length (`group_bytes`): a KV cache grows its panels in place.
#[derive(Clone, Copy)]
pub struct PanelView<'a> {
    format: PanelFormat,
    rows: usize,
    cols: usize,
    blocks: usize,
    group_bytes: usize,
    data: &'a [u8],
    /// Floats per output row, and the first output column this matrix writes (a segment of
    /// a stacked matrix writes its own columns of the whole product).
    y_stride: usize,
    y_col0: usize,
    /// BF16 rows as the file stores them, 16-row groups `group_bytes` apart, rather than
    /// panels.
    in_rows: bool,
}

impl<'a> PanelView<'a> {
    /// An f32 panel matrix `[rows, cols]` whose panels start every `group_floats` floats.
    pub fn f32(data: &'a [f32], rows: usize, cols: usize, group_floats: usize) -> Self {
        // SAFETY: any initialised f32 storage is valid as bytes, with a smaller alignment.
        let bytes =
            unsafe { std::slice::from_raw_parts(data.as_ptr() as *const u8, data.len() * 4) };
        Self {
            format: PanelFormat::F32,
            rows,
            cols,
            blocks: cols.div_ceil(QK),
            group_bytes: group_floats * 4,
            data: bytes,
            y_stride: rows,
            y_col0: 0,
            in_rows: false,
        }
    }

    pub fn check(&self, x: &[f32], n: usize, y: &[f32]) {
        assert!(supported(), "panel products need AVX-512F or AVX2 with FMA");
        assert_eq!(x.len(), n * self.cols, "input shape");
        assert!(self.y_col0 + self.rows <= self.y_stride, "output columns");
        assert_eq!(y.len(), n * self.y_stride, "output shape");
        let groups = self.rows.div_ceil(PANEL);
        if self.in_rows {
            assert!(
                self.format == PanelFormat::BF16
                    && self.rows % PANEL == 0
                    && self.cols == self.blocks * QK
                    && self.group_bytes == PANEL * self.cols * 2
                    && self.data.len() >= self.rows * self.cols * 2,
                "BF16 rows storage"
            );
        } else if groups > 0 {
            assert!(
                self.blocks * self.format.block_bytes() <= self.group_bytes
                    && (groups - 1) * self.group_bytes + self.blocks * self.format.block_bytes()
                        <= self.data.len(),
                "panel storage too small"
            );
        }
    }

    /// `y = x · Wᵀ` (or `y += x · Wᵀ` with `acc`) on the rayon pool, split over output rows.
    /// Each output element is summed in the same order whatever the thread count.
    pub fn par_matmul(&self, x: &[f32], n: usize, y: &mut [f32], acc: bool) {
        self.check(x, n, y);
        if n == 0 {
            return;
        }
        if !self.on_tiles(x, n, y, acc, true) {
            self.par_matmul_vector(x, n, y, acc);
        }
    }

    /// The product on AMX tiles where this view's panels are BF16 and [`amx`] allows it (after
    /// `check`, for `n` > 0); false, with nothing written, where the vector kernels compute it.
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
    fn on_tiles(&self, x: &[f32], n: usize, y: &mut [f32], acc: bool, parallel: bool) -> bool {
        #[cfg(target_arch = "x86_64")]
        if self.format == PanelFormat::BF16 && amx() {
            // SAFETY: the caller's `check` passed and `amx()` found the tiles.
            unsafe { amx::matmul(self, x, n, SendPtr(y.as_mut_ptr()), acc, parallel) };
            return true;
        }
        false
    }

    /// [`PanelView::par_matmul`] on the vector kernels only (after `check`, for `n` > 0).
    fn par_matmul_vector(&self, x: &[f32], n: usize, y: &mut [f32], acc: bool) {
        let groups = self.rows.div_ceil(PANEL);
        let pairs = groups.div_ceil(2);
        let threads = rayon::current_num_threads().max(1);
        let out = SendPtr(y.as_mut_ptr());
        // Tasks split the panels, so every task reads all of x. When x is much larger than
        // the matrix (a head gradient: 49152 rows of x against 576 rows of W), split x's
        // rows instead, so that each task reads its share of x once and re-reads only the
        // small matrix. Each output is the same sequence of multiply-adds either way.
        let xb = x_block(self.cols);
        if n >= 4 * self.rows && n >= 2 * threads * xb {
            let blocks = n.div_ceil(xb);
            let per = blocks.div_ceil((threads * 4).min(blocks)) * xb;
            let (cols, stride) = (self.cols, self.y_stride);
            (0..n.div_ceil(per)).into_par_iter().for_each(|t| {
                let (r0, r1) = (t * per, ((t + 1) * per).min(n));
                // SAFETY: task t writes only rows [r0, r1) of y, disjoint from every other
                // task's; `y` outlives the parallel loop; `check` passed for all n rows.
                unsafe {
                    self.task(
                        &x[r0 * cols..r1 * cols],
                        r1 - r0,
                        out.offset(r0 * stride),
                        0,
                        groups,
                        acc,
                    )
                };
            });
            return;
        }
        // A few tasks per thread for balance, each a whole number of panel pairs.
        let tasks = (threads * 4).min(pairs).max(1);
        let per = pairs.div_ceil(tasks);
        (0..pairs.div_ceil(per)).into_par_iter().for_each(|t| {
            let g0 = t * per * 2;
            let g1 = ((t + 1) * per * 2).min(groups);
            // SAFETY: task t writes only columns [g0*16, g1*16) ∩ [0, rows) of y, disjoint
            // from every other task's; `y` outlives the parallel loop; `check` passed.
            unsafe { self.task(x, n, out, g0, g1, acc) };
        });
    }

    /// `y = x · Wᵀ` (or `y += x · Wᵀ` with `acc`) on the calling thread.
    pub fn matmul_serial(&self, x: &[f32], n: usize, y: &mut [f32], acc: bool) {
        self.check(x, n, y);
        if n > 0 && self.on_tiles(x, n, y, acc, false) {
            return;
        }
        // SAFETY: `check` bounds every panel, input row and output row; this thread alone
        // holds `y`.
        unsafe {
            self.task(
                x,
                n,
                SendPtr(y.as_mut_ptr()),
                0,
                self.rows.div_ceil(PANEL),
                acc,
            )
        };
    }

    /// Panels `g0..g1` against every input row.
    ///
    /// # Safety
    /// [`PanelView::check`] passed for `x`, `n` and the `[n, rows]` buffer `y` points to, of
    /// which this call writes only the columns of panels `g0..g1`, which no other thread
    /// writes.
    unsafe fn task(&self, x: &[f32], n: usize, y: SendPtr, g0: usize, g1: usize, acc: bool) {
        let avx2 = level() == Some(Level::Avx2);
        // Many input rows: expand each pair of quantized panels to f32 once per block of
        // rows instead of once per 8 rows. The expanded values are the very ones the
        // quantized kernel makes in registers, and the f32 kernel runs the same sequence of
        // multiply-adds, so the results are bit-identical.
        // BF16 rows read in place are always expanded: the vector kernels read panels.
        let expand = self.format != PanelFormat::F32 && (n >= EXPAND_MIN_ROWS || self.in_rows);
        let f32_gb = self.blocks * PanelFormat::F32.block_bytes();
        let mut buf: Vec<f32> = if expand {
            vec![0f32; 2 * f32_gb / 4]
        } else {
            Vec::new()
        };
        let (format, gb) = if expand {
            (PanelFormat::F32, f32_gb)
        } else {
            (self.format, self.group_bytes)
        };
        let mut xb = 0;
        while xb < n {
            let xe = (xb + x_block(self.cols)).min(n);
            let mut g = g0;
            while g < g1 {
                let two = g + 1 < g1;
                let w = if expand {
                    for (k, dst) in buf
                        .chunks_exact_mut(f32_gb / 4)
                        .take(1 + two as usize)
                        .enumerate()
                    {
                        let src = &self.data[(g + k) * self.group_bytes..];
                        if self.in_rows {
                            expand_bf16_rows(&src[..self.group_bytes], self.cols, dst);
                            continue;
                        }
                        // SAFETY: `check` bounds panel g+k's blocks; `dst` holds one f32 panel;
                        // `supported()` held in `check`.
                        unsafe {
                            if avx2 {
                                avx2::expand_panel(self.format, src.as_ptr(), self.blocks, dst)
                            } else {
                                simd::expand_panel(self.format, src.as_ptr(), self.blocks, dst)
                            }
                        };
                    }
                    buf.as_ptr() as *const u8
                } else {
                    self.data[g * gb..].as_ptr()
                };
                let mut b = xb;
                while b < xe {
                    let cap = if format == PanelFormat::F32 && !avx2 {
                        F32_MAX_B
                    } else {
                        MAX_B
                    };
                    let nb = (xe - b).min(cap);
                    let call = Call {
                        w,
                        group_bytes: gb,
                        x: x[b * self.cols..].as_ptr(),
                        y: unsafe { y.0.add(b * self.y_stride + self.y_col0 + g * PANEL) },
                        rows_valid: [
                            self.rows - g * PANEL,
                            self.rows.saturating_sub((g + 1) * PANEL),
                        ],
                        acc,
                    };
                    // SAFETY: the panels g (and g+1 when `two`) exist, x holds rows b..b+nb,
                    // and y's columns for these panels belong to this task.
                    let run = if avx2 { avx2::dispatch } else { simd::dispatch };
                    unsafe {
                        run(
                            format,
                            self.blocks,
                            self.cols,
                            self.y_stride,
                            nb,
                            two,
                            &call,
                        )
                    };
                    b += nb;
                }
                g += if two { 2 } else { 1 };
            }
            xb = xe;
        }
    }
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: used only to hand disjoint regions of one buffer to rayon tasks.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// The pointer `n` floats further.
    ///
    /// # Safety
    /// As `pointer::add`: the result stays inside the buffer.
    unsafe fn offset(self, n: usize) -> SendPtr {
        SendPtr(unsafe { self.0.add(n) })
    }
}

/// One kernel invocation: up to two panels against up to eight input rows (twelve for f32
/// panels on AVX-512).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
struct Call {
    w: *const u8,
    group_bytes: usize,
    x: *const f32,
    y: *mut f32,
    /// Valid output rows in each of the two panels (≥ 16 means all).
    rows_valid: [usize; 2],
    /// Add the products to `y` instead of overwriting it.
    acc: bool,
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use super::{Call, K_SUBS, MAX_B, PANEL, PanelFormat, QK, k_header, k_sub};
    use std::arch::x86_64::*;

    /// # Safety
    /// See [`super::PanelMatrix::task`]; `nb` rows of x (stride `cols`) and of y (stride
    /// `rows`) are valid, `nb` ≤ 8 (≤ 12 for f32 panels), and AVX-512F is present.
    pub(super) unsafe fn dispatch(
        format: PanelFormat,
        blocks: usize,
        cols: usize,
        rows: usize,
        nb: usize,
        two: bool,
        c: &Call,
    ) {
        macro_rules! go {
            ($f:expr) => {
                unsafe {
                    match (nb, two) {
                        (8, true) => kernel::<8, 2, { $f }>(blocks, cols, rows, c),
                        (7, true) => kernel::<7, 2, { $f }>(blocks, cols, rows, c),
                        (6, true) => kernel::<6, 2, { $f }>(blocks, cols, rows, c),
                        (5, true) => kernel::<5, 2, { $f }>(blocks, cols, rows, c),
                        (4, true) => kernel::<4, 2, { $f }>(blocks, cols, rows, c),
                        (3, true) => kernel::<3, 2, { $f }>(blocks, cols, rows, c),
                        (2, true) => kernel::<2, 2, { $f }>(blocks, cols, rows, c),
                        (_, true) => kernel::<1, 2, { $f }>(blocks, cols, rows, c),
                        (8, false) => kernel::<8, 1, { $f }>(blocks, cols, rows, c),
                        (7, false) => kernel::<7, 1, { $f }>(blocks, cols, rows, c),
                        (6, false) => kernel::<6, 1, { $f }>(blocks, cols, rows, c),
                        (5, false) => kernel::<5, 1, { $f }>(blocks, cols, rows, c),
                        (4, false) => kernel::<4, 1, { $f }>(blocks, cols, rows, c),
                        (3, false) => kernel::<3, 1, { $f }>(blocks, cols, rows, c),
                        (2, false) => kernel::<2, 1, { $f }>(blocks, cols, rows, c),
                        (_, false) => kernel::<1, 1, { $f }>(blocks, cols, rows, c),
                    }
                }
            };
        }
        if format == PanelFormat::F32 && nb > MAX_B {
            unsafe {
                match (nb, two) {
                    (12, true) => kernel::<12, 2, 3>(blocks, cols, rows, c),
                    (11, true) => kernel::<11, 2, 3>(blocks, cols, rows, c),
                    (10, true) => kernel::<10, 2, 3>(blocks, cols, rows, c),
                    (_, true) => kernel::<9, 2, 3>(blocks, cols, rows, c),
                    (12, false) => kernel::<12, 1, 3>(blocks, cols, rows, c),
                    (11, false) => kernel::<11, 1, 3>(blocks, cols, rows, c),
                    (10, false) => kernel::<10, 1, 3>(blocks, cols, rows, c),
                    (_, false) => kernel::<9, 1, 3>(blocks, cols, rows, c),
                }
            }
            return;
        }
        debug_assert!((1..=MAX_B).contains(&nb));
        match format {
            PanelFormat::Q40 => go!(0),
            PanelFormat::Q41 => go!(1),
            PanelFormat::Q80 => go!(2),
            PanelFormat::F32 => go!(3),
            PanelFormat::F16 => go!(4),
            PanelFormat::BF16 => go!(5),
            PanelFormat::Q4K => go!(6),
            PanelFormat::Q5K => go!(7),
            PanelFormat::Q6K => go!(8),
        }
    }

    const fn format_of(f: u8) -> PanelFormat {
        PanelFormat::of_code(f)
    }

    #[inline(always)]
    unsafe fn bytes16(p: *const u8) -> __m512i {
        unsafe { _mm512_cvtepu8_epi32(_mm_loadu_si128(p as *const __m128i)) }
    }

    /// Columns `i` and `i + 16` of block `j` of the panel at `panel`, as candle dequantizes
    /// them: the same operations on the same values, in the same order.
    #[inline(always)]
    unsafe fn expand<const F: u8>(panel: *const u8, j: usize, i: usize) -> (__m512, __m512) {
        unsafe {
            let blk = panel.add(j * format_of(F).block_bytes());
            match format_of(F) {
                PanelFormat::F16 => {
                    let p = blk.add(2 * i * PANEL) as *const __m256i;
                    let q = blk.add(2 * (i + QK / 2) * PANEL) as *const __m256i;
                    (
                        _mm512_cvtph_ps(_mm256_loadu_si256(p)),
                        _mm512_cvtph_ps(_mm256_loadu_si256(q)),
                    )
                }
                PanelFormat::BF16 => {
                    // Column c is the even or odd half of the 16 rows' pair (c & !1, c | 1).
                    let wide = |c: usize| {
                        let v = _mm512_loadu_si512(blk.add(4 * (c / 2) * PANEL) as *const _);
                        _mm512_castsi512_ps(if c % 2 == 0 {
                            _mm512_slli_epi32(v, 16)
                        } else {
                            _mm512_and_si512(v, _mm512_set1_epi32(0xFFFF_0000u32 as i32))
                        })
                    };
                    (wide(i), wide(i + QK / 2))
                }
                PanelFormat::Q4K | PanelFormat::Q5K => {
                    let f = format_of(F);
                    let sb = panel.add((j / K_SUBS) * f.superblock_bytes());
                    let sub = sb.add(k_header(f) + (j % K_SUBS) * k_sub(f));
                    let d = _mm512_loadu_ps(sb as *const f32);
                    let dmin = _mm512_loadu_ps(sb.add(4 * PANEL) as *const f32);
                    // d·scale and dmin·min, then d1·q − m1: candle's two roundings.
                    let d1 = _mm512_mul_ps(d, _mm512_cvtepi32_ps(bytes16(sub)));
                    let m1 = _mm512_mul_ps(dmin, _mm512_cvtepi32_ps(bytes16(sub.add(PANEL))));
                    let q = bytes16(sub.add(2 * PANEL + i * PANEL));
                    let mut lo = _mm512_and_si512(q, _mm512_set1_epi32(0x0F));
                    let mut hi = _mm512_srli_epi32(q, 4);
                    if f == PanelFormat::Q5K {
                        let h = bytes16(sub.add(2 * PANEL + PANEL * QK / 2 + (i % 4) * PANEL));
                        let h = _mm512_srlv_epi32(h, _mm512_set1_epi32(2 * (i / 4) as i32));
                        let one = _mm512_set1_epi32(1);
                        lo = _mm512_or_si512(lo, _mm512_slli_epi32(_mm512_and_si512(h, one), 4));
                        hi = _mm512_or_si512(
                            hi,
                            _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(h, 1), one), 4),
                        );
                    }
                    (
                        _mm512_sub_ps(_mm512_mul_ps(d1, _mm512_cvtepi32_ps(lo)), m1),
                        _mm512_sub_ps(_mm512_mul_ps(d1, _mm512_cvtepi32_ps(hi)), m1),
                    )
                }
                PanelFormat::Q6K => {
                    let f = PanelFormat::Q6K;
                    let sb = panel.add((j / K_SUBS) * f.superblock_bytes());
                    let sub = sb.add(k_header(f) + (j % K_SUBS) * k_sub(f));
                    let d = _mm512_loadu_ps(sb as *const f32);
                    let sc = |p: *const u8| {
                        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                            p as *const __m128i,
                        )))
                    };
                    // (d·scale)·q, as candle multiplies.
                    let dl = _mm512_mul_ps(d, sc(sub));
                    let dh = _mm512_mul_ps(d, sc(sub.add(PANEL)));
                    let q = bytes16(sub.add(2 * PANEL + i * PANEL));
                    let h = bytes16(sub.add(2 * PANEL + PANEL * QK / 2 + (i % 8) * PANEL));
                    let h = _mm512_srlv_epi32(h, _mm512_set1_epi32(4 * (i / 8) as i32));
                    let three = _mm512_set1_epi32(3);
                    let m32 = _mm512_set1_epi32(32);
                    let lo = _mm512_or_si512(
                        _mm512_and_si512(q, _mm512_set1_epi32(0x0F)),
                        _mm512_slli_epi32(_mm512_and_si512(h, three), 4),
                    );
                    let hi = _mm512_or_si512(
                        _mm512_srli_epi32(q, 4),
                        _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(h, 2), three), 4),
                    );
                    (
                        _mm512_mul_ps(dl, _mm512_cvtepi32_ps(_mm512_sub_epi32(lo, m32))),
                        _mm512_mul_ps(dh, _mm512_cvtepi32_ps(_mm512_sub_epi32(hi, m32))),
                    )
                }
                PanelFormat::Q41 => {
                    let d = _mm512_loadu_ps(blk as *const f32);
                    let m = _mm512_loadu_ps(blk.add(4 * PANEL) as *const f32);
                    let q = _mm512_cvtepu8_epi32(_mm_loadu_si128(
                        blk.add(8 * PANEL + i * PANEL) as *const __m128i
                    ));
                    let lo = _mm512_cvtepi32_ps(_mm512_and_si512(q, _mm512_set1_epi32(0x0F)));
                    let hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(q, 4));
                    (
                        _mm512_add_ps(_mm512_mul_ps(lo, d), m),
                        _mm512_add_ps(_mm512_mul_ps(hi, d), m),
                    )
                }
                PanelFormat::Q40 => {
                    let d = _mm512_loadu_ps(blk as *const f32);
                    let q = _mm512_cvtepu8_epi32(_mm_loadu_si128(
                        blk.add(4 * PANEL + i * PANEL) as *const __m128i
                    ));
                    let eight = _mm512_set1_epi32(8);
                    let lo = _mm512_cvtepi32_ps(_mm512_sub_epi32(
                        _mm512_and_si512(q, _mm512_set1_epi32(0x0F)),
                        eight,
                    ));
                    let hi = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(q, 4), eight));
                    (_mm512_mul_ps(lo, d), _mm512_mul_ps(hi, d))
                }
                PanelFormat::Q80 => {
                    let d = _mm512_loadu_ps(blk as *const f32);
                    let p = blk.add(4 * PANEL);
                    let lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                        p.add(i * PANEL) as *const __m128i,
                    )));
                    let hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                        p.add((i + QK / 2) * PANEL) as *const __m128i,
                    )));
                    (_mm512_mul_ps(lo, d), _mm512_mul_ps(hi, d))
                }
                PanelFormat::F32 => {
                    let p = blk as *const f32;
                    (
                        _mm512_loadu_ps(p.add(i * PANEL)),
                        _mm512_loadu_ps(p.add((i + QK / 2) * PANEL)),
                    )
                }
            }
        }
    }

    /// Expands one quantized panel (`blocks` blocks) into f32 panel layout in `dst`.
    ///
    /// # Safety
    /// `src` points to `blocks` blocks of `format`, `dst` holds `blocks × 512` floats, and
    /// AVX-512F is present.
    pub(super) unsafe fn expand_panel(
        format: PanelFormat,
        src: *const u8,
        blocks: usize,
        dst: &mut [f32],
    ) {
        assert!(dst.len() >= blocks * QK * PANEL);
        unsafe {
            match format {
                PanelFormat::Q40 => expand_panel_f::<0>(src, blocks, dst),
                PanelFormat::Q41 => expand_panel_f::<1>(src, blocks, dst),
                PanelFormat::Q80 => expand_panel_f::<2>(src, blocks, dst),
                PanelFormat::F32 => expand_panel_f::<3>(src, blocks, dst),
                PanelFormat::F16 => expand_panel_f::<4>(src, blocks, dst),
                PanelFormat::BF16 => expand_panel_f::<5>(src, blocks, dst),
                PanelFormat::Q4K => expand_panel_f::<6>(src, blocks, dst),
                PanelFormat::Q5K => expand_panel_f::<7>(src, blocks, dst),
                PanelFormat::Q6K => expand_panel_f::<8>(src, blocks, dst),
            }
        }
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn expand_panel_f<const F: u8>(src: *const u8, blocks: usize, dst: &mut [f32]) {
        unsafe {
            for j in 0..blocks {
                let out = dst.as_mut_ptr().add(j * QK * PANEL);
                for i in 0..QK / 2 {
                    let (lo, hi) = expand::<F>(src, j, i);
                    _mm512_storeu_ps(out.add(i * PANEL), lo);
                    _mm512_storeu_ps(out.add((i + QK / 2) * PANEL), hi);
                }
            }
        }
    }

    /// `B` input rows against `G` panels: per block, column pairs (i, i+16) in order.
    #[allow(clippy::needless_range_loop)] // indices over registers read best as in the math
    #[target_feature(enable = "avx512f")]
    unsafe fn kernel<const B: usize, const G: usize, const F: u8>(
        blocks: usize,
        cols: usize,
        rows: usize,
        c: &Call,
    ) {
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); G]; B];
            // Whole blocks; an f32 matrix whose width is not a multiple of 32 has a partial
            // last block, whose missing columns are skipped (their weights are zero, but the
            // input beyond `cols` belongs to the next row).
            let full = cols / QK;
            for j in 0..full {
                for i in 0..QK / 2 {
                    let mut lo = [_mm512_setzero_ps(); G];
                    let mut hi = [_mm512_setzero_ps(); G];
                    for g in 0..G {
                        (lo[g], hi[g]) = expand::<F>(c.w.add(g * c.group_bytes), j, i);
                    }
                    for b in 0..B {
                        let xp = c.x.add(b * cols + j * QK + i);
                        let xl = _mm512_set1_ps(*xp);
                        let xh = _mm512_set1_ps(*xp.add(QK / 2));
                        for g in 0..G {
                            acc[b][g] = _mm512_fmadd_ps(lo[g], xl, acc[b][g]);
                            acc[b][g] = _mm512_fmadd_ps(hi[g], xh, acc[b][g]);
                        }
                    }
                }
            }
            if full < blocks {
                let j = full;
                for i in 0..QK / 2 {
                    let mut lo = [_mm512_setzero_ps(); G];
                    let mut hi = [_mm512_setzero_ps(); G];
                    for g in 0..G {
                        (lo[g], hi[g]) = expand::<F>(c.w.add(g * c.group_bytes), j, i);
                    }
                    let (cl, ch) = (j * QK + i, j * QK + i + QK / 2);
                    for b in 0..B {
                        let xp = c.x.add(b * cols);
                        if cl < cols {
                            let xl = _mm512_set1_ps(*xp.add(cl));
                            for g in 0..G {
                                acc[b][g] = _mm512_fmadd_ps(lo[g], xl, acc[b][g]);
                            }
                        }
                        if ch < cols {
                            let xh = _mm512_set1_ps(*xp.add(ch));
                            for g in 0..G {
                                acc[b][g] = _mm512_fmadd_ps(hi[g], xh, acc[b][g]);
                            }
                        }
                    }
                }
            }
            for g in 0..G {
                let valid = c.rows_valid[g].min(PANEL);
                let mask: __mmask16 = if valid >= PANEL {
                    0xFFFF
                } else {
                    ((1u32 << valid) - 1) as __mmask16
                };
                for b in 0..B {
                    let y = c.y.add(b * rows + g * PANEL);
                    let v = if c.acc {
                        _mm512_add_ps(_mm512_maskz_loadu_ps(mask, y), acc[b][g])
                    } else {
                        acc[b][g]
                    };
                    _mm512_mask_storeu_ps(y, mask, v);
                }
            }
        }
    }

    /// `e^x` for 16 lanes (Cephes `expf`: range reduction by ln 2 in two parts and a degree-6
    /// polynomial; ≤ 2 ulp). Flushes to 0 below −87.3, where f32 results would be subnormal.
    #[inline(always)]
    pub(super) unsafe fn exp16(x: __m512) -> __m512 {
        unsafe {
            // Operands in this order keep a NaN input (vmaxps/vminps return the second
            // operand when either is NaN).
            let tiny = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, _mm512_set1_ps(-87.3));
            let x = _mm512_max_ps(_mm512_set1_ps(-87.3), x);
            let x = _mm512_min_ps(_mm512_set1_ps(88.3), x);
            let n = _mm512_roundscale_ps(
                _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
            );
            let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
            let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
            let mut p = _mm512_set1_ps(1.987_569_1e-4);
            for c in [
                1.398_199_9e-3,
                8.333_452e-3,
                4.166_579_6e-2,
                1.666_666_5e-1,
                0.5,
            ] {
                p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
            }
            let r2 = _mm512_mul_ps(r, r);
            let p = _mm512_add_ps(_mm512_fmadd_ps(p, r2, r), _mm512_set1_ps(1.0));
            _mm512_maskz_mov_ps(!tiny, _mm512_scalef_ps(p, n))
        }
    }

    /// `Σ e^(v_i − shift)` in f64 (each term in f32).
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn sum_exp(v: &[f32], shift: f32) -> f64 {
        unsafe {
            let s = _mm512_set1_ps(shift);
            let mut acc = _mm512_setzero_pd();
            let mut acc2 = _mm512_setzero_pd();
            let chunks = v.len() / 16;
            for k in 0..chunks {
                let e = exp16(_mm512_sub_ps(_mm512_loadu_ps(v.as_ptr().add(16 * k)), s));
                acc = _mm512_add_pd(acc, _mm512_cvtps_pd(_mm512_castps512_ps256(e)));
                acc2 = _mm512_add_pd(acc2, _mm512_cvtps_pd(_mm512_extractf32x8_ps::<1>(e)));
            }
            let mut total = _mm512_reduce_add_pd(_mm512_add_pd(acc, acc2));
            for &x in &v[chunks * 16..] {
                total += exp_scalar(x - shift) as f64;
            }
            total
        }
    }

    /// `v_i ← e^(v_i − shift)` in place; returns their sum.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn exp_in_place(v: &mut [f32], shift: f32) -> f32 {
        unsafe {
            let s = _mm512_set1_ps(shift);
            let mut acc = _mm512_setzero_ps();
            let chunks = v.len() / 16;
            for k in 0..chunks {
                let p = v.as_mut_ptr().add(16 * k);
                let e = exp16(_mm512_sub_ps(_mm512_loadu_ps(p), s));
                _mm512_storeu_ps(p, e);
                acc = _mm512_add_ps(acc, e);
            }
            let mut total = _mm512_reduce_add_ps(acc);
            for x in &mut v[chunks * 16..] {
                *x = exp_scalar(*x - shift);
                total += *x;
            }
            total
        }
    }

    /// `out_i = g_i / (1 + e^(−g_i)) · u_i` (SiLU of the gate times the up projection).
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn silu_mul(g: &[f32], u: &[f32], out: &mut [f32]) {
        unsafe {
            let chunks = out.len() / 16;
            let one = _mm512_set1_ps(1.0);
            for k in 0..chunks {
                let gv = _mm512_loadu_ps(g.as_ptr().add(16 * k));
                let uv = _mm512_loadu_ps(u.as_ptr().add(16 * k));
                let e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv));
                let s = _mm512_div_ps(gv, _mm512_add_ps(one, e));
                _mm512_storeu_ps(out.as_mut_ptr().add(16 * k), _mm512_mul_ps(s, uv));
            }
            for i in chunks * 16..out.len() {
                out[i] = g[i] / (1.0 + exp_scalar(-g[i])) * u[i];
            }
        }
    }

    /// `v_i ← v_i · scale`; returns the largest result, NaNs ignored (as `f32::max`).
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn scale_max(v: &mut [f32], scale: f32) -> f32 {
        unsafe {
            let s = _mm512_set1_ps(scale);
            let mut acc = _mm512_set1_ps(f32::NEG_INFINITY);
            let chunks = v.len() / 16;
            for k in 0..chunks {
                let p = v.as_mut_ptr().add(16 * k);
                let x = _mm512_mul_ps(_mm512_loadu_ps(p), s);
                _mm512_storeu_ps(p, x);
                // vmaxps returns its second operand when either is NaN: NaNs never enter acc.
                acc = _mm512_max_ps(x, acc);
            }
            let mut m = _mm512_reduce_max_ps(acc);
            for x in &mut v[chunks * 16..] {
                *x *= scale;
                m = m.max(*x);
            }
            m
        }
    }

    /// The largest value, NaNs ignored (as `f32::max`).
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn max_of(v: &[f32]) -> f32 {
        unsafe {
            let mut acc = _mm512_set1_ps(f32::NEG_INFINITY);
            let chunks = v.len() / 16;
            for k in 0..chunks {
                acc = _mm512_max_ps(_mm512_loadu_ps(v.as_ptr().add(16 * k)), acc);
            }
            v[chunks * 16..]
                .iter()
                .fold(_mm512_reduce_max_ps(acc), |m, &x| m.max(x))
        }
    }

    /// Bit mask of the lanes of `p[0..16]` greater than the value whose `f32::total_cmp` key
    /// is `key` (the same order: sign-magnitude bits flipped into two's complement).
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn total_gt_mask(p: *const f32, key: i32) -> u16 {
        unsafe {
            let b = _mm512_loadu_si512(p as *const __m512i);
            let flip = _mm512_srli_epi32(_mm512_srai_epi32(b, 31), 1);
            _mm512_cmpgt_epi32_mask(_mm512_xor_si512(b, flip), _mm512_set1_epi32(key))
        }
    }

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn exp_scalar(x: f32) -> f32 {
        unsafe { _mm512_cvtss_f32(exp16(_mm512_set1_ps(x))) }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2;

#[cfg(not(target_arch = "x86_64"))]
mod avx2 {
    pub(super) use super::simd::*;
}

/// Other architectures: [`supported`] is false, so none of these is ever called.
#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::missing_safety_doc)]
mod simd {
    use super::{Call, PanelFormat};

    pub(super) unsafe fn dispatch(
        _: PanelFormat,
        _: usize,
        _: usize,
        _: usize,
        _: usize,
        _: bool,
        _: &Call,
    ) {
        unreachable!("x86-64 only")
    }
    pub(super) unsafe fn expand_panel(_: PanelFormat, _: *const u8, _: usize, _: &mut [f32]) {
        unreachable!("x86-64 only")
    }
    pub(super) unsafe fn scale_max(_: &mut [f32], _: f32) -> f32 {
        unreachable!("x86-64 only")
    }
    pub(super) unsafe fn max_of(_: &[f32]) -> f32 {
        unreachable!("x86-64 only")
    }
    pub(super) unsafe fn sum_exp(_: &[f32], _: f32) -> f64 {
        unreachable!("x86-64 only")
    }
    pub(super) unsafe fn exp_in_place(_: &mut [f32], _: f32) -> f32 {
        unreachable!("x86-64 only")
    }
    pub(super) unsafe fn silu_mul(_: &[f32], _: &[f32], _: &mut [f32]) {
        unreachable!("x86-64 only")
    }
    pub(super) unsafe fn total_gt_mask(_: *const f32, _: i32) -> u16 {
        unreachable!("x86-64 only")
    }
}

/// `v_i ← v_i · scale`; returns the largest result (NaNs ignored, as `f32::max`; −∞ when
/// empty).
pub fn scale_max(v: &mut [f32], scale: f32) -> f32 {
    // SAFETY (each arm): the instruction set was detected at run time.
    match level() {
        Some(Level::Avx512) => unsafe { simd::scale_max(v, scale) },
        Some(Level::Avx2) => unsafe { avx2::scale_max(v, scale) },
        None => v.iter_mut().fold(f32::NEG_INFINITY, |m, x| {
            *x *= scale;
            m.max(*x)
        }),
    }
}

/// The largest value (NaNs ignored, as `f32::max`; −∞ when empty).
pub fn max_value(v: &[f32]) -> f32 {
    // SAFETY (each arm): the instruction set was detected at run time.
    match level() {
        Some(Level::Avx512) => unsafe { simd::max_of(v) },
        Some(Level::Avx2) => unsafe { avx2::max_of(v) },
        None => v.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)),
    }
}

/// `f32::total_cmp`'s order as an `i32` key.
fn total_key(x: f32) -> i32 {
    let b = x.to_bits() as i32;
    b ^ (((b >> 31) as u32) >> 1) as i32
}

/// Log-sum-exp of one row of logits (terms in f32, the sum in f64).
pub fn log_sum_exp(v: &[f32]) -> f64 {
    let max = max_value(v);
    if !max.is_finite() {
        return max as f64;
    }
    // SAFETY (each arm): the instruction set was detected at run time.
    let sum = match level() {
        Some(Level::Avx512) => unsafe { simd::sum_exp(v, max) },
        Some(Level::Avx2) => unsafe { avx2::sum_exp(v, max) },
        None => v.iter().map(|&x| (x as f64 - max as f64).exp()).sum(),
    };
    max as f64 + sum.ln()
}

/// `v_i ← e^(v_i − shift)`; returns the sum (the softmax numerators of attention).
pub fn exp_in_place(v: &mut [f32], shift: f32) -> f32 {
    // SAFETY (each arm): the instruction set was detected at run time.
    match level() {
        Some(Level::Avx512) => unsafe { simd::exp_in_place(v, shift) },
        Some(Level::Avx2) => unsafe { avx2::exp_in_place(v, shift) },
        None => {
            let mut sum = 0.0;
            for x in v.iter_mut() {
                *x = (*x - shift).exp();
                sum += *x;
            }
            sum
        }
    }
}

/// `out_i = silu(g_i) · u_i`.
pub fn silu_mul(g: &[f32], u: &[f32], out: &mut [f32]) {
    assert!(
        g.len() == out.len() && u.len() == out.len(),
        "silu_mul shapes"
    );
    // SAFETY (each arm): the instruction set was detected at run time; the three slices have
    // the same length.
    match level() {
        Some(Level::Avx512) => unsafe { simd::silu_mul(g, u, out) },
        Some(Level::Avx2) => unsafe { avx2::silu_mul(g, u, out) },
        None => {
            for ((o, &g), &u) in out.iter_mut().zip(g).zip(u) {
                *o = g / (1.0 + (-g).exp()) * u;
            }
        }
    }
}

/// The `k` largest logits as `(id, logit)`, largest first, ties by smaller id first.
pub fn top_k_logits(v: &[f32], k: usize) -> Vec<(u32, f32)> {
    let k = k.min(v.len());
    if k == 0 {
        return Vec::new();
    }
    // Order: value descending (total order, so NaN sorts as largest like `total_cmp`), then id.
    let better = |a: (u32, f32), b: (u32, f32)| match a.1.total_cmp(&b.1) {
        std::cmp::Ordering::Greater => true,
        std::cmp::Ordering::Less => false,
        std::cmp::Ordering::Equal => a.0 < b.0,
    };
    let mut best: Vec<(u32, f32)> = (0..k as u32).map(|i| (i, v[i as usize])).collect();
    best.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let offer = |i: usize, best: &mut Vec<(u32, f32)>| {
        let x = v[i];
        // Later ids lose ties, so only a strictly better value enters.
        if x.total_cmp(&best[k - 1].1) == std::cmp::Ordering::Greater {
            let cand = (i as u32, x);
            let at = best.partition_point(|&e| better(e, cand));
            best.pop();
            best.insert(at, cand);
        }
    };
    let mut i = k;
    if let Some(lvl) = level() {
        // 16 values at a time against the current k-th best; the few lanes above it are
        // offered one by one, in order, exactly as the plain loop would.
        while i + 16 <= v.len() {
            let (p, key) = (v[i..].as_ptr(), total_key(best[k - 1].1));
            // SAFETY: the instruction set was detected at run time; v[i..i+16] is in bounds.
            let mut mask = unsafe {
                match lvl {
                    Level::Avx512 => simd::total_gt_mask(p, key),
                    Level::Avx2 => avx2::total_gt_mask(p, key),
                }
            };
            while mask != 0 {
                offer(i + mask.trailing_zeros() as usize, &mut best);
                mask &= mask - 1;
            }
            i += 16;
        }
    }
    for j in i..v.len() {
        offer(j, &mut best);
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn dense_product(w: &[f32], rows: usize, cols: usize, x: &[f32], n: usize) -> Vec<f64> {
        let mut y = vec![0f64; n * rows];
        for b in 0..n {
            for r in 0..rows {
                y[b * rows + r] = (0..cols)
                    .map(|c| w[r * cols + c] as f64 * x[b * cols + c] as f64)
                    .sum();
            }
        }
        y
    }

    #[test]
    fn products_match_the_dequantized_matrix_for_every_format_and_shape() {
        if !supported() {
            eprintln!("skipped: this CPU has neither AVX-512F nor AVX2+FMA");
            return;
        }
        let mut rng = Rng::new(5);
        for (rows, cols) in [(70, 96), (16, 32), (33, 64), (5, 32), (37, 256), (18, 512)] {
            let w: Vec<f32> = (0..rows * cols).map(|_| rng.normal()).collect();
            let wt = Tensor::from_vec(w, (rows, cols), &Device::Cpu).unwrap();
            for dt in ALL_TYPES {
                if cols % dt.block_size() != 0 {
                    continue;
                }
                let q = QTensor::quantize(&wt, dt).unwrap();
                let dense: Vec<f32> = q
                    .dequantize(&Device::Cpu)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let p = PanelMatrix::from_qtensor(&q).unwrap();
                for n in [1, 3, 8, 11, 70] {
                    let x: Vec<f32> = (0..n * cols).map(|_| rng.normal()).collect();
                    let want = dense_product(&dense, rows, cols, &x, n);
                    let got = p.matmul(&x, n);
                    for (a, b) in got.iter().zip(&want) {
                        assert!(
                            (*a as f64 - b).abs() <= 1e-5 * (1.0 + b.abs()) * (cols as f64).sqrt(),
                            "{dt:?} {rows}x{cols} n={n}: {a} vs {b}"
                        );
                    }
                }
            }
        }
    }

    /// AMX products of BF16 panels: as close to the exact product as the vector kernels',
    /// within f32 rounding of theirs, one fixed order per element (batch and thread split
    /// do not change a bit), for ragged rows and columns, stacked segments and `acc`.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn amx_products_are_exact_in_f32_and_independent_of_the_batch() {
        if !(supported() && level() == Some(Level::Avx512) && amx::detected()) {
            eprintln!("skipped: this CPU has no AMX-BF16 tiles");
            return;
        }
        let mut rng = Rng::new(41);
        for (rows, cols) in [(70, 96), (16, 32), (5, 100), (33, 2048), (300, 64)] {
            let w: Vec<f32> = (0..rows * cols).map(|_| rng.normal()).collect();
            let head = w[..rows.min(16) * cols].to_vec();
            let wt = Tensor::from_vec(w, (rows, cols), &Device::Cpu).unwrap();
            let q = QTensor::quantize(&wt, GgmlDType::BF16).unwrap();
            let dense = dequantized(&q);
            // Stacked behind an F16 part, the BF16 segment writes columns 16.. of y.
            let ht = Tensor::from_vec(head, (rows.min(16), cols), &Device::Cpu).unwrap();
            let h = QTensor::quantize(&ht, GgmlDType::F16).unwrap();
            for p in [
                PanelMatrix::from_qtensor(&q).unwrap(),
                PanelMatrix::stack(&[&h, &q]).unwrap(),
            ] {
                let seg = p.segments.last().unwrap();
                let view = p.view(seg);
                let total = p.rows();
                for n in [1, 8, 17, 40, 300] {
                    let x: Vec<f32> = (0..n * cols).map(|_| rng.normal()).collect();
                    let want = dense_product(&dense, rows, cols, &x, n);
                    let run = |tiles: bool, parallel: bool, acc: bool| {
                        let mut y = vec![0.5f32; n * total];
                        view.check(&x, n, &y);
                        if tiles {
                            let out = SendPtr(y.as_mut_ptr());
                            unsafe { amx::matmul(&view, &x, n, out, acc, parallel) };
                        } else {
                            view.par_matmul_vector(&x, n, &mut y, acc);
                        }
                        y
                    };
                    let (tiles, vector) = (run(true, true, false), run(false, true, false));
                    let col0 = total - rows;
                    for b in 0..n {
                        for r in 0..rows {
                            let (t, v) =
                                (tiles[b * total + col0 + r], vector[b * total + col0 + r]);
                            let e = want[b * rows + r];
                            // f32 summation error: about ε·√cols times the terms' norm.
                            let norm = (0..cols)
                                .map(|c| {
                                    (dense[r * cols + c] as f64 * x[b * cols + c] as f64).powi(2)
                                })
                                .sum::<f64>()
                                .sqrt();
                            let tol = 2.0 * f32::EPSILON as f64 * (cols as f64).sqrt() * norm;
                            for (got, path) in [(t, "tiles"), (v, "vector")] {
                                assert!(
                                    (got as f64 - e).abs() <= tol,
                                    "{path} {rows}x{cols} n={n}: {got} vs {e} (tolerance {tol})"
                                );
                            }
                        }
                        // Columns of other segments are left alone.
                        assert!(tiles[b * total..b * total + col0].iter().all(|&v| v == 0.5));
                    }
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&tiles), bits(&run(true, false, false)), "serial");
                    let added = run(true, true, true);
                    for (a, t) in added.iter().zip(&tiles) {
                        assert_eq!(
                            a.to_bits(),
                            if *t == 0.5 { 0.5f32 } else { t + 0.5 }.to_bits()
                        );
                    }
                    // Row 0 alone gives its bits in the batch.
                    let mut alone = vec![0f32; total];
                    view.check(&x[..cols], 1, &alone);
                    unsafe {
                        amx::matmul(
                            &view,
                            &x[..cols],
                            1,
                            SendPtr(alone.as_mut_ptr()),
                            false,
                            true,
                        )
                    };
                    assert_eq!(
                        bits(&alone[col0..]),
                        bits(&tiles[col0..total]),
                        "batch of {n}"
                    );
                }
            }
        }
    }

    /// BF16 rows read in place from a map give the bits of the same rows' BF16 panels: on the
    /// tiles (where AMX runs, serial or parallel, with `acc`, stacked behind another part)
    /// and on the vector kernels (AMX refused after loading); rows look up the same values.
    #[test]
    fn bf16_rows_read_in_place_give_the_panels_bits() {
        if !supported() {
            eprintln!("skipped: this CPU has neither AVX-512F nor AVX2+FMA");
            return;
        }
        let mut rng = Rng::new(43);
        for (rows, cols) in [(16, 32), (48, 96), (64, 2048), (320, 64)] {
            let w: Vec<f32> = (0..rows * cols).map(|_| rng.normal()).collect();
            let bytes: Vec<u8> = w
                .iter()
                .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                .collect();
            // The matrix sits 64 bytes into its map, as a tensor sits inside a file.
            let map: SharedBytes = std::sync::Arc::new([vec![7u8; 64], bytes].concat());
            let data = &map.as_ref().as_ref()[64..];
            let head: Vec<u8> = (0..16 * cols)
                .flat_map(|_| half::f16::from_f32(rng.normal()).to_le_bytes())
                .collect();
            let raw = |map| RawMatrix {
                dtype: GgmlDType::BF16,
                rows,
                cols,
                bytes: data,
                map,
            };
            let none: Option<&SharedBytes> = None;
            let f16 = RawMatrix {
                dtype: GgmlDType::F16,
                rows: 16,
                cols,
                bytes: &head,
                map: None,
            };
            for parts in [vec![], vec![f16]] {
                let stacked = |m| {
                    let mut p = parts.clone();
                    p.push(raw(m));
                    PanelMatrix::stack_raw(&p).unwrap()
                };
                let (packed, in_place) = (stacked(none), stacked(Some(&map)));
                assert_eq!(packed.bytes_in_place(), 0);
                let amx_on = amx();
                assert_eq!(raw(Some(&map)).reads_in_place(), amx_on);
                assert_eq!(
                    in_place.bytes_in_place(),
                    if amx_on { rows * cols * 2 } else { 0 }
                );
                assert_eq!(in_place.rows(), rows + parts.len() * 16);
                let mut a = vec![0f32; cols];
                let mut b = vec![0f32; cols];
                for r in [0, in_place.rows() - 1] {
                    packed.row_into(r, &mut a);
                    in_place.row_into(r, &mut b);
                    assert_eq!(a, b, "row {r}");
                }
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                for n in [1, 8, 17, 40, 300] {
                    let x: Vec<f32> = (0..n * cols).map(|_| rng.normal()).collect();
                    let total = in_place.rows();
                    let run = |m: &PanelMatrix, how: u8| {
                        let mut y = vec![0.5f32; n * total];
                        for s in &m.segments {
                            let v = m.view(s);
                            v.check(&x, n, &y);
                            match how {
                                0 => v.par_matmul(&x, n, &mut y, false),
                                1 => v.matmul_serial(&x, n, &mut y, false),
                                2 => v.par_matmul(&x, n, &mut y, true),
                                _ => v.par_matmul_vector(&x, n, &mut y, false),
                            }
                        }
                        bits(&y)
                    };
                    for how in 0..4 {
                        assert_eq!(
                            run(&packed, how),
                            run(&in_place, how),
                            "{rows}x{cols} n={n} {how}"
                        );
                    }
                }
            }
        }
    }

    /// Every GGML type with a panel format, and one without (Q5_0, expanded to f32).
    const ALL_TYPES: [GgmlDType; 10] = [
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q8_0,
        GgmlDType::F32,
        GgmlDType::F16,
        GgmlDType::BF16,
        GgmlDType::Q4K,
        GgmlDType::Q5K,
        GgmlDType::Q6K,
        GgmlDType::Q5_0,
    ];

    fn dequantized(q: &QTensor) -> Vec<f32> {
        q.dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    #[test]
    fn panels_hold_exactly_the_values_dequantize_gives() {
        if !supported() {
            return;
        }
        let mut rng = Rng::new(11);
        let (rows, cols) = (35, 512);
        // Spread magnitudes, so that the K-quants' scales and minimums take many values.
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| rng.normal() * (1 + (i / 32) % 9) as f32 * 0.1)
            .collect();
        let wt = Tensor::from_vec(w, (rows, cols), &Device::Cpu).unwrap();
        for dt in ALL_TYPES {
            let q = QTensor::quantize(&wt, dt).unwrap();
            let dense = dequantized(&q);
            let p = PanelMatrix::from_qtensor(&q).unwrap();
            let want_format = PanelFormat::of_ggml(dt).unwrap_or(PanelFormat::F32);
            assert_eq!(p.format(), want_format, "{dt:?}");
            let mut row = vec![0f32; cols];
            for r in 0..rows {
                p.row_into(r, &mut row);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(&row),
                    bits(&dense[r * cols..(r + 1) * cols]),
                    "{dt:?} row {r}"
                );
            }
        }
    }

    #[test]
    fn parts_of_different_formats_stack_as_segments() {
        if !supported() {
            return;
        }
        let mut rng = Rng::new(4);
        // q and k in Q4_K, v in Q6_K, as a Q4_K_M file holds them; then two runs of Q8_0.
        for dts in [
            [GgmlDType::Q4K, GgmlDType::Q4K, GgmlDType::Q6K],
            [GgmlDType::Q8_0, GgmlDType::F16, GgmlDType::Q8_0],
        ] {
            let parts: Vec<QTensor> = [(40, 256), (24, 256), (9, 256)]
                .iter()
                .zip(dts)
                .map(|(&(r, c), dt)| {
                    let w: Vec<f32> = (0..r * c).map(|_| rng.normal()).collect();
                    QTensor::quantize(&Tensor::from_vec(w, (r, c), &Device::Cpu).unwrap(), dt)
                        .unwrap()
                })
                .collect();
            let stacked = PanelMatrix::stack(&parts.iter().collect::<Vec<_>>()).unwrap();
            let formats: Vec<PanelFormat> = dts
                .iter()
                .map(|&d| PanelFormat::of_ggml(d).unwrap())
                .collect();
            let mut runs = formats.clone();
            runs.dedup();
            assert_eq!(stacked.formats(), runs);
            for n in [3, 20] {
                let x: Vec<f32> = (0..n * 256).map(|_| rng.normal()).collect();
                let all = stacked.matmul(&x, n);
                let mut off = 0;
                for p in &parts {
                    let one = PanelMatrix::from_qtensor(p).unwrap().matmul(&x, n);
                    let r = p.shape().dims()[0];
                    for b in 0..n {
                        assert_eq!(
                            &all[b * 73 + off..b * 73 + off + r],
                            &one[b * r..(b + 1) * r]
                        );
                    }
                    off += r;
                }
            }
        }
    }

    #[test]
    fn f32_matrices_of_any_width_and_stacks_match() {
        if !supported() {
            return;
        }
        let mut rng = Rng::new(9);
        for (rows, cols) in [(3, 8), (20, 40), (17, 100)] {
            let w: Vec<f32> = (0..rows * cols).map(|_| rng.normal()).collect();
            let p = PanelMatrix::from_f32(&w, rows, cols);
            for n in [1, 9] {
                // Large values past each row's end would leak into a partial block.
                let x: Vec<f32> = (0..n * cols)
                    .map(|i| rng.normal() * (1 + i % 7) as f32)
                    .collect();
                let want = dense_product(&w, rows, cols, &x, n);
                for (a, b) in p.matmul(&x, n).iter().zip(&want) {
                    assert!(
                        (*a as f64 - b).abs() <= 1e-4 * (1.0 + b.abs()),
                        "{a} vs {b}"
                    );
                }
            }
        }
        // q, k, v stacked: the stacked product is the three products side by side.
        let parts: Vec<QTensor> = [(64, 64), (32, 64), (32, 64)]
            .iter()
            .map(|&(r, c)| {
                let w: Vec<f32> = (0..r * c).map(|_| rng.normal()).collect();
                let t = Tensor::from_vec(w, (r, c), &Device::Cpu).unwrap();
                QTensor::quantize(&t, GgmlDType::Q4_1).unwrap()
            })
            .collect();
        let stacked = PanelMatrix::stack(&parts.iter().collect::<Vec<_>>()).unwrap();
        assert_eq!(stacked.format(), PanelFormat::Q41);
        let x: Vec<f32> = (0..3 * 64).map(|_| rng.normal()).collect();
        let all = stacked.matmul(&x, 3);
        let mut off = 0;
        for p in &parts {
            let one = PanelMatrix::from_qtensor(p).unwrap().matmul(&x, 3);
            let r = p.shape().dims()[0];
            for b in 0..3 {
                assert_eq!(
                    &all[b * 128 + off..b * 128 + off + r],
                    &one[b * r..(b + 1) * r]
                );
            }
            off += r;
        }
    }

    #[test]
    fn tall_inputs_split_by_rows_give_the_serial_products_bits() {
        if !supported() {
            return;
        }
        // n ≥ 4·rows takes the split over x's rows; a ragged last block and a matrix whose
        // rows are not a whole number of panels included.
        let mut rng = Rng::new(5);
        for (n, rows, cols) in [(1000, 40, 24), (4500, 21, 130)] {
            let w: Vec<f32> = (0..rows * cols).map(|_| rng.normal()).collect();
            let x: Vec<f32> = (0..n * cols).map(|_| rng.normal()).collect();
            let y0: Vec<f32> = (0..n * rows).map(|_| rng.normal()).collect();
            let mut pk = PackedF32::new();
            pk.pack(&w, rows, cols, false);
            for acc in [false, true] {
                let (mut par, mut ser) = (y0.clone(), y0.clone());
                pk.matmul_into(&x, n, &mut par, acc);
                pk.matmul_serial(&x, n, &mut ser, acc);
                assert!(par == ser, "n {n}, rows {rows}, cols {cols}, acc {acc}");
                let want = dense_product(&w, rows, cols, &x, n);
                for (i, (&g, &e)) in par.iter().zip(&want).enumerate() {
                    let e = e + if acc { f64::from(y0[i]) } else { 0.0 };
                    assert!(
                        (f64::from(g) - e).abs() <= 1e-3 * (1.0 + e.abs()),
                        "element {i}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_rows_result_does_not_depend_on_its_batch() {
        if !supported() {
            return;
        }
        let mut rng = Rng::new(3);
        let (rows, cols) = (48, 64);
        let w: Vec<f32> = (0..rows * cols).map(|_| rng.normal()).collect();
        let q = QTensor::quantize(
            &Tensor::from_vec(w, (rows, cols), &Device::Cpu).unwrap(),
            GgmlDType::Q4_1,
        )
        .unwrap();
        let p = PanelMatrix::from_qtensor(&q).unwrap();
        let x: Vec<f32> = (0..40 * cols).map(|_| rng.normal()).collect();
        let all = p.matmul(&x, 40);
        for b in 0..40 {
            let one = p.matmul(&x[b * cols..(b + 1) * cols], 1);
            assert_eq!(&all[b * rows..(b + 1) * rows], &one[..], "row {b}");
        }
        // Every format: 40 rows at once (panels expanded once per block of rows) against
        // one row at a time (expanded in registers).
        let cols = 256;
        let w: Vec<f32> = (0..rows * cols).map(|_| rng.normal()).collect();
        let wt = Tensor::from_vec(w, (rows, cols), &Device::Cpu).unwrap();
        let x: Vec<f32> = (0..40 * cols).map(|_| rng.normal()).collect();
        for dt in ALL_TYPES {
            let p = PanelMatrix::from_qtensor(&QTensor::quantize(&wt, dt).unwrap()).unwrap();
            let all = p.matmul(&x, 40);
            for b in 0..40 {
                let one = p.matmul(&x[b * cols..(b + 1) * cols], 1);
                assert_eq!(&all[b * rows..(b + 1) * rows], &one[..], "{dt:?} row {b}");
            }
        }
    }

    #[test]
    fn exp_and_log_sum_exp_are_accurate() {
        if !supported() {
            return;
        }
        let v: Vec<f32> = (0..1000).map(|i| (i as f32 - 700.0) * 0.13).collect();
        let mut e = v.clone();
        let s = exp_in_place(&mut e, 3.0);
        let mut want_sum = 0f64;
        for (x, got) in v.iter().zip(&e) {
            // The shift is subtracted in f32, as the kernel does.
            let want = ((*x - 3.0) as f64).exp();
            want_sum += want;
            assert!(
                (*got as f64 - want).abs() <= 3e-7 * want + 1.2e-38,
                "{x}: {got} vs {want}"
            );
        }
        assert!((s as f64 - want_sum).abs() <= 1e-5 * want_sum);
        let lse = log_sum_exp(&v);
        let max = v.iter().cloned().fold(f32::MIN, f32::max) as f64;
        let want = max + v.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln();
        assert!((lse - want).abs() < 1e-6, "{lse} vs {want}");
    }

    #[test]
    fn vector_max_matches_the_scalar_fold() {
        let mut rng = Rng::new(2);
        for len in [0, 1, 15, 16, 17, 100, 1000] {
            let mut v: Vec<f32> = (0..len).map(|_| rng.normal() * 10.0).collect();
            if len > 20 {
                v[7] = f32::NAN;
                v[19] = -0.0;
            }
            let want = v.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            assert_eq!(max_value(&v).to_bits(), want.to_bits(), "len {len}");
            let mut w = v.clone();
            let got = scale_max(&mut w, 0.5);
            let scaled: Vec<f32> = v.iter().map(|x| x * 0.5).collect();
            let want = scaled.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            assert_eq!(got.to_bits(), want.to_bits(), "len {len}");
            for (a, b) in w.iter().zip(&scaled) {
                assert!(a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()));
            }
        }
    }

    #[test]
    fn top_k_matches_a_full_sort() {
        let mut rng = Rng::new(11);
        for len in [1, 5, 40, 300, 5000] {
            // Few distinct values, so ties are common; negative zeros, infinities and a NaN
            // exercise the total order.
            let mut v: Vec<f32> = (0..len).map(|_| (rng.normal() * 3.0).round()).collect();
            if len >= 300 {
                v[3] = -0.0;
                v[100] = f32::NEG_INFINITY;
                v[200] = f32::INFINITY;
                v[250] = f32::NAN;
            }
            for k in [1, 4, 32, 400] {
                let mut want: Vec<(u32, f32)> =
                    v.iter().enumerate().map(|(i, &x)| (i as u32, x)).collect();
                want.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
                want.truncate(k);
                let bits = |t: Vec<(u32, f32)>| -> Vec<(u32, u32)> {
                    t.into_iter().map(|(i, x)| (i, x.to_bits())).collect()
                };
                assert_eq!(bits(top_k_logits(&v, k)), bits(want), "len {len} k {k}");
            }
        }
    }
}
