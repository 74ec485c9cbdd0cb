"""`mergewise search`: a recipe's numeric values searched on Ray Tune, trials scored on validation
prompts, the winner checked on held-out test prompts.

    from mergewise.search import run_search
    result = run_search("search.yml", "./search-out", trials=32)
"""

from __future__ import annotations

from mergewise.errors import MergewiseError


def run_search(search_file, out_dir, **options):
    """See `mergewise.search.run.run_search`; needs the `search` extra (Ray Tune, Optuna)."""
    try:
        import optuna  # noqa: F401
        import ray.tune  # noqa: F401
    except ImportError as error:
        raise MergewiseError(
            f"mergewise search needs Ray Tune and Optuna ({error.name} is missing): pip install 'mergewise[search]'"
        ) from None
    from mergewise.search.run import run_search as search

    return search(search_file, out_dir, **options)


def summary_table(result) -> str:
    """The best and the baseline recipe side by side, on validation and held-out test prompts."""

    def test_score(entry):
        return "n/a" if entry["test"] is None else f"{entry['test']['score']:.4f}"

    lines = [
        f"{len(result.trials)} trials in {result.seconds:.0f} s; best: trial {result.best['trial']}",
        f"{'recipe':10}  {'validation':>10}  {'test':>8}  values",
    ]
    for name, entry in (("best", result.best), ("baseline", result.baseline)):
        values = ", ".join(f"{key}={value:.4g}" for key, value in entry["values"].items())
        lines.append(f"{name:10}  {entry['validation']:>10.4f}  {test_score(entry):>8}  {values}")
    lines.append(f"written to {result.out_dir} (best.yml, best-model/, trials.csv, search.png, summary.json)")
    return "\n".join(lines)
