//! Tissue masking: the pixel operations of CLAM's `segmentTissue`, bit-exact with OpenCV.
//!
//! The pipeline is `RGB -> HSV saturation -> median blur -> threshold -> morphological close`,
//! optionally with pen ink removed before the blur. [`binary_tissue`] runs all steps.

use image::GrayImage;
use imageproc::filter::median_filter;
use rayon::prelude::*;

use crate::error::{invalid, Result};
use crate::ImageView;

const HSV_SHIFT: u32 = 12;

/// OpenCV's `sdiv_table`: `round((255 << 12) / v)` with entry 0 = 0.
fn sdiv_table() -> [i32; 256] {
    let mut t = [0i32; 256];
    for (v, slot) in t.iter_mut().enumerate().skip(1) {
        *slot = ((255u32 << HSV_SHIFT) as f64 / v as f64).round() as i32;
    }
    t
}

/// HSV saturation of one RGB pixel on OpenCV's 8-bit scale (0..=255), exactly as
/// `cv2.cvtColor(img, cv2.COLOR_RGB2HSV)[..., 1]` computes it.
#[inline]
fn saturation_px(table: &[i32; 256], r: u8, g: u8, b: u8) -> u8 {
    let v = r.max(g).max(b) as i32;
    let vmin = r.min(g).min(b) as i32;
    let diff = v - vmin;
    ((diff * table[v as usize] + (1 << (HSV_SHIFT - 1))) >> HSV_SHIFT) as u8
}

/// Hue of one RGB pixel on OpenCV's 8-bit scale (0..180), as `COLOR_RGB2HSV` computes it.
#[inline]
fn hue_px(r: u8, g: u8, b: u8) -> u8 {
    let (r, g, b) = (r as i32, g as i32, b as i32);
    let v = r.max(g).max(b);
    let vmin = r.min(g).min(b);
    let diff = v - vmin;
    if diff == 0 {
        return 0;
    }
    // OpenCV: h = (v==r ? g-b : v==g ? b-r+2*diff : r-g+4*diff) * hdiv(diff), hrange 180.
    let h = if v == r {
        g - b
    } else if v == g {
        b - r + 2 * diff
    } else {
        r - g + 4 * diff
    };
    let hdiv = ((180u32 << HSV_SHIFT) as f64 / (6.0 * diff as f64)).round() as i32;
    let mut h = (h * hdiv + (1 << (HSV_SHIFT - 1))) >> HSV_SHIFT;
    if h < 0 {
        h += 180;
    }
    h as u8
}

fn check_color(img: &ImageView) -> Result<()> {
    if img.channels != 3 && img.channels != 4 {
        return Err(invalid(format!(
            "expected an RGB or RGBA image, got {} channels",
            img.channels
        )));
    }
    Ok(())
}

/// HSV saturation (OpenCV 8-bit scale) of an RGB or RGBA image; alpha is ignored.
pub fn saturation(img: &ImageView) -> Result<Vec<u8>> {
    check_color(img)?;
    let table = sdiv_table();
    let c = img.channels;
    let mut out = vec![0u8; img.width * img.height];
    out.par_chunks_mut(img.width)
        .zip(img.data.par_chunks(img.width * c))
        .for_each(|(dst, src)| {
            for (d, px) in dst.iter_mut().zip(src.chunks_exact(c)) {
                *d = saturation_px(&table, px[0], px[1], px[2]);
            }
        });
    Ok(out)
}

