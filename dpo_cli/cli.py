"""`dpo-run <stage> [hydra overrides]`: the stage registry and the Hydra entry point.

The first bare word of argv is the stage; it becomes the override `stage=<word>` appended after the user's
overrides, so `-m` multirun, `--cfg job` and every other Hydra flag work as usual. Before Hydra starts, the
overrides are composed once (each sweep value too) so that a bad override fails in one line, exit code 2,
and a sweep gets its dir, named from its overrides (`sweep_dir_name`), so that it can be continued.
`plot` and `runs` (COMMANDS) read run dirs and start no Hydra job; `STAGE --help` is generated from the
schema; `-sc` is Hydra's shell completion, told about the stage word.
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
from dpo_cli.config import Config, conf_dir, run_dir_name, stage_view, validate
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
    "rm": ("dpo_cli.stages.rm", "reward model: the SFT model + a scalar head, Bradley-Terry on the pairs"),
    "ppo": (
        "dpo_cli.stages.ppo",
        "PPO (or ppo.algorithm=rloo) on reward= or ppo.reward_model_path, KL to SFT",
    ),
}
# Commands that are not training stages: they read run dirs, and start no Hydra job.
COMMANDS: dict[str, tuple[str, str]] = {
    "plot": (
        "dpo_cli.plot",
        "frontier.png/csv and winrate.png/csv of every run below DIR ... (--out, --title)",
    ),
    "runs": (
        "dpo_cli.runs",
        "a table of the runs below DIR (default outputs/): stage, overrides, metrics, status",
    ),
}
# Not a stage: reads data and a tokenizer, writes nothing (no Hydra run dir), dispatched before Hydra.
PREVIEW = ("preview", "the first examples as [sft|dpo] sees them: chat turns, tokens trained on, cuts")
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
    lines += [f"  {PREVIEW[0]:<8} {PREVIEW[1]}"]
    lines += ["", "commands:"] + [f"  {name:<8} {desc}" for name, (_, desc) in COMMANDS.items()]
    lines += ["", "config groups (group=option):"]
    lines += [f"  {group:<11} {', '.join(options)}" for group, options in config_groups().items()]
    lines += [
        "",
        "examples:",
        "  dpo-run sft",
        "  dpo-run dpo beta=0.1",
        "  dpo-run dpo loss=unlikelihood loss.alpha=0.5",
        "  dpo-run -m dpo beta=0.05,0.1,1,5",
        "  dpo-run dpo --cfg job          # print the stage's composed config and exit",
        "  dpo-run runs                   # what has run under outputs/",
        "  dpo-run plot outputs/default   # every eval point of the experiment on one figure",
        "",
        "A stage's keys, with type, default and meaning: dpo-run <stage> --help",
        "Hydra's own help: dpo-run <stage> --hydra-help",
        'Shell completion (bash): eval "$(dpo-run -sc install=bash)"',
    ]
    return "\n".join(lines)


def stage_help(stage: str) -> str:
    """`dpo-run STAGE --help`: every key the stage reads, with its type, this stage's default and the
    first sentence of its docstring in the schema."""
    from dataclasses import fields, is_dataclass

    from dpo_cli.config import STAGE_READS, field_docs

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        values = OmegaConf.to_container(
            compose(config_name="config", overrides=[f"stage={stage}"]), resolve=False, enum_to_str=True
        )
    GlobalHydra.instance().clear()
    docs = field_docs()
    reads = STAGE_READS.get(stage) or [f.name for f in fields(Config)]
    lines = [f"usage: dpo-run [-m] {stage} [key=value ...]", "", f"{stage}: {STAGES[stage][1]}", ""]
    lines.append("keys (type = default for this stage: meaning); groups: dpo-run --help")
    top = {f.name: f for f in fields(Config)}
    for entry in reads:
        group, _, only = entry.partition(".")
        if group not in top:
            continue
        schema = top[group].default_factory() if callable(top[group].default_factory) else None
        if schema is not None and is_dataclass(schema):
            for f in fields(schema):
                if not only or f.name == only:
                    key, value = f"{group}.{f.name}", values[group][f.name]
                    lines.append(_key_line(key, f.type, value, docs.get((type(schema).__name__, f.name), "")))
        else:
            lines.append(
                _key_line(group, top[group].type, values.get(group), docs.get(("Config", group), ""))
            )
    return "\n".join(lines)


def _key_line(key: str, type_name: str, value, doc: str) -> str:
    sentence = re.split(r"(?<=[a-z0-9)`]\.)\s+(?=[A-Z])", doc, maxsplit=1)[0]
    shown = "null" if value is None else value
    if key == "run_name":
        shown = "your overrides, as beta-0.5_loss-ipo"
    return f"  {key} ({type_name} = {shown}): {sentence}"


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


def _new_keys(parsed) -> str | None:
    """`+group.key=value` adds a key the schema lacks: Hydra takes it and no stage reads it."""
    schema = OmegaConf.structured(Config)
    for override in parsed:
        key = override.get_key_element()
        if not key.startswith("+") or key.startswith("++"):
            continue
        parent, _, name = key[1:].rpartition(".")
        node = OmegaConf.select(schema, parent) if parent else schema
        if isinstance(node, DictConfig) and name not in node:
            valid = ", ".join(node.keys())
            where = f" of {parent}" if parent else ""
            return f"{override.input_line}: no stage reads {key[1:]!r}; valid keys{where}: {valid}"
    return None


def sweep_dir_name(parsed, exclude_keys: list[str]) -> str:
    """A sweep's dir, named from its overrides but not from the swept values (`multirun-beta_loss-ipo`
    for `-m dpo beta=0.05,0.1 loss=ipo`): the same sweep, or one with other values, continues there with
    resume=true, and `frontier.csv` covers every job in it."""
    swept, fixed = [], []
    for o in parsed:
        key = o.get_key_element()
        # A run_name pattern stays in: a sweep that names its jobs differently is another series.
        if (key.lstrip("+~") in exclude_keys and key != "run_name") or key.startswith("hydra"):
            continue
        if o.is_sweep_override():
            swept.append(key)
        else:
            fixed.append(f"{key}-{o.get_value_element_as_str()}")
    return "multirun-" + run_dir_name("_".join(sorted(swept) + sorted(fixed)))


def preflight(overrides: list[str]) -> DictConfig:
    """Compose every job's config (each combination of sweep values) and validate it; fail in one line.
    Returns the first job's config."""
    parser = OverridesParser.create()
    try:
        parsed = parser.parse_overrides([o for o in overrides if not o.startswith("hydra")])
    except Exception as err:
        _fail(_unparsable(parser, overrides) or _one_line(err))
    added = _new_keys(parsed)
    if added:
        _fail(added)
    per_key = [
        [f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()]
        if o.is_sweep_override()
        else [o.input_line]
        for o in parsed
    ]
    jobs = list(itertools.islice(itertools.product(*per_key), _MAX_PREFLIGHT_JOBS))
    first = None
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        for job in jobs:
            try:
                cfg = compose(config_name="config", overrides=list(job))
                validate(cfg, distributed.expected_world_size(cfg))
            except Exception as err:
                _fail(_one_line(err))
            first = cfg if first is None else first
    GlobalHydra.instance().clear()
    return first


