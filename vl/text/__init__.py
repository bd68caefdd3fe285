"""The text core (BERT family): the WordPiece tokenizer, corpora and sentence pairs, masking, the pretraining model
and objectives (MLM, NSP/SOP, ELECTRA, causal and prefix LM), text pretraining, and fine-tuning for classification,
tagging and span QA. The text encoder itself is shared with the fusion models (``vl.encoders.text``)."""
