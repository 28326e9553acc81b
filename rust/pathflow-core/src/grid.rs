//! Patch coordinate grids and per-patch tissue tests.
//!
//! * [`clam_grid`]: CLAM's `process_contours`: a grid per tissue contour, anchored at the
//!   contour's bounding box, tested with a contour function and the holes.
//! * [`slide_grid`]: one grid anchored at the slide origin (aligned with native tiles), the
//!   same tests against every region, duplicates removed, row-major order.
//! * [`tissue_fractions`]: exact fraction of each patch footprint covered by a mask, by
//!   bilinear evaluation of its summed-area table.
//! * [`rasterize`]: regions (outer minus holes) drawn into a mask.

use std::collections::BTreeSet;

use rayon::prelude::*;

use crate::contour::{bounding_rect, Contour, Regions};
use crate::error::{invalid, Result};
use crate::polygon::{Polygon, RowSpans};

/// CLAM's contour checking functions (`contour_fn`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContourFn {
    /// Any of four points at +-1/4 patch around the centre is in the contour (default).
    FourPt,
    /// All four points are in the contour.
    FourPtHard,
    /// The centre is in the contour.
    Center,
    /// The top-left corner is in the contour.
    Basic,
}

impl std::str::FromStr for ContourFn {
    type Err = crate::CoreError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "four_pt" => Ok(Self::FourPt),
            "four_pt_hard" => Ok(Self::FourPtHard),
            "center" => Ok(Self::Center),
            "basic" => Ok(Self::Basic),
            _ => Err(invalid(format!(
                "unknown contour_fn {s:?} (expected four_pt, four_pt_hard, center or basic)"
            ))),
        }
    }
}

/// A region prepared for queries: outer polygon and hole polygons with cached rows.
struct PreparedRegion {
    outer: Polygon,
    holes: Vec<Polygon>,
    bbox: (i64, i64, i64, i64),
}

impl PreparedRegion {
    fn new(outer: &Contour, holes: &[Contour]) -> Self {
        Self {
            outer: Polygon::new(outer),
            holes: holes.iter().map(Polygon::new).collect(),
            bbox: bounding_rect(outer),
        }
    }
}

/// Row spans of one region for a sorted set of rows.
struct RegionRows {
    rows: Vec<i64>,
    outer: Vec<RowSpans>,
    holes: Vec<Vec<RowSpans>>,
}

impl RegionRows {
    fn new(r: &PreparedRegion, rows: Vec<i64>) -> Self {
        let outer = r.outer.rows(&rows);
        let holes = r.holes.iter().map(|h| h.rows(&rows)).collect();
        Self { rows, outer, holes }
    }
    fn idx(&self, y: i64) -> usize {
        self.rows.binary_search(&y).expect("row was prepared")
    }
    fn outer_test(&self, x: i64, y: i64) -> i8 {
        self.outer[self.idx(y)].test(x)
    }
    fn in_holes(&self, x: i64, y: i64) -> bool {
        let i = self.idx(y);
        self.holes.iter().any(|h| h[i].test(x) > 0)
    }
}

/// Patch test of CLAM: contour function on the outer contour, then the patch centre must not
/// be strictly inside a hole. `ps` is the patch size at level 0.
fn clam_accepts(rows: &RegionRows, f: ContourFn, x: i64, y: i64, ps: i64) -> bool {
    let (cx, cy) = (x + ps / 2, y + ps / 2);
    let shift = (ps / 2) / 2; // int(patch_size // 2 * 0.5)
    let pts = [
        (cx - shift, cy - shift),
        (cx + shift, cy + shift),
        (cx + shift, cy - shift),
        (cx - shift, cy + shift),
    ];
    let ok = match f {
        ContourFn::FourPt | ContourFn::FourPtHard if shift == 0 => rows.outer_test(cx, cy) >= 0,
        ContourFn::FourPt => pts.iter().any(|&(px, py)| rows.outer_test(px, py) >= 0),
        ContourFn::FourPtHard => pts.iter().all(|&(px, py)| rows.outer_test(px, py) >= 0),
        ContourFn::Center => rows.outer_test(cx, cy) >= 0,
        ContourFn::Basic => rows.outer_test(x, y) >= 0,
    };
    // CLAM tests the hole at (x + ps/2, y + ps/2) with float division: same point for even
    // sizes; for odd sizes the half-pixel point is never strictly inside iff neither neighbour
    // is, so we test the floor point, which is what integer contours allow.
    ok && !rows.in_holes(cx, cy)
}

