"""Markdown table of ``scripts/erosion.py`` results: ``PYTHONPATH=. python scripts/erosion_table.py [OUT]``
(OUT default runs/erosion); one row per variant, mean ± half-range over the seeds in its summary.json."""
import json
import sys
from pathlib import Path

COLS = ("refusal_text", "refusal_scene", "refusal_blank", "refusal_noise", "comply_scene", "comply_noise",
        "benign_text", "benign_scene", "grounded", "norm_ratio")


def main(argv):
  out = Path(argv[0] if argv else "runs/erosion")
  print("| variant | seeds | " + " | ".join(COLS) + " |")
  print("|---|---|" + "---|" * len(COLS))
  for p in sorted(out.glob("*/summary.json")):
    s = json.loads(p.read_text())
    if "refusal_text" not in s:
      continue
    cells = []
    for c in COLS:
      v = s.get(c)
      if v is None:
        cells.append("-")
        continue
      fmt = "{:.1f}" if c == "norm_ratio" else "{:.0f}"
      cells.append((fmt + " ± " + fmt).format(v["mean"], (v["max"] - v["min"]) / 2))
    print(f"| {p.parent.name} | {len(s['seeds'])} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
  main(sys.argv[1:])
