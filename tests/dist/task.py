"""The small OmniNFT task the multi-process tests train on (importable without the CPU shim)."""

TASK = ["train.prompts_per_iteration=2", "train.group_size=4", "train.batch_size=4", "sampler.steps=4",
        "task.video_grid=[3,2,2]", "reweight.warmup_steps=0", "log.progress=false", "log.tensorboard=false",
        "log.plot=false", "surgery.schedule=authors",
        # Adam's first step maps any gradient entry to +-lr * g / (|g| + eps): with eps=1e-8, entries that
        # are numerically zero (~1e-10 of either sign, depending on summation order) would move by 3e-6.
        "optim.eps=1e-6"]
