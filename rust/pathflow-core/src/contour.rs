//! Contours with holes and CLAM's contour filter.
//!
//! [`find_contours`] returns borders with OpenCV `RETR_CCOMP` semantics: every outer border is
//! a top-level contour and every hole border has the outer border of its region as parent.
//! Border following is imageproc's Suzuki-Abe implementation; the image is padded with one
//! zero pixel first, as OpenCV does, so regions that touch the image edge are traced fully.

use rayon::prelude::*;

use crate::error::Result;
use crate::ImageView;

/// A closed polygon of integer vertices (pixel centres), implicitly closed.
pub type Contour = Vec<[i64; 2]>;

/// One contour of a binary image with its CCOMP parent.
#[derive(Clone, Debug)]
pub struct TracedContour {
    /// Border pixels in tracing order (`CHAIN_APPROX_NONE`).
    pub points: Contour,
    /// `true` for a hole border.
    pub is_hole: bool,
    /// Index of the outer contour a hole belongs to; `None` for outer contours.
    pub parent: Option<usize>,
}

/// Traces all borders of the non-zero pixels of a binary image.
///
/// Suzuki-Abe border following on an `i32` label image padded with one zero pixel (as
/// OpenCV pads), the same algorithm as `imageproc::contours::find_contours` but over flat
/// slices; the tests check it point for point against imageproc (and the Python tests
/// against `cv2.findContours`).
pub fn find_contours(data: &[u8], width: usize, height: usize) -> Result<Vec<TracedContour>> {
    ImageView::new(data, width, height, 1)?;
    let pw = width + 2;
    let ph = height + 2;
    let mut img = vec![0i32; pw * ph];
    img.par_chunks_mut(pw).enumerate().for_each(|(py, row)| {
        if py == 0 || py > height {
            return;
        }
        let src = &data[(py - 1) * width..py * width];
        for (d, &s) in row[1..=width].iter_mut().zip(src) {
            *d = i32::from(s != 0);
        }
    });
    // Neighbour offsets, clockwise starting west: w, nw, n, ne, e, se, s, sw.
    let pwi = pw as isize;
    let offs: [isize; 8] = [-1, -pwi - 1, -pwi, -pwi + 1, 1, pwi + 1, pwi, pwi - 1];
    let dir_of = |from: usize, to: usize| -> usize {
        let d = to as isize - from as isize;
        offs.iter().position(|&o| o == d).expect("neighbour")
    };
    let mut contours: Vec<TracedContour> = Vec::new();
    let mut kinds: Vec<bool> = Vec::new(); // is_hole per border number - 2
    let mut parents: Vec<Option<usize>> = Vec::new(); // full Suzuki tree parent
    let mut nbd: i32 = 1;
    for y in 1..=height {
        let mut lnbd: i32 = 1;
        let row = y * pw;
        let mut x = 1;
        while x <= width {
            let p = row + x;
            let f = img[p];
            if f == 0 {
                x += 1;
                continue;
            }
            let start = if f == 1 && img[p - 1] == 0 {
                Some((p - 1, false))
            } else if f >= 1 && img[p + 1] == 0 {
                if f > 1 {
                    lnbd = f;
                }
                Some((p + 1, true))
            } else {
                None
            };
            if let Some((from, is_hole)) = start {
                nbd += 1;
                let parent = if lnbd > 1 {
                    let pi = (lnbd - 2) as usize;
                    if is_hole != kinds[pi] {
                        Some(pi)
                    } else {
                        parents[pi]
                    }
                } else {
                    None
                };
                let mut pts: Contour = Vec::new();
                let to_xy = |q: usize| [(q % pw) as i64 - 1, (q / pw) as i64 - 1];
                // 3.1: clockwise from `from` around p for a non-zero pixel.
                let d0 = dir_of(p, from);
                let first = (0..8).map(|k| (d0 + k) % 8).find(|&d| {
                    let q = (p as isize + offs[d]) as usize;
                    img[q] != 0
                });
                match first {
                    None => {
                        pts.push(to_xy(p));
                        img[p] = -nbd;
                    }
                    Some(d1) => {
                        let p1 = (p as isize + offs[d1]) as usize;
                        let (mut p2, mut p3) = (p1, p);
                        loop {
                            pts.push(to_xy(p3));
                            // 3.3: counter-clockwise from the element after p2 around p3.
                            let d2 = dir_of(p3, p2);
                            let mut east_zero = false;
                            let mut p4 = p3;
                            for k in 1..=8 {
                                let d = (d2 + 8 - k) % 8;
                                let q = (p3 as isize + offs[d]) as usize;
                                if img[q] != 0 {
                                    p4 = q;
                                    break;
                                }
                                if d == 4 {
                                    east_zero = true;
                                }
                            }
                            // 3.4
                            if east_zero {
                                img[p3] = -nbd;
                            } else if img[p3] == 1 {
                                img[p3] = nbd;
                            }
                            // 3.5
                            if p4 == p && p3 == p1 {
                                break;
                            }
                            p2 = p3;
                            p3 = p4;
                        }
                    }
                }
                kinds.push(is_hole);
                parents.push(parent);
                contours.push(TracedContour {
                    points: pts,
                    is_hole,
                    parent: if is_hole { parent } else { None },
                });
            }
            if img[p] != 1 {
                lnbd = img[p].abs();
            }
            x += 1;
        }
    }
    Ok(contours)
}

