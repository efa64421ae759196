"""OmniNFT training engine: the loop (trainer), the paper's maths (algorithm), rewards, data, the
process layout (parallel), checkpoints, and the config and CLI that drive them."""
