"""Operations around the fleet: certificates, enrolment, the local broker, the device
registry and the rollout health check.

May import ``fleet.state`` (the registry's records); never ``runtime``, ``sim``, ``report`` or
``cli``.
"""
