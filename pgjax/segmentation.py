"""PaliGemma's `<seg>` masks: the VQ-VAE codec of big_vision's `vae-oid.npz`, and mask <-> text.

An object's segmentation text is `<locY1><locX1><locY2><locX2>` (detection.py's box) then 16 `<segNNN>`: the
codebook indices of the object's mask, cropped to its box and resized to 64x64, on the encoder's 4x4 grid,
row-major. The codec is the VQ-VAE of arXiv 2301.02229 as big_vision runs it:

    encode  mask [0, 1] -> 2(m - 0.5) -> 4 x (3x3 conv stride 2, TF "SAME" padding, ReLU) -> 2 residual blocks
            -> 1x1 conv to D -> the nearest of K codebook rows by squared L2, per cell of the 4x4 grid
    decode  codebook rows [4, 4, D] -> 1x1 conv, ReLU -> 2 residual blocks -> 4 x (4x4 transposed conv
            stride 2, ReLU) -> 1x1 conv to 1: unbounded logits [64, 64]; the mask is logits > 0
    residual block  x + conv1x1(relu(conv3x3(relu(conv3x3(x)))))   (no ReLU after the add)

The file is a PyTorch state dict saved as npz: conv weights (out, in, kh, kw), transposed-conv weights
(in, out, kh, kw), a bias per layer, the codebook `_vq_vae._embedding` [K, D]. `load_vae` keeps the file's
keys and layouts (the convs below read them as they are) and reads every width from the shapes, so the
released file and the small demo VAE load through the same code.

Text -> masks follows big_vision's segmentation *evaluator*, not its demo parser (copied into several public
notebooks and apps), which differs in three ways users trip over: the evaluator divides a bin by 1023 (not
1024), truncates pixel coordinates with int() (not round), and thresholds the resized logits at 0 (not a
soft mask). Mask -> text follows big_vision's `refcoco_mask2str`.

Axes: B batch, Y/X grid rows/columns, C channels, K codebook rows, D code width, H/W image height/width.
"""

from __future__ import annotations

import functools
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image

from pgjax import files

NUM_LOC = 4                # <loc> tokens per object: y1 x1 y2 x2
NUM_SEG = 16               # <seg> tokens per object: the 4x4 grid
NUM_LOC_BINS = 1024
MASK_SIZE = 64             # the codec's mask resolution
CODEBOOK = "_vq_vae._embedding"
_STRIDED = ("encoder.0", "encoder.2", "encoder.4", "encoder.6")    # 3x3 stride 2: 64 -> 4 pixels
_ENC_RES = ("encoder.8.net", "encoder.9.net")
_ENC_OUT = "encoder.10"
_DEC_IN = "decoder.0"
_DEC_RES = ("decoder.2.net", "decoder.3.net")
_UPSAMPLE = ("decoder.4", "decoder.6", "decoder.8", "decoder.10")  # 4x4 transposed, stride 2: 4 -> 64 pixels
_DEC_OUT = "decoder.12"

_OBJECT = re.compile(r"^\s*((?:<loc\d+>){4})((?:<seg\d+>)*)(.*)$", re.S)
_NUM = re.compile(r"<(?:loc|seg)(\d+)>")


# ---------------------------------------------------------------------------------------------------
# The checkpoint.


def vae_shapes(*, encoder=(16, 32, 64, 128), enc_hidden=128, num_codes=128, code_dim=512, decoder=128,
               dec_hidden=128, upsample=(128, 64, 32, 16)) -> dict:
  """Every key the codec reads and its shape, for the given widths; the defaults are the released file's.

  encoder: the four strided convs' outputs; enc_hidden/dec_hidden: the residual blocks' hidden widths;
  num_codes x code_dim: the codebook (K x D); decoder: the decoder's width; upsample: its four transposed
  convs' outputs."""
  shapes = {CODEBOOK: (num_codes, code_dim)}

  def conv(key, o, i, k):
    shapes[key + ".weight"], shapes[key + ".bias"] = (o, i, k, k), (o,)

  def resblock(key, c, h):
    conv(key + ".0", h, c, 3), conv(key + ".2", h, h, 3), conv(key + ".4", c, h, 1)

  c = 1
  for key, o in zip(_STRIDED, encoder, strict=True):
    conv(key, o, c, 3)
    c = o
  for key in _ENC_RES:
    resblock(key, c, enc_hidden)
  conv(_ENC_OUT, code_dim, c, 1)
  conv(_DEC_IN, decoder, code_dim, 1)
  c = decoder
  for key in _DEC_RES:
    resblock(key, c, dec_hidden)
  for key, o in zip(_UPSAMPLE, upsample, strict=True):
    shapes[key + ".weight"], shapes[key + ".bias"] = (c, o, 4, 4), (o,)  # (in, out, kh, kw)
    c = o
  conv(_DEC_OUT, 1, c, 1)
  return shapes


