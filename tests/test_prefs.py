"""`dpo-run prefs`: ranked records written atomically beside the target, prompts files checked."""

import json

import pytest

from dpo_cli.cli import main

TINY = ["prefs", "model=tiny", "logger=none", "prefs.max_prompts=2", "prefs.num_samples=2",
        "prefs.max_new_tokens=2"]  # fmt: skip


def test_the_records_file_is_written_without_touching_a_users_file_beside_it(tmp_path):
    """Issue 22 (8): prefs.output_path=records.jsonl wrote records.tmp beside it, overwriting and then
    deleting a user's file of that name. The temporary file now has a unique name."""
    mine = tmp_path / "records.tmp"
    mine.write_text("my notes\n")
    main([*TINY, f"output_root={tmp_path / 'out'}", f"prefs.output_path={tmp_path / 'records.jsonl'}"])
    rows = [json.loads(line) for line in (tmp_path / "records.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(len(r["responses"]) == 2 and len(r["rewards"]) == 2 for r in rows)
    assert mine.read_text() == "my notes\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "records.jsonl", "records.tmp"]


def test_bad_json_in_the_prompts_file_is_one_line(tmp_path, capsys):
    """Issue 22 (14): bad JSON in prefs.prompts_path was a traceback."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a"}\n{"prompt": \n')
    with pytest.raises(SystemExit) as exit_info:
        main([*TINY, f"output_root={tmp_path}", f"prefs.prompts_path={prompts}"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "\n" not in err
    assert f"{prompts} line 2: not valid JSON" in err
