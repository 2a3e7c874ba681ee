"""Export a checkpoint: `python src/export.py ckpt_path=RUN/checkpoints/last.ckpt format=onnx` (or safetensors)."""

from rnnlm.commands.export import main

if __name__ == "__main__":
    main()
