"""PruningCallback with a real transformers Trainer (tiny BERT config, CPU): pruning happens, the
stats reach the Trainer's logs, the saved model is a plain checkpoint with zeros in place, and a
run resumed from a checkpoint ends with the same masks as an uninterrupted one. The same for
DistillationTrainer (a frozen teacher, docs/design.md §2.7), whose loss is distillation_loss."""

import pytest
import torch
from _tiny import one_thread  # noqa: F401  (module-scoped fixture: one thread)
from test_pruner import tiny_bert
from transformers import (BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM, Trainer,
                          TrainerCallback, TrainingArguments)

from sparse_ops import distillation_loss
from sparse_ops.pruning.config import PruningConfig
from sparse_ops.hf import DistillationMixin, DistillationTrainer, PruningCallback
from sparse_ops.pruning.pruner import PRUNER_STATE


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


def training_args(tmp_path, max_steps=12, **over):
    return TrainingArguments(output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=4,
                             learning_rate=1e-3, logging_steps=3, save_steps=6, report_to=[], use_cpu=True,
                             seed=0, data_seed=0, disable_tqdm=True, **over)


def trainer_for(tmp_path, method, max_steps=12, trainer_class=Trainer, **trainer_kwargs):
    config = PruningConfig(method=method, sparsity=0.8, start_step=2, end_step=9, interval=2,
                           num_train_examples=48, score_lr=1.0)
    callback = PruningCallback(config)
    trainer = trainer_class(model=tiny_bert(), args=training_args(tmp_path, max_steps), train_dataset=RandomTokens(),
                            callbacks=[callback], **trainer_kwargs)
    return trainer, callback


@pytest.mark.parametrize("method", ["mgpp", "movement"])
def test_trainer_prunes_logs_and_saves_a_plain_model(tmp_path, method):
    trainer, callback = trainer_for(tmp_path, method)
    trainer.train()
    pruner = callback.pruner
    assert pruner.sparsity()["global"] == pytest.approx(0.8, abs=1e-3)
    logged = [h for h in trainer.state.log_history if "pruning/sparsity" in h]
    assert logged and logged[-1]["pruning/target_sparsity"] == pytest.approx(0.8)
    # one threshold to log under global scope (MGPP's default); movement's default TopK is per matrix
    assert ("pruning/threshold" in logged[-1]) == (pruner.config.scope == "global")
    assert all(f"pruning/sparsity/{t.name}" in logged[-1] for t in pruner.targets)
    if method == "mgpp":
        assert "pruning/lambda" in logged[-1] and "pruning/prior_threshold" in logged[-1]
    assert (tmp_path / "checkpoint-6" / PRUNER_STATE).is_file()
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
    (tmp_path / "checkpoint-6" / PRUNER_STATE).unlink()
    trainer, _ = trainer_for(tmp_path, "movement")
    with pytest.raises(FileNotFoundError, match="cannot be restored"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-6"))


# ---- DistillationTrainer ----------------------------------------------------------------------------------

def bert(seed, num_labels=2):
    """tiny_bert's architecture with another seed (a stand-in for the dense teacher) or number of labels."""
    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(
        vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32, num_labels=num_labels))


