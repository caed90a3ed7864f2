"""Train the expert-activation predictor: `python train.py [overrides]` (config: conf/train.yaml).

python train.py                                              # demo traces, token_ahead, CPU
python train.py experiment=deepseek_v2_lite_puffin model=layer_ahead model.net.lookahead=2
python train.py -m model.net.d_model=64,128 logger=csv       # Hydra multirun sweep
python train.py -m hparams_search=optuna                     # Optuna search (conf/hparams_search/optuna.yaml)
python train.py debug=fdr                                    # one batch of each stage (conf/debug/)
"""

import os
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from predictor.training import sweep_value, train

    return sweep_value(cfg, train(cfg))  # what a sweeper optimises (hparams_search=optuna): cfg.optimized_metric


if __name__ == "__main__":
    main()
