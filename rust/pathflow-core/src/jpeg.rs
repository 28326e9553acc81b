//! JPEG plumbing for tiled TIFF/SVS pyramids.
//!
//! * [`assemble_tile`]: turns an abbreviated TIFF tile stream plus the TIFF `JPEGTables` into a
//!   standalone baseline JPEG without decoding it (the zero-transcode "pass-through" path).
//! * [`decode_rgb`] / [`encode_rgb`]: RGB8 decode and baseline JFIF encode (4:4:4 chroma
//!   from quality 90, 4:2:0 below) with
//!   libjpeg-turbo-rs, a pure-Rust port of libjpeg-turbo whose output is byte-identical to
//!   libjpeg-turbo's (what PIL and OpenSlide use): islow IDCT, "fancy" chroma upsampling,
//!   Adobe transform flag honoured; the encoder writes the same bytes as PIL's `quality=q`.
//! * [`resize_area`]: pixel-area downscaling (`cv2.INTER_AREA` semantics), bilinear upscaling.

use crate::error::{invalid, CoreError, Result};
use libjpeg_turbo_rs::{PixelFormat, Subsampling};

/// Colour space of the compressed components of a TIFF JPEG tile.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JpegColor {
    /// TIFF Photometric 6: the components are Y, Cb, Cr (the JPEG default).
    YCbCr,
    /// TIFF Photometric 2: the components are R, G, B and must not be colour-transformed
    /// (libtiff convention, used by Aperio SVS).
    Rgb,
}

impl JpegColor {
    /// Maps a TIFF `Photometric` value (2 = RGB, 6 = YCbCr) onto a colour space.
    pub fn from_photometric(photometric: u16) -> Result<Self> {
        match photometric {
            2 => Ok(Self::Rgb),
            6 => Ok(Self::YCbCr),
            p => Err(invalid(format!(
                "unsupported photometric interpretation {p} for JPEG tiles (expected 2 or 6)"
            ))),
        }
    }
}

const SOI: u8 = 0xD8;
const EOI: u8 = 0xD9;
const SOS: u8 = 0xDA;
const APP0: u8 = 0xE0;
const APP14: u8 = 0xEE;

/// Adobe APP14 segment with transform flag 0 ("RGB, no colour transform").
const ADOBE_RGB: [u8; 16] = [
    0xFF, APP14, 0x00, 0x0E, b'A', b'd', b'o', b'b', b'e', 0x00, 0x64, 0x00, 0x00, 0x00, 0x00, 0x00,
];

fn corrupt(msg: impl Into<String>) -> CoreError {
    CoreError::Corrupt(msg.into())
}

/// One marker segment of a JPEG header: its marker and the whole segment (marker included).
struct Segment<'a> {
    marker: u8,
    bytes: &'a [u8],
}

impl Segment<'_> {
    /// Whether a decoder reads a colour-space hint from this segment (JFIF APP0, Adobe APP14).
    fn is_colour_hint(&self) -> bool {
        let payload = self.bytes.get(4..).unwrap_or_default();
        (self.marker == APP0 && payload.starts_with(b"JFIF\0"))
            || (self.marker == APP14 && payload.starts_with(b"Adobe"))
    }
}

