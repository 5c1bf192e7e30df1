"""PreDet's pre-training model: the CRPN, the contrastive RoI head, the weak-label head and the
meta-architecture that joins them (``meta_arch.PreDet``).
"""