class RecordingDistillationTrainer(DistillationTrainer):
    """Keeps every training loss compute_loss returned (before the Trainer accumulates and logs them)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.train_losses = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if model.training:
            self.train_losses.append(float(loss.detach()))
        return loss


def distillation_trainer_for(tmp_path, method="movement", max_steps=12, trainer_class=DistillationTrainer):
    teacher = bert(seed=1)
    trainer, callback = trainer_for(tmp_path, method, max_steps, trainer_class=trainer_class, teacher_model=teacher,
                                    temperature=2.0, alpha=0.5)
    return trainer, callback, teacher


def test_distillation_trainer_prunes_and_its_loss_is_distillation_loss(tmp_path):
    trainer, callback, teacher = distillation_trainer_for(tmp_path, "mgpp",
                                                          trainer_class=RecordingDistillationTrainer)
    assert isinstance(trainer, DistillationMixin) and trainer.loss_is_scaled_for_ga is False
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    trainer.train()
    assert callback.pruner.sparsity()["global"] == pytest.approx(0.8, abs=1e-3)
    assert (tmp_path / "checkpoint-6" / PRUNER_STATE).is_file()

    # the logged loss is the mean of the losses compute_loss returned since the last log
    losses = trainer.train_losses
    assert len(losses) == 12
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert logged == pytest.approx([sum(losses[i:i + 3]) / 3 for i in range(0, 12, 3)], rel=1e-5)

    # the teacher is neither trained nor pruned, and it stayed in eval mode
    after = teacher.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(m.training for m in teacher.modules())
    assert trainer.model is not teacher

    # compute_loss on one batch is distillation_loss of the two models' logits (dropout off to compare)
    student = trainer.model.eval()
    batch = next(iter(trainer.get_train_dataloader()))
    batch = {k: v.to(trainer.args.device) for k, v in batch.items()}
    with torch.no_grad():
        got, outputs = trainer.compute_loss(student, batch, return_outputs=True)
        s_logits = student(input_ids=batch["input_ids"]).logits
        t_logits = teacher(input_ids=batch["input_ids"]).logits
        want = distillation_loss(s_logits, t_logits, batch["labels"], temperature=2.0, alpha=0.5)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(outputs.logits, s_logits)
        assert "labels" in batch  # compute_loss left the caller's batch alone
        trainer.alpha = 0.0  # plain cross entropy: the model's own loss
        torch.testing.assert_close(trainer.compute_loss(student, batch), student(**batch).loss)


def test_resumed_distillation_trainer_run_ends_with_identical_student(tmp_path):
    trainer, callback, _ = distillation_trainer_for(tmp_path / "a")
    trainer.train()
    want_masks = [t.mask.clone() for t in callback.pruner.targets]
    want = {k: v.clone() for k, v in trainer.model.state_dict().items()}

    trainer, _, _ = distillation_trainer_for(tmp_path / "b")
    trainer.add_callback(StopAt(6))
    trainer.train()  # interrupted right after the step-6 checkpoint
    trainer, callback, teacher = distillation_trainer_for(tmp_path / "b")  # the teacher is passed again
    trainer.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-6"))
    assert all(torch.equal(a, t.mask) for a, t in zip(want_masks, callback.pruner.targets))
    got = trainer.model.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7, msg=k)
    assert not any(m.training for m in teacher.modules())


def test_distillation_trainer_rejects_a_teacher_with_other_labels(tmp_path):
    with pytest.raises(ValueError, match="teacher_model has 3 output labels .* student. has 2"):
        DistillationTrainer(model=tiny_bert(), teacher_model=bert(seed=1, num_labels=3),
                            args=training_args(tmp_path), train_dataset=RandomTokens())


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(alpha=2.0), ValueError, "alpha"),
    (dict(teacher_model="bert"), TypeError, "teacher_model"),
    (dict(compute_loss_func=lambda outputs, labels, num_items_in_batch=None: 0.0), ValueError, "compute_loss_func"),
])
def test_distillation_trainer_bad_arguments(tmp_path, kwargs, error, match):
    kwargs = {"teacher_model": bert(seed=1), **kwargs}
    with pytest.raises(error, match=match):
        DistillationTrainer(model=tiny_bert(), args=training_args(tmp_path), train_dataset=RandomTokens(), **kwargs)


def test_distillation_trainer_rejects_the_student_as_its_own_teacher(tmp_path):
    student = tiny_bert()
    with pytest.raises(ValueError, match="shares parameters"):
        DistillationTrainer(model=student, teacher_model=student, args=training_args(tmp_path),
                            train_dataset=RandomTokens())
    with pytest.raises(ValueError, match="label_smoothing_factor"):
        DistillationTrainer(model=student, teacher_model=bert(seed=1), train_dataset=RandomTokens(),
                            args=training_args(tmp_path, label_smoothing_factor=0.1))


def tiny_llama(seed):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32))


def test_causal_lm_logits_are_matched_with_the_next_token(tmp_path):
    student, teacher = tiny_llama(0), tiny_llama(1)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, alpha=0.0, train_dataset=RandomTokens(),
                                  args=training_args(tmp_path))
    assert trainer.shift_labels
    ids = torch.randint(0, 97, (3, 10), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt without targets
    batch = {"input_ids": ids, "labels": labels}
    student.eval()
    with torch.no_grad():
        torch.testing.assert_close(trainer.compute_loss(student, batch), student(**batch).loss)  # α = 0: its CE
        trainer.alpha = 0.7
        s_logits, t_logits = student(input_ids=ids).logits, teacher(input_ids=ids).logits
        want = distillation_loss(s_logits[:, :-1], t_logits[:, :-1], labels[:, 1:], temperature=2.0, alpha=0.7)
        torch.testing.assert_close(trainer.compute_loss(student, batch), want)
    with pytest.raises(ValueError, match="teacher_model has 50 output labels"):
        DistillationTrainer(model=student, teacher_model=LlamaForCausalLM(LlamaConfig(
            vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=2)), train_dataset=RandomTokens(), args=training_args(tmp_path))
