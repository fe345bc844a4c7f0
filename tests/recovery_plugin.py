"""A recovery method as a user would add one: this file and its import. It keeps the pruned model as it is
(the merged model is the input's weights), and records that it ran."""

import shutil
from pathlib import Path

from paser.cache import write_json
from paser.recovery import RECOVERY_METHODS, RecoveryMethod


@RECOVERY_METHODS.register("copy-test")
class CopyTest(RecoveryMethod):
    def run(self, config, callbacks=()):
        out = Path(config.out)
        out.mkdir(parents=True, exist_ok=True)
        shutil.copytree(config.model, out / "merged", dirs_exist_ok=True)
        train_log = {"method": self.name, "steps": 0, "seconds": 0.0, "tokens_per_s": 0.0, "loss_curve": [],
                     "trained_tokens": 0, "peak_memory_gb": 0.0}
        write_json(out / "train_log.json", train_log)
        return train_log
