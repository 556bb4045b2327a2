"""The running fleet manager: the round loop, aggregation workers, presence, run control.

May import ``fleet.strategies``, ``fleet.state`` and ``fleet.ops``; never ``sim``, ``report``
or ``cli``.
"""
