//! Decode once, cut many views: the CPU kernel of the self-supervised data loader.
//!
//! * [`image_info`]: a cheap structural check of an encoded JPEG, PNG or WebP (header, sizes,
//!   channels, end marker / RIFF chunk sizes) that gives `(width, height)` without decoding,
//!   so a loader can skip corrupt samples before handing them to a GPU decoder.
//! * [`ViewDecoder::decode_into`] / [`decode_views`]: decode an image once to RGB8 (JPEG with
//!   libjpeg-turbo-rs, the same pixels as PIL; PNG with the `png` crate, alpha dropped, gray
//!   expanded; WebP, lossless or lossy, with the `image` crate's pure-Rust `image-webp`
//!   decoder, alpha dropped), then for every requested view crop a float box, resize it to `S x S` with
//!   PIL's antialiased bilinear filter (`Image.resize((S, S), BILINEAR, box=...)`, via
//!   `fast_image_resize`) and apply one of the eight D4 symmetries (see [`apply_d4`]).
//!
//! Errors: undecodable or unsupported image data gives [`CoreError::Corrupt`] (a per-sample
//! failure for a loader); a bad box, D4 code, size or output buffer gives
//! [`CoreError::InvalidArgument`] (a caller bug).

use std::cell::RefCell;
use std::io::Cursor;

use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use libjpeg_turbo_rs::PixelFormat;
use rayon::prelude::*;

use crate::error::{invalid, CoreError, Result};

/// Largest image (in pixels) that is decoded: 16384 x 16384.
pub const MAX_PIXELS: u64 = 1 << 28;

/// How far (in source pixels) a box may poke out of the image and still be clamped to it;
/// f32 rounding of `x0 + w` on large images is added on top (see [`clamp_box`]).
pub const BOX_TOLERANCE: f64 = 1e-3;

fn corrupt(msg: impl Into<String>) -> CoreError {
    CoreError::Corrupt(msg.into())
}

/// Encoded image formats understood here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageFormat {
    /// 8-bit baseline/progressive JPEG, gray or 3-component.
    Jpeg,
    /// 8-bit PNG: gray, gray + alpha, RGB or RGBA.
    Png,
    /// Still WebP (RIFF `WEBP`): lossy `VP8 `, lossless `VP8L`, or extended `VP8X` (with
    /// alpha or metadata; not animated).
    WebP,
}

/// Header facts of an encoded image that passed [`probe`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageInfo {
    /// Format.
    pub format: ImageFormat,
    /// Width in pixels (> 0).
    pub width: u32,
    /// Height in pixels (> 0).
    pub height: u32,
    /// The encoded bytes that matter: `data` without trailing 0x00 padding after a JPEG EOI.
    pub len: usize,
}

const PNG_SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A];
const PNG_IEND: [u8; 12] = [0, 0, 0, 0, b'I', b'E', b'N', b'D', 0xAE, 0x42, 0x60, 0x82];

/// `(width, height)` of a structurally valid JPEG, PNG or WebP; see [`probe`].
pub fn image_info(data: &[u8]) -> Result<(u32, u32)> {
    probe(data).map(|i| (i.width, i.height))
}

/// Structural validity check without decoding.
///
/// JPEG: SOI, well-formed marker segments up to the first scan, a frame header (SOF) with
/// 8-bit precision, nonzero size and 1 or 3 components, and the EOI marker `FF D9` at the
/// end of the data (trailing 0x00 padding allowed). PNG: signature, IHDR first with nonzero
/// size, bit depth 8 and colour type gray, RGB, gray + alpha or RGBA, and an IEND chunk at
/// the end. WebP: a `RIFF` / `WEBP` header whose size covers the data exactly (trailing 0x00
/// padding allowed), chunks that tile it, a `VP8 ` key frame, `VP8L` or `VP8X` (not animated,
/// with an image chunk) header with a nonzero size. Anything else is [`CoreError::Corrupt`]
/// with a short reason. The entropy-coded data itself is not checked (the decoder does that).
pub fn probe(data: &[u8]) -> Result<ImageInfo> {
    if data.is_empty() {
        Err(corrupt("empty image data"))
    } else if data.starts_with(&[0xFF, 0xD8]) {
        probe_jpeg(data)
    } else if data.starts_with(&PNG_SIGNATURE) {
        probe_png(data)
    } else if data.starts_with(b"RIFF") && data.get(8..12) == Some(b"WEBP") {
        probe_webp(data)
    } else {
        Err(corrupt(NOT_AN_IMAGE))
    }
}

/// The reason given for data that is none of the supported formats.
pub const NOT_AN_IMAGE: &str = "not a JPEG, PNG or WebP";

fn is_sof(marker: u8) -> bool {
    matches!(marker, 0xC0..=0xCF) && !matches!(marker, 0xC4 | 0xC8 | 0xCC)
}

fn check_pixels(width: u32, height: u32) -> Result<()> {
    if u64::from(width) * u64::from(height) > MAX_PIXELS {
        return Err(corrupt(format!(
            "image too large ({width}x{height} pixels, at most {MAX_PIXELS})"
        )));
    }
    Ok(())
}

fn probe_jpeg(data: &[u8]) -> Result<ImageInfo> {
    let mut pos = 2;
    let mut frame: Option<(u32, u32)> = None;
    loop {
        if pos >= data.len() {
            return Err(corrupt("truncated JPEG: header ends early"));
        }
        if data[pos] != 0xFF {
            return Err(corrupt(format!(
                "corrupt JPEG: expected a marker at byte {pos}"
            )));
        }
        // Any number of 0xFF fill bytes may precede a marker.
        let mut m = pos + 1;
        while m < data.len() && data[m] == 0xFF {
            m += 1;
        }
        let Some(&marker) = data.get(m) else {
            return Err(corrupt("truncated JPEG: header ends early"));
        };
        match marker {
            0xD9 => return Err(corrupt("corrupt JPEG: EOI before any scan")),
            0x00 | 0x01 | 0xD0..=0xD8 => {
                return Err(corrupt(format!(
                    "corrupt JPEG: unexpected marker 0xFF{marker:02X} in the header"
                )))
            }
            _ => {}
        }
        let Some(len) = data.get(m + 1..m + 3) else {
            return Err(corrupt("truncated JPEG: header ends early"));
        };
        let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
        let end = m + 1 + len;
        if len < 2 || end > data.len() {
            return Err(corrupt(format!(
                "truncated JPEG: segment 0xFF{marker:02X} runs past the end"
            )));
        }
        let seg = &data[m + 3..end];
        if is_sof(marker) {
            if seg.len() < 6 {
                return Err(corrupt("corrupt JPEG: short frame header"));
            }
            let precision = seg[0];
            let height = u32::from(u16::from_be_bytes([seg[1], seg[2]]));
            let width = u32::from(u16::from_be_bytes([seg[3], seg[4]]));
            let components = seg[5];
            if precision != 8 {
                return Err(corrupt(format!(
                    "unsupported JPEG: {precision}-bit samples"
                )));
            }
            if width == 0 || height == 0 {
                return Err(corrupt(format!(
                    "corrupt JPEG: empty frame {width}x{height}"
                )));
            }
            if components != 1 && components != 3 {
                return Err(corrupt(format!(
                    "unsupported JPEG: {components} components (1 or 3 supported)"
                )));
            }
            check_pixels(width, height)?;
            frame = Some((width, height));
        }
        pos = end;
        if marker == 0xDA {
            break;
        }
    }
    let Some((width, height)) = frame else {
        return Err(corrupt(
            "corrupt JPEG: no frame header (SOF) before the scan",
        ));
    };
    let len = data.len() - data.iter().rev().take_while(|&&b| b == 0).count();
    if len < pos + 2 || data[len - 2..len] != [0xFF, 0xD9] {
        return Err(corrupt("truncated JPEG: no EOI marker"));
    }
    Ok(ImageInfo {
        format: ImageFormat::Jpeg,
        width,
        height,
        len,
    })
}

