"""``python -m checkpoints_convert SUBCOMMAND ...``: HF <-> vlsafe_jax checkpoint conversion (CPU only).

  clip    --src HF_DIR --dst OUT_DIR [--param-dtype float32|bfloat16|float16]
  export  --src OUT_DIR --dst HF_DIR [--dtype ...]     converted (or HF) CLIP dir -> HF CLIPModel dir

New model families add a ``_cmd_<name>(args)`` and a sub-parser in ``_parser()`` (llava, hysac later).
"""
from __future__ import annotations

import os

# Converters run on the host: never grab an accelerator (set before JAX is imported).
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

_DTYPES = ("float32", "bfloat16", "float16")


def _cmd_clip(args) -> None:
  from checkpoints_convert import clip
  t0 = time.perf_counter()
  out = clip.convert_cli(args.src, args.dst, args.param_dtype)
  print(f"converted {args.src} -> {out} in {time.perf_counter() - t0:.1f} s")


def _cmd_export(args) -> None:
  from checkpoints_convert import clip
  t0 = time.perf_counter()
  out = clip.export_cli(args.src, args.dst, args.dtype)
  print(f"exported {args.src} -> {out} (HF CLIP layout) in {time.perf_counter() - t0:.1f} s")


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m checkpoints_convert", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="cmd", required=True)
  c = sub.add_parser("clip", help="HF CLIP directory -> vlsafe_jax converted directory")
  c.add_argument("--src", required=True, help="HF directory: config.json + model.safetensors / shards / .bin")
  c.add_argument("--dst", required=True)
  c.add_argument("--param-dtype", choices=_DTYPES, default=None, help="default: keep the checkpoint dtype")
  c.set_defaults(fn=_cmd_clip)
  e = sub.add_parser("export", help="vlsafe_jax CLIP directory -> HF CLIPModel directory")
  e.add_argument("--src", required=True)
  e.add_argument("--dst", required=True)
  e.add_argument("--dtype", choices=_DTYPES, default=None, help="default: as stored")
  e.set_defaults(fn=_cmd_export)
  return p


def main(argv: list[str] | None = None) -> None:
  args = _parser().parse_args(argv)
  from checkpoints_convert.mapping import ConversionError
  from checkpoints_convert.safetensors_io import CheckpointFormatError
  try:
    args.fn(args)
  except (ConversionError, CheckpointFormatError) as e:
    raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
  main(sys.argv[1:])