fn rows_needed(f: ContourFn, ys: &[i64], ps: i64) -> Vec<i64> {
    let shift = (ps / 2) / 2;
    let mut set = BTreeSet::new();
    for &y in ys {
        let cy = y + ps / 2;
        set.insert(cy);
        match f {
            ContourFn::FourPt | ContourFn::FourPtHard => {
                set.insert(cy - shift);
                set.insert(cy + shift);
            }
            ContourFn::Basic => {
                set.insert(y);
            }
            ContourFn::Center => {}
        }
    }
    set.into_iter().collect()
}

fn arange(start: i64, stop: i64, step: i64) -> Vec<i64> {
    let mut v = Vec::new();
    let mut x = start;
    while x < stop {
        v.push(x);
        x += step;
    }
    v
}

/// CLAM's `process_contours` on level-0 regions: for each tissue contour in order, the grid
/// `arange(start, stop, step)` over its bounding box (x outer, y inner, as CLAM's `meshgrid`
/// with `indexing='ij'` flattens), kept when `f` accepts it and the centre is not in a hole.
/// Like CLAM, a contour that yields a single patch contributes none.
/// `ref_patch` and `step` are level-0 pixels; `level0` is the slide's `(width, height)`.
pub fn clam_grid(
    regions: &Regions,
    level0: (i64, i64),
    ref_patch: i64,
    step: i64,
    use_padding: bool,
    f: ContourFn,
) -> Result<Vec<[i64; 2]>> {
    if ref_patch <= 0 || step <= 0 {
        return Err(invalid(format!(
            "patch size ({ref_patch}) and step ({step}) must be > 0"
        )));
    }
    let per_contour: Vec<Vec<[i64; 2]>> = regions
        .tissue
        .par_iter()
        .zip(regions.holes.par_iter())
        .map(|(outer, holes)| {
            let reg = PreparedRegion::new(outer, holes);
            let (sx, sy, w, h) = reg.bbox;
            let (stop_x, stop_y) = if use_padding {
                (sx + w, sy + h)
            } else {
                (
                    (sx + w).min(level0.0 - ref_patch + 1),
                    (sy + h).min(level0.1 - ref_patch + 1),
                )
            };
            let xs = arange(sx, stop_x, step);
            let ys = arange(sy, stop_y, step);
            let rows = RegionRows::new(&reg, rows_needed(f, &ys, ref_patch));
            xs.par_iter()
                .flat_map_iter(|&x| {
                    let rows = &rows;
                    ys.iter().filter_map(move |&y| {
                        clam_accepts(rows, f, x, y, ref_patch).then_some([x, y])
                    })
                })
                .collect()
        })
        .collect();
    // CLAM's process_contour saves a contour's patches only when there are more than one.
    Ok(per_contour
        .into_iter()
        .filter(|c| c.len() > 1)
        .flatten()
        .collect())
}

/// Largest top-left corner of a slide-aligned grid: patches must fit inside the slide unless
/// padding is allowed, in which case they only have to start inside it.
fn grid_extent(level0: (i64, i64), patch: i64, step: i64, use_padding: bool) -> Result<(i64, i64)> {
    if patch <= 0 || step <= 0 {
        return Err(invalid(format!(
            "patch size ({patch}) and step ({step}) must be > 0"
        )));
    }
    Ok(if use_padding {
        (level0.0 - 1, level0.1 - 1)
    } else {
        (level0.0 - patch, level0.1 - patch)
    })
}

