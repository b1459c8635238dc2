"""UWM calibration pass on a tiny random HF CLIP (uwm.md §2-§5, §11).

Oracle: the torch HF model's target-layer inputs, captured with forward pre-hooks, fed to a NumPy float64
re-implementation of uwm.md §3 written plainly here (full N x d_out x d_in psi tensors). Everything runs in float32
with highest matmul precision; tolerance rtol 2e-4 (float32 activations through 2 layers, ratios of sums).
"""
import numpy as np
import pytest
import jax
import jax.numpy as jnp
from flax import nnx

from vlsafe_jax.methods.uwm import calibrate as cal
from vlsafe_jax.methods.uwm import edit

RTOL = 2e-4

# Every test here uses the `hf_clip` fixture (a torch HF model, also the source of the JAX weights), so the whole
# module needs torch: the mark makes them skip, not error, where the [test] extra is absent.
pytestmark = pytest.mark.torch

# Odd/prime dims: head dim 5, MLP 23, 3x3 patches of 5 px (10 tokens with CLS), 11 text positions.
TEXT = dict(vocab_size=53, hidden_size=20, intermediate_size=23, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=11, eos_token_id=52, bos_token_id=51, pad_token_id=0)
VISION = dict(image_size=15, patch_size=5, hidden_size=20, intermediate_size=23, num_hidden_layers=2,
              num_attention_heads=4)
PROJ = 7
N_PAIRS, BATCH = 7, 4   # two batches, the second padded


@pytest.fixture(scope="module")
def hf_clip(tmp_path_factory):
  import torch
  from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig
  cfg = CLIPConfig(text_config=CLIPTextConfig(projection_dim=PROJ, **TEXT).to_dict(),
                   vision_config=CLIPVisionConfig(projection_dim=PROJ, **VISION).to_dict(), projection_dim=PROJ)
  cfg._attn_implementation = "eager"
  torch.manual_seed(0)
  hf = CLIPModel(cfg).eval()
  d = tmp_path_factory.mktemp("uwm_hf_clip")
  hf.save_pretrained(d)
  from vlsafe_jax.models.clip import CLIP
  return hf, d, CLIP.from_pretrained(d)


def _data(seed=0):
  rng = np.random.RandomState(seed)
  px = rng.randn(2, N_PAIRS, VISION["image_size"], VISION["image_size"], 3).astype(np.float32)
  t = TEXT["max_position_embeddings"]
  ids = rng.randint(1, 50, size=(2, N_PAIRS, t))
  mask = np.zeros((2, N_PAIRS, t), np.int32)
  lengths = rng.randint(3, t + 1, size=(2, N_PAIRS))
  for s in range(2):
    for n in range(N_PAIRS):
      L = lengths[s, n]
      ids[s, n, 0] = TEXT["bos_token_id"]
      ids[s, n, L - 1] = TEXT["eos_token_id"]
      ids[s, n, L:] = 0
      mask[s, n, :L] = 1
  return px, ids, mask


def _batches(px, ids, mask):
  def vision():
    for i in range(0, N_PAIRS, BATCH):
      yield {"safe": px[0, i:i + BATCH], "unsafe": px[1, i:i + BATCH]}

  def text():
    for i in range(0, N_PAIRS, BATCH):
      yield {"safe": ids[0, i:i + BATCH], "unsafe": ids[1, i:i + BATCH], "safe_mask": mask[0, i:i + BATCH],
             "unsafe_mask": mask[1, i:i + BATCH]}
  return {"vision": vision, "text": text}


def _hf_captures(hf, px, ids, mask):
  """Inputs of every vision fc2 / text out_proj, by forward pre-hooks on the torch modules."""
  import torch
  got = {}
  hooks = []
  for i, layer in enumerate(hf.vision_model.encoder.layers):
    hooks.append(layer.mlp.fc2.register_forward_pre_hook(
        lambda m, a, i=i: got.__setitem__(f"vision_model.encoder.layers.{i}.mlp.fc2", a[0].detach().numpy())))
  for i, layer in enumerate(hf.text_model.encoder.layers):
    hooks.append(layer.self_attn.out_proj.register_forward_pre_hook(
        lambda m, a, i=i: got.__setitem__(f"text_model.encoder.layers.{i}.self_attn.out_proj",
                                          a[0].detach().numpy())))
  out = {}
  with torch.no_grad():
    for side in range(2):
      got.clear()
      hf.get_image_features(pixel_values=torch.from_numpy(px[side].transpose(0, 3, 1, 2).copy()))
      hf.get_text_features(input_ids=torch.from_numpy(ids[side]), attention_mask=torch.from_numpy(mask[side]))
      out[side] = dict(got)
  for h in hooks:
    h.remove()
  weights = {k: hf.get_submodule(k).weight.detach().numpy().astype(np.float64) for k in out[0]}
  return out, weights


