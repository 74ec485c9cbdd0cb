"""`mergewise demo`: build a tiny model family offline and merge it two ways, end to end."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="build tiny models offline and merge them (smoke demo)")
    parser.add_argument("--out", default=None, help="folder for the models and merges (default: a temp folder)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> None:
    import yaml

    from mergewise.engine import run_merge
    from mergewise.tiny_models import build_family, read_state_dict

    root = Path(args.out or tempfile.mkdtemp(prefix="mergewise-demo-"))
    family = build_family("llama", root / "models")
    print(f"built base + {len(family.fine_tunes)} fine-tunes under {root / 'models'}")
    recipes = {
        "linear": {"merge_method": "linear", "dtype": "bfloat16",
                   "models": [{"model": str(path), "parameters": {"weight": 1.0}} for path in family.fine_tunes]},
        "ties": {"merge_method": "ties", "base_model": str(family.base), "dtype": "bfloat16",
                 "parameters": {"density": 0.5, "weight": 1.0},
                 "models": [{"model": str(path)} for path in family.fine_tunes]},
    }
    base = read_state_dict(family.base)
    for name, recipe in recipes.items():
        config_path = root / f"{name}.yml"
        config_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        merged_dir = run_merge(config_path, root / f"merged-{name}", overwrite=True, quiet=True)
        merged = read_state_dict(merged_dir)
        drift = sum(float((merged[key].float() - base[key].float()).norm()) for key in base) / \
            sum(float(base[key].float().norm()) for key in base)
        print(f"{name:>7}: {merged_dir}  (relative distance from base {drift:.4f})")
