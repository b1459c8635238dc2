"""HySAC evaluator: gallery block order of hysac.md §7.5 on designed embeddings, traversal columns and per-category
R@1 vs numpy brute force, bounds vs numpy, NSFW metrics on hand-built distances, evaluate() run-directory files."""
import json

import numpy as np
import pytest

from vlsafe_jax.eval import hysac_eval as H
from vlsafe_jax.eval import nsfw
from vlsafe_jax.methods.hysac import traversal as T

N, D = 19, 11


def _designed(scale=1.0):
  """Per item i a cluster centre c_i (far apart) and the four sets on a short segment through it:
  T at 0, T* at 1, I at 1.1, I* at 3 (units of 0.05 along a direction u_i orthogonal to c_i). Nearest
  neighbours: T*_i -> I_i, I*_i -> T*_i (texts), T_i -> I_i, I_i -> T_i within the cluster."""
  rng = np.random.default_rng(0)
  c = np.linalg.qr(rng.normal(size=(D + 8, D + 8)))[0][:N, :D]   # not orthonormal in D dims, but well spread
  c = c / np.linalg.norm(c, axis=1, keepdims=True) * 0.8
  u = rng.normal(size=(N, D))
  u -= np.sum(u * c, 1, keepdims=True) * c / np.sum(c * c, 1, keepdims=True)
  u /= np.linalg.norm(u, axis=1, keepdims=True)
  pos = {"T": 0.0, "T*": 1.0, "I": 1.1, "I*": 3.0}
  return {k: (scale * (c + 0.05 * p * u)).astype(np.float32) for k, p in pos.items()}


# Expected R@1 and %safe per task for the designed embeddings (independent of the geometry):
EXPECTED = {
    "T->I": (100.0, None), "I->T": (100.0, None), "T*->I*": (100.0, None), "I*->T*": (100.0, None),
    "T*->I u I*": (100.0, 100.0),     # T*_i's nearest is I_i, in the first block
    "T*->I* u I": (0.0, 0.0),         # GT I*_i is first-block item i, but I_i (second block) wins
    "I*->T u T*": (0.0, 0.0),         # I*_i's nearest text is T*_i (second block)
    "I*->T* u T": (100.0, 100.0),
}


@pytest.mark.parametrize("geometry", ["lorentz", "euclidean"])
def test_gallery_block_order(geometry):
  res = H.retrieval_tasks(_designed(), geometry=geometry, curv=1.7)
  assert set(res["tasks"]) == set(EXPECTED)
  for name, (r1, safe) in EXPECTED.items():
    got = res["tasks"][name]["plain"]
    assert got["R@1"] == r1, name
    if safe is None:
      assert "%safe" not in got, name
    else:
      assert got["%safe"] == safe, name
      assert got["R@5"] == 100.0, name       # the GT is second at worst
    assert "traversal" not in res["tasks"][name]   # no bounds given -> no traversal columns


def _np_negdist(q, g, c):
  inner = q @ g.T - np.outer(np.sqrt(1 / c + (q ** 2).sum(1)), np.sqrt(1 / c + (g ** 2).sum(1)))
  return -np.arccosh(np.maximum(-c * inner, 1 + 1e-8)) / np.sqrt(c)


def _np_recall(scores, ks, first_block=None):
  n = scores.shape[0]
  order = np.argsort(-scores, axis=1, kind="stable")
  rank = np.argmax(order == np.arange(n)[:, None], axis=1)
  out = {f"R@{k}": 100.0 * np.mean(rank < k) for k in ks}
  if first_block is not None:
    out["%safe"] = 100.0 * np.mean(order[:, 0] < first_block)
  return out


