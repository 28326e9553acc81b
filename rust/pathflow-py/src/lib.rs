//! pyo3 binding of `pathflow-core`: `pathflow._core`.
//!
//! Thin by design: convert numpy views to slices, release the GIL, run the core function on
//! a fork-safe rayon pool, convert back. Errors map onto `pathflow.exceptions`.

use std::borrow::Cow;
use std::sync::{Arc, Mutex};

use numpy::ndarray::{Array2, Array3};
use numpy::{
    IntoPyArray, PyArray1, PyArray2, PyArray4, PyArray5, PyArrayDyn, PyArrayMethods,
    PyReadonlyArray1, PyReadonlyArray2, PyReadonlyArray3, PyReadonlyArray4, PyReadonlyArrayDyn,
    PyUntypedArrayMethods,
};
use pathflow_core::contour::{self, Contour, FilterParams, Regions};
use pathflow_core::grid::{self, ContourFn};
use pathflow_core::mask::{self, BinaryParams};
use pathflow_core::{augment, encode, jpeg, shards, tiles, views};
use pathflow_core::{CoreError, ImageView};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};
use rayon::prelude::*;

pyo3::import_exception!(pathflow.exceptions, InvalidArgumentError);
pyo3::import_exception!(pathflow.exceptions, CorruptSlideError);

fn to_py(e: CoreError) -> PyErr {
    match e {
        CoreError::InvalidArgument(m) | CoreError::Shape(m) => InvalidArgumentError::new_err(m),
        CoreError::Io(io) => io.into(),
        CoreError::Corrupt(m) => CorruptSlideError::new_err(m),
    }
}

// ---------------------------------------------------------------------------------------
// Fork-safe thread pool: a pool built in a parent process has no threads in a forked child
// (DataLoader workers, multiprocessing), so the pool is keyed by process id and rebuilt.

static POOL: Mutex<Option<(u32, Arc<rayon::ThreadPool>)>> = Mutex::new(None);
static THREADS: Mutex<Option<usize>> = Mutex::new(None);

fn default_threads() -> usize {
    if let Some(n) = *THREADS.lock().unwrap_or_else(|p| p.into_inner()) {
        return n;
    }
    std::env::var("PATHFLOW_NUM_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

fn pool() -> Arc<rayon::ThreadPool> {
    let pid = std::process::id();
    let mut guard = POOL.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((owner, p)) = guard.as_ref() {
        if *owner == pid {
            return Arc::clone(p);
        }
    }
    let p = Arc::new(
        rayon::ThreadPoolBuilder::new()
            .num_threads(default_threads())
            .thread_name(|i| format!("pathflow-{i}"))
            .build()
            .expect("cannot start the pathflow thread pool"),
    );
    *guard = Some((pid, Arc::clone(&p)));
    p
}

/// Runs `f` without the GIL on pathflow's pool.
fn run<R: Send>(py: Python<'_>, f: impl FnOnce() -> R + Send) -> R {
    let p = pool();
    py.detach(|| p.install(f))
}

/// Number of threads pathflow's Rust pool uses (env `PATHFLOW_NUM_THREADS`, default: cores).
#[pyfunction]
fn num_threads() -> usize {
    pool().current_num_threads()
}

/// Sets the size of pathflow's Rust pool (takes effect immediately).
#[pyfunction]
fn set_num_threads(n: usize) -> PyResult<()> {
    if n == 0 {
        return Err(InvalidArgumentError::new_err(
            "number of threads must be >= 1",
        ));
    }
    *THREADS.lock().unwrap_or_else(|p| p.into_inner()) = Some(n);
    *POOL.lock().unwrap_or_else(|p| p.into_inner()) = None;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Conversions

/// An image as (data, width, height, channels); borrows the numpy buffer when it is
/// C-contiguous (the read-only borrow keeps it alive and unmodified), copies otherwise.
fn image_of<'a>(
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

fn gray_of<'a>(a: &'a PyReadonlyArray2<'_, u8>) -> (Cow<'a, [u8]>, usize, usize) {
    let (h, w) = (a.shape()[0], a.shape()[1]);
    let data = match a.as_slice() {
        Ok(s) => Cow::Borrowed(s),
        Err(_) => Cow::Owned(a.as_array().iter().copied().collect()),
    };
    (data, w, h)
}

fn gray_out<'py>(py: Python<'py>, data: Vec<u8>, w: usize, h: usize) -> Bound<'py, PyArray2<u8>> {
    Array2::from_shape_vec((h, w), data)
        .expect("shape")
        .into_pyarray(py)
}

