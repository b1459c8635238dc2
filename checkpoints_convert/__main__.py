"""``python -m checkpoints_convert SUBCOMMAND ...``: HF <-> vlsafe_jax checkpoint conversion (CPU only).

  clip    --src HF_DIR --dst OUT_DIR [--param-dtype float32|bfloat16|float16]
  export  --src OUT_DIR --dst HF_DIR [--dtype ...]     converted (or HF) CLIP dir -> HF CLIPModel dir
  llava   --src HF_DIR --dst OUT_DIR [--param-dtype ...]    HF LLaVA (either vision naming) -> converted dir
  llava-export --src DIR --dst HF_DIR [--dtype ...] [--vision-naming v5|hub]   converted/HF LLaVA -> HF layout
  llama   --src HF_DIR --dst OUT_DIR [--param-dtype ...]    HF Llama/Mistral causal LM -> converted dir
  hysac   --src hysac_model.pth [--bounds hysac_bounds.json] --base HF_CLIP_DIR --dst OUT_DIR
          released HySAC weights -> HySAC trainable-state dir (methods/hysac/model.py load_hysac)

New model families add a module with their key table and ``Family`` record, an entry in :data:`_FAMILIES` and a
sub-parser in ``_parser()``. This entry point is the one place in the package that imports the model classes: it
hands them to the generic loader (the family modules sit below ``vlsafe_jax.models``).
"""
from __future__ import annotations

import os

# Converters run on the host: never grab an accelerator (set before JAX is imported).
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

from checkpoints_convert import clip, hysac, llama, llava  # noqa: E402
from checkpoints_convert.mapping import ConversionError, dtype_from_name  # noqa: E402
from checkpoints_convert.safetensors_io import CheckpointFormatError  # noqa: E402
from vlsafe_jax.methods.hysac import model as hysac_model  # noqa: E402
from vlsafe_jax.models import lora  # noqa: E402
from vlsafe_jax.models.clip import CLIP  # noqa: E402
from vlsafe_jax.models.llama import Llama  # noqa: E402
from vlsafe_jax.models.llava import Llava  # noqa: E402

_DTYPES = ("float32", "bfloat16", "float16")
# Sub-command -> (family record, model class): from_pretrained reads HF or converted directories.
_FAMILIES = {"clip": (clip.CLIP_FAMILY, CLIP), "llava": (llava.LLAVA_FAMILY, Llava),
             "llama": (llama.LLAMA_FAMILY, Llama)}


def _build_hysac(base, **options):
  return hysac_model.HySAC.from_pretrained(base, hysac_model.HySACOptions(**options))


# What the released-weights importer needs from the HySAC model code.
HYSAC_CODE = hysac.HySACModelCode(build=_build_hysac, lora_sites=lora.lora_sites, save=hysac_model.save_trainable)


def _cmd_convert(args) -> None:
  """``clip`` / ``llava`` / ``llama``: HF directory -> converted directory."""
  family, model_cls = _FAMILIES[args.cmd]
  t0 = time.perf_counter()
  model = model_cls.from_pretrained(args.src, param_dtype=dtype_from_name(args.param_dtype))
  out = family.save_converted(model, args.dst, src=args.src)
  print(f"converted {args.src} -> {out} in {time.perf_counter() - t0:.1f} s")


def _cmd_export(args) -> None:
  t0 = time.perf_counter()
  out = clip.export_hf(CLIP.from_pretrained(args.src), args.dst, dtype=dtype_from_name(args.dtype), src=args.src)
  print(f"exported {args.src} -> {out} (HF CLIP layout) in {time.perf_counter() - t0:.1f} s")


def _cmd_hysac(args) -> None:
  t0 = time.perf_counter()
  out = hysac.convert(args.src, args.base, args.dst, code=HYSAC_CODE, bounds=args.bounds,
                      lora_alpha=args.lora_alpha, check_base=not args.no_check_base)
  print(f"imported {args.src} -> {out} (base CLIP {args.base}) in {time.perf_counter() - t0:.1f} s")


def _cmd_llava_export(args) -> None:
  t0 = time.perf_counter()
  out = llava.export_hf(Llava.from_pretrained(args.src), args.dst, dtype=dtype_from_name(args.dtype),
                        vision_naming=args.vision_naming, src=args.src)
  print(f"exported {args.src} -> {out} (HF LLaVA layout, {args.vision_naming} vision naming) in "
        f"{time.perf_counter() - t0:.1f} s")


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m checkpoints_convert", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="cmd", required=True)
  c = sub.add_parser("clip", help="HF CLIP directory -> vlsafe_jax converted directory")
  c.add_argument("--src", required=True, help="HF directory: config.json + model.safetensors / shards / .bin")
  c.add_argument("--dst", required=True)
  c.add_argument("--param-dtype", choices=_DTYPES, default=None, help="default: keep the checkpoint dtype")
  c.set_defaults(fn=_cmd_convert)
  e = sub.add_parser("export", help="vlsafe_jax CLIP directory -> HF CLIPModel directory")
  e.add_argument("--src", required=True)
  e.add_argument("--dst", required=True)
  e.add_argument("--dtype", choices=_DTYPES, default=None, help="default: as stored")
  e.set_defaults(fn=_cmd_export)
  lv = sub.add_parser("llava", help="HF LLaVA directory -> vlsafe_jax converted directory")
  lv.add_argument("--src", required=True, help="HF directory: config.json + model.safetensors / shards + index")
  lv.add_argument("--dst", required=True)
  lv.add_argument("--param-dtype", choices=_DTYPES, default=None, help="default: keep the checkpoint dtype")
  lv.set_defaults(fn=_cmd_convert)
  le = sub.add_parser("llava-export", help="vlsafe_jax (or HF) LLaVA directory -> HF LLaVA directory")
  le.add_argument("--src", required=True)
  le.add_argument("--dst", required=True)
  le.add_argument("--dtype", choices=_DTYPES, default=None, help="default: as stored")
  le.add_argument("--vision-naming", choices=("v5", "hub"), default="v5",
                  help="v5: vision_tower.* (transformers 5); hub: vision_tower.vision_model.* (llava-hf)")
  le.set_defaults(fn=_cmd_llava_export)
  lm = sub.add_parser("llama", help="HF Llama/Mistral causal-LM directory -> vlsafe_jax converted directory")
  lm.add_argument("--src", required=True)
  lm.add_argument("--dst", required=True)
  lm.add_argument("--param-dtype", choices=_DTYPES, default=None, help="default: keep the checkpoint dtype")
  lm.set_defaults(fn=_cmd_convert)
  h = sub.add_parser("hysac", help="released HySAC hysac_model.pth -> HySAC trainable-state directory")
  h.add_argument("--src", required=True, help="hysac_model.pth (torch state dict; loaded with weights_only=True)")
  h.add_argument("--base", required=True, help="the HF CLIP directory it was fine-tuned from (ViT-L/14)")
  h.add_argument("--dst", required=True)
  h.add_argument("--bounds", default=None, help="hysac_bounds.json (copied to DST/bounds.json after checks)")
  h.add_argument("--lora-alpha", type=float, default=1.0, help="PEFT lora_alpha (not in the state dict; HySAC: 1)")
  h.add_argument("--no-check-base", action="store_true",
                 help="do not compare the checkpoint's base weights with --base")
  h.set_defaults(fn=_cmd_hysac)
  return p


def main(argv: list[str] | None = None) -> None:
  args = _parser().parse_args(argv)
  try:
    args.fn(args)
  except (ConversionError, CheckpointFormatError) as e:
    raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
  main(sys.argv[1:])
