//! Products over BF16 panels on AMX tiles (`tdpbf16ps`), exact in f32.
//!
//! Each f32 activation `x` is split into three bf16 values `hi + mid + lo = x`, exactly:
//! `hi` keeps the top 8 significant bits, `mid` the next 8 of the remainder and `lo` what is
//! left, at most 8 bits. A bf16 weight times a bf16 part is a product of two 8-bit
//! significands, exact in f32, and the tile unit accumulates the three products of every
//! column into one f32 sum. The result is the f32 product with the dequantized weights up to
//! summation order, as the vector kernels' is, but the order differs from theirs: AMX and
//! AVX-512 products of one matrix agree within f32 rounding, not bit for bit. Within the AMX
//! path every output element is summed in one fixed order (per 32-column block, the three
//! parts in turn), whatever rows share its batch and however panels are split over threads.
//!
//! BF16 panels are stored in the tiles' pair-interleaved order: per 32-column block, 16
//! pairs of columns `(2i, 2i + 1)`, each holding the 16 rows' two values side by side.
//!
//! BF16 rows read in place (as a file stores them) swap the operands: 16 weight rows × 32
//! columns are the first tile, loaded with the row length as stride, and the activations'
//! parts the second, pair-interleaved as the panels are; the sums are then `W·xᵀ`, 16 output
//! rows × 16 input rows, written transposed. `tdpbf16ps` forms every element from the same
//! products in the same order whichever operand holds the weights, so the two give the same
//! bits.

use super::{PANEL, PanelFormat, PanelView, QK, SendPtr};
use rayon::prelude::*;
use std::arch::asm;
use std::arch::x86_64::__cpuid_count;

/// Input rows split and multiplied together: a multiple of two 16-row tiles.
const ROW_BLOCK: usize = 256;
/// Tile rows (input rows of an activation tile, output rows of a weight tile).
const TILE: usize = 16;
/// Blocks ahead that a decoding step's weight loads are prefetched.
const AHEAD: usize = 4;

/// Whether the CPU and the OS give this process AMX-BF16 tiles. The first call asks Linux for
/// the tile data state (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`).
pub(super) fn detected() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| {
        // CPUID leaf 7 exists on every x86_64 CPU that reaches this code: the caller checked
        // AVX-512F, which is reported in the same leaf.
        let leaf7 = __cpuid_count(7, 0);
        let (amx_bf16, amx_tile) = (leaf7.edx >> 22 & 1 == 1, leaf7.edx >> 24 & 1 == 1);
        amx_bf16 && amx_tile && request_tile_data()
    })
}

#[cfg(target_os = "linux")]
fn request_tile_data() -> bool {
    const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
    const XFEATURE_XTILEDATA: i64 = 18;
    const SYS_ARCH_PRCTL: i64 = 158;
    let ret: i64;
    // SAFETY: arch_prctl with ARCH_REQ_XCOMP_PERM only changes which register states this
    // process may use; it reads and writes no memory. The syscall clobbers rcx and r11.
    unsafe {
        asm!("syscall",
            inlateout("rax") SYS_ARCH_PRCTL => ret,
            in("rdi") ARCH_REQ_XCOMP_PERM,
            in("rsi") XFEATURE_XTILEDATA,
            lateout("rcx") _, lateout("r11") _,
            options(nostack));
    }
    ret == 0
}

#[cfg(not(target_os = "linux"))]
fn request_tile_data() -> bool {
    false
}

/// The three bf16 parts of `x`, exactly `x = hi + mid + lo` (for |x| above 2⁻¹¹⁰, where no
/// part is subnormal).
#[inline(always)]
pub(super) fn split(x: f32) -> [u16; 3] {
    let hi = x.to_bits() & 0xFFFF_0000;
    let r = x - f32::from_bits(hi);
    let mid = r.to_bits() & 0xFFFF_0000;
    let lo = (r - f32::from_bits(mid)).to_bits();
    [(hi >> 16) as u16, (mid >> 16) as u16, (lo >> 16) as u16]
}