/// Pen-ink detector: blue, green and black marker on H&E.
///
/// A pixel is ink when its OpenCV hue is in the blue band `[85, 128]` (170-256 degrees) with
/// saturation >= 12 (this includes the pale halo of a marker stroke), in the green band
/// `[35, 85)` (70-170 degrees) with saturation >= 25, or when it is nearly black (max channel
/// < 50). H&E stains are pink to purple (hue >= 130 or <= 10 on this scale), so neither band
/// touches tissue; dense nuclei stay above the black cut-off. The flagged area is dilated by
/// `grow` pixels (a square window), so stroke edges blurred into the tissue go too.
pub fn ink_mask(img: &ImageView, grow: usize) -> Result<Vec<u8>> {
    check_color(img)?;
    let table = sdiv_table();
    let c = img.channels;
    let mut out = vec![0u8; img.width * img.height];
    out.par_chunks_mut(img.width)
        .zip(img.data.par_chunks(img.width * c))
        .for_each(|(dst, src)| {
            for (d, px) in dst.iter_mut().zip(src.chunks_exact(c)) {
                let (r, g, b) = (px[0], px[1], px[2]);
                let s = saturation_px(&table, r, g, b);
                let v = r.max(g).max(b);
                let h = hue_px(r, g, b);
                let blue = s >= 12 && (85..=128).contains(&h);
                let green = s >= 25 && (35..85).contains(&h);
                *d = if blue || green || v < 50 { 255 } else { 0 };
            }
        });
    if grow > 0 {
        out = rect_filter(&out, img.width, img.height, 2 * grow + 1, true);
    }
    Ok(out)
}

fn gray(data: Vec<u8>, width: usize, height: usize) -> GrayImage {
    GrayImage::from_raw(width as u32, height as u32, data).expect("buffer matches shape")
}

/// Median blur with a square `ksize` kernel and replicated borders (`cv2.medianBlur`).
pub fn median_blur(data: &[u8], width: usize, height: usize, ksize: usize) -> Result<Vec<u8>> {
    if ksize.is_multiple_of(2) {
        return Err(invalid(format!("median kernel must be odd, got {ksize}")));
    }
    check_gray(data, width, height)?;
    if ksize == 1 {
        return Ok(data.to_vec());
    }
    let r = (ksize / 2) as u32;
    Ok(median_filter(&gray(data.to_vec(), width, height), r, r).into_raw())
}

fn check_gray(data: &[u8], width: usize, height: usize) -> Result<()> {
    ImageView::new(data, width, height, 1).map(|_| ())
}

/// Otsu's threshold, computed exactly as OpenCV's `getThreshVal_Otsu_8u`.
pub fn otsu_threshold(data: &[u8]) -> u8 {
    let mut hist = [0u64; 256];
    for &v in data {
        hist[v as usize] += 1;
    }
    let scale = 1.0 / data.len().max(1) as f64;
    let mu: f64 = hist
        .iter()
        .enumerate()
        .map(|(i, &h)| i as f64 * h as f64)
        .sum::<f64>()
        * scale;
    let (mut mu1, mut q1) = (0.0f64, 0.0f64);
    let (mut max_sigma, mut max_val) = (0.0f64, 0u8);
    let eps = f32::EPSILON as f64;
    for (i, &h) in hist.iter().enumerate() {
        let p_i = h as f64 * scale;
        mu1 *= q1;
        q1 += p_i;
        let q2 = 1.0 - q1;
        if q1.min(q2) < eps || q1.max(q2) > 1.0 - eps {
            continue;
        }
        mu1 = (mu1 + i as f64 * p_i) / q1;
        let mu2 = (mu - q1 * mu1) / q2;
        let sigma = q1 * q2 * (mu1 - mu2) * (mu1 - mu2);
        if sigma > max_sigma {
            max_sigma = sigma;
            max_val = i as u8;
        }
    }
    max_val
}

/// `threshold(median_blur(img, ksize), thresh)` computed directly, bit-exact and much faster.
///
/// The median of the `k * k` window exceeds `thresh` exactly when more than half of the
/// window's values exceed it, so the thresholded median is a majority vote: a box count of
/// `img > thresh` over the window (replicated borders, like `cv2.medianBlur`) compared with
/// `(k * k + 1) / 2`.
pub fn median_threshold(
    data: &[u8],
    width: usize,
    height: usize,
    ksize: usize,
    thresh: u8,
) -> Result<Vec<u8>> {
    if ksize.is_multiple_of(2) {
        return Err(invalid(format!("median kernel must be odd, got {ksize}")));
    }
    check_gray(data, width, height)?;
    let r = ksize / 2;
    let need = (ksize * ksize).div_ceil(2) as u32;
    let above: Vec<u8> = data.iter().map(|&v| u8::from(v > thresh)).collect();
    let mut out = vec![0u8; width * height];
    out.par_chunks_mut(width).enumerate().for_each(|(y, row)| {
        // Column counts over the k rows around y (replicated borders), padded by r columns
        // on each side with the edge values, so the horizontal window needs no clamping.
        let mut col = vec![0u16; width + 2 * r];
        for dy in 0..ksize {
            let yy = (y + dy).saturating_sub(r).min(height - 1);
            let src = &above[yy * width..(yy + 1) * width];
            for (c, &a) in col[r..r + width].iter_mut().zip(src) {
                *c += u16::from(a);
            }
        }
        let (first, last) = (col[r], col[r + width - 1]);
        col[..r].fill(first);
        col[r + width..].fill(last);
        let mut sum: u32 = col[..ksize].iter().map(|&c| u32::from(c)).sum();
        for x in 0..width {
            row[x] = if sum >= need { 255 } else { 0 };
            if x + ksize < col.len() {
                sum = sum + u32::from(col[x + ksize]) - u32::from(col[x]);
            }
        }
    });
    Ok(out)
}

