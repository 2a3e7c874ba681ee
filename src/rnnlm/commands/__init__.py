"""The command-line programs, one module each, named as everywhere else: module ``rnnlm.commands.X``, config
``conf/X.yaml``, console script ``rnnlm-X`` and checkout script ``src/X.py``.

- ``train``: fit a model the config describes, with checkpoints, logs and ``run_summary.json``;
- ``eval``: a checkpoint's loss (and perplexity or bits per character) on its test split or any text;
- ``generate``: continue a prompt by sampling from a checkpoint;
- ``score``: log-probabilities of lines, and ranking of the words that could fill a blank;
- ``export``: a checkpoint as ONNX (the one-step function, for onnxruntime) or safetensors (the weights);
- ``report``: a sweep's table and curves, from what its runs logged.

:mod:`rnnlm.commands.cli` holds what they share: a user's mistake ends in one line and exit status 2.
A new command is a module here with a ``main()``, a line in pyproject.toml's ``[project.scripts]``, and
its config in ``conf/``.
"""
