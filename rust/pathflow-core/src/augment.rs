//! Fused colour augmentations: the float stages of the self-supervised loader's CPU path.
//!
//! [`augment_views`] turns a batch of `S x S` RGB8 crops of one view (what
//! [`crate::views::decode_views`] cuts) into the finished `(N, 3, S, S)` tensor, with per-sample
//! parameters ([`ViewColor`], drawn in Python by `pathflow.data.views.sample_view_params`). It
//! computes the same numbers, up to float32 rounding, as the torch reference
//! `pathflow.data.augment_torch.apply_color_stages` followed by `finish`. Per sample:
//!
//! 1. `x = u8 / 255`.
//! 2. RandStainNA ([`Stain`]): sRGB (D65) -> CIE LAB with skimage's matrices, per-image channel
//!    mean and population std (std clamped to >= 1e-3), `lab' = (lab - mu) / sd * std + mean`,
//!    LAB -> sRGB (linear RGB clamped to [0, 1] before the gamma, the result clamped too).
//! 3. HED jitter ([`Hed`]): `L = ln(max(x, 1e-6))`, `x = clamp(exp(M L + o), 0, 1)`.
//! 4. Colour jitter ([`ColorJitter`]): `x = clamp(M x + k * m, 0, 1)`, `m` the image's mean of
//!    `0.299 R + 0.587 G + 0.114 B`.
//! 5. Gaussian blur (`blur_sigma > 0`): separable, horizontal then vertical, reflect-101
//!    borders, taps from [`gaussian_taps`] (computed in f64 like the reference).
//! 6. Solarisation: `x >= 0.5 -> 1 - x`.
//! 7. Output ([`Output`]): normalised float32 `(x - mean) / std`, the same as bfloat16 bits
//!    (round to nearest even, like torch's `.to(torch.bfloat16)`), or uint8
//!    `clamp(round_half_even(255 x), 0, 255)` without normalisation.
//!
//! Images are f32 like the reference; reductions (means, std) accumulate in f64, and
//! RandStainNA's cube roots and its new-LAB -> linear-RGB step use f64 too, because that matrix
//! nearly cancels in saturated dark colours (where HED's log then magnifies relative errors).
//!
//! Passes per sample: the crop is decoded into three f32 planes with stages 1-3 applied
//! (elementwise loops over whole planes; RandStainNA needs its LAB statistics in between);
//! colour jitter + the horizontal blur then read the planes a row at a time into a blurred
//! copy, and the vertical blur produces whole output rows that are finished (stages 6-7)
//! straight into the output. Without a blur, colour + finishing is one row-wise pass. The
//! loops are branch-free over contiguous memory so that the compiler vectorises them, the
//! `ln`/`exp` of stages 2-3 included ([`ln_fast`], [`exp_fast`]: within 2 ulp, only run when
//! those stages are on), and on x86-64 the kernel is also compiled for AVX2 and picked at run
//! time (same operations in the same order, so the same results). Scratch planes live in a
//! reusable [`Augmenter`] (one per worker thread in [`augment_views`]).
//!
//! Errors: mismatched lengths, a blur window that does not fit the view (`ceil(3 sigma) >= S`,
//! where the reference's reflect padding fails too), a negative or non-finite sigma and a
//! zero or non-finite normalisation std are [`crate::CoreError::InvalidArgument`].

use std::cell::RefCell;
use std::sync::OnceLock;

use rayon::prelude::*;

use crate::error::{invalid, CoreError, Result};

/// What [`augment_views`] writes per value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    /// float32, normalised: `(x - mean) / std`.
    Float,
    /// The normalised value as bfloat16 bits (`u16`), rounded to nearest even.
    BFloat16,
    /// uint8 `clamp(round_half_even(255 x), 0, 255)`, not normalised.
    Uint8,
}

impl std::str::FromStr for Output {
    type Err = CoreError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "float" | "float32" => Ok(Self::Float),
            "bfloat16" => Ok(Self::BFloat16),
            "uint8" => Ok(Self::Uint8),
            _ => Err(invalid(format!(
                "unknown output {s:?} (float, bfloat16 or uint8)"
            ))),
        }
    }
}

/// RandStainNA targets: the LAB channel mean and std the image is given.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Stain {
    /// Target per-channel mean (L, a, b).
    pub mean: [f32; 3],
    /// Target per-channel std (L, a, b).
    pub std: [f32; 3],
}

/// HED jitter as a linear map on log intensities: `L' = matrix @ L + offset`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Hed {
    /// Row-major 3x3 matrix applied to the column vector of log R, G, B.
    pub matrix: [[f32; 3]; 3],
    /// Added after the matrix.
    pub offset: [f32; 3],
}

/// Colour jitter (brightness, contrast, saturation, hue, grayscale) as one affine map:
/// `x' = matrix @ x + k * mean(luma(x))`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ColorJitter {
    /// Row-major 3x3 matrix applied to the column vector R, G, B.
    pub matrix: [[f32; 3]; 3],
    /// Weight of the image's mean luma, added to every channel.
    pub k: f32,
}

/// The float stages of one sample's view; `None` / 0 / `false` switches a stage off.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ViewColor {
    /// RandStainNA.
    pub stain: Option<Stain>,
    /// HED jitter.
    pub hed: Option<Hed>,
    /// Colour jitter.
    pub color: Option<ColorJitter>,
    /// Gaussian blur sigma in pixels, 0 = off.
    pub blur_sigma: f32,
    /// Solarisation.
    pub solarize: bool,
}

/// Per-sample parameters of a batch as flat columns (what a caller holding arrays has):
/// `n` flags per stage and the stage's values row-major (3 per mean/std/offset, 9 per
/// matrix). See [`ColorColumns::view_colors`].
#[derive(Clone, Copy, Debug)]
pub struct ColorColumns<'a> {
    /// RandStainNA on/off, `n`.
    pub stain: &'a [bool],
    /// RandStainNA target means, `3n`.
    pub stain_mean: &'a [f32],
    /// RandStainNA target stds, `3n`.
    pub stain_std: &'a [f32],
    /// HED on/off, `n`.
    pub hed: &'a [bool],
    /// HED matrices, `9n`.
    pub hed_matrix: &'a [f32],
    /// HED offsets, `3n`.
    pub hed_offset: &'a [f32],
    /// Colour jitter on/off, `n`.
    pub color: &'a [bool],
    /// Colour jitter matrices, `9n`.
    pub color_matrix: &'a [f32],
    /// Colour jitter luma weights, `n`.
    pub color_k: &'a [f32],
    /// Blur sigmas, `n`.
    pub blur_sigma: &'a [f32],
    /// Solarisation on/off, `n`.
    pub solarize: &'a [bool],
}

impl ColorColumns<'_> {
    /// The [`ViewColor`] of each of the `n` samples (a stage whose flag is off is `None`).
    pub fn view_colors(&self, n: usize) -> Result<Vec<ViewColor>> {
        let cols: [(&str, usize, usize); 11] = [
            ("stain", self.stain.len(), 1),
            ("stain_mean", self.stain_mean.len(), 3),
            ("stain_std", self.stain_std.len(), 3),
            ("hed", self.hed.len(), 1),
            ("hed_matrix", self.hed_matrix.len(), 9),
            ("hed_offset", self.hed_offset.len(), 3),
            ("color", self.color.len(), 1),
            ("color_matrix", self.color_matrix.len(), 9),
            ("color_k", self.color_k.len(), 1),
            ("blur_sigma", self.blur_sigma.len(), 1),
            ("solarize", self.solarize.len(), 1),
        ];
        for (name, len, per) in cols {
            if len != n * per {
                return Err(CoreError::Shape(format!(
                    "{name} has {len} values, expected {} ({n} samples x {per})",
                    n * per
                )));
            }
        }
        let row3 = |a: &[f32], i: usize| -> [f32; 3] { std::array::from_fn(|j| a[3 * i + j]) };
        let mat3 = |a: &[f32], i: usize| -> [[f32; 3]; 3] {
            std::array::from_fn(|r| std::array::from_fn(|c| a[9 * i + 3 * r + c]))
        };
        Ok((0..n)
            .map(|i| ViewColor {
                stain: self.stain[i].then(|| Stain {
                    mean: row3(self.stain_mean, i),
                    std: row3(self.stain_std, i),
                }),
                hed: self.hed[i].then(|| Hed {
                    matrix: mat3(self.hed_matrix, i),
                    offset: row3(self.hed_offset, i),
                }),
                color: self.color[i].then(|| ColorJitter {
                    matrix: mat3(self.color_matrix, i),
                    k: self.color_k[i],
                }),
                blur_sigma: self.blur_sigma[i],
                solarize: self.solarize[i],
            })
            .collect())
    }
}

/// Output normalisation `(x - mean) / std` per channel (float and bfloat16 outputs).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Normalize {
    /// Per-channel mean (R, G, B).
    pub mean: [f32; 3],
    /// Per-channel std (R, G, B), nonzero.
    pub std: [f32; 3],
}

