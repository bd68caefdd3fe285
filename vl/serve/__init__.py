"""The retrieval demo page served by ``vl serve`` (``vl.serve.app``)."""
