//! Patch encoding for shards: resample to the output size, then JPEG (via [`crate::jpeg`]),
//! PNG or lossless WebP (via the `image` crate); regions optionally cut into sub-patches.

use std::io::Cursor;

use image::{ImageEncoder, RgbImage};
use rayon::prelude::*;

use crate::error::{invalid, CoreError, Result};
use crate::jpeg::{encode_rgb, resize_area};
use crate::ImageView;

/// Output image formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Baseline JPEG (quality applies).
    Jpeg,
    /// Lossless PNG.
    Png,
    /// Lossless WebP.
    WebP,
}

impl std::str::FromStr for Format {
    type Err = CoreError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "jpg" | "jpeg" => Ok(Self::Jpeg),
            "png" => Ok(Self::Png),
            "webp" => Ok(Self::WebP),
            _ => Err(invalid(format!(
                "unknown image format {s:?} (jpg, png or webp)"
            ))),
        }
    }
}

/// Encodes an RGB image in `format`.
pub fn encode(rgb: &[u8], w: usize, h: usize, format: Format, quality: u8) -> Result<Vec<u8>> {
    if rgb.len() != w * h * 3 {
        return Err(invalid("RGB buffer does not match its size"));
    }
    let err = |e: image::ImageError| invalid(format!("encoding failed: {e}"));
    match format {
        Format::Jpeg => encode_rgb(rgb, w, h, quality),
        Format::Png => {
            let mut out = Vec::new();
            image::codecs::png::PngEncoder::new(&mut out)
                .write_image(rgb, w as u32, h as u32, image::ExtendedColorType::Rgb8)
                .map_err(err)?;
            Ok(out)
        }
        Format::WebP => {
            let img = RgbImage::from_raw(w as u32, h as u32, rgb.to_vec())
                .ok_or_else(|| invalid("RGB buffer does not match its size"))?;
            let mut out = Cursor::new(Vec::new());
            image::codecs::webp::WebPEncoder::new_lossless(&mut out)
                .write_image(
                    img.as_raw(),
                    w as u32,
                    h as u32,
                    image::ExtendedColorType::Rgb8,
                )
                .map_err(err)?;
            Ok(out.into_inner())
        }
    }
}

/// Resamples a square-or-not RGB image to `out x out` (area filter) and encodes it.
pub fn encode_patch(
    rgb: &[u8],
    w: usize,
    h: usize,
    out: usize,
    format: Format,
    quality: u8,
) -> Result<Vec<u8>> {
    if out == 0 {
        return Err(invalid("output size must be > 0"));
    }
    if w == out && h == out {
        encode(rgb, w, h, format, quality)
    } else {
        encode(&resize_area(rgb, w, h, out, out), out, out, format, quality)
    }
}

/// A region resampled to `out x out` and encoded, followed by its row-major grid of
/// `sub x sub` sub-patches (each encoded on its own); `out` must be a multiple of `sub`.
pub fn encode_region(
    rgb: &[u8],
    w: usize,
    h: usize,
    out: usize,
    sub: usize,
    format: Format,
    quality: u8,
) -> Result<Vec<Vec<u8>>> {
    if sub == 0 || !out.is_multiple_of(sub) {
        return Err(invalid(format!(
            "region size {out} is not a multiple of {sub}"
        )));
    }
    let img = if w == out && h == out {
        rgb.to_vec()
    } else {
        resize_area(rgb, w, h, out, out)
    };
    let mut parts = vec![encode(&img, out, out, format, quality)?];
    let n = out / sub;
    let mut tile = vec![0u8; sub * sub * 3];
    for r in 0..n {
        for c in 0..n {
            for y in 0..sub {
                let src = ((r * sub + y) * out + c * sub) * 3;
                tile[y * sub * 3..(y + 1) * sub * 3].copy_from_slice(&img[src..src + sub * 3]);
            }
            parts.push(encode(&tile, sub, sub, format, quality)?);
        }
    }
    Ok(parts)
}

fn rgb_of<'a>(img: &ImageView<'a>) -> Result<&'a [u8]> {
    if img.channels != 3 {
        return Err(invalid(format!(
            "images must be (H, W, 3), got {} channel(s)",
            img.channels
        )));
    }
    Ok(img.data)
}

