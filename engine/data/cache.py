"""The prompt-embedding cache: each prompt's projected text features (engine.data.text.PromptEncoder),
computed once by `omninft encode-prompts` and read by the trainer, so Gemma 3 never shares the GPU
with the DiT.

Layout: `<cache>/<fingerprint>/<sha256(prompt)[:2]>/<sha256(prompt)>.safetensors`, one file per
prompt, holding `features` (n_tokens, feature_channels) and the prompt text in its header. The
fingerprint (engine.data.text.encoding_fingerprint) covers the encoder, the projection weights, the
padded length and the dtype (and, for LTX-2.3, both projections and the per-token norm), so entries of
another encoder or release are never mixed in. Each file is written atomically, so a killed encode
leaves complete entries only and a rerun encodes just what is missing.

Cache point (measured, bench/text.py): after the projection, real tokens only. LTX-2.0: caption_channels
x 2 bytes per token in bf16 (7.5 KB for 19B), so 0.4 MB for a 50-token prompt, against 15.7 MB for the
two connector outputs at 1024 tokens. LTX-2.3: the video and audio projections' rows side by side,
(4096 + 2048) x 2 bytes = 12 KB per token, 0.6 MB for a 50-token prompt, against 12.6 MB for its two
contexts (1024 x 4096 and 1024 x 2048) at 1024 tokens.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from torch import Tensor

from models.weights import atomic_save_file, open_safetensors

from ..errors import DataError

FEATURES = "features"


def prompt_key(prompt: str) -> str:
    """The entry name of a prompt: its stripped text's sha256 (the tokenizer strips it too)."""
    return hashlib.sha256(prompt.strip().encode()).hexdigest()


class EmbeddingCache:
    """The entries of one encoding (`fingerprint`) under `root`."""

    def __init__(self, root: str | Path, fingerprint: str):
        self.root, self.fingerprint = Path(root), fingerprint
        self.dir = self.root / fingerprint

    def path(self, prompt: str) -> Path:
        key = prompt_key(prompt)
        return self.dir / key[:2] / f"{key}.safetensors"

    def __contains__(self, prompt: str) -> bool:
        return self.path(prompt).is_file()

    def missing(self, prompts: Sequence[str]) -> list[str]:
        """The distinct prompts without an entry, in first-seen order."""
        return [p for p in dict.fromkeys(prompts) if p not in self]

    def put(self, prompt: str, features: Tensor) -> None:
        atomic_save_file({FEATURES: features}, self.path(prompt), metadata={"prompt": prompt.strip()})

    def get(self, prompt: str) -> Tensor:
        """(n_tokens, feature_channels) features of `prompt`; a DataError names a missing or foreign entry."""
        path = self.path(prompt)
        if not path.is_file():
            raise DataError(f"text.cache: no entry for prompt {prompt!r} in {self.dir} (run omninft encode-prompts)")
        with open_safetensors(path) as f:
            if (f.metadata() or {}).get("prompt") != prompt.strip():
                raise DataError(f"text.cache: {path} holds another prompt than {prompt!r}")
            return f.get_tensor(FEATURES)

    def write_info(self, info: dict) -> None:
        """A human-readable note of what this encoding is (encoder path, length, dtype, channels)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "info.json").write_text(json.dumps({"fingerprint": self.fingerprint, **info}, indent=2) + "\n")