/// A grid anchored at the slide origin with `step` spacing; a patch is kept when any region
/// accepts it (contour function `f`, centre not in one of that region's holes).
/// Without padding only patches that fit entirely inside the slide are candidates.
/// Returns unique coordinates in row-major order (y, then x).
pub fn slide_grid(
    regions: &Regions,
    level0: (i64, i64),
    patch: i64,
    step: i64,
    use_padding: bool,
    f: ContourFn,
) -> Result<Vec<[i64; 2]>> {
    let (max_x, max_y) = grid_extent(level0, patch, step, use_padding)?;
    let mut all: Vec<[i64; 2]> = regions
        .tissue
        .par_iter()
        .zip(regions.holes.par_iter())
        .flat_map_iter(|(outer, holes)| {
            let reg = PreparedRegion::new(outer, holes);
            let (bx, by, bw, bh) = reg.bbox;
            // Grid positions whose patch overlaps the bounding box.
            let first = |b: i64| ((b - patch + 1).max(0) + step - 1) / step * step;
            let xs = arange(first(bx), (bx + bw).min(max_x + 1), step);
            let ys = arange(first(by), (by + bh).min(max_y + 1), step);
            let rows = RegionRows::new(&reg, rows_needed(f, &ys, patch));
            let mut keep = Vec::new();
            for &y in &ys {
                for &x in &xs {
                    if clam_accepts(&rows, f, x, y, patch) {
                        keep.push([x, y]);
                    }
                }
            }
            keep
        })
        .collect();
    all.sort_unstable_by_key(|p| (p[1], p[0]));
    all.dedup();
    Ok(all)
}

/// Every grid position of the slide (origin-anchored), row-major; used with a tissue
/// fraction threshold instead of a contour test.
pub fn full_grid(
    level0: (i64, i64),
    patch: i64,
    step: i64,
    use_padding: bool,
) -> Result<Vec<[i64; 2]>> {
    let (max_x, max_y) = grid_extent(level0, patch, step, use_padding)?;
    let mut out = Vec::new();
    for y in arange(0, max_y + 1, step) {
        for x in arange(0, max_x + 1, step) {
            out.push([x, y]);
        }
    }
    Ok(out)
}

/// Draws regions into a `width x height` mask: 255 where a pixel is inside or on a region's
/// outer contour and not inside or on one of its kept holes (the union over regions).
pub fn rasterize(regions: &Regions, width: usize, height: usize) -> Vec<u8> {
    let mut mask = vec![0u8; width * height];
    let w = width as i64;
    let h = height as i64;
    let drawn: Vec<(i64, Vec<Spans>)> = regions
        .tissue
        .par_iter()
        .zip(regions.holes.par_iter())
        .map(|(outer, holes)| {
            let reg = PreparedRegion::new(outer, holes);
            let (y0, y1) = reg.outer.y_range();
            let (y0, y1) = (y0.max(0), y1.min(h - 1));
            if y1 < y0 {
                return (0, Vec::new());
            }
            let rows: Vec<i64> = (y0..=y1).collect();
            let outer = reg.outer.rows(&rows);
            let holes: Vec<Vec<RowSpans>> = reg.holes.iter().map(|p| p.rows(&rows)).collect();
            let spans = (0..rows.len())
                .map(|i| {
                    let fill = outer[i].filled();
                    let cut: Vec<(i64, i64)> = holes.iter().flat_map(|hr| hr[i].filled()).collect();
                    subtract(&fill, cut)
                })
                .collect();
            (y0, spans)
        })
        .collect();
    for (y0, rows) in drawn {
        for (i, spans) in rows.iter().enumerate() {
            let y = (y0 + i as i64) as usize;
            let row = &mut mask[y * width..(y + 1) * width];
            for &(a, b) in spans {
                let (a, b) = (a.max(0), b.min(w - 1));
                if a <= b {
                    row[a as usize..=b as usize].fill(255);
                }
            }
        }
    }
    mask
}

/// Inclusive x ranges of one row.
type Spans = Vec<(i64, i64)>;