/// An output buffer in channel-first layout: `3 * S * S` values per sample.
#[derive(Debug)]
pub enum OutBuf<'a> {
    /// [`Output::Float`].
    Float(&'a mut [f32]),
    /// [`Output::BFloat16`] bits.
    BFloat16(&'a mut [u16]),
    /// [`Output::Uint8`].
    Uint8(&'a mut [u8]),
}

impl OutBuf<'_> {
    fn len(&self) -> usize {
        match self {
            Self::Float(o) => o.len(),
            Self::BFloat16(o) => o.len(),
            Self::Uint8(o) => o.len(),
        }
    }
}

// ------------------------------------------------------------------------------ constants

/// sRGB (D65) -> CIE XYZ, as in skimage.color (and `augment_torch`).
const XYZ_FROM_RGB: [[f64; 3]; 3] = [
    [0.412453, 0.357580, 0.180423],
    [0.212671, 0.715160, 0.072169],
    [0.019334, 0.119193, 0.950227],
];
/// The D65 white point.
const WHITE: [f64; 3] = [0.95047, 1.0, 1.08883];
/// Luma weights of the colour stage's mean.
const LUMA: [f64; 3] = [0.299, 0.587, 0.114];

/// Constants of the LAB conversions, in the precision the reference uses them.
struct Lab {
    /// `XYZ_FROM_RGB / WHITE[:, None]` (f64, then f32).
    to_xyz: [[f32; 3]; 3],
    /// `inv(XYZ_FROM_RGB) * WHITE[None, :]`, kept in f64.
    to_rgb64: [[f64; 3]; 3],
    /// sRGB u8 -> linear RGB, the reference's f32 formula for each of the 256 values.
    linear: [f32; 256],
    /// `ln(max(u8 / 255, 1e-6))` for each of the 256 values (HED without RandStainNA).
    log: [f32; 256],
}

const LAB_EPS: f32 = ((6.0f64 / 29.0) * (6.0 / 29.0) * (6.0 / 29.0)) as f32;
const LAB_KAPPA: f32 = (1.0f64 / (3.0 * (6.0 / 29.0) * (6.0 / 29.0))) as f32;
const FOUR_29: f32 = (4.0f64 / 29.0) as f32;
const THIRD: f32 = (1.0f64 / 3.0) as f32;
const INV_GAMMA: f32 = (1.0f64 / 2.4) as f32;

fn inverse3(m: &[[f64; 3]; 3]) -> [[f64; 3]; 3] {
    let c = |r: usize, k: usize| {
        let (r1, r2) = ((r + 1) % 3, (r + 2) % 3);
        let (k1, k2) = ((k + 1) % 3, (k + 2) % 3);
        m[r1][k1] * m[r2][k2] - m[r1][k2] * m[r2][k1]
    };
    let det = m[0][0] * c(0, 0) + m[0][1] * c(0, 1) + m[0][2] * c(0, 2);
    let mut inv = [[0.0; 3]; 3];
    for (i, row) in inv.iter_mut().enumerate() {
        for (j, v) in row.iter_mut().enumerate() {
            *v = c(j, i) / det;
        }
    }
    inv
}

fn lab() -> &'static Lab {
    static LAB: OnceLock<Lab> = OnceLock::new();
    LAB.get_or_init(|| {
        let inv = inverse3(&XYZ_FROM_RGB);
        let mut to_xyz = [[0.0; 3]; 3];
        let mut to_rgb64 = [[0.0; 3]; 3];
        for i in 0..3 {
            for j in 0..3 {
                to_xyz[i][j] = (XYZ_FROM_RGB[i][j] / WHITE[i]) as f32;
                to_rgb64[i][j] = inv[i][j] * WHITE[j];
            }
        }
        let mut linear = [0.0; 256];
        let mut log = [0.0; 256];
        for v in 0..256 {
            let x = v as f32 / 255.0;
            linear[v] = if x > 0.04045 {
                ((x + 0.055) / 1.055).powf(2.4)
            } else {
                x / 12.92
            };
            log[v] = x.max(1e-6).ln();
        }
        Lab {
            to_xyz,
            to_rgb64,
            linear,
            log,
        }
    })
}

// ------------------------------------------------------------------- vectorisable math

/// Natural log of a positive, normal `x` (Cephes `logf`; within 2 ulp), branch-free so that
/// loops calling it vectorise. Not for 0, subnormals, infinities or NaN.
#[inline(always)]
pub fn ln_fast(x: f32) -> f32 {
    let bits = x.to_bits();
    // x = m * 2^e with m in [0.5, 1).
    let e = ((bits >> 23) & 0xFF) as i32 - 126;
    let m = f32::from_bits((bits & 0x007F_FFFF) | 0x3F00_0000);
    // Shift m into [sqrt(0.5), sqrt(2)) and take m - 1.
    let small = m < std::f32::consts::FRAC_1_SQRT_2;
    let e = (if small { e - 1 } else { e }) as f32;
    let m = if small { m + m - 1.0 } else { m - 1.0 };
    let z = m * m;
    let mut y = 7.037_683_6e-2;
    y = y * m - 1.151_461_1e-1;
    y = y * m + 1.167_699_9e-1;
    y = y * m - 1.242_014_1e-1;
    y = y * m + 1.424_932_3e-1;
    y = y * m - 1.666_805_8e-1;
    y = y * m + 2.000_071_5e-1;
    y = y * m - 2.499_999_4e-1;
    y = y * m + 3.333_333e-1;
    y = y * m * z;
    y += -2.121_944_4e-4 * e;
    y += -0.5 * z;
    m + y + 0.693_359_4 * e
}

/// `e^x` (Cephes `expf`; within 2 ulp for results in the normal range), branch-free. Arguments
/// are clamped to [-87.3, 88.7]: tiny results stay near `f32::MIN_POSITIVE` instead of 0.
#[inline(always)]
pub fn exp_fast(x: f32) -> f32 {
    // Adding 1.5 * 2^23 rounds to an integer n, which then sits in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.336_54, 88.722_83);
    let t = x * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let z = r * r;
    let mut y = 1.987_569_1e-4;
    y = y * r + 1.398_199_9e-3;
    y = y * r + 8.333_452e-3;
    y = y * r + 4.166_579_6e-2;
    y = y * r + 1.666_666_5e-1;
    y = y * r + 5e-1;
    y = y * z + r + 1.0;
    // 2^n from the bits of t (= bits(ROUND) + n): integer ops only, so loops vectorise.
    let two_n = t
        .to_bits()
        .wrapping_sub(ROUND.to_bits())
        .wrapping_add(127)
        .wrapping_shl(23);
    y * f32::from_bits(two_n)
}

/// `x^p` for positive normal `x` as `exp(p ln x)`.
#[inline(always)]
fn pow_fast(x: f32, p: f32) -> f32 {
    exp_fast(p * ln_fast(x))
}

#[inline(always)]
fn clamp01(v: f32) -> f32 {
    v.clamp(0.0, 1.0)
}

/// f32 -> bfloat16 bits, round to nearest even; NaN -> 0x7FC0 (torch's conversion).
#[inline(always)]
pub fn bf16_bits(v: f32) -> u16 {
    let b = v.to_bits();
    let r = (b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16) as u16;
    if v.is_nan() {
        0x7FC0
    } else {
        r
    }
}

/// `[0, 1]` float -> uint8 as `clamp(round_half_even(255 x), 0, 255)` (NaN -> 0).
#[inline(always)]
#[allow(clippy::manual_clamp)] // max/min map NaN to 0, clamp would keep it
pub fn to_u8(v: f32) -> u8 {
    // Adding 2^23 rounds half to even in [0, 2^23) and leaves the integer in the low bits.
    const ROUND: f32 = 8_388_608.0;
    let t = (v * 255.0).max(0.0).min(255.0);
    ((t + ROUND).to_bits().wrapping_sub(ROUND.to_bits()) & 0xFF) as u8
}

/// Sum of a plane: f32 lanes over short blocks, f64 across blocks.
#[inline(always)]
fn plane_sum(plane: &[f32]) -> f64 {
    const LANES: usize = 8;
    let mut total = 0.0f64;
    for block in plane.chunks(512) {
        let mut acc = [0.0f32; LANES];
        let mut it = block.chunks_exact(LANES);
        for c in &mut it {
            for (a, &v) in acc.iter_mut().zip(c) {
                *a += v;
            }
        }
        let rest: f32 = it.remainder().iter().sum();
        total += acc.iter().map(|&a| f64::from(a)).sum::<f64>() + f64::from(rest);
    }
    total
}

/// `(sum(v - shift), sum((v - shift)^2))` of a plane, like [`plane_sum`].
#[inline(always)]
fn plane_moments(plane: &[f32], shift: f32) -> (f64, f64) {
    const LANES: usize = 8;
    let (mut s1, mut s2) = (0.0f64, 0.0f64);
    for block in plane.chunks(512) {
        let mut a1 = [0.0f32; LANES];
        let mut a2 = [0.0f32; LANES];
        let mut it = block.chunks_exact(LANES);
        for c in &mut it {
            for ((a, b), &v) in a1.iter_mut().zip(a2.iter_mut()).zip(c) {
                let d = v - shift;
                *a += d;
                *b += d * d;
            }
        }
        for &v in it.remainder() {
            let d = v - shift;
            a1[0] += d;
            a2[0] += d * d;
        }
        s1 += a1.iter().map(|&a| f64::from(a)).sum::<f64>();
        s2 += a2.iter().map(|&a| f64::from(a)).sum::<f64>();
    }
    (s1, s2)
}

