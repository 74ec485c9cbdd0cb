"""Run many recipes through mergekit's own Python entry point in one process (its start-up costs
seconds), recording for each whether mergekit merged it or refused it, and why.

    python mergekit_runner.py JOBS.json RESULTS.json

JOBS.json: a list of {"name", "recipe", "out", "cwd"}; each recipe is read as `mergekit-yaml` reads
it, with the working folder `cwd` (where its relative model paths are found).
"""

from __future__ import annotations

import json
import os
import sys
import traceback


def main(jobs_path: str, results_path: str) -> None:
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.io.tasks import LoaderCache
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    with open(jobs_path, encoding="utf-8") as file:
        jobs = json.load(file)
    results = {}
    for job in jobs:
        # mergekit keeps every model's loader for the process, by name: names repeat across recipes
        # (the same model at another depth), so each recipe starts with none.
        LoaderCache().loaders.clear()
        os.chdir(job["cwd"])
        options = MergeOptions(
            random_seed=0, quiet=True, write_model_card=False, lora_merge_cache=os.path.join(job["cwd"], ".lora-cache")
        )
        try:
            with open(job["recipe"], encoding="utf-8") as file:
                config = MergeConfiguration.model_validate(yaml.safe_load(file.read()))
            run_merge(config, job["out"], options=options)
            results[job["name"]] = {"merged": True}
        except Exception as error:  # mergekit refuses a recipe with whatever it raises
            last = traceback.format_exception_only(type(error), error)[-1].strip()
            results[job["name"]] = {"merged": False, "error": last[:2000]}
    with open(results_path, "w", encoding="utf-8") as file:
        json.dump(results, file, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
