"""Region feature extraction: a bottom-up-attention-style Faster R-CNN, its training, and the feature store."""
