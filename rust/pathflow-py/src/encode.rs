//! Patch and region encoders for shards (see `pathflow_core::encode`).

use numpy::PyReadonlyArrayDyn;
use pathflow_core::encode;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::convert::{image_of, view_of};
use crate::errors::to_py;
use crate::pool::run;

/// Resample each (H, W, 3) image to `out_size` and encode (`jpg`, `png` or `webp`), in
/// parallel; returns the encoded bytes in order.
#[pyfunction]
pub(crate) fn encode_images<'py>(
    py: Python<'py>,
    images: Vec<PyReadonlyArrayDyn<'py, u8>>,
    out_size: usize,
    format: &str,
    quality: u8,
) -> PyResult<Vec<Bound<'py, PyBytes>>> {
    let fmt: encode::Format = format.parse().map_err(to_py)?;
    let owned = images.iter().map(image_of).collect::<PyResult<Vec<_>>>()?;
    let views = owned.iter().map(view_of).collect::<PyResult<Vec<_>>>()?;
    let res = run(py, || {
        encode::encode_patches(&views, out_size, fmt, quality)
    });
    res.into_iter()
        .map(|r| r.map(|b| PyBytes::new(py, &b)).map_err(to_py))
        .collect()
}

/// Regions: each image resampled to `out_size` and encoded, followed by its grid of
/// `sub_size` sub-patches; one list of bytes per image.
#[pyfunction]
#[pyo3(signature = (images, out_size, sub_size, quality, format="jpg"))]
pub(crate) fn encode_regions<'py>(
    py: Python<'py>,
    images: Vec<PyReadonlyArrayDyn<'py, u8>>,
    out_size: usize,
    sub_size: usize,
    quality: u8,
    format: &str,
) -> PyResult<Vec<Vec<Bound<'py, PyBytes>>>> {
    let fmt: encode::Format = format.parse().map_err(to_py)?;
    let owned = images.iter().map(image_of).collect::<PyResult<Vec<_>>>()?;
    let views = owned.iter().map(view_of).collect::<PyResult<Vec<_>>>()?;
    let res = run(py, || {
        encode::encode_regions(&views, out_size, sub_size, fmt, quality)
    });
    res.into_iter()
        .map(|r| {
            r.map(|parts| parts.iter().map(|b| PyBytes::new(py, b)).collect())
                .map_err(to_py)
        })
        .collect()
}
