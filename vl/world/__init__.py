"""The generated visual world: scenes of coloured shapes, their captions and questions, written in the standard
dataset formats (``dataset.py``), so that every command runs on it as on real data. Tests and ``vl demo`` use it."""
