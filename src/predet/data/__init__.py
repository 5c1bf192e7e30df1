"""Data: the one image decoder, the two-view sampler and its batches (``views``), weak-label data
from a labels file (``weak``) or WebDataset shards (``shards``) and which one a path names
(``build``), COCO/LVIS files (``coco_json``) and datasets (``coco``), the batch samplers both halves
use (``samplers``), Fashion-MNIST and the FashionDet benchmark."""
