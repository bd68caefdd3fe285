"""Making fine-tuned models small and fast for serving: int8 quantization (``quantize``) and distillation."""
