"""swin_ssl: self-supervised pretraining of Swin Transformers (MoBY, EsViT, DINO) in JAX/Flax."""

__version__ = "0.1.0"
