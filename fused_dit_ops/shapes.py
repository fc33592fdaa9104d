"""One registry of real model shapes, shared by tests, benchmarks and the CLI.

Sources: the diffusers 0.42 model configs (Qwen-Image-Edit-2511: D = 3072 = 24 x 128, L_img 8192 = 4096 target + 4096
reference, L_txt ~208), Flux.1 (D 3072, 24 x 128, 4096 image + 512 text tokens at 1024^2),
Flux.2 (D 6144 = 48 x 128, 4096 + 512 tokens at 1024^2), Wan 2.x 14B (D 5120 = 40 x 128, 32760 tokens
for 81 frames at 480p, 75600 at 720p), Wan 2.1 1.3B (D 1536), Wan 2.2 TI2V-5B (D 3072, 27280 tokens at
1280 x 704 x 121).
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
    StreamShape("flux-joint", 1, 4608, 3072),  # single-stream blocks: [text, image]
    StreamShape("flux2-img", 1, 4096, 6144),
    StreamShape("flux2-txt", 1, 512, 6144),
    StreamShape("flux2-joint", 1, 4608, 6144),
    StreamShape("wan14b", 1, 32760, 5120),
    StreamShape("wan14b-720p", 1, 75600, 5120),
    StreamShape("wan1.3b", 1, 32760, 1536),
    StreamShape("wan-ti2v5b", 1, 27280, 3072),
    # Wan's widths at the other token count (bench wan-ops: every width at 32760 and 75600 tokens)
    StreamShape("wan1.3b-720p", 1, 75600, 1536),
    StreamShape("wan-ti2v5b-L32760", 1, 32760, 3072),
    StreamShape("wan-ti2v5b-L75600", 1, 75600, 3072),
    StreamShape("odd-L", 1, 4099, 3072, n_ref=1901),
]}

ATTENTION: dict[str, AttentionShape] = {s.name: s for s in [
    AttentionShape("qwen-edit", 1, 8400, 24, 128, L_txt=208),
    AttentionShape("flux", 1, 4608, 24, 128, L_txt=512),
    AttentionShape("flux2", 1, 4608, 48, 128, L_txt=512),
    AttentionShape("wan14b", 1, 32760, 40, 128),
    AttentionShape("wan14b-720p", 1, 75600, 40, 128),
    AttentionShape("short", 1, 1024, 24, 128),
]}
