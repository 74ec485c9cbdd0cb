"""Scoring models: zoo tasks (`mergewise eval`) and an lm-eval-harness adapter, over one loader."""

from mergewise.evaluate.loading import LoadedModel, load_model
from mergewise.evaluate.zoo_eval import evaluate_model, format_table

__all__ = ["LoadedModel", "evaluate_model", "format_table", "load_model"]
