"""Writes weights/manifests/<preset>.txt: the official checkpoints' keys and shapes, one `key<TAB>shape` per leaf.

Stand-alone on purpose: it imports nothing from pgjax, so the manifests are an independent oracle for
`jax.eval_shape(paligemma.init, ...)` (tests/test_manifests.py). Every number below is a published fact about
big_vision's PaliGemma checkpoints (the paligemma-3b-pt-224 parameter tree; the 448/896 pos_embedding lengths;
big_vision `gemma.get_config` variants gemma_2b, gemma2_2b/9b/27b; SigLIP So400m/14), and the script asserts
the published parameter totals before writing anything.

Run from the repo root: python weights/manifests/make_manifests.py
"""

import math
import os

VOCAB = 257_152  # 256000 Gemma + 1024 <locNNNN> + 128 <segNNN>

# SigLIP So400m/14 (big_vision models/vit.py): width, depth, mlp_dim, heads, head_dim, patch.
VIT = dict(D=1152, L=27, F=4304, N=16, H=72, p=14)

# big_vision models/ppp/gemma.py get_config: width, depth, mlp_dim, heads, kv heads, head_dim; Gemma 2 post norms.
GEMMA = {
    "gemma_2b": dict(D=2048, L=18, F=16384, N=8, K=1, H=256, post_norms=False),
    "gemma2_2b": dict(D=2304, L=26, F=9216, N=8, K=4, H=256, post_norms=True),
    "gemma2_9b": dict(D=3584, L=42, F=14336, N=16, K=8, H=256, post_norms=True),
    "gemma2_27b": dict(D=4608, L=46, F=36864, N=32, K=16, H=128, post_norms=True),
}

MODELS = {"paligemma-3b": "gemma_2b", "paligemma2-3b": "gemma2_2b", "paligemma2-10b": "gemma2_9b",
          "paligemma2-28b": "gemma2_27b"}

# Published totals (224 px); the 448/896 files differ only in img/pos_embedding (1024 / 4096 tokens).
TOTALS_224 = {"paligemma-3b": 2_923_335_408, "paligemma2-3b": 3_032_094_960, "paligemma2-10b": 9_662_409_456,
              "paligemma2-28b": 27_650_192_112}
PUBLISHED = {"paligemma-3b-448": 2_924_220_144, "paligemma-3b-896": 2_927_759_088}
ATTN_PARAMS_3B = 169_869_312  # the notebook's trainable set, llm/layers/attn/*


def img_tree(res: int, llm_width: int) -> dict:
  D, L, F, N, H, p = (VIT[k] for k in ("D", "L", "F", "N", "H", "p"))
  P = (res // p) ** 2
  blk = "img/Transformer/encoderblock/"
  t = {
      "img/embedding/kernel": (p, p, 3, D), "img/embedding/bias": (D,),
      "img/pos_embedding": (1, P, D),
      "img/Transformer/encoder_norm/scale": (D,), "img/Transformer/encoder_norm/bias": (D,),
      "img/head/kernel": (D, llm_width), "img/head/bias": (llm_width,),
      blk + "MlpBlock_0/Dense_0/kernel": (L, D, F), blk + "MlpBlock_0/Dense_0/bias": (L, F),
      blk + "MlpBlock_0/Dense_1/kernel": (L, F, D), blk + "MlpBlock_0/Dense_1/bias": (L, D),
  }
  for ln in ("LayerNorm_0", "LayerNorm_1"):
    t[f"{blk}{ln}/scale"] = t[f"{blk}{ln}/bias"] = (L, D)
  mha = blk + "MultiHeadDotProductAttention_0/"
  for name in ("query", "key", "value"):
    t[f"{mha}{name}/kernel"], t[f"{mha}{name}/bias"] = (L, D, N, H), (L, N, H)
  t[f"{mha}out/kernel"], t[f"{mha}out/bias"] = (L, N, H, D), (L, D)
  return t


def llm_tree(variant: str) -> dict:
  g = GEMMA[variant]
  D, L, F, N, K, H = (g[k] for k in ("D", "L", "F", "N", "K", "H"))
  assert K < N, "every released PaliGemma LLM is MQA/GQA, so q_einsum + kv_einsum (no qkv_einsum)"
  t = {
      "llm/embedder/input_embedding": (VOCAB, D), "llm/final_norm/scale": (D,),
      "llm/layers/attn/q_einsum/w": (L, N, D, H), "llm/layers/attn/kv_einsum/w": (L, 2, K, D, H),
      "llm/layers/attn/attn_vec_einsum/w": (L, N, H, D),
      "llm/layers/mlp/gating_einsum": (L, 2, D, F), "llm/layers/mlp/linear": (L, F, D),
  }
  norms = ["pre_attention_norm", "pre_ffw_norm"] + (["post_attention_norm", "post_ffw_norm"] if g["post_norms"] else [])
  for n in norms:
    t[f"llm/layers/{n}/scale"] = (L, D)
  return t


def count(tree: dict) -> int:
  return sum(math.prod(s) for s in tree.values())


def main():
  out_dir = os.path.dirname(os.path.abspath(__file__))
  trees = {}
  for model, variant in MODELS.items():
    for res in (224, 448, 896):
      trees[f"{model}-{res}"] = {**img_tree(res, GEMMA[variant]["D"]), **llm_tree(variant)}
    base = count(trees[f"{model}-224"])
    assert base == TOTALS_224[model], (model, base, TOTALS_224[model])
    for res in (448, 896):  # only the pos_embedding grows
      assert count(trees[f"{model}-{res}"]) == base + ((res // 14) ** 2 - 256) * VIT["D"]
  for name, total in PUBLISHED.items():
    assert count(trees[name]) == total, (name, count(trees[name]), total)
  t = trees["paligemma-3b-224"]
  assert len(t) == 32
  assert sum(math.prod(s) for k, s in t.items() if k.startswith("llm/layers/attn/")) == ATTN_PARAMS_3B

  for name, tree in trees.items():
    lines = [
        f"# {name}: keys and shapes of the official big_vision npz (keys '/'-joined, layers stacked, no 'params/').",
        "# Written by weights/manifests/make_manifests.py from published facts; independent of pgjax's code.",
        f"# total parameters: {count(tree)}",
    ]
    lines += [f"{k}\t{','.join(map(str, s))}" for k, s in sorted(tree.items())]
    with open(os.path.join(out_dir, f"{name}.txt"), "w") as f:
      f.write("\n".join(lines) + "\n")
    print(f"{name}: {len(tree)} leaves, {count(tree):,} params")


if __name__ == "__main__":
  main()