/// Elements of one split tile: 16 rows × 32 columns of one part.
const TILE_ELEMS: usize = TILE * QK;

/// Rows `r0..r1` of `x` (`cols` wide, in `blocks` 32-column blocks) split into `out`, tile by
/// tile: for row tile `t`, block `j` and part `p`, the 16 × 32 bf16 values at
/// `((t·blocks + j)·3 + p)·512`, rows 64 bytes apart, zeros past `cols` and past `r1`.
///
/// With `paired`, each tile holds its 16 rows as the second operand: column pair `i / 2` is
/// tile row `i / 2`, and row `r`'s two values sit at `2r`, `2r + 1` (64 bytes per tile row).
fn split_rows(
    x: &[f32],
    cols: usize,
    blocks: usize,
    (r0, r1): (usize, usize),
    paired: bool,
    out: &mut [u16],
) {
    let per_tile = blocks * 3 * TILE_ELEMS;
    let at = |r: usize, i: usize| {
        if paired {
            (i / 2) * QK + 2 * r + i % 2
        } else {
            r * QK + i
        }
    };
    let tiles = (r1 - r0).div_ceil(TILE);
    let one = |(t, dst): (usize, &mut [u16])| {
        for r in 0..TILE {
            let m = r0 + t * TILE + r;
            let row = if m < r1 {
                &x[m * cols..(m + 1) * cols]
            } else {
                &[][..]
            };
            for j in 0..blocks {
                let base = j * 3 * TILE_ELEMS;
                for i in 0..QK {
                    let c = j * QK + i;
                    let [a, b, l] = if c < row.len() { split(row[c]) } else { [0; 3] };
                    let e = base + at(r, i);
                    dst[e] = a;
                    dst[e + TILE_ELEMS] = b;
                    dst[e + 2 * TILE_ELEMS] = l;
                }
            }
        }
    };
    let out = &mut out[..tiles * per_tile];
    if tiles >= 4 {
        out.par_chunks_mut(per_tile).enumerate().for_each(one);
    } else {
        out.chunks_mut(per_tile).enumerate().for_each(one);
    }
}

thread_local! {
    /// The split activations, kept from one product to the next on the calling thread.
    static PARTS: std::cell::Cell<Vec<u16>> = const { std::cell::Cell::new(Vec::new()) };
}

/// `y = x · Wᵀ` (or `y += x · Wᵀ` with `acc`) for a BF16 view, on the rayon pool split over
/// output panels (`parallel`) or on the calling thread, by [`tiles`].
///
/// # Safety
/// [`PanelView::check`] passed for `x`, `n` and `y`; [`detected`] returned true.
pub(super) unsafe fn matmul(
    v: &PanelView<'_>,
    x: &[f32],
    n: usize,
    y: SendPtr,
    acc: bool,
    parallel: bool,
) {
    debug_assert_eq!(v.format, PanelFormat::BF16);
    let groups = v.rows.div_ceil(PANEL);
    // Tasks take whole units of groups: pairs of panels, or a decoding step's four groups of
    // rows.
    let unit = if v.in_rows { 4 } else { 2 };
    let mut parts = PARTS.with(|c| c.take());
    let need = n.min(ROW_BLOCK).div_ceil(TILE) * v.blocks * 3 * TILE_ELEMS;
    if parts.len() < need {
        parts.resize(need, 0);
    }
    let mut r0 = 0;
    while r0 < n {
        let r1 = (r0 + ROW_BLOCK).min(n);
        split_rows(x, v.cols, v.blocks, (r0, r1), v.in_rows, &mut parts);
        let job = Job {
            v,
            a: &parts[..],
            r0,
            r1,
            y,
            acc,
        };
        // SAFETY (both arms): each call writes only the output columns of its groups, and
        // rows r0..r1; the caller's `check` bounds every group and row.
        if parallel {
            let threads = rayon::current_num_threads().max(1);
            let units = groups.div_ceil(unit);
            let per = units.div_ceil((threads * 4).min(units).max(1)) * unit;
            (0..groups.div_ceil(per)).into_par_iter().for_each(|t| {
                let (g0, g1) = (t * per, ((t + 1) * per).min(groups));
                unsafe { tiles(&job, g0, g1) };
            });
        } else {
            unsafe { tiles(&job, 0, groups) };
        }
        r0 = r1;
    }
    PARTS.with(|c| c.set(parts));
}

