//! Tiled JPEG levels of TIFF/SVS slides (see `pathflow_core::tiles`).

use numpy::ndarray::Array3;
use numpy::{IntoPyArray, PyArrayDyn, PyReadonlyArray2};
use pathflow_core::{jpeg, tiles};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::convert::contour_of;
use crate::errors::to_py;
use crate::pool::run;

pub(crate) type Outcomes<'py> = (Vec<Option<Bound<'py, PyBytes>>>, Vec<Option<String>>);

pub(crate) fn outcomes<'py>(
    py: Python<'py>,
    results: Vec<pathflow_core::Result<Vec<u8>>>,
) -> Outcomes<'py> {
    let mut data = Vec::with_capacity(results.len());
    let mut errors = Vec::with_capacity(results.len());
    for r in results {
        match r {
            Ok(b) => {
                data.push(Some(PyBytes::new(py, &b)));
                errors.push(None);
            }
            Err(e) => {
                data.push(None);
                errors.push(Some(e.to_string()));
            }
        }
    }
    (data, errors)
}

pub(crate) fn coords_of(a: &PyReadonlyArray2<'_, i64>) -> PyResult<Vec<[i64; 2]>> {
    contour_of(a)
}

/// One pyramid level of a tiled JPEG TIFF/SVS, read by the Rust core.
#[pyclass(module = "pathflow._core", name = "TiledLevel", frozen)]
pub(crate) struct PyTiledLevel {
    inner: tiles::TiledLevel,
}

#[pymethods]
impl PyTiledLevel {
    #[new]
    #[allow(clippy::too_many_arguments)]
    fn new(
        path: std::path::PathBuf,
        width: usize,
        height: usize,
        tile_width: usize,
        tile_height: usize,
        offsets: numpy::PyReadonlyArray1<'_, u64>,
        counts: numpy::PyReadonlyArray1<'_, u64>,
        tables: Vec<u8>,
        rgb: bool,
    ) -> PyResult<Self> {
        let color = if rgb {
            jpeg::JpegColor::Rgb
        } else {
            jpeg::JpegColor::YCbCr
        };
        let inner = tiles::TiledLevel::open(
            &path,
            width,
            height,
            tile_width,
            tile_height,
            offsets.as_array().to_vec(),
            counts.as_array().to_vec(),
            tables,
            color,
        )
        .map_err(to_py)?;
        Ok(Self { inner })
    }

    /// Level size `(width, height)`.
    #[getter]
    fn size(&self) -> (usize, usize) {
        self.inner.size()
    }

    /// Tile size `(width, height)`.
    #[getter]
    fn tile_size(&self) -> (usize, usize) {
        self.inner.tile_size()
    }

    /// RGB region at this level's coordinates; outside the level is white.
    fn read_region<'py>(
        &self,
        py: Python<'py>,
        x: i64,
        y: i64,
        w: usize,
        h: usize,
    ) -> PyResult<Bound<'py, PyArrayDyn<u8>>> {
        let data = run(py, || self.inner.read_region(x, y, w, h)).map_err(to_py)?;
        let arr = Array3::from_shape_vec((h, w, 3), data)
            .expect("shape")
            .into_dyn();
        Ok(arr.into_pyarray(py))
    }

    /// Read + area-resize + JPEG-encode a patch per top-left corner (level coordinates);
    /// returns `(payloads, errors)` with `None` where the other list has the outcome.
    fn patches<'py>(
        &self,
        py: Python<'py>,
        coords: PyReadonlyArray2<'py, i64>,
        read_size: usize,
        out_size: usize,
        quality: u8,
    ) -> PyResult<Outcomes<'py>> {
        let c = coords_of(&coords)?;
        let res = run(py, || self.inner.patches(&c, read_size, out_size, quality));
        Ok(outcomes(py, res))
    }

    /// The native tiles at tile-aligned corners as standalone JPEGs (no re-encoding).
    fn passthrough<'py>(
        &self,
        py: Python<'py>,
        coords: PyReadonlyArray2<'py, i64>,
    ) -> PyResult<Outcomes<'py>> {
        let c = coords_of(&coords)?;
        let res = run(py, || self.inner.passthrough(&c));
        Ok(outcomes(py, res))
    }
}