fn contour_of(a: &PyReadonlyArray2<'_, i64>) -> PyResult<Contour> {
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

fn contour_out<'py>(py: Python<'py>, c: &Contour) -> Bound<'py, PyArray2<i64>> {
    let flat: Vec<i64> = c.iter().flat_map(|p| [p[0], p[1]]).collect();
    Array2::from_shape_vec((c.len(), 2), flat)
        .expect("shape")
        .into_pyarray(py)
}

type PyContours<'py> = Vec<PyReadonlyArray2<'py, i64>>;

fn regions_of(tissue: PyContours<'_>, holes: Vec<PyContours<'_>>) -> PyResult<Regions> {
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

type RegionsOut<'py> = (
    Vec<Bound<'py, PyArray2<i64>>>,
    Vec<Vec<Bound<'py, PyArray2<i64>>>>,
);

fn regions_out<'py>(py: Python<'py>, r: &Regions) -> RegionsOut<'py> {
    (
        r.tissue.iter().map(|c| contour_out(py, c)).collect(),
        r.holes
            .iter()
            .map(|hs| hs.iter().map(|c| contour_out(py, c)).collect())
            .collect(),
    )
}

fn coords_out<'py>(py: Python<'py>, c: Vec<[i64; 2]>) -> Bound<'py, PyArray2<i64>> {
    let n = c.len();
    let flat: Vec<i64> = c.into_iter().flat_map(|p| [p[0], p[1]]).collect();
    Array2::from_shape_vec((n, 2), flat)
        .expect("shape")
        .into_pyarray(py)
}

// ---------------------------------------------------------------------------------------
// Mask operations

/// HSV saturation of an RGB(A) uint8 image on OpenCV's 0-255 scale.
#[pyfunction]
fn saturation<'py>(
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
fn ink_mask<'py>(
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
fn median_blur<'py>(
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
fn otsu_threshold(py: Python<'_>, img: PyReadonlyArray2<'_, u8>) -> u8 {
    let (d, _, _) = gray_of(&img);
    run(py, || mask::otsu_threshold(&d))
}

/// Morphological closing with a `ksize x ksize` square (`cv2.MORPH_CLOSE`).
#[pyfunction]
fn morph_close<'py>(
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
fn binary_tissue<'py>(
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
fn downsample_area<'py>(
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

// ---------------------------------------------------------------------------------------
// Contours

/// All borders of a binary image with `RETR_CCOMP` semantics: a list of
/// `(points (N, 2) int64, is_hole, parent index or -1)`.
#[pyfunction]
#[allow(clippy::type_complexity)]
fn find_contours<'py>(
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
fn contour_area(points: PyReadonlyArray2<'_, i64>) -> PyResult<f64> {
    Ok(contour::contour_area(&contour_of(&points)?))
}

/// `cv2.pointPolygonTest(points, (x, y), False)` for an integer point: 1, 0 or -1.
#[pyfunction]
fn point_polygon_test(points: PyReadonlyArray2<'_, i64>, x: i64, y: i64) -> PyResult<i8> {
    Ok(pathflow_core::polygon::Polygon::new(&contour_of(&points)?).test(x, y))
}

/// Traces a binary image and applies CLAM's contour filter (areas in pixels of `binary`).
/// Returns `(tissue, holes)`: outer contours and, per contour, its kept holes.
#[pyfunction]
#[pyo3(signature = (binary, min_area, min_hole_area, max_holes=8))]
fn segment_contours<'py>(
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
fn scale_regions<'py>(
    py: Python<'py>,
    tissue: PyContours<'py>,
    holes: Vec<PyContours<'py>>,
    sx: f64,
    sy: f64,
) -> PyResult<RegionsOut<'py>> {
    let r = regions_of(tissue, holes)?;
    Ok(regions_out(py, &r.scaled(sx, sy)))
}

/// Draws regions (outer minus holes, inclusive boundaries) into a `height x width` mask.
#[pyfunction]
fn rasterize<'py>(
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

