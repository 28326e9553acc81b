//! Fused colour augmentations: the CPU side of the self-supervised data loader (see
//! `pathflow_core::augment`; per-sample parameters are assembled there from the columns).

use std::borrow::Cow;

use numpy::{
    PyArray4, PyArrayMethods, PyReadonlyArray1, PyReadonlyArray2, PyReadonlyArray3,
    PyReadonlyArray4, PyUntypedArrayMethods,
};
use pathflow_core::augment;
use pyo3::prelude::*;

use crate::convert::flat_copy;
use crate::errors::{to_py, InvalidArgumentError};
use crate::pool::run;

/// Checks that a per-sample parameter array has shape `(n, *rest)`.
pub(crate) fn check_param(name: &str, shape: &[usize], n: usize, rest: &[usize]) -> PyResult<()> {
    if shape.first() != Some(&n) || &shape[1..] != rest {
        let want: Vec<String> = std::iter::once(format!("N={n}"))
            .chain(rest.iter().map(|r| r.to_string()))
            .collect();
        return Err(InvalidArgumentError::new_err(format!(
            "{name} has shape {shape:?}, expected ({})",
            want.join(", ")
        )));
    }
    Ok(())
}

/// The float stages of one view for a batch: RandStainNA, HED, colour jitter, Gaussian blur,
/// solarisation and the output conversion, fused per sample (see `pathflow_core::augment`).
/// `crops` is (N, S, S, 3) uint8, e.g. `decode_views(...)[g][:, j]` (each crop must be
/// C-contiguous; the batch axis may have any stride, so that slice is read without a copy).
/// Returns (N, 3, S, S): float32 (`output="float"`), uint16 bfloat16 bits (`"bfloat16"`) or
/// uint8 (`"uint8"`, not normalised).
#[pyfunction]
#[allow(clippy::too_many_arguments)]
pub(crate) fn augment_views<'py>(
    py: Python<'py>,
    crops: PyReadonlyArray4<'py, u8>,
    stain: PyReadonlyArray1<'py, bool>,
    stain_mean: PyReadonlyArray2<'py, f32>,
    stain_std: PyReadonlyArray2<'py, f32>,
    hed: PyReadonlyArray1<'py, bool>,
    hed_matrix: PyReadonlyArray3<'py, f32>,
    hed_offset: PyReadonlyArray2<'py, f32>,
    color: PyReadonlyArray1<'py, bool>,
    color_matrix: PyReadonlyArray3<'py, f32>,
    color_k: PyReadonlyArray1<'py, f32>,
    blur_sigma: PyReadonlyArray1<'py, f32>,
    solarize: PyReadonlyArray1<'py, bool>,
    mean: [f32; 3],
    std: [f32; 3],
    output: &str,
) -> PyResult<Bound<'py, PyAny>> {
    let kind: augment::Output = output.parse().map_err(to_py)?;
    let shape = crops.shape();
    let (n, s) = (shape[0], shape[1]);
    if shape[2] != s || shape[3] != 3 || s == 0 {
        return Err(InvalidArgumentError::new_err(format!(
            "crops has shape {shape:?}, expected (N, S, S, 3) with S > 0"
        )));
    }
    check_param("stain", stain.shape(), n, &[])?;
    check_param("stain_mean", stain_mean.shape(), n, &[3])?;
    check_param("stain_std", stain_std.shape(), n, &[3])?;
    check_param("hed", hed.shape(), n, &[])?;
    check_param("hed_matrix", hed_matrix.shape(), n, &[3, 3])?;
    check_param("hed_offset", hed_offset.shape(), n, &[3])?;
    check_param("color", color.shape(), n, &[])?;
    check_param("color_matrix", color_matrix.shape(), n, &[3, 3])?;
    check_param("color_k", color_k.shape(), n, &[])?;
    check_param("blur_sigma", blur_sigma.shape(), n, &[])?;
    check_param("solarize", solarize.shape(), n, &[])?;
    let (st, sm, ss) = (
        flat_copy(&stain),
        flat_copy(&stain_mean),
        flat_copy(&stain_std),
    );
    let (hd, hm, ho) = (
        flat_copy(&hed),
        flat_copy(&hed_matrix),
        flat_copy(&hed_offset),
    );
    let (cl, cm, ck) = (
        flat_copy(&color),
        flat_copy(&color_matrix),
        flat_copy(&color_k),
    );
    let (sigma, sol) = (flat_copy(&blur_sigma), flat_copy(&solarize));
    let params = augment::ColorColumns {
        stain: &st,
        stain_mean: &sm,
        stain_std: &ss,
        hed: &hd,
        hed_matrix: &hm,
        hed_offset: &ho,
        color: &cl,
        color_matrix: &cm,
        color_k: &ck,
        blur_sigma: &sigma,
        solarize: &sol,
    }
    .view_colors(n)
    .map_err(to_py)?;
    let norm = augment::Normalize { mean, std };

    // Each crop borrowed where it is contiguous (also a [:, j] slice of decode_views'
    // output), copied otherwise.
    let all = crops.as_array();
    let samples: Vec<Cow<'_, [u8]>> = all
        .outer_iter()
        .map(|c| match c.to_slice() {
            Some(sl) => Cow::Borrowed(sl),
            None => Cow::Owned(c.iter().copied().collect()),
        })
        .collect();
    let slices: Vec<&[u8]> = samples.iter().map(|c| c.as_ref()).collect();

    let dims = [n, 3, s, s];
    // SAFETY (all three): the arrays are uninitialised, but `augment_views` checks every
    // argument before writing and then writes every value; on an error they are dropped
    // unread.
    Ok(match kind {
        augment::Output::Float => {
            let a = unsafe { PyArray4::<f32>::new(py, dims, false) };
            let mut g = a.readwrite();
            let buf = g.as_slice_mut().expect("new arrays are contiguous");
            run(py, || {
                augment::augment_views(&slices, s, &params, &norm, augment::OutBuf::Float(buf))
            })
            .map_err(to_py)?;
            drop(g);
            a.into_any()
        }
        augment::Output::BFloat16 => {
            let a = unsafe { PyArray4::<u16>::new(py, dims, false) };
            let mut g = a.readwrite();
            let buf = g.as_slice_mut().expect("new arrays are contiguous");
            run(py, || {
                augment::augment_views(&slices, s, &params, &norm, augment::OutBuf::BFloat16(buf))
            })
            .map_err(to_py)?;
            drop(g);
            a.into_any()
        }
        augment::Output::Uint8 => {
            let a = unsafe { PyArray4::<u8>::new(py, dims, false) };
            let mut g = a.readwrite();
            let buf = g.as_slice_mut().expect("new arrays are contiguous");
            run(py, || {
                augment::augment_views(&slices, s, &params, &norm, augment::OutBuf::Uint8(buf))
            })
            .map_err(to_py)?;
            drop(g);
            a.into_any()
        }
    })
}