fn probe_png(data: &[u8]) -> Result<ImageInfo> {
    // Signature, IHDR (length 13, type, 13 bytes, CRC).
    let Some(ihdr) = data.get(8..33) else {
        return Err(corrupt("truncated PNG: no IHDR"));
    };
    if ihdr[..8] != [0, 0, 0, 13, b'I', b'H', b'D', b'R'] {
        return Err(corrupt("corrupt PNG: first chunk is not IHDR"));
    }
    let be = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    let (width, height) = (be(&ihdr[8..12]), be(&ihdr[12..16]));
    let (depth, colour) = (ihdr[16], ihdr[17]);
    if width == 0 || height == 0 || width > i32::MAX as u32 || height > i32::MAX as u32 {
        return Err(corrupt(format!("corrupt PNG: bad size {width}x{height}")));
    }
    if depth != 8 {
        return Err(corrupt(format!(
            "unsupported PNG: bit depth {depth} (8 supported)"
        )));
    }
    if !matches!(colour, 0 | 2 | 4 | 6) {
        return Err(corrupt(format!(
            "unsupported PNG: colour type {colour} (gray, RGB, gray+alpha, RGBA supported)"
        )));
    }
    check_pixels(width, height)?;
    if data.len() < 33 + PNG_IEND.len() || !data.ends_with(&PNG_IEND) {
        return Err(corrupt("truncated PNG: no IEND chunk at the end"));
    }
    Ok(ImageInfo {
        format: ImageFormat::Png,
        width,
        height,
        len: data.len(),
    })
}

fn le24(b: &[u8]) -> u32 {
    u32::from(b[0]) | u32::from(b[1]) << 8 | u32::from(b[2]) << 16
}

fn probe_webp(data: &[u8]) -> Result<ImageInfo> {
    let le32 = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    let riff = le32(&data[4..8]) as usize;
    let end = riff.saturating_add(8);
    if riff < 4 + 8 {
        return Err(corrupt(format!("corrupt WebP: RIFF size {riff}")));
    }
    if end > data.len() {
        return Err(corrupt(format!(
            "truncated WebP: {} of {end} bytes",
            data.len()
        )));
    }
    if data[end..].iter().any(|&b| b != 0) {
        return Err(corrupt("corrupt WebP: data after the RIFF chunk"));
    }
    // The chunks must tile the RIFF payload exactly (each padded to an even size).
    let mut chunks: Vec<(&[u8], &[u8])> = Vec::new();
    let mut pos = 12;
    while pos < end {
        let Some(head) = data.get(pos..pos + 8).filter(|_| pos + 8 <= end) else {
            return Err(corrupt("truncated WebP: chunk header runs past the end"));
        };
        let size = le32(&head[4..8]) as usize;
        let stop = pos + 8 + size;
        if stop > end {
            return Err(corrupt(format!(
                "truncated WebP: chunk {:?} runs past the end",
                String::from_utf8_lossy(&head[..4])
            )));
        }
        chunks.push((&head[..4], &data[pos + 8..stop]));
        pos = stop + (size & 1);
    }
    if pos != end {
        return Err(corrupt("corrupt WebP: chunk padding runs past the end"));
    }
    let Some(&(first, payload)) = chunks.first() else {
        return Err(corrupt("corrupt WebP: no chunk"));
    };
    let (width, height) = match first {
        b"VP8 " => vp8_size(payload)?,
        b"VP8L" => vp8l_size(payload)?,
        b"VP8X" => {
            if payload.len() < 10 {
                return Err(corrupt("corrupt WebP: short VP8X header"));
            }
            if payload[0] & 0x02 != 0 {
                return Err(corrupt("unsupported WebP: animation"));
            }
            let image = chunks[1..]
                .iter()
                .find(|(id, _)| matches!(*id, b"VP8 " | b"VP8L"));
            let Some(&(id, body)) = image else {
                return Err(corrupt("corrupt WebP: VP8X without an image chunk"));
            };
            // The bitstream header is checked too; the canvas size is what decodes.
            if id == b"VP8 " {
                vp8_size(body)?;
            } else {
                vp8l_size(body)?;
            }
            (le24(&payload[4..7]) + 1, le24(&payload[7..10]) + 1)
        }
        other => {
            return Err(corrupt(format!(
                "corrupt WebP: unexpected first chunk {:?}",
                String::from_utf8_lossy(other)
            )))
        }
    };
    if width == 0 || height == 0 {
        return Err(corrupt(format!(
            "corrupt WebP: empty image {width}x{height}"
        )));
    }
    check_pixels(width, height)?;
    Ok(ImageInfo {
        format: ImageFormat::WebP,
        width,
        height,
        len: end,
    })
}

/// Size of a lossy `VP8 ` bitstream: a key frame tag, the start code, 14-bit sizes.
fn vp8_size(p: &[u8]) -> Result<(u32, u32)> {
    if p.len() < 10 {
        return Err(corrupt("corrupt WebP: short VP8 header"));
    }
    if p[0] & 1 != 0 {
        return Err(corrupt("corrupt WebP: VP8 data is not a key frame"));
    }
    if p[3..6] != [0x9D, 0x01, 0x2A] {
        return Err(corrupt("corrupt WebP: bad VP8 start code"));
    }
    let w = u32::from(u16::from_le_bytes([p[6], p[7]]) & 0x3FFF);
    let h = u32::from(u16::from_le_bytes([p[8], p[9]]) & 0x3FFF);
    Ok((w, h))
}

/// Size of a lossless `VP8L` bitstream: signature 0x2F, 14-bit sizes minus one, version 0.
fn vp8l_size(p: &[u8]) -> Result<(u32, u32)> {
    if p.len() < 5 || p[0] != 0x2F {
        return Err(corrupt("corrupt WebP: bad VP8L header"));
    }
    let bits = u32::from_le_bytes([p[1], p[2], p[3], p[4]]);
    if bits >> 29 != 0 {
        return Err(corrupt(format!(
            "unsupported WebP: VP8L version {}",
            bits >> 29
        )));
    }
    Ok(((bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1))
}

/// One group of views of one image: all share the output side `size`.
#[derive(Clone, Copy, Debug)]
pub struct ViewGroup<'a> {
    /// Per view the source box `[x0, y0, w, h]` in pixels (floats).
    pub boxes: &'a [[f32; 4]],
    /// Per view its D4 code 0..=7 (see [`apply_d4`]); same length as `boxes`.
    pub d4: &'a [u8],
    /// Output side `S` of every view of the group (> 0).
    pub size: usize,
}

impl ViewGroup<'_> {
    /// Bytes of the group's output: `views * size * size * 3`.
    pub fn out_len(&self) -> usize {
        self.boxes.len() * self.size * self.size * 3
    }
}