// ---------------------------------------------------------------------------------------
// Grids

struct GridArgs<'a> {
    size: (i64, i64),
    patch: i64,
    step: i64,
    use_padding: bool,
    contour_fn: &'a str,
}

type GridFn =
    fn(&Regions, (i64, i64), i64, i64, bool, ContourFn) -> pathflow_core::Result<Vec<[i64; 2]>>;

/// Converts the regions, runs a grid function without the GIL, returns (N, 2) coordinates.
fn grid_with<'py>(
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
fn clam_grid<'py>(
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
fn slide_grid<'py>(
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
fn full_grid(
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
fn tissue_fractions<'py>(
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

// ---------------------------------------------------------------------------------------
// Overlay pictures and mask PNGs of `pathflow tile` (see `pathflow_core::overlay`)

/// Overlay JPEG: patch cells of `coords` (level-0 corners, side `side0`) blended on the RGB
/// thumbnail, then tissue contours (green) and holes (blue) in level-0 points; `fx`, `fy` =
/// thumbnail pixels per level-0 pixel.
#[pyfunction]
#[pyo3(signature = (thumb, coords, side0, fx, fy, tissue, holes, line_width=1, quality=85))]
#[allow(clippy::too_many_arguments)]
fn render_overlay<'py>(
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
fn encode_gray_png<'py>(
    py: Python<'py>,
    mask: PyReadonlyArray2<'py, u8>,
) -> PyResult<Bound<'py, PyBytes>> {
    let (m, w, h) = gray_of(&mask);
    let out = run(py, || pathflow_core::overlay::encode_gray_png(&m, w, h)).map_err(to_py)?;
    Ok(PyBytes::new(py, &out))
}

// ---------------------------------------------------------------------------------------
// Fused colour augmentations (the CPU side of the self-supervised data loader)

/// Checks that a per-sample parameter array has shape `(n, *rest)`.
fn check_param(name: &str, shape: &[usize], n: usize, rest: &[usize]) -> PyResult<()> {
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

fn rows<const K: usize>(a: &[f32]) -> Vec<[f32; K]> {
    a.chunks_exact(K)
        .map(|c| std::array::from_fn(|j| c[j]))
        .collect()
}

fn mat3_of(a: &[f32]) -> [[f32; 3]; 3] {
    std::array::from_fn(|i| std::array::from_fn(|j| a[3 * i + j]))
}

/// The float stages of one view for a batch: RandStainNA, HED, colour jitter, Gaussian blur,
/// solarisation and the output conversion, fused per sample (see `pathflow_core::augment`).
/// `crops` is (N, S, S, 3) uint8, e.g. `decode_views(...)[g][:, j]` (each crop must be
/// C-contiguous; the batch axis may have any stride, so that slice is read without a copy).
/// Returns (N, 3, S, S): float32 (`output="float"`), uint16 bfloat16 bits (`"bfloat16"`) or
/// uint8 (`"uint8"`, not normalised).
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn augment_views<'py>(
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
        rows::<3>(&flat_copy(&stain_mean)),
        rows::<3>(&flat_copy(&stain_std)),
    );
    let (hd, hm, ho) = (
        flat_copy(&hed),
        rows::<9>(&flat_copy(&hed_matrix)),
        rows::<3>(&flat_copy(&hed_offset)),
    );
    let (cl, cm, ck) = (
        flat_copy(&color),
        rows::<9>(&flat_copy(&color_matrix)),
        flat_copy(&color_k),
    );
    let (sigma, sol) = (flat_copy(&blur_sigma), flat_copy(&solarize));
    let params: Vec<augment::ViewColor> = (0..n)
        .map(|i| augment::ViewColor {
            stain: st[i].then_some(augment::Stain {
                mean: sm[i],
                std: ss[i],
            }),
            hed: hd[i].then(|| augment::Hed {
                matrix: mat3_of(&hm[i]),
                offset: ho[i],
            }),
            color: cl[i].then(|| augment::ColorJitter {
                matrix: mat3_of(&cm[i]),
                k: ck[i],
            }),
            blur_sigma: sigma[i],
            solarize: sol[i],
        })
        .collect();
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

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(set_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(saturation, m)?)?;
    m.add_function(wrap_pyfunction!(ink_mask, m)?)?;
    m.add_function(wrap_pyfunction!(median_blur, m)?)?;
    m.add_function(wrap_pyfunction!(otsu_threshold, m)?)?;
    m.add_function(wrap_pyfunction!(morph_close, m)?)?;
    m.add_function(wrap_pyfunction!(binary_tissue, m)?)?;
    m.add_function(wrap_pyfunction!(downsample_area, m)?)?;
    m.add_function(wrap_pyfunction!(find_contours, m)?)?;
    m.add_function(wrap_pyfunction!(contour_area, m)?)?;
    m.add_function(wrap_pyfunction!(point_polygon_test, m)?)?;
    m.add_function(wrap_pyfunction!(segment_contours, m)?)?;
    m.add_function(wrap_pyfunction!(scale_regions, m)?)?;
    m.add_function(wrap_pyfunction!(rasterize, m)?)?;
    m.add_function(wrap_pyfunction!(clam_grid, m)?)?;
    m.add_function(wrap_pyfunction!(slide_grid, m)?)?;
    m.add_function(wrap_pyfunction!(full_grid, m)?)?;
    m.add_function(wrap_pyfunction!(tissue_fractions, m)?)?;
    m.add_function(wrap_pyfunction!(render_overlay, m)?)?;
    m.add_function(wrap_pyfunction!(encode_gray_png, m)?)?;
    m.add_function(wrap_pyfunction!(sanitize_key, m)?)?;
    m.add_class::<PyShardWriter>()?;
    m.add_class::<PyTiledLevel>()?;
    m.add_function(wrap_pyfunction!(encode_images, m)?)?;
    m.add_function(wrap_pyfunction!(encode_regions, m)?)?;
    m.add_function(wrap_pyfunction!(image_info, m)?)?;
    m.add_function(wrap_pyfunction!(decode_views, m)?)?;
    m.add_function(wrap_pyfunction!(augment_views, m)?)?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Shards

