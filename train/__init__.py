"""Training on store datasets: SFT / L+R (`sft.py`), offline KD from teacher-logit caches (`kd.py`, losses in
`losses/`), evaluation (`evaluate.py`), all on `transformers.Trainer` + `peft`. CLI: `curate train`, `curate eval`."""
