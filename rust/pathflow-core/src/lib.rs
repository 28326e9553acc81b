//! pathflow-core: the pure Rust engine behind `pathflow tile`.
//!
//! * [`mask`]: RGB -> HSV saturation, median blur, threshold (fixed or Otsu), morphological
//!   closing and pen-ink removal, bit-exact with the OpenCV calls of CLAM's `segmentTissue`.
//! * [`contour`]: contours with holes (OpenCV `RETR_CCOMP` semantics), areas and CLAM's
//!   contour filter.
//! * [`polygon`]: exact integer point-in-polygon tests (OpenCV `pointPolygonTest` semantics)
//!   evaluated a whole row at a time, and polygon rasterisation.
//! * [`grid`]: patch coordinate grids (CLAM's per-contour grid and a slide-aligned grid),
//!   the `four_pt` rule and exact tissue fractions from a summed-area table.
//! * [`views`]: cheap JPEG/PNG validity checks and the decode-once, many-views kernel of the
//!   self-supervised data loader (float-box crop, PIL-compatible bilinear resize, D4).
//! * [`overlay`]: the overlay picture of `pathflow tile` (patch cells blended in one pass,
//!   contours drawn once each, JPEG) and its fast grayscale mask PNG.
//! * [`augment`]: the loader's fused colour augmentations (RandStainNA, HED, colour jitter,
//!   Gaussian blur, solarisation, normalisation) from RGB8 crops to a `(N, 3, S, S)` tensor.
//!
//! Everything works on plain slices; parallel parts use rayon's current pool, so a caller
//! decides the pool (the Python binding uses a fork-safe pool sized by `PATHFLOW_NUM_THREADS`).

pub mod augment;
pub mod contour;
pub mod encode;
pub mod error;
pub mod grid;
pub mod jpeg;
pub mod mask;
pub mod overlay;
pub mod polygon;
pub mod shards;
pub mod tiles;
pub mod views;

pub use error::{CoreError, Result};

/// A borrowed 8-bit image with `channels` interleaved channels, row-major, tightly packed.
#[derive(Clone, Copy, Debug)]
pub struct ImageView<'a> {
    /// Pixel data, `height * width * channels` bytes.
    pub data: &'a [u8],
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// Interleaved channels (1 = gray, 3 = RGB, 4 = RGBA).
    pub channels: usize,
}

impl<'a> ImageView<'a> {
    /// Wraps a buffer, checking that its length matches the shape.
    pub fn new(data: &'a [u8], width: usize, height: usize, channels: usize) -> Result<Self> {
        if width == 0 || height == 0 {
            return Err(error::invalid(format!("empty image ({width}x{height})")));
        }
        if data.len() != width * height * channels {
            return Err(CoreError::Shape(format!(
                "buffer of {} bytes for a {width}x{height}x{channels} image",
                data.len()
            )));
        }
        Ok(Self {
            data,
            width,
            height,
            channels,
        })
    }
}
