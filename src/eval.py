"""Evaluate a checkpoint: `python src/eval.py ckpt_path=RUN/checkpoints/best.ckpt` (test loss and ppl or bpc)."""

from rnnlm.commands.eval import main

if __name__ == "__main__":
    main()