fn subtract(fill: &[(i64, i64)], mut cut: Vec<(i64, i64)>) -> Vec<(i64, i64)> {
    if cut.is_empty() {
        return fill.to_vec();
    }
    cut.sort_unstable();
    let mut out = Vec::new();
    for &(a, b) in fill {
        let mut start = a;
        for &(c, d) in &cut {
            if d < start || c > b {
                continue;
            }
            if c > start {
                out.push((start, c - 1));
            }
            start = start.max(d + 1);
            if start > b {
                break;
            }
        }
        if start <= b {
            out.push((start, b));
        }
    }
    out
}

/// Area of `[a, b)` that falls in the unit cell `[i, i + 1)`.
#[inline]
fn cell_overlap(i: usize, a: f64, b: f64) -> f64 {
    let lo = a.max(i as f64);
    let hi = b.min(i as f64 + 1.0);
    (hi - lo).max(0.0)
}

/// Exact integral of a binary mask (non-zero = 1, piecewise constant per pixel) over the
/// real rectangle `[u0, u1) x [v0, v1)`; outside the mask counts as 0.
pub fn mask_integral(
    mask: &[u8],
    width: usize,
    height: usize,
    u0: f64,
    v0: f64,
    u1: f64,
    v1: f64,
) -> f64 {
    let x0 = u0.max(0.0).floor() as usize;
    let x1 = (u1.min(width as f64).ceil().max(0.0) as usize).min(width);
    let y0 = v0.max(0.0).floor() as usize;
    let y1 = (v1.min(height as f64).ceil().max(0.0) as usize).min(height);
    if x0 >= x1 || y0 >= y1 {
        return 0.0;
    }
    let (wx_first, wx_last) = (cell_overlap(x0, u0, u1), cell_overlap(x1 - 1, u0, u1));
    let mut total = 0.0;
    for y in y0..y1 {
        let wy = cell_overlap(y, v0, v1);
        let row = &mask[y * width..(y + 1) * width];
        let s = if x1 - x0 == 1 {
            f64::from(u8::from(row[x0] != 0)) * wx_first
        } else {
            let inner = row[x0 + 1..x1 - 1].iter().filter(|&&v| v != 0).count() as f64;
            inner
                + f64::from(u8::from(row[x0] != 0)) * wx_first
                + f64::from(u8::from(row[x1 - 1] != 0)) * wx_last
        };
        total += wy * s;
    }
    total
}

