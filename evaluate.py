"""Evaluate a predictor and the baselines: `python evaluate.py [overrides]` (config: conf/evaluate.yaml).

python evaluate.py                                                   # demo traces, baselines + simulator
python evaluate.py ckpt_path=outputs/train/runs/<run>/predictor.safetensors
python evaluate.py data=puffin sim=deepseek_v2_lite sim.link=pcie5 ckpt_path=<run>/checkpoints/last.ckpt
WANDB_MODE=online python evaluate.py ckpt_path=wandb-artifact://<entity>/<project>/<name>:v0   # a W&B artifact (input)
python evaluate.py data.path=data/big/other-prompts split=all ckpt_path=...   # another prompt distribution
"""

import os
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    from predictor.evaluation import evaluate

    evaluate(cfg)


if __name__ == "__main__":
    main()
