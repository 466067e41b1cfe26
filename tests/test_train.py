"""train.py: the defaults of each task, unless a flag says otherwise."""
import json

import pytest



@pytest.mark.parametrize("argv,want", [
    ([], {"samples": 16, "temperature": 1.0, "batch_size": 4, "dynamic_draws": 12, "max_new_tokens": 256}),
    (["--samples", "8", "--dynamic-draws", "0"], {"samples": 8, "dynamic_draws": 0, "temperature": 1.0}),
    (["--task", "arc_easy"], {"samples": 4, "temperature": 0.7, "batch_size": 8, "dynamic_draws": 0}),
    (["--method", "lora"], {"samples": 4, "dynamic_draws": 0, "objective": "sft"}),
])
def test_train_py_takes_each_tasks_own_defaults_unless_a_flag_says_otherwise(argv, want, monkeypatch, capsys):
    import runpy
    import sys
    import checkpoint

    def stop(*a, **k):
        raise SystemExit("stopped before loading")
    monkeypatch.setattr(checkpoint, "load", stop)
    monkeypatch.setattr(sys, "argv", ["train.py", *argv])
    with pytest.raises(SystemExit, match="stopped before loading"):
        runpy.run_path("train.py", run_name="__main__")
    out = capsys.readouterr().out
    config = json.loads(out[out.index("{"):out.rindex("}") + 1])
    assert {k: config[k] for k in want} == want
