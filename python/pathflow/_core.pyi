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
