//! numpy <-> core conversions shared by the modules (borrowing where the array allows).

use std::borrow::Cow;

use numpy::ndarray::Array2;
use numpy::{IntoPyArray, PyArray2, PyReadonlyArray2, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pathflow_core::contour::{Contour, Regions};
use pathflow_core::ImageView;
use pyo3::prelude::*;

use crate::errors::{to_py, InvalidArgumentError};

/// An image as (data, width, height, channels); borrows the numpy buffer when it is
/// C-contiguous (the read-only borrow keeps it alive and unmodified), copies otherwise.
pub(crate) fn image_of<'a>(
    a: &'a PyReadonlyArrayDyn<'_, u8>,
) -> PyResult<(Cow<'a, [u8]>, usize, usize, usize)> {
    let shape = a.shape().to_vec();
    let (h, w, c) = match shape.as_slice() {
        [h, w] => (*h, *w, 1),
        [h, w, c] => (*h, *w, *c),
        _ => {
            return Err(InvalidArgumentError::new_err(format!(
                "expected an image of shape (H, W) or (H, W, C), got {shape:?}"
            )))
        }
    };
    let data = match a.as_slice() {
        Ok(s) => Cow::Borrowed(s),
        Err(_) => Cow::Owned(a.as_array().iter().copied().collect()),
    };
    Ok((data, w, h, c))
}

pub(crate) fn gray_of<'a>(a: &'a PyReadonlyArray2<'_, u8>) -> (Cow<'a, [u8]>, usize, usize) {
    let (h, w) = (a.shape()[0], a.shape()[1]);
    let data = match a.as_slice() {
        Ok(s) => Cow::Borrowed(s),
        Err(_) => Cow::Owned(a.as_array().iter().copied().collect()),
    };
    (data, w, h)
}

pub(crate) fn gray_out<'py>(
    py: Python<'py>,
    data: Vec<u8>,
    w: usize,
    h: usize,
) -> Bound<'py, PyArray2<u8>> {
    Array2::from_shape_vec((h, w), data)
        .expect("shape")
        .into_pyarray(py)
}

pub(crate) fn contour_of(a: &PyReadonlyArray2<'_, i64>) -> PyResult<Contour> {
    if a.shape()[1] != 2 {
        return Err(InvalidArgumentError::new_err(format!(
            "a contour must have shape (N, 2), got {:?}",
            a.shape()
        )));
    }
    Ok(a.as_array()
        .rows()
        .into_iter()
        .map(|r| [r[0], r[1]])
        .collect())
}

pub(crate) fn contour_out<'py>(py: Python<'py>, c: &Contour) -> Bound<'py, PyArray2<i64>> {
    let flat: Vec<i64> = c.iter().flat_map(|p| [p[0], p[1]]).collect();
    Array2::from_shape_vec((c.len(), 2), flat)
        .expect("shape")
        .into_pyarray(py)
}

pub(crate) type PyContours<'py> = Vec<PyReadonlyArray2<'py, i64>>;

pub(crate) fn regions_of(tissue: PyContours<'_>, holes: Vec<PyContours<'_>>) -> PyResult<Regions> {
    if tissue.len() != holes.len() {
        return Err(InvalidArgumentError::new_err(format!(
            "{} tissue contours but {} hole lists",
            tissue.len(),
            holes.len()
        )));
    }
    Ok(Regions {
        tissue: tissue.iter().map(contour_of).collect::<PyResult<_>>()?,
        holes: holes
            .iter()
            .map(|hs| hs.iter().map(contour_of).collect::<PyResult<Vec<_>>>())
            .collect::<PyResult<_>>()?,
    })
}

pub(crate) type RegionsOut<'py> = (
    Vec<Bound<'py, PyArray2<i64>>>,
    Vec<Vec<Bound<'py, PyArray2<i64>>>>,
);

pub(crate) fn regions_out<'py>(py: Python<'py>, r: &Regions) -> RegionsOut<'py> {
    (
        r.tissue.iter().map(|c| contour_out(py, c)).collect(),
        r.holes
            .iter()
            .map(|hs| hs.iter().map(|c| contour_out(py, c)).collect())
            .collect(),
    )
}

pub(crate) fn coords_out<'py>(py: Python<'py>, c: Vec<[i64; 2]>) -> Bound<'py, PyArray2<i64>> {
    let n = c.len();
    let flat: Vec<i64> = c.into_iter().flat_map(|p| [p[0], p[1]]).collect();
    Array2::from_shape_vec((n, 2), flat)
        .expect("shape")
        .into_pyarray(py)
}

/// A borrowed image as a core [`ImageView`] (shape checked by the core).
pub(crate) fn view_of<'a>(
    img: &'a (Cow<'a, [u8]>, usize, usize, usize),
) -> PyResult<ImageView<'a>> {
    let (d, w, h, c) = img;
    ImageView::new(d, *w, *h, *c).map_err(to_py)
}

/// A numpy array's values in C order (borrowed copy of a contiguous array, gathered else).
pub(crate) fn flat_copy<T: Copy + numpy::Element, D: numpy::ndarray::Dimension>(
    a: &numpy::PyReadonlyArray<'_, T, D>,
) -> Vec<T> {
    match a.as_slice() {
        Ok(s) => s.to_vec(),
        Err(_) => a.as_array().iter().copied().collect(),
    }
}