/// Tissue fraction of each level-0 patch `[x, x + patch) x [y, y + patch)`, where mask pixel
/// `(i, j)` covers level-0 `[i * sx, (i + 1) * sx) x [j * sy, (j + 1) * sy)`. Exact area
/// fractions (partial pixels weighted by overlap); area outside the mask is background.
pub fn tissue_fractions(
    coords: &[[i64; 2]],
    patch: i64,
    mask: &[u8],
    width: usize,
    height: usize,
    sx: f64,
    sy: f64,
) -> Result<Vec<f32>> {
    if mask.len() != width * height {
        return Err(invalid("mask buffer does not match its shape"));
    }
    if sx <= 0.0 || sy <= 0.0 || patch <= 0 {
        return Err(invalid("mask scale and patch size must be > 0"));
    }
    Ok(coords
        .par_iter()
        .map(|p| {
            let (u0, v0) = (p[0] as f64 / sx, p[1] as f64 / sy);
            let (u1, v1) = ((p[0] + patch) as f64 / sx, (p[1] + patch) as f64 / sy);
            let area = (u1 - u0) * (v1 - v0);
            (mask_integral(mask, width, height, u0, v0, u1, v1) / area).clamp(0.0, 1.0) as f32
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn square(x0: i64, y0: i64, x1: i64, y1: i64) -> Contour {
        vec![[x0, y0], [x0, y1], [x1, y1], [x1, y0]]
    }

    #[test]
    fn clam_grid_square_with_hole() {
        // Region 0..=1000 with a hole 400..=600; patches of 256, step 256.
        let regions = Regions {
            tissue: vec![square(0, 0, 1000, 1000)],
            holes: vec![vec![square(400, 400, 600, 600)]],
        };
        let g = clam_grid(&regions, (2000, 2000), 256, 256, true, ContourFn::FourPt).unwrap();
        // bbox 0..1001 -> xs = ys = 0,256,512,768; (256,256) has centre 384 (outside hole),
        // (512,512) centre 640 outside the hole too; all four-pt tests pass: 16 patches.
        assert_eq!(g.len(), 16);
        // A hole containing a centre removes that patch: centre of (256,256) is (384,384).
        let regions2 = Regions {
            tissue: vec![square(0, 0, 1000, 1000)],
            holes: vec![vec![square(380, 380, 390, 390)]],
        };
        let g2 = clam_grid(&regions2, (2000, 2000), 256, 256, true, ContourFn::FourPt).unwrap();
        assert_eq!(g2.len(), 15);
        // A contour with room for one patch only is dropped, as CLAM does.
        let tiny = Regions {
            tissue: vec![square(0, 0, 200, 200)],
            holes: vec![vec![]],
        };
        assert!(
            clam_grid(&tiny, (2000, 2000), 256, 256, true, ContourFn::FourPt)
                .unwrap()
                .is_empty()
        );
        assert!(!g2.contains(&[256, 256]));
        // CLAM order: x outer, y inner.
        assert_eq!(&g[..2], &[[0, 0], [0, 256]]);
    }

    #[test]
    fn clam_grid_without_padding_stops_inside_slide() {
        let regions = Regions {
            tissue: vec![square(0, 0, 999, 999)],
            holes: vec![vec![]],
        };
        let g = clam_grid(&regions, (1000, 1000), 256, 256, false, ContourFn::FourPt).unwrap();
        // stop = min(1000, 1000 - 256 + 1) = 745 -> 0, 256, 512.
        assert_eq!(g.len(), 9);
    }

    #[test]
    fn slide_grid_is_origin_aligned_and_unique() {
        let regions = Regions {
            tissue: vec![square(100, 100, 700, 700), square(500, 500, 900, 900)],
            holes: vec![vec![], vec![]],
        };
        let g = slide_grid(&regions, (1024, 1024), 256, 256, false, ContourFn::FourPt).unwrap();
        assert!(g.iter().all(|p| p[0] % 256 == 0 && p[1] % 256 == 0));
        let mut s = g.clone();
        s.dedup();
        assert_eq!(s.len(), g.len());
        // (0,0): points (64,64) (192,192)... (192,192) is inside region 0.
        assert!(g.contains(&[0, 0]));
        // (768,768) would overflow the slide (768+256 = 1024 fits exactly) -> allowed.
        assert!(g.contains(&[768, 768]));
    }

    #[test]
    fn rasterize_subtracts_holes() {
        let regions = Regions {
            tissue: vec![square(1, 1, 8, 8)],
            holes: vec![vec![square(3, 3, 5, 5)]],
        };
        let m = rasterize(&regions, 10, 10);
        let count = m.iter().filter(|&&v| v != 0).count();
        assert_eq!(count, 64 - 9);
        assert_eq!(m[4 * 10 + 4], 0);
        assert_eq!(m[2 * 10 + 2], 255);
    }

    #[test]
    fn fractions_are_exact_areas() {
        // 4x4 mask, left half tissue; mask pixel = 10 level-0 px.
        let mut mask = vec![0u8; 16];
        for y in 0..4 {
            mask[y * 4] = 255;
            mask[y * 4 + 1] = 255;
        }
        let f = tissue_fractions(
            &[[0, 0], [10, 0], [15, 5], [20, 0]],
            20,
            &mask,
            4,
            4,
            10.0,
            10.0,
        )
        .unwrap();
        assert_eq!(f, vec![1.0, 0.5, 0.25, 0.0]);
        // Partially outside the mask: outside counts as background.
        let g = tissue_fractions(&[[-10, 0]], 20, &mask, 4, 4, 10.0, 10.0).unwrap();
        assert_eq!(g, vec![0.5]);
        // Sub-pixel footprint inside one mask pixel.
        let h = tissue_fractions(&[[12, 3]], 5, &mask, 4, 4, 10.0, 10.0).unwrap();
        assert_eq!(h, vec![1.0]);
    }
}
