"""``vl demo``: the whole pipeline on the generated world through the real commands (``pipeline.py``), its sizes
(``config.py``) and the report of held-out figures (``report.py``)."""