/// Binary threshold: `255` where `value > thresh`, else `0` (`cv2.THRESH_BINARY`).
pub fn threshold(data: &[u8], thresh: u8) -> Vec<u8> {
    data.iter()
        .map(|&v| if v > thresh { 255 } else { 0 })
        .collect()
}

/// Morphological closing with a `ksize x ksize` square of ones, anchored at its centre
/// (`ksize / 2`), as `cv2.morphologyEx(img, cv2.MORPH_CLOSE, np.ones((k, k)))`.
/// Pixels outside the image are ignored, like OpenCV's default border value.
///
/// A square is separable, so dilation and erosion run as a row pass and a column pass of
/// windowed max/min (`dst(x) = op(src[x - a ..= x - a + k - 1])`, `a = k / 2`);
/// `morph_close_reference` (tests) checks this against imageproc's mask morphology.
pub fn morph_close(data: &[u8], width: usize, height: usize, ksize: usize) -> Result<Vec<u8>> {
    check_gray(data, width, height)?;
    if ksize <= 1 {
        return Ok(data.to_vec());
    }
    if ksize > 255 {
        return Err(invalid(format!("closing kernel too large: {ksize}")));
    }
    let dilated = rect_filter(data, width, height, ksize, true);
    Ok(rect_filter(&dilated, width, height, ksize, false))
}

fn rect_filter(data: &[u8], width: usize, height: usize, k: usize, max: bool) -> Vec<u8> {
    // dst(x) = op(src[x - a ..= x - a + k - 1]), a = k / 2; pixels outside the image are
    // ignored, i.e. padded with op's identity (0 for max, 255 for min).
    let a = k / 2;
    let init = if max { u8::MIN } else { u8::MAX };
    let op = |d: &mut [u8], s: &[u8]| {
        if max {
            d.iter_mut().zip(s).for_each(|(d, &s)| *d = (*d).max(s));
        } else {
            d.iter_mut().zip(s).for_each(|(d, &s)| *d = (*d).min(s));
        }
    };
    // Row pass on a padded copy of each row: k shifted element-wise ops (vectorised).
    let mut rows = vec![0u8; width * height];
    rows.par_chunks_mut(width)
        .zip(data.par_chunks(width))
        .for_each(|(dst, src)| {
            let mut pad = vec![init; width + k - 1];
            pad[a..a + width].copy_from_slice(src);
            dst.fill(init);
            for s in 0..k {
                op(dst, &pad[s..s + width]);
            }
        });
    // Column pass: element-wise op over the k rows of the window.
    let mut out = vec![0u8; width * height];
    out.par_chunks_mut(width).enumerate().for_each(|(y, dst)| {
        dst.fill(init);
        let lo = y.saturating_sub(a);
        let hi = (y + k - a).min(height);
        for yy in lo..hi {
            op(dst, &rows[yy * width..(yy + 1) * width]);
        }
    });
    out
}

/// Parameters of the binary tissue mask (CLAM names in brackets).
#[derive(Clone, Debug)]
pub struct BinaryParams {
    /// Saturation threshold, tissue where `S > sthresh` after the blur [`sthresh`].
    pub sthresh: u8,
    /// Median kernel size, odd [`mthresh`].
    pub mthresh: usize,
    /// Closing kernel size, 0 disables [`close`].
    pub close: usize,
    /// Use Otsu's threshold instead of `sthresh` [`use_otsu`].
    pub otsu: bool,
    /// Remove blue/green/black pen ink before blurring.
    pub remove_ink: bool,
}

