"""PreDet: weakly supervised pre-training of object detectors, and the tooling around it."""

__version__ = "0.1.0"
