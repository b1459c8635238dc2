"""Markdown tables (synthetic) from ``scripts/uwm_vision_probe.py`` summaries: mean ± std (ddof 0) over seeds.

  PYTHONPATH=. python scripts/uwm_vision_table.py [--out runs/uwmvis] SETTING ...
"""
import argparse
import json
from pathlib import Path

COLS = ("P^t_s", "P^t_u", "P^v_s", "P^v_u", "Txt_s", "Img_s", "GS", "T_s-V_s R@10", "V_s-T_s R@10", "zero-shot")


def fmt(v):
  return f"{v[0]:.1f} ± {v[1]:.1f}"


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("settings", nargs="+")
  ap.add_argument("--out", default="runs/uwmvis")
  a = ap.parse_args()
  print("| setting | model | " + " | ".join(COLS) + " |")
  print("|---|---|" + "---|" * len(COLS))
  for s in a.settings:
    d = json.loads((Path(a.out) / s / "summary.json").read_text())
    print(f"| {s} | unedited | " + " | ".join(fmt(d[f"base {k}"]) for k in COLS) + " |")
    for e in ("text", "vision", "both"):
      print(f"| {s} | {e} edit, delta | " + " | ".join(fmt(d[f"delta {e} {k}"]) for k in COLS) + " |")
  print()
  print("| setting | motif: patches touched / > half covered | vision median R | vision top-1% mass | "
        "vision weights selected (tau 0.02) |")
  print("|---|---|---|---|---|")
  for s in a.settings:
    d = json.loads((Path(a.out) / s / "summary.json").read_text())
    print(f"| {s} | {d['motif patches_touched']:.2f} / {d['motif patches_covered_over_half']:.2f} | "
          f"{d['probe vision median_R'][0]:.3f} ± {d['probe vision median_R'][1]:.3f} | "
          f"{100 * d['probe vision top1pct_mass'][0]:.2f}% ± {100 * d['probe vision top1pct_mass'][1]:.2f} | "
          f"{100 * d['probe vision selected_frac'][0]:.2f}% ± {100 * d['probe vision selected_frac'][1]:.2f} |")


if __name__ == "__main__":
  main()
