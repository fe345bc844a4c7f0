import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from tiny import make_tiny_llama, make_tokenizer, save_model  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tokenizer(chat=True)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """A random-init tiny Llama saved as a Hugging Face directory."""
    return save_model(make_tiny_llama(tiny_tokenizer, seed=0), tiny_tokenizer,
                      tmp_path_factory.mktemp("tiny") / "original")


@pytest.fixture(scope="session")
def tiny_pruned_dir(tmp_path_factory, tiny_tokenizer):
    """A second tiny Llama with the same tokenizer (a stand-in for a pruned copy)."""
    return save_model(make_tiny_llama(tiny_tokenizer, seed=1), tiny_tokenizer,
                      tmp_path_factory.mktemp("tiny") / "pruned")


@pytest.fixture(scope="session")
def embedded():
    """The embedded SmolLM2-135M-Instruct (fp32), converted once into the paser cache."""
    from paser.models import DEFAULT_MODEL, load_model

    return load_model(DEFAULT_MODEL)


def shared_path(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} absent (../shared/data not available)")
    return path
