"""Many jobs on one shared job folder: partitions (``--part``), claims, per-part manifests,
merge and status.

Example:
    >>> from pathflow.jobs.partition import parse_part
    >>> parse_part("0/2")
    (0, 2)
"""
