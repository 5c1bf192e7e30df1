"""Datasets: the FashionDet benchmark builder and the Fashion-MNIST loader."""