/// One 32-column block of one group on BF16 rows, for a single input row tile: its three
/// activation parts (tmm4–6) against the group's weight tile (tmm7, rows `stride` bytes
/// apart), summed in turn into sum tile `$t`.
macro_rules! group_block {
    ($t:literal, $at:expr, $w:expr, $stride:expr) => {
        asm!("tileloadd tmm4, [{a0} + {s}*1]", "tileloadd tmm5, [{a1} + {s}*1]",
            "tileloadd tmm6, [{a2} + {s}*1]", "tileloadd tmm7, [{w} + {ws}*1]",
            concat!("tdpbf16ps tmm", $t, ", tmm7, tmm4"),
            concat!("tdpbf16ps tmm", $t, ", tmm7, tmm5"),
            concat!("tdpbf16ps tmm", $t, ", tmm7, tmm6"),
            a0 = in(reg) $at, a1 = in(reg) $at.add(TILE_ELEMS), a2 = in(reg) $at.add(2 * TILE_ELEMS),
            w = in(reg) $w, s = in(reg) 64usize, ws = in(reg) $stride,
            options(nostack, readonly))
    };
}

/// [`one_row_tile`] for BF16 rows read in place: groups `g0..g1` (16 weight rows each)
/// against one input row tile, whose three parts stay in tmm4–6 while tmm7 holds the
/// weights (see [`group_block`]); tmm0–3 sum four groups.
///
/// # Safety
/// As [`tiles`].
unsafe fn one_row_tile_rows(job: &Job<'_, '_>, g0: usize, g1: usize) {
    let (v, a, y) = (job.v, job.a, job.y);
    let (r0, r1, acc) = (job.r0, job.r1, job.acc);
    let cfg = Config::new();
    let stride = v.cols * 2;
    let mut out: [Out; 4] = std::array::from_fn(|_| Out([0.0; TILE * TILE]));
    // SAFETY: the configuration is valid for palette 1; weight loads read 16 rows of 64 bytes
    // of groups below g1 (whole groups: `check` bounded the rows), activation loads whole
    // split tiles inside `a`; stores go to `out`.
    unsafe {
        asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly));
        let base = v.data.as_ptr();
        let mut g = g0;
        while g < g1 {
            let q = (g1 - g).min(4);
            zero_sums();
            // One group after the other, each over all its columns: 16 rows, each read
            // straight through, are the only weights in flight. Interleaving the four
            // groups block by block keeps 64 rows in flight, which streams more slowly
            // from a weight file's pages (measured on a 1.1B dump, 2-core Xeon).
            for k in 0..q {
                let wk = base.add((g + k) * v.group_bytes);
                for j in 0..v.blocks {
                    let at = a.as_ptr().add(3 * j * TILE_ELEMS);
                    let wj = wk.add(j * 2 * QK);
                    match k {
                        0 => group_block!("0", at, wj, stride),
                        1 => group_block!("1", at, wj, stride),
                        2 => group_block!("2", at, wj, stride),
                        _ => group_block!("3", at, wj, stride),
                    }
                }
            }
            store_sums(&mut out);
            for (k, o) in out.iter().take(q).enumerate() {
                write(v, o, r0, r1, g + k, y, acc);
            }
            g += q;
        }
        asm!("tilerelease", options(nostack, nomem));
    }
}

