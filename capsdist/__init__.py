"""capsdist: Matrix Capsule Networks with EM routing, trained at scale."""

__version__ = "0.1.0"
