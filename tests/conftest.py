"""Test set-up: JAX on CPU with 8 simulated devices (so sharding is exercised everywhere),
TensorFlow kept off any accelerator, and the real data shipped in tests/fixtures/data located."""

import os
import pathlib

# Must happen before jax is imported anywhere.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
# The small real data the tests need ships with the repository (licences in its README.md).
TEST_DATA = REPO / "tests" / "fixtures" / "data"


def _require(path: pathlib.Path, what: str) -> pathlib.Path:
    if not path.exists():
        # A missing fixture is a failure, never a skip: CI must not pass without the real data.
        pytest.fail(f"{what} not found at {path}; it ships with the repository (tests/fixtures/data): "
                    f"is the checkout complete?", pytrace=False)
    return path


@pytest.fixture(scope="session")
def bridge_data_dir() -> pathlib.Path:
    """Folder holding the `bridge_dataset/1.0.0` RLDS builder (25 real BridgeData V2 episodes per split)."""
    p = TEST_DATA / "bridge_debug"
    _require(p / "bridge_dataset" / "1.0.0" / "dataset_info.json", "the Bridge debug dataset")
    return p


@pytest.fixture(scope="session")
def llama_tokenizer_path() -> pathlib.Path:
    """The real Llama-2 SentencePiece model."""
    return _require(TEST_DATA / "llama2_tokenizer" / "tokenizer.model", "the Llama-2 tokenizer")


def pytest_configure(config):
    # triton (which torch loads lazily, e.g. through torch._dynamo when transformers is used) must be
    # loaded before TensorFlow: loading its shared library after TensorFlow's segfaults in this stack.
    # torch is a required test dependency; triton ships with the x86_64 torch build.
    import torch  # noqa: F401
    try:
        import triton  # noqa: F401
    except ImportError:  # builds without triton (e.g. aarch64 CPU wheels) have nothing to load
        pass
    import tensorflow as tf
    tf.config.set_visible_devices([], "GPU")
