//! Overlay pictures and mask PNGs of `pathflow tile`, drawn without one call per patch.
//!
//! [`render_overlay`] paints the patch grid of a slide on its thumbnail (a translucent fill
//! and an outline per patch cell, blended in one pass over the picture), draws the tissue
//! contours and their holes once per contour, and encodes the result as JPEG.
//! [`encode_gray_png`] writes a tissue mask as an 8-bit grayscale PNG with a fast DEFLATE.
//!
//! ```
//! use pathflow_core::contour::Regions;
//! use pathflow_core::overlay::{render_overlay, OverlayStyle};
//! let thumb = vec![255u8; 64 * 32 * 3];
//! let regions = Regions { tissue: vec![vec![[0, 0], [600, 0], [600, 300]]], holes: vec![vec![]] };
//! // two 160 px patches of a 640 x 320 level 0 drawn on a 64 x 32 thumbnail (1/10 scale)
//! let jpeg = render_overlay(&thumb, 64, 32, &[[0, 0], [160, 0]], 160.0, 0.1, 0.1, &regions,
//!                           &OverlayStyle::default(), 85).unwrap();
//! assert_eq!(&jpeg[..2], &[0xFF, 0xD8]);
//! ```

use rayon::prelude::*;

use crate::contour::Regions;
use crate::error::invalid;
use crate::{jpeg, CoreError, Result};

/// Colours and line width of an overlay.
#[derive(Clone, Debug)]
pub struct OverlayStyle {
    /// RGBA fill of a patch cell (alpha blended).
    pub fill: [u8; 4],
    /// RGBA outline of a patch cell (alpha blended; also the colour of cells under 3 px).
    pub outline: [u8; 4],
    /// RGB of tissue contours.
    pub tissue: [u8; 3],
    /// RGB of hole contours.
    pub holes: [u8; 3],
    /// Contour line width in pixels (>= 1).
    pub line_width: usize,
}

impl Default for OverlayStyle {
    fn default() -> Self {
        Self {
            fill: [255, 220, 0, 40],
            outline: [255, 200, 0, 160],
            tissue: [0, 200, 0],
            holes: [0, 80, 255],
            line_width: 1,
        }
    }
}

const INSIDE: u8 = 1;
const BORDER: u8 = 2;

/// Pixel span `[lo, hi]` (inclusive, clipped to `0..n`) covered by `[a, a + side)` level-0
/// pixels at scale `f`; cells that tile level 0 tile the picture without gaps or overlaps.
fn span(a: i64, side: f64, f: f64, n: usize) -> Option<(usize, usize)> {
    let lo = (a as f64 * f).floor() as i64;
    let hi = (((a as f64 + side) * f).floor() as i64 - 1).max(lo);
    let (lo, hi) = (lo.max(0), hi.min(n as i64 - 1));
    (lo <= hi).then_some((lo as usize, hi as usize))
}

/// Label raster (`h x w`): 0 = no patch, 1 = inside a cell, 2 = on a cell's outline (a
/// pixel on any cell's outline stays an outline pixel). Cells under 3 px are all outline.
pub fn patch_labels(
    w: usize,
    h: usize,
    coords: &[[i64; 2]],
    side0: f64,
    fx: f64,
    fy: f64,
) -> Vec<u8> {
    let mut lab = vec![0u8; w * h];
    if w == 0 || h == 0 {
        return lab;
    }
    for &[x, y] in coords {
        let (Some((x0, x1)), Some((y0, y1))) = (span(x, side0, fx, w), span(y, side0, fy, h))
        else {
            continue;
        };
        let tiny = x1 - x0 < 2 || y1 - y0 < 2;
        for r in y0..=y1 {
            let row = &mut lab[r * w..(r + 1) * w];
            if tiny || r == y0 || r == y1 {
                row[x0..=x1].fill(BORDER);
            } else {
                row[x0] = BORDER;
                row[x1] = BORDER;
                for v in &mut row[x0 + 1..x1] {
                    *v = (*v).max(INSIDE);
                }
            }
        }
    }
    lab
}

#[inline]
fn blend(c: u8, col: u8, a: u16) -> u8 {
    ((c as u16 * (255 - a) + col as u16 * a + 127) / 255) as u8
}

