"""Shared fixtures: the tiny model and synthetic data (built locally, no hub) and one
embedded Ray instance for the whole session (starting Ray costs seconds on 2 cores)."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest  # noqa: E402

CACHE = os.environ.get("RAYLIB_TEST_CACHE", os.path.expanduser("~/.cache/raylib-tests"))


@pytest.fixture(scope="session")
def tiny_model() -> str:
    """The pretrained tiny Llama (built once per machine, rebuilt when its recipe changes)."""
    from raylib.models import build_tiny

    return build_tiny(os.path.join(CACHE, "tiny-llama"))


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> dict[str, str]:
    from raylib.synthetic import write_dataset

    return write_dataset(str(tmp_path_factory.mktemp("data")), n_train=600, n_eval=60)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for every test that trains through Ray Train (stopped at the end)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=True, runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "DS_ACCELERATOR": "cpu"}})
    yield ray
    ray.shutdown()