def run_stage(cfg: DictConfig, run_dir: Path) -> None:
    """Validate `cfg` and run its stage in `run_dir` (the programmatic entry point, used by tests), holding
    the run dir for the run's life (`rundir.claimed`: a lock; `overwrite=true` keeps the earlier run aside
    until this one finishes)."""
    validate(cfg, distributed.expected_world_size(cfg))
    from dpo_cli.engine import rundir  # torch: imported only when it is needed
    from dpo_cli.logging import quiet_console

    quiet_console(cfg.logger.verbose)
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
        if cfg.resume and (run_dir / "final").is_dir() and HydraConfig.get().mode.name == "MULTIRUN":
            print(f"resume: skipping {run_dir}: finished already (final/ exists)")
            return
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


def preview(args: list[str]) -> None:
    """`dpo-run preview [sft|dpo] [overrides]`: compose the stage's config as a run would, then show its
    first examples (dpo_cli/stages/preview.py)."""
    stage = args.pop(0) if args and args[0] in STAGES else None
    if any(arg.startswith("-") for arg in args):
        _fail(f"dpo-run preview takes overrides only, not {next(a for a in args if a.startswith('-'))}")
    overrides = [*args, f"stage={stage or 'dpo'}"]
    preflight(overrides)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    from dpo_cli.stages import preview as stage_preview

    try:
        stage_preview.show(cfg, overrides, stage_given=stage is not None)
    except ConfigError as err:
        _fail(str(err))


