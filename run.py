"""Train the SPD scorer with GRPO, prepare records, evaluate, decode.

    python run.py                                    # train on the embedded default world, CPU, minutes
    python run.py loss.num_samples=4 reward.weight_b=-2
    python run.py -m reward.weight_c=0.25,0.5        # a Hydra multirun (more in sweeps/README.md)
    python run.py hparams_search=optuna              # an Optuna search of reward weights and lr
    python run.py task=prepare data.raw=PATH         # raw prompts -> records (conf/task/prepare.yaml)
    python run.py task=eval ckpt_path=CKPT           # the trained scorer against baselines
    python run.py task=decode ckpt_path=CKPT         # lossy speculative decoding end to end
    python run.py task=judge                         # train the zero-cost judge that decode loads

Returns cfg.optimized_metric to Hydra's sweeper. A single run that fails stops: a user error
as one line (exit 1), anything else with its traceback. In a multirun a failing job is logged
and returns None (Optuna counts the trial as failed), and the other jobs go on. Either way an
open wandb run is finished, so the next job starts its own.
"""

import logging
import os
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue

from spd_lightning.errors import SPDError
from spd_lightning.tasks.decode import decode
from spd_lightning.tasks.evaluate import evaluate
from spd_lightning.tasks.judge import judge
from spd_lightning.tasks.prepare import prepare
from spd_lightning.tasks.ranges import check_ranges
from spd_lightning.tasks.schemas import register_schemas
from spd_lightning.tasks.train import train
from spd_lightning.training.callbacks import finish_wandb

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))
register_schemas()
log = logging.getLogger("run")

# task=<name> (conf/task/<name>.yaml) -> what runs.
TASKS = {"train": train, "prepare": prepare, "eval": evaluate, "decode": decode, "judge": judge}


def user_error(err: Exception) -> str | None:
    """The message of the user error behind `err` (Hydra's instantiate wraps what a target
    raised); None when `err` is not one."""
    cause = err if isinstance(err, SPDError) else err.__cause__
    if isinstance(cause, SPDError):
        return str(cause)
    if isinstance(err, MissingMandatoryValue):  # a `???` in the config that nobody set
        return f"{err.full_key} must be set: python run.py {err.full_key}=..."
    return None


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    failed = True
    try:
        task = HydraConfig.get().runtime.choices.get("task") or "train"
        check_ranges(cfg)  # values of the right type that mean nothing (nan, a probability of 2)
        metric = TASKS[task](cfg)
        failed = False
        return metric
    except Exception as err:
        message = user_error(err)
        hydra_cfg = HydraConfig.get()
        if hydra_cfg.mode == RunMode.MULTIRUN:
            # One bad job must not end the sweep: log it, return no metric, let the others run.
            if message is not None:
                log.error("job %s failed: %s", hydra_cfg.job.num, message)
            else:
                log.exception("job %s failed", hydra_cfg.job.num)
            return None
        if message is not None:
            raise SystemExit(f"error: {message}") from None
        raise
    finally:
        # train() finishes it too; this also covers a failure before its fit started.
        finish_wandb(crashed=failed)


if __name__ == "__main__":
    main()
