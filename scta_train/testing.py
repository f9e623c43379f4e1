"""Tiny random towers for tests and quick benchmark runs on a CPU: the one home of their shapes."""

TINY_LAYERS = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
TINY_VISION = {**TINY_LAYERS, "image_size": 32, "patch_size": 8}  # ViT: [CLS] + (32 / 8)^2 = 16 patches
TINY_TEXT = {**TINY_LAYERS, "max_position_embeddings": 64}
