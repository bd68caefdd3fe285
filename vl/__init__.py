"""vl: vision-language pretraining with region features, single- and dual-stream fusion, and a BERT-family core."""

__version__ = "0.1.0"