/// Splits the header of a JPEG stream (after its SOI) into marker segments, stopping after
/// the segment that ends the header: `EOI` for a tables-only stream, `SOS` for an image.
/// Returns the segments and the offset just past the last one.
fn header_segments<'a>(data: &'a [u8], what: &str) -> Result<(Vec<Segment<'a>>, usize)> {
    if data.len() < 4 || data[0] != 0xFF || data[1] != SOI {
        return Err(corrupt(format!(
            "{what} does not start with a JPEG SOI marker"
        )));
    }
    let mut segments = Vec::new();
    let mut pos = 2;
    loop {
        if pos >= data.len() {
            return Err(corrupt(format!("{what} ends inside its JPEG header")));
        }
        if data[pos] != 0xFF {
            return Err(corrupt(format!(
                "{what}: expected a JPEG marker at byte {pos}, found 0x{:02X}",
                data[pos]
            )));
        }
        // Any number of 0xFF fill bytes may precede a marker.
        let mut m = pos + 1;
        while m < data.len() && data[m] == 0xFF {
            m += 1;
        }
        let Some(&marker) = data.get(m) else {
            return Err(corrupt(format!("{what} ends inside a JPEG marker")));
        };
        match marker {
            EOI => {
                segments.push(Segment {
                    marker,
                    bytes: &data[m - 1..m + 1],
                });
                return Ok((segments, m + 1));
            }
            0x00 | 0x01 | SOI | 0xD0..=0xD7 => {
                return Err(corrupt(format!(
                    "{what}: unexpected JPEG marker 0xFF{marker:02X} at byte {m}"
                )));
            }
            _ => {}
        }
        let len = match data.get(m + 1..m + 3) {
            Some(b) => usize::from(u16::from_be_bytes([b[0], b[1]])),
            None => return Err(corrupt(format!("{what} ends inside a JPEG segment length"))),
        };
        let end = m + 1 + len;
        if len < 2 || end > data.len() {
            return Err(corrupt(format!(
                "{what}: JPEG segment 0xFF{marker:02X} at byte {m} has a bad length {len}"
            )));
        }
        segments.push(Segment {
            marker,
            bytes: &data[m - 1..end],
        });
        pos = end;
        if marker == SOS {
            return Ok((segments, pos));
        }
    }
}

fn is_sof(marker: u8) -> bool {
    matches!(marker, 0xC0..=0xCF) && !matches!(marker, 0xC4 | 0xC8 | 0xCC)
}

/// Builds a standalone JPEG from an abbreviated TIFF tile stream and the TIFF `JPEGTables`.
///
/// The result is `SOI`, then for [`JpegColor::Rgb`] an Adobe APP14 segment with transform
/// flag 0 (so libjpeg, PIL, nvJPEG and DALI skip the YCbCr -> RGB conversion; any JFIF or
/// Adobe segment of the inputs is dropped then), then the segments of `tables` (without their
/// SOI/EOI), then the tile's own segments after its SOI, entropy-coded data and EOI unchanged.
/// Tables that the tile defines itself follow the shared ones and so take precedence. No
/// pixel is decoded.
///
/// `tables` may be empty (a tile that carries its own tables). Malformed markers, a missing
/// frame header or a tile that does not end with EOI give [`CoreError::Corrupt`].
pub fn assemble_tile(tables: &[u8], tile: &[u8], color: JpegColor) -> Result<Vec<u8>> {
    let table_segments = if tables.is_empty() {
        Vec::new()
    } else {
        let (segments, end) = header_segments(tables, "JPEGTables")?;
        match segments.last() {
            Some(s) if s.marker == EOI => {}
            _ => return Err(corrupt("JPEGTables contain image data (SOS)")),
        }
        if let Some(s) = segments.iter().find(|s| is_sof(s.marker)) {
            return Err(corrupt(format!(
                "JPEGTables contain a frame header 0xFF{:02X}",
                s.marker
            )));
        }
        if tables[end..].iter().any(|&b| b != 0) {
            return Err(corrupt("JPEGTables have data after their EOI"));
        }
        segments
    };
    let (tile_segments, header_end) = header_segments(tile, "JPEG tile")?;
    match tile_segments.last() {
        Some(s) if s.marker == SOS => {}
        _ => return Err(corrupt("JPEG tile has no scan (SOS)")),
    }
    if !tile_segments.iter().any(|s| is_sof(s.marker)) {
        return Err(corrupt(
            "JPEG tile has no frame header (SOF) before its scan",
        ));
    }
    if tile.len() < header_end + 2 || tile[tile.len() - 2..] != [0xFF, EOI] {
        return Err(corrupt("JPEG tile is truncated (no EOI marker at its end)"));
    }

    let keep = |s: &&Segment| s.marker != EOI && !(color == JpegColor::Rgb && s.is_colour_hint());
    let mut out = Vec::with_capacity(tables.len() + tile.len() + ADOBE_RGB.len());
    out.extend_from_slice(&[0xFF, SOI]);
    if color == JpegColor::Rgb {
        out.extend_from_slice(&ADOBE_RGB);
    }
    for s in table_segments.iter().chain(&tile_segments).filter(keep) {
        out.extend_from_slice(s.bytes);
    }
    out.extend_from_slice(&tile[header_end..]);
    Ok(out)
}

