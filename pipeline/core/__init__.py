"""The error family (one exception per kind of bad input or fault, each with its exit code),
masking of passwords in URLs and text, interrupts deferred while a store is written, and the
cores this process may use.

Imports nothing else of `pipeline`: every other subpackage may use it.
"""

from pipeline.core._cores import cpu_cores
from pipeline.core._errors import (
    ConfigError,
    DataError,
    ModelError,
    RegistryError,
    StudyFailedError,
    StudyStateError,
    SweepError,
    TrackingError,
    connection_refused,
    first_line,
)
from pipeline.core._interrupts import BEFORE_TRIALS, IN_REPORT, deferred_interrupts, install_early_handlers, left_behind
from pipeline.core._progress import ImagePass, image_pass, listening
from pipeline.core._secrets import mask_text, mask_url, urls_in

__all__ = [
    "ImagePass",
    "image_pass",
    "listening",
    "BEFORE_TRIALS",
    "IN_REPORT",
    "ConfigError",
    "DataError",
    "ModelError",
    "RegistryError",
    "StudyFailedError",
    "StudyStateError",
    "SweepError",
    "TrackingError",
    "connection_refused",
    "cpu_cores",
    "deferred_interrupts",
    "first_line",
    "install_early_handlers",
    "left_behind",
    "mask_text",
    "mask_url",
    "urls_in",
]
