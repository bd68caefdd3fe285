"""Text processing: the WordPiece tokenizer."""