// ------------------------------------------------------------------------------- blur

/// Normalised Gaussian taps of `sigma` (> 0): window `2 * ceil(3 sigma) + 1`,
/// `g(t) = exp(-t^2 / (2 sigma^2))` for `t = -h..=h`, computed and normalised in f64 and then
/// rounded to f32 (like `augment_torch.gaussian_kernels`). Empty for `sigma <= 0`.
pub fn gaussian_taps(sigma: f32) -> Vec<f32> {
    let mut taps = Vec::new();
    fill_taps(sigma, &mut taps);
    taps
}

fn blur_half(sigma: f32) -> usize {
    (3.0 * f64::from(sigma)).ceil() as usize
}

fn fill_taps(sigma: f32, taps: &mut Vec<f32>) {
    taps.clear();
    if sigma.is_nan() || sigma <= 0.0 {
        return;
    }
    let s = f64::from(sigma);
    let h = blur_half(sigma) as i64;
    let g: Vec<f64> = (-h..=h)
        .map(|t| (-0.5 * (t as f64 / s).powi(2)).exp())
        .collect();
    let sum: f64 = g.iter().sum();
    taps.extend(g.iter().map(|&v| (v / sum) as f32));
}

/// Reflect-101 index of `i` (may be out of range by less than `size`).
#[inline(always)]
fn reflect(i: isize, size: usize) -> usize {
    let n = size as isize;
    let j = if i < 0 { -i } else { i };
    (if j >= n { 2 * (n - 1) - j } else { j }) as usize
}

/// Symmetric 1-D convolution of rows: with `K = taps.len() = 2h + 1` and row `t` of the
/// window being `src[offs[t]..]`, `out[x] = taps[h] * row_h[x] + sum_{t<h} taps[t] *
/// (row_t[x] + row_{K-1-t}[x])`. Blocks of 16 outputs stay in registers across the taps.
#[inline(always)]
fn sym_conv(src: &[f32], offs: &[usize], taps: &[f32], out: &mut [f32]) {
    const B: usize = 16;
    let k = taps.len();
    let h = k / 2;
    let centre = taps[h];
    let s = out.len();
    let full = s - s % B;
    for xb in (0..full).step_by(B) {
        let block = |t: usize| -> &[f32; B] {
            src[offs[t] + xb..offs[t] + xb + B]
                .try_into()
                .expect("block of B")
        };
        let c = block(h);
        let mut acc = [0.0f32; B];
        for j in 0..B {
            acc[j] = centre * c[j];
        }
        for (t, &w) in taps[..h].iter().enumerate() {
            let (lo, hi) = (block(t), block(k - 1 - t));
            for j in 0..B {
                acc[j] += w * (lo[j] + hi[j]);
            }
        }
        out[xb..xb + B].copy_from_slice(&acc);
    }
    for (x, o) in out.iter_mut().enumerate().skip(full) {
        let mut acc = centre * src[offs[h] + x];
        for (t, &w) in taps[..h].iter().enumerate() {
            acc += w * (src[offs[t] + x] + src[offs[k - 1 - t] + x]);
        }
        *o = acc;
    }
}

// ---------------------------------------------------------------------------- stages

#[inline(always)]
fn split3(buf: &mut [f32], n: usize) -> (&mut [f32], &mut [f32], &mut [f32]) {
    let (r, rest) = buf[..3 * n].split_at_mut(n);
    let (g, b) = rest.split_at_mut(n);
    (r, g, b)
}

#[inline(always)]
fn mat3(m: &[[f32; 3]; 3], x: [f32; 3]) -> [f32; 3] {
    [
        m[0][0] * x[0] + m[0][1] * x[1] + m[0][2] * x[2],
        m[1][0] * x[0] + m[1][1] * x[1] + m[1][2] * x[2],
        m[2][0] * x[0] + m[2][1] * x[1] + m[2][2] * x[2],
    ]
}

#[inline(always)]
fn hed_log(v: f32) -> f32 {
    ln_fast(v.max(1e-6))
}

/// The LAB `f` of a normalised XYZ value. The cube root is refined by one Newton step in
/// f64 (correctly rounded in practice): LAB -> RGB later cancels to small linear values in
/// saturated dark colours, and a few ulp in `f` show there.
#[inline(always)]
fn lab_f(t: f32) -> f32 {
    let c = t.max(LAB_EPS);
    let y = f64::from(pow_fast(c, THIRD));
    let cube_root = (y - (y * y * y - f64::from(c)) / (3.0 * y * y)) as f32;
    if t > LAB_EPS {
        cube_root
    } else {
        t * LAB_KAPPA + FOUR_29
    }
}

#[inline(always)]
fn lab_f_inv(f: f64) -> f64 {
    const SIX_29: f64 = 6.0 / 29.0;
    const FOUR_29: f64 = 4.0 / 29.0;
    const KAPPA: f64 = 1.0 / (3.0 * SIX_29 * SIX_29);
    if f > SIX_29 {
        f * f * f
    } else {
        (f - FOUR_29) / KAPPA
    }
}

#[inline(always)]
fn gamma(lin: f32) -> f32 {
    let g = 1.055 * pow_fast(lin.max(0.003_130_8), INV_GAMMA) - 0.055;
    clamp01(if lin > 0.003_130_8 { g } else { lin * 12.92 })
}

/// `v = f(v)` over a plane: single-channel loops keep the register pressure of the
/// transcendental functions low, so that they vectorise well.
#[inline(always)]
fn map_plane(plane: &mut [f32], f: impl Fn(f32) -> f32) {
    for v in plane.iter_mut() {
        *v = f(*v);
    }
}

/// `x = M x (+ o)` over the three planes.
#[inline(always)]
fn mat_planes(planes: [&mut [f32]; 3], m: &[[f32; 3]; 3], o: [f32; 3]) {
    let [r, g, b] = planes;
    for ((r, g), b) in r.iter_mut().zip(g.iter_mut()).zip(b.iter_mut()) {
        let y = mat3(m, [*r, *g, *b]);
        (*r, *g, *b) = (y[0] + o[0], y[1] + o[1], y[2] + o[2]);
    }
}

/// HED on planes holding log intensities: `x = clamp(exp(M L + o), 0, 1)`.
#[inline(always)]
fn hed_planes(planes: [&mut [f32]; 3], h: &Hed) {
    let [r, g, b] = planes;
    mat_planes([&mut *r, &mut *g, &mut *b], &h.matrix, h.offset);
    for p in [r, g, b] {
        map_plane(p, |v| clamp01(exp_fast(v)));
    }
}

/// Decodes the RGB8 crop into the three planes `p` with RandStainNA and HED applied.
#[inline(always)]
fn planes_with_stain(src: &[u8], n: usize, st: &Stain, hed: Option<&Hed>, p: &mut [f32]) {
    let k = lab();
    let (r, g, b) = split3(p, n);
    // sRGB -> linear through the table, linear -> XYZ / white, f(XYZ), then LAB.
    for (((px, r), g), b) in src
        .chunks_exact(3)
        .zip(r.iter_mut())
        .zip(g.iter_mut())
        .zip(b.iter_mut())
    {
        *r = k.linear[usize::from(px[0])];
        *g = k.linear[usize::from(px[1])];
        *b = k.linear[usize::from(px[2])];
    }
    mat_planes([&mut *r, &mut *g, &mut *b], &k.to_xyz, [0.0; 3]);
    for p in [&mut *r, &mut *g, &mut *b] {
        map_plane(p, lab_f);
    }
    for ((r, g), b) in r.iter_mut().zip(g.iter_mut()).zip(b.iter_mut()) {
        let (fx, fy, fz) = (*r, *g, *b);
        *r = 116.0 * fy - 16.0;
        *g = 500.0 * (fx - fy);
        *b = 200.0 * (fy - fz);
    }
    // Per-channel mean and population std (f64 across blocks, like torch's reductions).
    let mut mu = [0.0f32; 3];
    let mut sd = [0.0f32; 3];
    for (c, plane) in [&*r, &*g, &*b].into_iter().enumerate() {
        let m = (plane_sum(plane) / n as f64) as f32;
        let (s1, s2) = plane_moments(plane, m);
        let (d, q) = (s1 / n as f64, s2 / n as f64);
        mu[c] = m;
        sd[c] = ((q - d * d).max(0.0).sqrt() as f32).max(1e-3);
    }
    // New LAB and LAB -> linear RGB in f64: the matrix nearly cancels for saturated dark
    // colours, where f32 would lose the small channel (the reference's f32 loses a little).
    let scale = [0, 1, 2].map(|c| f64::from(st.std[c]) / f64::from(sd[c]));
    let (mu, tm) = (mu.map(f64::from), st.mean.map(f64::from));
    let m = &k.to_rgb64;
    for ((r, g), b) in r.iter_mut().zip(g.iter_mut()).zip(b.iter_mut()) {
        let l = (f64::from(*r) - mu[0]) * scale[0] + tm[0];
        let a = (f64::from(*g) - mu[1]) * scale[1] + tm[1];
        let bb = (f64::from(*b) - mu[2]) * scale[2] + tm[2];
        let fy = (l + 16.0) / 116.0;
        let fx = fy + a / 500.0;
        let fz = fy - bb / 200.0;
        let xyz = [lab_f_inv(fx), lab_f_inv(fy), lab_f_inv(fz)];
        let lin = |i: usize| {
            let v = m[i][0] * xyz[0] + m[i][1] * xyz[1] + m[i][2] * xyz[2];
            v.clamp(0.0, 1.0) as f32
        };
        (*r, *g, *b) = (lin(0), lin(1), lin(2));
    }
    match hed {
        None => {
            for p in [r, g, b] {
                map_plane(p, gamma);
            }
        }
        Some(h) => {
            for p in [&mut *r, &mut *g, &mut *b] {
                map_plane(p, |v| hed_log(gamma(v)));
            }
            hed_planes([r, g, b], h);
        }
    }
}

