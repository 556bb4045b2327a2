"""SparseFleet device side: everything a device runs, and the code both sides share.

This package must stay installable on a Raspberry Pi: it imports only torch, numpy, protobuf,
paho-mqtt and pyyaml. It never imports ``fleet``.
"""

__version__ = "0.1.0"
