"""What a model is scored on: COCO/LVIS metrics (``coco``) and sharded inference
(``inference``), ``predet eval`` and the periodic evaluation hook (``evaluate``), pictures
(``visualize``), the pre-training's held-out pretext signals (``pretext``) and transfer probe
(``probe``), and prediction on image folders (``predict``).
"""
