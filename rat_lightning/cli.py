"""Command line: ``rat-lightning fit|validate|test|predict`` (LightningCLI), ``prepare`` and
``bench NAME [args]`` (a GPU benchmark of :mod:`rat_lightning.bench`, e.g. ``bench layer``).

Configs compose: ``rat-lightning fit --config configs/model/tiny.yaml --config configs/data/corpus.yaml``;
later files and flags override earlier ones; ``--print_config`` shows every knob.
"""

from __future__ import annotations

import logging
import pkgutil
import runpy
import sys
from pathlib import Path

import torch
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from rat_lightning.errors import ConfigError
from rat_lightning.model.config import RUNTIME_FIELDS

log = logging.getLogger("rat_lightning")



def _trainer_defaults() -> dict:
    """TensorBoard under runs/ for configs that name no logger, and the generation writer
    (always present: Lightning keeps callbacks given here in every run). Checkpointing is
    configured per run (configs/quickstart.yaml)."""
    from rat_lightning.training.callbacks import GenerationWriter

    return {
        "logger": {
            "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
            "init_args": {"save_dir": "runs", "name": "default"},
        },
        "callbacks": [GenerationWriter()],
    }


class RATLightningCLI(LightningCLI):
    """LightningCLI with the data's tokenizer and sequence length linked into the model config."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.seq_len", "model.config.max_seq_len")
        # The vocabulary is known only once the data module has read (or built) its tokenizer.
        parser.link_arguments("data.vocab_size", "model.config.vocab_size", apply_on="instantiate")

    def _parse_ckpt_path(self) -> None:
        """Take the model's architecture from ``--ckpt_path``, nothing else.

        Lightning's own version replaces every model argument with the checkpoint's, so flags
        such as ``--model.generate_tokens`` would be silently ignored. The architecture must
        come from the checkpoint (its weights have that shape); the rest is the user's.
        """
        if not self.config.get("subcommand"):
            return
        ckpt_path = self.config[self.config.subcommand].get("ckpt_path")
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        # mmap: only the hyperparameters are read here; Lightning loads the tensors itself later.
        saved = torch.load(ckpt_path, weights_only=True, map_location="cpu", mmap=True).get("hyper_parameters", {})
        architecture = {k: v for k, v in saved.get("config", {}).items() if k not in RUNTIME_FIELDS}
        if architecture:
            update = {self.config.subcommand: {"model": {"config": architecture}}}
            self.config = self.parser.parse_object(update, self.config)


def _run_prepare(args: list[str]) -> None:
    from jsonargparse import CLI

    from rat_lightning.data import prepare

    manifest = CLI(prepare, args=args, as_positional=False)
    log.info("wrote %s", manifest)


# Modules of rat_lightning.bench that are helpers, not benchmarks.
_BENCH_HELPERS = {"plot", "report", "timing"}


def bench_names() -> list[str]:
    """The benchmarks ``rat-lightning bench`` runs: the modules of :mod:`rat_lightning.bench`."""
    import rat_lightning.bench

    return sorted(m.name for m in pkgutil.iter_modules(rat_lightning.bench.__path__) if m.name not in _BENCH_HELPERS)


def _run_bench(args: list[str]) -> None:
    """``rat-lightning bench NAME [args]``: ``python -m rat_lightning.bench.NAME [args]``."""
    names = bench_names()
    if not args or args[0] in ("-h", "--help"):
        print(f"usage: rat-lightning bench NAME [args]; NAME is one of: {', '.join(names)}")
        print("each takes its own arguments (rat-lightning bench NAME --help where it has any)")
        return
    if args[0] not in names:
        raise ConfigError(f"unknown benchmark {args[0]!r}; choose one of: {', '.join(names)}")
    argv = sys.argv
    sys.argv = [f"rat-lightning bench {args[0]}", *args[1:]]
    try:
        runpy.run_module(f"rat_lightning.bench.{args[0]}", run_name="__main__", alter_sys=True)
    finally:
        sys.argv = argv


def check_config_files(argv: list[str]) -> None:
    """Read every ``--config``/``-c`` file before LightningCLI does, so that a missing file or a
    YAML syntax error is reported as ``file:line:column`` (jsonargparse may only say
    "<unicode string>").

    Raises:
        ConfigError: naming the file, the position and the problem.
    """
    import yaml

    paths = [b for a, b in zip(argv, argv[1:]) if a in ("--config", "-c")]
    paths += [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    for path in paths:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"config file {path} does not exist; check the path (configs live in configs/)")
        try:
            yaml.safe_load(file.read_text())
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
            problem = getattr(error, "problem", None) or str(error)
            raise ConfigError(f"{where}: invalid YAML ({problem}); fix the file's syntax") from error


def main(args: list[str] | None = None) -> RATLightningCLI | None:
    """Entry point of the ``rat-lightning`` command.

    Args:
        args: command-line arguments (default ``sys.argv[1:]``); tests call this in-process.

    Returns:
        The CLI object (for fit/validate/test/predict), or None for ``prepare`` and ``bench``.
    """
    from rat_lightning.data import DataError, PretrainDataModule
    from rat_lightning.training import LanguageModelModule

    argv = sys.argv[1:] if args is None else list(args)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if argv[:1] == ["prepare"]:
            _run_prepare(argv[1:])
            return None
        if argv[:1] == ["bench"]:
            _run_bench(argv[1:])
            return None
        check_config_files(argv)
        return RATLightningCLI(
            LanguageModelModule,
            PretrainDataModule,
            trainer_defaults=_trainer_defaults(),
            save_config_kwargs={"overwrite": True},
            args=args,
        )
    except (ConfigError, DataError) as error:
        # Our errors already name the field or file and the fix: no traceback needed.
        print(f"rat-lightning: error: {error}", file=sys.stderr)
        raise SystemExit(2) from error
    except ValueError as error:
        # jsonargparse wraps errors raised while it builds nested objects (a callback's patterns)
        # in its own ValueError; ours is in the chain and is the useful line.
        cause = _our_error(error)
        if cause is None:
            raise
        print(f"rat-lightning: error: {cause}", file=sys.stderr)
        raise SystemExit(2) from error


def _our_error(error: BaseException) -> ConfigError | None:
    """The first ConfigError or DataError in ``error``'s chain of causes, if any."""
    from rat_lightning.data import DataError

    while error is not None:
        if isinstance(error, (ConfigError, DataError)):
            return error
        error = error.__cause__ or error.__context__
    return None


if __name__ == "__main__":
    main()
