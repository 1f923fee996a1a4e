"""The recipe of a MoE made from a dense model (compute/make/moefy.py): its options, which
every step of the build reads (moefy_split.py per layer, moefy_write.py for the file)."""

from __future__ import annotations

from dataclasses import dataclass

from ..engine.sampling import SamplingSettings

DEFAULT_EXPERTS = 16
DEFAULT_TOP_K = 12
DEFAULT_TEMPERATURE = 0.1

# The sampling the MoE recommends (written as general.sampling.*: chat, generate and serve take
# it unless told otherwise). Measured, not guessed (BENCHMARKS.md, "The default model's
# sampling"): chat's first answer to "What is the capital of France?" names Paris for 5 of
# seeds 1-10 at the built-in 0.8/40/0.95, for 10 of 10 and 30 of seeds 11-40 at these. Top-p
# 0.9 at temperature 0.2 is what cuts the first token's runner-up ("Bon", 0.53 below "The").
SAMPLING = SamplingSettings(temperature=0.2, top_k=40, top_p=0.9, min_p=0.05)


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