/// Decodes a JPEG into tightly packed RGB8, returning `(pixels, width, height)`.
///
/// Same pixels as libjpeg-turbo with its defaults (PIL, OpenSlide): islow IDCT, "fancy"
/// (triangle) chroma upsampling, the Adobe APP14 transform flag honoured (0 = RGB components,
/// no colour transform). Grayscale streams are expanded to RGB. Undecodable data gives
/// [`CoreError::Corrupt`].
pub fn decode_rgb(jpeg: &[u8]) -> Result<(Vec<u8>, usize, usize)> {
    let image = libjpeg_turbo_rs::decompress_to(jpeg, PixelFormat::Rgb)
        .map_err(|e| corrupt(format!("JPEG decode failed: {e}")))?;
    let (pixels, w, h) = (image.data, image.width, image.height);
    if pixels.len() != w * h * 3 {
        return Err(corrupt(format!(
            "JPEG decode gave {} bytes for a {w}x{h} RGB image",
            pixels.len()
        )));
    }
    Ok((pixels, w, h))
}

/// Encodes tightly packed RGB8 as a baseline JFIF JPEG with the standard IJG tables scaled
/// to `quality` (1-100), chroma at full resolution (4:4:4) from quality 90 and 4:2:0 below:
/// the bytes libjpeg-turbo writes (PIL's `Image.save(..., quality=q, subsampling=...)`).
pub fn encode_rgb(rgb: &[u8], w: usize, h: usize, quality: u8) -> Result<Vec<u8>> {
    if !(1..=100).contains(&quality) {
        return Err(invalid(format!("JPEG quality {quality} is not in 1..=100")));
    }
    if w > 65_500 || h > 65_500 {
        return Err(invalid(format!("{w}x{h} is too large for a JPEG")));
    }
    if w == 0 || h == 0 {
        return Err(invalid(format!("empty image ({w}x{h})")));
    }
    if rgb.len() != w * h * 3 {
        return Err(CoreError::Shape(format!(
            "buffer of {} bytes for a {w}x{h}x3 image",
            rgb.len()
        )));
    }
    // Full-resolution chroma from quality 90 up: H&E colour edges (eosin/haematoxylin)
    // lose ~3 dB PSNR to 4:2:0 at the same quality; below 90 size matters more.
    let sub = if quality >= 90 {
        Subsampling::S444
    } else {
        Subsampling::S420
    };
    libjpeg_turbo_rs::compress(rgb, w, h, PixelFormat::Rgb, quality, sub)
        .map_err(|e| invalid(format!("JPEG encode failed: {e}")))
}

/// Resamples tightly packed RGB8 from `w x h` to `ow x oh`.
///
/// Shrinking (`ow <= w` and `oh <= h`) averages over pixel areas like `cv2.INTER_AREA`: an
/// integer factor gives the exact block mean (rounded half up), any other factor weights the
/// source pixels by their overlap with the destination cell. Otherwise (any upscaled axis) it
/// interpolates bilinearly with pixel centres aligned (`cv2.INTER_LINEAR`). Results round to
/// nearest. Panics if `rgb.len() != w * h * 3` or a size is zero.
pub fn resize_area(rgb: &[u8], w: usize, h: usize, ow: usize, oh: usize) -> Vec<u8> {
    assert_eq!(rgb.len(), w * h * 3, "buffer does not match {w}x{h}x3");
    assert!(w > 0 && h > 0 && ow > 0 && oh > 0, "empty image");
    if (ow, oh) == (w, h) {
        rgb.to_vec()
    } else if ow > w || oh > h {
        resize_bilinear(rgb, w, h, ow, oh)
    } else if w.is_multiple_of(ow) && h.is_multiple_of(oh) {
        block_mean(rgb, w, h, w / ow, h / oh)
    } else {
        area_weighted(rgb, w, h, ow, oh)
    }
}

