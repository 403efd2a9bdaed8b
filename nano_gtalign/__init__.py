"""nano-gtalign: game-theoretic alignment (GTAlign) with GRPO, small enough to read.

Modules: model (Qwen2/Qwen3/Llama transformer), loader (Hugging Face checkpoints),
tokenizer (tokenizer.json + chat template), sampling (KV-cache generation),
game (payoff matrix, Pareto, welfare), prompts, reward and scoring, judges, config,
rollout, grpo and update (the loss and its loop), ppo; kernels (Triton, each with a torch reference).
Nothing here needs triton or a GPU to import.
"""
__version__ = "0.1.0"
