"""``predet sweep``: grid search of fine-tuning settings x seeds, as the supplement does it
(``run.sweep``), over ``grid``, started by ``launch``, summarised by ``results``."""