/// Exact mean over `fx x fy` blocks (integer downscale factors).
fn block_mean(rgb: &[u8], w: usize, h: usize, fx: usize, fy: usize) -> Vec<u8> {
    let (ow, oh) = (w / fx, h / fy);
    let mut out = vec![0u8; ow * oh * 3];
    if (fx, fy) == (2, 2) {
        // The common case (e.g. 512 -> 256): straight from two rows, in u16.
        let mut v = vec![0u16; w * 3];
        for (out_row, rows) in out
            .chunks_exact_mut(ow * 3)
            .zip(rgb.chunks_exact(2 * w * 3))
        {
            let (r0, r1) = rows.split_at(w * 3);
            for ((s, &a), &b) in v.iter_mut().zip(r0).zip(r1) {
                *s = u16::from(a) + u16::from(b) + 1;
            }
            for (o, pair) in out_row.chunks_exact_mut(3).zip(v.chunks_exact(6)) {
                o[0] = ((pair[0] + pair[3]) >> 2) as u8;
                o[1] = ((pair[1] + pair[4]) >> 2) as u8;
                o[2] = ((pair[2] + pair[5]) >> 2) as u8;
            }
        }
        return out;
    }
    // Column sums over the `fy` rows of a block row (vectorises), then sums of `fx` columns.
    let n = (fx * fy) as u32;
    let mut cols = vec![0u32; w * 3];
    for (out_row, rows) in out
        .chunks_exact_mut(ow * 3)
        .zip(rgb.chunks_exact(fy * w * 3))
    {
        cols.fill(0);
        for row in rows.chunks_exact(w * 3) {
            for (c, &p) in cols.iter_mut().zip(row) {
                *c += u32::from(p);
            }
        }
        for (o, block) in out_row.chunks_exact_mut(3).zip(cols.chunks_exact(fx * 3)) {
            let mut s = [n / 2; 3];
            for px in block.chunks_exact(3) {
                s[0] += px[0];
                s[1] += px[1];
                s[2] += px[2];
            }
            for c in 0..3 {
                o[c] = (s[c] / n) as u8;
            }
        }
    }
    out
}

/// Area weights along one axis (OpenCV's `computeResizeAreaTab`): destination cell `d`
/// covers `[d * scale, (d + 1) * scale)` and takes the contiguous source pixels
/// `first[d]..first[d] + len` with weights `weights[offset[d]..offset[d + 1]]`.
struct AreaTaps {
    first: Vec<usize>,
    offset: Vec<usize>,
    weights: Vec<f32>,
}

impl AreaTaps {
    fn new(src: usize, dst: usize) -> Self {
        let scale = src as f64 / dst as f64;
        let mut taps = Self {
            first: Vec::with_capacity(dst),
            offset: vec![0],
            weights: Vec::with_capacity(src + dst),
        };
        for d in 0..dst {
            let f1 = d as f64 * scale;
            let f2 = f1 + scale;
            let cell = scale.min(src as f64 - f1);
            let s2 = (f2.floor() as usize).min(src - 1);
            let s1 = (f1.ceil() as usize).min(s2);
            let mut first = s1;
            if s1 as f64 - f1 > 1e-3 {
                first = s1 - 1;
                taps.weights.push(((s1 as f64 - f1) / cell) as f32);
            }
            taps.weights.extend((s1..s2).map(|_| (1.0 / cell) as f32));
            if f2 - s2 as f64 > 1e-3 {
                taps.weights
                    .push(((f2 - s2 as f64).min(1.0).min(cell) / cell) as f32);
            }
            taps.first.push(first);
            taps.offset.push(taps.weights.len());
        }
        taps
    }

    /// `(first source index, weights)` of destination cell `d`.
    fn get(&self, d: usize) -> (usize, &[f32]) {
        (
            self.first[d],
            &self.weights[self.offset[d]..self.offset[d + 1]],
        )
    }
}

/// Rounds to the nearest integer, ties to even, and saturates to `u8` (`cvRound` +
/// `saturate_cast`). Adding and removing 1.5 * 2^23 makes the FPU round in its default mode,
/// with no libm call (`f32::round_ties_even` is one without SSE4.1).
#[inline]
fn round_even_u8(v: f32) -> u8 {
    const MAGIC: f32 = 12_582_912.0;
    ((v.clamp(0.0, 255.0) + MAGIC) - MAGIC) as i32 as u8
}

