"""Type stubs of the Rust extension ``pathflow._core`` (checked against the build in tests)."""

import numpy as np
import numpy.typing as npt

__version__: str

U8Image = npt.NDArray[np.uint8]
Points = npt.NDArray[np.int64]
Regions = tuple[list[Points], list[list[Points]]]

def num_threads() -> int: ...
def set_num_threads(n: int) -> None: ...
def saturation(rgb: U8Image) -> U8Image: ...
def ink_mask(rgb: U8Image, grow: int = 0) -> U8Image: ...
def median_blur(img: U8Image, ksize: int) -> U8Image: ...
def otsu_threshold(img: U8Image) -> int: ...
def morph_close(img: U8Image, ksize: int) -> U8Image: ...
def binary_tissue(
    rgb: U8Image,
    sthresh: int = 8,
    mthresh: int = 7,
    close: int = 4,
    otsu: bool = False,
    remove_ink: bool = False,
) -> tuple[U8Image, int, U8Image | None]: ...
def downsample_area(img: U8Image, factor: int) -> U8Image: ...
def find_contours(binary: U8Image) -> list[tuple[Points, bool, int]]: ...
def contour_area(points: Points) -> float: ...
def point_polygon_test(points: Points, x: int, y: int) -> int: ...
def segment_contours(
    binary: U8Image, min_area: float, min_hole_area: float, max_holes: int = 8
) -> Regions: ...
def scale_regions(
    tissue: list[Points], holes: list[list[Points]], sx: float, sy: float
) -> Regions: ...
def rasterize(
    tissue: list[Points], holes: list[list[Points]], width: int, height: int
) -> U8Image: ...
def clam_grid(
    tissue: list[Points],
    holes: list[list[Points]],
    width: int,
    height: int,
    patch: int,
    step: int,
    use_padding: bool = True,
    contour_fn: str = "four_pt",
) -> Points: ...
def slide_grid(
    tissue: list[Points],
    holes: list[list[Points]],
    width: int,
    height: int,
    patch: int,
    step: int,
    use_padding: bool = False,
    contour_fn: str = "four_pt",
) -> Points: ...
def full_grid(
    width: int, height: int, patch: int, step: int, use_padding: bool = False
) -> Points: ...
def tissue_fractions(
    coords: Points, patch: int, mask: U8Image, sx: float, sy: float
) -> npt.NDArray[np.float32]: ...
def render_overlay(
    thumb: U8Image,
    coords: Points,
    side0: float,
    fx: float,
    fy: float,
    tissue: list[Points],
    holes: list[list[Points]],
    line_width: int = 1,
    quality: int = 85,
) -> bytes:
    """Overlay JPEG: patch cells blended on the RGB thumbnail, contours and holes drawn."""

def encode_gray_png(mask: U8Image) -> bytes:
    """8-bit grayscale PNG of an (H, W) uint8 mask (unfiltered, fast DEFLATE)."""

def sanitize_key(id: str, max_len: int = 60) -> str: ...
def encode_images(
    images: list[U8Image], out_size: int, format: str, quality: int
) -> list[bytes]: ...
def encode_regions(
    images: list[U8Image], out_size: int, sub_size: int, quality: int, format: str = "jpg"
) -> list[list[bytes]]: ...
def image_info(data: list[bytes]) -> tuple[npt.NDArray[np.int32], list[str | None]]:
    """(N, 2) array of (width, height), 0 where invalid; and per image None or the error reason.

    Structural JPEG/PNG/WebP check only (header, 8-bit, 1 or 3 JPEG components, EOI / IEND
    at the end, WebP RIFF chunk sizes; animated WebP refused); nothing is decoded.
    """

def decode_views(
    data: list[bytes],
    boxes: list[npt.NDArray[np.float32]],
    sizes: list[int],
    d4: list[npt.NDArray[np.uint8]],
) -> tuple[list[U8Image], npt.NDArray[np.bool_], list[str | None]]:
    """Decode each image once, cut its views: per group an (N, V_g, S_g, S_g, 3) uint8 array.

    ``boxes[g]`` is (N, V_g, 4) float32 ``(x0, y0, w, h)`` in source pixels, resized to
    ``sizes[g]`` square with PIL's antialiased bilinear; ``d4[g]`` is (N, V_g) codes 0..7
    (bit 0 transpose, then bit 1 horizontal flip, then bit 2 vertical flip). Returns the
    arrays, the ok mask (N,) and per image None or the reason it failed (its views are zeros).
    Bad image data never raises; mismatched shapes, size 0, codes > 7 and boxes outside the
    image raise InvalidArgumentError.
    """

RGBTriple = tuple[float, float, float]

def augment_views(
    crops: U8Image,
    stain: npt.NDArray[np.bool_],
    stain_mean: npt.NDArray[np.float32],
    stain_std: npt.NDArray[np.float32],
    hed: npt.NDArray[np.bool_],
    hed_matrix: npt.NDArray[np.float32],
    hed_offset: npt.NDArray[np.float32],
    color: npt.NDArray[np.bool_],
    color_matrix: npt.NDArray[np.float32],
    color_k: npt.NDArray[np.float32],
    blur_sigma: npt.NDArray[np.float32],
    solarize: npt.NDArray[np.bool_],
    mean: RGBTriple,
    std: RGBTriple,
    output: str,
) -> npt.NDArray[np.float32] | npt.NDArray[np.uint16] | U8Image:
    """One view's float stages for a batch, fused per sample: an (N, 3, S, S) array.

    ``crops`` is (N, S, S, 3) uint8 (e.g. ``decode_views(...)[g][:, j]``: each crop must be
    C-contiguous, the batch axis may be strided; other layouts are copied). The parameters
    are the :class:`pathflow.data.views.ViewParams` fields of the same names ((N,), (N, 3) or
    (N, 3, 3), float32 / bool). Stages as in :mod:`pathflow.data.augment_torch`: RandStainNA,
    HED, colour jitter, Gaussian blur, solarisation. ``output``: ``"float"`` -> float32
    ``(x - mean) / std``; ``"bfloat16"`` -> uint16 holding those values as bfloat16 bits
    (round to nearest even; view with ``torch.from_numpy(a).view(torch.bfloat16)``);
    ``"uint8"`` -> ``round_half_even(255 x)``, not normalised. Wrong shapes, a blur window
    wider than the view (``ceil(3 sigma) >= S``), a negative sigma, std 0 or an unknown
    output raise InvalidArgumentError.
    """

Outcomes = tuple[list[bytes | None], list[str | None]]

class ShardWriter:
    next_sample: int
    def __init__(
        self,
        dir: str,
        prefix: str,
        max_count: int,
        max_bytes: int,
        start_index: int = 0,
        start_sample: int = 0,
    ) -> None: ...
    def add_many(self, keys: list[str], files: list[list[tuple[str, bytes]]]) -> None: ...
    def finished(self) -> list[dict[str, int | str]]: ...
    def finish(self) -> list[dict[str, int | str]]: ...
    def abort(self) -> None: ...

class TiledLevel:
    size: tuple[int, int]
    tile_size: tuple[int, int]
    def __init__(
        self,
        path: str,
        width: int,
        height: int,
        tile_width: int,
        tile_height: int,
        offsets: npt.NDArray[np.uint64],
        counts: npt.NDArray[np.uint64],
        tables: bytes,
        rgb: bool,
    ) -> None: ...
    def read_region(self, x: int, y: int, w: int, h: int) -> U8Image: ...
    def patches(self, coords: Points, read_size: int, out_size: int, quality: int) -> Outcomes: ...
    def passthrough(self, coords: Points) -> Outcomes: ...
