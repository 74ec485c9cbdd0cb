"""Run many mergekit-moe recipes in one process (its start-up costs seconds), each with the random
seed and flags `mergekit-moe` would get on its command line.

    python mergekit_moe_runner.py JOBS.json RESULTS.json

JOBS.json: a list of {"name", "recipe", "out", "cwd", "seed"}; RESULTS.json: {name: {"built", "error"}}.
"""

from __future__ import annotations

import json
import os
import sys
import traceback


def main(jobs_path: str, results_path: str) -> None:
    import yaml
    from mergekit.moe.config import MoEMergeConfig
    from mergekit.options import MergeOptions
    from mergekit.scripts.moe import build

    with open(jobs_path, encoding="utf-8") as file:
        jobs = json.load(file)
    results = {}
    for job in jobs:
        os.chdir(job["cwd"])
        options = MergeOptions(random_seed=job["seed"], quiet=True, device="cpu")
        options.apply_global_options()  # seeds torch as the command line does
        try:
            with open(job["recipe"], encoding="utf-8") as file:
                config = MoEMergeConfig.model_validate(yaml.safe_load(file.read()))
            build(config, job["out"], merge_options=options, device="cpu")
            results[job["name"]] = {"built": True}
        except (Exception, SystemExit) as error:  # mergekit-moe refuses with whatever it raises, or exits
            last = traceback.format_exception_only(type(error), error)[-1].strip()
            results[job["name"]] = {"built": False, "error": last[:2000]}
    with open(results_path, "w", encoding="utf-8") as file:
        json.dump(results, file, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
