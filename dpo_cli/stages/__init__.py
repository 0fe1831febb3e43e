"""One module per `dpo-run` stage, each with `run(cfg, run_dir)`: validate -> setup -> run -> finish."""