def naive_uwm(w_oi, xs, xu, eps, prior, vs=None, vu=None):
  """uwm.md §3 per weight: psi_ij = O_i I_j / (s_j + eps), mean over pairs of psi^uns / psi^sf; torch layout."""
  d_out, d_in = w_oi.shape

  def psi(x_td):
    a = np.sqrt((x_td ** 2).sum(0))
    s = x_td.std(0, ddof=1)
    o = (np.abs(w_oi) * a[None, :]).sum(1) / d_in                # O_i
    inp = a * np.abs(w_oi).sum(0) / d_out                         # I_j
    return o[:, None] * inp[None, :] / (s[None, :] + eps)         # (d_out, d_in)

  ratios = []
  for n in range(xs.shape[0]):
    x_s = xs[n] if vs is None else xs[n][vs[n].astype(bool)]
    x_u = xu[n] if vu is None else xu[n][vu[n].astype(bool)]
    ratios.append(psi(x_u.astype(np.float64)) / psi(x_s.astype(np.float64)))
  r = np.mean(ratios, 0)
  return np.abs(w_oi) * r if prior else r


@pytest.fixture(scope="module")
def edited(hf_clip):
  _, _, model = hf_clip
  px, ids, mask = _data()
  res = cal.uwm_clip(model, _batches(px, ids, mask), edit.UWMConfig(), mesh=None)
  return res


def test_scores_match_numpy_reference_on_hf_captures(hf_clip, edited):
  hf, _, _ = hf_clip
  px, ids, mask = _data()
  caps, weights = _hf_captures(hf, px, ids, mask)
  assert set(caps[0]) == set(edited.scores)                       # 2 fc2 + 2 out_proj by default patterns
  for name, r_io in edited.scores.items():
    text = name.startswith("text")
    ref = naive_uwm(weights[name], caps[0][name], caps[1][name], eps=0.0 if text else 1e-8, prior=text,
                    vs=mask[0] if text else None, vu=mask[1] if text else None)
    np.testing.assert_allclose(np.asarray(r_io).T, ref, rtol=RTOL, err_msg=name)
  # masks are the tau = 0.02 selection of the scores, negated in the new model
  for name, m in edited.masks.items():
    np.testing.assert_array_equal(np.asarray(m), np.asarray(edit.select(edited.scores[name], 0.02)))
  assert edited.info["text"]["pairs"] == N_PAIRS and edited.info["vision"]["pairs"] == N_PAIRS


def test_text_statistics_ignore_padding(hf_clip, edited):
  _, _, model = hf_clip
  px, ids, mask = _data()
  ids2 = np.where(mask == 1, ids, np.random.RandomState(5).randint(1, 50, size=ids.shape))   # new pad tokens
  assert not np.array_equal(ids, ids2)
  b = _batches(px, ids2, mask)
  res = cal.calibrate(cal.clip_encode_fn(nnx.split(model)[0], "text", ("self_attn.out_proj",)),
                      nnx.split(model)[1], b["text"](), edit.TEXT_TARGETS, edit.UWMConfig().score_config("text"),
                      mesh=None)
  for name, r in res.scores.items():
    np.testing.assert_allclose(np.asarray(r), np.asarray(edited.scores[name]), rtol=1e-6, err_msg=name)