def widths(vae) -> dict:
  """The widths (vae_shapes' arguments) of a mapping of arrays, read from the keys that hold them."""
  out = lambda k: np.shape(vae[k + ".weight"])[0]  # noqa: E731 (a conv's output width)
  K, D = np.shape(vae[CODEBOOK])
  return dict(encoder=tuple(out(k) for k in _STRIDED), enc_hidden=out(_ENC_RES[0] + ".0"), num_codes=K,
              code_dim=D, decoder=out(_DEC_IN), dec_hidden=out(_DEC_RES[0] + ".0"),
              upsample=tuple(np.shape(vae[k + ".weight"])[1] for k in _UPSAMPLE))


def expected_shapes(vae) -> dict:
  """vae_shapes at the widths `vae` holds: a key the widths need that is missing raises KeyError naming it."""
  return vae_shapes(**widths(vae))


def init_vae(key, **widths_) -> dict:
  """Random params in the file's layout (He-normal convs, zero biases, a unit-normal codebook) at the widths
  vae_shapes takes: the start of a VAE trained from scratch (the demo's)."""
  shapes = vae_shapes(**widths_)
  keys = jax.random.split(key, len(shapes))
  out = {}
  for k, (name, s) in zip(keys, sorted(shapes.items())):
    if name.endswith(".bias"):
      out[name] = jnp.zeros(s, jnp.float32)
    elif name == CODEBOOK:
      out[name] = jax.random.normal(k, s, jnp.float32)
    else:
      fan_in = (s[0] if name.rsplit(".", 1)[0] in _UPSAMPLE else s[1]) * s[2] * s[3]
      out[name] = jax.random.normal(k, s, jnp.float32) * np.sqrt(2.0 / fan_in)
  return out


def check_vae(vae, source: str = "the VAE") -> dict:
  """`vae` (a mapping of arrays, PyTorch layout) as float32 jnp arrays of the keys the codec reads; anything
  missing or mis-shaped raises one ValueError that names `source` and lists every problem."""
  missing = [k for k in _width_keys() if k not in vae]
  if missing:
    raise ValueError(f"{source}: not a PaliGemma segmentation VAE (vae-oid.npz layout): missing {missing}")
  try:
    shapes = expected_shapes(vae)
  except (ValueError, IndexError) as e:  # a width key of the wrong rank
    raise ValueError(f"{source}: a layer has the wrong number of dimensions ({e}); "
                     f"shapes: { {k: tuple(np.shape(vae[k])) for k in _width_keys()} }") from None
  problems = [f"{k}: missing (expected {s})" for k, s in shapes.items() if k not in vae]
  problems += [f"{k}: shape {tuple(np.shape(vae[k]))}, expected {s}" for k, s in shapes.items()
               if k in vae and tuple(np.shape(vae[k])) != s]
  problems += [f"{k}: dtype {np.asarray(vae[k]).dtype} is not a float" for k in shapes
               if k in vae and not np.issubdtype(np.asarray(vae[k]).dtype, np.floating)]
  if problems:
    raise ValueError(f"{source}: " + "; ".join(problems))
  return {k: jnp.asarray(vae[k], jnp.float32) for k in shapes}


def _width_keys():
  return ([CODEBOOK] + [k + ".weight" for k in _STRIDED] + [k + ".0.weight" for k in _ENC_RES + _DEC_RES]
          + [_DEC_IN + ".weight"] + [k + ".weight" for k in _UPSAMPLE])


def load_vae(path) -> dict:
  """The released `vae-oid.npz` (or a file of the same layout, such as the demo's) -> the codec's params:
  the file's keys, PyTorch layouts, float32. Arrays the codec does not read are ignored. Data only: no
  pickles."""
  path = str(path)
  try:
    with np.load(path, allow_pickle=False) as z:
      arrays = {k: z[k] for k in z.files}
  except (OSError, ValueError) as e:
    raise ValueError(f"{path}: cannot read as an npz file ({e})") from None
  return check_vae(arrays, path)