def test_traversal_columns_and_per_category_vs_numpy():
  rng = np.random.default_rng(1)
  c = 1.3
  base = rng.normal(size=(N, D)) * 0.6
  e = {k: (base + rng.normal(size=(N, D)) * 0.35 * s).astype(np.float32)
       for k, s in zip(H.SETS, (1.0, 1.2, 1.6, 2.0))}
  e = {k: v * f for (k, v), f in zip(e.items(), (0.8, 1.0, 1.3, 1.6))}
  tags = np.arange(N) % 3
  # bounds from shrunken embeddings, so that tau (> b + 0.2) falls inside the query distances and some queries move
  b = H.bounds({H.BOUND_KEYS[k]: 0.25 * v for k, v in e.items()}, c)
  for variant in ("code", "paper"):
    cfg = {"variant": variant, "ks": (1, 5)}
    res = H.retrieval_tasks(e, geometry="lorentz", curv=c, bounds_=b, tags=tags, tag_names=["a", "b", "cc"],
                            cfg=cfg)
    stat = T.DEFAULT_STAT[variant]
    for name in ("T*->I u I*", "I*->T u T*", "T*->I* u I", "I*->T* u T"):
      task = H.TASKS_BY_NAME[name]
      mode, key = task.traversal
      q, _ = T.safety_traversal(e[task.query], c, b[key][stat], variant=variant, mode=mode)
      q = np.asarray(q, np.float64)
      gal = np.concatenate([e[g] for g in task.gallery]).astype(np.float64)
      want = _np_recall(_np_negdist(q, gal, c), (1, 5), N)
      got = res["tasks"][name]["traversal"]
      for k, v in want.items():
        assert got[k] == pytest.approx(v), (variant, name, k)
      if name in H.REDIRECT_TASKS:
        # per category: galleries restricted to the query's category, numpy argmax per category subset
        for cat, cname in enumerate(["a", "b", "cc"]):
          idx = np.flatnonzero(tags == cat)
          sub = np.concatenate([e[g][idx] for g in task.gallery]).astype(np.float64)
          top = np.argmax(_np_negdist(q[idx], sub, c), axis=1)
          want_c = 100.0 * np.mean(top == np.arange(len(idx)))
          assert res["per_category"][name]["traversal"][cname] == pytest.approx(want_c), (name, cname)
      moved = res["tasks"][name]["traversal"]["moved"]
      assert moved > 0 or mode == "lower", (variant, name, moved)   # the traversal columns are not a no-op
  with pytest.raises(ValueError, match="unknown eval config keys"):
    H.EvalConfig.from_any({"varient": "code"})
  with pytest.raises(ValueError, match=r"missing \['I\*'\]"):
    H.retrieval_tasks({k: v for k, v in e.items() if k != "I*"}, curv=c)
  with pytest.raises(ValueError, match="index-aligned"):
    H.retrieval_tasks({**e, "T": e["T"][:5]}, curv=c)


def test_bounds_match_numpy_and_roundtrip(tmp_path):
  rng = np.random.default_rng(2)
  embs = {k: rng.normal(size=(37, 5)) * s for k, s in zip("SUVG", (0.3, 0.6, 0.9, 1.2))}
  c = 2.5
  b = H.bounds(embs, c)
  assert list(b) == ["S", "U", "V", "G"]
  for k, x in embs.items():
    d = np.arcsinh(np.sqrt(c) * np.linalg.norm(x, axis=1)) / np.sqrt(c)
    np.testing.assert_allclose(b[k]["avg"], d.mean(), rtol=1e-5)
    np.testing.assert_allclose(b[k]["up_95"], np.percentile(d, 95), rtol=1e-5)
    np.testing.assert_allclose(b[k]["low_05"], np.percentile(d, 5), rtol=1e-5)
  assert H.bounds({"T*": embs["U"]}, c) == {"U": b["U"]}       # set names translate to reference keys
  H.save_bounds(tmp_path / "bounds.json", b)
  assert H.load_bounds(tmp_path / "bounds.json") == b
  (tmp_path / "bad.json").write_text(json.dumps({"S": {"avg": 1.0, "up_95": "x", "low_05": 0.1}}))
  with pytest.raises(ValueError, match=r"bad.json: S.up_95 must be a finite number"):
    H.load_bounds(tmp_path / "bad.json")
  (tmp_path / "bad2.json").write_text(json.dumps({"Q": {}}))
  with pytest.raises(ValueError, match=r"unknown keys \['Q'\]"):
    H.load_bounds(tmp_path / "bad2.json")


