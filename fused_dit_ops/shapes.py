"""One registry of real model shapes, shared by tests, benchmarks and the CLI.

Sources: the diffusers 0.42 model configs (Qwen-Image-Edit-2511: D = 3072 = 24 x 128, L_img 8192 = 4096 target + 4096
reference, L_txt ~208), Flux.1 (D 3072, 24 x 128, 4096 image + 512 text tokens at 1024^2),
Wan 2.x 14B (D 5120 = 40 x 128, 32760 tokens for 81 frames at 480p).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StreamShape:
    """One activation stream [B, L, C] as the modulation ops see it."""
    name: str
    B: int
    L: int
    C: int
    n_ref: int = 0  # tokens with index 1 (zero_cond_t reference tokens); 0 means no index

    @property
    def has_index(self) -> bool:
        return self.n_ref > 0


@dataclass(frozen=True)
class AttentionShape:
    name: str
    B: int
    N: int      # joint sequence length
    H: int
    D: int
    L_txt: int = 0  # text tokens at the front of the joint sequence (0: none)


STREAMS: dict[str, StreamShape] = {s.name: s for s in [
    StreamShape("qwen-edit-img", 1, 8192, 3072, n_ref=4096),
    StreamShape("qwen-edit-txt", 1, 208, 3072),
    StreamShape("flux-img", 1, 4096, 3072),
    StreamShape("flux-txt", 1, 512, 3072),
    StreamShape("wan14b", 1, 32760, 5120),
    StreamShape("odd-L", 1, 4099, 3072, n_ref=1901),
]}

ATTENTION: dict[str, AttentionShape] = {s.name: s for s in [
    AttentionShape("qwen-edit", 1, 8400, 24, 128, L_txt=208),
    AttentionShape("flux", 1, 4608, 24, 128, L_txt=512),
    AttentionShape("wan14b", 1, 32760, 40, 128),
    AttentionShape("short", 1, 1024, 24, 128),
]}