def save_vae(path, vae) -> None:
  """Writes the codec's params as an npz in the released file's layout (atomically: never a partial file)."""
  arrays = {k: np.asarray(v, np.float32) for k, v in check_vae(vae, "save_vae").items()}
  with files.atomic_write(path) as f:
    np.savez(f, **arrays)


# ---------------------------------------------------------------------------------------------------
# The codec.

_HI = jax.lax.Precision.HIGHEST  # the codes are an argmin: TF32 on a GPU could flip near-ties


def _conv(x_BYXC, vae, key, stride=1):
  """A PyTorch-layout conv with TF's SAME padding (big_vision's encoder): for stride 2 on an even size the
  padding is one row and column after, none before; for 3x3 stride 1 one on each side."""
  y = jax.lax.conv_general_dilated(x_BYXC, vae[key + ".weight"], (stride, stride), "SAME",
                                   dimension_numbers=("NHWC", "OIHW", "NHWC"), precision=_HI)
  return y + vae[key + ".bias"]


def _conv_transpose(x_BYXC, vae, key):
  """PyTorch's ConvTranspose2d(kernel 4, stride 2, padding 1) on an (in, out, kh, kw) weight, which doubles
  the size: a stride-1 conv over the input dilated by 2, padded kernel - 1 - 1 each side, kernel flipped."""
  w = vae[key + ".weight"][:, :, ::-1, ::-1]
  p = w.shape[-1] - 2
  y = jax.lax.conv_general_dilated(x_BYXC, w, (1, 1), [(p, p), (p, p)], lhs_dilation=(2, 2),
                                   dimension_numbers=("NHWC", "IOHW", "NHWC"), precision=_HI)
  return y + vae[key + ".bias"]


def _resblock(x_BYXC, vae, key):
  h = jax.nn.relu(_conv(x_BYXC, vae, key + ".0"))
  h = jax.nn.relu(_conv(h, vae, key + ".2"))
  return x_BYXC + _conv(h, vae, key + ".4")


def encoder_output(vae, masks_BHW):
  """The encoder before quantization: masks in [0, 1] [B, 64, 64] -> z [B, 4, 4, D]."""
  x = 2.0 * (masks_BHW.astype(jnp.float32)[..., None] - 0.5)
  for key in _STRIDED:
    x = jax.nn.relu(_conv(x, vae, key, stride=2))
  for key in _ENC_RES:
    x = _resblock(x, vae, key)
  return _conv(x, vae, _ENC_OUT)


def nearest_code(vae, z_BYXD):
  """The nearest codebook row by squared L2, as ||z||^2 + ||e||^2 - 2 z.e (big_vision's formula, so a
  near-tie rounds as there): int32 [B, Y, X]."""
  e_KD = vae[CODEBOOK]
  d_BYXK = (jnp.sum(z_BYXD ** 2, -1, keepdims=True) + jnp.sum(e_KD ** 2, -1)
            - 2 * jnp.einsum("BYXD,KD->BYXK", z_BYXD, e_KD, precision=_HI))
  return jnp.argmin(d_BYXK, axis=-1).astype(jnp.int32)


def decoder_output(vae, x_BYXD):
  """The decoder from code vectors [B, 4, 4, D] -> logits [B, 64, 64]."""
  x = jax.nn.relu(_conv(x_BYXD, vae, _DEC_IN))
  for key in _DEC_RES:
    x = _resblock(x, vae, key)
  for key in _UPSAMPLE:
    x = jax.nn.relu(_conv_transpose(x, vae, key))  # the last one too, before the 1x1 (big_vision's decoder)
  return _conv(x, vae, _DEC_OUT)[..., 0]


@jax.jit
def _encode(vae, masks_BHW):
  return nearest_code(vae, encoder_output(vae, masks_BHW)).reshape(masks_BHW.shape[0], NUM_SEG)


def encode(vae, masks_BHW):
  """Masks in [0, 1], float [B, 64, 64] -> int32 [B, 16] codebook indices, row-major over the 4x4 grid."""
  masks_BHW = jnp.asarray(masks_BHW)
  if masks_BHW.ndim != 3 or masks_BHW.shape[1:] != (MASK_SIZE, MASK_SIZE):
    raise ValueError(f"masks must be [B, {MASK_SIZE}, {MASK_SIZE}], got shape {tuple(masks_BHW.shape)}")
  return _encode(vae, masks_BHW)


@jax.jit
def _decode(vae, codes_BN):
  side = int(round(NUM_SEG ** 0.5))
  return decoder_output(vae, vae[CODEBOOK][codes_BN].reshape(codes_BN.shape[0], side, side, -1))


