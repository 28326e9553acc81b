//! Exact point-in-polygon tests on integer points, a row at a time.
//!
//! [`Polygon::test`] returns what OpenCV's `pointPolygonTest(contour, pt, measureDist=false)`
//! returns for an integer point: `1` inside, `0` on the boundary, `-1` outside. Instead of
//! looping over every edge for every point, a [`RowSpans`] holds, for one row `y`, the
//! half-open x intervals of the interior (by the same crossing rule OpenCV counts) and the
//! inclusive x ranges that lie on the boundary; all arithmetic is integer, so the answer is
//! exact for any polygon and any point.

use crate::contour::Contour;

#[derive(Clone, Copy, Debug)]
struct Edge {
    x0: i64,
    y0: i64,
    x1: i64,
    y1: i64,
    ymin: i64,
    ymax: i64,
}

/// A polygon prepared for row queries.
#[derive(Clone, Debug)]
pub struct Polygon {
    /// Edges sorted by their lower y.
    edges: Vec<Edge>,
    ymin: i64,
    ymax: i64,
}

/// Interior and boundary of a polygon on one row.
#[derive(Clone, Debug, Default)]
pub struct RowSpans {
    /// Half-open `[a, b)` x intervals with an odd number of crossings to the right.
    pub inside: Vec<(i64, i64)>,
    /// Inclusive `[a, b]` x ranges on the boundary, sorted and merged.
    pub boundary: Vec<(i64, i64)>,
}

fn ceil_div(n: i64, d: i64) -> i64 {
    // d > 0
    let q = n.div_euclid(d);
    if n.rem_euclid(d) == 0 {
        q
    } else {
        q + 1
    }
}

fn covers(ranges: &[(i64, i64)], x: i64, half_open: bool) -> bool {
    // Ranges are sorted by start and disjoint.
    let i = ranges.partition_point(|r| r.0 <= x);
    if i == 0 {
        return false;
    }
    let r = ranges[i - 1];
    if half_open {
        x < r.1
    } else {
        x <= r.1
    }
}

impl RowSpans {
    /// `1` inside, `0` on the boundary, `-1` outside (OpenCV's convention).
    pub fn test(&self, x: i64) -> i8 {
        if covers(&self.boundary, x, false) {
            0
        } else if covers(&self.inside, x, true) {
            1
        } else {
            -1
        }
    }

    /// Inclusive x ranges where `test(x) >= 0`, sorted and merged.
    pub fn filled(&self) -> Vec<(i64, i64)> {
        let mut all: Vec<(i64, i64)> = self
            .inside
            .iter()
            .filter(|r| r.1 > r.0)
            .map(|r| (r.0, r.1 - 1))
            .chain(self.boundary.iter().copied())
            .collect();
        merge(&mut all);
        all
    }
}

fn merge(r: &mut Vec<(i64, i64)>) {
    r.sort_unstable();
    let mut out: Vec<(i64, i64)> = Vec::with_capacity(r.len());
    for &(a, b) in r.iter() {
        match out.last_mut() {
            Some(last) if a <= last.1 + 1 => last.1 = last.1.max(b),
            _ => out.push((a, b)),
        }
    }
    *r = out;
}

impl Polygon {
    /// Prepares a closed polygon (the last vertex connects back to the first).
    pub fn new(points: &Contour) -> Self {
        let n = points.len();
        let mut edges = Vec::with_capacity(n);
        for i in 0..n {
            let a = points[if i == 0 { n - 1 } else { i - 1 }];
            let b = points[i];
            edges.push(Edge {
                x0: a[0],
                y0: a[1],
                x1: b[0],
                y1: b[1],
                ymin: a[1].min(b[1]),
                ymax: a[1].max(b[1]),
            });
        }
        edges.sort_by_key(|e| e.ymin);
        let ymin = edges.first().map_or(0, |e| e.ymin);
        let ymax = edges.iter().map(|e| e.ymax).max().unwrap_or(-1);
        Self { edges, ymin, ymax }
    }

    /// Lowest and highest y of the vertices.
    pub fn y_range(&self) -> (i64, i64) {
        (self.ymin, self.ymax)
    }