/// Decodes the RGB8 crop into the three planes `p`, with HED applied when given.
#[inline(always)]
fn planes_plain(src: &[u8], n: usize, hed: Option<&Hed>, p: &mut [f32]) {
    let (r, g, b) = split3(p, n);
    let pixels = src.chunks_exact(3).zip(r.iter_mut()).zip(g.iter_mut());
    match hed {
        None => {
            for (((px, r), g), b) in pixels.zip(b.iter_mut()) {
                *r = f32::from(px[0]) / 255.0;
                *g = f32::from(px[1]) / 255.0;
                *b = f32::from(px[2]) / 255.0;
            }
        }
        Some(h) => {
            let log = &lab().log;
            for (((px, r), g), b) in pixels.zip(b.iter_mut()) {
                *r = log[usize::from(px[0])];
                *g = log[usize::from(px[1])];
                *b = log[usize::from(px[2])];
            }
            hed_planes([r, g, b], h);
        }
    }
}

/// Colour jitter of one row of the planes into `dst` (three rows of `s` values).
#[inline(always)]
fn colour_row(src: [&[f32]; 3], m: &[[f32; 3]; 3], add: f32, dst: [&mut [f32]; 3]) {
    let [r, g, b] = src;
    let [dr, dg, db] = dst;
    let it = r.iter().zip(g).zip(b).zip(dr.iter_mut()).zip(dg.iter_mut());
    for (((((&r, &g), &b), dr), dg), db) in it.zip(db.iter_mut()) {
        let y = mat3(m, [r, g, b]);
        *dr = clamp01(y[0] + add);
        *dg = clamp01(y[1] + add);
        *db = clamp01(y[2] + add);
    }
}

/// Stages 6-7 on one row of values of channel `c`, written to `out[at..at + len]`.
#[inline(always)]
fn finish_row(v: &[f32], c: usize, solar: f32, norm: &Normalize, out: &mut OutBuf<'_>, at: usize) {
    let sol = |x: f32| if x >= solar { 1.0 - x } else { x };
    let (m, s) = (norm.mean[c], norm.std[c]);
    match out {
        OutBuf::Float(o) => {
            for (o, &x) in o[at..at + v.len()].iter_mut().zip(v) {
                *o = (sol(x) - m) / s;
            }
        }
        OutBuf::BFloat16(o) => {
            for (o, &x) in o[at..at + v.len()].iter_mut().zip(v) {
                *o = bf16_bits((sol(x) - m) / s);
            }
        }
        OutBuf::Uint8(o) => {
            for (o, &x) in o[at..at + v.len()].iter_mut().zip(v) {
                *o = to_u8(sol(x));
            }
        }
    }
}

// --------------------------------------------------------------------------- kernel

/// Reusable scratch planes of the kernel; keep one per worker thread.
#[derive(Debug, Default)]
pub struct Augmenter {
    planes: Vec<f32>,
    blurred: Vec<f32>,
    rows: Vec<f32>,
    taps: Vec<f32>,
    offs: Vec<usize>,
}

fn check_sample(src_len: usize, size: usize, p: &ViewColor) -> Result<()> {
    if size == 0 {
        return Err(invalid("view size must be > 0"));
    }
    if src_len != size * size * 3 {
        return Err(CoreError::Shape(format!(
            "crop of {src_len} bytes for a {size}x{size}x3 view"
        )));
    }
    let sigma = p.blur_sigma;
    if !sigma.is_finite() || sigma < 0.0 {
        return Err(invalid(format!(
            "blur_sigma must be finite and >= 0, got {sigma}"
        )));
    }
    if sigma > 0.0 && blur_half(sigma) >= size {
        return Err(invalid(format!(
            "blur_sigma {sigma} needs a {}-pixel window, too wide for a {size}x{size} view \
             (reflect padding needs ceil(3 sigma) < {size})",
            2 * blur_half(sigma) + 1
        )));
    }
    Ok(())
}

fn check_norm(norm: &Normalize) -> Result<()> {
    if norm.mean.iter().any(|m| !m.is_finite())
        || norm.std.iter().any(|s| !s.is_finite() || *s == 0.0)
    {
        return Err(invalid(format!(
            "normalisation mean {:?} / std {:?} must be finite with std != 0",
            norm.mean, norm.std
        )));
    }
    Ok(())
}

impl Augmenter {
    /// An augmenter with empty buffers.
    pub fn new() -> Self {
        Self::default()
    }

    /// Frees every buffer larger than `bytes`.
    pub fn shrink_to(&mut self, bytes: usize) {
        for buf in [&mut self.planes, &mut self.blurred, &mut self.rows] {
            if buf.capacity() * 4 > bytes {
                *buf = Vec::new();
            }
        }
    }

    /// Augments one `size x size` RGB8 crop (`src`, HWC) into `out` (`3 * size * size`
    /// values, CHW); see the module docs for the stages.
    pub fn apply(
        &mut self,
        src: &[u8],
        size: usize,
        p: &ViewColor,
        norm: &Normalize,
        mut out: OutBuf<'_>,
    ) -> Result<()> {
        check_sample(src.len(), size, p)?;
        check_norm(norm)?;
        if out.len() != 3 * size * size {
            return Err(CoreError::Shape(format!(
                "output of {} values for a 3x{size}x{size} view",
                out.len()
            )));
        }
        self.run(src, size, p, norm, &mut out);
        Ok(())
    }

