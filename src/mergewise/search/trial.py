"""One trial of a search, as Ray Tune runs it in a worker: a streaming merge into the trial's own
folder, then its score on the validation prompts."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from mergewise.checkpoint.files import read_json
from mergewise.search.objective import score_model
from mergewise.search.space import Objective, SearchRecipe


@dataclass(frozen=True)
class TrialSetup:
    """What every trial shares (sent once to the workers)."""

    search: SearchRecipe  # its template reads AIM statistics from a file calibrated once
    objective: Objective  # paths resolved
    models_dir: Path  # each trial merges into models_dir / trial id
    records_dir: Path  # and records its result in records_dir / <trial id>.json
    threads: int
    device: str

    def merge(self, values: dict, out_dir: Path) -> None:
        from mergewise import merge
        from mergewise.config import load_recipe

        recipe = load_recipe(self.search.concrete(values), config_dir=self.search.config_dir, origin=self.search.origin)
        merge(
            recipe,
            out_dir,
            overwrite=True,
            quiet=True,
            threads=self.threads,
            device=self.device,
            seed=self.search.settings.seed,
            model_card=False,
        )


def run_trial(config: dict, setup: TrialSetup) -> None:
    """A trial that finished before an interruption reports its recorded result again: Ray's saved
    state may predate its end, and `--resume` must not redo it."""
    from ray import tune

    trial = tune.get_context().get_trial_id()
    record = setup.records_dir / f"{trial}.json"
    if record.is_file():
        tune.report(read_json(record, "trial record", finite=False))
        return
    started = time.time()
    out_dir = setup.models_dir / trial
    setup.merge(config, out_dir)
    merged = time.time()
    result = score_model(out_dir, setup.objective, "validation", setup.device)
    metrics = {
        "score": result["score"],
        **{f"task:{name}": value for name, value in result["tasks"].items()},
        "merge_s": round(merged - started, 2),
        "eval_s": round(time.time() - merged, 2),
        "finished": datetime.now().isoformat(timespec="seconds"),
    }
    setup.records_dir.mkdir(parents=True, exist_ok=True)
    temporary = record.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(metrics), encoding="utf-8")
    os.replace(temporary, record)
    tune.report(metrics)
