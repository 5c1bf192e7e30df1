"""Weights on disk: atomic, code-free checkpoint files (``io``), foreign weight formats and name
maps (torchvision <-> Detectron2), transfer into a detector, and export.
"""
