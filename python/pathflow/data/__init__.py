"""Sample data for pathflow: real slides fetched with pip and cached locally.

Example:
    >>> from pathflow.data import list_samples, sample_cache_dir, sample_slide
    >>> "cmu-small" in list_samples()
    True
    >>> svs = sample_slide("cmu-small")  # doctest: +SKIP
"""

from __future__ import annotations

from pathflow.data.samples import list_samples, sample_cache_dir, sample_slide

__all__ = ["list_samples", "sample_cache_dir", "sample_slide"]
