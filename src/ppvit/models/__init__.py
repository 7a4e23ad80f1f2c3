"""Vision Transformers and what trains in them: backbones, method configs and methods, adapters, key transform."""
