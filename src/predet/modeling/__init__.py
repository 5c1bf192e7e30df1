"""Networks: the backbone + FPN, the CPU RoI pooling, mixed-precision helpers, the torchvision
detectors fine-tuning builds, and PreDet's pre-training model (``modeling.predet``).
"""
