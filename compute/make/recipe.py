"""The recipe of a MoE made from a dense model (compute/make/moefy.py): its options, which
every step of the build reads (moefy_split.py per layer, moefy_write.py for the file)."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_EXPERTS = 16
DEFAULT_TOP_K = 12
DEFAULT_TEMPERATURE = 0.1


@dataclass(frozen=True)
class MoefyOptions:
    experts: int = DEFAULT_EXPERTS  # E per layer
    top_k: int = DEFAULT_TOP_K  # K (llama.expert_used_count); down_e is scaled by K
    temperature: float = DEFAULT_TEMPERATURE  # router logits = temperature * predicted log-contribution
    expert_type: str = "Q8_0"  # ggml type of the experts (HOBBIT's high precision)
    down_type: str = ""  # type of the down experts if not expert_type
    unit: int = 1  # neurons clustered together (32: whole quant blocks)
    clustering: str = "coact"  # coact | random | contiguous
    calib_tokens: int = 6000  # calibration tokens (prompts included), at least
    per_prompt: int = 200  # most tokens generated per prompt
    seed: int = 0  # k-means initialisation
    refit: float = 0.0  # >0: ridge-refit down to the routed top-k (penalty, relative)
