//! Overlay pictures and mask PNGs of `pathflow tile` (see `pathflow_core::overlay`).

use numpy::{PyReadonlyArray2, PyReadonlyArrayDyn};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::convert::{contour_of, gray_of, image_of, regions_of, PyContours};
use crate::errors::{to_py, InvalidArgumentError};
use crate::pool::run;

/// Overlay JPEG: patch cells of `coords` (level-0 corners, side `side0`) blended on the RGB
/// thumbnail, then tissue contours (green) and holes (blue) in level-0 points; `fx`, `fy` =
/// thumbnail pixels per level-0 pixel.
#[pyfunction]
#[pyo3(signature = (thumb, coords, side0, fx, fy, tissue, holes, line_width=1, quality=85))]
#[allow(clippy::too_many_arguments)]
pub(crate) fn render_overlay<'py>(
    py: Python<'py>,
    thumb: PyReadonlyArrayDyn<'py, u8>,
    coords: PyReadonlyArray2<'py, i64>,
    side0: f64,
    fx: f64,
    fy: f64,
    tissue: PyContours<'py>,
    holes: Vec<PyContours<'py>>,
    line_width: usize,
    quality: u8,
) -> PyResult<Bound<'py, PyBytes>> {
    let (d, w, h, c) = image_of(&thumb)?;
    if c != 3 {
        return Err(InvalidArgumentError::new_err(format!(
            "overlay thumbnail must be RGB (H, W, 3), got {c} channel(s)"
        )));
    }
    let pts = contour_of(&coords)?;
    let regions = regions_of(tissue, holes)?;
    let style = pathflow_core::overlay::OverlayStyle {
        line_width,
        ..Default::default()
    };
    let out = run(py, || {
        pathflow_core::overlay::render_overlay(
            &d, w, h, &pts, side0, fx, fy, &regions, &style, quality,
        )
    })
    .map_err(to_py)?;
    Ok(PyBytes::new(py, &out))
}

/// 8-bit grayscale PNG of an (H, W) uint8 mask (unfiltered, fast DEFLATE).
#[pyfunction]
pub(crate) fn encode_gray_png<'py>(
    py: Python<'py>,
    mask: PyReadonlyArray2<'py, u8>,
) -> PyResult<Bound<'py, PyBytes>> {
    let (m, w, h) = gray_of(&mask);
    let out = run(py, || pathflow_core::overlay::encode_gray_png(&m, w, h)).map_err(to_py)?;
    Ok(PyBytes::new(py, &out))
}