/// Blends the patch cells of `coords` (level-0 top-left corners, level-0 side `side0`) into
/// a tightly packed RGB picture whose pixels are `1 / fx` x `1 / fy` level-0 pixels.
#[allow(clippy::too_many_arguments)]
pub fn paint_patches(
    rgb: &mut [u8],
    w: usize,
    h: usize,
    coords: &[[i64; 2]],
    side0: f64,
    fx: f64,
    fy: f64,
    fill: [u8; 4],
    outline: [u8; 4],
) -> Result<()> {
    check_rgb(rgb, w, h)?;
    if !(side0 > 0.0 && fx > 0.0 && fy > 0.0) {
        return Err(invalid(format!(
            "patch side {side0} and scale ({fx}, {fy}) must be > 0"
        )));
    }
    let lab = patch_labels(w, h, coords, side0, fx, fy);
    rgb.par_chunks_mut(w * 3)
        .zip(lab.par_chunks(w))
        .for_each(|(row, lr)| {
            for (px, &l) in row.chunks_exact_mut(3).zip(lr) {
                let c = match l {
                    INSIDE => fill,
                    BORDER => outline,
                    _ => continue,
                };
                let a = c[3] as u16;
                for k in 0..3 {
                    px[k] = blend(px[k], c[k], a);
                }
            }
        });
    Ok(())
}

/// Draws a polyline through `pts` (picture coordinates), closed if `closed`, in solid
/// `color` with a square pen of `width` pixels; parts outside the picture are clipped.
pub fn draw_polyline(
    rgb: &mut [u8],
    w: usize,
    h: usize,
    pts: &[[f64; 2]],
    closed: bool,
    color: [u8; 3],
    width: usize,
) {
    if pts.is_empty() || rgb.len() != w * h * 3 {
        return;
    }
    let width = width.max(1) as i64;
    let (lo, hi) = (-(width - 1) / 2, width / 2);
    let mut stamp = |cx: i64, cy: i64| {
        for y in (cy + lo).max(0)..=(cy + hi).min(h as i64 - 1) {
            for x in (cx + lo).max(0)..=(cx + hi).min(w as i64 - 1) {
                let i = (y as usize * w + x as usize) * 3;
                rgb[i..i + 3].copy_from_slice(&color);
            }
        }
    };
    let n = pts.len();
    let segments = if closed && n > 1 { n } else { n.max(2) - 1 };
    if n == 1 {
        stamp(pts[0][0].round() as i64, pts[0][1].round() as i64);
        return;
    }
    for s in 0..segments {
        let (p, q) = (pts[s], pts[(s + 1) % n]);
        let (dx, dy) = (q[0] - p[0], q[1] - p[1]);
        let steps = dx.abs().max(dy.abs()).ceil().max(1.0) as usize;
        for i in 0..=steps {
            let t = i as f64 / steps as f64;
            stamp(
                (p[0] + t * dx).round() as i64,
                (p[1] + t * dy).round() as i64,
            );
        }
    }
}

fn scaled(c: &[[i64; 2]], fx: f64, fy: f64) -> Vec<[f64; 2]> {
    c.iter()
        .map(|p| [p[0] as f64 * fx, p[1] as f64 * fy])
        .collect()
}

fn check_rgb(rgb: &[u8], w: usize, h: usize) -> Result<()> {
    if w == 0 || h == 0 {
        return Err(invalid(format!("empty picture ({w}x{h})")));
    }
    if rgb.len() != w * h * 3 {
        return Err(CoreError::Shape(format!(
            "buffer of {} bytes for a {w}x{h}x3 picture",
            rgb.len()
        )));
    }
    Ok(())
}

/// The overlay JPEG: `thumb` (RGB, `w x h`) with the patch cells of `coords` (level-0
/// corners, side `side0`) blended in, then the tissue contours and holes of `regions`
/// (level-0 points) drawn once per contour; `fx`, `fy` = picture pixels per level-0 pixel.
#[allow(clippy::too_many_arguments)]
pub fn render_overlay(
    thumb: &[u8],
    w: usize,
    h: usize,
    coords: &[[i64; 2]],
    side0: f64,
    fx: f64,
    fy: f64,
    regions: &Regions,
    style: &OverlayStyle,
    quality: u8,
) -> Result<Vec<u8>> {
    check_rgb(thumb, w, h)?;
    let mut img = thumb.to_vec();
    paint_patches(
        &mut img,
        w,
        h,
        coords,
        side0,
        fx,
        fy,
        style.fill,
        style.outline,
    )?;
    for c in &regions.tissue {
        draw_polyline(
            &mut img,
            w,
            h,
            &scaled(c, fx, fy),
            true,
            style.tissue,
            style.line_width,
        );
    }
    for c in regions.holes.iter().flatten() {
        draw_polyline(
            &mut img,
            w,
            h,
            &scaled(c, fx, fy),
            true,
            style.holes,
            style.line_width,
        );
    }
    jpeg::encode_rgb(&img, w, h, quality)
}

