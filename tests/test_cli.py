"""The command line: help, stage words, and bad input failing in one line with exit code 2."""

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from dpo_cli.cli import STAGES, config_groups, main
from dpo_cli.config import conf_dir, validate


def test_help_lists_stages_and_groups(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    for stage in STAGES:
        assert f"  {stage} " in out
    for group, options in config_groups().items():
        assert group in out and all(option in out for option in options)


def test_every_stage_has_a_config_file():
    assert {p.stem for p in (conf_dir() / "stage").glob("*.yaml")} == set(STAGES)


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["dpo", "loss=foo"], ["loss/foo", "dpo", "ipo", "unlikelihood"]),
        (["dpo", "beta=0"], ["beta=0.0", "> 0"]),
        (["dpo", "beta=-1"], ["beta=-1.0", "> 0"]),
        (["dpo", "loss=unlikelihood", "loss.alpha=1.5"], ["loss.alpha=1.5", "[0, 1]"]),
        (["dpo", "trainer.max_stepz=3"], ["trainer.max_stepz", "max_steps"]),
        (["dpo", "lr=fast"], ["lr=fast", "Float"]),
        (["dpo", "model=gpt5"], ["model/gpt5", "smollm2_135m", "tiny"]),
        (["train"], ["unknown stage", "sft", "dpo"]),
        (["-m", "dpo", "beta=0.1,-5"], ["beta=-5.0"]),
        (["sft", "loss=dpo"], ["stage sft trains with loss=sft"]),
        (["dpo", "data=jsonl"], ["data.path"]),
        (["eval", "reward=hf_classifier"], ["reward.model_name_or_path"]),
        (["dpo", "loss.label_smoothing=0.2"], ["only applies to loss=cdpo"]),
        (["dpo", "trainer.lean_memory=yes"], ["trainer.lean_memory=yes", "auto, on or off"]),
        (
            ["dpo", "trainer.heap_trim=true", "trainer.lean_memory=off"],
            ["trainer.heap_trim=true", "trainer.lean_memory=on or auto"],
        ),
        # Issue 22 (15): Hydra's lexer error named no remedy; a run name with ../ wrote outside output_root.
        (["sft", "exp_name=café"], ["cannot parse the override 'exp_name=café'", "exp_name='café'"]),
        (["sft", "run_name=../../../x"], ["run_name=../../../x: must be a plain directory name"]),
        (["sft", "trainer.max_grad_norm=-1"], ["trainer.max_grad_norm=-1.0", "null for no clipping"]),
        # Issue 21 (8): a key the schema lacks, added with +, was taken and ignored; a bad dtype failed only
        # after the run dir existed. Issue 21 (5): -m with --cfg job was a traceback.
        (["dpo", "+trainer.logging_steps=5"], ["no stage reads 'trainer.logging_steps'", "eval_every_steps"]),
        (["dpo", "model.dtype=bf16"], ["model.dtype=bf16", "float32, bfloat16 or float16"]),
        (["-m", "dpo", "beta=0.1,1", "--cfg", "job"], ["--cfg and --info show one job's config", "drop -m"]),
    ],
)
def test_bad_input_fails_in_one_line(argv, words, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dpo-run: error:") and "\n" not in err, err
    for word in words:
        assert word in err, (word, err)


def _all_group_options():
    return [(group, option) for group, options in config_groups().items() for option in options]


@pytest.mark.parametrize(("group", "option"), _all_group_options())
@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_shipped_yaml_composes_and_validates(stage, group, option):
    """Every file of every group composes with every stage (litgpt/lightning-hydra-template habit)."""
    if group == "loss" and (stage == "sft") != (option == "sft"):
        pytest.skip("loss=sft is the sft stage's loss and only its loss")
    overrides = [f"{group}={option}", f"stage={stage}"]
    if (group, option) == ("data", "jsonl"):
        overrides.append("data.path=records.jsonl")
    if (group, option) == ("data", "hub"):  # any hub dataset: its id is the user's
        overrides.append("data.hub_id=org/dataset")
    if (group, option) == ("reward", "hf_classifier"):
        overrides.append("reward.model_name_or_path=path/to/classifier")
    if (group, option) == ("reward", "model"):
        overrides.append("reward.path=path/to/rm/final")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    GlobalHydra.instance().clear()
    validate(cfg)
    assert cfg.stage == stage
    selected_by = {"trainer": None, "experiment": None, "reward": None}.get(group, "name")
    if (group, option) == ("logger", "wandb_tensorboard"):  # both loggers at once
        assert cfg.logger.name == "wandb" and cfg.logger.tensorboard
    elif selected_by:
        assert cfg[group][selected_by] == option
    if group == "trainer":  # single, or DeepSpeed ZeRO at the stage the file names
        assert cfg.trainer.engine == ("single" if option == "single" else "deepspeed")
        assert option == "single" or cfg.trainer.zero_stage == int(option.removeprefix("zero"))


def test_dpo_stage_rejects_the_sft_loss():
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["loss=sft", "stage=dpo"])
    GlobalHydra.instance().clear()
    with pytest.raises(ValueError, match="loss=sft belongs to"):
        validate(cfg)


def test_beta_is_the_one_key():
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["beta=0.7", "loss=ipo", "stage=dpo"])
    GlobalHydra.instance().clear()
    assert cfg.beta == 0.7 and cfg.loss.name == "ipo" and "beta" not in cfg.loss


def test_the_next_command_is_shell_quoted(tmp_path, capsys):
    """Issue 22 (15): the printed `next:` command was not shell-quoted; pasted, it broke on a space."""
    import shlex

    root = tmp_path / "my runs"
    main(["sft", "model=tiny", "logger=none", f"output_root={root}", "trainer.max_steps=1",
          "trainer.batch_size_examples=8", "trainer.microbatch_size_examples=8", "eval.num_prompts=0",
          "data.max_eval_examples=8"])  # fmt: skip
    [line] = [line for line in capsys.readouterr().out.splitlines() if line.startswith("next: ")]
    command = line.removeprefix("next: ").split("   (")[0]
    assert f"output_root={root}" in shlex.split(command)
