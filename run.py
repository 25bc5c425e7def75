"""Train the SPD scorer with GRPO.

    python run.py                                    # embedded default world, CPU, minutes
    python run.py loss.num_samples=4 reward.weight_b=-2
    python run.py -m reward.weight_c=0.25,0.5        # a Hydra multirun
"""

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

from spd_lightning.config import register_schemas
from spd_lightning.errors import SPDError
from spd_lightning.train import train

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))
register_schemas()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        return train(cfg)
    except Exception as err:
        # Hydra's instantiate wraps what a target raised; a user error prints alone, no traceback.
        cause = err if isinstance(err, SPDError) else err.__cause__
        if isinstance(cause, SPDError):
            raise SystemExit(f"error: {cause}") from None
        raise


if __name__ == "__main__":
    main()