    /// The kernel, compiled for AVX2 as well where the CPU has it; arguments are checked.
    fn run(&mut self, src: &[u8], s: usize, p: &ViewColor, norm: &Normalize, out: &mut OutBuf<'_>) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked just above).
            unsafe { self.run_avx2(src, s, p, norm, out) };
            return;
        }
        self.kernel(src, s, p, norm, out);
    }

    /// [`Self::kernel`] with 256-bit vectors (the same operations in the same order, so the
    /// same results).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn run_avx2(
        &mut self,
        src: &[u8],
        s: usize,
        p: &ViewColor,
        norm: &Normalize,
        out: &mut OutBuf<'_>,
    ) {
        self.kernel(src, s, p, norm, out);
    }

    #[inline(always)]
    fn kernel(
        &mut self,
        src: &[u8],
        s: usize,
        p: &ViewColor,
        norm: &Normalize,
        out: &mut OutBuf<'_>,
    ) {
        let n = s * s;
        self.planes.resize(3 * n, 0.0);
        match &p.stain {
            Some(st) => planes_with_stain(src, n, st, p.hed.as_ref(), &mut self.planes),
            None => planes_plain(src, n, p.hed.as_ref(), &mut self.planes),
        }
        // Colour jitter's additive term needs the mean luma of the image so far.
        let colour = p.color.map(|cj| {
            let sums = [0, 1, 2].map(|c| plane_sum(&self.planes[c * n..(c + 1) * n]));
            let luma: f64 = (0..3).map(|c| f64::from(LUMA[c] as f32) * sums[c]).sum();
            let mean = (luma / n as f64) as f32;
            (cj.matrix, cj.k * mean)
        });
        let solar = if p.solarize { 0.5 } else { f32::INFINITY };
        fill_taps(p.blur_sigma, &mut self.taps);
        let planes = &self.planes[..3 * n];
        let plane_row = |c: usize, y: usize| &planes[c * n + y * s..c * n + (y + 1) * s];

        if self.taps.is_empty() {
            match colour {
                None => {
                    for c in 0..3 {
                        finish_row(&planes[c * n..(c + 1) * n], c, solar, norm, out, c * n);
                    }
                }
                Some((m, add)) => {
                    self.rows.resize(3 * s, 0.0);
                    for y in 0..s {
                        let (r, rest) = self.rows.split_at_mut(s);
                        let (g, b) = rest.split_at_mut(s);
                        let src_rows = [plane_row(0, y), plane_row(1, y), plane_row(2, y)];
                        colour_row(src_rows, &m, add, [&mut *r, &mut *g, &mut *b]);
                        for (c, row) in [&*r, &*g, &*b].into_iter().enumerate() {
                            finish_row(row, c, solar, norm, out, c * n + y * s);
                        }
                    }
                }
            }
            return;
        }

        // Horizontal pass: (colour jitter of) each row, reflect-padded, into `blurred`.
        let taps = &self.taps;
        let k = taps.len();
        let h = k / 2;
        let w = s + 2 * h;
        self.rows.resize(3 * w, 0.0);
        self.blurred.resize(3 * n, 0.0);
        self.offs.clear();
        self.offs.extend(0..k);
        for y in 0..s {
            let (r, rest) = self.rows.split_at_mut(w);
            let (g, b) = rest.split_at_mut(w);
            match colour {
                Some((m, add)) => {
                    let src_rows = [plane_row(0, y), plane_row(1, y), plane_row(2, y)];
                    let dst = [&mut r[h..h + s], &mut g[h..h + s], &mut b[h..h + s]];
                    colour_row(src_rows, &m, add, dst);
                }
                None => {
                    r[h..h + s].copy_from_slice(plane_row(0, y));
                    g[h..h + s].copy_from_slice(plane_row(1, y));
                    b[h..h + s].copy_from_slice(plane_row(2, y));
                }
            }
            for (c, pad) in [r, g, b].into_iter().enumerate() {
                for j in 1..=h {
                    pad[h - j] = pad[h + j];
                    pad[h + s - 1 + j] = pad[h + s - 1 - j];
                }
                let at = c * n + y * s;
                sym_conv(pad, &self.offs, taps, &mut self.blurred[at..at + s]);
            }
        }
        // Vertical pass: whole output rows from the reflected window of rows, then finished.
        let acc = &mut self.rows[..s];
        for c in 0..3 {
            let plane = &self.blurred[c * n..(c + 1) * n];
            for y in 0..s {
                self.offs.clear();
                self.offs
                    .extend((0..k).map(|t| reflect((y + t) as isize - h as isize, s) * s));
                sym_conv(plane, &self.offs, taps, acc);
                finish_row(acc, c, solar, norm, out, c * n + y * s);
            }
        }
    }
}

/// Per-thread scratch buffers above this size are freed after use.
const KEEP_SCRATCH_BYTES: usize = 16 << 20;

thread_local! {
    static AUGMENTER: RefCell<Augmenter> = RefCell::new(Augmenter::new());
}

