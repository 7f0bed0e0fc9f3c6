"""node/swarm/round_batch_file.py: a round's accepted batch survives a restart as the same gradient;
a torn or foreign file is removed, never half-used."""

import torch

from grpo_swarm.node.swarm.round_batch_file import drop_round_batch, load_round_batch, save_round_batch
from test_trainer import EXAMPLES, make_trainer


def _gradient(trainer, batch):
    trainer.model.zero_grad(set_to_none=True)
    trainer.compute_gradients(trainer.prepare(batch))
    return [p.grad.detach().clone() for p in trainer.trainable]


def test_the_saved_batch_gives_the_same_gradient_bit_for_bit(tmp_path):
    trainer, cfg = make_trainer()
    texts, rollouts = trainer.rollout(EXAMPLES, seed=5)
    batch = trainer.score(EXAMPLES, texts, rollouts).select_groups([0, 2], cfg.grpo.loss_type,
                                                                   cfg.grpo.max_completion_length)
    batch.advantages = torch.tensor([1.0, -1.0, 0.5, -0.5] * 2)  # a learning signal whatever was written
    path = tmp_path / "round_batch.safetensors"
    save_round_batch(path, 7, 3, batch)
    saved = load_round_batch(path)
    assert (saved.round_index, saved.version) == (7, 3)
    assert saved.batch.completions == batch.completions and saved.batch.rewards.names == batch.rewards.names
    assert [p.tolist() for p in saved.batch.rollouts.prompt_ids] == [p.tolist() for p in batch.rollouts.prompt_ids]
    want, got = _gradient(trainer, batch), _gradient(trainer, saved.batch)
    assert any(g.abs().sum() > 0 for g in want)
    assert all(torch.equal(a, b) for a, b in zip(want, got))
    drop_round_batch(path)
    assert load_round_batch(path) is None and not path.exists()


def test_a_torn_or_foreign_file_is_removed_and_not_resumed(tmp_path, caplog):
    trainer, cfg = make_trainer()
    texts, rollouts = trainer.rollout(EXAMPLES, seed=5)
    batch = trainer.score(EXAMPLES, texts, rollouts)
    path = tmp_path / "round_batch.safetensors"
    save_round_batch(path, 1, 0, batch)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # killed mid-write (without the atomic rename)
    assert load_round_batch(path) is None and not path.exists()
    assert "does not read as a saved round" in caplog.text
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(2)}, str(path), metadata={"round": '{"format": "something else"}'})
    assert load_round_batch(path) is None and not path.exists()
