"""A small, real run for the protocol tests: the tiny model, taught a+b by a few supervised steps
(~1 s) so that real GRPO rollouts have right and wrong answers, EOS and different lengths; its
trainer, dataset, reward functions, verifier policy and honest nodes. Not a test module."""

from __future__ import annotations

import copy

import torch

from grpo_swarm.node import proving
from grpo_swarm.node.config import load_config
from grpo_swarm.node.data import arithmetic_examples
from grpo_swarm.node.models import build_tiny_model
from grpo_swarm.node.noise import group_keys
from grpo_swarm.node.rewards import build_reward_functions
from grpo_swarm.node.trainer import GRPOTrainer
from grpo_swarm.protocol.assignment import assign_prompts
from grpo_swarm.protocol.run_spec import AuditHooks, RunSpec
from grpo_swarm.protocol.identity import Identity
from grpo_swarm.protocol.proofs import build_reward_proof, sign_proof
from grpo_swarm.protocol.verify import InMemoryVerifierState, Verifier, VerifierPolicy

RUN_ID = "test-run"
RUN_SEED = 1234
DATASET = {"spec": "arithmetic:4", "split": "train", "seed": 0, "size": 64}
MAX_TOKENS = 4
SAMPLING_TOLERANCE = 0.05  # nats; the coordinator default
EOS = 1
REWARDS = [
    {"name": "arithmetic_accuracy", "weight": 1.0, "args": {}},
    {"name": "overlong_penalty", "weight": 0.5, "args": {"max_completion_length": MAX_TOKENS, "soft_cache_length": 3}},
]
REWARDS_TOML = ("rewards=[{name='arithmetic_accuracy'}, {name='overlong_penalty', weight=0.5, "
                f"args={{max_completion_length={MAX_TOKENS}, soft_cache_length=3}}}}]")


def teach_addition(model, tokenizer, examples, steps: int = 40, lr: float = 3e-3, seed: int = 0) -> None:
    """A few supervised steps on "a+b=" -> "c<eos>": about half the samples become right."""
    torch.manual_seed(seed)
    seqs = [tokenizer(e.prompt + e.columns["answer"], add_special_tokens=False).input_ids + [EOS] for e in examples]
    plen = [len(tokenizer(e.prompt, add_special_tokens=False).input_ids) for e in examples]
    width = max(map(len, seqs))
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    labels = torch.full((len(seqs), width), -100)
    for i, (s, p) in enumerate(zip(seqs, plen)):
        ids[i, : len(s)] = torch.tensor(s)
        labels[i, p : len(s)] = torch.tensor(s[p:])
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)


def identity(i: int) -> Identity:
    return Identity.from_seed(bytes([i + 1]) * 32)


COORDINATOR = Identity.from_seed(b"\xc0" * 32)


