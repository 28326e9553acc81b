//! Mask operations (see `pathflow_core::mask`).

use numpy::ndarray::Array3;
use numpy::{
    IntoPyArray, PyArray2, PyArrayDyn, PyReadonlyArray2, PyReadonlyArrayDyn, PyUntypedArrayMethods,
};
use pathflow_core::mask::{self, BinaryParams};
use pathflow_core::ImageView;
use pyo3::prelude::*;

use crate::convert::{gray_of, gray_out, image_of};
use crate::errors::to_py;
use crate::pool::run;

/// HSV saturation of an RGB(A) uint8 image on OpenCV's 0-255 scale.
#[pyfunction]
pub(crate) fn saturation<'py>(
    py: Python<'py>,
    rgb: PyReadonlyArrayDyn<'py, u8>,
) -> PyResult<Bound<'py, PyArray2<u8>>> {
    let (d, w, h, c) = image_of(&rgb)?;
    let s = run(py, || mask::saturation(&ImageView::new(&d, w, h, c)?)).map_err(to_py)?;
    Ok(gray_out(py, s, w, h))
}

/// 255 where a pixel looks like blue, green or black pen ink (dilated by `grow` pixels).
#[pyfunction]
#[pyo3(signature = (rgb, grow=0))]
pub(crate) fn ink_mask<'py>(
    py: Python<'py>,
    rgb: PyReadonlyArrayDyn<'py, u8>,
    grow: usize,
) -> PyResult<Bound<'py, PyArray2<u8>>> {
    let (d, w, h, c) = image_of(&rgb)?;
    let s = run(py, || mask::ink_mask(&ImageView::new(&d, w, h, c)?, grow)).map_err(to_py)?;
    Ok(gray_out(py, s, w, h))
}

/// Median blur with replicated borders (`cv2.medianBlur`).
#[pyfunction]
pub(crate) fn median_blur<'py>(
    py: Python<'py>,
    img: PyReadonlyArray2<'py, u8>,
    ksize: usize,
) -> PyResult<Bound<'py, PyArray2<u8>>> {
    let (d, w, h) = gray_of(&img);
    let out = run(py, || mask::median_blur(&d, w, h, ksize)).map_err(to_py)?;
    Ok(gray_out(py, out, w, h))
}

/// Otsu's threshold as OpenCV computes it.
#[pyfunction]
pub(crate) fn otsu_threshold(py: Python<'_>, img: PyReadonlyArray2<'_, u8>) -> u8 {
    let (d, _, _) = gray_of(&img);
    run(py, || mask::otsu_threshold(&d))
}

/// Morphological closing with a `ksize x ksize` square (`cv2.MORPH_CLOSE`).
#[pyfunction]
pub(crate) fn morph_close<'py>(
    py: Python<'py>,
    img: PyReadonlyArray2<'py, u8>,
    ksize: usize,
) -> PyResult<Bound<'py, PyArray2<u8>>> {
    let (d, w, h) = gray_of(&img);
    let out = run(py, || mask::morph_close(&d, w, h, ksize)).map_err(to_py)?;
    Ok(gray_out(py, out, w, h))
}

/// Binary tissue image of CLAM's `segmentTissue`; returns `(binary, threshold, ink)`.
#[pyfunction]
#[pyo3(signature = (rgb, sthresh=8, mthresh=7, close=4, otsu=false, remove_ink=false))]
#[allow(clippy::type_complexity)]
pub(crate) fn binary_tissue<'py>(
    py: Python<'py>,
    rgb: PyReadonlyArrayDyn<'py, u8>,
    sthresh: u8,
    mthresh: usize,
    close: usize,
    otsu: bool,
    remove_ink: bool,
) -> PyResult<(
    Bound<'py, PyArray2<u8>>,
    u8,
    Option<Bound<'py, PyArray2<u8>>>,
)> {
    let (d, w, h, c) = image_of(&rgb)?;
    let p = BinaryParams {
        sthresh,
        mthresh,
        close,
        otsu,
        remove_ink,
    };
    let b = run(py, || {
        mask::binary_tissue(&ImageView::new(&d, w, h, c)?, &p)
    })
    .map_err(to_py)?;
    let ink = (!b.ink.is_empty()).then(|| gray_out(py, b.ink, w, h));
    Ok((gray_out(py, b.data, w, h), b.threshold, ink))
}

/// Box-filter downsampling by an integer factor of an (H, W) or (H, W, C) uint8 image.
#[pyfunction]
pub(crate) fn downsample_area<'py>(
    py: Python<'py>,
    img: PyReadonlyArrayDyn<'py, u8>,
    factor: usize,
) -> PyResult<Bound<'py, PyArrayDyn<u8>>> {
    let (d, w, h, c) = image_of(&img)?;
    let ndim = img.ndim();
    let (out, ow, oh) = run(py, || {
        mask::downsample_area(&ImageView::new(&d, w, h, c)?, factor)
    })
    .map_err(to_py)?;
    let arr = Array3::from_shape_vec((oh, ow, c), out)
        .expect("shape")
        .into_dyn();
    let arr = if ndim == 2 {
        arr.into_shape_with_order(vec![oh, ow]).expect("shape")
    } else {
        arr
    };
    Ok(arr.into_pyarray(py))
}