/// Area-weighted shrink by non-integer factors (separable: rows, then columns, in f32 like
/// OpenCV; rounds half to even like `cvRound`).
fn area_weighted(rgb: &[u8], w: usize, h: usize, ow: usize, oh: usize) -> Vec<u8> {
    let xt = AreaTaps::new(w, ow);
    let yt = AreaTaps::new(h, oh);
    let mut out = vec![0u8; ow * oh * 3];
    let mut acc = vec![0f32; w * 3];
    let mut sums = vec![0f32; ow * 3];
    for (oy, out_row) in out.chunks_exact_mut(ow * 3).enumerate() {
        let (first, weights) = yt.get(oy);
        acc.fill(0.0);
        for (k, &wy) in weights.iter().enumerate() {
            let row = &rgb[(first + k) * w * 3..(first + k + 1) * w * 3];
            for (a, &p) in acc.iter_mut().zip(row) {
                *a += wy * f32::from(p);
            }
        }
        for (ox, out) in sums.chunks_exact_mut(3).enumerate() {
            let (first, weights) = xt.get(ox);
            let src = &acc[first * 3..(first + weights.len()) * 3];
            let mut s = [0f32; 3];
            for (&wx, p) in weights.iter().zip(src.chunks_exact(3)) {
                s[0] += wx * p[0];
                s[1] += wx * p[1];
                s[2] += wx * p[2];
            }
            out.copy_from_slice(&s);
        }
        for (o, &v) in out_row.iter_mut().zip(&sums) {
            *o = round_even_u8(v);
        }
    }
    out
}

/// Bilinear taps `(left index, right weight)` with half-pixel centres, clamped at the edges.
fn linear_taps(src: usize, dst: usize) -> Vec<(usize, f32)> {
    let scale = src as f64 / dst as f64;
    (0..dst)
        .map(|d| {
            let f = (d as f64 + 0.5) * scale - 0.5;
            if f <= 0.0 {
                (0, 0.0)
            } else if f >= (src - 1) as f64 {
                (src - 1, 0.0)
            } else {
                let i = f.floor();
                (i as usize, (f - i) as f32)
            }
        })
        .collect()
}

