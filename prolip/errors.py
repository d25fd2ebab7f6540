"""The exception hierarchy of prolip: every user-facing failure derives from ProLIPError.

Errors about a wrong value also subclass ValueError and errors about a wrong type TypeError, so
code that catches the built-in exceptions keeps working.
"""

from __future__ import annotations


class ProLIPError(Exception):
    """Base class of every error prolip raises on purpose."""


class InputError(ProLIPError, ValueError):
    """An argument has the wrong value: empty data, mismatched lengths, bad features, ..."""


class InputTypeError(ProLIPError, TypeError):
    """An argument has the wrong type: an unsupported image object, unhashable labels, ..."""


class NotFittedError(ProLIPError, ValueError, AttributeError):
    """The adapter is used before ``fit``, ``fit_features`` or ``ProLIPAdapter.load``."""


class ImageLoadError(InputError):
    """An image could not be read or decoded; the message names the path or index."""


class UnsupportedModelError(ProLIPError, TypeError):
    """The model's vision tower has no projector prolip knows how to train."""


class ModelLoadError(ProLIPError, ValueError):
    """A model name, pretrained tag or checkpoint could not be turned into an open_clip model."""


class DeltaFileError(ProLIPError, ValueError):
    """A delta file is unreadable, malformed, of an unknown format version, or cannot be written."""


class FingerprintMismatchError(DeltaFileError):
    """A delta file was made for a different base model than the one it is loaded onto."""


class TrainingDivergedError(ProLIPError, FloatingPointError):
    """The loss became NaN or infinite during training."""


class ProLIPWarning(UserWarning):
    """Base class of the warnings prolip issues on purpose."""


class SkippedImagesWarning(ProLIPWarning):
    """Some images were unreadable and left out (``on_error="skip"``): ``skipped`` lists them (index, item, reason),
    as an adapter's ``skipped_`` does after ``fit`` or ``extract_features``."""

    def __init__(self, message: str, skipped: tuple = ()) -> None:
        super().__init__(message)
        self.skipped = list(skipped)


class FeatureCacheError(ProLIPError, ValueError):
    """A feature cache file or folder cannot be written, or holds something it should not."""


class DamagedCacheEntryError(FeatureCacheError):
    """A feature cache entry failed its checks and was deleted; ``image_hash`` names the image to extract again."""

    def __init__(self, message: str, image_hash: str) -> None:
        super().__init__(message)
        self.image_hash = image_hash


class TrainingWarning(ProLIPWarning):
    """Training finished but looks wrong (e.g. the loss ended far above where it started)."""


class PrecisionWarning(ProLIPWarning):
    """A result was rounded to a low precision and lost part of what was trained."""


def warn(message: str | Warning, category: type[Warning] = ProLIPWarning) -> None:
    """Issue a warning (a message of ``category``, or a warning object) attributed to the first caller outside prolip,
    where the user can see the line."""
    import sys
    import warnings

    frame, level = sys._getframe(1), 2  # stacklevel 2 is warn's caller
    while frame is not None and frame.f_globals.get("__name__", "").startswith("prolip."):
        frame, level = frame.f_back, level + 1
    if isinstance(message, Warning):  # a warning object carries its own category (and data, e.g. skipped)
        warnings.warn(message, stacklevel=level)
    else:
        warnings.warn(message, category, stacklevel=level)
