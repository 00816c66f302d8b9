"""pgjax: PaliGemma 1 and 2 as pure JAX functions over the official checkpoint's param tree.

The axis alphabet, one meaning per letter, in every shape-suffixed name (`x_BTD`, `mask_BTS`) and in the
einsums over them (`"BTD,NDH->BTNH"`) throughout the package:
  B  batch
  T  query positions: the whole [image; text] sequence in a teacher-forced forward, or the new tokens
     fed to a cached forward
  S  key/value positions: the same sequence as keys, or cache slots
  M  generated tokens
  L  layers
  D  width of the tower at hand (SigLIP's width in siglip.py, Gemma's in gemma.py)
  E  the LLM's width, where SigLIP's head projects into it
  F  MLP hidden units
  V  vocabulary
  N  query heads
  K  kv heads
  G  = N / K, query heads per kv head
  H  head dim
  P  image patches (image tokens)
  Y, X  image height and width in pixels
  C  colour channels
  J  the members of a fused weight stack (q/k/v of qkv_einsum, k/v of kv_einsum, gate/up of gating_einsum)
  Z  a flattened product of axes in a re-laid matrix (e.g. N H; a comment says which)
Modules say "axes: see pgjax/__init__.py" and add a line only for a letter used in them alone.
"""

__version__ = "0.1.0"
