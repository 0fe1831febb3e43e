"""`dpo-run <stage> [hydra overrides]`: the stage registry and the Hydra entry point.

The first bare word of argv is the stage; it becomes the override `stage=<word>` appended after the user's
overrides, so `-m` multirun, `--cfg job` and every other Hydra flag work as usual. Before Hydra starts, the
overrides are composed once (each sweep value too) so that a bad override fails in one line, exit code 2.
"""

from __future__ import annotations

import importlib
import itertools
import os
import re
import sys
from pathlib import Path

import hydra
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from dpo_cli import distributed
from dpo_cli.config import Config, conf_dir, validate
from dpo_cli.errors import ConfigError, RunStopped

# name -> (module with `run(cfg, run_dir)`, one-line description). The help text is generated from this.
STAGES: dict[str, tuple[str, str]] = {
    "sft": (
        "dpo_cli.stages.sft",
        "supervised fine-tuning; its final/ is the reference for preference stages",
    ),
    "dpo": ("dpo_cli.stages.dpo", "preference optimisation: loss=dpo|ipo|cdpo|preferred_ft|unlikelihood|..."),
    "eval": ("dpo_cli.stages.eval", "one (KL, reward) frontier point for checkpoint=PATH, plus Best-of-N"),
    "prefs": ("dpo_cli.stages.prefs", "sample K completions per prompt, score them, write ranked records"),
    "winrate": (
        "dpo_cli.stages.winrate",
        "win rate of checkpoint=PATH vs a baseline by a judge, per temperature",
    ),
}
# Hydra flags that take a value: that value is not the stage word.
_FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn"}
_MAX_PREFLIGHT_JOBS = 64


def _fail(message: str) -> None:
    print(f"dpo-run: error: {message}", file=sys.stderr)
    sys.exit(2)


def config_groups() -> dict[str, list[str]]:
    root = conf_dir()
    return {
        group.name: sorted(p.stem for p in group.glob("*.yaml"))
        for group in sorted(root.iterdir())
        if group.is_dir() and group.name != "stage"
    }


def help_text() -> str:
    lines = ["usage: dpo-run [-m] <stage> [key=value ...] [hydra flags]", "", "stages:"]
    lines += [f"  {name:<8} {desc}" for name, (_, desc) in STAGES.items()]
    lines += ["", "config groups (group=option):"]
    lines += [f"  {group:<11} {', '.join(options)}" for group, options in config_groups().items()]
    lines += [
        "",
        "examples:",
        "  dpo-run sft",
        "  dpo-run dpo beta=0.1",
        "  dpo-run dpo loss=unlikelihood loss.alpha=0.5",
        "  dpo-run -m dpo beta=0.05,0.1,1,5",
        "  dpo-run dpo --cfg job          # print the composed config and exit",
        "",
        "Top-level keys: exp_name, run_name, seed, beta, lr, sft_checkpoint, output_root.",
        "Hydra's own help: dpo-run <stage> --hydra-help",
    ]
    return "\n".join(lines)


def _choice_error(err: Exception) -> str | None:
    """OmegaConf's "Invalid value 'yes', expected one of [auto, on, off] ... full_key: trainer.lean_memory"
    (a value outside a choice's Enum) as "trainer.lean_memory=yes: choose auto, on or off"."""
    for text in (str(err), str(err.__cause__ or "")):
        invalid = re.search(r"Invalid value '(.*)', expected one of \[(.*)\]", text)
        key = re.search(r"full_key: (\S+)", text)
        if invalid and key:
            value, (*choices, last) = invalid.group(1), invalid.group(2).split(", ")
            message = f"{key.group(1)}={value}: choose {', '.join(choices)} or {last}"
            where = re.match(r"In '([^']+)':", text)
            if where:  # a YAML file's value; YAML reads unquoted on, off, yes and no as booleans
                quote = "; quote on/off in YAML" if value in ("True", "False") else ""
                message += f" (in {where.group(1)}{quote})"
            return message
    return None


def _one_line(err: Exception) -> str:
    choice = _choice_error(err)
    if choice:
        return choice
    text = " ".join(str(err).replace("\t", " ").split()).split(" Config search path:")[0]
    if err.__cause__ is not None:  # e.g. "Error merging override lr=abc" <- "Value 'abc' ... not a float"
        text += ": " + str(err.__cause__).splitlines()[0]
    unknown = re.match(r"Could not override '([\w.]+)'", text)
    if unknown:
        parent, _, key = unknown.group(1).rpartition(".")
        node = (
            OmegaConf.select(OmegaConf.structured(Config), parent) if parent else OmegaConf.structured(Config)
        )
        valid = ", ".join(node.keys()) if isinstance(node, DictConfig) else "none (not a config section)"
        text = f"unknown key {unknown.group(1)!r}; valid keys{' of ' + parent if parent else ''}: {valid}"
    return text


def _unparsable(parser: OverridesParser, overrides: list[str]) -> str | None:
    """The first override Hydra's grammar rejects, and how to quote it (its lexer's own error names no
    remedy: unquoted values may hold only letters, digits and a few symbols, in ASCII)."""
    for override in overrides:
        try:
            parser.parse_overrides([override])
        except Exception:
            key, _, value = override.partition("=")
            return (
                f"cannot parse the override {override!r}: quote a value holding spaces, non-ASCII letters or "
                f"symbols, as {key}='{value}' (in the shell: \"{key}='{value}'\")"
            )
    return None