/// Unsigned polygon area by the shoelace formula (`cv2.contourArea(c, oriented=False)`).
pub fn contour_area(c: &[[i64; 2]]) -> f64 {
    if c.len() < 3 {
        return 0.0;
    }
    let mut prev = c[c.len() - 1];
    let mut a = 0.0f64;
    for &p in c {
        a += prev[0] as f64 * p[1] as f64 - p[0] as f64 * prev[1] as f64;
        prev = p;
    }
    (a * 0.5).abs()
}

/// Axis-aligned bounding box `(x, y, w, h)` as `cv2.boundingRect` reports it (inclusive
/// pixels, so a single point has size 1x1).
pub fn bounding_rect(c: &[[i64; 2]]) -> (i64, i64, i64, i64) {
    if c.is_empty() {
        return (0, 0, 0, 0);
    }
    let (mut x0, mut y0, mut x1, mut y1) = (i64::MAX, i64::MAX, i64::MIN, i64::MIN);
    for p in c {
        x0 = x0.min(p[0]);
        y0 = y0.min(p[1]);
        x1 = x1.max(p[0]);
        y1 = y1.max(p[1]);
    }
    (x0, y0, x1 - x0 + 1, y1 - y0 + 1)
}

/// Area limits of CLAM's `_filter_contours`, in pixels of the image that was traced.
#[derive(Clone, Debug)]
pub struct FilterParams {
    /// Keep a region when (outer area - hole areas) > `min_area`.
    pub min_area: f64,
    /// Keep a hole when its area > `min_hole_area` (among the `max_holes` largest).
    pub min_hole_area: f64,
    /// Number of largest holes considered per region.
    pub max_holes: usize,
}

/// Kept tissue regions: outer contours and, for each, its kept holes.
#[derive(Clone, Debug, Default)]
pub struct Regions {
    /// Outer borders of the kept regions.
    pub tissue: Vec<Contour>,
    /// `holes[i]` are the kept holes of `tissue[i]`.
    pub holes: Vec<Vec<Contour>>,
}

/// CLAM's `_filter_contours`: regions whose area minus their holes exceeds `min_area`, each
/// with its `max_holes` largest holes whose area exceeds `min_hole_area`.
pub fn filter_contours(contours: &[TracedContour], p: &FilterParams) -> Regions {
    let mut out = Regions::default();
    for (idx, c) in contours.iter().enumerate() {
        if c.parent.is_some() || c.is_hole {
            continue;
        }
        let holes: Vec<&TracedContour> = contours
            .iter()
            .filter(|h| h.is_hole && h.parent == Some(idx))
            .collect();
        let hole_area: f64 = holes.iter().map(|h| contour_area(&h.points)).sum();
        let a = contour_area(&c.points) - hole_area;
        if a == 0.0 || a <= p.min_area {
            continue;
        }
        let mut ranked: Vec<(f64, &TracedContour)> = holes
            .iter()
            .map(|h| (contour_area(&h.points), *h))
            .collect();
        // Stable sort, largest first: ties keep tracing order, like Python's sorted().
        ranked.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap_or(std::cmp::Ordering::Equal));
        let kept = ranked
            .into_iter()
            .take(p.max_holes)
            .filter(|(a, _)| *a > p.min_hole_area)
            .map(|(_, h)| h.points.clone())
            .collect();
        out.tissue.push(c.points.clone());
        out.holes.push(kept);
    }
    out
}

/// Scales contours to level 0 like CLAM: `int32(point * scale)` (truncation toward zero).
pub fn scale_contour(c: &[[i64; 2]], sx: f64, sy: f64) -> Contour {
    c.iter()
        .map(|p| [(p[0] as f64 * sx) as i64, (p[1] as f64 * sy) as i64])
        .collect()
}