impl Default for BinaryParams {
    fn default() -> Self {
        Self {
            sthresh: 8,
            mthresh: 7,
            close: 4,
            otsu: false,
            remove_ink: false,
        }
    }
}

/// The binary tissue image and the threshold that was applied.
#[derive(Clone, Debug)]
pub struct Binary {
    /// `255` = tissue, `0` = background; `width * height` bytes.
    pub data: Vec<u8>,
    /// Threshold used (`sthresh`, or the Otsu level).
    pub threshold: u8,
    /// Pixels flagged as ink (empty unless ink removal was on).
    pub ink: Vec<u8>,
}

/// Runs saturation, (ink removal), median blur, threshold and closing on an RGB(A) image.
pub fn binary_tissue(img: &ImageView, p: &BinaryParams) -> Result<Binary> {
    let mut sat = saturation(img)?;
    let mut ink = Vec::new();
    if p.remove_ink {
        ink = ink_mask(img, p.mthresh / 2 + 1)?;
        for (s, &k) in sat.iter_mut().zip(&ink) {
            if k != 0 {
                *s = 0;
            }
        }
    }
    let (mut bin, thresh) = if p.otsu {
        let blurred = median_blur(&sat, img.width, img.height, p.mthresh)?;
        let t = otsu_threshold(&blurred);
        (threshold(&blurred, t), t)
    } else {
        let t = p.sthresh;
        (
            median_threshold(&sat, img.width, img.height, p.mthresh, t)?,
            t,
        )
    };
    bin = morph_close(&bin, img.width, img.height, p.close)?;
    if p.remove_ink {
        // The blur and closing can bleed tissue back over thin ink strokes: clear them again.
        for (b, &k) in bin.iter_mut().zip(&ink) {
            if k != 0 {
                *b = 0;
            }
        }
    }
    Ok(Binary {
        data: bin,
        threshold: thresh,
        ink,
    })
}

/// Downsamples an interleaved 8-bit image by an integer `factor` with a box (area) filter.
/// Edge blocks that are cut by the image border average the pixels they have.
pub fn downsample_area(img: &ImageView, factor: usize) -> Result<(Vec<u8>, usize, usize)> {
    if factor == 0 {
        return Err(invalid("downsample factor must be >= 1"));
    }
    let (w, h, c) = (img.width, img.height, img.channels);
    let ow = w.div_ceil(factor);
    let oh = h.div_ceil(factor);
    let mut out = vec![0u8; ow * oh * c];
    out.par_chunks_mut(ow * c)
        .enumerate()
        .for_each(|(oy, row)| {
            let y0 = oy * factor;
            let y1 = (y0 + factor).min(h);
            let mut acc = vec![0u32; ow * c];
            for y in y0..y1 {
                let src = &img.data[y * w * c..(y + 1) * w * c];
                for x in 0..w {
                    let ox = x / factor;
                    for k in 0..c {
                        acc[ox * c + k] += src[x * c + k] as u32;
                    }
                }
            }
            for ox in 0..ow {
                let n = ((y1 - y0) * ((ox * factor + factor).min(w) - ox * factor)) as u32;
                for k in 0..c {
                    row[ox * c + k] = ((acc[ox * c + k] + n / 2) / n) as u8;
                }
            }
        });
    Ok((out, ow, oh))
}

#[cfg(test)]
mod tests {
    use super::*;
    use imageproc::morphology::{grayscale_dilate, grayscale_erode, Mask};

    #[test]
    fn saturation_matches_opencv_formula() {
        let t = sdiv_table();
        assert_eq!(saturation_px(&t, 0, 0, 0), 0);
        assert_eq!(saturation_px(&t, 255, 0, 0), 255);
        assert_eq!(saturation_px(&t, 200, 200, 200), 0);
        // (240-200)*255/240 = 42.5 -> OpenCV rounds the fixed-point product to 43.
        assert_eq!(saturation_px(&t, 240, 220, 200), 43);
    }

