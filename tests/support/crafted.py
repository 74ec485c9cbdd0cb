"""Small crafted inputs that Python's parsers take at a cost out of all proportion to their size."""

from __future__ import annotations


def billion_laughs(levels: int, name: str = "a") -> str:
    """A few hundred bytes of YAML that stand for 10**levels values once its aliases are expanded."""
    lines = [f"{name}0: &{name}0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [
        f"{name}{level}: &{name}{level} [{', '.join([f'*{name}{level - 1}'] * 10)}]" for level in range(1, levels)
    ]
    return "\n".join(lines) + "\n"