impl Regions {
    /// All regions scaled by `(sx, sy)` with [`scale_contour`].
    pub fn scaled(&self, sx: f64, sy: f64) -> Regions {
        Regions {
            tissue: self
                .tissue
                .iter()
                .map(|c| scale_contour(c, sx, sy))
                .collect(),
            holes: self
                .holes
                .iter()
                .map(|hs| hs.iter().map(|c| scale_contour(c, sx, sy)).collect())
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::GrayImage;
    use imageproc::contours::{find_contours as suzuki, BorderType};

    /// imageproc's implementation on the padded image, as the oracle.
    fn oracle(data: &[u8], w: usize, h: usize) -> Vec<(Contour, bool, Option<usize>)> {
        let mut padded = vec![0u8; (w + 2) * (h + 2)];
        for y in 0..h {
            for x in 0..w {
                padded[(y + 1) * (w + 2) + x + 1] = u8::from(data[y * w + x] != 0);
            }
        }
        let img = GrayImage::from_raw((w + 2) as u32, (h + 2) as u32, padded).unwrap();
        suzuki::<i64>(&img)
            .into_iter()
            .map(|c| {
                let hole = c.border_type == BorderType::Hole;
                let pts = c.points.iter().map(|p| [p.x - 1, p.y - 1]).collect();
                (pts, hole, if hole { c.parent } else { None })
            })
            .collect()
    }

    #[test]
    fn matches_imageproc_on_random_images() {
        let mut seed = 5u32;
        for density in [2u32, 3, 5] {
            let (w, h) = (41, 29);
            let img: Vec<u8> = (0..w * h)
                .map(|_| {
                    seed = seed.wrapping_mul(1103515245).wrapping_add(12345);
                    if (seed >> 16).is_multiple_of(density) {
                        0
                    } else {
                        255
                    }
                })
                .collect();
            let ours: Vec<(Contour, bool, Option<usize>)> = find_contours(&img, w, h)
                .unwrap()
                .into_iter()
                .map(|c| (c.points, c.is_hole, c.parent))
                .collect();
            assert_eq!(ours, oracle(&img, w, h), "density {density}");
        }
    }

    /// 8x8 image: a 6x6 square ring (outer 1..=6) with a 2x2 hole at 3..=4, touching nothing.
    fn ring() -> (Vec<u8>, usize, usize) {
        let (w, h) = (8, 8);
        let mut d = vec![0u8; w * h];
        for y in 1..=6 {
            for x in 1..=6 {
                if !((3..=4).contains(&x) && (3..=4).contains(&y)) {
                    d[y * w + x] = 255;
                }
            }
        }
        (d, w, h)
    }

    #[test]
    fn ring_has_outer_and_hole() {
        let (d, w, h) = ring();
        let cs = find_contours(&d, w, h).unwrap();
        assert_eq!(cs.len(), 2);
        let outer = cs.iter().position(|c| !c.is_hole).unwrap();
        let hole = cs.iter().find(|c| c.is_hole).unwrap();
        assert_eq!(hole.parent, Some(outer));
        // Outer border through pixel centres 1..=6: a 5x5 square.
        assert_eq!(contour_area(&cs[outer].points), 25.0);
        assert_eq!(bounding_rect(&cs[outer].points), (1, 1, 6, 6));
        // The hole border runs through the 8 foreground pixels 4-adjacent to the 2x2 hole,
        // an octagon of area 9 - 4 * 0.5 = 7 (cv2.contourArea gives 7.0 as well).
        assert_eq!(contour_area(&hole.points), 7.0);
    }

    #[test]
    fn region_touching_the_edge_is_traced() {
        let (w, h) = (4, 3);
        let d = vec![255u8; w * h];
        let cs = find_contours(&d, w, h).unwrap();
        assert_eq!(cs.len(), 1);
        assert_eq!(contour_area(&cs[0].points), 6.0);
        assert_eq!(bounding_rect(&cs[0].points), (0, 0, 4, 3));
    }

    #[test]
    fn filter_subtracts_holes_and_applies_limits() {
        let (d, w, h) = ring();
        let cs = find_contours(&d, w, h).unwrap();
        let keep = |min_area, min_hole_area| {
            filter_contours(
                &cs,
                &FilterParams {
                    min_area,
                    min_hole_area,
                    max_holes: 8,
                },
            )
        };
        // Net area 25 - 7 = 18.
        assert_eq!(keep(17.9, 0.0).tissue.len(), 1);
        assert_eq!(keep(18.0, 0.0).tissue.len(), 0);
        assert_eq!(keep(1.0, 6.9).holes[0].len(), 1);
        assert_eq!(keep(1.0, 7.0).holes[0].len(), 0);
    }

    #[test]
    fn scaling_truncates() {
        assert_eq!(scale_contour(&[[3, 5]], 2.5, 1.5), vec![[7, 7]]);
    }
}
