"""Model configurations: frozen, hashable dataclasses (pass them to `jit` as static args) and presets.

Facts follow big_vision: SigLIP So400m/14 (`models/vit.py`, variant "So400m/14") and the Gemma variants of
`models/ppp/gemma.py::get_config` (gemma_2b for PaliGemma 1; gemma2_2b/9b/27b for PaliGemma 2 3B/10B/28B),
with PaliGemma's vocabulary of 256000 + 1024 `<locNNNN>` + 128 `<segNNN>` = 257152 tokens.
"""

from __future__ import annotations

import dataclasses
import math

PALIGEMMA_VOCAB = 257_152
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


def _check_compute_dtype(name) -> None:
  if name not in COMPUTE_DTYPES:
    raise ValueError(f"compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {name!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SigLIPConfig:
  """The ViT image encoder. Defaults are So400m/14 at 224 px."""

  image_size: int = 224
  patch_size: int = 14
  width: int = 1152
  depth: int = 27
  num_heads: int = 16
  mlp_dim: int = 4304
  # The dtype both operands of every matmul are cast to (`layers.dot`); the dots accumulate in float32,
  # and the residual stream, norms and softmax stay float32 whatever it is.
  compute_dtype: str = "float32"

  def __post_init__(self):
    _check_compute_dtype(self.compute_dtype)
    if self.image_size % self.patch_size:
      raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
    if self.width % self.num_heads:
      raise ValueError(f"vision width {self.width} is not divisible by num_heads {self.num_heads}")

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @property
  def head_dim(self) -> int:
    return self.width // self.num_heads


@dataclasses.dataclass(frozen=True, kw_only=True)
class GemmaConfig:
  """The Gemma decoder. Defaults are gemma_2b (PaliGemma 1); Gemma 2 sets the last four fields."""

  vocab_size: int = PALIGEMMA_VOCAB
  width: int = 2048
  depth: int = 18
  num_heads: int = 8
  num_kv_heads: int = 1
  head_dim: int = 256
  mlp_dim: int = 16384
  rope_max_wavelength: float = 10_000.0
  # Gemma 2: post_attention_norm and post_ffw_norm, soft caps (0.0 = off).
  post_norms: bool = False
  attn_logits_softcap: float = 0.0
  final_logits_softcap: float = 0.0
  # Queries are scaled by query_pre_attn_scalar**-0.5; None means head_dim (big_vision's
  # "rsqrt_head_dim"). gemma2_27b uses width // num_heads ("rsqrt_emb_per_head").
  query_pre_attn_scalar: float | None = None
  # As SigLIPConfig.compute_dtype; RoPE, attention logits, soft caps and the output logits stay float32.
  compute_dtype: str = "float32"

  def __post_init__(self):
    _check_compute_dtype(self.compute_dtype)
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")

  @property
  def query_scale(self) -> float:
    scalar = self.head_dim if self.query_pre_attn_scalar is None else self.query_pre_attn_scalar
    return float(scalar) ** -0.5


@dataclasses.dataclass(frozen=True, kw_only=True)
class PaliGemmaConfig:
  vision: SigLIPConfig = SigLIPConfig()
  llm: GemmaConfig = GemmaConfig()
  # Rematerialise the scanned blocks of both towers in the backward pass: "none" keeps every
  # activation (and recomputes only the layers' weight slices and casts, never copies of weights);
  # "full" keeps only the block inputs (big_vision's "nothing_saveable"); "dots" keeps matmul
  # outputs that have no batch dimension.
  remat: str = "none"

  def __post_init__(self):
    if self.remat not in ("none", "full", "dots"):
      raise ValueError(f"remat must be 'none', 'full' or 'dots', got {self.remat!r}")

  @property
  def num_image_tokens(self) -> int:
    return self.vision.num_patches

  @property
  def compute_dtype(self) -> str:
    """The LLM's compute dtype (`with_compute_dtype` sets both towers')."""
    return self.llm.compute_dtype

  def with_compute_dtype(self, name: str) -> "PaliGemmaConfig":
    """This config with both towers' matmuls in `name` ("float32": exact, big_vision's numerics)."""
    return dataclasses.replace(self, vision=dataclasses.replace(self.vision, compute_dtype=name),
                               llm=dataclasses.replace(self.llm, compute_dtype=name))


def _gemma2(**kw) -> GemmaConfig:
  return GemmaConfig(post_norms=True, attn_logits_softcap=50.0, final_logits_softcap=30.0, **kw)


_LLMS = {
    "3b": GemmaConfig(),  # gemma_2b
    "2-3b": _gemma2(width=2304, depth=26, num_heads=8, num_kv_heads=4, head_dim=256, mlp_dim=9216),
    "2-10b": _gemma2(width=3584, depth=42, num_heads=16, num_kv_heads=8, head_dim=256, mlp_dim=14336),
    "2-28b": _gemma2(width=4608, depth=46, num_heads=32, num_kv_heads=16, head_dim=128, mlp_dim=36864,
                     query_pre_attn_scalar=4608 // 32),
}

PRESETS: dict[str, PaliGemmaConfig] = {}
for _res in (224, 448, 896):
  PRESETS[f"paligemma-3b-{_res}"] = PaliGemmaConfig(vision=SigLIPConfig(image_size=_res), llm=_LLMS["3b"])
  for _size in ("3b", "10b", "28b"):
    PRESETS[f"paligemma2-{_size}-{_res}"] = PaliGemmaConfig(
        vision=SigLIPConfig(image_size=_res), llm=_LLMS[f"2-{_size}"])

_TINY_VISION = SigLIPConfig(image_size=56, patch_size=14, width=32, depth=2, num_heads=2, mlp_dim=64)
_TINY_LLM = dict(vocab_size=384, width=64, depth=2, num_heads=4, head_dim=16, mlp_dim=128)
PRESETS.update({
    # Small configs for tests: the three attention layouts of the released checkpoints' families.
    "tiny-gemma1-mqa": PaliGemmaConfig(vision=_TINY_VISION, llm=GemmaConfig(num_kv_heads=1, **_TINY_LLM)),
    "tiny-gemma1-mha": PaliGemmaConfig(vision=_TINY_VISION, llm=GemmaConfig(num_kv_heads=4, **_TINY_LLM)),
    "tiny-gemma2-gqa": PaliGemmaConfig(vision=_TINY_VISION, llm=_gemma2(num_kv_heads=2, **_TINY_LLM)),
    # Gemma 2 with 28B-style query scaling (width // num_heads != head_dim).
    "tiny-gemma2-qscale": PaliGemmaConfig(
        vision=_TINY_VISION,
        llm=_gemma2(vocab_size=384, width=64, depth=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=128,
                    query_pre_attn_scalar=64 // 4)),
    # The CPU benchmark configuration (bench/README.md).
    "bench-small": PaliGemmaConfig(
        vision=SigLIPConfig(image_size=224, patch_size=14, width=384, depth=4, num_heads=6, mlp_dim=1536),
        llm=GemmaConfig(vocab_size=16384, width=512, depth=4, num_heads=8, num_kv_heads=1, head_dim=64,
                        mlp_dim=2048)),
})


def is_int(x, least: int) -> bool:
  """For settings checks: an int (not a bool: True is no step count) >= least."""
  return type(x) is int and x >= least


def is_real(x) -> bool:
  """For settings checks: a finite int or float, not a bool."""
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def get(name: str) -> PaliGemmaConfig:
  """Returns the named preset; the error lists the known names."""
  try:
    return PRESETS[name]
  except KeyError:
    raise KeyError(f"unknown config {name!r}; known: {', '.join(sorted(PRESETS))}") from None
