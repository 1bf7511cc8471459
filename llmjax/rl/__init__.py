"""Reinforcement learning from feedback: reward models, PPO, DPO and GRPO on the shared training loop.

``losses`` holds the math as small pure fp32 functions on arrays (log-probs, KL estimates, GAE,
whitening, the clipped PPO losses, the adaptive KL controller, group advantages, Bradley-Terry and
DPO losses); the stages in ``llmjax/stages/`` wire them to models, rollouts and the loop.
"""
