"""medlb: a load balancer for medical imaging.

The package is organised in rings (see docs/architecture.md): pure codecs and
domain models in the middle, I/O at the edge, the CLI and supervisor outside.
"""

__version__ = "0.1.0"
