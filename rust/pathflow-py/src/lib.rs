//! pyo3 binding of `pathflow-core`: `pathflow._core`.
//!
//! Thin by design: each module mirrors the core module of the same name, converts numpy
//! arguments to slices, releases the GIL, runs the core function on the fork-safe rayon pool
//! ([`pool`]) and converts the result back; the batch loops live in the core, where
//! `cargo test` covers them. Errors map onto `pathflow.exceptions` ([`errors`]). The module
//! table below is the one place that says what `pathflow._core` exports.

mod augment;
mod contour;
mod convert;
mod encode;
mod errors;
mod grid;
mod mask;
mod overlay;
mod pool;
mod shards;
mod tiles;
mod views;

use pyo3::prelude::*;

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    // pool
    m.add_function(wrap_pyfunction!(pool::num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(pool::set_num_threads, m)?)?;
    // mask
    m.add_function(wrap_pyfunction!(mask::saturation, m)?)?;
    m.add_function(wrap_pyfunction!(mask::ink_mask, m)?)?;
    m.add_function(wrap_pyfunction!(mask::median_blur, m)?)?;
    m.add_function(wrap_pyfunction!(mask::otsu_threshold, m)?)?;
    m.add_function(wrap_pyfunction!(mask::morph_close, m)?)?;
    m.add_function(wrap_pyfunction!(mask::binary_tissue, m)?)?;
    m.add_function(wrap_pyfunction!(mask::downsample_area, m)?)?;
    // contour
    m.add_function(wrap_pyfunction!(contour::find_contours, m)?)?;
    m.add_function(wrap_pyfunction!(contour::contour_area, m)?)?;
    m.add_function(wrap_pyfunction!(contour::point_polygon_test, m)?)?;
    m.add_function(wrap_pyfunction!(contour::segment_contours, m)?)?;
    m.add_function(wrap_pyfunction!(contour::scale_regions, m)?)?;
    // grid
    m.add_function(wrap_pyfunction!(grid::rasterize, m)?)?;
    m.add_function(wrap_pyfunction!(grid::clam_grid, m)?)?;
    m.add_function(wrap_pyfunction!(grid::slide_grid, m)?)?;
    m.add_function(wrap_pyfunction!(grid::full_grid, m)?)?;
    m.add_function(wrap_pyfunction!(grid::tissue_fractions, m)?)?;
    // overlay
    m.add_function(wrap_pyfunction!(overlay::render_overlay, m)?)?;
    m.add_function(wrap_pyfunction!(overlay::encode_gray_png, m)?)?;
    // shards
    m.add_function(wrap_pyfunction!(shards::sanitize_key, m)?)?;
    m.add_class::<shards::PyShardWriter>()?;
    // tiles
    m.add_class::<tiles::PyTiledLevel>()?;
    // encode
    m.add_function(wrap_pyfunction!(encode::encode_images, m)?)?;
    m.add_function(wrap_pyfunction!(encode::encode_regions, m)?)?;
    // views
    m.add_function(wrap_pyfunction!(views::image_info, m)?)?;
    m.add_function(wrap_pyfunction!(views::decode_views, m)?)?;
    // augment
    m.add_function(wrap_pyfunction!(augment::augment_views, m)?)?;
    Ok(())
}
