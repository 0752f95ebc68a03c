"""PruningCallback with a real transformers Trainer (tiny BERT config, CPU): pruning happens, the
stats reach the Trainer's logs, the saved model is a plain checkpoint with zeros in place, and a
run resumed from a checkpoint ends with the same masks as an uninterrupted one."""

import pytest
import torch
from transformers import BertForSequenceClassification, Trainer, TrainerCallback, TrainingArguments

from sparse_ops.config import PruningConfig
from sparse_ops.hf import STATE_NAME, PruningCallback
from test_pruner import tiny_bert


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n=48, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, 97, (n, 12), generator=g)
        self.labels = torch.randint(0, 2, (n,), generator=g)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


class StopAt(TrainerCallback):
    """Interrupts a run after `step` optimizer steps (its schedule stays that of the full run)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = state.global_step >= self.step


def trainer_for(tmp_path, method, max_steps=12):
    config = PruningConfig(method=method, sparsity=0.8, start_step=2, end_step=9, interval=2,
                           num_train_examples=48, score_lr=1.0)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=4,
                             learning_rate=1e-3, logging_steps=3, save_steps=6, report_to=[], use_cpu=True,
                             seed=0, data_seed=0, disable_tqdm=True)
    callback = PruningCallback(config)
    trainer = Trainer(model=tiny_bert(), args=args, train_dataset=RandomTokens(), callbacks=[callback])
    return trainer, callback


@pytest.mark.parametrize("method", ["mgpp", "movement"])
def test_trainer_prunes_logs_and_saves_a_plain_model(tmp_path, method):
    trainer, callback = trainer_for(tmp_path, method)
    trainer.train()
    pruner = callback.pruner
    assert pruner.sparsity()["global"] == pytest.approx(0.8, abs=1e-3)
    logged = [h for h in trainer.state.log_history if "pruning/sparsity" in h]
    assert logged and "pruning/threshold" in logged[-1]
    assert logged[-1]["pruning/target_sparsity"] == pytest.approx(0.8)
    if method == "mgpp":
        assert "pruning/lambda" in logged[-1] and "pruning/prior_threshold" in logged[-1]
    assert (tmp_path / "checkpoint-6" / STATE_NAME).is_file()
    trainer.save_model(str(tmp_path / "final"))
    loaded = BertForSequenceClassification.from_pretrained(tmp_path / "final")
    zeros = sum(int((loaded.get_submodule(t.name).weight == 0).sum()) for t in pruner.targets)
    assert zeros == sum(int((~t.mask).sum()) for t in pruner.targets)


def test_resumed_trainer_run_ends_with_identical_masks(tmp_path):
    trainer, callback = trainer_for(tmp_path / "a", "movement")
    trainer.train()
    want = [t.mask.clone() for t in callback.pruner.targets]

    trainer, _ = trainer_for(tmp_path / "b", "movement")
    trainer.add_callback(StopAt(6))
    trainer.train()  # interrupted right after the step-6 checkpoint
    trainer, callback = trainer_for(tmp_path / "b", "movement")
    trainer.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-6"))
    assert all(torch.equal(a, t.mask) for a, t in zip(want, callback.pruner.targets))


def test_resume_without_pruner_state_is_an_error(tmp_path):
    trainer, _ = trainer_for(tmp_path, "movement")
    trainer.add_callback(StopAt(6))
    trainer.train()
    (tmp_path / "checkpoint-6" / STATE_NAME).unlink()
    trainer, _ = trainer_for(tmp_path, "movement")
    with pytest.raises(FileNotFoundError, match="cannot be restored"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-6"))
