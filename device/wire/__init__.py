"""Everything that crosses the network: protobuf schema code, codecs, topics and transports.

Protobuf objects are touched only in this package (``codec`` and ``envelope``); the rest of the
code base works with the plain dataclasses defined here.
"""
