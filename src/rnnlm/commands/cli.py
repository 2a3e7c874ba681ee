"""What every command-line entry point shares: a user's mistake ends in one line and exit status 2."""

from __future__ import annotations

import difflib
import functools
import logging
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from hydra import initialize_config_dir
from hydra._internal.utils import get_args_parser
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ValueType
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from omegaconf.errors import OmegaConfBaseException

from rnnlm import CONF_DIR
from rnnlm.checkpoint import written_by_torch
from rnnlm.checks import equal_budget, per_cell
from rnnlm.errors import ConfigError, UserError

# The stream loader is an IterableDataset with a length, read without worker processes, so the
# length is exact; Lightning's warning about workers duplicating data does not apply.
warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined", category=UserWarning)


# Lightning 2.6 builds torch's LeafSpec in its own pytree helper (lightning.pytorch.utilities._pytree), which torch
# 2.13 deprecates: a warning about Lightning's code, once a run, that no setting of rnnlm or of the user changes.
warnings.filterwarnings("ignore", message=re.escape("`isinstance(treespec, LeafSpec)` is deprecated"),
                        category=FutureWarning, module=re.escape("lightning.pytorch.utilities._pytree"))


# The datamodule saves and restores the stream's position itself (TextDataModule.state_dict), so a run
# resumed mid-epoch continues exactly; Lightning only looks for that on the DataLoader object.
warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")


# Lightning's log lines that tell a user of rnnlm nothing, dropped by logger and by the start of the message; its
# other lines, and every warning, still show. rnnlm says instead which checkpoint a run resumes ("Resuming PATH
# (step N, saved ...)") and tests ("Testing the best checkpoint, PATH (step N, ...), val/loss X"), and the model's
# size (rnnlm.callbacks.ModelSummary). A GPU that is there but not used still gets Lightning's warning.
QUIET_LOG_LINES = {
    # Lightning logs through lightning_utilities under its own name: the fabric's or the trainer's, whichever
    # was imported last.
    logger: (
        "GPU available: ",  # and whether it is used: trainer.accelerator and the device rnnlm logs say it
        "TPU available: ",
        "Restoring states from the checkpoint path at ",  # rnnlm's "Resuming ..." and "Testing ..." say which
        "Restored all states from the checkpoint at ",
        "Loaded model weights from the checkpoint at ",
        "💡 Tip",  # adverts for Lightning's cloud services
    )
    for logger in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")
}


class QuietLines(logging.Filter):
    """Drops the records whose message starts with one of ``starts``."""

    def __init__(self, starts: tuple[str, ...]):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.starts)


for _name, _starts in QUIET_LOG_LINES.items():
    logging.getLogger(_name).addFilter(QuietLines(_starts))

OmegaConf.register_new_resolver("rnnlm.equal_budget", equal_budget, replace=True)  # experiment=long_range
OmegaConf.register_new_resolver("rnnlm.per_cell", per_cell, replace=True)  # experiment=long_range
LISTED_SWEEPS = (ValueType.SIMPLE_CHOICE_SWEEP, ValueType.CHOICE_SWEEP, ValueType.RANGE_SWEEP)
T = TypeVar("T")


def exit_on_user_error(task: Callable[..., T]) -> Callable[..., T]:
    """Print ``error: <message>`` and exit 2 on a user error, instead of a traceback
    (``HYDRA_FULL_ERROR=1`` shows the traceback)."""

    @functools.wraps(task)
    def wrapper(*args, **kwargs):
        try:
            return task(*args, **kwargs)
        except UserError as err:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":  # the user asked for the whole story
                raise
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)

    return wrapper


def end_program(entry: Callable[[], None]) -> None:
    """End the process now, with status 0, if ``entry`` is the program itself (the ``main`` of its ``__main__``
    module: a console script, ``src/X.py``, ``python -m``), once stdout, stderr and the logs are flushed: Python's
    teardown frees the hundreds of thousands of objects torch makes one by one, which takes longer (0.3-0.5 s) than
    an inference command's work on a small checkpoint. Called from within another program (a test, a notebook) it
    returns, as it does when the output cannot be flushed (a closed pipe: Python's own exit reports it)."""
    if getattr(sys.modules.get("__main__"), "main", None) is not entry:
        return
    logging.shutdown()  # what atexit would do first: the log files written out and closed
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:
        return
    os._exit(0)


