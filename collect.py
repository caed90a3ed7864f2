"""Record expert routing from a MoE causal LM: `python collect.py [overrides]` (config: conf/collect/collect.yaml).

    python collect.py                                                    # demo model + demo prompts
    python collect.py model=allenai/OLMoE-1B-7B-0924 prompts=prompts.txt out=data/big/traces/olmoe \
        batch_size=16 max_prompt_tokens=1024 device=cuda dtype=bfloat16
    python collect.py prompts=openai/gsm8k dataset_config=main split=test prompt_field=question \
        generate.max_new_tokens=128 out=data/big/traces/gsm8k-gen
"""

import os
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402


@hydra.main(version_base="1.3", config_path="conf/collect", config_name="collect")
def main(cfg: DictConfig) -> None:
    from integrate.collect_job import collect

    collect(OmegaConf.to_container(cfg, resolve=True))


if __name__ == "__main__":
    main()
