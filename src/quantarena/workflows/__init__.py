"""Workflows around one variant: quantize → save → reload → compare with the original (``roundtrip``), and
fine-tuning a classifier before it is quantized (``finetune``)."""
