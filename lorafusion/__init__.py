"""lorafusion: fast LoRA fine-tuning with fused kernels and multi-job scheduling."""

__version__ = "0.1.0"
