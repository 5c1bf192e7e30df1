"""``predet sweep``: grid search of fine-tuning settings x seeds, as the supplement does it
(``run.sweep``), or successive halving over the grid (``halving``); the grid (``grid``), how runs
start (``launch``) and how they are summarised (``results``)."""