def _overrides(args: list[str]) -> list[str]:
    """The key=value overrides among `args` (flags and their values left out)."""
    overrides, skip_next = [], False
    for arg in args:
        if not skip_next and not arg.startswith("-"):
            overrides.append(arg)
        skip_next = arg in _FLAGS_WITH_VALUE
    return overrides


def preflight(overrides: list[str]) -> None:
    """Compose every job's config (each combination of sweep values) and validate it; fail in one line."""
    parser = OverridesParser.create()
    try:
        parsed = parser.parse_overrides([o for o in overrides if not o.startswith("hydra")])
    except Exception as err:
        _fail(_unparsable(parser, overrides) or _one_line(err))
    per_key = [
        [f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()]
        if o.is_sweep_override()
        else [o.input_line]
        for o in parsed
    ]
    jobs = list(itertools.islice(itertools.product(*per_key), _MAX_PREFLIGHT_JOBS))
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        for job in jobs:
            try:
                cfg = compose(config_name="config", overrides=list(job))
                validate(cfg, distributed.expected_world_size(cfg))
            except Exception as err:
                _fail(_one_line(err))
    GlobalHydra.instance().clear()


def run_stage(cfg: DictConfig, run_dir: Path) -> None:
    """Validate `cfg` and run its stage in `run_dir` (the programmatic entry point, used by tests), holding
    the run dir for the run's life (`rundir.claimed`: a lock; `overwrite=true` keeps the earlier run aside
    until this one finishes)."""
    validate(cfg, distributed.expected_world_size(cfg))
    from dpo_cli.engine import rundir  # torch: imported only when it is needed

    module = importlib.import_module(STAGES[cfg.stage][0])
    with rundir.claimed(cfg, run_dir):
        module.run(cfg, Path(run_dir))


def launch_ranks(cfg: DictConfig, run_dir: Path) -> None:
    """DeepSpeed without a launcher: start this job's `trainer.num_processes` ranks, each running this stage
    with the same overrides in `run_dir` (dpo_cli/distributed.py), once the run dir is known to be usable."""
    validate(cfg, distributed.expected_world_size(cfg))
    from dpo_cli.engine import rundir  # torch: imported only when it is needed

    overrides = [o for o in HydraConfig.get().overrides.task if o.split("=", 1)[0] != "stage"]
    with rundir.claimed(cfg, run_dir):  # this process holds the run dir for its ranks (first node only)
        try:
            distributed.launch(cfg.stage, overrides, run_dir, cfg.trainer.num_processes)
        except distributed.RanksFailed as err:
            if not err.interrupted:
                raise
            resumable = rundir.latest_resumable(run_dir)
            kept = f"continue from {resumable} with resume=true" if resumable else "no checkpoint was saved"
            raise distributed.RanksFailed(f"{err}; {kept}", err.exit_code) from err


@hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    if not cfg.resume and "SUBMITIT_EXECUTOR" in os.environ:
        from dpo_cli.engine import rundir  # torch: imported only when it is needed

        if rundir.requeued(run_dir):
            print(f"dpo-run: a requeued job: resuming {run_dir}", flush=True)
            cfg.resume = True
    try:
        if distributed.wanted(cfg) and not distributed.inside_launcher():
            launch_ranks(cfg, run_dir)
        else:
            with distributed.rank_context(cfg):  # a rank joins the process group; one process: nothing
                run_stage(cfg, run_dir)
    except distributed.RanksFailed as err:  # torchrun stopped the other ranks; their output is above
        print(f"dpo-run: error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except ConfigError as err:  # the user's input: one line, exit 2 (debug=true shows the traceback)
        if cfg.debug:
            raise
        _fail(str(err))
    except RunStopped as err:  # the run stopped itself and said what it kept: one line, exit 1
        if cfg.debug:
            raise
        if distributed.launcher_rank() == 0:  # under DeepSpeed every rank stops together; rank 0 says why
            print(f"dpo-run: stopped: {err}", file=sys.stderr)
        sys.exit(1)


def main(argv: list[str] | None = None) -> None:
    distributed.quiet_unless_rank_zero()
    args = list(sys.argv[1:] if argv is None else argv)
    # The deepspeed launcher appends --local_rank=N; the rank is in the environment as well.
    args = [arg for arg in args if not re.match(r"--local[_-]rank=", arg)]
    if not args or "-h" in args or "--help" in args:
        print(help_text())
        return
    stage_index = next(
        (
            i
            for i, a in enumerate(args)
            if not a.startswith("-") and "=" not in a and (i == 0 or args[i - 1] not in _FLAGS_WITH_VALUE)
        ),
        None,
    )
    if stage_index is None:
        _fail(f"no stage given; choose one of {', '.join(STAGES)} (dpo-run --help)")
    stage = args.pop(stage_index)
    if stage not in STAGES:
        _fail(f"unknown stage {stage!r}; choose one of {', '.join(STAGES)} (dpo-run --help)")
    overrides = [*_overrides(args), f"stage={stage}"]
    flags = [arg for arg in args if arg not in overrides]
    preflight(overrides)
    # Overrides first, flags after: argparse cannot collect overrides split around `--cfg job`.
    sys.argv = [sys.argv[0], *overrides, *flags]
    _hydra_main()


if __name__ == "__main__":
    main()