def run_command(hydra_main: Callable[[], object], config_name: str, compose_once: bool = False) -> bool:
    """Run a ``@hydra.main`` function once :func:`check_command_line` has passed its command line.

    ``compose_once``: a single run (no ``-m``, no flag but ``--run``) runs on the config the check composed, as
    ``hydra.main`` would run it (:func:`run_composed`), instead of Hydra composing it twice more. ``-h``/``--help``
    prints the command's own help (:func:`print_help`) instead.

    Returns:
        whether the command ran so, as one job in this process (after which :func:`end_program` may end it).
    """
    if "-h" in sys.argv[1:] or "--help" in sys.argv[1:]:
        exit_on_user_error(print_help)(config_name, [a for a in sys.argv[1:] if a not in ("-h", "--help")])
        return False
    if config_name == "train":  # settings of a resumed checkpoint's own groups (optimizer.nonmono of NT-ASGD)
        from rnnlm.resume import resume_command_line

        sys.argv[1:] = cell_command_line(resume_command_line(sys.argv[1:]))
    cfg = exit_on_user_error(check_command_line)(config_name, sys.argv[1:])
    if compose_once and cfg is not None:
        run_composed(hydra_main.__wrapped__, cfg, config_name)  # the function under hydra.main's decorator
        return True
    hydra_main()  # a sweep's launcher may leave worker processes that Python's own exit stops
    return False


def print_help(config_name: str, argv: list[str]) -> None:
    """``--help``: the command's own groups and settings, one line each, with their values for the rest of the
    command line (:func:`rnnlm.reference.command_help`). Hydra's own help would list every group under ``conf/``,
    the training groups that eval, generate and score refuse included, and print the config without saying what a
    setting means."""
    from rnnlm.reference import command_help

    flags = {"-m", "--multirun", "--run", "-r"}
    if config_name == "train":
        argv = cell_command_line(argv)
    print(command_help(config_name, [a for a in argv if a not in flags]))


def run_composed(task: Callable[[DictConfig], object], cfg: DictConfig, config_name: str) -> None:
    """Run ``task`` on ``cfg``, a single run's config composed with its ``hydra`` node, as ``hydra.main`` runs it:
    Hydra's logging, its callbacks (``conf/hydra/default.yaml``'s run folder), the run folder and its ``.hydra/``
    files, ``${hydra:...}`` and the report of an exception are Hydra's own (``Hydra.run``, ``run_job``).

    ``hydra.main`` composes the config twice (once to find the run mode, once to run), about 0.1 s each, after
    :func:`check_command_line` has composed it once already.
    """
    from hydra._internal.callbacks import Callbacks
    from hydra._internal.utils import run_and_report
    from hydra.core.utils import configure_log, run_job
    from hydra.types import HydraContext

    with read_write(cfg.hydra):  # what hydra.main adds when it finds no mode in the config
        if cfg.hydra.mode is None:
            cfg.hydra.overrides.hydra.append("hydra.mode=RUN")
            cfg.hydra.mode = RunMode.RUN

    def run() -> None:
        configure_log(cfg.hydra.hydra_logging, cfg.hydra.verbose)
        callbacks = Callbacks(cfg)
        callbacks.on_run_start(config=cfg, config_name=config_name)
        job = run_job(hydra_context=HydraContext(config_loader=GlobalHydra.instance().config_loader(),
                                                 callbacks=callbacks),
                      task_function=task, config=cfg, job_dir_key="hydra.run.dir", job_subdir_key=None)
        callbacks.on_run_end(config=cfg, config_name=config_name, job_return=job)
        _ = job.return_value  # the task's exception, raised for run_and_report to show

    with initialize_config_dir(str(CONF_DIR), job_name=config_name, version_base="1.3"):
        run_and_report(run)