/// Augments a batch of crops of one view in parallel (rayon's current pool): `crops[i]` is
/// sample `i`'s `size x size` RGB8 crop (HWC), `params[i]` its stages, `out` the whole
/// `(N, 3, size, size)` output. Every argument is checked before anything is written.
pub fn augment_views(
    crops: &[&[u8]],
    size: usize,
    params: &[ViewColor],
    norm: &Normalize,
    out: OutBuf<'_>,
) -> Result<()> {
    if crops.len() != params.len() {
        return Err(invalid(format!(
            "{} crops but {} parameter sets",
            crops.len(),
            params.len()
        )));
    }
    check_norm(norm)?;
    for (i, (c, p)) in crops.iter().zip(params).enumerate() {
        check_sample(c.len(), size, p).map_err(|e| match e {
            CoreError::InvalidArgument(m) => invalid(format!("sample {i}: {m}")),
            CoreError::Shape(m) => CoreError::Shape(format!("sample {i}: {m}")),
            e => e,
        })?;
    }
    let per = 3 * size * size;
    if out.len() != crops.len() * per {
        return Err(CoreError::Shape(format!(
            "output of {} values for {} views of 3x{size}x{size}",
            out.len(),
            crops.len()
        )));
    }
    if per == 0 {
        return Ok(());
    }
    let one = |src: &&[u8], p: &ViewColor, mut o: OutBuf<'_>| {
        AUGMENTER.with(|a| {
            let mut a = a.borrow_mut();
            a.run(src, size, p, norm, &mut o);
            a.shrink_to(KEEP_SCRATCH_BYTES);
        });
    };
    let work = crops.par_iter().zip(params.par_iter());
    match out {
        OutBuf::Float(o) => work
            .zip(o.par_chunks_exact_mut(per))
            .for_each(|((c, p), o)| one(c, p, OutBuf::Float(o))),
        OutBuf::BFloat16(o) => work
            .zip(o.par_chunks_exact_mut(per))
            .for_each(|((c, p), o)| one(c, p, OutBuf::BFloat16(o))),
        OutBuf::Uint8(o) => work
            .zip(o.par_chunks_exact_mut(per))
            .for_each(|((c, p), o)| one(c, p, OutBuf::Uint8(o))),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_become_per_sample_stages() {
        let n = 2;
        let (stain, hed, color, sol) = ([true, false], [false, true], [true, true], [false, true]);
        let means: Vec<f32> = (0..6).map(|v| v as f32).collect();
        let stds: Vec<f32> = (10..16).map(|v| v as f32).collect();
        let mats: Vec<f32> = (0..18).map(|v| v as f32).collect();
        let offs: Vec<f32> = (20..26).map(|v| v as f32).collect();
        let cols = ColorColumns {
            stain: &stain,
            stain_mean: &means,
            stain_std: &stds,
            hed: &hed,
            hed_matrix: &mats,
            hed_offset: &offs,
            color: &color,
            color_matrix: &mats,
            color_k: &[0.5, 0.25],
            blur_sigma: &[0.0, 1.5],
            solarize: &sol,
        };
        let v = cols.view_colors(n).unwrap();
        assert_eq!(
            v[0].stain,
            Some(Stain {
                mean: [0.0, 1.0, 2.0],
                std: [10.0, 11.0, 12.0]
            })
        );
        assert_eq!(v[1].stain, None);
        assert_eq!(v[0].hed, None);
        let h = v[1].hed.unwrap();
        assert_eq!(
            h.matrix,
            [[9.0, 10.0, 11.0], [12.0, 13.0, 14.0], [15.0, 16.0, 17.0]]
        );
        assert_eq!(h.offset, [23.0, 24.0, 25.0]);
        assert_eq!(v[1].color.unwrap().k, 0.25);
        assert_eq!(
            (v[1].blur_sigma, v[1].solarize, v[0].solarize),
            (1.5, true, false)
        );
        assert!(matches!(cols.view_colors(3), Err(CoreError::Shape(_))));
    }

    const EYE: [[f32; 3]; 3] = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]];
    const RAW: Normalize = Normalize {
        mean: [0.0; 3],
        std: [1.0; 3],
    };

    /// A deterministic H&E-like RGB8 image: pink background, purple blobs, pixel noise.
    fn patch(s: usize, seed: u64) -> Vec<u8> {
        let mut state = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let mut noise = move || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 33) % 41) as f64 - 20.0
        };
        let mut out = Vec::with_capacity(s * s * 3);
        for y in 0..s {
            for x in 0..s {
                let t = ((x as f64 * 0.37).sin() + (y as f64 * 0.23).cos()) * 0.5;
                let base = if t > 0.3 {
                    [120.0, 60.0, 160.0]
                } else {
                    [230.0, 170.0, 200.0]
                };
                for b in base {
                    out.push((b + noise()).clamp(0.0, 255.0) as u8);
                }
            }
        }
        out
    }

    fn run_float(src: &[u8], s: usize, p: &ViewColor, norm: &Normalize) -> Vec<f32> {
        let mut out = vec![0.0f32; 3 * s * s];
        Augmenter::new()
            .apply(src, s, p, norm, OutBuf::Float(&mut out))
            .unwrap();
        out
    }

    // ---------------------------------------------------------- f64 reference (scalar)

    type Img = Vec<[f64; 3]>;

    fn ref_mat(m: &[[f32; 3]; 3], x: [f64; 3]) -> [f64; 3] {
        let m = |i: usize, j: usize| f64::from(m[i][j]);
        [0, 1, 2].map(|i| m(i, 0) * x[0] + m(i, 1) * x[1] + m(i, 2) * x[2])
    }

    const KAPPA: f64 = 1.0 / (3.0 * (6.0 / 29.0) * (6.0 / 29.0));

    fn ref_lab(img: &Img) -> Img {
        let eps = (6.0f64 / 29.0).powi(3);
        let f = |t: f64| {
            if t > eps {
                t.cbrt()
            } else {
                t * KAPPA + 4.0 / 29.0
            }
        };
        img.iter()
            .map(|p| {
                let lin = p.map(|x| {
                    if x > 0.04045 {
                        ((x + 0.055) / 1.055).powf(2.4)
                    } else {
                        x / 12.92
                    }
                });
                let xyz = [0, 1, 2]
                    .map(|i| (0..3).map(|j| XYZ_FROM_RGB[i][j] * lin[j]).sum::<f64>() / WHITE[i]);
                let (fx, fy, fz) = (f(xyz[0]), f(xyz[1]), f(xyz[2]));
                [116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)]
            })
            .collect()
    }

    fn stats(lab: &Img) -> ([f64; 3], [f64; 3]) {
        let n = lab.len() as f64;
        let mu = [0, 1, 2].map(|c| lab.iter().map(|p| p[c]).sum::<f64>() / n);
        let sd = [0, 1, 2].map(|c| {
            let v = lab.iter().map(|p| (p[c] - mu[c]).powi(2)).sum::<f64>() / n;
            v.sqrt().max(1e-3)
        });
        (mu, sd)
    }

    fn ref_lab_stats(src: &[u8]) -> ([f64; 3], [f64; 3]) {
        let img: Img = src
            .chunks_exact(3)
            .map(|px| [0, 1, 2].map(|c| f64::from(px[c]) / 255.0))
            .collect();
        stats(&ref_lab(&img))
    }

    fn ref_stain(img: &mut Img, st: &Stain) {
        let kappa = KAPPA;
        let inv = inverse3(&XYZ_FROM_RGB);
        let lab = ref_lab(img);
        let (mu, sd) = stats(&lab);
        for (p, l) in img.iter_mut().zip(&lab) {
            let l = [0, 1, 2]
                .map(|c| (l[c] - mu[c]) / sd[c] * f64::from(st.std[c]) + f64::from(st.mean[c]));
            let fy = (l[0] + 16.0) / 116.0;
            let fs = [fy + l[1] / 500.0, fy, fy - l[2] / 200.0];
            let xyz = fs.map(|f| {
                if f > 6.0 / 29.0 {
                    f * f * f
                } else {
                    (f - 4.0 / 29.0) / kappa
                }
            });
            let lin = [0, 1, 2].map(|i| {
                (0..3)
                    .map(|j| inv[i][j] * WHITE[j] * xyz[j])
                    .sum::<f64>()
                    .clamp(0.0, 1.0)
            });
            *p = lin.map(|v| {
                let g = if v > 0.0031308 {
                    1.055 * v.powf(1.0 / 2.4) - 0.055
                } else {
                    v * 12.92
                };
                g.clamp(0.0, 1.0)
            });
        }
    }

    fn ref_pipeline(src: &[u8], s: usize, p: &ViewColor) -> Img {
        let mut img: Img = src
            .chunks_exact(3)
            .map(|px| [0, 1, 2].map(|c| f64::from(px[c]) / 255.0))
            .collect();
        if let Some(st) = &p.stain {
            ref_stain(&mut img, st);
        }
        if let Some(h) = &p.hed {
            for px in img.iter_mut() {
                let l = ref_mat(&h.matrix, px.map(|v| v.max(1e-6).ln()));
                *px = [0, 1, 2].map(|i| (l[i] + f64::from(h.offset[i])).exp().clamp(0.0, 1.0));
            }
        }
        if let Some(cj) = &p.color {
            let n = img.len() as f64;
            let m = img
                .iter()
                .map(|px| (0..3).map(|c| LUMA[c] * px[c]).sum::<f64>())
                .sum::<f64>()
                / n;
            for px in img.iter_mut() {
                let y = ref_mat(&cj.matrix, *px);
                *px = y.map(|v| (v + f64::from(cj.k) * m).clamp(0.0, 1.0));
            }
        }
        if p.blur_sigma > 0.0 {
            let taps: Vec<f64> = gaussian_taps(p.blur_sigma)
                .iter()
                .map(|&t| f64::from(t))
                .collect();
            let h = (taps.len() / 2) as isize;
            let at = |y: isize, x: isize| reflect(y, s) * s + reflect(x, s);
            let mut tmp = img.clone();
            for y in 0..s as isize {
                for x in 0..s as isize {
                    tmp[at(y, x)] = [0, 1, 2].map(|c| {
                        (-h..=h)
                            .map(|t| taps[(t + h) as usize] * img[at(y, x + t)][c])
                            .sum()
                    });
                }
            }
            for y in 0..s as isize {
                for x in 0..s as isize {
                    img[at(y, x)] = [0, 1, 2].map(|c| {
                        (-h..=h)
                            .map(|t| taps[(t + h) as usize] * tmp[at(y + t, x)][c])
                            .sum()
                    });
                }
            }
        }
        if p.solarize {
            for px in img.iter_mut() {
                *px = px.map(|v| if v >= 0.5 { 1.0 - v } else { v });
            }
        }
        img
    }

    /// Max |kernel - reference| over the (1, 3, S, S) float output (no normalisation).
    fn max_err(src: &[u8], s: usize, p: &ViewColor) -> f64 {
        let got = run_float(src, s, p, &RAW);
        let want = ref_pipeline(src, s, p);
        let n = s * s;
        let mut worst = 0.0f64;
        for (i, px) in want.iter().enumerate() {
            for c in 0..3 {
                worst = worst.max((f64::from(got[c * n + i]) - px[c]).abs());
            }
        }
        worst
    }

    fn some_hed() -> Hed {
        Hed {
            matrix: [[1.04, 0.03, -0.02], [0.01, 0.95, 0.04], [-0.03, 0.02, 1.02]],
            offset: [0.05, -0.08, 0.02],
        }
    }

    fn some_colour() -> ColorJitter {
        ColorJitter {
            matrix: [[0.9, 0.2, -0.05], [0.1, 0.8, 0.15], [-0.1, 0.3, 0.85]],
            k: 0.25,
        }
    }

    fn some_stain() -> Stain {
        Stain {
            mean: [62.0, 22.0, -14.0],
            std: [11.0, 6.0, 5.0],
        }
    }

    // -------------------------------------------------------------------------- tests

    #[test]
    fn fast_ln_and_exp_are_within_a_few_ulp() {
        let ulp = |v: f64| f64::from(f32::EPSILON) * v.abs().max(f64::from(f32::MIN_POSITIVE));
        let mut x = 1e-30f32;
        while x < 1e30 {
            for v in [x, x * 1.000_1, x * 0.999_9] {
                let want = f64::from(v).ln();
                let err = (f64::from(ln_fast(v)) - want).abs();
                assert!(
                    err <= 2.0 * ulp(want) + 1e-12,
                    "ln({v}): {} vs {want}",
                    ln_fast(v)
                );
            }
            x *= 1.013;
        }
        // Near 1 the result is small: relative accuracy holds there too.
        for i in 1..2000 {
            let v = 1.0 + (i as f32 - 1000.0) * 1e-4;
            let want = f64::from(v).ln();
            assert!(
                (f64::from(ln_fast(v)) - want).abs() <= 2.0 * ulp(want) + 1e-12,
                "{v}"
            );
        }
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = f64::from(x).exp();
            let err = (f64::from(exp_fast(x)) - want).abs();
            assert!(
                err <= 2.0 * ulp(want),
                "exp({x}): {} vs {want}",
                exp_fast(x)
            );
            x += 0.0137;
        }
        assert_eq!(exp_fast(0.0), 1.0);
        assert!(exp_fast(-1000.0) < 1.2e-38);
        assert!((pow_fast(0.5, THIRD) - 0.5f32.cbrt()).abs() < 2e-7);
    }

    #[test]
    fn gaussian_taps_follow_the_reference_formula() {
        assert!(gaussian_taps(0.0).is_empty());
        for sigma in [0.1f32, 0.33, 0.5, 1.0, 1.7, 2.0] {
            let taps = gaussian_taps(sigma);
            let h = (3.0 * f64::from(sigma)).ceil() as usize;
            assert_eq!(taps.len(), 2 * h + 1, "{sigma}");
            let g: Vec<f64> = (0..=2 * h)
                .map(|i| (-0.5 * ((i as f64 - h as f64) / f64::from(sigma)).powi(2)).exp())
                .collect();
            let sum: f64 = g.iter().sum();
            for (t, g) in taps.iter().zip(&g) {
                assert_eq!(*t, (g / sum) as f32);
            }
            for i in 0..taps.len() {
                assert_eq!(taps[i], taps[taps.len() - 1 - i]);
            }
        }
        // sigma 0.1: window 3, outer taps exp(-50) / (1 + 2 exp(-50)).
        assert_eq!(gaussian_taps(0.1).len(), 3);
        assert!(gaussian_taps(0.1)[0] < 1e-20);
    }

    #[test]
    fn blur_of_an_impulse_is_the_outer_product_of_the_taps() {
        let s = 21;
        let mut src = vec![0u8; s * s * 3];
        let (cy, cx) = (10, 9);
        src[(cy * s + cx) * 3 + 1] = 255; // green only
        let sigma = 1.3;
        let taps = gaussian_taps(sigma);
        let h = taps.len() / 2;
        let p = ViewColor {
            blur_sigma: sigma,
            ..Default::default()
        };
        let out = run_float(&src, s, &p, &RAW);
        let n = s * s;
        assert!(out[..n].iter().chain(&out[2 * n..]).all(|&v| v == 0.0));
        for y in 0..s {
            for x in 0..s {
                let (dy, dx) = (y as isize - cy as isize, x as isize - cx as isize);
                let w = |d: isize| {
                    if d.unsigned_abs() <= h {
                        taps[(d + h as isize) as usize]
                    } else {
                        0.0
                    }
                };
                let want = w(dy) * w(dx);
                let got = out[n + y * s + x];
                assert!((got - want).abs() <= 1e-7 * want.max(1e-3), "({y}, {x})");
            }
        }
    }

    #[test]
    fn blur_borders_are_reflect_101() {
        // An impulse at column 1 (row 4): reflect-101 mirrors it to column -1, so column 0
        // gets both neighbours' weights; an impulse at column 0 is not duplicated.
        let s = 9;
        let sigma = 0.8;
        let taps = gaussian_taps(sigma);
        let h = taps.len() / 2;
        let p = ViewColor {
            blur_sigma: sigma,
            ..Default::default()
        };
        let n = s * s;
        for col in [0usize, 1, 2, 8, 7] {
            let mut src = vec![0u8; s * s * 3];
            src[(4 * s + col) * 3] = 255;
            let out = run_float(&src, s, &p, &RAW);
            let w = |d: isize| {
                if d.unsigned_abs() <= h {
                    taps[(d + h as isize) as usize]
                } else {
                    0.0
                }
            };
            for x in 0..s {
                // Horizontal weight of the source column at output column x, mirrored.
                let mut wx = 0.0;
                for t in -(h as isize)..=h as isize {
                    if reflect(x as isize + t, s) == col {
                        wx += w(t);
                    }
                }
                let want = wx * w(0);
                assert!((out[4 * s + x] - want).abs() < 1e-7, "col {col}, x {x}");
            }
            // Vertical mirror: row 0 sees the impulse of row 4 only if h >= 4 (it is not).
            assert!(out[..s].iter().all(|&v| v == 0.0));
            assert!(out[n..].iter().all(|&v| v == 0.0));
        }
        // Against the 2-D reference on a real-looking image, sigma up to the largest allowed.
        let src = patch(12, 5);
        for sigma in [0.2, 1.0, 3.6] {
            let p = ViewColor {
                blur_sigma: sigma,
                ..Default::default()
            };
            assert!(max_err(&src, 12, &p) < 1e-6, "{sigma}");
        }
    }

    #[test]
    fn identity_stages_keep_the_pixels() {
        let s = 16;
        let src = patch(s, 1);
        let plain = run_float(&src, s, &ViewColor::default(), &RAW);
        let n = s * s;
        for (i, px) in src.chunks_exact(3).enumerate() {
            for c in 0..3 {
                assert_eq!(plain[c * n + i], f32::from(px[c]) / 255.0);
            }
        }
        // Colour matrix identity with k = 0 is exact.
        let p = ViewColor {
            color: Some(ColorJitter {
                matrix: EYE,
                k: 0.0,
            }),
            ..Default::default()
        };
        assert_eq!(run_float(&src, s, &p, &RAW), plain);
        // HED identity: exp(ln x) within float rounding; 0 becomes 1e-6.
        let p = ViewColor {
            hed: Some(Hed {
                matrix: EYE,
                offset: [0.0; 3],
            }),
            ..Default::default()
        };
        let got = run_float(&src, s, &p, &RAW);
        assert!(got.iter().zip(&plain).all(|(a, b)| (a - b).abs() < 2e-7));
        let black = vec![0u8; 3 * 4 * 4];
        let got = run_float(&black, 4, &p, &RAW);
        assert!(got.iter().all(|&v| (v - 1e-6).abs() < 1e-12));
        // RandStainNA to the image's own LAB statistics is a LAB round trip.
        let (mu, sd) = ref_lab_stats(&src);
        let p = ViewColor {
            stain: Some(Stain {
                mean: mu.map(|v| v as f32),
                std: sd.map(|v| v as f32),
            }),
            ..Default::default()
        };
        let got = run_float(&src, s, &p, &RAW);
        let e = got
            .iter()
            .zip(&plain)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(e < 1e-4, "{e}");
    }

    #[test]
    fn colour_jitter_adds_the_mean_luma() {
        // Constant image: M x + k * luma(x), clamped.
        let s = 4;
        let src: Vec<u8> = [100u8, 150, 50].repeat(s * s);
        let x = [100.0f32 / 255.0, 150.0 / 255.0, 50.0 / 255.0];
        let luma = 0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2];
        let cj = ColorJitter {
            matrix: [[0.5, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0]],
            k: 0.5,
        };
        let p = ViewColor {
            color: Some(cj),
            ..Default::default()
        };
        let out = run_float(&src, s, &p, &RAW);
        let want = [
            0.5 * x[0] + 0.5 * luma,
            (2.0 * x[1] + 0.5 * luma).min(1.0),
            x[2] + 0.5 * luma,
        ];
        for c in 0..3 {
            for &v in &out[c * s * s..(c + 1) * s * s] {
                assert!((v - want[c]).abs() < 1e-6, "{c}: {v} vs {}", want[c]);
            }
        }
        assert_eq!(out[s * s], 1.0);
    }

    #[test]
    fn solarize_flips_from_one_half() {
        let p = ViewColor {
            solarize: true,
            ..Default::default()
        };
        let src: Vec<u8> = vec![0, 127, 128, 255, 64, 200, 1, 2, 3, 4, 5, 6];
        let out = run_float(&src, 2, &p, &RAW);
        let x = |v: u8| f32::from(v) / 255.0;
        assert_eq!(out[0], 0.0); // R of pixel 0
        assert_eq!(out[4], x(127)); // G of pixel 0: 0.498 stays
        assert_eq!(out[8], 1.0 - x(128)); // B of pixel 0: 0.502 flips
        assert_eq!(out[1], 1.0 - 1.0); // R of pixel 1: 255 -> 0
        let mut u8out = vec![0u8; 12];
        Augmenter::new()
            .apply(&src, 2, &p, &RAW, OutBuf::Uint8(&mut u8out))
            .unwrap();
        assert_eq!(&u8out[..4], &[0, 0, 1, 4]);
        assert_eq!(&u8out[4..8], &[127, 64, 2, 5]);
        assert_eq!(&u8out[8..], &[127, 55, 3, 6]);
    }

    #[test]
    fn bf16_and_u8_rounding() {
        assert_eq!(bf16_bits(1.0), 0x3F80);
        assert_eq!(bf16_bits(-2.0), 0xC000);
        assert_eq!(bf16_bits(0.0), 0x0000);
        assert_eq!(bf16_bits(-0.0), 0x8000);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to even (down).
        assert_eq!(bf16_bits(1.0 + 2f32.powi(-8)), 0x3F80);
        // 1 + 3 * 2^-8 is halfway between 0x3F81 and 0x3F82: ties to even (up).
        assert_eq!(bf16_bits(1.0 + 3.0 * 2f32.powi(-8)), 0x3F82);
        // Just above the half: up; just below: down.
        assert_eq!(bf16_bits(f32::from_bits(0x3F80_8001)), 0x3F81);
        assert_eq!(bf16_bits(f32::from_bits(0x3F80_7FFF)), 0x3F80);
        assert_eq!(bf16_bits(f32::INFINITY), 0x7F80);
        assert_eq!(bf16_bits(f32::NEG_INFINITY), 0xFF80);
        assert_eq!(bf16_bits(f32::MAX), 0x7F80); // rounds up to infinity, like torch
        assert_eq!(bf16_bits(f32::NAN), 0x7FC0);
        assert_eq!(bf16_bits(-f32::NAN), 0x7FC0);
        assert_eq!(bf16_bits(0.1), 0x3DCD); // 0x3DCCCCCD rounds up
                                            // uint8: round half to even of 255 x, clamped.
        for (x255, want) in [
            (2.5f32, 2u8),
            (3.5, 4),
            (254.5, 254),
            (0.49, 0),
            (127.5, 128),
        ] {
            assert_eq!(to_u8(x255 / 255.0 * (1.0 + 1e-9)), want, "{x255}");
        }
        assert_eq!(to_u8(-0.3), 0);
        assert_eq!(to_u8(1.7), 255);
        assert_eq!(to_u8(f32::NAN), 0);
        for v in 0..=255u8 {
            assert_eq!(to_u8(f32::from(v) / 255.0), v);
        }
    }

    #[test]
    fn every_stage_matches_the_f64_reference() {
        let s = 24;
        let src = patch(s, 3);
        let cases = [
            ViewColor {
                stain: Some(some_stain()),
                ..Default::default()
            },
            ViewColor {
                hed: Some(some_hed()),
                ..Default::default()
            },
            ViewColor {
                color: Some(some_colour()),
                ..Default::default()
            },
            ViewColor {
                blur_sigma: 1.9,
                ..Default::default()
            },
            ViewColor {
                solarize: true,
                ..Default::default()
            },
            ViewColor {
                stain: Some(some_stain()),
                hed: Some(some_hed()),
                ..Default::default()
            },
            ViewColor {
                stain: Some(some_stain()),
                hed: Some(some_hed()),
                color: Some(some_colour()),
                blur_sigma: 0.7,
                solarize: true,
            },
            ViewColor {
                color: Some(some_colour()),
                blur_sigma: 1.2,
                ..Default::default()
            },
            ViewColor {
                hed: Some(some_hed()),
                color: Some(some_colour()),
                solarize: true,
                ..Default::default()
            },
        ];
        for (i, p) in cases.iter().enumerate() {
            let e = max_err(&src, s, p);
            assert!(e < 2e-5, "case {i}: max error {e}");
        }
        // A flat image: RandStainNA's std clamps to 1e-3 and every pixel gets (nearly) the
        // target; ill-conditioned (f32 rounding of lab - mean is amplified 1000x), as in torch.
        let flat: Vec<u8> = [200u8, 120, 180].repeat(s * s);
        let p = ViewColor {
            stain: Some(some_stain()),
            ..Default::default()
        };
        let out = run_float(&flat, s, &p, &RAW);
        let e = max_err(&flat, s, &p);
        assert!(e < 0.02, "{e}");
        for c in 0..3 {
            let plane = &out[c * s * s..(c + 1) * s * s];
            assert!(plane.iter().all(|&v| v == plane[0]));
        }
    }

    #[test]
    fn outputs_agree_and_batches_match_single_views() {
        let s = 20;
        let crops: Vec<Vec<u8>> = (0..5).map(|i| patch(s, 10 + i)).collect();
        let refs: Vec<&[u8]> = crops.iter().map(|c| c.as_slice()).collect();
        let params = [
            ViewColor::default(),
            ViewColor {
                stain: Some(some_stain()),
                hed: Some(some_hed()),
                color: Some(some_colour()),
                blur_sigma: 1.1,
                solarize: true,
            },
            ViewColor {
                color: Some(some_colour()),
                blur_sigma: 0.4,
                ..Default::default()
            },
            ViewColor {
                hed: Some(some_hed()),
                solarize: true,
                ..Default::default()
            },
            ViewColor {
                blur_sigma: 2.0,
                ..Default::default()
            },
        ];
        let norm = Normalize {
            mean: [0.485, 0.456, 0.406],
            std: [0.229, 0.224, 0.225],
        };
        let per = 3 * s * s;
        let mut f = vec![0.0f32; 5 * per];
        let mut bf = vec![0u16; 5 * per];
        let mut u = vec![0u8; 5 * per];
        let mut raw = vec![0.0f32; 5 * per];
        augment_views(&refs, s, &params, &norm, OutBuf::Float(&mut f)).unwrap();
        augment_views(&refs, s, &params, &norm, OutBuf::BFloat16(&mut bf)).unwrap();
        augment_views(&refs, s, &params, &norm, OutBuf::Uint8(&mut u)).unwrap();
        augment_views(&refs, s, &params, &RAW, OutBuf::Float(&mut raw)).unwrap();
        for i in 0..5 {
            let one = run_float(&crops[i], s, &params[i], &norm);
            assert_eq!(one, f[i * per..(i + 1) * per]);
        }
        for j in 0..5 * per {
            let c = (j / (s * s)) % 3;
            assert_eq!(bf[j], bf16_bits(f[j]));
            assert_eq!(u[j], to_u8(raw[j]));
            assert_eq!(f[j], (raw[j] - norm.mean[c]) / norm.std[c]);
        }
    }

    #[test]
    fn vector_paths_agree_bit_for_bit() {
        // The dispatched (AVX2 where available) and the baseline build of the kernel do the
        // same operations in the same order.
        let s = 40;
        let src = patch(s, 9);
        let p = ViewColor {
            stain: Some(some_stain()),
            hed: Some(some_hed()),
            color: Some(some_colour()),
            blur_sigma: 1.4,
            solarize: true,
        };
        let mut a = vec![0.0f32; 3 * s * s];
        let mut b = vec![0.0f32; 3 * s * s];
        let mut aug = Augmenter::new();
        aug.run(&src, s, &p, &RAW, &mut OutBuf::Float(&mut a));
        aug.kernel(&src, s, &p, &RAW, &mut OutBuf::Float(&mut b));
        assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
    }

    #[test]
    fn bad_arguments_are_rejected() {
        let s = 8;
        let src = patch(s, 0);
        let refs = [src.as_slice()];
        let mut out = vec![0.0f32; 3 * s * s];
        let run = |p: ViewColor, norm: &Normalize, out: &mut [f32]| {
            augment_views(&refs, s, &[p], norm, OutBuf::Float(out))
        };
        let is_invalid = |r: Result<()>| matches!(r, Err(CoreError::InvalidArgument(_)));
        let blur = |sigma| ViewColor {
            blur_sigma: sigma,
            ..Default::default()
        };
        assert!(run(blur(2.3), &RAW, &mut out).is_ok()); // ceil(6.9) = 7 < 8
        assert!(is_invalid(run(blur(2.34), &RAW, &mut out))); // ceil(7.02) = 8
        assert!(is_invalid(run(blur(-0.5), &RAW, &mut out)));
        assert!(is_invalid(run(blur(f32::NAN), &RAW, &mut out)));
        let zero_std = Normalize {
            mean: [0.0; 3],
            std: [1.0, 0.0, 1.0],
        };
        assert!(is_invalid(run(blur(0.0), &zero_std, &mut out)));
        assert!(matches!(
            run(blur(0.0), &RAW, &mut out[1..]),
            Err(CoreError::Shape(_))
        ));
        assert!(is_invalid(augment_views(
            &refs,
            s,
            &[],
            &RAW,
            OutBuf::Float(&mut out)
        )));
        assert!(matches!(
            augment_views(&refs, s + 1, &[blur(0.0)], &RAW, OutBuf::Float(&mut out)),
            Err(CoreError::Shape(_))
        ));
        let msg = run(blur(3.0), &RAW, &mut out).unwrap_err().to_string();
        assert!(
            msg.contains("sample 0") && msg.contains("blur_sigma 3"),
            "{msg}"
        );
        assert!("float32".parse::<Output>().is_ok());
        assert!(is_invalid("half".parse::<Output>().map(|_| ())));
        // An empty batch is fine.
        assert!(augment_views(&[], s, &[], &RAW, OutBuf::Uint8(&mut [])).is_ok());
    }
}

