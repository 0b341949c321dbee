"""Training: the one loop for both stages (`loop.py`), the `blip2lab train` command's run
config, model sources, fine-tuning modes, memory plan and export (`run.py`, `sources.py`,
`finetune.py`, `plan.py`, `export.py`), the data it reads (`data_sources.py`, `datasets.py`,
`streams.py`), frozen-feature caches (`feature_cache.py`) and CapFilt (`capfilt.py`)."""
