"""Vision Transformers and what trains in them: weights, backbones, method configs and methods, adapters, key transformation."""