/// Stores the four sum tiles tmm0–3 into `out`.
///
/// # Safety
/// A tile configuration is loaded.
#[inline(always)]
unsafe fn store_sums(out: &mut [Out; 4]) {
    // SAFETY: each store writes 16 rows of 64 bytes into one `Out`.
    unsafe {
        asm!("tilestored [{a} + {s}*1], tmm0", "tilestored [{b} + {s}*1], tmm1",
            "tilestored [{c} + {s}*1], tmm2", "tilestored [{d} + {s}*1], tmm3",
            a = in(reg) out[0].0.as_mut_ptr(), b = in(reg) out[1].0.as_mut_ptr(),
            c = in(reg) out[2].0.as_mut_ptr(), d = in(reg) out[3].0.as_mut_ptr(),
            s = in(reg) 64usize, options(nostack));
    }
}

/// Tile configuration (palette 1): eight tiles of 16 rows × 64 bytes.
#[repr(C, align(64))]
struct Config([u8; 64]);

impl Config {
    fn new() -> Self {
        let mut c = [0u8; 64];
        c[0] = 1;
        for t in 0..8 {
            c[16 + 2 * t] = 64; // bytes per row, little-endian u16
            c[48 + t] = TILE as u8;
        }
        Config(c)
    }
}

/// 16 × 16 f32 results of one tile.
#[repr(C, align(64))]
struct Out([f32; TILE * TILE]);

/// One row block of a product: the panels, input rows `r0..r1` split in `a` by
/// [`split_rows`], the output and whether to add to it.
struct Job<'a, 'v> {
    v: &'a PanelView<'v>,
    a: &'a [u16],
    r0: usize,
    r1: usize,
    y: SendPtr,
    acc: bool,
}

/// Panels `g0..g1` of a job.
/// Tiles: tmm0–3 sums (two row tiles × two panels), tmm4–5 activations, tmm6–7 weights.
///
/// # Safety
/// As [`matmul`]; no other thread writes these panels' columns.
unsafe fn tiles(job: &Job<'_, '_>, g0: usize, g1: usize) {
    let Job {
        v,
        a,
        r0,
        r1,
        y,
        acc,
    } = *job;
    let cfg = Config::new();
    let per_tile = v.blocks * 3 * TILE_ELEMS;
    let row_tiles = (r1 - r0).div_ceil(TILE);
    if row_tiles == 1 {
        // SAFETY: as this function's.
        return unsafe {
            if v.in_rows {
                one_row_tile_rows(job, g0, g1)
            } else {
                one_row_tile(job, g0, g1)
            }
        };
    }
    // A weight tile of block j: 16 pair-interleaved rows of 64 bytes in a panel's block, or
    // 64 bytes of each of 16 rows read in place (the row length apart).
    let (block, stride) = if v.in_rows {
        (2 * QK, v.cols * 2)
    } else {
        (PanelFormat::BF16.block_bytes(), 64)
    };
    let mut out: [Out; 4] = std::array::from_fn(|_| Out([0.0; TILE * TILE]));
    // SAFETY: the configuration is valid for palette 1; every tile load reads 16 rows of 64
    // bytes inside `a` (whole split tiles) or inside group g's weights, which `check`
    // bounded; stores go to `out`.
    unsafe {
        asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly));
        let mut g = g0;
        while g < g1 {
            let two = g + 1 < g1;
            let w0 = v.data.as_ptr().add(g * v.group_bytes);
            let w1 = if two { w0.add(v.group_bytes) } else { w0 };
            let mut t = 0;
            while t < row_tiles {
                let pair = t + 1 < row_tiles;
                zero_sums();
                let a0 = a.as_ptr().add(t * per_tile);
                for j in 0..v.blocks {
                    asm!("tileloadd tmm6, [{w0} + {s}*1]", "tileloadd tmm7, [{w1} + {s}*1]",
                        w0 = in(reg) w0.add(j * block), w1 = in(reg) w1.add(j * block),
                        s = in(reg) stride, options(nostack, readonly));
                    for p in 0..3 {
                        let at = a0.add((3 * j + p) * TILE_ELEMS);
                        // Sum k of tmm0–3 is input row tile t + k / 2 against group g + k % 2;
                        // the operands' order follows the weights' layout.
                        match (pair, v.in_rows) {
                            (true, false) => asm!("tileloadd tmm4, [{a} + {s}*1]",
                                "tileloadd tmm5, [{b} + {s}*1]",
                                "tdpbf16ps tmm0, tmm4, tmm6", "tdpbf16ps tmm1, tmm4, tmm7",
                                "tdpbf16ps tmm2, tmm5, tmm6", "tdpbf16ps tmm3, tmm5, tmm7",
                                a = in(reg) at, b = in(reg) at.add(per_tile),
                                s = in(reg) 64usize, options(nostack, readonly)),
                            (true, true) => asm!("tileloadd tmm4, [{a} + {s}*1]",
                                "tileloadd tmm5, [{b} + {s}*1]",
                                "tdpbf16ps tmm0, tmm6, tmm4", "tdpbf16ps tmm1, tmm7, tmm4",
                                "tdpbf16ps tmm2, tmm6, tmm5", "tdpbf16ps tmm3, tmm7, tmm5",
                                a = in(reg) at, b = in(reg) at.add(per_tile),
                                s = in(reg) 64usize, options(nostack, readonly)),
                            (false, false) => asm!("tileloadd tmm4, [{a} + {s}*1]",
                                "tdpbf16ps tmm0, tmm4, tmm6", "tdpbf16ps tmm1, tmm4, tmm7",
                                a = in(reg) at, s = in(reg) 64usize,
                                options(nostack, readonly)),
                            (false, true) => asm!("tileloadd tmm4, [{a} + {s}*1]",
                                "tdpbf16ps tmm0, tmm6, tmm4", "tdpbf16ps tmm1, tmm7, tmm4",
                                a = in(reg) at, s = in(reg) 64usize,
                                options(nostack, readonly)),
                        }
                    }
                }
                store_sums(&mut out);
                for (k, o) in out.iter().enumerate() {
                    let (rt, pb) = (t + k / 2, k % 2);
                    if (pb == 1 && !two) || (rt > t && !pair) {
                        continue;
                    }
                    write(v, o, r0 + rt * TILE, r1, g + pb, y, acc);
                }
                t += if pair { 2 } else { 1 };
            }
            g += if two { 2 } else { 1 };
        }
        asm!("tilerelease", options(nostack, nomem));
    }
}

