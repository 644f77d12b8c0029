"""Text generation from causal LMs: greedy, sampling and beam search with a KV cache."""
from mmjax.generate.decode import METHODS, Decoded, decode
from mmjax.generate.run import generate
from mmjax.generate.sampling import filter_logits

__all__ = ["decode", "Decoded", "METHODS", "filter_logits", "generate"]