    fn spans_from(active: &[Edge], y: i64) -> RowSpans {
        let mut crossings = Vec::new();
        let mut boundary = Vec::new();
        for e in active {
            if e.ymin == e.ymax {
                boundary.push((e.x0.min(e.x1), e.x0.max(e.x1)));
                continue;
            }
            if y < e.ymax {
                let (mut n, mut d) = (
                    e.x0 * (e.y1 - e.y0) + (y - e.y0) * (e.x1 - e.x0),
                    e.y1 - e.y0,
                );
                if d < 0 {
                    n = -n;
                    d = -d;
                }
                crossings.push(ceil_div(n, d));
                if n.rem_euclid(d) == 0 {
                    let x = n / d;
                    boundary.push((x, x));
                }
            } else {
                let x = if e.y0 == y { e.x0 } else { e.x1 };
                boundary.push((x, x));
            }
        }
        crossings.sort_unstable();
        let inside = crossings
            .chunks_exact(2)
            .map(|c| (c[0], c[1]))
            .filter(|r| r.1 > r.0)
            .collect();
        merge(&mut boundary);
        RowSpans { inside, boundary }
    }

    /// Row spans for one row.
    pub fn row(&self, y: i64) -> RowSpans {
        if y < self.ymin || y > self.ymax {
            return RowSpans::default();
        }
        let active: Vec<Edge> = self
            .edges
            .iter()
            .take_while(|e| e.ymin <= y)
            .filter(|e| e.ymax >= y)
            .copied()
            .collect();
        Self::spans_from(&active, y)
    }

    /// Row spans for many rows, `rows` sorted ascending; a sweep over the edges.
    pub fn rows(&self, rows: &[i64]) -> Vec<RowSpans> {
        let mut out = Vec::with_capacity(rows.len());
        let mut active: Vec<Edge> = Vec::new();
        let mut next = 0;
        for &y in rows {
            while next < self.edges.len() && self.edges[next].ymin <= y {
                active.push(self.edges[next]);
                next += 1;
            }
            active.retain(|e| e.ymax >= y);
            out.push(if y < self.ymin || y > self.ymax {
                RowSpans::default()
            } else {
                Self::spans_from(&active, y)
            });
        }
        out
    }

    /// OpenCV `pointPolygonTest` for one integer point.
    pub fn test(&self, x: i64, y: i64) -> i8 {
        self.row(y).test(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Straight port of OpenCV's integer branch, used as the oracle.
    fn oracle(c: &Contour, ip: [i64; 2]) -> i8 {
        let mut counter = 0;
        let mut v = c[c.len() - 1];
        for &cur in c {
            let v0 = v;
            v = cur;
            if (v0[1] <= ip[1] && v[1] <= ip[1])
                || (v0[1] > ip[1] && v[1] > ip[1])
                || (v0[0] < ip[0] && v[0] < ip[0])
            {
                if ip[1] == v[1]
                    && (ip[0] == v[0]
                        || (ip[1] == v0[1]
                            && ((v0[0] <= ip[0] && ip[0] <= v[0])
                                || (v[0] <= ip[0] && ip[0] <= v0[0]))))
                {
                    return 0;
                }
                continue;
            }
            let mut dist = (ip[1] - v0[1]) * (v[0] - v0[0]) - (ip[0] - v0[0]) * (v[1] - v0[1]);
            if dist == 0 {
                return 0;
            }
            if v[1] < v0[1] {
                dist = -dist;
            }
            if dist > 0 {
                counter += 1;
            }
        }
        if counter % 2 == 0 {
            -1
        } else {
            1
        }
    }

    fn lcg(seed: &mut u64) -> i64 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 33) % 21) as i64
    }

    #[test]
    fn matches_opencv_on_random_polygons() {
        let mut seed = 7u64;
        for _ in 0..300 {
            let n = 3 + (lcg(&mut seed) % 9) as usize;
            let poly: Contour = (0..n).map(|_| [lcg(&mut seed), lcg(&mut seed)]).collect();
            let p = Polygon::new(&poly);
            let rows: Vec<i64> = (-2..24).collect();
            let spans = p.rows(&rows);
            for (y, s) in rows.iter().zip(&spans) {
                for x in -2..24 {
                    let want = oracle(&poly, [x, *y]);
                    assert_eq!(s.test(x), want, "poly {poly:?} point ({x},{y})");
                    assert_eq!(p.test(x, *y), want);
                }
            }
        }
    }

    #[test]
    fn filled_square() {
        let sq: Contour = vec![[1, 1], [4, 1], [4, 3], [1, 3]];
        let p = Polygon::new(&sq);
        assert_eq!(p.row(2).filled(), vec![(1, 4)]);
        assert_eq!(p.row(2).test(2), 1);
        assert_eq!(p.row(1).test(2), 0);
        assert_eq!(p.row(0).filled(), vec![]);
    }
}
