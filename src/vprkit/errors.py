"""Errors that carry a message meant for the user: what went wrong, with which file, and what to do."""


class VPRKitError(Exception):
    """Base class; the CLI prints these without a traceback."""


class ImageReadError(VPRKitError):
    """An image could not be decoded (missing, truncated, not an image)."""


class ConfigError(VPRKitError):
    """An invalid preset or an invalid combination of options."""


class VocabularyMismatchError(VPRKitError):
    """A vocabulary was built for other descriptors (backbone, layer, facet, size or dimension)."""


class WeightsNotFoundError(VPRKitError):
    """Model weights are missing and cannot be downloaded here."""


class DatasetError(VPRKitError):
    """A dataset folder or ground-truth file is missing or malformed."""


class MapError(VPRKitError):
    """A map directory is missing, incomplete or inconsistent."""


class MapDamagedError(MapError):
    """A map's file is damaged or does not belong to it (another map's, another preset's, edited by hand)."""


class StorageFullError(MapError):
    """A write ran out of disk space (or quota): nothing of it was kept."""


class ReadOnlyMapError(MapError):
    """The map (or a folder it writes to) cannot be written: it is served or opened read-only."""


class StateNotPreparedError(MapError):
    """Work that needs saved state the map does not have (e.g. re-ranking patches): prepare it first."""