def _stage_index(args: list[str]) -> int | None:
    return next(
        (
            i
            for i, a in enumerate(args)
            if not a.startswith("-") and "=" not in a and (i == 0 or args[i - 1] not in _FLAGS_WITH_VALUE)
        ),
        None,
    )


def _shell_completion(args: list[str]) -> None:
    """`-sc install=bash` as Hydra has it; a query (`-sc query=bash`, from the installed completion) sees
    the stage word as `stage=<word>`, and the first word completes to a stage or command."""
    import os

    if any(a.startswith("query=") for a in args) and "COMP_LINE" in os.environ:
        program, *words = os.environ["COMP_LINE"].split(" ")
        index = _stage_index(words)
        if index is None or index == len(words) - 1:  # the stage word itself is being typed
            typed = words[index] if index is not None else ""
            names = [*STAGES, PREVIEW[0], *COMMANDS]
            print(" ".join(name for name in names if name.startswith(typed)))
            return
        stage = words.pop(index)
        os.environ["COMP_LINE"] = " ".join([program, f"stage={stage}", *words])
    sys.argv = [sys.argv[0], *args]
    _hydra_main()


def main(argv: list[str] | None = None) -> None:
    distributed.quiet_unless_rank_zero()
    args = list(sys.argv[1:] if argv is None else argv)
    # The deepspeed launcher appends --local_rank=N; the rank is in the environment as well.
    args = [arg for arg in args if not re.match(r"--local[_-]rank=", arg)]
    if "-sc" in args or "--shell-completion" in args:
        return _shell_completion(args)
    stage_index = _stage_index(args)
    if stage_index is not None and args[stage_index] in COMMANDS:
        command = args.pop(stage_index)
        sys.exit(importlib.import_module(COMMANDS[command][0]).main(args))
    if not args or (stage_index is None and ("-h" in args or "--help" in args)):
        print(help_text())
        return
    if stage_index is None:
        _fail(f"no stage given; choose one of {', '.join(STAGES)} (dpo-run --help)")
    stage = args.pop(stage_index)
    if stage == PREVIEW[0]:
        preview(args)
        return
    if stage not in STAGES:
        _fail(f"unknown stage {stage!r}; choose one of {', '.join([*STAGES, *COMMANDS])} (dpo-run --help)")
    if "-h" in args or "--help" in args:
        print(stage_help(stage))
        return
    if "--hydra-help" in args:  # Hydra composes its own help without the app's config: no overrides
        sys.argv = [sys.argv[0], "--hydra-help"]
        return _hydra_main()
    overrides = [*_overrides(args), f"stage={stage}"]
    flags = [arg for arg in args if arg not in overrides]
    multirun = "-m" in flags or "--multirun" in flags
    if multirun and any(f in flags for f in ("--cfg", "-c", "--info", "-i")):
        _fail("--cfg and --info show one job's config: drop -m, and give one value of each swept key")
    first = preflight(overrides)
    cfg_flag = next((flags[i + 1] for i, f in enumerate(flags[:-1]) if f in ("--cfg", "-c")), None)
    if cfg_flag == "job" and not {"--package", "-p", "--resolve"} & set(flags):
        # The stage's keys only (what config.yaml will hold), unresolved as Hydra prints them.
        print(OmegaConf.to_yaml(stage_view(OmegaConf.to_container(first, resolve=False, enum_to_str=True))))
        return
    if multirun and not any(o.startswith("hydra.sweep.dir=") for o in overrides):
        exclude = OmegaConf.load(conf_dir() / "config.yaml").hydra.job.config.override_dirname.exclude_keys
        parsed = OverridesParser.create().parse_overrides([o for o in overrides if not o.startswith("hydra")])
        sweep_dir = Path(first.output_root) / first.exp_name / stage / sweep_dir_name(parsed, list(exclude))
        overrides.append("hydra.sweep.dir='" + str(sweep_dir).replace("\\", "\\\\").replace("'", "\\'") + "'")
    # Overrides first, flags after: argparse cannot collect overrides split around `--cfg job`.
    sys.argv = [sys.argv[0], *overrides, *flags]
    _hydra_main()


if __name__ == "__main__":
    main()