class World:
    def __init__(self, *, group_size: int = 4, prompts_per_round: int = 4, max_staleness: int = 1,
                 spot_check_rate: float = 0.0, lr: float = 1e-3):
        self.group_size, self.prompts_per_round, self.max_staleness = group_size, prompts_per_round, max_staleness
        loaded = build_tiny_model(0)
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        self.examples = arithmetic_examples(DATASET["size"], seed=DATASET["seed"], max_operand=4)
        teach_addition(self.model, self.tokenizer, self.examples)
        self.cfg = load_config(None, [
            f"grpo.group_size={group_size}", f"grpo.prompts_per_step={prompts_per_round}",
            f"grpo.max_completion_length={MAX_TOKENS}", f"optim.groups_per_microbatch={prompts_per_round}",
            f"optim.lr={lr}", "run.threads=1", REWARDS_TOML,
        ])
        self.reward_functions = build_reward_functions([r.model_dump() for r in self.cfg.rewards])
        self.trainer = GRPOTrainer(self.model, self.tokenizer, self.cfg, self.reward_functions)
        self.policy = VerifierPolicy(
            reward_specs=proving.reward_specs_of(self.cfg.rewards), max_completion_tokens=MAX_TOKENS,
            eos_token_ids=(EOS,), vocab_size=len(self.tokenizer), spot_check_rate=spot_check_rate,
            sampling_tolerance=SAMPLING_TOLERANCE,
        )
        assert self.policy.reward_spec_id == proving.spec_id_of(REWARDS)
        self.versions: dict[bytes, torch.nn.Module] = {}  # snapshot sha -> frozen copy
        self.shas: list[bytes] = []
        self._freeze()
        self.hooks = AuditHooks(
            reward_recomputer=proving.make_reward_recomputer(self.reward_functions, self.examples),
            decode_fn=proving.make_decoder(self.tokenizer),
            prompt_sha256_fn=proving.make_prompt_hasher(self.tokenizer, self.examples),
            logprob_fn=proving.make_logprob_fn(proving.snapshot_loader(self.model, known=self.versions),
                                               self.tokenizer, self.examples, run_seed=RUN_SEED),
        )
        self._seed = 0

    # -- versions
    def _freeze(self) -> bytes:
        frozen = copy.deepcopy(self.model).eval()
        sha = proving.state_dict_sha256(frozen.state_dict())
        self.versions[sha] = frozen
        self.shas.append(sha)
        return sha

    @property
    def version(self) -> int:
        return self.trainer.version

    def train_step(self, examples) -> bytes:
        """One GRPO step on fresh rollouts of ``examples``: version + 1; returns the new snapshot hash."""
        self.trainer.step(examples)
        return self._freeze()

    # -- run description
    def run_spec(self, **over) -> RunSpec:
        kw = dict(run_id=RUN_ID, run_seed=RUN_SEED, dataset_size=DATASET["size"],
                  prompts_per_round=self.prompts_per_round, group_size=self.group_size, policy=self.policy,
                  max_staleness=self.max_staleness, max_round_lag=0,
                  node={"dataset": DATASET, "model": "tiny", "sampling": {"temperature": 1.0, "top_p": 1.0, "top_k": 0},
                        "use_chat_template": None})
        kw.update(over)
        return RunSpec(**kw)

    def state(self, *nodes: Identity) -> InMemoryVerifierState:
        st = self.run_spec().new_state(b"")
        for ident in nodes:
            st.register(ident.public_key_bytes)
        st.publish_snapshot(0, self.shas[0])
        return st

    def verifier(self, state, **policy_changes) -> Verifier:
        policy = self.policy if not policy_changes else VerifierPolicy(**{**self.policy.__dict__, **policy_changes})
        return self.hooks.verifier(state, policy)

    # -- rollouts and proofs
    def assigned(self, node: Identity, round_index: int) -> list:
        idx = assign_prompts(RUN_SEED, node.node_id, round_index, DATASET["size"], self.prompts_per_round)
        return [self.examples[i] for i in idx]

    def groups(self, node: Identity, round_index: int, first_sequence: int, examples=None) -> list[list]:
        """Real rollouts of the (assigned) prompts at the current version → one proof list per group."""
        examples = self.assigned(node, round_index) if examples is None else examples
        self._seed += 1
        keys = group_keys(RUN_SEED, node.node_id, round_index, [ex.index for ex in examples], self.group_size)
        texts, rollouts = self.trainer.rollout(examples, seed=self._seed, noise_keys=keys)
        batch = self.trainer.score(examples, texts, rollouts)
        proofs = proving.proofs_from_batch(
            batch, examples, texts, node, run_id=RUN_ID, snapshot_sha256=self.shas[self.version],
            round_index=round_index, first_sequence=first_sequence, reward_spec_id=self.policy.reward_spec_id)
        g = self.group_size
        return [proofs[i : i + g] for i in range(0, len(proofs), g)]


def proof_fields(p) -> dict:
    """build_reward_proof keyword arguments that rebuild ``p`` (to forge a modified copy)."""
    return dict(
        run_id=p.run_id, policy_version=p.policy.version, snapshot_sha256=p.policy.sha256, round_index=p.round_index,
        prompt_index=p.prompt_index, prompt_sha256=p.prompt_sha256, group_id=p.group_id, group_size=p.group_size,
        completion_index=p.completion_index, completion_token_ids=list(p.completion_token_ids),
        completion_text=p.completion_text, behaviour_logprobs=list(p.behaviour_logprobs),
        rewards=[(r.name, r.value if r.applicable else None) for r in p.rewards], reward_total=p.reward_total,
        reward_spec_id=p.reward_spec_id, advantage=p.advantage, sequence=p.sequence, time_ms=p.time_ms,
    )


def forge(p, signer: Identity, **changes):
    """A copy of proof ``p`` with ``changes``, signed by ``signer`` (who must own the key it names)."""
    return sign_proof(build_reward_proof(**{**proof_fields(p), **changes}), signer)


def with_totals(group, signer: Identity, totals, per_member=None) -> list:
    """Re-sign ``group`` with new reward totals and the advantages node.grpo derives from them
    (so the group stays self-consistent); ``per_member`` = {completion index: other changes}."""
    from grpo_swarm.node import grpo

    adv = grpo.group_advantages(torch.tensor(totals, dtype=torch.float32), len(group)).tolist()
    out = []
    for p, t, a in zip(group, totals, adv):
        changes = dict((per_member or {}).get(p.completion_index, {}))
        changes.setdefault("reward_total", float(torch.tensor(t, dtype=torch.float32)))
        out.append(forge(p, signer, advantage=a, **changes))
    return out


def inflate(group, k: int, signer: Identity) -> list:
    """The node claims its completion ``k`` answered right: rewards, total and advantages consistent,
    only the recomputation from the text can tell."""
    totals = [p.reward_total + (1.0 if p.completion_index == k else 0.0) for p in group]
    rewards = [("arithmetic_accuracy", 1.0), ("overlong_penalty", group[k].rewards[1].value)]
    return with_totals(group, signer, totals, {k: {"rewards": rewards}})
