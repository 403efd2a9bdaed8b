"""nano-gtalign: game-theoretic alignment (GTAlign) with GRPO, small enough to read.

Modules: model (Qwen2/Qwen3 transformer), loader (Hugging Face checkpoints),
tokenizer (tokenizer.json + chat template), sampling (KV-cache generation),
game (payoff matrix, Pareto, welfare), prompts, reward, judges, grpo.
Nothing here needs triton or a GPU to import.
"""
__version__ = "0.1.0"