def _params(model):
  return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def test_alpha_one_bit_identical_and_input_untouched(hf_clip, edited):
  _, _, model = hf_clip
  before = _params(model)
  px, ids, mask = _data()
  cfg = edit.UWMConfig()
  cfg1 = edit.UWMConfig(vision=edit.TowerConfig(edit.VISION_TARGETS, alpha=1.0),
                        text=edit.TowerConfig(edit.TEXT_TARGETS, alpha=1.0, eps=0.0, magnitude_prior=True))
  res1 = cal.uwm_clip(model, _batches(px, ids, mask), cfg1, mesh=None)
  assert sum(int(m.sum()) for m in res1.masks.values()) > 0       # something was selected, alpha = 1 keeps it
  jax.tree.map(np.testing.assert_array_equal, _params(res1.model), before)
  # the alpha = -1 edit (fixture) changed exactly the selected kernel entries and left the input model alone
  jax.tree.map(np.testing.assert_array_equal, _params(model), before)
  after = _params(edited.model)
  flat_b = dict(jax.tree_util.tree_flatten_with_path(before)[0])
  for path, new in jax.tree_util.tree_flatten_with_path(after)[0]:
    name = ".".join(str(getattr(k, "key", k)) for k in path)
    layer = name[:-len(".kernel")]
    if layer in edited.masks:
      m = np.asarray(edited.masks[layer])
      np.testing.assert_array_equal(new, np.where(m, -flat_b[path], flat_b[path]))
    else:
      np.testing.assert_array_equal(new, flat_b[path])
  assert cfg.vision.alpha == -1.0


def test_sharded_calibration_equals_single_device(hf_clip, edited):
  _, _, model = hf_clip
  assert jax.device_count() == 8
  px, ids, mask = _data()
  b = _batches(px, ids, mask)
  graphdef, state = nnx.split(model)
  res = cal.calibrate(cal.clip_encode_fn(graphdef, "vision", ("mlp.fc2",)), state, b["vision"](),
                      edit.VISION_TARGETS, edit.UWMConfig().score_config("vision"), mesh="auto")
  for name, r in res.scores.items():
    assert len(r.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(r), np.asarray(edited.scores[name]), rtol=1e-5, err_msg=name)
  assert res.pairs == N_PAIRS