/// An 8-bit grayscale PNG of `gray` (`w x h`), unfiltered with a fast DEFLATE (binary masks
/// compress to a few hundred bytes per megapixel either way).
pub fn encode_gray_png(gray: &[u8], w: usize, h: usize) -> Result<Vec<u8>> {
    if w == 0 || h == 0 || w > u32::MAX as usize || h > u32::MAX as usize {
        return Err(invalid(format!("cannot write a {w}x{h} PNG")));
    }
    if gray.len() != w * h {
        return Err(CoreError::Shape(format!(
            "buffer of {} bytes for a {w}x{h} gray picture",
            gray.len()
        )));
    }
    let err = |e: png::EncodingError| invalid(format!("PNG encode failed: {e}"));
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, w as u32, h as u32);
        enc.set_color(png::ColorType::Grayscale);
        enc.set_depth(png::BitDepth::Eight);
        enc.set_compression(png::Compression::Fast);
        enc.set_filter(png::Filter::NoFilter);
        let mut wr = enc.write_header().map_err(err)?;
        wr.write_image_data(gray).map_err(err)?;
        wr.finish().map_err(err)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adjacent_cells_tile_without_gaps() {
        // 3 patches of 100 level-0 px at 1/10 scale: cells [0,9], [10,19], [20,29].
        let lab = patch_labels(40, 12, &[[0, 0], [100, 0], [200, 0]], 100.0, 0.1, 0.1);
        let row = |r: usize| &lab[r * 40..(r + 1) * 40];
        assert_eq!(row(0)[..30], [BORDER; 30]);
        assert_eq!(row(9)[..30], [BORDER; 30]);
        assert_eq!(row(10), [0u8; 40]);
        assert_eq!(row(5)[0], BORDER);
        assert_eq!(row(5)[1..9], [INSIDE; 8]);
        assert_eq!(row(5)[9], BORDER);
        assert_eq!(row(5)[10], BORDER);
        assert_eq!(row(5)[30..], [0u8; 10]);
    }

    #[test]
    fn cells_are_clipped_and_tiny_cells_solid() {
        let lab = patch_labels(5, 5, &[[-10, -10], [30, 30]], 20.0, 0.1, 0.1);
        // (-10,-10) covers [-1, 0] -> pixel 0; (30,30) covers [3, 4]: 2 px -> all border
        assert_eq!(lab[0], BORDER);
        assert_eq!(lab[3 * 5 + 3], BORDER);
        assert_eq!(lab[4 * 5 + 4], BORDER);
        assert_eq!(lab.iter().filter(|&&v| v != 0).count(), 5);
    }

    #[test]
    fn blend_matches_hand_values() {
        // white under fill (255,220,0,40): G = (255*215 + 220*40 + 127) / 255 = 250,
        // B = (255*215 + 127) / 255 = 215
        let mut img = vec![255u8; 10 * 10 * 3];
        paint_patches(
            &mut img,
            10,
            10,
            &[[0, 0]],
            10.0,
            1.0,
            1.0,
            [255, 220, 0, 40],
            [255, 200, 0, 160],
        )
        .unwrap();
        let at = |x: usize, y: usize| &img[(y * 10 + x) * 3..(y * 10 + x) * 3 + 3];
        assert_eq!(at(5, 5), [255, 250, 215]);
        // outline alpha 160: G = (255*95 + 200*160 + 127) / 255 = 220, B = (255*95+127)/255 = 95
        assert_eq!(at(0, 5), [255, 220, 95]);
    }

    #[test]
    fn polyline_is_closed_and_clipped() {
        let mut img = vec![0u8; 20 * 20 * 3];
        let pts = [[2.0, 2.0], [17.0, 2.0], [17.0, 17.0], [2.0, 17.0]];
        draw_polyline(&mut img, 20, 20, &pts, true, [0, 200, 0], 1);
        let g = |x: usize, y: usize| img[(y * 20 + x) * 3 + 1];
        assert_eq!(g(10, 2), 200);
        assert_eq!(g(2, 10), 200); // closing segment
        assert_eq!(g(10, 10), 0);
        draw_polyline(
            &mut img,
            20,
            20,
            &[[-5.0, 0.0], [30.0, 0.0]],
            false,
            [9, 9, 9],
            3,
        );
        assert_eq!(img[(19) * 3], 9);
        assert_eq!(img[(20 + 19) * 3], 9); // width 3 around row 0: rows 0 and 1 (clipped -1)
        assert_eq!(img[(2 * 20) * 3], 0);
    }

    #[test]
    fn png_round_trips() {
        let mut m = vec![0u8; 64 * 48];
        m[100..900].fill(255);
        let png = encode_gray_png(&m, 64, 48).unwrap();
        let dec = png::Decoder::new(std::io::Cursor::new(png));
        let mut r = dec.read_info().unwrap();
        let mut buf = vec![0u8; r.output_buffer_size().unwrap()];
        let info = r.next_frame(&mut buf).unwrap();
        assert_eq!((info.width, info.height), (64, 48));
        assert_eq!(&buf[..info.buffer_size()], &m[..]);
    }
}