/// [`encode_patch`] for a batch, in parallel on rayon's current pool; one outcome per image,
/// in order (a failure stays with its image).
pub fn encode_patches(
    images: &[ImageView<'_>],
    out: usize,
    format: Format,
    quality: u8,
) -> Vec<Result<Vec<u8>>> {
    images
        .par_iter()
        .map(|img| encode_patch(rgb_of(img)?, img.width, img.height, out, format, quality))
        .collect()
}

/// [`encode_region`] for a batch, in parallel on rayon's current pool; one outcome per
/// image, in order.
pub fn encode_regions(
    images: &[ImageView<'_>],
    out: usize,
    sub: usize,
    format: Format,
    quality: u8,
) -> Vec<Result<Vec<Vec<u8>>>> {
    images
        .par_iter()
        .map(|img| {
            encode_region(
                rgb_of(img)?,
                img.width,
                img.height,
                out,
                sub,
                format,
                quality,
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gradient(w: usize, h: usize) -> Vec<u8> {
        (0..w * h)
            .flat_map(|i| [(i % w) as u8, (i / w) as u8, 128])
            .collect()
    }

    #[test]
    fn formats_round_trip() {
        let img = gradient(32, 16);
        let png = encode(&img, 32, 16, Format::Png, 90).unwrap();
        let back = image::load_from_memory(&png).unwrap().to_rgb8();
        assert_eq!(back.as_raw(), &img);
        let webp = encode(&img, 32, 16, Format::WebP, 90).unwrap();
        let back = image::load_from_memory(&webp).unwrap().to_rgb8();
        assert_eq!(back.as_raw(), &img);
        let jpg = encode(&img, 32, 16, Format::Jpeg, 90).unwrap();
        assert_eq!(&jpg[..2], &[0xFF, 0xD8]);
        assert!("gif".parse::<Format>().is_err());
    }

    #[test]
    fn region_grid_is_row_major() {
        let img = gradient(64, 64);
        let parts = encode_region(&img, 64, 64, 64, 32, Format::Png, 90).unwrap();
        assert_eq!(parts.len(), 5);
        let p2 = image::load_from_memory(&parts[2]).unwrap().to_rgb8();
        // Third part = row 0, column 1: x starts at 32.
        assert_eq!(p2.get_pixel(0, 0).0, [32, 0, 128]);
        let p3 = image::load_from_memory(&parts[3]).unwrap().to_rgb8();
        assert_eq!(p3.get_pixel(0, 0).0, [0, 32, 128]);
        assert!(encode_region(&img, 64, 64, 64, 24, Format::Png, 90).is_err());
    }

    #[test]
    fn batches_equal_one_image_at_a_time_and_keep_failures_in_place() {
        let a = gradient(40, 40);
        let b = gradient(32, 32);
        let gray = vec![7u8; 16 * 16];
        let imgs = [
            ImageView::new(&a, 40, 40, 3).unwrap(),
            ImageView::new(&gray, 16, 16, 1).unwrap(),
            ImageView::new(&b, 32, 32, 3).unwrap(),
        ];
        let res = encode_patches(&imgs, 32, Format::Png, 90);
        assert_eq!(res.len(), 3);
        assert_eq!(
            res[0].as_ref().unwrap(),
            &encode_patch(&a, 40, 40, 32, Format::Png, 90).unwrap()
        );
        assert!(matches!(res[1], Err(CoreError::InvalidArgument(_))));
        assert_eq!(
            res[2].as_ref().unwrap(),
            &encode(&b, 32, 32, Format::Png, 90).unwrap()
        );
        let regions = encode_regions(&imgs, 32, 16, Format::Png, 90);
        assert_eq!(
            regions[2].as_ref().unwrap(),
            &encode_region(&b, 32, 32, 32, 16, Format::Png, 90).unwrap()
        );
        assert_eq!(regions[0].as_ref().unwrap().len(), 5);
        assert!(regions[1].is_err());
        assert!(encode_patches(&imgs[..1], 0, Format::Jpeg, 90)[0].is_err());
    }
}