def cell_command_line(argv: list[str]) -> list[str]:
    """``argv`` with the settings of a user's cell (declared by the class ``model.cell=pkg:Cls`` names) given as
    ``++model.<name>=...``: the config lists the built-in cells' settings, and Hydra refuses a key it lacks unless
    told to add it. A class that cannot be imported is left for the config check to report."""
    names = user_cell_settings(argv)
    own = re.compile(rf"model\.({'|'.join(map(re.escape, sorted(names)))})=.*") if names else None
    return [f"++{argument}" if own and own.fullmatch(argument) else argument for argument in argv]


def user_cell_settings(argv: list[str]) -> set[str]:
    """The names of the settings the user's cells named in ``argv`` (``model.cell=pkg:Cls``, or a sweep of them)
    declare."""
    from rnnlm.cells import cell_class, is_class_path

    names: set[str] = set()
    for argument in argv:
        if match := re.fullmatch(r"\+{0,2}model\.cell=(.+)", argument):
            for path in match[1].strip("'\"").split(","):  # a sweep over cells: a,b
                if is_class_path(path.strip()):
                    try:
                        names |= set(cell_class(path.strip()).settings)
                    except ConfigError:
                        pass
    return names


def check_command_line(config_name: str, argv: list[str]) -> DictConfig | None:
    """Compose the config as Hydra is about to, so that a misspelled key, an unknown choice, an unreadable
    override, a sweep without ``-m`` or a run folder that cannot be made costs one line (Hydra reports these
    in several lines, with exit status 1, from inside ``hydra.main`` where no wrapper can reach them); then
    check every value (:func:`job_problems`), so that a mistake never leaves a run folder behind.

    ``--info`` and Hydra's other flags, and another search path (``--config-dir``, ``--config-path``, as DDP
    processes are started with), are left to Hydra (``--help`` is answered before: :func:`print_help`).

    Returns:
        the composed config, with its ``hydra`` node, of a single run of ``config_name`` (no ``-m`` and no flag but
        ``--run``), for :func:`run_composed`; None when Hydra is to compose it.

    Raises:
        ConfigError: the message says what to change.
    """
    args = get_args_parser().parse_args(cell_command_line(argv) if config_name == "train" else argv)
    modes = [flag for flag, given in (("-m", args.multirun), ("--run", args.run), ("--cfg", args.cfg is not None),
                                      ("--info", args.info is not None), ("--shell-completion", args.shell_completion))
             if given]
    if len(modes) > 1:  # Hydra refuses these with a traceback
        raise ConfigError(f"{' and '.join(modes)} cannot be given together: Hydra does one of them (to see a sweep's "
                          "config, give --cfg job with one value of each swept key, without -m)")
    if (args.help or args.hydra_help or args.info or args.shell_completion or args.experimental_rerun
            or args.config_dir or args.config_path):
        return None
    command = args.config_name or config_name
    with initialize_config_dir(str(CONF_DIR), job_name=config_name, version_base="1.3"):
        # composed as hydra.main does to find the mode: for a sweep, with the sweeps' values left out
        compose = functools.partial(GlobalHydra.instance().hydra.compose_config, command,
                                    run_mode=RunMode.MULTIRUN, validate_sweep_overrides=False)
        try:
            overrides = OverridesParser.create().parse_overrides(args.overrides)
            cfg = compose(args.overrides)
            multirun = args.multirun or cfg.hydra.mode == RunMode.MULTIRUN
            sweeps = [o for o in overrides if o.is_sweep_override() and not o.is_hydra_override()]
            if sweeps and not multirun:
                raise ConfigError(f"{sweeps[0].input_line} is a sweep: add -m to run one job per value (a list is "
                                  "key=[a,b]; a text with commas is quoted: \"key='a,b'\")")
            # Each value of each sweep, before the first job starts: the i-th values of all sweeps together.
            values = [list(o.sweep_string_iterator()) if o in sweeps and o.value_type in LISTED_SWEEPS else []
                      for o in overrides]
            jobs = [compose([f"{o.get_key_element()}={v[min(i, len(v) - 1)]}" if v else o.input_line
                             for o, v in zip(overrides, values, strict=True)])
                    for i in range(max(map(len, values), default=0))] or [cfg]
        except HydraException as err:
            own = {f"model.{name}" for name in user_cell_settings(argv)} if command == "train" else set()
            raise ConfigError(describe_hydra_error(err, command, own)) from err
    if args.cfg is None:  # --cfg job only prints the config
        # A single run is refused before its folder is made; in a sweep a job whose values do not fit is recorded
        # as failed and the others run, unless no job would (a mistake outside the swept values).
        problems = [job_problems(job, command, multirun, args.overrides) for job in jobs]
        if all(problems):
            raise ConfigError("; ".join(problems[0]))
    if args.cfg is None and cfg.hydra.output_subdir is not None:  # this run writes a folder
        key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
        check_folder_writable(Path(OmegaConf.select(cfg, key)), key)
    single = not (multirun or args.cfg or args.resolve or args.package or args.config_name or cfg.hydra.verbose)
    return cfg if single else None