    #[test]
    fn hue_of_primaries() {
        assert_eq!(hue_px(255, 0, 0), 0);
        assert_eq!(hue_px(0, 255, 0), 60);
        assert_eq!(hue_px(0, 0, 255), 120);
    }

    #[test]
    fn otsu_splits_two_modes() {
        let mut v = vec![10u8; 100];
        v.extend(vec![200u8; 100]);
        let t = otsu_threshold(&v);
        assert!((10..200).contains(&t), "{t}");
        let b = threshold(&v, t);
        assert_eq!(b.iter().filter(|&&x| x == 255).count(), 100);
    }

    #[test]
    fn closing_fills_a_one_pixel_gap() {
        // Two 3-wide bars separated by a 1-pixel gap: a 4x4 closing bridges it.
        let (w, h) = (9, 6);
        let mut d = vec![0u8; w * h];
        for y in 1..5 {
            for x in [1, 2, 3, 5, 6, 7] {
                d[y * w + x] = 255;
            }
        }
        let c = morph_close(&d, w, h, 4).unwrap();
        assert_eq!(c[2 * w + 4], 255);
        // OpenCV ignores out-of-image pixels, so the dilation reaches every border pixel of
        // this small image and the erosion keeps them: cv2 returns all 255 here.
        assert!(c.iter().all(|&v| v == 255));
        // With an even kernel the anchor is off-centre: cv2 moves a lone pixel at (5,5) to
        // (6,6), and so do we.
        let mut e = vec![0u8; 100];
        e[55] = 255;
        let mut moved = vec![0u8; 100];
        moved[66] = 255;
        assert_eq!(morph_close(&e, 10, 10, 4).unwrap(), moved);
    }

    #[test]
    fn majority_vote_equals_thresholded_median() {
        let (w, h) = (23, 17);
        let mut seed = 3u32;
        let img: Vec<u8> = (0..w * h)
            .map(|_| {
                seed = seed.wrapping_mul(1103515245).wrapping_add(12345);
                (seed >> 16) as u8
            })
            .collect();
        for k in [1, 3, 5, 7] {
            for t in [0u8, 60, 128, 200] {
                let slow = threshold(&median_blur(&img, w, h, k).unwrap(), t);
                assert_eq!(
                    median_threshold(&img, w, h, k, t).unwrap(),
                    slow,
                    "k={k} t={t}"
                );
            }
        }
    }

    fn morph_close_reference(data: &[u8], w: usize, h: usize, k: usize) -> Vec<u8> {
        let square = GrayImage::from_pixel(k as u32, k as u32, image::Luma([255]));
        let mask = Mask::from_image(&square, (k / 2) as u8, (k / 2) as u8);
        let img = gray(data.to_vec(), w, h);
        grayscale_erode(&grayscale_dilate(&img, &mask), &mask).into_raw()
    }

    #[test]
    fn separable_closing_matches_mask_morphology() {
        let (w, h) = (31, 19);
        let mut seed = 11u32;
        let img: Vec<u8> = (0..w * h)
            .map(|_| {
                seed = seed.wrapping_mul(1103515245).wrapping_add(12345);
                if (seed >> 16).is_multiple_of(5) {
                    255
                } else {
                    0
                }
            })
            .collect();
        for k in [2, 3, 4, 5, 8] {
            assert_eq!(
                morph_close(&img, w, h, k).unwrap(),
                morph_close_reference(&img, w, h, k)
            );
        }
    }

    #[test]
    fn median_rejects_even_kernel() {
        assert!(median_blur(&[0u8; 4], 2, 2, 4).is_err());
    }

    #[test]
    fn ink_is_flagged_and_eosin_is_not() {
        let px = [40u8, 60, 120, 234, 185, 204, 158, 108, 132, 20, 20, 20];
        let img = ImageView::new(&px, 4, 1, 3).unwrap();
        assert_eq!(ink_mask(&img, 0).unwrap(), vec![255, 0, 0, 255]);
    }

    #[test]
    fn area_downsample_averages_blocks() {
        let px = [0u8, 10, 20, 30, 100, 100];
        let img = ImageView::new(&px, 3, 2, 1).unwrap();
        let (d, w, h) = downsample_area(&img, 2).unwrap();
        assert_eq!((w, h), (2, 1));
        assert_eq!(d, vec![35, 60]);
    }
}