/// WebDataset shard writer (see `pathflow_core::shards`).
#[pyclass(module = "pathflow._core", name = "ShardWriter", unsendable)]
struct PyShardWriter {
    inner: Option<shards::ShardWriter>,
}

fn shard_info_dict<'py>(py: Python<'py>, s: &shards::ShardInfo) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("index", s.index)?;
    d.set_item("name", &s.name)?;
    d.set_item("count", s.count)?;
    d.set_item("bytes", s.bytes)?;
    d.set_item("first_sample", s.first_sample)?;
    Ok(d)
}

#[pymethods]
impl PyShardWriter {
    #[new]
    #[pyo3(signature = (dir, prefix, max_count, max_bytes, start_index=0, start_sample=0))]
    fn new(
        dir: std::path::PathBuf,
        prefix: String,
        max_count: usize,
        max_bytes: u64,
        start_index: usize,
        start_sample: u64,
    ) -> PyResult<Self> {
        let cfg = shards::ShardConfig {
            dir,
            prefix,
            max_count,
            max_bytes,
            start_index,
            start_sample,
        };
        Ok(Self {
            inner: Some(shards::ShardWriter::new(cfg).map_err(to_py)?),
        })
    }

    /// Appends samples: `keys[i]` with files `files[i]` = list of `(ext, bytes)`.
    fn add_many(
        &mut self,
        py: Python<'_>,
        keys: Vec<String>,
        files: Vec<Vec<(String, Vec<u8>)>>,
    ) -> PyResult<()> {
        if keys.len() != files.len() {
            return Err(InvalidArgumentError::new_err(
                "keys and files differ in length",
            ));
        }
        let w = self
            .inner
            .as_mut()
            .ok_or_else(|| InvalidArgumentError::new_err("shard writer is closed"))?;
        py.detach(|| {
            for (k, fs) in keys.iter().zip(&files) {
                let refs: Vec<(&str, &[u8])> =
                    fs.iter().map(|(e, d)| (e.as_str(), d.as_slice())).collect();
                w.add(k, &refs)?;
            }
            Ok::<(), CoreError>(())
        })
        .map_err(to_py)
    }

    /// Global index of the next sample.
    #[getter]
    fn next_sample(&self) -> u64 {
        self.inner.as_ref().map_or(0, |w| w.next_sample())
    }