/// [`tiles`] for at most 16 input rows (a decoding step): four panels at a time, so that four
/// sums are in flight. Each sum runs in the order [`tiles`] uses (per block, the three parts
/// in turn), so a row gets the same bits alone or in a larger batch.
/// Tiles: tmm0–3 sums, tmm4 activations, tmm5–7 weights.
///
/// # Safety
/// As [`tiles`].
unsafe fn one_row_tile(job: &Job<'_, '_>, g0: usize, g1: usize) {
    let (v, a, y) = (job.v, job.a, job.y);
    let (r0, r1, acc) = (job.r0, job.r1, job.acc);
    let cfg = Config::new();
    let bb = PanelFormat::BF16.block_bytes();
    let mut out: [Out; 4] = std::array::from_fn(|_| Out([0.0; TILE * TILE]));
    // SAFETY: as in `tiles`; panels past g1 are never loaded (the first panel stands in).
    unsafe {
        asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly));
        let mut g = g0;
        while g < g1 {
            let q = (g1 - g).min(4);
            let w: [*const u8; 4] =
                std::array::from_fn(|k| v.data.as_ptr().add((g + k.min(q - 1)) * v.group_bytes));
            zero_sums();
            for j in 0..v.blocks {
                // The weights stream from memory: ask for blocks a few ahead.
                if j + AHEAD < v.blocks {
                    for p in &w {
                        let b = p.add((j + AHEAD) * bb);
                        for l in (0..bb).step_by(64) {
                            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                                b.add(l) as *const i8,
                            );
                        }
                    }
                }
                let at = a.as_ptr().add(3 * j * TILE_ELEMS);
                let (a0, a1, a2) = (at, at.add(TILE_ELEMS), at.add(2 * TILE_ELEMS));
                asm!("tileloadd tmm5, [{w0} + {s}*1]", "tileloadd tmm6, [{w1} + {s}*1]",
                    "tileloadd tmm7, [{w2} + {s}*1]",
                    "tileloadd tmm4, [{a0} + {s}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm5", "tdpbf16ps tmm1, tmm4, tmm6",
                    "tdpbf16ps tmm2, tmm4, tmm7",
                    "tileloadd tmm4, [{a1} + {s}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm5", "tdpbf16ps tmm1, tmm4, tmm6",
                    "tdpbf16ps tmm2, tmm4, tmm7",
                    "tileloadd tmm4, [{a2} + {s}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm5", "tdpbf16ps tmm1, tmm4, tmm6",
                    "tdpbf16ps tmm2, tmm4, tmm7",
                    "tileloadd tmm5, [{w3} + {s}*1]",
                    "tileloadd tmm4, [{a0} + {s}*1]", "tdpbf16ps tmm3, tmm4, tmm5",
                    "tileloadd tmm4, [{a1} + {s}*1]", "tdpbf16ps tmm3, tmm4, tmm5",
                    "tileloadd tmm4, [{a2} + {s}*1]", "tdpbf16ps tmm3, tmm4, tmm5",
                    w0 = in(reg) w[0].add(j * bb), w1 = in(reg) w[1].add(j * bb),
                    w2 = in(reg) w[2].add(j * bb), w3 = in(reg) w[3].add(j * bb),
                    a0 = in(reg) a0, a1 = in(reg) a1, a2 = in(reg) a2,
                    s = in(reg) 64usize, options(nostack, readonly));
            }
            store_sums(&mut out);
            for (k, o) in out.iter().take(q).enumerate() {
                write(v, o, r0, r1, g + k, y, acc);
            }
            g += q;
        }
        asm!("tilerelease", options(nostack, nomem));
    }
}

