"""The tests' Hub on 127.0.0.1: ``merging.hub.loopback`` (in the library, so that ``python -m merging bench --hub``
serves from the same server without importing tests/), under the name the tests know it by."""

from merging.hub.link import LinkShape
from merging.hub.loopback import LoopbackHub as FakeHub

__all__ = ["FakeHub", "LinkShape"]