    /// Shards finished so far, as dicts.
    fn finished<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyDict>>> {
        let w = self.inner.as_ref();
        w.map_or(Ok(Vec::new()), |w| {
            w.finished()
                .iter()
                .map(|s| shard_info_dict(py, s))
                .collect()
        })
    }

    /// Publishes the open shard; returns every shard this writer finished.
    fn finish<'py>(&mut self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyDict>>> {
        let w = self
            .inner
            .take()
            .ok_or_else(|| InvalidArgumentError::new_err("shard writer is closed"))?;
        let done = py.detach(|| w.finish()).map_err(to_py)?;
        done.iter().map(|s| shard_info_dict(py, s)).collect()
    }

    /// Drops the open shard without publishing it.
    fn abort(&mut self) {
        if let Some(w) = self.inner.take() {
            w.abort();
        }
    }
}

/// A dot-free WebDataset key for an identifier (hash-suffixed when changed or too long).
#[pyfunction]
#[pyo3(signature = (id, max_len=60))]
fn sanitize_key(id: &str, max_len: usize) -> String {
    shards::sanitize_key(id, max_len)
}

// ---------------------------------------------------------------------------------------
// Tiled JPEG levels and encoders

type Outcomes<'py> = (Vec<Option<Bound<'py, PyBytes>>>, Vec<Option<String>>);

fn outcomes<'py>(py: Python<'py>, results: Vec<pathflow_core::Result<Vec<u8>>>) -> Outcomes<'py> {
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

fn coords_of(a: &PyReadonlyArray2<'_, i64>) -> PyResult<Vec<[i64; 2]>> {
    contour_of(a)
}

/// One pyramid level of a tiled JPEG TIFF/SVS, read by the Rust core.
#[pyclass(module = "pathflow._core", name = "TiledLevel", frozen)]
struct PyTiledLevel {
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

/// Resample each (H, W, 3) image to `out_size` and encode (`jpg`, `png` or `webp`), in
/// parallel; returns the encoded bytes in order.
#[pyfunction]
fn encode_images<'py>(
    py: Python<'py>,
    images: Vec<PyReadonlyArrayDyn<'py, u8>>,
    out_size: usize,
    format: &str,
    quality: u8,
) -> PyResult<Vec<Bound<'py, PyBytes>>> {
    let fmt: encode::Format = format.parse().map_err(to_py)?;
    let views = images.iter().map(image_of).collect::<PyResult<Vec<_>>>()?;
    let res: Vec<pathflow_core::Result<Vec<u8>>> = run(py, || {
        views
            .par_iter()
            .map(|(d, w, h, c)| {
                if *c != 3 {
                    return Err(CoreError::InvalidArgument(
                        "images must be (H, W, 3)".into(),
                    ));
                }
                encode::encode_patch(d, *w, *h, out_size, fmt, quality)
            })
            .collect()
    });
    res.into_iter()
        .map(|r| r.map(|b| PyBytes::new(py, &b)).map_err(to_py))
        .collect()
}

