"""``python -m vlsafe_jax.tga analyze --config CONFIG [--workdir DIR] [--model DIR] [--variant V] [key=value ...]``.

The logit-lens analysis of TGA (tga.md §1; :mod:`vlsafe_jax.methods.tga.analysis`) for a trained or pretrained
LLaVA: per-layer refusal-token ranks / probabilities for image vs text conditions, the safety start / end layers,
and the per-layer cosine between image-token and description-token hidden states; writes ``analysis.json``,
``analysis.txt`` and ``analysis.png`` to ``<workdir>/analysis/<variant>/`` (or ``analysis.out_dir``).

Model: ``--model DIR`` (an HF or converted LLaVA directory), else the run's ``<workdir>/final/<variant>``, else
``model.path``. Items: ``analysis.manifest`` (JSONL ``{"id", "image", "caption": description, "scene"?}``), or,
for ``data.kind=synthetic``, the unseen hazard images of the synthetic setting.
"""
from __future__ import annotations

import sys
from pathlib import Path

from vlsafe_jax import config as config_lib


def analyze(cfg, workdir: Path, model_dir: str | None, variant: str) -> dict:
  from vlsafe_jax.methods.tga import analysis
  a = cfg.get("analysis") or {}
  src = Path(model_dir) if model_dir else workdir / "final" / variant
  if cfg.data.kind == "synthetic":
    from vlsafe_jax.data import synthetic_vlm, tga_synthetic
    if not src.exists():
      raise SystemExit(f"no trained model in {src}; run `python -m vlsafe_jax.train --config ...` first or pass "
                       f"--model")
    model, tok = synthetic_vlm.load(src)
    data = tga_synthetic.TGASynthetic(cfg.data.seed, 1, cfg.data.eval_size, cfg.data.image_size)
    items = data.toxic_items()
    refusal = [tok.token_to_id[w] for w in a.get("refusal_words", ("sorry", "i"))]
    image_question = tga_synthetic.DESCRIBE_IMAGE
    text_template = tga_synthetic.DESCRIBE_TEXT
  else:
    from vlsafe_jax.data import tokenize
    from vlsafe_jax.eval import vlm_safety
    from vlsafe_jax.models.llava import Llava
    path = src if src.exists() else Path(cfg.model.path)
    if not a.get("manifest"):
      raise SystemExit("analysis.manifest is required: JSONL rows {id, image, caption (the text description)}")
    model = Llava.from_pretrained(path)
    tok = tokenize.load_tokenizer(path if (path / "tokenizer_config.json").exists() else cfg.model.path)
    items = vlm_safety.read_jsonl(a["manifest"], default_question=analysis.IMAGE_QUESTION)
    refusal = list(a.get("refusal_ids", analysis.DEFAULT_REFUSAL_IDS))
    image_question, text_template = analysis.IMAGE_QUESTION, analysis.TEXT_TEMPLATE
  print("refusal tokens:", {i: tok.decode([i]) for i in refusal})
  result = analysis.analyze(model, tok, items, refusal_ids=refusal, template=cfg.tga.template,
                            system=cfg.tga.system or None, batch_size=int(a.get("batch_size", 8)),
                            image_question=image_question, text_template=text_template)
  out = Path(a.get("out_dir") or workdir / "analysis" / variant)
  analysis.write_outputs(result, out)
  print(analysis.format_table(result))
  print(f"wrote {out}/analysis.json, analysis.txt, analysis.png")
  return result


def main(argv: list[str]) -> dict:
  if not argv or argv[0] != "analyze":
    raise SystemExit("usage: python -m vlsafe_jax.tga analyze --config CONFIG [--workdir DIR] [--model DIR] "
                     "[--variant tga|plain] [key=value ...]")
  flags, overrides = config_lib.split_cli(argv[1:])
  unknown = set(flags) - {"config", "workdir", "model", "variant"}
  if unknown:
    raise SystemExit(f"unknown option(s) {sorted('--' + u for u in unknown)}")
  if "config" not in flags:
    raise SystemExit("--config is required (e.g. configs/tga_synthetic.py)")
  cfg = config_lib.load(flags["config"], overrides)
  workdir = Path(flags.get("workdir", Path("runs") / cfg.name))
  return analyze(cfg, workdir, flags.get("model"), flags.get("variant", cfg.variants[0]))


if __name__ == "__main__":
  main(sys.argv[1:])
