"""See inside a trained model: `python src/inspect_model.py ckpt_path=... text_file=passage.txt` (rnnlm-inspect).

Not named inspect.py: a file of that name here would stand in for Python's own inspect module in every script of
this folder (the script's folder comes first on the module search path)."""

from rnnlm.commands.inspect import main

if __name__ == "__main__":
    main()