def decode(vae, codes_BN):
  """int [B, 16] codebook indices -> float32 [B, 64, 64] mask logits (unbounded; the mask is logits > 0)."""
  codes_BN = np.asarray(codes_BN)
  K = vae[CODEBOOK].shape[0]
  if codes_BN.ndim != 2 or codes_BN.shape[1] != NUM_SEG:
    raise ValueError(f"codes must be [B, {NUM_SEG}], got shape {codes_BN.shape}")
  if codes_BN.size and (codes_BN.min() < 0 or codes_BN.max() >= K):
    raise ValueError(f"codes must lie in [0, {K}), got {codes_BN.min()}..{codes_BN.max()}")
  return _decode(vae, jnp.asarray(codes_BN, jnp.int32))


# ---------------------------------------------------------------------------------------------------
# Mask -> text (big_vision's refcoco_mask2str).


def _as_mask255(mask_HW, what="mask"):
  m = np.asarray(mask_HW)
  if m.ndim == 3 and m.shape[-1] in (1, 3, 4):
    m = m[..., 0]  # big_vision reads channel 0
  if m.ndim != 2 or min(m.shape) == 0:
    raise ValueError(f"{what} must be [H, W] (or [H, W, C], channel 0 is read), got shape {np.shape(mask_HW)}")
  if m.dtype == bool:
    return m.astype(np.float32) * 255.0
  if m.dtype == np.uint8:
    if m.max() == 1:
      raise ValueError(f"{what} is uint8 with values 0/1: pass 0/255 (as a mask PNG stores it) or bool")
    return m.astype(np.float32)
  if np.issubdtype(m.dtype, np.floating) and m.size and 0 <= m.min() and m.max() <= 1:
    return m.astype(np.float32) * 255.0
  raise ValueError(f"{what} must be bool, uint8 0..255 or float in [0, 1], got {m.dtype} "
                   f"{m.min() if m.size else ''}..{m.max() if m.size else ''}")


def mask_box(mask_HW):
  """The tight box of a mask's pixels, (y1, x1, y2, x2) normalised to [0, 1] by its height and width (the
  box's far edges are the pixels' far edges); ValueError for an empty mask."""
  m = _as_mask255(mask_HW) > 0
  ys, xs = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
  if not ys.size:
    raise ValueError("the mask is empty: no pixel to segment")
  H, W = m.shape
  return (ys[0] / H, xs[0] / W, (ys[-1] + 1) / H, (xs[-1] + 1) / W)


def crop_box_px(box, height, width):
  """A normalised box -> the pixel crop big_vision's encoder takes: round(h*y1), ... in float32, half to even
  (tf.round): 333 x 0.5 -> 166."""
  h, w = np.float32(height), np.float32(width)
  y1, x1, y2, x2 = (np.float32(c) for c in box)
  return tuple(int(np.round(v)) for v in (h * y1, w * x1, h * y2, w * x2))