/// Timings of the kernel per 224-px view on one thread (not run by default):
/// `cargo test --release -p pathflow-core augment::timing -- --ignored --nocapture`.
#[cfg(test)]
mod timing {
    use super::*;

    #[test]
    #[ignore]
    fn time_per_view() {
        let s = 224;
        let src: Vec<u8> = (0..s * s * 3)
            .map(|i| (120 + (i * 7919 % 97) + (i / (3 * s)) % 31) as u8)
            .collect();
        let colour = ColorJitter {
            matrix: [[0.9, 0.2, -0.05], [0.1, 0.8, 0.15], [-0.1, 0.3, 0.85]],
            k: 0.25,
        };
        let hed = Hed {
            matrix: [[1.04, 0.03, -0.02], [0.01, 0.95, 0.04], [-0.03, 0.02, 1.02]],
            offset: [0.05, -0.08, 0.02],
        };
        let stain = Stain {
            mean: [62.0, 22.0, -14.0],
            std: [11.0, 6.0, 5.0],
        };
        let norm = Normalize {
            mean: [0.485, 0.456, 0.406],
            std: [0.229, 0.224, 0.225],
        };
        let cases = [
            ("plain", ViewColor::default()),
            (
                "colour",
                ViewColor {
                    color: Some(colour),
                    ..Default::default()
                },
            ),
            (
                "colour+blur1",
                ViewColor {
                    color: Some(colour),
                    blur_sigma: 1.0,
                    ..Default::default()
                },
            ),
            (
                "colour+blur2",
                ViewColor {
                    color: Some(colour),
                    blur_sigma: 2.0,
                    ..Default::default()
                },
            ),
            (
                "hed",
                ViewColor {
                    hed: Some(hed),
                    ..Default::default()
                },
            ),
            (
                "stain",
                ViewColor {
                    stain: Some(stain),
                    ..Default::default()
                },
            ),
            (
                "stain+hed",
                ViewColor {
                    stain: Some(stain),
                    hed: Some(hed),
                    ..Default::default()
                },
            ),
        ];
        let mut a = Augmenter::new();
        let mut out = vec![0.0f32; 3 * s * s];
        let only = std::env::var("AUGMENT_CASE").ok();
        for (name, p) in cases {
            if only.as_deref().is_some_and(|o| o != name) {
                continue;
            }
            let reps = 60;
            let mut best = f64::MAX;
            for _ in 0..5 {
                let t = std::time::Instant::now();
                for _ in 0..reps / 5 {
                    a.apply(&src, s, &p, &norm, OutBuf::Float(&mut out))
                        .unwrap();
                }
                best = best.min(t.elapsed().as_secs_f64() / (reps / 5) as f64);
            }
            println!("{name:>14}: {:.3} ms/view", best * 1e3);
        }
    }
}
