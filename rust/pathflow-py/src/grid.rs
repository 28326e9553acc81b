//! Patch grids, tissue fractions and region rasterisation (see `pathflow_core::grid`).

use numpy::{IntoPyArray, PyArray1, PyArray2, PyReadonlyArray2};
use pathflow_core::contour::Regions;
use pathflow_core::grid::{self, ContourFn};
use pyo3::prelude::*;

use crate::convert::{contour_of, coords_out, gray_of, gray_out, regions_of, PyContours};
use crate::errors::to_py;
use crate::pool::run;

/// Draws regions (outer minus holes, inclusive boundaries) into a `height x width` mask.
#[pyfunction]
pub(crate) fn rasterize<'py>(
    py: Python<'py>,
    tissue: PyContours<'py>,
    holes: Vec<PyContours<'py>>,
    width: usize,
    height: usize,
) -> PyResult<Bound<'py, PyArray2<u8>>> {
    let r = regions_of(tissue, holes)?;
    let m = run(py, || grid::rasterize(&r, width, height));
    Ok(gray_out(py, m, width, height))
}

pub(crate) struct GridArgs<'a> {
    size: (i64, i64),
    patch: i64,
    step: i64,
    use_padding: bool,
    contour_fn: &'a str,
}

pub(crate) type GridFn =
    fn(&Regions, (i64, i64), i64, i64, bool, ContourFn) -> pathflow_core::Result<Vec<[i64; 2]>>;

/// Converts the regions, runs a grid function without the GIL, returns (N, 2) coordinates.
pub(crate) fn grid_with<'py>(
    py: Python<'py>,
    tissue: PyContours<'py>,
    holes: Vec<PyContours<'py>>,
    a: GridArgs<'_>,
    f: GridFn,
) -> PyResult<Bound<'py, PyArray2<i64>>> {
    let r = regions_of(tissue, holes)?;
    let cf: ContourFn = a.contour_fn.parse().map_err(to_py)?;
    let c = run(py, || f(&r, a.size, a.patch, a.step, a.use_padding, cf)).map_err(to_py)?;
    Ok(coords_out(py, c))
}

/// CLAM's per-contour patch grid on level-0 regions; (N, 2) int64 top-left coordinates.
#[pyfunction]
#[pyo3(signature = (tissue, holes, width, height, patch, step, use_padding=true, contour_fn="four_pt"))]
#[allow(clippy::too_many_arguments)]
pub(crate) fn clam_grid<'py>(
    py: Python<'py>,
    tissue: PyContours<'py>,
    holes: Vec<PyContours<'py>>,
    width: i64,
    height: i64,
    patch: i64,
    step: i64,
    use_padding: bool,
    contour_fn: &str,
) -> PyResult<Bound<'py, PyArray2<i64>>> {
    let args = GridArgs {
        size: (width, height),
        patch,
        step,
        use_padding,
        contour_fn,
    };
    grid_with(py, tissue, holes, args, grid::clam_grid)
}

/// Slide-aligned patch grid (origin (0, 0)) tested against every region; row-major, unique.
#[pyfunction]
#[pyo3(signature = (tissue, holes, width, height, patch, step, use_padding=false, contour_fn="four_pt"))]
#[allow(clippy::too_many_arguments)]
pub(crate) fn slide_grid<'py>(
    py: Python<'py>,
    tissue: PyContours<'py>,
    holes: Vec<PyContours<'py>>,
    width: i64,
    height: i64,
    patch: i64,
    step: i64,
    use_padding: bool,
    contour_fn: &str,
) -> PyResult<Bound<'py, PyArray2<i64>>> {
    let args = GridArgs {
        size: (width, height),
        patch,
        step,
        use_padding,
        contour_fn,
    };
    grid_with(py, tissue, holes, args, grid::slide_grid)
}

/// Every slide-aligned grid position, row-major.
#[pyfunction]
#[pyo3(signature = (width, height, patch, step, use_padding=false))]
pub(crate) fn full_grid(
    py: Python<'_>,
    width: i64,
    height: i64,
    patch: i64,
    step: i64,
    use_padding: bool,
) -> PyResult<Bound<'_, PyArray2<i64>>> {
    let c = grid::full_grid((width, height), patch, step, use_padding).map_err(to_py)?;
    Ok(coords_out(py, c))
}

/// Exact tissue fraction of each level-0 patch footprint; mask pixel = `sx x sy` level-0 px.
#[pyfunction]
pub(crate) fn tissue_fractions<'py>(
    py: Python<'py>,
    coords: PyReadonlyArray2<'py, i64>,
    patch: i64,
    mask: PyReadonlyArray2<'py, u8>,
    sx: f64,
    sy: f64,
) -> PyResult<Bound<'py, PyArray1<f32>>> {
    let c = contour_of(&coords)?;
    let (m, w, h) = gray_of(&mask);
    let f = run(py, || grid::tissue_fractions(&c, patch, &m, w, h, sx, sy)).map_err(to_py)?;
    Ok(f.into_pyarray(py))
}
