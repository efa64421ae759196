"""OmniNFT training engine: sampler, rewards, routing, loss, surgery, reweighting, trainer."""