/// Bilinear resampling (`cv2.INTER_LINEAR` geometry).
fn resize_bilinear(rgb: &[u8], w: usize, h: usize, ow: usize, oh: usize) -> Vec<u8> {
    let xt = linear_taps(w, ow);
    let yt = linear_taps(h, oh);
    let mut out = vec![0u8; ow * oh * 3];
    let mut tmp = vec![0f32; w * 3];
    for (out_row, &(sy, fy)) in out.chunks_exact_mut(ow * 3).zip(&yt) {
        let r0 = &rgb[sy * w * 3..(sy + 1) * w * 3];
        let r1 = &rgb[(sy + 1).min(h - 1) * w * 3..((sy + 1).min(h - 1) + 1) * w * 3];
        for ((t, &a), &b) in tmp.iter_mut().zip(r0).zip(r1) {
            *t = f32::from(a) + fy * (f32::from(b) - f32::from(a));
        }
        for (px, &(sx, fx)) in out_row.chunks_exact_mut(3).zip(&xt) {
            let sx1 = (sx + 1).min(w - 1);
            for c in 0..3 {
                let a = tmp[sx * 3 + c];
                let b = tmp[sx1 * 3 + c];
                px[c] = (a + fx * (b - a) + 0.5) as u8;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A smooth synthetic RGB image.
    fn gradient(w: usize, h: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(w * h * 3);
        for y in 0..h {
            for x in 0..w {
                v.push((x * 255 / w.max(2).saturating_sub(1).max(1)) as u8);
                v.push((y * 255 / h.max(2).saturating_sub(1).max(1)) as u8);
                v.push(((x + y) * 127 / (w + h)) as u8 + 64);
            }
        }
        v
    }

    fn max_abs_diff(a: &[u8], b: &[u8]) -> u8 {
        a.iter()
            .zip(b)
            .map(|(&x, &y)| x.abs_diff(y))
            .max()
            .unwrap_or(0)
    }

    fn psnr(a: &[u8], b: &[u8]) -> f64 {
        let mse = a
            .iter()
            .zip(b)
            .map(|(&x, &y)| (f64::from(x) - f64::from(y)).powi(2))
            .sum::<f64>()
            / a.len() as f64;
        10.0 * (255.0 * 255.0 / mse).log10()
    }

    /// Splits a full JPEG into (tables-only stream, abbreviated tile stream) as a TIFF writer
    /// with shared JPEGTables would store them.
    fn split_tables(jpeg: &[u8]) -> (Vec<u8>, Vec<u8>) {
        let (segments, end) = header_segments(jpeg, "test").unwrap();
        let mut tables = vec![0xFF, SOI];
        let mut tile = vec![0xFF, SOI];
        for s in &segments {
            match s.marker {
                0xDB | 0xC4 => tables.extend_from_slice(s.bytes),
                APP0 => {}
                _ => tile.extend_from_slice(s.bytes),
            }
        }
        tables.extend_from_slice(&[0xFF, EOI]);
        tile.extend_from_slice(&jpeg[end..]);
        (tables, tile)
    }

    #[test]
    fn encode_decode_round_trip() {
        let img = gradient(67, 45);
        let jpeg = encode_rgb(&img, 67, 45, 95).unwrap();
        assert_eq!(&jpeg[..4], &[0xFF, SOI, 0xFF, APP0]);
        assert_eq!(&jpeg[6..11], b"JFIF\0");
        let (dec, w, h) = decode_rgb(&jpeg).unwrap();
        assert_eq!((w, h), (67, 45));
        assert!(psnr(&img, &dec) > 35.0, "psnr {}", psnr(&img, &dec));
        let (segments, _) = header_segments(&jpeg, "test").unwrap();
        let sof = segments.iter().find(|s| s.marker == 0xC0).unwrap().bytes;
        // Baseline, 3 components, 4:4:4 at quality 95 ...
        assert_eq!(sof[9], 3);
        assert_eq!((sof[11], sof[14], sof[17]), (0x11, 0x11, 0x11));
        // ... and 4:2:0 (luma 2x2, chroma 1x1) below 90.
        let small = encode_rgb(&img, 67, 45, 80).unwrap();
        let (segments, _) = header_segments(&small, "test").unwrap();
        let sof = segments.iter().find(|s| s.marker == 0xC0).unwrap().bytes;
        assert_eq!((sof[11], sof[14], sof[17]), (0x22, 0x11, 0x11));
    }

    #[test]
    fn encode_rejects_bad_arguments() {
        let img = gradient(8, 8);
        assert!(encode_rgb(&img, 8, 8, 0).is_err());
        assert!(encode_rgb(&img, 8, 8, 101).is_err());
        assert!(matches!(
            encode_rgb(&img, 8, 7, 90),
            Err(CoreError::Shape(_))
        ));
        assert!(encode_rgb(&[], 0, 0, 90).is_err());
    }

    #[test]
    fn decode_rejects_garbage() {
        assert!(matches!(
            decode_rgb(b"not a jpeg"),
            Err(CoreError::Corrupt(_))
        ));
        assert!(matches!(decode_rgb(&[]), Err(CoreError::Corrupt(_))));
    }

    #[test]
    fn assemble_ycbcr_tile_matches_full_stream() {
        let img = gradient(32, 24);
        let jpeg = encode_rgb(&img, 32, 24, 90).unwrap();
        let (tables, tile) = split_tables(&jpeg);
        let assembled = assemble_tile(&tables, &tile, JpegColor::YCbCr).unwrap();
        assert_eq!(&assembled[..2], &[0xFF, SOI]);
        assert_eq!(&assembled[assembled.len() - 2..], &[0xFF, EOI]);
        assert_eq!(decode_rgb(&assembled).unwrap(), decode_rgb(&jpeg).unwrap());
        // A tile that carries its own tables works with or without shared ones.
        let own = assemble_tile(&[], &jpeg, JpegColor::YCbCr).unwrap();
        assert_eq!(own, jpeg);
        let both = assemble_tile(&tables, &jpeg, JpegColor::YCbCr).unwrap();
        assert_eq!(decode_rgb(&both).unwrap(), decode_rgb(&jpeg).unwrap());
    }

    #[test]
    fn assemble_rgb_tile_inserts_adobe_marker() {
        // Hand-built stream: tables (DQT + 2 DHT) and a tile whose frame header is all that
        // matters here; the scan bytes are opaque to assemble_tile.
        let dqt = [&[0xFF, 0xDB, 0x00, 0x43, 0x00][..], &[1u8; 64]].concat();
        let dht = [&[0xFF, 0xC4, 0x00, 0x14, 0x00][..], &[0u8; 16], &[0u8]].concat();
        let dht = {
            let mut d = dht;
            d[5] = 1; // one code of length 1
            d
        };
        let tables = [&[0xFF, SOI][..], &dqt, &dht, &[0xFF, EOI]].concat();
        let sof = [
            0xFF, 0xC0, 0x00, 0x11, 8, 0, 8, 0, 8, 3, 0, 0x11, 0, 1, 0x11, 0, 2, 0x11, 0,
        ];
        let sos = [
            0xFF, SOS, 0x00, 0x0C, 3, 0, 0x00, 1, 0x00, 2, 0x00, 0, 63, 0,
        ];
        let jfif = [
            0xFF, APP0, 0x00, 0x10, b'J', b'F', b'I', b'F', 0, 1, 1, 0, 0, 1, 0, 1, 0, 0,
        ];
        let tile = [
            &[0xFF, SOI][..],
            &jfif,
            &sof,
            &sos,
            &[0x12, 0xFF, 0x00, 0x34],
            &[0xFF, EOI],
        ]
        .concat();
        let out = assemble_tile(&tables, &tile, JpegColor::Rgb).unwrap();
        let expected = [
            &[0xFF, SOI][..],
            &ADOBE_RGB,
            &dqt,
            &dht,
            &sof,
            &sos,
            &[0x12, 0xFF, 0x00, 0x34],
            &[0xFF, EOI],
        ]
        .concat();
        assert_eq!(out, expected);
        // YCbCr keeps everything, JFIF included, and adds nothing.
        let out = assemble_tile(&tables, &tile, JpegColor::YCbCr).unwrap();
        let expected = [&[0xFF, SOI][..], &dqt, &dht, &tile[2..]].concat();
        assert_eq!(out, expected);
    }

    #[test]
    fn assemble_rejects_malformed_streams() {
        let img = gradient(16, 16);
        let jpeg = encode_rgb(&img, 16, 16, 90).unwrap();
        let (tables, tile) = split_tables(&jpeg);
        let bad = |t: &[u8], s: &[u8]| {
            matches!(
                assemble_tile(t, s, JpegColor::YCbCr),
                Err(CoreError::Corrupt(_))
            )
        };
        assert!(bad(&tables, &tile[2..])); // no SOI
        assert!(bad(&tables, &tile[..tile.len() - 2])); // no EOI
        assert!(bad(&tables, &tile[..40])); // truncated header
        assert!(bad(&tables[..tables.len() - 2], &tile)); // tables without EOI
        assert!(bad(&tile, &tile)); // "tables" with a scan
        assert!(bad(&tables, &tables)); // tile without a scan
        let mut broken = tile.clone();
        broken[3] ^= 0xFF; // first segment marker byte becomes garbage-ish
        broken[2] = 0x12;
        assert!(bad(&tables, &broken));
        let mut long = tables.clone();
        long[4] = 0xFF; // DQT length far past the end
        assert!(bad(&long, &tile));
        // A tile without a frame header.
        let sos = [0xFF, SOS, 0x00, 0x08, 1, 1, 0x00, 0, 63, 0];
        let no_sof = [&[0xFF, SOI][..], &sos, &[0x00, 0xFF, EOI]].concat();
        assert!(bad(&tables, &no_sof));
    }

    #[test]
    fn decode_honours_adobe_rgb_transform() {
        // Encode an image whose "YCbCr" planes are really R, G, B: with the Adobe transform-0
        // marker the decoder must hand them back untouched (up to JPEG loss).
        let img = gradient(40, 40);
        let jpeg = encode_rgb(&img, 40, 40, 100).unwrap();
        let (tables, tile) = split_tables(&jpeg);
        let rgb = decode_rgb(&assemble_tile(&tables, &tile, JpegColor::Rgb).unwrap())
            .unwrap()
            .0;
        let ycc = decode_rgb(&assemble_tile(&tables, &tile, JpegColor::YCbCr).unwrap())
            .unwrap()
            .0;
        // The same coded planes read as RGB are the YCbCr values of the image.
        let (r, g, b) = (f64::from(img[0]), f64::from(img[1]), f64::from(img[2]));
        let y = 0.299 * r + 0.587 * g + 0.114 * b;
        assert!((f64::from(rgb[0]) - y).abs() <= 3.0, "{} vs {y}", rgb[0]);
        assert!(max_abs_diff(&ycc, &img) <= 12);
        assert!(max_abs_diff(&rgb, &img) > 40);
    }

    #[test]
    fn decode_grayscale_expands_to_rgb() {
        let gray: Vec<u8> = (0..64u8).map(|v| v * 4).collect();
        let out =
            libjpeg_turbo_rs::compress(&gray, 8, 8, PixelFormat::Grayscale, 95, Subsampling::S444)
                .unwrap();
        let (rgb, w, h) = decode_rgb(&out).unwrap();
        assert_eq!((w, h, rgb.len()), (8, 8, 192));
        assert!(rgb.chunks(3).all(|p| p[0] == p[1] && p[1] == p[2]));
    }

    #[test]
    fn resize_integer_factor_is_exact_block_mean() {
        let img = gradient(12, 8);
        let out = resize_area(&img, 12, 8, 4, 2);
        for oy in 0..2 {
            for ox in 0..4 {
                for c in 0..3 {
                    let mut s = 0u32;
                    for y in oy * 4..oy * 4 + 4 {
                        for x in ox * 3..ox * 3 + 3 {
                            s += u32::from(img[(y * 12 + x) * 3 + c]);
                        }
                    }
                    assert_eq!(u32::from(out[(oy * 4 + ox) * 3 + c]), (s + 6) / 12);
                }
            }
        }
        // The 2x2 fast path agrees with the brute-force mean.
        let odd: Vec<u8> = (0..10 * 6 * 3).map(|i| (i * 37 % 251) as u8).collect();
        let out = resize_area(&odd, 10, 6, 5, 3);
        for (i, &v) in out.iter().enumerate() {
            let (c, ox, oy) = (i % 3, i / 3 % 5, i / 15);
            let at = |x: usize, y: usize| u32::from(odd[(y * 10 + x) * 3 + c]);
            let s = at(2 * ox, 2 * oy)
                + at(2 * ox + 1, 2 * oy)
                + at(2 * ox, 2 * oy + 1)
                + at(2 * ox + 1, 2 * oy + 1);
            assert_eq!(u32::from(v), (s + 2) / 4);
        }
        // 2x2 mean rounds half up.
        let px = [0u8, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0];
        assert_eq!(resize_area(&px, 2, 2, 1, 1), vec![0, 0, 0]);
        let px = [1u8, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0];
        assert_eq!(resize_area(&px, 2, 2, 1, 1), vec![1, 1, 1]);
        assert_eq!(resize_area(&img, 12, 8, 12, 8), img);
    }

    #[test]
    fn resize_non_integer_matches_opencv_inter_area() {
        // cv2.resize(src, (2, 2), interpolation=cv2.INTER_AREA) with
        // src = np.arange(75, dtype=np.uint8).reshape(5, 5, 3) * 3.
        let src: Vec<u8> = (0..75u8).map(|v| v * 3).collect();
        let out = resize_area(&src, 5, 5, 2, 2);
        let expected = [43u8, 46, 49, 65, 68, 71, 151, 154, 157, 173, 176, 179];
        assert!(max_abs_diff(&out, &expected) <= 1, "{out:?}");
        // Constant images stay constant, whatever the factor.
        let flat = vec![77u8; 514 * 300 * 3];
        assert!(resize_area(&flat, 514, 300, 256, 137)
            .iter()
            .all(|&v| v == 77));
    }

    #[test]
    fn resize_upscale_is_bilinear() {
        let src = [0u8, 0, 0, 200, 100, 40];
        let out = resize_area(&src, 2, 1, 4, 1);
        // cv2.INTER_LINEAR: x = 0.25 * 0 + ..., centres at -0.25, 0.25, 0.75, 1.25.
        assert_eq!(out, vec![0, 0, 0, 50, 25, 10, 150, 75, 30, 200, 100, 40]);
    }
}
