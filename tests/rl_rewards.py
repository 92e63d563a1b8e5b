"""Reward functions used by the RL tests through `objective.reward: rl_rewards:NAME`."""

import re


def is_number(completion: str, row: dict) -> float:
    """1.0 when the answer is a bare number (a format reward the tiny base rarely meets)."""
    return float(re.fullmatch(r"-?\d+", completion.strip()) is not None)


def explode(completion: str, row: dict) -> float:
    raise ValueError("this reward function is broken on purpose")
