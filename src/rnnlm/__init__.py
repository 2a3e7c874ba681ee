"""rnnlm: recurrent (RNN, LSTM, GRU) language models with PyTorch Lightning and Hydra."""

from pathlib import Path

__version__ = "0.1.0"


def _conf_dir() -> Path:
    """The Hydra configs: the copy an installed wheel carries inside the package, else the checkout's top-level
    ``conf/`` (an editable install, or ``python src/train.py``)."""
    package = Path(__file__).resolve().parent
    packaged = package / "conf"
    return packaged if packaged.is_dir() else package.parents[1] / "conf"


CONF_DIR = _conf_dir()