/// Zeroes the four sum tiles tmm0–3.
///
/// # Safety
/// A tile configuration is loaded.
#[inline(always)]
unsafe fn zero_sums() {
    // SAFETY: as this function's; tilezero touches no memory.
    unsafe {
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            options(nostack, nomem)
        )
    };
}

/// Writes (or adds) one sum tile's valid input rows (`m0..r1`) and the valid output columns
/// of group `g` into `y`. The tile holds input row `m` and weight row `c` at `o[m·16 + c]`
/// from panels, transposed (`o[c·16 + m]`) from BF16 rows read in place.
///
/// # Safety
/// As [`tiles`].
unsafe fn write(v: &PanelView<'_>, o: &Out, m0: usize, r1: usize, g: usize, y: SendPtr, acc: bool) {
    let cols = PANEL.min(v.rows - g * PANEL);
    let (row_step, col_step) = if v.in_rows { (1, TILE) } else { (TILE, 1) };
    for m in 0..TILE.min(r1 - m0) {
        // SAFETY: row m0 + m < n and columns y_col0 + g·16 + (0..cols) lie inside y.
        let dst = unsafe {
            std::slice::from_raw_parts_mut(
                y.0.add((m0 + m) * v.y_stride + v.y_col0 + g * PANEL),
                cols,
            )
        };
        for (c, d) in dst.iter_mut().enumerate() {
            let s = o.0[m * row_step + c * col_step];
            if acc {
                *d += s;
            } else {
                *d = s;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::split;

    #[test]
    fn the_three_parts_sum_to_the_value_exactly() {
        let mut rng = crate::Rng::new(3);
        for k in 0..100_000 {
            let x = rng.normal() * 10f32.powi(k % 13 - 6);
            let [a, b, c] = split(x);
            let f = |h: u16| f32::from_bits((h as u32) << 16) as f64;
            assert_eq!(f(a) + f(b) + f(c), x as f64, "{x}");
            assert_eq!((f(a) + (f(b) + f(c))) as f32, x);
        }
    }
}