def job_problems(cfg: DictConfig, command: str, multirun: bool, overrides: list[str]) -> list[str]:
    """What is wrong with one job's composed config (:func:`rnnlm.checks.check_config`), as the job will see it."""
    from rnnlm.checks import CHECKS, check_config

    if command not in CHECKS:  # another config (--config-name): Hydra's to check
        return []
    try:
        _set_output_dir(cfg, multirun)
    except OmegaConfBaseException as err:  # the folder's name refers to a key that is missing (~task_name)
        return [f"the run folder's name cannot be resolved: {str(err).splitlines()[0]}"]
    optimized = multirun and OmegaConf.select(cfg, "hydra.sweeper.direction", default=None) is not None
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.pop("hydra")  # as the job sees it
    try:
        check_config(cfg, command, overrides)
        if optimized:  # a search (hparams_search=optuna) minimises what each job returns
            from rnnlm.commands.train import check_optimized_metric

            check_optimized_metric(cfg)
    except UserError as err:
        return [str(err)]
    return []


def _set_output_dir(cfg: DictConfig, multirun: bool) -> None:
    """Set ``hydra.runtime.output_dir`` as Hydra does when the job starts, so that ``${hydra:runtime.output_dir}``
    (``paths.output_dir``) resolves while the config is checked."""
    folder = OmegaConf.select(cfg, "hydra.sweep.dir" if multirun else "hydra.run.dir")
    with read_write(cfg.hydra), open_dict(cfg.hydra):
        cfg.hydra.runtime.output_dir = str(Path(folder, "0") if multirun else Path(folder))
    HydraConfig.instance().set_config(cfg)


def describe_hydra_error(err: HydraException, command: str = "train", also_known: set[str] = frozenset()) -> str:
    """Hydra's complaint about the command line, in one line with the fix; ``also_known``: keys that are settings too
    (a user's cell's), suggested for a misspelled one."""
    if isinstance(err, MissingConfigException) and err.options:  # model=foo
        group, _, name = err.missing_cfg_file.rpartition("/")
        options = ", ".join(sorted(o for o in err.options if not o.startswith("_")))  # _*.yaml are shared bases
        return f"{group}={name} is not a choice: use one of {options}"
    # not in the config, nor in its defaults list; Hydra says the same of ~key when the key's value is null
    unknown = re.match(r"Could not (?:override|delete) '([^']+)'|Could not delete from config\. '([^']+)'", str(err))
    if unknown:
        from rnnlm.schema import TABLES, settings_table

        key = unknown[1] or unknown[2]
        owner = _cell_owning(key) if command == "train" else None
        if owner and unknown[0].startswith("Could not delete"):  # ~model.forget_bias: null (model=lstm) or absent
            return f"~{key} deletes nothing ({key}, a setting of model={owner} only, is null or absent): drop ~{key}"
        if owner:  # model=lstm model.nonlinearity=relu
            return (f"{key} applies to model={owner} only (the chosen cell does not read it): drop it, or use "
                    f"model={owner}")
        if key in also_known:  # ~model.<setting of the user's cell>: absent unless given, so its default holds
            return f"{key} is not set, so the cell's default applies: drop ~{key}"
        known = sorted(k for k in settings_table(command) if "*" not in k) if command in TABLES else []
        if key in known:
            return f"{key} cannot be deleted (~{key}): every setting needs a value; give {key}=... instead"
        close = difflib.get_close_matches(key, sorted({*known, *also_known}), n=3)
        hint = f"did you mean {' or '.join(close)}?" if close else f"check the names in conf/{command}.yaml"
        if command == "train" and key.partition(".")[0] in ("trainer", "optimizer", "scheduler", "callbacks", "logger"):
            hint += f" (an argument the config does not list is added with +{key}=...)"
        return f"{key} is not a setting of rnnlm-{command}: {hint}"
    if isinstance(err, OverrideParseException):
        return (f"cannot read the override {err.override!r}: write key=value, and quote a value with spaces, "
                "commas or non-ASCII letters: \"key='...'\" (https://hydra.cc/docs/advanced/override_grammar/basic)")
    return "; ".join(line.strip() for line in str(err).splitlines() if line.strip())


