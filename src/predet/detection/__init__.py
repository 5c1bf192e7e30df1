"""Fine-tuning and evaluating torchvision detectors (Mask R-CNN, Faster R-CNN, RetinaNet)."""