def test_nsfw_metrics_hand_built():
  # 4 safe (0), 6 NSFW (1); threshold 0.5 -> predictions: safe 0.2 0.4 | 0.6 (FP) 0.5 (not > 0.5: TN);
  # NSFW 0.9 0.8 0.7 0.55 (TP) | 0.3 0.45 (FN)
  s = np.array([0.2, 0.4, 0.6, 0.5, 0.9, 0.8, 0.7, 0.55, 0.3, 0.45])
  y = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
  r = nsfw.classify(s, y, 0.5)
  assert (r["TP"], r["FP"], r["TN"], r["FN"]) == (4, 1, 3, 2)
  assert r["Acc"] == pytest.approx(70.0)
  assert r["FPR"] == pytest.approx(25.0)
  assert r["FNR"] == pytest.approx(100.0 * 2 / 6)
  # NudeNet-style: only NSFW samples -> FPR undefined, printed as the paper does
  r2 = nsfw.classify([0.6, 0.7, 0.4], [1, 1, 1], 0.5)
  assert r2["FPR_defined"] is False and r2["FPR"] == 0.0
  assert nsfw.format_rate(r2, "FPR") == "0.0 (no safe samples)"
  assert r2["Acc"] == pytest.approx(200 / 3) and r2["FNR"] == pytest.approx(100 / 3)
  sw = nsfw.sweep(s, y, [0.1, 0.5, 0.62, 1.0])
  # Acc: 0.1 -> 60 (all NSFW), 0.5 -> 70, 0.62 -> 70 (TP 3, TN 4), 1.0 -> 40 (all safe); ties -> lower threshold
  assert [row["Acc"] for row in sw["rows"]] == pytest.approx([60.0, 70.0, 70.0, 40.0])
  assert sw["best"]["threshold"] == 0.5
  assert "0.5 (best)" in nsfw.format_sweep(sw)
  with pytest.raises(ValueError, match="labels must be bool or 0/1"):
    nsfw.classify(s, y * 2, 0.5)


def test_evaluate_writes_run_directory(tmp_path):
  e = _designed(scale=1.5)
  train = {k: v * 1.01 for k, v in e.items()}
  metrics = tmp_path / "metrics.jsonl"
  metrics.write_text("\n".join(json.dumps({"step": s, "loss": 1 / (s + 1), "entail_t_i": 0.1, "curv": 0.1 * s,
                                           "lr": 1e-4}) for s in range(5)) + "\n")
  tags = np.arange(N) % 7
  names = ["hate", "harassment", "violence", "self-harm", "sexual", "shocking", "illegal activity"]
  clip = H.evaluate_euclidean(e, tags, names)
  res = H.evaluate(e, 1.7, train, tags, names, {"synthetic": True, "model_name": "HySAC"}, tmp_path,
                   baselines={"CLIP (stage 1)": clip})
  saved = json.loads((tmp_path / "eval.json").read_text())
  assert set(saved["tasks"]) == set(EXPECTED)
  assert saved["bounds_source"] == "train"
  assert H.load_bounds(tmp_path / "bounds.json") == H.bounds({H.BOUND_KEYS[k]: v for k, v in train.items()}, 1.7)
  means = saved["root_distance"]["mean"]
  assert saved["root_distance"]["ordered_T<I<T*<I*"] == (means["T"] < means["I"] < means["T*"] < means["I*"])
  stds, sep = saved["root_distance"]["std"], saved["root_distance"]["separation"]
  assert sep["I<T*"] == pytest.approx((means["T*"] - means["I"]) / (0.5 * (stds["I"] + stds["T*"])))
  assert set(saved["nsfw"]) == {"image", "text"}
  assert set(saved["per_category"]["T*->I u I*"]["traversal"]) == set(names)
  assert "CLIP (stage 1)" in saved["baselines"]
  for p in ("root_distance_hist.png", "recall_r1.png", "train_loss.png", "train_scalars.png", "train_lr.png"):
    assert (tmp_path / "plots" / p).stat().st_size > 1000, p
  table = res["table_md"]
  assert table.startswith("**Synthetic benchmark**")
  for row in ("| CLIP (stage 1)", "| HySAC ", "| HySAC (no traversal)"):
    assert row in table
  cat = H.category_table({"CLIP (stage 1)": clip, "HySAC": res})
  assert cat.splitlines()[0].split("|")[2].strip() == "hate"


def test_evaluate_cli_names_what_is_missing(tmp_path):
  from vlsafe_jax import evaluate as cli
  with pytest.raises(SystemExit, match="no config.json"):
    cli.main(["--workdir", str(tmp_path)])
  (tmp_path / "config.json").write_text(json.dumps({"trainer": "hysac", "base_path": "", "ablations": ["wo_ent"],
                                                    "eval": {"variant": "code"}}))
  with pytest.raises(SystemExit, match="clip_base is missing"):
    cli.main(["--workdir", str(tmp_path), "eval.stat=avg"])
  with pytest.raises(KeyError, match="unknown config key 'eval.varient'"):
    cli.main(["--workdir", str(tmp_path), "eval.varient=paper"])
  (tmp_path / "clip_base").mkdir()
  (tmp_path / "clip_base" / "config.json").write_text("{}")
  with pytest.raises(SystemExit, match=r"trained HySAC state missing in .*hysac/hysac.*hysac/wo_ent"):
    cli.main(["--workdir", str(tmp_path), "--bounds-only"])
