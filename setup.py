"""omninft: OmniNFT training engine for joint audio-video diffusion transformers (LTX-2)."""

from setuptools import find_packages, setup

setup(
    name="omninft",
    version="0.1.0",
    description="Modality-aware online diffusion RL (OmniNFT) for the LTX-2 audio-video DiT",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["engine", "engine.*", "kernels", "kernels.*", "models", "models.*"]),
    package_data={"kernels": ["dispatch_table.json"]},
    install_requires=[
        "torch>=2.4",
        "safetensors>=0.4",
        "pyyaml>=6",
        "numpy>=1.24",
        "tqdm>=4.60",
        "tensorboard>=2.14",
        "matplotlib>=3.7",
        "nvtx>=0.2",
    ],
    extras_require={
        # megatron-core 0.19.2 declares Python >= 3.12 but runs on 3.11: install it with
        # `pip install --no-deps --ignore-requires-python megatron-core==0.19.2` (README); psutil is its
        # undeclared need. triton 3.7.1 runs the kernels under TRITON_INTERPRET=1 with numpy 2.4.
        # ruff: format and lint checks of the test command (configured in pyproject.toml).
        # wandb: log.wandb=true, tested offline.
        # transformers: Gemma 3 and its tokenizer for the real text path (text.encoder); diffusers: the LTX-2
        # text connectors (and the reference implementation the tests compare against).
        "test": [
            "pytest>=8",
            "diffusers==0.42.1",
            "transformers==5.24.0",
            "psutil",
            "triton==3.7.1",
            "ruff==0.17.5",
            "wandb==0.31.0",
            "av==18.1.0",  # PyAV for engine.media's MP4 (bundled FFmpeg: libx264, aac); 19.x needs Python >= 3.12
            "peft==0.21.2",  # diffusers' LoRA loader, for the test that our LoRA export loads there
            "aiohttp==3.14.3",  # omninft reward-server (the serve extra), tested with real servers on 127.0.0.1
        ],
        "text": ["diffusers==0.42.1", "transformers==5.24.0"],
        # rewards: the media reward models' packages; CLAP comes from transformers. Audiobox Aesthetics is
        # installed apart, `pip install --no-deps audiobox-aesthetics==0.0.4`: its declared dependencies pull a
        # CUDA torchaudio that does not load with a CPU torch, and we import only its model module (torch, numpy,
        # huggingface_hub, which transformers brings).
        "rewards": ["transformers==5.24.0"],
        "wandb": ["wandb"],
        "media": ["av==18.1.0"],
        # serve: `omninft reward-server` (aiohttp); the trainer's client (engine.rewards.remote) is the stdlib's.
        "serve": ["aiohttp==3.14.3"],
        "gpu": ["flash-attn", "transformer-engine[pytorch]"],
    },
    entry_points={"console_scripts": ["omninft = engine.cli:main"]},
)