/// Checks a box `[x0, y0, w, h]` against a `width x height` image and returns it in f64,
/// clamped to the image: finite values, `w, h > 0`, `x0, y0 >= 0` and `x0 + w <= width`,
/// `y0 + h <= height`, each up to [`BOX_TOLERANCE`] plus the f32 rounding of the sum.
pub fn clamp_box(b: [f32; 4], width: u32, height: u32) -> Result<[f64; 4]> {
    let [x0, y0, w, h] = b.map(f64::from);
    let bad = || {
        invalid(format!(
            "box (x0={x0}, y0={y0}, w={w}, h={h}) is not inside the {width}x{height} image"
        ))
    };
    if !(x0.is_finite() && y0.is_finite() && w.is_finite() && h.is_finite()) || w <= 0.0 || h <= 0.0
    {
        return Err(bad());
    }
    let axis = |o: f64, l: f64, size: u32| -> Option<(f64, f64)> {
        let size = f64::from(size);
        let tol = BOX_TOLERANCE + size * f64::from(f32::EPSILON) * 2.0;
        if o < -tol || o + l > size + tol || o >= size {
            return None;
        }
        let o = o.max(0.0);
        let l = l.min(size - o);
        (l > 0.0).then_some((o, l))
    };
    let (x0, w) = axis(x0, w, width).ok_or_else(bad)?;
    let (y0, h) = axis(y0, h, height).ok_or_else(bad)?;
    Ok([x0, y0, w, h])
}