def resize_weights(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] float64: the rows of a 1-D bilinear resize with antialiasing, as TF's
  tf.image.resize(antialias=True) (big_vision's) and jax.image.resize compute it: pixel centres at +0.5, a
  triangle kernel widened by the downscale factor (antialiasing; 1 when upscaling), each row normalised."""
  scale = n_out / n_in
  width = max(1.0 / scale, 1.0)
  at = (np.arange(n_out) + 0.5) / scale - 0.5                        # output centres in input pixels
  w = np.maximum(0.0, 1.0 - np.abs(at[:, None] - np.arange(n_in)[None]) / width)
  return w / w.sum(1, keepdims=True)


def crop_to_64(mask_HW, box=None):
  """The codec's input for one object: the mask cropped by the rounded box and resized to 64x64 bilinearly
  with antialiasing, as refcoco_mask2str does, /255: float32 [64, 64] in [0, 1]. box None: the mask's tight
  box. Separable, in numpy (no compile per crop size)."""
  m = _as_mask255(mask_HW)
  box = mask_box(m > 0) if box is None else tuple(float(c) for c in box)
  _check_box(box)
  y1, x1, y2, x2 = crop_box_px(box, *m.shape)
  if y2 <= y1 or x2 <= x1:
    raise ValueError(f"box {box} crops no pixel of a {m.shape[0]}x{m.shape[1]} mask (rows {y1}:{y2}, cols {x1}:{x2})")
  crop = m[y1:y2, x1:x2].astype(np.float64)
  out = resize_weights(y2 - y1, MASK_SIZE) @ crop @ resize_weights(x2 - x1, MASK_SIZE).T
  return (out / 255.0).astype(np.float32)


def _check_box(box):
  if len(box) != 4 or not all(0.0 <= c <= 1.0 for c in box) or not (box[0] <= box[2] and box[1] <= box[3]):
    raise ValueError(f"box must be (y1, x1, y2, x2) normalised to [0, 1] with y1 <= y2, x1 <= x2, got {box}")


def loc_text(box) -> str:
  """(y1, x1, y2, x2) in [0, 1] -> four `<locNNNN>`: round(c * 1023) in float32, half to even, clipped."""
  _check_box(tuple(float(c) for c in box))
  bins = np.clip(np.round(np.asarray(box, np.float32) * np.float32(NUM_LOC_BINS - 1)), 0, NUM_LOC_BINS - 1)
  return "".join(f"<loc{int(b):04d}>" for b in bins)


def seg_text(codes_N) -> str:
  return "".join(f"<seg{int(c):03d}>" for c in np.asarray(codes_N).reshape(-1))


def mask_to_text(vae, mask_HW, box=None, label: str | None = None) -> str:
  """One object's training text, as big_vision's refcoco_mask2str builds it: the 4 `<loc>` of `box`
  ((y1, x1, y2, x2) normalised to [0, 1]; None: the mask's tight box), then the 16 `<seg>` of the mask
  cropped to it. mask_HW: bool, uint8 0/255 or float in [0, 1], at the image's full resolution. With a
  label, " label" follows (the multi-object format; big_vision's RefCOCO suffix has none)."""
  box = mask_box(mask_HW) if box is None else tuple(float(c) for c in box)
  codes = encode(vae, crop_to_64(mask_HW, box)[None])[0]
  text = loc_text(box) + seg_text(codes)
  if label is not None:
    if not label.strip() or ";" in label or "<" in label:
      raise ValueError(f"label {label!r} is empty or holds ';' or '<'")
    text += " " + label.strip()
  return text


# ---------------------------------------------------------------------------------------------------
# Text -> masks (big_vision's segmentation evaluator).


def parse_objects(text: str) -> list[dict]:
  """Model text -> [dict(label, loc=[4 ints] or None, seg=[16 ints] or None, valid)], one per " ; "-separated
  object, no model needed. Valid, by the evaluator's rules: 4 `<loc>` in 0..1023 with y2 > y1 and x2 > x1,
  then 16 `<seg>` in 0..127 (more seg tokens: invalid). The label is the text after the tokens."""
  objs = []
  for part in text.split(";"):
    if not part.strip():
      continue
    m = _OBJECT.match(part)
    if not m:
      objs.append(dict(label=part.strip(), loc=None, seg=None, valid=False))
      continue
    loc = [int(v) for v in _NUM.findall(m.group(1))]
    seg = [int(v) for v in _NUM.findall(m.group(2))]
    label = m.group(3).strip()
    loc_ok = max(loc) < NUM_LOC_BINS and loc[2] > loc[0] and loc[3] > loc[1]
    seg_ok = len(seg) == NUM_SEG and max(seg) < 128 and "<seg" not in label and "<loc" not in label
    objs.append(dict(label=label, loc=loc if loc_ok else None, seg=seg if len(seg) == NUM_SEG else None,
                     valid=bool(loc_ok and seg_ok)))
  return objs


def box_px(loc, height, width):
  """Four loc bins (y1 x1 y2 x2) -> the evaluator's pixel box (x0, y0, x1, y1): bin / 1023, times the full
  image's size, truncated by int(): bins (0, 0, 1023, 512) of a 100x100 image -> (0, 0, 50, 100)."""
  y1, x1, y2, x2 = (b / (NUM_LOC_BINS - 1) for b in loc)
  return int(x1 * width), int(y1 * height), int(x2 * width), int(y2 * height)


def paste(logits_64, box, height, width):
  """64x64 logits -> a bool [height, width] mask: resized to the box with Pillow's float bilinear resize, as
  the evaluator does, thresholded at > 0 and pasted at the box (x0, y0, x1, y1) px."""
  x0, y0, x1, y1 = box
  full = np.zeros((height, width), bool)
  if x1 <= x0 or y1 <= y0:
    return full
  small = PIL.Image.fromarray(np.asarray(logits_64, np.float32)).resize((x1 - x0, y1 - y0), PIL.Image.BILINEAR)
  full[y0:y1, x0:x1] = np.asarray(small) > 0.0
  return full


def text_to_masks(vae, text: str, height: int, width: int) -> list[dict]:
  """Model text -> [dict(label, box=(x0, y0, x1, y1) px or None, mask=bool [height, width] or None)], one per
  object, by big_vision's evaluator: box = bin / 1023 truncated to pixels of the full image; the 16 codes
  decoded, resized into the box and thresholded at 0. An object the rules reject keeps its label with
  mask=None (and box=None when its `<loc>` are the problem, or its box collapses after truncation); it never
  raises on model output. Every valid object's mask comes from one batched decode."""
  objs = parse_objects(text)
  out = []
  for o in objs:
    box = box_px(o["loc"], height, width) if o["loc"] is not None else None
    if box is not None and (box[2] <= box[0] or box[3] <= box[1]):
      box = None
    out.append(dict(label=o["label"], box=box, mask=None))
  K = vae[CODEBOOK].shape[0]  # a VAE with fewer than 128 codes (the demo's may) cannot decode the rest
  todo = [i for i, o in enumerate(objs) if o["valid"] and out[i]["box"] is not None and max(o["seg"]) < K]
  if todo:
    logits = np.asarray(decode(vae, np.array([objs[i]["seg"] for i in todo])))
    for i, lg in zip(todo, logits):
      out[i]["mask"] = paste(lg, out[i]["box"], height, width)
  return out


def mask_iou(a_HW, b_HW) -> float:
  """IoU of two bool masks; two empty masks have none to overlap: 0."""
  a, b = np.asarray(a_HW, bool), np.asarray(b_HW, bool)
  union = (a | b).sum()
  return float((a & b).sum() / union) if union else 0.0


def _box_iou_yxyx(a, b) -> float:
  """IoU of two (y1, x1, y2, x2) boxes, as big_vision's segmentation evaluator computes it."""
  area = lambda y1, x1, y2, x2: max(x2 - x1, 0.0) * max(y2 - y1, 0.0)  # noqa: E731
  inter = area(max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3]))
  union = area(*a) + area(*b) - inter
  return inter / union if union > 0 else 0.0


def segmentation_metrics(vae, predictions, targets) -> dict:
  """big_vision's segmentation evaluator over model texts. targets: one dict per example, masks=[bool
  [H, W], ...] (its objects at the image's full size) and box=(y1, x1, y2, x2) normalised (its first object's).

  "miou": the mean over examples of the mask IoU, 0 for an invalid prediction (parse_objects' rules, or a
  box that collapses to no pixel). With one target object the prediction's first object is scored and the
  rest ignored, as the evaluator reads only the first 20 tokens; with several, the union of the valid
  predicted masks against the union of the targets'. "box_accuracy": the share of examples whose first
  predicted box has IoU >= 0.5 with the target's (normalised; an invalid prediction's box scores 0), the
  evaluator's boxacc/0.5. "invalid": examples whose first object is invalid."""
  predictions, targets = list(predictions), list(targets)
  if len(predictions) != len(targets):
    raise ValueError(f"{len(predictions)} predictions but {len(targets)} targets")
  ious, hits, invalid = [], 0, 0
  for text, t in zip(predictions, targets):
    H, W = t["masks"][0].shape
    objs = text_to_masks(vae, text, H, W)
    first_ok = bool(objs) and objs[0]["mask"] is not None
    invalid += not first_ok
    target = np.any(np.stack(t["masks"]), axis=0)
    if len(t["masks"]) == 1:
      ious.append(mask_iou(objs[0]["mask"], target) if first_ok else 0.0)
    else:
      masks = [o["mask"] for o in objs if o["mask"] is not None]
      ious.append(mask_iou(np.any(np.stack(masks), axis=0), target) if masks else 0.0)
    if first_ok:
      loc = parse_objects(text)[0]["loc"]
      hits += _box_iou_yxyx([b / (NUM_LOC_BINS - 1) for b in loc], t["box"]) >= 0.5
  n = len(targets)
  return {"miou": float(np.mean(ious)) if n else 0.0, "box_accuracy": hits / n if n else 0.0,
          "invalid": invalid, "num_examples": n}


@functools.lru_cache(maxsize=4)
def _cached_vae(path: str, mtime_ns: int):
  return load_vae(path)


def load_vae_cached(path) -> dict:
  """load_vae, kept per (path, modification time): evaluation and data loading read the same file often."""
  path = str(path)
  return _cached_vae(path, os.stat(path).st_mtime_ns)
