"""Sample-quality metrics (pure functions of feature tensors) and their feature extractors."""
