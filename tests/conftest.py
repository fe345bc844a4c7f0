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


@pytest.fixture()
def sparse_tiny(tmp_path, tiny_model_dir):
    from paser.models import load_model
    from paser.prune import magnitude_prune_

    model, tok = load_model(str(tiny_model_dir))
    magnitude_prune_(model, 0.5)
    model.save_pretrained(tmp_path / "sparse")
    tok.save_pretrained(tmp_path / "sparse")
    return tmp_path / "sparse"


def shared_path(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} absent (../shared/data not available)")
    return path
