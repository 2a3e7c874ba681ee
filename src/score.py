"""Score text with a checkpoint: `python src/score.py ckpt_path=... text="the ___ sat" candidates=[cat,dog]`."""

from rnnlm.commands.score import main

if __name__ == "__main__":
    main()
