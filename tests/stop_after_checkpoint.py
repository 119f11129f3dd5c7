"""``recipes/run_acs.py`` stopped, on every process, right after its first checkpoint is complete, as
``kill -9`` would stop it: no later file is written and nothing is cleaned up (the output folder's
lock stays behind). Run by test_multiprocess_recipe.py under ``accelerate launch``, with the
recipe's arguments."""

import os
import runpy
import sys
from pathlib import Path

from acs_hf import ACSTrainer

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "run_acs.py"
save_checkpoint = ACSTrainer._save_checkpoint


def save_then_die(self, model, trial):
    save_checkpoint(self, model, trial)
    self.accelerator.wait_for_everyone()  # every process is past the save: the checkpoint is complete
    os._exit(137)


ACSTrainer._save_checkpoint = save_then_die
sys.argv[0] = str(RECIPE)
runpy.run_path(str(RECIPE), run_name="__main__")