def _cell_owning(key: str) -> str | None:
    """The built-in cell that declares the setting ``key`` (``model.reset_after``: gru), if one does."""
    from rnnlm.cells import BUILT_IN

    name = key.removeprefix("model.")
    return next((cell for cell, forms in BUILT_IN.items() if key != name and name in forms["fused"].settings), None)


def check_folder_writable(folder: Path, key: str) -> None:
    """Raise :class:`ConfigError` unless ``folder`` can be made (or written in), tried with a probe folder:
    permission bits do not tell (root ignores them; a read-only mount does not show in them)."""
    existing = folder
    while not existing.exists():
        existing = existing.parent
    try:
        tempfile.TemporaryDirectory(dir=existing).cleanup()
    except OSError as err:
        raise ConfigError(f"cannot create the run folder {folder} in {existing} ({err.strerror}): run from a "
                          f"folder you can write to, or set paths.log_dir=DIR (or {key}=DIR)") from None


def check_output(path: str | Path, overwrite: bool) -> Path:
    """The file a command may write its result to: never a checkpoint (a ``.ckpt`` name, or a file that
    torch.save wrote), never a folder, never an existing file unless ``overwrite`` is true.

    Raises:
        ConfigError: the message says what to give instead.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        raise ConfigError(f"output={path} is a folder: give a file name in it (output={path}/FILE)")
    if not path.parent.is_dir():
        raise ConfigError(f"output={path}: the folder {path.parent} does not exist: create it (mkdir -p "
                          f"{path.parent}) or give a path in an existing folder")
    if path.suffix == ".ckpt" or (path.is_file() and written_by_torch(path)):
        raise ConfigError(f"output={path} is a checkpoint's name or file, which is never written over: "
                          "give another file name")
    if path.is_file() and not overwrite:
        raise ConfigError(f"output={path} already exists: give another file name, or add overwrite=true to replace it")
    if not os.access(path.parent, os.W_OK):
        raise ConfigError(f"output={path}: {path.parent} is not writable: give a path in a folder you can write to")
    return path


def pick_device(name: str) -> torch.device:
    """``auto`` (a GPU if there is one), ``cpu``, ``cuda``, ``cuda:1``, ``mps`` ..."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device={name} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device={name} but no GPU is available: use device=cpu or device=auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device={name} but this machine has {torch.cuda.device_count()} GPU(s): use "
                              f"cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device={name} but MPS is not available: use device=cpu or device=auto")
    elif device.type not in ("cpu", "mps"):
        raise ConfigError(f"device={name} is not supported: use auto, cpu, cuda or cuda:N")
    return device


def _quote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value  # quoted by the user already
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'").replace("${", "\\${") + "'"


def quote_free_text(argv: list[str], text_keys: tuple[str, ...], list_keys: tuple[str, ...] = ()) -> list[str]:
    """Quote the values of free-text overrides, so ``prompt=안녕 세상`` or ``candidates=[근육,지방]`` reach
    the config as typed: Hydra's override grammar takes only ASCII words unquoted."""
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key in text_keys:
            arg = f"{key}={_quote(value)}"
        elif sep and key in list_keys and value.startswith("[") and value.endswith("]"):
            items = [item.strip() for item in value[1:-1].split(",") if item.strip()]
            arg = f"{key}=[{','.join(_quote(item) for item in items)}]"
        out.append(arg)
    return out
