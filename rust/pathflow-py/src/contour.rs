//! Contours (see `pathflow_core::contour` and `pathflow_core::polygon`).

use numpy::{PyArray2, PyReadonlyArray2};
use pathflow_core::contour::{self, FilterParams};
use pyo3::prelude::*;

use crate::convert::{
    contour_of, contour_out, gray_of, regions_of, regions_out, PyContours, RegionsOut,
};
use crate::errors::to_py;
use crate::pool::run;

/// All borders of a binary image with `RETR_CCOMP` semantics: a list of
/// `(points (N, 2) int64, is_hole, parent index or -1)`.
#[pyfunction]
#[allow(clippy::type_complexity)]
pub(crate) fn find_contours<'py>(
    py: Python<'py>,
    binary: PyReadonlyArray2<'py, u8>,
) -> PyResult<Vec<(Bound<'py, PyArray2<i64>>, bool, i64)>> {
    let (d, w, h) = gray_of(&binary);
    let cs = run(py, || contour::find_contours(&d, w, h)).map_err(to_py)?;
    Ok(cs
        .iter()
        .map(|c| {
            (
                contour_out(py, &c.points),
                c.is_hole,
                c.parent.map_or(-1, |p| p as i64),
            )
        })
        .collect())
}

/// Polygon area (`cv2.contourArea`).
#[pyfunction]
pub(crate) fn contour_area(points: PyReadonlyArray2<'_, i64>) -> PyResult<f64> {
    Ok(contour::contour_area(&contour_of(&points)?))
}

/// `cv2.pointPolygonTest(points, (x, y), False)` for an integer point: 1, 0 or -1.
#[pyfunction]
pub(crate) fn point_polygon_test(
    points: PyReadonlyArray2<'_, i64>,
    x: i64,
    y: i64,
) -> PyResult<i8> {
    Ok(pathflow_core::polygon::Polygon::new(&contour_of(&points)?).test(x, y))
}

/// Traces a binary image and applies CLAM's contour filter (areas in pixels of `binary`).
/// Returns `(tissue, holes)`: outer contours and, per contour, its kept holes.
#[pyfunction]
#[pyo3(signature = (binary, min_area, min_hole_area, max_holes=8))]
pub(crate) fn segment_contours<'py>(
    py: Python<'py>,
    binary: PyReadonlyArray2<'py, u8>,
    min_area: f64,
    min_hole_area: f64,
    max_holes: usize,
) -> PyResult<RegionsOut<'py>> {
    let (d, w, h) = gray_of(&binary);
    let p = FilterParams {
        min_area,
        min_hole_area,
        max_holes,
    };
    let r = run(py, || {
        contour::find_contours(&d, w, h).map(|cs| contour::filter_contours(&cs, &p))
    })
    .map_err(to_py)?;
    Ok(regions_out(py, &r))
}

/// Scales regions like CLAM (`int32(point * scale)`, truncation).
#[pyfunction]
pub(crate) fn scale_regions<'py>(
    py: Python<'py>,
    tissue: PyContours<'py>,
    holes: Vec<PyContours<'py>>,
    sx: f64,
    sy: f64,
) -> PyResult<RegionsOut<'py>> {
    let r = regions_of(tissue, holes)?;
    Ok(regions_out(py, &r.scaled(sx, sy)))
}