/// Checks the groups' shapes and codes (not the boxes, which need the image size).
pub fn check_groups(groups: &[ViewGroup<'_>]) -> Result<()> {
    for (g, grp) in groups.iter().enumerate() {
        if grp.size == 0 {
            return Err(invalid(format!("view group {g}: output size must be > 0")));
        }
        if grp.d4.len() != grp.boxes.len() {
            return Err(invalid(format!(
                "view group {g}: {} boxes but {} D4 codes",
                grp.boxes.len(),
                grp.d4.len()
            )));
        }
        if let Some(c) = grp.d4.iter().find(|&&c| c > 7) {
            return Err(invalid(format!(
                "view group {g}: D4 code {c} is not in 0..=7"
            )));
        }
    }
    Ok(())
}

/// Writes `code` applied to the square RGB8 image `src` (`size x size`) into `dst`:
/// bit 0 transposes (swaps x and y), then bit 1 flips horizontally, then bit 2 flips
/// vertically, i.e. `dst = vflip^b2(hflip^b1(transpose^b0(src)))`. As numpy on `(S, S, 3)`:
/// `a = a.transpose(1, 0, 2)` if bit 0, `a = a[:, ::-1]` if bit 1, `a = a[::-1]` if bit 2.
/// Panics if a buffer is not `size * size * 3` bytes or `code > 7`.
pub fn apply_d4(src: &[u8], size: usize, code: u8, dst: &mut [u8]) {
    assert!(code < 8, "D4 code {code} is not in 0..=7");
    let row = size * 3;
    assert_eq!(src.len(), size * row, "source is not {size}x{size}x3");
    assert_eq!(dst.len(), size * row, "destination is not {size}x{size}x3");
    let (transpose, hflip, vflip) = (code & 1 != 0, code & 2 != 0, code & 4 != 0);
    for (y, out) in dst.chunks_exact_mut(row).enumerate() {
        // Row `y` of the flipped image is row `yy` of the transposed one ...
        let yy = if vflip { size - 1 - y } else { y };
        if !transpose {
            let line = &src[yy * row..(yy + 1) * row];
            if hflip {
                for (o, p) in out.chunks_exact_mut(3).zip(line.chunks_exact(3).rev()) {
                    o.copy_from_slice(p);
                }
            } else {
                out.copy_from_slice(line);
            }
        } else {
            // ... which is column `yy` of the source: out[x] = src[xx][yy].
            let col = &src[yy * 3..];
            for (x, o) in out.chunks_exact_mut(3).enumerate() {
                let xx = if hflip { size - 1 - x } else { x };
                o.copy_from_slice(&col[xx * row..xx * row + 3]);
            }
        }
    }
}

/// Reusable decode + resize state (decoded pixels, scratch, resizer buffers): one per
/// worker thread keeps the hot path free of large allocations.
#[derive(Default)]
pub struct ViewDecoder {
    rgb: Vec<u8>,
    raw: Vec<u8>,
    view: Vec<u8>,
    resizer: Resizer,
    width: usize,
    height: usize,
}

impl ViewDecoder {
    /// A decoder with empty buffers.
    pub fn new() -> Self {
        Self::default()
    }

    /// Frees every buffer larger than `bytes` (after a huge image, so that a long-lived
    /// per-thread decoder does not pin its memory).
    pub fn shrink_to(&mut self, bytes: usize) {
        for buf in [&mut self.rgb, &mut self.raw, &mut self.view] {
            if buf.capacity() > bytes {
                *buf = Vec::new();
            }
        }
        if self.rgb.is_empty() {
            (self.width, self.height) = (0, 0);
        }
        if self.resizer.size_of_internal_buffers() > bytes {
            self.resizer.reset_internal_buffers();
        }
    }

    /// The last decoded image: `(rgb, width, height)`.
    pub fn image(&self) -> (&[u8], usize, usize) {
        (
            &self.rgb[..self.width * self.height * 3],
            self.width,
            self.height,
        )
    }

    /// Decodes `data` (JPEG, PNG or WebP) to RGB8 into the internal buffer; see [`Self::image`].
    pub fn decode(&mut self, data: &[u8]) -> Result<ImageInfo> {
        let info = probe(data)?;
        let (w, h) = (info.width as usize, info.height as usize);
        let n = w * h * 3;
        if self.rgb.len() < n {
            self.rgb.resize(n, 0);
        }
        match info.format {
            ImageFormat::Jpeg => {
                let data = &data[..info.len];
                let got = libjpeg_turbo_rs::decompress_into(data, PixelFormat::Rgb, &mut self.rgb)
                    .map_err(|e| corrupt(format!("JPEG decode failed: {e}")))?;
                if (got.width, got.height) != (w, h) {
                    return Err(corrupt(format!(
                        "JPEG decoded to {}x{} but its header says {w}x{h}",
                        got.width, got.height
                    )));
                }
            }
            ImageFormat::Png => self.decode_png(data, w, h)?,
            ImageFormat::WebP => self.decode_webp(&data[..info.len], w, h)?,
        }
        (self.width, self.height) = (w, h);
        Ok(info)
    }

    fn decode_webp(&mut self, data: &[u8], w: usize, h: usize) -> Result<()> {
        use image::ImageDecoder;
        let err = |e: image::ImageError| corrupt(format!("WebP decode failed: {e}"));
        let mut decoder = image::codecs::webp::WebPDecoder::new(Cursor::new(data)).map_err(err)?;
        let mut limits = image::Limits::default();
        limits.max_alloc = Some(MAX_PIXELS * 4 + (1 << 20));
        decoder.set_limits(limits).map_err(err)?;
        let (cw, ch) = decoder.dimensions();
        if (cw as usize, ch as usize) != (w, h) {
            return Err(corrupt("WebP header changed between probe and decode"));
        }
        let channels = match decoder.color_type() {
            image::ColorType::Rgb8 => 3,
            image::ColorType::Rgba8 => 4,
            c => return Err(corrupt(format!("unsupported WebP: colour type {c:?}"))),
        };
        if channels == 3 {
            return decoder.read_image(&mut self.rgb[..w * h * 3]).map_err(err);
        }
        let n = w * h * 4;
        if self.raw.len() < n {
            self.raw.resize(n, 0);
        }
        decoder.read_image(&mut self.raw[..n]).map_err(err)?;
        for (o, p) in self.rgb[..w * h * 3]
            .chunks_exact_mut(3)
            .zip(self.raw[..n].chunks_exact(4))
        {
            o.copy_from_slice(&p[..3]);
        }
        Ok(())
    }

    fn decode_png(&mut self, data: &[u8], w: usize, h: usize) -> Result<()> {
        let err = |e: png::DecodingError| corrupt(format!("PNG decode failed: {e}"));
        let mut decoder = png::Decoder::new(Cursor::new(data));
        decoder.set_transformations(png::Transformations::IDENTITY);
        decoder.set_limits(png::Limits {
            bytes: (MAX_PIXELS as usize) * 4 + (1 << 20),
        });
        let mut reader = decoder.read_info().map_err(err)?;
        let (cw, ch) = reader.info().size();
        let (colour, depth) = reader.output_color_type();
        if (cw as usize, ch as usize) != (w, h) || depth != png::BitDepth::Eight {
            return Err(corrupt("PNG header changed between probe and decode"));
        }
        let channels = match colour {
            png::ColorType::Grayscale => 1,
            png::ColorType::GrayscaleAlpha => 2,
            png::ColorType::Rgb => 3,
            png::ColorType::Rgba => 4,
            png::ColorType::Indexed => return Err(corrupt("unsupported PNG: palette")),
        };
        let rgb = &mut self.rgb[..w * h * 3];
        if channels == 3 {
            reader.next_frame(rgb).map_err(err)?;
            return Ok(());
        }
        let n = w * h * channels;
        if self.raw.len() < n {
            self.raw.resize(n, 0);
        }
        let raw = &mut self.raw[..n];
        reader.next_frame(raw).map_err(err)?;
        for (o, p) in rgb.chunks_exact_mut(3).zip(raw.chunks_exact(channels)) {
            if channels <= 2 {
                o.fill(p[0]);
            } else {
                o.copy_from_slice(&p[..3]);
            }
        }
        Ok(())
    }

    /// Decodes `data` once and writes every view of every group into `out[g]`
    /// (`views * S * S * 3` bytes each, views in order, HWC RGB8).
    ///
    /// The boxes are checked against the image size before decoding. Bad image data gives
    /// [`CoreError::Corrupt`]; bad groups, boxes or buffers [`CoreError::InvalidArgument`].
    /// On error `out` may be partly written.
    pub fn decode_into(
        &mut self,
        data: &[u8],
        groups: &[ViewGroup<'_>],
        out: &mut [&mut [u8]],
    ) -> Result<()> {
        check_groups(groups)?;
        if out.len() != groups.len() {
            return Err(invalid(format!(
                "{} view groups but {} output buffers",
                groups.len(),
                out.len()
            )));
        }
        for (g, (grp, o)) in groups.iter().zip(out.iter()).enumerate() {
            if o.len() != grp.out_len() {
                return Err(invalid(format!(
                    "view group {g}: output buffer of {} bytes, expected {}",
                    o.len(),
                    grp.out_len()
                )));
            }
        }
        let info = probe(data)?;
        let boxes = groups
            .iter()
            .map(|g| {
                g.boxes
                    .iter()
                    .map(|&b| clamp_box(b, info.width, info.height))
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<Vec<_>>>()?;
        self.decode(data)?;
        for ((grp, bx), o) in groups.iter().zip(&boxes).zip(out.iter_mut()) {
            let s = grp.size;
            if grp.boxes.is_empty() {
                continue;
            }
            for ((b, &code), dst) in bx.iter().zip(grp.d4).zip(o.chunks_exact_mut(s * s * 3)) {
                self.view_into(*b, s, code, dst)?;
            }
        }
        Ok(())
    }

    /// Resizes box `b` (already clamped) of the decoded image to `s x s`, applies `code`.
    fn view_into(&mut self, b: [f64; 4], s: usize, code: u8, dst: &mut [u8]) -> Result<()> {
        let (w, h) = (self.width, self.height);
        let src = ImageRef::new(w as u32, h as u32, &self.rgb[..w * h * 3], PixelType::U8x3)
            .map_err(|e| invalid(format!("resize source: {e}")))?;
        let options = ResizeOptions::new()
            .resize_alg(ResizeAlg::Convolution(FilterType::Bilinear))
            .crop(b[0], b[1], b[2], b[3]);
        let side = u32::try_from(s).map_err(|_| invalid(format!("output size {s} too large")))?;
        let target: &mut [u8] = if code == 0 {
            dst
        } else {
            if self.view.len() < s * s * 3 {
                self.view.resize(s * s * 3, 0);
            }
            &mut self.view[..s * s * 3]
        };
        let mut img = Image::from_slice_u8(side, side, target, PixelType::U8x3)
            .map_err(|e| invalid(format!("resize target: {e}")))?;
        self.resizer
            .resize(&src, &mut img, &options)
            .map_err(|e| invalid(format!("resize failed: {e}")))?;
        if code != 0 {
            apply_d4(&self.view[..s * s * 3], s, code, dst);
        }
        Ok(())
    }
}

/// Decodes `data` once and returns, per group, its views as one `views * S * S * 3` buffer
/// (HWC RGB8, views in order). See [`ViewDecoder::decode_into`], which reuses buffers.
pub fn decode_views(data: &[u8], groups: &[ViewGroup<'_>]) -> Result<Vec<Vec<u8>>> {
    check_groups(groups)?;
    let mut out: Vec<Vec<u8>> = groups.iter().map(|g| vec![0u8; g.out_len()]).collect();
    let mut slices: Vec<&mut [u8]> = out.iter_mut().map(|v| v.as_mut_slice()).collect();
    ViewDecoder::new().decode_into(data, groups, &mut slices)?;
    Ok(out)
}

/// [`image_info`] for a batch, in parallel on rayon's current pool; one outcome per image.
pub fn image_infos(data: &[&[u8]]) -> Vec<Result<(u32, u32)>> {
    data.par_iter()
        .with_min_len(16)
        .map(|d| image_info(d))
        .collect()
}

/// Per-thread decode buffers above this size are freed after use (a 2048 x 2048 RGB image
/// fits; a whole-slide-sized one is not kept alive in every pool thread).
pub const KEEP_DECODER_BYTES: usize = 16 << 20;

thread_local! {
    /// Per pool thread: decoded pixels, scratch and resizer buffers, reused across calls.
    static DECODER: RefCell<ViewDecoder> = RefCell::new(ViewDecoder::new());
}

/// One group of views for a whole batch: `views` boxes and D4 codes per image, image-major
/// (`boxes[i * views + v]`), every view `size x size`.
#[derive(Clone, Copy, Debug)]
pub struct BatchGroup<'a> {
    /// `N * views` source boxes `[x0, y0, w, h]`.
    pub boxes: &'a [[f32; 4]],
    /// `N * views` D4 codes.
    pub d4: &'a [u8],
    /// Views per image.
    pub views: usize,
    /// Output side of every view (> 0).
    pub size: usize,
}

impl BatchGroup<'_> {
    /// Output bytes per image: `views * size * size * 3`.
    pub fn image_len(&self) -> usize {
        self.views * self.size * self.size * 3
    }

    fn of_image(&self, i: usize) -> ViewGroup<'_> {
        let v = self.views;
        ViewGroup {
            boxes: &self.boxes[i * v..(i + 1) * v],
            d4: &self.d4[i * v..(i + 1) * v],
            size: self.size,
        }
    }
}

/// Decodes every image of a batch once, in parallel on rayon's current pool (one reusable
/// [`ViewDecoder`] per pool thread), and writes group `g`'s views of image `i` into
/// `outs[g][i * groups[g].image_len()..]`, i.e. each `outs[g]` is an `(N, V_g, S_g, S_g, 3)`
/// buffer. Returns one outcome per image; a failed image's views are zeros. Inconsistent
/// groups or buffers are an error of the whole call, found before anything is decoded.
pub fn decode_views_batch(
    data: &[&[u8]],
    groups: &[BatchGroup<'_>],
    outs: &mut [&mut [u8]],
) -> Result<Vec<Result<()>>> {
    let n = data.len();
    if outs.len() != groups.len() {
        return Err(invalid(format!(
            "{} view groups but {} output buffers",
            groups.len(),
            outs.len()
        )));
    }
    for (g, (grp, out)) in groups.iter().zip(outs.iter()).enumerate() {
        if grp.boxes.len() != n * grp.views || grp.d4.len() != n * grp.views {
            return Err(invalid(format!(
                "view group {g}: {} boxes and {} D4 codes for {n} images of {} views",
                grp.boxes.len(),
                grp.d4.len(),
                grp.views
            )));
        }
        if out.len() != n * grp.image_len() {
            return Err(invalid(format!(
                "view group {g}: output buffer of {} bytes, expected {}",
                out.len(),
                n * grp.image_len()
            )));
        }
    }
    let whole: Vec<ViewGroup<'_>> = groups
        .iter()
        .map(|g| ViewGroup {
            boxes: g.boxes,
            d4: g.d4,
            size: g.size,
        })
        .collect();
    check_groups(&whole)?;
    // Per image, its slice of every group's buffer.
    let mut per_image: Vec<Vec<&mut [u8]>> =
        (0..n).map(|_| Vec::with_capacity(groups.len())).collect();
    for (grp, out) in groups.iter().zip(outs.iter_mut()) {
        let stride = grp.image_len();
        if stride == 0 {
            per_image.iter_mut().for_each(|p| p.push(&mut []));
        } else {
            for (p, chunk) in per_image.iter_mut().zip(out.chunks_exact_mut(stride)) {
                p.push(chunk);
            }
        }
    }
    Ok(per_image
        .par_iter_mut()
        .zip(data.par_iter())
        .enumerate()
        .map(|(i, (out, bytes))| {
            let image_groups: Vec<ViewGroup<'_>> = groups.iter().map(|g| g.of_image(i)).collect();
            let r = DECODER.with(|d| {
                let mut d = d.borrow_mut();
                let r = d.decode_into(bytes, &image_groups, out);
                d.shrink_to(KEEP_DECODER_BYTES);
                r
            });
            if r.is_err() {
                out.iter_mut().for_each(|o| o.fill(0));
            }
            r
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jpeg::{decode_rgb, encode_rgb};
    use libjpeg_turbo_rs::Subsampling;

    /// Real H&E pixels: the 48x48 OpenSlide crop `cmu_3.rgb` of the test data, mirror-tiled
    /// to `w x h` (reflection keeps the texture continuous).
    fn real_patch(w: usize, h: usize) -> Vec<u8> {
        const SIDE: usize = 48;
        let raw =
            std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/cmu_3.rgb")).unwrap();
        assert_eq!(raw.len(), SIDE * SIDE * 3);
        let fold = |v: usize| {
            let m = v % (2 * SIDE);
            if m < SIDE {
                m
            } else {
                2 * SIDE - 1 - m
            }
        };
        let mut out = Vec::with_capacity(w * h * 3);
        for y in 0..h {
            for x in 0..w {
                let i = (fold(y) * SIDE + fold(x)) * 3;
                out.extend_from_slice(&raw[i..i + 3]);
            }
        }
        out
    }

    fn png_bytes(pixels: &[u8], w: u32, h: u32, colour: png::ColorType) -> Vec<u8> {
        let mut out = Vec::new();
        let mut enc = png::Encoder::new(&mut out, w, h);
        enc.set_color(colour);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc.write_header().unwrap();
        writer.write_image_data(pixels).unwrap();
        writer.finish().unwrap();
        out
    }

    fn reason(r: Result<(u32, u32)>) -> String {
        match r {
            Err(CoreError::Corrupt(m)) => m,
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }

    /// `(S, S, 3)` index helpers for building expected D4 results by hand.
    fn px(img: &[u8], s: usize, y: usize, x: usize) -> [u8; 3] {
        let i = (y * s + x) * 3;
        [img[i], img[i + 1], img[i + 2]]
    }

    #[test]
    fn info_of_valid_jpeg_and_png() {
        let img = real_patch(40, 24);
        let jpeg = encode_rgb(&img, 40, 24, 90).unwrap();
        assert_eq!(image_info(&jpeg).unwrap(), (40, 24));
        // Trailing zero padding after EOI is fine.
        let padded = [&jpeg[..], &[0u8; 7]].concat();
        assert_eq!(image_info(&padded).unwrap(), (40, 24));
        let gray: Vec<u8> = img.chunks(3).map(|p| p[1]).collect();
        let gjpeg = libjpeg_turbo_rs::compress(
            &gray,
            40,
            24,
            PixelFormat::Grayscale,
            90,
            Subsampling::S444,
        )
        .unwrap();
        assert_eq!(image_info(&gjpeg).unwrap(), (40, 24));
        for (colour, c) in [
            (png::ColorType::Rgb, 3),
            (png::ColorType::Rgba, 4),
            (png::ColorType::Grayscale, 1),
            (png::ColorType::GrayscaleAlpha, 2),
        ] {
            let px = vec![9u8; 40 * 24 * c];
            assert_eq!(
                image_info(&png_bytes(&px, 40, 24, colour)).unwrap(),
                (40, 24)
            );
        }
    }

    #[test]
    fn info_rejects_corrupt_and_truncated_data() {
        let img = real_patch(32, 32);
        let jpeg = encode_rgb(&img, 32, 32, 90).unwrap();
        assert_eq!(reason(image_info(&[])), "empty image data");
        assert_eq!(reason(image_info(b"GIF89a....")), NOT_AN_IMAGE);
        assert_eq!(
            reason(image_info(&jpeg[..jpeg.len() - 1])),
            "truncated JPEG: no EOI marker"
        );
        assert_eq!(
            reason(image_info(&jpeg[..jpeg.len() / 2])),
            "truncated JPEG: no EOI marker"
        );
        assert!(reason(image_info(&jpeg[..30])).starts_with("truncated JPEG"));
        assert!(reason(image_info(&jpeg[..2])).starts_with("truncated JPEG"));
        // Garbage after the EOI (not zero padding) is not accepted.
        let tail = [&jpeg[..], &[1u8, 2, 3]].concat();
        assert_eq!(reason(image_info(&tail)), "truncated JPEG: no EOI marker");
        // A zero-height frame and a 4-component frame.
        let sof = jpeg.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap();
        let mut zero = jpeg.clone();
        zero[sof + 5] = 0;
        zero[sof + 6] = 0;
        assert!(reason(image_info(&zero)).contains("empty frame"));
        let mut cmyk = jpeg.clone();
        cmyk[sof + 9] = 4;
        assert!(reason(image_info(&cmyk)).contains("4 components"));

        let png = png_bytes(&img, 32, 32, png::ColorType::Rgb);
        assert_eq!(
            reason(image_info(&png[..png.len() - 4])),
            "truncated PNG: no IEND chunk at the end"
        );
        assert_eq!(reason(image_info(&png[..20])), "truncated PNG: no IHDR");
        let png16 = {
            let mut enc_out = Vec::new();
            let mut enc = png::Encoder::new(&mut enc_out, 2, 2);
            enc.set_color(png::ColorType::Rgb);
            enc.set_depth(png::BitDepth::Sixteen);
            let mut w = enc.write_header().unwrap();
            w.write_image_data(&[0u8; 24]).unwrap();
            w.finish().unwrap();
            enc_out
        };
        assert!(reason(image_info(&png16)).contains("bit depth 16"));
        // Decoding reports the same failures as Corrupt.
        let groups = [ViewGroup {
            boxes: &[[0.0, 0.0, 8.0, 8.0]],
            d4: &[0],
            size: 8,
        }];
        for bad in [&jpeg[..jpeg.len() - 2], &png[..png.len() - 1], b"", b"xx"] {
            assert!(matches!(
                decode_views(bad, &groups),
                Err(CoreError::Corrupt(_))
            ));
        }
        // Corrupt entropy data with intact markers fails in the decoder, not in probe.
        let mut scrambled = jpeg.clone();
        let sos = scrambled
            .windows(2)
            .position(|w| w == [0xFF, 0xDA])
            .unwrap();
        let n = scrambled.len();
        for b in &mut scrambled[sos + 14..n - 2] {
            *b = 0xFF;
        }
        assert!(image_info(&scrambled).is_ok());
        if let Err(e) = decode_views(&scrambled, &groups) {
            assert!(matches!(e, CoreError::Corrupt(_)), "{e}");
        }
    }

    #[test]
    fn decode_matches_reference_decoders() {
        let img = real_patch(48, 40);
        let jpeg = encode_rgb(&img, 48, 40, 85).unwrap();
        let mut dec = ViewDecoder::new();
        dec.decode(&jpeg).unwrap();
        let (rgb, w, h) = dec.image();
        assert_eq!((w, h), (48, 40));
        assert_eq!(rgb, decode_rgb(&jpeg).unwrap().0.as_slice());
        // Buffers are reused: a smaller image after a larger one.
        let small = encode_rgb(&img[..48 * 8 * 3], 48, 8, 85).unwrap();
        dec.decode(&small).unwrap();
        assert_eq!(dec.image().0, decode_rgb(&small).unwrap().0.as_slice());
        // PNG: RGB exact, alpha dropped, gray expanded.
        dec.decode(&png_bytes(&img, 48, 40, png::ColorType::Rgb))
            .unwrap();
        assert_eq!(dec.image().0, img.as_slice());
        let rgba: Vec<u8> = img.chunks(3).flat_map(|p| [p[0], p[1], p[2], 7]).collect();
        dec.decode(&png_bytes(&rgba, 48, 40, png::ColorType::Rgba))
            .unwrap();
        assert_eq!(dec.image().0, img.as_slice());
        let gray: Vec<u8> = img.chunks(3).map(|p| p[0]).collect();
        let ga: Vec<u8> = gray.iter().flat_map(|&g| [g, 1]).collect();
        let expanded: Vec<u8> = gray.iter().flat_map(|&g| [g; 3]).collect();
        dec.decode(&png_bytes(&gray, 48, 40, png::ColorType::Grayscale))
            .unwrap();
        assert_eq!(dec.image().0, expanded.as_slice());
        dec.decode(&png_bytes(&ga, 48, 40, png::ColorType::GrayscaleAlpha))
            .unwrap();
        assert_eq!(dec.image().0, expanded.as_slice());
    }

    /// Lossless WebP of `pixels` (RGB8 or RGBA8) with the `image` crate's encoder; with an
    /// ICC profile the file is an extended (`VP8X`) one.
    fn webp_bytes(pixels: &[u8], w: u32, h: u32, alpha: bool, icc: bool) -> Vec<u8> {
        use image::ImageEncoder;
        let mut out = Vec::new();
        let mut enc = image::codecs::webp::WebPEncoder::new_lossless(&mut out);
        if icc {
            enc.set_icc_profile(vec![0u8; 128]).unwrap();
        }
        let colour = if alpha {
            image::ExtendedColorType::Rgba8
        } else {
            image::ExtendedColorType::Rgb8
        };
        enc.write_image(pixels, w, h, colour).unwrap();
        out
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

    #[test]
    fn webp_lossless_decodes_exactly() {
        let img = real_patch(48, 40);
        // The shard writer's encoder (plain VP8L) ...
        let webp = crate::encode::encode(&img, 48, 40, crate::encode::Format::WebP, 90).unwrap();
        assert_eq!(&webp[12..16], b"VP8L");
        assert_eq!(image_info(&webp).unwrap(), (48, 40));
        // ... trailing zero padding is fine, like after a JPEG EOI.
        let padded = [&webp[..], &[0u8; 3]].concat();
        assert_eq!(probe(&padded).unwrap().len, webp.len());
        let mut dec = ViewDecoder::new();
        dec.decode(&padded).unwrap();
        assert_eq!(dec.image(), (img.as_slice(), 48, 40));
        // Alpha is dropped; an extended (VP8X) file reads the same.
        let rgba: Vec<u8> = img.chunks(3).flat_map(|p| [p[0], p[1], p[2], 9]).collect();
        for (alpha, icc) in [(true, false), (false, true), (true, true)] {
            let px = if alpha { &rgba } else { &img };
            let data = webp_bytes(px, 48, 40, alpha, icc);
            assert_eq!(&data[12..16], if icc { b"VP8X" } else { b"VP8L" });
            assert_eq!(image_info(&data).unwrap(), (48, 40));
            dec.decode(&data).unwrap();
            assert_eq!(dec.image().0, img.as_slice(), "alpha {alpha}, icc {icc}");
        }
        // Whole views through decode_views: the native-size box is the image.
        let groups = [ViewGroup {
            boxes: &[[0.0, 0.0, 48.0, 40.0]],
            d4: &[0],
            size: 40,
        }];
        let out = decode_views(&webp, &groups).unwrap();
        let square = decode_views(&png_bytes(&img, 48, 40, png::ColorType::Rgb), &groups).unwrap();
        assert_eq!(out, square);
    }

    #[test]
    fn webp_lossy_decodes_close_to_the_source() {
        // cmu_3 (48x48) saved by PIL/libwebp at quality 90 (lossy VP8), and libwebp's own
        // decode of it (PIL `Image.open(...).convert("RGB")`).
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/");
        let webp = std::fs::read(format!("{dir}cmu_3_q90.webp")).unwrap();
        let libwebp = std::fs::read(format!("{dir}cmu_3_q90_libwebp.rgb")).unwrap();
        let src = real_patch(48, 48);
        assert_eq!(&webp[12..16], b"VP8 ");
        assert_eq!(image_info(&webp).unwrap(), (48, 48));
        let mut dec = ViewDecoder::new();
        dec.decode(&webp).unwrap();
        let (rgb, w, h) = dec.image();
        assert_eq!((w, h), (48, 48));
        // Within the codec's loss of the source (27.2 dB for libwebp on this textured patch) ...
        assert!(psnr(rgb, &src) > 26.0, "psnr {}", psnr(rgb, &src));
        // ... and exactly the pixels of libwebp (fancy chroma upsampling).
        assert!(
            rgb == libwebp.as_slice(),
            "WebP decode differs from libwebp's"
        );
    }

    #[test]
    fn webp_corrupt_and_truncated_data_is_rejected() {
        let img = real_patch(32, 32);
        let webp = crate::encode::encode(&img, 32, 32, crate::encode::Format::WebP, 90).unwrap();
        assert!(reason(image_info(&webp[..webp.len() - 1])).starts_with("truncated WebP"));
        assert!(reason(image_info(&webp[..webp.len() / 2])).starts_with("truncated WebP"));
        assert!(reason(image_info(&webp[..12])).starts_with("truncated WebP"));
        let mut tiny = webp[..12].to_vec();
        tiny[4..8].copy_from_slice(&4u32.to_le_bytes());
        assert!(reason(image_info(&tiny)).contains("RIFF size 4"));
        let tail = [&webp[..], &[1u8, 2]].concat();
        assert!(reason(image_info(&tail)).contains("data after the RIFF chunk"));
        let mut sig = webp.clone();
        sig[20] = 0x00; // VP8L signature byte
        assert!(reason(image_info(&sig)).contains("bad VP8L header"));
        let mut chunk = webp.clone();
        chunk[12..16].copy_from_slice(b"ABCD");
        assert!(reason(image_info(&chunk)).contains("unexpected first chunk"));
        let mut anim = webp_bytes(&img, 32, 32, false, true);
        anim[20] |= 0x02; // VP8X animation flag
        assert_eq!(reason(image_info(&anim)), "unsupported WebP: animation");
        // Decoding reports the same failures, and broken bitstreams, as Corrupt.
        let groups = [ViewGroup {
            boxes: &[[0.0, 0.0, 8.0, 8.0]],
            d4: &[0],
            size: 8,
        }];
        let mut scrambled = webp.clone();
        let n = scrambled.len();
        for b in &mut scrambled[25..n] {
            *b = 0xFF;
        }
        assert!(image_info(&scrambled).is_ok());
        for bad in [&webp[..webp.len() - 2], &sig[..], &anim[..], &scrambled[..]] {
            assert!(matches!(
                decode_views(bad, &groups),
                Err(CoreError::Corrupt(_))
            ));
        }
    }

    #[test]
    fn full_box_at_native_size_is_the_image() {
        let img = real_patch(64, 64);
        let png = png_bytes(&img, 64, 64, png::ColorType::Rgb);
        let groups = [ViewGroup {
            boxes: &[[0.0, 0.0, 64.0, 64.0], [16.0, 8.0, 32.0, 32.0]],
            d4: &[0, 0],
            size: 64,
        }];
        let out = decode_views(&png, &groups).unwrap();
        assert_eq!(&out[0][..64 * 64 * 3], img.as_slice());
        // 2x upscale of the 32x32 box at (16, 8) with PIL's bilinear: output (1, 1) centres on
        // source (x, y) = (16.75, 8.75), i.e. weights 0.75 / 0.25 on pixels 16, 17 and 8, 9.
        let up = &out[0][64 * 64 * 3..];
        let p = |y: usize, x: usize, c: usize| f64::from(img[(y * 64 + x) * 3 + c]);
        for c in 0..3 {
            let v = 0.5625 * p(8, 16, c)
                + 0.1875 * p(8, 17, c)
                + 0.1875 * p(9, 16, c)
                + 0.0625 * p(9, 17, c);
            let got = f64::from(up[(64 + 1) * 3 + c]);
            assert!((got - v).abs() <= 1.0, "{got} vs {v}");
        }
        // A constant image stays constant through any box.
        let flat = vec![123u8; 50 * 30 * 3];
        let png = png_bytes(&flat, 50, 30, png::ColorType::Rgb);
        let groups = [ViewGroup {
            boxes: &[[3.3, 1.7, 40.2, 20.9], [0.0, 0.0, 50.0, 30.0]],
            d4: &[5, 3],
            size: 17,
        }];
        let out = decode_views(&png, &groups).unwrap();
        assert!(out[0].iter().all(|&v| v == 123));
    }

    #[test]
    fn d4_codes_match_hand_built_arrays() {
        // 3x3 image whose pixel (y, x) is [y, x, 10 * y + x].
        let s = 3;
        let src: Vec<u8> = (0..s * s)
            .flat_map(|i| [(i / s) as u8, (i % s) as u8, (10 * (i / s) + i % s) as u8])
            .collect();
        // Expected source (y, x) for each output (y, x), built from the definition.
        let expected = |code: u8, y: usize, x: usize| -> (usize, usize) {
            let (t, hf, vf) = (code & 1 != 0, code & 2 != 0, code & 4 != 0);
            let y = if vf { s - 1 - y } else { y };
            let x = if hf { s - 1 - x } else { x };
            if t {
                (x, y)
            } else {
                (y, x)
            }
        };
        let mut dst = vec![0u8; s * s * 3];
        for code in 0..8u8 {
            apply_d4(&src, s, code, &mut dst);
            for y in 0..s {
                for x in 0..s {
                    let (sy, sx) = expected(code, y, x);
                    assert_eq!(px(&dst, s, y, x), px(&src, s, sy, sx), "code {code}");
                }
            }
        }
        // Hand-written: transpose then hflip is a 90-degree clockwise rotation.
        apply_d4(&src, s, 3, &mut dst);
        let gray: Vec<u8> = dst.chunks(3).map(|p| p[2]).collect();
        assert_eq!(gray, vec![20, 10, 0, 21, 11, 1, 22, 12, 2]);
        // vflip alone.
        apply_d4(&src, s, 4, &mut dst);
        let gray: Vec<u8> = dst.chunks(3).map(|p| p[2]).collect();
        assert_eq!(gray, vec![20, 21, 22, 10, 11, 12, 0, 1, 2]);
        // hflip alone.
        apply_d4(&src, s, 2, &mut dst);
        let gray: Vec<u8> = dst.chunks(3).map(|p| p[2]).collect();
        assert_eq!(gray, vec![2, 1, 0, 12, 11, 10, 22, 21, 20]);
        // All three: transpose, hflip, vflip = anti-transpose.
        apply_d4(&src, s, 7, &mut dst);
        let gray: Vec<u8> = dst.chunks(3).map(|p| p[2]).collect();
        assert_eq!(gray, vec![22, 12, 2, 21, 11, 1, 20, 10, 0]);
    }

    #[test]
    fn views_apply_d4_after_resizing() {
        let img = real_patch(96, 80);
        let jpeg = encode_rgb(&img, 96, 80, 90).unwrap();
        let b = [5.5f32, 3.25, 70.0, 61.5];
        let plain = decode_views(
            &jpeg,
            &[ViewGroup {
                boxes: &[b],
                d4: &[0],
                size: 24,
            }],
        )
        .unwrap();
        let codes: Vec<u8> = (0..8).collect();
        let boxes = vec![b; 8];
        let small = [ViewGroup {
            boxes: &boxes[..2],
            d4: &codes[..2],
            size: 24,
        }];
        let all = [
            ViewGroup {
                boxes: &boxes,
                d4: &codes,
                size: 24,
            },
            ViewGroup {
                boxes: &[],
                d4: &[],
                size: 5,
            },
        ];
        let out = decode_views(&jpeg, &all).unwrap();
        assert!(out[1].is_empty());
        let n = 24 * 24 * 3;
        let mut expected = vec![0u8; n];
        for code in 0..8u8 {
            apply_d4(&plain[0], 24, code, &mut expected);
            let c = usize::from(code);
            assert_eq!(&out[0][c * n..(c + 1) * n], expected.as_slice());
        }
        assert_eq!(decode_views(&jpeg, &small).unwrap()[0], out[0][..2 * n]);
    }

    #[test]
    fn boxes_are_validated_and_clamped() {
        assert_eq!(
            clamp_box([0.0, 0.0, 256.0, 256.0], 256, 256).unwrap(),
            [0.0, 0.0, 256.0, 256.0]
        );
        // Rounding slop is clamped away.
        let c = clamp_box([-0.0004, 10.0, 256.0005, 246.0009], 256, 256).unwrap();
        assert_eq!(c[0], 0.0);
        assert!(c[2] <= 256.0 && c[2] > 255.99);
        assert!(c[1] + c[3] <= 256.0);
        for bad in [
            [-0.01, 0.0, 10.0, 10.0],
            [0.0, -1.0, 10.0, 10.0],
            [250.0, 0.0, 6.1, 10.0],
            [0.0, 200.0, 10.0, 56.5],
            [0.0, 0.0, 0.0, 10.0],
            [0.0, 0.0, 10.0, -1.0],
            [f32::NAN, 0.0, 10.0, 10.0],
            [0.0, 0.0, f32::INFINITY, 10.0],
            [256.0, 0.0, 1e-4, 1.0],
        ] {
            assert!(
                matches!(clamp_box(bad, 256, 256), Err(CoreError::InvalidArgument(_))),
                "{bad:?}"
            );
        }
        let img = real_patch(32, 32);
        let jpeg = encode_rgb(&img, 32, 32, 90).unwrap();
        let run = |boxes: &[[f32; 4]], d4: &[u8], size: usize| {
            decode_views(&jpeg, &[ViewGroup { boxes, d4, size }])
        };
        let inv = |r: Result<Vec<Vec<u8>>>| matches!(r, Err(CoreError::InvalidArgument(_)));
        assert!(inv(run(&[[0.0, 0.0, 33.0, 32.0]], &[0], 8)));
        assert!(inv(run(&[[0.0, 0.0, 32.0, 32.0]], &[8], 8)));
        assert!(inv(run(&[[0.0, 0.0, 32.0, 32.0]], &[0], 0)));
        assert!(inv(run(&[[0.0, 0.0, 32.0, 32.0]], &[0, 1], 8)));
        assert!(run(&[[0.0, 0.0, 32.0, 32.0]], &[1], 8).is_ok());
        // Wrong output buffers.
        let mut buf = [0u8; 10];
        let groups = [ViewGroup {
            boxes: &[[0.0, 0.0, 32.0, 32.0]],
            d4: &[0],
            size: 8,
        }];
        assert!(matches!(
            ViewDecoder::new().decode_into(&jpeg, &groups, &mut [&mut buf[..]]),
            Err(CoreError::InvalidArgument(_))
        ));
        assert!(matches!(
            ViewDecoder::new().decode_into(&jpeg, &groups, &mut []),
            Err(CoreError::InvalidArgument(_))
        ));
    }

    #[test]
    fn batch_decode_equals_one_image_at_a_time_and_zeroes_failures() {
        let rgb = real_patch(64, 48);
        let jpg = encode_rgb(&rgb, 64, 48, 90).unwrap();
        let mut bad = jpg.clone();
        bad.truncate(jpg.len() / 2);
        let data: Vec<&[u8]> = vec![&jpg, &bad, &jpg];
        // two groups: 2 views of 16 px, 1 view of 24 px per image
        let boxes_a: Vec<[f32; 4]> = (0..3)
            .flat_map(|i| [[0.0, 0.0, 32.0, 32.0], [10.5, 4.0, 40.0 - i as f32, 30.0]])
            .collect();
        let d4_a: Vec<u8> = vec![0, 5, 3, 1, 2, 7];
        let boxes_b: Vec<[f32; 4]> = vec![[1.0, 2.0, 60.0, 44.0]; 3];
        let d4_b: Vec<u8> = vec![6, 0, 4];
        let groups = [
            BatchGroup {
                boxes: &boxes_a,
                d4: &d4_a,
                views: 2,
                size: 16,
            },
            BatchGroup {
                boxes: &boxes_b,
                d4: &d4_b,
                views: 1,
                size: 24,
            },
        ];
        let mut a = vec![1u8; 3 * groups[0].image_len()];
        let mut b = vec![1u8; 3 * groups[1].image_len()];
        let res = {
            let mut outs: Vec<&mut [u8]> = vec![&mut a, &mut b];
            decode_views_batch(&data, &groups, &mut outs).unwrap()
        };
        assert!(res[0].is_ok() && res[2].is_ok());
        assert!(matches!(res[1], Err(CoreError::Corrupt(_))));
        for i in [0usize, 2] {
            let one = decode_views(&jpg, &[groups[0].of_image(i), groups[1].of_image(i)]).unwrap();
            let (la, lb) = (groups[0].image_len(), groups[1].image_len());
            assert_eq!(&a[i * la..(i + 1) * la], one[0].as_slice());
            assert_eq!(&b[i * lb..(i + 1) * lb], one[1].as_slice());
        }
        let (la, lb) = (groups[0].image_len(), groups[1].image_len());
        assert!(a[la..2 * la].iter().all(|&v| v == 0));
        assert!(b[lb..2 * lb].iter().all(|&v| v == 0));
        // inconsistent buffers: an error of the call, nothing decoded
        let mut short = vec![0u8; 10];
        let mut outs: Vec<&mut [u8]> = vec![&mut short, &mut b];
        assert!(decode_views_batch(&data, &groups, &mut outs).is_err());
    }

    #[test]
    fn batch_image_infos_keep_order() {
        let rgb = real_patch(40, 24);
        let jpg = encode_rgb(&rgb, 40, 24, 90).unwrap();
        let junk = b"not an image".to_vec();
        let data: Vec<&[u8]> = (0..40)
            .map(|i| if i % 7 == 3 { &junk[..] } else { &jpg[..] })
            .collect();
        let res = image_infos(&data);
        for (i, r) in res.iter().enumerate() {
            if i % 7 == 3 {
                assert!(r.is_err());
            } else {
                assert_eq!(r.as_ref().unwrap(), &(40, 24));
            }
        }
    }
}