def test_masked_model_matches_edit_and_alpha_sweep(hf_clip, edited):
  _, _, model = hf_clip
  px, ids, mask = _data()
  mm = cal.masked_model(model, edited.masks, alpha=-1.0)
  f = nnx.jit(lambda m, x, t, k: (m.encode_image(x), m.encode_text(t, k)))
  x, t, k = jnp.asarray(px[1]), jnp.asarray(ids[1]), jnp.asarray(mask[1])
  for a, b in zip(f(mm, x, t, k), f(edited.model, x, t, k)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  cal.set_alpha(mm, 1.0)
  for a, b in zip(f(mm, x, t, k), f(model, x, t, k)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_edited_model_exports_to_hf_and_reloads(hf_clip, edited, tmp_path):
  import torch
  from transformers import CLIPModel
  from checkpoints_convert import clip as convert
  _, _, model = hf_clip
  out = convert.export_hf(edited.model, tmp_path / "hf")
  hf2 = CLIPModel.from_pretrained(out, attn_implementation="eager").eval()
  px, ids, mask = _data()
  with torch.no_grad():
    ti = hf2.get_image_features(pixel_values=torch.from_numpy(px[1].transpose(0, 3, 1, 2).copy()))
    tt = hf2.get_text_features(input_ids=torch.from_numpy(ids[1]), attention_mask=torch.from_numpy(mask[1]))
  ti = getattr(ti, "pooler_output", ti).numpy()
  tt = getattr(tt, "pooler_output", tt).numpy()
  ji = np.asarray(edited.model.encode_image(jnp.asarray(px[1])))
  jt = np.asarray(edited.model.encode_text(jnp.asarray(ids[1]), jnp.asarray(mask[1])))
  np.testing.assert_allclose(ti, ji, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(tt, jt, rtol=1e-4, atol=1e-5)
  # and the edit is visible: the original model's embeddings differ
  assert not np.allclose(np.asarray(model.encode_image(jnp.asarray(px[1]))), ji, atol=1e-5)


# --------------------------------------------------------------------------------------------------------------
# Gradient baselines (uwm.md §8): mean |dL/dW| vs torch autograd on the HF model, hard top-k, alpha = 0.

def _quad_batches(px, ids, mask, size=4):
  def gen():
    for i in range(0, N_PAIRS, size):
      yield {"safe_image": px[0, i:i + size], "unsafe_image": px[1, i:i + size], "safe_ids": ids[0, i:i + size],
             "unsafe_ids": ids[1, i:i + size], "safe_mask": mask[0, i:i + size], "unsafe_mask": mask[1, i:i + size]}
  return gen


def _torch_losses(tower, method, e):
  import torch
  cos = lambda a, b: torch.nn.functional.cosine_similarity(a, b, dim=-1)  # noqa: E731
  if method == "g_unsafe":
    q = e["I_s"] if tower == "vision" else e["T_s"]
    pos, neg = (e["T_s"], e["T_u"]) if tower == "vision" else (e["I_s"], e["I_u"])
    return (-(1 - cos(q, pos)) + (1 - cos(q, neg))).mean()
  a, b = (e["T_u"], e["I_s"]) if tower == "vision" else (e["I_u"], e["T_s"])
  an, bn = a / a.norm(dim=-1, keepdim=True), b / b.norm(dim=-1, keepdim=True)
  logits = float(np.exp(4.6052)) * an @ bn.T
  lab = torch.arange(a.shape[0])
  nce = 0.5 * (torch.nn.functional.cross_entropy(logits, lab) + torch.nn.functional.cross_entropy(logits.T, lab))
  same = (e["I_s"], e["I_u"]) if tower == "vision" else (e["T_s"], e["T_u"])
  return nce + (1 - cos(*same)).mean()


@pytest.mark.parametrize("method,tower", [("g_unsafe", "vision"), ("g_safe_clip", "text")])
def test_gradient_baselines_match_torch_autograd(hf_clip, method, tower):
  import torch
  from vlsafe_jax.methods.uwm import baselines as bl
  hf, _, model = hf_clip
  px, ids, mask = _data()
  res = bl.baseline_clip(model, {tower: _quad_batches(px, ids, mask)}, method)
  pattern = "mlp.fc2" if tower == "vision" else "self_attn.out_proj"
  names = [n for n, _ in hf.named_modules() if n.endswith(pattern) and n.startswith(tower)]
  acc = {n: 0.0 for n in names}
  nb = 0
  for b in _quad_batches(px, ids, mask)():
    hf.zero_grad()
    t = lambda x: torch.from_numpy(np.ascontiguousarray(x))  # noqa: E731
    feats = lambda o: getattr(o, "pooler_output", o)  # noqa: E731
    e = {"I_s": feats(hf.get_image_features(pixel_values=t(b["safe_image"].transpose(0, 3, 1, 2)))),
         "I_u": feats(hf.get_image_features(pixel_values=t(b["unsafe_image"].transpose(0, 3, 1, 2)))),
         "T_s": feats(hf.get_text_features(input_ids=t(b["safe_ids"]), attention_mask=t(b["safe_mask"]))),
         "T_u": feats(hf.get_text_features(input_ids=t(b["unsafe_ids"]), attention_mask=t(b["unsafe_mask"])))}
    _torch_losses(tower, method, e).backward()
    for n in names:
      acc[n] = acc[n] + hf.get_submodule(n).weight.grad.abs().numpy().astype(np.float64)
    nb += 1
  keep = bl.BASELINES[method].keep
  for n in names:
    ref = acc[n] / nb
    np.testing.assert_allclose(np.asarray(res.scores[n]).T, ref, rtol=1e-3, atol=1e-7 * np.abs(ref).max(),
                               err_msg=n)
    m = np.asarray(res.masks[n])
    assert m.sum() == round((1 - keep) * m.size)                         # hard top-k per layer
    assert np.asarray(res.scores[n])[m].min() >= np.asarray(res.scores[n])[~m].max()
  # alpha = 0: selected entries zeroed, everything else (incl. the input model) unchanged
  before, after = _params(model), _params(res.model)
  for path, new in jax.tree_util.tree_flatten_with_path(after)[0]:
    name = ".".join(str(getattr(k, "key", k)) for k in path)[:-len(".kernel")]
    old = dict(jax.tree_util.tree_flatten_with_path(before)[0])[path]
    expect = np.where(np.asarray(res.masks[name]), 0.0, old) if name in res.masks else old
    np.testing.assert_array_equal(new, expect)
