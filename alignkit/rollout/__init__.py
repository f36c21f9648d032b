"""Generation engine: KV-cache batched decoding (greedy, sampling with temperature / top-k / top-p,
beam search) returning tokens, masks and log-probs, plus a text-in/text-out helper."""

from alignkit.rollout.generate import Generation, SamplingConfig, generate, generate_text, prefill_positions

__all__ = ["Generation", "SamplingConfig", "generate", "generate_text", "prefill_positions"]
