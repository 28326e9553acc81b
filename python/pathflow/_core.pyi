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
def sanitize_key(id: str, max_len: int = 60) -> str: ...
def encode_images(
    images: list[U8Image], out_size: int, format: str, quality: int
) -> list[bytes]: ...
def encode_regions(
    images: list[U8Image], out_size: int, sub_size: int, quality: int, format: str = "jpg"
) -> list[list[bytes]]: ...

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
