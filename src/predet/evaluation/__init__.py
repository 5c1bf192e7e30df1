"""What a model is scored on: COCO/LVIS metrics and sharded inference, the pre-training's held-out
pretext signals, and prediction on image folders.
"""
