"""tasks/labelled.py: the sweep's labelled mismatches, checked against the dataset's answers."""

import torch

from spd_lightning.judge.ranking import Outcome
from spd_lightning.tasks.labelled import Labelled, answers_right


class _Digits:
    def decode(self, ids):
        return " ".join(str(i) for i in ids)


def test_each_branch_is_checked_against_the_datasets_answer():
    prompt = (1, 2)
    outcomes = [Outcome(0, prompt, 2, prompt + (7,), prompt + (8,)), Outcome(1, (3,), 1, (3, 5), (3, 5))]
    labelled = Labelled(outcomes, torch.tensor([False, True]), None, torch.tensor([0, 1]), 2, _Digits())
    path_right, hybrid_right, known = answers_right(labelled, {prompt: "8"})
    assert path_right.tolist() == [False, False] and hybrid_right.tolist() == [True, False]
    assert known.tolist() == [True, False]
