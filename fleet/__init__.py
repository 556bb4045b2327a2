"""SparseFleet fleet manager (server side). May import ``device``; never the other way round."""

from device import __version__

__all__ = ["__version__"]
