"""Generate text from a checkpoint: `python src/generate.py ckpt_path=RUN/checkpoints/last.ckpt prompt="ROMEO:"`."""

from rnnlm.commands.generate import main

if __name__ == "__main__":
    main()