/// Regions: each image resampled to `out_size` and encoded, followed by its grid of
/// `sub_size` sub-patches; one list of bytes per image.
#[pyfunction]
#[pyo3(signature = (images, out_size, sub_size, quality, format="jpg"))]
fn encode_regions<'py>(
    py: Python<'py>,
    images: Vec<PyReadonlyArrayDyn<'py, u8>>,
    out_size: usize,
    sub_size: usize,
    quality: u8,
    format: &str,
) -> PyResult<Vec<Vec<Bound<'py, PyBytes>>>> {
    let fmt: encode::Format = format.parse().map_err(to_py)?;
    let views = images.iter().map(image_of).collect::<PyResult<Vec<_>>>()?;
    let res: Vec<pathflow_core::Result<Vec<Vec<u8>>>> = run(py, || {
        views
            .par_iter()
            .map(|(d, w, h, c)| {
                if *c != 3 {
                    return Err(CoreError::InvalidArgument(
                        "images must be (H, W, 3)".into(),
                    ));
                }
                encode::encode_region(d, *w, *h, out_size, sub_size, fmt, quality)
            })
            .collect()
    });
    res.into_iter()
        .map(|r| {
            r.map(|parts| parts.iter().map(|b| PyBytes::new(py, b)).collect())
                .map_err(to_py)
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Decode once, many views (the CPU side of the self-supervised data loader)

/// Per-thread decode buffers above this size are freed after use (a 2048 x 2048 RGB image
/// fits; a whole-slide-sized one is not kept alive in every pool thread).
const KEEP_DECODER_BYTES: usize = 16 << 20;

thread_local! {
    /// Per pool thread: decoded pixels, scratch and resizer buffers, reused across calls.
    static VIEW_DECODER: std::cell::RefCell<views::ViewDecoder> =
        std::cell::RefCell::new(views::ViewDecoder::new());
}

/// Structural validity of encoded JPEG/PNG/WebP images (nothing decoded): an (N, 2) int32 array
/// of `(width, height)`, 0 where invalid, and per image `None` or the reason.
#[pyfunction]
fn image_info<'py>(
    py: Python<'py>,
    data: Vec<Bound<'py, PyBytes>>,
) -> (Bound<'py, PyArray2<i32>>, Vec<Option<String>>) {
    let slices: Vec<&[u8]> = data.iter().map(|b| b.as_bytes()).collect();
    let res: Vec<pathflow_core::Result<(u32, u32)>> = run(py, || {
        slices
            .par_iter()
            .with_min_len(16)
            .map(|d| views::image_info(d))
            .collect()
    });
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

/// The message of a per-sample failure (without the error kind's prefix).
fn reason(e: CoreError) -> String {
    match e {
        CoreError::Corrupt(m) => m,
        e => e.to_string(),
    }
}

fn flat_copy<T: Copy + numpy::Element, D: numpy::ndarray::Dimension>(
    a: &numpy::PyReadonlyArray<'_, T, D>,
) -> Vec<T> {
    match a.as_slice() {
        Ok(s) => s.to_vec(),
        Err(_) => a.as_array().iter().copied().collect(),
    }
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
fn decode_views<'py>(
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

    // SAFETY: the arrays are uninitialised, but every byte is written below (each view
    // in full by the resizer or the D4 copy, or zeros for a failed image) before they are
    // returned; on an argument error they are dropped unread.
    let outs: Vec<Bound<'py, PyArray5<u8>>> = (0..ng)
        .map(|g| unsafe { PyArray5::<u8>::new(py, [n, nviews[g], sizes[g], sizes[g], 3], false) })
        .collect();
    let mut guards: Vec<_> = outs.iter().map(|a| a.readwrite()).collect();
    let mut per_image: Vec<Vec<&mut [u8]>> = (0..n).map(|_| Vec::with_capacity(ng)).collect();
    for (g, guard) in guards.iter_mut().enumerate() {
        let buf = guard.as_slice_mut().expect("new arrays are contiguous");
        let stride = nviews[g] * sizes[g] * sizes[g] * 3;
        if stride == 0 {
            per_image.iter_mut().for_each(|p| p.push(&mut []));
        } else {
            for (p, chunk) in per_image.iter_mut().zip(buf.chunks_exact_mut(stride)) {
                p.push(chunk);
            }
        }
    }
    let slices: Vec<&[u8]> = data.iter().map(|b| b.as_bytes()).collect();
    let results: Vec<pathflow_core::Result<()>> = run(py, || {
        per_image
            .par_iter_mut()
            .zip(slices.par_iter())
            .enumerate()
            .map(|(i, (out, bytes))| {
                let groups: Vec<views::ViewGroup<'_>> = (0..ng)
                    .map(|g| {
                        let v = nviews[g];
                        views::ViewGroup {
                            boxes: &group_boxes[g][i * v..(i + 1) * v],
                            d4: &group_codes[g][i * v..(i + 1) * v],
                            size: sizes[g],
                        }
                    })
                    .collect();
                let r = VIEW_DECODER.with(|d| {
                    let mut d = d.borrow_mut();
                    let r = d.decode_into(bytes, &groups, out);
                    d.shrink_to(KEEP_DECODER_BYTES);
                    r
                });
                if r.is_err() {
                    out.iter_mut().for_each(|o| o.fill(0));
                }
                r
            })
            .collect()
    });
    drop(per_image);
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
