"""Train a recurrent language model: `python src/train.py model=gru data=char` (see conf/train.yaml)."""

from rnnlm.commands.train import main

if __name__ == "__main__":
    main()
