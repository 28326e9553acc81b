//! Decode once, many views: the CPU side of the self-supervised data loader (see
//! `pathflow_core::views`; the batch loop and per-thread decoders live there).

use numpy::ndarray::Array2;
use numpy::{
    IntoPyArray, PyArray1, PyArray2, PyArray5, PyArrayMethods, PyReadonlyArray2, PyReadonlyArray3,
    PyUntypedArrayMethods,
};
use pathflow_core::{views, CoreError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::convert::flat_copy;
use crate::errors::{reason, to_py, InvalidArgumentError};
use crate::pool::run;

/// Structural validity of encoded JPEG/PNG/WebP images (nothing decoded): an (N, 2) int32 array
/// of `(width, height)`, 0 where invalid, and per image `None` or the reason.
#[pyfunction]
pub(crate) fn image_info<'py>(
    py: Python<'py>,
    data: Vec<Bound<'py, PyBytes>>,
) -> (Bound<'py, PyArray2<i32>>, Vec<Option<String>>) {
    let slices: Vec<&[u8]> = data.iter().map(|b| b.as_bytes()).collect();
    let res = run(py, || views::image_infos(&slices));
    let mut sizes = Vec::with_capacity(2 * res.len());
    let mut reasons = Vec::with_capacity(res.len());
    for r in res {
        match r {
            Ok((w, h)) => {
                sizes.extend([w as i32, h as i32]);
                reasons.push(None);
            }
            Err(e) => {
                sizes.extend([0, 0]);
                reasons.push(Some(reason(e)));
            }
        }
    }
    let n = reasons.len();
    let arr = Array2::from_shape_vec((n, 2), sizes).expect("shape");
    (arr.into_pyarray(py), reasons)
}

type ViewsOut<'py> = (
    Vec<Bound<'py, PyArray5<u8>>>,
    Bound<'py, PyArray1<bool>>,
    Vec<Option<String>>,
);

/// Decodes each encoded image once and cuts its views: per group `g` an
/// `(N, V_g, S_g, S_g, 3)` uint8 array (box `boxes[g][i, v] = (x0, y0, w, h)` resized to
/// `sizes[g]` with PIL's antialiased bilinear, then D4 code `d4[g][i, v]`), the ok mask and
/// per image `None` or the reason it failed (its views are zeros). Bad image data never
/// raises; bad arguments (shapes, sizes, codes, boxes outside the image) do.
#[pyfunction]
pub(crate) fn decode_views<'py>(
    py: Python<'py>,
    data: Vec<Bound<'py, PyBytes>>,
    boxes: Vec<PyReadonlyArray3<'py, f32>>,
    sizes: Vec<usize>,
    d4: Vec<PyReadonlyArray2<'py, u8>>,
) -> PyResult<ViewsOut<'py>> {
    let n = data.len();
    let ng = sizes.len();
    if boxes.len() != ng || d4.len() != ng {
        return Err(InvalidArgumentError::new_err(format!(
            "{} box arrays, {ng} sizes and {} D4 arrays: one of each per view group",
            boxes.len(),
            d4.len()
        )));
    }
    let mut group_boxes: Vec<Vec<[f32; 4]>> = Vec::with_capacity(ng);
    let mut group_codes: Vec<Vec<u8>> = Vec::with_capacity(ng);
    let mut nviews = Vec::with_capacity(ng);
    for g in 0..ng {
        let (bs, ds) = (boxes[g].shape(), d4[g].shape());
        if bs[0] != n || bs[2] != 4 {
            return Err(InvalidArgumentError::new_err(format!(
                "boxes[{g}] has shape {bs:?}, expected (N={n}, V, 4)"
            )));
        }
        if ds != [n, bs[1]] {
            return Err(InvalidArgumentError::new_err(format!(
                "d4[{g}] has shape {ds:?}, expected (N={n}, V={})",
                bs[1]
            )));
        }
        if sizes[g] == 0 {
            return Err(InvalidArgumentError::new_err(format!(
                "sizes[{g}] must be > 0"
            )));
        }
        let codes = flat_copy(&d4[g]);
        if let Some(c) = codes.iter().find(|&&c| c > 7) {
            return Err(InvalidArgumentError::new_err(format!(
                "d4[{g}] has code {c}, expected 0..7"
            )));
        }
        let flat = flat_copy(&boxes[g]);
        group_boxes.push(
            flat.chunks_exact(4)
                .map(|c| [c[0], c[1], c[2], c[3]])
                .collect(),
        );
        group_codes.push(codes);
        nviews.push(bs[1]);
    }
    let groups: Vec<views::BatchGroup<'_>> = (0..ng)
        .map(|g| views::BatchGroup {
            boxes: &group_boxes[g],
            d4: &group_codes[g],
            views: nviews[g],
            size: sizes[g],
        })
        .collect();

    // SAFETY: the arrays are uninitialised, but `decode_views_batch` checks the buffers
    // before decoding and then writes every byte (each view in full, or zeros for a failed
    // image) before they are returned; on an argument error they are dropped unread.
    let outs: Vec<Bound<'py, PyArray5<u8>>> = (0..ng)
        .map(|g| unsafe { PyArray5::<u8>::new(py, [n, nviews[g], sizes[g], sizes[g], 3], false) })
        .collect();
    let mut guards: Vec<_> = outs.iter().map(|a| a.readwrite()).collect();
    let mut bufs: Vec<&mut [u8]> = guards
        .iter_mut()
        .map(|g| g.as_slice_mut().expect("new arrays are contiguous"))
        .collect();
    let slices: Vec<&[u8]> = data.iter().map(|b| b.as_bytes()).collect();
    let results = run(py, || {
        views::decode_views_batch(&slices, &groups, &mut bufs)
    })
    .map_err(to_py)?;
    drop(bufs);
    drop(guards);

    let mut ok = Vec::with_capacity(n);
    let mut reasons = Vec::with_capacity(n);
    for (i, r) in results.into_iter().enumerate() {
        match r {
            Ok(()) => {
                ok.push(true);
                reasons.push(None);
            }
            Err(CoreError::Corrupt(m)) => {
                ok.push(false);
                reasons.push(Some(m));
            }
            Err(CoreError::InvalidArgument(m) | CoreError::Shape(m)) => {
                return Err(InvalidArgumentError::new_err(format!("image {i}: {m}")));
            }
            Err(e) => return Err(to_py(e)),
        }
    }
    Ok((outs, ok.into_pyarray(py), reasons))
}
